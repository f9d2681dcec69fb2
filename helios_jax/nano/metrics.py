"""Scores for a video of the nano world, from what it was prompted with and the world's rules alone.

Nothing here is learned: each frame is read the way the world draws it (a plain background, one bright
shape; :mod:`helios_jax.nano.world`), and each 33-frame chunk is scored against its caption and against the
motion rule (constant velocity, elastic bounces). The same numbers describe a training clip and a
generated video, so "the model learned the world" is a table, and drift and seams at the chunk joins (what
Helios' anti-drifting training is for) are numbers too. Thresholds are set for videos that went through
h264 at 64 x 64 (crf 18), which is how generated videos come back.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import ndimage

from helios_jax.nano.world import (
    BACKGROUNDS,
    CHUNK_FRAMES,
    COLOURS,
    WORLD,
    CaptionError,
    Prompted,
    World,
    bounce,
    parse_caption,
)
from helios_jax.video import MediaError

# A pixel belongs to the object when its RGB distance from the frame's median colour (the background) exceeds
# this: every object colour is >= 158 from every background (world.py), so pixels the shape covers by more than
# ~40% pass, while h264's noise on a flat background (a few units) stays far below.
OBJECT_THRESHOLD = 60.0
# The object is present when its largest blob has at least this many pixels: the smallest shape (a 20-pixel
# triangle) covers about 200.
MIN_PIXELS = 24
# A pixel's share of the shape is its distance from the background over the object colour's; shares below
# FRINGE are h264's colour bleeding around the edges (chroma is stored at half resolution), not the shape.
FRINGE = 0.25
# Shape: a triangle (pointing up) has its mass skewed down its rows (skewness -0.57, a square's and a circle's
# is 0); between those two, the shape's fill of its box tells (square 1, circle pi/4 = 0.785). The cuts sit
# halfway between, measured on the shares, so h264's blurred edges shift them little.
TRIANGLE_SKEW = -0.28
SQUARE_FILL = 0.89
# Rec. 601 luma weights: the brightness whose drift is reported.
LUMA = np.array([0.299, 0.587, 0.114])
# A prompt's direction (in its first chunk) is that of the mean velocity over its first DIRECTION_STEPS frame
# steps; an axis slower than DIRECTION_DEADBAND px/frame counts as still (the world's slowest moving axis: 0.42).
DIRECTION_STEPS = 4
DIRECTION_DEADBAND = 0.2

_COLOUR_NAMES, _COLOUR_RGB = list(COLOURS), np.array(list(COLOURS.values()), np.float64)
_BACKGROUND_NAMES, _BACKGROUND_RGB = list(BACKGROUNDS), np.array(list(BACKGROUNDS.values()), np.float64)


@dataclasses.dataclass(frozen=True)
class Detection:
    """What one frame shows: the background, and the object if one is there."""

    background: str  # the nearest named background to the frame's median colour
    background_rgb: tuple[float, float, float]  # that median colour
    present: bool
    colour: str | None = None
    shape: str | None = None
    centroid: tuple[float, float] | None = None  # (y, x), the object's coverage-weighted centre
    extent: tuple[float, float, float, float] | None = None  # (top, left, bottom, right) of the shape, pixels


def _nearest(rgb: np.ndarray, names: list[str], table: np.ndarray) -> str:
    return names[int(np.argmin(np.linalg.norm(table - rgb, axis=1)))]


def _centroid(share: np.ndarray) -> tuple[float, float]:
    """The (y, x) centre of mass of a map of shares, pixel centres at + 0.5."""
    total = share.sum()
    return (float(share.sum(axis=1) @ (np.arange(share.shape[0]) + 0.5) / total),
            float(share.sum(axis=0) @ (np.arange(share.shape[1]) + 0.5) / total))


def _shape(share: np.ndarray) -> str:
    """The shape's name from the skewness of its mass down the rows, then its fill of its box."""
    rows = np.arange(share.shape[0]) + 0.5
    profile = share.sum(axis=1) / share.sum()
    mean = float(profile @ rows)
    skew = float(profile @ (rows - mean) ** 3) / max(float(profile @ (rows - mean) ** 2), 1e-9) ** 1.5
    if skew < TRIANGLE_SKEW:
        return "triangle"
    fill = share.sum() / (share.max(axis=1).sum() * share.max(axis=0).sum())  # a row's or column's span: its max
    return "square" if fill > SQUARE_FILL else "circle"


def _extent(share: np.ndarray) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) of the shape to a fraction of a pixel: an edge row or column that the shape
    spans by a share s lies 1 - s inside its pixel."""
    edges = []
    for span in (share.max(axis=1), share.max(axis=0)):
        first, last = np.nonzero(span)[0][[0, -1]]
        edges.append((first + 1 - span[first], last + span[last]))
    (top, bottom), (left, right) = edges
    return float(top), float(left), float(bottom), float(right)


def detect(frame: np.ndarray) -> Detection:
    """Read one uint8 (H, W, 3) frame: the median colour is the background; the largest blob of pixels far
    from it is the object, named by its median colour and by its shape's moments, and placed at its centroid
    weighted by each pixel's share of the shape (as the world draws it: the background blended toward the
    object's colour by the share)."""
    pixels = frame.astype(np.float64)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    labels, count = ndimage.label(distance > OBJECT_THRESHOLD)
    named = dict(background=_nearest(background, _BACKGROUND_NAMES, _BACKGROUND_RGB),
                 background_rgb=tuple(background.tolist()))
    sizes = np.bincount(labels.ravel())[1:]
    if count == 0 or sizes.max() < MIN_PIXELS:
        return Detection(present=False, **named)
    blob = labels == 1 + int(np.argmax(sizes))
    colour = np.median(pixels[blob], axis=0)
    contrast = max(float(np.linalg.norm(colour - background)), OBJECT_THRESHOLD)
    share = np.where(ndimage.binary_dilation(blob, iterations=2), np.clip(distance / contrast, 0, 1), 0)
    centroid = _centroid(share)  # every share: the edges move smoothly, and so does the centroid
    share[share < FRINGE] = 0  # but h264's fringes would blur the shape's moments and extent
    return Detection(present=True, colour=_nearest(colour, _COLOUR_NAMES, _COLOUR_RGB), shape=_shape(share),
                     centroid=centroid, extent=_extent(share), **named)


def predict(before: Detection, last: Detection, world: World = WORLD) -> np.ndarray:
    """The rule's next centroid from the two previous frames: constant velocity, then the bounce that keeps the
    object's box (its blob's extent around the centroid in ``last``) inside the frame."""
    c0, c1 = np.array(before.centroid), np.array(last.centroid)
    top, left, bottom, right = last.extent
    low = c1 - np.array([top, left])  # the centroid's nearest approach to the top-left borders
    high = np.array([world.height, world.width]) - (np.array([bottom, right]) - c1)
    return low + bounce(2 * c1 - c0 - low, np.maximum(high - low, 1e-6))


@dataclasses.dataclass(frozen=True)
class Report:
    """Per-chunk scores (``chunks``: one dict each, floats, None where nothing could be measured) and their
    ``summary`` (the means over chunks, but the drift is the last chunk's)."""

    chunks: list[dict]
    summary: dict

    def table(self) -> str:
        """The scores as a markdown table: one row per chunk, then the summary, then the prompts."""
        columns = [k for k in self.chunks[0] if k not in ("chunk", "prompt")]
        lines = ["| chunk | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
        for row in [*self.chunks, {"chunk": "summary", **self.summary}]:
            lines.append(f"| {row['chunk']} | " + " | ".join(_cell(row.get(k)) for k in columns) + " |")
        prompts = dict.fromkeys(row["prompt"] for row in self.chunks)
        return "\n".join(lines + [""] + [f"prompt: {p}" for p in prompts])


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _chunk_prompts(prompts: str | Sequence[str], chunks: int) -> list[tuple[str, Prompted]]:
    """(caption, what it asks for) of every chunk."""
    texts = [" ".join(prompts.split())] if isinstance(prompts, str) else [" ".join(str(p).split()) for p in prompts]
    if len(texts) == 1:
        texts *= chunks
    if len(texts) != chunks:
        raise CaptionError(f"{len(texts)} prompts for a video of {chunks} chunks: give one caption, or one per chunk")
    return [(t, parse_caption(t)) for t in texts]


def _check_video(video: np.ndarray, chunk_frames: int, world: World) -> None:
    if not (isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.ndim == 4 and video.shape[-1] == 3):
        shape = f"{video.dtype} {video.shape}" if isinstance(video, np.ndarray) else type(video).__name__
        raise MediaError(f"a video to evaluate must be uint8 (T, H, W, 3); got {shape}")
    if len(video) == 0:
        raise MediaError("the video to evaluate has no frames")
    if video.shape[1:3] != (world.height, world.width):
        raise MediaError(f"the video is {video.shape[1]}x{video.shape[2]}, not the nano world's "
                         f"{world.height}x{world.width}")
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 3:
        raise ValueError(f"chunk_frames = {chunk_frames!r}: expected an integer >= 3")


def _motion(found: list[Detection], world: World) -> tuple[float | None, float | None]:
    """(rule error, speed) of one chunk's detections: the mean distance of each centroid from the rule's
    prediction from the two before it, and the mean step between consecutive centroids."""
    errors = [float(np.linalg.norm(np.array(c.centroid) - predict(a, b, world)))
              for a, b, c in zip(found, found[1:], found[2:]) if a.present and b.present and c.present]
    steps = [float(np.linalg.norm(np.subtract(b.centroid, a.centroid)))
             for a, b in zip(found, found[1:]) if a.present and b.present]
    return _mean(errors), _mean(steps)


def _direction(found: list[Detection]) -> tuple[int, int] | None:
    """The signs of the mean velocity over the first frame steps (None when the object is missing there): a
    scene of the world touches no border in its first frames (world.CLEAR_FRAMES), so they move as captioned."""
    first = found[:DIRECTION_STEPS + 1]
    if len(first) < 2 or not all(d.present for d in first):
        return None
    velocity = np.subtract(first[-1].centroid, first[0].centroid) / (len(first) - 1)
    return tuple(int(np.sign(v)) if abs(v) >= DIRECTION_DEADBAND else 0 for v in velocity)


def evaluate(video: np.ndarray, prompts: str | Sequence[str], chunk_frames: int = CHUNK_FRAMES,
             world: World = WORLD) -> Report:
    """Score a uint8 (T, H, W, 3) video of the nano world chunk by chunk against ``prompts``: one caption, or one
    per chunk (a prompt switch). A last chunk shorter than ``chunk_frames`` is scored as it is.

    Per chunk: presence (share of frames with the object), colour / shape / background accuracy (share of frames
    whose named colour, shape, background is the prompted one; a frame without the object counts as wrong for
    colour and shape), motion_error (px, against the rule), speed (px/frame), drift of the mean RGB and of the
    brightness from the first chunk's, background_error (the median colour's RGB distance from the prompted
    background's), join_ratio (mean absolute pixel change across the join into the chunk over the mean change
    between consecutive frames inside chunks: ~1 is seamless), and, in the first chunk of each prompt,
    direction_correct (whether its first frames move the way the caption says)."""
    _check_video(video, chunk_frames, world)
    starts = list(range(0, len(video), chunk_frames))
    prompted = _chunk_prompts(prompts, len(starts))
    found = [detect(frame) for frame in video]
    pixels = video.astype(np.float64)
    change = np.abs(np.diff(pixels, axis=0)).mean(axis=(1, 2, 3))  # change[t]: frame t -> t + 1
    inside = np.ones(len(change), bool)
    inside[np.array(starts[1:], int) - 1] = False
    typical_change = float(change[inside].mean()) if inside.any() else 0.0
    first_rgb = pixels[:chunk_frames].mean(axis=(0, 1, 2))
    chunks = []
    for k, start in enumerate(starts):
        (text, ask), frames = prompted[k], found[start:start + chunk_frames]
        rgb = pixels[start:start + chunk_frames].mean(axis=(0, 1, 2))
        drift = rgb - first_rgb
        motion_error, speed = _motion(frames, world)
        join = None
        if k > 0 and typical_change > 0:
            join = float(change[start - 1] / typical_change)
        chunks.append({
            "chunk": k, "prompt": text,
            "presence": _share(d.present for d in frames),
            "colour_accuracy": _share(d.present and d.colour == ask.colour for d in frames),
            "shape_accuracy": _share(d.present and d.shape == ask.shape for d in frames),
            "background_accuracy": _share(d.background == ask.background for d in frames),
            "motion_error": motion_error, "speed": speed,
            "drift_r": float(drift[0]), "drift_g": float(drift[1]), "drift_b": float(drift[2]),
            "drift_brightness": float(drift @ LUMA),
            "background_error": _mean(float(np.linalg.norm(np.subtract(d.background_rgb, BACKGROUNDS[ask.background])))
                                      for d in frames),
            "join_ratio": join,
            "direction_correct": None,
        })
        if k == 0 or text != prompted[k - 1][0]:  # a prompt's first chunk: does it start the way it says?
            direction = _direction(frames)
            chunks[-1]["direction_correct"] = None if direction is None else float(direction == ask.direction)
    summary = {key: _mean(row[key] for row in chunks) for key in chunks[0] if key not in ("chunk", "prompt")}
    summary.update({key: chunks[-1][key] for key in ("drift_r", "drift_g", "drift_b", "drift_brightness")})
    return Report(chunks, summary)


def _share(flags) -> float:
    flags = list(flags)
    return float(np.mean(flags)) if flags else 0.0
