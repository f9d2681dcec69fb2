"""Stage 1-init starts from Wan 2.1: a diffusers ``WanTransformer3DModel`` folder loads as the Helios DiT.

The expected model is built in torch: diffusers' ``HeliosTransformer3DModel`` with the stage-1 flags, given
the Wan state dict (its ``scale_shift_table`` under Helios' ``norm_out.``) and the history patch convs of
the official ``initialize_weight_from_another_conv3d`` (einops' ``(t tk) (h hk) (w wk)`` repeat is torch's
``repeat_interleave``) computed from the Wan file's patch embedding. About 15 s.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import HeliosTransformer3DModel, WanTransformer3DModel
from flax import traverse_util
from reference import randomize
from test_transformer import assert_close, make_inputs, run_ours, run_reference

import helios_jax as hj
from helios_jax.config import ConfigError
from helios_jax.loading import load_transformer_init, transformer_component

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
           text_dim=8, freq_dim=16, ffn_dim=24, num_layers=2)  # test_transformer's TINY, as a Wan model
STAGE1 = dict(has_multi_term_memory_patch=True, zero_history_timestep=True, guidance_cross_attn=True)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    model = randomize(WanTransformer3DModel(**WAN), seed=3)
    folder = str(tmp_path_factory.mktemp("wan") / "transformer")
    model.save_pretrained(folder, max_shard_size="30KB")
    return folder, model


def official_patches(weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """``initialize_weight_from_another_conv3d`` of the official transformer_helios.py, torch layout."""
    weight = weight[:, :16]

    def repeat(w: torch.Tensor, k: int) -> torch.Tensor:
        return w.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3).repeat_interleave(k, dim=4)

    return {"patch_short.weight": weight.clone(), "patch_short.bias": bias.clone(),
            "patch_mid.weight": repeat(weight, 2) / 8.0, "patch_mid.bias": bias.clone(),
            "patch_long.weight": repeat(weight, 4) / 64.0, "patch_long.bias": bias.clone()}


@pytest.fixture(scope="module")
def expected(wan_folder, tmp_path_factory):
    """The Helios model the Wan folder must load as, built in torch and saved as a Helios folder."""
    _, wan = wan_folder
    state = dict(wan.state_dict())
    state["norm_out.scale_shift_table"] = state.pop("scale_shift_table")
    state.update(official_patches(state["patch_embedding.weight"], state["patch_embedding.bias"]))
    helios = HeliosTransformer3DModel(**WAN, rope_dim=(8, 4, 4), **STAGE1).eval()
    helios.load_state_dict(state, strict=True)
    folder = str(tmp_path_factory.mktemp("helios"))
    helios.save_pretrained(folder)
    return folder, helios


def test_wan_config_becomes_the_stage1_helios_config(wan_folder):
    cfg, _ = load_transformer_init(wan_folder[0])
    assert (cfg.has_multi_term_memory_patch, cfg.zero_history_timestep, cfg.guidance_cross_attn) == (True,) * 3
    assert cfg.rope_dim == (8, 4, 4)  # WanRotaryPosEmbed: h = w = 2 * (16 // 6), t = 16 - 8
    assert (cfg.num_layers, cfg.inner_dim, cfg.in_channels, cfg.text_dim) == (2, 32, 4, 8)


def test_every_weight_equals_the_wan_file_or_the_official_patch_init(wan_folder, expected):
    """Shared weights bit-equal to the Wan file's; patch_short/mid/long to the official formula on them."""
    _, params = load_transformer_init(wan_folder[0])
    _, reference = hj.load_transformer(expected[0])
    ours, theirs = traverse_util.flatten_dict(params), traverse_util.flatten_dict(reference)
    assert sorted(ours) == sorted(theirs)
    for path in theirs:
        np.testing.assert_array_equal(np.asarray(ours[path]), np.asarray(theirs[path]), err_msg=str(path))


def test_the_loaded_model_runs_the_helios_forward_as_the_reference(wan_folder, expected):
    cfg, params = load_transformer_init(wan_folder[0])
    inputs = make_inputs(4, batch=1, frames=2, noisy_hw=(4, 6), history_hw=(8, 8))
    assert_close(run_ours(cfg, params, inputs), run_reference(expected[1], inputs))


def test_bf16_load_keeps_the_fp32_modules_and_casts_the_patches(wan_folder):
    _, params = load_transformer_init(wan_folder[0], jax.numpy.bfloat16)
    assert params["patch_long"]["kernel"].dtype == jax.numpy.bfloat16
    assert params["norm_out"]["scale_shift_table"].dtype == jax.numpy.float32


def test_a_helios_folder_loads_as_load_transformer_does(expected):
    assert transformer_component(expected[0]) is hj.loading.COMPONENTS["transformer"]
    cfg, params = load_transformer_init(expected[0])
    assert cfg == hj.load_transformer(expected[0])[0]


def test_an_image_to_video_wan_is_one_clear_error(wan_folder, tmp_path):
    with open(os.path.join(wan_folder[0], "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "image_dim": 1280}))
    with pytest.raises(ConfigError, match="image_dim = 1280 is not supported.*T2V"):
        load_transformer_init(tmp_path)
