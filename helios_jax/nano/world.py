"""The nano world: one coloured shape moving at constant velocity and bouncing off the frame's borders.

A world whose every video is known exactly: a :class:`Scene` (shape, colour, background, size, start,
velocity) gives the caption (:func:`caption`), the ground-truth position of every frame
(:func:`trajectory`) and the pixels (:func:`render`), all deterministic and pure numpy, so a tiny Helios
can be trained on it and its videos scored against the rule (:mod:`helios_jax.nano.metrics`) without
anything learned or downloaded. The colours are few, bright and far apart and the backgrounds dark, so
a generated video's colours can be named back without ambiguity, even through h264.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import tempfile
from typing import Sequence

import numpy as np

from helios_jax.video import write_mp4, write_text


@dataclasses.dataclass(frozen=True)
class World:
    """The frame size and rate of every nano video (the tiny model's resolution)."""

    height: int = 64
    width: int = 64
    fps: int = 24


WORLD = World(height=64, width=64, fps=24)
CHUNK_FRAMES = 33  # the video frames of one generated chunk (its 9 latent frames); a join is at frame 33k

# Object colours: bright and pairwise at least ~100 apart in RGB; every one is at least ~160 from every
# background (the metrics' object threshold sits between the two: helios_jax.nano.metrics).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 35, 35),
    "green": (40, 225, 40),
    "blue": (50, 90, 255),
    "yellow": (245, 235, 40),
    "magenta": (235, 45, 235),
    "cyan": (40, 230, 235),
    "white": (245, 245, 245),
    "orange": (255, 140, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "dark blue": (15, 15, 80),
    "dark green": (10, 70, 15),
    "dark red": (80, 12, 12),
    "grey": (70, 70, 70),
}
SHAPES = ("circle", "square", "triangle")
# (vy sign, vx sign) -> the caption's words; y grows downwards, as image rows do.
DIRECTIONS: dict[tuple[int, int], str] = {
    (-1, 0): "moves up",
    (1, 0): "moves down",
    (0, -1): "moves left",
    (0, 1): "moves right",
    (-1, -1): "moves up and left",
    (-1, 1): "moves up and right",
    (1, -1): "moves down and left",
    (1, 1): "moves down and right",
}
SIZES = (20, 28)  # the object's box side in pixels, inclusive: two to four latent pixels across (the VAE is 8x)
SPEEDS = (0.6, 1.4)  # pixels per frame along the direction
CLEAR_FRAMES = 8  # a scene's first frames that touch no border (the direction its caption names is visible)
SUPERSAMPLING = 8  # render: each pixel is the coverage of SUPERSAMPLING^2 samples (anti-aliased edges)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _vocabulary() -> tuple[str, ...]:
    words = ["a", "an", "on", "background"]
    for phrase in (*COLOURS, *SHAPES, *DIRECTIONS.values(), *BACKGROUNDS):
        words += [w for w in phrase.split() if w not in words]
    return tuple(words)


VOCABULARY: tuple[str, ...] = _vocabulary()  # every word a caption can hold, one token each for the tiny tokenizer


class CaptionError(ValueError):
    """A caption outside the nano world's grammar, or captions that do not fit the video they are to score."""


@dataclasses.dataclass(frozen=True)
class Scene:
    """One clip's parameters: everything its caption, trajectory and pixels follow from."""

    shape: str
    colour: str
    background: str
    size: int  # the object's box side in pixels
    position: tuple[float, float]  # (y, x) of the box's top-left at frame 0
    velocity: tuple[float, float]  # (vy, vx) pixels per frame

    @property
    def direction(self) -> tuple[int, int]:
        """(vy sign, vx sign) of the initial velocity: what the caption says."""
        return int(np.sign(self.velocity[0])), int(np.sign(self.velocity[1]))


@dataclasses.dataclass(frozen=True)
class Prompted:
    """What a caption asks for: the scene's named parameters, without its numbers."""

    shape: str
    colour: str
    background: str
    direction: tuple[int, int]  # (vy sign, vx sign)


def _scene(rng: np.random.Generator, shape: str, colour: str, background: str, direction: tuple[int, int],
           world: World) -> Scene:
    size = int(rng.integers(SIZES[0], SIZES[1] + 1))
    speed = rng.uniform(*SPEEDS)
    velocity = speed * np.array(direction, float) / np.hypot(*direction)
    # The box starts where its first CLEAR_FRAMES frames touch no border: they show the captioned direction.
    room = np.array([world.height, world.width], float) - size
    low, high = np.maximum(0, -CLEAR_FRAMES * velocity), room - np.maximum(0, CLEAR_FRAMES * velocity)
    y, x = rng.uniform(low, high).tolist()
    vy, vx = velocity.tolist()
    return Scene(shape, colour, background, size, (y, x), (vy + 0.0, vx + 0.0))  # + 0.0: no -0.0


def _combinations() -> list[tuple[str, str, str, tuple[int, int]]]:
    return list(itertools.product(SHAPES, COLOURS, BACKGROUNDS, DIRECTIONS))


def sample_scene(seed: int, world: World = WORLD) -> Scene:
    """One scene drawn uniformly (every named parameter, size, start and speed) from ``seed``."""
    rng = np.random.default_rng(seed)
    combos = _combinations()
    return _scene(rng, *combos[int(rng.integers(len(combos)))], world)


def sample_scenes(n: int, seed: int, world: World = WORLD) -> list[Scene]:
    """``n`` distinct scenes from ``seed``: the 960 captions in a shuffled order (every caption once before any
    repeats, so a dataset covers the vocabulary evenly), each with its own size, start and speed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n = {n!r}: expected a positive number of scenes")
    rng = np.random.default_rng(seed)
    combos = _combinations()
    scenes: dict[Scene, None] = {}  # an ordered set
    while len(scenes) < n:
        for i in rng.permutation(len(combos))[:n - len(scenes)]:
            scenes.setdefault(_scene(rng, *combos[i], world))
    return list(scenes)


def caption(scene: Scene) -> str:
    """The scene in words, e.g. ``a red circle moves up and left on a dark blue background``."""
    return (f"{_article(scene.colour)} {scene.colour} {scene.shape} {DIRECTIONS[scene.direction]} on "
            f"{_article(scene.background)} {scene.background} background")


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_GRAMMAR = re.compile(
    rf"an? (?P<colour>{_alternatives(COLOURS)}) (?P<shape>{_alternatives(SHAPES)}) "
    rf"(?P<direction>{_alternatives(DIRECTIONS.values())}) on an? (?P<background>{_alternatives(BACKGROUNDS)}) "
    r"background"
)


def parse_caption(text: str) -> Prompted:
    """What a caption asks for; case, spacing and "a" / "an" are free, the other words are not (one CaptionError
    otherwise)."""
    words = " ".join(str(text).lower().split())
    match = _GRAMMAR.fullmatch(words)
    if match is None:
        raise CaptionError(
            f"the caption {text!r} is outside the nano world's grammar: expected 'a COLOUR SHAPE moves DIRECTION on a "
            f"BACKGROUND background' with COLOUR one of {', '.join(COLOURS)}; SHAPE one of {', '.join(SHAPES)}; "
            f"DIRECTION one of {', '.join(w[len('moves '):] for w in DIRECTIONS.values())}; BACKGROUND one of "
            f"{', '.join(BACKGROUNDS)}")
    direction = next(d for d, w in DIRECTIONS.items() if w == match["direction"])
    return Prompted(match["shape"], match["colour"], match["background"], direction)


def bounce(positions: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Unbounded positions folded into [0, limit] as elastic bounces at 0 and ``limit`` fold them."""
    folded = np.mod(positions, 2 * limit)
    return np.where(folded > limit, 2 * limit - folded, folded)


def trajectory(scene: Scene, frames: int, world: World = WORLD) -> np.ndarray:
    """(frames, 2) float64 top-left (y, x) of every frame: constant velocity, elastic bounces that keep the
    whole box inside the frame."""
    t = np.arange(frames, dtype=np.float64)[:, None]
    limit = np.array([world.height - scene.size, world.width - scene.size], np.float64)
    return bounce(np.asarray(scene.position) + t * np.asarray(scene.velocity), limit)


def _inside(shape: str, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Which points (v, u) in the unit box (rows down, columns right) the shape covers."""
    if shape == "square":
        return (v >= 0) & (v < 1) & (u >= 0) & (u < 1)
    if shape == "circle":
        return (v - 0.5) ** 2 + (u - 0.5) ** 2 < 0.25
    if shape == "triangle":  # isosceles, apex at the box's top middle, base along its bottom
        return (v >= 0) & (v < 1) & (np.abs(u - 0.5) <= v / 2)
    raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")


def render(scene: Scene, frames: int, world: World = WORLD) -> np.ndarray:
    """The clip as uint8 (frames, H, W, 3): each pixel the background blended with the object's colour by the
    share of the pixel the object covers (supersampled, so the edges move smoothly by fractions of a pixel)."""
    s = SUPERSAMPLING
    background = np.asarray(BACKGROUNDS[scene.background], np.float64)
    colour = np.asarray(COLOURS[scene.colour], np.float64)
    video = np.empty((frames, world.height, world.width, 3), np.uint8)
    video[:] = background.astype(np.uint8)
    for i, (y, x) in enumerate(trajectory(scene, frames, world)):
        top, left = int(y), int(x)  # the pixels the box touches: [top, bottom) x [left, right)
        bottom, right = min(world.height, int(np.ceil(y + scene.size))), min(world.width, int(np.ceil(x + scene.size)))
        rows = (np.arange(top * s, bottom * s) + 0.5) / s
        cols = (np.arange(left * s, right * s) + 0.5) / s
        hit = _inside(scene.shape, ((rows - y) / scene.size)[:, None], ((cols - x) / scene.size)[None, :])
        cover = hit.reshape(bottom - top, s, right - left, s).mean(axis=(1, 3))[..., None]
        video[i, top:bottom, left:right] = np.rint(background + cover * (colour - background)).astype(np.uint8)
    return video


def scene_record(scene: Scene) -> dict:
    """A scene as plain JSON values (truth.json's entries)."""
    return {**dataclasses.asdict(scene), "position": list(scene.position), "velocity": list(scene.velocity)}


def scene_from_record(record: dict) -> Scene:
    """The scene of :func:`scene_record`'s dict."""
    return Scene(record["shape"], record["colour"], record["background"], int(record["size"]),
                 tuple(map(float, record["position"])), tuple(map(float, record["velocity"])))


def read_truth(path: str) -> list[Scene]:
    """The scenes of a dataset's truth.json, in clip order."""
    with open(path, encoding="utf-8") as f:
        return [scene_from_record(clip["scene"]) for clip in json.load(f)["clips"]]


def _check_scenes(scenes: Sequence[Scene], frames: int | None = None) -> None:
    if not scenes or not all(isinstance(s, Scene) for s in scenes):
        raise ValueError("scenes: expected a non-empty list of Scene (sample_scenes makes one)")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise ValueError(f"frames = {frames!r}: expected a positive number of frames per clip")


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.write("\n")


def write_dataset(folder: str, scenes: Sequence[Scene], frames: int, world: World = WORLD) -> str:
    """Render ``scenes`` into ``folder``: ``videos/clip{i:04d}.mp4``, ``meta.json`` (the official metadata that
    ``helios-jax offload`` reads) and ``truth.json`` (each clip's scene and caption). Returns meta.json's path.

    The folder must not exist or be empty; everything is written into a staging folder beside it that is renamed
    into place at the end, so an interrupted run leaves nothing under ``folder``."""
    _check_scenes(scenes, frames)
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise FileExistsError(f"{folder} exists and is not an empty folder: write the dataset into a new folder")
    parent = os.path.dirname(folder)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write the dataset {folder}: the folder {parent} does not exist")
    holder = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.staging-", dir=parent)
    staging = os.path.join(holder, "dataset")  # made by makedirs: the usual permissions, not mkdtemp's private ones
    try:
        os.makedirs(os.path.join(staging, "videos"))
        meta, truth = [], []
        for i, scene in enumerate(scenes):
            path = f"videos/clip{i:04d}.mp4"
            write_mp4(os.path.join(staging, path), render(scene, frames, world), fps=world.fps)
            meta.append({"path": path, "cut": [0, frames], "crop": [0, world.width, 0, world.height],
                         "fps": float(world.fps), "cap": [caption(scene)]})
            truth.append({"path": path, "caption": caption(scene), "scene": scene_record(scene)})
        _write_json(os.path.join(staging, "meta.json"), meta)
        _write_json(os.path.join(staging, "truth.json"), {"world": dataclasses.asdict(world), "frames": frames,
                                                          "clips": truth})
        os.replace(staging, folder)  # over an empty folder too
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    return os.path.join(folder, "meta.json")


def write_prompts(path: str, scenes: Sequence[Scene]) -> str:
    """The scenes' captions, one per line (the prompt file of ``helios-jax offload ode-pairs``), written
    atomically to a ``.txt`` file; returns the absolute path."""
    _check_scenes(scenes)
    return write_text(path, "".join(caption(scene) + "\n" for scene in scenes), ".txt")
