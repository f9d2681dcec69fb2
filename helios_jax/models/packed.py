"""The packed (NaViT) forward of the Helios DiT: several noisy segments, one shared history, one block stack.

Stage 2-init (docs/training.md §5) runs every pyramid example of a sample in one transformer
forward, as the official training class does with a list input: per sample the token sequence is
``sum_i [history || segment_i]`` (the history duplicated per segment), self-attention is block-diagonal per
segment (segment ids through ``helios_jax.models.attention.attention``), cross-attention is per segment with
the sample's text, and the output is one velocity per segment, in the order given. Since every segment
attends only to itself and its own copy of the history, each output equals a separate
``HeliosTransformer`` forward of that segment (tests/test_packed.py checks it; tests/test_transformer.py
checks that forward against diffusers).

``PackedHeliosTransformer`` has ``HeliosTransformer``'s submodule names, so the same params and LoRA trees
apply unchanged::

    flows = PackedHeliosTransformer(cfg).apply(variables, [x0, x1, x1b, x2], [t0, t1, t1b, t2],
                                               encoder_hidden_states, **history_inputs, lora_scale=s)

Each segment has its own latents (B, C, T, H, W) (any H, W; the T of ``indices_hidden_states``), its own
timestep (B,), and its own RoPE grid; history tokens get the timestep-0 modulation (``zero_history_timestep``)
and skip the text (``guidance_cross_attn``) as in the plain forward. The packed sequence is longer than any
one forward (stage 2-init at 384x640: 2,940 + 2 x 4,560 + 11,040 = 23,100 tokens), so on a GPU it wants the
cuDNN backend; XLA's attention materialises its (heads, tokens, tokens) logits.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.config import TransformerConfig
from helios_jax.models.layers import Dense, LayerNorm, layer_norm
from helios_jax.models.memory import PatchEmbed, embed_history
from helios_jax.models.rope import rope_grid
from helios_jax.models.transformer import (
    Attention,
    ConditionEmbedder,
    FeedForward,
    HeliosTransformer,
    LoraScale,
    OutputNorm,
    _flat,
    _table_init,
    check_inputs,
)

_F32 = jnp.float32
Span = tuple[int, int]  # [start, stop) token positions


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """The static token layout of one packed sequence: per segment its history copy, then its noisy tokens.

    Modulation rows: with ``zero_history`` row 0 is the timestep-0 modulation of every history token and
    row 1 + i segment i's; without it history and noisy tokens of segment i share row i.
    """

    history_len: int
    noisy_lens: tuple[int, ...]
    zero_history: bool

    @property
    def length(self) -> int:
        return len(self.noisy_lens) * self.history_len + sum(self.noisy_lens)

    def pieces(self) -> tuple[tuple[int, int], ...]:
        """(token count, modulation row) of every non-empty run of tokens, in sequence order."""
        out = []
        for i, n in enumerate(self.noisy_lens):
            row = 1 + i if self.zero_history else i
            if self.history_len:
                out.append((self.history_len, 0 if self.zero_history else i))
            out.append((n, row))
        return tuple(out)

    def noisy_spans(self) -> tuple[Span, ...]:
        """[start, stop) of every segment's noisy tokens."""
        spans, start = [], 0
        for n in self.noisy_lens:
            start += self.history_len
            spans.append((start, start + n))
            start += n
        return tuple(spans)

    def segment_ids(self) -> np.ndarray:
        """(1, L) int32: the segment of every token (its history copy included)."""
        counts = [self.history_len + n for n in self.noisy_lens]
        return np.repeat(np.arange(len(counts), dtype=np.int32), counts)[None]

    def per_token(self, rows: jax.Array) -> jax.Array:
        """(B, L, dim) from one (B, R, dim) vector per modulation row."""
        batch, _, dim = rows.shape
        return jnp.concatenate(
            [jnp.broadcast_to(rows[:, row, None, :], (batch, count, dim)) for count, row in self.pieces()], axis=1
        )


def replace_spans(x: jax.Array, spans: Sequence[Span], values: jax.Array) -> jax.Array:
    """``x`` (B, L, ...) with its token ``spans`` (sorted, disjoint) replaced by the consecutive rows of
    ``values`` (B, sum of span lengths, ...)."""
    parts, position, offset = [], 0, 0
    for start, stop in spans:
        parts += [x[:, position:start], values[:, offset:offset + stop - start]]
        position, offset = stop, offset + stop - start
    parts.append(x[:, position:])
    return jnp.concatenate([p for p in parts if p.shape[1]], axis=1)


class PackedBlock(nn.Module):
    """``HeliosBlock`` over a packed sequence (same params): per-token modulation from the layout's rows,
    block-diagonal self-attention by segment id, cross-attention for each segment's noisy tokens."""

    config: TransformerConfig
    layout: PackedLayout
    impl: str

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, modulations: jax.Array, rope: tuple[jax.Array, jax.Array],
                 segment_ids: jax.Array, lora_scale: LoraScale = None) -> tuple[jax.Array, None]:
        cfg, layout = self.config, self.layout
        table = self.param("scale_shift_table", _table_init(cfg.inner_dim), (1, 6, cfg.inner_dim), _F32)
        mod = table.astype(_F32)[:, None] + modulations.astype(_F32)  # (B, rows, 6, dim)
        shift, scale, gate, c_shift, c_scale, c_gate = (layout.per_token(mod[:, :, i]) for i in range(6))

        # 1. Self-attention, each segment (its history copy and its noisy tokens) on its own.
        h = (layer_norm(x, cfg.eps) * (1 + scale) + shift).astype(x.dtype)
        attn = Attention(cfg, cross=False, impl=self.impl, name="attn1")(h, rope=rope, segment_ids=segment_ids,
                                                                          lora_scale=lora_scale)
        x = (x.astype(_F32) + attn * gate).astype(x.dtype)

        # 2. Cross-attention to the text: with guidance_cross_attn only the noisy tokens of every segment.
        spans = layout.noisy_spans() if cfg.guidance_cross_attn else ((0, x.shape[1]),)
        queries = jnp.concatenate([x[:, a:b] for a, b in spans], axis=1)
        normed = LayerNorm(cfg.eps, name="norm2")(queries) if cfg.cross_attn_norm else queries
        attn = Attention(cfg, cross=True, impl=self.impl, name="attn2")(normed.astype(x.dtype), context,
                                                                         lora_scale=lora_scale)
        x = replace_spans(x, spans, queries + attn)

        # 3. Feed-forward.
        h = (layer_norm(x, cfg.eps) * (1 + c_scale) + c_shift).astype(x.dtype)
        ff = FeedForward(cfg.inner_dim, cfg.ffn_dim, name="ffn")(h, lora_scale)
        return (x.astype(_F32) + ff.astype(_F32) * c_gate).astype(x.dtype), None


class PackedHeliosTransformer(nn.Module):
    """The Helios DiT over a list of segments sharing one history and one text (module docstring).
    ``attention_impl``, ``remat`` and ``scan_unroll`` as ``HeliosTransformer``'s."""

    config: TransformerConfig
    attention_impl: str = "xla"
    remat: bool = False
    scan_unroll: int | bool = 1

    @nn.compact
    def __call__(
        self,
        hidden_states: Sequence[jax.Array],
        timestep: Sequence[jax.Array],
        encoder_hidden_states: jax.Array,
        indices_hidden_states: jax.Array | None = None,
        indices_latents_history_short: jax.Array | None = None,
        indices_latents_history_mid: jax.Array | None = None,
        indices_latents_history_long: jax.Array | None = None,
        latents_history_short: jax.Array | None = None,
        latents_history_mid: jax.Array | None = None,
        latents_history_long: jax.Array | None = None,
        lora_scale: LoraScale = None,
    ) -> list[jax.Array]:
        """One velocity (B, C, T, H_i, W_i) per segment, in order (LoRA and ``lora_scale`` as the plain forward)."""
        cfg = self.config
        history = {
            "short": (latents_history_short, indices_latents_history_short),
            "mid": (latents_history_mid, indices_latents_history_mid),
            "long": (latents_history_long, indices_latents_history_long),
        }
        check_segments(cfg, hidden_states, timestep)
        for x, t in zip(hidden_states, timestep):
            check_inputs(cfg, x, t, encoder_hidden_states, indices_hidden_states, history)
        batch, dtype = hidden_states[0].shape[0], hidden_states[0].dtype

        # Noisy tokens and rotary tables of every segment, each on its own grid.
        patch = PatchEmbed(cfg.inner_dim, cfg.patch_size, name="patch_embedding")
        segments = []
        for x in hidden_states:
            tokens, grid = patch(x, lora_scale)
            indices = jnp.arange(grid[0])[None, :] if indices_hidden_states is None else indices_hidden_states
            cos, sin = rope_grid(indices, grid[1], grid[2], cfg.rope_dim, cfg.rope_theta)
            segments.append((tokens, _flat(cos), _flat(sin), grid))

        # The history once, [long, mid, short] (as the plain forward prepends it), then copied per segment.
        history_parts = embed_history(cfg.patch_size, cfg.inner_dim, cfg.rope_dim, cfg.rope_theta, history, dtype,
                                      lora_scale)
        layout = PackedLayout(sum(part[0].shape[1] for part in history_parts),
                              tuple(seg[0].shape[1] for seg in segments), cfg.zero_history_timestep)
        x, cos, sin = (jnp.concatenate([part[j] for seg in segments for part in (*history_parts, seg)], axis=1)
                       for j in range(3))

        # Conditioning: one modulation row per segment timestep, and timestep 0 for the history if configured.
        embedder = ConditionEmbedder(cfg, name="condition_embedder")
        text_dtype = encoder_hidden_states.dtype
        tembs, rows = zip(*(embedder.time(t, text_dtype, lora_scale) for t in timestep))
        if cfg.zero_history_timestep:
            _, zero = embedder.time(jnp.zeros((1,), timestep[0].dtype), text_dtype, lora_scale)
            rows = (jnp.broadcast_to(zero, rows[0].shape), *rows)
        modulations = jnp.stack(rows, axis=1)  # (B, rows, 6, dim)
        context = embedder.text(encoder_hidden_states, lora_scale)

        block = nn.remat(PackedBlock) if self.remat else PackedBlock
        blocks = nn.scan(
            block,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 5,
            length=cfg.num_layers,
            unroll=self.scan_unroll,
        )(cfg, layout, self.attention_impl, name="blocks")
        x, _ = blocks(x, context, modulations, (cos, sin), jnp.asarray(layout.segment_ids()), lora_scale)

        # Output norm (each segment's temb) and projection of each segment's noisy tokens, unpatchified.
        norm_out = OutputNorm(cfg.eps, name="norm_out")
        proj_out = Dense(cfg.output_channels * int(np.prod(cfg.patch_size)), name="proj_out")
        return [unpatchify(cfg, proj_out(norm_out(x[:, a:b], temb), lora_scale), batch, grid)
                for (a, b), temb, (*_, grid) in zip(layout.noisy_spans(), tembs, segments)]


def packed_like(model: HeliosTransformer) -> PackedHeliosTransformer:
    """The packed forward with a plain model's config, attention backend, remat and unroll (the same params)."""
    if model.hooks:
        raise ValueError(f"packed_like: the model has GAN hooks {model.hooks}; the packed forward (stage 2-init) "
                         "returns velocities only, build it from a model without hooks")
    return PackedHeliosTransformer(model.config, model.attention_impl, model.remat, model.scan_unroll)


def unpatchify(cfg: TransformerConfig, x: jax.Array, batch: int, grid: tuple[int, int, int]) -> jax.Array:
    """(B, t*h*w, C*pt*ph*pw) tokens to (B, C, T, H, W) latents."""
    (t, h, w), (pt, ph, pw), c = grid, cfg.patch_size, cfg.output_channels
    x = x.reshape(batch, t, h, w, pt, ph, pw, c).transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(batch, c, t * pt, h * ph, w * pw)


def check_segments(cfg: TransformerConfig, hidden_states: Sequence[jax.Array], timestep: Sequence[jax.Array]) -> None:
    """One clear error for a segment list the packed forward cannot take (each segment is then checked as
    the plain forward checks its inputs)."""
    if not isinstance(hidden_states, (list, tuple)) or not isinstance(timestep, (list, tuple)):
        raise ValueError("PackedHeliosTransformer: hidden_states and timestep must be lists, one entry per segment; "
                         f"got {type(hidden_states).__name__} and {type(timestep).__name__} (use HeliosTransformer "
                         "for one segment)")
    if not hidden_states or len(hidden_states) != len(timestep):
        raise ValueError(f"PackedHeliosTransformer: {len(hidden_states)} segments of latents and {len(timestep)} "
                         "timesteps; give one timestep (B,) per segment, at least one segment")
    if cfg.is_amplify_history:
        raise ValueError("PackedHeliosTransformer: is_amplify_history=True scales the keys of one leading history, "
                         "which a packed sequence does not have; it is off in every official config, run the plain "
                         "HeliosTransformer per segment for it")
