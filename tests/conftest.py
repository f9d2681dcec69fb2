"""Test-wide settings: the CPU backend, float32 matmuls at full precision, quiet reference libraries, no
persistent compilation cache in the test process, and every compiled program released after each test file."""

import gc
import logging
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA:CPU compiles the tests' programs 1.6x faster with its classic fusion emitters and LLVM at -O1 (the demo DiT's
# loss-and-gradient program: 8.2 s -> 5.2 s, run time about the same, the loss equal to 1e-7 relative: float32
# rounding; RESULTS.md "xla_cpu_flags"). Nearly all of the suite's time is XLA's compile. The HLO is unchanged and
# every parity check keeps its tolerance; HELIOS_TEST_XLA_FLAGS="" runs the suite with XLA's defaults. Set in the environment, so the CLI subprocesses and the
# multi-device workers of the tests compile the same way.
TEST_XLA_FLAGS = os.environ.get("HELIOS_TEST_XLA_FLAGS",
                                "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Generating through HeliosPipeline.from_pretrained turns jax's persistent cache on for the whole process (the
# CLI's tests and `offload ode-pairs` do, in this process): every later program compiled in over a second would
# then be serialized and written there (into ~/.cache for some), the DMD steps of test_train_dmd included. The
# tests that check the cache run their command in a subprocess, where it stays on. (One CI-rehearsal abort was in
# such a write; the abort recurred without any cache: the cause was the map count, below.)
jax.config.update("jax_enable_compilation_cache", False)

pytest_plugins = ["compile_time"]


@pytest.fixture(autouse=True)
def library_logging_as_imported():
    """Each test starts with the ``helios_jax`` logger as a library user gets it: a test that ran the CLI
    (``cli.main`` installs a handler and stops propagation) must not hide later tests' messages from caplog."""
    yield
    library = logging.getLogger("helios_jax")
    for handler in list(library.handlers):
        library.removeHandler(handler)
    library.setLevel(logging.NOTSET)
    library.propagate = True


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drop every compiled program when a test file ends.

    Each XLA:CPU executable holds about six memory mappings (its JIT-compiled code and data) for as long as a
    cache keeps it, and jax's caches (and the library's per-process program caches built on them) keep every one.
    A process may hold at most ``vm.max_map_count`` (65530) mappings: one long pytest process reached it late in
    the suite, and the next compile failed inside LLVM ("LLVM compilation error: Cannot allocate memory") and
    killed the process. ``jax.clear_caches()`` releases the executables; a program used by two files is compiled
    twice, which costs far less than one process per file."""
    yield
    jax.clear_caches()
    gc.collect()


# The slowest files first, by the per-file table of a full run (tests/compile_time.py; two workers, CI's two cores):
# `make test` hands files to its workers in collection order (--dist loadfile --no-loadscope-reorder), and a long
# file handed out last leaves the other worker idle at the end. A file not listed keeps its alphabetical place.
SLOWEST_FIRST = ("test_parallel_devices.py", "test_train_dmd.py", "test_trainer.py", "test_experiments.py",
                 "test_pipeline.py", "test_train_command.py", "test_ode.py", "test_generation.py",
                 "test_transformer.py", "test_distill.py", "test_cli.py", "test_compiled_programs.py",
                 "test_training_faults.py", "test_autoencoder.py", "test_examples.py", "test_nano_model.py",
                 "test_verify_checkpoint.py", "test_step_cache.py", "test_session.py", "test_serve.py",
                 "test_splash.py")


def pytest_collection_modifyitems(config, items):
    """The slowest files first (a stable sort: each file's tests stay together and in order). GPU tests run only
    where a GPU is present; elsewhere they are reported as skipped. The browser tier (make browser-test) is
    deselected unless ``-m`` names it."""
    if "browser" not in (config.getoption("markexpr") or ""):  # the real-browser tier runs only as -m browser
        browser = [item for item in items if "browser" in item.keywords]
        items[:] = [item for item in items if "browser" not in item.keywords]
        config.hook.pytest_deselected(items=browser)
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    has_gpu = any(d.platform == "gpu" for d in jax.devices()) if os.environ.get("JAX_PLATFORMS") != "cpu" else False
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with JAX_PLATFORMS=cuda on a GPU machine; unset means cpu here)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)
