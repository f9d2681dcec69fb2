"""The ASGI application: the page, the WebSocket stream, the one-shot video endpoint and the health check.

Starlette serves it (uvicorn runs it, ``helios_jax.serve.command``); this module is imported only by ``helios-jax
serve`` and the tests, never by ``import helios_jax``. The asyncio side does no device work: it checks each
message (``protocol``), hands jobs to the one worker thread (``scheduler``) and forwards what the worker emits,
through an ``asyncio.Queue`` fed by ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import importlib.resources
import json
import os
from typing import Any, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from helios_jax.serve.fmp4 import FragmentedMp4
from helios_jax.serve.protocol import (
    Defaults,
    Limits,
    ProtocolError,
    check_fields,
    check_prompt,
    check_transition,
    decode_image,
    parse_message,
    parse_start,
)
from helios_jax.serve.scheduler import Job, Scheduler
from helios_jax.video import Mp4Writer

FPS = 24


@dataclasses.dataclass
class Server:
    """What the routes share: the pipeline's scheduler, the defaults and limits, the output folder, the token."""

    scheduler: Scheduler
    defaults: Defaults
    limits: Limits
    output_dir: str
    token: str | None = None
    fps: int = FPS


class TokenCheck:
    """Every HTTP request and WebSocket connection must carry the token (``Authorization: Bearer TOKEN``, or
    ``?token=TOKEN``, which a browser's WebSocket can send), compared in constant time; none asked without one."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app, self.token = app, token

    def _carries(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ").strip()
        if not given:
            from urllib.parse import parse_qs

            given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] not in ("http", "websocket") or self._carries(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "a valid token is needed"})
            return
        response = JSONResponse({"type": "error", "message": "a valid token is needed (Authorization: Bearer TOKEN "
                                                              "or ?token=TOKEN)"}, status_code=401)
        await response(scope, receive, send)


def _threadsafe(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[Any], None]:
    """A callback the worker thread calls to put an item on ``queue`` in ``loop``."""
    def put(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the client is gone
            loop.call_soon_threadsafe(queue.put_nowait, item)
    return put


def page(request: Request) -> HTMLResponse:
    return HTMLResponse(importlib.resources.files("helios_jax.serve").joinpath("index.html").read_text("utf-8"))


def health(request: Request) -> JSONResponse:
    server: Server = request.app.state.server
    defaults = dataclasses.asdict(server.defaults)
    return JSONResponse({"status": "ok", **server.scheduler.status(), "defaults": defaults,
                         "limits": dataclasses.asdict(server.limits)})


async def stream(websocket: WebSocket) -> None:
    """``WS /v1/stream``: the protocol of docs/serving.md, one generation at a time per connection."""
    server: Server = websocket.app.state.server
    await websocket.accept()
    outgoing: asyncio.Queue = asyncio.Queue()
    put = _threadsafe(asyncio.get_running_loop(), outgoing)
    job: Job | None = None

    async def forward() -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):  # the client is gone; the reader sees it
            while True:
                item = await outgoing.get()
                if isinstance(item, bytes):
                    await websocket.send_bytes(item)
                else:
                    await websocket.send_json(item)

    def on_chunk(muxer: FragmentedMp4) -> Callable[[int, np.ndarray, float], None]:
        def send(index: int, frames: np.ndarray, seconds: float) -> None:
            data = muxer.encode(frames)
            put({"type": "chunk", "index": index, "frames": len(frames), "seconds": round(seconds, 4),
                 "codec": muxer.codec, "bytes": len(data)})
            put(data)
        return send

    sender = asyncio.create_task(forward())
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            try:
                request = parse_message(message.get("text"), server.limits)
                kind = request["type"]
                if kind == "start":
                    if job is not None and not job.finished.is_set():
                        raise ProtocolError("a generation is already running on this connection: stop it first")
                    start = parse_start(request, server.defaults, server.limits)
                    settings = server.scheduler.settings(start, server.defaults)
                    job = Job(start, settings, put, on_chunk(FragmentedMp4(server.fps)))
                    server.scheduler.submit(job)
                elif job is None or job.finished.is_set():
                    raise ProtocolError(f"{kind}: no generation is running on this connection (send start first)")
                elif kind == "prompt":
                    check_fields(request, ("prompt", "transition_chunks"))
                    text = check_prompt(request.get("prompt"), server.limits)
                    transition = check_transition(request, job.start.transition_chunks, server.limits)
                    put({"type": "prompt", "prompt": text, "transition_chunks": transition,
                         "from_chunk": job.set_prompt(text, transition)})
                elif kind == "image":
                    check_fields(request, ("image",))
                    job.set_image(decode_image(request.get("image"), job.start.height, job.start.width,
                                               server.limits))
                elif kind == "pause":
                    job.pause()
                elif kind == "resume":
                    job.resume()
                else:  # stop
                    if server.scheduler.withdraw(job):  # it was still waiting: the worker will not say done
                        put({"type": "done", "stopped": True})
            except ProtocolError as err:
                put({"type": "error", "message": str(err)})
    except WebSocketDisconnect:
        pass
    finally:
        if job is not None:
            server.scheduler.withdraw(job)  # a client gone is cancelled at the next chunk boundary
        sender.cancel()


async def videos(request: Request) -> Response:
    """``POST /v1/videos``: the start fields as JSON; the finished MP4, written atomically under the output
    folder (named by the server) and returned."""
    server: Server = request.app.state.server
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > server.limits.max_message_bytes:
            return JSONResponse({"type": "error", "message": f"the request body is over the limit of "
                                                             f"{server.limits.max_message_bytes} bytes"}, 413)
    try:
        fields = json.loads(body or b"{}")
        if not isinstance(fields, dict):
            raise ProtocolError(f"the body must be a JSON object of the start fields; got {type(fields).__name__}")
        if fields.setdefault("type", "start") != "start":
            raise ProtocolError(f"type = {fields['type']!r}: POST /v1/videos takes the start fields")
        start = parse_start(fields, server.defaults, server.limits)
        settings = server.scheduler.settings(start, server.defaults)
    except (ProtocolError, json.JSONDecodeError) as err:
        return JSONResponse({"type": "error", "message": str(err)}, 400)
    from helios_jax.generate import default_output

    writer: list[Mp4Writer] = []

    def on_chunk(index: int, frames: np.ndarray, seconds: float) -> None:
        if not writer:  # named here, on the worker thread: no other job writes meanwhile
            os.makedirs(server.output_dir, exist_ok=True)
            writer.append(Mp4Writer(default_output(start.prompt, server.output_dir), server.fps))
        writer[0].write(frames)

    def on_end(complete: bool) -> None:
        """The mp4 renamed into place if every chunk was made; else its temporary file removed."""
        if writer:
            writer[0].__exit__(None if complete else RuntimeError, None, None)

    job = Job(start, settings, lambda message: None, on_chunk, on_end)
    try:
        server.scheduler.submit(job)
    except ProtocolError as err:
        return JSONResponse({"type": "error", "message": str(err)}, 503)
    try:
        while not job.finished.is_set():
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:  # the client is gone: cancelled at the next boundary, nothing published
        server.scheduler.withdraw(job)
        raise
    if job.error or not writer:
        return JSONResponse({"type": "error", "message": job.error or "no frames were generated"}, 500)
    path = writer[0].path
    return FileResponse(path, media_type="video/mp4", headers={"X-Helios-Video": os.path.basename(path)})


def make_app(server: Server) -> ASGIApp:
    """The application over a started ``server.scheduler`` (the caller starts and closes it)."""
    app = Starlette(routes=[Route("/", page), Route("/health", health), WebSocketRoute("/v1/stream", stream),
                            Route("/v1/videos", videos, methods=["POST"])])
    app.state.server = server
    return TokenCheck(app, server.token)
