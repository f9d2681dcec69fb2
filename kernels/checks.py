"""The input checks every attention kernel makes (flash, mosaic, splash): one clear error before anything is traced."""

from __future__ import annotations

import jax


def check_qkv(name: str, q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """q (B, Tq, N, H) and k, v (B, Tk, N, H) of one batch, heads and head size, at least one query and one key."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"{name} wants q (B, Tq, N, H) and k, v (B, Tk, N, H) with the same B, N, H; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"{name} needs at least one query and one key; got Tq={q.shape[1]}, Tk={k.shape[1]}")


def check_dtypes(name: str, q: jax.Array, k: jax.Array, v: jax.Array, dtypes: tuple) -> None:
    """q, k and v of one dtype among ``dtypes``."""
    if not q.dtype == k.dtype == v.dtype or q.dtype not in dtypes:
        names = ", ".join(jax.numpy.dtype(d).name for d in dtypes)
        raise ValueError(f"{name} wants q, k, v of one dtype among {names}; got {q.dtype}, {k.dtype}, {v.dtype}")
