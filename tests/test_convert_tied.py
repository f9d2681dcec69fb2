"""The strict converter's tied keys (``KeyMap.tied``): one tensor stored under either name or both."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from helios_jax.convert import CheckpointMismatchError, KeyMap, load_params

SHAPES = {
    "enc": {"emb": {"embedding": jax.ShapeDtypeStruct((4, 2), np.float32)}},
    "head": {"kernel": jax.ShapeDtypeStruct((2, 3), np.float32)},
}
KEYMAP = KeyMap(tied=(("enc.emb.weight", "shared.weight"),))
TABLE = np.arange(8, dtype=np.float32).reshape(4, 2)
HEAD = np.ones((3, 2), np.float32)  # torch layout (out, in)


@pytest.mark.parametrize(
    "stored",
    [
        {"enc.emb.weight": TABLE},  # the key only
        {"shared.weight": TABLE},  # the alias only: it fills the key's param
        {"enc.emb.weight": TABLE, "shared.weight": TABLE * 0 - 1},  # both: the key wins, the alias is checked
    ],
)
def test_tied_key_fills_its_param_once(stored):
    params = load_params({**stored, "head.weight": HEAD}, SHAPES, KEYMAP)
    np.testing.assert_array_equal(params["enc"]["emb"]["embedding"], TABLE)
    np.testing.assert_array_equal(params["head"]["kernel"], HEAD.T)


def test_tied_copy_of_another_shape_is_an_error():
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped  shared.weight: checkpoint \[2, 4\]"):
        load_params({"enc.emb.weight": TABLE, "shared.weight": TABLE.T, "head.weight": HEAD}, SHAPES, KEYMAP)


def test_neither_name_stored_reports_the_key_missing():
    with pytest.raises(CheckpointMismatchError, match="missing     enc.emb.weight"):
        load_params({"head.weight": HEAD}, SHAPES, KEYMAP)


def test_without_the_tie_the_alias_is_unexpected():
    with pytest.raises(CheckpointMismatchError, match="unexpected  shared.weight"):
        load_params({"enc.emb.weight": TABLE, "shared.weight": TABLE, "head.weight": HEAD}, SHAPES, KeyMap())
