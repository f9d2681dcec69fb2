"""The ``helios-jax`` command: each subcommand, its errors, and what it leaves on disk."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from helios_jax import cli, compilation, demo, generate
from helios_jax.convert import open_source
from helios_jax.pipeline import HeliosPipeline
from helios_jax.video import read_mp4

SMALL = ["--height", "64", "--width", "64", "--num_frames", "40", "--pyramid_num_inference_steps_list", "1", "1", "1"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """The embedded checkpoint and the compilation cache go to a per-session folder, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def test_generate_with_the_embedded_model_writes_a_playable_mp4_and_a_contact_sheet(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compilation, "_RUN", set())  # as a fresh process: no chunk program has run yet
    out = tmp_path / "video.mp4"
    assert cli.main(["generate", "--output", str(out), *SMALL]) == 0
    output = capsys.readouterr()
    assert output.out.startswith("wrote ")  # standard output is the result; messages go to standard error
    err = output.err.splitlines()  # not a terminal: no bar, one line per chunk
    assert any(line.startswith("no --checkpoint: the embedded nano Helios") for line in err), err
    assert sum(line.startswith("compiling chunk 1's sampling program (first run; ") for line in err) == 1, err
    assert [line.split(":")[0] for line in err if line.startswith("chunk ")] == ["chunk 1/2", "chunk 2/2"], err
    frames = read_mp4(out)
    assert frames.shape == (65, 64, 64, 3)  # 2 chunks of 33 frames, trimmed to 4k + 1, as the reference does
    assert (tmp_path / "video.png").is_file()
    assert sorted(os.listdir(tmp_path)) == ["video.mp4", "video.png"]


def _csv(path, rows: str) -> str:
    path.write_text("id,prompt_index,prompt\n" + rows)
    return str(path)


def test_interactive_prompt_csv(tmp_path):
    csv = _csv(tmp_path / "prompts.csv", '0,0,"a speeding train"\n0,1,"green fields"\n')
    out = tmp_path / "video.mp4"
    args = ["generate", "--output", str(out), *SMALL, "--interactive_prompt_csv_path", csv, "--interpolate_time", "1"]
    assert cli.main(args) == 0
    assert read_mp4(out).shape[0] == 65


@pytest.mark.parametrize("rows,message", [
    ('0,0,"a"\n0,2,"b"\n', "without gaps"),
    ('0,0,"a"\n1,1,"b"\n', "for 2 videos"),
    ('0,0,""\n', "is empty"),
])
def test_bad_interactive_csv_is_an_error_and_writes_nothing(tmp_path, capsys, rows, message):
    csv = _csv(tmp_path / "prompts.csv", rows)
    out = tmp_path / "video.mp4"
    assert cli.main(["generate", "--output", str(out), *SMALL, "--interactive_prompt_csv_path", csv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--sample_type", "i2v", "--image_path", "{tmp}/missing.png"], "cannot read the image"),
    (["--sample_type", "i2v"], "needs --image_path"),
    (["--sample_type", "v2v", "--video_path", "{tmp}/broken.mp4"], "cannot read the video"),
    (["--height", "100"], "multiples of 64"),
    (["--num_frames", "0"], "at least one frame"),
    (["--output", "{tmp}/no/such/folder/video.mp4"], "does not exist"),
])
def test_bad_input_is_one_line_and_no_file(tmp_path, capsys, extra, message):
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    args = ["generate", "--output", str(tmp_path / "video.mp4"), *SMALL, *[a.format(tmp=tmp_path) for a in extra]]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["broken.mp4"]


def test_ctrl_c_during_generation_leaves_no_half_mp4(tmp_path, monkeypatch):
    stream = HeliosPipeline.stream

    def interrupted(self, *args, **kwargs):
        chunks = stream(self, *args, **kwargs)
        yield next(chunks)  # one chunk is written to the partial file, then the user presses Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(HeliosPipeline, "stream", interrupted)
    assert cli.main(["generate", "--output", str(tmp_path / "video.mp4"), *SMALL]) == 130
    assert os.listdir(tmp_path) == []


def test_convert_to_orbax_and_back_to_safetensors(tmp_path):
    original = demo.demo_checkpoint()
    orbax, back = tmp_path / "orbax", tmp_path / "back"
    assert cli.main(["convert", original, str(orbax)]) == 0
    assert cli.main(["convert", str(orbax), str(back), "--to", "safetensors"]) == 0
    for component in ("transformer", "vae", "text_encoder"):
        before, after = open_source(os.path.join(original, component)), open_source(back / component)
        assert sorted(before.keys()) == sorted(after.keys())
        for key in before.keys():
            np.testing.assert_array_equal(after.read(key), before.read(key))
    # The orbax folder is a checkpoint the pipeline loads as it is.
    args = dict(prompt="a train", height=64, width=64, num_frames=33, guidance_scale=1.0,
                pyramid_num_inference_steps_list=[1, 1, 1], seed=0, progress=False)
    from_orbax = HeliosPipeline.from_pretrained(orbax, dtype=jnp.float32, compilation_cache=False)(**args)
    from_diffusers = HeliosPipeline.from_pretrained(original, dtype=jnp.float32, compilation_cache=False)(**args)
    np.testing.assert_array_equal(from_orbax, from_diffusers)


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    assert cli.main(["convert", os.path.join(demo.demo_checkpoint(), "vae"), str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_verify_passes_and_fails_when_a_component_is_broken(monkeypatch, capsys):
    assert cli.main(["verify", "--only", "transformer"]) == 0
    assert "all checks passed" in capsys.readouterr().out

    from helios_jax.models import transformer

    real = transformer.apply_rope
    monkeypatch.setattr(transformer, "apply_rope", lambda x, cos, sin: real(x, sin, cos))  # swapped tables
    assert cli.main(["verify", "--only", "transformer"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED: transformer fp32" in out


def test_bench_runs_a_benchmark_script(tmp_path):
    assert cli.main(["bench", "convert", "--args", "--gigabytes", "0.01", "--no-append"]) == 0


def _subcommands() -> dict:
    """Every subcommand's parser, read from the parser itself (a new subcommand is covered without a new test)."""
    root = cli.parser()
    return next(a.choices for a in root._actions if isinstance(a, cli.argparse._SubParsersAction))


def _required(sub) -> list[str]:
    """Placeholder values for a subcommand's required arguments, so that only the flag under test is wrong."""
    argv = []
    for action in sub._actions:
        if action.option_strings and action.required:
            argv += [action.option_strings[0], "x"]
        elif not action.option_strings and action.nargs not in ("*", "?", cli.argparse.REMAINDER):
            argv += ["x"]
    return argv


def _exit(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_subcommand_explains_itself_and_refuses_an_unknown_flag_with_its_own_usage(name, capsys):
    sub = _subcommands()[name]
    code, out, _ = _exit([name, "--help"], capsys)
    assert code == 0 and f"usage: helios-jax {name}" in out
    undocumented = [a.dest for a in sub._actions if not a.help or a.help == cli.argparse.SUPPRESS]
    assert not undocumented, f"{name}: flags without help text: {undocumented}"
    code, _, err = _exit([name, *_required(sub), "--no_such_flag"], capsys)
    assert code == 2, err
    assert err.startswith(f"usage: helios-jax {name}") and "unrecognized arguments: --no_such_flag" in err, err
    assert "Traceback" not in err


def test_version_and_both_spellings_of_a_flag(capsys):
    code, out, _ = _exit(["--version"], capsys)
    assert code == 0 and out.strip() == f"helios-jax {cli.version()}"
    parser = cli.parser()
    for spelling in ("--num_frames", "--num-frames"):
        assert parser.parse_args(["generate", spelling, "33"]).num_frames == 33
    for spelling in ("--min_frames", "--min-frames"):
        args = parser.parse_args(["offload", "m.json", "--checkpoint", "c", "--output", "o", spelling, "9"])
        assert args.min_frames == 9
    _, out, _ = _exit(["generate", "--help"], capsys)  # the help lists one spelling of each flag
    assert "--num_frames" in out and "--num-frames" not in out and "(default: 99)" in out


@pytest.mark.parametrize("argv,message", [
    (["verify", "--only", "foo"], "invalid choice: 'foo'"),
    (["bench", "nope"], "invalid choice: 'nope'"),
    (["generate", "--num_frames", "ten"], "invalid int value"),
])
def test_user_errors_in_arguments_exit_2_with_the_subcommand_usage(argv, message, capsys):
    code, _, err = _exit(argv, capsys)
    assert code == 2 and err.startswith(f"usage: helios-jax {argv[0]}") and message in err, err


def test_slug_of_a_prompt():
    assert generate.slug("A cat, on a TRAIN! Through green fields at dusk") == "a-cat-on-a-train-through"
    assert generate.slug("一只猫") == "video"


def test_without_output_the_video_goes_to_outputs_named_from_the_prompt_and_never_over_a_file(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(generate, "_timestamp", lambda: "20260101-000000")
    taken = tmp_path / "outputs" / "a-cat-on-a-train-20260101-000000.mp4"
    taken.parent.mkdir()
    taken.write_bytes(b"an earlier run")
    assert cli.main(["generate", *SMALL, "--prompt", "A cat on a train", "--num_frames", "33"]) == 0
    new = "a-cat-on-a-train-20260101-000000-2"
    assert sorted(os.listdir(tmp_path / "outputs")) == sorted([taken.name, f"{new}.mp4", f"{new}.png"])
    assert taken.read_bytes() == b"an earlier run"
    assert read_mp4(tmp_path / "outputs" / f"{new}.mp4").shape[0] == 33
    assert "outputs/a-cat-on-a-train-20260101-000000-2.mp4" in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["outputs"]
