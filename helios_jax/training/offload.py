"""``helios-jax offload``: videos + the official metadata JSON -> one latent file per clip.

As the official ``tools/offload_data/get_short-latents.py`` with its mp4 loader
(``dataloader_mp4_dist``): each metadata entry (``path`` relative to the JSON's folder, ``cut`` [start,
end) frames, ``crop`` [x0, x1, y0, y1] pixels, ``cap`` [caption, ...]) gives a clip of the largest
length bucket that fits its cut, starting at a random frame of the cut (deterministic per seed and
entry); its frames go to [-1, 1], are cropped, center-cropped to the target aspect and resized
(antialiased bilinear, torchvision's) to the training resolution; each 33-frame chunk is encoded on its
own by this port's Wan VAE (posterior sample, normalised) and the caption by its UMT5 encoder (512
tokens, bf16 as the official). Files go to ``{uttid}_{frames}_{height}_{width}.safetensors``
(:mod:`helios_jax.training.data`), each written atomically; existing files are kept (a rerun resumes).

Every entry is checked before any model is loaded: a missing video, a clip shorter than the minimum
or whose aspect bucket is not the target's (the official loader drops both silently), or a malformed
entry is one :class:`DataError` naming all of them, and nothing is written. ``skip_unfit`` skips the
short and off-aspect clips with a warning instead, as the official does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import warnings
from typing import Iterator, Sequence

import numpy as np

from helios_jax.diskspace import check_free
from helios_jax.history import video_frames_per_chunk
from helios_jax.training import DataError
from helios_jax.training.data import MIN_FRAMES, offload_name, write_offload
from helios_jax.training.samples import LATENT_WINDOW

logger = logging.getLogger(__name__)

# The official length buckets (stride 1; 193 sits where 201 would, as in the original) and the
# resolution buckets of its 640 family, used to decide which clips fit the target aspect.
LENGTH_BUCKETS = (501, 481, 461, 441, 421, 401, 381, 361, 341, 321, 301, 281, 261, 241, 221, 193, 181, 161, 141,
                  121, 101, 81, 61, 41, 21)
RESOLUTION_BUCKETS = ((768, 320), (768, 384), (640, 384), (768, 512), (576, 448), (512, 512), (448, 576),
                      (512, 768), (384, 640), (384, 768), (320, 768))
KNOWN_KEYS = {"path", "cut", "crop", "cap", "fps", "num_frames", "resolution"}
ENCODERS = ("vae", "text_encoder", "tokenizer")  # the checkpoint folders offloading reads


@dataclasses.dataclass(frozen=True)
class Clip:
    """One metadata entry, checked: the video file, its cut and crop, the caption and the frames to read."""

    video: str
    uttid: str
    cut: tuple[int, int]
    crop: tuple[int, int, int, int]
    caption: str
    frames: int  # the length bucket


def length_bucket(length: int) -> int:
    """The largest official length bucket <= length (the length itself below the smallest bucket)."""
    fitting = [b for b in LENGTH_BUCKETS if b <= length]
    return max(fitting) if fitting else length


def aspect_bucket(height: int, width: int) -> tuple[int, int]:
    """The official resolution bucket nearest in aspect, by |h * bw - w * bh| (ties: the last)."""
    best, metric = RESOLUTION_BUCKETS[0], float("inf")
    for bh, bw in RESOLUTION_BUCKETS:
        m = abs(height * bw - width * bh)
        if m <= metric:
            best, metric = (bh, bw), m
    return best


def _video_length(path: str) -> int:
    import av

    with _unreadable_as_error(path):
        with av.open(path) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for _ in container.decode(video=0))


@contextlib.contextmanager
def _unreadable_as_error(path: str) -> Iterator[None]:
    """A video that PyAV cannot open or decode (corrupt, truncated, no video stream) as one DataError."""
    import av

    try:
        yield
    except (av.error.FFmpegError, OSError, IndexError) as err:
        raise DataError(f"{path}: not a readable video ({err})") from err


def read_metadata(json_path: str, *, height: int, width: int, min_frames: int = MIN_FRAMES,
                  skip_unfit: bool = False) -> list[Clip]:
    """The clips of a metadata JSON, every entry checked (see the module doc); one DataError for all problems."""
    if not os.path.isfile(json_path):
        raise DataError(f"metadata file {json_path!r} does not exist")
    try:
        with open(json_path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{json_path}: not a JSON file ({err})") from err
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{json_path}: expected a non-empty JSON list of clips (toy_filter.json's format)")
    root = os.path.dirname(os.path.abspath(json_path))
    problems, unfit, clips, unknown = [], [], [], set()
    for i, entry in enumerate(entries):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: not an object")
            continue
        unknown |= set(entry) - KNOWN_KEYS
        missing = [k for k in ("path", "cut", "crop", "cap") if k not in entry]
        if missing:
            problems.append(f"{where}: missing {missing}")
            continue
        cut, crop, cap = entry["cut"], entry["crop"], entry["cap"]
        if not (isinstance(cut, list) and len(cut) == 2 and all(isinstance(v, int) for v in cut) and 0 <= cut[0] < cut[1]):
            problems.append(f"{where}: cut = {cut!r} must be [start, end) frame integers with start < end")
            continue
        if not (isinstance(crop, list) and len(crop) == 4 and all(isinstance(v, int) for v in crop)
                and 0 <= crop[0] < crop[1] and 0 <= crop[2] < crop[3]):
            problems.append(f"{where}: crop = {crop!r} must be [x0, x1, y0, y1] pixel integers with x0 < x1, y0 < y1")
            continue
        caption = cap[0] if isinstance(cap, list) and cap else cap
        if not isinstance(caption, str):
            problems.append(f"{where}: cap = {cap!r} must be a caption or a list of captions (the first is used)")
            continue
        video = os.path.join(root, entry["path"])
        where = f"{where} ({entry['path']})"
        if not os.path.isfile(video):
            problems.append(f"{where}: no video at {video} (paths are relative to the JSON's folder)")
            continue
        length = cut[1] - cut[0]
        if length < min_frames:
            unfit.append(f"{where}: cut {cut} has {length} frames, fewer than the minimum {min_frames}")
            continue
        try:
            available = _video_length(video)
        except DataError as err:
            problems.append(f"{where}: {err}")
            continue
        if available < cut[1]:
            problems.append(f"{where}: cut ends at frame {cut[1]} but the video has {available} frames")
            continue
        bucket = aspect_bucket(crop[3] - crop[2], crop[1] - crop[0])
        if bucket[0] * width != bucket[1] * height:
            unfit.append(f"{where}: crop {crop} falls in the {bucket[0]}x{bucket[1]} aspect bucket, not "
                         f"{height}x{width}'s")
            continue
        uttid = f"{os.path.splitext(os.path.basename(video))[0]}_{cut[0]}-{cut[1]}"
        clips.append(Clip(video, uttid, (cut[0], cut[1]), tuple(crop), caption, length_bucket(length)))
    if unknown:
        warnings.warn(f"{json_path}: unknown metadata key(s) {sorted(unknown)} ignored", stacklevel=2)
    if unfit and not skip_unfit:
        problems += [f"{u} (the official loader drops it; pass --skip_unfit to skip such clips)" for u in unfit]
    if problems:
        raise DataError(f"{json_path}: {len(problems)} problem(s), nothing written:\n  " + "\n  ".join(problems))
    if unfit:
        warnings.warn(f"{json_path}: skipping {len(unfit)} clip(s): " + "; ".join(unfit), stacklevel=2)
    if not clips:
        raise DataError(f"{json_path}: no clip fits (minimum {min_frames} frames, aspect {height}x{width})")
    return clips


def _read_frames(path: str, start: int, count: int) -> np.ndarray:
    """Frames [start, start + count) as (count, H, W, 3) uint8."""
    import av

    frames = []
    with _unreadable_as_error(path), av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= start + count:
                break
            if i >= start:
                frames.append(frame.to_ndarray(format="rgb24"))
    if len(frames) != count:
        raise DataError(f"{path}: read {len(frames)} frames from {start}, expected {count}")
    return np.stack(frames)


def fit_frames(frames: np.ndarray, crop: Sequence[int], height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> float32 (T, 3, height, width) in [-1, 1], as ``read_cut_crop_and_resize``: crop,
    center-crop to the target aspect, antialiased bilinear resize."""
    import jax.numpy as jnp

    from helios_jax.training.resize import resize_antialias

    x0, x1, y0, y1 = crop
    video = frames[:, y0:y1, x0:x1].astype(np.float32) / 127.5 - 1
    h, w = video.shape[1:3]
    target = height / width
    if h / w >= target:
        new_h = int(w * target)
        top = (h - new_h) // 2
        video = video[:, top:top + new_h]
    else:
        new_w = int(h / target)
        left = (w - new_w) // 2
        video = video[:, :, left:left + new_w]
    video = np.moveaxis(video, -1, 1)
    return np.asarray(resize_antialias(jnp.asarray(video), height, width))


def _clip_bytes(clip: Clip, latent_channels: int, text_shape: tuple[int, int], height: int, width: int,
                window: int) -> int:
    """The size of one clip's file: float32 latents of every 33-frame chunk and its bf16 prompt embedding
    (``text_shape``: its tokens and width)."""
    latent = latent_channels * LATENT_WINDOW * (height // 8) * (width // 8) * 4
    return clip.frames // window * latent + text_shape[0] * text_shape[1] * 2


def offload(json_path: str, checkpoint: str, output: str, *, height: int = 384, width: int = 640, seed: int = 42,
            min_frames: int = MIN_FRAMES, skip_unfit: bool = False, progress: bool | None = None,
            revision: str | None = None) -> list[str]:
    """Encode every clip of ``json_path`` with the checkpoint's VAE and text encoder (a folder, or a hub id at
    ``revision``: only those folders are fetched) into ``output``; returns the files' paths (existing ones kept)."""
    import jax.numpy as jnp

    from helios_jax import hub
    from helios_jax.loading import load_vae
    from helios_jax.prompts import PromptEncoder

    if height % 16 or width % 16 or height < 16 or width < 16:
        raise DataError(f"--height {height} --width {width}: both must be positive multiples of 16 (the VAE's 8 "
                        "times the transformer's patch of 2)")
    checkpoint = hub.resolve(checkpoint, revision=revision, folders=ENCODERS)
    for folder in ENCODERS:
        if not os.path.isdir(os.path.join(checkpoint, folder)):
            raise DataError(f"checkpoint {checkpoint!r} has no {folder}/ folder: pass a diffusers Helios checkpoint")
    clips = read_metadata(json_path, height=height, width=width, min_frames=min_frames, skip_unfit=skip_unfit)
    if os.path.exists(output) and not os.path.isdir(output):
        raise DataError(f"--output {output!r} exists and is not a folder")
    vae_cfg, vae_params = load_vae(os.path.join(checkpoint, "vae"), jnp.float32)
    prompts = PromptEncoder.from_pretrained(checkpoint)
    window = video_frames_per_chunk(LATENT_WINDOW)
    text_shape = (prompts.max_sequence_length, prompts.config.d_model)
    check_free(output, sum(_clip_bytes(clip, vae_cfg.z_dim, text_shape, height, width, window)
                           for clip in clips
                           if not os.path.exists(os.path.join(output, offload_name(clip.uttid, clip.frames, height,
                                                                                    width)))))
    created = not os.path.isdir(output)
    os.makedirs(output, exist_ok=True)
    try:
        return _offload_clips(clips, output, vae_cfg, vae_params, prompts, height=height, width=width, seed=seed,
                              progress=progress)
    except BaseException:
        if created and not os.listdir(output):  # a run that wrote no clip leaves no folder either
            os.rmdir(output)
        raise


def _offload_clips(clips: list[Clip], output: str, vae_cfg, vae_params, prompts, *, height: int, width: int,
                   seed: int, progress: bool | None) -> list[str]:
    """Each clip's file, encoded and written (existing ones kept); returns their paths."""
    import jax
    import jax.numpy as jnp

    from helios_jax.models import vae as vae_lib

    window = video_frames_per_chunk(LATENT_WINDOW)
    written = []
    for n, clip in enumerate(clips):
        path = os.path.join(output, offload_name(clip.uttid, clip.frames, height, width))
        written.append(path)
        if os.path.exists(path):
            continue
        rng = np.random.default_rng([seed, n])
        start = int(rng.integers(clip.cut[0], clip.cut[1] - clip.frames + 1))
        chunks = clip.frames // window
        video = fit_frames(_read_frames(clip.video, start, chunks * window), clip.crop, height, width)
        key = jax.random.fold_in(jax.random.key(seed), n)
        latents = []
        for c in range(chunks):
            frames = np.moveaxis(video[c * window:(c + 1) * window], 0, 1)[None]  # (1, 3, 33, H, W)
            latents.append(np.asarray(vae_lib.encode_sample(vae_cfg, vae_params, jnp.asarray(frames),
                                                              jax.random.fold_in(key, c)))[0])
        embed = prompts.encode(clip.caption, dtype=jnp.bfloat16)
        write_offload(path, np.stack(latents), np.asarray(embed[0]), clip.caption)
        if progress is not False:
            logger.info("offload %d/%d: %s", n + 1, len(clips), os.path.basename(path))
    return written
