"""Patch embedding and the multi-term memory patchifier.

Helios conditions each chunk on three terms of compressed history, all at full latent resolution:
short (patchified like the noisy latents, 1x2x2), mid (2x4x4) and long (4x8x8). A term's latents
are padded by edge replication to a multiple of its kernel, embedded by a strided 3D convolution,
and given the rotary tables of the short grid average-pooled by the same factor (2 or 4 per axis).
The strided convolutions are patch reshapes plus one matmul each.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from helios_jax.models.layers import lora_delta
from helios_jax.models.rope import rope_grid

Rope = tuple[jax.Array, jax.Array]

# Term name -> how many patches of each axis one of its tokens covers.
HISTORY_TERMS: tuple[tuple[str, int], ...] = (("short", 1), ("mid", 2), ("long", 4))


def pad_to_multiple(x: jax.Array, multiples: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
    """Pad the end of each axis, repeating its last entry, up to a multiple (``mode="replicate"``)."""
    widths = [(0, 0)] * x.ndim
    for axis, m in zip(axes, multiples):
        widths[axis] = (0, -x.shape[axis] % m)
    return jnp.pad(x, widths, mode="edge")


def avg_pool(x: jax.Array, factor: int, axes: tuple[int, ...]) -> jax.Array:
    """Non-overlapping mean over windows of ``factor`` along each axis (sizes must divide)."""
    shape: list[int] = []
    for axis, size in enumerate(x.shape):
        shape += [size // factor, factor] if axis in axes else [size]
    window_axes = tuple(axis + i + 1 for i, axis in enumerate(sorted(axes)))
    return jnp.mean(x.reshape(shape), axis=window_axes)


class PatchEmbed(nn.Module):
    """``nn.Conv3d(kernel_size=stride=patch)`` on (B, C, T, H, W) latents, returning tokens.

    Output: (B, t*h*w, features) in t, h, w order and the grid (t, h, w). The kernel is stored as
    flax stores a 3D convolution kernel, (kt, kh, kw, in, out). A conv LoRA from the ``lora`` collection is
    PEFT's: A a conv with the same kernel and stride (kt, kh, kw, in, r), B a 1x1x1 conv (1, 1, 1, r, out).
    """

    features: int
    patch: tuple[int, int, int]

    @nn.compact
    def __call__(self, x: jax.Array, lora_scale: float | jax.Array | None = None) -> tuple[jax.Array, tuple[int, int, int]]:
        b, c, t, h, w = x.shape
        kt, kh, kw = self.patch
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kt, kh, kw, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        grid = (t // kt, h // kh, w // kw)
        patches = x.reshape(b, c, grid[0], kt, grid[1], kh, grid[2], kw)
        dtype = jnp.result_type(x.dtype, kernel.dtype)
        y = jnp.einsum("bcxpyqzr,pqrcf->bxyzf", patches.astype(dtype), kernel.astype(dtype))
        y = y + bias.astype(dtype)
        delta = lora_delta(self, patches, lora_scale, lambda p, a: jnp.einsum("bcxpyqzr,pqrcf->bxyzf", p, a))
        if delta is not None:
            y = (y + delta).astype(y.dtype)
        return y.reshape(b, -1, self.features), grid


def embed_history_term(patch: PatchEmbed, latents: jax.Array, factor: int, rope: Rope,
                       lora_scale: float | jax.Array | None = None) -> tuple[jax.Array, Rope]:
    """Tokens (B, n, features) and rotary tables (B', n, D/2) of one history term.

    ``latents``: (B, C, T, H, W) at full latent resolution; ``rope``: the tables of this term's frames
    on the short grid, (B', T, H/ph, W/pw, D/2). For a compressed term (``factor`` > 1) both are padded
    by replication and the tables are average-pooled by ``factor`` per axis, as the reference does.
    """
    if factor > 1:
        latents = pad_to_multiple(latents, patch.patch, axes=(2, 3, 4))
        rope = tuple(
            avg_pool(pad_to_multiple(table, (factor,) * 3, axes=(1, 2, 3)), factor, axes=(1, 2, 3)) for table in rope
        )
    tokens, _ = patch(latents, lora_scale)
    cos, sin = (table.reshape(table.shape[0], -1, table.shape[-1]) for table in rope)
    return tokens, (cos, sin)


def embed_history(patch_size: tuple[int, int, int], features: int, rope_dim: tuple[int, ...], rope_theta: float,
                  history: Mapping[str, tuple[jax.Array | None, jax.Array | None]], dtype: Any,
                  lora_scale: float | jax.Array | None = None) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """(tokens, cos, sin) of every given history term, in sequence order [long, mid, short].

    Call it inside a compact module: it creates that module's ``patch_short/mid/long`` embeddings. The
    plain and the packed forward both prepend these terms to their noisy tokens, so the order is theirs.
    """
    _, ph, pw = patch_size
    parts: list[tuple[jax.Array, jax.Array, jax.Array]] = []
    for name, factor in HISTORY_TERMS:
        latents, indices = history[name]
        if latents is None:
            continue
        patch = PatchEmbed(features, tuple(p * factor for p in patch_size), name=f"patch_{name}")
        grid = rope_grid(indices, latents.shape[3] // ph, latents.shape[4] // pw, rope_dim, rope_theta)
        tokens, (cos, sin) = embed_history_term(patch, latents.astype(dtype), factor, grid, lora_scale)
        parts.insert(0, (tokens, cos, sin))
    return parts
