"""Attention alone at Helios' shapes: TFLOP/s of each backend, and its error against float32.

    python -m experiments.benchmarks.bench_attention            # the table; appends it to experiments/RESULTS.md
    python -m experiments.benchmarks.bench_attention --tune     # also sweep the Pallas kernel's tiles and warps
    python -m experiments.benchmarks.bench_attention --mosaic   # also time JAX's bundled Mosaic GPU kernel

Impls: those of the dispatch (``--impls``; cudnn, pallas, mosaic on a GPU). Each result is checked against float32
before it is timed, and one further than ``REL_TOLERANCE`` is reported wrong and not timed. ``mosaic`` is
measured on a CUDA device only (elsewhere the row says why).

Shapes: batch 1, 40 heads x 128, bf16; self-attention over the three stages' 2,940 / 4,560 / 11,040
tokens, and cross-attention of the stage-2 queries to the 512 text tokens (8,640 x 512, the noisy
tokens, as the model runs it with ``guidance_cross_attn``; 11,040 x 512 for all tokens). Errors are
relative L2 and max-abs against ``helios_jax.kernels.attention_reference`` (float32, full precision)
on the same bf16 inputs. ``floor ms`` is the larger of FLOPs over the bf16 matmul rate and bytes
(q, k, v read once, the output written once) over the copy bandwidth, both measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp

from experiments import paths, provenance, reporting, timing
from experiments.workloads import ATTENTION_SHAPES, TUNE_GRID, TUNE_SHAPES
from helios_jax.kernels import FlashConfig, attention_reference, default_config, flash_attention
from helios_jax.models.attention import attention

# Splash is the TPU's kernel: elsewhere it runs interpreted, far too slow at these sizes to time.
TPU_IMPLS, OTHER_IMPLS = ("xla", "splash"), ("xla", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What one run measures: the shapes, heads x head_dim, samples per timing, Pallas mode."""

    shapes: tuple[tuple[str, int, int], ...] = ATTENTION_SHAPES
    heads: int = 40
    head_dim: int = 128
    reps: int = 20
    interpret: bool | None = None  # None: compiled on a GPU (interpret mode on a CPU)

    def flops(self, q_len: int, kv_len: int) -> int:
        return 4 * q_len * kv_len * self.heads * self.head_dim

    def inputs(self, seed: int, q_len: int, kv_len: int) -> tuple[jax.Array, ...]:
        """Fresh random bf16 q, k, v for each shape (never zeros: they time and check too kindly)."""
        kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
        return (jax.random.normal(kq, (1, q_len, self.heads, self.head_dim), jnp.bfloat16),
                jax.random.normal(kk, (1, kv_len, self.heads, self.head_dim), jnp.bfloat16),
                jax.random.normal(kv, (1, kv_len, self.heads, self.head_dim), jnp.bfloat16))

    def time_ms(self, fn, *args) -> float:
        return timing.median_ms(lambda: fn(*args), jax.block_until_ready, warmup=2, reps=self.reps)


TINY = Setup(shapes=(("self 37", 37, 37), ("cross 20x7", 20, 7)), heads=2, head_dim=64, reps=3, interpret=True)


def errors(out: jax.Array, ref: jax.Array) -> tuple[float, float]:
    diff = (out.astype(jnp.float32) - ref).ravel()
    return float(jnp.linalg.norm(diff) / jnp.linalg.norm(ref.ravel())), float(jnp.max(jnp.abs(diff)))


def matmul_tflops(setup: Setup, n: int) -> float:
    """The bf16 matmul ceiling of this device, measured on random data."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
    return 2 * n**3 / setup.time_ms(jax.jit(jnp.matmul), a, b) / 1e9


def copy_gbs(setup: Setup, nbytes: int) -> float:
    """Device memory bandwidth: one large elementwise copy, bytes read plus bytes written."""
    x = jax.random.normal(jax.random.key(3), (nbytes // 4,), jnp.float32)
    return 2 * nbytes / setup.time_ms(jax.jit(lambda x: x + 1.0), x) / 1e6


def failure(e: Exception) -> str:
    return f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"


# A result this far from float32 is wrong, and is not timed: the bf16 bound of tests/test_kernels.py.
REL_TOLERANCE = 8e-3


def skipped(impl: str) -> str | None:
    """Why ``impl`` is not measured on this device (None: it is). The Mosaic kernel runs on a CUDA device only:
    elsewhere impl='mosaic' runs its blockwise XLA version (kernels/mosaic.py), whose time says nothing."""
    if impl == "mosaic" and jax.default_backend() not in ("gpu", "cuda"):
        return f"skipped: the Mosaic GPU kernel needs a CUDA device (here {jax.default_backend()})"
    return None


def measure_impls(setup: Setup, impls: list[str], ceilings: tuple[float, float]) -> list[list]:
    """Per shape and impl: the error against float32 first, then (if within REL_TOLERANCE) the time."""
    tflops_peak, gbs = ceilings
    rows = []
    for seed, (name, q_len, kv_len) in enumerate(setup.shapes):
        q, k, v = setup.inputs(seed, q_len, kv_len)
        ref = attention_reference(q, k, v)
        floor_ms = max(setup.flops(q_len, kv_len) / tflops_peak / 1e9, 2 * (2 * q.size + 2 * k.size) / gbs / 1e6)
        for impl in impls:
            if reason := skipped(impl):
                rows.append([name, impl, reason, "", "", "", ""])
                continue
            fn = jax.jit(functools.partial(attention, impl=impl))
            try:
                rel, mx = errors(fn(q, k, v), ref)
                if not rel <= REL_TOLERANCE:  # NaN too
                    rows.append([name, impl, f"wrong: rel err {rel:.3g} > {REL_TOLERANCE} (not timed)", "", "",
                                 rel, mx])
                    continue
                ms = setup.time_ms(fn, q, k, v)
            except Exception as e:  # one backend failing (no cuDNN, say) must not hide the others
                rows.append([name, impl, failure(e), "", "", "", ""])
                continue
            rows.append([name, impl, ms, setup.flops(q_len, kv_len) / ms / 1e9, floor_ms, rel, mx])
    return rows


def tune(setup: Setup) -> tuple[list[list], dict[str, list]]:
    """Every FlashConfig of TUNE_GRID at the tuning shapes, fastest first per shape."""
    shapes = [s for s in setup.shapes if s[0] in TUNE_SHAPES] or setup.shapes
    rows, best = [], {}
    for name, q_len, kv_len in shapes:
        q, k, v = setup.inputs(7, q_len, kv_len)
        ref = attention_reference(q, k, v)
        results = []
        for values in itertools.product(*TUNE_GRID.values()):
            config = FlashConfig(**dict(zip(TUNE_GRID, values)))
            fn = jax.jit(functools.partial(flash_attention, config=config, interpret=setup.interpret))
            try:
                rel, _ = errors(fn(q, k, v), ref)
                results.append((setup.time_ms(fn, q, k, v), config, rel))
            except Exception as e:  # a config past the shared-memory limit fails to compile: report it, go on
                results.append((float("inf"), config, failure(e)))
        results.sort(key=lambda r: r[0])
        for ms, c, rel in results:
            timed = ms != float("inf")
            rows.append([name, c.block_q, c.block_k, c.num_warps, c.num_stages, ms if timed else "",
                         setup.flops(q_len, kv_len) / ms / 1e9 if timed else "", rel])
        best[name] = [dataclasses.asdict(results[0][1]), results[0][0]]
    return rows, best


def mosaic_bundled(setup: Setup) -> list[list]:
    """JAX's own Mosaic GPU flash attention (wgmma, TMA, two compute warpgroups), which needs lengths
    that are multiples of its blocks: inputs padded up to 128, so it computes another function (padded
    keys take part) and only its speed compares. Its shared-memory tiles are float16 whatever the inputs (jax
    0.10.2), so bf16 inputs fail to lower: it is timed on float16 copies, the same work."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    config = mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2)
    fn = jax.jit(functools.partial(mgpu.attention, config=config))
    rows = []
    for name, q_len, kv_len in setup.shapes:
        padded = [-(-n // 128) * 128 for n in (q_len, kv_len)]
        try:
            ms = setup.time_ms(fn, *(x.astype(jnp.float16) for x in setup.inputs(9, *padded)))
        except Exception as e:
            rows.append([name, "x".join(map(str, padded)), failure(e), ""])
            continue
        rows.append([name, "x".join(map(str, padded)), ms, setup.flops(q_len, kv_len) / ms / 1e9])
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", help="comma-separated attention impls (default: xla,splash on a TPU, else "
                        "xla,cudnn,pallas)")
    parser.add_argument("--reps", type=int, default=20, help="timed samples per measurement (median)")
    parser.add_argument("--tune", action="store_true", help="sweep the Pallas kernel's FlashConfig")
    parser.add_argument("--mosaic", action="store_true", help="time JAX's bundled Mosaic GPU attention")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, Pallas interpreted (CPU smoke run)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--results", default=paths.RESULTS, help="markdown file to append to ('' = none)")
    args = parser.parse_args(argv)

    setup = dataclasses.replace(TINY if args.tiny else Setup(), reps=args.reps if not args.tiny else TINY.reps)
    default = TPU_IMPLS if jax.default_backend() == "tpu" else OTHER_IMPLS
    impls = [i for i in args.impls.split(",") if i] if args.impls else list(default)
    env = provenance.jax_environment("numpy")
    size, nbytes = (512, 2**22) if args.tiny else (8192, 2**31)
    ceilings = (matmul_tflops(setup, size), copy_gbs(setup, nbytes))
    print(provenance.describe(env), flush=True)

    rows = measure_impls(setup, impls, ceilings)
    headers = ["shape", "impl", "ms", "TFLOP/s", "floor ms", "rel err vs f32", "max abs err"]
    body = (f"Attention, batch 1, {setup.heads} heads x {setup.head_dim}, bf16, median of {setup.reps}. "
            f"pallas: {default_config(setup.head_dim)}. Measured ceilings: bf16 matmul {size}^3 "
            f"{ceilings[0]:.4g} TFLOP/s, copy {ceilings[1]:.4g} GB/s.\n\n" + reporting.markdown_table(headers, rows))
    result = {"env": env, "ceilings": ceilings, "headers": headers, "rows": rows, "rel_tolerance": REL_TOLERANCE}
    if args.tune:
        tune_rows, best = tune(setup)
        tune_headers = ["shape", "block_q", "block_k", "num_warps", "num_stages", "ms", "TFLOP/s", "rel err"]
        body += "\nPallas FlashConfig sweep, fastest first:\n\n" + reporting.markdown_table(tune_headers, tune_rows)
        body += "\nBest: " + "; ".join(f"{k}: {v[0]} at {v[1]:.3g} ms" for k, v in best.items()) + "\n"
        result["tune"] = {"headers": tune_headers, "rows": tune_rows, "best": best}
    if args.mosaic:
        mosaic_headers = ["shape", "padded to", "ms", "TFLOP/s (unpadded FLOPs)"]
        body += ("\nJAX's bundled Mosaic GPU attention (block_q 64 per warpgroup x 2, block_kv 128) on inputs padded "
                 "to multiples of 128, timing only:\n\n" + reporting.markdown_table(mosaic_headers, mosaic_bundled(setup)))
    return reporting.report("bench_attention", env, body, result, args)


if __name__ == "__main__":
    main()
