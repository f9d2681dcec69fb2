"""Tiny complete Helios checkpoints for the end-to-end tests, written by diffusers' ``save_pretrained``.

``reference_pipeline(kind)`` builds a diffusers ``HeliosPipeline`` or ``HeliosPyramidPipeline`` with
random weights in every component; ``record_draws`` captures every random number the reference draws
(all of its randomness goes through ``torch.randn`` / ``torch.rand``) so the same numbers can be
replayed into ours with ``helios_jax.noise.ReplayNoise``.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    HeliosDMDScheduler,
    HeliosPipeline,
    HeliosPyramidPipeline,
    HeliosScheduler,
    HeliosTransformer3DModel,
)
from reference import randomize
from transformers import AutoTokenizer
from umt5_fixtures import umt5_model, write_tokenizer

from helios_jax import verify

TEXT_DIM = 32  # umt5_model's d_model
# A gamma at which torch's float32 Cholesky of the block covariance succeeds on the CPU (1/3 fails there).
GAMMA = 0.25
KINDS = ("base", "pyramid", "pyramid_zero_star", "distilled")


def transformer(seed: int = 0) -> HeliosTransformer3DModel:
    return randomize(HeliosTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=TEXT_DIM, freq_dim=16,
        ffn_dim=24, num_layers=2, rope_dim=(6, 6, 4), is_amplify_history=True,
    ), seed, scale=0.2)


def vae(seed: int = 1) -> AutoencoderKLWan:
    rng = np.random.default_rng(seed)
    model = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                             temperal_downsample=[False, True, True],
                             latents_mean=rng.normal(0, 0.3, 4).tolist(), latents_std=rng.uniform(0.5, 2, 4).tolist())
    return randomize(model, seed, scale=0.15)


def scheduler(kind: str):
    if kind == "base":
        return HeliosScheduler(stages=1, stage_range=[0, 1], gamma=GAMMA, shift=3.0)
    if kind == "distilled":
        return HeliosDMDScheduler(gamma=GAMMA)
    return HeliosScheduler(gamma=GAMMA)


def reference_pipeline(kind: str, folder: str):
    """A random-weight reference pipeline of ``kind``, also written to ``folder`` with save_pretrained."""
    tokenizer = AutoTokenizer.from_pretrained(write_tokenizer(os.path.join(folder, "_tokenizer_src")))
    parts = dict(tokenizer=tokenizer, text_encoder=umt5_model(seed=2), vae=vae(), scheduler=scheduler(kind),
                 transformer=transformer())
    if kind == "base":
        pipe = HeliosPipeline(**parts)
    else:
        pipe = HeliosPyramidPipeline(**parts, is_distilled=kind == "distilled",
                                     is_cfg_zero_star=kind == "pyramid_zero_star")
    pipe.save_pretrained(os.path.join(folder, "ckpt"), max_shard_size="200KB")
    return pipe.to(torch.float32), os.path.join(folder, "ckpt")


def record_draws(record: list[np.ndarray]):
    """Record (as float32 numpy) every ``torch.randn`` / ``torch.rand`` result drawn inside the block."""
    return verify.record_draws(torch, record)


@contextlib.contextmanager
def record_decodes(pipe, record: list[np.ndarray]):
    """Record the latents the reference pipeline hands to its VAE decode (the chunks' final latents)."""
    decode = pipe.vae.decode

    def recording(latents, *args, **kwargs):
        record.append(latents.detach().float().numpy().copy())
        return decode(latents, *args, **kwargs)

    pipe.vae.decode = recording
    try:
        yield record
    finally:
        pipe.vae.decode = decode


def contiguous_transformer_output(pipe) -> None:
    """Make the reference transformer return contiguous tensors (the same numbers).

    diffusers 0.42.1's CFG-Zero* branch calls ``noise_pred.view(batch, -1)`` on the transformer's output,
    which is a permuted (non-contiguous) tensor, so that branch raises with the real transformer; this
    lets the reference run it at all.
    """
    forward = pipe.transformer.forward

    def contiguous(*args, **kwargs):
        out = forward(*args, **kwargs)
        return tuple(o.contiguous() for o in out) if isinstance(out, tuple) else type(out)(sample=out.sample.contiguous())

    pipe.transformer.forward = contiguous
