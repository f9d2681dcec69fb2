"""A checkpoint's step-cache calibration (its JSON file) and the pipeline's cached chunk sampling.

The rule itself runs inside the compiled chunk (``helios_jax.sampling.step_cache``); this module is the host's
side of it: a calibration run (every step computed) records each step's magnitude ratio, averaged over its chunks
and prompts, into a small JSON file written beside the run's output; a later generation reads it (checked in
full, one :class:`StepCacheError` naming the problem) and skips by it. ``HeliosPipeline.step_cache`` holds a
:class:`StepCache`; None (the default) samples every step, with the uncached program.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import jax
import numpy as np

from helios_jax.checkpoint import PipelineError
from helios_jax.sampling.chunk import ChunkLayout, ChunkNoise, ChunkPlan, denoise_chunk_cached
from helios_jax.sampling.step_cache import cache_arrays
from helios_jax.video import write_text

FORMAT = "helios-jax step cache"
VERSION = 1
RULE = "magcache"
SUFFIX = ".step-cache.json"  # the calibration file's name: the output's, with this instead of .mp4
# The defaults a calibration file is written with (the nano Base's measured trade, docs/performance.md): MagCache's
# retention of the first 20% of the steps, at most two skips in a row.
THRESHOLD, MAX_SKIPS, RETAIN = 0.25, 2, 0.2


class StepCacheError(PipelineError):
    """A step-cache file that cannot be used, or that does not fit the generation's steps."""


def dit_forwards(computed: int, layout: ChunkLayout) -> int:
    """DiT forwards of one batch for ``computed`` model calls: two per call with CFG, as the uncached chunk's."""
    return computed * (2 if layout.guidance != "none" else 1)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """One checkpoint's calibrated ratios (per stage, one per step) and the rule's settings."""

    checkpoint: str
    stage_steps: tuple[int, ...]
    ratios: tuple[tuple[float, ...], ...]
    chunks: int  # chunks (times prompts) averaged
    threshold: float = THRESHOLD
    max_skips: int = MAX_SKIPS
    retain: float = RETAIN  # the share of each stage's first steps that is always computed

    def check_steps(self, stage_steps: Sequence[int]) -> None:
        """One error before any work when a generation's steps are not those this file was calibrated at."""
        if tuple(stage_steps) != self.stage_steps:
            raise StepCacheError(
                f"the step cache was calibrated at {self.stage_steps} steps per stage but this generation samples "
                f"{tuple(stage_steps)}: calibrate again at these steps (--step_cache calibrate), or generate with "
                f"the calibrated ones")


def _fail(path: str, problem: str) -> StepCacheError:
    return StepCacheError(f"step cache {path}: {problem}; write it again with `helios-jax generate ... "
                          f"--step_cache calibrate`")


def _number(path: str, data: dict, key: str, low: float, high: float, integer: bool = False) -> Any:
    value = data.get(key)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or not low <= value <= high:
        raise _fail(path, f"{key} = {value!r}: expected {'an integer' if integer else 'a number'} in [{low}, {high}]")
    return value


def read_calibration(path: str) -> Calibration:
    """The calibration in ``path``, every field checked (one :class:`StepCacheError` naming the first problem)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as err:
        raise StepCacheError(f"step cache {path}: cannot read it ({err.strerror or err})") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(path, f"not JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _fail(path, f"not a helios-jax step-cache file (its \"format\" is not {FORMAT!r})")
    if data.get("version") != VERSION:
        raise _fail(path, f"version {data.get('version')!r}: this helios-jax reads version {VERSION}")
    if data.get("rule") != RULE:
        raise _fail(path, f"rule {data.get('rule')!r}: the one rule is {RULE!r}")
    steps, ratios = data.get("stage_steps"), data.get("ratios")
    if (not isinstance(steps, list) or not steps or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                                        for n in steps)):
        raise _fail(path, f"stage_steps = {steps!r}: expected a list of positive step counts, one per stage")
    if (not isinstance(ratios, list) or len(ratios) != len(steps)
            or any(not isinstance(r, list) or len(r) != n for r, n in zip(ratios, steps))):
        raise _fail(path, f"ratios must hold one ratio per step of each stage ({steps} steps per stage)")
    flat = [x for r in ratios for x in r]
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0 for x in flat):
        raise _fail(path, "ratios must be finite positive numbers (norm ratios of successive flows)")
    calibration = data.get("calibration")
    chunks = calibration.get("chunks") if isinstance(calibration, dict) else None
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise _fail(path, f"calibration.chunks = {chunks!r}: expected the positive count of chunks averaged")
    return Calibration(checkpoint=str(data.get("checkpoint", "")), stage_steps=tuple(steps),
                       ratios=tuple(tuple(float(x) for x in r) for r in ratios), chunks=chunks,
                       threshold=float(_number(path, data, "threshold", 0.0, 1e6)),
                       max_skips=_number(path, data, "max_skips", 0, 10**6, integer=True),
                       retain=float(_number(path, data, "retain", 0.0, 1.0)))


def write_calibration(path: str, calibration: Calibration) -> str:
    """Write ``calibration`` to ``path`` (a ``.json``) atomically; returns the absolute path."""
    data = {"format": FORMAT, "version": VERSION, "rule": RULE, "checkpoint": calibration.checkpoint,
            "stage_steps": list(calibration.stage_steps), "ratios": [list(r) for r in calibration.ratios],
            "threshold": calibration.threshold, "max_skips": calibration.max_skips, "retain": calibration.retain,
            "calibration": {"chunks": calibration.chunks}}
    return write_text(path, json.dumps(data, indent=1) + "\n", ".json")


@dataclasses.dataclass
class StepCache:
    """``HeliosPipeline.step_cache``: each chunk sampled by ``denoise_chunk_cached``. With a ``calibration`` it
    skips by MagCache's rule at its settings (``threshold``/``max_skips`` override the file's); without one it
    calibrates (threshold 0: every step computed, the uncached chunk's latents) and ``calibrated`` makes the
    file's content. ``computed`` and ``ratios`` collect per chunk its model calls and measured ratios (on the
    device until read)."""

    calibration: Calibration | None = None
    threshold: float | None = None
    max_skips: int | None = None
    computed: list[jax.Array] = dataclasses.field(default_factory=list)
    ratios: list[tuple[jax.Array, ...]] = dataclasses.field(default_factory=list)
    layouts: list[ChunkLayout] = dataclasses.field(default_factory=list)

    def arrays(self, plan: ChunkPlan) -> list:
        """The plan's per-stage :class:`~helios_jax.sampling.step_cache.CacheArrays`."""
        steps = plan.layout.stage_steps
        if self.calibration is None:
            return [cache_arrays(np.ones(n), 0.0, 0, n) for n in steps]
        c = self.calibration
        c.check_steps(steps)
        threshold = c.threshold if self.threshold is None else self.threshold
        max_skips = c.max_skips if self.max_skips is None else self.max_skips
        return [cache_arrays(r, threshold, max_skips, max(1, int(c.retain * n))) for r, n in zip(c.ratios, steps)]

    def denoise(self, model_fn: Any, model_args: Any, plan: ChunkPlan, noise: ChunkNoise, context: jax.Array,
                negative: jax.Array | None, guidance_scale: float, context_fn: Any) -> tuple[jax.Array, jax.Array]:
        """One chunk (the pipeline's ``_denoise`` arguments): its latents and whether they are finite."""
        out = denoise_chunk_cached(model_fn, model_args, plan, noise, context, negative, guidance_scale,
                                   self.arrays(plan), context_fn)
        self.computed.append(out.computed)
        self.ratios.append(out.ratios)
        self.layouts.append(plan.layout)
        return out.latents, out.finite

    def forwards(self) -> list[int]:
        """DiT forwards (of one batch) per chunk sampled so far."""
        return [dit_forwards(int(c), layout) for c, layout in zip(self.computed, self.layouts)]

    def calibrated(self, checkpoint: str) -> Calibration:
        """The ratios recorded so far, averaged over the chunks (and the batch's prompts, within each chunk)."""
        if not self.ratios:
            raise StepCacheError("no chunk was sampled: nothing to calibrate")
        steps = {layout.stage_steps for layout in self.layouts}
        if len(steps) != 1:
            raise StepCacheError(f"the calibration run's chunks sampled different steps {sorted(steps)}")
        (stage_steps,) = steps
        stacked = [np.mean([np.asarray(chunk[s]) for chunk in self.ratios], axis=0) for s in range(len(stage_steps))]
        return Calibration(checkpoint=checkpoint, stage_steps=stage_steps,
                           ratios=tuple(tuple(round(float(x), 6) for x in r) for r in stacked), chunks=len(self.ratios))
