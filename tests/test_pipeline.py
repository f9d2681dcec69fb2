"""End-to-end parity of ``helios_jax.pipeline.HeliosPipeline`` with diffusers' Helios pipelines.

Each case runs the reference pipeline on a tiny random checkpoint written by ``save_pretrained``,
records every random number it draws, replays them into ours, and compares the final latents (what
the reference hands its VAE) and the decoded frames. Tolerance (float32): relative L2 <= 1e-4 and
max-abs <= 1e-4 * max|ref| on both.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_fixtures import contiguous_transformer_output, record_decodes, record_draws, reference_pipeline
from reference import max_abs, rel_err

from helios_jax.noise import ReplayNoise
from helios_jax.pipeline import HeliosPipeline

TOL = 1e-4


@functools.lru_cache(maxsize=None)
def pipelines(kind: str, folder: str):
    reference, checkpoint = reference_pipeline(kind, folder)
    reference.set_progress_bar_config(disable=True)
    contiguous_transformer_output(reference)
    return reference, HeliosPipeline.from_pretrained(checkpoint, dtype=jnp.float32, compilation_cache=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pipelines"))


def _picture(seed: int, frames: int | None = None):
    rng = np.random.default_rng(seed)
    make = lambda: Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))  # noqa: E731
    return make() if frames is None else [make() for _ in range(frames)]


CASES = {
    # name: (pipeline kind, extra arguments)
    "base-t2v-cfg-3chunks": ("base", dict(num_frames=99, num_inference_steps=3)),
    "base-i2v-cfg": ("base", dict(num_inference_steps=2, image=0)),
    "pyramid-t2v-cfg-3chunks": ("pyramid", dict(num_frames=99)),
    "pyramid-t2v-cfg-zero-star": ("pyramid_zero_star", dict(zero_steps=1, use_zero_init=True)),
    "pyramid-i2v-cfg-zero-star-no-zero-init": ("pyramid_zero_star", dict(image=1, use_zero_init=False)),
    "pyramid-v2v-cfg": ("pyramid", dict(video=2)),
    "distilled-t2v-amplified-3chunks": ("distilled", dict(num_frames=99, is_amplify_first_chunk=True)),
    "distilled-i2v-skip-first-chunk": ("distilled", dict(image=3, num_frames=99, is_skip_first_chunk=True)),
    "distilled-v2v": ("distilled", dict(video=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_pipeline(folder, case):
    kind, extra = CASES[case]
    reference, ours = pipelines(kind, folder)
    args = dict(prompt="a cat and a dog", negative_prompt="the dog", height=64, width=64, num_frames=40,
                guidance_scale=1.0 if kind == "distilled" else 4.0, max_sequence_length=16)
    if kind != "base":
        args["pyramid_num_inference_steps_list"] = [2, 2, 2] if kind == "distilled" else [1, 2, 1]
    args.update(extra)
    if "image" in args:
        args["image"] = _picture(args["image"])
    if "video" in args:
        args["video"] = _picture(args["video"], frames=40)

    draws, decoded = [], []
    with record_draws(draws), record_decodes(reference, decoded):
        ref_frames = reference(**args, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    ref_latents = np.concatenate(decoded, axis=2)

    noise = ReplayNoise(draws)
    frames = ours(**args, noise=noise, output_type="float", progress=False)
    assert noise.used == len(draws), "ours must draw exactly what the reference draws"
    latents = ours(**args, noise=ReplayNoise(draws), output_type="latent", progress=False)
    cfg = ours.vae_config
    std = np.asarray(cfg.latents_std, np.float32).reshape(1, -1, 1, 1, 1)
    mean = np.asarray(cfg.latents_mean, np.float32).reshape(1, -1, 1, 1, 1)
    chunk_latents = latents[:, :, -ref_latents.shape[2]:] * std + mean  # what the reference decodes

    for out, ref in ((chunk_latents, ref_latents), (frames, ref_frames)):
        assert out.shape == ref.shape
        assert rel_err(out, ref) <= TOL, f"relative L2 error {rel_err(out, ref):.2e}"
        assert max_abs(out, ref) <= TOL * np.abs(ref).max()


def test_keep_first_frame_off_runs_where_the_reference_cannot(folder):
    """With keep_first_frame=False diffusers 0.42.1 splits a 19-frame window into [16, 2, 2] and raises;
    ours keeps the 20-frame window the split needs (the DiT's index layout for it is tested in
    test_transformer.py)."""
    reference, ours = pipelines("pyramid", folder)
    args = dict(prompt="a cat", height=64, width=64, num_frames=40, keep_first_frame=False,
                pyramid_num_inference_steps_list=[1, 1, 1], max_sequence_length=16)
    with pytest.raises(RuntimeError, match="split_with_sizes"):
        reference(**args, generator=torch.Generator().manual_seed(0), output_type="np")
    video = ours(**args, seed=0, progress=False)
    assert video.shape == (65, 64, 64, 3) and video.dtype == np.uint8
