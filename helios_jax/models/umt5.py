"""The UMT5 text encoder as a flax.linen module, equal to transformers' ``UMT5EncoderModel``.

``UMT5Encoder(cfg).apply({"params": params}, input_ids, attention_mask)`` returns the last hidden
state (B, L, d_model). What sets UMT5 apart from T5: every layer has its own relative position bias
(T5 shares the first layer's), and the attention logits are not scaled by 1/sqrt(d_kv). The rest is
T5: RMS layer norms without mean or bias, a gated tanh-GELU feed-forward, pre-norm residual blocks and
a final layer norm. With ``model_type`` "t5" the same module is transformers' ``T5EncoderModel``: one
relative position bias table (stored in the first layer, ``encoder/relative_attention_bias`` here) serves
every layer, and ``feed_forward_proj`` "relu" gives T5's ReLU feed-forward (``wi``, ``wo``). The layers run under ``nn.scan`` with params stacked on a leading layer axis, the
relative attention bias tables included, so the 24-layer umt5-xxl compiles once per shape.

The params tree mirrors the reference state dict (``encoder/block/layer_0/SelfAttention/q/kernel``).
The token embedding is ``encoder/embed_tokens``: the table the reference encoder embeds with, tied to
``shared`` (checkpoints written by ``save_pretrained`` store it once, as ``shared.weight``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.config import UMT5Config
from helios_jax.convert.keymap import KeyMap
from helios_jax.models.attention import attention
from helios_jax.models.layers import gelu_tanh
from helios_jax.models.offload import scan_streamed, take_rows

_F32 = jnp.float32
_HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
# The reference keeps these in float32 when it loads in float16 (``_keep_in_fp32_modules``; not for bf16).
KEEP_IN_FP32_FOR_FP16 = ("wo",)
# Where T5 stores its one relative position bias table: in the first layer, which computes the bias for all.
_T5_BIAS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """The (length, length) bucket of every (query, key) pair of a bidirectional UMT5 attention.

    Host-side numpy in float32, step for step as the reference computes it in torch, so that
    positions on a bucket boundary (16, 32, 64 for umt5-xxl) land in the same bucket.
    """
    position = np.arange(length)
    relative = position[None, :] - position[:, None]  # key - query
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    is_small = distance < max_exact
    with np.errstate(divide="ignore"):  # log(0) on the exact (small) distances, which np.where discards
        ratio = np.log(distance.astype(np.float32) / np.float32(max_exact)) / np.float32(
            math.log(max_distance / max_exact)
        )
    log_bucket = np.where(is_small, 0, ratio * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(max_exact + log_bucket, half - 1)
    return (buckets + np.where(is_small, distance, large)).astype(np.int32)


class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias; float32 statistics, and the result in the weight's dtype when
    that is a half type (else the promoted dtype), as the reference's ``UMT5LayerNorm``."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), _F32)
        variance = jnp.mean(jnp.square(x.astype(_F32)), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(variance + self.eps)
        if scale.dtype in _HALF:
            y = y.astype(scale.dtype)
        return scale * y


class SelfAttention(nn.Module):
    """Multi-head self-attention with this layer's relative position bias and no logit scaling."""

    config: UMT5Config
    impl: str

    @nn.compact
    def __call__(self, x: jax.Array, position: jax.Array, mask: jax.Array) -> jax.Array:
        """``position``: the (L, L) buckets (UMT5: this layer's own bias table reads them) or, for T5, the
        (1, heads, L, L) bias shared by all layers."""
        cfg = self.config
        batch, length, _ = x.shape

        def heads(name: str) -> jax.Array:
            return nn.Dense(cfg.inner_dim, use_bias=False, name=name)(x).reshape(batch, length, cfg.num_heads, cfg.d_kv)

        q, k, v = heads("q"), heads("k"), heads("v")
        bias = position if cfg.shared_relative_bias else relative_bias(cfg, position)
        out = attention(q, k, v, impl=self.impl, scale=1.0, bias=bias, mask=mask)
        return nn.Dense(cfg.d_model, use_bias=False, name="o")(out.reshape(batch, length, cfg.inner_dim))


def relative_bias(cfg: UMT5Config, buckets: jax.Array) -> jax.Array:
    """The (1, heads, L, L) relative position bias from a bucket table declared in the calling module."""
    table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, name="relative_attention_bias")
    return table(buckets).transpose(2, 0, 1)[None]


class SelfAttentionLayer(nn.Module):
    """``UMT5LayerSelfAttention``: pre-norm attention with a residual."""

    config: UMT5Config
    impl: str

    @nn.compact
    def __call__(self, x: jax.Array, position: jax.Array, mask: jax.Array) -> jax.Array:
        h = T5LayerNorm(self.config.layer_norm_epsilon, name="layer_norm")(x)
        return x + SelfAttention(self.config, self.impl, name="SelfAttention")(h, position, mask)


class GatedFeedForward(nn.Module):
    """``UMT5DenseGatedActDense``: wo(gelu_tanh(wi_0 x) * wi_1 x). The GELU is evaluated in float32 and
    rounded once (the reference's python GELU rounds after every op in half precision)."""

    config: UMT5Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = gelu_tanh(nn.Dense(cfg.d_ff, use_bias=False, name="wi_0")(x))
        h = gate * nn.Dense(cfg.d_ff, use_bias=False, name="wi_1")(x)
        return nn.Dense(cfg.d_model, use_bias=False, name="wo")(h)  # a float32 wo promotes h, as the reference casts


class ReluFeedForward(nn.Module):
    """``T5DenseActDense`` with ReLU: wo(relu(wi x))."""

    config: UMT5Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(nn.Dense(self.config.d_ff, use_bias=False, name="wi")(x))
        return nn.Dense(self.config.d_model, use_bias=False, name="wo")(h)  # a float32 wo promotes h, as above


class FeedForwardLayer(nn.Module):
    """``UMT5LayerFF``: pre-norm feed-forward with a residual."""

    config: UMT5Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = T5LayerNorm(self.config.layer_norm_epsilon, name="layer_norm")(x)
        ff = GatedFeedForward if self.config.gated else ReluFeedForward
        return x + ff(self.config, name="DenseReluDense")(h)


class UMT5Block(nn.Module):
    """One encoder layer (``UMT5Block``), the body of the scan: (x, position, mask) -> (x, None)."""

    config: UMT5Config
    impl: str

    @nn.compact
    def __call__(self, x: jax.Array, position: jax.Array, mask: jax.Array) -> tuple[jax.Array, None]:
        x = SelfAttentionLayer(self.config, self.impl, name="layer_0")(x, position, mask)
        return FeedForwardLayer(self.config, name="layer_1")(x), None


class UMT5Stack(nn.Module):
    """``UMT5Stack`` of an encoder: embedding, scanned layers, final norm."""

    config: UMT5Config
    impl: str
    remat: bool
    offload: bool = False

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        streamed = self.offload and not self.is_initializing()
        if streamed:
            if self.remat:
                raise ValueError("UMT5Encoder: offload is for inference; it cannot be combined with remat")
            x = take_rows(self.variables["params"]["embed_tokens"]["embedding"], input_ids)
        else:
            x = nn.Embed(cfg.vocab_size, cfg.d_model, name="embed_tokens")(input_ids)
        if x.dtype == jnp.float16:
            # Loaded in float16, the reference keeps ``wo`` in float32, which turns the residual stream float32
            # from the first feed-forward on (and its float16 overflow clamps idle). A scan carries one dtype,
            # so the stream is float32 from the start here.
            x = x.astype(_F32)
        length = input_ids.shape[1]
        buckets = jnp.asarray(
            relative_position_buckets(length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
        )
        position = relative_bias(cfg, buckets) if cfg.shared_relative_bias else buckets
        mask = attention_mask.astype(bool)[:, None, None, :]  # keys only: padded queries still attend
        if streamed:
            layer = UMT5Block(cfg, self.impl, parent=None)
            x = scan_streamed(lambda x, params, _: layer.apply({"params": params}, x, position, mask)[0], x,
                              self.variables["params"]["block"], cfg.num_layers)
            return T5LayerNorm(cfg.layer_norm_epsilon, name="final_layer_norm")(x)
        block = nn.remat(UMT5Block) if self.remat else UMT5Block
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, self.impl, name="block")
        x, _ = layers(x, position, mask)
        return T5LayerNorm(cfg.layer_norm_epsilon, name="final_layer_norm")(x)


class UMT5Encoder(nn.Module):
    """``UMT5EncoderModel``: token ids (B, L) and a 0/1 attention mask (B, L) -> last hidden state.

    ``attention_impl`` picks the attention backend (see ``helios_jax.models.attention``); ``remat``
    recomputes each layer's activations in the backward pass (for training). ``offload`` (inference): the
    token embedding and the stacked layers are in host memory (:func:`is_hosted_leaf`,
    ``helios_jax.models.offload``): the embedding's rows are fetched per token, the layers a layer ahead.
    """

    config: UMT5Config
    attention_impl: str = "xla"
    remat: bool = False
    offload: bool = False

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        if input_ids.ndim != 2:
            raise ValueError(f"UMT5Encoder: input_ids must be (batch, tokens); got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"UMT5Encoder: attention_mask {attention_mask.shape} must have the shape of input_ids {input_ids.shape}"
            )
        return UMT5Stack(self.config, self.attention_impl, self.remat, self.offload, name="encoder")(
            input_ids, attention_mask)


def is_hosted_leaf(path: tuple[str, ...]) -> bool:
    """The leaves offloading keeps in host memory: the token embedding (umt5-xxl: 1.05B of its 5.7B weights) and
    the stacked layers; the final norm (and T5's one bias table) stay on the device."""
    return tuple(path[:2]) in (("encoder", "block"), ("encoder", "embed_tokens"))


def keymap(cfg: UMT5Config) -> KeyMap:
    """How transformers' state-dict keys land in this module's params (see ``helios_jax.convert.keymap``)."""
    return KeyMap(
        stacked=(("encoder.block", cfg.num_layers),),
        literal=("wi_0", "wi_1"),
        tied=(("encoder.embed_tokens.weight", "shared.weight"),),
        renamed=((_T5_BIAS_KEY, "encoder.relative_attention_bias.weight"),) if cfg.shared_relative_bias else (),
    )


def keeps_fp32(dtype: Any | None) -> Callable[[tuple[str, ...]], bool]:
    """Which params stay float32 when loading in ``dtype``: ``wo`` for float16, as the reference does."""
    fp16 = dtype is not None and jnp.dtype(dtype) == jnp.float16
    return lambda path: fp16 and any(part in KEEP_IN_FP32_FOR_FP16 for part in path)


def init_params(cfg: UMT5Config, key: jax.Array) -> dict[str, Any]:
    """Random float32 params (flax initialisers)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return UMT5Encoder(cfg).init(key, ids, jnp.ones_like(ids))["params"]


def param_shapes(cfg: UMT5Config) -> dict[str, Any]:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    return jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))
