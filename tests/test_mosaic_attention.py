"""The Mosaic GPU attention (``impl="mosaic"``) on a CPU: its algorithm, its errors, its lowering for CUDA.

Mosaic GPU has no CPU path, and Pallas' GPU interpret mode (jax 0.10.2) cannot run the kernel: it has no rule
for ``run_state`` (the in-place wgmma accumulator), no CPU lowering for ``layout_cast``, and its wgmma fails on
a transposed shared-memory operand (``transpose_ref``, K^T). So what runs here is ``blockwise``, the kernel's
algorithm in XLA ops (the same padding, tiles, masked last block and ``softmax_update`` the kernel calls),
against float64 attention; the kernel itself is compiled for sm_90a in the gpu-plan tier
(tests/test_gpu_plan_mosaic.py) and its numbers are checked on a GPU by experiments/benchmarks/headline.py and by
the ``gpu`` tests at the end (run_all's ``tests`` part runs them there).

Tolerances, relative L2 and max-abs against float64 softmax attention of the same rounded inputs: bf16
8e-3 / 2e-2 and fp16 2e-3 / 4e-3 (the output's own rounding is ~2e-3 / ~3e-4 relative; p is rounded to the
input dtype before the second dot, as in the kernel and every flash kernel).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from reference import max_abs, rel_err
from test_kernels import HELIOS_SHAPES, random_qkv, reference

from helios_jax import demo
from helios_jax.kernels import MosaicConfig, attention_reference, mosaic, mosaic_attention
from helios_jax.models import attention as attention_mod
from helios_jax.pipeline import HeliosPipeline, PipelineError

TOL = {jnp.bfloat16: (8e-3, 2e-2), jnp.float16: (2e-3, 4e-3)}


def check(out, ref, dtype):
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    rel_tol, abs_tol = TOL[dtype]
    assert rel_err(out, ref) < rel_tol and max_abs(out, ref) < abs_tol, (rel_err(out, ref), max_abs(out, ref))


@pytest.mark.parametrize(
    "batch, q_len, kv_len, heads, head_dim, dtype",
    [
        (1, 200, 300, 2, 128, jnp.bfloat16),  # both ragged: q padded to 256, the third K/V block masked
        (2, 37, 7, 1, 64, jnp.float16),  # cross-attention shape: fewer keys than one block
        (1, 128, 256, 1, 128, jnp.bfloat16),  # whole tiles: no padding, no masked block
    ],
)
def test_mosaic_dispatch_on_cpu_matches_float64(batch, q_len, kv_len, heads, head_dim, dtype):
    q, k, v = random_qkv(q_len + kv_len, batch, q_len, kv_len, heads, head_dim, dtype, q_gain=2.0)
    out = jax.jit(lambda q, k, v: attention_mod.attention(q, k, v, impl="mosaic"))(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    check(out, reference(q, k, v), dtype)


def test_padded_keys_are_masked_and_the_scale_is_used():
    """A 64-key block over 40 keys: unmasked, the 24 zero keys would take softmax weight. A scale of 0.3."""
    q, k, v = random_qkv(5, 1, 64, 40, 1, 64, jnp.bfloat16)
    config = MosaicConfig(block_q=64, block_kv=64)
    out = jax.jit(lambda q, k, v: mosaic.blockwise(q, k, v, scale=0.3, config=config))(q, k, v)
    check(out, reference(q, k, v, scale=0.3), jnp.bfloat16)
    assert mosaic.padded_lengths(40, 40, config) == (128, 64)


def test_bad_inputs_fail_before_tracing():
    q, k, v = random_qkv(0, 1, 8, 8, 1, 64, jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mosaic_attention(q, k, v)
    q32, k32, v32 = (x[..., :32].astype(jnp.bfloat16) for x in (q, k, v))
    with pytest.raises(ValueError, match="head_dim"):
        mosaic_attention(q32, k32, v32)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    with pytest.raises(ValueError, match="mosaic attention kernel takes no bias or mask"):
        attention_mod.attention(qb, kb, vb, impl="mosaic", mask=jnp.ones((1, 1, 8, 8), bool))
    with pytest.raises(ValueError, match="multiple of 64"):
        MosaicConfig(block_q=96)


def test_gradients_raise_clearly():
    q, k, v = random_qkv(1, 1, 8, 8, 1, 64, jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="mosaic_attention is forward-only"):
        jax.grad(lambda q: mosaic_attention(q, k, v).astype(jnp.float32).sum())(q)


def test_gpu_interpret_mode_still_cannot_run_the_in_place_accumulator():
    """Pins the first reason the kernel is checked here through ``blockwise``: Pallas' GPU interpret mode has no rule
    for ``run_state`` (the kernel's ``p v`` wgmma accumulates onto its accumulator in place). When this fails, jax
    has learnt it: try running the kernel itself in interpret mode (the other two gaps, the module docstring)."""
    # Not exported by jax.experimental.pallas.mosaic_gpu in jax 0.10.2.
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(x_ref, out_ref):
        out_ref[...] = pl.run_state(lambda acc_ref: None)(plgpu.ACC.init(x_ref[...]))

    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32), interpret=InterpretGPUParams())
    try:
        with pytest.raises(NotImplementedError, match="run_state"):
            kernel(jnp.ones((64, 64), jnp.float32))
    finally:
        reset_gpu_interpret_mode_state()  # interpret mode's own rule after an exception


def test_cuda_lowering_is_one_mosaic_kernel_on_padded_tiles():
    """Lowered for CUDA (no GPU needed), impl='mosaic' is the Mosaic GPU custom call on q padded 2,940 -> 2,944."""
    q = jax.ShapeDtypeStruct((1, 2940, 40, 128), jnp.bfloat16)
    exported = export.export(
        jax.jit(lambda q, k, v: attention_mod.attention(q, k, v, impl="mosaic")), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")],
    )(q, q, q)
    text = exported.mlir_module()
    assert text.count("mosaic_gpu_v2") == 1
    assert set(re.findall(r"tensor<1x(\d+)x40x128xbf16>", text)) == {"2940", "2944"}


def test_the_pipeline_refuses_mosaic_for_a_head_dim_it_lacks_before_any_weight():
    with pytest.raises(PipelineError, match=r"'mosaic'.*head_dim must be 64, 128, 192 or 256.* has head_dim 32"):
        HeliosPipeline.from_pretrained(demo.demo_checkpoint(), attention_impl="mosaic", compilation_cache=False)


@pytest.mark.gpu
@pytest.mark.parametrize("q_len, kv_len", [(200, 300), (37, 7), *HELIOS_SHAPES])
def test_compiled_kernel_on_a_gpu(q_len, kv_len):
    """The Mosaic GPU kernel itself (TMA, barriers, wgmma), small ragged shapes and Helios', against float32."""
    q, k, v = random_qkv(q_len + kv_len, 1, q_len, kv_len, 40 if q_len > 512 else 2, 128, jnp.bfloat16)
    lowered = jax.jit(lambda q, k, v: attention_mod.attention(q, k, v, impl="mosaic")).lower(q, k, v)
    assert "mosaic_gpu_v2" in lowered.as_text(), "impl='mosaic' did not reach the Mosaic GPU kernel"
    out = lowered.compile()(q, k, v)
    check(out, np.asarray(attention_reference(q, k, v), np.float64), jnp.bfloat16)
