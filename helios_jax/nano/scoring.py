"""A nano model's videos of captions it never trained on, generated and scored by the world's rules: what the model
card, the claims study (experiments/studies/nano_claims.py) and the regression test on the shipped model measure."""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.loading import load_vae
from helios_jax.models import vae as vae_lib
from helios_jax.nano import metrics, world
from helios_jax.pipeline import HeliosPipeline

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
    wall seconds per chunk of one video (of the seeds after the first, whose time holds the compiles, when there
    are several)."""
    reports, seconds = [], []
    for seed in seeds:
        start = time.perf_counter()
        videos = pipe(list(captions), num_frames=chunks * world.CHUNK_FRAMES, seed=seed,
                      height=world.WORLD.height, width=world.WORLD.width, **call)
        seconds.append(time.perf_counter() - start)
        reports += [metrics.evaluate(video, caption) for video, caption in zip(videos, captions)]
    timed = seconds[1:] or seconds
    return reports, sum(timed) / (len(timed) * len(captions) * chunks)


def mean_summary(reports: Sequence[metrics.Report]) -> dict[str, float]:
    """Each summary metric's mean over the videos (a metric no video could measure is left out)."""
    keys = reports[0].summary.keys()
    values = {k: [r.summary[k] for r in reports if r.summary.get(k) is not None] for k in keys}
    return {k: float(np.mean(v)) for k, v in values.items() if v}


def load(folder: str) -> HeliosPipeline:
    """The nano pipeline at ``folder`` in float32 (the CPU's fast dtype)."""
    return HeliosPipeline.from_pretrained(folder, dtype=jnp.float32)


def vae_round_trip(folder: str, n: int, *, chunks: int, seed: int = 0) -> list[metrics.Report]:
    """The clips of the first ``n`` held-out scenes themselves through the pipeline folder's VAE (each 33-frame
    section encoded on its own and sampled, as the offload stores latents, then decoded as the pipeline decodes a
    chunk), scored: the ceiling of any model that decodes with this VAE."""
    cfg, params = load_vae(os.path.join(folder, "vae"), jnp.float32)
    decode = vae_lib.chunk_decoder(cfg)
    reports = []
    for i, scene in enumerate(world.sample_scenes(n, HELD_OUT_SEED)):
        clip = world.render(scene, chunks * world.CHUNK_FRAMES)
        sections = clip.reshape(chunks, world.CHUNK_FRAMES, *clip.shape[1:])  # (chunks, 33, H, W, 3)
        video = jnp.asarray(np.moveaxis(sections.astype(np.float32) / 127.5 - 1.0, -1, 1))  # (chunks, 3, 33, H, W)
        latents = vae_lib.encode_sample(cfg, params, video, jax.random.fold_in(jax.random.key(seed), i))
        frames = np.asarray(decode(params, latents))
        reports.append(metrics.evaluate(frames.reshape(-1, *frames.shape[2:]), world.caption(scene)))
    return reports
