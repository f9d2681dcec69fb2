"""An experiment in a fresh Python process: ``python -P -m experiments.<sub>.<name>``, from any folder.

``-P`` keeps the current folder off the child's path, so that ``helios_jax`` is always the installed package
(a checkout's ``helios_jax/`` folder lacks ``kernels`` and ``convert``, which pyproject's ``package-dir`` maps
in; on the GPU machine the package is the copy in ``/tmp/site``); :func:`environment` puts the checkout's
root last on ``PYTHONPATH``, for ``experiments`` alone.
"""

from __future__ import annotations

import os
import sys

from experiments.paths import ROOT


def command(module: str, *args: str) -> list[str]:
    """The command line that runs ``module`` (e.g. ``experiments.benchmarks.bench_dit``) with ``args``."""
    return [sys.executable, "-P", "-m", module, *args]


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with the checkout's root appended to ``PYTHONPATH``."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH"), ROOT] if p)
    return env
