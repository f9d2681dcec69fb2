"""Splash attention, the Pallas TPU kernel, shaped for Helios' token counts (``attention(..., impl="splash")``).

jax ships the kernel (``jax.experimental.pallas.ops.tpu.splash_attention``: flash attention with block-sparse
masks and segment ids, forward and backward); this module is only the glue the dispatch needs around it, which
the kernel leaves to its caller:

- layout: the dispatch's (batch, tokens, heads, head_dim) becomes the kernel's (heads, tokens, head_dim), one
  batch element at a time (``jax.vmap``), and back;
- scale: the kernel takes the logits unscaled, so q is multiplied by ``scale`` (in float32, then rounded to q's
  dtype) before it;
- padding: the kernel tiles the sequences in blocks (multiples of 128, the lane width) and takes no ragged tail.
  Helios' 2,940 / 4,560 / 11,040 tokens (and whatever a context split makes of them) are padded at the end to
  the blocks of the table below, and the padding is masked through segment ids: every padded query and key gets
  one id no real token has, so no real query sees a padded key; padded queries attend among themselves (a row
  with no key at all would be the kernel's undefined case) and are cut off the output;
- masks: the mask is the kernel's non-causal ``FullMask`` per head; ``segment_ids`` (packed stage-2 training)
  and a key mask (the context split's padding, ``parallel.context.key_mask``) both become the kernel's
  ``SegmentIds`` (a masked key takes the padding's id);
- where it runs: compiled by Mosaic on a TPU, in Pallas interpret mode elsewhere (a CPU: the tests), chosen when
  the program is lowered (``lax.platform_dependent``), so a TPU program compiled on a CPU host (a deviceless
  plan) holds the Mosaic kernel.

A Mosaic kernel is not partitioned by XLA: under a mesh the dispatch calls it inside ``shard_map``
(``helios_jax.parallel.context``). jax's splash module is imported when a kernel is first built, not with this one:
it brings Pallas' TPU backend (about a second), which no GPU or CPU run of the CLI should pay for.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from helios_jax.kernels.checks import check_dtypes, check_qkv

if TYPE_CHECKING:
    from jax.experimental.pallas.ops.tpu import splash_attention as splash


def _jax_splash() -> ModuleType:
    """jax's splash attention module, imported on first use (see the module docstring)."""
    from jax.experimental.pallas.ops.tpu import splash_attention

    return splash_attention


LANES = 128  # the kernel's smallest tile and the granularity of every block: a TPU vector register's lane count
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One row of the block table: the q and kv tiles of the forward and both backward kernels (dq, dkv),
    and why. ``q`` is every q block, ``kv`` every kv block, ``kv_compute`` the kv slice one inner step of the
    forward and dkv kernels multiplies (``kv`` a multiple of it)."""

    q: int
    kv: int
    kv_compute: int
    reason: str

    def __post_init__(self) -> None:
        if min(self.q, self.kv_compute) < LANES or self.q % LANES or self.kv_compute % LANES or self.kv % self.kv_compute:
            raise ValueError(f"splash tiles q={self.q}, kv={self.kv}, kv_compute={self.kv_compute}: q and kv_compute "
                             f"must be multiples of {LANES}, kv a multiple of kv_compute")

    def block_sizes(self) -> splash.BlockSizes:
        return _jax_splash().BlockSizes(
            block_q=self.q, block_kv=self.kv, block_kv_compute=self.kv_compute,
            block_q_dkv=self.q, block_kv_dkv=self.kv, block_kv_dkv_compute=self.kv_compute,
            block_q_dq=self.q, block_kv_dq=self.kv,
        )


# The budget every row respects is the chip's scoped VMEM: a forward step holds the q tile, double-buffered K and V
# tiles, the float32 logits (q x kv_compute) and the float32 accumulator; a dkv step float32 dK and dV of a kv tile.
# Mosaic refuses a kernel that overflows it when it compiles (CompileTimeScopedVmemOom: tiles of 2,048 x 11,264 do
# on v5e), so experiments/plans/splash_plan.py compiling every row for v5e, v6e and v5p without a TPU shows they
# fit. MXU: 128x128 on v5e and v5p, 256x256 on v6e, so tiles of 512 rows are whole passes of either. A grid step
# costs ~0.35 us of pipeline overhead (the Pallas TPU docs), so tiles are as large as VMEM and the padding allow.
# Keyed by (q tokens, kv tokens) rounded up to 128 (so the lengths a context split pads to 8 or 16 find the same
# row); head_dim 128 (Helios' 5,120 / 40). Reasoned, not measured: no TPU has run them; a TPU session retunes them
# here (one row per shape) or passes ``tiles=`` to try others.
BLOCK_TABLE: dict[tuple[int, int], Tiles] = {
    (2944, 2944): Tiles(512, 1024, 512, "stage 0 self-attention (2,940 tokens) padded to 3,072 (+4.5%): 23 tiles of "
                        "128 would pad 0.1% but run 16x the grid steps at a tile half a v6e MXU pass; K/V tiles of "
                        "1,024 bf16 rows are 256 KB each, 1 MB double-buffered, beside 1 MB of logits"),
    (4608, 4608): Tiles(512, 1536, 512, "stage 1 self-attention (4,560 tokens) padded to 4,608 (+1%) = 9 x 512; K/V "
                        "in three tiles of 1,536 rows (384 KB each in bf16), a third of the kv grid steps of 512"),
    (11136, 11136): Tiles(512, 1024, 512, "stage 2 self-attention (11,040 tokens) padded to 11,264 (+2%) = 22 x 512; "
                          "1,024-row K/V tiles halve the kv grid steps of 512; the next divisor of 11,264 (5,632 rows: "
                          "2 steps, not 11) holds 5.8 MB of double-buffered K/V, left for a TPU to show it pays"),
    (2944, 512): Tiles(512, 512, 512, "stage 0 cross-attention: the 512 text tokens in one kv tile, q as self-attention"),
    (4608, 512): Tiles(512, 512, 512, "stage 1 cross-attention: the 512 text tokens in one kv tile, q as self-attention"),
    (11136, 512): Tiles(512, 512, 512, "stage 2 cross-attention: the 512 text tokens in one kv tile, q as self-attention"),
}


def _tile(tokens: int) -> int:
    """The largest tile of 512, 256, 128 rows that pads ``tokens`` by at most 1/16 (else 128, the least padding)."""
    for size in (512, 256):
        if _pad_to(tokens, size) - tokens <= tokens // 16:
            return size
    return LANES


def tiles_for(q_tokens: int, kv_tokens: int) -> Tiles:
    """The table's row for this shape, or the rule for shapes not in it: each axis' largest tile that pads it by at
    most 1/16, the kv tile computed whole."""
    key = (_pad_to(q_tokens, LANES), _pad_to(kv_tokens, LANES))
    if key in BLOCK_TABLE:
        return BLOCK_TABLE[key]
    kv = _tile(kv_tokens)
    return Tiles(_tile(q_tokens), kv, kv, "not in the table: each axis' largest tile that pads it by at most 1/16")


def _pad_to(tokens: int, size: int) -> int:
    return -(-tokens // size) * size


def _kernel(heads: int, q_tokens: int, kv_tokens: int, tiles: Tiles, interpret: bool) -> splash.SplashAttentionKernel:
    """The kernel for padded lengths. Built at every trace: its mask metadata is computed in numpy (0.7 s for 40
    heads x 11,264 tokens) behind the kernel's own cache, and its arrays belong to the trace (and the mesh) at hand."""
    splash = _jax_splash()
    mask = splash.MultiHeadMask([splash.FullMask((q_tokens, kv_tokens))] * heads)
    return splash.make_splash_mha(mask, block_sizes=tiles.block_sizes(), head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    key_mask: jax.Array | None = None,
    tiles: Tiles | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """softmax(q k^T * scale) v per batch and head; q (B, Tq, N, H), k and v (B, Tk, N, H), any lengths.

    ``q_segment_ids`` (B or 1, Tq) and ``kv_segment_ids`` (B or 1, Tk), integers, let a query attend only to keys
    of its id (both or neither); ``key_mask`` (B or 1, Tk), True = attend, removes keys. ``tiles`` defaults to
    the table's row for the shape (:func:`tiles_for`). ``interpret``: None compiles the Mosaic kernel for a TPU
    and interprets it elsewhere; True or False forces one. Differentiable (the kernel's own backward).
    """
    _check(q, k, v, q_segment_ids, kv_segment_ids, key_mask)
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    tiles = tiles_for(q_len, kv_len) if tiles is None else tiles
    q_pad, kv_pad = _pad_to(q_len, tiles.q), _pad_to(kv_len, tiles.kv)

    q_ids = jnp.zeros((1, q_len), jnp.int32) if q_segment_ids is None else jnp.asarray(q_segment_ids, jnp.int32)
    kv_ids = jnp.zeros((1, kv_len), jnp.int32) if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
    padding = jnp.maximum(q_ids.max(), kv_ids.max()) + 1  # an id no real token has
    if key_mask is not None:
        kv_ids = jnp.where(key_mask, kv_ids, padding)
    q_ids = jnp.pad(jnp.broadcast_to(q_ids, (batch, q_len)), ((0, 0), (0, q_pad - q_len)), constant_values=padding)
    kv_ids = jnp.pad(jnp.broadcast_to(kv_ids, (batch, kv_len)), ((0, 0), (0, kv_pad - kv_len)),
                     constant_values=padding)

    def heads_major(x: jax.Array, length: int) -> jax.Array:  # (B, T, N, H) -> (B, N, T padded, H)
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    scaled = (q.astype(jnp.float32) * scale).astype(q.dtype)
    args = (heads_major(scaled, q_pad), heads_major(k, kv_pad), heads_major(v, kv_pad), q_ids, kv_ids)

    def run(interpret: bool):
        kernel = _kernel(heads, q_pad, kv_pad, tiles, interpret)

        def one(q, k, v, q_ids, kv_ids):
            return kernel(q, k, v, segment_ids=_jax_splash().SegmentIds(q=q_ids, kv=kv_ids))

        return lambda *a: jax.vmap(one)(*a)

    if interpret is None:
        out = lax.platform_dependent(*args, tpu=run(False), default=run(True))
    else:
        out = run(interpret)(*args)
    return out.transpose(0, 2, 1, 3)[:, :q_len]


def _check(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array | None, kv_ids: jax.Array | None,
           key_mask: jax.Array | None) -> None:
    """One clear error for arrays the kernel cannot take, before anything is traced into it."""
    check_qkv("splash_attention", q, k, v)
    check_dtypes("splash_attention", q, k, v, DTYPES)
    if (q_ids is None) != (kv_ids is None):
        raise ValueError("splash_attention: give both q_segment_ids and kv_segment_ids, or neither")
    batch = q.shape[0]
    for name, ids, tokens in (("q_segment_ids", q_ids, q.shape[1]), ("kv_segment_ids", kv_ids, k.shape[1]),
                              ("key_mask", key_mask, k.shape[1])):
        if ids is None:
            continue
        shape, dtype = jnp.shape(ids), jnp.result_type(ids)
        kind = jnp.bool_ if name == "key_mask" else jnp.integer
        if len(shape) != 2 or shape[0] not in (1, batch) or shape[1] != tokens or not jnp.issubdtype(dtype, kind):
            raise ValueError(f"splash_attention: {name} must be a {'boolean' if kind is jnp.bool_ else 'integer'} "
                             f"array of shape (1 or B={batch}, {tokens}); got shape {shape}, dtype {dtype}")
