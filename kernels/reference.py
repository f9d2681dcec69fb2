"""Float32 softmax attention for checking kernels on the device, at any length.

One head at a time (``lax.map``), so 11,040 x 11,040 logits take 0.5 GB instead of 40 heads' 20 GB;
full-precision matmuls, so its own error (~1e-6) is far below any bf16 kernel's (~3e-3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v in float32; q (B, Tq, N, H), k and v (B, Tk, N, H); float32 out."""

    def one_head(qkv: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        q, k, v = (x.astype(jnp.float32) for x in qkv)
        logits = jnp.einsum("qh,kh->qk", q, k, precision="highest") * q.shape[-1] ** -0.5
        return jnp.einsum("qk,kh->qh", jax.nn.softmax(logits, axis=-1), v, precision="highest")

    # (B, T, N, H) -> (B*N, T, H), one head per map step, and back.
    heads = [x.transpose(0, 2, 1, 3).reshape(-1, *x.shape[1:2], x.shape[3]) for x in (q, k, v)]
    out = jax.lax.map(one_head, tuple(heads))
    return out.reshape(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(0, 2, 1, 3)
