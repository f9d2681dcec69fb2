"""A dependency-free progress line for long work (shards, chunks, steps).

It draws on standard error only when that is a terminal, so logs and CI output stay clean.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")


class Progress:
    """``with Progress(total, "converting") as bar: ... bar.advance()``; silent when not on a TTY."""

    def __init__(self, total: int, desc: str, *, stream: TextIO | None = None, enabled: bool | None = None):
        self.total, self.desc, self.done = total, desc, 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._start = time.perf_counter()

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self.enabled:
            elapsed = time.perf_counter() - self._start
            width = 24
            filled = int(width * self.done / max(self.total, 1))
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{self.desc} [{bar}] {self.done}/{self.total} {elapsed:6.1f}s {note}\033[K")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def track(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """Iterate ``items`` while advancing a :class:`Progress` line."""
    with Progress(total, desc) as bar:
        for item in items:
            yield item
            bar.advance()
