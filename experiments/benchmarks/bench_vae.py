"""Time the Wan VAE decoding one Helios chunk: 9 latent frames -> 33 frames at 384x640 (latent 48x80).

    python -m experiments.benchmarks.bench_vae                 # real Wan2.1 config, random weights, fp32 and bf16
    python -m experiments.benchmarks.bench_vae --reference     # also diffusers' AutoencoderKLWan, if importable
    python -m experiments.benchmarks.bench_vae --small         # a tiny config and size: a smoke run, never appended

What is timed is ``helios_jax.models.vae.chunk_decoder``, the step Helios runs after every chunk:
denormalise the latents, decode, convert to uint8 on the device. The table (device, versions and date
included) is printed and appended to experiments/RESULTS.md (``reporting.append_results``). Weights are
random (fan-in scaled, so activations stay finite); the timing does not depend on their values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import helios_jax as hj
from experiments import provenance, reporting
from helios_jax import demo
from helios_jax.config import to_dict
from helios_jax.models import vae as vae_lib

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
# A tiny configuration with the real block structure, for a CPU smoke run.
SMALL = dict(base_dim=4, z_dim=16)


def random_params(cfg: hj.VAEConfig, dtype, seed: int = 0) -> dict:
    """Random params (``helios_jax.demo.random_params``: kernels ~ N(0, 1/fan_in)) on the device in ``dtype``."""
    params = demo.random_params(vae_lib.param_shapes(cfg), vae_lib.keymap(cfg), np.random.default_rng(seed))
    return jax.tree.map(lambda value: jnp.asarray(value, dtype), params)


def time_calls(fn, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def bench_jax(cfg: hj.VAEConfig, name: str, latents: np.ndarray, iters: int) -> dict:
    dtype = DTYPES[name]
    params = random_params(cfg, dtype)
    z = jnp.asarray(latents)
    decode = vae_lib.chunk_decoder(cfg, dtype)
    start = time.perf_counter()
    compiled = decode.lower(params, z).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp_gib = memory.temp_size_in_bytes / 2**30 if memory is not None else float("nan")
    frames = compiled(params, z)
    assert frames.dtype == jnp.uint8 and frames.shape[1] == cfg.video_frames(latents.shape[2]), frames.shape
    times = time_calls(lambda: compiled(params, z), iters)
    return dict(impl=f"helios-jax {name}", compile_s=compile_s, times=times, temp_gib=temp_gib)


def bench_reference(cfg: hj.VAEConfig, name: str, latents: np.ndarray, iters: int) -> dict | None:
    """diffusers' AutoencoderKLWan with the same work (denormalise, decode, uint8), or None if absent."""
    try:
        import torch
        from diffusers import AutoencoderKLWan
    except ImportError as err:
        print(f"reference skipped: {err}")
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
    vae = AutoencoderKLWan(**to_dict(cfg)).to(device, dtype).eval()
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
    z = torch.from_numpy(latents).to(device, dtype)

    def step():
        with torch.no_grad():
            video = vae.decode(z / inv_std + mean, return_dict=False)[0]
            out = ((video * 0.5 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    return dict(impl=f"diffusers {name} ({device})", compile_s=first_s, times=time_calls(step, iters),
                temp_gib=float("nan"))


def table(rows: list[dict], video_frames: int) -> str:
    lines = [
        "| implementation | first call / compile s | median ms | min ms | video frames/s | XLA temp GiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        median, best = statistics.median(r["times"]), min(r["times"])
        lines.append(
            f"| {r['impl']} | {r['compile_s']:.1f} | {1e3 * median:.1f} | {1e3 * best:.1f} | "
            f"{video_frames / median:.1f} | {r['temp_gib']:.3g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny config and size (CPU smoke run); not appended")
    parser.add_argument("--latent-frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--reference", action="store_true", help="also time diffusers' AutoencoderKLWan")
    parser.add_argument("--no-append", action="store_true", help="print only; --small never appends")
    args = parser.parse_args(argv)

    cfg = hj.VAEConfig(**SMALL) if args.small else hj.VAEConfig()
    height, width = (32, 48) if args.small else (args.height, args.width)
    ratio = cfg.spatial_compression
    if height % ratio or width % ratio:
        parser.error(f"--height and --width must be multiples of {ratio}")
    latents = np.random.default_rng(1).standard_normal(
        (args.batch, cfg.z_dim, args.latent_frames, height // ratio, width // ratio), np.float32)
    out_frames = cfg.video_frames(args.latent_frames)
    title = f"Wan VAE chunk decode (experiments/benchmarks/bench_vae.py){' --small smoke run' if args.small else ''}"
    what = (f"{'A tiny config (base_dim 4) with' if args.small else 'The Wan2.1 VAE (base_dim 96), random weights,'} "
            f"the real block structure: latents {tuple(latents.shape)} -> uint8 {args.batch} x {out_frames} x "
            f"{height} x {width} x 3 (denormalise, decode, convert on the device); median and min of "
            f"{args.iters} calls after the first. XLA temp: the compiled program's scratch memory.")
    env = provenance.jax_environment("flax", "diffusers", "torch")
    print(f"{title}\n{provenance.describe(env)}\n{what}\n", flush=True)

    rows = []
    for name in args.dtypes.split(","):
        rows.append(bench_jax(cfg, name, latents, args.iters))
        print(table(rows[-1:], args.batch * out_frames), flush=True)
        if args.reference:
            ref = bench_reference(cfg, name, latents, args.iters)
            if ref is not None:
                rows.append(ref)
                print(table(rows[-1:], args.batch * out_frames), flush=True)
    result = f"{what}\n\n{table(rows, args.batch * out_frames)}"
    print("\n" + result)
    if not (args.no_append or args.small):
        reporting.append_results(title, env, result)
        print("appended to experiments/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
