"""Results as markdown tables, appended to RESULTS.md, and as JSON; files written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Sequence

from experiments.paths import RESULTS
from experiments.provenance import describe

RESULTS_HEADER = """# Benchmark results

Every run of a script in `experiments/` appends one section here: what ran, on which device, with
which versions, at which commit, and its table. Older sections stay as they were measured.
"""


def report(script: str, env: dict[str, Any], body: str, result: dict[str, Any], args: Any) -> dict[str, Any]:
    """Print a benchmark's tables and keep them where ``--results`` and ``--json`` say."""
    print(body, flush=True)
    if args.results:
        append_results(script, env, body, args.results)
    if args.json:
        write_json(args.json, result)
    return result


def load_note() -> str:
    """How loaded this CPU was as a run ended, for a table of seconds measured on a machine others share."""
    return (f"this CPU's load average at the end {os.getloadavg()[0]:.1f} (a shared machine: the seconds are "
            "measurements under that load)")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def append_results(title: str, env: dict[str, Any], body: str, path: str = RESULTS) -> None:
    """Append one section (title, environment, tables and notes) to RESULTS.md, atomically."""
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else RESULTS_HEADER
    write_atomic(path, old.rstrip("\n") + f"\n\n## {title}\n\n{describe(env)}\n{body.rstrip()}\n")


def write_json(path: str, payload: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(payload, indent=1, default=str) + "\n")


def gib(nbytes: float) -> float:
    return nbytes / 2**30
