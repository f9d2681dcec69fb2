"""Offloaded training data: the per-clip latent files, their index, and the grain pipeline over them.

One file per clip, named as the official ``get_short-latents`` names it,
``{uttid}_{frames}_{height}_{width}.safetensors`` (frames = the clip's length bucket, height and width
the pixel resolution), holding ``vae_latent`` (N, 16, 9, h, w) float32, the normalised posterior
sample of N independently encoded 33-frame chunks, and ``prompt_embed`` (512, d), the UMT5 embedding
of the caption (in its metadata, ``prompt_raw``). The official ``.pt`` files read too (torch extra).

:class:`OffloadedDataset` yields batches assembled as the official stage-1/2 loader
(``dataloader_history_latents_dist``): the chunks concatenated along time behind 19 zero frames,
one section ``choice`` drawn per (seed, epoch, index), history = the 19 frames before it, target =
the section, x0 = the video's first latent, zeroed when ``choice == 0``. Batches come from one
(frames, height, width) bucket, picked as the official ``BucketedSampler`` picks them.

Why grain: its ``MapDataset`` is random access over a deterministic plan, so the iterator's state is
one position that ``get_state``/``set_state`` (and ``grain.checkpoint`` for orbax) save and restore
exactly; ``.map``/``.batch``/``.to_iter_dataset`` give threaded, prefetched reading with no loader
code here. What grain does not have, bucketing, lives in the plan: each epoch's order of
(bucket, samples) is computed from ``seed + epoch`` alone, identically in every process, so all
processes take a batch of the same bucket at each step (one compiled shape per step across hosts),
each from its own shard ``indices[process_index::process_count]``.

RNG note: the official draws with torch's generators; this uses numpy's ``default_rng`` with the
same seeds, so the plan is equally deterministic but not the same permutation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Iterable, Sequence

import grain
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from safetensors import safe_open

from helios_jax.convert.export import save_safetensors
from helios_jax.convert.sources import CheckpointError, read_torch_pickle
from helios_jax.training import DataError
from helios_jax.training.samples import HISTORY_SIZES, LATENT_WINDOW

MIN_FRAMES = 121  # the official loaders drop clips shorter than this
EXTENSIONS = (".safetensors", ".pt")
_NAME = re.compile(r"^(?P<uttid>.+)_(?P<frames>\d+)_(?P<height>\d+)_(?P<width>\d+)\.(?:safetensors|pt)$")
_EPOCH_STRIDE = 1_000_000  # sample seed = seed + epoch * 10^6 + index, as the official
SECONDARY_OFFSET = 999_999  # the stage-3 loader's second section of the same clip: seed + index + 999999


@dataclasses.dataclass(frozen=True)
class OffloadFile:
    """One clip's latent file and what its name says."""

    path: str
    uttid: str
    frames: int
    height: int
    width: int

    @property
    def bucket(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)


def offload_name(uttid: str, frames: int, height: int, width: int, ext: str = ".safetensors") -> str:
    """The official file name of a clip: ``{uttid}_{frames}_{height}_{width}`` plus the extension."""
    return f"{uttid}_{frames}_{height}_{width}{ext}"


def parse_name(path: str) -> OffloadFile | None:
    """The clip a file name describes, or None when it is not an offload file name."""
    match = _NAME.match(os.path.basename(path))
    if match is None:
        return None
    return OffloadFile(path, match["uttid"], int(match["frames"]), int(match["height"]), int(match["width"]))


def write_offload(path: str, vae_latent: np.ndarray, prompt_embed: np.ndarray, prompt_raw: str) -> str:
    """Write one clip's file atomically (a temporary name in the same folder, then a rename)."""
    return save_safetensors({"vae_latent": np.ascontiguousarray(vae_latent, np.float32),
                             "prompt_embed": np.ascontiguousarray(prompt_embed)}, path,
                            {"prompt_raw": prompt_raw, "format": "helios-jax offload 1"})


def read_offload(path: str) -> dict[str, Any]:
    """One clip: ``vae_latent`` (N, 16, 9, h, w) float32, ``prompt_embed`` (512, d) in its stored dtype
    and ``prompt_raw`` (str). ``.pt`` files are read with torch, ``weights_only=True`` (PIL first-frame
    images allowed)."""
    if path.endswith(".pt"):
        return _read_pt(path)
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            out = {"vae_latent": f.get_tensor("vae_latent").astype(np.float32), "prompt_embed": f.get_tensor("prompt_embed")}
    except Exception as err:  # safetensors raises several types for a bad or truncated file
        raise DataError(f"{path}: not a readable offload file ({err}); re-run `helios-jax offload`") from err
    out["prompt_raw"] = meta.get("prompt_raw", "")
    return _checked(path, out)


def _read_pt(path: str) -> dict[str, Any]:
    from PIL import Image

    try:
        raw = read_torch_pickle(path, allowed_globals=[Image.Image])
    except CheckpointError as err:
        raise DataError(f"{err}; an official offload .pt file was expected") from err
    return _checked(path, {"vae_latent": np.asarray(raw["vae_latent"]).astype(np.float32),
                           "prompt_embed": np.asarray(raw["prompt_embed"]), "prompt_raw": raw.get("prompt_raw", "")})


def _checked(path: str, data: dict[str, Any]) -> dict[str, Any]:
    _check_shapes(path, data["vae_latent"].shape, data["prompt_embed"].shape)
    if data["prompt_embed"].ndim == 3:
        data["prompt_embed"] = data["prompt_embed"][0]
    return data


def _check_shapes(path: str, latent: tuple[int, ...], embed: tuple[int, ...]) -> tuple[int, ...]:
    """The layout rules of a clip's two tensors; the prompt embedding's (length, d) shape."""
    if len(latent) != 5 or latent[2] != LATENT_WINDOW or latent[0] < 1:
        raise DataError(f"{path}: vae_latent has shape {latent}; expected (N, C, {LATENT_WINDOW}, h, w), N >= 1")
    if len(embed) == 3 and embed[0] == 1:
        embed = embed[1:]
    if len(embed) != 2:
        raise DataError(f"{path}: prompt_embed has shape {embed}; expected (length, d)")
    return embed


def offload_shapes(path: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A clip's ``vae_latent`` and (length, d) ``prompt_embed`` shapes, from the safetensors header alone: it
    is cheap for every file before a run starts, and safetensors refuses a header that does not cover the
    whole file, so a truncated file fails here too (a ``.pt`` file is read whole)."""
    if path.endswith(".pt"):
        data = _read_pt(path)
        return data["vae_latent"].shape, data["prompt_embed"].shape
    try:
        with safe_open(path, framework="numpy") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as err:  # safetensors raises several types for a bad or truncated file
        raise DataError(f"{path}: not a readable offload file ({err}); re-run `helios-jax offload`") from err
    missing = [name for name in ("vae_latent", "prompt_embed") if name not in shapes]
    if missing:
        raise DataError(f"{path}: no {' or '.join(missing)} tensor (it holds {sorted(shapes)}); "
                        f"re-run `helios-jax offload`")
    return shapes["vae_latent"], _check_shapes(path, shapes["vae_latent"], shapes["prompt_embed"])


def index_folders(roots: Sequence[str], *, min_frames: int = MIN_FRAMES,
                  resolutions: Iterable[tuple[int, int]] | None = None) -> list[OffloadFile]:
    """The usable files of the data folders, sorted by path: offload names with at least ``min_frames``
    frames and, when given, a (height, width) in ``resolutions`` (the official ``single_res``)."""
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    missing = [r for r in roots if not os.path.isdir(r)]
    if missing:
        raise DataError(f"data folder(s) {missing} do not exist: pass folders written by `helios-jax offload`")
    allowed = None if resolutions is None else {tuple(r) for r in resolutions}
    files = []
    for root in roots:
        for name in sorted(os.listdir(root)):
            item = parse_name(os.path.join(root, name)) if name.endswith(EXTENSIONS) else None
            if item is None or item.frames < min_frames:
                continue
            if allowed is not None and (item.height, item.width) not in allowed:
                continue
            files.append(item)
    if not files:
        raise DataError(f"no usable offload files in {list(roots)} (names {{uttid}}_{{frames}}_{{height}}_{{width}}"
                        f".safetensors with frames >= {min_frames}); run `helios-jax offload` first")
    return files


def assemble(vae_latent: np.ndarray, choice: int, history_frames: int = sum(HISTORY_SIZES)) -> dict[str, np.ndarray]:
    """One training sample from a clip's (N, C, 9, h, w) latents and section ``choice``: x0 (C, 1, h, w),
    history (C, 19, h, w) and target (C, 9, h, w), as ``prepare_stage1_latent``."""
    sections, channels, window, height, width = vae_latent.shape
    if not 0 <= choice < sections:
        raise ValueError(f"choice = {choice}: the clip has {sections} sections")
    frames = np.moveaxis(vae_latent, 0, 1).reshape(channels, sections * window, height, width)
    padded = np.concatenate([np.zeros((channels, history_frames, height, width), frames.dtype), frames], axis=1)
    start = choice * window
    x0 = frames[:, :1] if choice else np.zeros_like(frames[:, :1])
    return {"x0": x0, "history": padded[:, start:start + history_frames],
            "target": padded[:, start + history_frames:start + history_frames + window]}


def sample_choice(seed: int, epoch: int, index: int, sections: int) -> int:
    """The section drawn for dataset item ``index`` in ``epoch`` (deterministic per (seed, epoch, index))."""
    return int(np.random.default_rng(seed + epoch * _EPOCH_STRIDE + index).integers(0, sections))


def shard(order: Sequence[int], process_index: int, process_count: int) -> list[int]:
    """This process's part of a global ``order``: the whole multiples of ``process_count`` first, then every
    ``process_count``-th item from ``process_index`` (every process gets as many)."""
    usable = len(order) // process_count * process_count
    return [int(i) for i in order[:usable][process_index::process_count]]


class EpochDataset:
    """The epoch, shard and grain plumbing every training dataset shares. A subclass sets ``batch_size``,
    ``batches_per_epoch`` and ``num_epochs`` and gives :meth:`epoch_items` (this process's dataset indices of
    an epoch, whole batches, in order) and :meth:`load` of one ``(epoch, index)`` item. Position ``p`` of
    this process's stream is item ``p`` of the epochs laid end to end, so grain's iterator state (one
    position) checkpoints and resumes it exactly."""

    batch_size: int
    batches_per_epoch: int
    num_epochs: int | None

    def epoch_items(self, epoch: int) -> Sequence[int]:
        raise NotImplementedError

    def load(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @functools.lru_cache(maxsize=4)
    def _items(self, epoch: int) -> tuple[int, ...]:
        return tuple(self.epoch_items(epoch))

    def __len__(self) -> int:
        """Samples this process reads (all epochs; a very large number when ``num_epochs`` is None)."""
        epochs = self.num_epochs if self.num_epochs is not None else max(1, (1 << 40) // self.batches_per_epoch)
        return epochs * self.batches_per_epoch * self.batch_size

    def __getitem__(self, position: int) -> tuple[int, int]:
        """(epoch, dataset index) of the sample at ``position`` of this process's stream."""
        epoch, offset = divmod(int(position), self.batches_per_epoch * self.batch_size)
        return epoch, self._items(epoch)[offset]

    def map_dataset(self) -> grain.MapDataset:
        """The whole stream as a grain ``MapDataset`` of batches (random access)."""
        return grain.MapDataset.source(self).map(self.load).batch(self.batch_size, drop_remainder=True)

    def iterator(self, num_threads: int = 2, prefetch: int = 2) -> grain.DatasetIterator:
        """A checkpointable iterator over :meth:`map_dataset`, reading ahead with ``num_threads`` threads."""
        read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        return iter(self.map_dataset().to_iter_dataset(read))


class OffloadedDataset(EpochDataset):
    """Batches of stage-1/2 samples from offload folders, bucketed, sharded by process, resumable.

    ``iterator()`` gives a grain ``DatasetIterator`` of dicts: ``x0`` (B, C, 1, h, w), ``history``
    (B, C, 19, h, w), ``target`` (B, C, 9, h, w) float32, ``prompt_embeds`` (B, 512, d), ``index``
    (B,) int64 (the items) and ``epoch`` (B,); with ``secondary`` (stage 3b's critic) also ``x0_2``,
    ``history_2``, ``target_2`` of another randomly drawn section of the same clip (``dataloader_dmd``). ``get_state()`` / ``set_state()`` on it save and restore
    the position (``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` with orbax).
    """

    def __init__(self, roots: Sequence[str], *, batch_size: int, seed: int = 42, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True, min_frames: int = MIN_FRAMES,
                 resolutions: Iterable[tuple[int, int]] | None = None, num_epochs: int | None = None,
                 secondary: bool = False):
        if batch_size < 1:
            raise DataError(f"batch_size = {batch_size} must be at least 1")
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index = {process_index} must lie in [0, process_count = {process_count})")
        self.files = index_folders(roots, min_frames=min_frames, resolutions=resolutions)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        buckets: dict[tuple[int, int, int], list[int]] = {}
        for i, item in enumerate(self.files):
            buckets.setdefault(item.bucket, []).append(i)
        self.buckets = dict(sorted(buckets.items()))
        per_bucket = {k: len(v) // process_count // batch_size for k, v in self.buckets.items()}
        self.batches_per_epoch = sum(per_bucket.values())
        if self.batches_per_epoch == 0:
            sizes = {k: len(v) for k, v in self.buckets.items()}
            raise DataError(f"no full batch: buckets {sizes} hold fewer than batch_size x process_count = "
                            f"{batch_size} x {process_count} clips; lower the batch size or add data")
        self.num_epochs = num_epochs
        self.secondary = secondary

    def check_files(self, channels: int, text_dim: int) -> None:
        """Every file readable, with ``channels`` latent channels and prompt embeddings ``text_dim`` wide: one
        error for the first that is not, before a run writes anything (not at the step that reads it)."""
        for item in self.files:
            latent, embed = offload_shapes(item.path)
            if latent[1] != channels:
                raise DataError(f"{item.path}: latents of {latent[1]} channels; the transformer takes {channels} "
                                f"(offload with this model's VAE)")
            if embed[-1] != text_dim:
                raise DataError(f"{item.path}: prompt embeddings of width {embed[-1]}; the transformer's text_dim "
                                f"is {text_dim} (offload with this model's text encoder)")

    def epoch_plan(self, epoch: int) -> list[tuple[tuple[int, int, int], list[int]]]:
        """This process's batches of ``epoch`` in order: (bucket, dataset indices), as ``BucketedSampler``
        (global shuffle per bucket, shard, batch with drop_last, then a random non-exhausted bucket per batch)."""
        rng = np.random.default_rng(self.seed + epoch)
        queues = {}
        for key, indices in self.buckets.items():
            order = [indices[i] for i in rng.permutation(len(indices))] if self.shuffle else list(indices)
            mine = shard(order, self.process_index, self.process_count)
            batches = [mine[i:i + self.batch_size] for i in range(0, len(mine) - self.batch_size + 1, self.batch_size)]
            if batches:
                queues[key] = batches
        plan, remaining = [], list(queues)
        cursors = dict.fromkeys(queues, 0)
        while remaining:
            key = remaining[int(rng.integers(len(remaining)))]
            if cursors[key] == len(queues[key]):
                remaining.remove(key)
                continue
            plan.append((key, queues[key][cursors[key]]))
            cursors[key] += 1
        return plan

    def epoch_items(self, epoch: int) -> list[int]:
        return [i for _, batch in self.epoch_plan(epoch) for i in batch]

    def load(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
        """The sample of dataset item ``index`` in ``epoch``."""
        epoch, index = item
        data = read_offload(self.files[index].path)
        choice = sample_choice(self.seed, epoch, index, data["vae_latent"].shape[0])
        sample = {**assemble(data["vae_latent"], choice), "prompt_embeds": data["prompt_embed"],
                  "index": np.int64(index), "epoch": np.int64(epoch)}
        if self.secondary:
            other = sample_choice(self.seed + SECONDARY_OFFSET, epoch, index, data["vae_latent"].shape[0])
            sample.update({f"{k}_2": v for k, v in assemble(data["vae_latent"], other).items()})
        return sample

def save_iterator_state(iterator: grain.DatasetIterator, path: str) -> None:
    """The iterator's position as JSON, written atomically (for a trainer that does not use orbax's handler)."""
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(iterator.get_state(), f)
    os.replace(tmp, path)


def load_iterator_state(iterator: grain.DatasetIterator, path: str) -> None:
    with open(path, encoding="utf-8") as f:
        iterator.set_state(json.load(f))
