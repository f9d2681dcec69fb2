"""Pyramid resampling between stages, equal to ``HeliosPyramidPipeline``'s.

A chunk starts from its noise bilinearly downsampled (times 2 per halving) to the coarsest stage.
Between stages the latents are upsampled (nearest) and renoised, ``alpha * x + beta * noise``,
with noise that is correlated inside each spatial patch (``gamma`` covariance) so that the
nearest-neighbour blocks do not survive as artifacts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.sampling.schedule import SchedulerConfig, stage_sigmas


def _bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear resize (``align_corners=False``, no antialias)."""
    f32 = np.float32
    scale = f32(size_in) / f32(size_out)  # torch computes the taps in float32
    src = np.maximum((np.arange(size_out, dtype=f32) + f32(0.5)) * scale - f32(0.5), f32(0))
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, size_in - 1)
    w_hi = src - lo.astype(f32)
    return lo, hi, f32(1) - w_hi, w_hi


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """``F.interpolate(x, (height, width), mode="bilinear")`` over the last two axes."""
    y0, y1, wy0, wy1 = _bilinear_taps(x.shape[-2], height)
    x0, x1, wx0, wx1 = _bilinear_taps(x.shape[-1], width)
    rows0, rows1 = x[..., y0, :], x[..., y1, :]

    def across(rows: jax.Array) -> jax.Array:
        return wx0 * rows[..., x0] + wx1 * rows[..., x1]

    return wy0[:, None] * across(rows0) + wy1[:, None] * across(rows1)


def stage_sizes(height: int, width: int, num_stages: int) -> tuple[tuple[int, int], ...]:
    """Latent (h, w) of each stage, coarsest first; the pipeline halves with floor division."""
    return tuple((height >> (num_stages - 1 - s), width >> (num_stages - 1 - s)) for s in range(num_stages))


def downsample_to_first_stage(latents: jax.Array, num_stages: int) -> jax.Array:
    """The chunk's starting latents at the coarsest stage: halve ``num_stages - 1`` times
    (bilinear, then times 2 to keep the noise's standard deviation)."""
    for _ in range(num_stages - 1):
        latents = resize_bilinear(latents, latents.shape[-2] // 2, latents.shape[-1] // 2) * 2
    return latents


def upsample_nearest(latents: jax.Array) -> jax.Array:
    """Nearest-neighbour upsampling by 2 in h and w (``F.interpolate(..., mode="nearest")``)."""
    return jnp.repeat(jnp.repeat(latents, 2, axis=-2), 2, axis=-1)


def renoise_coefficients(config: SchedulerConfig, stage_index: int) -> tuple[float, float]:
    """``(alpha, beta)`` of the renoise at the start of stage ``stage_index >= 1``."""
    if not 1 <= stage_index < config.stages:
        raise ValueError(f"stage_index = {stage_index}: renoising happens at stages 1 to {config.stages - 1}")
    ori_sigma = 1 - stage_sigmas(config).ori_start_sigmas[stage_index]  # the signal's original weight
    alpha = 1 / (math.sqrt(1 + (1 / config.gamma)) * (1 - ori_sigma) + ori_sigma)
    beta = alpha * (1 - ori_sigma) / math.sqrt(config.gamma)
    return alpha, beta


def block_noise_factor(gamma: float, patch: tuple[int, int]) -> np.ndarray:
    """Cholesky factor (float64, lower) of the block covariance ``(1+gamma) I - gamma 11^T + 1e-8 I``.

    The reference factors in float32, which fails at its own default gamma = 1/3 (the matrix is
    singular up to the 1e-8 jitter); float64 keeps the jitter and succeeds.
    """
    size = patch[0] * patch[1]
    if size > 1 and not 0 < gamma <= 1 / (size - 1):
        raise ValueError(
            f"gamma = {gamma}: the block covariance of a {patch[0]}x{patch[1]} patch is positive semi-definite "
            f"only for 0 < gamma <= 1/{size - 1}; set the scheduler's gamma in that range (Helios uses 1/3)"
        )
    cov = np.eye(size) * (1 + gamma) - np.ones((size, size)) * gamma + np.eye(size) * 1e-8
    return np.linalg.cholesky(cov)


def block_noise_shape(latent_shape: tuple[int, ...], patch: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the standard normal draws behind one stage's block noise: (B, C, T, h/ph, w/pw, ph*pw),
    the reference's ``(block_number, block_size)`` draw in the same memory order."""
    *lead, height, width = latent_shape
    ph, pw = patch
    if height % ph or width % pw:
        raise ValueError(f"block noise needs a latent size divisible by the patch {patch}; got {height}x{width}")
    return (*lead, height // ph, width // pw, ph * pw)


def block_noise(z: jax.Array, factor: jax.Array, patch: tuple[int, int]) -> jax.Array:
    """Correlated block noise (..., h, w) from standard normals ``z`` of ``block_noise_shape``."""
    ph, pw = patch
    *lead, rows, cols, _ = z.shape
    noise = jnp.einsum("...k,jk->...j", z, factor, precision=jax.lax.Precision.HIGHEST)
    noise = noise.reshape(*lead, rows, cols, ph, pw)
    noise = jnp.swapaxes(noise, -3, -2)  # (..., rows, ph, cols, pw)
    return noise.reshape(*lead, rows * ph, cols * pw)


def renoise(latents: jax.Array, noise: jax.Array, alpha: jax.Array, beta: jax.Array) -> jax.Array:
    """``alpha * latents + beta * noise``: the upsampled latents moved to the next stage's start."""
    return alpha * latents + beta * noise
