"""``helios-jax serve``: the streaming server on uvicorn, safe by default.

It binds 127.0.0.1 unless told otherwise, and a bind that other machines can reach needs a token (``--token`` or
HELIOS_JAX_SERVE_TOKEN), refused before any weight is read. The pipeline is loaded once and warmed up (one short
generation at the default size, said in the log) before the port opens, so the first client does not pay the
compile; every session then shares the compiled programs.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import time
from typing import Any

from helios_jax.checkpoint import PipelineError
from helios_jax.generate import WEIGHT_DTYPES

logger = logging.getLogger(__name__)
TOKEN_ENV = "HELIOS_JAX_SERVE_TOKEN"
LOCAL_HOSTS = ("localhost",)
WARM_UP_FRAMES = 66


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="a diffusers Helios folder or hub id (default: the embedded nano model, "
                                             "as generate's)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind; one other machines can reach "
                                                             f"needs --token (or {TOKEN_ENV})")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on")
    parser.add_argument("--token", help=f"a secret every request and connection must carry (default: {TOKEN_ENV})")
    parser.add_argument("--output_dir", default="outputs", help="the folder POST /v1/videos writes its mp4s to")
    parser.add_argument("--queue_size", type=int, default=4, help="generations that may wait besides the running one")
    parser.add_argument("--weight_dtype", choices=WEIGHT_DTYPES, default=None,
                        help="the weights' dtype, as generate's (fp8 and fp8-edges: the DiT's block linears in float8; "
                             "default: fp32 for the embedded model, bf16 otherwise)")
    parser.add_argument("--height", type=int, help="the default height, the warm-up's (default: generate's for the "
                                                    "model: 64 for the embedded one, 384 otherwise)")
    parser.add_argument("--width", type=int, help="the default width, the warm-up's (64 or 640, as --height)")
    parser.add_argument("--steps", type=int, help="the default denoising steps per pyramid stage (2 for the embedded "
                                                  "model, 20 otherwise)")
    parser.add_argument("--guidance_scale", type=float, help="the default guidance scale (1.0 for the embedded model, "
                                                             "5.0 otherwise)")
    parser.add_argument("--no_warmup", action="store_true", help="skip the warm-up generation (the first client then "
                                                                 "pays the compile)")


def is_local(host: str) -> bool:
    """Whether ``host`` binds only the loopback interface."""
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, port: int, token: str | None) -> None:
    """A non-local bind needs a token; a port must be one."""
    if not 0 <= port <= 65535:
        raise PipelineError(f"--port {port}: give a port from 0 to 65535")
    if not is_local(host) and not token:
        raise PipelineError(f"--host {host} can be reached from other machines: give --token SECRET (or set "
                            f"{TOKEN_ENV}), which every request and connection must then carry")
    if token is not None and len(token) < 16:
        raise PipelineError(f"the token has {len(token)} characters: give at least 16")


def check_port(host: str, port: int) -> None:
    """That the address can be bound now, before minutes of loading and warm-up (a port in use, a host that is
    not this machine's)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as err:
        raise PipelineError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port or "
                            "--host") from None


def defaults_for(args: argparse.Namespace) -> Any:
    """The served defaults: the flags given, else generate's for the embedded nano model or for a checkpoint."""
    from helios_jax.generate import CHECKPOINT_DEFAULTS
    from helios_jax.serve.protocol import Defaults

    pick = int(args.checkpoint is None)
    value = {name: both[pick] for name, both in CHECKPOINT_DEFAULTS.items()}
    given = {name: getattr(args, name) for name in ("height", "width", "steps", "guidance_scale")}
    return Defaults(prompt=value["prompt"], height=given["height"] or value["height"],
                    width=given["width"] or value["width"],
                    guidance_scale=value["guidance_scale"] if given["guidance_scale"] is None else given["guidance_scale"],
                    steps=given["steps"] or value["pyramid_num_inference_steps_list"][0],
                    amplify_first_chunk=args.checkpoint is None)


def warm_start(defaults: Any) -> Any:
    """The warm-up's request: two chunks at the default size (the first chunk's program and the later chunks'
    differ), so that a client's first chunk finds every program compiled."""
    from helios_jax.serve.protocol import Start

    return Start(prompt=defaults.prompt, num_frames=WARM_UP_FRAMES, seed=0, height=defaults.height,
                 width=defaults.width, guidance_scale=defaults.guidance_scale, steps=defaults.steps, transition_chunks=0)


def check_defaults(checkpoint: str, defaults: Any, weight_dtype: str) -> None:
    """The served defaults and weight dtype against the checkpoint's configs and the protocol's limits, before any
    weight is read."""
    from helios_jax.checkpoint import read_checkpoint_configs
    from helios_jax.loading import check_quantize, weight_settings
    from helios_jax.serve.protocol import Limits, ProtocolError, parse_start
    from helios_jax.serve.scheduler import pipeline_settings

    configs = read_checkpoint_configs(checkpoint)
    check_quantize("transformer", weight_settings(weight_dtype)[1], configs.transformer)
    try:
        parse_start({"type": "start"}, defaults, Limits())
        pipeline_settings(configs.spec, configs.scheduler, warm_start(defaults), defaults)
    except ProtocolError as err:
        raise PipelineError(f"the served defaults (--height, --width, --steps, --guidance_scale): {err}") from None


def warm_up(scheduler: Any, defaults: Any) -> float:
    """One generation of :func:`warm_start` through the scheduler's code path; returns its seconds."""
    from helios_jax.serve.scheduler import Job, run_job

    start = warm_start(defaults)
    began = time.perf_counter()
    job = Job(start, scheduler.settings(start, defaults), lambda message: None, lambda index, frames, seconds: None)
    run_job(scheduler.pipe, job)
    if job.error:
        raise PipelineError(f"the warm-up generation failed: {job.error}")
    return time.perf_counter() - began


def run(args: argparse.Namespace) -> int:
    """Check the flags, load and warm up the pipeline, then serve until interrupted."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise PipelineError(f"helios-jax serve needs the serve extra ({err.name} is missing): "
                            "pip install 'helios-jax[serve]'") from None

    from helios_jax import hub
    from helios_jax.loading import weight_settings
    from helios_jax.nano import models as nano
    from helios_jax.pipeline import HeliosPipeline
    from helios_jax.serve.app import Server, make_app
    from helios_jax.serve.protocol import Limits
    from helios_jax.serve.scheduler import Scheduler

    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_bind(args.host, args.port, token)
    check_port(args.host, args.port)
    if args.queue_size < 0:
        raise PipelineError(f"--queue_size {args.queue_size}: give 0 or more")
    checkpoint = hub.resolve(args.checkpoint) if args.checkpoint else nano.CHECKPOINT
    defaults = defaults_for(args)
    weight_dtype = args.weight_dtype or ("fp32" if args.checkpoint is None else "bf16")
    check_defaults(checkpoint, defaults, weight_dtype)
    dtype, quantize = weight_settings(weight_dtype)
    pipe = HeliosPipeline.from_pretrained(checkpoint, dtype=dtype, weight_dtype=quantize)
    limits = Limits()
    scheduler = Scheduler(pipe, args.queue_size, limits.max_pause_s)
    if not args.no_warmup:
        logger.info("warming up: one %d-frame generation at %dx%d, so that the first client pays no compile",
                    WARM_UP_FRAMES, defaults.height, defaults.width)
        logger.info("warm-up done in %.1f s; every session shares these compiled programs", warm_up(scheduler,
                                                                                                    defaults))
    server = Server(scheduler, defaults, limits, os.path.abspath(args.output_dir), token)
    scheduler.start()
    logger.info("serving %s at http://%s:%d/%s", checkpoint, args.host, args.port,
                "?token=..." if token else "")
    try:
        uvicorn.run(make_app(server), host=args.host, port=args.port, log_level="warning",
                    ws_max_size=2 * server.limits.max_message_bytes)
    finally:
        scheduler.close()
    return 0
