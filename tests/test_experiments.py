"""The benchmark scripts run end to end on the CPU at tiny size, so the GPU session only measures.

Nothing here asserts on time (speed is the scripts' output, not a test); the checks are that every
part runs, writes its JSON and its RESULTS section, that the numbers that must agree do (the Pallas
kernel against float32, the unrolled model against the scanned one), and that the JAX / torch
table is built from the two benchmarks' files.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import flop_counts, model_inputs, paths, reporting, workloads
from experiments.benchmarks import bench_attention, bench_dit, bench_reference, chunk_bench, headline, run_all
from experiments.studies import compile_study
from helios_jax import cli
from helios_jax.config import TransformerConfig
from helios_jax.models.transformer import HeliosTransformer


def test_flop_count_matches_the_documented_workload():
    """docs/hardware.md's workload: one 14B forward is ~70 / 119 / 360 TFLOP at the three stages, attention ~29%
    at the last."""
    cfg = TransformerConfig()
    tokens = [flop_counts.token_counts(cfg, workloads.HELIOS, s) for s in range(3)]
    assert tokens == [(540, 2400), (2160, 2400), (8640, 2400)]
    flops = [flop_counts.dit_flops(cfg, workloads.HELIOS, s) for s in range(3)]
    assert [round(f["total"] / 1e12) for f in flops] == [70, 119, 360]
    assert 0.28 < flops[2]["attention"] / flops[2]["total"] < 0.30


def test_chunk_workload_is_the_documented_one():
    """At 384x640 the chunk's DiT sees the forward benchmark's shapes; a distilled 2+2+2 chunk is ~1.09 PFLOP
    (docs/hardware.md: 1.10 less the text K/V of 5 of its 6 forwards, computed once per chunk: 2.2 TFLOP each), a
    base chunk 50 steps x 2 forwards at the full-size stage, the text's share once per context."""
    cfg = TransformerConfig()
    work = workloads.chunk_workload(384, 640, 3)
    helios = workloads.HELIOS
    assert (work.stages, work.frames, work.history_hw, work.history_frames, work.text_tokens) == (
        helios.stages, helios.frames, helios.history_hw, helios.history_frames, 512)
    assert round(flop_counts.text_flops(cfg, work) / 1e10) == 220
    assert round(flop_counts.chunk_flops(cfg, work, (2, 2, 2), guided=False) / 1e13) == 109
    base = workloads.chunk_workload(384, 640, 1)
    assert base.stages == ((48, 80),)
    assert flop_counts.chunk_flops(cfg, base, (50,), guided=True) == pytest.approx(
        100 * flop_counts.dit_flops(cfg, workloads.HELIOS, 2)["total"] - 98 * flop_counts.text_flops(cfg, base),
        rel=1e-12)
    assert workloads.video_frames(workloads.LATENT_FRAMES) == 33


def test_bench_attention_tiny(tmp_path):
    result = bench_attention.main(["--tiny", "--impls", "xla,pallas", "--json", str(tmp_path / "a.json"),
                                   "--results", str(tmp_path / "r.md")])
    rows = {(r[0], r[1]): r for r in result["rows"]}
    for shape, *_ in bench_attention.TINY.shapes:
        assert rows[shape, "pallas"][5] < 8e-3 and rows[shape, "xla"][5] < 8e-3  # rel err vs float32
    assert "## bench_attention" in (tmp_path / "r.md").read_text()


def test_bench_dit_and_reference_tiny_then_combined(tmp_path):
    out = str(tmp_path)
    dit = bench_dit.main(["--tiny", "--measure", "forward", "--stages", "1", "--reps", "1", "--warmup", "1",
                          "--json", f"{out}/dit.json", "--results", f"{out}/results.md"])
    rows = dit["tables"]["forward"]["rows"]
    assert [r[2] for r in rows] == ["xla", "pallas"] and all(isinstance(r[4], float) for r in rows)
    assert rows[1][-1] < 1e-2  # the pallas model's output against the xla model's, bf16
    ref = bench_reference.main(["--tiny", "--measure", "forward", "--stages", "1", "--modes", "eager", "--attention",
                                "math", "--reps", "1", "--warmup", "0", "--json", f"{out}/reference.json",
                                "--results", f"{out}/results.md"])
    assert isinstance(ref["tables"]["forward"]["rows"][0][5], float)

    # The chunk measurements: the tiny DiT in the pipelines with a tiny VAE, 1+1+1 distilled steps with and
    # without the amplified first chunk, 2 base steps with CFG; 2 chunks per stream (the first, one steady).
    chunk_args = ["--tiny", "--measure", "distilled,base", "--pyramid-steps", "1,1,1", "--amplify", "0,1", "--chunks",
                  "2", "--base-steps", "2", "--reps", "1", "--warmup", "0", "--results", f"{out}/results.md"]
    jax_chunks = bench_dit.main([*chunk_args, "--impls", "xla", "--json", f"{out}/distilled.json",
                                 "--compilation-cache", f"{out}/xla-cache"])["tables"]
    torch_chunks = bench_reference.main([*chunk_args, "--modes", "eager", "--attention", "math",
                                         "--json", f"{out}/reference-distilled.json"])["tables"]
    for tables, setting in ((jax_chunks, ["xla", "fp32"]), (torch_chunks, ["eager", "math", "fp32"])):
        distilled, base = tables["distilled"], tables["base"]
        assert [r[:len(setting) + 2] for r in distilled["rows"]] == [[*setting, "1+1+1", amplify]
                                                                      for amplify in ("no", "yes")]
        assert [r[:len(setting) + 2] for r in base["rows"]] == [[*setting, 2, "CFG 5"]]
        for table in (distilled, base):
            for row in table["rows"]:
                values = dict(zip(table["headers"], row))
                assert all(values[h] > 0 for h in ("first chunk s (cold)", "steady chunk s", "decode s")), row
                assert values["FPS"] == pytest.approx(5 / values["steady chunk s"])  # 2 latent frames: 5 frames
                assert values["sampling s"] == pytest.approx(values["steady chunk s"] - values["decode s"])

    with open(f"{out}/run_all.log", "w") as log:
        run_all.combine(out, log)
    results = (tmp_path / "results.md").read_text()
    assert "## bench_dit" in results and "## bench_reference" in results and "## run_all: JAX vs PyTorch" in results
    ratios = results[results.index("## run_all"):]
    assert "Distilled chunk (pyramid, DMD), JAX" in ratios and "Base chunk (single-stage UniPC, CFG), JAX" in ratios
    table = run_all.chunk_ratio(jax_chunks["distilled"], torch_chunks["distilled"], "distilled")
    lines = [line for line in table.splitlines() if line.startswith("| fp32 |")]
    assert len(lines) == 2  # one row per (VAE, steps, amplify) measured on both sides
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        jax_fps, torch_fps = (_fps(side["distilled"], cells[2]) for side in (jax_chunks, torch_chunks))
        assert float(cells[-1]) == pytest.approx(jax_fps / torch_fps, rel=5e-3)  # printed to 3 digits
    target = tmp_path / "RESULTS.md"
    run_all.merge(f"{out}/results.md", str(target))
    assert target.read_text().count("\n## ") == 5  # bench_dit, bench_reference (forward, chunks) and run_all


def _fps(table: dict, amplify: str) -> float:
    rows = [dict(zip(table["headers"], row)) for row in table["rows"]]
    return next(row["FPS"] for row in rows if row["amplify 1st"] == amplify)


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
    cfg = TransformerConfig(**workloads.tiny_config_kwargs())
    params = model_inputs.random_params(cfg, jax.random.key(0), dtype=jnp.float32, std=0.2)
    inputs = model_inputs.stage_inputs(cfg, workloads.TINY, 0, jax.random.key(1))
    inputs = {k: v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v for k, v in inputs.items()}
    scanned, unrolled = (jax.jit(HeliosTransformer(cfg, scan_unroll=u).apply)({"params": params}, **inputs)
                         for u in (1, True))
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(scanned), rtol=1e-5, atol=1e-5)


def test_run_all_joins_parts_split_by_impl_and_mode(tmp_path):
    """The chunk parts split to fit the per-command limit (one impl or torch mode per part) are joined
    into one JAX / torch table: the best of each side, wherever it was measured."""
    def part(name: str, measure: str, label_headers: list[str], rows: list[tuple[list, float]]) -> None:
        headers = [*label_headers, "VAE", "steps", "amplify 1st", *chunk_bench.CHUNK_HEADERS]
        table_rows = [chunk_bench.chunk_row([*label, "fp32", "2+2+2", "no"], 9.0, 2.0, [steady], 0.25, 33, 1e15, 800.0, 40.0)
                      for label, steady in rows]
        reporting.write_json(str(tmp_path / f"{name}.json"), {
            "env": {"device": "NVIDIA H100 (gpu)", "versions": {}, "date": "d", "commit": "c", "host": "h"},
            "tables": {measure: {"title": "t", "headers": headers, "rows": table_rows, "notes": ""}}})

    part("distilled-cudnn", "distilled", ["impl"], [(["cudnn"], 1.65)])
    part("distilled-xla", "distilled", ["impl"], [(["xla"], 3.3)])
    part("reference-distilled-eager", "distilled", ["mode", "attention"], [(["eager", "flash"], 4.125)])
    part("reference-distilled-compiled", "distilled", ["mode", "attention"], [(["compiled", "flash"], 2.0625)])
    with open(tmp_path / "log", "w") as log:
        run_all.combine(str(tmp_path), log)
    text = (tmp_path / "results.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| fp32 |"))
    # FPS 20 (cudnn), 10 (xla), 8 (eager flash), 16 (compiled flash): best 20 over best 16.
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "fp32", "2+2+2", "no", "20", "10", "8", "16", "1.65", "2.06", "cudnn / compiled flash", "1.25"]
    assert "WARNING" not in text


def test_every_child_command_names_a_module_of_the_package():
    """run_all's parts, the headline's parts and `helios-jax bench` run ``python -P -m MODULE``: each module exists."""
    modules = {command[0] for command in run_all.PARTS.values()} - {"pytest"}
    modules |= {command[0] for command in headline.part_commands(tiny=True).values()} | set(cli.BENCHMARKS.values())
    for module in sorted(modules):
        assert importlib.util.find_spec(module) is not None, module


def test_importing_the_experiments_changes_nothing():
    """No module of the package sets an environment variable or a jax config when imported (a fresh process:
    jax, torch and diffusers first, as they set variables of their own)."""
    probe = (
        "import importlib, os, pkgutil, jax, torch, diffusers\n"
        "before, platforms = dict(os.environ), jax.config.jax_platforms\n"
        "import experiments\n"
        "for sub in ('', '.benchmarks', '.plans', '.studies'):\n"
        "    for m in pkgutil.iter_modules(importlib.import_module('experiments' + sub).__path__):\n"
        "        if not m.ispkg: importlib.import_module(f'experiments{sub}.{m.name}')\n"
        "changed = {k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k)}\n"
        "assert not changed and jax.config.jax_platforms == platforms, (changed, jax.config.jax_platforms)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=paths.ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("bad", ["nope", "dit,bogus"])
def test_run_all_rejects_unknown_parts(bad):
    with pytest.raises(SystemExit, match="unknown part"):
        run_all.main(["--parts", bad, "--out", "/tmp/unused-run-all"])


@pytest.mark.slow
def test_headline_tiny_rehearsal(tmp_path):
    """The one-GPU headline call, rehearsed on the CPU: every part runs in its own process and writes its file,
    and the table puts JAX, torch and the roofline side by side (minutes on 2 cores: three fresh processes)."""
    out = tmp_path / "headline"
    assert headline.main(["--tiny", "--out", str(out)]) == 0
    for name in ("plan.json", "jax.json", "torch.json", "attention.json", "target_config.txtpb", "results.md",
                 "headline.log"):
        assert (out / name).is_file(), name
    table = (out / "results.md").read_text()
    assert "## headline" in table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
            for line in table.splitlines() if line.startswith("| DiT") or line.startswith("| distilled")}
    assert set(rows) == {"DiT forward, stage 2 (ms)", "distilled chunk 1+1+1 + decode (s)", "distilled chunk 1+1+1 FPS"}
    for cells in rows.values():
        assert all(float(c) > 0 for c in cells), cells  # JAX, torch, ratio, roofline bound, ratio: all measured
    attention = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
                 for line in table.splitlines() if line.startswith(("| self", "| cross"))}
    assert set(attention) == {shape for shape, *_ in bench_attention.TINY.shapes}
    for xla_ms, pallas_ms, mosaic_ms, *_ in attention.values():  # the Mosaic kernel needs a CUDA device: said so
        assert float(xla_ms) > 0 and float(pallas_ms) > 0 and mosaic_ms.startswith("skipped: the Mosaic GPU kernel")
