"""Test-wide settings: the CPU backend, float32 matmuls at full precision, quiet reference libraries, and no
persistent compilation cache carried from one test into the next."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where a GPU is present; elsewhere they are reported as skipped."""
    has_gpu = any(d.platform == "gpu" for d in jax.devices()) if os.environ.get("JAX_PLATFORMS") != "cpu" else False
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with JAX_PLATFORMS=cuda on a GPU machine; unset means cpu here)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _compilation_cache_stays_in_its_test():
    """A test that generates through ``HeliosPipeline.from_pretrained`` (the CLI's tests) turns jax's persistent
    cache on for the whole process; without this, every later test would write its programs there. That is not
    what those tests check, and on the CPU serializing a large training program into the cache has aborted the
    whole pytest process (XLA's own abort, in ``put_executable_and_time``)."""
    before = jax.config.jax_compilation_cache_dir
    yield
    if jax.config.jax_compilation_cache_dir != before:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()
