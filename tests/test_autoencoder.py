"""``helios_jax.training.autoencoder`` (``helios-jax train-vae``): the VAE objective against torch autograd
through diffusers' ``AutoencoderKLWan`` on the same weights, input and posterior noise; the KL against its
closed form; the command end to end on a few tiny clips (written folder, resume, bad input)."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from reference import max_abs, randomize, rel_err, to_numpy
from training_fixtures import moving_square_videos

from helios_jax import cli
from helios_jax.config import VAEConfig, read_config
from helios_jax.convert import load_params
from helios_jax.demo import VAE
from helios_jax.loading import load_vae
from helios_jax.models import vae as vae_lib
from helios_jax.training import autoencoder, trainer
from helios_jax.video import write_mp4

# fp32: the loss to 1e-5 relative; gradients, sums over every pixel of two differently ordered computations
# (one pass over the clip here, the frame loop with its caches there), to 1e-4 relative L2.
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
BETA = 5.0  # large enough that the KL's gradient is a visible part of the total in the comparison
PIXELS = 16


def test_kl_is_the_closed_form():
    """KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - log s^2) / 2 per element, summed per sample."""
    mean = jnp.array([[1.0, 0.0], [0.0, -2.0]]).reshape(2, 2, 1, 1, 1)
    logvar = jnp.array([[0.0, math.log(2.0)], [0.0, math.log(0.5)]]).reshape(2, 2, 1, 1, 1)
    kl = autoencoder.kl_divergence(vae_lib.Posterior(mean, logvar))
    expected = [0.5 * 1.0 + 0.5 * (2.0 - 1.0 - math.log(2.0)), 0.0 + 0.5 * (4.0 + 0.5 - 1.0 - math.log(0.5))]
    np.testing.assert_allclose(np.asarray(kl), expected, rtol=1e-6)


def torch_loss(ref: AutoencoderKLWan, video: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The documented objective written on diffusers' own encode, posterior and decode."""
    posterior = ref.encode(video).latent_dist
    frames = ref.decode(posterior.mean + posterior.std * noise).sample
    assert frames.abs().max() < 1  # the reference clamps its output; ours is unclamped for training: equal here
    error = frames - video
    kl = 0.5 * torch.sum(posterior.mean**2 + posterior.var - 1.0 - posterior.logvar, dim=(1, 2, 3, 4))
    return error.abs().mean() + (error**2).mean() + BETA * kl.mean() / video[0].numel()


def test_loss_and_gradients_match_torch_autograd():
    ref = randomize(AutoencoderKLWan(base_dim=VAE.base_dim, z_dim=VAE.z_dim, dim_mult=list(VAE.dim_mult),
                                     num_res_blocks=VAE.num_res_blocks), seed=3, scale=0.15)
    cfg = read_config(VAEConfig, dict(ref.config))
    params = load_params({k: v.numpy() for k, v in ref.state_dict().items()}, vae_lib.param_shapes(cfg),
                         vae_lib.keymap(cfg))
    video = np.random.default_rng(0).uniform(-0.9, 0.9, (2, 3, 5, PIXELS, PIXELS)).astype(np.float32)
    key = jax.random.key(7)
    latent_shape = (2, cfg.z_dim, 2, PIXELS // 8, PIXELS // 8)
    noise = np.array(jax.random.normal(key, latent_shape, jnp.float32))  # the draw vae_loss documents

    loss_fn = trainer.bind(autoencoder.vae_loss, autoencoder.Objective(cfg, BETA))
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, {}, {"video": video}, key)
    ref_loss = torch_loss(ref, torch.from_numpy(video), torch.from_numpy(noise))
    ref_loss.backward()

    assert abs(float(loss) - ref_loss.item()) <= LOSS_TOL * ref_loss.item(), (float(loss), ref_loss.item())
    assert float(metrics["kl"]) * BETA > 1e-3 * float(loss)  # the KL term is in play
    named = dict(ref.named_parameters())
    for torch_name, path in (("encoder.conv_in.weight", ("encoder", "conv_in", "kernel")),
                             ("quant_conv.weight", ("quant_conv", "kernel")),
                             ("decoder.mid_block.resnets.0.conv1.weight", ("decoder", "mid_block", "resnets_0",
                                                                           "conv1", "kernel")),
                             ("decoder.conv_out.weight", ("decoder", "conv_out", "kernel")),
                             ("decoder.conv_out.bias", ("decoder", "conv_out", "bias"))):
        want = to_numpy(named[torch_name].grad)
        if want.ndim == 5:
            want = want.transpose(2, 3, 4, 1, 0)  # (out, in, t, h, w) -> (t, h, w, in, out)
        got = grads
        for part in path:
            got = got[part]
        rel = rel_err(got, want)
        assert rel <= GRAD_TOL, (torch_name, rel, max_abs(got, want))


def write_world(folder: str, clips: int = 3, frames: int = 9) -> str:
    """A metadata JSON of ``clips`` tiny mp4s (a moving square on a plain background)."""
    os.makedirs(folder, exist_ok=True)
    videos = moving_square_videos(clips, 1, seed=1, pixels=PIXELS)[:, 0, :, :frames]  # (clips, 3, frames, H, W)
    entries = []
    for i, video in enumerate(videos):
        write_mp4(os.path.join(folder, f"clip{i}.mp4"),
                  np.round((video.transpose(1, 2, 3, 0) + 1) * 127.5).astype(np.uint8))
        entries.append({"path": f"clip{i}.mp4", "cut": [0, frames], "crop": [0, PIXELS, 0, PIXELS], "cap": ["a square"]})
    path = os.path.join(folder, "meta.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f)
    return path


# The end-to-end tests train a two-level VAE (2x compression in time and space), given as --config: its step
# compiles in about half the nano VAE's time; the parity test above runs the nano VAE itself.
TINY = dict(base_dim=4, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=2, scale_factor_spatial=2)


def train_args(folder: str, steps: int) -> list[str]:
    config = os.path.join(folder, "tiny_vae.json")
    if not os.path.exists(config):
        with open(config, "w", encoding="utf-8") as f:
            json.dump(TINY, f)
    return ["train-vae", os.path.join(folder, "world", "meta.json"), "--output", os.path.join(folder, "run"),
            "--config", config, "--steps", str(steps), "--batch", "2", "--frames", "5", "--height", str(PIXELS),
            "--width", str(PIXELS), "--checkpointing_steps", "1"]


def test_train_vae_writes_a_vae_folder_and_resumes(tmp_path, capsys):
    write_world(str(tmp_path / "world"))
    output = str(tmp_path / "run")
    assert cli.main(train_args(str(tmp_path), 2)) == 0
    assert capsys.readouterr().out.strip() == f"wrote {os.path.join(output, 'vae')}"
    cfg, params = load_vae(os.path.join(output, "vae"))
    assert (cfg.base_dim, cfg.z_dim, cfg.dim_mult) == (TINY["base_dim"], TINY["z_dim"], tuple(TINY["dim_mult"]))
    for name in ("latents_mean", "latents_std"):
        values = np.asarray(getattr(cfg, name))
        assert values.shape == (cfg.z_dim,) and np.all(np.isfinite(values)), (name, values)
        assert not np.allclose(values, TINY[name], atol=1e-4), name
    assert np.all(np.asarray(cfg.latents_std) > 0)
    ref = AutoencoderKLWan.from_pretrained(os.path.join(output, "vae"))  # and diffusers reads it as written
    assert np.allclose(ref.config.latents_std, cfg.latents_std)
    np.testing.assert_array_equal(to_numpy(ref.state_dict()["decoder.conv_out.weight"]).transpose(2, 3, 4, 1, 0),
                                  params["decoder"]["conv_out"]["kernel"])
    first = trainer.read_metrics(output)
    assert [r["step"] for r in first] == [1, 2] and all(np.isfinite(r["loss"]) for r in first)
    assert sorted(n for n in os.listdir(output) if n.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]

    # A rerun resumes from checkpoint-2, the last step: nothing more to train (no step, no line, no checkpoint),
    # and the VAE written again from the restored state is the one the first run wrote. (Training on after a
    # resume is trainer.train's, tested in test_trainer.py; a resumed step would compile again here.)
    assert cli.main(train_args(str(tmp_path), 2)) == 0
    assert trainer.read_metrics(output) == first
    cfg_again, params_again = load_vae(os.path.join(output, "vae"))
    assert cfg_again == cfg
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_again), jax.tree.leaves(params)))
    assert not [n for n in os.listdir(output) if ".new-" in n or ".old-" in n]

    # --decoder_only fine-tunes that VAE's decoder: the encoder (so every latent) and its statistics stay exactly.
    tuned = str(tmp_path / "decoder")
    args = train_args(str(tmp_path), 1)
    args[args.index("--output") + 1], args[args.index("--config") + 1] = tuned, os.path.join(output, "vae")
    assert cli.main([*args, "--decoder_only"]) == 0
    cfg_tuned, params_tuned = load_vae(os.path.join(tuned, "vae"))
    assert cfg_tuned == cfg
    for name in ("encoder", "quant_conv"):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_tuned[name]), jax.tree.leaves(params[name])))
    assert not np.array_equal(params_tuned["decoder"]["conv_out"]["kernel"], params["decoder"]["conv_out"]["kernel"])


@pytest.mark.parametrize("case", ["not json", "missing video", "bad frames"])
def test_bad_input_is_one_error_and_writes_nothing(tmp_path, capsys, case):
    meta, output = write_world(str(tmp_path / "world"), clips=1), str(tmp_path / "run")
    args = train_args(str(tmp_path), 1)
    if case == "not json":
        with open(meta, "w", encoding="utf-8") as f:
            f.write("[{")
    elif case == "missing video":
        os.remove(os.path.join(os.path.dirname(meta), "clip0.mp4"))
    else:
        args[args.index("--frames") + 1] = "8"
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("helios-jax train-vae: error: ") and "Traceback" not in err, err
    assert not os.path.exists(output)
