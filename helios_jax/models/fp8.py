"""FP8 weights for the DiT's block linears: float8_e4m3fn kernels with per-output-channel float32 scales.

A quantized linear's ``kernel`` (in, out) is replaced by ``fp8_kernel`` (out, in), float8_e4m3fn, and
``fp8_scale`` (out,), float32: ``kernel ≈ (fp8_kernel * fp8_scale[:, None]).T``. The params stay a plain
tree of arrays that orbax, the sharding table and the loaders handle like any other. The kernel is kept
output-major (the torch layout) because Hopper's FP8 GEMMs take both operands with the contraction
innermost: stored (in, out), XLA transposes every fp8 stack before the layer scan, a temporary as large as
the weights (seen in the compiled H100 plan).

``layers.Dense`` runs :func:`dense` whenever ``fp8_kernel`` is present: the activations are quantized per
token (absmax, dynamic), the product is one float8 x float8 ``dot_general`` accumulated in float32 and
scaled back per token and per output channel (qwix's quantized dot). Which layers: every block's attention
projections (``to_q``, ``to_k``, ``to_v``, ``to_out_0``) and FFN (``net_0.proj``, ``net_2``), 99% of the 14B
model's weights. The patch embeddings, the condition embedder, ``proj_out``, norms, modulation tables and
attention stay in the 16-bit dtype (small, sensitive, or not a matmul over weights).

``bf16_edges=True`` keeps the first and the last block whole in the 16-bit dtype, as SGLang's FP8 does: the
block stack splits into ``first_block`` (layer 0), ``blocks`` (the middle layers, fp8) and ``last_block``,
because one stacked array holds one dtype; ``HeliosTransformer`` runs that layout when it finds ``first_block``.

The user asks for a storage by one name, :data:`STORAGES`: ``"fp8"`` or ``"fp8-edges"`` (``weight_dtype=`` of
``HeliosPipeline.from_pretrained``, ``generate --weight_dtype``, ``convert --dtype``). One value rather than a
``bf16_edges`` flag beside ``"fp8"``: the edges are a layout of the fp8 weights, so a flag would mean nothing
without fp8 (a combination to refuse), and a saved checkpoint's layout reads back as one of the same names
(:func:`storage_of`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from flax import traverse_util

FP8 = "fp8"
FP8_EDGES = "fp8-edges"  # fp8 with the first and last blocks kept 16-bit (bf16_edges)
STORAGES = (FP8, FP8_EDGES)
QTYPE = jnp.float8_e4m3fn
KERNEL = "fp8_kernel"
SCALE = "fp8_scale"
# The quantized block linears, as the module-name suffixes of their kernel paths.
QUANTIZED_LINEARS = (("to_q",), ("to_k",), ("to_v",), ("to_out_0",), ("net_0", "proj"), ("net_2",))
# The 16-bit first and last blocks of ``bf16_edges`` params, beside the fp8 ``blocks`` stack of the others.
FIRST_BLOCK, LAST_BLOCK = "first_block", "last_block"
Path = tuple[str, ...]


def is_quantized_kernel(path: Path) -> bool:
    """Whether a transformer param path (16-bit layout) is the kernel of a block linear stored in fp8."""
    if not path or path[0] != "blocks" or path[-1] != "kernel":
        return False
    return any(tuple(path[-1 - len(name):-1]) == name for name in QUANTIZED_LINEARS)


def is_fp8(params: Any) -> bool:
    """Whether a params tree holds fp8 kernels."""
    return any(path[-1] == KERNEL for path in traverse_util.flatten_dict(params))


@jax.jit
def quantize_kernel(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(..., in, out) kernel -> fp8 (..., out, in) and float32 scales (..., out): absmax per output channel."""
    transposed = jnp.swapaxes(kernel.astype(jnp.float32), -1, -2)
    q = qwix.quantize(transposed, QTYPE, channelwise_axes=tuple(range(kernel.ndim - 1)), scale_dtype=jnp.float32)
    return q.qvalue, q.scale[..., 0]


def storage_of(params: Any) -> str | None:
    """The storage a params (or shape) tree holds: :data:`FP8_EDGES` with ``first_block``, :data:`FP8` with fp8
    kernels, else None (16-bit)."""
    return FP8_EDGES if FIRST_BLOCK in params else FP8 if is_fp8(params) else None


def layout_problem(shapes: Any, num_layers: int) -> str | None:
    """What is wrong with a saved transformer's block layout, in words, or None: its layer count against the
    config's, and for the split edges (:func:`split_edges`) both edges present, each a 16-bit block whose
    quantized shapes are those of the fp8 stack's layers. Read from shapes, before any weight."""
    first, last = FIRST_BLOCK in shapes, LAST_BLOCK in shapes
    if first != last:
        return (f"it holds {FIRST_BLOCK if first else LAST_BLOCK} without {LAST_BLOCK if first else FIRST_BLOCK} "
                f"(the {FP8_EDGES} layout keeps both)")
    stack = jax.tree.leaves(shapes["blocks"])[0].shape[0]
    if stack + 2 * first != num_layers:
        return f"its blocks hold {stack + 2 * first} layers and its config {num_layers}"
    if not first:
        return None
    if not is_fp8(shapes["blocks"]) or is_fp8(shapes[FIRST_BLOCK]) or is_fp8(shapes[LAST_BLOCK]):
        return f"its {FIRST_BLOCK} and {LAST_BLOCK} must be 16-bit and the blocks between them fp8 ({FP8_EDGES})"
    layers = {path: spec.shape[1:] for path, spec in traverse_util.flatten_dict(shapes["blocks"]).items()}
    for edge in (FIRST_BLOCK, LAST_BLOCK):
        quantized = traverse_util.flatten_dict(quantized_shapes({"blocks": shapes[edge]})["blocks"])
        if {path: tuple(spec.shape) for path, spec in quantized.items()} != layers:
            return f"its {edge}'s params are not those of one layer of its fp8 blocks"
    return None


def quantize_leaf(path: Path, leaf: jax.Array, bf16_edges: bool = False) -> dict[Path, jax.Array]:
    """One loaded leaf as the leaves it becomes: a block linear's fp8 kernel and its scales, else itself; with
    ``bf16_edges`` a block leaf first splits into its first, middle and last layers (only the middle quantized)."""
    if bf16_edges and path[0] == "blocks":
        out: dict[Path, jax.Array] = {}
        for part_path, part in traverse_util.flatten_dict(split_edges(traverse_util.unflatten_dict({path: leaf}))).items():
            out.update(quantize_leaf(part_path, part))
        return out
    if not is_quantized_kernel(path):
        return {path: leaf}
    kernel, scale = quantize_kernel(leaf)
    return {path[:-1] + (KERNEL,): kernel, path[:-1] + (SCALE,): scale}


def quantize_params(params: Any, bf16_edges: bool = False) -> Any:
    """A transformer params tree with every block linear in fp8 (already quantized trees are refused); with
    ``bf16_edges`` the first and last blocks stay whole in their 16-bit dtype (:func:`split_edges`)."""
    if is_fp8(params) or FIRST_BLOCK in params:
        raise ValueError("quantize_params: these params are already fp8 (they hold fp8_kernel leaves or first_block)")
    out: dict[Path, jax.Array] = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        out.update(quantize_leaf(path, leaf, bf16_edges))
    return traverse_util.unflatten_dict(out)


def split_edges(params: Any) -> Any:
    """``blocks`` (L, ...) as ``first_block`` (layer 0), ``blocks`` (layers 1 to L - 2) and ``last_block``;
    arrays or ``jax.ShapeDtypeStruct`` leaves."""
    if FIRST_BLOCK in params:
        raise ValueError("split_edges: these params hold first_block already")
    layers = jax.tree.leaves(params["blocks"])[0].shape[0]
    if layers < 3:
        raise ValueError(f"split_edges: {layers} blocks; keeping the first and last apart needs at least 3")

    def take(layers: slice | int) -> Any:
        def leaf(x: Any) -> Any:
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.eval_shape(lambda a: a[layers], x)
            return x[layers]
        return jax.tree.map(leaf, params["blocks"])

    return {**params, FIRST_BLOCK: take(0), "blocks": take(slice(1, -1)), LAST_BLOCK: take(-1)}


def quantized_shapes(shapes: Any, bf16_edges: bool = False) -> Any:
    """The ``jax.ShapeDtypeStruct`` tree of fp8 params for a transformer shape tree (nothing allocated)."""
    out: dict[Path, jax.ShapeDtypeStruct] = {}
    for path, spec in traverse_util.flatten_dict(split_edges(shapes) if bf16_edges else shapes).items():
        if is_quantized_kernel(path):
            *lead, fan_in, fan_out = spec.shape
            out[path[:-1] + (KERNEL,)] = jax.ShapeDtypeStruct((*lead, fan_out, fan_in), QTYPE)
            out[path[:-1] + (SCALE,)] = jax.ShapeDtypeStruct((*lead, fan_out), jnp.float32)
        else:
            out[path] = spec
    return traverse_util.unflatten_dict(out)


def is_quantized(module: nn.Module) -> bool:
    return module.has_variable("params", KERNEL)


def dense(module: nn.Module, inputs: jax.Array, use_bias: bool) -> jax.Array:
    """``x W + b`` of an fp8 linear: per-token fp8 activations times the fp8 kernel, float32 accumulation,
    the result in the input's dtype. The bias (16-bit) is added after the rescale."""
    kernel = module.get_variable("params", KERNEL)
    scale = module.get_variable("params", SCALE).astype(jnp.float32)
    w = qwix.QArray(kernel, scale[:, None], qtype=QTYPE)
    x = qwix.quantize(inputs, QTYPE, channelwise_axes=tuple(range(inputs.ndim - 1)), scale_dtype=jnp.float32)
    y = qwix.dot_general(x, w, (((inputs.ndim - 1,), (1,)), ((), ())))
    if use_bias:
        y = y + module.get_variable("params", "bias").astype(jnp.float32)
    return y.astype(inputs.dtype)
