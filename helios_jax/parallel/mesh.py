"""One device mesh for generation and training, with the named axes ``data``, ``fsdp``, ``context``, ``tensor``.

``data`` splits batches (prompts, and CFG's conditional/unconditional pair), ``fsdp`` splits weights
(gathered layer by layer when used), ``context`` splits the token sequence (attention by Ulysses
all-to-all, see :mod:`helios_jax.parallel.context`), ``tensor`` splits heads and the MLP. Any axis may have
size 1; the sizes must multiply to the device count. Checking happens here, before anything compiles.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES: tuple[str, ...] = ("data", "fsdp", "context", "tensor")


class MeshError(ValueError):
    """A mesh that cannot run: wrong sizes for the devices, or a context size the model cannot split."""


def make_mesh(data: int = 1, fsdp: int = 1, context: int = 1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``jax.sharding.Mesh`` of shape (data, fsdp, context, tensor) over ``devices`` (default ``jax.devices()``).

    The axes are ``Auto`` (sharding propagated by the compiler), the device order is JAX's own
    (``jax.make_mesh``: neighbouring devices, e.g. one NVLink island, land on the innermost axes).
    """
    sizes = {"data": data, "fsdp": fsdp, "context": context, "tensor": tensor}
    bad = {name: size for name, size in sizes.items() if not isinstance(size, (int, np.integer)) or size < 1}
    if bad:
        raise MeshError(f"mesh axis sizes must be positive integers; got {bad}")
    devices = list(jax.devices() if devices is None else devices)
    total = math.prod(sizes.values())
    if total != len(devices):
        raise MeshError(
            f"mesh {format_mesh(sizes)} has {total} devices but {len(devices)} are given "
            f"({devices[0].platform if devices else 'none'}); choose sizes that multiply to {len(devices)}"
        )
    shape = tuple(int(sizes[a]) for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
    """``"context=4,data=2"`` -> ``{"context": 4, "data": 2}`` (the CLI's ``--mesh``)."""
    sizes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in AXES or not value.strip().isdigit():
            raise MeshError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in {AXES}, e.g. context=4,data=2")
        if name in sizes:
            raise MeshError(f"--mesh {text!r} names {name!r} twice")
        sizes[name] = int(value)
    if not sizes:
        raise MeshError(f"--mesh {text!r} names no axis; e.g. context=4,data=2")
    return sizes


def format_mesh(sizes: dict[str, int] | Mesh) -> str:
    shape = dict(sizes.shape) if isinstance(sizes, Mesh) else sizes
    return ",".join(f"{a}={shape.get(a, 1)}" for a in AXES)


def axis_size(mesh: Mesh | jax.sharding.AbstractMesh, name: str) -> int:
    return int(dict(mesh.shape).get(name, 1))


def check_mesh(mesh: Mesh | jax.sharding.AbstractMesh, *, heads: int | None = None, tokens: Iterable[int] = ()) -> None:
    """Whether ``mesh`` can run a DiT of ``heads`` heads on sequences of ``tokens`` lengths.

    ``tensor`` must divide the heads; ``context`` must divide the heads left per tensor shard (Ulysses;
    the tokens are then padded to a multiple of it) or every sequence length (the K/V all-gather
    fallback). Axes the mesh lacks count as size 1. Raised before any compile.
    """
    tensor, context = axis_size(mesh, "tensor"), axis_size(mesh, "context")
    if heads is None:
        return
    if heads % tensor:
        raise MeshError(f"tensor={tensor} does not divide the model's {heads} attention heads; pick a divisor of {heads}")
    local = heads // tensor
    lengths = sorted(set(int(t) for t in tokens))
    uneven = [t for t in lengths if t % context]
    if local % context and uneven:
        raise MeshError(
            f"context={context} divides neither the {local} heads per tensor shard (Ulysses needs that) nor the "
            f"sequence length(s) {uneven} (the K/V all-gather fallback needs that); choose a context size that "
            f"divides {local}, or one that divides every sequence length {lengths}"
        )
