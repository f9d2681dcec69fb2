"""CPU benchmark of the tiny stage-1 training step: steps/s and peak RSS.

    python -m experiments.benchmarks.bench_train_step [--steps 50] [--batch 2] [--no-append]

The tiny DiT and stage-1 setup of experiments/tiny_training.py (2 layers, 2 heads x 32, LoRA r16 plus
the full history patch convs, 4 x 4 latents: 36 noisy + 13 history tokens), random latents: the jit
step of helios_jax.training.trainer (loss, grads, clip, AdamW) timed after its compile, with the
official mixed precision (bf16 frozen base, remat) and in plain float32. Peak RSS is the process's
high-water mark after each variant (so it only grows). Printed and appended to RESULTS.md.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import provenance, reporting, tiny_training as tf
from helios_jax.training import trainer


def batch(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = lambda t: (size, 16, t, tf.PIXELS // 8, tf.PIXELS // 8)  # noqa: E731
    return {"x0": rng.normal(size=shape(1)).astype(np.float32), "history": rng.normal(size=shape(19)).astype(np.float32),
            "target": rng.normal(size=shape(9)).astype(np.float32),
            "prompt_embeds": rng.normal(size=(size, tf.TEXT_TOKENS, tf.CONFIG.text_dim)).astype(np.float32)}


def measure(name: str, dtype, remat: bool, steps: int, size: int) -> list:
    cfg = trainer.OptimizerConfig(learning_rate=1e-3)
    step = trainer.make_step(tf.make_stage1_loss(remat=remat, dtype=dtype), trainer.make_optimizer(cfg),
                             trainer.learning_rate(cfg))
    trainable, frozen = tf.stage1_variables(dtype=dtype)
    state = trainer.init_state(trainable, trainer.make_optimizer(cfg))
    data = batch(size)
    began = time.perf_counter()
    state, metrics = step(state, frozen, data, trainer.step_key(0, 0))
    jax.block_until_ready(metrics)
    first = time.perf_counter() - began
    times = []
    for i in range(1, steps + 1):
        began = time.perf_counter()
        state, metrics = step(state, frozen, data, trainer.step_key(0, i))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - began)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    median = statistics.median(times)
    return [name, size, first, median * 1e3, 1 / median, rss]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    env = provenance.jax_environment("flax", "optax", "orbax-checkpoint")
    title = "Tiny stage-1 training step on the CPU (experiments/benchmarks/bench_train_step.py)"
    print(f"{title}\n{provenance.describe(env)}", flush=True)
    rows = [measure("bf16 frozen, fp32 LoRA, remat", jnp.bfloat16, True, args.steps, args.batch),
            measure("float32, no remat", jnp.float32, False, args.steps, args.batch)]
    what = (f"The tiny stage-1 step of experiments/tiny_training.py (2 layers, 2 x 32 heads, LoRA r16 + full "
            f"history patches, 36 noisy + 13 history tokens), {args.steps} steps after the first; median step time. "
            f"'first' includes the compile. Peak RSS: the process's high-water mark so far.")
    headers = ["variant", "batch", "first step (s)", "step (ms)", "steps/s", "peak RSS (MiB)"]
    table = reporting.markdown_table(headers, rows)
    print(f"{what}\n\n{table}")
    if not args.no_append:
        reporting.append_results(title, env, f"{what}\n\n{table}")
        print("appended to experiments/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
