"""A checkpoint is complete or it does not exist (issue 24, items 1 and 5): a damaged newest checkpoint is
skipped with one warning naming it and why, moved aside (kept), and the run resumes from the one before it
to the end; a damaged config.json is one clear error; a half-written metrics line is dropped; an interrupted
checkpoint write leaves nothing; a moved run folder resumes; `generate --lora` and `convert --merge-lora`
refuse an incomplete checkpoint before reading any weight.

One toy run (a 4x1 linear model, no DiT: the step compiles once for the module) of 3 steps, a checkpoint
each step, whose export writes the two LoRA files as the real stages do; each case damages a copy of it."""

import dataclasses
import glob
import json
import os
import re
import shutil

import numpy as np
import pytest
import safetensors.numpy
from test_trainer import toy_data, toy_loss, toy_start

from helios_jax import cli, demo, generate
from helios_jax.checkpoint import PipelineError
from helios_jax.config import ConfigError
from helios_jax.convert.lora_format import LORA_WEIGHTS, PARTIAL_WEIGHTS
from helios_jax.training import completeness, trainer as T
from helios_jax.video import PARTIALS_MADE

STEPS = 3


def export(trainable, folder):
    """The two files of a stage-1 export (their contents: the toy trainables)."""
    os.makedirs(folder, exist_ok=True)
    w = np.asarray(trainable["w"])
    safetensors.numpy.save_file({"lora_A": w}, os.path.join(folder, LORA_WEIGHTS))
    safetensors.numpy.save_file({"partial": 2 * w}, os.path.join(folder, PARTIAL_WEIGHTS))


STAGE = T.Stage(toy_loss, T.OptimizerConfig(learning_rate=1e-1), export=export)


def run_config(output_dir, **changes) -> T.RunConfig:
    settings = {"max_train_steps": STEPS, "checkpointing_steps": 1, "progress": False, **changes}
    return T.RunConfig(output_dir=str(output_dir), config={"output_dir": str(output_dir),
                                                           "training_config": {"learning_rate": 0.1}}, **settings)


def train(run: T.RunConfig, stage: T.Stage = STAGE):
    return T.train(run, stage, *toy_start(), iter(toy_data().to_iter_dataset()))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-step run and its metrics."""
    run = run_config(tmp_path_factory.mktemp("faults") / "run")
    train(run)
    return run.output_dir, T.read_metrics(run.output_dir)


def copy_of(finished, tmp_path) -> str:
    folder = str(tmp_path / "run")
    shutil.copytree(finished[0], folder)
    return folder


def test_every_checkpoint_is_complete_with_its_export_listed(finished):
    folder, records = finished
    assert [r["step"] for r in records] == [1, 2, 3]
    assert sorted(os.listdir(folder)) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "config.json",
                                         "metrics.jsonl"]
    for step in range(1, STEPS + 1):
        checkpoint = os.path.join(folder, f"checkpoint-{step}")
        assert {LORA_WEIGHTS, PARTIAL_WEIGHTS, "state", "data", "export"} <= set(os.listdir(checkpoint))
        with open(os.path.join(checkpoint, "export", "files.json")) as f:
            assert json.load(f) == {"files": [LORA_WEIGHTS, PARTIAL_WEIGHTS]}
        assert completeness.incomplete(checkpoint, ["state"]) is None


def _state_data(folder: str) -> list[str]:
    """The array files of checkpoint-3's state (tensorstore's ocdbt data)."""
    found = [p for p in glob.glob(os.path.join(folder, "checkpoint-3", "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(p)]
    assert found
    return found


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {
    "state data deleted": (lambda f: [os.remove(p) for p in _state_data(f)], "it does not restore"),
    "state data truncated": (lambda f: [_truncate(p) for p in _state_data(f)], "it does not restore"),
    "state _METADATA deleted": (lambda f: os.remove(f"{f}/checkpoint-3/state/_METADATA"), "state/_METADATA is missing"),
    "state folder deleted": (lambda f: shutil.rmtree(f"{f}/checkpoint-3/state"), "state/_METADATA is missing"),
    "grain state deleted": (lambda f: [os.remove(p) for p in glob.glob(f"{f}/checkpoint-3/data/*.json")],
                            r"it does not restore \(.*process_0-of-1.json"),
    "orbax commit file deleted": (lambda f: os.remove(f"{f}/checkpoint-3/_CHECKPOINT_METADATA"),
                                  "it has no _CHECKPOINT_METADATA"),
    "LoRA file deleted": (lambda f: os.remove(f"{f}/checkpoint-3/{LORA_WEIGHTS}"), f"{LORA_WEIGHTS} is missing"),
    "partial file truncated": (lambda f: _truncate(f"{f}/checkpoint-3/{PARTIAL_WEIGHTS}"),
                               f"{PARTIAL_WEIGHTS} is damaged"),
    "export list deleted": (lambda f: os.remove(f"{f}/checkpoint-3/export/files.json"), "its list of exported files, export/files.json, is missing"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint(finished, tmp_path, case):
    """checkpoint-3 damaged: one warning names it and why, it is moved to checkpoint-3.incomplete (kept), the run
    resumes from checkpoint-2 and runs step 3 again (a new metrics record) to the end: the new checkpoint-3 is
    complete and its LoRA is the uninterrupted run's, bit for bit (the resume is deterministic)."""
    damage, reason = DAMAGE[case]
    folder = copy_of(finished, tmp_path)
    original = safetensors.numpy.load_file(os.path.join(finished[0], "checkpoint-3", LORA_WEIGHTS))
    damage(folder)
    with pytest.warns(UserWarning) as caught:
        train(run_config(folder))
    skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(skipped) == 1 and re.search(rf"skipped {re.escape(folder)}/checkpoint-3: {reason}", skipped[0]), skipped
    assert skipped[0].endswith("moved it to checkpoint-3.incomplete")
    assert sorted(os.listdir(folder)) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-3.incomplete",
                                         "config.json", "metrics.jsonl"]
    records = T.read_metrics(folder)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[:2] == finished[1][:2] and records[2]["seconds"] != finished[1][2]["seconds"]  # step 3 ran again
    np.testing.assert_array_equal(
        safetensors.numpy.load_file(os.path.join(folder, "checkpoint-3", LORA_WEIGHTS))["lora_A"], original["lora_A"])
    assert completeness.incomplete(os.path.join(folder, "checkpoint-3"), ["state"]) is None


def test_an_empty_newer_checkpoint_folder_is_skipped(finished, tmp_path):
    """An empty checkpoint-9/ is skipped; orbax's temporary folder of a write a kill cut short is removed."""
    folder = copy_of(finished, tmp_path)
    os.mkdir(os.path.join(folder, "checkpoint-9"))
    os.makedirs(os.path.join(folder, "checkpoint-4.orbax-checkpoint-tmp", "state"))
    with pytest.warns(UserWarning, match=r"skipped .*checkpoint-9: it is empty; moved it to checkpoint-9.incomplete"):
        train(run_config(folder, max_train_steps=4))
    records = T.read_metrics(folder)
    assert records[:3] == finished[1] and [r["step"] for r in records] == [1, 2, 3, 4]  # resumed from checkpoint-3
    assert sorted(os.listdir(folder)) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4",
                                         "checkpoint-9.incomplete", "config.json", "metrics.jsonl"]


def test_a_named_incomplete_checkpoint_is_one_error(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    os.remove(os.path.join(folder, "checkpoint-2", LORA_WEIGHTS))
    with pytest.raises(ConfigError, match=rf"checkpoint-2 is incomplete: {LORA_WEIGHTS} is missing\. Use 'latest'"):
        train(run_config(folder, max_train_steps=4, resume_from_checkpoint="checkpoint-2"))
    assert "checkpoint-4" not in os.listdir(folder) and "checkpoint-2" in os.listdir(folder)


def test_no_complete_checkpoint_is_one_error_and_moves_nothing(finished, tmp_path):
    """A run is not started over by itself: with every checkpoint incomplete, resume is one error naming each."""
    folder = copy_of(finished, tmp_path)
    for step in range(1, STEPS + 1):
        os.remove(os.path.join(folder, f"checkpoint-{step}", "export", "files.json"))
    with pytest.raises(ConfigError, match=r"no complete checkpoint to resume from: checkpoint-3: .*; checkpoint-2: "
                                          r".*; checkpoint-1: .*\. Set resume_from_checkpoint to null"):
        train(run_config(folder, max_train_steps=4))
    assert sorted(os.listdir(folder)) == sorted(os.listdir(finished[0]))


def test_a_damaged_config_is_one_error_naming_the_file(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    _truncate(os.path.join(folder, "config.json"))
    before = sorted(os.listdir(folder))
    with pytest.raises(ConfigError, match=r"config\.json is damaged \(.*\): .* delete it to resume with this config"):
        train(run_config(folder, max_train_steps=4))
    assert sorted(os.listdir(folder)) == before


def test_a_half_written_metrics_line_is_dropped(finished, tmp_path):
    """What a kill during a metrics write leaves: read_metrics reads past it, and resume drops it."""
    folder = copy_of(finished, tmp_path)
    with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "loss": 0.1')
    assert T.read_metrics(folder) == finished[1]
    train(run_config(folder, max_train_steps=4))
    records = T.read_metrics(folder)
    assert records[:3] == finished[1] and [r["step"] for r in records] == [1, 2, 3, 4]


def test_a_moved_run_folder_resumes(finished, tmp_path):
    """output_dir is not part of the compared config: the copy resumes where it is, from checkpoint-3."""
    folder = copy_of(finished, tmp_path)
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["output_dir"] == finished[0]
    train(run_config(folder, max_train_steps=4))
    records = T.read_metrics(folder)
    assert records[:3] == finished[1] and [r["step"] for r in records] == [1, 2, 3, 4]


def test_an_interrupted_checkpoint_write_leaves_nothing(tmp_path):
    """Ctrl-C while checkpoint-2 is written (in its export): no checkpoint-2 of any name remains, nothing for the
    CLI to report as left, and checkpoint-1 is whole; the run then resumes from it to the end."""
    def interrupted(trainable, folder):
        if len(os.listdir(os.path.dirname(folder))) > 3:  # checkpoint-1 is there: this is checkpoint-2
            raise KeyboardInterrupt
        export(trainable, folder)

    run = run_config(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(run, dataclasses.replace(STAGE, export=interrupted))
    assert sorted(os.listdir(run.output_dir)) == ["checkpoint-1", "config.json", "metrics.jsonl"]
    assert not [p for p in PARTIALS_MADE if os.path.exists(p)]
    train(run)
    assert [r["step"] for r in T.read_metrics(run.output_dir)] == [1, 2, 3]
    assert all(completeness.incomplete(os.path.join(run.output_dir, f"checkpoint-{s}")) is None for s in (1, 2, 3))


def test_generate_and_merge_lora_refuse_an_incomplete_checkpoint(finished, tmp_path, capsys):
    """The LoRA-reading commands check the folder before any weight: an incomplete checkpoint (or its
    model_ema/) is one error naming what is missing; a complete one passes the check."""
    folder = copy_of(finished, tmp_path)
    os.remove(os.path.join(folder, "checkpoint-3", PARTIAL_WEIGHTS))
    bad = os.path.join(folder, "checkpoint-3")
    assert completeness.lora_folder_problem(os.path.join(folder, "checkpoint-2")) is None
    assert completeness.lora_folder_problem(os.path.join(bad, "model_ema")) is None  # not a folder: not checked
    os.mkdir(os.path.join(bad, "model_ema"))
    assert PARTIAL_WEIGHTS in completeness.lora_folder_problem(os.path.join(bad, "model_ema"))
    assert PARTIAL_WEIGHTS in completeness.lora_folder_problem(os.path.join(bad, LORA_WEIGHTS))

    args = cli.parser().parse_args(["generate", "--prompt", "a cat", "--lora", bad,
                                    "--output", str(tmp_path / "cat.mp4")])
    with pytest.raises(PipelineError, match=rf"--lora {re.escape(bad)} is an incomplete training checkpoint: "
                                            rf"{PARTIAL_WEIGHTS} is missing"):
        generate.prepare(args)

    base = demo.build_demo_checkpoint(tmp_path / "base")
    assert cli.main(["convert", base, str(tmp_path / "merged"), "--merge-lora", bad]) == 2
    err = capsys.readouterr().err
    assert f"error: --merge_lora {bad} is an incomplete training checkpoint: {PARTIAL_WEIGHTS} is missing" in err
    assert not os.path.exists(tmp_path / "merged")
