"""Sharding rules: one table per model naming the logical axes of its params, and one map to mesh axes.

A table is an ordered list of ``(regex, logical axes)``; the first regex found in a leaf's path (its keys
joined by ``/``, the diffusers names, e.g. ``blocks/attn1/to_q/kernel``) gives its axes. Axes are
right-aligned (``...`` first), so the same rule fits a stacked ``(layers, in, out)`` leaf, a single
``(in, out)`` one and optimizer state that mirrors the params (``mu/blocks/...``). Unmatched leaves,
scalars and dimensions the mesh axis does not divide are replicated.

``AXIS_RULES`` maps logical names to mesh axes (MaxText/maxdiffusion style): ``embed`` over ``fsdp``,
``heads``/``mlp``/``vocab`` over ``tensor``; activations' ``batch`` over ``data`` (and ``fsdp`` in training).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rule = tuple[str, tuple[Any, ...]]

AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("lora_rank", None),
    ("lora_rank_fsdp", "fsdp"),
)

DIT_RULES: tuple[Rule, ...] = (
    (r"attn[12]/to_[qkv]/kernel", (..., "embed", "heads")),
    (r"attn[12]/to_[qkv]/bias|attn[12]/norm_[qk]/scale", (..., "heads")),
    (r"attn[12]/to_out_0/kernel", (..., "heads", "embed")),
    (r"ffn/net_0/proj/kernel", (..., "embed", "mlp")),
    (r"ffn/net_0/proj/bias", (..., "mlp")),
    (r"ffn/net_2/kernel", (..., "mlp", "embed")),
    (r"(patch_embedding|patch_short|patch_mid|patch_long)/kernel", (..., "embed")),
    (r"condition_embedder/(text|time)_embedder/linear_[12]/kernel|condition_embedder/time_proj/kernel", (..., "embed")),
    (r"proj_out/kernel", (..., "embed", None)),
    # fp8 block linears (helios_jax.models.fp8): kernels stored (out, in), one scale per output channel.
    (r"attn[12]/to_[qkv]/fp8_kernel", (..., "heads", "embed")),
    (r"attn[12]/to_[qkv]/fp8_scale", (..., "heads")),
    (r"attn[12]/to_out_0/fp8_kernel", (..., "embed", "heads")),
    (r"ffn/net_0/proj/fp8_kernel", (..., "mlp", "embed")),
    (r"ffn/net_0/proj/fp8_scale", (..., "mlp")),
    (r"ffn/net_2/fp8_kernel", (..., "embed", "mlp")),
    (r"(attn[12]/to_out_0|ffn/net_2)/fp8_scale", (..., "embed")),
)
UMT5_RULES: tuple[Rule, ...] = (
    (r"embed_tokens/embedding", ("vocab", "embed")),
    (r"SelfAttention/[qkv]/kernel", (..., "embed", "heads")),
    (r"SelfAttention/o/kernel", (..., "heads", "embed")),
    (r"DenseReluDense/wi_[01]/kernel", (..., "embed", "mlp")),
    (r"DenseReluDense/wo/kernel", (..., "mlp", "embed")),
)
# Convolutions split their output channels; the VAE is small (the decode is split by activations instead).
VAE_RULES: tuple[Rule, ...] = ((r"kernel$", (..., "embed")),)
# A LoRA pair beside each adapted DiT linear: A (in, rank) takes the base input axis, B (rank, out) its output.
# A B whose output (an A whose input) is not the model width splits its rank over fsdp instead, so that FSDP
# splits every trainable and its AdamW moments: half of a LoRA would otherwise be whole on every device.
LORA_RULES: tuple[Rule, ...] = (
    (r"(attn[12]/to_[qkv]|ffn/net_0/proj)/lora_A", (..., "embed", "lora_rank")),
    (r"attn[12]/to_[qkv]/lora_B", (..., "lora_rank_fsdp", "heads")),
    (r"ffn/net_0/proj/lora_B", (..., "lora_rank_fsdp", "mlp")),
    (r"attn[12]/to_out_0/lora_A", (..., "heads", "lora_rank_fsdp")),
    (r"ffn/net_2/lora_A", (..., "mlp", "lora_rank_fsdp")),
    (r"(attn[12]/to_out_0|ffn/net_2)/lora_B", (..., "lora_rank", "embed")),
)
# The stage-3 discriminator heads (helios_jax.training.discriminator): each Conv3d kernel (t, h, w, in, out) and
# the last Dense (in, 1) split their input channels, so that FSDP splits the heads and their AdamW moments too
# (11 GiB at 14B, whole on every device otherwise); GroupNorm scales and biases are small and stay whole.
DISCRIMINATOR_RULES: tuple[Rule, ...] = ((r"gan_(final_head|heads_\d+)/head3d_\d+/kernel", (..., "embed", None)),)
TABLES: dict[str, tuple[Rule, ...]] = {"transformer": DIT_RULES, "text_encoder": UMT5_RULES, "vae": VAE_RULES,
                                       "lora": LORA_RULES}


def _path(keys: Sequence[Any]) -> str:
    parts = []
    for key in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _axes(path: str, ndim: int, table: Sequence[Rule]) -> tuple[Any, ...]:
    for pattern, axes in table:
        if re.search(pattern, path):
            if axes and axes[0] is ...:
                named = axes[1:]
                return (None,) * (ndim - len(named)) + tuple(named) if ndim >= len(named) else (None,) * ndim
            return tuple(axes[:ndim]) + (None,) * max(ndim - len(axes), 0)
    return (None,) * ndim


def logical_specs(tree: Any, table: Sequence[Rule]) -> Any:
    """The tree of logical ``PartitionSpec`` s (names like ``embed``) that ``table`` gives each leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda keys, leaf: PartitionSpec(*_axes(_path(keys), len(getattr(leaf, "shape", ())), table)), tree)


def mesh_spec(shape: Sequence[int], logical: PartitionSpec, mesh: Mesh,
              rules: Sequence[tuple[str, Any]] = AXIS_RULES) -> PartitionSpec:
    """A logical spec as mesh axes, dropping size-1 axes and any the dimension is not divisible by."""
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    sizes = dict(mesh.shape)
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if sizes.get(a, 1) > 1)
        count = 1
        for a in names:
            count *= sizes[a]
        out.append(None if not names or dim % count else (names[0] if len(names) == 1 else names))
    return PartitionSpec(*out)


def shardings(tree: Any, mesh: Mesh, table: Sequence[Rule], rules: Sequence[tuple[str, Any]] = AXIS_RULES) -> Any:
    """A ``NamedSharding`` per leaf of ``tree`` (params, LoRA, optimizer state, or their shape structs)."""
    logical = logical_specs(tree, table)
    return jax.tree.map(lambda leaf, spec: NamedSharding(mesh, mesh_spec(getattr(leaf, "shape", ()), spec, mesh, rules)),
                        tree, logical, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(tree: Any, mesh: Mesh, table: Sequence[Rule], rules: Sequence[tuple[str, Any]] = AXIS_RULES) -> Any:
    """``tree`` placed on ``mesh`` by ``table`` (shape structs get their ``sharding``, for abstract compiles)."""
    target = shardings(tree, mesh, table, rules)
    if all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(tree)):
        return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), tree, target)
    return to_mesh(tree, target)


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: Sequence[tuple[str, Any]] = AXIS_RULES) -> NamedSharding:
    """Data batches (leading batch axis) split over the ``batch`` mesh axes (``data`` and ``fsdp``) that divide it."""
    return NamedSharding(mesh, mesh_spec(shape, PartitionSpec("batch"), mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def to_mesh(tree: Any, sharding: NamedSharding | Any) -> Any:
    """``tree`` (host or single-device values, the same in every process) as global arrays with ``sharding``
    (one sharding, or a tree of them); works across processes, where each one fills only its own devices."""
    def place(leaf, target):
        if isinstance(leaf, jax.Array) and leaf.sharding.device_set == target.device_set:
            return jax.device_put(leaf, target)  # already on the mesh (maybe spanning processes): reshard
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

    if isinstance(sharding, NamedSharding):
        return jax.tree.map(lambda leaf: place(leaf, sharding), tree)
    return jax.tree.map(place, tree, sharding)
