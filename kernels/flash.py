"""Flash-attention forward in Pallas (Triton backend), written for Hopper and Helios' shapes.

Non-causal softmax attention over (batch, tokens, heads, head_dim) arrays, q and k/v of any two
lengths (self-attention over 2,940 / 4,560 / 11,040 tokens, cross-attention to 512 text tokens).

Design, one program per (q block, head, batch):

- The grid is ``(cdiv(Tq, block_q), heads, batch)``. The q-block axis is CUDA's fastest-varying
  one, so the programs running together share one head's K and V and read them from L2.
- Each program keeps its q tile, the float32 accumulator and the running row max and row sum in
  registers, and streams K and V in ``block_k`` rows (online softmax, FlashAttention-2). Logits are
  taken in base 2 (``exp2``; ``scale * log2(e)`` and the max subtraction are one FMA per score); the
  dots accumulate in float32 and ``p`` is rounded to the input dtype for the second dot, as every
  flash kernel does. kernels/README.md has the numbers behind the tile sizes and the expectations.
- Ragged tails are masked inside the kernel; nothing is padded in HBM. The ``Tk // block_k`` full K/V
  blocks run unmasked in the loop; the last partial block, if any, runs once after it with masked
  loads (rows past the end read as 0) and its columns past the end set to -inf before the softmax.
  The last q block loads with a row mask and stores with the same mask, so rows past the end are
  neither read nor written. Block sizes must be powers of two (Triton's ``arange``), the lengths
  need not be anything.
- Pallas on the CPU runs only in interpret mode; ``interpret=None`` picks it per platform at
  lowering time (``lax.platform_dependent``), so the same jitted function runs compiled on a GPU
  and interpreted on a CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from helios_jax.kernels.checks import check_dtypes, check_qkv

HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Tile sizes and Triton launch parameters; block sizes are powers of two, at least 16."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"FlashConfig.{name} = {size} must be a power of two >= 16 (Triton tiles)")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"FlashConfig: num_warps {self.num_warps} must be 1..16, a power of two, and "
                             f"num_stages {self.num_stages} at least 1")


# Starting points for H100 (one warpgroup per 64 q rows, three-deep K/V pipeline; the 64-row K
# block keeps three stages of K and V in shared memory beside the q tile at head dim 128).
# `python -m experiments.benchmarks.bench_attention --tune` sweeps the neighbours at Helios' shapes.
H100_CONFIGS = {
    64: FlashConfig(block_q=128, block_k=128, num_warps=4, num_stages=3),
    128: FlashConfig(block_q=128, block_k=64, num_warps=8, num_stages=3),
}


def default_config(head_dim: int) -> FlashConfig:
    return H100_CONFIGS[head_dim]


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    config: FlashConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """softmax(q k^T * scale) v per batch and head; q (B, Tq, N, H), k and v (B, Tk, N, H).

    ``scale`` defaults to 1/sqrt(H). ``config`` defaults to the H100 tiles for the head dim.
    ``interpret``: None runs compiled on a GPU and in Pallas interpret mode on a CPU (slow: fine
    for tests and tiny models, not for real sizes); True or False forces one.
    Forward only: differentiating through it raises (use impl "cudnn" or "xla" to train).
    """
    _check(q, k, v)
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    config = default_config(head_dim) if config is None else config
    call = functools.partial(_flash_call, scale=scale, config=config)
    if interpret is None:
        compiled, interpreted = (functools.partial(call, interpret=i) for i in (False, True))
        call = lambda q, k, v: lax.platform_dependent(q, k, v, cpu=interpreted, default=compiled)  # noqa: E731
    else:
        call = functools.partial(call, interpret=interpret)
    return forward_only(call, "flash_attention")(q, k, v)


def forward_only(call, name: str):
    """``call`` with a VJP that fails clearly (Pallas' own differentiation fails with a bare assert); ``name``
    is the kernel's, for the message."""

    @jax.custom_vjp
    def fn(q, k, v):
        return call(q, k, v)

    def backward(_, grad):
        raise NotImplementedError(
            f"{name} is forward-only (inference); for gradients use attention impl 'cudnn' or 'xla'"
        )

    fn.defvjp(lambda q, k, v: (call(q, k, v), None), backward)
    return fn


def _check(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """One clear error for arrays the kernel cannot take, before anything is traced into it."""
    check_qkv("flash_attention", q, k, v)
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"flash_attention supports head_dim in {HEAD_DIMS}; got {q.shape[-1]} "
                         f"(use attention impl 'xla' or 'cudnn' for other head sizes)")
    check_dtypes("flash_attention", q, k, v, DTYPES)


def _tile(size: int, length: int) -> int:
    """The configured tile, shrunk (to a power of two, at least 16) when the sequence is shorter."""
    return min(size, max(16, pl.next_power_of_2(length)))


def _flash_call(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, config: FlashConfig,
                interpret: bool) -> jax.Array:
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    block_q, block_k = _tile(config.block_q, q_len), _tile(config.block_k, kv_len)
    kernel = functools.partial(
        _flash_kernel,
        scale_log2=scale * _LOG2_E,
        q_len=q_len,
        kv_len=kv_len,
        block_k=block_k,
        # float32 inputs get float32 products (Triton would use tf32 otherwise); 16-bit ones the default.
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )
    q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, h, b: (b, i, h, 0))
    # One K/V block per program, rounded up to whole ``block_k`` tiles: the part past ``kv_len`` is
    # never read (masked loads), it only lets the kernel slice the last tile statically.
    kv_block = pl.cdiv(kv_len, block_k) * block_k
    kv_spec = pl.BlockSpec((None, kv_block, None, head_dim), lambda i, h, b: (b, 0, h, 0))
    itemsize = q.dtype.itemsize
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(q_len, block_q), heads, batch),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        cost_estimate=pl.CostEstimate(
            flops=4 * batch * heads * q_len * kv_len * head_dim,
            transcendentals=batch * heads * q_len * kv_len,
            bytes_accessed=(2 * q.size + 2 * k.size) * itemsize,
        ),
        interpret=interpret,
        name="helios_flash_attention",
    )(q, k, v)


def _flash_kernel(q_ref, k_ref, v_ref, o_ref, *, scale_log2: float, q_len: int, kv_len: int, block_k: int,
                  precision: lax.Precision | None) -> None:
    """One q tile against all of K and V: full K/V blocks unmasked, then the ragged tail masked."""
    block_q, head_dim = q_ref.shape
    rows_valid = (pl.program_id(0) * block_q + jnp.arange(block_q) < q_len)[:, None]
    ragged_q = q_len % block_q != 0
    q = plgpu.load(q_ref, mask=rows_valid, other=0.0) if ragged_q else q_ref[...]

    def step(carry, start, valid):
        """One K/V block from row ``start``; ``valid`` masks rows past the end (None: all valid)."""
        acc, row_max, row_sum = carry
        rows = pl.ds(start, block_k)
        if valid is None:
            k, v = k_ref[rows, :], v_ref[rows, :]
        else:
            k = plgpu.load(k_ref.at[rows, :], mask=valid[:, None], other=0.0)
            v = plgpu.load(v_ref.at[rows, :], mask=valid[:, None], other=0.0)
        scores = pl.dot(q, k, trans_b=True, precision=precision)  # (block_q, block_k) float32, unscaled
        if valid is not None:
            scores = jnp.where(valid[None, :], scores, -jnp.inf)
        # Running max in scaled base-2 units; scaling the row max instead of every score lets the
        # scale and the max subtraction fuse into one FMA per score.
        new_max = jnp.maximum(row_max, scores.max(axis=1) * scale_log2)
        correction = jnp.exp2(row_max - new_max)
        p = jnp.exp2(scores * scale_log2 - new_max[:, None])
        row_sum = row_sum * correction + p.sum(axis=1)
        acc = acc * correction[:, None] + pl.dot(p.astype(v.dtype), v, precision=precision)
        return acc, new_max, row_sum

    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    full_blocks, tail = divmod(kv_len, block_k)
    carry = lax.fori_loop(
        0, full_blocks, lambda j, c: step(c, pl.multiple_of(j * block_k, block_k), None), carry
    )
    if tail:
        start = full_blocks * block_k
        carry = step(carry, start, start + jnp.arange(block_k) < kv_len)
    acc, _, row_sum = carry
    out = (acc / row_sum[:, None]).astype(o_ref.dtype)
    if ragged_q:
        plgpu.store(o_ref, out, mask=rows_valid)
    else:
        o_ref[...] = out
