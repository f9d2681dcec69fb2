"""What DMD (stage 3b) does to the nano student at each generator learning rate, on a finished `make nano` run.

    python -m experiments.studies.dmd_rate --run nano-run [--rates 1e-4 2e-5] [--results]

Stage 3b is trained again from the run's stage-3a student (RUN/ode-model) at each rate, the critic at a fifth of it
(the official ratio, 2e-6 / 4e-7), the rest as the recipe's overlay (300 steps, the EMA merged), into
RUN/dmd-rates/ unless it is there. Every student, the stage-3a one and the run's own distilled/ included, samples
the same held-out captions (2+2+2, the first chunk amplified) and is scored by `helios_jax.nano.metrics`.
Measured on this machine's CPU; the table goes to experiments/RESULTS.md with `--results`.
"""

from __future__ import annotations

import argparse
import os

from experiments import paths, provenance, reporting
from helios_jax.nano import recipe, scoring

COLUMNS = ("presence", "colour_accuracy", "shape_accuracy", "background_accuracy", "motion_error", "speed",
           "background_error", "join_ratio")


def student(run: str, rate: str) -> str:
    """The run's stage-3a student after 300 DMD steps at ``rate``, merged as the recipe merges stage 3b."""
    folder = os.path.join(run, "dmd-rates", f"distilled-{rate}")
    if not os.path.isdir(folder):
        out = os.path.join(run, "dmd-rates", f"stage_3_post-{rate}")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        recipe.train_stage_3b(run, out, **{"training_config.learning_rate": rate,
                                           "training_config.critic_learning_rate": f"{float(rate) / 5:g}"})
        recipe.merge(os.path.join(run, "ode-model"), os.path.join(recipe.final_checkpoint(out), "model_ema"), folder,
                     "distilled")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.studies.dmd_rate", description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="nano-run", help="a finished `make nano` run folder")
    parser.add_argument("--rates", nargs="+", default=["1e-4", "2e-5"], help="generator learning rates to retrain at")
    parser.add_argument("--prompts", type=int, default=4, help="held-out captions")
    parser.add_argument("--chunks", type=int, default=10, help="chunks per video")
    parser.add_argument("--results", nargs="?", const=paths.RESULTS, help="append the table to RESULTS.md")
    parser.add_argument("--json", help="write the per-video summaries here")
    args = parser.parse_args(argv)
    run = os.path.abspath(args.run)
    rows_of = [("stage 3a only (ODE regression)", os.path.join(run, "ode-model")),
               ("DMD at the recipe's rate (the run's distilled/)", os.path.join(run, "distilled")),
               *[(f"DMD at {rate}", student(run, rate)) for rate in args.rates]]
    captions = scoring.held_out_captions(args.prompts)
    rows, result = [], {}
    for name, folder in rows_of:
        reports, seconds = scoring.sample_and_score(scoring.load(folder), captions, chunks=args.chunks,
                                                    **scoring.STUDENT_CALL)
        mean = scoring.mean_summary(reports)
        result[name] = [r.summary for r in reports]
        rows.append([name, *[mean[k] for k in COLUMNS]])
    body = (f"{args.prompts} held-out captions x {args.chunks} chunks, seed 0, 2+2+2 with the first chunk amplified, "
            f"run {args.run}; 300 DMD steps from the same stage-3a student each\n\n")
    body += reporting.markdown_table(["student", *COLUMNS], rows)
    reporting.report("Nano Helios: DMD's learning rate (experiments/studies/dmd_rate.py)",
                     provenance.jax_environment("flax"), body, result, args)


if __name__ == "__main__":
    main()
