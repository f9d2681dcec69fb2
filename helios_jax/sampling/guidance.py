"""Classifier-free guidance and CFG-Zero*, equal to the Helios pipelines'.

Both combine the model's conditional and unconditional flow predictions. CFG-Zero* first scales
the unconditional prediction by the per-sample least-squares factor ``<cond, uncond> / |uncond|^2``
and, in ``HeliosPyramidPipeline``, replaces the prediction by zeros for the first steps of stage 0
("zero init"). The guided prediction is computed in float32 and returned in the model's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GUIDANCE_MODES = ("none", "cfg", "cfg_zero_star")


def guidance_mode(guidance_scale: float, cfg_zero_star: bool = False) -> str:
    """The mode the pipelines run: guidance only when ``guidance_scale > 1``."""
    if guidance_scale <= 1.0:
        return "none"
    return "cfg_zero_star" if cfg_zero_star else "cfg"


def cfg(cond: jax.Array, uncond: jax.Array, scale: jax.Array | float) -> jax.Array:
    """``uncond + scale * (cond - uncond)``."""
    c, u = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    return (u + scale * (c - u)).astype(cond.dtype)


def optimized_scale(cond: jax.Array, uncond: jax.Array) -> jax.Array:
    """Per-sample ``<cond, uncond> / (|uncond|^2 + 1e-8)`` in float32, shaped (B, 1, 1, ...)."""
    c = cond.astype(jnp.float32).reshape(cond.shape[0], -1)
    u = uncond.astype(jnp.float32).reshape(uncond.shape[0], -1)
    st = jnp.sum(c * u, axis=1) / (jnp.sum(u**2, axis=1) + 1e-8)
    return st.reshape(-1, *([1] * (cond.ndim - 1)))


def cfg_zero_star(cond: jax.Array, uncond: jax.Array, scale: jax.Array | float,
                  zero_init: jax.Array | bool = False) -> jax.Array:
    """CFG-Zero*: ``alpha * uncond + scale * (cond - alpha * uncond)``, or zeros where ``zero_init``."""
    alpha = optimized_scale(cond, uncond).astype(cond.dtype).astype(jnp.float32)
    c, u = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    guided = u * alpha + scale * (c - u * alpha)
    return jnp.where(zero_init, c * 0.0, guided).astype(cond.dtype)
