"""Every GPU measurement of the project in one command, and the JAX / PyTorch table from them.

    python3 experiments/run_all.py --setup                 # on the GPU machine: everything
    python3 experiments/run_all.py --setup --parts dit,reference
    python experiments/run_all.py --merge results.md       # here: add a run's sections to RESULTS.md

Parts, in this order (each one a fresh process, so that JAX and torch each get the whole GPU):
``dit`` (bench_dit.py), ``reference`` (bench_reference.py), ``attention`` (bench_attention.py
--tune --mosaic), ``tests`` (tests/test_kernels.py with the compiled kernel), ``compile``
(compile_study.py --run). Each part writes ``<part>.json`` and its log to ``--out`` as soon as it
ends, so a run cut short keeps what finished. Whenever ``dit.json`` and ``reference.json`` are both
in ``--out`` (from this run or carried in from an earlier one on the same kind of GPU), the JAX /
torch table is printed and appended. All markdown sections go to ``<out>/results.md``, which
``--merge`` appends to experiments/RESULTS.md (the GPU machine's copy of the repository is not kept).

``--setup`` first puts this package (its dependencies are in the GPU image: jax, flax, torch) and
the wheels carried in ``.whl/`` (diffusers) into ``/tmp/site``, offline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib

import common

PARTS = {
    "dit": ["experiments/bench_dit.py"],
    "reference": ["experiments/bench_reference.py"],
    "attention": ["experiments/bench_attention.py", "--tune", "--mosaic"],
    # -P: the checkout's root stays off sys.path, so tests import the installed package (kernels/ maps into it).
    "tests": ["-P", "-m", "pytest", "tests/test_kernels.py", "-q", "-rs", "--durations=10"],
    "compile": ["experiments/compile_study.py", "--run"],
}
SITE = "/tmp/site"


def setup(env: dict[str, str]) -> None:
    """Put helios-jax and the carried wheels into SITE, offline, and SITE on the children's path.

    The package is copied as pyproject's ``package-dir`` maps it (kernels/ and convert/ inside
    helios_jax), which needs no build backend; wheels (pure Python: diffusers) are unpacked by pip.
    """
    with open(os.path.join(common.ROOT, "pyproject.toml"), "rb") as f:
        package_dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dirs.items()):  # parents before their subpackages
        shutil.copytree(os.path.join(common.ROOT, folder), os.path.join(SITE, *package.split(".")),
                        dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    wheel_dir = os.path.join(common.ROOT, ".whl")
    wheels = sorted(os.path.join(wheel_dir, f) for f in os.listdir(wheel_dir) if f.endswith(".whl")) \
        if os.path.isdir(wheel_dir) else []
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", SITE, *wheels], check=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SITE, env.get("PYTHONPATH")]))
    print(f"helios-jax ({', '.join(sorted(package_dirs))}) and {len(wheels)} wheel(s) in {SITE}", flush=True)


def run_part(name: str, out: str, env: dict[str, str], extra: list[str], log) -> bool:
    """Run one part in its own process, tee its output into the log; True if it succeeded."""
    command = [sys.executable, *PARTS[name], *extra]
    if name != "tests":
        command += ["--json", os.path.join(out, f"{name}.json"), "--results", os.path.join(out, "results.md")]
    banner = f"\n=== {name}: {' '.join(command[1:])}\n"
    print(banner, end="", flush=True)
    log.write(banner)
    start = time.perf_counter()
    child_env = dict(env, JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cuda")) if name == "tests" else env
    with subprocess.Popen(command, cwd=common.ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as child:
        for line in child.stdout:
            print(line, end="", flush=True)
            log.write(line)
    done = f"=== {name}: exit {child.returncode} after {time.perf_counter() - start:.0f} s\n"
    print(done, end="", flush=True)
    log.write(done)
    log.flush()
    return child.returncode == 0


def ratio_table(dit: dict, reference: dict) -> str:
    """Per stage: each JAX impl and each torch setting in ms, and torch's time over JAX's best."""
    jax_rows, torch_rows = dit["tables"]["forward"]["rows"], reference["tables"]["forward"]["rows"]
    timed = lambda row, col: isinstance(row[col], (int, float))  # noqa: E731  (failed rows hold text)
    rows = []
    for stage in sorted({r[0] for r in jax_rows} & {r[0] for r in torch_rows}):
        jax_ms = {r[2]: r[4] for r in jax_rows if r[0] == stage and timed(r, 4)}
        torch_ms = {f"{r[2]} {r[3]}": r[5] for r in torch_rows if r[0] == stage and timed(r, 5)}
        if not jax_ms or not torch_ms:
            continue
        best_jax = min(jax_ms, key=jax_ms.get)
        best_torch = min(torch_ms, key=torch_ms.get)
        tokens = next(r[1] for r in jax_rows if r[0] == stage)
        rows.append([stage, tokens, *(jax_ms.get(i, "") for i in ("cudnn", "pallas", "xla")),
                     *(torch_ms.get(k, "") for k in ("eager flash", "eager cudnn", "compiled flash")),
                     f"{best_jax} / {best_torch}", torch_ms[best_torch] / jax_ms[best_jax]])
    headers = ["stage", "tokens", "JAX cudnn ms", "JAX pallas ms", "JAX xla ms", "torch eager flash ms",
               "torch eager cudnn ms", "torch compiled flash ms", "best JAX / best torch", "torch ms / JAX ms"]
    devices = {dit["env"]["device"], reference["env"]["device"]}
    note = "" if len(devices) == 1 else f"\nWARNING: measured on different devices: {sorted(devices)}\n"
    return (f"DiT forward, JAX (bench_dit, {dit['env']['commit']}) against diffusers + torch (bench_reference), "
            f"same weights' shapes and inputs; > 1 in the last column: JAX is faster (the aim is >= 1.1).\n\n"
            + common.markdown_table(headers, rows) + note)


def combine(out: str, log) -> None:
    paths = [os.path.join(out, f"{part}.json") for part in ("dit", "reference")]
    if not all(os.path.exists(p) for p in paths):
        return
    dit, reference = (json.load(open(p)) for p in paths)
    body = ratio_table(dit, reference)
    env = dict(dit["env"], versions={**dit["env"]["versions"], **reference["env"]["versions"]})
    print("\n" + body, flush=True)
    log.write("\n" + body)
    common.append_results("run_all: JAX vs PyTorch", env, body, os.path.join(out, "results.md"))


def merge(path: str, results: str = common.RESULTS) -> None:
    """Append the sections of a run's results.md (everything after its header) to RESULTS.md."""
    text = open(path, encoding="utf-8").read()
    sections = text[text.index("\n## "):] if "\n## " in text else ""
    if not sections:
        raise SystemExit(f"{path}: no '## ' sections to merge")
    old = open(results, encoding="utf-8").read() if os.path.exists(results) else common.RESULTS_HEADER
    common.write_atomic(results, old.rstrip("\n") + "\n" + sections.rstrip("\n") + "\n")
    print(f"appended {sections.count(chr(10) + '## ')} section(s) of {path} to {results}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, among {list(PARTS)}")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(common.ROOT, "out", "bench"),
                        help="where JSON, logs and results.md go (default: $OUT if set, else out/bench)")
    parser.add_argument("--carried", default=os.path.join(common.ROOT, "out", "bench"),
                        help="earlier runs' JSON files to combine with (copied into --out if missing there)")
    parser.add_argument("--setup", action="store_true", help="put helios-jax and .whl/*.whl into /tmp/site first")
    parser.add_argument("--extra", action="append", default=[], metavar="PART:ARGS",
                        help="extra arguments for one part, e.g. --extra 'reference:--modes eager'")
    parser.add_argument("--merge", metavar="RESULTS_MD", help="only append that file's sections to RESULTS.md")
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge)
        return 0

    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose among {list(PARTS)}")
    extra = {p: [] for p in parts}
    for item in args.extra:
        part, _, rest = item.partition(":")
        extra[part] = rest.split()
    os.makedirs(args.out, exist_ok=True)
    for name in ("dit.json", "reference.json"):
        carried = os.path.join(args.carried, name)
        if os.path.exists(carried) and not os.path.exists(os.path.join(args.out, name)):
            shutil.copy(carried, args.out)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.setup:
        setup(env)
    failed = []
    with open(os.path.join(args.out, "run_all.log"), "a", encoding="utf-8") as log:
        for part in parts:
            if not run_part(part, args.out, env, extra[part], log):
                failed.append(part)
        if {"dit", "reference"} & set(parts):
            combine(args.out, log)
    print(f"\nresults in {args.out}" + (f"; FAILED: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
