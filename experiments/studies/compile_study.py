"""How long the DiT takes to compile, scanned vs unrolled layers, and cold vs warm persistent cache.

    python -m experiments.studies.compile_study                            # 14B, stage 2, all parts
    python -m experiments.studies.compile_study --layers 2,4,8 --stage 0    # smaller, e.g. on a CPU

Everything is lowered from ``jax.ShapeDtypeStruct``s (bf16 weights, the float32-kept modules in
float32), so the study needs no memory for weights unless ``--run`` times the compiled forwards.

- scanned vs unrolled: the same model with ``scan_unroll=1`` (one block body in a while loop) and
  ``scan_unroll=True`` (every block inlined, what a Python loop over layers gives XLA; same params
  tree, same numerics). Reported: trace+lower seconds, StableHLO size, compile seconds, the
  optimised HLO's size and instruction count, generated code and temporary buffer sizes.
- cold vs warm: the scanned model compiled in a fresh process with ``jax_compilation_cache_dir``
  pointing at an empty folder (cold: compiles and writes the cache), then again in another fresh
  process on the same folder (warm: reads it). Reported: lower+compile seconds inside the process
  and the whole process' wall time (Python, imports, backend start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp

from experiments import flop_counts, paths, processes, provenance, reporting, timing, workloads
from experiments.model_inputs import abstract_inputs, abstract_params, random_params, stage_inputs
from helios_jax.config import TransformerConfig
from helios_jax.models.transformer import HeliosTransformer, param_shapes

VARIANTS = {"scanned": 1, "unrolled": True}


def compile_forward(cfg: TransformerConfig, work: workloads.Workload, stage: int, impl: str, unroll: int | bool):
    """Lower and compile one forward; returns the executable and what it cost."""
    model = HeliosTransformer(cfg, attention_impl=impl, scan_unroll=unroll)
    start = time.perf_counter()
    params = abstract_params(param_shapes(cfg), jnp.bfloat16)
    lowered = jax.jit(model.apply).lower({"params": params}, **abstract_inputs(cfg, work, stage))
    lower_s = time.perf_counter() - start
    stablehlo = lowered.as_text()
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    hlo = compiled.as_text() or ""
    mem = compiled.memory_analysis()
    return compiled, {
        "lower_s": lower_s,
        "stablehlo_kchars": len(stablehlo) / 1e3,
        "compile_s": compile_s,
        "hlo_kchars": len(hlo) / 1e3,
        "hlo_instructions": sum(1 for line in hlo.splitlines() if " = " in line),
        "code_mib": getattr(mem, "generated_code_size_in_bytes", 0) / 2**20,
        "temp_gib": reporting.gib(mem.temp_size_in_bytes) if mem else float("nan"),
    }


def run_forward_ms(compiled, cfg: TransformerConfig, work: workloads.Workload, stage: int, params, reps: int) -> float:
    inputs = stage_inputs(cfg, work, stage, jax.random.key(100 + stage))
    return timing.median_ms(lambda: compiled({"params": params}, **inputs), jax.block_until_ready, warmup=1, reps=reps)


def cache_child(args: argparse.Namespace) -> None:
    """In a fresh process: compile the scanned forward with the persistent cache at ``args.cache_dir``."""
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cfg, work = config_for(args, int(args.layers.split(",")[-1]))
    start = time.perf_counter()
    compile_forward(cfg, work, args.stage, impl_for(args), VARIANTS["scanned"])
    print(json.dumps({"lower_compile_s": time.perf_counter() - start}))


def cold_warm(args: argparse.Namespace) -> list[list]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="jax-cache-") as cache:
        command = processes.command("experiments.studies.compile_study", "--cache-child", "--cache-dir", cache,
                                    "--layers", args.layers, "--stage", str(args.stage), "--impl", impl_for(args))
        command += ["--tiny"] if args.tiny else []
        for label in ("cold (empty cache)", "warm (cache from the cold run)"):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=processes.environment())
            wall = time.perf_counter() - start
            if done.returncode:
                raise RuntimeError(f"cache child failed:\n{done.stderr[-3000:]}")
            inside = json.loads(done.stdout.strip().splitlines()[-1])["lower_compile_s"]
            files = sum(len(f) for _, _, f in os.walk(cache))
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
            rows.append([label, inside, wall, files, size / 2**20])
    return rows


def config_for(args: argparse.Namespace, layers: int) -> tuple[TransformerConfig, workloads.Workload]:
    base = workloads.tiny_config_kwargs() if args.tiny else {}
    return TransformerConfig(**{**base, "num_layers": layers}), workloads.TINY if args.tiny else workloads.HELIOS


def impl_for(args: argparse.Namespace) -> str:
    return args.impl or ("cudnn" if jax.devices()[0].platform == "gpu" else "xla")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="40", help="comma-separated layer counts (the cache part uses the last)")
    parser.add_argument("--stage", type=int, default=2, help="pyramid stage whose shapes are compiled")
    parser.add_argument("--impl", default=None, help="attention impl (default: cudnn on a GPU, xla on a CPU)")
    parser.add_argument("--variants", default="scanned,unrolled", help=f"any of {list(VARIANTS)}")
    parser.add_argument("--no-cache", action="store_true", help="skip the cold/warm persistent-cache part")
    parser.add_argument("--run", action="store_true", help="also time each compiled forward (random weights)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny model and shapes (CPU smoke run)")
    parser.add_argument("--cache-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--results", default=paths.RESULTS, help="markdown file to append to ('' = none)")
    args = parser.parse_args(argv)
    if args.cache_child:
        cache_child(args)
        return {}

    device = jax.devices()[0]
    env = provenance.jax_environment("flax")
    print(provenance.describe(env), flush=True)
    impl = impl_for(args)
    rows = []
    for layers in (int(n) for n in args.layers.split(",")):
        cfg, work = config_for(args, layers)
        params = None
        if args.run:
            params = random_params(cfg, jax.random.key(0))
        for variant in args.variants.split(","):
            compiled, stats = compile_forward(cfg, work, args.stage, impl, VARIANTS[variant])
            ms = run_forward_ms(compiled, cfg, work, args.stage, params, args.reps) if args.run else ""
            rows.append([layers, variant, *stats.values(), ms])
            print(rows[-1], flush=True)
            del compiled
        del params
    headers = ["layers", "variant", "trace+lower s", "StableHLO kchars", "compile s", "HLO kchars",
               "HLO instructions", "code MiB", "temp GiB", "ms/forward"]
    noisy, history = flop_counts.token_counts(cfg, work, args.stage)
    body = (f"Compile study: HeliosTransformer (inner dim {cfg.inner_dim}, attention {impl!r}) at stage {args.stage} "
            f"({noisy}+{history} tokens, {work.name}), lowered from ShapeDtypeStructs on {device.platform}.\n\n"
            + reporting.markdown_table(headers, rows))
    result = {"env": env, "headers": headers, "rows": rows}
    if not args.no_cache:
        cache_rows = cold_warm(args)
        cache_headers = ["start", "lower+compile s (in process)", "process wall s", "cache files", "cache MiB"]
        body += (f"\nPersistent compilation cache, scanned, {args.layers.split(',')[-1]} layers, each a fresh "
                 "process:\n\n" + reporting.markdown_table(cache_headers, cache_rows))
        result["cache"] = {"headers": cache_headers, "rows": cache_rows}
    return reporting.report("compile_study", env, body, result, args)


if __name__ == "__main__":
    # The cache part compiles in child processes on the same GPU: this process must not hold its memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    main()
