"""Bad input and faults, one row per case: the command line and the API either give one clear error
(exit status 2, a message naming the value and the fix, no traceback, nothing written) or work.

The CLI rows run against a copy of the embedded checkpoint with every weight file removed, so a row
passes only if its error comes from the arguments, before any weight is read. The API rows run on a tiny
pipeline and count XLA compilations: none may happen before the error. The end-to-end rows (i2v and
v2v from real files, signals in subprocesses) are at the end of the file, marked slow.
"""

from __future__ import annotations

import gc
import glob
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring
from PIL import Image

from helios_jax import cli, demo, generate
from helios_jax.pipeline import HeliosPipeline, PipelineError
from helios_jax.request import check_request
from helios_jax.video import MediaError, fit_image, load_image, read_mp4, write_mp4

TINY = ["--height", "64", "--width", "64", "--num_frames", "33", "--pyramid_num_inference_steps_list", "1", "1", "1"]
COMPILES = [0]
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: COMPILES.__setitem__(0, COMPILES[0] + (event == "/jax/core/compile/backend_compile_duration")))


def _picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colour picture (codec-friendly), uint8 (h, w, 3)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    return (np.stack([np.sin(5 * x + p) * np.cos(4 * y + p) for p in phase], -1) * 100 + 128).astype(np.uint8)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The inputs the rows name: good and broken images, videos and CSVs, a folder, a pipe, links."""
    d = tmp_path_factory.mktemp("media")
    Image.fromarray(_picture(48, 80)).save(d / "good.png")
    write_mp4(d / "good.mp4", np.stack([_picture(48, 80, i) for i in range(7)]))
    write_mp4(d / "short.mp4", np.stack([_picture(48, 80, i) for i in range(5)]))
    (d / "broken.png").write_bytes(b"not a png")
    (d / "broken.mp4").write_bytes(b"not a video")
    (d / "folder").mkdir()
    os.mkfifo(d / "pipe")
    csvs = {
        "latin1": "id,prompt_index,prompt\n0,0,caf\xe9 au lait\n".encode("latin-1"),
        "gaps": b'id,prompt_index,prompt\n0,0,"a"\n0,2,"b"\n',
        "two_videos": b'id,prompt_index,prompt\n0,0,"a"\n1,1,"b"\n',
        "empty_prompt": b'id,prompt_index,prompt\n0,0,""\n',
        "bad_index": b'id,prompt_index,prompt\n0,x,"a"\n',
        "short_row": b'id,prompt_index,prompt\n0\n',
        "no_header": b'"a train"\n"fields"\n',
        "empty": b"",
        "bom": '\ufeffid,prompt_index,prompt\n0,0,"a train"\n'.encode("utf-8"),
    }
    for name, data in csvs.items():
        (d / f"{name}.csv").write_bytes(data)
    return d


@pytest.fixture(scope="module")
def configs_only(tmp_path_factory):
    """The embedded checkpoint with its configs and no weights: loading it would fail, checking it must not."""
    folder = tmp_path_factory.mktemp("configs") / "ckpt"
    shutil.copytree(demo.build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt"), folder)
    for weights in glob.glob(str(folder / "*" / "*.safetensors")):
        os.remove(weights)
    return folder


@pytest.fixture
def out(tmp_path):
    """The folder a row writes into (the row checks it is left as it was)."""
    d = tmp_path / "out"
    d.mkdir()
    os.symlink("/dev/null", d / "null.mp4")
    os.symlink(d / "absent", d / "dangling.mp4")
    (d / "folder.mp4").mkdir()
    (d / "sheetdir.png").mkdir()
    os.mkfifo(d / "pipe.mp4")
    return d


# (id, argv after "generate" ({m}: media folder, {o}: output folder, {c}: the checkpoint), message fragment)
GENERATE_ROWS = [
    ("guidance nan", ["--guidance_scale", "nan"], "must be finite"),
    ("guidance inf", ["--guidance_scale", "inf"], "must be finite"),
    ("guidance -inf", ["--guidance_scale=-inf"], "must be finite"),
    ("guidance negative", ["--guidance_scale", "-1"], "at least 0"),
    ("seed 10**23", ["--seed", str(10**23)], "seed = 1000"),
    ("seed below -2**63", ["--seed", str(-(2**63) - 1)], "[-2**63, 2**63 - 1]"),
    ("latent frames per chunk 0", ["--num_latent_frames_per_chunk", "0"], "num_latent_frames_per_chunk = 0"),
    ("latent frames per chunk negative", ["--num_latent_frames_per_chunk", "-3"], "at least 1"),
    ("steps 0", ["--num_inference_steps", "0"], "num_inference_steps = 0"),
    ("pyramid steps with a 0", ["--pyramid_num_inference_steps_list", "0", "1", "1"], "at least 1"),
    ("pyramid steps: two stages", ["--pyramid_num_inference_steps_list", "1", "1"], "3 positive step counts"),
    ("height not a multiple", ["--height", "100"], "multiples of 64"),
    ("width 0", ["--width", "0"], "width = 0"),
    ("height negative", ["--height", "-64"], "height = -64"),
    ("frames 0", ["--num_frames", "0"], "at least one frame"),
    ("frames negative", ["--num_frames", "-5"], "at least one frame"),
    ("zero steps negative", ["--zero_steps", "-1"], "zero_steps = -1"),
    ("image sigma nan", ["--image_noise_sigma_min", "nan"], "must be finite"),
    ("image sigma above 1", ["--image_noise_sigma_max", "2"], "in [0, 1]"),
    ("video sigmas crossed", ["--video_noise_sigma_min", "0.5", "--video_noise_sigma_max", "0.2"], "<= video_noise"),
    ("video sigma negative", ["--video_noise_sigma_min", "-0.1"], "at least 0"),
    ("fps 0", ["--fps", "0"], "frame rate from 1"),
    ("fps huge", ["--fps", "100000"], "frame rate from 1"),
    ("output png", ["--output", "{o}/clip.png"], "must end in .mp4"),
    ("output without suffix", ["--output", "{o}/clip"], "must end in .mp4"),
    ("output a device", ["--output", "/dev/null"], "must end in .mp4"),
    ("output links to a device", ["--output", "{o}/null.mp4"], "not a regular file"),
    ("output a broken link", ["--output", "{o}/dangling.mp4"], "not a regular file"),
    ("output a folder", ["--output", "{o}/folder.mp4"], "not a regular file"),
    ("output a pipe", ["--output", "{o}/pipe.mp4"], "not a regular file"),
    ("output folder missing", ["--output", "{o}/no/such/video.mp4"], "does not exist"),
    ("contact sheet name is a folder", ["--output", "{o}/sheetdir.mp4"], "not a regular file"),
    ("contact sheet would replace the image", ["--output", "{m}/good.mp4", "--sample_type", "i2v",
                                               "--image_path", "{m}/good.png"], "would destroy the input"),
    ("output would replace the video", ["--output", "{m}/good.mp4", "--sample_type", "v2v",
                                        "--video_path", "{m}/good.mp4"], "would destroy the input"),
    ("cudnn on a CPU", ["--attention", "cudnn"], "needs a CUDA GPU"),
    ("i2v without image", ["--sample_type", "i2v"], "needs --image_path"),
    ("v2v without video", ["--sample_type", "v2v"], "needs --video_path"),
    ("t2v with an image", ["--image_path", "{m}/good.png"], "takes no --image_path"),
    ("image and video", ["--sample_type", "i2v", "--image_path", "{m}/good.png", "--video_path", "{m}/good.mp4"],
     "cannot both be given"),
    ("image missing", ["--sample_type", "i2v", "--image_path", "{m}/missing.png"], "no such file"),
    ("image broken", ["--sample_type", "i2v", "--image_path", "{m}/broken.png"], "cannot read the image"),
    ("image a folder", ["--sample_type", "i2v", "--image_path", "{m}/folder"], "not a regular file"),
    ("image a pipe", ["--sample_type", "i2v", "--image_path", "{m}/pipe"], "not a regular file"),
    ("image a device", ["--sample_type", "i2v", "--image_path", "/dev/zero"], "not a regular file"),
    ("video broken", ["--sample_type", "v2v", "--video_path", "{m}/broken.mp4"], "cannot read the video"),
    ("video too short", ["--sample_type", "v2v", "--video_path", "{m}/short.mp4"], "at least one chunk of 33"),
    ("video short for its chunks", ["--sample_type", "v2v", "--video_path", "{m}/short.mp4",
                                    "--num_latent_frames_per_chunk", "3"], "at least one chunk of 9"),
    ("video is a picture", ["--sample_type", "v2v", "--video_path", "{m}/good.png"], "at least one chunk of 33"),
    ("video missing", ["--sample_type", "v2v", "--video_path", "{m}/missing.mp4"], "no such file"),
    ("csv latin-1", ["--interactive_prompt_csv_path", "{m}/latin1.csv"], "is not UTF-8"),
    ("csv missing", ["--interactive_prompt_csv_path", "{m}/missing.csv"], "cannot read the interactive prompt CSV"),
    ("csv a folder", ["--interactive_prompt_csv_path", "{m}/folder"], "not a file"),
    ("csv without header", ["--interactive_prompt_csv_path", "{m}/no_header.csv"], "expected a header"),
    ("csv empty", ["--interactive_prompt_csv_path", "{m}/empty.csv"], "expected a header"),
    ("csv gaps", ["--interactive_prompt_csv_path", "{m}/gaps.csv"], "without gaps"),
    ("csv two videos", ["--interactive_prompt_csv_path", "{m}/two_videos.csv"], "for 2 videos"),
    ("csv empty prompt", ["--interactive_prompt_csv_path", "{m}/empty_prompt.csv"], "is empty"),
    ("csv index not a number", ["--interactive_prompt_csv_path", "{m}/bad_index.csv"], "must be an integer"),
    ("csv short row", ["--interactive_prompt_csv_path", "{m}/short_row.csv"], "must be an integer"),
    ("csv interpolate time 0", ["--interactive_prompt_csv_path", "{m}/bom.csv", "--interpolate_time", "0"],
     "at least one chunk"),
    ("csv interpolation steps negative", ["--interactive_prompt_csv_path", "{m}/bom.csv", "--use_interpolate_prompt",
                                          "--interpolation_steps", "-1"], "0 or more"),
    ("checkpoint missing", ["--checkpoint", "{m}/nowhere"], "nowhere does not exist"),
    ("checkpoint a media folder", ["--checkpoint", "{m}"], "no model_index.json"),
    ("revision of a local folder", ["--revision", "v2"], "is for a hub id"),
    ("height not a number", ["--height", "abc"], "invalid int value"),
    ("frames fractional", ["--num_frames", "10.5"], "invalid int value"),
    ("dtype unknown", ["--weight_dtype", "int8"], "invalid choice"),
    ("attention unknown", ["--attention", "flash"], "invalid choice"),
    ("flag unknown", ["--colour", "red"], "unrecognized arguments"),
]


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """``helios-jax ARGV`` in this process: (exit status, stderr)."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    return status, capsys.readouterr().err


def _listing(*folders) -> list[list[str]]:
    return [sorted(os.listdir(f)) for f in folders]


@pytest.mark.parametrize("argv,message", [row[1:] for row in GENERATE_ROWS], ids=[row[0] for row in GENERATE_ROWS])
def test_generate_refuses_before_reading_any_weight(argv, message, media, configs_only, out, capsys):
    args = [a.format(m=media, o=out, c=configs_only) for a in argv]
    before, compiles = _listing(media, out), COMPILES[0]
    status, err = _main(["generate", "--checkpoint", str(configs_only), "--output", str(out / "video.mp4"),
                         *TINY, *args], capsys)
    assert status == 2, err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert _listing(media, out) == before, "nothing may be written"
    assert COMPILES[0] == compiles, "nothing may be compiled"


def test_the_table_is_large_enough():
    assert len(GENERATE_ROWS) + len(CONVERT_ROWS) + len(API_ROWS) + len(REQUEST_ROWS) >= 100


# (id, argv after "convert" ({c}: a checkpoint, {o}: the output folder), message fragment)
CONVERT_ROWS = [
    ("destination exists", ["{c}", "{o}"], "already exists"),
    ("stale staging folder", ["{c}", "{o}/new"], "a killed run left it"),
    ("source missing", ["{o}/nowhere", "{o}/new"], "nowhere does not exist"),
    ("destination folder missing", ["{c}", "{o}/no/such/new"], "does not exist"),
    ("source not a checkpoint", ["{o}", "{o}/new"], "it is not a model component folder"),
    ("source of another model", ["{o}/unet", "{o}/new"], "is not a Helios component"),
    ("target unknown", ["{c}", "{o}/new", "--to", "onnx"], "invalid choice"),
]


@pytest.mark.parametrize("argv,message", [row[1:] for row in CONVERT_ROWS], ids=[row[0] for row in CONVERT_ROWS])
def test_convert_refuses(argv, message, configs_only, tmp_path, capsys):
    (tmp_path / "new.partial").mkdir()  # what a killed convert leaves
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    before = _listing(tmp_path)
    status, err = _main(["convert", *[a.format(c=configs_only, o=tmp_path) for a in argv]], capsys)
    assert status == 2 and "Traceback" not in err, err
    assert message in err.strip().splitlines()[-1], err
    assert _listing(tmp_path) == before


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return HeliosPipeline.from_pretrained(demo.build_demo_checkpoint(tmp_path_factory.mktemp("api") / "ckpt"),
                                          dtype=jnp.float32, compilation_cache=False)


SMALL = dict(prompt="a train", height=64, width=64, num_frames=33, pyramid_num_inference_steps_list=[1, 1, 1],
             guidance_scale=1.0, max_sequence_length=16, progress=False)
API_ROWS = [
    ("frames a str", dict(num_frames="10"), "num_frames = '10': expected an integer"),
    ("frames a float", dict(num_frames=10.0), "expected an integer"),
    ("height a bool", dict(height=True), "expected an integer"),
    ("guidance a str", dict(guidance_scale="5"), "expected a finite number"),
    ("guidance nan", dict(guidance_scale=math.nan), "must be finite"),
    ("guidance inf", dict(guidance_scale=np.float32("inf")), "must be finite"),
    ("guidance an array", dict(guidance_scale=np.ones(2)), "expected a finite number"),
    ("seed 10**23", dict(seed=10**23), "seed = 1000"),
    ("seed a str", dict(seed="1"), "seed = '1'"),
    ("seed a float", dict(seed=1.5), "seed = 1.5"),
    ("negative sigmas", dict(sigmas=[1.0, -0.5]), "at least 0"),
    ("nan sigmas", dict(sigmas=[math.nan]), "must be finite"),
    ("sigmas for the pyramid", dict(sigmas=[1.0, 0.5]), "drop sigmas"),
    ("history sizes with a str", dict(history_sizes=(16, 2, "1")), "expected a list of integers"),
    ("history sizes a number", dict(history_sizes=5), "expected a list of integers"),
    ("history sizes two", dict(history_sizes=[16, 2]), "three positive sizes"),
    ("pyramid steps fractional", dict(pyramid_num_inference_steps_list=[1, 1, 1.5]), "expected a list of integers"),
    ("pyramid steps a str", dict(pyramid_num_inference_steps_list="111"), "expected a list of integers"),
    ("bool flag a str", dict(use_zero_init="yes"), "expected True or False"),
    ("bool flag an int", dict(is_amplify_first_chunk=1), "expected True or False"),
    ("sequence length 0", dict(max_sequence_length=0), "max_sequence_length = 0"),
    ("latent frames 0", dict(num_latent_frames_per_chunk=0), "num_latent_frames_per_chunk = 0"),
    ("prompt a number", dict(prompt=5), "prompt must be a str"),
    ("prompt an empty list", dict(prompt=[]), "prompt must be a str"),
    ("prompt list with None", dict(prompt=["a", None]), "prompt must be a str"),
    ("no prompt", dict(prompt=None), "exactly one of prompt"),
    ("negative prompt a number", dict(negative_prompt=5), "negative_prompt must be a str"),
    ("embeds of the wrong rank", dict(prompt=None, prompt_embeds=np.zeros((4, 8))), "(batch, tokens, text_dim)"),
    ("interactive not from chunk 0", dict(prompt=None, interactive_prompts=[(1, "a")]), "the first at chunk 0"),
    ("interactive starts repeat", dict(prompt=None, interactive_prompts=[(0, "a"), (0, "b")]), "increasing starts"),
    ("interactive not pairs", dict(prompt=None, interactive_prompts=["a", "b"]), "(start chunk, prompt) pairs"),
    ("interpolation negative", dict(interpolation_chunks=-1), "interpolation_chunks = -1"),
    ("image of floats", dict(image=np.zeros((64, 64, 3), np.float32)), "uint8 (H, W, 3 or 4)"),
    ("image grey 2-D", dict(image=np.zeros((64, 64), np.uint8)), "uint8 (H, W, 3 or 4)"),
    ("image empty", dict(image=np.zeros((0, 64, 3), np.uint8)), "uint8 (H, W, 3 or 4)"),
    ("image a number", dict(image=12), "must be a file path, a PIL image"),
    ("image missing", dict(image="/nonexistent.png"), "no such file"),
    ("video of floats", dict(video=np.zeros((33, 64, 64, 3), np.float32)), "each video frame must be"),
    ("video 3-D", dict(video=np.zeros((64, 64, 3), np.uint8)), "a video array must be uint8 (T, H, W, 3)"),
    ("video a number", dict(video=42), "a video must be a file path"),
    ("video empty", dict(video=[]), "has no frames"),
    ("video too short", dict(video=np.zeros((20, 64, 64, 3), np.uint8)), "at least one chunk of 33"),
    ("video a folder", dict(video="/tmp"), "not a regular file"),
    ("image and a batch", dict(prompt=["a", "b"], image=np.zeros((64, 64, 3), np.uint8)), "take one prompt"),
    ("unknown setting", dict(colour="red"), r"unknown argument(s) ['colour']"),
]


@pytest.mark.parametrize("settings,message", [row[1:] for row in API_ROWS], ids=[row[0] for row in API_ROWS])
def test_api_refuses_before_any_compute(pipe, settings, message):
    compiles = COMPILES[0]
    with pytest.raises((PipelineError, MediaError)) as caught:
        pipe.stream(**{**SMALL, **settings})
    assert message in str(caught.value)
    assert COMPILES[0] == compiles


# check_request for single-stage pipelines (UniPC, DMD), whose custom sigmas the pyramid rows cannot reach.
REQUEST_ROWS = [
    ("sigmas fewer than steps", "unipc", dict(num_inference_steps=3, sigmas=[1.0, 0.5]), "num_inference_steps = 3"),
    ("sigmas above 1", "unipc", dict(num_inference_steps=2, sigmas=[1.5, 0.5]), "in [0, 1]"),
    ("sigmas a str", "unipc", dict(num_inference_steps=2, sigmas="1,0"), "expected a list of numbers"),
    ("height not a multiple of 16", "unipc", dict(height=72), "multiples of 16"),
    ("DMD with sigmas", "dmd", dict(num_inference_steps=1, sigmas=[1.0]), "a DMD one"),
]


@pytest.mark.parametrize("kind,settings,message", [row[1:] for row in REQUEST_ROWS], ids=[row[0] for row in REQUEST_ROWS])
def test_single_stage_request_rules(kind, settings, message):
    with pytest.raises(PipelineError) as caught:
        check_request(settings, pyramid=False, stages=1, scheduler_type=kind)
    assert message in str(caught.value)


def test_good_requests_are_accepted_and_canonical():
    request, _ = check_request(dict(num_inference_steps=2, sigmas=np.array([1.0, 0.5], np.float32), height=np.int64(64),
                                    guidance_scale=np.float32(2), use_zero_init=np.bool_(True)),
                               pyramid=False, stages=1, scheduler_type="unipc")
    assert request.sigmas == (1.0, 0.5) and request.height == 64 and type(request.height) is int
    assert request.guidance_scale == 2.0 and request.use_zero_init is True


def test_csv_with_a_byte_order_mark_is_read(media):
    assert generate.read_interactive_csv(str(media / "bom.csv"), 2) == [(0, "a train")]


def test_one_loader_contract_the_cli_and_the_api_share(media):
    """The CLI reads a file into uint8 at the size; the pipeline's loader gives the same floats from either."""
    fitted = fit_image(str(media / "good.png"), 64, 64)
    assert fitted.dtype == np.uint8 and fitted.shape == (64, 64, 3)
    np.testing.assert_array_equal(load_image(fitted, 64, 64), load_image(str(media / "good.png"), 64, 64))


def test_a_bug_shows_its_traceback_and_says_it_is_a_bug(monkeypatch, tmp_path, capsys):
    def broken(args):
        raise ZeroDivisionError("an internal mistake")

    monkeypatch.setattr(generate, "run", broken)
    status, err = _main(["generate", "--output", str(tmp_path / "v.mp4")], capsys)
    assert status == 1
    assert "Traceback" in err and "ZeroDivisionError" in err and "this is a bug in helios-jax" in err


def test_a_full_disk_is_one_line(monkeypatch, tmp_path, capsys):
    def full(args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(generate, "run", full)
    status, err = _main(["generate", "--output", str(tmp_path / "v.mp4")], capsys)
    assert status == 2 and "No space left on device" in err and "Traceback" not in err


def test_a_signal_that_lands_in_a_gc_callback_is_raised_again():
    """jax runs Python in a garbage-collection callback, where Python ignores exceptions: a SIGTERM
    handled there (2 of 12 convert trials) must still stop the command."""
    fire = [True]

    def callback(phase, info):
        if phase == "start" and fire:
            fire.clear()
            signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside the callback

    gc.callbacks.append(callback)
    try:
        with pytest.raises(cli.Interrupted):
            with cli._signals_interrupt():
                gc.collect()
                time.sleep(2)  # the timer raises it again in here
    finally:
        gc.callbacks.remove(callback)
    assert not fire


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    """The embedded checkpoint and the compilation cache in a per-session folder, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
    return str(tmp_path_factory.getbasetemp() / "cache")


# The smallest run: 64x64 (the 3-stage pyramid's least size), chunks of 2 latent frames (5 video frames).
SMALL_CLI = ["--height", "64", "--width", "64", "--num_frames", "5", "--num_latent_frames_per_chunk", "2",
             "--pyramid_num_inference_steps_list", "1", "1", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    ["--sample_type", "i2v", "--image_path", "{m}/good.png"],
    ["--sample_type", "v2v", "--video_path", "{m}/good.mp4"],
], ids=["i2v", "v2v"])
def test_i2v_and_v2v_from_real_files(flags, media, cache, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    status, err = _main(["generate", "--output", str(out), *SMALL_CLI, *[f.format(m=media) for f in flags]], capsys)
    assert status == 0, err
    assert read_mp4(out).shape == (5, 64, 64, 3)
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4", "clip.png"]


def _start(argv: list[str], cache: str) -> subprocess.Popen:
    env = {**os.environ, "XDG_CACHE_HOME": cache, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "helios_jax.cli", *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached the point to interrupt"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])  # SIGINT: test_cli.py
def test_a_signal_during_generate_leaves_no_partial_mp4(signum, cache, tmp_path):
    demo.demo_checkpoint(os.path.join(cache, "helios-jax"))
    run = _start(["generate", "--output", str(tmp_path / "v.mp4"), *SMALL_CLI, "--num_frames", "5000"], cache)
    _wait_for(lambda: glob.glob(str(tmp_path / ".partial-*.mp4")), run)  # writing has begun
    time.sleep(0.5)
    run.send_signal(signum)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signum, err
    assert f"interrupted ({signal.Signals(signum).name}); nothing was left half-written" in err
    assert "Traceback" not in err and os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_an_interrupted_convert_leaves_nothing_and_says_so(delay, cache, tmp_path):
    source = demo.demo_checkpoint(os.path.join(cache, "helios-jax"))
    destination = tmp_path / "converted"
    run = _start(["convert", source, str(destination)], cache)
    _wait_for(lambda: os.path.exists(str(destination) + ".partial"), run)
    time.sleep(delay)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    if run.returncode == 0:  # finished before the signal: then it is complete
        assert os.listdir(tmp_path) == ["converted"]
        return
    assert run.returncode == 130, err
    assert "nothing was left half-written" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []
