"""Stage-1 and pyramid objectives (helios_jax.training.losses): the schedule constants of docs/training.md
§3 against diffusers' own schedulers and the spec's table, the examples against torch re-computations,
the timestep distributions over many draws. Tiny arrays; well under a minute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_helios import HeliosScheduler

from helios_jax.sampling import HeliosDMDSchedulerConfig, make_schedule, renoise_coefficients, shift_for
from helios_jax.training import losses as L


def test_stage1_sigma_table_is_flowmatch_eulers():
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    np.testing.assert_array_equal(L.stage1_sigmas(), ref.sigmas.numpy()[:1000])
    np.testing.assert_array_equal(L.stage1_sigmas() * 1000, ref.timesteps.numpy())
    assert L.stage1_sigmas()[0] == 1.0 and L.stage1_sigmas()[-1] == np.float32(0.001)


def test_pyramid_schedule_equals_diffusers_helios_scheduler():
    ours, ref = L.PyramidSchedule.create(), HeliosScheduler(shift=1.0, stages=3, gamma=1 / 3)
    for s in range(3):
        assert ours.start_sigmas[s] == pytest.approx(float(ref.start_sigmas[s]), abs=1e-12)
        assert ours.end_sigmas[s] == pytest.approx(float(ref.end_sigmas[s]), abs=1e-12)
        np.testing.assert_allclose(ours.timesteps[s], ref.timesteps_per_stage[s].numpy(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(ours.sigmas, ref.sigmas_per_stage[s].numpy(), rtol=0, atol=1e-12)


def test_schedule_constants_of_the_spec():
    """docs/training.md §3.2: start (corrected) / end sigmas, global t ranges, renoise alpha / beta; 3.3: shifted steps."""
    sched = L.PyramidSchedule.create()
    np.testing.assert_allclose(sched.start_sigmas, [0.999, 0.799760, 0.500374], atol=5e-7)
    np.testing.assert_allclose(sched.end_sigmas, [0.666333, 0.333666, 0.0], atol=5e-7)
    np.testing.assert_allclose(sched.ori_start_sigmas, [0.999, 0.666333, 0.333666], atol=5e-7)
    starts = [t[0] for t in sched.timesteps]
    np.testing.assert_allclose(starts, [999.0, 743.256, 385.614], atol=5e-4)
    assert sched.timesteps[2][-1] == pytest.approx(0.999 + (385.614 - 0.999) / 1000, abs=1e-3)
    config = HeliosDMDSchedulerConfig(use_dynamic_shifting=True)
    for s, (alpha, beta) in ((1, (0.600120, 0.692612)), (2, (0.749813, 0.433337))):
        np.testing.assert_allclose(renoise_coefficients(config, s), (alpha, beta), atol=5e-7)
    expected = {0: [998.53, 833.96], 1: [742.82, 547.19], 2: [385.41, 253.99]}
    amplified = {0: [998.53, 902.22, 833.96, 783.07], 1: [742.82, 640.00, 547.19, 463.00],
                 2: [385.41, 328.62, 253.99, 151.53]}
    for s, (h, w) in enumerate(((12, 20), (24, 40), (48, 80))):
        mu = shift_for(config, 9 * h * w // 4)
        np.testing.assert_allclose(make_schedule(config, 2, stage_index=s, mu=mu).timesteps, expected[s], atol=6e-3)
        np.testing.assert_allclose(make_schedule(config, 2, stage_index=s, mu=mu, amplify_first_chunk=True).timesteps,
                                   amplified[s], atol=6e-3)
    assert shift_for(config, 8640) == pytest.approx(1.9192, abs=1e-4)


N = 20000


@pytest.mark.parametrize("scheme", ["logit_normal", "none", "mode"])
def test_timestep_sampling_distributions(scheme):
    sampling = L.TimestepSampling(scheme)
    u = np.asarray(jax.jit(lambda k: sampling.sample(k, N))(jax.random.key(0)), np.float64)
    assert np.all((u >= 0) & (u <= 1))
    if scheme == "logit_normal":
        z = np.log(u / (1 - u))
        assert abs(z.mean()) < 4 / np.sqrt(N) and abs(z.std() - 1) < 0.02
    elif scheme == "none":
        assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / N) and abs(u.var() - 1 / 12) < 0.003
    else:  # diffusers' formula applied to torch's own uniform draws: same distribution
        r = torch.rand(N, generator=torch.Generator().manual_seed(0))
        ref = (1 - r - 1.29 * (torch.cos(np.pi * r / 2) ** 2 - 1 + r)).numpy()
        np.testing.assert_allclose(np.quantile(u, [0.1, 0.5, 0.9]), np.quantile(ref, [0.1, 0.5, 0.9]), atol=0.02)
    with pytest.raises(ValueError, match="weighting_scheme"):
        L.TimestepSampling("cosmap")


def test_stage1_example_by_hand():
    rng = np.random.default_rng(0)
    target = jnp.asarray(rng.standard_normal((3, 4, 9, 4, 6)).astype(np.float32))
    noise = jnp.asarray(rng.standard_normal((3, 4, 9, 4, 6)).astype(np.float32))
    ex = jax.jit(L.stage1_example)(jax.random.key(1), target, noise=noise)
    sigma = np.asarray(ex.sigma)
    table = L.stage1_sigmas()
    assert all(s in table for s in sigma)
    np.testing.assert_allclose(ex.timestep, sigma * 1000, rtol=1e-6)
    s = sigma[:, None, None, None, None]
    np.testing.assert_allclose(ex.noisy, (1 - s) * np.asarray(target) + s * np.asarray(noise), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ex.velocity, np.asarray(noise) - np.asarray(target), rtol=1e-6)
    # t = 1000 (1000 - floor(1000 u)) / 1000 for u = sigmoid(N(0, 1)): the median t is 500 or 501
    draw = jax.jit(jax.vmap(lambda k: L.stage1_example(k, target[:1, :1, :1]).timestep))
    ts = np.asarray(draw(jax.random.split(jax.random.key(2), 4000)))
    assert 470 < np.median(ts) < 530 and ts.min() >= 1 and ts.max() <= 1000


def test_pyramid_examples_against_torch():
    rng = np.random.default_rng(3)
    target = rng.standard_normal((2, 4, 9, 8, 12)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 9, 8, 12)).astype(np.float32)
    ref = HeliosScheduler(shift=1.0, stages=3, gamma=1 / 3)
    make = jax.jit(lambda k, t, n: L.pyramid_examples(k, t, sample_ratios=(1, 2, 1), noise=n))
    examples = make(jax.random.key(4), jnp.asarray(target), jnp.asarray(noise))
    assert [e.stage for e in examples] == [0, 1, 1, 2]

    def half(x, times=1):  # torch, per frame, as prepare_stage2_clean_input
        t = torch.from_numpy(x)
        for _ in range(times):
            b, c, f, h, w = t.shape
            t = t.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
            t = F.interpolate(t, size=(h // 2, w // 2), mode="bilinear")
            t = t.reshape(b, f, c, h // 2, w // 2).permute(0, 2, 1, 3, 4)
        return t.numpy()

    def noise_half(x, times):
        for _ in range(times):
            x = half(x) * 2
        return x

    clean = [half(target, 2), half(target, 1), target]
    eps = [noise_half(noise, 2), noise_half(noise, 1), noise]
    up = lambda x: np.repeat(np.repeat(x, 2, axis=-2), 2, axis=-1)  # noqa: E731
    for ex in examples:
        s = ex.stage
        S, E = float(ref.start_sigmas[s]), float(ref.end_sigmas[s])
        start = eps[0] if s == 0 else S * eps[s] + (1 - S) * up(clean[s - 1])
        end = clean[2] if s == 2 else E * eps[s] + (1 - E) * clean[s]
        k = np.rint((0.999 - np.asarray(ex.sigma, np.float64)) / 0.000999).astype(int)
        np.testing.assert_allclose(ex.sigma, ref.sigmas_per_stage[s].numpy()[k], atol=1e-6)
        np.testing.assert_allclose(ex.timestep, ref.timesteps_per_stage[s].numpy()[k], rtol=1e-6)
        sig = np.asarray(ex.sigma)[:, None, None, None, None]
        np.testing.assert_allclose(ex.noisy, sig * start + (1 - sig) * end, atol=2e-5)
        np.testing.assert_allclose(ex.velocity, start - end, atol=2e-5)
        assert ex.noisy.shape[-2:] == clean[s].shape[-2:]
    with pytest.raises(ValueError, match="divisible"):
        L.pyramid_examples(jax.random.key(0), jnp.zeros((1, 4, 9, 6, 12)))


def _linear_model(params, x, t, cond):
    return params["w"] * x + cond["bias"]


def test_losses_and_sequential_gradients_by_hand():
    rng = np.random.default_rng(5)
    target = jnp.asarray(rng.standard_normal((2, 4, 9, 8, 12)).astype(np.float32))
    examples = jax.jit(L.pyramid_examples)(jax.random.key(6), target)
    params, cond = {"w": jnp.float32(0.3)}, {"bias": jnp.float32(0.1)}
    losses, grads = jax.jit(lambda p, e: L.sequential_pyramid_grads(_linear_model, p, e, cond))(params, examples)
    want_l, want_g = [], 0.0
    for ex in examples:
        x, v = np.asarray(ex.noisy, np.float64), np.asarray(ex.velocity, np.float64)
        r = 0.3 * x + 0.1 - v
        want_l.append(np.mean(r ** 2))
        want_g += np.mean(2 * r * x)
    np.testing.assert_allclose(losses, want_l, rtol=1e-5)
    np.testing.assert_allclose(grads["w"], want_g, rtol=1e-4)
    mean = jax.jit(lambda p, e: L.mean_pyramid_loss(_linear_model, p, e, cond))(params, examples)
    np.testing.assert_allclose(mean, np.mean(want_l), rtol=1e-5)
    ex = jax.jit(L.stage1_example)(jax.random.key(7), target)
    r = 0.3 * np.asarray(ex.noisy, np.float64) + 0.1 - np.asarray(ex.velocity, np.float64)
    np.testing.assert_allclose(L.example_loss(_linear_model, params, ex, cond), np.mean(r ** 2), rtol=1e-5)
