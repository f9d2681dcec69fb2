"""Pyramid resampling and block noise against torch / HeliosPyramidPipeline."""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import HeliosPyramidPipeline, HeliosScheduler
from reference import max_abs, rel_err
from sampling_stubs import StubTransformer, StubVAE, fed_noise

from helios_jax.sampling import (
    block_noise,
    block_noise_factor,
    block_noise_shape,
    downsample_to_first_stage,
    renoise_coefficients,
    resize_bilinear,
    upsample_nearest,
)
from helios_jax.sampling.schedule import read_scheduler_config

logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.mark.parametrize("size_in, size_out", [((8, 12), (4, 6)), ((6, 10), (3, 5)), ((5, 7), (2, 3)),
                                               ((3, 5), (1, 2)), ((7, 9), (5, 4))])
def test_resize_bilinear_equals_torch(size_in, size_out):
    x = np.random.default_rng(0).standard_normal((2, 3, *size_in)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=size_out, mode="bilinear").numpy()
    out = resize_bilinear(jnp.asarray(x), *size_out)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-6 and max_abs(out, ref) <= 1e-6


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_downsample_to_first_stage_equals_pipeline(num_stages):
    b, c, t, h, w = 2, 3, 2, 16, 24
    x = np.random.default_rng(1).standard_normal((b, c, t, h, w)).astype(np.float32)
    # HeliosPyramidPipeline.__call__: frames into the batch, halve with bilinear, times 2.
    ref = torch.from_numpy(x).permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    for _ in range(num_stages - 1):
        h, w = h // 2, w // 2
        ref = F.interpolate(ref, size=(h, w), mode="bilinear") * 2
    ref = ref.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4).numpy()
    out = downsample_to_first_stage(jnp.asarray(x), num_stages)
    assert out.shape == ref.shape and rel_err(out, ref) <= 1e-6


def test_upsample_nearest_equals_torch():
    x = np.random.default_rng(2).standard_normal((6, 3, 4, 5)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=(8, 10), mode="nearest").numpy()
    np.testing.assert_array_equal(np.asarray(upsample_nearest(jnp.asarray(x))), ref)


def _reference_block_noise(gamma: float, shape: tuple[int, ...], z: np.ndarray, float64: bool) -> np.ndarray:
    """``HeliosPyramidPipeline.sample_block_noise`` fed our standard normal draws."""
    pipe = HeliosPyramidPipeline(tokenizer=None, text_encoder=None, vae=StubVAE(shape[1]),
                                 scheduler=HeliosScheduler(gamma=gamma), transformer=StubTransformer(shape[1], 4))
    with fed_noise(None, [z], float64_gamma=gamma if float64 else None):
        return pipe.sample_block_noise(*shape, patch_size=(1, 2, 2), generator=torch.Generator()).numpy()


@pytest.mark.parametrize("gamma, float64", [(0.25, False), (0.1, False), (1 / 3, True)])
def test_block_noise_equals_pipeline(gamma, float64):
    shape = (2, 3, 2, 4, 6)
    z = np.random.default_rng(3).standard_normal(block_noise_shape(shape, (2, 2))).astype(np.float32)
    ref = _reference_block_noise(gamma, shape, z, float64)
    out = block_noise(jnp.asarray(z), jnp.asarray(block_noise_factor(gamma, (2, 2)), jnp.float32), (2, 2))
    assert out.shape == ref.shape == shape
    assert rel_err(out, ref) <= 1e-6, rel_err(out, ref)


def test_block_noise_covariance_and_finite_factor_at_default_gamma():
    gamma, patch = 1 / 3, (2, 2)
    factor = block_noise_factor(gamma, patch)
    target = np.eye(4) * (1 + gamma) - np.ones((4, 4)) * gamma
    assert np.isfinite(factor).all()
    np.testing.assert_allclose(factor @ factor.T, target + 1e-8 * np.eye(4), atol=1e-12)
    # The reference's float32 factor of the same matrix is unusable here (the jitter is lost).
    cov32 = torch.eye(4) * (1 + gamma) - torch.ones(4, 4) * gamma + torch.eye(4) * 1e-8
    assert torch.linalg.eigvalsh(cov32.double()).min() <= 0

    z = jax.random.normal(jax.random.key(0), (400 * 500 * 4,)).reshape(1, 1, 1, 400, 500, 4)  # 200k blocks
    noise = np.asarray(block_noise(z, jnp.asarray(factor, jnp.float32), patch))
    blocks = noise.reshape(400, 2, 500, 2).transpose(0, 2, 1, 3).reshape(-1, 4)
    np.testing.assert_allclose(np.cov(blocks, rowvar=False), target, atol=0.015)
    assert np.abs(blocks.sum(axis=1)).max() < 1e-3  # gamma = 1/3: each block sums to zero


def test_renoise_coefficients_match_the_scheduler():
    """The renoise lands on the stage's corrected start sigma: alpha * (1 - ori) = 1 - start."""
    for gamma in (1 / 3, 0.25):
        scheduler = HeliosScheduler(gamma=gamma)
        config = read_scheduler_config({"gamma": gamma})
        for stage in (1, 2):
            alpha, beta = renoise_coefficients(config, stage)
            signal = 1 - scheduler.ori_start_sigmas[stage]
            assert math.isclose(alpha * signal, 1 - scheduler.start_sigmas[stage], rel_tol=1e-12)
            assert math.isclose(beta, alpha * (1 - signal) / math.sqrt(gamma), rel_tol=1e-12)


def test_bad_pyramid_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="gamma = 0.5"):
        block_noise_factor(0.5, (2, 2))
    with pytest.raises(ValueError, match="divisible by the patch"):
        block_noise_shape((1, 4, 2, 5, 6), (2, 2))
    with pytest.raises(ValueError, match="stage_index = 0"):
        renoise_coefficients(read_scheduler_config({}), 0)
