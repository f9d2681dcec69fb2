"""Small layers shared by the models: norms computed in float32, float32 activations, a LoRA-aware linear.

The reference computes its norms and activations in float32 even for bf16 tensors (``FP32LayerNorm``,
``torch.nn.RMSNorm``'s upcast, bf16 GELU/SiLU kernels that work in float32); these helpers do the same.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from helios_jax.models import fp8

_F32 = jnp.float32


def in_fp32(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """``fn`` evaluated in float32 and cast back to x's dtype (one rounding, as torch's kernels do)."""
    return fn(x.astype(_F32)).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return in_fp32(lambda v: jax.nn.gelu(v, approximate=True), x)


def silu(x: jax.Array) -> jax.Array:
    return in_fp32(jax.nn.silu, x)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """Layer norm over the last axis without affine terms, in float32 (two-pass variance)."""
    x = x.astype(_F32)
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)


class LayerNorm(nn.Module):
    """``FP32LayerNorm``: float32 statistics and affine terms; returns float32."""

    eps: float
    affine: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(x, self.eps)
        if self.affine:
            dim = x.shape[-1]
            y = y * self.param("scale", nn.initializers.ones, (dim,), _F32).astype(_F32)
            y = y + self.param("bias", nn.initializers.zeros, (dim,), _F32).astype(_F32)
        return y


class RMSNorm(nn.Module):
    """``torch.nn.RMSNorm`` with a weight: float32 math, weight applied in float32, cast back once."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), _F32)
        xf = x.astype(_F32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(_F32)).astype(x.dtype)


def lora_delta(module: nn.Module, inputs: jax.Array, lora_scale: float | jax.Array | None,
               project: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array | None:
    """``scale * B(A(x))`` from the module's ``lora`` collection (``lora_A``/``lora_B`` kernels), or None.

    PEFT's arithmetic: the input is cast to the LoRA factors' dtype, A then B, times the scale.
    ``project(x, A)`` applies A (a matmul for a linear layer, a strided patch conv for a patch embedding).
    """
    if not module.has_variable("lora", "lora_A"):
        return None
    a = module.get_variable("lora", "lora_A")["kernel"]
    b = module.get_variable("lora", "lora_B")["kernel"]
    h = project(inputs.astype(a.dtype), a)
    out = jnp.einsum("...r,ro->...o", h, b.reshape(b.shape[-2:]))
    return out * (1.0 if lora_scale is None else lora_scale)


class Dense(nn.Dense):
    """``nn.Dense`` that also applies a LoRA from the ``lora`` collection, if one is given.

    ``y = x W + b + scale * (x A) B`` without forming ``W + A B``; the sum is cast back to the base output's
    dtype as PEFT does. Without a ``lora`` collection this is exactly ``nn.Dense``. Params with an
    ``fp8_kernel`` in place of the kernel run as an fp8 GEMM (``helios_jax.models.fp8``).
    """

    @nn.compact
    def __call__(self, inputs: jax.Array, lora_scale: float | jax.Array | None = None) -> jax.Array:
        y = fp8.dense(self, inputs, self.use_bias) if fp8.is_quantized(self) else super().__call__(inputs)
        delta = lora_delta(self, inputs, lora_scale, lambda x, a: jnp.einsum("...i,ir->...r", x, a))
        return y if delta is None else (y + delta).astype(y.dtype)
