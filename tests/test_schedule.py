"""make_schedule against HeliosScheduler / HeliosDMDScheduler.set_timesteps over a grid of configs.

Float64 arrays must be bit-identical to the reference's; float32 ones (the default single-stage
sigmas) equal within 1e-7 relative. The per-stage constants must equal the scheduler's dicts.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from diffusers import HeliosDMDScheduler, HeliosScheduler
from diffusers.pipelines.helios.pipeline_helios_pyramid import calculate_shift as reference_calculate_shift

from helios_jax.config import ConfigError
from helios_jax.sampling import calculate_shift, make_schedule, read_scheduler_config

logging.getLogger("diffusers").setLevel(logging.ERROR)

_TYPES = [("HeliosScheduler", "unipc"), ("HeliosScheduler", "euler"), ("HeliosScheduler", "dmd"),
          ("HeliosDMDScheduler", None)]
_STAGES = [(1, None), (2, [0, 0.5, 1]), (3, None), (3, [0, 0.25, 0.6, 1]), (3, [0, 0.4, 0.7, 1])]
_SEQ_LENS = [256, 1040, 4096, 8640]


def _is_dmd(config: dict) -> bool:
    return config["_class_name"] == "HeliosDMDScheduler" or config.get("scheduler_type") == "dmd"


def _grid() -> list[dict]:
    """60 configs drawn across every option the schedule depends on (seeded), plus the Helios ones."""
    rng = np.random.default_rng(20260301)
    configs = [
        {"_class_name": "HeliosScheduler", "steps": [10, 10, 10]},  # Helios-Base / -Mid
        {"_class_name": "HeliosDMDScheduler", "steps": [2, 2, 2], "amplify": True},  # Helios-Distilled, chunk 0
        {"_class_name": "HeliosDMDScheduler", "steps": [2, 2, 2]},
        {"_class_name": "HeliosScheduler", "stages": 1, "steps": [50], "sigmas": "pipeline"},  # HeliosPipeline
        {"_class_name": "HeliosScheduler", "stages": 1, "steps": [20], "sigmas": "pipeline",
         "use_dynamic_shifting": True, "seq_len": 8640},
    ]
    while len(configs) < 60:
        class_name, scheduler_type = _TYPES[rng.integers(len(_TYPES))]
        stages, stage_range = _STAGES[rng.integers(len(_STAGES))]
        config = {"_class_name": class_name, "stages": stages}
        if scheduler_type is not None:
            config["scheduler_type"] = scheduler_type
        if stage_range is not None:
            config["stage_range"] = stage_range
        config["gamma"] = float(rng.choice([1 / 3, 0.25, 0.1]))
        if rng.random() < 0.25:
            config["num_train_timesteps"] = 500
        if rng.random() < 0.4:
            config["use_dynamic_shifting"] = True
            config["seq_len"] = int(rng.choice(_SEQ_LENS))
        elif rng.random() < 0.5:
            config["shift"] = float(rng.choice([3.0, 0.7, 5.0]))
        if rng.random() < 0.5:
            config["time_shift_type"] = str(rng.choice(["exponential", "linear"]))
        config["steps"] = [int(rng.choice([1, 2, 3, 7, 10, 25])) for _ in range(stages)]
        config["amplify"] = bool(rng.random() < 0.3)
        if stages == 1 and not _is_dmd(config) and rng.random() < 0.4:
            config["sigmas"] = "pipeline"
        configs.append(config)
    return configs


def _split(case: dict) -> tuple[dict, dict]:
    """(scheduler_config.json dict, how set_timesteps is called)."""
    call = {k: case[k] for k in ("steps", "amplify", "sigmas", "seq_len") if k in case}
    return {k: v for k, v in case.items() if k not in call}, call


def _case_id(case: dict) -> str:
    return "-".join([case["_class_name"], *(f"{k}={v}" for k, v in case.items() if k != "_class_name")])


@pytest.mark.parametrize("case", _grid(), ids=_case_id)
def test_schedule_equals_reference(case):
    config, call = _split(case)
    cls = HeliosDMDScheduler if config["_class_name"] == "HeliosDMDScheduler" else HeliosScheduler
    reference = cls.from_config(config)
    mu = reference_calculate_shift(call["seq_len"]) if "seq_len" in call else None
    for stage, steps in enumerate(call["steps"]):
        stage_index = stage if config.get("stages", 3) > 1 else None
        sigmas = np.linspace(0.999, 0.0, steps + 1)[:-1] if call.get("sigmas") == "pipeline" else None
        amplify = call.get("amplify", False)
        reference.set_timesteps(steps, stage_index, sigmas=sigmas, mu=mu, is_amplify_first_chunk=amplify)
        ours = make_schedule(config, steps, stage_index, mu=mu, amplify_first_chunk=amplify, sigmas=sigmas)
        for name in ("timesteps", "sigmas"):
            ref, out = getattr(reference, name).numpy(), getattr(ours, name)
            assert out.dtype == ref.dtype and out.shape == ref.shape, (name, out.dtype, ref.dtype, out.shape, ref.shape)
            if ref.dtype == np.float64:
                np.testing.assert_array_equal(out, ref, err_msg=f"{name}, stage {stage}")
            else:
                np.testing.assert_allclose(out, ref, rtol=1e-7, atol=0, err_msg=f"{name}, stage {stage}")
    for name in ("ori_start_sigmas", "start_sigmas", "end_sigmas"):
        ref = getattr(reference, name)
        assert getattr(ours, name) == tuple(ref[i] for i in range(len(ref))), name


def test_grid_covers_every_option():
    cases = _grid()
    assert len(cases) >= 50
    seen = {(c["_class_name"], c.get("scheduler_type", "dmd" if c["_class_name"] == "HeliosDMDScheduler" else "unipc"))
            for c in cases}
    assert seen == {("HeliosScheduler", "unipc"), ("HeliosScheduler", "euler"), ("HeliosScheduler", "dmd"),
                    ("HeliosDMDScheduler", "dmd")}
    for key in ("use_dynamic_shifting", "shift", "stage_range", "num_train_timesteps", "sigmas"):
        assert any(key in c for c in cases), key
    assert any(c.get("amplify") and _is_dmd(c) for c in cases)
    assert {c.get("time_shift_type") for c in cases} >= {"exponential", "linear", None}
    assert {c.get("stages", 3) for c in cases} == {1, 2, 3}


@pytest.mark.parametrize("seq_len", [1, 256, 540, 4096, 11040])
def test_calculate_shift_equals_reference(seq_len):
    assert calculate_shift(seq_len) == reference_calculate_shift(seq_len)
    assert calculate_shift(seq_len, 128, 2048, 0.3, 1.5) == reference_calculate_shift(seq_len, 128, 2048, 0.3, 1.5)


def test_config_from_file_and_class_defaults(tmp_path):
    HeliosDMDScheduler().save_config(tmp_path)
    config = read_scheduler_config(tmp_path)
    assert config.scheduler_type == "dmd" and config.time_shift_type == "linear"
    assert read_scheduler_config({}).time_shift_type == "exponential"
    assert read_scheduler_config({"solver_type": "midpoint"}).solver_type == "bh2"  # as the reference maps it


@pytest.mark.parametrize("config, call, match", [
    ({"scheduler_type": "ddim"}, {}, "scheduler_type = 'ddim'"),
    ({"solver_type": "bh3"}, {}, "solver_type = 'bh3'"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, {}, "_class_name"),
    ({"stages": 3.0}, {}, r"stages = 3.0 \(expected an integer\)"),
    ({"use_dynamic_shifting": True, "shift": 3.0}, {}, "use_dynamic_shifting needs shift = 1.0"),
    ({"thresholding": True}, {}, "thresholding"),
    ({}, {"num_inference_steps": 0}, "num_inference_steps = 0"),
    ({}, {"num_inference_steps": 2.5}, "num_inference_steps = 2.5"),
    ({}, {"stage_index": 3}, "stage_index = 3"),
    ({}, {"stage_index": -1}, "stage_index = -1"),
    ({}, {"stage_index": None}, "stage_index = None"),
    ({"stages": 1}, {"stage_index": 1}, "stage_index = 1"),
    ({"use_dynamic_shifting": True}, {"stage_index": 0}, "pass mu"),
    ({}, {"stage_index": 0, "sigmas": np.ones(4)}, "custom sigmas"),
    ({"stages": 1}, {"sigmas": np.ones(3)}, "custom sigmas must be"),
])
def test_bad_input_is_a_clear_error(config, call, match):
    call = {"num_inference_steps": 4, "stage_index": 0 if config.get("stages", 3) > 1 else None, **call}
    with pytest.raises((ValueError, ConfigError), match=match):
        make_schedule(config, **call)


def test_reference_rejects_what_we_reject():
    """The reference fails (later, less clearly) on the inputs we refuse up front."""
    with pytest.raises(NotImplementedError):
        HeliosScheduler(solver_type="bh3")
    with pytest.raises(KeyError):
        HeliosScheduler().set_timesteps(4, stage_index=3)
    with pytest.raises((AssertionError, TypeError)):
        scheduler = HeliosScheduler(use_dynamic_shifting=True)
        scheduler.set_timesteps(4, stage_index=0, mu=None)
