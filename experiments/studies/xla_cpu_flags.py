"""What XLA:CPU's compile flags cost and save on the test suite's kind of program.

The suite's time is nearly all XLA's CPU compile of tiny models' programs. This study compiles one such program,
the loss and gradient of the embedded demo DiT (4 blocks under ``nn.scan``, a 9 x 16 x 16 latent), once per flag
set, each in a fresh process (``XLA_FLAGS`` is read once per process), alternating the sets ``--repeats`` times so
that a busy machine slows them alike. It prints compile seconds, run seconds and the loss, whose digits show
whether the flags changed the numbers.

    python -m experiments.studies.xla_cpu_flags [--repeats 3] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from experiments import processes, provenance, reporting

FLAG_SETS = {
    "XLA's defaults": "",
    "LLVM -O1": "--xla_backend_optimization_level=1",
    "classic fusion emitters": "--xla_cpu_use_fusion_emitters=false",
    "classic fusion emitters, LLVM -O1 (the tests')": "--xla_cpu_use_fusion_emitters=false "
                                                      "--xla_backend_optimization_level=1",
    "LLVM -O0, no expensive passes": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
}


def measure() -> dict[str, float]:
    """Compile and run the demo DiT's loss and gradient in this process; its timings and loss."""
    import time

    import jax
    import jax.numpy as jnp

    from helios_jax.demo import TRANSFORMER
    from helios_jax.models.transformer import HeliosTransformer

    model = HeliosTransformer(TRANSFORMER)
    x = jnp.ones((1, TRANSFORMER.in_channels, 9, 16, 16))
    t, text = jnp.array([500.0]), jnp.ones((1, 16, TRANSFORMER.text_dim))
    params = jax.jit(model.init)(jax.random.key(0), x, t, text)
    step = jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply(p, x, t, text) ** 2)))
    start = time.perf_counter()
    compiled = step.lower(params).compile()
    compiled_at = time.perf_counter()
    jax.block_until_ready(compiled(params))
    ran_at = time.perf_counter()
    loss, _ = jax.block_until_ready(compiled(params))
    return {"compile_s": compiled_at - start, "first_run_s": ran_at - compiled_at,
            "run_s": time.perf_counter() - ran_at, "loss": float(loss)}


def run(flags: str) -> dict[str, float]:
    env = processes.environment()
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([*processes.command("experiments.studies.xla_cpu_flags"), "--measure"], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure()))
        return
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in FLAG_SETS}
    for _ in range(args.repeats):
        for name, flags in FLAG_SETS.items():
            runs[name].append(run(flags))
    baseline = statistics.median(r["compile_s"] for r in runs["XLA's defaults"])
    rows = []
    for name, flags in FLAG_SETS.items():
        compile_s = statistics.median(r["compile_s"] for r in runs[name])
        rows.append([name, f"`{flags}`" if flags else "", compile_s, baseline / compile_s,
                     statistics.median(r["run_s"] for r in runs[name]), f"{runs[name][0]['loss']:.9g}"])
    table = reporting.markdown_table(
        ["flags", "XLA_FLAGS", "compile s (median)", "speed-up", "run s (median)", "loss"], rows)
    table += (f"\nThe demo DiT's loss and gradient (4 blocks, latent 16 x 9 x 16 x 16), compiled in a fresh process per "
              f"flag set, {args.repeats} alternating repeats; measurements on this host's CPU (a shared machine: "
              f"compare rows, not runs).\n")
    env = provenance.jax_environment("flax")
    print(provenance.describe(env) + "\n" + table)
    if not args.no_append:
        reporting.append_results("xla_cpu_flags: the test suite's compile flags", env, table)


if __name__ == "__main__":
    main(sys.argv[1:])
