"""The benchmark scripts run end to end on the CPU at tiny size, so the GPU session only measures.

Nothing here asserts on time (speed is the scripts' output, not a test); the checks are that every
part runs, writes its JSON and its RESULTS section, that the numbers that must agree do (the Pallas
kernel against float32, the unrolled model against the scanned one), and that the JAX / torch
table is built from the two benchmarks' files.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
sys.path.insert(0, EXPERIMENTS)

import bench_attention  # noqa: E402
import bench_dit  # noqa: E402
import bench_reference  # noqa: E402
import common  # noqa: E402
import compile_study  # noqa: E402
import run_all  # noqa: E402
from helios_jax.config import TransformerConfig  # noqa: E402
from helios_jax.models.transformer import HeliosTransformer  # noqa: E402


def test_flop_count_matches_the_documented_workload():
    """NOTES.md: one 14B forward is ~70 / 119 / 360 TFLOP at the three stages, attention ~29% at the last."""
    cfg = TransformerConfig()
    assert [common.token_counts(cfg, common.HELIOS, s) for s in range(3)] == [(540, 2400), (2160, 2400), (8640, 2400)]
    flops = [common.dit_flops(cfg, common.HELIOS, s) for s in range(3)]
    assert [round(f["total"] / 1e12) for f in flops] == [70, 119, 360]
    assert 0.28 < flops[2]["attention"] / flops[2]["total"] < 0.30


def test_bench_attention_tiny(tmp_path):
    result = bench_attention.main(["--tiny", "--impls", "xla,pallas", "--json", str(tmp_path / "a.json"),
                                   "--results", str(tmp_path / "r.md")])
    rows = {(r[0], r[1]): r for r in result["rows"]}
    for shape, *_ in bench_attention.TINY.shapes:
        assert rows[shape, "pallas"][5] < 8e-3 and rows[shape, "xla"][5] < 8e-3  # rel err vs float32
    assert "## bench_attention" in (tmp_path / "r.md").read_text()


def test_bench_dit_and_reference_tiny_then_combined(tmp_path):
    out = str(tmp_path)
    dit = bench_dit.main(["--tiny", "--stages", "1", "--reps", "1", "--warmup", "1", "--json", f"{out}/dit.json",
                          "--results", f"{out}/results.md"])
    rows = dit["tables"]["forward"]["rows"]
    assert [r[2] for r in rows] == ["xla", "pallas"] and all(isinstance(r[4], float) for r in rows)
    assert rows[1][-1] < 1e-2  # the pallas model's output against the xla model's, bf16
    ref = bench_reference.main(["--tiny", "--stages", "1", "--modes", "eager", "--attention", "math", "--reps", "1",
                                "--warmup", "0", "--json", f"{out}/reference.json", "--results", f"{out}/results.md"])
    assert isinstance(ref["tables"]["forward"]["rows"][0][5], float)
    with open(f"{out}/run_all.log", "w") as log:
        run_all.combine(out, log)
    results = (tmp_path / "results.md").read_text()
    assert "## bench_dit" in results and "## bench_reference" in results and "## run_all: JAX vs PyTorch" in results
    target = tmp_path / "RESULTS.md"
    run_all.merge(f"{out}/results.md", str(target))
    assert target.read_text().count("\n## ") == 3


def test_compile_study_tiny(tmp_path):
    result = compile_study.main(["--tiny", "--layers", "3", "--stage", "0", "--json", str(tmp_path / "c.json"),
                                 "--results", str(tmp_path / "r.md")])
    scanned, unrolled = result["rows"]
    assert scanned[1] == "scanned" and unrolled[1] == "unrolled"
    assert unrolled[6] > scanned[6]  # HLO instructions: three inlined blocks against one loop body
    assert [row[0] for row in result["cache"]["rows"]] == ["cold (empty cache)", "warm (cache from the cold run)"]
    assert result["cache"]["rows"][1][3] == result["cache"]["rows"][0][3] > 0  # warm run adds no cache entries


def test_unrolled_model_is_the_same_function():
    """``scan_unroll=True`` (the compile study's unrolled variant) changes the HLO, not the numbers."""
    cfg = TransformerConfig(**common.tiny_config_kwargs())
    params = bench_dit.random_params(cfg, jax.random.key(0), dtype=jnp.float32, std=0.2)
    inputs = bench_dit.stage_inputs(cfg, common.TINY, 0, jax.random.key(1))
    inputs = {k: v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v for k, v in inputs.items()}
    scanned, unrolled = (jax.jit(HeliosTransformer(cfg, scan_unroll=u).apply)({"params": params}, **inputs)
                         for u in (1, True))
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(scanned), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["nope", "dit,bogus"])
def test_run_all_rejects_unknown_parts(bad):
    with pytest.raises(SystemExit, match="unknown part"):
        run_all.main(["--parts", bad, "--out", "/tmp/unused-run-all"])
