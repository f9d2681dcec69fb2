"""torch's bilinear resize with ``antialias=True`` as a matrix per axis, sizes static or traced.

``F.interpolate(x, size, mode="bilinear", antialias=True, align_corners=False)`` and torchvision's
``resize`` (antialiased for tensors) weight input sample j for output sample i by a triangle
``max(0, 1 - |j + 0.5 - c_i| / s)`` with ``c_i = scale (i + 0.5)``, ``scale = in / out`` and support
``s = max(scale, 1)``, each row normalised. Written as a dense (rows, cols) matrix it applies with one
einsum, and the active sizes may be traced: the history blur draws its size inside a jitted step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def resize_matrix(rows: int, cols: int, out_size: jax.Array | int, in_size: jax.Array | int) -> jax.Array:
    """(rows, cols) float32 weights resizing the first ``in_size`` of ``cols`` samples to the first
    ``out_size`` of ``rows`` samples; rows past ``out_size`` are zero."""
    out_f = jnp.asarray(out_size, jnp.float32)
    in_f = jnp.asarray(in_size, jnp.float32)
    scale = in_f / out_f
    support = jnp.maximum(scale, 1.0)
    centers = scale * (jnp.arange(rows, dtype=jnp.float32) + 0.5)
    taps = jnp.arange(cols, dtype=jnp.float32) + 0.5
    w = jnp.maximum(0.0, 1.0 - jnp.abs(taps[None, :] - centers[:, None]) / support)
    w = jnp.where((jnp.arange(cols) < in_size)[None, :], w, 0.0)
    w = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-30)
    return jnp.where((jnp.arange(rows) < out_size)[:, None], w, 0.0)


def apply_hw(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """``rows`` (H', H) on axis -2 and ``cols`` (W', W) on axis -1 of ``x``, in float32."""
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("ih,...hw->...iw", rows, x.astype(jnp.float32), precision=hi)
    return jnp.einsum("jw,...iw->...ij", cols, y, precision=hi)


@functools.partial(jax.jit, static_argnums=(1, 2))
def resize_antialias(x: jax.Array, height: int, width: int) -> jax.Array:
    """Antialiased bilinear resize of the last two axes to (height, width), float32."""
    h, w = x.shape[-2:]
    return apply_hw(x, resize_matrix(height, h, height, h), resize_matrix(width, w, width, w))
