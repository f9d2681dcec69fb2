"""FP8 weights in the H100's compiled plans: memory, the GEMM kernels XLA picks, and the roofline's time.

    .venv-gpu-plan/bin/python -m experiments.plans.fp8_plan          # 14B: minutes on 2 cores, appended to RESULTS.md
    .venv-gpu-plan/bin/python -m experiments.plans.fp8_plan --tiny   # the same programs at a toy size

The programs of experiments/plans/gpu_plan.py (deviceless, abstract inputs) with the DiT's block linears in fp8
(``helios_jax.models.fp8``: float8_e4m3fn kernels, per-output-channel scales, per-token fp8 activations):
the DiT forward at stage 2 and the pipeline's distilled chunk (2+2+2), each beside its bf16 twin (the chunk
also with the first and last blocks kept bf16, SGLang's choice), and the Wan VAE chunk decode in bf16 and fp32.
Memory: XLA's plan (arguments + temporaries + outputs) of the chunk and of its decode resident at once, against
the 22 GiB that a 24 GB card leaves. GEMMs: every GEMM launch
of the optimised HLO, by kernel (cuBLAS or cuBLASLt custom call, Triton GEMM fusion) and operand types.
Roofline: experiments/plans/roofline.py's lower bounds, with the fp8 GEMMs at FP8_MATMUL_FLOPS (the H100's fp8
dense peak is twice its bf16 peak; the same 80% of it as roofline.py's measured bf16 rate is assumed).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp

from experiments import reporting, workloads
from experiments.model_inputs import abstract_inputs, abstract_params
from experiments.plans import gpu_plan, roofline
from helios_jax import demo
from helios_jax.models import fp8, transformer as transformer_lib, vae as vae_lib
from helios_jax.models.attention import default_impl
from helios_jax.pipeline import HeliosPipeline

FP8_MATMUL_FLOPS = 2 * roofline.MATMUL_FLOPS
CARD_LIMIT_GIB = 22.0  # what a 24 GB card (22.5 GiB) leaves after the CUDA context and allocator slack
F8 = "f8e4m3fn"


EDGES = "fp8, bf16 edges"  # fp8 with the first and last blocks kept bf16 (fp8.quantized_shapes(bf16_edges=True))


def dit_params(cfg, weight_dtype: str) -> Any:
    params = abstract_params(transformer_lib.param_shapes(cfg), jnp.bfloat16)
    if weight_dtype == "bf16":
        return params
    return fp8.quantized_shapes(params, bf16_edges=weight_dtype == EDGES)


def dit_forward(size: gpu_plan.Size, weight_dtype: str, sharding) -> gpu_plan.Plan:
    model = transformer_lib.HeliosTransformer(size.cfg, attention_impl=default_impl(jnp.bfloat16, "gpu"))
    params = dit_params(size.cfg, weight_dtype)
    inputs = abstract_inputs(size.cfg, size.work, 2)
    lowered = jax.jit(model.apply).lower({"params": gpu_plan.on_device(params, sharding)},
                                         **gpu_plan.on_device(inputs, sharding))
    return gpu_plan.compile_plan(f"DiT forward, stage 2, {weight_dtype}", lowered, params)


def distilled_chunk(size: gpu_plan.Size, weight_dtype: str, sharding) -> gpu_plan.Plan:
    vae = abstract_params(vae_lib.param_shapes(size.vae), jnp.bfloat16, keep_fp32=False)
    pipe = HeliosPipeline((size.cfg, dit_params(size.cfg, weight_dtype)), (size.vae, vae), None, dict(demo.SCHEDULER),
                          gpu_plan.DISTILLED, attention_impl=default_impl(jnp.bfloat16, "gpu"))
    lowered = pipe.lower_chunk(**size.settings(), guidance_scale=1.0, pyramid_num_inference_steps_list=[2, 2, 2],
                               sharding=sharding)
    return gpu_plan.compile_plan(f"distilled chunk 2+2+2, {weight_dtype}", lowered, pipe.transformer_params)


def programs(size: gpu_plan.Size, sharding) -> dict[str, gpu_plan.Plan]:
    plans = [dit_forward(size, w, sharding) for w in ("bf16", "fp8")]
    plans += [distilled_chunk(size, w, sharding) for w in ("bf16", "fp8", EDGES)]
    plans += [gpu_plan.decode_program(size, sharding, d) for d in (jnp.bfloat16, jnp.float32)]
    return {p.name: p for p in plans}


# --- which GEMM kernels ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Gemm:
    kernel: str  # the custom-call target, or "Triton GEMM fusion"
    operands: str  # the operand element types, e.g. "f8e4m3fn x f8e4m3fn -> f32"


def _types(text: str) -> list[str]:
    return [t for t, _ in roofline.shapes(text)]


def _dot_in(module: roofline.Module, computation: str) -> roofline.Instruction | None:
    """The dot of a (possibly nested) GEMM fusion."""
    for inst in module.computations[computation]:
        if inst.opcode == "dot":
            return inst
        for callee in inst.calls():
            found = _dot_in(module, callee)
            if found is not None:
                return found
    return None


def gemms(hlo: str) -> collections.Counter:
    """GEMM launches of an optimised HLO module by kernel and operand types, loop trip counts multiplied in."""
    module = roofline.Module(hlo)
    found: collections.Counter = collections.Counter()

    def walk(name: str, count: int) -> None:
        for inst in module.computations[name]:
            if inst.opcode == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
                walk(re.search(r"body=%([\w.\-]+)", inst.attrs).group(1), count * (int(trips.group(1)) if trips else 1))
            elif inst.opcode in ("call", "conditional", "async-start"):
                for callee in inst.calls():
                    walk(callee, count)
            elif inst.opcode == "custom-call" and re.search(r'custom_call_target="[^"]*(gemm|matmul)', inst.attrs):
                target = re.search(r'custom_call_target="([^"]+)"', inst.attrs).group(1)
                ins = [(_types(module.shape.get(o, "")) or ["?"])[0] for o in inst.operands[:2]]
                found[Gemm(target, f"{' x '.join(ins)} -> {_types(inst.shape)[0]}")] += count
            elif inst.opcode == "fusion" and re.search(r'"kind":"__triton\w*gemm', inst.attrs):
                dot = _dot_in(module, inst.calls()[0])
                ins = [_types(module.shape[o])[0] for o in dot.operands[:2]]
                found[Gemm("Triton GEMM fusion", f"{' x '.join(ins)} -> {_types(dot.shape)[0]}")] += count

    walk(module.entry, 1)
    return found


# --- roofline with fp8 GEMMs at the fp8 rate ----------------------------------------------------------------


@dataclasses.dataclass
class Fp8Kernel(roofline.Kernel):
    @property
    def seconds(self) -> float:
        return self.count * max(self.flops / FP8_MATMUL_FLOPS, self.bytes / roofline.HBM_BYTES)


class Fp8Module(roofline.Module):
    """roofline.Module whose GEMMs reading an fp8 operand run at the fp8 matmul rate."""

    def _kernel(self, inst, count):
        kernel = super()._kernel(inst, count)
        operands = " ".join(self.shape.get(o, "") for o in inst.operands)
        if kernel.kind == "GEMM" and F8 in operands:
            return Fp8Kernel(**dataclasses.asdict(kernel))
        return kernel


def kernels_of(plan: gpu_plan.Plan) -> list[roofline.Kernel]:
    return Fp8Module(plan.hlo).kernels()


# --- report -------------------------------------------------------------------------------------------------

MEMORY_HEADERS = ["program", "compile s", "arguments GiB", "temporaries GiB", "output GiB", "total GiB"]
GEMM_HEADERS = ["program", "GEMM kernel", "operands", "launches"]
TIME_HEADERS = ["program", "predicted ms", "GEMM ms", "fp8 GEMM launches", "not GEMM/attention %"]


def resident_gib(plans: dict[str, gpu_plan.Plan], weights: str, vae: str) -> float:
    chunk, decode = plans[f"distilled chunk 2+2+2, {weights}"], plans[f"VAE decode {vae}"]
    return reporting.gib(gpu_plan.chunk_with_vae_bytes(chunk, decode))


def main(argv: list[str] | None = None) -> dict:
    args = gpu_plan.plan_parser(__doc__).parse_args(argv)
    size = gpu_plan.plan_size(args)
    plans = programs(size, gpu_plan.h100(args.autotune))
    gib = reporting.gib
    memory = [[p.name, p.compile_s, gib(p.argument_bytes), gib(p.temp_bytes), gib(p.output_bytes), gib(p.total_bytes)]
              for p in plans.values()]
    gemm_rows, time_rows, chunk_ms = [], [], {}
    for name, plan in plans.items():
        if name.startswith("VAE"):
            continue
        gemm_rows += [[name, g.kernel, g.operands, n] for g, n in sorted(gemms(plan.hlo).items(), key=str)]
        ks = kernels_of(plan)
        gemm_ms = 1e3 * sum(k.seconds for k in ks if k.kind == "GEMM")
        time_rows.append([name, roofline.predicted_ms(ks), gemm_ms, sum(k.count for k in ks if isinstance(k, Fp8Kernel)),
                          roofline.other_share(ks)])
        if name.startswith("distilled"):
            chunk_ms[name.split(", ", 1)[1]] = roofline.predicted_ms(ks)
    decode_ms = {v: roofline.predicted_ms(kernels_of(plans[f"VAE decode {v}"])) for v in ("bfloat16", "float32")}
    fits = {(w, v): resident_gib(plans, w, v) for w in ("bf16", "fp8", EDGES) for v in ("bfloat16", "float32")}
    frames = workloads.video_frames(size.latent_frames)
    lines = [f"- distilled chunk 2+2+2 ({w} weights) with its {v} VAE decode resident at once: {gib:.1f} GiB"
             f"{' (fits 22 GiB)' if gib <= CARD_LIMIT_GIB else ''}" for (w, v), gib in fits.items()]
    for w, ms in chunk_ms.items():
        total = ms + decode_ms["bfloat16"]
        lines.append(f"- predicted, {w} weights: chunk {ms:.0f} ms ({1e3 * frames / ms:.1f} FPS sampling), with the "
                     f"bf16 decode {total:.0f} ms per {frames} frames ({1e3 * frames / total:.1f} FPS)")
    env = gpu_plan.plan_environment("qwix")
    body = (f"FP8 block linears (float8_e4m3fn, per-output-channel scales, per-token fp8 activations via qwix) in "
            f"the H100 plans ({'tiny model' if args.tiny else '14B DiT'}, {size.height}x{size.width}, "
            f"{size.latent_frames} latent frames; GEMM choices "
            f"{'from ' + args.autotune if args.autotune else 'default (not autotuned)'}). Roofline: bf16 GEMMs at "
            f"{roofline.MATMUL_FLOPS / 1e12:.0f} TFLOP/s, fp8 GEMMs at {FP8_MATMUL_FLOPS / 1e12:.0f} TFLOP/s "
            f"(assumed: 2x, as the fp8 dense peak is 2x the bf16 one), {roofline.HBM_BYTES / 1e12:.2f} TB/s.\n\n"
            + reporting.markdown_table(MEMORY_HEADERS, memory) + "\n"
            + reporting.markdown_table(GEMM_HEADERS, gemm_rows)
            + "\n" + reporting.markdown_table(TIME_HEADERS, time_rows) + "\n" + "\n".join(lines) + "\n")
    result = {"env": env, "memory": memory, "gemms": gemm_rows, "times": time_rows, "chunk_ms": chunk_ms,
              "decode_ms": decode_ms, "resident_gib": {f"{w} weights, {v} VAE": g for (w, v), g in fits.items()}}
    return reporting.report("fp8_plan", env, body, result, args)


if __name__ == "__main__":
    gpu_plan.compile_on_cpu()
    sys.exit(main() and 0)
