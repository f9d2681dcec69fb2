"""The H100's compiled plans of Helios' programs, read on a CPU with no GPU (deviceless AOT compilation).

    make gpu-plan                                    # installs jax's CUDA plugin (locks/gpu-plan.txt), runs the tier
    .venv/bin/python -m experiments.plans.gpu_plan         # the 14B plans as a table, appended to RESULTS.md
    .venv/bin/python -m experiments.plans.gpu_plan --tiny  # the same programs at a toy size (seconds)

Every input is a ``jax.ShapeDtypeStruct`` placed on an H100 of ``jax.experimental.topologies`` built from
XLA's own H100 target config (``experiments/targets/h100_sxm.txtpb``), so nothing is allocated; jax's CUDA
plugin compiles the optimised GPU HLO and its memory plan here. Programs: the 14B DiT forward at every
pyramid stage (bf16, the attention the pipeline picks for a GPU), the pipeline's own distilled chunk
program (``HeliosPipeline.lower_chunk``: 2+2+2, and 1+1+1 amplified, which runs 2+2+2 steps), the base
chunk (50 UniPC steps with CFG), and the Wan VAE chunk decode in fp32 and bf16. GEMM tiling and the
cuBLAS/Triton choice are XLA's defaults (no autotuning without a device) unless ``--autotune FILE``
replays results dumped on a real H100 (``experiments/benchmarks/headline.py`` writes them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from experiments import flop_counts, paths, provenance, reporting, workloads
from experiments.model_inputs import abstract_inputs, abstract_params
from helios_jax import demo
from helios_jax.config import TransformerConfig, VAEConfig
from helios_jax.models import transformer as transformer_lib, vae as vae_lib
from helios_jax.models.attention import default_impl
from helios_jax.pipeline import HeliosPipeline, PipelineSpec

H100_TARGET = os.path.join(paths.TARGETS, "h100_sxm.txtpb")
GPU_MEMORY_GB = 80  # the H100 SXM's HBM3, as sold (the target config's device_memory_size: 79.1 GiB)
DIT_TEMP_LIMIT_GIB = 2.0
CUDNN_ATTENTION = "__cudnn$fmha"


def compile_on_cpu() -> None:
    """Run this process's JAX on the CPU unless ``JAX_PLATFORMS`` already names a platform: the plans are compiled
    here for a GPU that is not here, and jax's CUDA plugin would otherwise look for one (cuInit) and print its
    failure. Each plan script calls it as it starts, before anything starts a backend; importing a plan
    module changes nothing (the gpu-plan tests run with ``JAX_PLATFORMS=cpu``)."""
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def plugin_missing() -> str | None:
    """Why the H100 plans cannot be compiled here (None when they can)."""
    # find_spec of a submodule raises when its parent package is absent, so ask for the parent first.
    if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        return ("jax's CUDA plugin is not installed: `make gpu-plan` installs it (locks/gpu-plan.txt, "
                f"jax-cuda12-plugin=={jax.__version__} and its nvidia-* wheels)")
    return None


@functools.cache
def h100_topology(topology: str = "1x1x1", autotune: str | None = None) -> Any:
    """H100 SXMs that are not here: ``"1x1x1"`` one GPU, ``"1x1x8"`` one host with 8 (hosts x ? x GPUs)."""
    from jax.experimental import topologies

    if autotune:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_load_autotune_results_from={autotune}".strip()
    with open(H100_TARGET, encoding="utf-8") as f:
        return topologies.get_topology_desc(platform="cuda", target_config=f.read(), topology=topology)


def h100(autotune: str | None = None) -> jax.sharding.Sharding:
    """One H100 SXM that is not here, as a sharding to put abstract inputs on."""
    return jax.sharding.SingleDeviceSharding(h100_topology("1x1x1", autotune).devices[0])


def h100_mesh(**sizes: int) -> jax.sharding.Mesh:
    """The project's mesh (``parallel.make_mesh``: data, fsdp, context, tensor) over that many H100s of one host."""
    from helios_jax import parallel

    devices = h100_topology(f"1x1x{math.prod(sizes.values())}").devices
    return parallel.make_mesh(**sizes, devices=devices)


def plan_environment(*packages: str) -> dict:
    """The environment block of a one-H100 plan's report: the target, and jax's versions plus ``packages``."""
    return provenance.environment("NVIDIA H100 80GB HBM3, compiled deviceless on the CPU (no GPU)",
                              provenance.versions("jax", "jaxlib", "jax-cuda12-plugin", "flax", *packages))


def device_memory_bytes() -> int:
    """The H100's memory as the target config states it."""
    with open(H100_TARGET, encoding="utf-8") as f:
        return int(re.search(r"device_memory_size:\s*(\d+)", f.read()).group(1))


def on_device(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


@dataclasses.dataclass
class Plan:
    """One program compiled for the H100: its optimised HLO and memory plan."""

    name: str
    compiled: Any
    compile_s: float
    weights: Any = None  # the abstract params it takes (for the float32-copy check)

    @functools.cached_property
    def hlo(self) -> str:
        return self.compiled.as_text()

    @property
    def memory(self) -> Any:
        return self.compiled.memory_analysis()

    @property
    def argument_bytes(self) -> int:
        return self.memory.argument_size_in_bytes

    @property
    def temp_bytes(self) -> int:
        return self.memory.temp_size_in_bytes

    @property
    def peak_bytes(self) -> int:
        """XLA's peak of the executable's heap simulation, arguments included (they are live throughout): what a
        chip must hold at once. It can be below arguments + temporaries, whose allocations need not all be live
        together, and it is what libtpu holds against a TPU's HBM when it refuses a program."""
        return self.memory.peak_memory_in_bytes

    @property
    def output_bytes(self) -> int:
        return self.memory.output_size_in_bytes

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.memory.alias_size_in_bytes

    @property
    def custom_calls(self) -> list[str]:
        return sorted(set(re.findall(r'custom_call_target="([^"]+)"', self.hlo)))

    @property
    def cudnn_attention(self) -> bool:
        return any(c.startswith(CUDNN_ATTENTION) for c in self.custom_calls)

    def float32_weight_copies(self) -> list[str]:
        """HLO values inside the layer scan of a 16-bit stacked weight's shape (whole stack or one layer)
        made in float32: a weight upcast before its GEMM, which doubles that GEMM's weight traffic."""
        if self.weights is None:
            return []
        shapes = set()
        for path, leaf in traverse_util.flatten_dict(self.weights).items():
            if path[0] == "blocks" and leaf.ndim >= 3 and jnp.dtype(leaf.dtype).itemsize == 2:
                shapes |= {tuple(leaf.shape), tuple(leaf.shape[1:])}
        found = []
        for shape in shapes:
            pattern = re.compile(r"= f32\[" + ",".join(map(str, shape)) + r"\]")
            found += [line.strip()[:140] for line in self.hlo.splitlines()
                      if pattern.search(line) and "blocks" in line and " parameter(" not in line]
        return found


def compile_plan(name: str, lowered: jax.stages.Lowered, weights: Any = None) -> Plan:
    start = time.perf_counter()
    compiled = lowered.compile()
    return Plan(name, compiled, time.perf_counter() - start, weights)


# --- the programs --------------------------------------------------------------------------------------


def dit_forward(cfg: TransformerConfig, work: workloads.Workload, stage: int, sharding: jax.sharding.Sharding,
                dtype: Any = jnp.bfloat16, platform: str = "gpu") -> Plan:
    """One DiT forward at ``stage`` with the attention the pipeline picks in ``dtype`` on ``platform``."""
    model = transformer_lib.HeliosTransformer(cfg, attention_impl=default_impl(dtype, platform))
    params = abstract_params(transformer_lib.param_shapes(cfg), dtype)
    inputs = {k: jax.ShapeDtypeStruct(v.shape, dtype if v.dtype == jnp.bfloat16 else v.dtype)
              for k, v in abstract_inputs(cfg, work, stage).items()}
    lowered = jax.jit(model.apply).lower({"params": on_device(params, sharding)}, **on_device(inputs, sharding))
    return compile_plan(f"DiT forward, stage {stage}", lowered, params)


def abstract_pipeline(cfg: TransformerConfig, vae_cfg: VAEConfig, scheduler: dict, spec: PipelineSpec,
                      vae_dtype: Any = jnp.float32, dtype: Any = jnp.bfloat16, platform: str = "gpu") -> HeliosPipeline:
    """A HeliosPipeline whose weights are shapes only, with the attention it would pick on ``platform``."""
    params = abstract_params(transformer_lib.param_shapes(cfg), dtype)
    vae_params = abstract_params(vae_lib.param_shapes(vae_cfg), vae_dtype, keep_fp32=False)
    return HeliosPipeline((cfg, params), (vae_cfg, vae_params), None, scheduler, spec,
                          attention_impl=default_impl(dtype, platform))


DISTILLED = PipelineSpec(pyramid=True, is_distilled=True)
BASE = PipelineSpec(pyramid=False)


@dataclasses.dataclass(frozen=True)
class Size:
    """What the plans are compiled at: the model, the video, the VAE, the text length."""

    cfg: TransformerConfig
    vae: VAEConfig
    height: int
    width: int
    latent_frames: int
    text_tokens: int

    @property
    def work(self) -> workloads.Workload:
        return workloads.chunk_workload(self.height, self.width, 3, self.text_tokens, self.latent_frames)

    def settings(self) -> dict[str, Any]:
        return dict(height=self.height, width=self.width, num_latent_frames_per_chunk=self.latent_frames,
                    max_sequence_length=self.text_tokens)


HELIOS_14B = Size(TransformerConfig(), VAEConfig(), 384, 640, workloads.LATENT_FRAMES, 512)
TINY = Size(TransformerConfig(**workloads.tiny_config_kwargs()), VAEConfig(**workloads.tiny_vae_kwargs()),
            128, 128, 3, 16)


def plan_parser(description: str | None, *, autotune: bool = True) -> argparse.ArgumentParser:
    """The arguments every H100-plan script takes: --tiny, --autotune (if it replays GEMM choices), --json, --results."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model at 128x128 (seconds)")
    if autotune:
        parser.add_argument("--autotune", default=None, help="replay GEMM autotune results dumped on a real H100")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--results", default=paths.RESULTS, help="markdown file to append to ('' = none)")
    return parser


def plan_size(args: argparse.Namespace) -> Size:
    """The model size a plan script compiles (``--tiny`` or the 14B), after checking the CUDA plugin is there."""
    missing = plugin_missing()
    if missing:
        raise SystemExit(missing)
    return TINY if args.tiny else HELIOS_14B


def chunk_programs(size: Size, sharding: jax.sharding.Sharding, base_steps: int = 50) -> list[Plan]:
    """The pipeline's own chunk programs: distilled 2+2+2, 1+1+1 amplified (its first chunk), base with CFG."""
    distilled = abstract_pipeline(size.cfg, size.vae, dict(demo.SCHEDULER), DISTILLED)
    base = abstract_pipeline(size.cfg, size.vae, workloads.base_scheduler(1.0), BASE)
    weights = distilled.transformer_params
    runs = [
        ("distilled chunk 2+2+2", distilled, dict(guidance_scale=1.0, pyramid_num_inference_steps_list=[2, 2, 2])),
        ("distilled chunk 1+1+1 amplified", distilled,
         dict(guidance_scale=1.0, pyramid_num_inference_steps_list=[1, 1, 1], is_amplify_first_chunk=True)),
        (f"base chunk {base_steps} steps CFG", base, dict(guidance_scale=5.0, num_inference_steps=base_steps)),
    ]
    return [compile_plan(name, pipe.lower_chunk(**size.settings(), **kw, sharding=sharding), weights)
            for name, pipe, kw in runs]


def decode_program(size: Size, sharding: jax.sharding.Sharding, vae_dtype: Any) -> Plan:
    pipe = abstract_pipeline(size.cfg, size.vae, dict(demo.SCHEDULER), DISTILLED, vae_dtype=vae_dtype)
    lowered = pipe.lower_decode(height=size.height, width=size.width, latent_frames=size.latent_frames,
                                sharding=sharding)
    return compile_plan(f"VAE decode {jnp.dtype(vae_dtype).name}", lowered)


def all_plans(size: Size, sharding: jax.sharding.Sharding) -> dict[str, Plan]:
    plans = [dit_forward(size.cfg, size.work, s, sharding) for s in range(3)]
    plans += chunk_programs(size, sharding)
    plans += [decode_program(size, sharding, d) for d in (jnp.float32, jnp.bfloat16)]
    return {p.name: p for p in plans}


def chunk_with_vae_bytes(chunk: Plan, decode: Plan) -> int:
    """The distilled chunk and its decode resident at once (the decode of chunk k overlaps the sampling of
    chunk k + 1): every argument, temporary and output of both programs."""
    return chunk.total_bytes + decode.total_bytes


# --- report -------------------------------------------------------------------------------------------

HEADERS = ["program", "compile s", "arguments GiB", "temporaries GiB", "output GiB", "total GiB", "cuDNN attention",
           "f32 weight copies", "custom calls"]


def table_rows(plans: dict[str, Plan]) -> list[list[Any]]:
    rows = []
    for p in plans.values():
        calls = ", ".join(c for c in p.custom_calls if not c.startswith(CUDNN_ATTENTION)) or "-"
        rows.append([p.name, p.compile_s, reporting.gib(p.argument_bytes), reporting.gib(p.temp_bytes),
                     reporting.gib(p.output_bytes), reporting.gib(p.total_bytes), "yes" if p.cudnn_attention else "no",
                     len(p.float32_weight_copies()), calls])
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = plan_parser(__doc__).parse_args(argv)
    size = plan_size(args)
    plans = all_plans(size, h100(args.autotune))
    rows = table_rows(plans)
    both = chunk_with_vae_bytes(plans["distilled chunk 2+2+2"], plans["VAE decode float32"])
    env = plan_environment()
    work = size.work
    noisy, history = flop_counts.token_counts(size.cfg, work, 2)
    body = (f"H100 plans compiled on a CPU from abstract inputs ({'tiny model' if args.tiny else '14B DiT'}, "
            f"inner dim {size.cfg.inner_dim}, {size.cfg.num_layers} layers; {size.height}x{size.width}, "
            f"{size.latent_frames} latent frames, {noisy}+{history} tokens at stage 2; bf16 DiT; target config "
            f"experiments/targets/h100_sxm.txtpb; GEMM choices "
            f"{'from ' + args.autotune if args.autotune else 'default (not autotuned)'}).\n\n"
            + reporting.markdown_table(HEADERS, rows)
            + f"\nDistilled chunk 2+2+2 with the fp32 VAE decode resident at once: {reporting.gib(both):.1f} GiB "
              f"(H100: {reporting.gib(device_memory_bytes()):.1f} GiB).\n")
    return reporting.report("gpu_plan", env, body, {"env": env, "headers": HEADERS, "rows": rows}, args)


if __name__ == "__main__":
    compile_on_cpu()
    sys.exit(main() and 0)
