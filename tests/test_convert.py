"""The strict converter on its own: readers, the key rule, error reports, orbax round trips.

The checkpoints here are written by the reference libraries (safetensors, torch) and the expected
values are the written arrays themselves.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from helios_jax.convert import (
    CheckpointError,
    CheckpointMismatchError,
    KeyMap,
    dtype_policy,
    load_params,
    open_source,
    restore_params,
    save_params,
)

KEYMAP = KeyMap(stacked=(("blocks", 3),), ignore=("norm_added_q",), literal=("linear_1",))


def _state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A small torch-layout state dict: linear, conv, norm, list index, stacked layers, a literal."""
    state = {
        "proj.weight": rng.standard_normal((5, 4)),
        "proj.bias": rng.standard_normal(5),
        "conv.weight": rng.standard_normal((6, 4, 1, 2, 2)),
        "embed.linear_1.weight": rng.standard_normal((3, 4)),
    }
    for i in range(3):
        state[f"blocks.{i}.to_out.0.weight"] = rng.standard_normal((4, 4))
        state[f"blocks.{i}.norm.weight"] = rng.standard_normal(4)
        state[f"blocks.{i}.table"] = rng.standard_normal((1, 2, 4))
    return {k: v.astype(np.float32) for k, v in state.items()}


def _shapes(dtype=jnp.float32) -> dict:
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    return {
        "proj": {"kernel": s(4, 5), "bias": s(5)},
        "conv": {"kernel": s(1, 2, 2, 4, 6)},
        "embed": {"linear_1": {"kernel": s(4, 3)}},
        "blocks": {"to_out_0": {"kernel": s(3, 4, 4)}, "norm": {"scale": s(3, 4)}, "table": s(3, 1, 2, 4)},
    }


def _check_equal(params: dict, state: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(params["proj"]["kernel"], state["proj.weight"].T)
    np.testing.assert_array_equal(params["proj"]["bias"], state["proj.bias"])
    np.testing.assert_array_equal(params["conv"]["kernel"], state["conv.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(params["embed"]["linear_1"]["kernel"], state["embed.linear_1.weight"].T)
    for i in range(3):
        np.testing.assert_array_equal(params["blocks"]["to_out_0"]["kernel"][i], state[f"blocks.{i}.to_out.0.weight"].T)
        np.testing.assert_array_equal(params["blocks"]["norm"]["scale"][i], state[f"blocks.{i}.norm.weight"])
        np.testing.assert_array_equal(params["blocks"]["table"][i], state[f"blocks.{i}.table"])


def test_keymap_round_trip_of_every_key():
    for key in _state(np.random.default_rng(0)):
        path, layer = KEYMAP.to_flax(key)
        leaf = {"weight": "kernel"}.get(path[-1], path[-1]) if not key.endswith("norm.weight") else "scale"
        assert KEYMAP.to_torch(path[:-1] + (leaf,), layer) == key


def test_in_memory_dict_loads_with_layouts_and_stacking():
    state = _state(np.random.default_rng(1))
    _check_equal(load_params(state, _shapes(), KEYMAP), state)


@pytest.mark.parametrize("stored", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_sharded_safetensors_in_any_float_dtype(tmp_path, stored):
    state = {k: v.astype(stored) for k, v in _state(np.random.default_rng(2)).items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / name))
    weight_map = {k: name for name, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    params = load_params(tmp_path, _shapes(), KEYMAP)  # dtype None keeps the stored dtype
    assert params["proj"]["kernel"].dtype == np.dtype(stored)
    _check_equal(params, state)
    as_f32 = load_params(tmp_path, _shapes(), KEYMAP, dtype_policy(jnp.float32))
    _check_equal(as_f32, {k: v.astype(np.float32) for k, v in state.items()})


def test_pickled_checkpoint(tmp_path):
    state = _state(np.random.default_rng(3))
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()}, tmp_path / "model.bin")
    params = load_params(tmp_path, _shapes(), KEYMAP)
    _check_equal(params, {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()})


def test_keep_fp32_policy():
    state = _state(np.random.default_rng(4))
    policy = dtype_policy(jnp.bfloat16, keep_fp32=lambda path: "table" in path)
    params = load_params(state, _shapes(), KEYMAP, policy)
    assert params["blocks"]["table"].dtype == jnp.float32
    assert params["proj"]["kernel"].dtype == jnp.bfloat16


def test_one_error_lists_missing_unexpected_and_misshaped():
    state = _state(np.random.default_rng(5))
    del state["blocks.1.norm.weight"]  # missing (one layer of a stack)
    state["proj.weight"] = np.zeros((5, 3), np.float32)  # mis-shaped
    state["blocks.3.table"] = np.zeros((1, 2, 4), np.float32)  # layer past the stack: unexpected
    state["extra.weight"] = np.zeros(2, np.float32)  # unexpected
    state["blocks.0.attn.norm_added_q.weight"] = np.zeros(2, np.float32)  # on the ignore list: fine
    with pytest.raises(CheckpointMismatchError) as info:
        load_params(state, _shapes(), KEYMAP)
    err = info.value
    assert err.missing == ["blocks.1.norm.weight"]
    assert [k for k, _ in err.unexpected] == ["blocks.3.table", "extra.weight"]
    assert err.misshaped == [("proj.weight", (5, 3), (5, 4))]
    message = str(err)
    assert "missing     blocks.1.norm.weight" in message and "[5, 3]" in message and "[5, 4]" in message


def test_missing_shard_is_named_before_reading(tmp_path):
    save_file({"proj.bias": np.zeros(5, np.float32)}, str(tmp_path / "a.safetensors"))
    weight_map = {"proj.bias": "a.safetensors", "proj.weight": "b.safetensors"}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"1 are missing.*b\.safetensors"):
        open_source(tmp_path)


def test_unindexed_shards_and_empty_folders_are_errors(tmp_path):
    with pytest.raises(CheckpointError, match="holds no weights"):
        open_source(tmp_path)
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / name))
    with pytest.raises(CheckpointError, match="no shard index"):
        open_source(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        open_source(tmp_path / "absent")


def test_orbax_round_trip_with_target_dtype(tmp_path):
    state = _state(np.random.default_rng(6))
    params = load_params(state, _shapes(), KEYMAP)
    save_params(tmp_path / "saved", params, config={"num_layers": 3})
    assert sorted(os.listdir(tmp_path)) == ["saved"]  # staged under another name, then renamed
    _check_equal(restore_params(tmp_path / "saved"), state)
    restored = restore_params(tmp_path / "saved", dtype_policy(jnp.bfloat16, keep_fp32=lambda p: "table" in p))
    assert restored["proj"]["kernel"].dtype == jnp.bfloat16 and restored["blocks"]["table"].dtype == jnp.float32
    np.testing.assert_array_equal(restored["proj"]["kernel"], state["proj.weight"].T.astype(ml_dtypes.bfloat16))
    with pytest.raises(FileExistsError):
        save_params(tmp_path / "saved", params)
