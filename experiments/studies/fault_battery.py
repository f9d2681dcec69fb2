"""How `helios-jax` fails: a battery of damaged inputs and full disks, each classified from the outside.

Issue 24 asks for one table before and after its fixes: how many faults end as a **clear** error (exit 2, one
`helios-jax CMD: error:` line, no traceback, nothing new left behind), **ok** (exit 0 and the expected result, where
the fault is one the command should survive), **traceback** (any other exit, or a traceback printed), **accepted
wrongly** (exit 0 where an error was due), **lost** (an error, but files left behind: a partial file, or a
checkpoint folder without its LoRA export), and **refused wrongly** (a clean exit 2 where the command should have
survived the fault, as a read-only compile cache).

Each case is a fresh `helios-jax` process on tiny inputs: the embedded demo checkpoint (built into the workspace),
two synthetic 121-frame clips, the official stage-1 YAML with tiny overrides. A setup function damages a copy of
what the command reads; a full disk is simulated in the child (its writer fails as that library fails on ENOSPC),
since no tiny file system can be mounted without root. The baselines run first (offload, train, generate with the
trained LoRA, convert fusing it) and give the later cases their inputs. The baseline train run (two steps, a
checkpoint after each) is the run folder the resume cases copy elsewhere, damage (its latest checkpoint, its
config.json or metrics.jsonl) and resume for a third step: each should go on from the newest complete checkpoint,
a damaged one set aside as ``checkpoint-STEP.incomplete`` with a warning (such a folder is not counted as lost).
The train children share one persistent XLA cache (``JAX_COMPILATION_CACHE_DIR``, set unless already set), so the
train step compiles once per tree rather than once per case.

    python -m experiments.studies.fault_battery [--label after] [--only WORD ...] [--keep DIR | --reuse DIR]

The 4 baselines and 47 faults took 8 minutes on 2 cores, as two processes side by side (the baselines and the
first 24 faults 420 s; the 23 later ones 352 s beside them, on the workspace the first kept). ``--reuse`` a
workspace kept by an earlier run to skip the baselines.

A "before" tree runs with its own ``helios_jax`` first on PYTHONPATH (and its ``convert/`` and ``kernels/`` as
``helios_jax.convert`` / ``helios_jax.kernels``: the editable install maps those two to this checkout's otherwise),
this module from this checkout. Its resume cases need a run folder that tree's trainer wrote (main's config.json
has keys an older schema does not know), so it reuses a workspace whose ``case-01`` is its own baseline train run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

from experiments import processes, provenance, reporting
from experiments.paths import RESULTS, ROOT

# The shipped official stage-1 YAML, by its path in this checkout: a "before" tree's helios_jax (on PYTHONPATH)
# may predate finding it by its name, ``stage_1_init`` (67c24ea kept it as a test fixture, byte-identical).
OFFICIAL_YAML = os.path.join(ROOT, "helios_jax", "training", "configs", "stage_1_init.yaml")
PIXELS, FRAMES = 64, 121  # latents of 8 x 8, the official minimum clip length
SMALL = ["--height", "64", "--width", "64", "--num_frames", "40", "--pyramid_num_inference_steps_list", "1", "1", "1"]
CLASSES = ("clear", "ok", "traceback", "accepted wrongly", "lost", "refused wrongly")
NO_SPACE = "No space left on device"
LORA_FILE, PARTIAL_FILE = "pytorch_lora_weights.safetensors", "transformer_partial.safetensors"
RESUMED = 3  # a resumed run's max_train_steps: one step past the baseline's two
# The child: an optional simulated full disk, then the command line as `helios-jax` runs it.
CHILD = ("import sys\n"
         "from experiments.studies import fault_battery\n"
         "fault_battery.inject(sys.argv.pop(1))\n"
         "from helios_jax.cli import main\n"
         "sys.exit(main())\n")


# ----------------------------------------------------------------------------------------- simulated faults

def inject(kind: str) -> None:
    """Make this process's writes of ``kind`` fail as a full disk makes them fail ("none": nothing)."""
    if kind == "none":
        return
    if kind in ("safetensors", "lora-export"):
        import safetensors
        import safetensors.numpy

        def save_file(tensors, path, *args, **kwargs):
            name = os.path.basename(path)
            if kind == "lora-export" and "lora" not in name and "transformer_partial" not in name:
                return original(tensors, path, *args, **kwargs)
            with open(path, "wb") as f:
                f.write(b"partial")
            raise safetensors.SafetensorError(
                f'Error while serializing: IoError(Os {{ code: 28, kind: StorageFull, message: "{NO_SPACE}" }})')

        original = safetensors.numpy.save_file
        safetensors.numpy.save_file = save_file
    elif kind in ("orbax-checkpoint", "orbax-params"):
        import orbax.checkpoint as ocp

        owner = ocp.CheckpointManager if kind == "orbax-checkpoint" else ocp.StandardCheckpointer

        def save(self, first, *args, **kwargs):
            folder = (os.path.join(os.fspath(self.directory), f"checkpoint-{first}") if kind == "orbax-checkpoint"
                      else os.fspath(first))
            os.makedirs(folder + ".orbax-checkpoint-tmp-0", exist_ok=True)
            raise ValueError(f"RESOURCE_EXHAUSTED: Error writing local file: {NO_SPACE} [OS error: {NO_SPACE}]")

        owner.save = save
    elif kind == "mp4":
        import av

        opened = av.open

        class Full:
            def __init__(self, container):
                self.container = container

            def __getattr__(self, name):
                return getattr(self.container, name)

            def mux(self, packet):
                raise OSError(28, NO_SPACE)

        av.open = lambda *a, **k: Full(opened(*a, **k)) if "w" in a else opened(*a, **k)
    else:
        raise ValueError(f"unknown fault {kind!r}")


# ----------------------------------------------------------------------------------------------- workspace

@dataclasses.dataclass
class Workspace:
    """The shared inputs; the baselines fill in the data, the LoRA and the orbax transformer."""

    root: str
    checkpoint: str = ""
    metadata: str = ""
    data: str = ""
    lora: str = ""
    orbax: str = ""


def build_workspace(root: str) -> Workspace:
    import numpy as np

    from helios_jax.demo import TRANSFORMER, build_demo_checkpoint
    from helios_jax.video import write_mp4

    ws = Workspace(root)
    ws.checkpoint = build_demo_checkpoint(os.path.join(root, "ckpt"),
                                          transformer=dataclasses.replace(TRANSFORMER, is_amplify_history=False))
    os.makedirs(os.path.join(root, "videos"))
    rng = np.random.default_rng(0)
    meta = []
    for c in range(2):
        frames = np.zeros((FRAMES, PIXELS, PIXELS, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        for t in range(FRAMES):  # a square moving right
            frames[t, 20:36, (t // 4) % 48:(t // 4) % 48 + 16] = 255
        write_mp4(os.path.join(root, "videos", f"clip{c}.mp4"), frames)
        meta.append({"path": f"videos/clip{c}.mp4", "cut": [0, FRAMES], "crop": [0, PIXELS, 0, PIXELS],
                     "cap": [f"a square {c} moving"]})
    ws.metadata = os.path.join(root, "meta.json")
    with open(ws.metadata, "w") as f:
        json.dump(meta, f)
    return ws


def train_args(ws: Workspace, out: str, data: str | None = None, **extra: str) -> list[str]:
    values = {
        "output_dir": out, "data_config.instance_data_root": f"[{data or ws.data}]",
        "data_config.single_height": PIXELS, "data_config.single_width": PIXELS,
        "model_config.pretrained_model_name_or_path": ws.checkpoint,
        "model_config.transformer_model_name_or_path": ws.checkpoint, "model_config.subfolder": "transformer",
        "model_config.lora_rank": 4, "model_config.lora_alpha": 4.0,
        "training_config.max_train_steps": 2, "training_config.checkpointing_steps": 2,
        "training_config.train_batch_size": 2, "validation_config.first_step_valid": "false",
        "validation_config.validation_steps": 1000, **extra,
    }
    return ["train", OFFICIAL_YAML, *[f"{k}={v}" for k, v in values.items()]]


# -------------------------------------------------------------------------------------------------- cases

@dataclasses.dataclass(frozen=True)
class Case:
    """One fault: ``setup(ws, folder)`` damages a copy of something under ``folder`` and returns the command line;
    ``error`` says whether an error is due; ``result(ws, folder)`` whether a run that exits 0 did its work;
    ``clean``: a failed train must leave nothing new either (a config or data error is due before the run
    folder is made; other train errors may leave their metrics)."""

    name: str
    command: str
    setup: Callable[[Workspace, str], list[str]]
    error: bool
    fault: str = "none"
    result: Callable[[Workspace, str], bool] = lambda ws, folder: True
    env: Callable[[Workspace, str], dict[str, str]] = lambda ws, folder: {}
    after: Callable[[Workspace, str], None] = lambda ws, folder: None
    clean: bool = False


def _copy_data(ws: Workspace, folder: str) -> str:
    data = os.path.join(folder, "data")
    shutil.copytree(ws.data, data)
    return data


def _clip(data: str) -> str:
    return os.path.join(data, sorted(n for n in os.listdir(data) if n.endswith(".safetensors"))[0])


def _nan_clip(ws: Workspace, folder: str) -> list[str]:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: the prompt embedding is bf16)
    from safetensors.numpy import load_file, save_file

    data = _copy_data(ws, folder)
    tensors = load_file(_clip(data))
    tensors["vae_latent"][..., 0, 0] = float("nan")
    save_file(tensors, _clip(data), metadata={"format": "helios-jax offload 1", "prompt_raw": "a"})
    return train_args(ws, os.path.join(folder, "out"), data)


def _truncated(path: str, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _truncated_clip(ws: Workspace, folder: str) -> list[str]:
    data = _copy_data(ws, folder)
    _truncated(_clip(data))
    return train_args(ws, os.path.join(folder, "out"), data)


def _lora_copy(ws: Workspace, folder: str, damage: str) -> str:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    from safetensors.numpy import load_file, save_file

    lora = os.path.join(folder, "lora")
    os.makedirs(lora)
    target = os.path.join(lora, "pytorch_lora_weights.safetensors")
    shutil.copy(os.path.join(ws.lora, "pytorch_lora_weights.safetensors"), target)
    if damage == "truncate":
        _truncated(target)
    elif damage in ("shape", "nan"):
        tensors = load_file(target)
        key = sorted(tensors)[0]
        tensors[key] = tensors[key][..., :-1] if damage == "shape" else tensors[key] * float("nan")
        save_file(tensors, target)
    return lora


def _damaged_orbax(ws: Workspace, folder: str) -> str:
    copy = os.path.join(folder, "transformer")
    shutil.copytree(ws.orbax, copy)
    data = max((os.path.join(d, f) for d, _, fs in os.walk(copy) for f in fs), key=os.path.getsize)
    _truncated(data, 0.1)
    return copy


def _corrupt_video(ws: Workspace, folder: str, how: str) -> list[str]:
    videos = os.path.join(folder, "videos")
    shutil.copytree(os.path.join(ws.root, "videos"), videos)
    shutil.copy(ws.metadata, os.path.join(folder, "meta.json"))
    video = os.path.join(videos, "clip1.mp4")
    if how == "garbage":
        with open(video, "wb") as f:
            f.write(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    else:
        _truncated(video, 0.4)
    return offload_args(ws, os.path.join(folder, "meta.json"), os.path.join(folder, "data"))


def _bad_clip(ws: Workspace, folder: str, how: str) -> list[str]:
    """A copy of the offloaded data with one clip damaged ``how``; the train command that reads it."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    from safetensors.numpy import load_file, save_file

    data = _copy_data(ws, folder)
    clip = _clip(data)
    if how == "empty":
        open(clip, "wb").close()
    elif how == "garbage":
        with open(clip, "wb") as f:
            f.write(os.urandom(os.path.getsize(os.path.join(ws.data, os.path.basename(clip)))))
    else:
        tensors = load_file(clip)
        if how == "no prompt_embed":
            del tensors["prompt_embed"]
        elif how == "8 channels":
            tensors["vae_latent"] = tensors["vae_latent"][:, :8].copy()
        elif how == "32 wide":
            tensors["prompt_embed"] = tensors["prompt_embed"][..., :32].copy()
        save_file(tensors, clip, metadata={"format": "helios-jax offload 1", "prompt_raw": "a"})
    return train_args(ws, os.path.join(folder, "out"), data)


def _run_copy(ws: Workspace, folder: str, moved: bool = False) -> str:
    """The baseline train run's folder (checkpoint-1 and checkpoint-2, config.json, metrics.jsonl), copied to
    another place: a run folder ``moved`` there, else one as if it had run there (its config.json's output_dir
    the copy's), so that the damage, not the move, is what a resume meets."""
    out = os.path.join(folder, "moved", "out")
    shutil.copytree(os.path.dirname(ws.lora), out)
    if not moved:
        path = os.path.join(out, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["output_dir"] = out
        with open(path, "w") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True))
    return out


def _state_data(run: str) -> str:
    """The latest checkpoint's largest state data file (ocdbt's, in a ``d/`` folder under ``state/``)."""
    return max((os.path.join(d, n) for d, _, names in os.walk(os.path.join(run, "checkpoint-2", "state"))
                if os.path.basename(d) == "d" for n in names), key=os.path.getsize)


def _half_metrics_line(run: str) -> None:
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 0.12')


def _grain_state(run: str) -> None:
    data = os.path.join(run, "checkpoint-2", "data")
    for name in os.listdir(data):
        if name.endswith(".json"):
            os.remove(os.path.join(data, name))


def _resume(damage: Callable[[str], None] | None) -> Callable[[Workspace, str], list[str]]:
    """A setup: a copy of the baseline's run folder, damaged by ``damage(run)`` (None: the folder moved, not
    damaged), resumed from ``latest`` for one more step."""
    def setup(ws: Workspace, folder: str) -> list[str]:
        run = _run_copy(ws, folder, moved=damage is None)
        if damage is not None:
            damage(run)
        return train_args(ws, run, **{"training_config.resume_from_checkpoint": "latest",
                                      "training_config.max_train_steps": RESUMED,
                                      "training_config.checkpointing_steps": 1})
    return setup


def _resumed(ws: Workspace, folder: str) -> bool:
    """The resumed run went on from a complete checkpoint: every ``checkpoint-STEP`` has its LoRA, the last is
    step RESUMED, and ``metrics.jsonl`` holds whole lines, one per step, 1..RESUMED (none twice: a run started
    over from step 0, or a half line kept, shows here)."""
    run = os.path.join(folder, "moved", "out")
    names = [n for n in os.listdir(run) if re.fullmatch(r"checkpoint-\d+", n)]
    if f"checkpoint-{RESUMED}" not in names or any(not os.path.isfile(os.path.join(run, n, LORA_FILE))
                                                    for n in names):
        return False
    try:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            text = f.read()
        steps = [json.loads(line)["step"] for line in text.splitlines() if line.strip()]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return text.endswith("\n") and steps == list(range(1, RESUMED + 1))


def _checkpoint_without(ws: Workspace, folder: str, name: str) -> str:
    """A copy of the baseline's last checkpoint folder without its file ``name``."""
    copy = os.path.join(folder, "run", os.path.basename(ws.lora))
    shutil.copytree(ws.lora, copy)
    os.remove(os.path.join(copy, name))
    return copy


def offload_args(ws: Workspace, metadata: str, out: str) -> list[str]:
    return ["offload", metadata, "--checkpoint", ws.checkpoint, "--output", out, "--height", str(PIXELS),
            "--width", str(PIXELS)]


def generate_args(ws: Workspace, folder: str, *extra: str) -> list[str]:
    return ["generate", "--checkpoint", ws.checkpoint, "--output", os.path.join(folder, "video.mp4"), *SMALL,
            "--no_compilation_cache", *extra]


def _csv(folder: str, rows: str) -> str:
    path = os.path.join(folder, "prompts.csv")
    with open(path, "w") as f:
        f.write("id,prompt_index,prompt\n" + rows)
    return path


def _stale_partial(ws: Workspace, folder: str) -> list[str]:
    dead = subprocess.Popen(["true"])
    dead.wait()
    open(os.path.join(folder, f".partial-{socket.gethostname()}-{dead.pid}-x.mp4"), "wb").close()
    return generate_args(ws, folder)


def _no_partials(folder: str) -> bool:
    return not any(".partial" in n for _, dirs, names in os.walk(folder) for n in dirs + names)


def _baseline_offload(ws: Workspace, folder: str) -> list[str]:
    ws.data = os.path.join(folder, "data")
    return offload_args(ws, ws.metadata, ws.data)


def _baseline_train(ws: Workspace, folder: str) -> list[str]:
    ws.lora = os.path.join(folder, "out", "checkpoint-2")  # checkpoint-1 too: the resume cases fall back to it
    return train_args(ws, os.path.join(folder, "out"), **{"training_config.checkpointing_steps": 1})


def _baseline_convert(ws: Workspace, folder: str) -> list[str]:
    ws.orbax = os.path.join(folder, "transformer")
    return ["convert", os.path.join(ws.checkpoint, "transformer"), ws.orbax, "--merge_lora", ws.lora]


BASELINES = 4  # the first cases of CASES
CASES = (
    # the baselines, in this order: each gives the later cases an input
    Case("offload: baseline", "offload", _baseline_offload, error=False,
         result=lambda ws, f: len(os.listdir(ws.data)) == 2),
    Case("train: baseline", "train", _baseline_train, error=False,
         result=lambda ws, f: all(os.path.isfile(os.path.join(ws.lora, "..", c, LORA_FILE))
                                  for c in ("checkpoint-1", "checkpoint-2"))),
    Case("generate --lora: baseline", "generate", lambda ws, f: generate_args(ws, f, "--lora", ws.lora), error=False,
         result=lambda ws, f: os.path.isfile(os.path.join(f, "video.mp4"))),
    Case("convert --merge_lora: baseline", "convert", _baseline_convert, error=False,
         result=lambda ws, f: os.path.isdir(ws.orbax)),
    # offload
    Case("offload: a corrupt mp4", "offload", lambda ws, f: _corrupt_video(ws, f, "garbage"), error=True),
    Case("offload: a truncated mp4", "offload", lambda ws, f: _corrupt_video(ws, f, "truncate"), error=True),
    Case("offload: disk full (safetensors)", "offload",
         lambda ws, f: offload_args(ws, ws.metadata, os.path.join(f, "data")), error=True, fault="safetensors"),
    Case("offload: metadata with a typo key", "offload", lambda ws, f: _typo_metadata(ws, f), error=True),
    # train
    Case("train: disk full during a checkpoint", "train", lambda ws, f: train_args(ws, os.path.join(f, "out")),
         error=True, fault="orbax-checkpoint"),
    Case("train: disk full during the LoRA export", "train", lambda ws, f: train_args(ws, os.path.join(f, "out")),
         error=True, fault="lora-export"),
    Case("train: NaN in a clip's latents", "train", _nan_clip, error=True),
    Case("train: a truncated clip file", "train", _truncated_clip, error=True),
    Case("train: a typo in an override key", "train",
         lambda ws, f: train_args(ws, os.path.join(f, "out"), **{"training_config.max_train_step": 2}), error=True),
    Case("train: a typo in a YAML value", "train",
         lambda ws, f: train_args(ws, os.path.join(f, "out"), **{"training_config.lr_scheduler": "constnat"}),
         error=True),
    Case("train: an empty data folder", "train",
         lambda ws, f: train_args(ws, os.path.join(f, "out"), _empty(f)), error=True),
    # generate
    Case("generate --lora: a truncated LoRA", "generate",
         lambda ws, f: generate_args(ws, f, "--lora", _lora_copy(ws, f, "truncate")), error=True),
    Case("generate --lora: a wrong-shape LoRA", "generate",
         lambda ws, f: generate_args(ws, f, "--lora", _lora_copy(ws, f, "shape")), error=True),
    Case("generate --lora: a NaN LoRA", "generate",
         lambda ws, f: generate_args(ws, f, "--lora", _lora_copy(ws, f, "nan")), error=True),
    Case("generate: disk full (mp4)", "generate", lambda ws, f: generate_args(ws, f), error=True, fault="mp4"),
    Case("generate: CSV with more prompts than chunks", "generate",
         lambda ws, f: generate_args(ws, f, "--interactive_prompt_csv_path",
                                     _csv(f, '0,0,"a"\n0,1,"b"\n0,2,"c"\n'), "--interpolate_time", "1"),
         error=True),
    Case("generate: CSV with interpolation_steps 1", "generate",
         lambda ws, f: generate_args(ws, f, "--interactive_prompt_csv_path", _csv(f, '0,0,"a"\n0,1,"b"\n'),
                                     "--interpolate_time", "1", "--use_interpolate_prompt",
                                     "--interpolation_steps", "1"), error=True),
    Case("generate: pallas on head_dim 32", "generate", lambda ws, f: generate_args(ws, f, "--attention", "pallas"),
         error=True),
    Case("generate: a read-only compile cache", "generate",
         lambda ws, f: [a for a in generate_args(ws, f) if a != "--no_compilation_cache"], error=False,
         env=lambda ws, f: {"XDG_CACHE_HOME": _file(f, "cache")},
         result=lambda ws, f: os.path.isfile(os.path.join(f, "video.mp4"))),
    Case("generate: a stale partial of a killed run", "generate", _stale_partial, error=False,
         result=lambda ws, f: os.path.isfile(os.path.join(f, "video.mp4")) and _no_partials(f)),
    # convert
    Case("convert --merge_lora: a truncated LoRA", "convert",
         lambda ws, f: ["convert", os.path.join(ws.checkpoint, "transformer"), os.path.join(f, "out"),
                        "--merge_lora", _lora_copy(ws, f, "truncate")], error=True),
    Case("convert --merge_lora: disk full (orbax)", "convert",
         lambda ws, f: ["convert", os.path.join(ws.checkpoint, "transformer"), os.path.join(f, "out"),
                        "--merge_lora", ws.lora], error=True, fault="orbax-params"),
    Case("convert: damaged orbax params to safetensors", "convert",
         lambda ws, f: ["convert", _damaged_orbax(ws, f), os.path.join(f, "out"), "--to", "safetensors"],
         error=True),
    Case("convert: disk full (safetensors)", "convert",
         lambda ws, f: ["convert", ws.orbax, os.path.join(f, "out"), "--to", "safetensors"], error=True,
         fault="safetensors"),
    # train resume: the baseline's run folder moved, its latest checkpoint (checkpoint-2) damaged, resumed with
    # resume_from_checkpoint=latest to step RESUMED: each should go on from checkpoint-1 (the damaged folder set
    # aside, with a warning), except a damaged config.json (whose config the run was: a clear error)
    *(Case(f"train resume: {name}", "train", _resume(damage), error=False, result=_resumed) for name, damage in (
        ("the run folder moved", None),
        ("a deleted state data file", lambda run: os.remove(_state_data(run))),
        ("a truncated state data file", lambda run: _truncated(_state_data(run))),
        ("a deleted state/_METADATA", lambda run: os.remove(os.path.join(run, "checkpoint-2", "state", "_METADATA"))),
        ("a deleted grain state (data item)", _grain_state),
        ("a deleted state/ folder", lambda run: shutil.rmtree(os.path.join(run, "checkpoint-2", "state"))),
        ("an empty newer checkpoint-9/", lambda run: os.makedirs(os.path.join(run, "checkpoint-9"))),
        ("a half-written last line in metrics.jsonl", _half_metrics_line),
        (f"a checkpoint without {LORA_FILE} (killed before its export)",
         lambda run: os.remove(os.path.join(run, "checkpoint-2", LORA_FILE))),
    )),
    Case("train resume: a truncated config.json", "train",
         _resume(lambda run: _truncated(os.path.join(run, "config.json"))), error=True),
    # a checkpoint folder that lacks a file its export wrote
    Case(f"generate --lora: a checkpoint without {PARTIAL_FILE}", "generate",
         lambda ws, f: generate_args(ws, f, "--lora", _checkpoint_without(ws, f, PARTIAL_FILE)), error=True),
    Case(f"convert --merge_lora: a checkpoint without {PARTIAL_FILE}", "convert",
         lambda ws, f: ["convert", os.path.join(ws.checkpoint, "transformer"), os.path.join(f, "out"),
                        "--merge_lora", _checkpoint_without(ws, f, PARTIAL_FILE)], error=True),
    # train config: each a clear error before the run folder is made
    *(Case(f"train config: {key}={value}", "train",
           lambda ws, f, key=key, value=value: train_args(ws, os.path.join(f, "out"), **{key: value}),
           error=True, clean=True) for key, value in (
        ("training_config.learning_rate", ".nan"),
        ("training_config.learning_rate", ".inf"),
        ("training_config.max_grad_norm", ".nan"),
        ("training_config.learning_rat", "1e-4"),  # a typo key
        ("trainig_config.learning_rate", "1e-4"),  # a typo section
        ("model_config.lora_rank", "0"),
    )),
    # train data: one clip of the offloaded data damaged; a clear error before the run folder is made
    *(Case(f"train data: {name}", "train", lambda ws, f, how=how: _bad_clip(ws, f, how), error=True, clean=True)
      for name, how in (
        ("an empty (0-byte) clip file", "empty"),
        ("a garbage clip file", "garbage"),
        ("a clip without prompt_embed", "no prompt_embed"),
        ("8-channel latents (the model has 16)", "8 channels"),
        ("a 32-wide prompt_embed (the model's text_dim is 64)", "32 wide"),
    )),
)


def _typo_metadata(ws: Workspace, folder: str) -> list[str]:
    with open(ws.metadata) as f:
        meta = json.load(f)
    meta[0]["crop "] = meta[0].pop("crop")
    path = os.path.join(folder, "meta.json")
    with open(path, "w") as f:
        json.dump(meta, f)
    shutil.copytree(os.path.join(ws.root, "videos"), os.path.join(folder, "videos"))
    return offload_args(ws, path, os.path.join(folder, "data"))


def _empty(folder: str) -> str:
    path = os.path.join(folder, "empty")
    os.makedirs(path)
    return path


def _file(folder: str, name: str) -> str:
    """A plain file where a folder is wanted: nothing can be made under it, even by root."""
    path = os.path.join(folder, name)
    open(path, "w").close()
    return path


# ---------------------------------------------------------------------------------------------- the runner

def _files(folder: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), folder) for d, dirs, names in os.walk(folder) for n in names + dirs}


def classify(case: Case, ws: Workspace, folder: str, before: set[str], code: int, stderr: str) -> str:
    """The case's class (see the module doc) from the exit status, stderr and what is on disk."""
    new = _files(folder) - before
    # a checkpoint folder without its LoRA is lost, unless resume set it aside by its name, with a warning
    checkpoints = [os.path.join(d, n) for d, dirs, _ in os.walk(folder) for n in dirs
                   if n.startswith("checkpoint-") and not re.fullmatch(r"checkpoint-\d+\.incomplete(-\d+)?", n)]
    lost = not _no_partials(folder) or any(not os.path.isfile(os.path.join(c, LORA_FILE)) for c in checkpoints)
    if case.command != "train" or case.clean:  # train may leave its metrics; the rest must leave nothing new
        lost = lost or (code != 0 and bool(new))
    if "Traceback" in stderr or code not in (0, 2):
        return "traceback"
    if code == 0:
        if case.error:
            return "accepted wrongly"
        return "ok" if case.result(ws, folder) and not lost else "lost"
    if not case.error:
        return "refused wrongly"
    errors = [line for line in stderr.splitlines() if line.startswith(f"helios-jax {case.command}: error:")]
    if lost:
        return "lost"
    return "clear" if len(errors) == 1 else "traceback"


def run_case(case: Case, ws: Workspace, folder: str) -> dict:
    os.makedirs(folder)
    argv = case.setup(ws, folder)
    before = _files(folder)
    env = {**os.environ, "XDG_CACHE_HOME": os.path.join(ws.root, "cache")}
    if case.command == "train":  # train sets no compile cache; one shared by the train cases saves compiling each
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ws.root, "cache", "jax-train"))
    env = processes.environment({**env, **case.env(ws, folder)})
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-P", "-c", CHILD, case.fault, *argv], capture_output=True, text=True,
                          env=env, cwd=folder)
    seconds = time.perf_counter() - began
    verdict = classify(case, ws, folder, before, done.returncode, done.stderr)
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    said = next((line for line in lines if line.startswith("helios-jax ")), lines[-1] if lines else "")
    return {"case": case.name, "class": verdict, "exit": done.returncode, "seconds": seconds,
            "says": said[:160].replace("|", "/")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=[], metavar="WORDS",
                        help="run only the cases whose name contains one of these (and the baselines)")
    parser.add_argument("--keep", help="build the workspace here (a new folder) and keep it")
    parser.add_argument("--reuse", help="a workspace an earlier --keep run left: its baselines are not run again")
    parser.add_argument("--label", default="", help="a word for the table's title, e.g. before or after")
    parser.add_argument("--results", default=RESULTS, help="append the table here ('' for nowhere)")
    parser.add_argument("--json", help="write the rows here as JSON")
    args = parser.parse_args()
    began = time.perf_counter()
    if args.reuse:  # the baselines' outputs of an earlier --keep run
        root = args.reuse
        ws = Workspace(root, os.path.join(root, "ckpt"), os.path.join(root, "meta.json"),
                       os.path.join(root, "case-00", "data"), os.path.join(root, "case-01", "out", "checkpoint-2"),
                       os.path.join(root, "case-03", "transformer"))
    else:
        root = args.keep or tempfile.mkdtemp(prefix="helios-faults-")
        os.makedirs(root, exist_ok=True)
        ws = build_workspace(root)
    rows = []
    for i, case in enumerate(CASES):
        baseline = i < BASELINES
        if (baseline and args.reuse) or (not baseline and args.only and not any(w in case.name for w in args.only)):
            continue
        # runs that reuse one workspace side by side (before and after) keep apart by their labels
        name = f"case-{i:02d}" if not args.reuse else f"rerun-{args.label}{time.strftime('%H%M%S')}-{i:02d}"
        row = run_case(case, ws, os.path.join(root, name))
        print(f"{row['class']:>16}  {row['seconds']:5.1f} s  {case.name}: {row['says']}", flush=True)
        rows.append(row)
    counts = collections.Counter(r["class"] for r in rows)
    table = (reporting.markdown_table(("case", "class", "exit", "s", "stderr: its helios-jax line, else its last"),
                                      [(r["case"], r["class"], r["exit"], r["seconds"], r["says"]) for r in rows])
             + "\n" + reporting.markdown_table(CLASSES, [[counts.get(c, 0) for c in CLASSES]])
             + f"\n{len(rows)} cases in {time.perf_counter() - began:.0f} s\n")
    env = provenance.jax_environment("orbax-checkpoint", "safetensors", "av")
    print(provenance.describe(env))
    reporting.report(f"fault_battery{': ' + args.label if args.label else ''}: how helios-jax fails", env, table,
                     {"rows": rows, "counts": dict(counts)}, args)
    if not (args.keep or args.reuse):
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
