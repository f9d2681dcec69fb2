"""Bad input to the DiT and its loader: one clear error, raised before any compute."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_transformer import reference_model, save

import helios_jax as hj
from helios_jax.convert import CheckpointError, CheckpointMismatchError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save(reference_model(seed=0), tmp_path_factory.mktemp("dit"))


def _copy(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_missing_shard(saved, tmp_path):
    folder = _copy(saved, tmp_path / "ckpt")
    index = json.load(open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")))
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(folder, shard))
    with pytest.raises(CheckpointError, match=f"missing.*{shard}"):
        hj.load_transformer(folder)


def test_tensor_of_the_wrong_shape(saved, tmp_path):
    folder = _copy(saved, tmp_path / "ckpt")
    index = json.load(open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")))
    key = "blocks.1.attn1.to_k.weight"
    shard = os.path.join(folder, index["weight_map"][key])
    tensors = load_file(shard)
    tensors[key] = np.zeros((32, 31), tensors[key].dtype)
    save_file(tensors, shard)
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped  blocks\.1\.attn1\.to_k\.weight: checkpoint \[32, 31\], model expects \[32, 32\]"):
        hj.load_transformer(folder)


@pytest.mark.parametrize("change,message", [
    ({"history_scale_mode": "per_token"}, "history_scale_mode = 'per_token' is not supported"),
    ({"rope_dim": [8, 8, 8]}, "must add up to attention_head_dim"),
    ({"added_kv_proj_dim": 16}, "added_kv_proj_dim"),
    ({"eps": "1e-6"}, r"eps = '1e-6' \(expected a number\)"),
])
def test_unsupported_config(saved, tmp_path, change, message):
    folder = _copy(saved, tmp_path / "ckpt")
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    json.dump({**config, **change}, open(path, "w"))
    with pytest.raises(hj.ConfigError, match=message):
        hj.load_transformer(folder)


@pytest.mark.parametrize("field,shape,message", [
    ("hidden_states", (1, 4, 2, 5, 6), r"H=5 is not a multiple of patch size 2"),
    ("hidden_states", (1, 3, 2, 4, 6), r"has 3 channels but the config says in_channels=4"),
    ("encoder_hidden_states", (1, 7, 9), r"encoder_hidden_states must be \(B=1, S, text_dim=8\)"),
])
def test_inputs_that_do_not_fit(saved, field, shape, message):
    cfg, params = hj.load_transformer(saved)
    inputs = dict(hidden_states=jnp.zeros((1, 4, 2, 4, 6)), timestep=jnp.ones((1,)),
                  encoder_hidden_states=jnp.zeros((1, 7, 8)))
    inputs[field] = jnp.zeros(shape)
    with pytest.raises(ValueError, match=message):
        hj.HeliosTransformer(cfg).apply({"params": params}, **inputs)


def test_history_without_its_indices(saved):
    cfg, params = hj.load_transformer(saved)
    with pytest.raises(ValueError, match="latents_history_mid and indices_latents_history_mid must be given together"):
        hj.HeliosTransformer(cfg).apply(
            {"params": params}, jnp.zeros((1, 4, 2, 4, 6)), jnp.ones((1,)), jnp.zeros((1, 7, 8)),
            latents_history_mid=jnp.zeros((1, 4, 2, 4, 6)),
        )
