"""The Helios workload the experiments measure: one chunk as the DiT sees it at each pyramid stage, the tiny
CPU-sized variant, and the schedulers of the distilled and base settings. No jax or torch import at module
level: the JAX benchmarks and the PyTorch reference use it in separate processes.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Workload:
    """One chunk of Helios generation as the DiT sees it at each pyramid stage.

    ``stages``: the noisy latent (H, W) of each stage; the history is always at full resolution
    ``history_hw``: short = prefix + 1 frame, mid = 2, long = 16 frames (384x640 video: 48x80 latents).
    """

    name: str
    stages: tuple[tuple[int, int], ...] = ((12, 20), (24, 40), (48, 80))
    frames: int = 9
    history_hw: tuple[int, int] = (48, 80)
    history_frames: tuple[tuple[str, int], ...] = (("short", 2), ("mid", 2), ("long", 16))
    text_tokens: int = 512
    batch: int = 1

    def frame_indices(self) -> dict[str, list[int]]:
        """The pipeline's frame indices: [prefix, long, mid, short_1, noisy]; short = prefix + short_1."""
        sizes = dict(self.history_frames)
        long_start, mid_start = 1, 1 + sizes["long"]
        short_start = mid_start + sizes["mid"]
        noisy_start = short_start + sizes["short"] - 1
        return {
            "long": list(range(long_start, mid_start)),
            "mid": list(range(mid_start, short_start)),
            "short": [0, *range(short_start, noisy_start)],
            "noisy": list(range(noisy_start, noisy_start + self.frames)),
        }


HELIOS = Workload("helios-384x640")
# CPU smoke runs of the scripts: the same structure at a size a laptop compiles in seconds.
TINY = Workload("tiny", stages=((2, 4), (4, 8)), frames=2, history_hw=(8, 8),
                history_frames=(("short", 2), ("mid", 2), ("long", 4)), text_tokens=7)


def tiny_config_kwargs() -> dict[str, Any]:
    """A TransformerConfig small enough for the CPU (2 heads of 64, as the kernel wants)."""
    return dict(num_attention_heads=2, attention_head_dim=64, rope_dim=(20, 22, 22), in_channels=16,
                out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2)


def tiny_vae_kwargs() -> dict[str, Any]:
    """A VAEConfig with the Wan2.1 block structure at a width the CPU decodes in a blink."""
    return dict(base_dim=4, z_dim=16)


# Attention alone (bench_attention, kernel_report): (label, query tokens, key tokens) of the self-attention at each
# pyramid stage with the full history and the cross-attention to 512 text tokens; the Pallas kernel's tuning shapes
# and the FlashConfig grid swept there.
ATTENTION_SHAPES = (("self 2940", 2940, 2940), ("self 4560", 4560, 4560), ("self 11040", 11040, 11040),
                    ("cross 8640x512", 8640, 512), ("cross 11040x512", 11040, 512))
TUNE_SHAPES = ("self 11040", "cross 8640x512")
TUNE_GRID = dict(block_q=(64, 128), block_k=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))


# --- Whole chunks (the chunk measurements of bench_dit.py and bench_reference.py) -------------------

LATENT_FRAMES = 9  # latent frames per chunk (Helios'): 33 video frames
VAE_FACTOR = 8  # pixels per latent, each side


def video_frames(latent_frames: int) -> int:
    """Video frames the causal VAE decodes from one chunk's latent frames: 1 + 4(T - 1)."""
    return 1 + 4 * (latent_frames - 1)


def chunk_workload(height: int, width: int, num_stages: int, text_tokens: int = 512,
                   latent_frames: int = LATENT_FRAMES) -> Workload:
    """The DiT's workload in one chunk of generation at height x width: each pyramid stage's latents
    (halved per stage below full size), the history at full size (16/2/1 frames plus the prefix)."""
    h, w = height // VAE_FACTOR, width // VAE_FACTOR
    stages = tuple((h >> (num_stages - 1 - s), w >> (num_stages - 1 - s)) for s in range(num_stages))
    return Workload(f"chunk-{height}x{width}", stages=stages, frames=latent_frames, history_hw=(h, w),
                    text_tokens=text_tokens)


def distilled_scheduler() -> dict[str, Any]:
    """HeliosDMDScheduler's config for the distilled model (the embedded demo checkpoint's, gamma 1/3)."""
    from helios_jax.demo import SCHEDULER

    return dict(SCHEDULER)


def base_scheduler(shift: float) -> dict[str, Any]:
    """A single-stage UniPC HeliosScheduler, as HeliosPipeline (Helios-Base) samples with.

    Helios-Base's own scheduler_config.json was not available here; ``shift`` (1.0 by default, as in
    diffusers' tiny Helios test pipeline) changes the timestep values, not the work per step.
    """
    return {"_class_name": "HeliosScheduler", "num_train_timesteps": 1000, "shift": shift, "stages": 1,
            "stage_range": [0, 1], "gamma": 1 / 3, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
            "use_dynamic_shifting": False, "time_shift_type": "exponential", "scheduler_type": "unipc",
            "solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True}


def workload_label(work: Workload) -> str:
    stages = "/".join(f"{h}x{w}" for h, w in work.stages)
    history = "/".join(str(f) for _, f in work.history_frames)
    hh, hw = work.history_hw
    return (f"{work.name}: noisy latents {stages} x {work.frames} frames, history {history} frames (short/mid/long) "
            f"at {hh}x{hw}, {work.text_tokens} text tokens, batch {work.batch}")
