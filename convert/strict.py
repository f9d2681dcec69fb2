"""Strict conversion of a reference state dict into a flax params tree.

Strict both ways: every checkpoint key is used exactly once (only the reference's own ignore list
is skipped) and every parameter is filled, with the shape it must have. All of that is checked from
the file headers, and any disagreement is one :class:`CheckpointMismatchError` listing every missing,
unexpected and mis-shaped key, before a single tensor is read.

Memory: tensors are read one at a time and written straight into device arrays; a stacked leaf (a
weight of all scanned layers) is allocated once on the device and each layer is written into it in
place (a donated ``dynamic_update_slice``). Peak host memory is therefore the converted weights plus
one source tensor on a CPU backend, and one tensor on an accelerator.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from helios_jax.convert.keymap import KeyMap, Path, flax_shape, resolve_leaf, to_flax_layout
from helios_jax.convert.sources import CheckpointError, TensorSource, open_source
from helios_jax.progress import Progress

Params = dict[str, Any]


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not match the model's parameters."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[tuple[str, tuple[int, ...]]],
        misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ):
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
        lines = [
            f"the checkpoint does not match the model: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped key(s)"
        ]
        lines += [f"  missing     {key}" for key in missing]
        lines += [f"  unexpected  {key} {list(shape)}" for key, shape in unexpected]
        lines += [
            f"  mis-shaped  {key}: checkpoint {list(got)}, model expects {list(want)} (torch layout)"
            for key, got, want in misshaped
        ]
        lines.append("check that config.json belongs to these weights and that no shard is from another model")
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which checkpoint key fills which slot: ``{flax leaf path: [(layer or None, key), ...]}``."""

    slots: Mapping[Path, list[tuple[int | None, str]]]

    @property
    def num_tensors(self) -> int:
        return sum(len(v) for v in self.slots.values())


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch-layout shape of a flax leaf shape (for error messages in the reference's terms)."""
    if leaf == "kernel" and len(shape) >= 2:
        return (shape[-1], shape[-2], *shape[:-2])
    return tuple(shape)


def plan_conversion(source: TensorSource, target: Params, keymap: KeyMap) -> Plan:
    """Match every checkpoint key to one parameter slot, or raise with the complete list of problems."""
    flat = traverse_util.flatten_dict(target)
    leaves_of: dict[Path, set[str]] = collections.defaultdict(set)
    for path in flat:
        leaves_of[path[:-1]].add(path[-1])

    slots: dict[Path, list[tuple[int | None, str]]] = collections.defaultdict(list)
    taken: dict[tuple[Path, int | None], str] = {}
    unexpected, misshaped = [], []
    reported: set[tuple[Path, int | None]] = set()  # mis-shaped slots: reported once, not also as missing
    stored = set(source.keys())
    tied_to = {alias: key for key, alias in keymap.tied}
    for key in source.keys():
        if keymap.ignored(key):
            continue
        shape = tuple(source.shape(key))
        name = tied_to.get(key, key)  # the key whose param this tensor fills
        if name != key and name in stored:
            # The tied partner is stored too and fills the param; this copy must at least agree in shape.
            if shape != tuple(source.shape(name)):
                misshaped.append((key, shape, tuple(source.shape(name))))
            continue
        raw_path, layer = keymap.to_flax(name)
        leaf = resolve_leaf(leaves_of.get(raw_path[:-1], set()), raw_path[-1])
        path = raw_path[:-1] + (leaf,) if leaf else None
        count = keymap.layer_count(path) if path else None
        if path is None or path not in flat or (count is None) != (layer is None) or (
            layer is not None and layer >= count
        ):
            unexpected.append((key, shape))
            continue
        if (path, layer) in taken:
            unexpected.append((key, shape))  # a second tensor for a slot another key already fills
            continue
        want = flat[path].shape[1:] if layer is not None else flat[path].shape
        if flax_shape(leaf, shape) != tuple(want):
            misshaped.append((key, shape, _torch_shape(leaf, tuple(want))))
            reported.add((path, layer))
            continue
        taken[(path, layer)] = key
        slots[path].append((layer, key))

    missing = []
    for path, spec in flat.items():
        count = keymap.layer_count(path)
        if count is not None and spec.shape[:1] != (count,):
            raise ValueError(f"model leaf {'/'.join(path)} {spec.shape} should have {count} stacked layers")
        layers = [None] if count is None else list(range(count))
        missing += [keymap.to_torch(path, layer) for layer in layers if (path, layer) not in taken and (path, layer) not in reported]
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(sorted(missing), sorted(unexpected), sorted(misshaped))
    return Plan(dict(slots))


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stack: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, layer, index, 0)


def _host_array(source: TensorSource, key: str, leaf: str, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(to_flax_layout(leaf, source.read(key)), dtype=dtype)


DtypeFor = Callable[[Path, np.dtype], Any]


def dtype_policy(dtype: Any | None, keep_fp32: Callable[[Path], bool] = lambda path: False) -> DtypeFor:
    """The parameter dtype rule: float32 for the leaves the reference keeps in float32, else ``dtype``,
    or the checkpoint's own dtype when ``dtype`` is None. Non-floating tensors keep their dtype, and so do
    8-bit floats (fp8 kernels are codes for their scales: cast alone they would be wrong numbers)."""

    def dtype_for(path: Path, stored: np.dtype) -> np.dtype:
        if not jnp.issubdtype(stored, jnp.floating) or np.dtype(stored).itemsize == 1:
            return np.dtype(stored)
        if keep_fp32(path):
            return np.dtype(np.float32)
        return np.dtype(stored if dtype is None else dtype)

    return dtype_for


def load_params(
    checkpoint: str | os.PathLike | Mapping[str, Any] | TensorSource,
    shapes: Params,
    keymap: KeyMap,
    dtype_for: DtypeFor = dtype_policy(None),
    *,
    desc: str = "loading weights",
    finish: Callable[[Path, jax.Array], dict[Path, jax.Array]] | None = None,
    shardings: Params | None = None,
) -> Params:
    """Convert a checkpoint into a params tree with the shapes of ``shapes``.

    ``shapes`` is a tree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of the model's init);
    ``dtype_for(path, stored dtype)`` chooses each leaf's dtype (see :func:`dtype_policy`);
    ``checkpoint`` is anything :func:`open_source` accepts. ``finish(path, leaf)``, if given, turns each
    complete leaf into the leaves stored in its place (fp8 quantization: a kernel and its scales), so a
    16-bit copy of the whole model never exists at once. ``shardings`` (a tree like ``shapes`` of
    ``jax.sharding.Sharding``) places every leaf split as it is read, so no device ever holds more than its
    part of the model (and one layer in flight): a model larger than one device loads onto a mesh.
    """
    source = open_source(checkpoint)
    plan = plan_conversion(source, shapes, keymap)
    placement = {} if shardings is None else traverse_util.flatten_dict(shardings)
    out: dict[Path, jax.Array] = {}
    with Progress(plan.num_tensors, desc, unit="tensor", lines=4) as bar:
        for path, spec in traverse_util.flatten_dict(shapes).items():
            leaf, entries = path[-1], plan.slots[path]
            dtype, where = dtype_for(path, source.dtype(entries[0][1])), placement.get(path)
            if entries[0][0] is None:
                value = jax.device_put(_host_array(source, entries[0][1], leaf, dtype), where).block_until_ready()
                bar.advance()
            else:
                value = jnp.zeros(spec.shape, dtype, device=where)
                for layer, key in entries:
                    value = _write_layer(value, _host_array(source, key, leaf, dtype), np.int32(layer))
                    value.block_until_ready()  # one host tensor in flight, not a queue of them
                    bar.advance()
            out.update({path: value} if finish is None else finish(path, value))
    return traverse_util.unflatten_dict(out)


def cast_shapes(shapes: Params, dtype_for: DtypeFor) -> Params:
    """A shape tree with each leaf's dtype chosen by ``dtype_for`` (for restoring saved params)."""
    flat = traverse_util.flatten_dict(shapes)
    return traverse_util.unflatten_dict(
        {path: jax.ShapeDtypeStruct(spec.shape, dtype_for(path, np.dtype(spec.dtype))) for path, spec in flat.items()}
    )
