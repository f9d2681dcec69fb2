"""`make nano`: the whole nano Helios trained from nothing by the project's own commands, one step after another.

world -> `helios-jax train-vae` (the whole VAE from random weights) -> the base checkpoint -> `helios-jax offload`
-> stage 1 (`stage_1_init` with the anti-drifting context) -> stage 2 (`stage_2_post`, the pyramid) ->
`helios-jax offload-ode-pairs` from the stage-2 teacher -> stage 3a (`stage_3_ode`) -> stage 3b (`stage_3_post`,
DMD) -> the 2+2+2 student, shipped. Each training
stage runs `helios-jax train` on the official YAML with a nano overlay (``helios_jax/nano/configs/``: sizes and
lengths scaled down, the rest kept), and after it the LoRA is merged (`helios-jax convert --merge_lora`) into a
pipeline folder in the layout of the published checkpoint of that stage (Helios-Base, -Mid, -Distilled).

An interrupted `make nano` picks up where it stopped: a step that writes its folder whole (the world, a merge) is
skipped once its folder exists, and a command that continues its own work (training from its newest checkpoint, an
offload keeping the files it wrote) runs again and finishes. The seeds are fixed, so a rerun from nothing on the
same machine gives the same files. The wall time of each step's first run goes to ``RUN/times.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Callable

from helios_jax import cli, video
from helios_jax.nano import models, scoring, world

CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
CLIPS, SECTIONS = 256, 8  # training clips of 8 sections of 33 frames (the official minimum is 121 frames)
ODE_PROMPTS, ODE_SECTIONS = 64, 5  # the teacher's trajectories for stage 3a (5 sections: the official)
WORLD_SEED = 0
# Windows of 9 frames, ~1.2 s a step here. 5e-4, not 2e-3, and no decoder-only phase: at 2e-3 the encoder drops the
# object's colour early, and no decoder trained after it can bring it back (docs/nano.md, "Why the first VAE plateaued").
VAE_STEPS, VAE_BATCH, VAE_RATE = 1500, 4, 5e-4
EVAL_CAPTIONS, EVAL_CHUNKS = 4, 10
CARD = """---
library_name: helios-jax
tags: [video-generation, helios, toy-model]
---
# nano Helios (2+2+2 distilled)

A Helios trained end to end by helios-jax's own commands (`make nano`, helios_jax/nano/recipe.py) on a synthetic
world of one coloured shape moving at constant velocity and bouncing off the borders of a 64x64 frame
(helios_jax/nano/world.py; docs/nano.md). It is the default model of `helios-jax generate` and `make demo`.
It exists to check the paper's claims at toy scale and to be changed and retrained in about 70 minutes; it knows
nothing outside its world.

- **Model:** the Helios DiT at 6 layers x 128 wide (4 heads), the multi-term memory, the 3-stage pyramid; a Wan VAE
  with base width 8 trained on the world; a frozen random 2-layer UMT5 with one token per caption word, every
  caption encoded to 16 tokens (the tokenizer's `model_max_length`: helios-jax reads it; with diffusers, pass
  `max_sequence_length=16`).
- **Data:** {clips} clips of {frames} frames (seed 0), one caption each ("a red circle moves right on a dark blue
  background"); {ode} more captions (seed 1) for stage 3a's ODE pairs.
- **Recipe:** `helios-jax train-vae`, then stage 1 (`stage_1_init`: random drops, history corruption), stage 2
  (`stage_2_post`: the pyramid), stage 3a (`stage_3_ode`: ODE regression on the stage-2 teacher) and stage 3b
  (`stage_3_post`: DMD), each the official YAML with the overlay of helios_jax/nano/configs/ (sizes, lengths and
  learning rates scaled; the rest as published). No CFG anywhere: nothing trains an unconditional model.
- **Sampling:** `pyramid_num_inference_steps_list [2, 2, 2]`, guidance 1.0, `--is_amplify_first_chunk`.

## Wall time of each step (two CPU cores)

| step | seconds |
| --- | ---: |
{times}

Total: {total:.0f} minutes.

## Metrics

{captions} held-out captions, {chunks} chunks each, seed 0, scored by helios_jax/nano/metrics.py (means over the
videos of each video's summary; drifts are the last chunk's): {seconds:.2f} CPU seconds per chunk.

| metric | value |
| --- | ---: |
{metrics}

The wall times are those of the run that made this checkpoint, on two CPU cores shared with work beside it (the
claims study's second stage-1 run beside stage 1, its sampling beside stage 2, a DMD study beside stage 3b), so a
run alone is shorter. The VAE trained alone, in the second `make nano` run: this run reused it (the same seed and
recipe give the same file) and counts its time.

## What it cannot do

- **Colours and shapes.** Its VAE passes them (1500 steps, about 23 dB: the world's own clips through it name the
  right object colour in about two thirds of frames and the right shape in about three quarters, the ceiling row of
  docs/nano.md's table), but the DiT has learned them only in part: the prompted colour shows in about a third of
  frames and fades over a long video, the prompted shape in under half. Its DiT stages (2400, 500, 200 and 300
  steps) are the limit, not the VAE.
- **The prompted direction.** Objects appear in almost every frame and move at the world's speed, with a motion
  error close to the VAE's own, but seldom in the direction the caption says (one of the four held-out videos
  starts that way); after a prompt switch the colour follows and the shape does not.
- **Anything outside its world:** other sizes than 64x64, more than one object, words outside its 24-word
  vocabulary (they tokenize, but mean nothing to it), guidance (there is no unconditional model), images or videos
  as input (it was trained text-to-video only).
"""
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the recipe: the folder (or file) it writes under the run folder, and how. A ``resumable`` step
    is a command that continues its own work (a training run from its newest checkpoint, an offload keeping the
    files it wrote), so it runs again until it finishes; any other step writes its output whole, once."""

    name: str
    output: str
    run: Callable[[str], None]
    resumable: bool = False


def _command(*args: str) -> None:
    code = cli.main([str(a) for a in args])
    if code != 0:
        raise RuntimeError(f"`helios-jax {' '.join(map(str, args))}` failed with exit status {code}")


def merge(source: str, lora: str, destination: str, kind: str) -> None:
    """``source``'s pipeline with ``lora`` fused into its transformer, as a ``kind`` pipeline folder
    (models.PIPELINES: its model_index and scheduler), written whole or not at all."""
    staging = tempfile.mkdtemp(prefix=os.path.basename(destination) + ".partial-", dir=os.path.dirname(destination))
    try:
        _command("convert", os.path.join(source, "transformer"), os.path.join(staging, "transformer"),
                 "--to", "safetensors", "--merge_lora", lora)
        for name in ("vae", "text_encoder", "tokenizer"):
            shutil.copytree(os.path.join(source, name), os.path.join(staging, name))
        index, scheduler = models.PIPELINES[kind]
        os.makedirs(os.path.join(staging, "scheduler"))
        for path, value in (("model_index.json", index), ("scheduler/scheduler_config.json", scheduler)):
            with open(os.path.join(staging, path), "w", encoding="utf-8") as f:
                json.dump(value, f, indent=2, sort_keys=True)
        os.chmod(staging, 0o755)
        os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def train(official: str, overlay: str, out: str, quick: bool = False, **overrides: str) -> None:
    """`helios-jax train OFFICIAL nano/OVERLAY output_dir=OUT KEY=VALUE ...` (``quick``: 2 steps)."""
    values = {"output_dir": out, **overrides}
    if quick:
        values.update({"training_config.max_train_steps": 2, "training_config.checkpointing_steps": 2})
    _command("train", official, os.path.join(CONFIGS, overlay), *[f"{k}={v}" for k, v in values.items()])


def model_overrides(run: str, transformer: str) -> dict[str, str]:
    """A stage's model keys: the transformer of the pipeline folder ``transformer``, the VAE and text encoder of
    the run's base."""
    return {"model_config.pretrained_model_name_or_path": os.path.join(run, "base"),
            "model_config.transformer_model_name_or_path": transformer, "model_config.subfolder": "transformer"}


def train_stage_1(run: str, out: str, quick: bool = False, **overrides: str) -> None:
    """Stage 1 of the run folder ``run`` into ``out``, from its base and latents; ``overrides``: keys changed
    beyond the overlay (the claims study's run without the anti-drifting context)."""
    train("stage_1_init", "stage_1.yaml", out, quick, **model_overrides(run, os.path.join(run, "base")),
          **{"data_config.instance_data_root": f"[{os.path.join(run, 'latents')}]"}, **overrides)


def train_stage_3b(run: str, out: str, quick: bool = False, **overrides: str) -> None:
    """Stage 3b (DMD) of the run folder ``run`` into ``out``: its stage-3a student against its stage-1 model as the
    real score; ``overrides``: keys changed beyond the overlay (the DMD study's learning rates)."""
    train("stage_3_post", "stage_3_post.yaml", out, quick, **model_overrides(run, os.path.join(run, "ode-model")),
          **{"model_config.real_score_model_name_or_path": os.path.join(run, "stage1"),
             "data_config.gan_data_root": f"[{os.path.join(run, 'latents')}]"}, **overrides)


def final_checkpoint(run_folder: str) -> str:
    """The newest ``checkpoint-N`` folder of a training run."""
    steps = [int(n.split("-")[1]) for n in os.listdir(run_folder) if n.startswith("checkpoint-") and n[11:].isdigit()]
    return os.path.join(run_folder, f"checkpoint-{max(steps)}")


def steps(run: str, quick: bool = False) -> list[Step]:
    """The recipe, in order, for the run folder ``run``; ``quick``: every step at its smallest (2 training
    steps, 8 clips, 8 ODE prompts), a check of the wiring in minutes."""
    def p(*names: str) -> str:
        return os.path.join(run, *names)

    size = ["--height", str(models.HEIGHT), "--width", str(models.WIDTH)]

    def model(folder: str) -> dict[str, str]:
        return model_overrides(run, folder)

    def vae_config(out: str) -> None:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        video.write_text(out, json.dumps(dataclasses.asdict(models.VAE)), ".json")

    return [
        Step("world", p("world"), lambda out: world.write_dataset(
            out, world.sample_scenes(8 if quick else CLIPS, WORLD_SEED), 33 * SECTIONS)),
        Step("vae config", p("vae-config", "config.json"), vae_config),
        Step("vae", p("vae-run"), lambda out: _command(
            "train-vae", p("world", "meta.json"), "--output", out, "--config", p("vae-config", "config.json"),
            "--steps", 2 if quick else VAE_STEPS, "--batch", VAE_BATCH, "--frames", 9, "--learning_rate", VAE_RATE,
            "--seed", WORLD_SEED), resumable=True),
        Step("base", p("base"), lambda out: models.build_base(out, p("vae-run", "vae"))),
        Step("offload", p("latents"), lambda out: _command(
            "offload", p("world", "meta.json"), "--checkpoint", p("base"), "--output", out, *size), resumable=True),
        Step("stage 1", p("stage_1"), lambda out: train_stage_1(run, out, quick), resumable=True),
        Step("stage 1 model", p("stage1"), lambda out: merge(p("base"), final_checkpoint(p("stage_1")), out, "base")),
        Step("stage 2", p("stage_2"), lambda out: train(
            "stage_2_post", "stage_2.yaml", out, quick, **model(p("stage1")),
            **{"data_config.instance_data_root": f"[{p('latents')}]"}), resumable=True),
        Step("stage 2 model", p("mid"), lambda out: merge(p("stage1"), final_checkpoint(p("stage_2")), out, "mid")),
        Step("ode prompts", p("ode-prompts.txt"), lambda out: world.write_prompts(
            out, world.sample_scenes(8 if quick else ODE_PROMPTS, WORLD_SEED + 1))),
        Step("ode pairs", p("ode"), lambda out: _command(
            "offload-ode-pairs", p("mid"), p("ode-prompts.txt"), out, *size, "--sections", ODE_SECTIONS,
            "--cfg", "1.0", "--dtype", "fp32", "--seed", WORLD_SEED), resumable=True),
        Step("stage 3a", p("stage_3_ode"), lambda out: train(
            "stage_3_ode", "stage_3_ode.yaml", out, quick, **model(p("mid")),
            **{"data_config.ode_data_root": f"[{p('ode')}]"}), resumable=True),
        Step("stage 3a model", p("ode-model"), lambda out: merge(
            p("mid"), os.path.join(final_checkpoint(p("stage_3_ode")), "model_ema"), out, "distilled")),
        Step("stage 3b", p("stage_3_post"), lambda out: train_stage_3b(run, out, quick), resumable=True),
        Step("distilled", p("distilled"), lambda out: merge(
            p("ode-model"), os.path.join(final_checkpoint(p("stage_3_post")), "model_ema"), out, "distilled")),
        Step("evaluation", p("evaluation.json"), lambda out: evaluate_student(p("distilled"), out)),
    ]


def evaluate_student(folder: str, out: str) -> None:
    """The student's metrics on held-out captions (the model card's table and the regression test's bounds)."""
    captions = scoring.held_out_captions(EVAL_CAPTIONS)
    reports, seconds = scoring.sample_and_score(scoring.load(folder), captions, chunks=EVAL_CHUNKS,
                                                **scoring.STUDENT_CALL)
    record = {"captions": captions, "chunks": EVAL_CHUNKS, "seed": 0, "cpu_seconds_per_chunk": seconds,
              "mean": scoring.mean_summary(reports), "videos": [r.summary for r in reports]}
    video.write_text(out, json.dumps(record, indent=1) + "\n", ".json")


def model_card(run: str) -> str:
    """The shipped checkpoint's README: what it is, its data and recipe, its metrics, its limits."""
    times = json.load(open(os.path.join(run, "times.json")))
    evaluation = json.load(open(os.path.join(run, "evaluation.json")))
    rows = "\n".join(f"| {name} | {seconds:.0f} |" for name, seconds in times.items())
    metric_rows = "\n".join(f"| {k} | {v:.3g} |" for k, v in evaluation["mean"].items())
    return CARD.format(clips=CLIPS, frames=33 * SECTIONS, ode=ODE_PROMPTS, times=rows, total=sum(times.values()) / 60,
                       captions=len(evaluation["captions"]), chunks=evaluation["chunks"], metrics=metric_rows,
                       seconds=evaluation["cpu_seconds_per_chunk"])


def reproduce(run: str, quick: bool = False) -> dict[str, float]:
    """Run every step not yet done; returns (and writes to ``run/times.json``) each step's seconds."""
    os.makedirs(run, exist_ok=True)
    times_path = os.path.join(run, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for step in steps(os.path.abspath(run), quick):
        if os.path.exists(step.output) and not step.resumable:
            continue
        _log.info("nano: %s -> %s", step.name, step.output)
        start = time.perf_counter()
        step.run(step.output)
        times.setdefault(step.name, round(time.perf_counter() - start, 1))
        video.write_text(times_path, json.dumps(times, indent=1) + "\n", ".json")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helios_jax.nano.recipe", description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="nano-run", help="the folder of every step's output (default: nano-run)")
    parser.add_argument("--quick", action="store_true", help="every step at its smallest: a check of the wiring")
    parser.add_argument("--ship", action="store_true", help=f"then copy the student to {models.CHECKPOINT}")
    args = parser.parse_args(argv)
    cli.configure_logging("INFO")
    times = reproduce(args.run, args.quick)
    print("| step | seconds |\n| --- | ---: |")
    for name, seconds in times.items():
        print(f"| {name} | {seconds} |")
    print(f"| total | {sum(times.values()):.0f} |")
    if args.ship:
        staging = models.CHECKPOINT + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(os.path.join(args.run, "distilled"), staging)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(args.run))
        shutil.rmtree(models.CHECKPOINT, ignore_errors=True)
        os.rename(staging, models.CHECKPOINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
