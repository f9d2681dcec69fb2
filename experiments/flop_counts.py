"""Model FLOPs of the DiT: per forward (every matmul, attention included) and per chunk of generation."""

from __future__ import annotations

import math
from typing import Any, Sequence

from experiments.workloads import Workload


def chunk_flops(cfg: Any, work: Workload, stage_steps: Sequence[int], guided: bool) -> float:
    """Model FLOPs of the DiT in one chunk: forwards per stage x FLOPs per forward, twice with CFG, but the
    text's share (``text_flops``) once per text context, as the pipeline computes it once per chunk."""
    text = text_flops(cfg, work)
    per_steps = sum(n * (dit_flops(cfg, work, s)["total"] - text) for s, n in enumerate(stage_steps))
    return (2 if guided else 1) * (per_steps + text)


def text_flops(cfg: Any, work: Workload) -> float:
    """The FLOPs of a forward that depend only on the text: the text embedder and every block's
    cross-attention to_k / to_v (``helios_jax.models.transformer.text_kv``)."""
    text, dim = work.text_tokens, cfg.inner_dim
    return 2 * text * (cfg.text_dim * dim + dim * dim) + cfg.num_layers * 2 * text * dim * dim * 2


def history_terms(cfg: Any, work: Workload) -> list[tuple[int, int]]:
    """(tokens, kernel volume) of each history term: its frames at full resolution, padded up to its
    kernel (patch x 1, 2 or 4 per axis) as the model does, one token per kernel."""
    factors = {"short": 1, "mid": 2, "long": 4}
    terms = []
    for name, frames in work.history_frames:
        kernel = [p * factors[name] for p in cfg.patch_size]
        sizes = (frames, *work.history_hw)
        terms.append((math.prod(math.ceil(s / k) for s, k in zip(sizes, kernel)), math.prod(kernel)))
    return terms


def token_counts(cfg: Any, work: Workload, stage: int) -> tuple[int, int]:
    """(noisy tokens, history tokens) at one stage."""
    pt, ph, pw = cfg.patch_size
    h, w = work.stages[stage]
    return work.frames // pt * (h // ph) * (w // pw), sum(tokens for tokens, _ in history_terms(cfg, work))


def dit_flops(cfg: Any, work: Workload, stage: int) -> dict[str, float]:
    """Model FLOPs of one forward (multiply-add = 2), in total and in the attention cores.

    Counts every matmul: patch embeddings, text embedder, per block the q/k/v/out projections,
    self-attention over all tokens, cross-attention of the noisy tokens (all tokens without
    ``guidance_cross_attn``) to the text, the feed-forward; then the output projection.
    Elementwise work (norms, RoPE, softmax) is left out, as MFU conventions do.
    """
    noisy, history = token_counts(cfg, work, stage)
    tokens, text = noisy + history, work.text_tokens
    dim, ffn, c = cfg.inner_dim, cfg.ffn_dim, cfg.in_channels
    queries = noisy if cfg.guidance_cross_attn else tokens
    patch = math.prod(cfg.patch_size)
    self_attn = 4 * tokens * tokens * dim
    cross_attn = 4 * queries * text * dim
    per_block = (
        2 * tokens * dim * dim * 4  # to_q, to_k, to_v, to_out of self-attention
        + self_attn
        + 2 * queries * dim * dim * 2 + 2 * text * dim * dim * 2  # cross-attention projections
        + cross_attn
        + 2 * tokens * dim * ffn * 2  # feed-forward
    )
    outside = (
        2 * noisy * c * patch * dim  # patch embedding of the noisy latents
        + sum(2 * n * c * volume * dim for n, volume in history_terms(cfg, work))  # history embeddings
        + 2 * text * (cfg.text_dim * dim + dim * dim)  # text embedder
        + 2 * noisy * dim * cfg.output_channels * patch  # proj_out
    )
    return {
        "total": cfg.num_layers * per_block + outside,
        "attention": cfg.num_layers * (self_attn + cross_attn),
    }
