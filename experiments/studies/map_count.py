"""Why one long pytest process died inside XLA's CPU compile: memory mappings, held by compiled programs.

Linux caps the memory mappings of one process at ``vm.max_map_count`` (65,530 by default). Every XLA:CPU
executable holds several (its JIT-compiled code, constants and data), for as long as a cache keeps the program, and
jax's caches keep every program of a process. The study measures, each in a fresh process:

* ``per-program``: the mappings 200 small distinct programs add while kept alive, and what is left after
  ``jax.clear_caches()`` (the test suite calls it after every test file);
* ``at-the-limit``: a process that first fills its mappings to near the limit (with 4 KiB anonymous maps of its
  own), then compiles programs that it keeps: how it ends (its exit status and XLA's last words).

    python -m experiments.studies.map_count [--no-append]
"""

from __future__ import annotations

import argparse
import json
import mmap
import subprocess
import sys

from experiments import processes, provenance, reporting

PROGRAMS = 200
HEADROOM = 200  # mappings left free before the at-the-limit compile


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def _program(i: int):
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: jnp.sin(x * i) @ x.T + i)
    f(jnp.ones((8, 8))).block_until_ready()
    return f


def per_program() -> dict[str, int]:
    import gc

    import jax

    start = _maps()
    kept = [_program(i) for i in range(PROGRAMS)]
    held = _maps()
    jax.clear_caches()
    gc.collect()
    return {"start": start, "held": held, "after_clear_caches": _maps(), "programs": len(kept)}


def at_the_limit() -> None:
    limit = int(open("/proc/sys/vm/max_map_count").read())
    kept = [_program(-1)]  # jax and its libraries loaded before the filler, so that only compiles need new maps
    filler = []
    while (free := limit - HEADROOM - _maps()) > 0:
        filler.extend(mmap.mmap(-1, 4096) for _ in range(min(free, 1000)))
    print(json.dumps({"limit": limit, "filled_to": _maps()}), flush=True)
    for i in range(PROGRAMS):
        kept.append(_program(i))
    print(json.dumps({"survived": len(kept) - 1, "maps": _maps()}), flush=True)


def run(mode: str) -> subprocess.CompletedProcess:
    env = processes.environment()
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([*processes.command("experiments.studies.map_count"), "--mode", mode], env=env,
                          capture_output=True, text=True, timeout=600)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--mode", choices=["per-program", "at-the-limit"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode == "per-program":
        print(json.dumps(per_program()))
        return
    if args.mode == "at-the-limit":
        at_the_limit()
        return
    counts = json.loads(run("per-program").stdout.strip().splitlines()[-1])
    limit = run("at-the-limit")
    last_words = [line for line in limit.stderr.splitlines() if "error" in line.lower()][-2:]
    rows = [["mappings at start", counts["start"]],
            [f"with {PROGRAMS} small programs kept", counts["held"]],
            ["per program", f"{(counts['held'] - counts['start']) / PROGRAMS:.1f}"],
            ["after jax.clear_caches()", counts["after_clear_caches"]],
            [f"compiling at {HEADROOM} below vm.max_map_count: exit status", limit.returncode],
            ["its last lines on stderr", "<br>".join(f"`{w.strip()}`" for w in last_words) or "(none)"]]
    table = reporting.markdown_table(["what", "value"], rows)
    table += ("\nEach XLA:CPU executable holds its own memory mappings until its program is released. One pytest "
              "process that compiles the whole suite's programs reaches the kernel's limit, and the next compile "
              "fails inside LLVM (a negative exit status is the signal that killed it). The test suite releases "
              "every program after each test file (tests/conftest.py).\n")
    env = provenance.jax_environment()
    print(provenance.describe(env) + "\n" + table)
    if not args.no_append:
        reporting.append_results("map_count: compiled programs hold memory mappings", env, table)


if __name__ == "__main__":
    main(sys.argv[1:])
