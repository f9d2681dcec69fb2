"""The streaming protocol's messages and limits: every client message checked here, before it touches a job.

A client sends JSON text messages (``start``, ``prompt``, ``image``, ``pause``, ``resume``, ``stop``); each one that is
malformed, of an unknown type, or past a limit is one :class:`ProtocolError` whose text names the field, the
rule and the limit, which the server sends back as ``{"type": "error", "message": ...}`` and otherwise ignores.
No field is a path: an image comes as base64 bytes, and the server names every file it writes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
from typing import Any

import numpy as np

from helios_jax.request import SEED_RANGE, is_int

CLIENT_TYPES = ("start", "prompt", "image", "pause", "resume", "stop")
START_FIELDS = ("prompt", "num_frames", "seed", "height", "width", "guidance_scale", "steps", "image",
                "transition_chunks")
MIB = 1 << 20


class ProtocolError(ValueError):
    """A client message that breaks the protocol or a limit: its text is what the client is told."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may ask for. Each is stated in the error that refuses it."""

    max_message_bytes: int = 12 * MIB  # a text message; the largest is a start with an image
    max_prompt_chars: int = 2000
    max_frames: int = 33 * 40  # forty 33-frame chunks
    max_side: int = 1024  # height and width, pixels
    max_image_bytes: int = 8 * MIB  # the image's file bytes, decoded from base64
    max_image_pixels: int = 4096 * 4096  # its decoded size, before it is fitted to the video's
    max_steps: int = 50  # denoising steps (per pyramid stage)
    max_guidance: float = 20.0
    max_transition_chunks: int = 8
    max_pause_s: float = 300.0  # a paused generation keeps the device; past this it is stopped for the next client


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The values a ``start`` leaves out: the served model's own (generate's defaults for it)."""

    prompt: str
    height: int
    width: int
    guidance_scale: float
    steps: int
    num_frames: int = 99
    seed: int = 0
    transition_chunks: int = 3  # a prompt change blends in over 3 chunks, as vLLM-Omni's Helios server does
    amplify_first_chunk: bool = False  # the server's, not a client's: the nano model's demo amplifies


@dataclasses.dataclass(frozen=True)
class Start:
    """A checked ``start``: the generation's settings; ``image`` uint8 (H, W, 3) at the video's size, or None."""

    prompt: str
    num_frames: int
    seed: int
    height: int
    width: int
    guidance_scale: float
    steps: int
    transition_chunks: int
    image: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)


def parse_message(text: str | bytes | None, limits: Limits) -> dict[str, Any]:
    """One client message as a JSON object with a known ``type``."""
    if not isinstance(text, str):
        raise ProtocolError("send JSON text messages ({\"type\": ...}); binary messages are not part of the protocol")
    if len(text) > limits.max_message_bytes:
        raise ProtocolError(f"the message has {len(text)} characters; the limit is {limits.max_message_bytes}")
    try:
        message = json.loads(text)
    except json.JSONDecodeError as err:
        raise ProtocolError(f"the message is not JSON: {err}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"the message must be a JSON object with a \"type\"; got {type(message).__name__}")
    kind = message.get("type")
    if kind not in CLIENT_TYPES:
        raise ProtocolError(f"type = {kind!r}: expected one of {', '.join(CLIENT_TYPES)}")
    return message


def check_fields(message: dict, allowed: tuple[str, ...]) -> None:
    """Unknown fields are errors, not ignored (a misspelt field would otherwise silently take its default)."""
    unknown = sorted(set(message) - {"type", *allowed})
    if unknown:
        raise ProtocolError(f"unknown field(s) {unknown} in {message['type']}; it takes {', '.join(allowed)}")


def _integer(message: dict, name: str, default: int, low: int, high: int, unit: str = "") -> int:
    value = message.get(name, default)
    if not is_int(value):
        raise ProtocolError(f"{name} = {value!r}: expected an integer")
    if not low <= value <= high:
        raise ProtocolError(f"{name} = {value}: the limit is {low} to {high}{unit}")
    return int(value)


def check_prompt(value: Any, limits: Limits) -> str:
    """A prompt: a non-empty string of at most ``max_prompt_chars``."""
    if not isinstance(value, str) or not value.strip():
        raise ProtocolError(f"prompt = {value!r}: expected a non-empty string")
    if len(value) > limits.max_prompt_chars:
        raise ProtocolError(f"the prompt has {len(value)} characters; the limit is {limits.max_prompt_chars}")
    return value


def check_transition(message: dict, default: int, limits: Limits) -> int:
    """The chunks over which a new prompt blends in: 0 switches at once, n >= 2 blends over n chunks (the
    session's rule: a one-chunk blend would be the switch itself)."""
    value = _integer(message, "transition_chunks", default, 0, limits.max_transition_chunks, " chunks")
    if value == 1:
        raise ProtocolError("transition_chunks = 1: give 0 to switch at once, or 2 to "
                            f"{limits.max_transition_chunks} to blend over that many chunks")
    return value


def decode_image(value: Any, height: int, width: int, limits: Limits) -> np.ndarray:
    """A base64 image (a data: URL or bare base64 of a PNG/JPEG/... file) as uint8 (height, width, 3)."""
    from PIL import Image

    from helios_jax.video import fit_image

    if not isinstance(value, str):
        raise ProtocolError(f"image: expected base64 text (or a data: URL); got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) * 3 // 4 > limits.max_image_bytes:
        raise ProtocolError(f"the image has about {len(value) * 3 // 4} bytes; the limit is {limits.max_image_bytes}")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ProtocolError(f"image: not valid base64 ({err})") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > limits.max_image_pixels:
                raise ProtocolError(f"the image is {image.width}x{image.height}; the limit is "
                                    f"{limits.max_image_pixels} pixels")
            image.load()
            return fit_image(image.copy(), height, width)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, ProtocolError):
            raise
        raise ProtocolError(f"image: cannot read it as an image file ({err})") from None


def parse_start(message: dict, defaults: Defaults, limits: Limits) -> Start:
    """A ``start`` message checked against the limits, its missing fields from ``defaults``."""
    check_fields(message, START_FIELDS)
    prompt = check_prompt(message.get("prompt", defaults.prompt), limits)
    num_frames = _integer(message, "num_frames", defaults.num_frames, 1, limits.max_frames, " frames")
    seed = _integer(message, "seed", defaults.seed, *SEED_RANGE)
    height = _integer(message, "height", defaults.height, 16, limits.max_side, " pixels")
    width = _integer(message, "width", defaults.width, 16, limits.max_side, " pixels")
    steps = _integer(message, "steps", defaults.steps, 1, limits.max_steps, " steps")
    guidance = message.get("guidance_scale", defaults.guidance_scale)
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance):
        raise ProtocolError(f"guidance_scale = {guidance!r}: expected a finite number")
    if not 0 <= guidance <= limits.max_guidance:
        raise ProtocolError(f"guidance_scale = {guidance}: the limit is 0 to {limits.max_guidance}")
    image = message.get("image")
    return Start(prompt=prompt, num_frames=num_frames, seed=seed, height=height, width=width,
                 guidance_scale=float(guidance), steps=steps,
                 transition_chunks=check_transition(message, defaults.transition_chunks, limits),
                 image=None if image is None else decode_image(image, height, width, limits))
