"""The gpu-plan tier: Helios' programs compiled for an H100 on this CPU, and what their plans must hold.

Needs jax's CUDA plugin (``make gpu-plan`` installs it from locks/gpu-plan.txt); without it every test
here is skipped with that reason. Nothing runs on a device: inputs are abstract, placed on an H100 of
``jax.experimental.topologies`` (experiments/plans/gpu_plan.py). The 14B plans take a few minutes on 2 cores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from experiments import flop_counts
from experiments.plans import gpu_plan, roofline

pytestmark = [pytest.mark.gpu_plan,
              pytest.mark.skipif(gpu_plan.plugin_missing() is not None, reason=str(gpu_plan.plugin_missing()))]

GIB = 2**30


@pytest.fixture(scope="module")
def h100():
    return gpu_plan.h100()


@pytest.fixture(scope="module")
def plans(h100):
    return gpu_plan.all_plans(gpu_plan.HELIOS_14B, h100)


DIT = [f"DiT forward, stage {s}" for s in range(3)]
CHUNKS = ["distilled chunk 2+2+2", "distilled chunk 1+1+1 amplified", "base chunk 50 steps CFG"]


@pytest.mark.parametrize("name", DIT + CHUNKS)
def test_cudnn_flash_attention_is_chosen_for_bf16(plans, name):
    assert plans[name].cudnn_attention, f"{name}: custom calls {plans[name].custom_calls}"


@pytest.mark.parametrize("name", DIT + CHUNKS)
def test_no_float32_copy_of_a_stacked_weight(plans, name):
    assert plans[name].float32_weight_copies() == []


@pytest.mark.parametrize("name", DIT + CHUNKS)
def test_dit_programs_have_small_temporaries(plans, name):
    """14B weights are arguments (26.7 GiB); what the programs add on top must stay under 2 GiB."""
    assert 26 * GIB < plans[name].argument_bytes < 28 * GIB
    assert plans[name].temp_bytes < gpu_plan.DIT_TEMP_LIMIT_GIB * GIB


def test_distilled_chunk_with_the_vae_fits_an_h100(plans):
    for vae in ("VAE decode float32", "VAE decode bfloat16"):
        both = gpu_plan.chunk_with_vae_bytes(plans["distilled chunk 2+2+2"], plans[vae])
        assert both < gpu_plan.GPU_MEMORY_GB * 1e9 and both < gpu_plan.device_memory_bytes(), (vae, both / GIB)


def test_vae_decode_bf16_halves_the_fp32_plan(plans):
    fp32, bf16 = plans["VAE decode float32"], plans["VAE decode bfloat16"]
    assert bf16.temp_bytes < 0.6 * fp32.temp_bytes and bf16.argument_bytes < 0.6 * fp32.argument_bytes


def test_the_amplified_first_chunk_reuses_the_2_2_2_program(plans):
    """1+1+1 amplified runs twice the steps: the same layout as 2+2+2, hence one compiled program."""
    assert plans["distilled chunk 1+1+1 amplified"].hlo == plans["distilled chunk 2+2+2"].hlo


def test_the_float32_copy_check_sees_one(h100):
    """The check itself: a layer scan over a float32 copy of its bf16 stacked weight is caught."""
    weights = {"blocks": {"kernel": jax.ShapeDtypeStruct((4, 64, 96), jnp.bfloat16)}}

    def f(params, x):
        with jax.named_scope("blocks"):
            stacked = params["blocks"]["kernel"].astype(jnp.float32)
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w)[:, :64], None), x, stacked)[0]

    lowered = jax.jit(f).lower(gpu_plan.on_device(weights, h100),
                               gpu_plan.on_device(jax.ShapeDtypeStruct((128, 64), jnp.float32), h100))
    assert gpu_plan.compile_plan("upcast", lowered, weights).float32_weight_copies()


# --- the roofline (experiments/plans/roofline.py) reads the same plans --------------------------------------


@pytest.fixture(scope="module")
def tiny_kernels(h100):
    size = gpu_plan.TINY
    plans = {f"stage {s}": gpu_plan.dit_forward(size.cfg, size.work, s, h100) for s in (0, 2)}
    plans["chunk"] = gpu_plan.chunk_programs(size, h100)[0]
    return roofline.analyse(plans)


@pytest.mark.parametrize("stage", [0, 2])
def test_roofline_flops_of_the_dit_forward_equal_dit_flops(tiny_kernels, stage):
    size = gpu_plan.TINY
    expected = flop_counts.dit_flops(size.cfg, size.work, stage)["total"]
    assert roofline.matmul_flops(tiny_kernels[f"stage {stage}"]) == pytest.approx(expected, rel=0.01)
    attention = sum(k.count * k.flops for k in tiny_kernels[f"stage {stage}"] if k.kind == "attention")
    assert attention == pytest.approx(flop_counts.dit_flops(size.cfg, size.work, stage)["attention"], rel=0.01)


def test_roofline_counts_every_step_of_the_chunk(tiny_kernels):
    """The chunk's loops (2+2+2 steps around the 2-layer scan) are multiplied out: its FLOPs are the chunk's."""
    size = gpu_plan.TINY
    expected = flop_counts.chunk_flops(size.cfg, size.work, (2, 2, 2), guided=False)
    assert roofline.matmul_flops(tiny_kernels["chunk"]) == pytest.approx(expected, rel=0.01)
    assert 0 < roofline.other_share(tiny_kernels["chunk"]) < 100


def test_the_ffn_gelu_reaches_cublaslts_epilogue_only_in_the_gemms_dtype():
    """experiments/plans/gelu_epilogue.py's finding on tiny shapes (docs/performance.md): with GEMMs on cuBLASLt,
    XLA's GEMM rewriter fuses the bias and tanh GELU (BIAS_GELU) only when the GELU is written on the GEMM's bf16
    output; the model's float32 GELU keeps a pass of its own, and on XLA's default Triton GEMMs neither form fuses.
    If this fails, XLA changed: measure again and update the docs."""
    from experiments.plans import gelu_epilogue

    triton, cublaslt = gelu_epilogue.GEMM_PATHS
    model, bf16, _ = gelu_epilogue.FORMS
    row = {(form, path): gelu_epilogue.case_row(form, path, 256, 128, 64)[2:4]
           for form, path in [(model, cublaslt), (bf16, cublaslt), (bf16, triton)]}
    assert row[bf16, cublaslt] == ["epilogue BIAS_GELU", "none"]
    assert row[model, cublaslt][0] == "epilogue BIAS" and row[model, cublaslt][1] != "none"
    assert "tanh" not in row[bf16, triton][0] and row[bf16, triton][1] != "none"
