"""A tiny stage-1 training setup for the trainer tests and the step benchmark.

Synthetic videos (a coloured square moving over a plain background), each 33-frame section encoded
independently by the embedded demo checkpoint's VAE (posterior sample, normalised), as the official
offload does. The trainable set is the stage-1 one: LoRA (helios_jax.models.lora) plus the full history
patch convs. Until helios_jax.training.{data,history,losses} land, the sample assembly (history 19
frames with the zero pad, x0 anchor zeroed for the first chunk) and the stage-1 flow-matching loss are
small stand-ins here, written from TRAINING.md sections 2.5 and 4.
"""

from __future__ import annotations

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.config import TransformerConfig
from helios_jax.models import lora as lora_lib
from helios_jax.models import transformer as dit
from helios_jax.models import vae as vae_lib
from helios_jax.training import trainer

WINDOW, HISTORY = 9, 19  # latent frames per chunk; history frames (16 long + 2 mid + 1 newest)
PIXELS = 32  # video height and width: latents of 4 x 4
TEXT_TOKENS = 8
CONFIG = TransformerConfig(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=64,
                           freq_dim=32, ffn_dim=128, num_layers=2, rope_dim=(12, 10, 10))
SPEC = lora_lib.LoraSpec(rank=16, patch_embedding=True)  # stage 1: LoRA on every linear and the patch embedding
SUBSET = "lora+history_patches"


def moving_square_videos(clips: int, sections: int, seed: int = 0) -> np.ndarray:
    """(clips, sections, 3, 33, H, W) videos in [-1, 1]: a square of random colour and size moving at a
    random constant velocity (bouncing off the borders) over a random plain background."""
    rng = np.random.default_rng(seed)
    frames = 33 * sections
    out = np.empty((clips, 3, frames, PIXELS, PIXELS), np.float32)
    grid = np.arange(PIXELS)
    for c in range(clips):
        background, colour = rng.uniform(-1, 0, 3), rng.uniform(0, 1, 3)
        size = int(rng.integers(8, 14))
        pos, vel = rng.uniform(0, PIXELS - size, 2), rng.uniform(-1.5, 1.5, 2)
        for f in range(frames):
            inside = ((grid[:, None] >= pos[0]) & (grid[:, None] < pos[0] + size)
                      & (grid[None, :] >= pos[1]) & (grid[None, :] < pos[1] + size))
            out[c, :, f] = np.where(inside[None], colour[:, None, None], background[:, None, None])
            pos = pos + vel
            bounce = (pos < 0) | (pos > PIXELS - size)
            vel = np.where(bounce, -vel, vel)
            pos = np.clip(pos, 0, PIXELS - size)
    return out.reshape(clips, 3, sections, 33, PIXELS, PIXELS).transpose(0, 2, 1, 3, 4, 5)


def encode_sections(vae_config, vae_params, videos: np.ndarray, seed: int = 0) -> np.ndarray:
    """(clips, sections, 16, 9, h, w) normalised posterior samples, every 33-frame section on its own."""
    clips, sections = videos.shape[:2]
    flat = jnp.asarray(videos.reshape(clips * sections, *videos.shape[2:]))

    @jax.jit
    def encode(params, video, key):
        posterior = vae_lib.WanVAE(vae_config).apply({"params": params}, video, method="encode")
        return vae_lib.normalize_latents(vae_config, posterior.sample(key))

    latents = np.asarray(encode(vae_params, flat, jax.random.key(seed)))
    return latents.reshape(clips, sections, *latents.shape[1:])


def assemble(latents: np.ndarray, choice: int) -> dict[str, np.ndarray]:
    """One training sample from a clip's (N, 16, 9, h, w) latents, as the official stage-1/2 loader:
    19 zero frames, then the sections in order; history = frames [9c, 9c + 19), target = the next 9,
    x0 = the first latent of section 0, zeroed when c == 0 (the first chunk has no anchor)."""
    channels, h, w = latents.shape[1], latents.shape[3], latents.shape[4]
    stream = np.concatenate([np.zeros((channels, HISTORY, h, w), np.float32),
                             np.concatenate(list(latents), axis=1)], axis=1)
    start = WINDOW * choice
    x0 = latents[0, :, :1] * (choice != 0)
    return {"x0": x0, "history": stream[:, start:start + HISTORY], "target": stream[:, start + HISTORY:start + HISTORY + WINDOW]}


def dataset(latents: np.ndarray, prompt_embeds: np.ndarray, batch: int, seed: int = 0) -> grain.MapDataset:
    """Every (clip, section) sample, shuffled per epoch, repeated, batched: a grain dataset."""
    samples = [{**assemble(latents[c], s), "prompt_embeds": prompt_embeds[c]}
               for c in range(latents.shape[0]) for s in range(latents.shape[1])]
    return grain.MapDataset.source(samples).shuffle(seed=seed).repeat().batch(batch, drop_remainder=True)


def history_inputs(batch: dict, dtype) -> dict[str, jax.Array]:
    """The fixed 29-index layout: x0 0, long 1..16, mid 17..18, newest 19, noisy 20..28."""
    history = batch["history"]
    long, mid, newest = history[:, :, :16], history[:, :, 16:18], history[:, :, 18:]
    idx = jnp.arange(29)[None]
    return {
        "indices_hidden_states": idx[:, 20:], "indices_latents_history_long": idx[:, 1:17],
        "indices_latents_history_mid": idx[:, 17:19],
        "indices_latents_history_short": jnp.concatenate([idx[:, :1], idx[:, 19:20]], axis=1),
        "latents_history_long": long.astype(dtype), "latents_history_mid": mid.astype(dtype),
        "latents_history_short": jnp.concatenate([batch["x0"], newest], axis=2).astype(dtype),
    }


def stage1_loss(model: dit.HeliosTransformer, dtype, trainable, frozen, batch, key):
    """Flow matching (TRAINING.md section 4): logit-normal u, sigma = (1000 - floor(1000 u)) / 1000,
    x_t = (1 - sigma) x + sigma eps, target velocity eps - x, mean squared error in float32."""
    target = batch["target"].astype(jnp.float32)
    k_u, k_eps = jax.random.split(key)
    u = jax.nn.sigmoid(jax.random.normal(k_u, (target.shape[0],)))
    sigma = (1000.0 - jnp.floor(1000.0 * u)) / 1000.0
    eps = jax.random.normal(k_eps, target.shape)
    s = sigma[:, None, None, None, None]
    noisy = (1 - s) * target + s * eps
    variables = trainer.combine(trainer.cast_params(trainable, dtype, dit.keeps_fp32), frozen)
    pred = model.apply(variables, noisy.astype(dtype), 1000.0 * sigma,
                       batch["prompt_embeds"].astype(dtype), **history_inputs(batch, dtype), lora_scale=SPEC.scale)
    loss = jnp.mean((pred.astype(jnp.float32) - (eps - target)) ** 2)
    return loss, {"sigma": jnp.mean(sigma)}


def make_stage1_loss(remat: bool = True, dtype=jnp.bfloat16):
    return functools.partial(stage1_loss, dit.HeliosTransformer(CONFIG, remat=remat), dtype)


def stage1_variables(seed: int = 0, dtype=jnp.bfloat16) -> tuple[dict, dict]:
    """(trainable, frozen) of a random tiny DiT with a fresh LoRA: the frozen base in ``dtype`` but the
    reference's float32 modules, the trainables in float32."""
    params = dit.init_params(CONFIG, jax.random.key(seed))
    variables = {"params": params, "lora": lora_lib.init_lora(SPEC, params, jax.random.key(seed + 1))}
    trainable, frozen = trainer.partition(variables, lora_lib.trainable_mask(variables, SUBSET))
    frozen = trainer.cast_params(frozen, dtype, dit.keeps_fp32)
    return trainable, frozen


def export(trainable: dict, folder: str) -> None:
    """The checkpoint's diffusers LoRA file and the fully trained patch convs beside it."""
    lora_lib.save_lora(folder, trainable["lora"], SPEC, CONFIG, partial=trainable.get("params"))
