"""Your own sampler around the Helios DiT: a plain Euler flow-matching loop with a step callback.

    python examples/custom_sampler.py                  # tiny random weights: a few seconds on a CPU
    python examples/custom_sampler.py --checkpoint Helios-Distilled --height 384 --width 640 \\
        --steps 30 --output euler.mp4                  # a real checkpoint folder (helios-jax download ...)

``HeliosPipeline`` does much more (the pyramid, the memory of earlier chunks, CFG, streaming); this shows
that the pieces it is made of are plain JAX: the DiT is a flax module you call with ``apply``, the text
encoder and the VAE are functions of arrays, and the loop between them is yours. Without ``--checkpoint``
the weights are the tests' tiny random ones (helios_jax.demo), so the video is noise: the point is the API.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import helios_jax as hj
from helios_jax.demo import demo_checkpoint
from helios_jax.models.vae import chunk_decoder
from helios_jax.video import write_mp4

Velocity = Callable[[jax.Array, float], jax.Array]  # (latents, timestep) -> the DiT's flow velocity
StepCallback = Callable[[int, float, jax.Array], None]  # (step, timestep, latents after the step)


def flow_sigmas(steps: int, shift: float) -> np.ndarray:
    """Noise levels from 1 (pure noise) to 0 (data), shifted towards high noise as flow-matching models
    (Wan, SD3) sample them: ``shift * s / (1 + (shift - 1) * s)``."""
    s = np.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1.0 + (shift - 1.0) * s)


def euler_sample(velocity: Velocity, noise: jax.Array, sigmas: np.ndarray,
                 callback: StepCallback | None = None) -> jax.Array:
    """Integrate the flow from noise to data: ``x <- x + (sigma_next - sigma) * v(x, t)``, with the DiT's
    timestep ``t = 1000 * sigma`` (its ``num_train_timesteps``)."""
    latents, sigmas = noise, sigmas.tolist()  # Python floats: they keep the latents' dtype (bf16 stays bf16)
    for step, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        t = 1000.0 * sigma
        latents = latents + (sigma_next - sigma) * velocity(latents, t)
        if callback is not None:
            callback(step, t, latents)
    return latents


def print_norm(step: int, t: float, latents: jax.Array) -> None:
    """A step callback: the latents' RMS after each step (reading it waits for the step to finish)."""
    print(f"step {step:2d}  t = {t:6.1f}  rms(latents) = {float(jnp.sqrt(jnp.mean(latents ** 2))):.4f}")


def main(argv: list[str] | None = None) -> jax.Array:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a Helios checkpoint folder (default: the tiny random-weight one)")
    parser.add_argument("--prompt", default="A dynamic time-lapse of the scenery from the window of a train.")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--shift", type=float, default=3.0)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="decode with the VAE and write this .mp4")
    args = parser.parse_args(argv)
    folder = args.checkpoint or demo_checkpoint()
    dtype = jnp.bfloat16 if args.checkpoint else jnp.float32

    # The text: UMT5 embeddings of the prompt, (1, 512, text_dim).
    encoder = hj.PromptEncoder.from_pretrained(folder, dtype)
    embeds, _ = encoder.encode_prompt(args.prompt, do_classifier_free_guidance=False)

    # The DiT: a flax module and its params. One compiled program serves every step (the shapes never change).
    cfg, params = hj.load_transformer(os.path.join(folder, "transformer"), dtype=dtype)
    dit = jax.jit(hj.HeliosTransformer(cfg).apply)

    def velocity(latents: jax.Array, t: float) -> jax.Array:
        return dit({"params": params}, latents, jnp.full((1,), t, dtype), embeds)

    # One chunk of 9 latent frames (33 video frames) at 1/8 of the size, from Gaussian noise.
    shape = (1, cfg.in_channels, 9, args.height // 8, args.width // 8)
    noise = jax.random.normal(jax.random.key(args.seed), shape, dtype)
    latents = euler_sample(velocity, noise, flow_sigmas(args.steps, args.shift), callback=print_norm)

    if args.output:
        vae_cfg, vae_params = hj.load_vae(os.path.join(folder, "vae"), dtype=jnp.float32)  # as the pipeline runs it
        frames = chunk_decoder(vae_cfg)(vae_params, latents.astype(jnp.float32))  # uint8 (1, 33, H, W, 3)
        print(f"wrote {write_mp4(args.output, np.asarray(frames[0]))}")
    return latents


if __name__ == "__main__":
    main()
