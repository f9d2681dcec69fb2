"""The blocks of the Wan VAE (diffusers' ``autoencoder_kl_wan.py``), each applied to a whole clip.

Every block takes and returns channels-last clips ``(B, T, H, W, C)`` and computes all T frames in
one pass; :mod:`helios_jax.models.vae` explains why that equals the reference's frame-by-frame loop
with its feature cache. The submodule and parameter names are the reference's (``conv1``,
``resample_1``, ``time_conv``, ``gamma``), so the params tree mirrors the state dict.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from helios_jax.models.attention import attention
from helios_jax.models.layers import silu

_F32 = jnp.float32
# A causal conv of at least this many FLOPs (about 2 x its output voxels x kernel size) runs as 2D on a CPU
# (CausalConv3d).
TIME_TAPS_FLOPS = 10**8


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(value)


def causal_conv(
    features: int,
    kernel: int | Sequence[int] = 3,
    *,
    padding: int | Sequence[int] = 1,
    strides: int | Sequence[int] = 1,
    dtype: Any = None,
    name: str | None = None,
) -> "CausalConv3d":
    """``WanCausalConv3d`` over a whole clip: 2·p zero frames before the first frame and none after it
    (each output frame sees only the present and the past), p pixels of zeros on each spatial side."""
    return CausalConv3d(features, _triple(kernel), _triple(strides), _triple(padding), dtype, name=name)


class CausalConv3d(nn.Module):
    """A causal 3D convolution with ``nn.Conv``'s params (``kernel`` (kt, kh, kw, in, out), ``bias``), init and
    dtype promotion, so the params tree is the one a ``nn.Conv`` made.

    XLA's CPU backend has a fast convolution for 2D images only; a 3D one is emitted as a plain loop nest: a
    3x3x3 conv of (8, 11, 64, 64, 8) took 0.25 s as 3D and 0.065 s as :func:`_conv_time_taps` (one 2D conv of
    the time taps stacked in channels), its gradient 0.76 s and 0.17 s, and the nano VAE's training step
    (batch 8 x 9 frames x 64x64) 12 s and 3.5 s on two cores. The 2D form compiles about 1.5x slower, though,
    so on a CPU, and only there, a convolution of at least TIME_TAPS_FLOPS runs as 2D, where its run time
    outweighs its compile; smaller ones (the tests' clips) and other backends (a GPU's cuDNN) run the 3D
    convolution unchanged."""

    features: int
    kernel_size: tuple[int, int, int]
    strides: tuple[int, int, int]
    padding: tuple[int, int, int]
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel_size, x.shape[-1], self.features),
                            _F32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), _F32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        pt, ph, pw = self.padding
        padding = ((2 * pt, 0), (ph, ph), (pw, pw))
        as_3d = functools.partial(_conv_3d, strides=self.strides, padding=padding)
        flops = 2 * (x.size // x.shape[-1]) * kernel.size // math.prod(self.strides)
        if flops < TIME_TAPS_FLOPS:
            return as_3d(x, kernel) + bias
        as_2d = functools.partial(_conv_time_taps, strides=self.strides, padding=padding)
        return jax.lax.platform_dependent(x, kernel, cpu=as_2d, default=as_3d) + bias


def _conv_3d(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int, int],
             padding: tuple[tuple[int, int], ...]) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def _conv_time_taps(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int, int],
                    padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """The same convolution as :func:`_conv_3d`, as one 2D convolution over (B x T_out) frames whose channels are
    the kt frames each output frame sees (tap-major), against the kernel with its time axis folded into its
    input channels the same way."""
    kt, kh, kw, cin, cout = kernel.shape
    st, sh, sw = strides
    x = jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0), (0, 0)))
    b, frames, h, w, _ = x.shape
    t_out = (frames - kt) // st + 1
    taps = jnp.concatenate([x[:, i:i + st * (t_out - 1) + 1:st] for i in range(kt)], axis=-1)
    folded = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * cin, cout)
    y = jax.lax.conv_general_dilated(taps.reshape(b * t_out, h, w, kt * cin), folded, (sh, sw), padding[1:],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, t_out, *y.shape[1:])


class RMSNorm(nn.Module):
    """``WanRMS_norm``: ``F.normalize`` over channels (x / max(|x|, 1e-12), in float32 for half
    inputs), rounded to the input dtype, then times sqrt(C) and ``gamma``, rounding after each product
    as the reference does. ``gamma`` keeps the reference's channel-first shape, (C, 1, 1) for images
    and (C, 1, 1, 1) for clips, so checkpoints map one to one."""

    images: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        shape = (dim, 1, 1) if self.images else (dim, 1, 1, 1)
        gamma = self.param("gamma", nn.initializers.ones, shape, _F32)
        xf = x.astype(_F32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        y = (xf / jnp.maximum(norm, 1e-12)).astype(x.dtype)
        y = (y.astype(_F32) * dim**0.5).astype(x.dtype)
        return y * gamma.reshape(dim).astype(x.dtype)


class ResidualBlock(nn.Module):
    """``WanResidualBlock``: (norm, SiLU, causal 3x3x3 conv) twice, plus a 1x1x1 conv shortcut when
    the channel count changes."""

    out_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        if x.shape[-1] != self.out_dim:
            shortcut = causal_conv(self.out_dim, 1, padding=0, dtype=self.dtype, name="conv_shortcut")(x)
        x = causal_conv(self.out_dim, dtype=self.dtype, name="conv1")(silu(RMSNorm(name="norm1")(x)))
        x = causal_conv(self.out_dim, dtype=self.dtype, name="conv2")(silu(RMSNorm(name="norm2")(x)))
        return x + shortcut


class AttentionBlock(nn.Module):
    """``WanAttentionBlock``: single-head self-attention over the pixels of each frame separately."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        qkv = nn.Conv(3 * c, (1, 1), dtype=self.dtype, name="to_qkv")(RMSNorm(images=True, name="norm")(x))
        q, k, v = (part.reshape(b * t, h * w, 1, c) for part in jnp.split(qkv, 3, axis=-1))
        # Head dim = C (384 in Wan2.1) is beyond cuDNN's fused kernels, hence the XLA backend.
        out = attention(q, k, v, impl="xla").reshape(b, t, h, w, c)
        return nn.Conv(c, (1, 1), dtype=self.dtype, name="proj")(out) + x


class MidBlock(nn.Module):
    """``WanMidBlock`` with one attention layer: resnet, attention, resnet."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = ResidualBlock(dim, self.dtype, name="resnets_0")(x)
        x = AttentionBlock(self.dtype, name="attentions_0")(x)
        return ResidualBlock(dim, self.dtype, name="resnets_1")(x)


class Resample(nn.Module):
    """``WanResample``: spatial 2x up/down-sampling of every frame, and for the ``*3d`` modes 2x in time.

    Temporal upsampling (``upsample3d``) leaves the first frame alone and turns every later frame t into
    two frames through ``time_conv``, a causal (3, 1, 1) conv that sees zeros in place of the first
    frame: T -> 1 + 2(T - 1). Temporal downsampling (``downsample3d``) keeps the first frame and follows
    it with a stride-2 (3, 1, 1) conv over all frames without padding: 1 + 2m -> 1 + m.
    """

    mode: str
    out_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        if self.mode == "upsample3d" and x.shape[1] > 1:
            later = causal_conv(2 * dim, (3, 1, 1), padding=(1, 0, 0), dtype=self.dtype, name="time_conv")(x[:, 1:])
            b, t, h, w, _ = later.shape
            later = later.reshape(b, t, h, w, 2, dim).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, dim)
            x = jnp.concatenate([x[:, :1], later], axis=1)
        if self.mode.startswith("upsample"):
            x = _nearest_2x(x)
            return nn.Conv(self.out_dim, (3, 3), padding=1, dtype=self.dtype, name="resample_1")(x)
        # nn.ZeroPad2d((0, 1, 0, 1)) then a valid stride-2 conv: one row and column of zeros after the image.
        x = nn.Conv(self.out_dim, (3, 3), strides=2, padding=((0, 1), (0, 1)), dtype=self.dtype, name="resample_1")(x)
        if self.mode == "downsample3d" and x.shape[1] > 1:
            later = causal_conv(self.out_dim, (3, 1, 1), padding=0, strides=(2, 1, 1), dtype=self.dtype,
                                name="time_conv")(x)
            x = jnp.concatenate([x[:, :1], later], axis=1)
        return x


def _nearest_2x(x: jax.Array) -> jax.Array:
    """2x nearest-neighbour upsampling of H and W (``nearest-exact`` at an integer factor)."""
    b, t, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, :, None, :, None, :], (b, t, h, 2, w, 2, c))
    return x.reshape(b, t, 2 * h, 2 * w, c)


def avg_down(x: jax.Array, out_dim: int, factor_t: int, factor_s: int) -> jax.Array:
    """``AvgDown3D``: fold time and space blocks into channels, then average groups of channels.

    Frames are zero-padded at the front to a multiple of ``factor_t``, as the reference pads each chunk.
    """
    pad_t = (factor_t - x.shape[1] % factor_t) % factor_t
    x = jnp.pad(x, ((0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)))
    b, t, h, w, c = x.shape
    tt, hh, ww = t // factor_t, h // factor_s, w // factor_s
    x = x.reshape(b, tt, factor_t, hh, factor_s, ww, factor_s, c)
    # The reference's channel order is (c, factor_t, factor_s (h), factor_s (w)).
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, tt, hh, ww, c * factor_t * factor_s**2)
    return x.reshape(b, tt, hh, ww, out_dim, -1).mean(axis=-1)


def dup_up(x: jax.Array, out_dim: int, factor_t: int, factor_s: int) -> jax.Array:
    """``DupUp3D``: repeat channels and unfold them into time and space blocks; the first
    ``factor_t - 1`` frames are dropped, as the reference does for the first chunk."""
    b, t, h, w, c = x.shape
    repeats = out_dim * factor_t * factor_s**2 // c
    x = jnp.repeat(x, repeats, axis=-1).reshape(b, t, h, w, out_dim, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * factor_t, h * factor_s, w * factor_s, out_dim)
    return x[:, factor_t - 1 :]


class ResidualDownBlock(nn.Module):
    """``WanResidualDownBlock`` (Wan2.2's encoder): resnets and a downsampler plus an ``avg_down`` shortcut."""

    out_dim: int
    num_res_blocks: int
    temporal: bool
    down: bool
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = avg_down(x, self.out_dim, 2 if self.temporal else 1, 2 if self.down else 1)
        for i in range(self.num_res_blocks):
            x = ResidualBlock(self.out_dim, self.dtype, name=f"resnets_{i}")(x)
        if self.down:
            mode = "downsample3d" if self.temporal else "downsample2d"
            x = Resample(mode, self.out_dim, self.dtype, name="downsampler")(x)
        return x + shortcut


class UpBlock(nn.Module):
    """``WanUpBlock`` (Wan2.1's decoder): resnets, then an upsampler that halves the channels."""

    out_dim: int
    num_resnets: int
    upsample_mode: str | None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_resnets):
            x = ResidualBlock(self.out_dim, self.dtype, name=f"resnets_{i}")(x)
        if self.upsample_mode is not None:
            x = Resample(self.upsample_mode, self.out_dim // 2, self.dtype, name="upsamplers_0")(x)
        return x


class ResidualUpBlock(nn.Module):
    """``WanResidualUpBlock`` (Wan2.2's decoder): resnets and an upsampler plus a ``dup_up`` shortcut."""

    out_dim: int
    num_resnets: int
    temporal: bool
    up: bool
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = dup_up(x, self.out_dim, 2 if self.temporal else 1, 2) if self.up else None
        for i in range(self.num_resnets):
            x = ResidualBlock(self.out_dim, self.dtype, name=f"resnets_{i}")(x)
        if self.up:
            mode = "upsample3d" if self.temporal else "upsample2d"
            x = Resample(mode, self.out_dim, self.dtype, name="upsampler")(x) + shortcut
        return x
