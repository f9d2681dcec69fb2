"""The gpu-plan tier's training steps: the 14B stage-1 step (LoRA r128 + the history patch convs, remat,
batch 1, 384x640) compiled for an H100 from abstract inputs (experiments/plans/train_plan.py) fits its 80 GB; the
14B stage-3b DMD + GAN step's exact state bytes already exceed one H100. Its compiled plans (one H100 and
fsdp=8) come from experiments/plans/dmd_plan.py (tens of minutes per program on 2 cores, too long for CI; the
table is in RESULTS.md).

Needs jax's CUDA plugin (``make gpu-plan``); skipped without it. One 14B compile: about 5 minutes on 2 cores.
"""

from __future__ import annotations

import pytest

from experiments.plans import dmd_plan, gpu_plan, train_plan

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


# --- stage 3b: the DMD + GAN steps (experiments/plans/dmd_plan.py; issue 12 item 6) ----------------------------

SIZE = gpu_plan.HELIOS_14B


@pytest.fixture(scope="module")
def dmd_trees():
    return dmd_plan.dmd_trees(SIZE.cfg, (SIZE.height // 8, SIZE.width // 8), SIZE.text_tokens)


def test_one_h100_cannot_hold_the_dmd_step(dmd_trees):
    """Exact bytes, no compile: the arguments (one base, both LoRAs, the heads, AdamW, EMA) plus the critic's fp32
    gradients, which all exist at once before the global-norm clip, already exceed one H100."""
    sizes = dmd_plan.sizes_of(dmd_trees)
    critic_grads = sizes["critic LoRA"] + sizes["GAN heads"]
    assert sum(sizes.values()) + critic_grads > gpu_plan.GPU_MEMORY_GB * 1e9

