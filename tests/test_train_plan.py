"""The gpu-plan tier's training steps: the 14B stage-1 step (LoRA r128 + the history patch convs, remat,
batch 1, 384x640) compiled for an H100 from abstract inputs (experiments/train_plan.py) fits its 80 GB; the
14B stage-3b DMD + GAN generator step (experiments/dmd_plan.py) does not fit one H100 and fits each of 8 on fsdp.

Needs jax's CUDA plugin (``make gpu-plan``); skipped without it. One 14B compile: about 5 minutes on 2 cores.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import dmd_plan  # noqa: E402
import gpu_plan  # noqa: E402
import train_plan  # noqa: E402

pytestmark = [pytest.mark.gpu_plan, pytest.mark.slow,
              pytest.mark.skipif(gpu_plan.plugin_missing() is not None, reason=str(gpu_plan.plugin_missing()))]

GIB = 2**30


@pytest.fixture(scope="module")
def stage1():
    case = next(c for c in train_plan.CASES if c.name == "stage 1, batch 1")
    return train_plan.step_plan(case, gpu_plan.HELIOS_14B.cfg, gpu_plan.h100())


def test_the_14b_stage1_step_fits_an_h100(stage1):
    assert train_plan.fits(stage1), f"peak {stage1.peak_bytes / 1e9:.1f} GB > {gpu_plan.GPU_MEMORY_GB} GB"


def test_its_arguments_are_the_bf16_base_and_fp32_adamw(stage1):
    """The frozen base in bf16 (the 14B weights, 26.7 GiB), AdamW's two float32 moments per trainable."""
    sizes = stage1.sizes
    assert 26 * GIB < sizes["frozen params"] < 28 * GIB
    assert sizes["optimizer state"] == pytest.approx(2 * sizes["trainable params"], rel=1e-3)
    assert stage1.plan.argument_bytes >= sum(sizes.values())


def test_the_step_uses_cudnn_attention(stage1):
    assert stage1.plan.cudnn_attention, stage1.plan.custom_calls


# --- stage 3b: the DMD + GAN steps (experiments/dmd_plan.py; issue 12 item 6) ----------------------------

# What a real run adds beside XLA's plan: the CUDA context and cuDNN/cuBLAS workspaces (typically 0.5-1 GiB).
RUNTIME_MARGIN = 2 * GIB
SIZE = gpu_plan.HELIOS_14B


@pytest.fixture(scope="module")
def dmd_trees():
    return dmd_plan.dmd_trees(SIZE.cfg, (SIZE.height // 8, SIZE.width // 8), SIZE.text_tokens)


# The DMD step is the largest program of the project (a 2+2+2 rollout and its amplified twin, three score
# forwards, the hooked discriminator and its vjp, two LoRA backward passes): its 14B compile took 33 minutes on a
# loaded 2-core machine, so the compiled checks run only when asked (HELIOS_DMD_PLAN=1).
needs_dmd_compile = pytest.mark.skipif(not os.environ.get("HELIOS_DMD_PLAN"),
                                       reason="the 14B DMD step compiles for tens of minutes: set HELIOS_DMD_PLAN=1")


@pytest.fixture(scope="module")
def dmd_fsdp8():
    """The plan that fits: the generator step (generator + critic updates + EMA, phase 1) on fsdp=8."""
    case = next(c for c in dmd_plan.CASES if c.update_generator and c.fsdp == 8)
    return dmd_plan.dmd_plan(case, SIZE)


def test_one_h100_cannot_hold_the_dmd_step(dmd_trees):
    """Exact bytes, no compile: the arguments (one base, both LoRAs, the heads, AdamW, EMA) plus the critic's fp32
    gradients, which all exist at once before the global-norm clip, already exceed one H100."""
    sizes = dmd_plan.sizes_of(dmd_trees)
    critic_grads = sizes["critic LoRA"] + sizes["GAN heads"]
    assert sum(sizes.values()) + critic_grads > gpu_plan.GPU_MEMORY_GB * 1e9


@needs_dmd_compile
def test_the_14b_dmd_generator_step_fits_on_fsdp8(dmd_fsdp8):
    peak = dmd_fsdp8.peak_bytes
    assert peak + RUNTIME_MARGIN < gpu_plan.GPU_MEMORY_GB * 1e9, f"peak {peak / 1e9:.1f} GB + 2 GiB margin > 80 GB"
    assert peak + RUNTIME_MARGIN < gpu_plan.device_memory_bytes()


@needs_dmd_compile
def test_the_dmd_step_holds_one_shared_bf16_base(dmd_fsdp8, dmd_trees):
    """The generator, the real score and the fake score read one base: the step's arguments are the trees'
    (one 26.7 GiB bf16 base, split 8 ways) and a second base would add 3.3 GiB per device."""
    assert "critic_params" not in dmd_trees.frozen
    assert 26 * GIB < dmd_fsdp8.sizes["base (bf16, shared)"] < 28 * GIB
    base_per_device = dmd_fsdp8.sizes["base (bf16, shared)"] / 8
    assert abs(dmd_fsdp8.plan.argument_bytes - dmd_fsdp8.per_device) < base_per_device / 2


@needs_dmd_compile
def test_the_dmd_step_has_remat_cudnn_and_the_gan_heads(dmd_fsdp8):
    assert dmd_fsdp8.remat_barriers > 0  # jax.checkpoint per block (gradient_checkpointing: true)
    assert dmd_fsdp8.plan.cudnn_attention, dmd_fsdp8.plan.custom_calls
    assert dmd_fsdp8.sizes["GAN heads"] > 3 * GIB  # five heads of six Conv3d, 768 features
    # The heads' strided 4x4x4 convolutions (no such window in the DiT) are in the compiled program.
    assert "size=4x4x4 stride=2x2x2" in dmd_fsdp8.plan.hlo
