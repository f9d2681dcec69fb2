"""Every GPU measurement of the project in one command, and the JAX / PyTorch table from them.

    python3 -m experiments.benchmarks.run_all --setup            # on the GPU machine: everything
    python3 -m experiments.benchmarks.run_all --setup --parts distilled-cudnn,reference-distilled-eager
    python -m experiments.benchmarks.run_all --merge results.md  # here: add a run's sections to RESULTS.md
    python -m experiments.benchmarks.run_all --combine out/bench # here: JAX / torch tables from several calls' JSON

Parts, in this order (each one a fresh process, so that JAX and torch each get the whole GPU):
``dit`` (bench_dit.py: DiT forwards), ``reference`` (bench_reference.py: the same in torch),
``distilled`` and ``reference-distilled`` (the distilled chunk, FPS), ``attention`` (bench_attention.py
--tune --mosaic), ``tests`` (tests/test_kernels.py and tests/test_mosaic_attention.py with the compiled kernels), ``compile``
(compile_study.py --run), ``base`` and ``reference-base`` (the base model's 50-step CFG chunk). The
benchmark parts also come split, one attention impl or one torch mode each, to fit a time limit per
command: ``dit-cudnn``, ``distilled-pallas``, ``base-xla``, ``reference-eager``,
``reference-distilled-compiled``, ... (``--help`` lists them all). Each part writes ``<part>.json``
and its log to ``--out`` as soon as it ends, so a run cut short keeps what finished. Whenever a measurement is in both a JAX part's and a torch part's JSON in ``--out`` (from
this run or carried in from an earlier one on the same kind of GPU), its JAX / torch table is printed
and appended. All markdown sections go to ``<out>/results.md``, which ``--merge`` appends to
experiments/RESULTS.md (the GPU machine's copy of the repository is not kept); ``--combine DIR`` builds
the JAX / torch tables here from the JSON files of several calls.

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

from experiments import paths, processes, reporting

DIT, REFERENCE = "experiments.benchmarks.bench_dit", "experiments.benchmarks.bench_reference"
# Where the chunk parts keep XLA's compiled programs: it lives as long as the device machine stays warm, so a
# part cut off by the 10-minute limit and run again, or the next impl's decoder, does not compile again.
XLA_CACHE = "/tmp/helios-bench-xla-cache"
PARTS = {
    "dit": [DIT, "--measure", "forward"],
    "reference": [REFERENCE, "--measure", "forward"],
    "distilled": [DIT, "--measure", "distilled", "--compilation-cache", XLA_CACHE],
    "reference-distilled": [REFERENCE, "--measure", "distilled"],
    "attention": ["experiments.benchmarks.bench_attention", "--tune", "--mosaic"],
    # pytest puts pyproject's pythonpath (tests and the checkout's root, for experiments) first on sys.path; here
    # only tests/, so that the tests import the installed package (kernels/ maps into it), not helios_jax/.
    "tests": ["pytest", "-o", "pythonpath=tests", "tests/test_kernels.py", "tests/test_mosaic_attention.py", "-q", "-rs",
              "--durations=10"],
    "compile": ["experiments.studies.compile_study", "--run"],
    "base": [DIT, "--measure", "base", "--compilation-cache", XLA_CACHE],
    "reference-base": [REFERENCE, "--measure", "base"],
}
DEFAULT_PARTS = list(PARTS)
# The benchmark parts split to fit the per-command limit: one attention impl, or one torch mode, per part.
PARTS.update({f"{part}-{impl}": [*PARTS[part], "--impls", impl]
              for part in ("dit", "distilled", "base") for impl in ("cudnn", "pallas", "xla")})
PARTS.update({f"{part}-{mode}": [*PARTS[part], "--modes", mode]
              for part in ("reference", "reference-distilled", "reference-base") for mode in ("eager", "compiled")})
# The parts whose JSON holds measurement tables, per side, for the JAX / torch tables.
JAX_PARTS = tuple(name for name, command in PARTS.items() if command[0] == DIT)
TORCH_PARTS = tuple(name for name, command in PARTS.items() if command[0] == REFERENCE)
SITE = "/tmp/site"


def setup(env: dict[str, str]) -> None:
    """Put helios-jax and the carried wheels into SITE, offline, and SITE on the children's path.

    The package is copied as pyproject's ``package-dir`` maps it (kernels/ and convert/ inside
    helios_jax), which needs no build backend; wheels (pure Python: diffusers) are unpacked by pip.
    """
    with open(os.path.join(paths.ROOT, "pyproject.toml"), "rb") as f:
        package_dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dirs.items()):  # parents before their subpackages
        shutil.copytree(os.path.join(paths.ROOT, folder), os.path.join(SITE, *package.split(".")),
                        dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    wheel_dir = os.path.join(paths.ROOT, ".whl")
    wheels = sorted(os.path.join(wheel_dir, f) for f in os.listdir(wheel_dir) if f.endswith(".whl")) \
        if os.path.isdir(wheel_dir) else []
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", SITE, *wheels], check=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SITE, env.get("PYTHONPATH")]))
    print(f"helios-jax ({', '.join(sorted(package_dirs))}) and {len(wheels)} wheel(s) in {SITE}", flush=True)


def run_part(name: str, out: str, env: dict[str, str], extra: list[str], log) -> bool:
    """Run one part in its own process (``python -P -m`` its module), tee its output into the log; True if it
    succeeded."""
    command = processes.command(*PARTS[name], *extra)
    if name != "tests":
        command += ["--json", os.path.join(out, f"{name}.json"), "--results", os.path.join(out, "results.md")]
    banner = f"\n=== {name}: {' '.join(command[3:])}\n"
    print(banner, end="", flush=True)
    log.write(banner)
    start = time.perf_counter()
    child_env = processes.environment(env)
    if name == "tests":
        child_env.setdefault("JAX_PLATFORMS", "cuda")
    with subprocess.Popen(command, cwd=paths.ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as child:
        for line in child.stdout:
            print(line, end="", flush=True)
            log.write(line)
    done = f"=== {name}: exit {child.returncode} after {time.perf_counter() - start:.0f} s\n"
    print(done, end="", flush=True)
    log.write(done)
    log.flush()
    return child.returncode == 0


def timed(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # failed rows hold text


def forward_ratio(jax_table: dict, torch_table: dict) -> str:
    """Per stage: each JAX impl and each torch setting in ms, and torch's time over JAX's best."""
    jax_rows, torch_rows = jax_table["rows"], torch_table["rows"]
    rows = []
    for stage in sorted({r[0] for r in jax_rows} & {r[0] for r in torch_rows}):
        jax_ms = {r[2]: r[4] for r in jax_rows if r[0] == stage and timed(r[4])}
        torch_ms = {f"{r[2]} {r[3]}": r[5] for r in torch_rows if r[0] == stage and timed(r[5])}
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
    return ("DiT forward, JAX (bench_dit) against diffusers + torch (bench_reference), same weights' shapes and "
            "inputs; > 1 in the last column: JAX is faster (the aim is >= 1.1).\n\n"
            + reporting.markdown_table(headers, rows))


def chunk_ratio(jax_table: dict, torch_table: dict, what: str) -> str:
    """Per setting (VAE, steps, amplify or guidance): steady FPS of each JAX impl and each torch mode, and
    the best JAX FPS over the best torch FPS. Columns are found by header, so both tables may grow."""
    jh, th = jax_table["headers"], torch_table["headers"]
    keys = [h for h in jh if h in th and h in ("VAE", "steps", "amplify 1st", "guidance")]
    fps_j, fps_t = jh.index("FPS"), th.index("FPS")
    chunk_j, chunk_t = jh.index("steady chunk s"), th.index("steady chunk s")

    def by_setting(table, headers, name, fps, chunk):
        found = {}
        for r in table["rows"]:
            if timed(r[fps]):
                key = tuple(r[headers.index(k)] for k in keys)
                found.setdefault(key, {})[name(r)] = (r[fps], r[chunk])
        return found

    jax_fps = by_setting(jax_table, jh, lambda r: r[jh.index("impl")], fps_j, chunk_j)
    torch_fps = by_setting(torch_table, th, lambda r: f"{r[th.index('mode')]} {r[th.index('attention')]}", fps_t,
                           chunk_t)
    impls = list(dict.fromkeys(i for found in jax_fps.values() for i in found))
    settings = list(dict.fromkeys(t for found in torch_fps.values() for t in found))
    rows = []
    for key in [k for k in jax_fps if k in torch_fps]:
        j, t = jax_fps[key], torch_fps[key]
        best_j, best_t = max(j, key=lambda i: j[i][0]), max(t, key=lambda i: t[i][0])
        rows.append([*key, *(j[i][0] if i in j else "" for i in impls), *(t[i][0] if i in t else "" for i in settings),
                     j[best_j][1], t[best_t][1], f"{best_j} / {best_t}", j[best_j][0] / t[best_t][0]])
    headers = [*keys, *(f"JAX {i} FPS" for i in impls), *(f"torch {t} FPS" for t in settings),
               "best JAX s/chunk", "best torch s/chunk", "best JAX / best torch", "JAX FPS / torch FPS"]
    return (f"{what}, JAX (bench_dit) against diffusers + torch (bench_reference): steady-state FPS per setting "
            "(frames per chunk over the median steady chunk); > 1 in the last column: JAX is faster.\n\n"
            + reporting.markdown_table(headers, rows))


RATIOS = {
    "forward": forward_ratio,
    "distilled": lambda j, t: chunk_ratio(j, t, "Distilled chunk (pyramid, DMD)"),
    "base": lambda j, t: chunk_ratio(j, t, "Base chunk (single-stage UniPC, CFG)"),
}


def load_side(out: str, parts: tuple[str, ...]) -> tuple[dict, list[dict]]:
    """Every measurement table in the given parts' JSON files in ``out`` (the rows of one measurement from
    several files, e.g. one impl each, joined in part order), and the files' environments."""
    tables, envs = {}, []
    for part in parts:
        path = os.path.join(out, f"{part}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
            for name, table in result["tables"].items():
                if name in tables:
                    tables[name] = dict(tables[name], rows=tables[name]["rows"] + table["rows"])
                else:
                    tables[name] = table
            envs.append(result["env"])
    return tables, envs


def combine(out: str, log=None, results: str | None = None) -> bool:
    """The JAX / torch table of each measurement found on both sides in ``out``, printed and appended to
    ``results`` (default ``<out>/results.md``); False if no measurement is on both sides."""
    (jax_tables, jax_envs), (torch_tables, torch_envs) = load_side(out, JAX_PARTS), load_side(out, TORCH_PARTS)
    common_measures = [m for m in RATIOS if m in jax_tables and m in torch_tables]
    if not common_measures:
        return False
    body = "\n\n".join(RATIOS[m](jax_tables[m], torch_tables[m]) for m in common_measures)
    devices = sorted({env["device"] for env in jax_envs + torch_envs})
    if len(devices) > 1:
        body += f"\nWARNING: measured on different devices: {devices}\n"
    env = dict(jax_envs[0], versions={k: v for e in jax_envs + torch_envs for k, v in e["versions"].items()})
    print("\n" + body, flush=True)
    if log is not None:
        log.write("\n" + body)
    reporting.append_results("run_all: JAX vs PyTorch", env, body, results or os.path.join(out, "results.md"))
    return True


def merge(path: str, results: str = paths.RESULTS) -> None:
    """Append the sections of a run's results.md (everything after its header) to RESULTS.md."""
    text = open(path, encoding="utf-8").read()
    sections = text[text.index("\n## "):] if "\n## " in text else ""
    if not sections:
        raise SystemExit(f"{path}: no '## ' sections to merge")
    old = open(results, encoding="utf-8").read() if os.path.exists(results) else reporting.RESULTS_HEADER
    reporting.write_atomic(results, old.rstrip("\n") + "\n" + sections.rstrip("\n") + "\n")
    print(f"appended {sections.count(chr(10) + '## ')} section(s) of {path} to {results}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help=f"comma-separated, in the order given, among {list(PARTS)} (default: {DEFAULT_PARTS})")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(paths.ROOT, "out", "bench"),
                        help="where JSON, logs and results.md go (default: $OUT if set, else out/bench)")
    parser.add_argument("--carried", default=os.path.join(paths.ROOT, "out", "bench"),
                        help="earlier runs' JSON files to combine with (copied into --out if missing there)")
    parser.add_argument("--setup", action="store_true", help="put helios-jax and .whl/*.whl into /tmp/site first")
    parser.add_argument("--extra", action="append", default=[], metavar="PART:ARGS",
                        help="extra arguments for one part, e.g. --extra 'reference:--modes eager'")
    parser.add_argument("--merge", metavar="RESULTS_MD", help="only append that file's sections to RESULTS.md")
    parser.add_argument("--combine", metavar="DIR",
                        help="only build the JAX / torch tables from the parts' JSON files in DIR (e.g. those of "
                             "several device calls, copied here) and append them to RESULTS.md")
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge)
        return 0
    if args.combine:
        if not combine(args.combine, results=paths.RESULTS):
            raise SystemExit(f"{args.combine}: no measurement has both a JAX part's and a torch part's JSON "
                             f"(JAX parts {list(JAX_PARTS)}, torch parts {list(TORCH_PARTS)})")
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
    for name in (f"{part}.json" for part in JAX_PARTS + TORCH_PARTS):
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
        if set(JAX_PARTS + TORCH_PARTS) & set(parts):
            combine(args.out, log)
    print(f"\nresults in {args.out}" + (f"; FAILED: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
