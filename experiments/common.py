"""What every benchmark here shares: the Helios workload, FLOP counts, the run's environment, tables.

No jax or torch import at module level: the JAX benchmarks and the PyTorch reference run in separate
processes (each framework takes the GPU's memory for itself) and both use this module.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Any, Callable, Sequence

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(EXPERIMENTS)
RESULTS = os.path.join(EXPERIMENTS, "RESULTS.md")
RESULTS_HEADER = """# Benchmark results

Every run of a script in `experiments/` appends one section here: what ran, on which device, with
which versions, at which commit, and its table. Older sections stay as they were measured.
"""


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


def chunk_flops(cfg: Any, work: Workload, stage_steps: Sequence[int], guided: bool) -> float:
    """Model FLOPs of the DiT in one chunk: forwards per stage x FLOPs per forward, twice with CFG, but the
    text's share (``text_flops``) once per text context, as the pipeline computes it once per chunk."""
    text = text_flops(cfg, work)
    per_steps = sum(n * (dit_flops(cfg, work, s)["total"] - text) for s, n in enumerate(stage_steps))
    return (2 if guided else 1) * (per_steps + text)


def text_flops(cfg: Any, work: Workload) -> float:
    """The FLOPs of a forward that depend only on the text: the text embedder and every block's
    cross-attention to_k / to_v (``helios_jax.models.transformer.text_kv``)."""
    text, dim = work.text_tokens, cfg.inner_dim
    return 2 * text * (cfg.text_dim * dim + dim * dim) + cfg.num_layers * 2 * text * dim * dim * 2


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


def report(script: str, env: dict[str, Any], body: str, result: dict[str, Any], args: Any) -> dict[str, Any]:
    """Print a benchmark's tables and keep them where ``--results`` and ``--json`` say."""
    print(body, flush=True)
    if args.results:
        append_results(script, env, body, args.results)
    if args.json:
        write_json(args.json, result)
    return result


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


def workload_label(work: Workload) -> str:
    stages = "/".join(f"{h}x{w}" for h, w in work.stages)
    history = "/".join(str(f) for _, f in work.history_frames)
    hh, hw = work.history_hw
    return (f"{work.name}: noisy latents {stages} x {work.frames} frames, history {history} frames (short/mid/long) "
            f"at {hh}x{hw}, {work.text_tokens} text tokens, batch {work.batch}")


def history_terms(cfg: Any, work: Workload) -> list[tuple[int, int]]:
    """(tokens, kernel volume) of each history term: its frames at full resolution, padded up to its
    kernel (patch x 1, 2 or 4 per axis) as the model does, one token per kernel."""
    factors = {"short": 1, "mid": 2, "long": 4}
    terms = []
    for name, frames in work.history_frames:
        kernel = [p * factors[name] for p in cfg.patch_size]
        sizes = (frames, *work.history_hw)
        terms.append((math.prod(math.ceil(s / k) for s, k in zip(sizes, kernel)), math.prod(kernel)))
    return terms


def token_counts(cfg: Any, work: Workload, stage: int) -> tuple[int, int]:
    """(noisy tokens, history tokens) at one stage."""
    pt, ph, pw = cfg.patch_size
    h, w = work.stages[stage]
    return work.frames // pt * (h // ph) * (w // pw), sum(tokens for tokens, _ in history_terms(cfg, work))


def dit_flops(cfg: Any, work: Workload, stage: int) -> dict[str, float]:
    """Model FLOPs of one forward (multiply-add = 2), in total and in the attention cores.

    Counts every matmul: patch embeddings, text embedder, per block the q/k/v/out projections,
    self-attention over all tokens, cross-attention of the noisy tokens (all tokens without
    ``guidance_cross_attn``) to the text, the feed-forward; then the output projection.
    Elementwise work (norms, RoPE, softmax) is left out, as MFU conventions do.
    """
    noisy, history = token_counts(cfg, work, stage)
    tokens, text = noisy + history, work.text_tokens
    dim, ffn, c = cfg.inner_dim, cfg.ffn_dim, cfg.in_channels
    queries = noisy if cfg.guidance_cross_attn else tokens
    patch = math.prod(cfg.patch_size)
    self_attn = 4 * tokens * tokens * dim
    cross_attn = 4 * queries * text * dim
    per_block = (
        2 * tokens * dim * dim * 4  # to_q, to_k, to_v, to_out of self-attention
        + self_attn
        + 2 * queries * dim * dim * 2 + 2 * text * dim * dim * 2  # cross-attention projections
        + cross_attn
        + 2 * tokens * dim * ffn * 2  # feed-forward
    )
    outside = (
        2 * noisy * c * patch * dim  # patch embedding of the noisy latents
        + sum(2 * n * c * volume * dim for n, volume in history_terms(cfg, work))  # history embeddings
        + 2 * text * (cfg.text_dim * dim + dim * dim)  # text embedder
        + 2 * noisy * dim * cfg.output_channels * patch  # proj_out
    )
    return {
        "total": cfg.num_layers * per_block + outside,
        "attention": cfg.num_layers * (self_attn + cross_attn),
    }


def git_commit() -> str:
    """HEAD's short hash, with '+dirty' when the tree has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` ('absent' for one that is not installed)."""
    found = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def environment(device: str, versions: dict[str, str]) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "device": device,
        "host": f"{platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()}",
        "versions": versions,
    }


def jax_environment(*packages: str) -> dict[str, Any]:
    """:func:`environment` of JAX's first device, with the versions of jax, jaxlib, its CUDA plugin and ``packages``."""
    import jax

    device = jax.devices()[0]
    return environment(f"{device.device_kind} ({device.platform})",
                       versions("jax", "jaxlib", "jax-cuda13-plugin", *packages))


def describe(env: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (f"- date: {env['date']}\n- commit: {env['commit']}\n- device: {env['device']}\n"
            f"- host: {env['host']}\n- versions: {versions}\n")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def append_results(title: str, env: dict[str, Any], body: str, path: str = RESULTS) -> None:
    """Append one section (title, environment, tables and notes) to RESULTS.md, atomically."""
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else RESULTS_HEADER
    write_atomic(path, old.rstrip("\n") + f"\n\n## {title}\n\n{describe(env)}\n{body.rstrip()}\n")


def write_json(path: str, payload: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(payload, indent=1, default=str) + "\n")


def median_ms(run: Callable[[], Any], sync: Callable[[Any], Any], *, warmup: int, reps: int,
              min_sample_s: float = 0.02) -> float:
    """Median wall time of ``run`` in ms, ``sync`` waiting for the device.

    Short calls are issued back to back (``inner`` per sample, enough for ``min_sample_s``) and
    synchronised once, so that launch latency overlaps the device work instead of adding to it.
    """
    for _ in range(warmup):
        sync(run())
    start = time.perf_counter()
    sync(run())
    once = time.perf_counter() - start
    inner = max(1, min(100, math.ceil(min_sample_s / max(once, 1e-6))))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = run()
        sync(out)
        samples.append((time.perf_counter() - start) / inner)
    return 1e3 * statistics.median(samples)


def gib(nbytes: float) -> float:
    return nbytes / 2**30
