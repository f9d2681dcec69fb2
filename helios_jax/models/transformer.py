"""The Helios DiT as a flax.linen module, equal to diffusers' ``HeliosTransformer3DModel``.

``HeliosTransformer(cfg).apply({"params": params}, hidden_states, timestep, encoder_hidden_states,
...)`` takes the reference's argument names, shapes and (B, C, T, H, W) layouts. The token sequence
is ``[long, mid, short history, noisy]``; history tokens get the timestep-0 modulation when
``zero_history_timestep`` is set and are left out of the text cross-attention when
``guidance_cross_attn`` is set. The 40 identical blocks run under ``nn.scan`` (params stacked on a
leading layer axis) so the model compiles once per shape.

Rather than materialising a per-token (B, L, 6, dim) modulation tensor as the reference does, the
blocks get the two distinct modulations (history and noisy) and the static history length; the
per-token broadcast fuses into the elementwise work.

Under a mesh with ``context > 1`` the token sequence is padded to a multiple of the context size and
split over it (``helios_jax.parallel.context``); padded keys are masked and padded tokens dropped.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from helios_jax.config import TransformerConfig
from helios_jax.convert.keymap import KeyMap
from helios_jax.models import fp8
from helios_jax.models.attention import attention
from helios_jax.models.layers import Dense, LayerNorm, RMSNorm, gelu_tanh, layer_norm, silu
from helios_jax.models.memory import HISTORY_TERMS, PatchEmbed, embed_history
from helios_jax.models.offload import BLOCKS, scan_streamed
from helios_jax.models.rope import apply_rope, rope_grid
from helios_jax.parallel import context as context_parallel

_F32 = jnp.float32
LoraScale = float | jax.Array | None

# Modules the reference keeps in float32 whatever the checkpoint dtype (``_keep_in_fp32_modules``).
KEEP_IN_FP32 = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3", "history_key_scale")
# The reference's own ignore list on load (``_keys_to_ignore_on_load_unexpected``).
IGNORED_KEYS = ("norm_added_q",)
# Module names whose ``_<digits>`` is the reference's own, not a list index.
LITERAL_NAMES = ("linear_1", "linear_2")
# The cross-attention params that make the text's keys and values (``key_value``), nothing else.
TEXT_KV_PARAMS = ("to_k", "to_v", "norm_k")
# Upper bound of the learned history-key amplification, ``HeliosAttention.max_scale``.
MAX_HISTORY_KEY_SCALE = 10.0


def _table_init(dim: int) -> nn.initializers.Initializer:
    """``torch.randn(...) / dim**0.5``, the reference's init of the scale-shift tables."""
    return nn.initializers.normal(stddev=dim**-0.5)


def timestep_embedding(timestep: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding, cos first (diffusers ``Timesteps(flip_sin_to_cos=True, shift=0)``)."""
    half = dim // 2
    exponent = (-math.log(max_period) * jnp.arange(half, dtype=_F32)) / half
    angle = timestep.astype(_F32)[:, None] * jnp.exp(exponent)[None, :]
    return jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)


class ConditionEmbedder(nn.Module):
    """Timestep and text conditioning (``HeliosTimeTextEmbedding``)."""

    config: TransformerConfig

    def setup(self) -> None:
        dim = self.config.inner_dim
        self.time_embedder = _MLP(dim, act=silu)
        self.time_proj = Dense(6 * dim)
        self.text_embedder = _MLP(dim, act=gelu_tanh)

    def time(self, timestep: jax.Array, dtype: Any, lora_scale: LoraScale = None) -> tuple[jax.Array, jax.Array]:
        """temb (B, dim) and the six modulation vectors (B, 6, dim), both in ``dtype``."""
        sinusoid = timestep_embedding(timestep, self.config.freq_dim)
        temb = self.time_embedder(sinusoid, lora_scale).astype(dtype)
        proj = self.time_proj(silu(temb), lora_scale)
        return temb, proj.reshape(proj.shape[0], 6, -1)

    def text(self, context: jax.Array, lora_scale: LoraScale = None) -> jax.Array:
        return self.text_embedder(context, lora_scale)


class _MLP(nn.Module):
    """Linear, activation, linear (``TimestepEmbedding`` / ``PixArtAlphaTextProjection``)."""

    features: int
    act: Any

    @nn.compact
    def __call__(self, x: jax.Array, lora_scale: LoraScale = None) -> jax.Array:
        h = self.act(Dense(self.features, name="linear_1")(x, lora_scale))
        return Dense(self.features, name="linear_2")(h, lora_scale)


class Attention(nn.Module):
    """``HeliosAttention``: q/k RMS norms across heads, RoPE, history-key amplification, SDPA."""

    config: TransformerConfig
    cross: bool
    impl: str

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
        history_len: int = 0,
        mask: jax.Array | None = None,
        lora_scale: LoraScale = None,
        segment_ids: jax.Array | None = None,
        kv: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """``kv``: this layer's keys and values, already projected (cross-attention with ``text_kv``)."""
        cfg = self.config
        dim, heads = cfg.inner_dim, cfg.num_attention_heads
        q = RMSNorm(cfg.eps, name="norm_q")(Dense(dim, name="to_q")(x, lora_scale))
        q = q.reshape(*q.shape[:2], heads, -1)
        k, v = key_value(cfg, x if context is None else context, lora_scale) if kv is None else kv
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if not self.cross and cfg.is_amplify_history:
            k = self._amplify_history_keys(k, history_len)
        out = attention(q, k, v, impl=self.impl, mask=mask, segment_ids=segment_ids, cross=self.cross)
        return Dense(dim, name="to_out_0")(out.reshape(*out.shape[:2], dim), lora_scale)

    def _amplify_history_keys(self, k: jax.Array, history_len: int) -> jax.Array:
        """Scale the history keys by ``1 + sigmoid(s) * (max - 1)``, per head or one scalar.

        Computed in float32 and cast back: in bf16 the reference's concatenation promotes the keys to
        float32 and its attention call then fails on mixed dtypes, so there is no bf16 behaviour to copy.
        """
        count = self.config.num_attention_heads if self.config.history_scale_mode == "per_head" else 1
        raw = self.param("history_key_scale", nn.initializers.ones, (count,), _F32)
        if history_len == 0:
            return k
        scale = 1.0 + jax.nn.sigmoid(raw.astype(_F32)) * (MAX_HISTORY_KEY_SCALE - 1.0)
        is_history = (jnp.arange(k.shape[1]) < history_len)[:, None]
        per_token = jnp.where(is_history, scale[None, :], 1.0)  # (L, heads or 1)
        return (k.astype(_F32) * per_token[None, :, :, None]).astype(k.dtype)


def key_value(cfg: TransformerConfig, source: jax.Array, lora_scale: LoraScale = None) -> tuple[jax.Array, jax.Array]:
    """Keys (``to_k``, ``norm_k``) and values (``to_v``) of ``source``, split into heads (B, S, heads, head_dim).

    Called inside a compact method: the layers are children of the calling module (``Attention`` or
    ``TextKeyValue``), so both have the same params."""
    heads = cfg.num_attention_heads
    k = RMSNorm(cfg.eps, name="norm_k")(Dense(cfg.inner_dim, name="to_k")(source, lora_scale))
    v = Dense(cfg.inner_dim, name="to_v")(source, lora_scale)
    return k.reshape(*k.shape[:2], heads, -1), v.reshape(*v.shape[:2], heads, -1)


class TextKeyValue(nn.Module):
    """One block's cross-attention keys and values of the text: ``attn2``'s ``to_k``/``norm_k``/``to_v``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, context: jax.Array, lora_scale: LoraScale = None) -> tuple[jax.Array, jax.Array]:
        return key_value(self.config, context, lora_scale)


class TextKV(NamedTuple):
    """Every block's cross-attention keys and values of one text, stacked over the layers:
    (num_layers, B, S, heads, head_dim) each. They depend only on the text and the weights, so a
    sampling loop computes them once (:func:`text_kv`) rather than once per step."""

    key: jax.Array
    value: jax.Array


def text_kv(cfg: TransformerConfig, variables: dict[str, Any], encoder_hidden_states: jax.Array,
            lora_scale: LoraScale = None, offload: bool = False) -> TextKV:
    """The :class:`TextKV` of ``encoder_hidden_states`` with the DiT's ``variables`` (``{"params": ...}``, and
    ``"lora"`` if one is applied at call time: a LoRA on ``attn2.to_k``/``to_v`` is part of the keys and values).

    Pass it to ``HeliosTransformer.__call__(..., text_kv=...)`` with the same ``encoder_hidden_states``:
    the blocks then skip the text embedder and the per-block text projections, with the same result.
    ``offload``: the blocks' params are in host memory (``helios_jax.models.offload``), streamed a layer ahead."""
    embedder = {c: tree["condition_embedder"] for c, tree in variables.items() if "condition_embedder" in tree}
    context = ConditionEmbedder(cfg).apply(embedder, encoder_hidden_states, lora_scale, method="text")
    per_layer = {c: tree["blocks"]["attn2"] for c, tree in variables.items()
                 if "attn2" in tree.get("blocks", {})}

    def layer(_: None, layer_variables: dict[str, Any]) -> tuple[None, tuple[jax.Array, jax.Array]]:
        return None, TextKeyValue(cfg).apply(layer_variables, context, lora_scale)

    edges = fp8.FIRST_BLOCK in variables.get("params", {})  # fp8.split_edges: the 16-bit first and last blocks apart
    if offload and edges:
        raise ValueError("text_kv: offload streams the one block stack; these params keep their first and last blocks "
                         "apart (fp8 with bf16_edges): offload the all-fp8 or the 16-bit layout")
    if offload:
        def write(kv: TextKV, layer_variables: dict[str, Any], i: jax.Array) -> TextKV:
            return TextKV(*(stack.at[i].set(new) for stack, new in zip(kv, layer(None, layer_variables)[1])))

        shape = (cfg.num_layers, *context.shape[:2], cfg.num_attention_heads, cfg.attention_head_dim)
        empty = jnp.zeros(shape, context.dtype)
        used = {c: {k: v for k, v in tree.items() if k in TEXT_KV_PARAMS} for c, tree in per_layer.items()}
        return scan_streamed(write, TextKV(empty, empty), used, cfg.num_layers)
    _, (key, value) = jax.lax.scan(layer, None, per_layer)
    if edges:
        first, last = [TextKeyValue(cfg).apply({c: tree[name]["attn2"] for c, tree in variables.items() if name in tree},
                                               context, lora_scale) for name in (fp8.FIRST_BLOCK, fp8.LAST_BLOCK)]
        key = jnp.concatenate([first[0][None], key, last[0][None]])
        value = jnp.concatenate([first[1][None], value, last[1][None]])
    return TextKV(key, value)


class FeedForward(nn.Module):
    """diffusers ``FeedForward(activation_fn="gelu-approximate")``: ``net.0.proj``, GELU, ``net.2``."""

    dim: int
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array, lora_scale: LoraScale = None) -> jax.Array:
        h = gelu_tanh(_Proj(self.hidden, name="net_0")(x, lora_scale))
        return Dense(self.dim, name="net_2")(h, lora_scale)


class _Proj(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x: jax.Array, lora_scale: LoraScale = None) -> jax.Array:
        return Dense(self.features, name="proj")(x, lora_scale)


def _per_token(history: jax.Array, noisy: jax.Array, history_len: int, length: int) -> jax.Array:
    """(B, L, dim) from one (B', dim) vector for the history tokens and one (B, dim) for the rest.

    A select on the token index, not a concatenation of the two runs: with the tokens split over ``context`` every
    device builds its own tokens' rows, where a concatenation at the history boundary was built whole and then
    resharded by float32 all-to-alls (12 per layer and forward, most of the bytes Ulysses sent)."""
    if history_len == 0:
        return noisy[:, None, :]
    is_history = (jnp.arange(length) < history_len)[None, :, None]
    return jnp.where(is_history, history[:, None, :], noisy[:, None, :])


class HeliosBlock(nn.Module):
    """``HeliosTransformerBlock``: modulated self-attention, text cross-attention, modulated FFN.

    With ``hooks`` the scan carry is ``(x, features)`` and the block also takes its layer index: a
    hooked layer writes its noisy-token output into its slot of ``features`` (K, B, N, dim), so only
    the K hooked outputs are ever held. Without hooks the block is exactly the inference block.
    """

    config: TransformerConfig
    history_len: int
    impl: str
    tokens: int | None = None  # the real sequence length when x is longer by context-parallel padding
    hooks: tuple[int, ...] = ()

    @nn.compact
    def __call__(
        self,
        carry: jax.Array | tuple[jax.Array, jax.Array],
        context: jax.Array,
        modulation_history: jax.Array,
        modulation_noisy: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        lora_scale: LoraScale = None,
        layer: jax.Array | None = None,
        kv: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[Any, None]:
        x, features = carry if self.hooks else (carry, None)
        cfg, hist, length = self.config, self.history_len, x.shape[1]
        x = context_parallel.constrain_tokens(x)
        table = self.param("scale_shift_table", _table_init(cfg.inner_dim), (1, 6, cfg.inner_dim), _F32)
        table = table.astype(_F32)
        mod_h = table + modulation_history.astype(_F32)
        mod_n = table + modulation_noisy.astype(_F32)
        shift, scale, gate, c_shift, c_scale, c_gate = (
            _per_token(mod_h[:, i], mod_n[:, i], hist, length) for i in range(6)
        )

        # 1. Self-attention over history and noisy tokens.
        h = (layer_norm(x, cfg.eps) * (1 + scale) + shift).astype(x.dtype)
        mask = context_parallel.key_mask(length, self.tokens)
        attn = Attention(cfg, cross=False, impl=self.impl, name="attn1")(h, rope=rope, history_len=hist, mask=mask,
                                                                          lora_scale=lora_scale)
        x = (x.astype(_F32) + attn * gate).astype(x.dtype)

        # 2. Cross-attention to the text; with guidance_cross_attn only the noisy tokens take part. With
        # the tokens split over devices, every token attends and the history's results are discarded
        # (the same numbers per token), since slicing at the history boundary would move tokens between devices.
        split = context_parallel.active_mesh() is not None
        start = hist if cfg.guidance_cross_attn and not split else 0
        queries = x[:, start:]
        normed = LayerNorm(cfg.eps, name="norm2")(queries) if cfg.cross_attn_norm else queries
        attn = Attention(cfg, cross=True, impl=self.impl, name="attn2")(normed.astype(x.dtype), context,
                                                                         lora_scale=lora_scale, kv=kv)
        if split and cfg.guidance_cross_attn and hist:
            attn = jnp.where((jnp.arange(length) >= hist)[None, :, None], attn, jnp.zeros_like(attn))
        x = x.at[:, start:].set(queries + attn)

        # 3. Feed-forward.
        h = (layer_norm(x, cfg.eps) * (1 + c_scale) + c_shift).astype(x.dtype)
        ff = FeedForward(cfg.inner_dim, cfg.ffn_dim, name="ffn")(h, lora_scale)
        x = (x.astype(_F32) + ff.astype(_F32) * c_gate).astype(x.dtype)
        if not self.hooks:
            return x, None
        return (x, _record_hook(features, x[:, hist:self.tokens], layer, self.hooks)), None


def _record_hook(features: jax.Array, noisy: jax.Array, layer: jax.Array, hooks: tuple[int, ...]) -> jax.Array:
    """``features`` with ``noisy`` written to the slot of ``layer`` if it is hooked (else unchanged)."""
    is_hook = jnp.asarray(hooks) == layer
    slot = jnp.argmax(is_hook)
    return features.at[slot].set(jnp.where(jnp.any(is_hook), noisy.astype(features.dtype), features[slot]))


class HeliosTransformer(nn.Module):
    """The Helios DiT. ``attention_impl`` picks the attention backend; ``remat`` recomputes each
    block's activations in the backward pass (for training); ``scan_unroll`` is how many blocks one
    scan step runs (``True``: all of them, straight-line code as a Python loop would give; same
    params and numerics, for compile-time studies).

    ``hooks`` (0-based block indices, as the official ``gan_hooks``) makes the call return
    ``(flow, features)``: one (B, dim, t, h, w) token grid per hook, the noisy tokens of that block's
    output, for the critic's GAN heads. The default ``()`` leaves the program unchanged.

    ``offload`` (inference): the ``blocks`` params are in host memory (``helios_jax.models.offload.to_host``)
    and are streamed to the device a layer ahead of the block that uses them; same params, same numbers."""

    config: TransformerConfig
    attention_impl: str = "xla"
    remat: bool = False
    scan_unroll: int | bool = 1
    hooks: tuple[int, ...] = ()
    offload: bool = False

    @nn.compact
    def __call__(
        self,
        hidden_states: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array,
        indices_hidden_states: jax.Array | None = None,
        indices_latents_history_short: jax.Array | None = None,
        indices_latents_history_mid: jax.Array | None = None,
        indices_latents_history_long: jax.Array | None = None,
        latents_history_short: jax.Array | None = None,
        latents_history_mid: jax.Array | None = None,
        latents_history_long: jax.Array | None = None,
        lora_scale: LoraScale = None,
        text_kv: TextKV | None = None,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
        """The DiT's velocity. A LoRA in the ``lora`` collection (``helios_jax.models.lora``) is applied at
        call time, each LoRA'd layer adding ``lora_scale * B(A(x))``; ``lora_scale`` (alpha / rank times the
        adapter's strength; None: 1) may be a traced array, so switching it does not recompile.
        With ``hooks`` it returns ``(velocity, hooked features)``. ``text_kv`` (:func:`text_kv` of these
        ``encoder_hidden_states`` and weights) replaces the text's projections in every block."""
        cfg = self.config
        _check_hooks(self.hooks, cfg.num_layers)
        history = {
            "short": (latents_history_short, indices_latents_history_short),
            "mid": (latents_history_mid, indices_latents_history_mid),
            "long": (latents_history_long, indices_latents_history_long),
        }
        check_inputs(cfg, hidden_states, timestep, encoder_hidden_states, indices_hidden_states, history)
        _check_text_kv(cfg, text_kv, encoder_hidden_states.shape)
        batch = hidden_states.shape[0]
        pt, ph, pw = cfg.patch_size

        # Noisy tokens and their rotary tables.
        x, (t, h, w) = PatchEmbed(cfg.inner_dim, cfg.patch_size, name="patch_embedding")(hidden_states, lora_scale)
        if indices_hidden_states is None:
            indices_hidden_states = jnp.arange(t)[None, :]
        cos, sin = rope_grid(indices_hidden_states, h, w, cfg.rope_dim, cfg.rope_theta)
        tokens, cos_parts, sin_parts = [x], [_flat(cos)], [_flat(sin)]
        noisy_len = x.shape[1]

        # History terms, each prepended: the sequence ends up [long, mid, short, noisy].
        parts = embed_history(cfg.patch_size, cfg.inner_dim, cfg.rope_dim, cfg.rope_theta, history,
                              hidden_states.dtype, lora_scale)
        tokens = [p[0] for p in parts] + tokens
        cos_parts = [p[1] for p in parts] + cos_parts
        sin_parts = [p[2] for p in parts] + sin_parts
        x = jnp.concatenate(tokens, axis=1)
        rope = (jnp.concatenate(cos_parts, axis=1), jnp.concatenate(sin_parts, axis=1))
        tokens = x.shape[1]
        history_len = tokens - noisy_len
        x, rope, _ = context_parallel.split_tokens(x, *rope, heads=cfg.num_attention_heads)

        # Conditioning: the noisy tokens' timestep, and timestep 0 for history tokens if configured.
        embedder = ConditionEmbedder(cfg, name="condition_embedder")
        dtype = encoder_hidden_states.dtype
        temb, modulation = embedder.time(timestep, dtype, lora_scale)
        modulation_history = modulation
        if cfg.zero_history_timestep:
            _, modulation_history = embedder.time(jnp.zeros((1,), timestep.dtype), dtype, lora_scale)
        context = embedder.text(encoder_hidden_states, lora_scale) if text_kv is None else None

        hooked = bool(self.hooks)
        edges = self.has_variable("params", fp8.FIRST_BLOCK)  # fp8.split_edges: 16-bit first and last blocks
        if edges and hooked:
            raise ValueError("HeliosTransformer: hooks need the one block stack; these params keep their first and "
                             "last blocks apart (fp8 with bf16_edges, an inference layout)")
        if edges and self.offload:
            raise ValueError("HeliosTransformer: offload streams the one block stack; these params keep their first "
                             "and last blocks apart (fp8 with bf16_edges): offload the all-fp8 or the 16-bit layout")
        if self.offload and not self.is_initializing():
            x, features = self._streamed_blocks(x, batch, noisy_len, history_len, tokens, context, modulation_history,
                                                modulation, rope, lora_scale, text_kv)
            return self._output(x, features, temb, history_len, tokens, (batch, t, h, w), lora_scale)
        block = nn.remat(HeliosBlock) if self.remat else HeliosBlock
        blocks = nn.scan(
            block,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 5 + (0 if hooked else nn.broadcast, 0),
            length=cfg.num_layers - 2 if edges else cfg.num_layers,
            unroll=self.scan_unroll,
        )(cfg, history_len, self.attention_impl, tokens, self.hooks, name="blocks")
        if hooked:
            features = jnp.zeros((len(self.hooks), batch, noisy_len, cfg.inner_dim), x.dtype)
            (x, features), _ = blocks((x, features), context, modulation_history, modulation, rope, lora_scale,
                                      jnp.arange(cfg.num_layers), text_kv)
        elif edges:
            features = None
            kv = [None] * 3 if text_kv is None else [
                (text_kv.key[0], text_kv.value[0]), TextKV(text_kv.key[1:-1], text_kv.value[1:-1]),
                (text_kv.key[-1], text_kv.value[-1])]
            edge = (cfg, history_len, self.attention_impl, tokens)
            x, _ = block(*edge, name=fp8.FIRST_BLOCK)(x, context, modulation_history, modulation, rope, lora_scale,
                                                      None, kv[0])
            x, _ = blocks(x, context, modulation_history, modulation, rope, lora_scale, None, kv[1])
            x, _ = block(*edge, name=fp8.LAST_BLOCK)(x, context, modulation_history, modulation, rope, lora_scale,
                                                     None, kv[2])
        else:
            x, features = blocks(x, context, modulation_history, modulation, rope, lora_scale, None, text_kv)[0], None
        return self._output(x, features, temb, history_len, tokens, (batch, t, h, w), lora_scale)

    def _streamed_blocks(self, x: jax.Array, batch: int, noisy_len: int, history_len: int, tokens: int,
                         context: jax.Array | None, modulation_history: jax.Array, modulation: jax.Array,
                         rope: tuple[jax.Array, jax.Array], lora_scale: LoraScale,
                         text_kv: TextKV | None) -> tuple[jax.Array, jax.Array | None]:
        """The blocks over the host-resident stacked params (``offload``): the nn.scan's body, one
        ``HeliosBlock`` applied per layer to the layer's params as :func:`scan_streamed` brings them in."""
        cfg = self.config
        if self.remat:
            raise ValueError("HeliosTransformer: offload is for inference; it cannot be combined with remat")
        block = HeliosBlock(cfg, history_len, self.attention_impl, tokens, self.hooks, parent=None)
        stacked = {c: tree[BLOCKS] for c, tree in self.variables.items() if BLOCKS in tree}
        if text_kv is not None:  # the text's keys and values are given: their weights need not cross PCIe
            stacked = {c: {**tree, "attn2": {k: v for k, v in tree["attn2"].items() if k not in TEXT_KV_PARAMS}}
                       if "attn2" in tree else tree for c, tree in stacked.items()}

        def step(carry: Any, layer_variables: dict[str, Any], i: jax.Array) -> Any:
            kv = None if text_kv is None else tuple(stack[i] for stack in text_kv)
            return block.apply(layer_variables, carry, context, modulation_history, modulation, rope, lora_scale,
                                i, kv)[0]

        if not self.hooks:
            return scan_streamed(step, x, stacked, cfg.num_layers), None
        features = jnp.zeros((len(self.hooks), batch, noisy_len, cfg.inner_dim), x.dtype)
        return scan_streamed(step, (x, features), stacked, cfg.num_layers)

    def _output(self, x: jax.Array, features: jax.Array | None, temb: jax.Array, history_len: int, tokens: int,
                grid: tuple[int, int, int, int], lora_scale: LoraScale) -> Any:
        """Output norm on the noisy tokens, projection, unpatchify to (B, C, T, H, W); the hooked grids."""
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        batch, t, h, w = grid
        x = OutputNorm(cfg.eps, name="norm_out")(x[:, history_len:tokens], temb)
        x = Dense(cfg.output_channels * pt * ph * pw, name="proj_out")(x, lora_scale)
        x = x.reshape(batch, t, h, w, pt, ph, pw, cfg.output_channels)
        x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)
        flow = x.reshape(batch, cfg.output_channels, t * pt, h * ph, w * pw)
        if features is None:
            return flow
        grids = features.reshape(len(self.hooks), batch, t, h, w, cfg.inner_dim).transpose(0, 1, 5, 2, 3, 4)
        return flow, tuple(grids)


class OutputNorm(nn.Module):
    """``HeliosOutputNorm``: float32 layer norm modulated by the noisy tokens' temb."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        table = self.param("scale_shift_table", _table_init(dim), (1, 2, dim), _F32).astype(_F32)
        shift_scale = table + temb.astype(_F32)[:, None, :]  # (B, 2, dim)
        shift, scale = shift_scale[:, 0:1], shift_scale[:, 1:2]
        return (layer_norm(x, self.eps) * (1 + scale) + shift).astype(x.dtype)


def _check_hooks(hooks: tuple[int, ...], num_layers: int) -> None:
    if any(not isinstance(h, int) or not 0 <= h < num_layers for h in hooks) or len(set(hooks)) != len(hooks):
        raise ValueError(
            f"HeliosTransformer: hooks = {hooks} must be distinct block indices 0 <= hook < num_layers = "
            f"{num_layers} (the official gan_hooks [5, 15, 25, 35] need a 40-block model)"
        )


def _check_text_kv(cfg: TransformerConfig, kv: TextKV | None, context_shape: tuple[int, ...]) -> None:
    if kv is None:
        return
    batch, tokens, _ = context_shape
    expected = (cfg.num_layers, batch, tokens, cfg.num_attention_heads, cfg.attention_head_dim)
    if not isinstance(kv, TextKV) or tuple(kv.key.shape) != expected or tuple(kv.value.shape) != expected:
        got = tuple(getattr(t, "shape", None) for t in kv) if isinstance(kv, tuple) else type(kv)
        raise ValueError(f"HeliosTransformer: text_kv must be a TextKV of keys and values {expected} (layers, B, "
                         f"text tokens, heads, head_dim) for these encoder_hidden_states; got {got}: build it "
                         f"with text_kv(cfg, variables, encoder_hidden_states)")


def _flat(table: jax.Array) -> jax.Array:
    """(B', T, H, W, D/2) -> (B', T*H*W, D/2)."""
    return table.reshape(table.shape[0], -1, table.shape[-1])


def check_inputs(
    cfg: TransformerConfig,
    hidden_states: jax.Array,
    timestep: jax.Array,
    context: jax.Array,
    indices_hidden_states: jax.Array | None,
    history: dict[str, tuple[jax.Array | None, jax.Array | None]],
) -> None:
    """One clear error for inputs the model cannot take, raised while tracing, before any compute."""

    def fail(message: str) -> None:
        raise ValueError(f"HeliosTransformer: {message}")

    if hidden_states.ndim != 5:
        fail(f"hidden_states must be (B, C, T, H, W); got shape {hidden_states.shape}")
    batch, channels, frames, height, width = hidden_states.shape
    if channels != cfg.in_channels:
        fail(f"hidden_states has {channels} channels but the config says in_channels={cfg.in_channels}")
    for axis, size, p in zip(("T", "H", "W"), (frames, height, width), cfg.patch_size):
        if size % p:
            fail(f"hidden_states {axis}={size} is not a multiple of patch size {p} (patch_size={cfg.patch_size})")
    if timestep.shape != (batch,):
        fail(f"timestep must have shape (B,) = ({batch},); got {timestep.shape}")
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.text_dim:
        fail(f"encoder_hidden_states must be (B={batch}, S, text_dim={cfg.text_dim}); got {context.shape}")
    t = frames // cfg.patch_size[0]
    _check_indices("indices_hidden_states", indices_hidden_states, batch, t, fail)
    for name, (latents, indices) in history.items():
        if (latents is None) != (indices is None):
            fail(f"latents_history_{name} and indices_latents_history_{name} must be given together")
        if latents is None:
            continue
        if not cfg.has_multi_term_memory_patch:
            fail(f"latents_history_{name} given, but this model has no memory patch (has_multi_term_memory_patch=False)")
        if latents.ndim != 5 or latents.shape[:2] != (batch, cfg.in_channels):
            fail(f"latents_history_{name} must be (B={batch}, C={cfg.in_channels}, T, H, W); got {latents.shape}")
        _, ph, pw = cfg.patch_size
        if latents.shape[3] % ph or latents.shape[4] % pw:
            fail(f"latents_history_{name} H, W = {latents.shape[3:]} must be multiples of the patch ({ph}, {pw})")
        _check_indices(f"indices_latents_history_{name}", indices, batch, latents.shape[2], fail)


def sequence_length(cfg: TransformerConfig, hidden_shape: tuple[int, ...],
                    history_shapes: dict[str, tuple[int, ...]] | None = None) -> int:
    """How many tokens the blocks attend over for latents of ``hidden_shape`` (B, C, T, H, W) and history
    terms ``{"short" | "mid" | "long": (B, C, T, H, W)}`` (compressed terms are padded up to their kernel)."""
    factors = dict(HISTORY_TERMS)
    count = math.prod(s // p for s, p in zip(hidden_shape[2:], cfg.patch_size))
    for name, shape in (history_shapes or {}).items():
        count += math.prod(-(-s // (p * factors[name])) for s, p in zip(shape[2:], cfg.patch_size))
    return count


def _check_indices(name: str, indices: jax.Array | None, batch: int, frames: int, fail) -> None:
    if indices is None:
        return
    if indices.ndim != 2 or indices.shape[1] != frames or indices.shape[0] not in (1, batch):
        fail(f"{name} must be (1 or B={batch}, {frames}) frame indices; got shape {indices.shape}")


def keymap(cfg: TransformerConfig) -> KeyMap:
    """How diffusers' state-dict keys land in this module's params (see ``helios_jax.convert.keymap``)."""
    return KeyMap(stacked=(("blocks", cfg.num_layers),), ignore=IGNORED_KEYS, literal=LITERAL_NAMES)


def compute_dtype(params: dict) -> Any:
    """The dtype a DiT's params run in: the noisy patch embedding's (never kept in float32, never fp8; the
    first leaf of ``blocks`` may be a float32 ``history_key_scale`` or a float8 kernel)."""
    return params["patch_embedding"]["kernel"].dtype


def keeps_fp32(path: tuple[str, ...]) -> bool:
    """Whether a param belongs to a module the reference keeps in float32."""
    return any(part in KEEP_IN_FP32 for part in path)


def _init_inputs(cfg: TransformerConfig) -> dict[str, jax.Array]:
    """The smallest inputs that reach every parameter (all history terms when the model has them)."""
    pt, ph, pw = cfg.patch_size
    latents = jnp.zeros((1, cfg.in_channels, pt, ph, pw))
    inputs = {
        "hidden_states": latents,
        "timestep": jnp.zeros((1,)),
        "encoder_hidden_states": jnp.zeros((1, 1, cfg.text_dim)),
    }
    if cfg.has_multi_term_memory_patch:
        for name, _ in HISTORY_TERMS:
            inputs[f"latents_history_{name}"] = latents
            inputs[f"indices_latents_history_{name}"] = jnp.zeros((1, pt), jnp.int32)
    return inputs


def init_params(cfg: TransformerConfig, key: jax.Array) -> dict[str, Any]:
    """Random float32 params (flax initialisers; the scale-shift tables as the reference draws them)."""
    return HeliosTransformer(cfg).init(key, **_init_inputs(cfg))["params"]


def param_shapes(cfg: TransformerConfig) -> dict[str, Any]:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    return jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))
