"""The paper's claims at toy scale, on a finished `make nano` run: does stage 1's anti-drifting context keep long
videos from drifting, and does the 2+2+2 student keep what its stage-2 teacher makes?

    python -m experiments.studies.nano_claims --run nano-run [--chunks 32 --prompts 4 --seeds 2]

1. Drift. The recipe's stage 1 (random drops and history corruption, as stage_1_init.yaml) against the same run
   without them (`is_random_drop: false`, `corrupt_history: false`; the same overlay, seed, data, steps and so the
   same compute), trained here into RUN/ablation/ unless it is there. Both sample with UniPC, 50 steps, no CFG.
   Error recycling is not a training switch of this port (recipes.py refuses `use_error_recycling`), so it has no row.
2. Distillation. The stage-2 teacher (the pyramid, UniPC 17+17+16 = 50 steps) against the 2+2+2 student (DMD, the
   first chunk amplified, as the published Helios-Distilled runs).
Every model generates the same held-out captions (scenes no training clip used, `scoring.held_out_captions`) with the
same seeds; each video is scored by `helios_jax.nano.metrics` against its caption and the world's rule. A last row
scores the held-out clips themselves through the VAE: no model that decodes with it can score better.
Measured on this machine's CPU; the tables go to experiments/RESULTS.md with `--results`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np

from experiments import paths, provenance, reporting
from helios_jax.nano import metrics, recipe, scoring

DRIFT_COLUMNS = ("presence", "colour_accuracy", "shape_accuracy", "background_accuracy", "motion_error", "speed",
                 "drift_brightness", "background_error", "join_ratio")


@dataclasses.dataclass(frozen=True)
class Model:
    """One row: a pipeline folder of the run and how it samples."""

    name: str
    folder: str
    call: dict
    forwards: str  # DiT forwards per chunk (first chunk)


def ablation(run: str) -> str:
    """Stage 1 without random drops and history corruption, trained and merged as the recipe's stage 1 was."""
    folder = os.path.join(run, "ablation", "stage1-plain")
    if not os.path.isdir(folder):
        out = os.path.join(run, "ablation", "stage_1_plain")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        recipe.train_stage_1(run, out, **{"training_config.is_random_drop": "false",
                                          "training_config.corrupt_history": "false"})
        recipe.merge(os.path.join(run, "base"), recipe.final_checkpoint(out), folder, "base")
    return folder


def models(run: str, drift: bool, distill: bool) -> list[Model]:
    stage1 = dict(num_inference_steps=50, guidance_scale=1.0)
    rows = []
    if drift:
        rows += [Model("stage 1, anti-drifting (the recipe)", os.path.join(run, "stage1"), stage1, "50 (50)"),
                 Model("stage 1, no drops or corruption", ablation(run), stage1, "50 (50)")]
    if distill:
        rows += [Model("stage 2 teacher, 17+17+16", os.path.join(run, "mid"),
                       dict(pyramid_num_inference_steps_list=[17, 17, 16], guidance_scale=1.0), "50 (50)"),
                 Model("2+2+2 student", os.path.join(run, "distilled"),
                       dict(pyramid_num_inference_steps_list=[2, 2, 2], guidance_scale=1.0,
                            is_amplify_first_chunk=True), "6 (12)")]
    return rows


def generate(model: Model, captions: list[str], seeds: list[int], chunks: int) -> tuple[list[metrics.Report], float]:
    """Every caption at every seed; the reports and the CPU seconds per chunk of one video."""
    return scoring.sample_and_score(scoring.load(model.folder), captions, chunks=chunks, seeds=seeds, **model.call)


def per_chunk(reports: list[metrics.Report], key: str) -> np.ndarray:
    """(videos, chunks) of one metric, NaN where it could not be measured."""
    return np.array([[np.nan if c.get(key) is None else float(c[key]) for c in r.chunks] for r in reports])


def drift_table(results: dict[str, list[metrics.Report]], chunks: int) -> str:
    """Per model and metric: the mean over videos at the first, middle and last chunks, and the spread of the last."""
    marks = sorted({1, chunks // 4, chunks // 2, 3 * chunks // 4, chunks} - {0})
    rows = []
    for name, reports in results.items():
        for key in DRIFT_COLUMNS:
            values = per_chunk(reports, key)
            last = values[:, -1]
            rows.append([name, key, *[float(np.nanmean(values[:, m - 1])) for m in marks],
                         f"{np.nanmean(last):.3g} ± {np.nanstd(last):.2g}"])
    headers = ["model", "metric", *[f"chunk {m}" for m in marks], "last chunk, mean ± sd over videos"]
    return reporting.markdown_table(headers, rows)


def summary_table(results: dict[str, list[metrics.Report]], rows_of: list[Model], seconds: dict[str, float]) -> str:
    keys = list(DRIFT_COLUMNS)
    rows = []
    for model in rows_of:
        reports = results[model.name]
        rows.append([model.name, model.forwards, seconds[model.name],
                     *[float(np.nanmean(per_chunk(reports, k))) for k in keys]])
    return reporting.markdown_table(["model", "DiT forwards per chunk (first)", "CPU s per chunk", *keys], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.studies.nano_claims",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="nano-run", help="a finished `make nano` run folder")
    parser.add_argument("--chunks", type=int, default=32, help="chunks per video (33 frames each)")
    parser.add_argument("--prompts", type=int, default=4, help="held-out captions")
    parser.add_argument("--seeds", type=int, default=2, help="sampling seeds per caption")
    parser.add_argument("--only", choices=("drift", "distill"), help="one of the two comparisons")
    parser.add_argument("--results", nargs="?", const=paths.RESULTS, help="append the tables to RESULTS.md")
    parser.add_argument("--json", help="write the per-chunk metrics here")
    args = parser.parse_args(argv)
    run = os.path.abspath(args.run)
    captions = scoring.held_out_captions(args.prompts)
    seeds = list(range(args.seeds))
    rows_of = models(run, args.only != "distill", args.only != "drift")
    results, seconds = {}, {}
    for model in rows_of:
        results[model.name], seconds[model.name] = generate(model, captions, seeds, args.chunks)
    if args.only != "distill":  # every model of the run decodes with the same VAE: the base's
        ceiling = Model("the clips themselves through the VAE (the ceiling)", os.path.join(run, "base"), {}, "-")
        results[ceiling.name] = scoring.vae_round_trip(ceiling.folder, args.prompts, chunks=args.chunks)
        rows_of.append(ceiling)
        seconds[ceiling.name] = float("nan")
    config = (f"{args.prompts} held-out captions x {args.seeds} seeds, {args.chunks} chunks of 33 frames at 64x64, "
              f"run {args.run}; every metric is helios_jax.nano.metrics' (docs/nano.md)\n\n")
    body = config + "Per model, the mean over videos of each metric over every chunk:\n\n"
    body += summary_table(results, rows_of, seconds)
    body += "\nDrift: each metric at chunks along the video (means over videos):\n\n" + drift_table(results, args.chunks)
    env = provenance.jax_environment("flax")
    reporting.report("Nano Helios: anti-drifting and distillation at toy scale (experiments/studies/nano_claims.py)",
                     env, body, {name: [r.chunks for r in reports] for name, reports in results.items()}, args)


if __name__ == "__main__":
    main()
