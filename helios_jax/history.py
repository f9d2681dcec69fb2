"""The chunked video's bookkeeping: frame counts, and the memory window of history latents.

Helios generates 9 latent frames (33 video frames) per chunk and conditions each chunk on the
latest ``sum(history_sizes)`` latent frames, split into long (16), mid (2) and short (1) terms, plus
the first frame of the video as a prefix of the short term (``keep_first_frame``). Positions are
relative: the window's frames and the new chunk are numbered 0, 1, 2, ... in every chunk, so the
indices are constants and the window is a fixed-size buffer; memory stays flat however long the video.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

VAE_TEMPORAL_FACTOR = 4  # latent frame t covers video frames 4t-3 .. 4t (the first one covers frame 0)
VAE_SPATIAL_FACTOR = 8


def video_frames_per_chunk(latent_frames_per_chunk: int) -> int:
    """A chunk of T latent frames decodes to 1 + 4(T - 1) video frames (9 -> 33)."""
    return (latent_frames_per_chunk - 1) * VAE_TEMPORAL_FACTOR + 1


def num_chunks(num_frames: int, latent_frames_per_chunk: int) -> int:
    """The reference rounds the requested frames up to whole chunks: ceil(num_frames / 33), at least 1."""
    window = video_frames_per_chunk(latent_frames_per_chunk)
    return max(1, -(-max(num_frames, 1) // window))


def output_frames(chunks: int, latent_frames_per_chunk: int) -> int:
    """Frames the reference returns for ``chunks`` chunks: the decoded total trimmed to 4k + 1."""
    total = chunks * video_frames_per_chunk(latent_frames_per_chunk)
    return (total - 1) // VAE_TEMPORAL_FACTOR * VAE_TEMPORAL_FACTOR + 1


@dataclasses.dataclass(frozen=True)
class HistoryLayout:
    """How the history window is split and numbered.

    ``sizes`` are (long, mid, short) latent frames, largest first as the reference sorts them. With
    ``keep_first_frame`` the short term is [first-frame prefix, latest frame]; without it, the short
    term is the latest ``sizes[-1] + 1`` frames (the reference's adjustment), and the window grows by
    that one frame.
    """

    sizes: tuple[int, int, int]
    latent_frames_per_chunk: int
    keep_first_frame: bool

    @classmethod
    def create(cls, history_sizes: Sequence[int], latent_frames_per_chunk: int, keep_first_frame: bool) -> "HistoryLayout":
        sizes = tuple(sorted((int(s) for s in history_sizes), reverse=True))
        if len(sizes) != 3 or min(sizes) < 1:
            raise ValueError(f"history_sizes = {list(history_sizes)}: expected three positive sizes (long, mid, short)")
        if latent_frames_per_chunk < 1:
            raise ValueError(f"num_latent_frames_per_chunk = {latent_frames_per_chunk} must be at least 1")
        if not keep_first_frame:
            sizes = (sizes[0], sizes[1], sizes[2] + 1)
        return cls(sizes, latent_frames_per_chunk, keep_first_frame)

    @property
    def window(self) -> int:
        """Latent frames kept as history."""
        return sum(self.sizes)

    def indices(self) -> dict[str, np.ndarray]:
        """The frame indices of each term and of the noisy chunk, each (1, n) int32."""
        long, mid, short = self.sizes
        offset = 1 if self.keep_first_frame else 0
        positions = np.arange(offset + self.window + self.latent_frames_per_chunk, dtype=np.int32)
        cuts = np.cumsum([offset, long, mid, short])
        long_idx, mid_idx, short_idx, noisy_idx = np.split(positions[offset:], cuts[1:] - offset)
        if self.keep_first_frame:
            short_idx = np.concatenate([positions[:1], short_idx])
        return {
            "indices_hidden_states": noisy_idx[None],
            "indices_latents_history_short": short_idx[None],
            "indices_latents_history_mid": mid_idx[None],
            "indices_latents_history_long": long_idx[None],
        }

    def terms(self, window: jax.Array, prefix: jax.Array | None) -> dict[str, jax.Array]:
        """The model's history inputs from the window (B, C, window, H, W) and the first-frame prefix."""
        long, mid, _ = self.sizes
        terms = {
            "latents_history_long": window[:, :, :long],
            "latents_history_mid": window[:, :, long:long + mid],
            "latents_history_short": window[:, :, long + mid:],
        }
        if self.keep_first_frame:
            terms["latents_history_short"] = jnp.concatenate([prefix, terms["latents_history_short"]], axis=2)
        return terms


def push(window: jax.Array, latents: jax.Array) -> jax.Array:
    """The window after a chunk: the newest ``window`` frames of [window, latents]."""
    return jnp.concatenate([window, latents], axis=2)[:, :, -window.shape[2]:]
