"""Host-side schedules (numpy), equal to ``HeliosScheduler`` / ``HeliosDMDScheduler.set_timesteps``.

Everything here runs once per chunk on the host, in the reference's own dtypes: float64 for the
pyramid stages and custom sigmas, float32 for the default single-stage sigmas. The device loop only
ever sees the finished arrays.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import numpy as np

from helios_jax.config import ConfigError, _require, build_config, config_dict

SCHEDULER_TYPES = ("unipc", "euler", "dmd")
PREDICTION_TYPES = ("flow_prediction", "epsilon", "sample", "v_prediction")
# The reference silently runs these UniPC variants as bh2 (``register_to_config(solver_type="bh2")``).
_BH2_ALIASES = ("midpoint", "heun", "logrho")


@dataclasses.dataclass(frozen=True)
class _SharedSchedulerFields:
    """Arguments both reference schedulers take, plus the four keys the pipelines read for ``mu``."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    stages: int = 3
    stage_range: tuple[float, ...] = (0, 1 / 3, 2 / 3, 1)
    gamma: float = 1 / 3
    prediction_type: str = "flow_prediction"
    use_flow_sigmas: bool = True
    use_dynamic_shifting: bool = False
    # Not constructor arguments: the pipelines read them with ``scheduler.config.get(key, default)``
    # for ``calculate_shift``, and diffusers keeps them in the config when a file has them.
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    def _check_shared(self) -> None:
        name = type(self).__name__
        _require(isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 1, name,
                 "num_train_timesteps", self.num_train_timesteps, "a positive integer")
        _require(isinstance(self.stages, int) and self.stages >= 1, name, "stages", self.stages, "a positive integer")
        _require(len(self.stage_range) >= self.stages + 1, name, "stage_range", self.stage_range,
                 f"at least stages + 1 = {self.stages + 1} boundaries from 0 to 1 (the first ones are used)")
        _require(self.gamma > 0, name, "gamma", self.gamma, "the block-noise correlation must be positive")
        _require(self.prediction_type in PREDICTION_TYPES, name, "prediction_type", self.prediction_type,
                 f"one of {PREDICTION_TYPES}")
        _require(self.time_shift_type in ("exponential", "linear"), name, "time_shift_type",
                 self.time_shift_type, "one of 'exponential', 'linear'")
        _require(not self.use_dynamic_shifting or self.shift == 1.0, name, "shift", self.shift,
                 "use_dynamic_shifting needs shift = 1.0 (the reference asserts it); set one of them off")


@dataclasses.dataclass(frozen=True)
class HeliosSchedulerConfig(_SharedSchedulerFields):
    """The constructor arguments of diffusers' ``HeliosScheduler`` (UniPC / Euler / DMD timesteps)."""

    thresholding: bool = False
    solver_order: int = 2
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    solver_p: None = None
    scheduler_type: str = "unipc"
    time_shift_type: str = "exponential"

    def __post_init__(self) -> None:
        self._check_shared()
        name = type(self).__name__
        _require(self.scheduler_type in SCHEDULER_TYPES, name, "scheduler_type", self.scheduler_type,
                 f"one of {SCHEDULER_TYPES}")
        _require(self.solver_type in ("bh1", "bh2", *_BH2_ALIASES), name, "solver_type", self.solver_type,
                 "one of 'bh1', 'bh2' (or 'midpoint', 'heun', 'logrho', which the reference runs as 'bh2')")
        if self.solver_type in _BH2_ALIASES:
            object.__setattr__(self, "solver_type", "bh2")
        _require(isinstance(self.solver_order, int) and self.solver_order >= 1, name, "solver_order",
                 self.solver_order, "a positive integer (Helios uses 1 to 3)")
        _require(not self.thresholding, name, "thresholding", self.thresholding,
                 "dynamic thresholding is not ported (Helios never enables it); set it to false")
        _require(self.solver_p is None, name, "solver_p", self.solver_p, "an external predictor is not ported")
        _require(self.predict_x0 or self.prediction_type != "flow_prediction", name, "predict_x0",
                 self.predict_x0, "flow_prediction needs predict_x0 = true (the reference raises otherwise)")


@dataclasses.dataclass(frozen=True)
class HeliosDMDSchedulerConfig(_SharedSchedulerFields):
    """The constructor arguments of diffusers' ``HeliosDMDScheduler`` (note its linear time shift)."""

    time_shift_type: str = "linear"
    # Not a constructor argument: Helios-Distilled's scheduler_config.json carries it (diffusers ignores it,
    # the official HeliosScheduler reads it). Only "dmd" describes what this class computes.
    scheduler_type: str = "dmd"

    def __post_init__(self) -> None:
        self._check_shared()
        _require(self.scheduler_type == "dmd", type(self).__name__, "scheduler_type", self.scheduler_type,
                 "HeliosDMDScheduler samples with DMD only (diffusers would ignore the key and still run DMD); "
                 "remove the key or set it to 'dmd', or name _class_name 'HeliosScheduler' for UniPC or Euler")


SchedulerConfig = HeliosSchedulerConfig | HeliosDMDSchedulerConfig
_CONFIG_CLASSES = {"HeliosScheduler": HeliosSchedulerConfig, "HeliosDMDScheduler": HeliosDMDSchedulerConfig}


def read_scheduler_config(source: SchedulerConfig | str | os.PathLike | Mapping[str, Any]) -> SchedulerConfig:
    """A scheduler config from a ``scheduler_config.json`` (path, folder or dict) or a config object.

    ``_class_name`` picks the reference class (and so its defaults); a dict without one is read
    as ``HeliosScheduler``, as ``HeliosScheduler.from_config`` would.
    """
    if isinstance(source, (HeliosSchedulerConfig, HeliosDMDSchedulerConfig)):
        return source
    raw, origin = config_dict(source, "scheduler_config.json")
    class_name = raw.get("_class_name", "HeliosScheduler")
    if class_name not in _CONFIG_CLASSES:
        raise ConfigError(
            f"{origin}: scheduler _class_name = {class_name!r} is not supported: Helios samples with one of "
            f"{sorted(_CONFIG_CLASSES)}"
        )
    return build_config(_CONFIG_CLASSES[class_name], raw, origin)


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """What ``set_timesteps`` leaves in a reference scheduler, plus the pyramid's per-stage constants.

    ``timesteps`` has one entry per model call; ``sigmas`` one more (the final 0). The three tuples
    hold one float per pyramid stage: the stage's start sigma on the global schedule, the start
    sigma corrected for the renoise at upsampling, and the end sigma.
    """

    config: SchedulerConfig
    stage_index: int | None
    timesteps: np.ndarray
    sigmas: np.ndarray
    ori_start_sigmas: tuple[float, ...]
    start_sigmas: tuple[float, ...]
    end_sigmas: tuple[float, ...]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The pipelines' ``mu`` for dynamic shifting: linear in the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def shift_for(config: SchedulerConfig, image_seq_len: int) -> float:
    """``calculate_shift`` with the config's own keys, as both pipelines call it."""
    return calculate_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len,
                           config.base_shift, config.max_shift)


def _time_shift(config: SchedulerConfig, mu: float, t: np.ndarray, *, on_tensor: bool) -> np.ndarray:
    """The reference's time shift with sigma = 1 (t = 0 maps to 0 through 1/0 = inf).

    ``on_tensor``: the reference applies it to a torch tensor, where ``a / tensor`` is evaluated as
    ``a * reciprocal(tensor)`` (two roundings); on a numpy array it is a true division.
    """
    with np.errstate(divide="ignore"):
        odds = (1 / t - 1) ** 1.0
        scale = math.exp(mu) if config.time_shift_type == "exponential" else mu
        if on_tensor:
            return (1 / (scale + odds)) * scale
        return scale / (scale + odds)


def _global_sigmas(config: SchedulerConfig) -> np.ndarray:
    """``init_sigmas``: the shifted training sigmas from 1 down to 1/N (float64)."""
    n = config.num_train_timesteps
    sigmas = 1.0 - np.linspace(1, 1 / n, n + 1)
    return np.flip(config.shift * sigmas / (1 + (config.shift - 1) * sigmas))[:-1].copy()


@dataclasses.dataclass(frozen=True)
class StageSigmas:
    """``init_sigmas_for_each_stage``: per-stage sigma bounds and timestep ranges."""

    ori_start_sigmas: tuple[float, ...]
    start_sigmas: tuple[float, ...]
    end_sigmas: tuple[float, ...]
    timesteps: tuple[np.ndarray, ...]  # the dense (num_train_timesteps,) timesteps of each stage


def stage_sigmas(config: SchedulerConfig) -> StageSigmas:
    n = config.num_train_timesteps
    sigmas = _global_sigmas(config)
    global_timesteps = sigmas * n
    ori_start, start, end, distance = [], [], [], []
    for i in range(config.stages):
        start_index = max(int(config.stage_range[i] * n), 0)
        end_index = min(int(config.stage_range[i + 1] * n), n)
        start_sigma = float(sigmas[start_index])
        end_sigma = float(sigmas[end_index]) if end_index < n else 0.0
        ori_start.append(start_sigma)
        if i != 0:
            # The renoise at upsampling raises the noise level; start the stage where it lands.
            ori_sigma = 1 - start_sigma
            corrected = (1 / (math.sqrt(1 + (1 / config.gamma)) * (1 - ori_sigma) + ori_sigma)) * ori_sigma
            start_sigma = 1 - corrected
        distance.append(start_sigma - end_sigma)
        start.append(start_sigma)
        end.append(end_sigma)
    total = sum(distance)
    timesteps = []
    for i in range(config.stages):
        start_ratio = 0.0 if i == 0 else sum(distance[:i]) / total
        end_ratio = 0.9999999999999999 if i == config.stages - 1 else sum(distance[: i + 1]) / total
        t_max = min(global_timesteps[int(start_ratio * n)], 999)
        t_min = global_timesteps[min(int(end_ratio * n), n - 1)]
        timesteps.append(np.linspace(t_max, t_min, n + 1)[:-1])
    return StageSigmas(tuple(ori_start), tuple(start), tuple(end), tuple(timesteps))


def make_schedule(
    scheduler_config: SchedulerConfig | Mapping[str, Any],
    num_inference_steps: int,
    stage_index: int | None = None,
    mu: float | None = None,
    amplify_first_chunk: bool = False,
    *,
    sigmas: np.ndarray | None = None,
) -> Schedule:
    """The timesteps and sigmas of one stage, equal to the reference's ``set_timesteps``.

    ``stage_index`` is required when the config has several stages and ignored (may be 0) with one.
    ``mu`` is the dynamic shift (``shift_for``), needed only with ``use_dynamic_shifting``.
    ``amplify_first_chunk`` doubles the steps of a DMD schedule (the distilled model's first chunk).
    ``sigmas`` are custom single-stage sigmas, as ``HeliosPipeline`` passes them.
    """
    config = read_scheduler_config(scheduler_config)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps = {num_inference_steps!r}: it must be an integer >= 1")
    if config.stages > 1:
        if stage_index is None or not 0 <= stage_index < config.stages:
            raise ValueError(
                f"stage_index = {stage_index!r}: this scheduler has {config.stages} stages, so pass an index "
                f"0 <= stage_index < {config.stages}"
            )
    elif stage_index not in (None, 0):
        raise ValueError(f"stage_index = {stage_index!r}: a single-stage scheduler takes None or 0")
    if sigmas is not None and (config.stages > 1 or config.scheduler_type == "dmd"):
        raise ValueError(
            "custom sigmas are HeliosPipeline's, for single-stage UniPC or Euler schedulers; this one has "
            f"stages = {config.stages}, scheduler_type = {config.scheduler_type!r}: drop the sigmas"
        )
    if config.use_dynamic_shifting and mu is None:
        raise ValueError("use_dynamic_shifting is set, so pass mu (see shift_for / calculate_shift)")

    n = int(num_inference_steps)
    is_dmd = config.scheduler_type == "dmd"
    if is_dmd:
        # One extra point that is dropped below: the DMD rule needs the step after the last.
        n = n * 2 + 1 if amplify_first_chunk else n + 1
    stages = stage_sigmas(config)
    train = config.num_train_timesteps

    if config.stages == 1:
        if sigmas is None:
            values = np.linspace(1, 1 / train, n + 1)[:-1].astype(np.float32)
            if config.shift != 1.0:
                values = _time_shift(config, config.shift, values, on_tensor=False)
        else:
            values = np.asarray(sigmas)
            if values.ndim != 1 or len(values) != n or values.dtype.kind != "f":
                raise ValueError(
                    f"custom sigmas must be a 1-D float array of num_inference_steps = {n} values; "
                    f"got shape {values.shape}, dtype {values.dtype}"
                )
        timesteps = (values * train).copy()
    else:
        dense = stages.timesteps[stage_index]
        timesteps = np.linspace(dense[0], dense[-1], n)
        dense_sigmas = np.linspace(0.999, 0, train + 1)[:-1]
        values = np.linspace(dense_sigmas[0], dense_sigmas[-1], n)
    # torch.cat with the float32 zero keeps float64 sigmas float64 and float32 ones float32.
    all_sigmas = np.concatenate([values, np.zeros(1, values.dtype)])

    if is_dmd:
        timesteps = timesteps[:-1]
        all_sigmas = np.concatenate([all_sigmas[:-2], all_sigmas[-1:]])

    if config.use_dynamic_shifting:
        all_sigmas = _time_shift(config, mu, all_sigmas, on_tensor=True)
        if config.stages == 1:
            timesteps = all_sigmas[:-1] * train
        else:
            dense = stages.timesteps[stage_index]
            timesteps = dense.min() + all_sigmas[:-1] * (dense.max() - dense.min())

    return Schedule(
        config=config,
        stage_index=stage_index if config.stages > 1 else None,
        timesteps=np.asarray(timesteps),
        sigmas=np.asarray(all_sigmas),
        ori_start_sigmas=stages.ori_start_sigmas,
        start_sigmas=stages.start_sigmas,
        end_sigmas=stages.end_sigmas,
    )
