"""A full disk, anywhere helios-jax writes, is one clear error naming the path and the space, and leaves no partial
file; and the inputs that once gave tracebacks (a corrupt video to offload, damaged orbax params, an interactive
prompt plan that cannot run, a negative-prompt list of the wrong length, pallas on a head_dim it lacks) are one line.

A full disk is simulated: each writer's write function is replaced by one that writes a few bytes, then fails
as that library fails on ENOSPC (OSError errno 28, safetensors' SafetensorError, orbax's RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors
import safetensors.numpy

from helios_jax import cli, compilation, demo, diskspace, video
from helios_jax.checkpoint import PipelineError
from helios_jax.convert import CheckpointError, export_safetensors
from helios_jax.convert.export import save_safetensors
from helios_jax.convert.orbax_io import restore_params, save_params
from helios_jax.pipeline import HeliosPipeline
from helios_jax.request import check_prompts
from helios_jax.training import DataError, trainer as T
from helios_jax.training.data import write_offload
from helios_jax.training.offload import offload

SMALL = ["--height", "64", "--width", "64", "--num_frames", "40", "--pyramid_num_inference_steps_list", "1", "1", "1"]
NO_SPACE = "No space left on device"


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """The embedded checkpoint goes to a per-session folder, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def fills_the_disk(how: str):
    """A replacement for a library's write function ``fn(data, path, ...)``: a few bytes, then the disk is full."""
    def write(data, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        if how == "oserror":
            raise OSError(errno.ENOSPC, NO_SPACE, str(path))
        raise safetensors.SafetensorError(f'Error while serializing: IoError(Os {{ code: 28, kind: StorageFull, '
                                          f'message: "{NO_SPACE}" }})')
    return write


def assert_one_clear_disk_error(err: BaseException, path, needed: int | None = None) -> None:
    text = str(err)
    assert isinstance(err, diskspace.DiskFullError) and isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert "\n" not in text and f"write {path}" in text and "free" in text
    if needed is not None:
        assert f"about {diskspace.human(needed)}" in text


@pytest.mark.parametrize("how", ["oserror", "safetensors"])
def test_offload_clip_on_a_full_disk_leaves_no_partial(tmp_path, monkeypatch, how):
    monkeypatch.setattr(safetensors.numpy, "save_file", fills_the_disk(how))
    latents, embed = np.zeros((1, 4, 9, 4, 4), np.float32), np.zeros((8, 32), np.float32)
    path = tmp_path / "clip_33_64_64.safetensors"
    with pytest.raises(OSError) as caught:
        write_offload(str(path), latents, embed, "a caption")
    assert_one_clear_disk_error(caught.value, path, latents.nbytes + embed.nbytes)
    assert os.listdir(tmp_path) == []


def test_a_write_the_free_space_cannot_hold_is_refused_before_any_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 1000)
    written = []
    monkeypatch.setattr(safetensors.numpy, "save_file", lambda *a, **k: written.append(a))
    with pytest.raises(OSError) as caught:
        save_safetensors({"x": np.zeros(1000, np.float32)}, str(tmp_path / "x.safetensors"), {})
    assert_one_clear_disk_error(caught.value, tmp_path / "x.safetensors", 4000)
    assert "1000 B free" in str(caught.value) and written == [] and os.listdir(tmp_path) == []


def test_convert_to_safetensors_on_a_full_disk_leaves_no_folder(tmp_path, monkeypatch):
    from helios_jax.convert.keymap import KeyMap

    monkeypatch.setattr(safetensors.numpy, "save_file", fills_the_disk("safetensors"))
    params = {"proj": {"kernel": np.ones((4, 4), np.float32)}}
    with pytest.raises(OSError) as caught:
        export_safetensors(tmp_path / "out", params, KeyMap(), {"a": 1}, dtype=np.float16)
    assert_one_clear_disk_error(caught.value, tmp_path / "out", 32)  # 16 values cast to float16
    assert os.listdir(tmp_path) == []


def test_convert_to_orbax_on_a_full_disk_leaves_no_folder(tmp_path, monkeypatch):
    def full(self, path, *args, **kwargs):
        os.makedirs(path)
        open(os.path.join(path, "d"), "wb").close()
        raise ValueError(f"RESOURCE_EXHAUSTED: Error writing local file {path}/d: {NO_SPACE} [OS error: {NO_SPACE}]")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    with pytest.raises(OSError) as caught:
        save_params(tmp_path / "out", {"w": jnp.ones((8,), jnp.float32)}, config={"a": 1})
    assert_one_clear_disk_error(caught.value, tmp_path / "out", 32)
    assert os.listdir(tmp_path) == []


def test_mp4_on_a_full_disk_leaves_no_partial(tmp_path, monkeypatch):
    import av

    opened = av.open

    class FullContainer:
        """An output container whose muxing runs out of space."""

        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            return getattr(self.container, name)

        def mux(self, packet):
            raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(av, "open", lambda *a, **k: FullContainer(opened(*a, **k)) if "w" in a else opened(*a, **k))
    path = tmp_path / "video.mp4"
    with pytest.raises(OSError) as caught:
        video.write_mp4(path, np.zeros((3, 16, 16, 3), np.uint8))
    assert_one_clear_disk_error(caught.value, path)
    assert os.listdir(tmp_path) == []


def toy_loss(trainable, frozen, batch, key):
    return jnp.mean((batch["x"] @ trainable["w"] - batch["y"]) ** 2), {}


def toy_data():
    x = np.ones((8, 4), np.float32)
    return iter(grain.MapDataset.source([{"x": x[i], "y": x[i, :1]} for i in range(8)]).repeat().batch(2)
                .to_iter_dataset())


def test_checkpoint_on_a_full_disk_is_one_error_and_no_half_checkpoint(tmp_path, monkeypatch):
    """orbax's save fails as a full disk does (its own temporary folder left behind): one DiskFullError naming
    the checkpoint, the manager settled, the step's partial folders gone, the earlier checkpoint kept."""
    save = ocp.CheckpointManager.save

    def full_at_step_4(self, step, *args, **kwargs):
        if step < 4:
            return save(self, step, *args, **kwargs)
        os.makedirs(tmp_path / "run" / f"checkpoint-{step}.orbax-checkpoint-tmp-1")
        raise ValueError(f"RESOURCE_EXHAUSTED: Error writing local file: {NO_SPACE}")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_step_4)
    run = T.RunConfig(output_dir=str(tmp_path / "run"), max_train_steps=4, checkpointing_steps=2, progress=False)
    stage = T.Stage(toy_loss, T.OptimizerConfig(learning_rate=1e-2))
    with pytest.raises(OSError) as caught:
        T.train(run, stage, {"w": jnp.zeros((4, 1))}, {}, toy_data())
    state_bytes = caught.value.needed
    assert_one_clear_disk_error(caught.value, tmp_path / "run" / "checkpoint-4", state_bytes)
    assert state_bytes >= 3 * 16  # the params and Adam's two moments, float32
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-2", "config.json", "metrics.jsonl"]

    def export_on_a_full_disk(trainable, folder):
        raise diskspace.DiskFullError(os.path.join(folder, "pytorch_lora_weights.safetensors"), 64)

    exporting = T.Stage(toy_loss, T.OptimizerConfig(learning_rate=1e-2), export=export_on_a_full_disk)
    with pytest.raises(OSError, match="pytorch_lora_weights.safetensors: it needs about 64 B"):
        T.train(T.RunConfig(output_dir=str(tmp_path / "export"), max_train_steps=2, progress=False), exporting,
                {"w": jnp.zeros((4, 1))}, {}, toy_data())
    assert "checkpoint-2" not in os.listdir(tmp_path / "export")  # no checkpoint without its LoRA

    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 10)
    with pytest.raises(OSError, match="no space left on the device to write"):  # refused before the first step
        T.train(T.RunConfig(output_dir=str(tmp_path / "new"), max_train_steps=2, progress=False), stage,
                {"w": jnp.zeros((4, 1))}, {}, toy_data())
    assert not (tmp_path / "new" / "metrics.jsonl").exists()


def test_stale_partials_of_dead_runs_are_removed_and_others_named(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".partial-{host}-{dead.pid}-abc.mp4"
    unknown = tmp_path / ".partial-k2j4h.mp4"  # an older name, without a process: not provably stale
    live = tmp_path / f".partial-{host}-{os.getppid()}-abc.mp4"
    for path in (stale, unknown, live):
        path.write_bytes(b"half a video")
    with pytest.warns(UserWarning) as warned:
        video.write_mp4(tmp_path / "video.mp4", np.zeros((1, 16, 16, 3), np.uint8))
    messages = " ".join(str(w.message) for w in warned)
    assert f"removed 1 partial file(s) that killed runs left in {tmp_path}" in messages
    assert str(unknown) in messages and str(live) in messages
    assert sorted(os.listdir(tmp_path)) == sorted([unknown.name, live.name, "video.mp4"])


@pytest.fixture
def no_cache_folder():
    """No cache folder set (an earlier test's generate may have set one; conftest keeps the cache itself off)."""
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", previous)


def test_an_unusable_compilation_cache_folder_costs_the_cache_not_the_run(tmp_path, monkeypatch, caplog,
                                                                        no_cache_folder):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="helios_jax"):
        assert compilation.enable_compilation_cache(blocker / "xla") is None
        assert "running without the persistent cache" in caplog.text
        monkeypatch.setattr(os, "access", lambda path, mode: False)  # read-only (root may write anywhere)
        assert compilation.enable_compilation_cache(tmp_path / "cache") is None
        assert "is not writable" in caplog.text
    assert not jax.config.jax_compilation_cache_dir


def test_corrupt_video_to_offload_is_one_error_naming_it(tmp_path):
    checkpoint = tmp_path / "ckpt"
    for folder in ("vae", "text_encoder", "tokenizer"):
        (checkpoint / folder).mkdir(parents=True)
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    (tmp_path / "meta.json").write_text('[{"path": "clip.mp4", "cut": [0, 200], "crop": [0, 640, 0, 384], '
                                        '"cap": ["a"]}]')
    with pytest.raises(DataError, match=r"clip.mp4: not a readable video") as caught:
        offload(str(tmp_path / "meta.json"), str(checkpoint), str(tmp_path / "out"))
    assert "nothing written" in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncate", "metadata"])
def test_damaged_orbax_params_are_one_checkpoint_error(tmp_path, damage):
    folder = tmp_path / "params"
    save_params(folder, {"w": jnp.arange(4096, dtype=jnp.float32)})
    if damage == "truncate":
        data = max((os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs), key=os.path.getsize)
        with open(data, "r+b") as f:
            f.truncate(64)
    else:
        os.remove(folder / "params" / "_METADATA")
    with pytest.raises(CheckpointError, match="the folder is damaged or incomplete") as caught:
        restore_params(folder)
    assert str(folder) in str(caught.value) and "convert it again" in str(caught.value)


@pytest.mark.parametrize("rows,extra,message", [
    ('0,0,"a"\n0,1,"b"\n0,2,"c"\n', [], "prompt 2 starts at chunk 2 but the video has only 2 chunks"),
    ('0,0,"a"\n0,1,"b"\n', ["--use_interpolate_prompt", "--interpolation_steps", "1"],
     "interpolation_chunks = 1 is not supported"),
])
def test_interactive_csv_that_cannot_run_is_one_line_before_any_weight(tmp_path, capsys, monkeypatch, rows, extra,
                                                                        message):
    monkeypatch.setattr(HeliosPipeline, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    csv = tmp_path / "prompts.csv"
    csv.write_text("id,prompt_index,prompt\n" + rows)
    args = ["generate", "--output", str(tmp_path / "video.mp4"), *SMALL, "--interactive_prompt_csv_path", str(csv),
            "--interpolate_time", "1", *extra]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == ["prompts.csv"]


def test_negative_prompt_list_of_the_wrong_length_is_one_error():
    with pytest.raises(PipelineError, match="negative_prompt has 3 prompts but the batch has 2"):
        check_prompts(["a", "b"], None, ["x", "y", "z"], None, None, 0)
    assert check_prompts(["a", "b"], None, ["x", "y"], None, None, 0) == 2


def test_pallas_on_a_head_dim_it_lacks_is_one_error_before_any_weight():
    with pytest.raises(PipelineError, match=r"takes head_dim \(64, 128\).* has 32"):
        HeliosPipeline.from_pretrained(demo.demo_checkpoint(), attention_impl="pallas", compilation_cache=False)


def test_a_second_signal_during_exit_is_quiet(tmp_path):
    """After an interrupt's one line the process exits; a Ctrl-C during jax's exit handlers ends it at once,
    without a traceback from inside them."""
    script = ("import atexit, os, signal, time\n"
              "from helios_jax import cli\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))\n"
              "cli._exit_at_next_signal()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and "Traceback" not in done.stderr


def test_the_fault_battery_classifies_from_the_outside(tmp_path):
    from experiments.studies import fault_battery as fb

    ws = fb.Workspace(str(tmp_path))
    due = fb.Case("x", "convert", lambda ws, folder: [], error=True)
    line = "helios-jax convert: error: no space left on the device to write out\n"
    assert fb.classify(due, ws, str(tmp_path), set(), 2, line) == "clear"
    assert fb.classify(due, ws, str(tmp_path), set(), 0, "") == "accepted wrongly"
    assert fb.classify(due, ws, str(tmp_path), set(), 1, "Traceback (most recent call last):\n" + line) == "traceback"
    (tmp_path / "out.partial").mkdir()
    assert fb.classify(due, ws, str(tmp_path), set(), 2, line) == "lost"
    survives = fb.Case("y", "train", lambda ws, folder: [], error=False)
    (tmp_path / "out.partial").rmdir()
    (tmp_path / "checkpoint-2").mkdir()  # a checkpoint without its LoRA export
    assert fb.classify(survives, ws, str(tmp_path), set(), 0, "") == "lost"
    (tmp_path / "checkpoint-2" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert fb.classify(survives, ws, str(tmp_path), set(), 0, "") == "ok"
    assert fb.classify(survives, ws, str(tmp_path), set(), 2, line) == "refused wrongly"
