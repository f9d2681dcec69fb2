"""Runs ``parallel_worker.py`` in a subprocess with 8 virtual CPU devices and returns its .npz results.

Importing this module has no side effects on JAX (the worker sets XLA_FLAGS; a test importing the worker
would give the whole pytest session 8 devices), so the cases the worker and the tests share live here."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np

# Distilled (pyramid, DMD, no CFG) with 8 heads: Ulysses at two context sizes (49 and 76 tokens get padded), the
# context axis beside data, FSDP and tensor parallelism. Base (one stage, UniPC, CFG) with 4 heads: what only it has,
# the K/V all-gather fallback (context=8 > 4 heads, 184 tokens) and CFG's two branches split over data. Each mesh
# compiles its own chunk program, so the cases are the distinct code paths, not every size.
MESHES = {
    "distilled": ({"context": 2}, {"context": 8}, {"data": 2, "context": 4}, {"fsdp": 4}, {"tensor": 2}),
    "base": ({"context": 8}, {"data": 2, "context": 4}),
}


def name(sizes: dict[str, int]) -> str:
    """The file-safe name of a mesh's sizes: ``{"data": 2, "context": 4}`` -> ``data2_context4``."""
    return "_".join(f"{a}{n}" for a, n in sizes.items())


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_env(devices: int = 8) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])  # the tests' own flags kept
    # The worker runs as a script (tests/ first on its path); the checkout's root, last, for experiments.tiny_training.
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH"), ROOT] if p)
    return env


def run_worker(mode: str, folder: str, *args: str, timeout: int = 1800) -> dict[str, np.ndarray]:
    out = os.path.join(folder, f"{mode}.npz")
    proc = subprocess.run([sys.executable, WORKER, mode, *args, out], env=worker_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


def rel_err(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(relative L2 error, max-abs error)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)), float(np.abs(ours - ref).max())


def collectives(hlo: str, op: str) -> list[list[tuple[int, ...]]]:
    """The result shapes of every ``op`` (all-gather, all-to-all, ...) in compiled HLO text, one list per op
    (a tuple-shaped result gives several shapes)."""
    found = []
    for line in hlo.splitlines():
        match = re.match(rf"\s*(ROOT )?%\S+ = (.*?) {op}(-start)?\(", line)
        if match:
            found.append([tuple(int(d) for d in dims.split(",") if d)
                          for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", match.group(2))])
    return found
