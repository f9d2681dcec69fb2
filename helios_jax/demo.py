"""The embedded default: a tiny random-weight Helios checkpoint, built deterministically without torch.

``helios-jax generate`` with no ``--checkpoint`` writes this folder once into the user cache (in the
diffusers layout, with a distilled pyramid pipeline's ``model_index.json``) and generates from it, so
``make demo`` produces a real mp4 on a fresh CPU machine with no download. The weights are random
numbers: the video is structured noise and says nothing about Helios' quality; it shows the whole
system running (text encoder, chunked pyramid sampling with memory, VAE decode, mp4 writing).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from flax import traverse_util

from helios_jax.compilation import default_cache_dir
from helios_jax.config import TransformerConfig, UMT5Config, VAEConfig
from helios_jax.convert import KeyMap, export_safetensors
from helios_jax.loading import COMPONENTS

VERSION = 1  # bump when the recipe changes, so a stale cached checkpoint is rebuilt
SEED = 0
HEIGHT, WIDTH = 128, 192  # the embedded model's default size (a multiple of 64 for the 3-stage pyramid)

TRANSFORMER = TransformerConfig(
    num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=64, freq_dim=64,
    ffn_dim=256, num_layers=4, rope_dim=(12, 10, 10), is_amplify_history=True,
)
VAE = VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
WORDS = ("the", "a", "of", "and", "in", "on", "with", "train", "window", "fields", "trees", "mountains", "sky",
         "city", "river", "light", "moving", "camera", "scenery", "speeding", "green", "distant", "fast", "view")
SCHEDULER = {
    "_class_name": "HeliosDMDScheduler", "num_train_timesteps": 1000, "shift": 1.0, "stages": 3,
    "stage_range": [0, 1 / 3, 2 / 3, 1], "gamma": 1 / 3, "prediction_type": "flow_prediction",
    "use_flow_sigmas": True, "use_dynamic_shifting": False, "time_shift_type": "linear",
}
MODEL_INDEX = {
    "_class_name": "HeliosPyramidPipeline", "_diffusers_version": "0.42.1", "is_cfg_zero_star": False,
    "is_distilled": True, "scheduler": ["diffusers", "HeliosDMDScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "HeliosTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
}


def random_params(shapes: Any, keymap: KeyMap, rng: np.random.Generator) -> dict:
    """Random float32 params for a shape tree: kernels scaled by 1/sqrt(fan-in), norm scales at one,
    biases at zero, everything else unit normal scaled by its last axis. Fast and deterministic."""
    out = {}
    for path, spec in traverse_util.flatten_dict(shapes).items():
        shape, leaf = tuple(spec.shape), path[-1]
        per_layer = shape[1:] if keymap.layer_count(path) is not None else shape
        if leaf == "bias":
            value = np.zeros(shape, np.float32)
        elif leaf in ("scale", "gamma", "history_key_scale"):
            value = np.ones(shape, np.float32)
        else:
            fan_in = math.prod(per_layer[:-1]) if leaf == "kernel" else (1 if leaf == "embedding" else per_layer[-1])
            value = (rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))).astype(np.float32)
        out[path] = value
    return traverse_util.unflatten_dict(out)


def word_pieces(words: tuple[str, ...]) -> list[tuple[str, float]]:
    """A Unigram vocabulary in which each of ``words`` is one token (scored above spelling it out), every other
    word spelt in letters, digits and punctuation: a tokenizer small enough for a tiny text encoder."""
    return ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
            + [(c, -4.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
            + [(f"▁{w}", -1.0) for w in words])


TEXT_ENCODER = UMT5Config(vocab_size=len(word_pieces(WORDS)), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)


def write_tokenizer(folder: str, pieces: list[tuple[str, float]], model_max_length: int = 512) -> None:
    """A T5-style Unigram tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) over ``pieces``;
    ``model_max_length`` is the text length the pipelines use by default (``PromptEncoder.max_sequence_length``)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>")])
    os.makedirs(folder)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    _write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "model_max_length": model_max_length,
    })


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)


def write_checkpoint(folder: str | os.PathLike, components: dict[str, tuple[Any, dict]], *,
                     pieces: list[tuple[str, float]], scheduler: dict, model_index: dict,
                     copies: dict[str, str] | None = None, text_tokens: int = 512) -> str:
    """Write a diffusers-layout pipeline folder to a new ``folder`` (staged, then renamed); returns its path.
    ``components`` maps a component name to its (config, float32 params); ``copies`` maps a component name to
    an existing component folder copied as it is (a trained VAE); ``text_tokens`` is the tokenizer's
    ``model_max_length``.

    The staging folder is private to this call, so two processes building the same folder at once (two
    ``make demo`` runs, or test workers) never write into each other's files: the first rename wins, and the
    other's identical build is dropped."""
    folder = os.path.abspath(os.fspath(folder))
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".partial-", dir=os.path.dirname(folder))
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would make the final folder private
    try:
        for name, (config, params) in components.items():
            component = COMPONENTS[name]
            export_safetensors(os.path.join(staging, name), params, component.module.keymap(config),
                               component.config_json(config), weights_name=component.weights_name)
        for name, source in (copies or {}).items():
            shutil.copytree(source, os.path.join(staging, name))
        write_tokenizer(os.path.join(staging, "tokenizer"), pieces, text_tokens)
        os.makedirs(os.path.join(staging, "scheduler"))
        _write_json(os.path.join(staging, "scheduler", "scheduler_config.json"), scheduler)
        _write_json(os.path.join(staging, "model_index.json"), model_index)
        try:
            os.rename(staging, folder)
        except OSError:
            if not os.path.isdir(folder):
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process finished the same build first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def build_demo_checkpoint(folder: str | os.PathLike, *, transformer: TransformerConfig = TRANSFORMER,
                          scheduler: dict = SCHEDULER, model_index: dict = MODEL_INDEX) -> str:
    """Write the embedded checkpoint to a new ``folder``; returns its path. ``transformer``, ``scheduler`` and
    ``model_index`` replace the embedded ones (tests build variants)."""
    rng = np.random.default_rng(SEED)
    components = {}
    for name, config in (("transformer", transformer), ("vae", VAE), ("text_encoder", TEXT_ENCODER)):
        module = COMPONENTS[name].module
        components[name] = (config, random_params(module.param_shapes(config), module.keymap(config), rng))
    return write_checkpoint(folder, components, pieces=word_pieces(WORDS), scheduler=scheduler,
                            model_index=model_index)


def demo_checkpoint(cache_dir: str | None = None) -> str:
    """The embedded checkpoint's folder in the user cache, built on first use."""
    folder = os.path.join(cache_dir or os.path.dirname(default_cache_dir()), f"demo-checkpoint-v{VERSION}")
    if not os.path.isdir(folder):
        build_demo_checkpoint(folder)
    return folder
