"""The 14B Helios DiT on one GPU, random bf16 weights: ms per forward, MFU and memory per attention impl.

    python experiments/bench_dit.py                       # every measurement, every impl
    python experiments/bench_dit.py --impls cudnn,pallas --stages 2

Each measurement is one function of a ``Bench`` (config, weights on the device, the workload, the
matmul rate measured in this run) returning a ``Table``; ``MEASUREMENTS`` names them, and
``--measure`` picks. ``forward``: one DiT forward at each pyramid stage with the full history
(noisy latents 12x20, 24x40, 48x80 of 9 frames; short/mid/long history of 2/2/16 frames at 48x80;
512 text tokens; batch 1). Measurements of whole chunks (the distilled 2+2+2 steps with VAE decode
as FPS, the base model's 50 steps with CFG) join the registry as functions of the same ``Bench``
once the sampler and the VAE exist in the package.

MFU is model FLOPs (``common.dit_flops``: every matmul, attention included) per second over the bf16
matmul rate measured in the same process. Memory is XLA's plan for the compiled forward (weights,
inputs, outputs and temporaries), and the process peak at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any, Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # 28 GB of weights plus XLA attention's logits

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402
from helios_jax.config import TransformerConfig  # noqa: E402
from helios_jax.models.transformer import HeliosTransformer, keeps_fp32, param_shapes  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[Any]]
    notes: str = ""

    def markdown(self) -> str:
        return f"{self.title}\n\n{common.markdown_table(self.headers, self.rows)}{self.notes}"


@dataclasses.dataclass
class Bench:
    cfg: TransformerConfig
    work: common.Workload
    params: Any
    impls: list[str]
    stages: list[int]
    reps: int
    warmup: int
    matmul_tflops: float


def leaf_dtype(path: tuple, dtype: Any) -> Any:
    """A param's dtype after loading in ``dtype``: float32 for the modules the reference keeps so."""
    return jnp.float32 if keeps_fp32(tuple(getattr(k, "key", str(k)) for k in path)) else dtype


def random_params(cfg: TransformerConfig, key: jax.Array, dtype: Any = jnp.bfloat16, std: float = 0.02) -> Any:
    """Random normal weights made on the device by one jitted function (no host copies), in the dtypes
    ``leaf_dtype`` gives."""
    flat, tree = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))

    @jax.jit
    def make(key):
        return tree.unflatten([
            std * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf_dtype(path, dtype))
            for i, (path, leaf) in enumerate(flat)
        ])

    return make(key)


def stage_inputs(cfg: TransformerConfig, work: common.Workload, stage: int, key: jax.Array) -> dict[str, jax.Array]:
    """The DiT's arguments at one pyramid stage: random bf16 latents and text, the pipeline's frame indices."""
    b, c = work.batch, cfg.in_channels
    h, w = work.stages[stage]
    indices = work.frame_indices()
    keys = iter(jax.random.split(key, 8))
    normal = lambda shape: jax.random.normal(next(keys), shape, jnp.bfloat16)  # noqa: E731
    inputs = {
        "hidden_states": normal((b, c, work.frames, h, w)),
        "timestep": jnp.full((b,), 999.0, jnp.float32),
        "encoder_hidden_states": normal((b, work.text_tokens, cfg.text_dim)),
        "indices_hidden_states": jnp.array([indices["noisy"]], jnp.int32),
    }
    for name, frames in work.history_frames:
        inputs[f"latents_history_{name}"] = normal((b, c, frames, *work.history_hw))
        inputs[f"indices_latents_history_{name}"] = jnp.array([indices[name]], jnp.int32)
    return inputs


def matmul_tflops(n: int, reps: int) -> float:
    """bf16 matmul rate of this device on random data: the ceiling MFU is measured against."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
    ms = common.median_ms(lambda: jax.jit(jnp.matmul)(a, b), jax.block_until_ready, warmup=2, reps=reps)
    return 2 * n**3 / ms / 1e9


def rel_diff(out: jax.Array, ref: jax.Array) -> float:
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def measure_forward(bench: Bench) -> Table:
    cfg, work = bench.cfg, bench.work
    rows = []
    for stage in bench.stages:
        noisy, history = common.token_counts(cfg, work, stage)
        flops = common.dit_flops(cfg, work, stage)
        inputs = stage_inputs(cfg, work, stage, jax.random.key(100 + stage))
        first = None
        for impl in bench.impls:
            apply = jax.jit(HeliosTransformer(cfg, attention_impl=impl).apply)
            try:
                start = time.perf_counter()
                compiled = apply.lower({"params": bench.params}, **inputs).compile()
                compile_s = time.perf_counter() - start
                run = lambda: compiled({"params": bench.params}, **inputs)  # noqa: E731
                out = run()
                ms = common.median_ms(run, jax.block_until_ready, warmup=bench.warmup, reps=bench.reps)
            except Exception as e:  # an impl that fails here (no cuDNN, out of memory) must not hide the rest
                rows.append([stage, f"{noisy}+{history}", impl, f"failed: {type(e).__name__}: {str(e)[:80]}"]
                            + [""] * 6)
                continue
            mem = compiled.memory_analysis()  # XLA's buffer plan; None where a backend gives none
            planned = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                       - mem.alias_size_in_bytes) if mem else float("nan")
            temp = mem.temp_size_in_bytes if mem else float("nan")
            tflops = flops["total"] / ms / 1e9
            diff = "" if first is None else rel_diff(out, first[1])
            first = first or (impl, out)
            rows.append([stage, f"{noisy}+{history}", impl, compile_s, ms, tflops,
                         100 * tflops / bench.matmul_tflops, common.gib(planned), common.gib(temp), diff])
    headers = ["stage", "tokens (noisy+history)", "impl", "compile s", "ms/forward", "TFLOP/s", "MFU %",
               "planned GiB", "temp GiB", f"rel diff vs {bench.impls[0]}"]
    notes = ""
    for stage in bench.stages:
        flops = common.dit_flops(cfg, work, stage)
        notes += (f"\nstage {stage}: {flops['total'] / 1e12:.1f} TFLOP per forward, "
                  f"{100 * flops['attention'] / flops['total']:.0f}% of it in attention.")
    notes += "\n"
    title = (f"DiT forward, {cfg.num_layers} layers x {cfg.inner_dim} ({common.workload_label(work)}), bf16 weights, "
             f"median of {bench.reps} after {bench.warmup} warm-ups; MFU against {bench.matmul_tflops:.4g} TFLOP/s "
             "(bf16 matmul measured in this run).")
    return Table(title, headers, rows, notes)


MEASUREMENTS: dict[str, Callable[[Bench], Table]] = {"forward": measure_forward}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", default=",".join(MEASUREMENTS), help=f"any of {list(MEASUREMENTS)}")
    parser.add_argument("--impls", default=None,
                        help="attention impls (default: cudnn,pallas,xla on a GPU; xla,pallas on a CPU)")
    parser.add_argument("--stages", default=None, help="pyramid stages, e.g. 0,1,2 (default: all)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on tiny latents (CPU smoke run)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--results", default=common.RESULTS, help="markdown file to append to ('' = none)")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    cfg = TransformerConfig(**common.tiny_config_kwargs()) if args.tiny else TransformerConfig()
    work = common.TINY if args.tiny else common.HELIOS
    impls = (args.impls or ("cudnn,pallas,xla" if on_gpu else "xla,pallas")).split(",")
    stages = [int(s) for s in args.stages.split(",")] if args.stages else list(range(len(work.stages)))
    env = common.jax_environment("flax", "numpy")
    print(common.describe(env), flush=True)

    start = time.perf_counter()
    params = jax.block_until_ready(random_params(cfg, jax.random.key(0)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    made_s = time.perf_counter() - start
    print(f"{n_params / 1e9:.2f}B random parameters made on {device} in {made_s:.1f} s", flush=True)
    rate = matmul_tflops(512 if args.tiny else 8192, args.reps)
    bench = Bench(cfg, work, params, impls, stages, args.reps, args.warmup, rate)

    tables = [MEASUREMENTS[name](bench) for name in args.measure.split(",")]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    peak = f"\nProcess peak device memory: {common.gib(peak):.1f} GiB.\n" if peak else ""
    body = "\n\n".join(t.markdown() for t in tables) + peak
    print(body, flush=True)
    if args.results:
        common.append_results("bench_dit", env, body, args.results)
    result = {"env": env, "matmul_tflops": rate, "params": n_params,
              "tables": {name: dataclasses.asdict(t) for name, t in zip(args.measure.split(","), tables)}}
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
