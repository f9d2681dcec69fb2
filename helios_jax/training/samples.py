"""Training-sample assembly and Helios' anti-drifting augmentations, as pure functions of arrays and a key.

A training example conditions one 9-latent chunk (``target``) on the 19 latents before it
(``history``, oldest first) and on the video's first latent (``x0``, the anchor). The layout and
its 29 fixed RoPE slots are the inference ones (:class:`helios_jax.history.HistoryLayout`):
x0 -> 0, long -> 1..16, mid -> 17..18, newest -> 19, chunk -> 20..28, short = [anchor, newest].

What the official trainer does to that context (docs/training.md §2.5 and §8), reproduced here:

* ``random_drop``: one batch-global decision per step to train the t2v / i2v / v2v formats;
* ``corrupt_history``: frame-aware corruption (noise or blur) in parts aligned with the
  generation chunks (tail / windows of 9 / x0), each all-zero part left alone;
* ``saturate_history``: the per-part saturation jitter of the distillation rollouts;
* error recycling (``RecycleBuffers``, ``push_errors``, ``inject_errors``): the paper's drift
  simulation, disabled in every released config but implemented and tested.

Arrays are (B, C, T, H, W). Everything jit-compiles; decisions that are Python ``random`` calls in
the original are ``jax.random`` draws here, applied with ``jnp.where`` so that shapes stay static.

Deviation from the original, on purpose: the "skip all-zero parts" test is per sample (the original
sums over the whole batch, so a first-chunk sample's zero anchor gets noised whenever another
sample in the batch has an anchor). ``per_sample_skip=False`` gives the original behaviour.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from helios_jax.history import HistoryLayout
from helios_jax.training.resize import apply_hw, resize_matrix

HISTORY_SIZES = (16, 2, 1)
LATENT_WINDOW = 9
LAYOUT = HistoryLayout.create(HISTORY_SIZES, LATENT_WINDOW, keep_first_frame=True)

# random_drop's format codes (returned for logging and tests)
FULL, T2V, I2V, V2V = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------------
# layout


def model_indices(batch_size: int, layout: HistoryLayout = LAYOUT) -> dict[str, jax.Array]:
    """The four index arrays the transformer takes, each (batch_size, n) int32 (29 slots in all)."""
    return {k: jnp.broadcast_to(jnp.asarray(v), (batch_size, v.shape[1])) for k, v in layout.indices().items()}


def history_inputs(x0: jax.Array, history: jax.Array, layout: HistoryLayout = LAYOUT) -> dict[str, jax.Array]:
    """The transformer's history arguments from x0 (B, C, 1, H, W) and the window (B, C, 19, H, W):
    ``latents_history_{long,mid,short}`` of 16, 2 and 2 (= [x0, newest]) frames, plus the indices."""
    if history.shape[2] != layout.window or x0.shape[2] != 1:
        raise ValueError(f"history has {history.shape[2]} frames and x0 {x0.shape[2]}: expected {layout.window} and 1")
    return {**layout.terms(history, x0), **model_indices(history.shape[0], layout)}


# ---------------------------------------------------------------------------------------------------
# random drop (section 2.5)


def random_drop(
    key: jax.Array, x0: jax.Array, history: jax.Array, *, t2v_ratio: float, v2v_ratio: float,
    i2v_ratio: float = 0.0, window: int = LATENT_WINDOW,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One batch-global drop of the context, as ``prepare_stage1_clean_input_from_latents``.

    With probability ``t2v_ratio`` everything (x0 and history) is zeroed; otherwise, with
    ``i2v_ratio`` all but the newest history frame is zeroed (x0 kept); otherwise with ``v2v_ratio``
    the ``tail + 9k`` oldest frames (k uniform in 0..windows, i.e. 1, 10 or 19 of 19) are zeroed.
    Each test is a fresh uniform draw compared with ``<=``; a ratio of 0 is never taken.
    Returns ``(x0, history, format)`` with ``format`` one of FULL, T2V, I2V, V2V (int32 scalar).
    """
    k_t2v, k_i2v, k_v2v, k_windows = jax.random.split(key, 4)
    length = history.shape[2]
    windows, tail = divmod(length, window)
    t2v = (t2v_ratio != 0) & (jax.random.uniform(k_t2v) <= t2v_ratio)
    i2v = ~t2v & (i2v_ratio != 0) & (jax.random.uniform(k_i2v) <= i2v_ratio)
    v2v = ~t2v & ~i2v & (v2v_ratio != 0) & (jax.random.uniform(k_v2v) <= v2v_ratio)
    v2v_drop = tail + window * jax.random.randint(k_windows, (), 0, windows + 1)
    drop = jnp.where(t2v, length, jnp.where(i2v, max(length - 1, 0), jnp.where(v2v, v2v_drop, 0)))
    keep = (jnp.arange(length) >= drop)[None, None, :, None, None]
    history = jnp.where(keep, history, jnp.zeros((), history.dtype))
    x0 = jnp.where(t2v, jnp.zeros((), x0.dtype), x0)
    fmt = jnp.where(t2v, T2V, jnp.where(i2v, I2V, jnp.where(v2v, V2V, FULL))).astype(jnp.int32)
    return x0, history, fmt


# ---------------------------------------------------------------------------------------------------
# the chunk-aligned parts of the window (section 8.3)


@dataclasses.dataclass(frozen=True)
class Part:
    """Frames [start, stop) of the 19-frame window, and which corruption ratio the original uses."""

    start: int
    stop: int
    ratio: str  # "long" | "mid"


def window_parts(layout: HistoryLayout = LAYOUT, *, split_last: bool = True) -> tuple[Part, ...]:
    """The window cut as the original cuts it: the oldest ``window % 9`` frames (the tail), then whole
    chunks of 9 aligned to the newest frame. With ``split_last`` the newest chunk is cut after its
    first ``mid`` frames (2), the first piece taking the long ratio and the rest the mid ratio (the
    original's naming quirk, immaterial while all ratios are equal). x0 is a separate part."""
    length, chunk = layout.window, layout.latent_frames_per_chunk
    windows, tail = divmod(length, chunk)
    parts = [Part(0, tail, "long")] if tail else []
    for i in range(windows):
        start = tail + i * chunk
        if split_last and i == windows - 1:
            cut = start + layout.sizes[1]
            parts += [Part(start, cut, "long"), Part(cut, start + chunk, "mid")]
        else:
            parts.append(Part(start, start + chunk, "long"))
    return tuple(parts)


def _nonzero(x: jax.Array, per_sample: bool) -> jax.Array:
    """(B,) bool: which samples of a part hold anything (the original's ``part.sum() != 0``)."""
    sums = jnp.sum(x, axis=tuple(range(1, x.ndim)))
    return sums != 0 if per_sample else jnp.broadcast_to(jnp.sum(sums) != 0, sums.shape)


def _select(mask: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    return jnp.where(mask.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)


# ---------------------------------------------------------------------------------------------------
# frame-aware corruption (section 8.3)


@dataclasses.dataclass(frozen=True)
class CorruptionConfig:
    """``corrupt_history_latents``' settings, named as the training YAMLs name them (``*_history``)."""

    mode: str = "noise"  # corrupt_mode_history: "noise" | "downsample" | "random"
    noise_mode_prob: float = 0.9  # corrupt_mode_prob_history: P(noise) when mode is "random"
    frame_independent: bool = True  # is_frame_independent_corrupt_history
    ratio_short: float = 1 / 3  # noise_corrupt_ratio_history_short (x0)
    ratio_mid: float = 1 / 3
    ratio_long: float = 1 / 3
    clean_prob: float = 0.1  # noise_corrupt_clean_prob_history: P(no corruption at all)
    downsample_min: float = 0.9
    downsample_max: float = 1.0
    per_sample_skip: bool = True  # False: the original's batch-wide "part is all zero" test

    def __post_init__(self) -> None:
        if self.mode not in ("noise", "downsample", "random"):
            raise ValueError(f"corrupt mode {self.mode!r}: expected 'noise', 'downsample' or 'random'")
        if not 0 < self.downsample_min <= self.downsample_max <= 1:
            raise ValueError(f"downsample ratios [{self.downsample_min}, {self.downsample_max}] must lie in (0, 1]")


def blur(x: jax.Array, factor: jax.Array) -> jax.Array:
    """The "downsample" corruption: antialiased bilinear resize of every frame to round(factor * size)
    and back (``downsample_corrupt``). ``factor`` may be traced; shapes stay static."""
    ops = []
    for size in x.shape[-2:]:
        reduced = jnp.maximum(1, jnp.round(size * factor)).astype(jnp.int32)
        ops.append(resize_matrix(size, size, size, reduced) @ resize_matrix(size, size, reduced, size))
    return apply_hw(x, *ops).astype(x.dtype)


def normal(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Standard normals drawn flat and reshaped: threefry over a 5-D shape compiles very slowly on the CPU
    (35 s against 2 s for one (1, 16, 9, 16, 16) draw); the values are the same as a shaped draw's."""
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32, minval: Any = 0.0,
            maxval: Any = 1.0) -> jax.Array:
    """``jax.random.uniform`` drawn flat and reshaped, as :func:`normal` (same values, cheaper compile)."""
    return jax.random.uniform(key, (math.prod(shape),), dtype, minval, maxval).reshape(shape)


def _noise_part(key: jax.Array, x: jax.Array, ratio: float, frame_independent: bool) -> jax.Array:
    k_sigma, k_eps = jax.random.split(key)
    shape = (x.shape[0], 1, x.shape[2], 1, 1) if frame_independent else (x.shape[0], 1, 1, 1, 1)
    sigma = (uniform(k_sigma, shape) * ratio).astype(x.dtype)
    return sigma * normal(k_eps, x.shape, x.dtype) + (1 - sigma) * x


def corrupt_history(
    key: jax.Array, x0: jax.Array, history: jax.Array, cfg: CorruptionConfig = CorruptionConfig(),
    layout: HistoryLayout = LAYOUT,
) -> tuple[jax.Array, jax.Array]:
    """Frame-aware corruption of (x0 (B,C,1,H,W), history (B,C,19,H,W)), as ``corrupt_history_latents``.

    With probability ``clean_prob`` nothing changes. Otherwise one mode for the batch ("random":
    noise with ``noise_mode_prob``, else downsample) and, for each part of :func:`window_parts` and for
    x0, skipped where the part is all zero: noise ``(1 - s) x + s eps`` with s ~ U(0, ratio) per
    (sample, frame) (per sample without ``frame_independent``), or a blur with one factor
    ~ U(downsample_min, downsample_max) per part.
    """
    k_clean, k_mode, key = jax.random.split(key, 3)
    clean = jax.random.uniform(k_clean) < cfg.clean_prob
    if cfg.mode == "random":
        use_noise = jax.random.uniform(k_mode) < cfg.noise_mode_prob
    else:
        use_noise = jnp.asarray(cfg.mode == "noise")
    ratios = {"long": cfg.ratio_long, "mid": cfg.ratio_mid, "short": cfg.ratio_short}

    def corrupt(part_key: jax.Array, x: jax.Array, ratio: float) -> jax.Array:
        k_noise, k_factor = jax.random.split(part_key)
        noised = _noise_part(k_noise, x, ratio, cfg.frame_independent)
        if cfg.mode == "noise":
            new = noised
        else:
            factor = jax.random.uniform(k_factor, minval=cfg.downsample_min, maxval=cfg.downsample_max)
            new = jnp.where(use_noise, noised, blur(x, factor))
        return _select(_nonzero(x, cfg.per_sample_skip) & ~clean, new, x)

    parts = window_parts(layout)
    keys = jax.random.split(key, len(parts) + 1)
    pieces = [corrupt(k, history[:, :, p.start:p.stop], ratios[p.ratio]) for k, p in zip(keys, parts)]
    return corrupt(keys[-1], x0, ratios["short"]), jnp.concatenate(pieces, axis=2)


# ---------------------------------------------------------------------------------------------------
# saturation jitter (section 8.4)


@dataclasses.dataclass(frozen=True)
class SaturationConfig:
    """``add_saturation_to_history_latents``' settings (YAML ``saturation_ratio_{min,max,clean_prob}``)."""

    ratio_min: float = 0.3
    ratio_max: float = 1.7
    clean_prob: float = 0.1
    per_sample_skip: bool = True


def saturate_history(
    key: jax.Array, history: jax.Array, cfg: SaturationConfig = SaturationConfig(), layout: HistoryLayout = LAYOUT,
) -> jax.Array:
    """Saturation jitter of the window (x0 is never saturated): for each non-zero part independently,
    with probability ``clean_prob`` unchanged, else ``(x - m) k + m`` with m the mean over the channels
    at each position and one k per part (shared by the batch), k ~ U(ratio_min, 0.999) or
    U(1.001, ratio_max) with equal odds."""
    parts = window_parts(layout)
    pieces = []
    for part_key, p in zip(jax.random.split(key, len(parts)), parts):
        k_clean, k_side, k_low, k_high = jax.random.split(part_key, 4)
        x = history[:, :, p.start:p.stop]
        low = jax.random.uniform(k_low, minval=cfg.ratio_min, maxval=1.0 - 1e-3)
        high = jax.random.uniform(k_high, minval=1.0 + 1e-3, maxval=cfg.ratio_max)
        factor = jnp.where(jax.random.uniform(k_side) < 0.5, low, high).astype(x.dtype)
        mean = jnp.mean(x, axis=1, keepdims=True)
        active = _nonzero(x, cfg.per_sample_skip) & ~(jax.random.uniform(k_clean) < cfg.clean_prob)
        pieces.append(_select(active, (x - mean) * factor + mean, x))
    return jnp.concatenate(pieces, axis=2)


# ---------------------------------------------------------------------------------------------------
# error recycling (section 8.6)


@dataclasses.dataclass(frozen=True)
class RecycleConfig:
    """Error-recycling settings, named and defaulted as the official ``TrainingConfig``."""

    error_buffer_size: int = 500
    grid_steps: int = 50  # the timestep grid: a 50-step shift-1 schedule, 1000 -> 20
    noise_prob: float = 0.01
    latent_prob: float = 0.9
    y_prob: float = 0.9
    clean_prob: float = 0.2
    clean_buffer_update_prob: float = 0.1
    y_error_num: int = 6
    error_modulate_factor: float = 0.0


class RecycleBuffers(struct.PyTreeNode):
    """Past prediction errors of one latent shape, per timestep cell: ``noise`` (errors extrapolated to
    sigma = 1) and ``x0`` (errors of the x0 estimate), each (cells, capacity, C, T, H, W), with ``count``
    (cells,) valid entries per cell and the cells' ``grid`` timesteps. One buffer per latent (H, W),
    as the original keys its buffers by resolution. A pytree: it can live in the train state."""

    noise: jax.Array
    x0: jax.Array
    count: jax.Array
    grid: jax.Array

    @classmethod
    def create(cls, shape: Sequence[int], cfg: RecycleConfig = RecycleConfig(), dtype: Any = jnp.float32) -> "RecycleBuffers":
        """Empty buffers for per-sample latents of ``shape`` (C, T, H, W)."""
        cells = cfg.grid_steps
        grid = jnp.linspace(1.0, 0.0, cells + 1)[:-1] * 1000.0  # get_timesteps(50): 1000, 980, ..., 20
        zeros = jnp.zeros((cells, cfg.error_buffer_size, *shape), dtype)
        return cls(noise=zeros, x0=zeros, count=jnp.zeros((cells,), jnp.int32), grid=grid)

    def cells(self, timesteps: jax.Array) -> jax.Array:
        """(B,) nearest grid cell of each timestep (clamped to [0, 999] first, as the original)."""
        t = jnp.clip(timesteps.astype(jnp.float32), 0, 999)
        return jnp.argmin(jnp.abs(self.grid[None, :] - t[:, None]), axis=1)


def recycle_errors(v_pred: jax.Array, v_target: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two errors of one prediction at noise level ``sigma`` (B,): ``(1 - sigma)(v_pred - v)``, the
    error of the sigma = 1 extrapolation, and ``-sigma (v_pred - v)``, the error of the x0 estimate."""
    diff = (v_pred - v_target).astype(jnp.float32)
    s = sigma.reshape((-1,) + (1,) * (diff.ndim - 1)).astype(jnp.float32)
    return (1 - s) * diff, -s * diff


def push_errors(
    key: jax.Array, buffers: RecycleBuffers, noise_error: jax.Array, x0_error: jax.Array, timesteps: jax.Array,
    clean: jax.Array, cfg: RecycleConfig = RecycleConfig(),
) -> RecycleBuffers:
    """Store each sample's errors in its timestep cell: appended while the cell has room, else replacing
    the nearest entry by L2 (the original's "l2_batch" strategy; each buffer compared on its own).
    Samples trained ``clean`` (B,) are pushed only together, with probability ``clean_buffer_update_prob``.
    For multi-device warm-up (the original all-gathers for its first 50 steps) pass gathered errors."""
    take_clean = jax.random.uniform(key) < cfg.clean_buffer_update_prob
    push = ~clean | take_clean
    capacity = buffers.noise.shape[1]

    def one(buf: RecycleBuffers, item):
        cell, n_err, x_err, do = item
        count = buf.count[cell]
        dist = jnp.sum(jnp.square(buf.noise[cell] - n_err).reshape(capacity, -1), axis=1)
        nearest_x0 = jnp.argmin(jnp.sum(jnp.square(buf.x0[cell] - x_err).reshape(capacity, -1), axis=1))
        i_noise = jnp.where(count < capacity, count, jnp.argmin(dist))
        i_x0 = jnp.where(count < capacity, count, nearest_x0)

        def put(stored: jax.Array, i: jax.Array, new: jax.Array) -> jax.Array:
            return stored.at[cell, i].set(jnp.where(do, new.astype(stored.dtype), stored[cell, i]))

        count = jnp.where(do, jnp.minimum(count + 1, capacity), count)
        return buf.replace(noise=put(buf.noise, i_noise, n_err), x0=put(buf.x0, i_x0, x_err),
                           count=buf.count.at[cell].set(count)), None

    buffers, _ = jax.lax.scan(one, buffers, (buffers.cells(timesteps), noise_error, x0_error, push))
    return buffers


def _pick(key: jax.Array, valid: jax.Array) -> jax.Array:
    """A uniform index among the True entries of ``valid`` (0 if none)."""
    return jax.random.categorical(key, jnp.where(valid, 0.0, -jnp.inf)).astype(jnp.int32)


def inject_errors(
    key: jax.Array, buffers: RecycleBuffers, target: jax.Array, noise: jax.Array, timesteps: jax.Array,
    x0: jax.Array, history: jax.Array, cfg: RecycleConfig = RecycleConfig(), layout: HistoryLayout = LAYOUT,
) -> dict[str, jax.Array]:
    """Recycled errors added to one batch before its forward (``apply_error_injection``), per sample:
    with probability ``clean_prob`` nothing (and the sample counts as clean); else, each with its own
    probability and only where the buffers hold something, ``noise += E_noise[cell]``
    (``noise_prob``), ``target_in = target + E_x0[cell]`` (``latent_prob``) and, with ``y_prob`` per
    sample and again per non-zero part, an x0 error from any cell added to the history: to the last k
    (uniform 1..tail) frames of the tail, to x0 from the error's first frame, and to ``y_error_num``
    consecutive frames at a random offset of each 9-frame window.

    Returns ``target_in``, ``noise``, ``x0``, ``history`` and ``clean`` (B,) bool. The flow target stays
    ``noise - target``: the model learns to undo its own errors.
    """
    batch = target.shape[0]
    keys = iter(jax.random.split(key, 8))
    u = jax.random.uniform(next(keys), (4, batch))
    clean = u[3] < cfg.clean_prob
    cells = buffers.cells(timesteps)
    has_cell = buffers.count[cells] > 0
    capacity = buffers.noise.shape[1]
    all_valid = (jnp.arange(capacity)[None, :] < buffers.count[:, None]).reshape(-1)
    has_any = jnp.any(all_valid)

    def modulation(k: jax.Array) -> jax.Array:
        f = cfg.error_modulate_factor
        return uniform(k, (batch,) + (1,) * (target.ndim - 1), minval=1 - f, maxval=1 + f)

    def from_cell(k: jax.Array, stored: jax.Array) -> jax.Array:
        k_pick, k_mod = jax.random.split(k)
        ks = jax.random.split(k_pick, batch)
        picks = jax.vmap(lambda kk, c: _pick(kk, jnp.arange(capacity) < buffers.count[c]))(ks, cells)
        return stored[cells, picks] * modulation(k_mod)

    add_noise = (u[1] < cfg.noise_prob) & ~clean & has_cell
    add_latent = (u[0] < cfg.latent_prob) & ~clean & has_cell
    noise = _select(add_noise, noise + from_cell(next(keys), buffers.noise).astype(noise.dtype), noise)
    target_in = _select(add_latent, target + from_cell(next(keys), buffers.x0).astype(target.dtype), target)

    # history errors: one x0 error from any cell per part (the original draws one per part)
    add_y = (u[2] < cfg.y_prob) & ~clean & has_any
    flat = buffers.x0.reshape(-1, *buffers.x0.shape[2:])
    length, chunk = layout.window, layout.latent_frames_per_chunk
    windows, tail = divmod(length, chunk)
    parts = ([Part(0, tail, "long")] if tail else []) + [Part(tail + i * chunk, tail + (i + 1) * chunk, "long")
                                                          for i in range(windows)]
    part_keys = jax.random.split(next(keys), len(parts) + 1)

    def y_error(k: jax.Array) -> tuple[jax.Array, jax.Array]:
        k_pick, k_mod, k_coin, k_off = jax.random.split(k, 4)
        picks = jax.vmap(lambda kk: _pick(kk, all_valid))(jax.random.split(k_pick, batch))
        coin = jax.random.uniform(k_coin, (batch,)) < cfg.y_prob
        return flat[picks] * modulation(k_mod), coin, k_off

    pieces = []
    for part_key, p in zip(part_keys, parts):
        err, coin, k_off = y_error(part_key)
        x = history[:, :, p.start:p.stop]
        n = p.stop - p.start
        frames = jnp.arange(n)
        if p.start == 0 and tail:
            k = jax.random.randint(k_off, (batch,), 1, tail + 1)  # the last k frames of the tail
            aligned = err[:, :, err.shape[2] - n:]
            mask = frames[None, :] >= (n - k)[:, None]
        else:
            span = min(cfg.y_error_num, err.shape[2])
            offset = jax.random.randint(k_off, (batch,), 0, max(0, err.shape[2] - cfg.y_error_num) + 1)
            aligned = err[:, :, :n]
            mask = (frames[None, :] >= offset[:, None]) & (frames[None, :] < (offset + span)[:, None])
        delta = jnp.where(mask[:, None, :, None, None], aligned, 0.0).astype(x.dtype)
        pieces.append(_select(add_y & coin & _nonzero(x, True), x + delta, x))
    err, coin, _ = y_error(part_keys[-1])
    x0 = _select(add_y & coin & _nonzero(x0, True), x0 + err[:, :, :1].astype(x0.dtype), x0)
    return {"target": target_in, "noise": noise, "x0": x0, "history": jnp.concatenate(pieces, axis=2), "clean": clean}


# ---------------------------------------------------------------------------------------------------
# the whole context of one step


@dataclasses.dataclass(frozen=True)
class ContextConfig:
    """What a stage does to the history before the forward (the YAML's ``training_config`` keys)."""

    random_drop: bool = True  # is_random_drop
    t2v_ratio: float = 0.4  # random_drop_t2v_ratio
    v2v_ratio: float = 0.4  # random_drop_v2v_ratio
    i2v_ratio: float = 0.0  # random_drop_i2v_ratio
    corruption: CorruptionConfig | None = CorruptionConfig()  # None: corrupt_history false
    saturation: SaturationConfig | None = None  # only the DMD rollouts saturate


def prepare_context(
    key: jax.Array, x0: jax.Array, history: jax.Array, cfg: ContextConfig = ContextConfig(),
    layout: HistoryLayout = LAYOUT,
) -> dict[str, jax.Array]:
    """Drop, corrupt (and saturate) the context, then split it into the transformer's history inputs
    (:func:`history_inputs`): the order of the official stage-1/2 step."""
    k_drop, k_corrupt, k_sat = jax.random.split(key, 3)
    if cfg.random_drop:
        x0, history, _ = random_drop(k_drop, x0, history, t2v_ratio=cfg.t2v_ratio, v2v_ratio=cfg.v2v_ratio,
                                     i2v_ratio=cfg.i2v_ratio, window=layout.latent_frames_per_chunk)
    if cfg.corruption is not None:
        x0, history = corrupt_history(k_corrupt, x0, history, cfg.corruption, layout)
    if cfg.saturation is not None:
        history = saturate_history(k_sat, history, cfg.saturation, layout)
    return history_inputs(x0, history, layout)
