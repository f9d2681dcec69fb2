"""Writing params back as a diffusers folder: ``config.json`` plus sharded safetensors with an index.

The inverse of :func:`helios_jax.convert.load_params`: each flax leaf goes back to its torch key and
layout through the same :class:`KeyMap`, stacked layers are split again, and the folder is what
``save_pretrained`` would write, so diffusers and transformers load it as usual. The folder is staged
under another name and renamed when complete.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from helios_jax.convert.keymap import KeyMap, to_torch_layout
from helios_jax.convert.orbax_io import claim_staging, remove_staging
from helios_jax.convert.strict import Params
from helios_jax.diskspace import check_free, disk_full_as_error, tree_nbytes

DEFAULT_SHARD_BYTES = 5 * 2**30


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str]) -> str:
    """One safetensors file written atomically: a hidden temporary name in the same folder, then a rename
    (a reader never sees half a file; an interrupted write leaves nothing)."""
    from safetensors.numpy import save_file

    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    needed = tree_nbytes(tensors)
    check_free(path, needed)
    temp = os.path.join(folder, f".{name}.partial")
    try:
        with disk_full_as_error(path, needed):
            save_file(dict(tensors), temp, metadata=dict(metadata))
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    return path


def export_safetensors(
    folder: str | os.PathLike,
    params: Params,
    keymap: KeyMap,
    config: Mapping[str, Any],
    *,
    weights_name: str = "diffusion_pytorch_model",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: Any | None = None,
) -> str:
    """Write ``params`` to a new folder; ``dtype`` casts floating tensors (None keeps each leaf's dtype)."""
    from safetensors.numpy import save_file

    folder = os.path.abspath(os.fspath(folder))
    needed = sum(leaf.size * np.dtype(dtype if dtype is not None and np.issubdtype(leaf.dtype, np.floating)
                                      else leaf.dtype).itemsize for leaf in jax.tree.leaves(params))
    check_free(folder, needed)
    staging = claim_staging(folder)
    try:
        shards: list[list[str]] = []
        pending: dict[str, np.ndarray] = {}
        pending_bytes = 0

        def flush() -> None:
            nonlocal pending, pending_bytes
            with disk_full_as_error(folder, needed):
                save_file(pending, os.path.join(staging, f".shard-{len(shards)}"), metadata={"format": "pt"})
            shards.append(sorted(pending))
            pending, pending_bytes = {}, 0

        for path, leaf in traverse_util.flatten_dict(params).items():
            layers = [None] if keymap.layer_count(path) is None else range(leaf.shape[0])
            for layer in layers:
                array = np.asarray(leaf if layer is None else leaf[layer])
                if dtype is not None and np.issubdtype(array.dtype, np.floating):
                    array = array.astype(dtype)
                pending[keymap.to_torch(path, layer)] = np.ascontiguousarray(to_torch_layout(path[-1], array))
                pending_bytes += array.nbytes
                if pending_bytes >= max_shard_bytes:
                    flush()
        if pending or not shards:
            flush()
        _name_shards(staging, shards, weights_name)
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(config), f, indent=2, sort_keys=True)
        os.rename(staging, folder)
    except BaseException:
        remove_staging(staging)
        raise
    return folder


def _name_shards(staging: str, shards: list[list[str]], weights_name: str) -> None:
    """Give the shards their final names; more than one gets numbered names and an index."""
    if len(shards) == 1:
        os.rename(os.path.join(staging, ".shard-0"), os.path.join(staging, f"{weights_name}.safetensors"))
        return
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = f"{weights_name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(os.path.join(staging, f".shard-{i}"), os.path.join(staging, name))
        weight_map.update({key: name for key in keys})
        total += os.path.getsize(os.path.join(staging, name))
    with open(os.path.join(staging, f"{weights_name}.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
