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

    The product is taken in float32 (the tables' dtype) and cast back, as the reference does.
    """
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
