"""``helios-jax serve`` in process: the WebSocket protocol, steering, the bounded queue, disconnects, the token,
POST /v1/videos and /health, on a one-layer random-weight pipeline (one compiled chunk program and one decode,
shared by every test here), through Starlette's TestClient.

A served chunk is compared with the library's own session run the same way (``pipe.session``, steered at the same
boundary) through the same fragmented-MP4 muxer: byte-equal fragments (x264 is deterministic) mean equal frames.
The joined fragments are read back by PyAV (helios_jax.video.read_mp4) as one MP4 of every frame sent, within
the codec's error (CODEC_ERROR, a mean absolute error against the raw frames).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import time

import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra (pip install '.[serve]') is part of the test install")
from starlette.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from helios_jax import cli, demo  # noqa: E402
from helios_jax.checkpoint import PipelineError  # noqa: E402
from helios_jax.config import TransformerConfig  # noqa: E402
from helios_jax.convert import CheckpointError  # noqa: E402
from helios_jax.pipeline import HeliosPipeline  # noqa: E402
from helios_jax.serve import command  # noqa: E402
from helios_jax.serve.app import Server, make_app  # noqa: E402
from helios_jax.serve.fmp4 import FragmentedMp4  # noqa: E402
from helios_jax.serve.protocol import Defaults, Limits, ProtocolError, parse_message, parse_start  # noqa: E402
from helios_jax.serve.scheduler import Scheduler  # noqa: E402
from helios_jax.video import read_mp4  # noqa: E402

SIZE = 32
# Two chunks of 33 frames: 33 + 32 = 65 frames (the reference's 4k + 1 trim).
DEFAULTS = Defaults(prompt="a train in the fields", height=SIZE, width=SIZE, guidance_scale=1.0, steps=1,
                    num_frames=66, transition_chunks=0)
SWITCHED = "mountains and sky"
TOKEN = "a-token-of-twenty-characters"
CODEC_ERROR = 32.0  # x264 at crf 18 on these random-weight 32x32 frames (noise: its worst case) measured 22 of 255


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A one-layer, single-stage random-weight checkpoint (one denoising step): the cheapest programs to compile."""
    transformer = TransformerConfig(num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
                                    text_dim=64, freq_dim=16, ffn_dim=32, num_layers=1, rope_dim=(4, 2, 2),
                                    is_amplify_history=True)
    scheduler = {"_class_name": "HeliosScheduler", "stages": 1, "stage_range": [0, 1], "gamma": 0.25, "shift": 3.0}
    index = {**demo.MODEL_INDEX, "_class_name": "HeliosPipeline", "is_distilled": False,
             "scheduler": ["diffusers", "HeliosScheduler"]}
    return demo.build_demo_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", transformer=transformer,
                                      scheduler=scheduler, model_index=index)


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return HeliosPipeline.from_pretrained(checkpoint, dtype=jnp.float32, compilation_cache=False)


@pytest.fixture(scope="module")
def warmed(pipe):
    """The pipeline after the server's own warm-up (command.warm_up, through the scheduler's code path)."""
    scheduler = Scheduler(pipe, 1)
    assert command.warm_up(scheduler, DEFAULTS) > 0
    return pipe


def _settings(**changes) -> dict:
    return dict(num_frames=DEFAULTS.num_frames, height=SIZE, width=SIZE, guidance_scale=1.0, num_inference_steps=1,
                is_amplify_first_chunk=False, **changes)


def _session_run(pipe, switch_at: int | None = None) -> tuple[list[bytes], np.ndarray]:
    """The library's own session and muxer: the default prompt, switched to SWITCHED (at once) before chunk
    ``switch_at``; its fragments and frames."""
    session, muxer = pipe.session(prompt=DEFAULTS.prompt, seed=0, **_settings()), FragmentedMp4()
    fragments, frames = [], []
    while True:
        if len(fragments) == switch_at:
            session.set_prompt(SWITCHED, transition_chunks=0)
        try:
            chunk = next(session)
        except StopIteration:
            return fragments, np.concatenate(frames)
        fragments.append(muxer.encode(chunk))
        frames.append(chunk)


@pytest.fixture(scope="module")
def reference(pipe):
    """The unswitched run's fragments and frames."""
    return _session_run(pipe)


def _server(pipe, tmp_path, queue_size=2, token=None, max_pause_s=60.0):
    scheduler = Scheduler(pipe, queue_size, max_pause_s)
    scheduler.start()
    return scheduler, make_app(Server(scheduler, DEFAULTS, Limits(), str(tmp_path / "videos"), token))


@pytest.fixture
def served(warmed, tmp_path):
    scheduler, app = _server(warmed, tmp_path)
    with TestClient(app) as client:
        yield client, scheduler
    scheduler.close()


def _until(ws, kind: str) -> list:
    """Messages (JSON dicts and bytes) up to and including the first of ``kind``."""
    seen = []
    while True:
        message = ws.receive()
        assert message["type"] != "websocket.close", f"the server closed the connection; got {seen}"
        item = message.get("bytes") if message.get("bytes") is not None else json.loads(message["text"])
        seen.append(item)
        if isinstance(item, dict) and item["type"] == kind:
            return seen


def _completed(scheduler, timeout_s: float = 10.0) -> int:
    """The scheduler's count of ended jobs once the running one has ended: a job's "done" reaches its client just
    before the worker counts it (the job ends after its last message: its video is published then)."""
    deadline = time.monotonic() + timeout_s
    while scheduler.status()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return scheduler.status()["completed"]


def _assert_same_frames(video: np.ndarray, frames: np.ndarray) -> None:
    """``video`` (decoded) is ``frames`` through the codec: the same count, each decoded frame nearest to its own
    source frame (of all of them), and the mean absolute error under CODEC_ERROR."""
    assert video.shape == frames.shape, (video.shape, frames.shape)
    distance = np.abs(video[:, None].astype(np.float32) - frames[None].astype(np.float32)).mean(axis=(2, 3, 4))
    assert (distance.argmin(axis=1) == np.arange(len(frames))).all(), "decoded frames out of order or lost"
    error = distance.diagonal().mean()
    assert error < CODEC_ERROR, f"the decoded stream is {error:.2f} of 255 from the frames (limit {CODEC_ERROR})"


def _fragments(messages: list) -> list[bytes]:
    return [m for m in messages if isinstance(m, bytes)]


def test_stream_in_order_and_one_playable_mp4(served, request, tmp_path):
    """start -> queued, started, (chunk + fragment) per chunk, done, compiling nothing after the warm-up; the
    fragments joined are one MP4 of every frame sent, and each equals the library's own session's."""
    client, _ = served
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event)  # noqa: E731
    monitoring.register_event_duration_secs_listener(listener)
    try:
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_json({"type": "start", "prompt": DEFAULTS.prompt, "seed": 0})
            messages = _until(ws, "done")
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert "/jax/core/compile/backend_compile_duration" not in compiles, "a served session compiled a program"
    reference = request.getfixturevalue("reference")
    kinds = [m["type"] if isinstance(m, dict) else "bytes" for m in messages]
    assert kinds == ["queued", "started", "chunk", "bytes", "chunk", "bytes", "done"], kinds
    assert messages[0]["position"] == 1
    chunks = [m for m in messages if isinstance(m, dict) and m["type"] == "chunk"]
    assert [c["index"] for c in chunks] == [0, 1] and [c["frames"] for c in chunks] == [33, 32]
    assert all(c["seconds"] > 0 and c["codec"].startswith("avc1.") for c in chunks)
    fragments, frames = reference
    assert _fragments(messages) == fragments
    (tmp_path / "joined.mp4").write_bytes(b"".join(_fragments(messages)))
    video = read_mp4(tmp_path / "joined.mp4")
    assert video.shape == frames.shape == (65, SIZE, SIZE, 3)
    _assert_same_frames(video, frames)


def test_prompt_switch_pause_resume_and_bad_messages_leave_the_run_as_it_was(served, pipe, reference):
    """Paused at a boundary, every malformed or invalid message gets an error and changes nothing; the prompt sent
    there applies at the next chunk (equal to the library's session switched at the same boundary, and unlike the
    unswitched run); /health answers while the generation holds the device."""
    client, _ = served
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "start", "prompt": DEFAULTS.prompt, "seed": 0})
        ws.send_json({"type": "pause"})
        first = _until(ws, "paused")
        at = first[-1]["index"]  # the boundary the pause reached: before chunk 0 or 1
        assert at in (0, 1) and len(_fragments(first)) == at
        health = client.get("/health").json()
        assert health["running"] and health["chunk"] == at, health
        bad = [("text", "not json"), ("bytes", b"\x00\x01"), ("text", "[1, 2]"), ("json", {"type": "bogus"}),
               ("json", {"type": "start"}), ("json", {"type": "prompt", "prompt": ""}),
               ("json", {"type": "prompt", "prompt": "x" * 2001}), ("json", {"type": "prompt", "prompt": "a", "x": 1}),
               ("json", {"type": "prompt", "prompt": "a", "transition_chunks": 99})]
        replies = []
        for how, message in bad:
            getattr(ws, f"send_{how}")(message)
            replies.append(json.loads(ws.receive_text()))
            assert replies[-1]["type"] == "error" and replies[-1]["message"], (message, replies[-1])
        assert "limit is 2000" in replies[6]["message"] and "0 to 8" in replies[8]["message"], replies
        ws.send_json({"type": "prompt", "prompt": SWITCHED, "transition_chunks": 0})
        ack = ws.receive_json()
        assert ack == {"type": "prompt", "prompt": SWITCHED, "transition_chunks": 0, "from_chunk": at}, ack
        ws.send_json({"type": "resume"})
        rest = _until(ws, "done")
    assert [m["type"] for m in rest if isinstance(m, dict)] == ["resumed", *["chunk"] * (2 - at), "done"]
    fragments = _fragments(first) + _fragments(rest)
    assert fragments == _session_run(pipe, switch_at=at)[0]
    assert fragments[at] != reference[0][at], "the switch changed nothing: the new prompt was not applied"


def test_invalid_start_gets_an_error_naming_the_limit_and_the_connection_goes_on(served):
    client, scheduler = served
    with client.websocket_connect("/v1/stream") as ws:
        for message, words in [({"num_frames": 10**6}, "1320"), ({"height": 40}, "multiples of 16"),
                               ({"seed": "x"}, "integer"), ({"guidance_scale": float("nan")}, "finite"),
                               ({"image": "@@@"}, "base64"), ({"steps": 0}, "1 to 50"), ({"path": "/etc"}, "unknown")]:
            ws.send_text(json.dumps({"type": "start", **message}))
            reply = json.loads(ws.receive_text())
            assert reply["type"] == "error" and words in reply["message"], (message, reply)
        ws.send_json({"type": "prompt", "prompt": "a"})
        assert "send start first" in json.loads(ws.receive_text())["message"]
        ws.send_json({"type": "start", "num_frames": 33})
        assert [m["type"] for m in _until(ws, "done") if isinstance(m, dict)][-2:] == ["chunk", "done"]
    assert _completed(scheduler) == 1


def test_bounded_queue_positions_and_a_disconnect_lets_the_next_client_start(pipe, tmp_path):
    """queue_size 1: A holds the device (paused), B waits at position 1, C is refused with the limit; A's
    disconnect cancels it at the boundary and B starts and gets all its chunks."""
    scheduler, app = _server(pipe, tmp_path, queue_size=1)
    try:
        with TestClient(app) as client:
            with client.websocket_connect("/v1/stream") as b:
                with client.websocket_connect("/v1/stream") as a:
                    a.send_json({"type": "start"})
                    a.send_json({"type": "pause"})
                    _until(a, "paused")
                    b.send_json({"type": "start"})
                    assert _until(b, "queued")[-1]["position"] == 1
                    with client.websocket_connect("/v1/stream") as c:
                        c.send_json({"type": "start"})
                        reply = json.loads(c.receive_text())
                        assert reply["type"] == "error" and "queue is full" in reply["message"]
                        assert "is 1" in reply["message"], reply
                rest = _until(b, "done")
            kinds = [m["type"] for m in rest if isinstance(m, dict)]
            assert kinds == ["started", "chunk", "chunk", "done"], kinds
    finally:
        scheduler.close()
    assert scheduler.status()["completed"] == 2


def test_image_to_video_from_a_base64_image(served, pipe, reference):
    """A start with an image (a data: URL of a PNG) is image-to-video: the library's session given the same
    image (as the protocol fits it) makes the same fragments, unlike the text-only run's."""
    picture = np.zeros((40, 24, 3), np.uint8)
    picture[:, :12] = (220, 40, 40)
    picture[:, 12:] = (30, 60, 200)
    data = io.BytesIO()
    Image.fromarray(picture).save(data, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(data.getvalue()).decode()
    client, _ = served
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "start", "prompt": DEFAULTS.prompt, "seed": 0, "image": url})
        fragments = _fragments(_until(ws, "done"))
    image = parse_start({"type": "start", "image": url}, DEFAULTS, Limits()).image
    session, muxer = pipe.session(prompt=DEFAULTS.prompt, seed=0, image=image, **_settings()), FragmentedMp4()
    assert fragments == [muxer.encode(chunk) for chunk in session]
    assert fragments[0] != reference[0][0], "the image changed nothing"


def test_a_pause_past_its_limit_stops_the_generation_with_an_error(warmed, tmp_path):
    scheduler, app = _server(warmed, tmp_path, max_pause_s=0.2)
    try:
        with TestClient(app) as client, client.websocket_connect("/v1/stream") as ws:
            ws.send_json({"type": "start"})
            ws.send_json({"type": "pause"})
            messages = _until(ws, "done")
    finally:
        scheduler.close()
    errors = [m["message"] for m in messages if isinstance(m, dict) and m["type"] == "error"]
    assert len(errors) == 1 and "limit of 0.2 s" in errors[0], messages
    assert messages[-1] == {"type": "done", "stopped": True}


def test_token_on_every_request_and_connection(pipe, checkpoint, tmp_path):
    scheduler, app = _server(pipe, tmp_path, token=TOKEN)
    try:
        with TestClient(app) as client:
            assert client.get("/health").status_code == 401
            assert client.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get("/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            assert client.get(f"/?token={TOKEN}").status_code == 200
            assert client.post("/v1/videos", json={}).status_code == 401
            with pytest.raises(WebSocketDisconnect):
                with client.websocket_connect("/v1/stream") as ws:
                    ws.receive_text()
            with client.websocket_connect(f"/v1/stream?token={TOKEN}") as ws:
                ws.send_json({"type": "stop"})
                assert "send start first" in ws.receive_json()["message"]
    finally:
        scheduler.close()
    with pytest.raises(PipelineError, match="--token"):
        command.check_bind("0.0.0.0", 8000, None)
    command.check_bind("127.0.0.1", 8000, None)
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2  # refused before any weight is read
    assert cli.main(["serve", "--height", "50"]) == 2  # the nano model's configs: a multiple of 64
    # generate's weight dtypes, checked against the configs before any weight is read: fp8 with 16-bit edges needs
    # a middle block between them, which this one-layer checkpoint lacks.
    command.check_defaults(str(checkpoint), DEFAULTS, "fp8")
    with pytest.raises(CheckpointError, match="needs at least 3 blocks; this transformer has 1"):
        command.check_defaults(str(checkpoint), DEFAULTS, "fp8-edges")
    assert cli.main(["serve", "--checkpoint", str(checkpoint), "--weight_dtype", "fp8-edges"]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(PipelineError, match="cannot listen on 127.0.0.1"):
            command.check_port("127.0.0.1", taken.getsockname()[1])


def test_post_videos_writes_the_mp4_atomically_under_the_output_folder(served, reference, tmp_path):
    client, _ = served
    response = client.post("/v1/videos", json={"prompt": DEFAULTS.prompt, "seed": 0})
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    written = os.listdir(tmp_path / "videos")
    assert written == [response.headers["x-helios-video"]], written  # no partial file left beside it
    (tmp_path / "got.mp4").write_bytes(response.content)
    video, frames = read_mp4(tmp_path / "got.mp4"), reference[1]
    _assert_same_frames(video, frames)
    bad = client.post("/v1/videos", json={"num_frames": 0})
    assert bad.status_code == 400 and "num_frames" in bad.json()["message"]


def test_protocol_limits_are_stated_in_their_errors():
    limits = Limits(max_message_bytes=1000, max_image_bytes=300, max_image_pixels=64 * 64)
    with pytest.raises(ProtocolError, match="limit is 1000"):
        parse_message(json.dumps({"type": "start", "prompt": "x" * 2000}), limits)
    picture = io.BytesIO()
    Image.new("RGB", (80, 80), (200, 30, 30)).save(picture, format="PNG")
    image = base64.b64encode(picture.getvalue()).decode()
    with pytest.raises(ProtocolError, match="limit is 4096 pixels"):
        parse_start({"type": "start", "image": image}, DEFAULTS, limits)
    with pytest.raises(ProtocolError, match="limit is 300"):
        parse_start({"type": "start", "image": "A" * 1000}, DEFAULTS, limits)
    small = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(small, format="PNG")
    start = parse_start({"type": "start", "image": "data:image/png;base64," + base64.b64encode(small.getvalue()).decode()},
                        DEFAULTS, Limits())
    assert start.image.shape == (SIZE, SIZE, 3) and tuple(start.image[0, 0]) == (200, 30, 30)


def test_fragments_join_into_one_mp4_whatever_the_chunk_count(tmp_path):
    """Three chunks of distinct colours: the joined stream reads back as every frame, in order."""
    muxer, parts = FragmentedMp4(), []
    for k, frames in enumerate((33, 32, 5)):
        chunk = np.zeros((frames, 48, 64, 3), np.uint8)
        chunk[..., k] = 200
        parts.append(muxer.encode(chunk))
    assert parts[0][4:8] == b"ftyp" and all(part[4:8] == b"moof" for part in parts[1:])
    (tmp_path / "joined.mp4").write_bytes(b"".join(parts))
    video = read_mp4(tmp_path / "joined.mp4")
    assert video.shape == (70, 48, 64, 3)
    assert [int(np.argmax(video[i, 24, 32])) for i in (0, 32, 33, 64, 65, 69)] == [0, 0, 1, 1, 2, 2]
