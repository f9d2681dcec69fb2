"""Training the Wan VAE (``helios-jax train-vae``): an autoencoder fitted to one's own videos.

A small world (the nano Helios' 64x64 coloured shapes on plain backgrounds) needs a VAE whose decoded
videos look like it; the real Wan VAE is far too large to run there. This module trains ``hj.WanVAE`` on
random windows of the clips of an official metadata JSON (the file ``helios-jax offload`` reads), through
the generic loop (``trainer.train``: AdamW, clipping, orbax checkpoints, resume, metrics.jsonl), and writes
``OUTPUT/vae/``, a diffusers ``AutoencoderKLWan`` folder whose ``latents_mean`` / ``latents_std`` are the
trained encoder's, so the DiT's latents are normalised as for the real Wan VAE.

The objective (:func:`vae_loss`), per window: encode, draw the posterior sample (reparameterised, from the
step's key), decode, and

    loss = L1 + MSE + beta * KL / pixels

* L1 and MSE of the unclamped decoded frames against the clip, both means over pixels: L1 keeps flat
  colours and sharp edges (its gradient does not fade as an error gets small), MSE is what PSNR measures
  and weighs the rare large error (a shape missing) more. The decoded frames are not clamped to [-1, 1]
  here (``decode(clamp=False)``): the reference's clamp would stop the gradient of every overshooting value.
* KL: of the diagonal Gaussian posterior against N(0, 1), summed over a window's latent elements and
  divided by its pixels (channels x frames x height x width), i.e. beta weighs the KL against the per-pixel
  reconstruction as latent-diffusion autoencoders weigh it against their summed reconstruction (beta = 1e-6,
  their ``kl_weight``): a light pull that keeps the latents near unit scale without blurring.
* No perceptual (LPIPS) or GAN term: LPIPS needs downloaded VGG weights (no network at training or test
  time), and the world is flat colours, which L1 + MSE reconstruct sharply without an adversary.

Initialisation: the nano VAE starts from ``helios_jax.demo.random_params`` over the VAE's keymap (fan-in
scaled normals, norms at one, biases at zero: LeCun's normal init, as flax's default, in numpy, with no model
trace), or from the weights of an existing diffusers VAE folder (``config=``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.config import ConfigError, VAEConfig, read_config, to_dict
from helios_jax.models import vae as vae_lib
from helios_jax.training import DataError, trainer
from helios_jax.training.offload import _read_frames, fit_frames, read_metadata

logger = logging.getLogger(__name__)

BETA = 1e-6  # the KL's weight (see the module doc)
VAE_FOLDER = "vae"  # the trained VAE, in OUTPUT
STATISTICS_WINDOWS = 256  # the windows latents_mean / latents_std are measured on (a few seconds of encoding)
COMMAND = "train-vae"
DECODER = ("decoder", "post_quant_conv")  # what --decoder_only trains: the latents the encoder gives stay as they were


def kl_divergence(posterior: vae_lib.Posterior) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) of each sample, summed over its latent elements: (B,) float32."""
    mean, logvar = posterior.mean.astype(jnp.float32), posterior.logvar.astype(jnp.float32)
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


@dataclasses.dataclass(frozen=True)
class Objective:
    """The loss's static settings (they compare by value, so a second run in one process reuses the step)."""

    config: VAEConfig
    beta: float = BETA
    dtype: Any = jnp.float32  # the forward's compute dtype; the trainables stay float32 masters

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))


def vae_loss(objective: Objective, trainable: Any, frozen: Any, batch: dict[str, jax.Array], key: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``trainer.LossFn`` of a batch ``{"video": (B, 3, 1 + 4k, H, W) in [-1, 1]}``: the VAE's params split
    between ``trainable`` and ``frozen`` by their top-level modules (all trainable, or the decoder alone);
    ``key`` draws the posterior noise, ``normal(key, mean.shape)``."""
    video = batch["video"].astype(jnp.float32)
    model = vae_lib.WanVAE(objective.config, objective.dtype)
    variables = {"params": trainer.cast_params({**frozen, **trainable}, objective.dtype)}
    posterior = model.apply(variables, video, method="encode")
    latents = posterior.sample(noise=jax.random.normal(key, posterior.mean.shape, jnp.float32))
    frames = model.apply(variables, latents, clamp=False, method="decode").astype(jnp.float32)
    error = frames - video
    l1, mse = jnp.mean(jnp.abs(error)), jnp.mean(jnp.square(error))
    kl = jnp.mean(kl_divergence(posterior)) / math.prod(video.shape[1:])
    loss = l1 + mse + objective.beta * kl
    clamped = jnp.mean(jnp.square(jnp.clip(frames, -1.0, 1.0) - video))
    return loss, {"l1": l1, "mse": mse, "kl": kl, "psnr": 10.0 * jnp.log10(4.0 / jnp.maximum(clamped, 1e-10))}


# ------------------------------------------------------------------------------------------------ data


def read_clips(metadata: str, *, height: int, width: int, frames: int, skip_unfit: bool = False) -> list[np.ndarray]:
    """Every clip of the metadata JSON (its whole ``cut``, cropped and resized as ``offload`` does) as uint8
    (T, 3, height, width); one DataError for all bad entries (``offload.read_metadata``), clips shorter than
    ``frames`` or off the aspect among them unless ``skip_unfit``."""
    clips = read_metadata(metadata, height=height, width=width, min_frames=frames, skip_unfit=skip_unfit)
    videos = []
    for clip in clips:
        start, end = clip.cut
        video = fit_frames(_read_frames(clip.video, start, end - start), clip.crop, height, width)
        videos.append(np.round((np.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8))
    return videos


def as_model_range(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, 3, H, W) -> float32 (3, T, H, W) in [-1, 1], the VAE's layout."""
    return np.moveaxis(frames.astype(np.float32) / 127.5 - 1.0, 0, 1)


@dataclasses.dataclass(frozen=True)
class RandomWindow:
    """grain's random map: a clip index -> ``{"video": (3, frames, H, W)}``, a window at a random start."""

    clips: Sequence[np.ndarray]
    frames: int

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        clip = self.clips[index]
        start = int(rng.integers(0, len(clip) - self.frames + 1))
        return {"video": as_model_range(clip[start:start + self.frames])}


def window_dataset(clips: Sequence[np.ndarray], *, frames: int, batch: int, seed: int) -> grain.MapDataset:
    """Batches of random windows: the clips shuffled each epoch, a random start per (epoch, clip), all from
    ``seed``; endless, and random access, so the iterator's position is all a checkpoint needs to resume."""
    return (grain.MapDataset.range(len(clips)).shuffle(seed=seed).random_map(RandomWindow(clips, frames), seed=seed)
            .repeat().batch(batch, drop_remainder=True))


# ------------------------------------------------------------------------------------------- the model


def resolve_config(config: str | None) -> tuple[VAEConfig, str | None]:
    """The VAE to train and the folder whose weights it starts from: the nano VAE (``helios_jax.demo.VAE``)
    from random weights by default; a ``config.json`` file: that architecture from random weights; a diffusers
    VAE folder: its architecture and weights."""
    from helios_jax.demo import VAE

    if config is None:
        return VAE, None
    if os.path.isdir(config):
        if not os.path.isfile(os.path.join(config, "config.json")):
            raise ConfigError(f"--config {config!r}: no config.json in the folder; pass a diffusers VAE folder "
                              "(config.json + diffusion_pytorch_model.safetensors) or a config.json file")
        return read_config(VAEConfig, os.path.join(config, "config.json")), config
    if not os.path.isfile(config):
        raise ConfigError(f"--config {config!r} does not exist: pass a diffusers VAE folder or a config.json file")
    return read_config(VAEConfig, config), None


def initial_params(cfg: VAEConfig, weights: str | None, seed: int) -> Any:
    """float32 params: the folder's weights, or ``demo.random_params`` over the VAE's keymap from ``seed``."""
    from helios_jax.demo import random_params
    from helios_jax.loading import load_vae

    if weights is not None:
        return load_vae(weights, jnp.float32)[1]
    return random_params(vae_lib.param_shapes(cfg), vae_lib.keymap(cfg), np.random.default_rng(seed))


def latent_statistics(cfg: VAEConfig, params: Any, clips: Sequence[np.ndarray], *, frames: int, batch: int,
                      limit: int = STATISTICS_WINDOWS) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the latents the offload stores (posterior samples), over
    up to ``limit`` windows of the clips (each clip's non-overlapping windows, taken round-robin).

    The mean is that of the posterior means; the variance is the variance of the means plus the mean of the
    posterior variances, which is the variance of the samples: a channel the encoder does not use has means
    near zero but unit posterior variance, and dividing its samples by the spread of its means alone would
    blow them up."""
    per_clip = [[c[s:s + frames] for s in range(0, len(c) - frames + 1, frames)] for c in clips]
    windows = [w for rank in range(max(map(len, per_clip))) for ws in per_clip if rank < len(ws) for w in [ws[rank]]]
    windows = windows[:limit]
    encoder = vae_lib.video_encoder(cfg)
    sums = np.zeros((3, cfg.z_dim), np.float64)  # sum of means, of squared means, of variances
    count = 0
    for i in range(0, len(windows), batch):
        part = windows[i:i + batch]
        video = np.stack([as_model_range(w) for w in part + [part[-1]] * (batch - len(part))])  # one shape
        posterior = encoder(params, jnp.asarray(video))
        mean = np.asarray(posterior.mean, np.float64)[:len(part)]
        var = np.exp(np.asarray(posterior.logvar, np.float64))[:len(part)]
        axes = (0, 2, 3, 4)
        sums += [mean.sum(axes), np.square(mean).sum(axes), var.sum(axes)]
        count += mean.size // cfg.z_dim
    mean = sums[0] / count
    std = np.sqrt(np.maximum(sums[1] / count - np.square(mean), 0.0) + sums[2] / count)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def write_vae(output: str, cfg: VAEConfig, params: Any) -> str:
    """``output/vae/`` as a diffusers ``AutoencoderKLWan`` folder, replacing an earlier one only once the new one
    is complete (``export_safetensors`` stages it; the swap is two renames)."""
    from helios_jax.convert import export_safetensors
    from helios_jax.loading import COMPONENTS

    component = COMPONENTS["vae"]
    final = os.path.join(os.path.abspath(output), VAE_FOLDER)
    fresh, old = f"{final}.new-{os.getpid()}", f"{final}.old-{os.getpid()}"
    for leftover in (fresh, old):
        shutil.rmtree(leftover, ignore_errors=True)
    export_safetensors(fresh, jax.tree.map(np.asarray, params), vae_lib.keymap(cfg), component.config_json(cfg),
                       weights_name=component.weights_name)
    if os.path.isdir(final):
        os.rename(final, old)
    os.rename(fresh, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------ the command


def check_settings(*, steps: int, batch: int, frames: int, learning_rate: float, height: int, width: int,
                   checkpointing_steps: int, cfg: VAEConfig) -> None:
    """One ConfigError for the first setting that cannot run, before anything is read or written."""
    for name, value in (("--steps", steps), ("--batch", batch), ("--checkpointing_steps", checkpointing_steps)):
        if value < 1:
            raise ConfigError(f"{name} {value}: must be at least 1")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ConfigError(f"--learning_rate {learning_rate}: must be a positive finite number")
    t = cfg.temporal_compression
    if frames < 1 or (frames - 1) % t:
        raise ConfigError(f"--frames {frames}: the VAE is causal with {t}x temporal compression, so a clip has "
                          f"1 + {t}k frames (e.g. {1 + 2 * t} or {1 + 4 * t})")
    ratio = cfg.spatial_compression
    if height < ratio or width < ratio or height % ratio or width % ratio:
        raise ConfigError(f"--height {height} --width {width}: both must be positive multiples of {ratio}, the "
                          "VAE's spatial compression")


def train_vae(metadata: str, output: str, *, config: str | None = None, steps: int = 2000, batch: int = 8,
              frames: int = 9, learning_rate: float = 1e-3, seed: int = 0, height: int = 64, width: int = 64,
              checkpointing_steps: int = 500, skip_unfit: bool = False, beta: float = BETA,
              decoder_only: bool = False, dtype: Any = jnp.float32, progress: bool | None = None) -> str:
    """Train a Wan VAE on the clips of ``metadata`` into ``output`` (checkpoints, metrics.jsonl, and at the
    end ``output/vae/``, whose path is returned); a rerun resumes from the newest checkpoint. Every input is
    checked, and every clip decoded, before anything is written.

    ``decoder_only`` fine-tunes the decoder of the VAE folder ``config`` with its encoder frozen, as Stable
    Diffusion's ft-MSE VAE was made: the latents, and so every offloaded dataset and model trained on them, stay
    valid, and the folder's latents_mean / latents_std are kept."""
    cfg, weights = resolve_config(config)
    if decoder_only and weights is None:
        raise ConfigError("--decoder_only fine-tunes a trained VAE's decoder: give --config VAE_FOLDER (a diffusers "
                          "VAE folder with weights)")
    check_settings(steps=steps, batch=batch, frames=frames, learning_rate=learning_rate, height=height,
                   width=width, checkpointing_steps=checkpointing_steps, cfg=cfg)
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"--output {output!r} exists and is not a folder")
    run = trainer.RunConfig(output_dir=output, max_train_steps=steps, checkpointing_steps=checkpointing_steps,
                            seed=seed, progress=progress, config={
                                "command": COMMAND, "output_dir": output,
                                "model_config": {"vae": to_dict(cfg), "init": weights, "beta": beta,
                                                 **({"trained": "decoder"} if decoder_only else {}),
                                                 "dtype": jnp.dtype(dtype).name},
                                "data_config": {"metadata": os.path.abspath(metadata), "frames": frames,
                                                "height": height, "width": width},
                                "training_config": {"max_train_steps": steps, "train_batch_size": batch,
                                                    "learning_rate": learning_rate, "seed": seed,
                                                    "checkpointing_steps": checkpointing_steps}})
    trainer.check_resumable(run)
    clips = read_clips(metadata, height=height, width=width, frames=frames, skip_unfit=skip_unfit)
    params = initial_params(cfg, weights, seed)
    stage = trainer.Stage(trainer.bind(vae_loss, Objective(cfg, beta, dtype)),
                          trainer.OptimizerConfig(learning_rate=learning_rate, adam_weight_decay=0.0))
    data = iter(window_dataset(clips, frames=frames, batch=batch, seed=seed)
                .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
    frozen = {k: v for k, v in params.items() if decoder_only and k not in DECODER}
    state = trainer.train(run, stage, {k: v for k, v in params.items() if k not in frozen}, frozen, data)
    trained = {**frozen, **jax.device_get(state.trainable)}
    if decoder_only:
        return write_vae(output, cfg, trained)
    mean, std = latent_statistics(cfg, trained, clips, frames=frames, batch=batch)
    if not all(math.isfinite(v) and v > 0 for v in std) or not all(map(math.isfinite, mean)):
        raise DataError(f"the trained encoder's latent statistics are not usable (mean {mean}, std {std})")
    return write_vae(output, dataclasses.replace(cfg, latents_mean=mean, latents_std=std), trained)
