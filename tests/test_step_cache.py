"""Step caching (MagCache's rule inside the compiled chunk): off equals the uncached chunk bit for bit, a skip
schedule follows the rule by hand on synthetic ratios, a skip reuses the last computed flow, and the calibration
file is checked. Analytic stand-in models (no DiT): each program here compiles in about a second."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helios_jax import cli, demo, step_cache
from helios_jax.nano import models as nano
from helios_jax.sampling import (
    cache_arrays,
    denoise_chunk_cached,
    denoise_chunk_checked,
    draw_chunk_noise,
    plan_pyramid_chunk,
    plan_single_stage_chunk,
)
from helios_jax.video import read_mp4

SHAPE = (1, 4, 2, 8, 8)  # (B, C, T, H, W): divisible by 4 for the 3-stage pyramid
BASE = {"stages": 1, "stage_range": [0, 1], "shift": 3.0}


def mixing_model(args, latents, timestep, context):
    """A model that depends on everything it is given, nonlinearly: a skip changes the result."""
    x = jnp.einsum("oc,bcthw->bothw", args["A"], latents)
    return jnp.tanh(x + (timestep / 1000)[:, None, None, None, None] + context.mean((1, 2))[:, None, None, None, None])


def lookup_model(args, latents, timestep, context):
    """``flow = value[k] * ones`` where ``times[k]`` is the step's timestep: a flow of the timestep alone."""
    times, values = args
    k = jnp.argmin(jnp.abs(times - timestep[0]))
    return jnp.broadcast_to(values[k], latents.shape).astype(latents.dtype)


def _inputs(plan):
    rng = np.random.default_rng(0)
    context = jnp.asarray(rng.normal(size=(SHAPE[0], 3, 5)), jnp.float32)
    negative = jnp.asarray(rng.normal(size=(SHAPE[0], 3, 5)), jnp.float32)
    return draw_chunk_noise(jax.random.key(1), plan), context, negative


def _never(plan):
    return [cache_arrays(np.ones(n), 0.0, 2, 1) for n in plan.layout.stage_steps]


@pytest.mark.parametrize("kind", ["base-cfg", "mid-cfg-zero-star"])
def test_threshold_zero_equals_uncached_exactly(kind):
    # Tolerance: none. The rule off computes every step with the same arithmetic as denoise_chunk.
    if kind == "base-cfg":
        plan = plan_single_stage_chunk(BASE, 8, SHAPE, guidance="cfg")
    else:
        plan = plan_pyramid_chunk({"gamma": 0.25}, [3, 3, 3], SHAPE, guidance="cfg_zero_star")
    noise, context, negative = _inputs(plan)
    args = {"A": jnp.asarray(np.random.default_rng(2).normal(size=(4, 4)) * 0.5, jnp.float32)}
    plain, _ = denoise_chunk_checked(mixing_model, args, plan, noise, context, negative, 4.0)
    cached = denoise_chunk_cached(mixing_model, args, plan, noise, context, negative, 4.0, _never(plan))
    np.testing.assert_array_equal(np.asarray(cached.latents), np.asarray(plain))
    assert int(cached.computed) == sum(plan.layout.stage_steps)
    assert bool(cached.finite)


# Synthetic calibration, 10 steps, retain 2, threshold 0.1, at most 2 skips in a row. By hand (MagCache's rule):
#   step 2: ratio 1.02,   error 0.02            run 1: skip
#   step 3: ratio 1.0404, error 0.0604          run 2: skip
#   step 4: ratio 1.0612, error 0.1216 >= 0.1   compute, reset
#   step 5: ratio 1.3,    error 0.3             compute, reset
#   step 6: ratio 1,      error 0               run 1: skip
#   step 7:                                     run 2: skip
#   step 8:                                     run 3 > 2: compute, reset
#   step 9:                                     run 1: skip
RATIOS = [1.0, 1.0, 1.02, 1.02, 1.02, 1.3, 1.0, 1.0, 1.0, 1.0]
COMPUTED_STEPS = [0, 1, 4, 5, 8]


def test_forwards_follow_the_hand_computed_schedule():
    plan = plan_single_stage_chunk(BASE, 10, SHAPE, guidance="cfg")
    noise, context, negative = _inputs(plan)
    args = {"A": jnp.eye(4, dtype=jnp.float32) * 0.3}
    out = denoise_chunk_cached(mixing_model, args, plan, noise, context, negative, 4.0,
                               [cache_arrays(RATIOS, 0.1, 2, 2)])
    assert int(out.computed) == len(COMPUTED_STEPS)
    # Each computed step is a conditional and an unconditional forward: 10 DiT forwards instead of 20.
    assert step_cache.dit_forwards(int(out.computed), plan.layout) == 10


def test_a_skip_reuses_the_last_computed_flow():
    # The flow depends on the timestep alone, so the cached run must equal an uncached run whose model returns,
    # at every skipped step, the flow of the last computed step (same solver arithmetic: tolerance 1e-6 relative).
    plan = plan_single_stage_chunk(BASE, 10, SHAPE)
    times = jnp.asarray(plan.stages[0].model_timesteps)
    values = 0.5 + times / 1000.0
    noise, context, _ = _inputs(plan)
    cached = denoise_chunk_cached(lookup_model, (times, values), plan, noise, context, None, 1.0,
                                  [cache_arrays(RATIOS, 0.1, 2, 2)])
    last = [max(c for c in COMPUTED_STEPS if c <= i) for i in range(10)]
    replayed, _ = denoise_chunk_checked(lookup_model, (times, values[np.asarray(last)]), plan, noise, context)
    plain, _ = denoise_chunk_checked(lookup_model, (times, values), plan, noise, context)
    rel = float(jnp.linalg.norm(cached.latents - replayed) / jnp.linalg.norm(replayed))
    assert rel <= 1e-6, rel
    assert float(jnp.linalg.norm(cached.latents - plain) / jnp.linalg.norm(plain)) > 1e-3  # the skips mattered
    # The ratios the program measures: |flow_i| / |flow_{i-1}| per position, here value_i / value_{i-1}; a skipped
    # step reuses the flow, so its ratio is 1.
    expected = np.ones(10)
    for i in range(1, 10):
        expected[i] = float(values[last[i]] / values[last[i - 1]])
    np.testing.assert_allclose(np.asarray(cached.ratios[0]), expected, rtol=1e-6)


def _calibration(**changes) -> dict:
    data = {"format": step_cache.FORMAT, "version": step_cache.VERSION, "rule": "magcache",
            "checkpoint": "nano", "stage_steps": [3, 3], "ratios": [[1.0, 0.9, 1.1], [1.0, 1.2, 0.8]],
            "threshold": 0.1, "max_skips": 2, "retain": 0.2, "calibration": {"chunks": 2}}
    return {**data, **changes}


@pytest.mark.parametrize("changes, words", [
    ({"format": "other"}, "not a helios-jax step-cache file"),
    ({"version": 9}, "version 9"),
    ({"rule": "teacache"}, "rule"),
    ({"ratios": [[1.0, 0.9], [1.0, 1.2, 0.8]]}, "one ratio per step"),
    ({"ratios": [[1.0, -0.9, 1.1], [1.0, 1.2, 0.8]]}, "positive"),
    ({"threshold": -1}, "threshold"),
    ({"max_skips": 1.5}, "max_skips"),
    ({"retain": 2}, "retain"),
])
def test_a_bad_calibration_file_is_one_clear_error(tmp_path, changes, words):
    path = tmp_path / "cache.json"
    path.write_text(json.dumps(_calibration(**changes)))
    with pytest.raises(step_cache.StepCacheError, match=words):
        step_cache.read_calibration(str(path))


def test_calibration_file_round_trip_and_plan_check(tmp_path):
    path = tmp_path / "run.step-cache.json"
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(step_cache.StepCacheError, match="not JSON"):
        step_cache.read_calibration(str(tmp_path / "broken.json"))
    calibration = step_cache.Calibration(checkpoint="nano", stage_steps=(3, 3),
                                         ratios=((1.0, 0.9, 1.1), (1.0, 1.2, 0.8)), chunks=2)
    step_cache.write_calibration(str(path), calibration)
    assert step_cache.read_calibration(str(path)) == calibration
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json", "run.step-cache.json"]  # no partial left
    with pytest.raises(step_cache.StepCacheError, match=r"\(3, 3\) steps per stage.*\(50,\)"):
        calibration.check_steps((50,))


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """The demo's tiny random DiT, VAE and text encoder in a Base layout (HeliosPipeline, single-stage UniPC)."""
    index, scheduler = nano.PIPELINES["base"]
    return demo.build_demo_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", scheduler=scheduler,
                                      model_index=index)


def test_generate_calibrates_then_skips(base_checkpoint, tmp_path, capsys):
    # CFG at 6 steps. (That a calibration run, every step computed, gives the uncached latents is the first test's.)
    def args(steps: int = 6) -> list[str]:
        return ["generate", "--checkpoint", base_checkpoint, "--height", "64", "--width", "64", "--num_frames", "33",
                "--num_inference_steps", str(steps), "--guidance_scale", "3", "--no_compilation_cache"]

    assert cli.main([*args(), "--output", str(tmp_path / "cal.mp4"), "--step_cache", "calibrate"]) == 0
    assert read_mp4(tmp_path / "cal.mp4").shape[0] == 33
    calibration = step_cache.read_calibration(str(tmp_path / "cal.step-cache.json"))
    assert calibration.stage_steps == (6,) and calibration.chunks == 1 and calibration.ratios[0][0] == 1.0
    capsys.readouterr()
    # Retain int(0.2 * 6) = 1 step, at most one skip in a row, and a threshold no error reaches: steps 0, 2, 4
    # computed, 1, 3, 5 skipped; each computed step is two DiT forwards (CFG).
    cached = ["--output", str(tmp_path / "cached.mp4"), "--step_cache", str(tmp_path / "cal.step-cache.json"),
              "--cache_threshold", "100", "--cache_max_skips", "1"]
    assert cli.main([*args(), *cached]) == 0
    assert "step cache: 6 DiT forwards per chunk" in capsys.readouterr().out
    # Calibrated at 6 steps: a run at 8 is refused before any weight is read.
    assert cli.main([*args(8), *cached, "--overwrite"]) == 2
    assert "calibrated at (6,) steps per stage" in capsys.readouterr().err
