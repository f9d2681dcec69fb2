"""Parity of ``hj.WanVAE`` with diffusers' ``AutoencoderKLWan``, its loader and the pipeline helpers.

The reference runs its per-frame loop with the feature cache; ours computes each clip in one pass, so
these tests are also the evidence that the two are the same computation. The configurations keep the
real block structure (Wan2.1: dim_mult (1, 2, 4, 4), two resnets per level, temporal downsampling
(False, True, True)) with 4 base channels, and every weight is random (``randomize``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor
from reference import max_abs, randomize, rel_err, to_numpy

import helios_jax as hj
from helios_jax.config import ConfigError, read_config, to_dict
from helios_jax.convert import CheckpointMismatchError, load_params, save_params
from helios_jax.models import vae as vae_lib

# fp32 tolerances: relative L2 as the issue asks; max-abs on outputs of order 1.
REL_TOL = 1e-5
ABS_TOL = 2e-5

Z = 4
SMALL_WAN21 = dict(
    base_dim=4,
    z_dim=Z,
    latents_mean=[-0.7571, 0.1075, 0.9653, -0.2921],
    latents_std=[2.8184, 1.4541, 0.5, 1.9160],
)
# Wan2.2's residual blocks with 2x2 patches (is_residual, patch_size 2, a wider decoder).
SMALL_WAN22 = dict(
    SMALL_WAN21, is_residual=True, patch_size=2, in_channels=12, out_channels=12, decoder_base_dim=8,
    scale_factor_spatial=16,
)
# The other knobs: one temporal halving, at the first level; three levels; one resnet per level.
SMALL_VARIANT = dict(
    SMALL_WAN21, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, False],
    decoder_base_dim=6, scale_factor_temporal=2, scale_factor_spatial=4,
)
LATENT_HW = (3, 5)  # non-square


@dataclasses.dataclass
class Pair:
    """The reference module and our model with the same weights."""

    ref: AutoencoderKLWan
    cfg: hj.VAEConfig
    params: dict
    decode: Callable
    encode: Callable


def make_pair(kwargs: dict, seed: int = 0, scale: float = 0.3) -> Pair:
    """``scale``: of the random weights, small enough that few decoded values reach the [-1, 1] clamp."""
    ref = randomize(AutoencoderKLWan(**kwargs), seed, scale)
    cfg = read_config(hj.VAEConfig, dict(ref.config))
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = load_params(state, vae_lib.param_shapes(cfg), vae_lib.keymap(cfg))
    model = hj.WanVAE(cfg)
    decode = jax.jit(functools.partial(model.apply, method="decode"))
    encode = jax.jit(functools.partial(model.apply, method="encode"))
    return Pair(ref, cfg, params, decode, encode)


@pytest.fixture(scope="module")
def wan21() -> Pair:
    return make_pair(SMALL_WAN21)


def latents(frames: int, seed: int, hw=LATENT_HW, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, Z, frames, *hw, generator=torch.Generator().manual_seed(seed))


def video(frames: int, seed: int, hw, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, frames, *hw, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def check_close(out, ref, rel=REL_TOL, abs_=ABS_TOL) -> None:
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= rel and max_abs(out, ref) <= abs_, (rel_err(out, ref), max_abs(out, ref))


def reference_decode(ref: AutoencoderKLWan, z: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return to_numpy(ref.decode(z).sample)


@pytest.mark.parametrize("frames", [1, 2, 3, 9])
def test_decode_matches_reference(wan21, frames):
    z = latents(frames, seed=frames)
    want = reference_decode(wan21.ref, z)
    got = np.asarray(wan21.decode({"params": wan21.params}, jnp.asarray(z.numpy())))
    assert got.shape == (2, 3, 1 + 4 * (frames - 1), 8 * LATENT_HW[0], 8 * LATENT_HW[1])
    # The output is clamped to [-1, 1]; most values must be inside, or the comparison would prove little.
    assert np.mean(np.abs(want) >= 1.0) < 0.05
    check_close(got, want)


@pytest.mark.parametrize("frames", [1, 5, 9, 33])
def test_encode_matches_reference(wan21, frames):
    x = video(frames, seed=frames, hw=(8 * LATENT_HW[0], 8 * LATENT_HW[1]))
    with torch.no_grad():
        want = wan21.ref.encode(x).latent_dist
    got = wan21.encode({"params": wan21.params}, jnp.asarray(x.numpy()))
    assert got.mean.shape == (2, Z, 1 + (frames - 1) // 4, *LATENT_HW)
    check_close(got.mean, to_numpy(want.mean))
    check_close(got.logvar, to_numpy(want.logvar))


@pytest.mark.parametrize("kwargs", [SMALL_WAN22, SMALL_VARIANT], ids=["wan22-residual-patch2", "t2-3levels"])
def test_other_configurations_match_reference(kwargs):
    pair = make_pair(kwargs, seed=1, scale=0.2)
    cfg = pair.cfg
    z = latents(3, seed=5, hw=(2, 3))
    want = reference_decode(pair.ref, z)
    got = np.asarray(pair.decode({"params": pair.params}, jnp.asarray(z.numpy())))
    assert got.shape[2] == cfg.video_frames(3)
    assert np.mean(np.abs(want) >= 1.0) < 0.05
    check_close(got, want)

    ratio = cfg.spatial_compression
    x = video(9, seed=6, hw=(2 * ratio, 3 * ratio))
    with torch.no_grad():
        want = pair.ref.encode(x).latent_dist
    got = pair.encode({"params": pair.params}, jnp.asarray(x.numpy()))
    assert got.mean.shape[2] == cfg.latent_frames(9)
    check_close(got.mean, to_numpy(want.mean))
    check_close(got.logvar, to_numpy(want.logvar))


def test_sampling_matches_reference_and_uses_the_key(wan21):
    x = video(5, seed=11, hw=(8 * LATENT_HW[0], 8 * LATENT_HW[1]))
    with torch.no_grad():
        dist = wan21.ref.encode(x).latent_dist
        want = to_numpy(dist.sample(generator=torch.Generator().manual_seed(3)))
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    posterior = wan21.encode({"params": wan21.params}, jnp.asarray(x.numpy()))
    check_close(posterior.sample(noise=jnp.asarray(noise.numpy())), want)
    np.testing.assert_array_equal(posterior.mode(), posterior.mean)

    a, b = posterior.sample(jax.random.key(0)), posterior.sample(jax.random.key(1))
    np.testing.assert_array_equal(a, posterior.sample(jax.random.key(0)))
    assert a.shape == posterior.mean.shape and a.dtype == posterior.mean.dtype and not np.allclose(a, b)
    with pytest.raises(ValueError, match="exactly one of key= or noise="):
        posterior.sample()


def test_frame_count_rule():
    """T latents decode to 1 + 4(T - 1) frames and 1 + 4k frames encode to 1 + k latents (shapes only)."""
    cfg = hj.VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in SMALL_WAN21.items()})
    shapes = vae_lib.param_shapes(cfg)
    model = hj.WanVAE(cfg)
    for t in (1, 2, 3, 4, 9):
        out = jax.eval_shape(functools.partial(model.apply, method="decode"), {"params": shapes},
                             jax.ShapeDtypeStruct((1, Z, t, 2, 3), jnp.float32))
        assert out.shape == (1, 3, 1 + 4 * (t - 1), 16, 24) and cfg.video_frames(t) == 1 + 4 * (t - 1)
    assert cfg.video_frames(9) == 33
    for k in (0, 1, 2, 8):
        post = jax.eval_shape(functools.partial(model.apply, method="encode"), {"params": shapes},
                              jax.ShapeDtypeStruct((1, 3, 1 + 4 * k, 16, 24), jnp.float32))
        assert post.mean.shape == (1, Z, 1 + k, 2, 3) and cfg.latent_frames(1 + 4 * k) == 1 + k
    half = read_config(hj.VAEConfig, SMALL_VARIANT)  # one temporal halving: 1 + 4k frames <-> 1 + 2k latents
    assert [half.latent_frames(f) for f in (1, 5, 9)] == [1, 3, 5] and half.video_frames(5) == 9
    for frames in (0, 2, 4, 8, 34):
        with pytest.raises(ValueError, match="1 \\+ 4k"):
            cfg.latent_frames(frames)


@pytest.mark.parametrize(
    "method, shape, message",
    [
        ("encode", (1, 4, 5, 24, 40), "has 4 channels but this VAE encodes 3"),
        ("encode", (1, 1, 5, 24, 40), "has 1 channels but this VAE encodes 3"),
        ("encode", (1, 3, 4, 24, 40), "4 frames cannot be encoded.*1 \\+ 4k.*trim it to 1"),
        ("encode", (1, 3, 8, 24, 40), "8 frames cannot be encoded.*trim it to 5"),
        ("encode", (1, 3, 34, 24, 40), "34 frames cannot be encoded.*trim it to 33"),
        ("encode", (1, 3, 5, 20, 40), "must be multiples of 8"),
        ("encode", (3, 5, 24, 40), "must be \\(B, C, T, H, W\\)"),
        ("decode", (1, 16, 2, 3, 5), "latents must be \\(B, z_dim=4, T, h, w\\); got shape \\(1, 16, 2, 3, 5\\)"),
        ("decode", (4, 2, 3, 5), "latents must be"),
    ],
)
def test_bad_input_is_a_clear_error(wan21, method, shape, message):
    with pytest.raises(ValueError, match=message):
        getattr(wan21, method)({"params": wan21.params}, jnp.zeros(shape))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(latents_mean=[0.0] * 3), "latents_mean.*one value per latent channel, z_dim = 4"),
        (dict(latents_std=[1.0, 0.0, 1.0, 1.0]), "latents_std.*non-zero"),
        (dict(temperal_downsample=[False, True]), "temperal_downsample.*len\\(dim_mult\\) - 1 = 3"),
        (dict(temperal_downsample=[True, True, True]), "at most two temporal halvings"),
        (dict(scale_factor_temporal=8), "scale_factor_temporal = 8.*compress by 4"),
        (dict(scale_factor_spatial=16), "scale_factor_spatial = 16.*compress by 8"),
        (dict(patch_size=2), "in_channels = 3.*multiple of patch_size\\*\\*2 = 4"),
        (dict(base_dim=0), "base_dim = 0.*positive integer"),
        (dict(is_residual=True, dim_mult=[1, 3, 9, 9]), "encoder level 1: 4 channels x 8 must be divisible by 12"),
        (dict(is_residual=True, dim_mult=[1, 2, 16, 16]), "decoder level 2: 8 channels x 4 must be divisible by 64"),
        (dict(attn_scales=[1.0]), "attn_scales.*only \\(\\) without is_residual"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_res_blocks="2"), "num_res_blocks = '2' \\(expected an integer\\)"),
    ],
)
def test_unsupported_config_is_a_clear_error(change, message):
    with pytest.raises(ConfigError, match=message):
        read_config(hj.VAEConfig, {**SMALL_WAN21, **change})


def test_default_config_is_the_reference_constructor():
    """The fields are exactly AutoencoderKLWan's constructor arguments, with its defaults (the Wan2.1 VAE)."""
    signature = inspect.signature(AutoencoderKLWan.__init__)
    defaults = {n: p.default for n, p in signature.parameters.items() if n != "self"}
    cfg = hj.VAEConfig()
    assert set(defaults) == {f.name for f in dataclasses.fields(hj.VAEConfig)}
    for name, value in defaults.items():
        ours = getattr(cfg, name)
        assert (list(ours) if isinstance(ours, tuple) else ours) == value, name
    assert (cfg.temporal_compression, cfg.spatial_compression) == (4, 8)


@pytest.mark.parametrize("shard", [None, "30KB"], ids=["unsharded", "sharded"])
def test_load_vae_from_save_pretrained(wan21, tmp_path, shard):
    folder = tmp_path / "vae"
    wan21.ref.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    assert any(name.endswith(".index.json") for name in os.listdir(folder)) == bool(shard)
    cfg, params = hj.load_vae(folder)
    assert cfg == wan21.cfg
    jax.tree.map(np.testing.assert_array_equal, params, wan21.params)

    z = latents(2, seed=2)
    check_close(np.asarray(wan21.decode({"params": params}, jnp.asarray(z.numpy()))), reference_decode(wan21.ref, z))


def test_load_vae_casts_restores_and_rejects_foreign_weights(wan21, tmp_path):
    folder = tmp_path / "vae"
    wan21.ref.save_pretrained(folder)
    _, params = hj.load_vae(folder, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}

    save_params(tmp_path / "orbax", params, config=to_dict(wan21.cfg))
    cfg, restored = hj.load_vae(tmp_path / "orbax", dtype=jnp.float32)
    assert cfg == wan21.cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.float32)), restored, params)

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "base_dim": 8}))
    with pytest.raises(CheckpointMismatchError, match="mis-shaped.*encoder.conv_in.weight"):
        hj.load_vae(folder)


def test_bf16_decode_is_as_accurate_as_the_reference_in_bf16(wan21):
    """bf16 end to end (params and activations): as far from the fp32 reference as the reference's own
    bf16 run is (both about 1e-2 here), and as close to that run."""
    z = latents(2, seed=4)
    ref16 = AutoencoderKLWan(**SMALL_WAN21)
    ref16.load_state_dict(wan21.ref.state_dict())
    want16 = reference_decode(ref16.to(torch.bfloat16).eval(), z.to(torch.bfloat16))
    want32 = reference_decode(wan21.ref, z)
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), wan21.params)
    decode16 = jax.jit(functools.partial(hj.WanVAE(wan21.cfg, dtype=jnp.bfloat16).apply, method="decode"))
    got = decode16({"params": params16}, jnp.asarray(z.numpy()))
    assert got.dtype == jnp.bfloat16
    got = np.asarray(got, np.float32)
    assert rel_err(got, want32) <= 1.5 * rel_err(want16, want32) and rel_err(got, want16) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_normalisation_matches_pipeline(wan21, dtype):
    """The pipelines' expressions: ``(z - mean) * (1 / std)`` to normalise, ``z / (1 / std) + mean`` back."""
    cfg = wan21.cfg
    mean = torch.tensor(cfg.latents_mean).view(1, Z, 1, 1, 1).to(dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, Z, 1, 1, 1).to(dtype)
    z = latents(3, seed=9).to(dtype)
    jdtype = jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32
    zj = jnp.asarray(to_numpy(z)).astype(jdtype)
    normalised = vae_lib.normalize_latents(cfg, zj)
    np.testing.assert_array_equal(np.asarray(normalised, np.float32), to_numpy((z - mean) * inv_std))
    back = vae_lib.denormalize_latents(cfg, normalised)
    # XLA turns a division by a broadcast into a product with its reciprocal: equal up to one rounding.
    eps = float(jnp.finfo(jdtype).eps)
    np.testing.assert_allclose(np.asarray(back, np.float32), to_numpy(((z - mean) * inv_std) / inv_std + mean),
                               rtol=eps, atol=eps)


def postprocessed(frames: torch.Tensor) -> np.ndarray:
    """diffusers' conversion of decoded frames to 8-bit images, as (B, T, H, W, C)."""
    clips = VideoProcessor(vae_scale_factor=8).postprocess_video(frames, output_type="pil")
    return np.stack([np.stack([np.asarray(image) for image in clip]) for clip in clips])


def test_frames_to_uint8_matches_video_processor():
    frames = torch.rand(2, 3, 4, 6, 10, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    frames[0, :, 0, 0, :3] = torch.tensor([-1.0, 0.0, 1.0])
    want = postprocessed(frames)
    got = vae_lib.frames_to_uint8(jnp.asarray(frames.numpy()))
    assert got.dtype == jnp.uint8 and got.shape == (2, 4, 6, 10, 3)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_chunk_decoder_is_the_pipelines_decode_step(wan21):
    """Normalised latents of one chunk -> uint8 frames, as HeliosPipeline decodes and postprocesses."""
    cfg = wan21.cfg
    mean = torch.tensor(cfg.latents_mean).view(1, Z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, Z, 1, 1, 1)
    normalised = latents(2, seed=12)
    want_float = reference_decode(wan21.ref, normalised / inv_std + mean)
    want = postprocessed(torch.from_numpy(want_float))
    got = np.asarray(vae_lib.chunk_decoder(cfg)(wan21.params, jnp.asarray(normalised.numpy())))
    assert got.dtype == np.uint8 and got.shape == want.shape == (2, 5, 24, 40, 3)
    diff = np.abs(got.astype(int) - want.astype(int))
    # Values within 1e-6 of a rounding boundary may land on either side; nothing else may differ.
    assert diff.max() <= 1 and np.mean(diff) < 1e-3


@pytest.mark.parametrize("kernel,strides,padding", [((3, 3, 3), (1, 1, 1), (1, 1, 1)), ((1, 1, 1), (1, 1, 1), (0, 0, 0)),
                                                    ((3, 1, 1), (1, 1, 1), (1, 0, 0)), ((3, 1, 1), (2, 1, 1), (0, 0, 0))])
def test_causal_conv_as_2d_time_taps_equals_the_3d_conv(kernel, strides, padding):
    """The CPU's form of a large causal conv (one 2D conv of the time taps stacked in channels) against the 3D
    conv the parity tests above check against diffusers, for each kernel the VAE uses (3x3x3, the 1x1x1
    shortcut and quant convs, upsample3d's and downsample3d's time convs)."""
    from helios_jax.models.vae_blocks import _conv_3d, _conv_time_taps

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, 6, 5, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*kernel, 3, 4)), jnp.float32)
    pt, ph, pw = padding
    pads = ((2 * pt, 0), (ph, ph), (pw, pw))
    want = _conv_3d(x, w, strides=strides, padding=pads)
    got = _conv_time_taps(x, w, strides=strides, padding=pads)
    assert got.shape == want.shape
    assert rel_err(got, want) <= REL_TOL and max_abs(got, want) <= ABS_TOL
