"""What ran where: the date, the commit, the device, the host and the versions every result is printed with."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from typing import Any

from experiments.paths import ROOT


def git_commit() -> str:
    """HEAD's short hash, with '+dirty' when the tree has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` ('absent' for one that is not installed)."""
    found = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def environment(device: str, versions: dict[str, str]) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "device": device,
        "host": f"{platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()}",
        "versions": versions,
    }


def jax_environment(*packages: str) -> dict[str, Any]:
    """:func:`environment` of JAX's first device, with the versions of jax, jaxlib, its CUDA plugin and ``packages``."""
    import jax

    device = jax.devices()[0]
    return environment(f"{device.device_kind} ({device.platform})",
                       versions("jax", "jaxlib", "jax-cuda13-plugin", *packages))


def describe(env: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (f"- date: {env['date']}\n- commit: {env['commit']}\n- device: {env['device']}\n"
            f"- host: {env['host']}\n- versions: {versions}\n")
