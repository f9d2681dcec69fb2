"""A pytest plugin that says where the suite's time goes: per test file, the wall time of its tests (fixtures
included) and how much of it jax spent tracing, lowering and compiling (XLA backend), with the number of programs
compiled.

Why: on CI's two cores the suite is a budget, and nearly all of it is XLA's CPU compile. Its own events
(``jax.monitoring``'s duration listeners, the public hook for them) attribute the time; the table at the end of the
run says which file to make cheaper, and whether compiling or running is the cost.
"""

from __future__ import annotations

import collections
import time

import jax
import pytest

EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}
COLUMNS = ("wall", "trace", "lower", "compile", "programs")


class CompileTime:
    def __init__(self) -> None:
        self.per_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.current: collections.Counter | None = None
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, seconds: float, **_) -> None:
        column = EVENTS.get(event)
        if column and self.current is not None:
            self.current[column] += seconds
            self.current["programs"] += column == "compile"

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.current = self.per_file[item.nodeid.split("::")[0]]
        start = time.perf_counter()
        yield
        self.current["wall"] += time.perf_counter() - start
        self.current = None

    def pytest_sessionfinish(self, session) -> None:
        """On a pytest-xdist worker: hand this worker's counters to the controller, which prints the table."""
        if hasattr(session.config, "workeroutput"):
            session.config.workeroutput["compile_time"] = {k: dict(v) for k, v in self.per_file.items()}

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        for name, counts in getattr(node, "workeroutput", {}).get("compile_time", {}).items():
            self.per_file[name].update(counts)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.per_file:
            return
        rows = sorted(self.per_file.items(), key=lambda kv: -kv[1]["wall"])
        total = sum((c for _, c in rows), collections.Counter())
        write = terminalreporter.write_line
        terminalreporter.section("time per test file (s): wall, and jax's trace / lower / XLA compile within it "
                                 "(summed over pytest-xdist workers)")
        write(f"{'file':<44}" + "".join(f"{c:>10}" for c in COLUMNS))
        for name, c in [*rows, ("total", total)]:
            write(f"{name:<44}" + "".join(f"{c[k]:>10.1f}" for k in COLUMNS[:-1]) + f"{int(c['programs']):>10d}")


def pytest_configure(config) -> None:
    config.pluginmanager.register(CompileTime(), "helios-compile-time")
