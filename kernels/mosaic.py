"""Flash-attention forward on Pallas' Mosaic GPU backend (Hopper: TMA, wgmma, warp specialisation).

Written for Helios' attention: non-causal, head dim 128 (64 works too), bf16 or fp16, batch x heads programs,
ragged token counts (2,940 / 4,560 / 11,040 self-attention; 512 text keys for cross-attention). JAX's own
``attention_mgpu.py`` is the model; what differs, and why:

- Ragged lengths. Mosaic GPU moves whole tiles with TMA, so q is padded (in HBM) to whole pairs of q tiles and
  k, v to whole K/V blocks. The padded keys are masked in the kernel: the K/V blocks before the last run without
  a mask, the last one (the only one with padding) runs once after the loop with the keys past ``kv_len`` set to
  -inf before the softmax. Padded query rows are computed (zeros: a finite row) and sliced off. The padding
  costs a copy of each padded operand and of the output (at 11,040 tokens four 114 MB copies, ~0.3 ms at
  ~3 TB/s, against ~4 ms of attention; they are the program's only temporaries); whole-tile lengths skip it.
- The scratch buffers take the inputs' dtype (the bundled kernel's are float16, so bf16 inputs fail to lower).
- ``scale`` is any float (folded with log2(e) into the one FMA of the base-2 softmax), not only 1/sqrt(H).
- Forward only, no residuals (inference); no causal path, no grouped heads.

Grid (q tiles, heads, batch), q tiles fastest so that the programs running together share one head's K and V
in L2, as the Triton kernel does. Per program (one head, one batch element, ``2 * block_q`` query rows): three
warpgroups. Two compute
warpgroups each own ``block_q`` rows: their q tile is TMA-loaded once, then per K/V block one wgmma for
``q k^T`` (float32 accumulator in registers), the online softmax in base 2 (FlashAttention-2's running max
and sum), ``p`` rounded to the input dtype, one wgmma for ``p v``. The third warpgroup only issues TMA copies
(few registers), keeping ``stages`` K/V blocks in flight: a slot is refilled as soon as both compute
warpgroups have arrived on its "consumed" barrier. A schedule barrier alternates the two compute warpgroups
so that one's softmax (exp2 on the MUFU) overlaps the other's wgmma (FlashAttention-3's ping-pong).

Platforms: on a CUDA device (``lax.platform_dependent``) Mosaic GPU compiles the kernel to PTX for sm_90a and
ptxas' library to SASS, at XLA's compile (the custom call's instantiate stage), so it compiles deviceless too
(experiments/plans/mosaic_plan.py, the gpu-plan tier). Elsewhere ``blockwise`` runs: the same algorithm in XLA
ops. Pallas' GPU interpret mode, which simulates shared memory, barriers, TMA and wgmma on a CPU, cannot run
this kernel in jax 0.10.2: it has no rule for ``run_state`` (the in-place wgmma accumulator), no CPU lowering
for ``layout_cast``, and its wgmma fails on a transposed operand (``transpose_ref``, K^T).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from helios_jax.kernels.checks import check_qkv
from helios_jax.kernels.flash import forward_only

DTYPES = (jnp.bfloat16, jnp.float16)
_LOG2_E = math.log2(math.e)
_COMPUTE_WARPGROUPS = 2


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tile sizes: ``block_q`` query rows per compute warpgroup (two per program), ``block_kv`` keys per wgmma,
    ``stages`` K/V blocks in flight. Multiples of 64 (wgmma's M and the 128-byte swizzle of a 64-wide tile)."""

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_q", "block_kv"):
            if getattr(self, name) <= 0 or getattr(self, name) % 64:
                raise ValueError(f"MosaicConfig.{name} = {getattr(self, name)} must be a positive multiple of 64")
        if self.stages < 2:
            raise ValueError(f"MosaicConfig.stages = {self.stages} must be at least 2 (one block loads, one computes)")


# H100 and H200: 2 x 64 query rows, 128-key blocks, two in flight. Shared memory at head dim 128:
# q/out 2 x 16 KiB + (K + V) 2 x 2 x 32 KiB = 160 KiB of the 227 KiB. Chosen as the bundled kernel's own
# default, not from timings: no GPU has run it yet.
H100_CONFIG = MosaicConfig()


def mosaic_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    config: MosaicConfig | None = None,
) -> jax.Array:
    """softmax(q k^T * scale) v per batch and head; q (B, Tq, N, H), k and v (B, Tk, N, H), bf16 or fp16.

    ``scale`` defaults to 1/sqrt(H); ``config`` to ``H100_CONFIG``. On a CUDA device the Mosaic GPU kernel runs;
    on any other platform ``blockwise`` (the same tiles, padding, mask and softmax updates in XLA ops), since
    Mosaic GPU has no CPU path and its interpret mode cannot run this kernel (see the module's docstring).
    Forward only: differentiating through it raises.
    """
    check(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    config = config or H100_CONFIG
    kernel = functools.partial(_padded, _kernel_call, scale=scale, config=config)
    elsewhere = functools.partial(_padded, _blockwise_call, scale=scale, config=config)
    call = lambda q, k, v: lax.platform_dependent(q, k, v, cuda=kernel, default=elsewhere)  # noqa: E731
    return forward_only(call, "mosaic_attention")(q, k, v)


def blockwise(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
              config: MosaicConfig | None = None) -> jax.Array:
    """The kernel's algorithm in XLA ops, on any platform: the same padding, the same (block_q x block_kv) tiles
    in the same order, the same masked last block and the same ``softmax_update``, with dots of the input dtype
    accumulated in float32 as wgmma does. What it does not check is the kernel's machinery (TMA, barriers,
    wgmma layouts), which only a GPU runs (experiments/benchmarks/headline.py checks it there first)."""
    check(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _padded(_blockwise_call, q, k, v, scale=scale, config=config or H100_CONFIG)


def softmax_update(scores: jax.Array, acc: jax.Array, row_max: jax.Array, row_sum: jax.Array, scale_log2: float,
                   dtype) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One K/V block of the online softmax (FlashAttention-2), for the kernel and ``blockwise`` alike.

    ``scores`` (rows, block_kv) are the unscaled float32 ``q k^T``; the running max is kept in scaled base-2
    units, so the scale and the max subtraction are one FMA per score before ``exp2``. Returns the rescaled
    accumulator (``p v`` still to be added), the new max and sum, and ``p`` rounded to ``dtype`` for that dot.
    """
    new_max = jnp.maximum(row_max, scores.max(axis=1) * scale_log2)
    correction = jnp.exp2(row_max - new_max)
    p = jnp.exp2(scores * scale_log2 - lax.broadcast_in_dim(new_max, scores.shape, [0]))
    acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
    row_sum = row_sum * correction + p.sum(axis=1)
    return acc, new_max, row_sum, p.astype(dtype)


def unsupported(head_dim: int, dtype) -> str | None:
    """Why the kernel cannot take this head dim or dtype (None: it can); the pipeline asks before any weight."""
    if head_dim % 64 or head_dim > 256:
        return f"head_dim must be 64, 128, 192 or 256 (whole 64-wide swizzled tiles), not {head_dim}"
    if jnp.dtype(dtype) not in DTYPES:
        return f"the dtype must be bfloat16 or float16 (wgmma's 16-bit inputs), not {jnp.dtype(dtype)}"
    return None


def check(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """One clear error for arrays the kernel cannot take, before anything is traced into it."""
    check_qkv("mosaic_attention", q, k, v)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"mosaic_attention wants q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if why := unsupported(q.shape[-1], q.dtype):
        raise ValueError(f"mosaic_attention: {why} (use attention impl 'xla' or 'cudnn')")


def padded_lengths(q_len: int, kv_len: int, config: MosaicConfig) -> tuple[int, int]:
    """Tq up to whole programs (two q tiles each), Tk up to whole K/V blocks: the lengths the kernel sees."""
    rows = _COMPUTE_WARPGROUPS * config.block_q
    return -(-q_len // rows) * rows, -(-kv_len // config.block_kv) * config.block_kv


def _padded(call, q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, config: MosaicConfig) -> jax.Array:
    """Pad q and k, v to the tiles (zeros), run ``call`` with the true key count, cut the padded rows off."""
    q_len, kv_len = q.shape[1], k.shape[1]
    q_pad, kv_pad = padded_lengths(q_len, kv_len, config)

    def pad(x: jax.Array, length: int) -> jax.Array:
        return x if x.shape[1] == length else jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))

    out = call(pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad), kv_len=kv_len, scale=scale, config=config)
    return out if q_pad == q_len else out[:, :q_len]


def _blockwise_call(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: int, scale: float,
                    config: MosaicConfig) -> jax.Array:
    """``blockwise`` on padded arrays: every (batch, head, q tile) at once, the K/V blocks in the kernel's order."""
    batch, q_len, heads, head_dim = q.shape
    block_q, block_kv = config.block_q, config.block_kv
    kv_blocks = k.shape[1] // block_kv
    ragged = kv_len % block_kv != 0
    scale_log2 = scale * _LOG2_E
    # (B, Tq, N, H) -> (B * N * q tiles, block_q, H): one row of the batch per compute warpgroup's tile.
    tiles = q.transpose(0, 2, 1, 3).reshape(-1, block_q, head_dim)
    per_tile = q_len // block_q

    def kv_block(x: jax.Array, j) -> jax.Array:  # (B * N * q tiles, block_kv, H): block j of each tile's head
        block = lax.dynamic_slice_in_dim(x, j * block_kv, block_kv, axis=1).transpose(0, 2, 1, 3)
        return jnp.repeat(block.reshape(batch * heads, block_kv, head_dim), per_tile, axis=0)

    def step(j, carry, masked: bool):
        acc, row_max, row_sum = carry
        scores = jnp.einsum("tqh,tkh->tqk", tiles, kv_block(k, j), preferred_element_type=jnp.float32)
        if masked:
            scores = jnp.where(j * block_kv + jnp.arange(block_kv) < kv_len, scores, -jnp.inf)
        acc, row_max, row_sum, p16 = jax.vmap(functools.partial(softmax_update, scale_log2=scale_log2,
                                                                dtype=q.dtype))(scores, acc, row_max, row_sum)
        acc = acc + jnp.einsum("tqk,tkh->tqh", p16, kv_block(v, j), preferred_element_type=jnp.float32)
        return acc, row_max, row_sum

    rows = tiles.shape[0]
    carry = (jnp.zeros((rows, block_q, head_dim), jnp.float32), jnp.full((rows, block_q), -jnp.inf, jnp.float32),
             jnp.zeros((rows, block_q), jnp.float32))
    carry = lax.fori_loop(0, kv_blocks - 1 if ragged else kv_blocks, functools.partial(step, masked=False), carry)
    if ragged:
        carry = step(kv_blocks - 1, carry, masked=True)
    acc, _, row_sum = carry
    out = (acc / row_sum[..., None]).astype(q.dtype)
    return out.reshape(batch, heads, q_len, head_dim).transpose(0, 2, 1, 3)


def _kernel_call(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: int, scale: float,
                 config: MosaicConfig) -> jax.Array:
    """The Mosaic GPU kernel on padded arrays; keys at ``kv_len`` and past are padding and masked."""
    batch, q_len, heads, head_dim = q.shape
    block_q, block_kv = config.block_q, config.block_kv
    kv_blocks = k.shape[1] // block_kv
    stages = min(config.stages, kv_blocks)
    ragged = kv_len % block_kv != 0  # the last K/V block holds padded keys
    scale_log2 = scale * _LOG2_E
    dtype = q.dtype

    def body(q_ref, k_ref, v_ref, out_ref, qo_smem2, k_smem, v_smem, k_ready, v_ready, q_ready, k_done, v_done,
             turn):
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")

        def take_turn():  # the ping-pong: a compute warpgroup waits for the other before its next wgmma
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < _COMPUTE_WARPGROUPS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]
            row0 = (lax.axis_index("q_tiles") * _COMPUTE_WARPGROUPS + wg) * block_q
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, block_q), h], qo_smem, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            row_max = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            row_sum = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
            plgpu.barrier_wait(k_ready.at[0])
            pl.when(wg == 1)(take_turn)

            def step(j, carry, masked: bool):
                acc, row_max, row_sum = carry
                slot = lax.rem(j, jnp.array(stages, j.dtype))

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    take_turn()
                    return acc_ref[...]

                scores = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
                plgpu.barrier_arrive(k_done.at[slot])
                if masked:  # the last block: keys from kv_len on are padding
                    key = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1, layout=plgpu.Layout.WGMMA)
                    scores = jnp.where(key + j * block_kv < kv_len, scores, -jnp.inf)
                acc, new_max, row_sum, p16 = softmax_update(scores, acc, row_max, row_sum, scale_log2, dtype)
                # Pin the softmax before the hand-over (the bundled kernel measured this order as faster).
                acc, row_sum, new_max, p16 = lax.optimization_barrier((acc, row_sum, new_max, p16))
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    nxt = j + 1

                    @pl.when(nxt < kv_blocks)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.array(stages, j.dtype))])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))  # wgmma accumulates onto acc in place
                plgpu.barrier_arrive(v_done.at[slot])
                return acc, new_max, row_sum

            carry = (acc, row_max, row_sum)
            unmasked = kv_blocks - 1 if ragged else kv_blocks
            carry = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), carry)
            if ragged:
                carry = step(jnp.int32(kv_blocks - 1), carry, masked=True)
            acc, _, row_sum = carry
            pl.when(wg == 0)(take_turn)
            qo_smem[...] = (acc / lax.broadcast_in_dim(row_sum, acc.shape, [0])).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, pl.ds(row0, block_q), h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WARPGROUPS)
        def _load():
            plgpu.set_max_registers(40, action="decrease")
            for i in range(stages):
                rows = (b, pl.ds(i * block_kv, block_kv), h)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[i], k_ready.at[i])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[i], v_ready.at[i])

            @pl.loop(stages, kv_blocks)
            def _(j):
                slot = lax.rem(j, jnp.array(stages, j.dtype))
                rows = (b, pl.ds(j * block_kv, block_kv), h)
                plgpu.barrier_wait(k_done.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
                plgpu.barrier_wait(v_done.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

    def entry(q_ref, k_ref, v_ref, out_ref):
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(
            lambda *scratch: body(q_ref, k_ref, v_ref, out_ref, *scratch),
            plgpu.SMEM((_COMPUTE_WARPGROUPS, block_q, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=_COMPUTE_WARPGROUPS),
            plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        # q tiles fastest (CUDA's x): the programs resident together share one head's K and V (5.7 MB at 11,136
        # keys), read from L2; heads fastest (the bundled kernel's order) would stream ~3 heads' per SM wave.
        grid=(q_len // (_COMPUTE_WARPGROUPS * block_q), heads, batch),
        grid_names=("q_tiles", "heads", "batch"),
        num_threads=_COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="helios_mosaic_attention",
    )(q, k, v)
