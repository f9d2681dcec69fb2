"""Does XLA take the FFN's GELU (and bias) into its first GEMM's epilogue? The FFN alone, compiled for an H100.

    .venv-gpu-plan/bin/python -m experiments.plans.gelu_epilogue           # 14B shapes, seconds per compile
    .venv-gpu-plan/bin/python -m experiments.plans.gelu_epilogue --tiny --results ''

The FFN (``net_0`` GEMM + bias, tanh GELU, ``net_2`` GEMM + bias) at the stage-2 forward's sequence, compiled
deviceless for the H100 (gpu_plan.h100) three ways of writing the GELU times two GEMM paths:

- GELU forms: the model's (``layers.gelu_tanh``: the bf16 GEMM output upcast, GELU in float32, one rounding, as
  the reference's kernels do); the GELU in the GEMM's own dtype (``jax.nn.gelu`` on bf16, the HLO pattern
  cuBLASLt's epilogue matcher wants, but bf16 arithmetic wherever it is not fused); the first GEMM with a
  float32 output (``preferred_element_type``), bias and GELU in float32, then one convert to bf16.
- GEMM paths, given as this compile's XLA options: XLA's default (Triton GEMM fusions) and cuBLASLt
  (``xla_gpu_enable_triton_gemm=False``; the GEMMs become ``__cublas$lt$matmul`` without any cuBLASLt flag).

Per case: what the first GEMM took (a cuBLASLt call's epilogue, or the ops inside a Triton GEMM fusion), the
launches between the two GEMMs and the roofline's lower bound of the whole FFN (experiments/plans/roofline.py).
Plans, not measurements.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

from experiments import reporting, workloads
from experiments.plans import gpu_plan, roofline
from helios_jax.models import layers

GEMM_PATHS = {"Triton GEMM fusions (XLA's default)": {}, "cuBLASLt (xla_gpu_enable_triton_gemm=False)":
              {"xla_gpu_enable_triton_gemm": False}}
HEADERS = ["GELU written as", "GEMM path", "net_0's GEMM takes", "passes between the GEMMs", "their ms",
           "FFN lower-bound ms", "their ms per forward (every block)"]
TRIVIAL = {"parameter", "dot", "bitcast", "broadcast", "constant", "reshape"}


def _gelu_bf16(h: jax.Array) -> jax.Array:
    return jax.nn.gelu(h, approximate=True)


def _first_gemm(x: jax.Array, w: jax.Array, b: jax.Array, gelu: Callable[[jax.Array], jax.Array]) -> jax.Array:
    return gelu(x @ w + b)


def _first_gemm_f32_out(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    h = jnp.matmul(x, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)
    return jax.nn.gelu(h, approximate=True).astype(x.dtype)


# net_0 + bias + GELU three ways; each returns bf16, as net_2 takes it.
FORMS = {
    "float32 (the model's gelu_tanh)": lambda x, w, b: _first_gemm(x, w, b, layers.gelu_tanh),
    "bf16, the GEMM's dtype": lambda x, w, b: _first_gemm(x, w, b, _gelu_bf16),
    "float32 GEMM output": _first_gemm_f32_out,
}


def ffn(first: Callable, x: jax.Array, w0: jax.Array, b0: jax.Array, w2: jax.Array, b2: jax.Array) -> jax.Array:
    return first(x, w0, b0) @ w2 + b2


def compiled_hlo(first: Callable, tokens: int, dim: int, hidden: int, options: dict[str, Any]) -> str:
    h100 = gpu_plan.h100()
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=h100)
            for s in ((tokens, dim), (dim, hidden), (hidden,), (hidden, dim), (dim,))]
    return jax.jit(lambda *a: ffn(first, *a)).lower(*args).compile(options).as_text()


def first_gemm_takes(module: roofline.Module) -> str:
    """What net_0's GEMM (the program's first) took: a cuBLASLt call's epilogue, or the ops fused around a
    Triton GEMM fusion's dot."""
    for inst, _ in module.instructions():
        if inst.opcode == "custom-call" and "$lt$matmul" in inst.attrs:
            return "epilogue " + re.search(r'"epilogue":"(\w+)"', inst.attrs).group(1)
        if inst.opcode == "fusion" and any(i.opcode == "dot" for i in module.computations[inst.calls()[0]]):
            ops = {i.opcode for i in module.computations[inst.calls()[0]]} - TRIVIAL
            return "Triton fusion: dot + " + (", ".join(sorted(ops)) or "nothing")
    raise SystemExit("no GEMM in the FFN's program")


def case_row(form: str, path: str, tokens: int, dim: int, hidden: int) -> list[Any]:
    module = roofline.Module(compiled_hlo(FORMS[form], tokens, dim, hidden, GEMM_PATHS[path]))
    kernels = module.kernels()
    passes = [k for k in kernels if k.kind != "GEMM" and k.bytes >= tokens * hidden]  # over the hidden activations
    return [form, path, first_gemm_takes(module), ", ".join(k.name for k in passes) or "none",
            sum(k.seconds for k in passes) * 1e3, roofline.predicted_ms(kernels)]


def main(argv: list[str] | None = None) -> dict:
    args = gpu_plan.plan_parser(__doc__, autotune=False).parse_args(argv)
    size = gpu_plan.plan_size(args)
    tokens = max(q for _, q, _ in workloads.ATTENTION_SHAPES) if not args.tiny else 256  # stage 2's sequence
    dim, hidden = size.cfg.inner_dim, size.cfg.ffn_dim
    rows = [case_row(form, path, tokens, dim, hidden) for form in FORMS for path in GEMM_PATHS]
    rows = [[*row, row[4] * size.cfg.num_layers] for row in rows]
    env = gpu_plan.plan_environment()
    body = (f"The FFN alone ({tokens} tokens x {dim}, hidden {hidden}, bf16 weights), compiled for the H100: what "
            "net_0's GEMM takes of the bias and GELU, and the passes left between the two GEMMs (roofline lower "
            "bounds per FFN call, and the passes' times the forward's blocks; plans, not measurements).\n\n"
            + reporting.markdown_table(HEADERS, rows))
    return reporting.report("gelu_epilogue", env, body, {"env": env, "headers": HEADERS, "rows": rows}, args)


if __name__ == "__main__":
    gpu_plan.compile_on_cpu()
    sys.exit(main() and 0)
