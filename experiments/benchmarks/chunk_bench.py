"""What bench_dit and bench_reference share for whole chunks: their flags, the settings both sides generate
with, and the rows of a chunk table. No jax or torch import at module level (each side runs in its own process).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Sequence

from experiments.paths import RESULTS
from experiments.workloads import LATENT_FRAMES, tiny_vae_kwargs


@dataclasses.dataclass(frozen=True)
class ChunkSettings:
    """What the chunk measurements generate, the same on the JAX and the torch side."""

    height: int
    width: int
    vae_kwargs: dict[str, Any]  # VAEConfig / AutoencoderKLWan arguments
    vae_dtypes: tuple[str, ...]  # "fp32" (as the official inference), "bf16"
    latent_frames: int  # per chunk (num_latent_frames_per_chunk)
    pyramid_steps: tuple[tuple[int, ...], ...]  # the distilled model's pyramid_num_inference_steps_list
    amplify: tuple[bool, ...]  # is_amplify_first_chunk
    chunks: int  # chunks of each timed stream: the first one, then the steady ones
    text_tokens: int
    base_steps: int
    base_chunks: int
    base_shift: float
    guidance_scale: float


def bench_arguments(parser: Any, measurements: Sequence[str]) -> None:
    """The flags bench_dit and bench_reference share: what to measure, how often, where results go."""
    parser.add_argument("--measure", default=",".join(measurements), help=f"any of {list(measurements)}")
    parser.add_argument("--stages", default=None, help="pyramid stages, e.g. 0,1,2 (default: all)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on tiny latents (CPU smoke run)")
    add_chunk_arguments(parser)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--results", default=RESULTS, help="markdown file to append to ('' = none)")


def selected_measures(parser: Any, args: Any, measurements: Sequence[str]) -> list[str]:
    """The measurements ``--measure`` names, or a parser error naming the unknown ones."""
    measures = args.measure.split(",")
    unknown = sorted(set(measures) - set(measurements))
    if unknown:
        parser.error(f"unknown measurement(s) {unknown}; choose among {list(measurements)}")
    return measures


def add_chunk_arguments(parser: Any) -> None:
    parser.add_argument("--size", default="384x640", help="height x width of the video chunks")
    parser.add_argument("--vae-dtypes", default="fp32", help="fp32 (the official inference's) and/or bf16")
    parser.add_argument("--latent-frames", type=int, default=None,
                        help=f"latent frames per chunk (default {LATENT_FRAMES}; 2 with --tiny)")
    parser.add_argument("--pyramid-steps", default="2,2,2/1,1,1", help="distilled step lists, '/' between them")
    parser.add_argument("--amplify", default="0,1", help="is_amplify_first_chunk values: 0 and/or 1")
    parser.add_argument("--chunks", type=int, default=6, help="chunks per timed stream (first + steady ones), >= 2")
    parser.add_argument("--base-steps", type=int, default=50)
    parser.add_argument("--base-chunks", type=int, default=2, help="chunks of the base stream (the first compiles)")
    parser.add_argument("--base-shift", type=float, default=1.0, help="the base scheduler's shift (unverified)")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="the base setting's CFG scale")


def chunk_settings(args: Any, text_tokens: int) -> ChunkSettings:
    """ChunkSettings from ``add_chunk_arguments``' flags; ``--tiny`` makes 64x64 chunks of 2 latent frames
    with a tiny VAE."""
    height, width = (64, 64) if args.tiny else (int(v) for v in args.size.lower().split("x"))
    if height % 64 or width % 64:
        raise SystemExit(f"--size {height}x{width}: the 3-stage pyramid needs multiples of 64")
    if args.chunks < 2 or args.base_chunks < 2:
        raise SystemExit("--chunks and --base-chunks must be >= 2: the first chunk, then at least one steady one")
    return ChunkSettings(
        height=height, width=width, vae_kwargs=tiny_vae_kwargs() if args.tiny else {},
        vae_dtypes=tuple(args.vae_dtypes.split(",")),
        latent_frames=args.latent_frames or (2 if args.tiny else LATENT_FRAMES),
        pyramid_steps=tuple(tuple(int(n) for n in steps.split(",")) for steps in args.pyramid_steps.split("/")),
        amplify=tuple(bool(int(a)) for a in args.amplify.split(",")), chunks=args.chunks, text_tokens=text_tokens,
        base_steps=args.base_steps, base_chunks=args.base_chunks, base_shift=args.base_shift,
        guidance_scale=args.guidance_scale)


def chunk_row(label: list[Any], cold_s: float, first_s: Any, steady_s: Sequence[float], decode_s: float,
              frames: int, flops: float, matmul_tflops: float, peak_gib: Any) -> list[Any]:
    """One row of a chunk table: first-chunk times, the median steady chunk, FPS, the split into DiT
    sampling (steady chunk minus decode) and VAE decode, the DiT's TFLOP/s and MFU over the sampling
    (left blank where the sampling is lost in the noise of the two timings, as on a CPU at toy size)."""
    chunk_s = statistics.median(steady_s)
    sampling_s = chunk_s - decode_s
    tflops = flops / sampling_s / 1e12 if sampling_s > 0 else ""
    mfu = 100 * tflops / matmul_tflops if tflops else ""
    return [*label, cold_s, first_s, chunk_s, frames / chunk_s, decode_s, sampling_s, tflops, mfu, peak_gib]


def failed_row(label: list[Any], error: Exception, width: int) -> list[Any]:
    """A table row for a setting that failed (no cuDNN, out of memory): the rest of the table still runs."""
    return [*label, f"failed: {type(error).__name__}: {str(error)[:80]}"] + [""] * (width - len(label) - 1)


CHUNK_HEADERS = ["first chunk s (cold)", "first chunk s (warm)", "steady chunk s", "FPS", "decode s", "sampling s",
                 "DiT TFLOP/s", "MFU %", "peak GiB"]
