"""A tiny training setup for the trainer tests, on the package's own stages; its model, LoRA and stage-1 loss are
experiments/tiny_training.py's, the setup the step benchmark times.

Synthetic videos (a coloured square moving over a plain background), each 33-frame section encoded
independently by the embedded demo checkpoint's VAE (posterior sample, normalised), as the official
offload does, assembled by ``training.data.assemble``; the losses are ``training.stages``' with the
official context (drops and corruption). The trainable set is the stage-1 one: LoRA
(helios_jax.models.lora) plus the full history patch convs.
"""

from __future__ import annotations

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np

from experiments.tiny_training import (  # noqa: F401  (the tests use them as training_fixtures.*)
    CONFIG,
    PIXELS,
    SPEC,
    SUBSET,
    TEXT_TOKENS,
    make_stage1_loss,
    stage1_variables,
    stage_model,
)
from helios_jax.models import vae as vae_lib
from helios_jax.training import data, losses, samples, stages


def moving_square_videos(clips: int, sections: int, seed: int = 0, pixels: int = PIXELS) -> np.ndarray:
    """(clips, sections, 3, 33, H, W) videos in [-1, 1]: a square of random colour and size moving at a
    random constant velocity (bouncing off the borders) over a random plain background."""
    rng = np.random.default_rng(seed)
    frames = 33 * sections
    out = np.empty((clips, 3, frames, pixels, pixels), np.float32)
    grid = np.arange(pixels)
    for c in range(clips):
        background, colour = rng.uniform(-1, 0, 3), rng.uniform(0, 1, 3)
        size = int(rng.integers(8, 14))
        pos, vel = rng.uniform(0, pixels - size, 2), rng.uniform(-1.5, 1.5, 2)
        for f in range(frames):
            inside = ((grid[:, None] >= pos[0]) & (grid[:, None] < pos[0] + size)
                      & (grid[None, :] >= pos[1]) & (grid[None, :] < pos[1] + size))
            out[c, :, f] = np.where(inside[None], colour[:, None, None], background[:, None, None])
            pos = pos + vel
            bounce = (pos < 0) | (pos > pixels - size)
            vel = np.where(bounce, -vel, vel)
            pos = np.clip(pos, 0, pixels - size)
    return out.reshape(clips, 3, sections, 33, pixels, pixels).transpose(0, 2, 1, 3, 4, 5)


def encode_sections(vae_config, vae_params, videos: np.ndarray, seed: int = 0) -> np.ndarray:
    """(clips, sections, 16, 9, h, w) normalised posterior samples, every 33-frame section on its own."""
    clips, sections = videos.shape[:2]
    flat = jnp.asarray(videos.reshape(clips * sections, *videos.shape[2:]))
    latents = np.asarray(vae_lib.encode_sample(vae_config, vae_params, flat, jax.random.key(seed)))
    return latents.reshape(clips, sections, *latents.shape[1:])


def dataset(latents: np.ndarray, prompt_embeds: np.ndarray, batch: int, seed: int = 0) -> grain.MapDataset:
    """Every (clip, section) sample as the official loader assembles it (``training.data.assemble``),
    shuffled per epoch, repeated, batched: a grain dataset."""
    items = [{**data.assemble(latents[c], s), "prompt_embeds": prompt_embeds[c]}
             for c in range(latents.shape[0]) for s in range(latents.shape[1])]
    return grain.MapDataset.source(items).shuffle(seed=seed).repeat().batch(batch, drop_remainder=True)


def make_stage2_losses(remat: bool = True, dtype=jnp.bfloat16) -> tuple:
    """The real stage 2-post terms: one per pyramid stage (ratios [1, 1, 1]), uniform timesteps."""
    pyramid = stages.PyramidSettings(losses.PyramidSchedule.create(), (1, 1, 1), losses.TimestepSampling("none"))
    return tuple(functools.partial(stages.pyramid_loss, stage_model(remat, dtype), samples.ContextConfig(), pyramid, i)
                 for i in range(3))


export = functools.partial(stages.export_lora, SPEC, CONFIG)
