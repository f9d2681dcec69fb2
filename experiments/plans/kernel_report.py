"""What the Pallas flash-attention kernel compiles to on Hopper, without a GPU.

    pip install triton==3.6.0                      # the GPU image's version; any machine, no GPU needed
    python -m experiments.plans.kernel_report            # default tiles and the bench_attention --tune grid

For each config and shape the kernel is lowered for CUDA (``jax.export`` with ``platforms=["cuda"]``),
the Triton IR that XLA would compile is taken out of the custom call, and pip's Triton compiles it
for sm_90 (H100/H200) with the call's own num_warps / num_stages. Reported per config: shared
memory, registers per thread, spills (local memory), the Hopper matrix instructions in the SASS
(HGMMA = wgmma; HMMA would mean the slower pre-Hopper path), exp2 (MUFU.EX2) and async-copy
(LDGSTS) counts, and how many programs fit on one SM. XLA compiles the same IR with its own
bundled Triton, so the numbers are close to, not identical with, what runs on the device.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax import export

from experiments import paths, provenance, reporting
from experiments.workloads import ATTENTION_SHAPES, TUNE_GRID, TUNE_SHAPES
from helios_jax.kernels import FlashConfig, default_config, flash_attention

SM90 = dict(shared_kib=227, registers=65536, threads=2048)  # per SM on H100/H200
TRITON_CALL = "__gpu$xla.gpu.triton"


def triton_ir(q_len: int, kv_len: int, config: FlashConfig, heads: int = 40,
              head_dim: int = 128) -> tuple[str, int, int]:
    """(Triton IR as text, num_warps, num_stages) of the kernel lowered for CUDA at one shape."""
    from jax._src.lib import triton as jaxlib_triton  # jaxlib's MLIR with the Triton dialect
    from jax._src.lib.mlir import ir

    q = jax.ShapeDtypeStruct((1, q_len, heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, kv_len, heads, head_dim), jnp.bfloat16)
    text = export.export(
        jax.jit(functools.partial(flash_attention, config=config)), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(q, kv, kv).mlir_module()
    escaped = re.search(r'ir = "((?:[^"\\]|\\.)*)"', text).group(1)
    bytecode = re.sub(rb"\\([0-9A-Fa-f]{2}|\\|\")", lambda m: bytes([int(m.group(1), 16)]) if len(m.group(1)) == 2
                      else m.group(1), escaped.encode("latin-1"))
    warps = int(re.search(r"num_warps = (\d+)", text).group(1))
    stages = int(re.search(r"num_stages = (\d+)", text).group(1))
    with ir.Context() as ctx:
        jaxlib_triton.dialect.register_dialect(ctx)
        module = ir.Module.parse(bytecode)
        return module.operation.get_asm(enable_debug_info=False), warps, stages


def compile_sm90(ttir: str, warps: int, stages: int, folder: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(folder, "kernel.ttir")
    with open(path, "w") as f:
        f.write(ttir)
    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    cubin = os.path.join(folder, "kernel.cubin")
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = shutil.which("cuobjdump", path=tools) or shutil.which("cuobjdump")
    usage, sass = (subprocess.run([cuobjdump, what, cubin], capture_output=True, text=True, check=True).stdout
                   for what in ("--dump-resource-usage", "--dump-sass"))
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    shared = kernel.metadata.shared + int(re.search(r"SHARED:(\d+)", usage).group(1))
    count = lambda op: len(re.findall(rf"\b{op}\b", sass))  # noqa: E731
    per_sm = min(SM90["shared_kib"] * 1024 // max(shared, 1), SM90["registers"] // (regs * 32 * warps),
                 SM90["threads"] // (32 * warps))
    return {"shared KiB": shared / 1024, "regs": regs, "spill B": local, "HGMMA": count(r"HGMMA\.[\w.]+"),
            "HMMA": count(r"HMMA\.[\w.]+"), "MUFU.EX2": count(r"MUFU\.EX2"), "LDGSTS": count("LDGSTS"),
            "programs/SM": per_sm, "triton": triton.__version__}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", action="store_true", help="every config of bench_attention's tune grid")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--results", default=paths.RESULTS, help="markdown file to append to ('' = none)")
    args = parser.parse_args(argv)

    configs = [default_config(128)]
    if args.grid:
        configs += [c for c in (FlashConfig(*v) for v in itertools.product(*TUNE_GRID.values()))
                    if c != configs[0]]
    shapes = [s for s in ATTENTION_SHAPES if s[0] in TUNE_SHAPES]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, q_len, kv_len in shapes:
            for config in configs:
                try:
                    stats = compile_sm90(*triton_ir(q_len, kv_len, config), folder)
                except Exception as e:  # a config that does not compile (shared memory) is a result too
                    rows.append([name, config.block_q, config.block_k, config.num_warps, config.num_stages,
                                 f"failed: {type(e).__name__}: {str(e).splitlines()[0][:70]}"])
                    continue
                rows.append([name, config.block_q, config.block_k, config.num_warps, config.num_stages,
                             *(v for k, v in stats.items() if k != "triton")])
                print(rows[-1], flush=True)
    headers = ["shape", "block_q", "block_k", "num_warps", "num_stages", "shared KiB", "regs/thread", "spill bytes",
               "HGMMA", "HMMA", "MUFU.EX2", "LDGSTS", "programs/SM"]
    env = provenance.environment("none: compiled offline for sm_90", provenance.versions("jax", "jaxlib", "triton"))
    body = ("Pallas flash attention compiled offline for sm_90 (pip Triton on the IR XLA receives; 227 KiB shared "
            "memory and 64K registers per SM). First row per shape: the default config.\n\n"
            + reporting.markdown_table(headers, rows))
    print(body)
    if args.results:
        reporting.append_results("kernel_report", env, body, args.results)
    if args.json:
        reporting.write_json(args.json, {"env": env, "headers": headers, "rows": rows})
    return {"headers": headers, "rows": rows}


if __name__ == "__main__":
    main()
