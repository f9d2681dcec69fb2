"""Per-device plans of Helios on one host of 8 H100s, compiled on a CPU with no GPU (issue 13).

    .venv-gpu-plan/bin/python -m experiments.plans.mesh_plan          # the 14B plans (minutes), appended to RESULTS.md
    .venv-gpu-plan/bin/python -m experiments.plans.mesh_plan --tiny   # the same programs of an 8-head toy (seconds)

The programs are the project's own on ``parallel.make_mesh`` over the 8 H100s of ``jax.experimental.topologies``
(topology ``1x1x8``, gpu_plan's target config): the distilled chunk (2+2+2) on ``context=8``, the base chunk
(50 UniPC steps, CFG) on ``data=2 x context=4`` (the CFG pair over ``data``), both as
``HeliosPipeline.lower_chunk`` lowers them on a mesh, and the stage-1 training step (train_plan's, LoRA r256,
remat, bf16 base) on ``fsdp=8`` with one sample per GPU. XLA's SPMD partitioner writes one program per
device; its memory plan is per device, and its collectives are read from the optimised HLO with every loop's
trip count multiplied in (roofline.Module).

Bytes per collective kind are what one device sends in a step, for ring algorithms over a group of n:
all-gather (n-1)/n of its result, reduce-scatter (n-1)/n of its operand, all-reduce 2(n-1)/n of it, all-to-all
(n-1)/n of it, collective-permute all of it. Communication time: those bytes at 450 GB/s (NVLink 4, one
direction per H100 SXM). Compute time: the per-device GEMM and attention FLOPs of the same HLO at 790 TFLOP/s;
one device's: the program's model FLOPs (flop_counts.dit_flops) at that rate. Predicted speed-up over one device:
without overlap (compute + communication) and with perfect overlap (the larger of the two).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
import sys
from typing import Any

import jax

from experiments import flop_counts, provenance, reporting, workloads
from experiments.plans import gpu_plan, roofline, train_plan
from helios_jax import demo
from helios_jax.config import TransformerConfig, VAEConfig

NVLINK_BYTES = 450e9  # per direction per H100 SXM (NVLink 4: 900 GB/s both ways)
KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
RING_SHARE = {"all-gather": "result", "reduce-scatter": "operand", "all-reduce": "operand", "all-to-all": "operand",
              "collective-permute": "operand"}
BASE_STEPS = 50
DISTILLED_STEPS = (2, 2, 2)
# The toy: 8 heads (so context=8 and 4 run Ulysses), 2 layers, at 128x128.
TINY = dataclasses.replace(gpu_plan.TINY, cfg=TransformerConfig(**{**workloads.tiny_config_kwargs(),
                                                                   "num_attention_heads": 8}))


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    operand_bytes: int
    result_bytes: int
    group: int  # devices in its group
    count: int  # times it runs per program run
    result_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (dtype, dims) of each array it results in

    @property
    def sent_bytes(self) -> float:
        """What one device sends per run of this op (see the module doc)."""
        n = self.group
        if self.kind == "collective-permute":
            return float(self.operand_bytes)
        size = self.result_bytes if RING_SHARE[self.kind] == "result" else self.operand_bytes
        return (2 if self.kind == "all-reduce" else 1) * (n - 1) / n * size


def group_size(attrs: str, operand_bytes: int, result_bytes: int, kind: str) -> int:
    """Devices per replica group, from ``{{0,1,..},..}``, iota ``[G,S]<=[N]`` or
    ``mesh['axis_0'=4,..] ... {'axis_0'}`` (gathers and scatters: from their operand and result sizes)."""
    if kind == "collective-permute":
        return 2
    if kind == "all-gather" and operand_bytes:
        return result_bytes // operand_bytes
    if kind == "reduce-scatter" and result_bytes:
        return operand_bytes // result_bytes
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if listed:
        return len(listed.group(1).split(","))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if iota:
        return int(iota.group(2))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\].*?\}?\s*\{([^}]*)\}", attrs)
    if mesh:
        sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", mesh.group(1))}
        return math.prod(sizes[a] for a in re.findall(r"'(\w+)'", mesh.group(2)))
    raise ValueError(f"cannot read the replica groups of a {kind}: {attrs[:200]}")


def collectives(hlo: str) -> list[Collective]:
    """Every collective of an optimised HLO module (async pairs counted once), with its loops' trip counts."""
    module = roofline.Module(hlo)
    done = {i.operands[0]: i.shape for c in module.computations.values() for i in c
            if i.opcode.endswith("-done") and i.operands}
    found = []
    for inst, count in module.instructions():
        kind = next((k for k in KINDS if inst.opcode in (k, f"{k}-start")), None)
        if kind is None:
            continue
        operand = sum(roofline.nbytes(module.shape.get(o, "")) for o in inst.operands)
        shape = done[inst.name] if inst.opcode.endswith("-start") else inst.shape
        result = roofline.nbytes(shape)
        found.append(Collective(kind, operand, result, group_size(inst.attrs, operand, result, kind), count,
                                tuple(roofline.shapes(shape))))
    return found


def sent_by_kind(ops: list[Collective]) -> dict[str, float]:
    totals = collections.Counter()
    for op in ops:
        totals[op.kind] += op.count * op.sent_bytes
    return {k: float(totals[k]) for k in KINDS}


@dataclasses.dataclass
class MeshPlan:
    """One program compiled for a mesh of H100s, with its one-device model FLOPs (for the scaling)."""

    name: str
    mesh: dict[str, int]
    plan: gpu_plan.Plan
    one_device_flops: float  # the same work on one H100
    weak: bool = False  # training: each device takes one sample, so the mesh does 8x one device's work
    parts: dict[str, int] = dataclasses.field(default_factory=dict)  # training: bytes of its parts (train_plan)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @functools.cached_property
    def ops(self) -> list[Collective]:
        return collectives(self.plan.hlo)

    @property
    def device_flops(self) -> float:
        return roofline.matmul_flops(roofline.Module(self.plan.hlo).kernels())

    def times(self) -> dict[str, float]:
        comm = sum(sent_by_kind(self.ops).values()) / NVLINK_BYTES
        compute = self.device_flops / roofline.MATMUL_FLOPS
        one = self.one_device_flops / roofline.MATMUL_FLOPS * (self.devices if self.weak else 1)
        return {"compute": compute, "comm": comm, "one": one,
                "speedup_serial": one / (compute + comm), "speedup_overlap": one / max(compute, comm)}


def chunk_plans(size: gpu_plan.Size) -> list[MeshPlan]:
    """The distilled chunk on context=8 and the base chunk with CFG on data=2 x context=4."""
    runs = [("distilled chunk 2+2+2", {"context": 8}, gpu_plan.DISTILLED, dict(demo.SCHEDULER),
             dict(guidance_scale=1.0, pyramid_num_inference_steps_list=list(DISTILLED_STEPS))),
            (f"base chunk {BASE_STEPS} steps CFG", {"data": 2, "context": 4}, gpu_plan.BASE, workloads.base_scheduler(1.0),
             dict(guidance_scale=5.0, num_inference_steps=BASE_STEPS))]
    plans = []
    for name, sizes, spec, scheduler, settings in runs:
        pipe = mesh_pipeline(size.cfg, size.vae, scheduler, spec, gpu_plan.h100_mesh(**sizes))
        plan = gpu_plan.compile_plan(name, pipe.lower_chunk(**size.settings(), **settings), pipe.transformer_params)
        steps = DISTILLED_STEPS if spec.pyramid else (BASE_STEPS,)
        work = size.work if spec.pyramid else dataclasses.replace(size.work, stages=size.work.stages[-1:])
        flops = flop_counts.chunk_flops(size.cfg, work, steps, guided=not spec.pyramid)
        plans.append(MeshPlan(name, sizes, plan, flops))
        print(f"{name} on {sizes}: compiled in {plan.compile_s:.0f} s", flush=True)
    return plans


def mesh_pipeline(cfg: TransformerConfig, vae: VAEConfig, scheduler: dict, spec: Any, mesh: jax.sharding.Mesh,
                  platform: str = "gpu", vae_dtype: Any = None) -> Any:
    """gpu_plan's abstract pipeline on ``mesh`` (of ``platform``'s devices): the DiT's shape structs sharded by
    its table, the attention the pipeline picks there."""
    from helios_jax.pipeline import HeliosPipeline

    extra = {} if vae_dtype is None else {"vae_dtype": vae_dtype}
    pipe = gpu_plan.abstract_pipeline(cfg, vae, scheduler, spec, platform=platform, **extra)
    return HeliosPipeline((cfg, pipe.transformer_params), (vae, pipe.vae_params), None, scheduler, spec,
                          attention_impl=pipe.attention_impl, mesh=mesh)


TRAIN_CASE = train_plan.StepCase("stage 1 LoRA r256, 1 sample per GPU", "stage_1_init.yaml", 8,
                                 ("model_config.lora_rank=256", "model_config.lora_alpha=256.0"))


def train_step_plan(size: gpu_plan.Size) -> MeshPlan:
    """The stage-1 step on fsdp=8, batch 8 (one sample a GPU): weights, LoRA and AdamW state split over fsdp."""
    sizes = {"fsdp": 8}
    latent = (size.height // 8, size.width // 8)
    step = train_plan.step_plan(TRAIN_CASE, size.cfg, None, latent, size.text_tokens, mesh=gpu_plan.h100_mesh(**sizes))
    flops = roofline.matmul_flops(roofline.Module(step.plan.hlo).kernels())  # one sample's work per device
    print(f"{TRAIN_CASE.name} on {sizes}: compiled in {step.plan.compile_s:.0f} s", flush=True)
    return MeshPlan(TRAIN_CASE.name, sizes, step.plan, flops, weak=True, parts=step.sizes)


HEADERS = ["program", "mesh", "compile s", "arguments GiB/device", "temporaries GiB/device",
           *[f"{k} GB" for k in KINDS],
           "comm ms", "compute ms", "1 device ms", "speed-up (serial)", "speed-up (overlap)"]


def table_rows(plans: list[MeshPlan]) -> list[list[Any]]:
    rows = []
    for p in plans:
        sent, t = sent_by_kind(p.ops), p.times()
        rows.append([p.name, " x ".join(f"{a}={n}" for a, n in p.mesh.items()), p.plan.compile_s,
                     reporting.gib(p.plan.argument_bytes), reporting.gib(p.plan.temp_bytes),
                     *[sent[k] / 1e9 for k in KINDS], 1e3 * t["comm"], 1e3 * t["compute"], 1e3 * t["one"],
                     t["speedup_serial"], t["speedup_overlap"]])
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = gpu_plan.plan_parser(__doc__, autotune=False).parse_args(argv)
    size = gpu_plan.plan_size(args)
    size = TINY if args.tiny else size
    plans = chunk_plans(size) + [train_step_plan(size)]
    rows = table_rows(plans)
    env = provenance.environment("8 x NVIDIA H100 80GB HBM3 (one host, topology 1x1x8), compiled deviceless on the CPU",
                             provenance.versions("jax", "jaxlib", "jax-cuda12-plugin", "flax"))
    body = (f"Per-device plans on 8 H100s from abstract inputs ({'8-head toy' if args.tiny else '14B DiT'}, "
            f"{size.cfg.num_layers} layers; {size.height}x{size.width}, {size.latent_frames} latent frames, "
            f"{size.text_tokens} text tokens; bf16 DiT; GEMMs not autotuned). Collective GB: what one device sends "
            "per chunk or step (ring algorithms; see experiments/plans/mesh_plan.py), comm ms at 450 GB/s NVLink, "
            "compute "
            "ms: the per-device HLO's GEMM+attention FLOPs at 790 TFLOP/s; 1 device ms: the same work on one H100 "
            "(training: 8 samples, one H100 doing them in turn); speed-up over one device without overlap "
            "(compute + comm) and with perfect overlap.\n\n" + reporting.markdown_table(HEADERS, rows))
    return reporting.report("mesh_plan", env, body, {"env": env, "headers": HEADERS, "rows": rows}, args)


if __name__ == "__main__":
    gpu_plan.compile_on_cpu()
    sys.exit(main() and 0)
