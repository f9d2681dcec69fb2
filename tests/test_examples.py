"""examples/ runs: the custom-sampler script in this process, the quickstart notebook in a real Jupyter kernel.

Both use the embedded tiny random-weight checkpoint (``helios_jax.demo``), so they check that the examples
still run against the public API, not what the weights produce.
"""

import os
import runpy

import jax.numpy as jnp
import nbclient
import nbformat
import numpy as np
import pytest

from helios_jax.video import read_mp4

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture(scope="module")
def custom_sampler() -> dict:
    return runpy.run_path(os.path.join(EXAMPLES, "custom_sampler.py"), run_name="custom_sampler")


def test_euler_sample_follows_a_straight_flow_to_its_end(custom_sampler):
    # The flow of one data point x0 is straight: v(x, sigma) = (x - x0) / sigma, and Euler is exact on it, so
    # any schedule lands on x0. A wrong sign, a wrong timestep scale or a skipped step would not.
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 1, 4, 3, 2, 2))
    calls = []
    out = custom_sampler["euler_sample"](lambda x, t: (x - x0) / (t / 1000.0), noise,
                                         custom_sampler["flow_sigmas"](5, 3.0),
                                         callback=lambda step, t, latents: calls.append((step, t)))
    np.testing.assert_allclose(out, x0, rtol=1e-12, atol=1e-12)
    assert [s for s, _ in calls] == [0, 1, 2, 3, 4] and calls[0][1] == 1000.0
    bf16 = custom_sampler["euler_sample"](lambda x, t: x, jnp.ones(2, jnp.bfloat16), np.array([1.0, 0.5, 0.0]))
    assert bf16.dtype == jnp.bfloat16  # the schedule's numbers do not promote the latents


def test_custom_sampler_script_runs_the_dit_with_its_callback(custom_sampler, capsys):
    latents = custom_sampler["main"](["--steps", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(lines) == 2  # the callback, once per step
    assert latents.shape == (1, 16, 9, 128 // 8, 192 // 8)  # one chunk: 9 latent frames at 1/8 of 128x192
    assert np.isfinite(np.asarray(latents)).all()


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    with open(os.path.join(EXAMPLES, "quickstart.ipynb"), encoding="utf-8") as f:
        notebook = nbformat.read(f, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells)  # stored without outputs
    monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "false")  # the kernel writes no cache (conftest's rule)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    shapes = [output["data"]["text/plain"] for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.get("output_type") == "execute_result"]
    assert "((33, 128, 192, 3), dtype('uint8'))" in shapes  # one 33-frame chunk at the demo size
    assert read_mp4(tmp_path / "quickstart.mp4").shape == (33, 128, 192, 3)
