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
