"""Prompts to the text embeddings the Helios DiT is conditioned on, as the reference pipelines make them.

``PromptEncoder.encode_prompt`` is diffusers' ``HeliosPipeline.encode_prompt``: prompts are cleaned,
tokenized to ``max_sequence_length`` tokens, encoded by UMT5, and each prompt's embeddings past its
own length are zeroed; with classifier-free guidance the negative prompts (empty by default) are
encoded the same way. ``encode_interactive`` gives the per-chunk embeddings of an interactive prompt
list (each prompt from a chunk on, optionally blended over a few chunks at every switch), the
feature of the official Helios inference script.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax import hub
from helios_jax.checkpoint import PipelineError
from helios_jax.compilation import note_first_run
from helios_jax.config import UMT5Config
from helios_jax.loading import load_text_encoder
from helios_jax.models import offload as offload_lib
from helios_jax.models.umt5 import UMT5Encoder, is_hosted_leaf
from helios_jax.tokenizer import PromptTokenizer, clean_prompt

# The official inference's negative prompt: the default of generation, ODE-pair recording and the
# training YAMLs' empty data_config.negative_prompt.
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)

# The reference pipelines' ``__call__`` default; a tokenizer whose ``model_max_length`` is shorter (the nano model's:
# docs/nano.md) makes that the default instead, the length its model was trained on.
DEFAULT_MAX_SEQUENCE_LENGTH = 512
ENCODER_FOLDERS = ("text_encoder", "tokenizer")  # what from_pretrained reads of a checkpoint
Prompts = str | Sequence[str]


def _prompt_list(prompts: Prompts, name: str) -> list[str]:
    """A str becomes a one-prompt list; anything else must be a non-empty sequence of str."""
    items = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(items, Sequence) or not items or not all(isinstance(p, str) for p in items):
        raise TypeError(f"{name} must be a str or a non-empty list of str; got {prompts!r}")
    return list(items)


@functools.partial(jax.jit, static_argnums=0)
def _encode(model: UMT5Encoder, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Last hidden states with every position past a prompt's length set to zero. ``model``, the static
    argument, is the unbound flax module (its frozen config and attention implementation), so it hashes by
    value: every encoder of the same model shares the compiled program of a shape."""
    hidden = model.apply({"params": params}, ids, mask)
    return jnp.where(mask[..., None] > 0, hidden, jnp.zeros((), hidden.dtype))


def lower_encode(model: UMT5Encoder, params: Any, ids: jax.ShapeDtypeStruct,
                 lowering_platforms: tuple[str, ...] | None = None) -> jax.stages.Lowered:
    """The encoding program of token ids shaped as ``ids`` lowered, not run (params and ids may be shape structs
    placed anywhere, host memory included): its plan read before, or without, a device. ``lowering_platforms``
    as ``sampling.lower_denoise_chunk``'s."""
    return _encode.trace(model, params, ids, ids).lower(lowering_platforms=lowering_platforms)


class PromptEncoder:
    """The UMT5 encoder and its tokenizer: prompts in, (batch, max_sequence_length, d_model) embeddings out.

    ``PromptEncoder.from_pretrained(ckpt)`` reads ``ckpt/text_encoder`` and ``ckpt/tokenizer``. The
    encoder runs jit-compiled, once per (batch, length) shape and process. ``offload``: its token embedding
    and layers live in pinned host memory (moved there if they are not), streamed to the device as it runs
    (``UMT5Encoder(offload=True)``; ``HeliosPipeline(offload="blocks")``).
    """

    def __init__(self, config: UMT5Config, params: Any, tokenizer: PromptTokenizer, *, attention_impl: str = "xla",
                 offload: bool = False):
        self.config = config
        self.params = offload_lib.to_host(params, is_hosted_leaf) if offload else params
        self.tokenizer = tokenizer
        self.offload = offload
        self._encode = functools.partial(_encode, UMT5Encoder(config, attention_impl, offload=offload))

    def offloaded(self) -> "PromptEncoder":
        """This encoder with its embedding and layers in pinned host memory (itself if they are already)."""
        if self.offload:
            return self
        model = self._encode.args[0]
        return PromptEncoder(self.config, self.params, self.tokenizer, attention_impl=model.attention_impl, offload=True)

    @classmethod
    def from_pretrained(
        cls, checkpoint: str | os.PathLike, dtype: Any | None = None, *, attention_impl: str = "xla",
        revision: str | None = None
    ) -> "PromptEncoder":
        """From a diffusers checkpoint folder holding ``text_encoder/`` and ``tokenizer/``, or a hub id (at
        ``revision``), of which only those two folders are fetched."""
        folder = hub.resolve(checkpoint, revision=revision, folders=ENCODER_FOLDERS)
        tokenizer = PromptTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
        config, params = load_text_encoder(os.path.join(folder, "text_encoder"), dtype)
        return cls(config, params, tokenizer, attention_impl=attention_impl)

    @property
    def max_sequence_length(self) -> int:
        """The default text length: 512 (the reference's), or the tokenizer's ``model_max_length`` if shorter."""
        return min(DEFAULT_MAX_SEQUENCE_LENGTH, self.tokenizer.model_max_length or DEFAULT_MAX_SEQUENCE_LENGTH)

    def encode(
        self,
        prompt: Prompts,
        *,
        num_videos_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        dtype: Any | None = None,
    ) -> jax.Array:
        """Embeddings of the prompts, each repeated ``num_videos_per_prompt`` times in a row:
        (len(prompts) * num_videos_per_prompt, max_sequence_length, d_model), in ``dtype`` (default: the
        encoder's; ``max_sequence_length`` defaults to :attr:`max_sequence_length`). The reference's
        ``_get_t5_prompt_embeds``."""
        prompts = _prompt_list(prompt, "prompt")
        if max_sequence_length is None:
            max_sequence_length = self.max_sequence_length
        for name, value in (("num_videos_per_prompt", num_videos_per_prompt), ("max_sequence_length", max_sequence_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r} must be a positive integer")
        ids, mask = self.tokenizer([clean_prompt(p) for p in prompts], max_sequence_length)
        dtypes = frozenset(str(leaf.dtype) for leaf in jax.tree.leaves(self.params))
        note_first_run((self._encode.args[0], ids.shape, dtypes), "the text encoder")
        embeds = self._encode(self.params, ids, mask)
        if dtype is not None:
            embeds = embeds.astype(dtype)
        return jnp.repeat(embeds, num_videos_per_prompt, axis=0) if num_videos_per_prompt > 1 else embeds

    def encode_prompt(
        self,
        prompt: Prompts,
        negative_prompt: Prompts | None = None,
        *,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        dtype: Any | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """``(prompt_embeds, negative_prompt_embeds)`` as ``HeliosPipeline.encode_prompt`` returns them.

        Without guidance the negative embeddings are None. A missing or empty negative prompt is "",
        and one str serves every prompt; a list must have one negative per prompt. Both batches go
        through the encoder in one call.
        """
        prompts = _prompt_list(prompt, "prompt")
        kwargs = dict(num_videos_per_prompt=num_videos_per_prompt, max_sequence_length=max_sequence_length, dtype=dtype)
        if not do_classifier_free_guidance:
            return self.encode(prompts, **kwargs), None
        negatives = _prompt_list(negative_prompt or "", "negative_prompt")
        if isinstance(negative_prompt or "", str):
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"negative_prompt has {len(negatives)} prompts but prompt has {len(prompts)}; "
                "give one negative prompt per prompt, or one str for all"
            )
        embeds = self.encode(prompts + negatives, **kwargs)
        split = len(prompts) * num_videos_per_prompt
        return embeds[:split], embeds[split:]

    def encode_interactive(
        self,
        prompts: Sequence[str],
        starts: Sequence[int],
        num_chunks: int,
        *,
        interpolation_chunks: int = 0,
        max_sequence_length: int | None = None,
        dtype: Any | None = None,
    ) -> "PromptSchedule":
        """The per-chunk embeddings of an interactive prompt list (see :func:`plan_prompt_chunks`).

        Each prompt is encoded once; ``schedule[k]`` blends them for chunk k. The negative prompt stays one
        for the whole video: encode it with :meth:`encode`.
        """
        plan = plan_prompt_chunks(starts, num_chunks, interpolation_chunks)
        prompts = _prompt_list(prompts, "prompts")
        if len(prompts) != len(starts):
            raise ValueError(f"got {len(prompts)} prompts but {len(starts)} start chunks; give one start per prompt")
        # One at a time, through the one-prompt program a plain prompt (or a session's set_prompt) runs: a prompt's
        # embeddings are then the same numbers whether it was planned ahead or switched to live.
        embeds = [self.encode(p, max_sequence_length=max_sequence_length, dtype=dtype) for p in prompts]
        return PromptSchedule(jnp.concatenate(embeds), plan)


@dataclasses.dataclass(frozen=True)
class ChunkPrompt:
    """The text conditioning of one chunk: prompt ``source`` blended toward prompt ``target`` by
    ``weight`` (0: all source, 1: all target)."""

    source: int
    target: int
    weight: float


def plan_prompt_chunks(starts: Sequence[int], num_chunks: int, interpolation_chunks: int = 0) -> tuple[ChunkPrompt, ...]:
    """Which prompt each of ``num_chunks`` chunks uses, prompt i running from chunk ``starts[i]`` to the
    next start (the last one to the end).

    With ``interpolation_chunks`` = n >= 2, the first n chunks of every later prompt blend from the
    previous prompt to it with weights 0, 1/(n-1), ..., 1, as the official inference does (its
    ``interpolation_steps``), so a switch shows n - 2 mixed chunks; 0 switches at once. Each such prompt
    must run at least n chunks.
    """
    count = len(starts)
    if count == 0:
        raise ValueError("no prompts: give at least one prompt starting at chunk 0")
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in starts):
        raise TypeError(f"starts must be chunk indices (int); got {list(starts)!r}")
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, (int, np.integer)) or num_chunks < 1:
        raise ValueError(f"num_chunks = {num_chunks!r} must be a positive integer")
    if isinstance(interpolation_chunks, bool) or not isinstance(interpolation_chunks, (int, np.integer)):
        raise TypeError(f"interpolation_chunks must be an int; got {interpolation_chunks!r}")
    if interpolation_chunks < 0 or interpolation_chunks == 1:
        raise ValueError(
            f"interpolation_chunks = {interpolation_chunks} is not supported: use 0 to switch prompts at once, or "
            "n >= 2 to blend over n chunks (1 would only hold the previous prompt for one more chunk)"
        )
    if starts[0] != 0:
        raise ValueError(f"the first prompt starts at chunk {starts[0]}, leaving chunks before it without a prompt; start it at 0")
    for i in range(1, count):
        if starts[i] == starts[i - 1]:
            raise ValueError(f"prompts {i - 1} and {i} both start at chunk {starts[i]}; each chunk takes one prompt")
        if starts[i] < starts[i - 1]:
            raise ValueError(f"starts must increase: prompt {i} starts at chunk {starts[i]}, before prompt {i - 1} at {starts[i - 1]}")
    if starts[-1] >= num_chunks:
        raise ValueError(f"prompt {count - 1} starts at chunk {starts[-1]} but the video has only {num_chunks} chunks (0..{num_chunks - 1})")
    ends = [*starts[1:], num_chunks]
    for i in range(1, count):
        span = ends[i] - starts[i]
        if interpolation_chunks > span:
            raise ValueError(
                f"interpolation over {interpolation_chunks} chunks is longer than prompt {i}'s span of {span} chunk(s) "
                f"({starts[i]}..{ends[i] - 1}); shorten the interpolation or let the prompt run longer"
            )

    plan: list[ChunkPrompt] = []
    for i in range(count):
        plan += transition(max(i - 1, 0), i, ends[i] - starts[i], interpolation_chunks if i > 0 else 0)
    return tuple(plan)


def transition(source: int, target: int, length: int, interpolation_chunks: int) -> list[ChunkPrompt]:
    """The plan of the ``length`` chunks from a switch to prompt ``target`` on: with ``interpolation_chunks`` =
    n >= 2 the first n blend from prompt ``source`` with weights 0, 1/(n-1), ..., 1 (cut short where ``length``
    is shorter), the rest are ``target`` alone. The one interpolation rule of the interactive prompts, planned
    ahead (:func:`plan_prompt_chunks`) or live (:meth:`PromptSchedule.switched`)."""
    return [ChunkPrompt(source, target, position / (interpolation_chunks - 1)) if position < interpolation_chunks
            else ChunkPrompt(target, target, 0.0) for position in range(length)]


def check_prompt_plan(interactive_prompts: Sequence[tuple[int, str]], num_chunks: int,
                      interpolation_chunks: int) -> None:
    """:func:`plan_prompt_chunks`' rules (each prompt starts within the video, each blend fits its prompt) as one
    PipelineError, checked before any weight is read rather than when the prompts are encoded."""
    try:
        plan_prompt_chunks([start for start, _ in interactive_prompts], num_chunks, interpolation_chunks)
    except (TypeError, ValueError) as err:
        raise PipelineError(f"interactive prompts: {err}") from None


def lerp(start: jax.Array, end: jax.Array, weight: float) -> jax.Array:
    """``torch.lerp`` with the weight rounded to the inputs' dtype (the official inference blends
    tensors that way): float32 math, its two formulas for weights below and from 0.5, one rounding."""
    w = jnp.asarray(weight, start.dtype).astype(jnp.float32)
    a, b = start.astype(jnp.float32), end.astype(jnp.float32)
    out = jnp.where(w < 0.5, a + w * (b - a), b - (b - a) * (1 - w))
    return out.astype(start.dtype)


class PromptSchedule(Sequence[jax.Array]):
    """Per-chunk prompt embeddings: ``schedule[k]`` is chunk k's (1, max_sequence_length, d_model).

    Holds one row per distinct prompt and blends on access, so a long video costs no more memory
    than its prompts.
    """

    def __init__(self, embeds: jax.Array, plan: Sequence[ChunkPrompt]):
        self.embeds = embeds
        self.plan = tuple(plan)

    def __len__(self) -> int:
        return len(self.plan)

    def switched(self, chunk: int, embeds: jax.Array, interpolation_chunks: int = 0) -> "PromptSchedule":
        """The schedule of chunks ``chunk``, ``chunk`` + 1, ... (its index 0 is ``chunk``) when prompt ``embeds``
        (1, tokens, dim) takes over at ``chunk``: blended over ``interpolation_chunks`` chunks (:func:`transition`)
        from the embeddings chunk - 1 used; at chunk 0 nothing came before, so it is ``embeds`` from the start.

        What a live prompt change makes (``StreamSession.set_prompt``). Made at a chunk where a planned switch
        would start, it gives that chunk on the rows and weights :func:`plan_prompt_chunks` gives; made mid-blend,
        it blends from the mixed embeddings the last chunk used. It keeps at most two rows, so a session changed
        a thousand times holds no more than one changed once."""
        rows = []
        if chunk > 0:
            last = self.plan[chunk - 1]
            # A finished blend (weight 1) is its target exactly: lerp's second formula gives b - (b - a) * 0.
            exact = last.source == last.target or last.weight == 1.0
            rows.append(self.embeds[last.target][None] if exact else self[chunk - 1])
        blend = interpolation_chunks if chunk > 0 else 0
        return PromptSchedule(jnp.concatenate([*rows, embeds]), transition(0, len(rows), len(self) - chunk, blend))

    def __getitem__(self, chunk):  # Sequence protocol: an int gives one chunk's embeddings
        if isinstance(chunk, slice):
            return [self[k] for k in range(*chunk.indices(len(self)))]
        step = self.plan[chunk]
        source = self.embeds[step.source][None]
        if step.source == step.target:
            return source
        return lerp(source, self.embeds[step.target][None], step.weight)
