"""Splash attention's block table compiled for one TPU chip of each kind, without a TPU.

    PYTHONPATH=<libtpu> python -m experiments.plans.splash_plan            # v5e, v6e, v5p; appends to RESULTS.md
    PYTHONPATH=<libtpu> python -m experiments.plans.splash_plan --chips v5e --shapes 11040x11040

Needs libtpu of the locked jax's version importable (``pip install "jax[tpu]==<jax version>"`` in a venv of its own,
or ``pip install --target DIR libtpu==...`` and DIR on ``PYTHONPATH``); jax runs on the CPU and compiles for a chip
of ``jax.experimental.topologies`` (the first of a 2x2 slice: a single-chip topology is refused).

For each Helios shape (batch 1, 40 heads x 128, bf16) it compiles ``attention(..., impl="splash")`` and its gradient
with the table's tiles (``helios_jax.models.splash.BLOCK_TABLE``). Mosaic refuses a kernel whose tiles overflow
the chip's scoped VMEM, so a row that compiles fits it; the plan also counts the Mosaic kernels in the program
(forward 1; gradient 3: forward, dq, dkv) and checks that no (tokens x tokens) buffer is in it (XLA's attention
would hold 19.5 GB of float32 logits at 11,040 tokens). ``floor ms``: the padded attention's FLOPs (4 x Tq x Tk x
head_dim x heads forward, 2.5x that for the gradient, as flash backward recomputes the logits) at the chip's
published bf16 peak: what the padding costs, not a prediction of the kernel's speed. Then, on an 8-chip v5e slice,
the stage-2 self-attention under the project's meshes (``parallel.make_mesh``): Ulysses on ``context=8``, the heads
on ``tensor=8``, the batch on ``fsdp=8``, each a ``shard_map`` around the kernel (a Mosaic kernel is not partitioned
by XLA); per chip: temporaries, Mosaic kernels, all-to-alls, square buffers. Every figure is a plan.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from experiments import paths, provenance, reporting

# One chip of each kind: the topology asked for, and the published dense bf16 peak (Google Cloud's TPU pages:
# cloud.google.com/tpu/docs/v5e, /v6e, /v5p: 197, 918 and 459 TFLOP/s per chip).
CHIPS = {"v5e": ("v5e:2x2", 197e12), "v6e": ("v6e:2x2", 918e12), "v5p": ("v5p:2x2x1", 459e12)}
# Self-attention at the three stages (noisy + 2,400 history tokens) and stage 2's text cross-attention.
SHAPES = ((2940, 2940), (4560, 4560), (11040, 11040), (11040, 512))
HEADS, HEAD_DIM = 40, 128
MOSAIC = "tpu_custom_call"


def libtpu_missing() -> str | None:
    """Why the TPU plans cannot be compiled here (None when they can)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return (f"libtpu is not importable: pip install \"jax[tpu]=={jax.__version__}\" in a venv of its own, or "
                "pip install --target DIR libtpu==<its version> and put DIR on PYTHONPATH")
    return None


def square_buffers(hlo: str, tokens: int) -> list[str]:
    """Shapes in the HLO text with two dimensions of at least ``tokens``: a (tokens x tokens) logits buffer."""
    found = []
    for dtype, dims in re.findall(r"\b(f32|bf16|f16)\[([0-9,]+)\]", hlo):
        if sum(int(d) >= tokens for d in dims.split(",")) >= 2:
            found.append(f"{dtype}[{dims}]")
    return sorted(set(found))


def plan_shape(device: Any, peak: float, q_len: int, kv_len: int) -> list[Any]:
    from helios_jax.models import splash
    from helios_jax.models.attention import attention

    sharding = jax.sharding.SingleDeviceSharding(device)
    q = jax.ShapeDtypeStruct((1, q_len, HEADS, HEAD_DIM), jnp.bfloat16, sharding=sharding)
    kv = jax.ShapeDtypeStruct((1, kv_len, HEADS, HEAD_DIM), jnp.bfloat16, sharding=sharding)
    tiles = splash.tiles_for(q_len, kv_len)
    padded = (-(-q_len // tiles.q) * tiles.q, -(-kv_len // tiles.kv) * tiles.kv)

    def forward(q, k, v):
        return attention(q, k, v, impl="splash")

    def gradient(q, k, v):
        return jax.grad(lambda *x: jnp.sum(forward(*x).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    row: list[Any] = [f"{q_len}x{kv_len}", f"{padded[0]}x{padded[1]}", f"{tiles.q}/{tiles.kv}/{tiles.kv_compute}"]
    flops = 4.0 * padded[0] * padded[1] * HEAD_DIM * HEADS
    for fn, factor in ((forward, 1.0), (gradient, 2.5)):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(q, kv, kv).compile()
        seconds = time.perf_counter() - start
        hlo = compiled.as_text()
        square = square_buffers(hlo, min(q_len, kv_len)) if min(q_len, kv_len) > tiles.q else []
        row += [seconds, compiled.memory_analysis().temp_size_in_bytes / 2**20, hlo.count(MOSAIC),
                ", ".join(square) or "none", 1e3 * factor * flops / peak]
    return row


# (slice, mesh sizes, batch): stage 2's self-attention on 8 v5e chips, each way the dispatch splits it.
MESHES = (("v5e:2x4", {"context": 8}, 1), ("v5e:2x4", {"tensor": 8}, 1), ("v5e:2x4", {"fsdp": 8}, 8))
MESH_TOKENS = 11040


def plan_mesh(topology: str, sizes: dict[str, int], batch: int) -> list[Any]:
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    from helios_jax import parallel
    from helios_jax.models.attention import attention

    mesh = parallel.make_mesh(**sizes, devices=topologies.get_topology_desc(topology, "tpu").devices)
    x = jax.ShapeDtypeStruct((batch, MESH_TOKENS, HEADS, HEAD_DIM), jnp.bfloat16, sharding=NamedSharding(mesh, P()))

    def forward(q, k, v):
        return attention(q, k, v, impl="splash")

    def gradient(q, k, v):
        return jax.grad(lambda *x: jnp.sum(forward(*x).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    row: list[Any] = [topology, ",".join(f"{a}={n}" for a, n in sizes.items()), f"{batch}x{MESH_TOKENS}"]
    for fn in (forward, gradient):
        with jax.set_mesh(mesh):
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(x, x, x).compile()
            seconds = time.perf_counter() - start
        hlo = compiled.as_text()
        row += [seconds, compiled.memory_analysis().temp_size_in_bytes / 2**20, hlo.count(MOSAIC),
                hlo.count(" all-to-all(") + hlo.count(" all-to-all-start("), ", ".join(square_buffers(hlo, 1024)) or "none"]
    return row


MESH_HEADERS = ["slice", "mesh", "batch x tokens", "fwd compile s", "fwd temp MiB/chip", "fwd Mosaic kernels",
                "fwd all-to-alls", "fwd square buffers", "grad compile s", "grad temp MiB/chip", "grad Mosaic kernels",
                "grad all-to-alls", "grad square buffers"]
HEADERS = ["chip", "q x kv tokens", "padded", "tiles q/kv/kv_compute",
           "fwd compile s", "fwd temp MiB", "fwd Mosaic kernels", "fwd square buffers", "fwd floor ms",
           "grad compile s", "grad temp MiB", "grad Mosaic kernels", "grad square buffers", "grad floor ms"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chips", default=",".join(CHIPS), help=f"comma-separated, of {', '.join(CHIPS)}")
    parser.add_argument("--shapes", default=",".join(f"{q}x{k}" for q, k in SHAPES), help="QxKV,... token counts")
    parser.add_argument("--meshes", action=argparse.BooleanOptionalAction, default=True,
                        help="also the 8-chip v5e meshes (--no-meshes: the chips alone)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--results", default=paths.RESULTS, help="markdown file to append to ('' = none)")
    args = parser.parse_args(argv)
    missing = libtpu_missing()
    if missing:
        parser.error(missing)
    from jax.experimental import topologies

    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",") if s]
    rows = []
    for chip in [c for c in args.chips.split(",") if c]:
        if chip not in CHIPS:
            parser.error(f"--chips: {chip!r} is not one of {', '.join(CHIPS)}")
        topology, peak = CHIPS[chip]
        device = topologies.get_topology_desc(topology, "tpu").devices[0]
        for q_len, kv_len in shapes:
            rows.append([f"{chip} ({device.device_kind})", *plan_shape(device, peak, q_len, kv_len)])
            print(reporting.markdown_table(HEADERS, rows[-1:]), flush=True)
    mesh_rows = []
    for topology, sizes, batch in MESHES if args.meshes else ():
        mesh_rows.append(plan_mesh(topology, sizes, batch))
        print(reporting.markdown_table(MESH_HEADERS, mesh_rows[-1:]), flush=True)
    env = provenance.environment("TPU v5e / v6e / v5p chips and an 8-chip v5e slice, compiled deviceless on the "
                                 "CPU (no TPU)", provenance.versions("jax", "jaxlib", "libtpu"))
    body = "" if not rows else (
        f"Splash attention (`attention(..., impl=\"splash\")`), batch 1, {HEADS} heads x {HEAD_DIM}, bf16, the block "
        "table's tiles, forward and gradient compiled for one chip: plans, nothing measured. A row that compiles fits "
        "the chip's scoped VMEM. Mosaic kernels: splash calls in the program; square buffers: any (tokens x tokens) "
        "array in it; floor ms: the padded attention's FLOPs at the chip's published bf16 peak (v5e 197, v6e 918, "
        "v5p 459 TFLOP/s), gradient 2.5x the forward.\n\n" + reporting.markdown_table(HEADERS, rows))
    if mesh_rows:
        body += ("\n" if body else "") + (f"Stage 2's self-attention ({MESH_TOKENS} tokens, {HEADS} heads x {HEAD_DIM}, bf16) under the "
                 "project's meshes on 8 v5e chips, per chip: Ulysses on context=8 (all-to-alls of q, k, v and the "
                 "output), the heads on tensor=8, the batch on fsdp=8; the kernel in a shard_map each time. Square "
                 "buffers: any array with two dimensions of 1,024 or more (a logits buffer).\n\n"
                 + reporting.markdown_table(MESH_HEADERS, mesh_rows))
    result = {"env": env, "headers": HEADERS, "rows": rows, "mesh_headers": MESH_HEADERS, "mesh_rows": mesh_rows}
    return reporting.report("splash_plan", env, body, result, args)


if __name__ == "__main__":
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # libtpu would ask a metadata server for the TPU it runs on
    jax.config.update("jax_platforms", "cpu")  # compiled for a TPU that is not here
    sys.exit(main() and 0)
