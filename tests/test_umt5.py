"""UMT5 encoder parity with transformers' UMT5EncoderModel, and loading text_encoder/ folders strictly."""

from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import max_abs, rel_err, to_numpy
from safetensors.torch import save_file
from transformers import UMT5EncoderModel
from transformers.models.umt5.modeling_umt5 import UMT5Attention
from umt5_fixtures import umt5_model

import helios_jax as hj
from helios_jax.config import ConfigError, ConfigWarning
from helios_jax.convert import CheckpointMismatchError
from helios_jax.models import umt5

# The text_encoder/config.json of umt5-xxl as diffusers checkpoints of Wan and Helios ship it.
UMT5_XXL_CONFIG = {
    "_name_or_path": "google/umt5-xxl", "architectures": ["UMT5EncoderModel"], "classifier_dropout": 0.0,
    "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
    "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "umt5",
    "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "scalable_attention": True,
    "tie_word_embeddings": False, "tokenizer_class": "T5Tokenizer", "torch_dtype": "bfloat16",
    "transformers_version": "4.48.0.dev0", "use_cache": True, "vocab_size": 256384,
}


def _inputs(vocab: int, length: int, valid: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Batch 2 of random ids, right-padded with 0 after ``valid[b]`` tokens."""
    ids = np.random.RandomState(seed).randint(3, vocab, (2, length))
    mask = (np.arange(length)[None, :] < np.array(valid)[:, None]).astype(np.int64)
    return ids * mask, mask


def _run(cfg, params, ids, mask):
    return jax.jit(lambda p, i, m: hj.UMT5Encoder(cfg).apply({"params": p}, i, m))(params, ids, mask)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 12), (16, 64), (6, 20), (64, 256)])
def test_relative_position_buckets_match_reference(num_buckets, max_distance):
    """Every (query, key) pair of a 600-token sequence lands in the reference's bucket, boundaries included."""
    length = 600
    config = umt5_model(relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance).config
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    want = UMT5Attention(config, has_relative_attention_bias=True)._relative_position_bucket(relative).numpy()
    got = umt5.relative_position_buckets(length, num_buckets, max_distance)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "layers,num_buckets,max_distance,length,valid",
    [(1, 8, 12, 24, (24, 9)), (3, 32, 128, 40, (31, 40)), (2, 6, 7, 33, (1, 20))],
)
def test_encoder_matches_transformers_fp32(tmp_path, layers, num_buckets, max_distance, length, valid):
    """Several layer and bucket counts, batch 2 with padding, weights read back from a sharded save."""
    reference = umt5_model(seed=layers, num_layers=layers, relative_attention_num_buckets=num_buckets,
                           relative_attention_max_distance=max_distance)
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1  # the index path is exercised

    cfg, params = hj.load_text_encoder(tmp_path)
    assert cfg.num_layers == layers and cfg.relative_attention_num_buckets == num_buckets
    ids, mask = _inputs(cfg.vocab_size, length, valid)
    with torch.no_grad():
        want = to_numpy(reference(torch.tensor(ids), torch.tensor(mask)).last_hidden_state)
    got = np.asarray(_run(cfg, params, ids, mask))
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)
    assert max_abs(got, want) <= 1e-5 * np.abs(want).max()


def test_encoder_bf16_matches_transformers_bf16(tmp_path):
    """Loaded in bfloat16 on both sides: the same math up to bf16 rounding (the reference's GELU rounds
    every op in bf16; ours rounds once), no further from float32 than the reference itself."""
    reference = umt5_model(seed=5, num_layers=2)
    reference.save_pretrained(tmp_path)
    ref_bf16 = UMT5EncoderModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids, mask = _inputs(reference.config.vocab_size, 32, (32, 17))
    with torch.no_grad():
        want_fp32 = to_numpy(reference(torch.tensor(ids), torch.tensor(mask)).last_hidden_state)
        want = to_numpy(ref_bf16(torch.tensor(ids), torch.tensor(mask)).last_hidden_state)
    cfg, params = hj.load_text_encoder(tmp_path, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))  # as transformers: no fp32 keeps
    out = _run(cfg, params, ids, mask)
    assert out.dtype == jnp.bfloat16
    got = np.asarray(out, np.float32)
    assert rel_err(got, want) <= 2.5e-2, rel_err(got, want)
    assert rel_err(got, want_fp32) <= 1.5 * rel_err(want, want_fp32) + 1e-3


def test_fp16_keeps_wo_in_fp32_as_transformers(tmp_path):
    """Loaded in float16, exactly the params transformers keeps in float32 (``wo``) stay float32."""
    umt5_model().save_pretrained(tmp_path)
    ref = UMT5EncoderModel.from_pretrained(tmp_path, dtype=torch.float16)
    want = {name: str(p.dtype).removeprefix("torch.") for name, p in ref.named_parameters()}
    cfg, params = hj.load_text_encoder(tmp_path, dtype=jnp.float16)
    keymap = umt5.keymap(cfg)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    got = {}
    for path, leaf in flat:
        names = tuple(p.key for p in path)
        layers = [None] if keymap.layer_count(names) is None else range(leaf.shape[0])
        for layer in layers:
            got[keymap.to_torch(names, layer)] = str(leaf.dtype)
    want["encoder.embed_tokens.weight"] = want.pop("shared.weight")  # one tied tensor, listed once by torch
    assert got == want


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def _write_single_file(folder, model, tensors) -> str:
    os.makedirs(folder)
    model.config.to_json_file(os.path.join(folder, "config.json"))
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    return str(folder)


@pytest.mark.parametrize("layout", ["alias_only", "both_equal", "both_different"])
def test_tied_embedding_layouts_match_transformers(tmp_path, layout):
    """``shared.weight`` / ``encoder.embed_tokens.weight``: stored as either or both, every key used once,
    and the encoder embeds with the table transformers' UMT5EncoderModel uses for that layout."""
    model = umt5_model(seed=2)
    state = _state(model)
    shared = state.pop("shared.weight")
    tensors = {
        "alias_only": {**state, "encoder.embed_tokens.weight": shared},
        "both_equal": {**state, "shared.weight": shared, "encoder.embed_tokens.weight": shared.clone()},
        "both_different": {**state, "shared.weight": shared, "encoder.embed_tokens.weight": shared * 2 + 1},
    }[layout]
    folder = _write_single_file(tmp_path / layout, model, tensors)
    reference = UMT5EncoderModel.from_pretrained(folder).eval()
    ids, mask = _inputs(model.config.vocab_size, 12, (12, 5))
    with torch.no_grad():
        want = to_numpy(reference(torch.tensor(ids), torch.tensor(mask)).last_hidden_state)
    cfg, params = hj.load_text_encoder(folder)
    got = np.asarray(_run(cfg, params, ids, mask))
    assert rel_err(got, want) <= 1e-5


def test_checkpoint_mismatches_are_reported(tmp_path):
    model = umt5_model()
    state = _state(model)
    bad = dict(state)
    bad["encoder.embed_tokens.weight"] = torch.zeros(3, 3)  # a tied copy of the wrong shape
    bad["encoder.block.0.layer.0.SelfAttention.extra.weight"] = torch.zeros(2)
    del bad["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    folder = _write_single_file(tmp_path / "bad", model, bad)
    with pytest.raises(CheckpointMismatchError) as err:
        hj.load_text_encoder(folder)
    message = str(err.value)
    assert "missing     encoder.block.1.layer.1.DenseReluDense.wi_1.weight" in message
    assert "unexpected  encoder.block.0.layer.0.SelfAttention.extra.weight" in message
    assert "mis-shaped  encoder.embed_tokens.weight" in message

    del state["shared.weight"]
    folder = _write_single_file(tmp_path / "no_embedding", model, state)
    with pytest.raises(CheckpointMismatchError, match="missing     encoder.embed_tokens.weight"):
        hj.load_text_encoder(folder)


def test_umt5_xxl_config_and_param_count():
    """The real umt5-xxl config.json reads as is and gives the 5.7B-parameter encoder (shapes only)."""
    cfg = hj.UMT5Config.from_pretrained(UMT5_XXL_CONFIG)
    shapes = umt5.param_shapes(cfg)
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    d, ff, layers, vocab = 4096, 10240, 24, 256384
    per_layer = 4 * d * d + 32 * 64 + 2 * d + 3 * d * ff
    assert count == vocab * d + layers * per_layer + d
    assert shapes["encoder"]["block"]["layer_0"]["SelfAttention"]["relative_attention_bias"]["embedding"].shape == (24, 32, 64)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"feed_forward_proj": "gelu"}, "feed_forward_proj = 'gelu' is not supported"),
        ({"model_type": "mt5"}, "model_type = 'mt5' is not supported"),
        ({"feed_forward_proj": "gated-silu"}, "gated tanh-GELU"),
        ({"is_decoder": True}, "is_decoder"),
        ({"relative_attention_max_distance": 8}, "relative_attention_max_distance"),
        ({"num_heads": 0}, "num_heads"),
        ({"d_model": "4096"}, r"d_model = '4096' \(expected an integer\)"),
    ],
)
def test_config_errors_name_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        hj.UMT5Config.from_pretrained({**UMT5_XXL_CONFIG, **change})


def test_saved_transformers_config_reads(tmp_path):
    """A config.json as transformers 5 writes it has no key this port does not know."""
    umt5_model().config.to_json_file(tmp_path / "config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        cfg = hj.UMT5Config.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["d_model"] == cfg.d_model == 32


def test_input_shape_errors():
    """Raised while tracing, before any compute (shapes only here)."""
    cfg = hj.UMT5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=4, relative_attention_max_distance=4)
    variables = {"params": umt5.param_shapes(cfg)}
    apply = hj.UMT5Encoder(cfg).apply
    with pytest.raises(ValueError, match="attention_mask"):
        jax.eval_shape(apply, variables, jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="input_ids must be"):
        jax.eval_shape(apply, variables, jnp.zeros((5,), jnp.int32))
