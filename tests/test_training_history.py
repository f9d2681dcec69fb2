"""Sample assembly and anti-drifting (helios_jax.training.samples) against hand-computed cases and
their stated distributions (docs/training.md §2.5 and §8). Tiny arrays; the file runs in well under a minute."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helios_jax.training import samples as H

B, C, HGT, WID = 2, 4, 6, 10
DRAWS = 2000


def frames_valued(batch=B, frames=19, offset=1.0):
    """(batch, C, frames, H, W) whose frame t holds the value offset + t everywhere."""
    values = offset + np.arange(frames, dtype=np.float32)
    return jnp.asarray(np.broadcast_to(values[None, None, :, None, None], (batch, C, frames, HGT, WID)).copy())


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def test_index_layout_is_the_29_slot_layout():
    idx = H.model_indices(3)
    np.testing.assert_array_equal(idx["indices_latents_history_long"], np.tile(np.arange(1, 17), (3, 1)))
    np.testing.assert_array_equal(idx["indices_latents_history_mid"], np.tile([17, 18], (3, 1)))
    np.testing.assert_array_equal(idx["indices_latents_history_short"], np.tile([0, 19], (3, 1)))
    np.testing.assert_array_equal(idx["indices_hidden_states"], np.tile(np.arange(20, 29), (3, 1)))


def test_history_inputs_split_16_2_1_with_short_anchor_then_newest():
    x0 = jnp.full((B, C, 1, HGT, WID), -7.0)
    out = H.history_inputs(x0, frames_valued())
    assert out["latents_history_long"].shape[2] == 16 and out["latents_history_mid"].shape[2] == 2
    np.testing.assert_array_equal(out["latents_history_long"][0, 0, :, 0, 0], np.arange(1, 17))
    np.testing.assert_array_equal(out["latents_history_mid"][0, 0, :, 0, 0], [17, 18])
    np.testing.assert_array_equal(out["latents_history_short"][0, 0, :, 0, 0], [-7, 19])
    with pytest.raises(ValueError, match="19"):
        H.history_inputs(x0, frames_valued(frames=18))


def _drop(key, t2v, v2v, i2v):
    x0 = jnp.ones((B, C, 1, HGT, WID))
    return H.random_drop(key, x0, frames_valued(), t2v_ratio=t2v, v2v_ratio=v2v, i2v_ratio=i2v)


def test_random_drop_formats_by_hand():
    key = jax.random.key(3)
    x0, hist, fmt = _drop(key, 1.0, 0.0, 0.0)  # t2v always
    assert int(fmt) == H.T2V and not np.any(x0) and not np.any(hist)
    x0, hist, fmt = _drop(key, 0.0, 0.0, 1.0)  # i2v always: only the newest frame and x0 stay
    assert int(fmt) == H.I2V and np.all(np.asarray(x0) == 1)
    np.testing.assert_array_equal(hist[0, 0, :, 0, 0], [0] * 18 + [19])
    x0, hist, fmt = _drop(key, 0.0, 0.0, 0.0)  # nothing
    assert int(fmt) == H.FULL
    np.testing.assert_array_equal(hist[0, 0, :, 0, 0], np.arange(1, 20))
    for k in keys(20):
        x0, hist, fmt = _drop(k, 0.0, 1.0, 0.0)  # v2v always: 1, 10 or 19 oldest frames zeroed
        kept = np.asarray(hist[1, 2, :, 3, 4])
        dropped = int(np.sum(kept == 0))
        assert int(fmt) == H.V2V and dropped in (1, 10, 19) and np.all(np.asarray(x0) == 1)
        np.testing.assert_array_equal(kept[dropped:], np.arange(dropped + 1, 20))
        assert np.all(np.asarray(hist)[:, :, :dropped] == 0)


def test_random_drop_frequencies_match_the_official_configs():
    """p_t2v = 0.4, p_v2v = 0.4, p_i2v = 0 -> t2v 0.40, v2v 0.6 * 0.4 = 0.24, full 0.36; v2v sizes 1/3 each."""
    x0 = jnp.ones((1, 1, 1, 1, 1))
    hist = jnp.ones((1, 1, 19, 1, 1))
    draw = jax.jit(jax.vmap(lambda k: H.random_drop(k, x0, hist, t2v_ratio=0.4, v2v_ratio=0.4)))
    _, out, fmt = draw(keys(DRAWS))
    fmt = np.asarray(fmt)
    bound = 4 * np.sqrt(0.25 / DRAWS)  # 4 sigma of a frequency
    for code, p in ((H.T2V, 0.40), (H.V2V, 0.24), (H.FULL, 0.36), (H.I2V, 0.0)):
        assert abs(np.mean(fmt == code) - p) < bound, (code, np.mean(fmt == code))
    sizes = np.sum(np.asarray(out)[fmt == H.V2V].reshape(-1, 19) == 0, axis=1)
    for size in (1, 10, 19):
        assert abs(np.mean(sizes == size) - 1 / 3) < 4 * np.sqrt(0.25 / len(sizes))


def test_window_parts_are_aligned_with_the_chunks():
    parts = [(p.start, p.stop, p.ratio) for p in H.window_parts()]
    assert parts == [(0, 1, "long"), (1, 10, "long"), (10, 12, "long"), (12, 19, "mid")]


BIG = 1e6  # a part of value BIG comes out as about (1 - s) BIG: the noise adds only s * eps


def _implied_sigma(out, x):
    return 1 - np.asarray(out, np.float64) / np.asarray(x, np.float64)


def test_noise_corruption_per_frame_sigmas_and_zero_parts_by_hand():
    cfg = H.CorruptionConfig(clean_prob=0.0)
    x0 = jnp.full((B, C, 1, HGT, WID), BIG)
    hist = jnp.full((B, C, 19, HGT, WID), BIG).at[:, :, :10].set(0.0)  # a v2v drop of 10: tail + window 0
    x0 = x0.at[1].set(0.0)  # sample 1 is a first chunk: no anchor
    out_x0, out = H.corrupt_history(jax.random.key(0), x0, hist, cfg)
    assert np.all(np.asarray(out)[:, :, :10] == 0), "all-zero parts must stay zero"
    assert np.all(np.asarray(out_x0)[1] == 0), "the zero anchor of one sample stays zero (per-sample skip)"
    sigma = _implied_sigma(out[:, :, 10:], hist[:, :, 10:])
    per_frame = sigma.mean(axis=(1, 3, 4))
    assert np.allclose(sigma, per_frame[:, None, :, None, None], atol=1e-4), "one sigma per (sample, frame)"
    assert np.all(per_frame >= -1e-4) and np.all(per_frame <= 1 / 3 + 1e-4)
    assert np.std(per_frame) > 0.01, "frame-independent sigmas differ across frames"
    s0 = _implied_sigma(out_x0[0], x0[0])
    assert np.allclose(s0, s0.mean(), atol=1e-4) and 0 <= s0.mean() <= 1 / 3 + 1e-4
    # the original's batch-wide test noises the zero anchor of sample 1
    faithful = dataclasses_replace(cfg, per_sample_skip=False)
    out_x0, _ = H.corrupt_history(jax.random.key(0), x0, hist, faithful)
    assert np.any(np.asarray(out_x0)[1] != 0)


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_noise_corruption_distribution():
    """s ~ U(0, 1/3) per frame; P(untouched) = clean_prob = 0.1; per-sample sigma without frame independence."""
    x0 = jnp.full((1, 1, 1, 1, 1), BIG)
    hist = jnp.full((1, 1, 19, 1, 1), BIG)
    run = jax.jit(jax.vmap(lambda k: H.corrupt_history(k, x0, hist, H.CorruptionConfig())[1]))
    sigma = _implied_sigma(run(keys(DRAWS)), hist[None]).reshape(DRAWS, 19)
    clean = np.all(np.abs(sigma) < 1e-6, axis=1)
    assert abs(clean.mean() - 0.1) < 4 * np.sqrt(0.09 / DRAWS)
    s = sigma[~clean].ravel()
    assert abs(s.mean() - 1 / 6) < 0.005 and abs(s.var() - (1 / 3) ** 2 / 12) < 0.0008
    assert s.min() > -1e-4 and s.max() < 1 / 3 + 1e-4
    per_sample = H.CorruptionConfig(clean_prob=0.0, frame_independent=False)
    _, out = H.corrupt_history(jax.random.key(1), x0, hist, per_sample)
    sig = _implied_sigma(out, hist).reshape(-1)
    parts = [sig[p.start:p.stop] for p in H.window_parts()]
    assert all(np.ptp(p) < 1e-4 for p in parts), "one sigma per part and sample"


@pytest.mark.parametrize("factor", [0.9, 0.937, 0.98, 1.0])
def test_blur_equals_torch_antialiased_down_and_up(factor):
    x = np.random.default_rng(0).standard_normal((B, C, 3, 48, 80)).astype(np.float32)
    h1, w1 = max(1, round(48 * factor)), max(1, round(80 * factor))
    t = torch.from_numpy(x).reshape(-1, 1, 48, 80)
    down = F.interpolate(t, (h1, w1), mode="bilinear", align_corners=False, antialias=True)
    ref = F.interpolate(down, (48, 80), mode="bilinear", align_corners=False, antialias=True).reshape(x.shape).numpy()
    out = np.asarray(H.blur(jnp.asarray(x), jnp.float32(factor)))
    assert np.abs(out - ref).max() < 1e-5
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-6


def test_downsample_corruption_blurs_each_part_with_one_factor():
    rng = np.random.default_rng(1)
    hist = jnp.asarray(rng.standard_normal((1, 2, 19, 24, 40)).astype(np.float32))
    x0 = jnp.asarray(rng.standard_normal((1, 2, 1, 24, 40)).astype(np.float32))
    cfg = H.CorruptionConfig(mode="downsample", clean_prob=0.0)
    out_x0, out = H.corrupt_history(jax.random.key(2), x0, hist, cfg)
    sizes = sorted({(max(1, round(24 * f)), max(1, round(40 * f))) for f in np.linspace(0.9, 1.0, 2001)})

    def torch_blur(x, size):
        t = torch.from_numpy(np.asarray(x)).reshape(-1, 1, 24, 40)
        d = F.interpolate(t, size, mode="bilinear", align_corners=False, antialias=True)
        return F.interpolate(d, (24, 40), mode="bilinear", align_corners=False, antialias=True).reshape(x.shape).numpy()

    pieces = [(hist[:, :, p.start:p.stop], out[:, :, p.start:p.stop]) for p in H.window_parts()] + [(x0, out_x0)]
    for src, got in pieces:
        best = min(np.abs(torch_blur(src, s) - np.asarray(got)).max() for s in sizes)
        assert best < 1e-5


def test_saturation_by_hand_and_distribution():
    rng = np.random.default_rng(2)
    hist = jnp.asarray(rng.standard_normal((B, C, 19, HGT, WID)).astype(np.float32)).at[:, :, :1].set(0.0)
    cfg = H.SaturationConfig()
    run = jax.jit(jax.vmap(lambda k: H.saturate_history(k, hist, cfg)))
    outs = np.asarray(run(keys(1000)))
    mean = np.asarray(jnp.mean(hist, axis=1, keepdims=True))
    centred = np.asarray(hist) - mean
    assert np.all(outs[:, :, :, :1] == 0), "the all-zero tail stays zero"
    factors, clean = [], 0
    for p in H.window_parts()[1:]:
        k = (outs[:, :, :, p.start:p.stop] - mean[None, :, :, p.start:p.stop]) / centred[None, :, :, p.start:p.stop]
        k = k.reshape(len(outs), -1)
        assert np.allclose(k, k[:, :1], atol=1e-3), "one factor per part, shared by the batch"
        k = k[:, 0]
        is_clean = np.abs(k - 1) < 1e-6
        clean += is_clean.sum()
        k = k[~is_clean]
        assert np.all(((k >= 0.3 - 1e-4) & (k <= 0.999 + 1e-4)) | ((k >= 1.001 - 1e-4) & (k <= 1.7 + 1e-4)))
        factors.append(k)
    k = np.concatenate(factors)
    assert abs(clean / (3 * len(outs)) - 0.1) < 4 * np.sqrt(0.09 / (3 * len(outs)))
    assert abs(np.mean(k < 1) - 0.5) < 0.05
    np.testing.assert_allclose(np.asarray(jnp.mean(outs[0], axis=1)), np.asarray(mean[:, 0]), atol=1e-5)


def test_recycle_errors_and_cells_by_hand():
    v_pred, v = jnp.full((2, 1, 1, 1, 1), 3.0), jnp.full((2, 1, 1, 1, 1), 1.0)
    noise_err, x0_err = H.recycle_errors(v_pred, v, jnp.asarray([0.25, 1.0]))
    np.testing.assert_allclose(noise_err.ravel(), [1.5, 0.0])
    np.testing.assert_allclose(x0_err.ravel(), [-0.5, -2.0])
    buf = H.RecycleBuffers.create((1, 9, 2, 2), H.RecycleConfig(error_buffer_size=2))
    np.testing.assert_allclose(buf.grid[:3], [1000, 980, 960])
    np.testing.assert_array_equal(buf.cells(jnp.asarray([999.0, 20.0, 500.0, 1500.0, 971.0])), [0, 49, 25, 0, 1])


@jax.jit
def _push_jit(key, buf, err, t, clean):
    return H.push_errors(key, buf, err, -err, t, clean)


def _push(buf, values, timestep, clean=False, seed=0):
    err = jnp.stack([jnp.full((1, 9, 2, 2), v) for v in values])
    t = jnp.full((len(values),), timestep)
    return _push_jit(jax.random.key(seed), buf, err, t, jnp.full((len(values),), clean))


def test_push_errors_fills_then_replaces_the_nearest():
    buf = H.RecycleBuffers.create((1, 9, 2, 2), H.RecycleConfig(error_buffer_size=2))
    buf = _push(buf, [1.0, 5.0], 999.0)
    assert int(buf.count[0]) == 2 and int(buf.count.sum()) == 2
    buf = _push(buf, [4.0], 999.0)  # full: replaces 5 (nearest), not 1
    np.testing.assert_allclose(buf.noise[0, :, 0, 0, 0, 0], [1.0, 4.0])
    np.testing.assert_allclose(buf.x0[0, :, 0, 0, 0, 0], [-1.0, -4.0])
    empty = H.RecycleBuffers.create((1, 9, 2, 2), H.RecycleConfig(error_buffer_size=2))
    one = jnp.ones((1, 1, 9, 2, 2))
    counts = jax.vmap(lambda k: _push_jit(k, empty, one, jnp.full((1,), 500.0), jnp.ones((1,), bool)).count.sum())(
        jax.random.split(jax.random.key(9), 2000))
    assert abs(float(jnp.mean(counts)) - 0.1) < 4 * np.sqrt(0.09 / 2000), "clean samples are pushed with probability 0.1"


def test_inject_errors_by_hand():
    shape = (1, 9, 2, 2)
    buf = H.RecycleBuffers.create(shape, H.RecycleConfig(error_buffer_size=3))
    err = jnp.arange(9, dtype=jnp.float32)[None, :, None, None] + 1.0  # frame t of the error holds t + 1
    buf = jax.jit(H.push_errors)(jax.random.key(0), buf, err[None] * 10, err[None], jnp.asarray([999.0]),
                                 jnp.asarray([False]))
    target, noise = jnp.zeros((1, *shape)), jnp.zeros((1, *shape))
    x0 = jnp.full((1, 1, 1, 2, 2), 100.0)
    hist = jnp.full((1, 1, 19, 2, 2), 100.0)
    always = H.RecycleConfig(noise_prob=1.0, latent_prob=1.0, y_prob=1.0, clean_prob=0.0)
    inject = jax.jit(H.inject_errors, static_argnums=(7,))
    out = inject(jax.random.key(1), buf, target, noise, jnp.asarray([990.0]), x0, hist, always)
    np.testing.assert_allclose(out["target"][0, 0, :, 0, 0], np.arange(1, 10))
    np.testing.assert_allclose(out["noise"][0, 0, :, 0, 0], 10 * np.arange(1, 10))
    np.testing.assert_allclose(out["x0"][0, 0, 0], 101.0)
    h = np.asarray(out["history"][0, 0, :, 0, 0]) - 100
    assert h[0] == 9.0, "the tail's last frame gets the error's last frame"
    for start in (1, 10):  # each 9-frame window: error frames [r, r + 6) on window frames [r, r + 6)
        window = h[start:start + 9]
        hit = np.nonzero(window)[0]
        assert len(hit) == 6 and np.all(np.diff(hit) == 1) and hit[0] <= 3
        np.testing.assert_allclose(window[hit], hit + 1)
    assert not bool(out["clean"][0])
    # a timestep whose cell is empty gets no target/noise error; clean samples get nothing
    far = inject(jax.random.key(1), buf, target, noise, jnp.asarray([100.0]), x0, hist, always)
    assert not np.any(far["target"]) and not np.any(far["noise"])
    never = H.RecycleConfig(clean_prob=1.0)
    none = inject(jax.random.key(1), buf, target, noise, jnp.asarray([990.0]), x0, hist, never)
    assert bool(none["clean"][0]) and np.all(np.asarray(none["history"]) == 100) and not np.any(none["target"])


def test_prepare_context_jits_and_gives_the_model_inputs():
    run = jax.jit(functools.partial(H.prepare_context, cfg=H.ContextConfig(saturation=H.SaturationConfig())))
    out = run(jax.random.key(0), jnp.ones((B, C, 1, HGT, WID)), frames_valued())
    assert out["latents_history_short"].shape == (B, C, 2, HGT, WID)
    assert out["latents_history_long"].shape == (B, C, 16, HGT, WID)
    assert out["indices_hidden_states"].shape == (B, 9)
