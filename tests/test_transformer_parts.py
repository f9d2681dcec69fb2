"""Per-submodule parity (RoPE, the memory patchifier, one block), so a failure says where.

Tolerances as in test_transformer.py: relative L2 <= 1e-5 in float32 (RoPE tables: 1e-6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.transformers import transformer_helios as ref
from reference import randomize, rel_err, to_numpy

from helios_jax.config import TransformerConfig
from helios_jax.convert import KeyMap, load_params
from helios_jax.models.memory import PatchEmbed, avg_pool, embed_history_term, pad_to_multiple
from helios_jax.models.rope import rope_grid
from helios_jax.models.transformer import HeliosBlock

ROPE_DIM, THETA = (44, 42, 42), 10000.0


def _reference_rope(indices: torch.Tensor, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference table (B, 2D, T, H, W) as our half-width (B, T, H, W, D/2) cos and sin."""
    table = ref.HeliosRotaryPosEmbed(ROPE_DIM, THETA)(indices, h, w, "cpu")
    d = sum(ROPE_DIM)
    half = lambda t: to_numpy(t[:, 0::2]).transpose(0, 2, 3, 4, 1)  # noqa: E731 (pairs share one value)
    np.testing.assert_array_equal(to_numpy(table[:, 0:d:2]), to_numpy(table[:, 1:d:2]))
    return half(table[:, :d]), half(table[:, d:])


@pytest.mark.parametrize("indices", [[[0, 1, 2]], [[20, 21, 22, 23, 24, 25, 26, 27, 28]], [[0, 19], [3, 40]]])
def test_rope_tables(indices):
    indices = torch.tensor(indices)
    cos_ref, sin_ref = _reference_rope(indices, 6, 10)
    cos, sin = rope_grid(jnp.asarray(indices.numpy()), 6, 10, ROPE_DIM, THETA)
    assert rel_err(cos, cos_ref) <= 1e-6 and rel_err(sin, sin_ref) <= 1e-6


@pytest.mark.parametrize("factor,shape", [(2, (2, 5, 7)), (4, (16, 6, 10)), (4, (3, 3, 5))])
def test_rope_pooling_for_compressed_terms(factor, shape):
    """Replicate padding to the pool window, then average pooling, on a (B, C, T, H, W) table."""
    x = torch.randn(2, 3, *shape)
    expected = ref.center_down_sample_3d(ref.pad_for_3d_conv(x, (factor,) * 3), (factor,) * 3)
    ours = avg_pool(pad_to_multiple(jnp.asarray(x.numpy()), (factor,) * 3, axes=(2, 3, 4)), factor, axes=(2, 3, 4))
    assert rel_err(ours, to_numpy(expected)) <= 1e-6


@pytest.mark.parametrize("name,factor,latent_shape", [("short", 1, (2, 6, 10)), ("mid", 2, (2, 6, 10)), ("long", 4, (16, 6, 10)), ("long", 4, (5, 10, 14))])
def test_history_patchifier(name, factor, latent_shape):
    """Padded strided convolution of a history term and its pooled rotary tables."""
    kernel = tuple(factor * p for p in (1, 2, 2))
    conv = randomize(torch.nn.Conv3d(4, 8, kernel_size=kernel, stride=kernel), seed=factor)
    latents = torch.randn(2, 4, *latent_shape)
    padded = latents if factor == 1 else ref.pad_for_3d_conv(latents, kernel)
    expected_tokens = to_numpy(conv(padded).flatten(2).transpose(1, 2).detach())
    indices = torch.arange(latent_shape[0])[None]
    table = ref.HeliosRotaryPosEmbed(ROPE_DIM, THETA)(indices, latent_shape[1] // 2, latent_shape[2] // 2, "cpu")
    if factor > 1:
        table = ref.center_down_sample_3d(ref.pad_for_3d_conv(table, (factor,) * 3), (factor,) * 3)
    table = to_numpy(table.flatten(2).transpose(1, 2))

    patch = PatchEmbed(8, kernel, name=f"patch_{name}")
    params = load_params(dict(conv.state_dict()), _patch_shapes(patch), KeyMap())
    rope = rope_grid(jnp.asarray(indices.numpy()), latent_shape[1] // 2, latent_shape[2] // 2, ROPE_DIM, THETA)
    tokens, (cos, sin) = patch.apply(
        {"params": params}, jnp.asarray(latents.numpy()), factor, rope,
        method=lambda module, x, f, r: embed_history_term(module, x, f, r),
    )
    d = sum(ROPE_DIM)
    assert rel_err(tokens, expected_tokens) <= 1e-5
    assert rel_err(cos, table[..., 0:d:2]) <= 1e-6 and rel_err(sin, table[..., d::2]) <= 1e-6


def _patch_shapes(patch: PatchEmbed) -> dict:
    x = jnp.zeros((1, 4, *patch.patch))
    return jax.eval_shape(lambda k: patch.init(k, x), jax.random.key(0))["params"]


@pytest.mark.parametrize("guidance,amplify", [(True, "per_head"), (False, "scalar"), (True, None)])
def test_one_block(guidance, amplify):
    """One HeliosTransformerBlock with per-token modulation (history at timestep 0) and RoPE."""
    cfg = TransformerConfig(num_attention_heads=2, attention_head_dim=16, text_dim=8, freq_dim=16, ffn_dim=24,
                            num_layers=1, rope_dim=(6, 6, 4), guidance_cross_attn=guidance,
                            is_amplify_history=amplify is not None, history_scale_mode=amplify or "per_head")
    dim, hist, noisy, batch = cfg.inner_dim, 5, 7, 2
    block = randomize(ref.HeliosTransformerBlock(
        dim, cfg.ffn_dim, cfg.num_attention_heads, cfg.qk_norm, cfg.cross_attn_norm, cfg.eps, None,
        guidance_cross_attn=guidance, is_amplify_history=amplify is not None, history_scale_mode=amplify or "per_head",
    ), seed=3)
    x = torch.randn(batch, hist + noisy, dim)
    context = torch.randn(batch, 4, dim)
    mod_h, mod_n = torch.randn(1, 6, dim), torch.randn(batch, 6, dim)
    temb = torch.cat([mod_h[:, None].expand(batch, hist, 6, dim), mod_n[:, None].expand(batch, noisy, 6, dim)], 1)
    cos, sin = rope_grid(jnp.asarray([[0, 1, 2]]), 2, 2, cfg.rope_dim, cfg.rope_theta)
    cos, sin = (t.reshape(1, -1, t.shape[-1])[:, : hist + noisy] for t in (cos, sin))
    interleave = lambda t: torch.from_numpy(np.repeat(np.asarray(t), 2, axis=-1))  # noqa: E731
    rotary = torch.cat([interleave(cos), interleave(sin)], dim=-1)
    with torch.no_grad():
        expected = to_numpy(block(x, context, temb, rotary, noisy))

    ours = HeliosBlock(cfg, hist, "xla")
    j = lambda t: jnp.asarray(t.numpy())  # noqa: E731
    shapes = jax.eval_shape(lambda k: ours.init(k, j(x), j(context), j(mod_h), j(mod_n), (cos, sin)), jax.random.key(0))
    params = load_params(dict(block.state_dict()), shapes["params"], KeyMap())
    out, _ = ours.apply({"params": params}, j(x), j(context), j(mod_h), j(mod_n), (cos, sin))
    assert rel_err(out, expected) <= 1e-5
