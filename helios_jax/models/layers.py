"""Small layers shared by the models: norms computed in float32, float32 activations, a LoRA-aware linear.

The reference computes its norms and activations in float32 even for bf16 tensors (``FP32LayerNorm``,
``torch.nn.RMSNorm``'s upcast, bf16 GELU/SiLU kernels that work in float32); these helpers do the same.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from helios_jax.convert.lora_format import LoraFormatError
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
    _check_factors(module, a.shape, b.shape)
    h = project(inputs.astype(a.dtype), a)
    out = jnp.einsum("...r,ro->...o", h, b.reshape(b.shape[-2:]))
    return out * (1.0 if lora_scale is None else lora_scale)


def _check_factors(module: nn.Module, a: tuple[int, ...], b: tuple[int, ...]) -> None:
    """A LoRA tree handed to ``apply`` that does not fit the base is one error naming the module and the shapes
    (flax would fail deep inside the trace): A is (*window, fan_in, r), B (..., r, fan_out) for a base
    kernel (*window, fan_in, fan_out), or an fp8 kernel (fan_out, fan_in)."""
    if module.has_variable("params", "kernel"):
        *fan_in, fan_out = module.get_variable("params", "kernel").shape
    else:
        fan_out, *fan_in = module.get_variable("params", fp8.KERNEL).shape
    if tuple(a[:-1]) != tuple(fan_in) or b[-1] != fan_out or b[-2] != a[-1]:
        raise LoraFormatError(f"LoRA {'/'.join(map(str, module.path))}: lora_A {tuple(a)}, lora_B {tuple(b)}; the "
                              f"model needs lora_A ({', '.join(map(str, fan_in))}, r) and lora_B (r, {fan_out})")


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
