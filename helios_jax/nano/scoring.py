"""A nano model's videos of captions it never trained on, generated and scored by the world's rules: what the model
card, the claims study (experiments/studies/nano_claims.py) and the regression test on the shipped model measure."""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from helios_jax.nano import metrics, world

HELD_OUT_SEED = 1000  # world.sample_scenes(n, HELD_OUT_SEED): none is a training clip's (those use seeds 0 and 1)
# How the shipped 2+2+2 student samples (as the published Helios-Distilled): no CFG, the first chunk amplified.
STUDENT_CALL = {"pyramid_num_inference_steps_list": [2, 2, 2], "guidance_scale": 1.0, "is_amplify_first_chunk": True}


def held_out_captions(n: int) -> list[str]:
    """``n`` captions of scenes outside the training and ODE-prompt sets."""
    return [world.caption(scene) for scene in world.sample_scenes(n, HELD_OUT_SEED)]


def sample_and_score(pipe: Any, captions: Sequence[str], *, chunks: int, seeds: Sequence[int] = (0,),
                     **call: Any) -> tuple[list[metrics.Report], float]:
    """Every caption at every seed (the captions of one seed in one batch) through the pipeline ``pipe``
    (a ``HeliosPipeline`` of the nano size), each video scored against its caption; returns the reports and the
    wall seconds per chunk of one video."""
    reports, seconds = [], 0.0
    for seed in seeds:
        start = time.perf_counter()
        videos = pipe(list(captions), num_frames=chunks * world.CHUNK_FRAMES, seed=seed,
                      height=world.WORLD.height, width=world.WORLD.width, **call)
        seconds += time.perf_counter() - start
        reports += [metrics.evaluate(video, caption) for video, caption in zip(videos, captions)]
    return reports, seconds / (len(seeds) * len(captions) * chunks)


def mean_summary(reports: Sequence[metrics.Report]) -> dict[str, float]:
    """Each summary metric's mean over the videos (a metric no video could measure is left out)."""
    keys = reports[0].summary.keys()
    values = {k: [r.summary[k] for r in reports if r.summary.get(k) is not None] for k in keys}
    return {k: float(np.mean(v)) for k, v in values.items() if v}


def load(folder: str) -> Any:
    """The nano pipeline at ``folder`` in float32 (the CPU's fast dtype)."""
    from helios_jax import HeliosPipeline

    return HeliosPipeline.from_pretrained(folder, dtype=jnp.float32)
