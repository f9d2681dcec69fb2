"""Step functions against the reference schedulers' ``step`` over whole trajectories (float32).

Each trajectory feeds both implementations the same random model outputs; each keeps its own
sample (so UniPC's history and corrector are exercised as in sampling) and every step's sample
must agree to 1e-6 relative. Guidance is compared with the pyramid pipeline's own helper.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import HeliosDMDScheduler, HeliosScheduler
from diffusers.pipelines.helios.pipeline_helios_pyramid import optimized_scale as reference_optimized_scale
from reference import max_abs, rel_err

from helios_jax.sampling import (
    cfg,
    cfg_zero_star,
    dmd_step,
    dmd_table,
    euler_step,
    euler_table,
    make_schedule,
    optimized_scale,
    unipc_init,
    unipc_step,
    unipc_table,
)

logging.getLogger("diffusers").setLevel(logging.ERROR)

SHAPE = (2, 4, 3, 6, 10)
TOL = 1e-6

# (name, extra config, steps, stage_index, call kwargs): the schedule shapes the pipelines use.
SCHEDULES = {
    "stage1of3": ({}, 8, 1, {}),
    "stage0of3-dynamic": ({"use_dynamic_shifting": True}, 6, 0, {"mu": 0.9}),
    "stage2of3-shift": ({"shift": 3.0, "gamma": 0.25}, 5, 2, {}),
    "single-f32": ({"stages": 1, "shift": 5.0}, 7, None, {}),  # float32 sigmas starting at 1
    "single-pipeline": ({"stages": 1, "use_dynamic_shifting": True}, 9, None,
                        {"mu": 1.1, "sigmas": np.linspace(0.999, 0.0, 10)[:-1]}),
}


def _trajectory(n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE).astype(np.float32), [rng.standard_normal(SHAPE).astype(np.float32)
                                                           for _ in range(n)]


def _assert_close(ours, ref: np.ndarray, step: int, last_may_be_nan: bool = False, tol: float = TOL) -> None:
    """Equal to ``TOL``; a noise-predicting UniPC's last step to sigma = 0 is 0 * inf = NaN in the
    reference, and must then be NaN in ours too."""
    ours = np.asarray(ours)
    if last_may_be_nan and not np.isfinite(ref).all():
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
        return
    assert np.isfinite(ref).all(), f"the reference is not finite at step {step}"
    assert rel_err(ours, ref) <= tol, (step, rel_err(ours, ref), max_abs(ours, ref))


def _row(table, i):
    return jax.tree.map(lambda a: a[i], table)


def _reference(config: dict, dmd: bool = False):
    return (HeliosDMDScheduler if dmd else HeliosScheduler).from_config(config)


def _unipc_cases() -> list:
    cases = []
    variants = [
        ("flow", {}),
        ("flow-bh1", {"solver_type": "bh1"}),
        ("flow-nolof", {"lower_order_final": False}),
        ("flow-dc", {"disable_corrector": [0, 3]}),
        ("eps-x0", {"prediction_type": "epsilon", "use_flow_sigmas": False}),
        ("v-x0", {"prediction_type": "v_prediction", "use_flow_sigmas": False}),
        ("sample-x0", {"prediction_type": "sample"}),
        ("eps", {"prediction_type": "epsilon", "predict_x0": False, "use_flow_sigmas": False}),
        ("v", {"prediction_type": "v_prediction", "predict_x0": False, "use_flow_sigmas": False}),
        ("sample", {"prediction_type": "sample", "predict_x0": False, "solver_type": "bh1"}),
    ]
    for order in (1, 2, 3):
        for schedule in SCHEDULES:
            for name, variant in variants:
                if schedule == "single-f32" and not (name in ("flow", "flow-nolof", "flow-dc") and order < 3):
                    continue  # sigma = 1 first (alpha = 0): the reference itself is NaN at order 3 or with bh1
                if name not in ("flow", "flow-dc", "eps", "v-x0") and schedule not in ("stage1of3", "single-f32"):
                    continue  # keep the grid small: every variant on two schedules, four on all
                cases.append(pytest.param(order, schedule, variant, id=f"o{order}-{schedule}-{name}"))
    return cases


@functools.cache
def _jit_unipc(prediction_type: str, predict_x0: bool):
    return jax.jit(functools.partial(unipc_step, prediction_type=prediction_type, predict_x0=predict_x0))


@pytest.mark.parametrize("order, schedule, variant", _unipc_cases())
def test_unipc_trajectory_equals_reference(order, schedule, variant):
    extra, steps, stage_index, call = SCHEDULES[schedule]
    config = {**extra, **variant, "solver_order": order}
    reference = _reference(config)
    reference.set_timesteps(steps, stage_index, **call)
    table = unipc_table(make_schedule(config, steps, stage_index, **call))
    x, outputs = _trajectory(steps, seed=order)
    prediction_type, predict_x0 = config.get("prediction_type", "flow_prediction"), config.get("predict_x0", True)
    step = _jit_unipc(prediction_type, predict_x0)
    # Noise prediction from a sample prediction is (x - alpha v) / sigma: XLA on the CPU contracts the
    # multiply-subtract into an FMA and divides by multiplying with the reciprocal (an ulp apart from
    # torch), and the reference's own step ratio alpha_t / alpha_s0 ~ 1000 at sigma = 0.999 amplifies
    # that ulp (measured 2.1e-5). Unused by Helios (flow_prediction: 1.9e-7), so it gets 3e-5.
    tol = 3e-5 if (prediction_type, predict_x0) == ("sample", False) else TOL

    ref_x, ours, state = torch.from_numpy(x), jnp.asarray(x), unipc_init(jnp.asarray(x), order)
    for i, t in enumerate(reference.timesteps):
        ref_x = reference.step(torch.from_numpy(outputs[i]), t, ref_x, return_dict=False)[0]
        ours, state = step(_row(table, i), state, jnp.asarray(outputs[i]), ours)
        _assert_close(ours, ref_x.numpy(), i, last_may_be_nan=not predict_x0 and i == steps - 1, tol=tol)


@pytest.mark.parametrize("schedule", ["stage1of3", "stage0of3-dynamic", "single-f32", "single-pipeline"])
def test_euler_trajectory_equals_reference(schedule):
    extra, steps, stage_index, call = SCHEDULES[schedule]
    config = {**extra, "scheduler_type": "euler"}
    reference = _reference(config)
    reference.set_timesteps(steps, stage_index, **call)
    table = euler_table(make_schedule(config, steps, stage_index, **call))
    x, outputs = _trajectory(steps, seed=7)
    step = jax.jit(euler_step)

    ref_x, ours = torch.from_numpy(x), jnp.asarray(x)
    for i, t in enumerate(reference.timesteps):
        ref_x = reference.step(torch.from_numpy(outputs[i]), t, ref_x, return_dict=False)[0]
        ours = step(_row(table, i), jnp.asarray(outputs[i]), ours)
        _assert_close(ours, ref_x.numpy(), i)


@pytest.mark.parametrize("config, steps, stage_index, mu, amplify", [
    ({}, 2, 0, None, False),
    ({}, 2, 1, None, True),
    ({"use_dynamic_shifting": True}, 3, 2, 0.8, False),
    ({"use_dynamic_shifting": True, "time_shift_type": "exponential"}, 2, 0, 1.2, True),
    ({"stages": 1, "shift": 3.0}, 4, None, None, False),
    ({"stage_range": [0, 0.2, 0.5, 1], "gamma": 0.25}, 5, 1, None, False),
])
def test_dmd_trajectory_equals_reference(config, steps, stage_index, mu, amplify):
    reference = _reference(config, dmd=True)
    reference.set_timesteps(steps, stage_index, mu=mu, is_amplify_first_chunk=amplify)
    table = dmd_table(make_schedule({"_class_name": "HeliosDMDScheduler", **config}, steps, stage_index, mu=mu,
                                    amplify_first_chunk=amplify))
    x, outputs = _trajectory(len(reference.timesteps), seed=11)
    start = x.copy()
    step = jax.jit(dmd_step)

    ref_x, ours = torch.from_numpy(x), jnp.asarray(x)
    for i, t in enumerate(reference.timesteps):
        ref_x = reference.step(torch.from_numpy(outputs[i]), t, ref_x, return_dict=False, cur_sampling_step=i,
                               dmd_noisy_tensor=torch.from_numpy(start), dmd_sigmas=reference.sigmas,
                               dmd_timesteps=reference.timesteps, all_timesteps=reference.timesteps)[0]
        ours = step(_row(table, i), jnp.asarray(outputs[i]), ours, jnp.asarray(start))
        _assert_close(ours, ref_x.numpy(), i)


def test_guidance_equals_reference():
    rng = np.random.default_rng(3)
    cond, uncond = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    cond_t, uncond_t = torch.from_numpy(cond), torch.from_numpy(uncond)
    scale = 5.0
    ref_alpha = reference_optimized_scale(cond_t.view(SHAPE[0], -1), uncond_t.view(SHAPE[0], -1))
    np.testing.assert_allclose(np.asarray(optimized_scale(cond, uncond)).reshape(-1), ref_alpha.numpy().reshape(-1),
                               rtol=1e-6)
    # The pipelines' inline formulas (HeliosPipeline / HeliosPyramidPipeline.__call__).
    ref_cfg = uncond_t + scale * (cond_t - uncond_t)
    alpha = ref_alpha.view(SHAPE[0], 1, 1, 1, 1)
    ref_zero_star = uncond_t * alpha + scale * (cond_t - uncond_t * alpha)
    assert rel_err(cfg(cond, uncond, scale), ref_cfg.numpy()) <= TOL
    assert rel_err(cfg_zero_star(cond, uncond, jnp.float32(scale)), ref_zero_star.numpy()) <= TOL
    assert not np.any(np.asarray(cfg_zero_star(cond, uncond, scale, zero_init=jnp.bool_(True))))
