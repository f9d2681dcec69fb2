"""The one attention entry point of the package; every model calls this and no kernel directly.

``impl`` picks the backend: ``"xla"`` (runs everywhere), ``"cudnn"`` (cuDNN flash attention through
``jax.nn.dot_product_attention``, GPU only, bf16/fp16), ``"pallas"`` (our flash-attention kernel,
``helios_jax.kernels.flash_attention``: compiled through Triton on a GPU; on a CPU it runs in Pallas
interpret mode, correct but slow, so that tests and tiny models can use it anywhere), ``"splash"`` (jax's Pallas
TPU splash attention, ``helios_jax.models.splash``: the Mosaic kernel on a TPU, the default there; interpreted
elsewhere, as slow). Switching
backends is a change of one string, so a model can be compared across backends without touching its code.

Under a mesh with a ``context`` axis of size > 1 (``jax.set_mesh``), the call runs context-parallel
(``helios_jax.parallel.context``: Ulysses all-to-all, or a K/V all-gather) around the same backend.

``segment_ids`` makes the attention block-diagonal (NaViT packing, stage 2-init): a query attends only to
keys of its own segment. XLA and cuDNN get it as a boolean mask (cuDNN turns it into an additive bias of
(tokens x tokens) per sample), splash as the kernel's own segment ids; the Pallas kernel and the context-parallel
path have no segments and refuse.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from helios_jax.kernels import flash_attention
from helios_jax.models.splash import splash_attention
from helios_jax.parallel import context as context_parallel

Impl = Literal["xla", "cudnn", "pallas", "splash"]
IMPLS: tuple[str, ...] = ("xla", "cudnn", "pallas", "splash")
# One (B or 1, T) integer array for self-attention, or a (q ids (B or 1, Tq), kv ids (B or 1, Tk)) pair.
SegmentIds = jax.Array | tuple[jax.Array, jax.Array]


def default_impl(dtype, platform: str | None = None) -> str:
    """Splash attention on a TPU, cuDNN flash attention where it applies (a GPU, 16-bit inputs), else XLA's.

    ``platform`` ("gpu", "tpu", "cpu", ...) is the device the program is for, by default JAX's default backend;
    a plan compiled here for a device that is not here (experiments/plans/gpu_plan.py) names it.

    XLA's attention materialises the (heads, tokens, tokens) logits in float32: 19.5 GB per layer at
    Helios' 11,040-token stage, which is why a GPU or TPU run should never default to it.
    """
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "splash"
    on_gpu = platform in ("gpu", "cuda")
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    impl: Impl = "xla",
    scale: float | None = None,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    segment_ids: SegmentIds | None = None,
    cross: bool = False,
) -> jax.Array:
    """Non-causal softmax attention, layout (batch, tokens, heads, head_dim), scale 1/sqrt(head_dim).

    q may have a different token count from k and v (cross-attention); the output has q's shape.
    ``bias`` is added to the logits and ``mask`` (True = attend) removes keys; both broadcast to
    (batch, heads, q tokens, k tokens). Logits and softmax are float32 whatever the input dtype
    (for float16 on a CPU, see ``_xla_float16``). ``segment_ids`` (see ``SegmentIds``) lets a query attend
    only to keys of the same id, on top of ``mask``. ``cross`` says k and v are another sequence (text)
    than q's: under a context mesh they stay whole.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention wants q (B, Tq, N, H) and k, v (B, Tk, N, H); got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if impl == "pallas" and (bias is not None or mask is not None):
        raise ValueError("the pallas attention kernel takes no bias or mask; use impl='xla' or 'cudnn' for them")
    if impl == "splash" and (bias is not None or (mask is not None and (mask.ndim != 4 or mask.shape[1:3] != (1, 1)))):
        raise ValueError("the splash attention kernel takes no bias, and a mask only of keys, (B or 1, 1, 1, Tk); "
                         f"got bias {None if bias is None else bias.shape}, mask {None if mask is None else mask.shape}")
    pair = None
    if segment_ids is not None:
        if impl == "pallas":
            raise ValueError("the pallas attention kernel has no segment ids; use impl='xla', 'cudnn' or 'splash' "
                             "for a packed (segment-id) attention")
        if context_parallel.active_mesh() is not None:
            raise ValueError("segment-id attention does not run context-parallel (its mask is per query); "
                             "run the packed forward without a context axis in the mesh")
        pair = segment_pair(segment_ids, q.shape[0], q.shape[1], k.shape[1])
        if impl != "splash":  # splash takes the ids themselves
            same = pair[0][:, None, :, None] == pair[1][:, None, None, :]
            mask = same if mask is None else jnp.logical_and(mask, same)
    if impl == "splash":
        return _splash(q, k, v, scale=scale, mask=mask, segment_ids=pair, cross=cross)

    def local(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if impl == "pallas":
            return flash_attention(q, k, v, scale=scale)
        if impl == "xla" and q.dtype == jnp.float16:
            return _xla_float16(q, k, v, bias, mask, scale)
        if impl == "cudnn" and mask is not None and mask.shape[:3] == (1, 1, 1):
            # cuDNN takes a mask only as large as the logits; a key-only mask here is the context split's
            # padding (``context.key_mask``: the real keys first), which its padding mode takes as a length.
            lengths = jnp.full((q.shape[0],), jnp.sum(mask, dtype=jnp.int32), jnp.int32)
            return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=impl,
                                                key_value_seq_lengths=lengths)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl)

    if bias is None and context_parallel.active_mesh() is not None:
        return context_parallel.attention(q, k, v, local, cross=cross, mask=mask)
    return local(*context_parallel.constrain_heads(q, k, v), mask)


def segment_pair(segment_ids: SegmentIds, batch: int, q_tokens: int, k_tokens: int) -> tuple[jax.Array, jax.Array]:
    """The (q ids (B or 1, Tq), kv ids (B or 1, Tk)) pair of ``segment_ids``; one clear error for ids that are
    not integer arrays of those shapes."""
    pair = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
    if len(pair) != 2:
        raise ValueError(f"segment_ids: give one (B, T) array or a (q ids, kv ids) pair; got {len(pair)} arrays")
    for name, ids, tokens in (("q", pair[0], q_tokens), ("kv", pair[1], k_tokens)):
        shape, dtype = jnp.shape(ids), jnp.result_type(ids)
        integer = jnp.issubdtype(dtype, jnp.integer)
        if len(shape) != 2 or shape[0] not in (1, batch) or shape[1] != tokens or not integer:
            raise ValueError(
                f"segment_ids: the {name} ids must be an integer array of shape (1 or B={batch}, {tokens}) for "
                f"{name} tokens of {tokens}; got shape {shape}, dtype {dtype} (a single array serves q and kv of "
                "self-attention; give a (q ids, kv ids) pair when their lengths differ)"
            )
    return jnp.asarray(pair[0]), jnp.asarray(pair[1])


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None, mask: jax.Array | None,
            segment_ids: tuple[jax.Array, jax.Array] | None, cross: bool) -> jax.Array:
    """Splash attention, inside ``shard_map`` under a mesh (XLA cannot partition a Mosaic kernel): the context
    path's (Ulysses or the K/V all-gather), else each device's share of the batch and heads."""

    def local(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
              q_ids: jax.Array | None = None, kv_ids: jax.Array | None = None) -> jax.Array:
        key_mask = None if mask is None else mask[:, 0, 0, :]
        return splash_attention(q, k, v, scale=scale, key_mask=key_mask, q_segment_ids=q_ids, kv_segment_ids=kv_ids)

    if context_parallel.active_mesh() is not None:
        return context_parallel.attention(q, k, v, local, cross=cross, mask=mask)
    return context_parallel.per_shard(local, q, k, v, mask, *(segment_ids or ()))


def _xla_float16(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, mask: jax.Array | None,
                 scale: float | None) -> jax.Array:
    """XLA attention of float16 inputs. XLA's CPU backend has no float16 dot with float32 results
    (``F16_F16_F32``), so there, and only there, the same attention runs on float32 copies and is rounded
    back to float16; other backends (a GPU) lower the float16 dots unchanged."""

    def native(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla")

    def upcast(q, k, v):
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return native(*f32).astype(q.dtype)

    return jax.lax.platform_dependent(q, k, v, cpu=upcast, default=native)
