"""``helios-jax serve`` measured from a client on localhost: latency, load and memory, on this machine.

Starts the real server (``python -m helios_jax.cli serve``, its load and warm-up timed until /health answers) for
each model, then, over the WebSocket protocol (the ``websockets`` client):

- latency: one client's time to the first chunk (start sent -> first fragment received), each chunk's server
  seconds (the ``chunk`` message's), and the wait between consecutive fragments on the client, against a
  chunk's playing time (33 frames at 24 fps = 1.375 s: real time needs waits below it);
- load: more clients at once than the queue holds: each must get every chunk in order and ``done``, or a clear
  ``error``, and nothing else (bounded: each client's run has a time limit);
- memory: the server's RSS (/proc/PID/status VmRSS) after 1, 10, ..., N one-chunk sessions in a row.

    python -m experiments.studies.serve_latency [--models nano demo] [--sessions 50] [--clients 6]
        [--queue_size 3] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

from experiments import provenance, reporting
from experiments.paths import RESULTS

CHUNK_SECONDS = 33 / 24  # a chunk's playing time at the server's 24 fps
# Per model: the checkpoint (None: the embedded nano model) and the served size and steps on this CPU.
MODELS = {
    "nano": dict(checkpoint=None, flags=[]),  # generate's defaults for it: 64x64, DMD 2+2+2, first chunk amplified
    "demo": dict(checkpoint="demo", flags=["--height", "128", "--width", "192", "--steps", "2",
                                            "--guidance_scale", "1.0"]),  # the random-weight tiny Helios
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Served:
    """The server in a subprocess, from its start until /health answers."""

    def __init__(self, model: str, queue_size: int, folder: str):
        spec = MODELS[model]
        self.port, self.log = _free_port(), os.path.join(folder, f"serve-{model}.log")
        command = [sys.executable, "-m", "helios_jax.cli", "serve", "--port", str(self.port), "--queue_size",
                   str(queue_size), "--output_dir", os.path.join(folder, "videos"), *spec["flags"]]
        if spec["checkpoint"] == "demo":
            from helios_jax import demo

            command += ["--checkpoint", demo.demo_checkpoint()]
        began = time.perf_counter()
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {open(self.log).read()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        self.ready_s = time.perf_counter() - began

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def run_client(port: int, start: dict, limit_s: float) -> dict[str, Any]:
    """One client's session: every message in order, with the arrival time of each fragment."""
    from websockets.sync.client import connect

    out: dict[str, Any] = {"chunks": [], "arrivals": [], "errors": [], "done": False, "order_ok": True}
    began = time.perf_counter()
    with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "start", **start}))
        while time.perf_counter() - began < limit_s:
            message = ws.recv(timeout=limit_s)
            if isinstance(message, bytes):
                out["arrivals"].append(time.perf_counter() - began)
                continue
            message = json.loads(message)
            if message["type"] == "chunk":
                out["order_ok"] &= message["index"] == len(out["chunks"]) == len(out["arrivals"])
                out["chunks"].append(message)
            elif message["type"] == "error":
                out["errors"].append(message["message"])
                break
            elif message["type"] == "done":
                out["done"] = True
                break
    out["wall_s"] = time.perf_counter() - began
    return out


def latency(served: Served, chunks: int) -> list[list[Any]]:
    result = run_client(served.port, {"num_frames": 33 * chunks, "seed": 1}, 600)
    if not result["done"] or not result["order_ok"]:
        raise RuntimeError(f"the latency run failed: {result}")
    waits = [b - a for a, b in zip(result["arrivals"], result["arrivals"][1:])]
    seconds = [c["seconds"] for c in result["chunks"]]
    return [[served.ready_s, result["arrivals"][0], statistics.median(seconds), max(seconds),
             statistics.median(waits), max(waits), CHUNK_SECONDS / statistics.median(waits)]]


def load(served: Served, clients: int, chunks: int, limit_s: float) -> list[list[Any]]:
    results: list[dict] = [{}] * clients

    def one(i: int) -> None:
        try:
            results[i] = run_client(served.port, {"num_frames": 33 * chunks, "seed": i}, limit_s)
        except Exception as err:  # noqa: BLE001 - a client that failed is a row of the table
            results[i] = {"errors": [f"client failed: {err!r}"], "chunks": [], "done": False, "order_ok": False,
                          "wall_s": float("nan"), "arrivals": []}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # in this order on the server
    for thread in threads:
        thread.join()
    rows = []
    for i, r in enumerate(results):
        complete = r["done"] and r["order_ok"] and len(r["chunks"]) == chunks
        outcome = "all chunks in order" if complete else ("error: " + r["errors"][0] if r["errors"] else "LOST")
        rows.append([i, len(r["chunks"]), outcome, r["arrivals"][0] if r["arrivals"] else float("nan"), r["wall_s"]])
    return rows


def memory(served: Served, sessions: int) -> list[list[Any]]:
    marks = sorted({1, *range(10, sessions + 1, 10), sessions})
    rows = [[0, rss_mib(served.process.pid)]]
    for n in range(1, sessions + 1):
        result = run_client(served.port, {"num_frames": 33, "seed": n}, 300)
        if not result["done"]:
            raise RuntimeError(f"session {n} failed: {result}")
        if n in marks:
            rows.append([n, rss_mib(served.process.pid)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--chunks", type=int, default=6, help="chunks of the latency run")
    parser.add_argument("--clients", type=int, default=6, help="clients at once in the load run")
    parser.add_argument("--load_chunks", type=int, default=2, help="chunks per client in the load run")
    parser.add_argument("--queue_size", type=int, default=3, help="the server's queue in the load run")
    parser.add_argument("--sessions", type=int, default=50, help="one-chunk sessions in the memory run (nano)")
    parser.add_argument("--results", default=RESULTS, help="the markdown file to append to")
    parser.add_argument("--no-append", dest="results", action="store_const", const=None)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    env = provenance.environment("cpu (the server's jax backend)", provenance.versions(
        "jax", "jaxlib", "starlette", "uvicorn", "websockets", "av"))
    body, result = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            served = Served(model, args.queue_size, folder)
            try:
                lat = latency(served, args.chunks)
                rows = load(served, args.clients, args.load_chunks, 600)
                mem = memory(served, args.sessions) if model == "nano" else None
            finally:
                served.close()
            result[model] = {"latency": lat, "load": rows, "memory": mem}
            body.append(f"### {model} model (served flags: {' '.join(MODELS[model]['flags']) or 'defaults'})\n")
            body.append(reporting.markdown_table(
                ["start-up to /health (load + warm-up), s", "time to first chunk, s", "chunk, server s (median)",
                 "chunk, server s (max)", "wait between chunks, client s (median)", "wait (max)",
                 "real-time factor (1.375 s / median wait)"], lat))
            body.append(f"\nLoad: {args.clients} clients at once, {args.load_chunks} chunks each, --queue_size "
                        f"{args.queue_size} (one runs, {args.queue_size} wait, the rest must get the queue's error):\n")
            body.append(reporting.markdown_table(["client", "chunks", "outcome", "first chunk after, s",
                                                  "wall, s"], rows))
            if mem:
                body.append(f"\nServer RSS over {args.sessions} one-chunk sessions in a row:\n")
                body.append(reporting.markdown_table(["sessions", "RSS, MiB"], mem))
    body.append(f"\nMeasurements (not plans), {args.chunks}-chunk latency run per model; {reporting.load_note()}. "
                "The server's start-up includes loading the weights and the warm-up generation that compiles the "
                "programs.\n")
    reporting.report("serve_latency: helios-jax serve from a client on localhost", env, "\n".join(body), result, args)


if __name__ == "__main__":
    main()
