"""Shared by every benchmark: the environment line and appending a table to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

RESULTS = os.path.join(os.path.dirname(__file__), "RESULTS.md")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(__file__))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(__file__)).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> str:
    """Device, library versions, date and commit, as one line."""
    import jax

    versions = [f"jax {jax.__version__}"]
    for name in ("jaxlib", "flax", "torch", "diffusers"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    cpu = platform.processor() or platform.machine()
    return (f"device: {device.platform} ({kind}), host {cpu} x{os.cpu_count()}; " + ", ".join(versions)
            + f"; {datetime.date.today().isoformat()}; commit {_commit()}")


def append_result(title: str, table: str) -> None:
    """Append a titled table with its environment line to experiments/RESULTS.md."""
    new = not os.path.exists(RESULTS)
    with open(RESULTS, "a", encoding="utf-8") as f:
        if new:
            f.write("# Results\n\nEvery benchmark run appends its table here, with device, versions, date and commit.\n")
        f.write(f"\n## {title}\n\n{environment()}\n\n{table}\n")
