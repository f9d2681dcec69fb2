"""A full disk as one clear error, wherever helios-jax writes (clips, checkpoints, converted folders, videos).

Each writer knows how many bytes it is about to write, so it checks the free space first and refuses
before any work; the space can still run out during the write (another process fills the disk), and the
libraries report that in their own ways (``OSError`` errno 28, safetensors' ``SafetensorError``, orbax's
tensorstore ``RESOURCE_EXHAUSTED``). :func:`disk_full_as_error` turns all of them into one
:class:`DiskFullError` naming the path, the bytes needed and the bytes free; the caller removes its
partial file, as it does for any failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Iterator

MARGIN = 1.02  # headers, indexes and metadata beside the tensors' own bytes


class DiskFullError(OSError):
    """No space left for a write (an ``OSError``, so the CLI reports it as the environment's error)."""

    def __init__(self, path: str, needed: int | None):
        self.path, self.needed = path, needed
        free = free_bytes(path)
        need = f"needs about {human(needed)}" if needed else "needs more space"
        have = f"{human(free)} free" if free is not None else "free space unknown"
        super().__init__(errno.ENOSPC, f"no space left on the device to write {path}: it {need}, {have}; "
                                       "free some space or write elsewhere")

    def __str__(self) -> str:
        return self.strerror


def human(n: int) -> str:
    """A byte count in the largest binary unit that keeps it at or above one."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def free_bytes(path: str) -> int | None:
    """The free bytes of the file system that holds ``path`` (its nearest existing folder), or None."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_free(path: str | os.PathLike, needed: int) -> None:
    """Refuse, before any work, a write of ``needed`` bytes that the disk holding ``path`` has no room for."""
    path = os.fspath(path)
    free = free_bytes(path)
    if free is not None and needed * MARGIN > free:
        raise DiskFullError(path, needed)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is the disk running out of space, in any library's words."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        text = str(err)
        if "No space left" in text or ("RESOURCE_EXHAUSTED" in text and "space" in text.lower()):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike, needed: int | None) -> Iterator[None]:
    """Re-raise a full disk during the block as one :class:`DiskFullError` for ``path``; else unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:  # noqa: BLE001 - only a full disk is translated; the rest goes on as it was
        if is_disk_full(err):
            raise DiskFullError(os.fspath(path), needed) from None
        raise


@contextlib.contextmanager
def orbax_failures_quiet() -> Iterator[None]:
    """Around an orbax save or restore: a failed write or read is reported once, by the caller. orbax's threads
    log each failure with its traceback (absl's logger), and its coroutines' and tensorstore's callbacks raise
    where Python can only print ("Exception ignored in ...", "Event loop is closed"): a full disk or a damaged
    checkpoint made dozens of tracebacks. Both are held back during the block; if the block fails they are
    dropped (its one error says it all), and if it succeeds the held-back ones are printed as before."""
    import gc
    import logging
    import sys

    absl = logging.getLogger("absl")
    level, previous_hook = absl.level, sys.unraisablehook
    held = []
    absl.setLevel(logging.CRITICAL)
    sys.unraisablehook = held.append
    failed = True
    try:
        yield
        failed = False
    finally:
        gc.collect()  # the failed coroutines and callbacks are collected here, under the holding hook
        sys.unraisablehook = previous_hook
        absl.setLevel(level)
        for info in [] if failed else held:
            if not (isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value)):
                previous_hook(info)


def tree_nbytes(tree) -> int:
    """The bytes of every array leaf of a params tree (or a dict of arrays)."""
    import jax

    return sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(tree))
