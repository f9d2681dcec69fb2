"""The published checkpoints' configs (tests/fixtures/checkpoint-configs, sources in its SOURCES.md) and the
config policy: unknown keys accepted with one ConfigWarning per file, known no-op keys silent, wrong values
and types one ConfigError naming file and key, and every config of a folder read before the first weight.

Runs in a few seconds (no model is built).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
from umt5_fixtures import write_tokenizer

import helios_jax as hj
import helios_jax.convert
from helios_jax import loading
from helios_jax.checkpoint import PipelineError, read_checkpoint_configs
from helios_jax.config import ConfigError, ConfigWarning, read_config
from helios_jax.sampling import (
    DMDTable,
    UniPCTable,
    guidance_mode,
    plan_pyramid_chunk,
    plan_single_stage_chunk,
    read_scheduler_config,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoint-configs")
CHECKPOINTS = ("Helios-Base", "Helios-Mid", "Helios-Distilled")
VARIANTS = os.path.join(FIXTURES, "variants")


def checkpoint(tmp_path, name: str) -> str:
    """A copy of a published checkpoint's configs, with a small tokenizer.json (the real one is umt5-xxl's)."""
    folder = str(tmp_path / name)
    shutil.copytree(os.path.join(FIXTURES, name), folder)
    source = write_tokenizer(str(tmp_path / "_tokenizer"))
    shutil.copy(os.path.join(source, "tokenizer.json"), os.path.join(folder, "tokenizer", "tokenizer.json"))
    return folder


def edit(path: str, **changes) -> None:
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)


def config_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ConfigWarning)]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_published_checkpoints_read_silently(tmp_path, name):
    folder = checkpoint(tmp_path, name)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        configs = read_checkpoint_configs(folder)
    assert config_warnings(record) == []
    assert configs.transformer.num_layers == 40 and configs.transformer.ffn_dim == 13824
    assert configs.text_encoder.d_model == 4096 and configs.text_encoder.vocab_size == 256384
    assert configs.vae.z_dim == 16 and configs.tokenizer.eos_id == 1
    assert configs.tokenizer.model_max_length is None  # transformers' 1e30: the pipelines' 512 holds


def test_the_three_checkpoints_run_as_published(tmp_path):
    """Distilled: pyramid with DMD; Mid: pyramid with UniPC and CFG-Zero*; Base: single-stage UniPC with CFG."""
    latent = (1, 16, 9, 48, 80)
    distilled = read_checkpoint_configs(checkpoint(tmp_path, "Helios-Distilled"))
    assert distilled.spec.pyramid and distilled.spec.is_distilled and distilled.scheduler.scheduler_type == "dmd"
    plan = plan_pyramid_chunk(distilled.scheduler, (2, 2, 2), latent, patch_size=(1, 2, 2), guidance="none")
    assert len(plan.stages) == 3 and all(isinstance(s.steps, DMDTable) for s in plan.stages)

    mid = read_checkpoint_configs(checkpoint(tmp_path, "Helios-Mid"))
    assert mid.spec.pyramid and not mid.spec.is_distilled and mid.spec.is_cfg_zero_star
    assert guidance_mode(5.0, mid.spec.pyramid and mid.spec.is_cfg_zero_star) == "cfg_zero_star"
    plan = plan_pyramid_chunk(mid.scheduler, (2, 2, 2), latent, patch_size=(1, 2, 2), guidance="cfg_zero_star")
    assert len(plan.stages) == 3 and all(isinstance(s.steps, UniPCTable) for s in plan.stages)

    base = read_checkpoint_configs(checkpoint(tmp_path, "Helios-Base"))
    assert not base.spec.pyramid and base.scheduler.stages == 1 and base.scheduler.scheduler_type == "unipc"
    plan = plan_single_stage_chunk(base.scheduler, 4, latent, patch_size=(1, 2, 2), guidance="cfg")
    assert len(plan.stages) == 1 and isinstance(plan.stages[0].steps, UniPCTable)


@pytest.mark.parametrize("file, reader, unknown", [
    ("model_index_base_without_flags.json", None, None),
    ("scheduler_distilled_as_HeliosScheduler.json", read_scheduler_config, None),
    ("scheduler_distilled_without_scheduler_type.json", read_scheduler_config, None),
    ("text_encoder_transformers5.json", hj.UMT5Config.from_pretrained, None),
    ("transformer_training_class_config.json", hj.TransformerConfig.from_pretrained,
     ["gan_cond_map_dim", "gan_hooks", "image_dim", "is_train_restrict_lora", "is_use_gan", "is_use_gan_final",
      "is_use_gan_hooks", "restrict_lora", "restrict_lora_rank", "restrict_self_attn", "rope_max_seq_len"]),
    ("vae_resaved_diffusers_0.37.json", hj.VAEConfig.from_pretrained, None),
])
def test_variants_are_accepted(tmp_path, file, reader, unknown):
    path = os.path.join(VARIANTS, file)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if reader is None:  # a model_index.json: read as the Base checkpoint's
            folder = checkpoint(tmp_path, "Helios-Base")
            shutil.copy(path, os.path.join(folder, "model_index.json"))
            configs = read_checkpoint_configs(folder)
            assert not configs.spec.pyramid and not configs.spec.is_cfg_zero_star
        else:
            reader(path)
    messages = config_warnings(record)
    if unknown is None:
        assert messages == []
    else:
        assert len(messages) == 1 and path in messages[0] and str(unknown) in messages[0]


def test_distilled_scheduler_variants_give_the_same_sampler():
    timesteps = [
        hj.sampling.make_schedule(os.path.join(VARIANTS, f), 2, stage_index=1, mu=0.8).timesteps
        for f in ("scheduler_distilled_as_HeliosScheduler.json", "scheduler_distilled_without_scheduler_type.json")
    ]
    np.testing.assert_array_equal(*timesteps)


@pytest.mark.parametrize("component, file", [
    ("transformer", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
    ("scheduler", "scheduler_config.json"), ("tokenizer", "tokenizer_config.json"), (".", "model_index.json"),
])
def test_unknown_keys_are_one_warning_per_file(tmp_path, component, file):
    folder = checkpoint(tmp_path, "Helios-Distilled")
    path = os.path.normpath(os.path.join(folder, component, file))
    edit(path, zz_new_key=1, aa_other_key="x")
    with pytest.warns(ConfigWarning) as record:
        read_checkpoint_configs(folder)
    messages = config_warnings(record)
    assert len(messages) == 1, messages
    assert path in messages[0] and "['aa_other_key', 'zz_new_key']" in messages[0]


def test_known_no_op_keys_are_silent():
    """transformers 5.24 writes scale_decoder_outputs (decoder only) into every UMT5 config."""
    with open(os.path.join(VARIANTS, "text_encoder_transformers5.json"), encoding="utf-8") as f:
        config = {**json.load(f), "scale_decoder_outputs": True, "return_dict": True, "id2label": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        assert hj.UMT5Config.from_pretrained(config).d_model == 4096


@pytest.mark.parametrize("component, file, change, match", [
    ("scheduler", "scheduler_config.json", {"scheduler_type": "unipc"},
     r"HeliosDMDSchedulerConfig.scheduler_type = 'unipc' is not supported"),
    ("transformer", "config.json", {"history_scale_mode": "per_token"}, r"history_scale_mode = 'per_token'"),
    ("transformer", "config.json", {"eps": "1e-6"}, r"eps = '1e-6' \(expected a number\)"),
    ("transformer", "config.json", {"num_layers": 40.0, "patch_size": [1, 2]},
     r"num_layers = 40.0 \(expected an integer\); patch_size = \(1, 2\) \(expected a list of 3 integers\)"),
    ("transformer", "config.json", {"_class_name": "WanTransformer3DModel"}, r"_class_name 'WanTransformer3DModel'"),
    ("vae", "config.json", {"z_dim": "16"}, r"z_dim = '16' \(expected an integer\)"),
    ("vae", "config.json", {"dim_mult": [1, 2, 4]}, r"temperal_downsample"),
    ("text_encoder", "config.json", {"layer_norm_epsilon": None}, r"layer_norm_epsilon = None"),
    ("text_encoder", "config.json", {"model_type": "mt5", "architectures": ["MT5EncoderModel"]},
     r"model_type 'mt5', architectures \['MT5EncoderModel'\]: this port runs the text encoders"),
    ("text_encoder", "config.json", {"model_type": "t5"}, r"architectures \['UMT5EncoderModel'\]"),
    ("scheduler", "scheduler_config.json", {"stages": "3"}, r"stages = '3' \(expected an integer\)"),
    ("scheduler", "scheduler_config.json", {"_class_name": "UniPCMultistepScheduler"}, r"_class_name"),
    ("tokenizer", "tokenizer_config.json", {"padding_side": "left"}, r"padding_side = 'left'"),
    ("tokenizer", "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer"}, r"tokenizer_class = 'LlamaTokenizer'"),
    ("tokenizer", "tokenizer_config.json", {"model_max_length": 0}, r"model_max_length = 0 must be a positive integer"),
    (".", "model_index.json", {"is_distilled": "yes"}, r"is_distilled = 'yes' must be true or false"),
    (".", "model_index.json", {"is_distilled": False}, r"is_distilled = false with scheduler_type 'dmd'"),
    (".", "model_index.json", {"_class_name": "HeliosPipeline"}, r"HeliosPipeline with a scheduler of 3 stage"),
    (".", "model_index.json", {"vae": ["diffusers", "AutoencoderKL"]}, r"vae = \['diffusers', 'AutoencoderKL'\]"),
])
def test_bad_values_are_one_error_naming_the_file(tmp_path, component, file, change, match):
    folder = checkpoint(tmp_path, "Helios-Distilled")
    path = os.path.normpath(os.path.join(folder, component, file))
    edit(path, **change)
    with pytest.raises((ConfigError, PipelineError), match=match) as info:
        read_checkpoint_configs(folder)
    assert path in str(info.value) or "model_index.json" in str(info.value)


@pytest.mark.parametrize("component, file", [
    ("transformer", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
    ("scheduler", "scheduler_config.json"), ("tokenizer", "tokenizer_config.json"),
    ("tokenizer", "tokenizer.json"), (".", "model_index.json"),
])
def test_unparseable_json_names_the_file_and_position(tmp_path, component, file):
    folder = checkpoint(tmp_path, "Helios-Distilled")
    path = os.path.normpath(os.path.join(folder, component, file))
    with open(path, "w", encoding="utf-8") as f:
        f.write('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(ConfigError, match=r"is not valid JSON: .* at line 3, column 3") as info:
        read_checkpoint_configs(folder)
    assert path in str(info.value)


def test_unparseable_shard_index_names_the_file(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text("{'weight_map': {}}")
    with pytest.raises(ConfigError, match=r"diffusion_pytorch_model.safetensors.index.json is not valid JSON"):
        hj.convert.open_source(str(folder))


def test_a_bad_scheduler_is_reported_before_any_weight(tmp_path, monkeypatch):
    """A folder with a bad scheduler config and a missing transformer shard: the scheduler is reported,
    and no component starts loading (the 14B configs here have no weights at all)."""
    folder = checkpoint(tmp_path, "Helios-Distilled")
    edit(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler_type="unipc")
    index = {"metadata": {}, "weight_map": {"proj_out.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
    with open(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    loads = []
    monkeypatch.setattr(loading.Component, "load", lambda self, *a, **k: loads.append(self.folder))
    with pytest.raises(ConfigError, match=r"scheduler_config.json: HeliosDMDSchedulerConfig.scheduler_type = 'unipc'"):
        hj.HeliosPipeline.from_pretrained(folder, compilation_cache=False)
    assert loads == []

    edit(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler_type="dmd")
    monkeypatch.undo()
    with pytest.raises(hj.convert.CheckpointError, match="holds no weights|missing"):  # good configs: weights next
        hj.HeliosPipeline.from_pretrained(folder, compilation_cache=False)


def test_saved_params_without_config_are_refused(tmp_path):
    folder = tmp_path / "transformer"
    (folder / "params").mkdir(parents=True)  # what save_params writes, less its config.json
    with pytest.raises(ConfigError, match=r"holds saved params but no config.json"):
        hj.load_transformer(str(folder))


def test_dict_configs_follow_the_same_policy():
    with pytest.warns(ConfigWarning, match=r"the given dict: TransformerConfig ignores the key\(s\) \['window_size'\]"):
        cfg = read_config(hj.TransformerConfig, {"window_size": [-1, -1]})
    assert cfg == hj.TransformerConfig()
    with pytest.raises(ConfigError, match=r"rope_theta = '1e4' \(expected a number\)"):
        read_config(hj.TransformerConfig, {"rope_theta": "1e4"})
    with pytest.raises(ConfigError, match=r"cross_attn_norm = 1 \(expected true or false\)"):
        read_config(hj.TransformerConfig, {"cross_attn_norm": 1})
