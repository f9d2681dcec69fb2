"""The Mosaic GPU attention (``impl="mosaic"``) compiled for an H100 on this CPU, down to ptxas: no GPU needed.

    make gpu-plan                                          # jax's CUDA plugin (the tier's venv), then:
    .venv-gpu-plan/bin/python -m experiments.plans.mosaic_plan   # Helios' five attention shapes, a table

How: the kernel's inputs are abstract arrays on an H100 of ``jax.experimental.topologies`` (gpu_plan.h100), and
XLA compiles the program for it. Mosaic GPU compiles its kernel inside that compile, not at the first run: the
``mosaic_gpu_v2`` custom call's instantiate stage runs when XLA emits the call's thunk, with the target's compute
capability (9.0, so sm_90a), lowering the kernel's MLIR to PTX (LLVM's NVPTX backend) and the PTX to SASS (the
NVPTX compiler library, ptxas as a library, linked into jax's CUDA plugin: no ptxas binary is needed). Mosaic's own dump options (``MOSAIC_GPU_DUMP_PTX``,
``MOSAIC_GPU_DUMP_PTXAS``, ``MOSAIC_GPU_DUMP_TO``) keep the PTX and ptxas' report, which this reads: the target,
registers per thread, spills, and the Hopper instructions in the PTX (wgmma, TMA's ``cp.async.bulk.tensor``,
``ex2.approx``). Not read: the SASS (Mosaic disassembles it with nvdisasm, which no wheel of the tier ships).

What this shows is that the kernel compiles for Hopper as written, with no spills; how fast it runs, only a GPU
says (experiments/benchmarks/headline.py times it against cuDNN and checks its numbers first).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp

from experiments import reporting
from experiments.plans import gpu_plan
from experiments.workloads import ATTENTION_SHAPES
from helios_jax.kernels import mosaic
from helios_jax.kernels.mosaic import MosaicConfig, mosaic_attention

KERNEL = "helios_mosaic_attention"
DUMP_OPTIONS = ("MOSAIC_GPU_DUMP_PTX", "MOSAIC_GPU_DUMP_PTXAS")


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """One shape's kernel as compiled for sm_90a: what ptxas reported and what the PTX holds."""

    target: str  # ptxas' "for 'sm_90a'"
    registers: int  # per thread, the most any warpgroup asks for (the compute ones raise theirs with setmaxnreg)
    spill_bytes: int  # spill stores + loads
    wgmma: int  # wgmma.mma_async instructions in the PTX
    tma_loads: int  # cp.async.bulk.tensor (TMA) instructions
    exp2: int  # ex2.approx instructions (the softmax)
    xla_temp_bytes: int  # the program's temporaries: the padded copies of q, k, v and the padded output
    compile_s: float


def shared_bytes(config: MosaicConfig, head_dim: int, itemsize: int = 2) -> int:
    """The kernel's shared memory: the two q/out tiles and ``stages`` K and V blocks (barriers: a few bytes)."""
    return (2 * config.block_q + 2 * config.stages * config.block_kv) * head_dim * itemsize


def compile_kernel(q_len: int, kv_len: int, sharding: jax.sharding.Sharding, folder: str, heads: int = 40,
                   head_dim: int = 128, config: MosaicConfig | None = None) -> KernelPlan:
    """Compile ``mosaic_attention`` at one shape for the device of ``sharding``, its dumps in ``folder``.

    The dump options are read from the environment by Mosaic when it compiles a module, so they are set here for
    the call; a module that this process already compiled is not compiled (nor dumped) again, hence one new
    ``.ptxas`` file is expected per call.
    """
    q = jax.ShapeDtypeStruct((1, q_len, heads, head_dim), jnp.bfloat16, sharding=sharding)
    kv = jax.ShapeDtypeStruct((1, kv_len, heads, head_dim), jnp.bfloat16, sharding=sharding)
    before = set(os.listdir(folder))
    saved = {name: os.environ.get(name) for name in (*DUMP_OPTIONS, "MOSAIC_GPU_DUMP_TO")}
    os.environ.update({name: "1" for name in DUMP_OPTIONS}, MOSAIC_GPU_DUMP_TO=folder)
    try:
        start = time.perf_counter()
        compiled = jax.jit(functools.partial(mosaic_attention, config=config)).lower(q, kv, kv).compile()
        seconds = time.perf_counter() - start
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    new = sorted(set(os.listdir(folder)) - before)
    ptxas = [f for f in new if f.startswith(KERNEL) and f.endswith(".ptxas")]
    if len(ptxas) != 1:
        raise RuntimeError(f"expected one new {KERNEL}*.ptxas in {folder} from Mosaic GPU; found {new}")
    with open(os.path.join(folder, ptxas[0]), encoding="utf-8") as f:
        report = f.read()
    with open(os.path.join(folder, ptxas[0].removesuffix("ptxas") + "ptx"), encoding="utf-8") as f:
        ptx = f.read()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return KernelPlan(
        target=re.search(r"for '(sm_\w+)'", report).group(1),
        registers=int(re.search(r"Used (\d+) registers", report).group(1)),
        spill_bytes=int(spills.group(1)) + int(spills.group(2)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        tma_loads=len(re.findall(r"\bcp\.async\.bulk\.tensor\b", ptx)),
        exp2=len(re.findall(r"\bex2\.approx\b", ptx)),
        xla_temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
        compile_s=seconds,
    )


HEADERS = ["shape", "padded to", "target", "regs/thread", "spill bytes", "shared KiB", "wgmma", "TMA copies",
           "ex2", "XLA temporaries MB", "compile s"]


def main(argv: list[str] | None = None) -> dict:
    gpu_plan.compile_on_cpu()
    args = gpu_plan.plan_parser(__doc__, autotune=False).parse_args(argv)
    gpu_plan.plan_size(args)  # only its check that the CUDA plugin is here: the kernel has one size
    config, sharding, rows = mosaic.H100_CONFIG, gpu_plan.h100(), []
    with tempfile.TemporaryDirectory() as folder:
        for name, q_len, kv_len in ATTENTION_SHAPES[:2] if args.tiny else ATTENTION_SHAPES:
            plan = compile_kernel(q_len, kv_len, sharding, folder)
            rows.append([name, "x".join(map(str, mosaic.padded_lengths(q_len, kv_len, config))), plan.target,
                         plan.registers, plan.spill_bytes, shared_bytes(config, 128) / 1024, plan.wgmma,
                         plan.tma_loads, plan.exp2, plan.xla_temp_bytes / 1e6, plan.compile_s])
            print(rows[-1], flush=True)
    env = gpu_plan.plan_environment()
    body = (f"Mosaic GPU attention (impl='mosaic', {config}), batch 1, 40 heads x 128, bf16, compiled deviceless "
            "for an H100 (sm_90a) down to ptxas on this CPU (experiments/plans/mosaic_plan.py). A plan: nothing "
            "here is measured on a GPU. Counts are PTX instructions in the kernel's code (loops not multiplied "
            "out); regs/thread is ptxas' figure for the kernel (the compute warpgroups raise theirs to 232 with "
            "setmaxnreg, the TMA warpgroup lowers its to 40).\n\n" + reporting.markdown_table(HEADERS, rows))
    print(body)
    if args.results:
        reporting.append_results("mosaic_plan", env, body, args.results)
    result = {"env": env, "headers": HEADERS, "rows": rows}
    if args.json:
        reporting.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
