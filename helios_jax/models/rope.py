"""3D rotary position embedding from frame indices, in float32 as the reference insists.

Each head's channels are split over time, height and width (``rope_dim``, e.g. 44/42/42). A token at
(frame index t, row y, column x) rotates channel pair i of an axis by ``position * base_i``. The
tables are kept at half width: the reference repeats every frequency twice (interleaved pairs), and
the same value drives both channels of a pair.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32


def base_frequencies(dim: int, theta: float) -> np.ndarray:
    """``1 / theta ** (arange(0, dim, 2) / dim)`` in float32, as ``HeliosRotaryPosEmbed`` builds it."""
    exponents = np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def rope_grid(
    frame_indices: jax.Array, height: int, width: int, rope_dim: tuple[int, int, int], theta: float
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables of shape (B', T, height, width, head_dim / 2), float32.

    ``frame_indices`` is (B', T): the temporal position of each latent frame; rows and columns count
    from 0. B' is 1 or the batch size and broadcasts in :func:`apply_rope`.
    """
    b, t = frame_indices.shape
    axes = (
        frame_indices.astype(_F32)[:, :, None, None],
        jnp.arange(height, dtype=_F32)[None, None, :, None],
        jnp.arange(width, dtype=_F32)[None, None, None, :],
    )
    angles = [
        jnp.broadcast_to(pos[..., None] * base_frequencies(dim, theta), (b, t, height, width, dim // 2))
        for pos, dim in zip(axes, rope_dim)
    ]
    angle = jnp.concatenate(angles, axis=-1)
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved channel pairs of x (B, L, heads, head_dim) by tables (B', L, head_dim / 2).

    The product is taken in float32 (the tables' dtype) and cast back, as the reference does. Each pair (a, b)
    is swapped as (a + b) - (a, b), a reduction over the pair rather than a stack of two halves: XLA's Triton
    normalization fusion then takes the RMS norm before it and the rotation in one pass over q (and k), where
    the stack ended the fusion and cost a second read and write of q (the H100 plan). The sum of two bf16
    numbers is exact in float32, so for bf16 inputs the swap is exact.
    """
    pairs = x.reshape(*x.shape[:-1], -1, 2).astype(cos.dtype)
    swapped = jnp.sum(pairs, axis=-1, keepdims=True) - pairs
    cos, sin = cos[:, :, None, :, None], sin[:, :, None, :, None] * jnp.asarray([-1.0, 1.0], sin.dtype)
    return (pairs * cos + swapped * sin).reshape(x.shape).astype(x.dtype)
