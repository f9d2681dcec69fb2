"""The Pallas flash-attention kernel against a float64 reference.

On a CPU every kernel test runs in Pallas interpret mode, which pads blocks past the end of an array
with NaN and starts outputs as NaN: a missing mask or an unwritten row shows up as NaN, not as a
plausible number. Run on a GPU (``JAX_PLATFORMS=cuda``), the same tests run the compiled kernel, and
the ``gpu`` tests add the Helios shapes with the H100 tiles.

Tolerances (relative L2 ``rel_err`` and ``max_abs`` against float64 softmax attention on the same,
already-rounded inputs): float32 inputs 1e-5 / 1e-5 (seen ~3e-7); bfloat16 inputs 8e-3 / 2e-2 (the
output's own bf16 rounding is ~2e-3 relative; seen 2e-3 to 4e-3, as XLA's bf16 attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from reference import max_abs, rel_err

from helios_jax.config import TransformerConfig
from helios_jax.kernels import H100_CONFIGS, FlashConfig, attention_reference, flash_attention
from helios_jax.models import attention as attention_mod
from helios_jax.models.transformer import HeliosTransformer, param_shapes

# 16x16 tiles: tiny shapes still span several q and K/V blocks plus a ragged tail.
TINY = FlashConfig(block_q=16, block_k=16, num_warps=4, num_stages=2)
TOL = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (8e-3, 2e-2)}
# Helios: three self-attention lengths and the text cross-attention of each stage (noisy tokens x 512).
HELIOS_SHAPES = [(2940, 2940), (4560, 4560), (11040, 11040), (540, 512), (2160, 512), (8640, 512)]


def reference(q, k, v, scale=None) -> np.ndarray:
    """Softmax attention in float64 numpy, (B, T, N, H) layout."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("bqnh,bknh->bnqk", q, k) * scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnqk,bknh->bqnh", p / p.sum(-1, keepdims=True), v)


def random_qkv(seed, batch, q_len, kv_len, heads, head_dim, dtype, q_gain=1.0):
    """Fresh normal q, k, v; ``q_gain`` > 1 makes the softmax peaky (large logit spread)."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = (q_gain * jax.random.normal(kq, (batch, q_len, heads, head_dim), jnp.float32)).astype(dtype)
    k = jax.random.normal(kk, (batch, kv_len, heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, kv_len, heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v


def check(out, ref, dtype, tol=None):
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all(), "NaN/inf in the output: a row was not written or a masked read leaked"
    rel_tol, abs_tol = tol or TOL[dtype]
    assert rel_err(out, ref) < rel_tol and max_abs(out, ref) < abs_tol, (rel_err(out, ref), max_abs(out, ref))


@pytest.mark.parametrize(
    "batch, q_len, kv_len, heads, head_dim, dtype",
    [
        (1, 37, 53, 3, 64, jnp.float32),  # ragged q and K/V, several blocks of each
        (2, 40, 21, 2, 128, jnp.bfloat16),  # cross-attention shape, batch 2, head dim 128
        (1, 21, 40, 2, 128, jnp.float32),  # fewer queries than keys
        (2, 48, 32, 1, 64, jnp.bfloat16),  # exact multiples of the tile: no tail code at all
        (1, 5, 3, 2, 64, jnp.float32),  # both shorter than one tile
        (1, 17, 70, 2, 64, jnp.bfloat16),  # one row into the second q tile; 6 K/V rows past 4 tiles
    ],
)
def test_matches_float64_reference(batch, q_len, kv_len, heads, head_dim, dtype):
    q, k, v = random_qkv(q_len * kv_len + heads, batch, q_len, kv_len, heads, head_dim, dtype)
    out = jax.jit(lambda q, k, v: flash_attention(q, k, v, config=TINY))(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    check(out, reference(q, k, v), dtype)


@pytest.mark.parametrize("q_gain", [4.0, 12.0])
def test_peaky_softmax_and_explicit_scale(q_gain):
    """Large logits, row maxima in any K/V block (so in the tail too): exercises the running-max rescale."""
    q, k, v = random_qkv(int(q_gain), 1, 29, 45, 2, 64, jnp.float32, q_gain=q_gain)
    out = flash_attention(q, k, v, scale=0.3, config=TINY)
    # Logits up to ~+-100 cost float32 itself ~1e-6 relative (XLA's float32 attention: the same).
    check(out, reference(q, k, v, scale=0.3), jnp.float32, tol=(1e-5, 1e-4))


def test_default_tiles_on_a_longer_sequence():
    """The H100 tiles themselves (128-row q tiles, 64-row K/V tiles) with a ragged tail on both."""
    q, k, v = random_qkv(7, 1, 150, 200, 1, 128, jnp.bfloat16)
    check(flash_attention(q, k, v), reference(q, k, v), jnp.bfloat16)


def test_float32_reference_helper():
    """The helper the GPU tests and bench_attention check against (here against float64, batch 2)."""
    q, k, v = random_qkv(11, 2, 9, 13, 3, 64, jnp.bfloat16)
    assert rel_err(attention_reference(q, k, v), reference(q, k, v)) < 1e-6


def test_attention_dispatch_pallas_matches_xla():
    q, k, v = random_qkv(3, 2, 24, 40, 2, 64, jnp.float32)
    fn = jax.jit(lambda q, k, v, impl: attention_mod.attention(q, k, v, impl=impl), static_argnames="impl")
    ours, xla = fn(q, k, v, "pallas"), fn(q, k, v, "xla")
    assert rel_err(ours, xla) < 1e-5, rel_err(ours, xla)


def test_dit_with_pallas_attention_matches_xla():
    """A tiny Helios DiT (history terms, nn.scan over blocks) gives the same output with either backend."""
    cfg = TransformerConfig(num_attention_heads=2, attention_head_dim=64, rope_dim=(20, 22, 22), in_channels=4,
                            out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2)
    rng = np.random.default_rng(0)
    noise = lambda shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)  # noqa: E731
    params = jax.tree.map(lambda leaf: noise(leaf.shape, 0.2), param_shapes(cfg))  # (init_params compiles for ~20 s)
    inputs = dict(
        hidden_states=noise((1, 4, 2, 6, 6)),
        timestep=jnp.array([500.0]),
        encoder_hidden_states=noise((1, 7, 32)),
        indices_hidden_states=jnp.array([[5, 6]]),
        latents_history_short=noise((1, 4, 2, 6, 6)),
        indices_latents_history_short=jnp.array([[3, 4]]),
        latents_history_mid=noise((1, 4, 2, 6, 6)),
        indices_latents_history_mid=jnp.array([[1, 2]]),
        latents_history_long=noise((1, 4, 1, 6, 6)),
        indices_latents_history_long=jnp.array([[0]]),
    )
    ours, xla = (jax.jit(HeliosTransformer(cfg, attention_impl=impl).apply)({"params": params}, **inputs)
                 for impl in ("pallas", "xla"))
    assert rel_err(ours, xla) < 1e-5, rel_err(ours, xla)


@pytest.mark.parametrize(
    "q_shape, kv_shape, dtype, match",
    [
        ((1, 8, 2, 96), (1, 8, 2, 96), jnp.float32, "head_dim"),
        ((1, 8, 2, 64), (1, 8, 2, 64), jnp.int32, "dtype"),
        ((1, 8, 2, 64), (2, 8, 2, 64), jnp.float32, "same B, N, H"),
        ((1, 8, 2, 64), (1, 0, 2, 64), jnp.float32, "at least one"),
    ],
)
def test_rejects_what_it_cannot_run(q_shape, kv_shape, dtype, match):
    q, kv = jnp.ones(q_shape, dtype), jnp.ones(kv_shape, dtype)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, kv, kv)


def test_config_and_gradient_errors():
    with pytest.raises(ValueError, match="power of two"):
        FlashConfig(block_q=48, block_k=64, num_warps=4, num_stages=2)
    q = jnp.ones((1, 8, 1, 64))
    with pytest.raises(NotImplementedError, match="forward-only"):
        jax.grad(lambda q: flash_attention(q, q, q, config=TINY).sum())(q)


@pytest.mark.parametrize("q_len, kv_len", HELIOS_SHAPES)
def test_lowers_for_cuda_at_helios_shapes(q_len, kv_len):
    """No GPU needed: the kernel lowers through Pallas' Triton backend with the H100 tiles, one
    program per (q tile, head), as a single Triton call (so a CPU-only change cannot break the GPU path)."""
    q = jax.ShapeDtypeStruct((1, q_len, 40, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, kv_len, 40, 128), jnp.bfloat16)
    exported = export.export(
        jax.jit(flash_attention), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(q, kv, kv)
    text = exported.mlir_module()
    cfg = H100_CONFIGS[128]
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert f"grid_x = {-(-q_len // cfg.block_q)} : i32, grid_y = 40 : i32" in text
    assert f"num_stages = {cfg.num_stages} : i32, num_warps = {cfg.num_warps} : i32" in text


@pytest.mark.gpu
@pytest.mark.parametrize("q_len, kv_len", HELIOS_SHAPES)
def test_compiled_kernel_at_helios_shapes(q_len, kv_len):
    q, k, v = random_qkv(q_len + kv_len, 1, q_len, kv_len, 40, 128, jnp.bfloat16)
    lowered = jax.jit(lambda q, k, v: attention_mod.attention(q, k, v, impl="pallas")).lower(q, k, v)
    assert "__gpu$xla.gpu.triton" in lowered.as_text(), "impl='pallas' did not reach the compiled Triton kernel"
    out = lowered.compile()(q, k, v)
    ref = np.asarray(attention_reference(q, k, v), np.float64)  # float32 rounding ~1e-6: far below bf16's
    check(out, ref, jnp.bfloat16)


def test_default_attention_is_cudnn_only_on_a_gpu_in_16_bit(monkeypatch):
    dispatch = attention_mod
    assert dispatch.default_impl(jnp.bfloat16) == "xla"  # this CPU
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    assert dispatch.default_impl(jnp.bfloat16) == dispatch.default_impl(jnp.float16) == "cudnn"
    assert dispatch.default_impl(jnp.float32) == "xla"  # cuDNN's fused attention takes 16-bit inputs only
