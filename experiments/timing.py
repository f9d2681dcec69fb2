"""Wall time of a device computation: the median over repetitions, launch latency overlapped."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable


def median_ms(run: Callable[[], Any], sync: Callable[[Any], Any], *, warmup: int, reps: int,
              min_sample_s: float = 0.02) -> float:
    """Median wall time of ``run`` in ms, ``sync`` waiting for the device.

    Short calls are issued back to back (``inner`` per sample, enough for ``min_sample_s``) and
    synchronised once, so that launch latency overlaps the device work instead of adding to it.
    """
    for _ in range(warmup):
        sync(run())
    start = time.perf_counter()
    sync(run())
    once = time.perf_counter() - start
    inner = max(1, min(100, math.ceil(min_sample_s / max(once, 1e-6))))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = run()
        sync(out)
        samples.append((time.perf_counter() - start) / inner)
    return 1e3 * statistics.median(samples)
