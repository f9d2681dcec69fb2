"""The one attention entry point of the package; every model calls this and no kernel directly.

``impl`` picks the backend: ``"xla"`` (runs everywhere), ``"cudnn"`` (cuDNN flash attention through
``jax.nn.dot_product_attention``, GPU only, bf16/fp16), ``"pallas"`` (our flash-attention kernel,
``helios_jax.kernels.flash_attention``: compiled through Triton on a GPU; on a CPU it runs in Pallas
interpret mode, correct but slow, so that tests and tiny models can use it anywhere). Switching
backends is a change of one string, so a model can be compared across backends without touching its code.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from helios_jax.kernels import flash_attention

Impl = Literal["xla", "cudnn", "pallas"]
IMPLS: tuple[str, ...] = ("xla", "cudnn", "pallas")


def default_impl(dtype, platform: str | None = None) -> str:
    """cuDNN flash attention where it applies (a GPU, 16-bit inputs), else XLA's.

    ``platform`` ("gpu", "cpu", ...) is the device the program is for, by default JAX's default backend;
    a plan compiled here for a GPU that is not here (experiments/gpu_plan.py) names it.

    XLA's attention materialises the (heads, tokens, tokens) logits in float32: 19.5 GB per layer at
    Helios' 11,040-token stage, which is why a GPU run should never default to it.
    """
    on_gpu = (platform or jax.default_backend()) in ("gpu", "cuda")
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
) -> jax.Array:
    """Non-causal softmax attention, layout (batch, tokens, heads, head_dim), scale 1/sqrt(head_dim).

    q may have a different token count from k and v (cross-attention); the output has q's shape.
    ``bias`` is added to the logits and ``mask`` (True = attend) removes keys; both broadcast to
    (batch, heads, q tokens, k tokens). Logits and softmax are float32 whatever the input dtype
    (for float16 on a CPU, see ``_xla_float16``).
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention wants q (B, Tq, N, H) and k, v (B, Tk, N, H); got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if impl == "pallas":
        if bias is not None or mask is not None:
            raise ValueError("the pallas attention kernel takes no bias or mask; use impl='xla' or 'cudnn' for them")
        return flash_attention(q, k, v, scale=scale)
    if impl == "xla" and q.dtype == jnp.float16:
        return _xla_float16(q, k, v, bias, mask, scale)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl)


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
