"""Progress of long work (chunks and their denoising steps, tensors, training steps): a tqdm bar on a
terminal, one ``logging`` line per item (or per few items) otherwise.

tqdm rather than rich: it is what diffusers, transformers and huggingface_hub users already see for the
same kind of work, it is small and has no dependencies, its bar carries the rate and the ETA as they are,
and ``tqdm.write`` prints a log line above a live bar without breaking it. rich's bars are richer but want
its own console and logging handler to do the same. When standard error is not a terminal (a log file, CI,
a pipe) a bar would be carriage returns in one long line, so each item is a logged line instead.

Messages go through the ``helios_jax`` logger hierarchy; nothing here configures a handler: the CLI does
(:class:`LogHandler`), and a library user silences them the usual way,
``logging.getLogger("helios_jax").setLevel(logging.WARNING)``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, Sequence, TextIO, TypeVar

from tqdm import tqdm

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Progress:
    """``with Progress(total, "training") as bar: ... bar.advance(note="loss 0.1")``.

    ``enabled``: True draws a bar, False shows nothing, None (the default) draws a bar when ``stream``
    (standard error) is a terminal and otherwise logs a line at INFO per item, or about ``lines`` lines in
    all (a training run of 10,000 steps should not log 10,000 lines)."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", enabled: bool | None = None,
                 stream: TextIO | None = None, lines: int | None = None, position: int = 0):
        stream = stream or sys.stderr
        self.total, self.desc, self.done, self._logged = total, desc, 0, 0
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=stream, position=position, dynamic_ncols=True,
                        leave=True) if (stream.isatty() if enabled is None else enabled) else None
        self.logs = enabled is None and self.bar is None
        self.every = 1 if lines is None else max(1, total // max(lines, 1))
        self._start = self._last = time.perf_counter()

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
        elif self.logs and (self.done - self._logged >= self.every or self.done >= self.total):
            now = time.perf_counter()
            elapsed = now - self._start
            eta = elapsed / self.done * max(self.total - self.done, 0)
            logger.info("%s %d/%d: %.1f s%s; %s elapsed, ETA %s", self.desc, self.done, self.total,
                        now - self._last, f" ({note})" if note else "", tqdm.format_interval(elapsed),
                        tqdm.format_interval(eta))
            self._last, self._logged = now, self.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], total: int, desc: str, unit: str = "it") -> Iterator[T]:
    """Iterate ``items`` while advancing a :class:`Progress` (a loop with ``continue`` in it needs no bookkeeping)."""
    with Progress(total, desc, unit=unit) as bar:
        for item in items:
            yield item
            bar.advance()


class ChunkProgress:
    """A generation's progress: a bar of chunks and, under it, a bar of denoising steps, each with its ETA.

    A chunk's steps run inside one compiled program with no host callback (a round trip per step would
    stall the device), so the step bar moves by a chunk's steps when that chunk's frames reach the host:
    it counts steps done and their rate, not the step running now. Off a terminal, one line per chunk says
    its seconds, frames and steps."""

    def __init__(self, steps_per_chunk: Sequence[int], *, enabled: bool | None = None, stream: TextIO | None = None):
        self.steps_per_chunk = list(steps_per_chunk)
        self.chunks = Progress(len(self.steps_per_chunk), "chunk", unit="chunk", enabled=enabled, stream=stream)
        self.steps = Progress(sum(self.steps_per_chunk), "steps", unit="step", stream=stream, position=1,
                              enabled=self.chunks.bar is not None)

    def chunk_done(self, frames: int) -> None:
        steps = self.steps_per_chunk[self.chunks.done]
        self.steps.advance(steps)
        self.chunks.advance(note=f"{frames} frames, {steps} steps")

    def __enter__(self) -> "ChunkProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.steps.close()
        self.chunks.close()


class LogHandler(logging.Handler):
    """The CLI's handler: each record on its own line of standard error (the one current at the time, as
    ``print`` does), written through ``tqdm.write`` so that a live bar there is redrawn below it instead of
    broken; levels other than INFO are named."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler reports, never raises
            self.handleError(record)
