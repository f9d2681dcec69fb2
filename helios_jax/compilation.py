"""The persistent XLA compilation cache, on by default for generation.

A 14B chunk program takes minutes to compile; with the cache, the second run of the same shapes
(another process, another day) loads it in seconds. The cache lives in the user's cache folder.
"""

from __future__ import annotations

import logging
import os
from typing import Hashable

import jax

MIN_COMPILE_SECONDS = 1.0  # programs faster to compile than this are not worth a disk entry
logger = logging.getLogger(__name__)
_RUN: set[Hashable] = set()  # the programs this process has run (jax keeps them in memory until clear_caches)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "helios-jax", "xla")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn the persistent cache on (``path`` or the default folder) unless it is already set; returns it. A
    folder that cannot be made or written (a read-only home, a full disk) only costs the cache, not the run:
    generation goes on without it, after one warning that says so (None is returned)."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = os.fspath(path) if path is not None else default_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
        usable = os.access(path, os.W_OK | os.X_OK)
        reason = "it is not writable"
    except OSError as err:
        usable, reason = False, err.strerror or str(err)
    if not usable:
        logger.warning("the compilation cache folder %s cannot be used (%s): running without the persistent "
                       "cache, so every program compiles afresh (--no_compilation_cache silences this)", path, reason)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path


def note_first_run(program: Hashable, what: str) -> None:
    """Log at INFO, once per process for each ``program`` (a key that fixes the compiled program), that
    ``what`` compiles now: its first run takes the compile's seconds or minutes, or a load from the cache."""
    if program in _RUN:
        return
    _RUN.add(program)
    folder = jax.config.jax_compilation_cache_dir
    logger.info("compiling %s (first run; %s)", what, f"cached in {folder}" if folder else "the persistent cache is off")
