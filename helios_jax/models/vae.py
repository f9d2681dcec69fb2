"""The Wan VAE as a flax.linen module, equal to diffusers' ``AutoencoderKLWan``.

``WanVAE(cfg).apply({"params": params}, video, method="encode")`` gives the posterior (mean, logvar)
of a (B, C, 1 + 4k, H, W) video in [-1, 1]; ``method="decode"`` turns (B, z_dim, T, h, w) latents into
(B, C, 1 + 4(T - 1), 8h, 8w) frames clamped to [-1, 1]. Layouts are the reference's; inside, the
clips are channels-last.

How the time axis is computed
-----------------------------
The reference runs its encoder on the first frame and then on 4-frame chunks, and its decoder on one
latent frame at a time, carrying per-convolution caches of the last two input frames between calls
(``feat_cache``). Every operation other than the temporal convolutions is frame-local (norms over
channels, SiLU, attention within one frame, 2D resampling), so the loop is one pass over the whole
clip as soon as each temporal operation is written for the whole clip:

* a causal conv sees zeros for the first chunk and the cached frames after it: that is one
  convolution over the clip with two zero frames in front (``vae_blocks.causal_conv``);
* ``upsample3d`` passes the first latent frame through (its cache holds the marker "Rep") and doubles
  every later frame with ``time_conv``, whose cache starts from zeros, not from the first frame: that
  is ``time_conv`` over frames 1.. with two zero frames in front, interleaved, after frame 0;
* ``downsample3d`` passes the first frame through and, for each later chunk, convolves the last frame
  of the previous chunk with the chunk's frames at stride 2: that is frame 0 followed by one valid
  stride-2 convolution over the clip (chunks have even lengths, so the windows line up);
* Wan2.2's ``AvgDown3D`` pads each chunk to the time factor in front, which only the 1-frame first
  chunk needs: one front pad of the clip. ``DupUp3D`` drops the first frame of the first chunk only.

The whole-clip form is used rather than a ``lax.scan`` over frames with the caches as carry because
it should be the faster of the two on a GPU: each convolution is one large cuDNN call over all frames
(the decoder's last stage convolves 33 frames of 384x640 at once) instead of 9 small sequential calls
plus cache copies, and no call waits on the previous one. Helios decodes every 9-latent chunk afresh
(the reference clears its cache at each ``decode``), so no state has to cross calls. The price is
memory: all frames of a chunk are live at once; XLA's CPU plan for 9 latents at 384x640 needs about
12 GiB of scratch. experiments/benchmarks/bench_vae.py measures both on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from helios_jax.config import WAN_ENCODE_CHUNK, VAEConfig
from helios_jax.convert.keymap import KeyMap
from helios_jax.models.layers import silu
from helios_jax.models.vae_blocks import (
    MidBlock,
    Resample,
    ResidualBlock,
    ResidualDownBlock,
    ResidualUpBlock,
    RMSNorm,
    UpBlock,
    causal_conv,
)
from helios_jax.parallel.context import split_rows

Params = dict[str, Any]

# DiagonalGaussianDistribution's clamp of the log-variance.
LOGVAR_RANGE = (-30.0, 20.0)


class Posterior(NamedTuple):
    """The encoder's diagonal Gaussian (``DiagonalGaussianDistribution``), (B, z_dim, T, h, w) each."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array | None = None, *, noise: jax.Array | None = None) -> jax.Array:
        """mean + std * noise, the noise drawn from ``key`` or given (e.g. the reference's own draw)."""
        if (key is None) == (noise is None):
            raise ValueError("Posterior.sample takes exactly one of key= or noise=")
        if noise is None:
            noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        elif noise.shape != self.mean.shape:
            raise ValueError(f"Posterior.sample: noise has shape {noise.shape}, the latents {self.mean.shape}")
        return self.mean + self.std * noise.astype(self.mean.dtype)


class Encoder(nn.Module):
    """``WanEncoder3d``: channels-last clip (B, 1 + 4k, H, W, C) -> (B, 1 + k, H/8, W/8, 2 z_dim)."""

    config: VAEConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dtype = self.config, self.dtype
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        x = causal_conv(dims[0], dtype=dtype, name="conv_in")(x)
        index = 0  # Wan2.1's ``down_blocks`` is one flat list of resnets and resamplers
        for i, out_dim in enumerate(dims[1:]):
            down, temporal = i != last, cfg.temporal_level(i)
            if cfg.is_residual:
                x = ResidualDownBlock(out_dim, cfg.num_res_blocks, temporal, down, dtype, name=f"down_blocks_{i}")(x)
                continue
            for _ in range(cfg.num_res_blocks):
                x = ResidualBlock(out_dim, dtype, name=f"down_blocks_{index}")(x)
                index += 1
            if down:
                mode = "downsample3d" if temporal else "downsample2d"
                x = Resample(mode, out_dim, dtype, name=f"down_blocks_{index}")(x)
                index += 1
        x = MidBlock(dtype, name="mid_block")(x)
        x = silu(RMSNorm(name="norm_out")(x))
        return causal_conv(2 * cfg.z_dim, dtype=dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """``WanDecoder3d``: channels-last latents (B, T, h, w, z_dim) -> (B, 1 + 4(T - 1), 8h, 8w, C)."""

    config: VAEConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dtype = self.config, self.dtype
        dims = [cfg.decoder_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        last = len(cfg.dim_mult) - 1
        x = causal_conv(dims[0], dtype=dtype, name="conv_in")(x)
        # Under a mesh the rows stay split at every stage (split_rows; unchanged without one): the mid block's
        # attention gathers its keys at the latent resolution, and XLA would then run every later stage whole on
        # each chip (a TPU v5e plan: 12.6 GiB a chip, split or not), so each stage's output restates the split.
        x = split_rows(MidBlock(dtype, name="mid_block")(x), axis=2)
        for i, out_dim in enumerate(dims[1:]):
            up = i != last
            temporal = up and cfg.temporal_level(last - 1 - i)  # the encoder's levels, reversed
            if cfg.is_residual:
                x = ResidualUpBlock(out_dim, cfg.num_res_blocks + 1, temporal, up, dtype, name=f"up_blocks_{i}")(x)
            else:
                mode = ("upsample3d" if temporal else "upsample2d") if up else None
                x = UpBlock(out_dim, cfg.num_res_blocks + 1, mode, dtype, name=f"up_blocks_{i}")(x)
            x = split_rows(x, axis=2)
        x = silu(RMSNorm(name="norm_out")(x))
        return causal_conv(cfg.out_channels, dtype=dtype, name="conv_out")(x)


class WanVAE(nn.Module):
    """``AutoencoderKLWan``: ``encode(video) -> Posterior`` and ``decode(latents) -> frames``.

    ``dtype`` is the compute dtype; inputs are cast to it. The reference runs the VAE in its
    parameter dtype, so pass the dtype the params were loaded in to match it (Helios uses float32).
    Calling the module reconstructs a video through the posterior's mode.
    """

    config: VAEConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.quant_conv = causal_conv(2 * cfg.z_dim, 1, padding=0, dtype=self.dtype)
        self.post_quant_conv = causal_conv(cfg.z_dim, 1, padding=0, dtype=self.dtype)
        self.decoder = Decoder(cfg, self.dtype)

    def encode(self, video: jax.Array) -> Posterior:
        """(B, C, 1 + 4k, H, W) video in [-1, 1] -> posterior over (B, z_dim, 1 + k, H/8, W/8) latents."""
        check_video(self.config, video)
        x = _patchify(_channels_last(video.astype(self.dtype)), self.config.patch)
        moments = _channels_first(self.quant_conv(self.encoder(x)))
        mean, logvar = jnp.split(moments, 2, axis=1)
        return Posterior(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    def decode(self, latents: jax.Array, clamp: bool = True) -> jax.Array:
        """(B, z_dim, T, h, w) latents -> (B, C, 1 + 4(T - 1), 8h, 8w) frames, clamped to [-1, 1] as the
        reference's; ``clamp=False`` for training, where the clamp would stop the gradient of every frame
        value outside [-1, 1] (``helios_jax.training.autoencoder``)."""
        check_latents(self.config, latents)
        x = self.decoder(self.post_quant_conv(_channels_last(latents.astype(self.dtype))))
        frames = _channels_first(_unpatchify(x, self.config.patch))
        return jnp.clip(frames, -1.0, 1.0) if clamp else frames

    def __call__(self, video: jax.Array) -> jax.Array:
        return self.decode(self.encode(video).mode())


def _channels_last(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, 1, -1)


def _channels_first(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, -1, 1)


def _patchify(x: jax.Array, p: int) -> jax.Array:
    """The reference's ``patchify`` (channels-last): p x p pixel blocks into channels, ordered (c, w, h)."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, t, h // p, w // p, c * p * p)


def _unpatchify(x: jax.Array, p: int) -> jax.Array:
    """The inverse of :func:`_patchify` (the reference's ``unpatchify``)."""
    if p == 1:
        return x
    b, t, h, w, cpp = x.shape
    x = x.reshape(b, t, h, w, cpp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, t, h * p, w * p, cpp // (p * p))


def check_video(cfg: VAEConfig, video: jax.Array) -> None:
    """One clear error for a video ``encode`` cannot take, raised while tracing, before any compute."""
    if video.ndim != 5:
        raise ValueError(f"WanVAE.encode: the video must be (B, C, T, H, W); got shape {video.shape}")
    _, channels, frames, height, width = video.shape
    if channels != cfg.video_channels:
        raise ValueError(
            f"WanVAE.encode: the video has {channels} channels but this VAE encodes {cfg.video_channels} "
            f"(in_channels={cfg.in_channels}, patch_size={cfg.patch_size}); pass (B, C, T, H, W) RGB in [-1, 1]"
        )
    try:
        cfg.latent_frames(frames)
    except ValueError as err:
        raise ValueError(f"WanVAE.encode: {err}") from None
    ratio = cfg.spatial_compression
    if height % ratio or width % ratio:
        raise ValueError(
            f"WanVAE.encode: height x width = {height} x {width} must be multiples of {ratio}, the VAE's spatial "
            f"compression; resize or crop to {height // ratio * ratio} x {width // ratio * ratio}"
        )


def check_latents(cfg: VAEConfig, latents: jax.Array) -> None:
    """One clear error for latents ``decode`` cannot take."""
    if latents.ndim != 5 or latents.shape[1] != cfg.z_dim:
        raise ValueError(
            f"WanVAE.decode: latents must be (B, z_dim={cfg.z_dim}, T, h, w); got shape {latents.shape}"
        )


# --- What the pipelines use around the VAE --------------------------------------------------------


def _latent_stats(cfg: VAEConfig, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """latents_mean and 1 / latents_std as the pipelines build them: cast to ``dtype``, then the reciprocal."""
    shape = (1, cfg.z_dim, 1, 1, 1)
    mean = jnp.asarray(cfg.latents_mean, jnp.float32).reshape(shape).astype(dtype)
    inv_std = 1.0 / jnp.asarray(cfg.latents_std, jnp.float32).reshape(shape).astype(dtype)
    return mean, inv_std


def normalize_latents(cfg: VAEConfig, latents: jax.Array) -> jax.Array:
    """VAE latents -> the diffusion model's latents: ``(z - latents_mean) * (1 / latents_std)``."""
    mean, inv_std = _latent_stats(cfg, latents.dtype)
    return (latents - mean) * inv_std


def denormalize_latents(cfg: VAEConfig, latents: jax.Array) -> jax.Array:
    """The inverse of :func:`normalize_latents`, written as the pipelines do: ``z / (1 / std) + mean``."""
    mean, inv_std = _latent_stats(cfg, latents.dtype)
    return latents / inv_std + mean


def frames_to_unit(frames: jax.Array) -> jax.Array:
    """Decoded (B, C, T, H, W) frames in [-1, 1] -> (B, T, H, W, C) float32 in [0, 1].

    As diffusers' ``VideoProcessor.postprocess_video(output_type="np")``: ``x * 0.5 + 0.5`` clamped to
    [0, 1] in the frames' dtype.
    """
    return jnp.moveaxis(jnp.clip(frames * 0.5 + 0.5, 0.0, 1.0).astype(jnp.float32), 1, -1)


def frames_to_uint8(frames: jax.Array) -> jax.Array:
    """Decoded (B, C, T, H, W) frames in [-1, 1] -> (B, T, H, W, C) uint8, on the device.

    As diffusers' ``VideoProcessor.postprocess_video`` with ``output_type="pil"``: :func:`frames_to_unit`,
    then ``round(x * 255)`` in float32 (half to even). Note that ``diffusers.utils.export_to_video``
    given float frames truncates instead of rounding.
    """
    return jnp.round(frames_to_unit(frames) * 255.0).astype(jnp.uint8)


FRAME_OUTPUTS = {"uint8": frames_to_uint8, "float": frames_to_unit}


@dataclasses.dataclass(frozen=True)
class ChunkDecoder:
    """The jit-compiled ``(params, normalized latents) -> frames`` Helios runs after each chunk (see
    :func:`chunk_decoder`); ``decoder(params, latents)`` runs it, ``decoder.lower(params, latents)`` lowers it.

    It is the static argument of one module-level jitted function, so it hashes and compares by value
    (config, dtype, output): two decoders of the same VAE share their compiled programs."""

    config: VAEConfig
    dtype: Any = jnp.float32
    output: str = "uint8"

    def __post_init__(self) -> None:
        if self.output not in FRAME_OUTPUTS:
            raise ValueError(f"output = {self.output!r}: expected one of {tuple(FRAME_OUTPUTS)}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))  # jnp.float32 and np.dtype("float32") hash apart

    def __call__(self, params: Params, latents: jax.Array) -> jax.Array:
        return _decode_chunk(self, params, latents)

    def lower(self, params: Params, latents: jax.Array) -> jax.stages.Lowered:
        return _decode_chunk.lower(self, params, latents)


@functools.partial(jax.jit, static_argnums=0)
def _decode_chunk(decoder: ChunkDecoder, params: Params, latents: jax.Array) -> jax.Array:
    latents = split_rows(denormalize_latents(decoder.config, latents.astype(decoder.dtype)), axis=3)
    frames = WanVAE(decoder.config, decoder.dtype).apply({"params": params}, latents, method=WanVAE.decode)
    return FRAME_OUTPUTS[decoder.output](frames)


def chunk_decoder(cfg: VAEConfig, dtype: Any = jnp.float32, output: str = "uint8") -> ChunkDecoder:
    """The jit-compiled ``(params, normalized latents) -> frames`` Helios runs after each chunk.

    Undoes the latent normalisation, decodes and converts to (B, 1 + 4(T - 1), H, W, C) frames in one
    compiled program, so only the finished frames leave the device: ``output`` "uint8", or "float" for
    float32 in [0, 1]. It compiles once per latent shape (9 frames for every Helios chunk), and once per
    process: decoders of the same ``(cfg, dtype, output)`` are equal and share it. Converting chunk by
    chunk equals the reference's conversion of the concatenated video, as it is elementwise. Under a
    mesh with ``context`` or ``tensor`` > 1 (``jax.set_mesh``) the decode is split by rows over them
    (``parallel.context.split_rows``).
    """
    return ChunkDecoder(cfg, dtype, output)


@dataclasses.dataclass(frozen=True)
class VideoEncoder:
    """The jit-compiled ``(params, video) -> Posterior`` of ``WanVAE(config, dtype)`` (see :func:`video_encoder`);
    like :class:`ChunkDecoder`, the static argument of a module-level jitted function, compared by value."""

    config: VAEConfig
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    def __call__(self, params: Params, video: jax.Array) -> Posterior:
        return _encode_video(self, params, video)


@functools.partial(jax.jit, static_argnums=0)
def _encode_video(encoder: VideoEncoder, params: Params, video: jax.Array) -> Posterior:
    return WanVAE(encoder.config, encoder.dtype).apply({"params": params}, video, method=WanVAE.encode)


@functools.partial(jax.jit, static_argnums=0)
def encode_sample(cfg: VAEConfig, params: Params, video: jax.Array, key: jax.Array) -> jax.Array:
    """``video`` (B, 3, T, H, W) in [-1, 1] -> a sample of its posterior, normalised: the diffusion model's latents
    as the official training offload stores them. Compiled once per (config, shape) and process (``cfg`` is a
    frozen dataclass, compared by value)."""
    posterior = WanVAE(cfg).apply({"params": params}, video, method=WanVAE.encode)
    return normalize_latents(cfg, posterior.sample(key))


def video_encoder(cfg: VAEConfig, dtype: Any = jnp.float32) -> VideoEncoder:
    """The jit-compiled ``(params, video) -> Posterior`` the pipeline encodes images and videos with, compiled
    once per video shape and process: encoders of the same ``(cfg, dtype)`` are equal and share it."""
    return VideoEncoder(cfg, dtype)


# --- Params ---------------------------------------------------------------------------------------


def keymap(cfg: VAEConfig) -> KeyMap:
    """How diffusers' state-dict keys land in this module's params: the generic rule, nothing stacked."""
    return KeyMap()


def keeps_fp32(path: tuple[str, ...]) -> bool:
    """``AutoencoderKLWan`` keeps no module in float32 (``_keep_in_fp32_modules`` is None)."""
    return False


def _init_video(cfg: VAEConfig) -> jax.Array:
    """The smallest video that reaches every parameter: 1 + 4 frames, so that every temporal
    resampling sees more than the first frame and builds its ``time_conv``."""
    size = cfg.spatial_compression
    return jnp.zeros((1, cfg.video_channels, 1 + WAN_ENCODE_CHUNK, size, size))


def init_params(cfg: VAEConfig, key: jax.Array) -> Params:
    """Random float32 params (flax initialisers)."""
    return WanVAE(cfg).init(key, _init_video(cfg))["params"]


def param_shapes(cfg: VAEConfig) -> Params:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
