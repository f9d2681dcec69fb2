"""Checkpoint readers: one interface over safetensors folders, single files, pickles and dicts.

A :class:`TensorSource` answers ``keys()``, ``shape(key)`` and ``dtype(key)`` from file headers alone
and reads one tensor at a time with ``read(key)``, so a converter can check a whole checkpoint
before reading any data and never holds more than one source tensor in memory.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Iterable, Mapping, Protocol

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors' numpy reader needs it)
import numpy as np

from helios_jax.config import read_json

_SAFETENSORS_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: missing files, unknown layout, unreadable data."""


class TensorError(CheckpointError):
    """One named tensor that cannot be read (its header entry, its bytes): ``key`` says which, so a report can
    name it."""

    def __init__(self, path: str, key: str, problem: str):
        super().__init__(f"{path}: tensor {key!r} {problem}")
        self.key, self.problem = key, problem


class TensorSource(Protocol):
    """Named tensors with their shapes known before any data is read."""

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> np.dtype: ...

    def read(self, key: str) -> np.ndarray: ...


class DictSource:
    """An in-memory ``{key: array}`` state dict (numpy arrays or anything ``np.asarray`` takes)."""

    def __init__(self, tensors: Mapping[str, object]):
        self._tensors = {k: np.asarray(v) for k, v in tensors.items()}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return self._tensors[key].dtype

    def read(self, key: str) -> np.ndarray:
        return self._tensors[key]


class SafetensorsSource:
    """One or more ``.safetensors`` files; headers are read up front, tensors with plain file reads.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
    shape and byte range, then the data. Reading a tensor with ``readinto`` (rather than through a
    memory map) keeps the file's pages out of this process's resident memory, so converting a
    checkpoint holds one tensor of it at a time, not every page it has touched.
    """

    def __init__(self, files: Iterable[str], weight_map: Mapping[str, str] | None = None):
        self._where: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], np.dtype, int, int]] = {}
        for path in files:
            for key, meta in _read_header(path).items():
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} is stored twice: in {self._where[key]} and {path}")
                self._where[key] = path
                self._meta[key] = meta
        if weight_map is not None:
            _check_weight_map(weight_map, self._where)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> np.dtype:
        return self._meta[key][1]

    def read(self, key: str) -> np.ndarray:
        shape, dtype, start, end = self._meta[key]
        out = np.empty(shape, dtype)
        with open(self._where[key], "rb") as f:
            f.seek(start)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - start:
                raise TensorError(self._where[key], key, "is truncated; the file is incomplete")
        return out


def _read_header(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype, int, int]]:
    """``{key: (shape, dtype, start byte, end byte)}`` of one safetensors file, validated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length <= 0 or 8 + length > size:
            raise CheckpointError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except ValueError as err:
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from err
    base, out = 8 + length, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            name, shape, (begin, end) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise TensorError(path, key, f"has a malformed header entry {info!r}; the file is corrupt") from None
        if name not in _SAFETENSORS_DTYPES:
            raise TensorError(path, key, f"has dtype {name}, which this reader does not handle")
        dtype = _SAFETENSORS_DTYPES[name]
        if end - begin != dtype.itemsize * math.prod(shape) or base + end > size:
            raise TensorError(path, key, "does not fit the file; the file is incomplete or corrupt")
        out[key] = (shape, dtype, base + begin, base + end)
    return out


class PickleSource:
    """PyTorch pickles (``.bin`` / ``.pt``), memory-mapped; the one reader that needs torch."""

    def __init__(self, files: Iterable[str], weight_map: Mapping[str, str] | None = None):
        try:
            import torch
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise CheckpointError(
                "reading pickled .bin/.pt checkpoints needs torch: pip install 'helios-jax[torch]', "
                "or convert the checkpoint to safetensors first"
            ) from err
        self._torch = torch
        self._tensors = {}
        self._where: dict[str, str] = {}
        for path in files:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            for key, value in state.items():
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} is stored twice: in {self._where[key]} and {path}")
                self._tensors[key] = value
                self._where[key] = path
        if weight_map is not None:
            _check_weight_map(weight_map, self._where)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return self._to_numpy_dtype(self._tensors[key].dtype)

    def read(self, key: str) -> np.ndarray:
        tensor = self._tensors[key].detach().contiguous()
        if tensor.dtype == self._torch.bfloat16:
            return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def _to_numpy_dtype(self, dtype) -> np.dtype:
        if dtype == self._torch.bfloat16:
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self._torch.empty((), dtype=dtype).numpy().dtype)


def read_torch_pickle(path: str, allowed_globals: Iterable[type] = ()) -> dict[str, object]:
    """A ``torch.save``d dict with every top-level tensor as a numpy array (bf16 kept as ml_dtypes.bfloat16).

    ``weights_only=True`` loading, with ``allowed_globals`` (e.g. ``PIL.Image.Image`` for the official offload
    files) let through; other values are returned as they are. This is the one reader of pickled data files
    outside the checkpoint sources, and like them it needs torch only when it is called.
    """
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(f"{path}: reading .pt files needs torch: pip install 'helios-jax[torch]'") from err
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad, truncated or unsafe pickle
        raise CheckpointError(f"{path}: not a readable .pt file ({err})") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a pickled dict, got {type(raw).__name__}")

    def numpy(value: object) -> object:
        if not isinstance(value, torch.Tensor):
            return value
        tensor = value.detach().contiguous()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    return {key: numpy(value) for key, value in raw.items()}


def _check_weight_map(weight_map: Mapping[str, str], where: Mapping[str, str]) -> None:
    """The index and the shards must agree key for key."""
    listed, stored = set(weight_map), set(where)
    if listed != stored:
        raise CheckpointError(
            "the shard index and the shards disagree: "
            f"listed but not stored {sorted(listed - stored)[:20]}, stored but not listed {sorted(stored - listed)[:20]}"
        )


def _from_index(index_path: str) -> tuple[list[str], dict[str, str]]:
    folder = os.path.dirname(index_path)
    weight_map = read_json(index_path, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' in the shard index")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise CheckpointError(
            f"{index_path} lists {len(shards)} shard(s) but {len(missing)} are missing from {folder}: {missing}; "
            "download the complete folder"
        )
    return [os.path.join(folder, s) for s in shards], {k: os.path.join(folder, v) for k, v in weight_map.items()}


def open_source(checkpoint: str | os.PathLike | Mapping[str, object] | TensorSource) -> TensorSource:
    """Open a checkpoint for reading: a folder, a single file, a ``{key: array}`` dict, or a source.

    In a folder, a ``*.safetensors.index.json`` (or ``*.bin.index.json``) names the shards; without
    one, the folder must hold exactly one ``.safetensors`` (or one pickle) file.
    """
    if isinstance(checkpoint, Mapping):
        return DictSource(checkpoint)
    if not isinstance(checkpoint, (str, os.PathLike)):
        return checkpoint
    path = os.fspath(checkpoint)
    if os.path.isfile(path):
        if path.endswith(".index.json"):
            files, weight_map = _from_index(path)
            reader = SafetensorsSource if files[0].endswith(".safetensors") else PickleSource
            return reader(files, weight_map)
        if path.endswith(".safetensors"):
            return SafetensorsSource([path])
        if path.endswith(_PICKLE_SUFFIXES):
            return PickleSource([path])
        raise CheckpointError(f"{path}: not a .safetensors, .bin, .pt or .index.json file")
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path!r}: expected a folder or a weights file")
    for pattern, reader in (("*.safetensors.index.json", SafetensorsSource), ("*.bin.index.json", PickleSource)):
        indexes = sorted(glob.glob(os.path.join(path, pattern)))
        if len(indexes) > 1:
            raise CheckpointError(f"{path} holds several shard indexes {indexes}; keep one variant per folder")
        if indexes:
            return reader(*_from_index(indexes[0]))
    for pattern, reader in (("*.safetensors", SafetensorsSource), ("*.bin", PickleSource), ("*.pt", PickleSource)):
        files = sorted(glob.glob(os.path.join(path, pattern)))
        if len(files) > 1:
            raise CheckpointError(
                f"{path} holds {len(files)} {pattern} files but no shard index: {[os.path.basename(f) for f in files]}"
            )
        if files:
            return reader(files)
    raise CheckpointError(f"{path} holds no weights: expected *.safetensors (with an index when sharded)")
