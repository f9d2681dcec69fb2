"""Context (sequence) parallelism: the DiT's tokens split over the mesh's ``context`` axis.

Under an active mesh (``jax.set_mesh``) with ``context > 1`` the transformer pads its token sequence to a
multiple of the context size and constrains it to be split over ``context`` (:func:`split_tokens`); the
compiler then runs every per-token layer on the local tokens. Attention is the one place that needs
other devices' tokens, and :func:`attention` does it under ``shard_map``:

- Ulysses (self-attention, when ``context`` divides the heads left per ``tensor`` shard): an all-to-all
  turns (local tokens, all heads) into (all tokens, local heads), each device attends for its heads,
  and a second all-to-all turns the result back. Two all-to-alls of q, k, v and o per layer.
- otherwise: the K/V of all tokens are all-gathered and each device attends for its local queries.
- cross-attention (text K/V, replicated): local, no communication.

Padded keys are masked out of the softmax; padded tokens are dropped by the caller.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec as P

from helios_jax.parallel.mesh import check_mesh

CONTEXT = "context"
BATCH_AXES = ("data", "fsdp")
ROW_AXES = (CONTEXT, "tensor")  # what an image's rows split over (split_rows)

Attend = Callable[..., jax.Array]


def active_mesh() -> AbstractMesh | None:
    """The mesh set by ``jax.set_mesh`` if it has a ``context`` axis of size > 1, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CONTEXT not in mesh.axis_names or dict(mesh.shape)[CONTEXT] == 1:
        return None
    return mesh


def batch_axes(mesh: AbstractMesh, batch: int, among: tuple[str, ...] = BATCH_AXES) -> tuple[str, ...] | None:
    """The batch-splitting mesh axes (``data``, then ``fsdp``, of those ``among``) whose sizes divide ``batch``."""
    sizes, chosen, count = dict(mesh.shape), [], 1
    for name in (a for a in BATCH_AXES if a in among):
        size = sizes.get(name, 1)
        if size > 1 and batch % (count * size) == 0:
            chosen.append(name)
            count *= size
    return tuple(chosen) or None


def token_spec(mesh: AbstractMesh, batch: int) -> P:
    return P(batch_axes(mesh, batch), CONTEXT, None)


def row_axes(mesh: AbstractMesh, rows: int) -> tuple[str, ...] | None:
    """The model-parallel axes (``context``, then ``tensor``) whose sizes divide ``rows``: the chips a chunk's
    DiT is spread over, which hold no batch of their own for the decode."""
    sizes, chosen, count = dict(mesh.shape), [], 1
    for name in ROW_AXES:
        size = sizes.get(name, 1)
        if size > 1 and rows % (count * size) == 0:
            chosen.append(name)
            count *= size
    return tuple(chosen) or None


def split_rows(x: jax.Array, axis: int) -> jax.Array:
    """``x`` split along ``axis`` (an image's height) over the active mesh's ``context`` and ``tensor`` axes
    (those whose sizes divide it; ``row_axes``); unchanged without such a mesh. The VAE decode runs on such row
    bands: every convolution computes its own rows and the compiler exchanges the halo rows with the neighbours
    (``collective-permute``), what the official ``vae_parallel.py`` does by hand with overlapping tiles. On a
    ``tensor`` mesh it is what keeps the decode beside the DiT's weights on a 16 GB TPU v5e (docs/tpu.md)."""
    mesh = jax.sharding.get_abstract_mesh()
    rows = None if mesh.empty else row_axes(mesh, x.shape[axis])
    if rows is None:
        return x
    spec: list = [None] * x.ndim
    spec[0], spec[axis] = batch_axes(mesh, x.shape[0]), rows
    return jax.lax.with_sharding_constraint(x, P(*spec))


def split_tokens(x: jax.Array, *tables: jax.Array, heads: int) -> tuple[jax.Array, tuple[jax.Array, ...], int]:
    """(B, L, D) tokens (and per-token tables (B', L, d)) padded to a multiple of the context size and
    split over ``context``; returns them with the padded length. Without a context mesh, unchanged.
    A context size that divides neither ``heads`` nor L is a ``MeshError`` (raised while tracing)."""
    mesh, length = active_mesh(), x.shape[1]
    if mesh is None:
        return x, tables, length
    check_mesh(mesh, heads=heads, tokens=(length,))
    padded = -(-length // dict(mesh.shape)[CONTEXT]) * dict(mesh.shape)[CONTEXT]

    def pad(a: jax.Array) -> jax.Array:
        a = jnp.pad(a, [(0, 0), (0, padded - length)] + [(0, 0)] * (a.ndim - 2)) if padded > length else a
        return jax.lax.with_sharding_constraint(a, token_spec(mesh, a.shape[0]))

    return pad(x), tuple(pad(t) for t in tables), padded


def constrain_tokens(x: jax.Array) -> jax.Array:
    """Re-state the split of (B, L, D) activations: tokens over ``context``, the batch over ``data``/``fsdp``,
    the width whole. Without it, weights split over ``fsdp`` on their width (FSDP) lead XLA to split the
    activations' width too and all-reduce every norm and GEMM over the whole batch, instead of gathering
    each layer's weights (experiments/plans/mesh_plan.py measured it). A no-op without a mesh that splits either."""
    mesh = active_mesh()
    if mesh is not None:
        return jax.lax.with_sharding_constraint(x, token_spec(mesh, x.shape[0]))
    mesh = jax.sharding.get_abstract_mesh()
    batch = None if mesh.empty else batch_axes(mesh, x.shape[0])
    return x if batch is None else jax.lax.with_sharding_constraint(x, P(batch, None, None))


def constrain_heads(*ts: jax.Array) -> tuple[jax.Array, ...]:
    """(B, T, N, H) attention inputs with one split, the batch over ``data``/``fsdp`` (heads over ``tensor``),
    for attention that runs without a context split: cuDNN's partitioner takes q, k and v only alike split.
    Unchanged without a mesh that splits the batch."""
    mesh = jax.sharding.get_abstract_mesh()
    batch = None if mesh.empty else batch_axes(mesh, ts[0].shape[0])
    if batch is None:
        return ts
    tensor = dict(mesh.shape).get("tensor", 1)
    heads = "tensor" if tensor > 1 and ts[0].shape[2] % tensor == 0 else None
    return tuple(jax.lax.with_sharding_constraint(t, P(batch, None, heads, None)) for t in ts)


def key_mask(padded: int, length: int | None) -> jax.Array | None:
    """(1, 1, 1, padded) True for real keys, or None when nothing is padded."""
    return None if length is None or padded == length else (jnp.arange(padded) < length)[None, None, None, :]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, attend: Attend, *, cross: bool = False,
              mask: jax.Array | None = None) -> jax.Array:
    """``attend(q, k, v, mask)`` with q (and, unless ``cross``, k and v) split over ``context``.

    Layout (batch, tokens, heads, head_dim) as ``helios_jax.models.attention.attention``; ``mask`` may only
    mask keys (leading dims of size 1), since it is passed whole to every device.
    """
    mesh = active_mesh()
    sizes = dict(mesh.shape)
    context, tensor = sizes[CONTEXT], sizes.get("tensor", 1)
    if mask is not None and any(d != 1 for d in mask.shape[:-1]):
        raise ValueError(f"context-parallel attention takes a key mask (1, 1, 1, Tk); got mask {mask.shape}")
    heads = q.shape[2]
    head_axis = "tensor" if tensor > 1 and heads % tensor == 0 else None
    local_heads = heads // (tensor if head_axis else 1)
    batch = batch_axes(mesh, q.shape[0])
    split = P(batch, CONTEXT, head_axis, None)
    whole = P(batch, None, head_axis, None)
    masks = () if mask is None else (mask,)

    if cross:
        def body(q, k, v, *m):
            return attend(q, k, v, *m)
    elif local_heads % context == 0:
        def body(q, k, v, *m):
            q, k, v = (jax.lax.all_to_all(t, CONTEXT, 2, 1, tiled=True) for t in (q, k, v))
            return jax.lax.all_to_all(attend(q, k, v, *m), CONTEXT, 1, 2, tiled=True)
    else:
        def body(q, k, v, *m):
            k, v = (jax.lax.all_gather(t, CONTEXT, axis=1, tiled=True) for t in (k, v))
            return attend(q, k, v, *m)

    specs = (split, whole if cross else split, whole if cross else split) + (P(),) * len(masks)
    return jax.shard_map(body, in_specs=specs, out_specs=split, check_vma=False)(q, k, v, *masks)


def per_shard(attend: Attend, q: jax.Array, k: jax.Array, v: jax.Array, *extras: jax.Array | None) -> jax.Array:
    """``attend(q, k, v, *extras)`` under ``shard_map`` on each device's share of the batch (over ``data``/``fsdp``)
    and of the heads (over ``tensor``), for a kernel XLA cannot partition (splash attention, a Mosaic kernel).

    Layout (batch, tokens, heads, head_dim); ``extras`` are None or arrays whose leading axis is the batch (split
    with it) or 1 (whole on every device). Called as it is without a mesh, and on the axes that are not manual
    already inside a caller's ``shard_map``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    free = () if mesh.empty else tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    if not free:
        return attend(q, k, v, *extras)
    batch = batch_axes(mesh, q.shape[0], among=free)
    tensor = dict(mesh.shape).get("tensor", 1) if "tensor" in free else 1
    split = P(batch, None, "tensor" if tensor > 1 and q.shape[2] % tensor == 0 else None, None)
    given = [i for i, x in enumerate(extras) if x is not None]

    def body(q: jax.Array, k: jax.Array, v: jax.Array, *arrays: jax.Array) -> jax.Array:
        args: list[jax.Array | None] = [None] * len(extras)
        for i, x in zip(given, arrays):
            args[i] = x
        return attend(q, k, v, *args)

    specs = tuple(P(batch if extras[i].shape[0] == q.shape[0] else None, *[None] * (extras[i].ndim - 1))
                  for i in given)
    return jax.shard_map(body, in_specs=(split, split, split, *specs), out_specs=split, axis_names=set(free),
                         check_vma=False)(q, k, v, *(extras[i] for i in given))
