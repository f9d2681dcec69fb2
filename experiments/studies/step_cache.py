"""What step caching (MagCache's rule, `helios_jax.step_cache`) saves and costs on the nano Base and Mid.

    python -m experiments.studies.step_cache --run /work/nano-run [--prompts 2 --chunks 2 --results]

Per model (RUN/stage1: the Base layout, UniPC 50 steps; RUN/mid: the Mid, the 3-stage pyramid at 17+17+16), in one
process: a calibration run on captions that are not scored (every step computed, the ratios averaged over its
chunks and prompts), then the same held-out captions and seed sampled uncached and at each setting. Per row: DiT
forwards per chunk (read from the compiled chunk), CPU seconds per chunk (all programs compiled before the timed
runs; this machine is shared, so its load average is printed), the error against the uncached run (latents:
relative L2; frames: mean absolute error in 0-255 and PSNR), and the nano world's metrics
(`helios_jax.nano.metrics`) of the videos. The nano models sample without CFG (guidance 1, as they were
trained); with CFG both branches are skipped together, so the forwards halve in the same proportion.
"""

from __future__ import annotations

import argparse
import os
import time

import jax.numpy as jnp
import numpy as np

from experiments import paths, provenance, reporting
from helios_jax import step_cache
from helios_jax.nano import metrics, scoring, world
from helios_jax.sampling.guidance import guidance_mode

METRICS = ("presence", "colour_accuracy", "shape_accuracy", "background_accuracy", "motion_error", "background_error")
MODELS = {  # name: (folder under the run, how it samples)
    "Base (stage1, UniPC 50)": ("stage1", {"num_inference_steps": 50, "guidance_scale": 1.0}),
    "Mid (pyramid, UniPC 17+17+16)": ("mid", {"pyramid_num_inference_steps_list": [17, 17, 16], "guidance_scale": 1.0}),
}


def parse_settings(text: str) -> list[tuple[float, int]]:
    """``THRESHOLD:MAX_SKIPS,...``."""
    out = []
    for item in text.split(","):
        threshold, skips = item.split(":")
        out.append((float(threshold), int(skips)))
    return out


def sample(pipe, captions: list[str], chunks: int, seed: int, call: dict) -> tuple[np.ndarray, float]:
    """The videos' latents (B, C, T, h, w) and the wall seconds per chunk."""
    start = time.perf_counter()
    latents = pipe(captions, num_frames=chunks * world.CHUNK_FRAMES, seed=seed, height=world.WORLD.height,
                   width=world.WORLD.width, output_type="latent", **call)
    return np.asarray(latents), (time.perf_counter() - start) / chunks


def frames(pipe, latents: np.ndarray, chunks: int) -> np.ndarray:
    """(B, T, H, W, 3) uint8: each chunk's latents decoded as the pipeline decodes them."""
    per = latents.shape[2] // chunks
    return np.concatenate([np.asarray(pipe.decode(jnp.asarray(latents[:, :, k * per:(k + 1) * per])))
                           for k in range(chunks)], axis=1)


def study(folder: str, call: dict, captions: list[str], calibration_captions: list[str], chunks: int,
          settings: list[tuple[float, int]]) -> tuple[list[list], step_cache.Calibration]:
    pipe = scoring.load(folder)
    pipe.step_cache = step_cache.StepCache()  # calibrating: threshold 0, every step computed
    sample(pipe, calibration_captions, chunks, 100, call)
    calibration = pipe.step_cache.calibrated(folder)
    pipe.step_cache = None
    sample(pipe, captions, 1, 0, call)  # compiles the uncached chunk before the timed runs
    reference, seconds = sample(pipe, captions, chunks, 0, call)
    reference_frames = frames(pipe, reference, chunks)
    uncached = sum(calibration.stage_steps) * (2 if guidance_mode(call["guidance_scale"]) != "none" else 1)
    runs = [("uncached", None, reference, seconds, uncached)]
    for threshold, skips in [(0.0, 0), *settings]:
        pipe.step_cache = step_cache.StepCache(calibration, threshold, skips)
        latents, seconds = sample(pipe, captions, chunks, 0, call)
        runs.append((f"threshold {threshold:g}, max {skips} skips", pipe.step_cache, latents, seconds,
                     pipe.step_cache.forwards()[0]))
    rows = []
    for name, cache, latents, seconds, forwards in runs:
        video = reference_frames if cache is None else frames(pipe, latents, chunks)
        rel = float(np.linalg.norm(latents - reference) / np.linalg.norm(reference))
        mae = float(np.abs(video.astype(np.float64) - reference_frames).mean())
        mse = float(((video.astype(np.float64) - reference_frames) ** 2).mean())
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
        summary = scoring.mean_summary([metrics.evaluate(v, c) for v, c in zip(video, captions)])
        rows.append([name, forwards, f"{uncached / forwards:.2f}x", seconds, rel, mae, psnr,
                     *[summary.get(k, float("nan")) for k in METRICS]])
    return rows, calibration


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.studies.step_cache", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished `make nano` run folder (read only): its stage1/, mid/")
    parser.add_argument("--prompts", type=int, default=2, help="held-out captions scored (one batch)")
    parser.add_argument("--chunks", type=int, default=2, help="chunks per video (33 frames each)")
    parser.add_argument("--settings", default="0.1:2,0.25:2,0.5:3",
                        help="THRESHOLD:MAX_SKIPS,... the cached rows (a threshold-0 row is always run)")
    parser.add_argument("--only", choices=tuple(MODELS), help="one model")
    parser.add_argument("--results", nargs="?", const=paths.RESULTS, help="append the table to RESULTS.md")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    settings = parse_settings(args.settings)
    captions = scoring.held_out_captions(2 * args.prompts)
    scored, calibrating = captions[:args.prompts], captions[args.prompts:]
    headers = ["model", "run", "DiT forwards per chunk", "fewer", "CPU s per chunk", "latents rel L2",
               "frames MAE (0-255)", "frames PSNR dB", *METRICS]
    rows, result = [], {}
    for name, (sub, call) in MODELS.items():
        if args.only and name != args.only:
            continue
        found, calibration = study(os.path.join(args.run, sub), call, scored, calibrating, args.chunks, settings)
        rows += [[name, *row] for row in found]
        result[name] = {"rows": found, "ratios": calibration.ratios}
    env = provenance.jax_environment("flax")
    config = (f"{args.prompts} held-out captions (one batch) x {args.chunks} chunks of 33 frames at "
              f"{world.WORLD.height}x{world.WORLD.width}, seed 0, float32, no CFG; calibrated on {args.prompts} other "
              f"captions x {args.chunks} chunks (seed 100); retain {step_cache.RETAIN:g} of each stage's steps; run "
              f"{args.run}; {reporting.load_note()}\n\n")
    body = config + reporting.markdown_table(headers, rows)
    reporting.report("Step caching on the nano Base and Mid (experiments/studies/step_cache.py)", env, body, result, args)


if __name__ == "__main__":
    main()
