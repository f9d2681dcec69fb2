"""One generation's settings and the rules they must meet, checked before anything is loaded or computed.

The checks need only the pipeline's kind (single stage or pyramid, and how many stages), never the
weights, so ``helios-jax generate`` runs them on a checkpoint's configs alone: a typo costs no weight
load. Every failure is one :class:`PipelineError` naming the value, the rule and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np

from helios_jax.checkpoint import PipelineError
from helios_jax.history import HistoryLayout, video_frames_per_chunk

SEED_RANGE = (-(2**63), 2**63 - 1)  # what jax.random.key (and torch's manual_seed, for negatives) takes


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation's settings, validated before any compute (the reference's argument names)."""

    height: int = 384
    width: int = 640
    num_frames: int = 132
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    history_sizes: tuple[int, ...] = (16, 2, 1)
    num_latent_frames_per_chunk: int = 9
    keep_first_frame: bool = True
    is_skip_first_chunk: bool = False
    is_amplify_first_chunk: bool = False
    pyramid_num_inference_steps_list: tuple[int, ...] = (10, 10, 10)
    use_zero_init: bool = True
    zero_steps: int = 1
    sigmas: tuple[float, ...] | None = None
    add_noise_to_image_latents: bool = True
    image_noise_sigma_min: float = 0.111
    image_noise_sigma_max: float = 0.135
    add_noise_to_video_latents: bool = True
    video_noise_sigma_min: float = 0.111
    video_noise_sigma_max: float = 0.135
    max_sequence_length: int = 512


# The type and least value of each setting, ("int" | "float" | "ints" | "floats", least[, why]); the rest are bools.
_RULES: dict[str, Any] = {
    "height": ("int", 1), "width": ("int", 1), "num_frames": ("int", 1, "ask for at least one frame"),
    "num_inference_steps": ("int", 1),
    "guidance_scale": ("float", 0.0), "history_sizes": ("ints", 1), "num_latent_frames_per_chunk": ("int", 1),
    "pyramid_num_inference_steps_list": ("ints", 1), "zero_steps": ("int", 0), "sigmas": ("floats", 0.0),
    "image_noise_sigma_min": ("float", 0.0), "image_noise_sigma_max": ("float", 0.0),
    "video_noise_sigma_min": ("float", 0.0), "video_noise_sigma_max": ("float", 0.0),
    "max_sequence_length": ("int", 1),
}
_FIX = {"int": "an integer", "float": "a finite number", "ints": "a list of integers", "floats": "a list of numbers"}


def is_int(value: Any) -> bool:
    """An integer, not a bool (``True`` is an int to Python, never a size to a user)."""
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (numbers.Real, np.number)) and not isinstance(value, (bool, np.bool_))


def _checked(name: str, value: Any) -> Any:
    """``value`` in its canonical form (int, float, bool or tuple), or a PipelineError saying what is wrong."""
    rule = _RULES.get(name, "bool")
    if rule == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise PipelineError(f"{name} = {value!r}: expected True or False")
        return bool(value)
    kind, least, *why = rule
    many = kind in ("ints", "floats")
    items = value if many and isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str) else None
    if many and items is None:
        raise PipelineError(f"{name} = {value!r}: expected {_FIX[kind]}")
    for item in (items if many else [value]):
        whole = kind in ("int", "ints")
        if not (is_int(item) if whole else _is_number(item)):
            raise PipelineError(f"{name} = {value!r}: expected {_FIX[kind]}, not {type(item).__name__} {item!r}")
        if not whole and not math.isfinite(float(item)):
            raise PipelineError(f"{name} = {value!r}: every value must be finite (no nan or inf)")
        if item < least:
            raise PipelineError(f"{name} = {value!r}: {why[0] if why else f'must be at least {least}'}")
    cast = int if kind in ("int", "ints") else float
    return tuple(cast(v) for v in items) if many else cast(value)


def check_request(settings: Mapping[str, Any], *, pyramid: bool, stages: int,
                  scheduler_type: str) -> tuple[Request, HistoryLayout]:
    """The :class:`Request` and history layout of ``settings`` for a pipeline of this kind (``pyramid``
    with ``stages`` stages and the scheduler's ``scheduler_type``), or the first rule they break."""
    known = {f.name for f in dataclasses.fields(Request)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise PipelineError(f"unknown argument(s) {unknown}; the pipeline takes {sorted(known)}")
    values = {name: _checked(name, value) for name, value in settings.items() if not (name == "sigmas" and value is None)}
    request = Request(**values)
    stages = stages if pyramid else 1
    multiple = 16 * 2 ** (stages - 1)
    h, w = request.height, request.width
    if h % multiple or w % multiple:
        raise PipelineError(
            f"height and width must be positive multiples of {multiple} (16 for the VAE and the patch, doubled "
            f"for each of the {stages - 1} pyramid downsamplings); got {h}x{w}"
        )
    if pyramid and len(request.pyramid_num_inference_steps_list) != stages:
        raise PipelineError(
            f"pyramid_num_inference_steps_list = {list(request.pyramid_num_inference_steps_list)}: give "
            f"{stages} positive step counts, one per pyramid stage"
        )
    if request.sigmas is not None:
        if pyramid or scheduler_type == "dmd":
            raise PipelineError("custom sigmas are for the single-stage UniPC or Euler schedulers; this checkpoint's "
                                f"pipeline is {'the pyramid' if pyramid else 'a DMD'} one: drop sigmas")
        if len(request.sigmas) != request.num_inference_steps or max(request.sigmas) > 1:
            raise PipelineError(f"sigmas = {list(request.sigmas)}: give num_inference_steps = "
                                f"{request.num_inference_steps} noise levels in [0, 1]")
    for low, high in (("image_noise_sigma_min", "image_noise_sigma_max"),
                      ("video_noise_sigma_min", "video_noise_sigma_max")):
        if not getattr(request, low) <= getattr(request, high) <= 1:
            raise PipelineError(f"{low} <= {high} must lie in [0, 1]; got {getattr(request, low)}, "
                                f"{getattr(request, high)}")
    try:
        layout = HistoryLayout.create(request.history_sizes, request.num_latent_frames_per_chunk,
                                      request.keep_first_frame)
    except ValueError as err:
        raise PipelineError(str(err)) from None
    return request, layout


def check_seed(seed: Any) -> None:
    """A seed is None or an integer that ``jax.random.key`` takes."""
    if seed is not None and not (is_int(seed) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise PipelineError(f"seed = {seed!r}: expected an integer in [-2**63, 2**63 - 1]")


def _is_texts(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, Sequence) and len(value) > 0
                                      and all(isinstance(p, str) for p in value))


def check_prompts(prompt: Any, prompt_embeds: Any, negative_prompt: Any, negative_prompt_embeds: Any,
                  interactive_prompts: Any, interpolation_chunks: Any) -> int:
    """The batch size the text inputs make, after checking that they form one valid combination."""
    sources = sum(x is not None for x in (prompt, prompt_embeds, interactive_prompts))
    if sources != 1:
        raise PipelineError("give exactly one of prompt, prompt_embeds and interactive_prompts")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise PipelineError("give negative_prompt or negative_prompt_embeds, not both")
    if prompt is not None and not _is_texts(prompt):
        raise PipelineError(f"prompt must be a str or a non-empty list of str; got {prompt!r}")
    if negative_prompt is not None and not _is_texts(negative_prompt):
        raise PipelineError(f"negative_prompt must be a str or a non-empty list of str; got {negative_prompt!r}")
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if embeds is not None and np.ndim(embeds) != 3:
            raise PipelineError(f"{name} must be (batch, tokens, text_dim); got shape {np.shape(embeds)}")
    if not is_int(interpolation_chunks) or interpolation_chunks < 0:
        raise PipelineError(f"interpolation_chunks = {interpolation_chunks!r}: expected an integer >= 0")
    if interactive_prompts is not None:
        _check_interactive(interactive_prompts)
        return 1
    batch = len(prompt) if prompt is not None and not isinstance(prompt, str) else 1
    batch = np.shape(prompt_embeds)[0] if prompt_embeds is not None else batch
    if negative_prompt is not None and not isinstance(negative_prompt, str) and len(negative_prompt) != batch:
        raise PipelineError(f"negative_prompt has {len(negative_prompt)} prompts but the batch has {batch}: give one "
                            "negative prompt per prompt, or one str for all")
    return batch


def _check_interactive(interactive_prompts: Any) -> None:
    """(start chunk, prompt) pairs, starting at chunk 0, starts increasing."""
    ok = isinstance(interactive_prompts, Sequence) and len(interactive_prompts) > 0 and all(
        isinstance(p, (tuple, list)) and len(p) == 2 and is_int(p[0]) and isinstance(p[1], str)
        for p in interactive_prompts)
    starts = [p[0] for p in interactive_prompts] if ok else []
    if not ok or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise PipelineError(f"interactive_prompts = {interactive_prompts!r}: expected (start chunk, prompt) pairs "
                            "with increasing starts, the first at chunk 0")


def check_video_length(frames: int, request: Request) -> None:
    """Video-to-video needs at least one whole chunk of frames to encode as history."""
    needed = video_frames_per_chunk(request.num_latent_frames_per_chunk)
    if frames < needed:
        raise PipelineError(f"the video has {frames} frames; video-to-video needs at least one chunk of {needed} "
                            f"frames (num_latent_frames_per_chunk = {request.num_latent_frames_per_chunk})")
