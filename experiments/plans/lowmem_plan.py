"""The low-memory mode (``offload="blocks"``) planned for an H100 capped at 24 GB and 12 GB, bf16 and fp8.

    .venv-gpu-plan/bin/python -m experiments.plans.lowmem_plan          # 14B: many minutes on 2 cores
    .venv-gpu-plan/bin/python -m experiments.plans.lowmem_plan --tiny   # the same programs at a toy size

The pipeline's distilled chunk (2+2+2, 6 DiT forwards) with the DiT's blocks in pinned host memory, streamed a
layer ahead (``helios_jax.models.offload``), compiled deviceless for an H100 whose target config says 24 GB or
12 GB of device memory (XLA's scheduler keeps its plan under the device's size), beside the resident chunk; and the
rest of the offloaded pipeline under the same caps: umt5-xxl's encoding of one prompt (its embedding and layers in
host memory) and the VAE decode in float32 and bf16, with the whole pipeline's peak (:func:`pipeline_peak`). The
devices of ``jax.experimental.topologies`` have no host memory space (jax drops ``memory_kind`` on them), so the
program is lowered for CUDA on this machine's CPU device, which has one, and the module compiled by the H100
topology's compile-only client (:func:`compile_for`; jax's private ``compiler`` module, as ``Lowered.compile``
does it: no public API compiles a lowered module for another client). For the resident tiny chunk this path
gives the very plan of ``Lowered.compile()`` on the topology (the same argument, temporary and output bytes, cuDNN
attention; checked by hand). Per program the table gives:

- device memory: XLA's plan (arguments + temporaries + outputs - aliases in device memory), against what a 24 GB
  (22.0 GiB, as experiments/plans/fp8_plan.py) or 12 GB card (10.7 GiB: 11.2 less the same 0.5 GiB of CUDA
  context and allocator slack) leaves;
- host arguments: the weights the program reads from host memory (XLA's plan);
- streamed: whether every block weight appears in device memory only as one layer's slice (no 40-layer stack
  resident), and how many of the host-to-device copies inside the block loops (the computations that run
  attention) have a GEMM scheduled between their start and their done (overlap in the scheduled HLO);
- bytes over PCIe per chunk: the bytes of one layer's copies read from the HLO, times (40 + 1) copies per
  forward (the last layer is fetched twice: one compiled body) and the forwards per chunk, plus the text K/V's
  one pass; and the time PCIe bounds per chunk at PCIE_BANDWIDTHS (effective rates, assumed, not measured).

Host RAM is measured, not planned (:func:`measure_host_rss`): the peak RSS (VmHWM) of a fresh process that
holds the DiT's params with the blocks in pinned host memory (jax's CPU device, which has the same memory
kinds), built leaf by leaf. This machine has 23 GB of RAM, so ``--rss_layers`` says how many of the 40 layers
those processes hold (two counts, so the slope's linearity shows); each row says how many it held, and the
40-layer figure is the measured per-layer slope carried to 40 layers, labelled so.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from experiments import reporting
from experiments.model_inputs import abstract_params
from experiments.plans import gpu_plan
from experiments.plans.fp8_plan import dit_params
from helios_jax import demo
from helios_jax.config import UMT5Config
from helios_jax.models import offload, umt5, vae as vae_lib
from helios_jax.models.attention import default_impl
from helios_jax.pipeline import HeliosPipeline
from helios_jax.prompts import lower_encode
from helios_jax.sampling.chunk import STREAMED_COMPILER_OPTIONS

CAPS_GB = (24, 12)
USABLE_GIB = {24: 22.0, 12: 10.7}  # what a card of that many GB leaves after the CUDA context and allocator slack
PCIE_BANDWIDTHS = {"PCIe 4 x16": 25e9, "PCIe 5 x16": 50e9}  # effective bytes/s assumed (of 32 and 64 GB/s peak)
FORWARDS_2_2_2 = 6
# The text encoder the plans run: umt5-xxl (its config.json's shapes), or a toy one with --tiny.
UMT5_XXL = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
TINY_TEXT = UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
GEMM = re.compile(r"__cublas|__cudnn\$fmha|gemm_fusion|triton_gemm")  # a GEMM or attention launch in the HLO
ATTENTION = "__cudnn$fmha"


@functools.cache
def capped_h100(cap_gb: int) -> Any:
    """One H100 whose target config says ``cap_gb`` GB of device memory (the scheduler plans under it)."""
    from jax.experimental import topologies

    with open(gpu_plan.H100_TARGET, encoding="utf-8") as f:
        target = re.sub(r"device_memory_size:\s*\d+", f"device_memory_size: {cap_gb * 10**9}", f.read())
    return topologies.get_topology_desc(platform="cuda", target_config=target, topology="1x1x1").devices[0]


@dataclasses.dataclass
class Executable:
    """A module compiled by a compile-only client, read as ``gpu_plan.Plan`` reads a ``jax.stages.Compiled``."""

    executable: Any

    def as_text(self) -> str:
        return self.executable.hlo_modules()[0].to_string()

    def memory_analysis(self) -> Any:
        return self.executable.get_compiled_memory_stats()


def compile_for(device: Any, lowered: jax.stages.Lowered, name: str, weights: Any,
                options: dict[str, Any] | None = None) -> gpu_plan.Plan:
    """``lowered`` (lowered for CUDA on this machine) compiled for ``device`` of a deviceless topology, with XLA's
    ``options`` (the jitted function's ``compiler_options``, which a module compiled here does not carry)."""
    import time

    from jax._src import compiler
    from jax._src.lib import xla_client

    options = compiler.get_compile_options(num_replicas=1, num_partitions=1, device_assignment=[device],
                                           env_options_overrides=options)
    start = time.perf_counter()
    built = compiler.backend_compile_and_load(device.client, lowered.compiler_ir("stablehlo"),
                                              xla_client.DeviceList((device,)), options, [])
    return gpu_plan.Plan(name, Executable(built), time.perf_counter() - start, weights)


def chunk_pipeline(size: gpu_plan.Size, weight_dtype: str, offloaded: bool) -> HeliosPipeline:
    vae = abstract_params(vae_lib.param_shapes(size.vae), jnp.bfloat16, keep_fp32=False)
    return HeliosPipeline((size.cfg, dit_params(size.cfg, weight_dtype)), (size.vae, vae), None, dict(demo.SCHEDULER),
                          gpu_plan.DISTILLED, attention_impl=default_impl(jnp.bfloat16, "gpu"),
                          offload=offload.BLOCKS if offloaded else None)


def chunk_plan(size: gpu_plan.Size, weight_dtype: str, offloaded: bool, cap_gb: int,
               default_async_limit: bool = False) -> gpu_plan.Plan:
    """The distilled chunk 2+2+2 for the H100 capped at ``cap_gb``, compiled as the pipeline compiles it (the
    streamed program with ``sampling.chunk.STREAMED_COMPILER_OPTIONS``), or with XLA's default async limit."""
    pipe = chunk_pipeline(size, weight_dtype, offloaded)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    lowered = pipe.lower_chunk(**size.settings(), guidance_scale=1.0, pyramid_num_inference_steps_list=[2, 2, 2],
                               sharding=cpu, lowering_platforms=("cuda",))
    name = f"chunk 2+2+2, {weight_dtype}, {'blocks offloaded' if offloaded else 'resident'}, {cap_gb} GB"
    options = STREAMED_COMPILER_OPTIONS if offloaded and not default_async_limit else None
    name += ", XLA's default async limit" if offloaded and default_async_limit else ""
    return compile_for(capped_h100(cap_gb), lowered, name, pipe.transformer_params, options)


def encode_plan(text_cfg: UMT5Config, tokens: int, cap_gb: int) -> gpu_plan.Plan:
    """The offloaded pipeline's text encoding of one prompt (the distilled model runs no CFG: batch 1) for the H100
    capped at ``cap_gb``, compiled as ``PromptEncoder`` compiles it (bf16, XLA's attention, its default options):
    the embedding and the layers in host memory, lowered for CUDA on the CPU device as the chunk is."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    shapes = abstract_params(umt5.param_shapes(text_cfg), jnp.bfloat16, keep_fp32=False)
    where = offload.host_blocks(shapes, jax.tree.map(lambda _: cpu, shapes), umt5.is_hosted_leaf)
    params = jax.tree.map(lambda x, w: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=w), shapes, where)
    model = umt5.UMT5Encoder(text_cfg, "xla", offload=True)  # what PromptEncoder(offload=True) runs
    lowered = lower_encode(model, params, jax.ShapeDtypeStruct((1, tokens), jnp.int32, sharding=cpu), ("cuda",))
    return compile_for(capped_h100(cap_gb), lowered, f"text encoding, bf16, offloaded, {cap_gb} GB", params)


def decode_plan(size: gpu_plan.Size, cap_gb: int, vae_dtype: Any = jnp.float32) -> gpu_plan.Plan:
    """The chunk's VAE decode (``pipe.lower_decode``; the VAE stays on the device, in float32 as from_pretrained
    loads it) for the H100 capped at ``cap_gb``."""
    pipe = gpu_plan.abstract_pipeline(size.cfg, size.vae, dict(demo.SCHEDULER), gpu_plan.DISTILLED, vae_dtype=vae_dtype)
    lowered = pipe.lower_decode(height=size.height, width=size.width, latent_frames=size.latent_frames,
                                sharding=jax.sharding.SingleDeviceSharding(capped_h100(cap_gb)))
    return gpu_plan.compile_plan(f"VAE decode, {jnp.dtype(vae_dtype).name}, {cap_gb} GB", lowered, pipe.vae_params)


# --- reading the plan ---------------------------------------------------------------------------------------


def device_bytes(plan: gpu_plan.Plan) -> int:
    return plan.total_bytes


def host_argument_bytes(plan: gpu_plan.Plan) -> int:
    return plan.memory.host_argument_size_in_bytes


def computations(hlo: str) -> dict[str, list[str]]:
    """The scheduled HLO's computations, each as its instruction lines in schedule order."""
    out, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            out[name] = []
        elif name and line.startswith("  "):
            out[name].append(line.strip())
    return out


HLO_ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "f8e4m3fn": 1, "s32": 4, "u32": 4, "pred": 1}
# ``%name = ((bf16[40,5120,5120]{2,1,0:S(5)}, s32[], ...), bf16[1,5120,5120]{2,1,0}, u32[]) fusion-start(...)``:
# an asynchronous dynamic slice out of host memory (S(5)) into device memory.
HOST_COPY_START = re.compile(r"^%([\w.\-]+) = \(\(\w+\[[\d,]*\]\{[\d,]*:S\(5\)\}[^)]*\), (\w+)\[([\d,]*)\]"
                             r"\{[\d,]*\}, [^)]*\) (?:fusion|copy)-start\(")


def host_copies(hlo: str) -> list[dict[str, Any]]:
    """Every asynchronous copy out of host memory: its computation, the bytes it brings in, and whether a GEMM
    is scheduled between its start and its done (the copy overlaps compute)."""
    copies = []
    for name, lines in computations(hlo).items():
        for i, line in enumerate(lines):
            start = HOST_COPY_START.match(line)
            if not start:
                continue
            done = next((j for j in range(i + 1, len(lines)) if f"(%{start.group(1)})" in lines[j]), len(lines))
            size = math.prod(int(d) for d in start.group(3).split(",") if d) * HLO_ITEMSIZE[start.group(2)]
            copies.append({"computation": name, "bytes": size,
                           "overlapped": any(GEMM.search(x) for x in lines[i + 1:done])})
    return copies


def layer_loops(hlo: str) -> dict[str, list[dict[str, Any]]]:
    """The host copies of each computation that runs attention: the block loops' bodies, each copying in the
    following layer while this one computes (the first layer's copy, before the loop, is not among them)."""
    running = {name for name, lines in computations(hlo).items() if any(ATTENTION in line for line in lines)}
    loops: dict[str, list[dict[str, Any]]] = {}
    for copy in host_copies(hlo):
        if copy["computation"] in running:
            loops.setdefault(copy["computation"], []).append(copy)
    return loops


def resident_stacks(plan: gpu_plan.Plan, hosted: offload.Hosted = offload.is_block_leaf, min_ndim: int = 3
                    ) -> list[str]:
    """HLO values in device memory with a whole hosted weight's shape (a stack of all layers, the text encoder's
    embedding table): there should be none."""
    shapes = {tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(plan.weights).items()
              if hosted(path) and leaf.ndim >= min_ndim}
    found = []
    for shape in shapes:
        pattern = re.compile(r"\[" + ",".join(map(str, shape)) + r"\]\{[\d,]*\}")
        found += [line.strip()[:140] for line in plan.hlo.splitlines()
                  for m in pattern.finditer(line) if "S(5)" not in line[m.start():m.end() + 8]]
    return found


def pcie_bytes_per_chunk(plan: gpu_plan.Plan, layers: int, forwards: int = FORWARDS_2_2_2) -> tuple[int, int, int]:
    """(one layer's bytes in a DiT forward, one layer's bytes in the text K/V pass, bytes per chunk), read from
    the HLO's host copies: the DiT's block loops run attention, the text K/V's loop does not."""
    loops = layer_loops(plan.hlo)
    block = max((sum(c["bytes"] for c in copies) for copies in loops.values()), default=0)
    others: dict[str, int] = {}
    for copy in host_copies(plan.hlo):
        if copy["computation"] not in loops:
            others[copy["computation"]] = others.get(copy["computation"], 0) + copy["bytes"]
    text = min((b for b in others.values() if b < block), default=0)
    # Each loop copies the following layer, the last one twice; the first layer's copy is made before the loop.
    return block, text, (layers + 1) * (forwards * block + text)


def encode_pcie_bytes(plan: gpu_plan.Plan, layers: int, tokens: int) -> int:
    """Bytes over PCIe per prompt: the layer loop's copies (the computation with GEMMs) (layers + 1) times, and the
    embedding loop's (the computation with one copy and no GEMM) once per token."""
    per: dict[str, list[dict[str, Any]]] = {}
    for copy in host_copies(plan.hlo):
        per.setdefault(copy["computation"], []).append(copy)
    gemms = {name for name, lines in computations(plan.hlo).items() if any(GEMM.search(x) for x in lines)}
    layer = sum(c["bytes"] for name, copies in per.items() if name in gemms for c in copies)
    row = max((copies[0]["bytes"] for name, copies in per.items() if name not in gemms and len(copies) == 1),
              default=0)
    return (layers + 1) * layer + tokens * row


def resident_weight_bytes(plan: gpu_plan.Plan, hosted: offload.Hosted | None) -> int:
    """The bytes of the program's weights that stay on the device (all of them when nothing is hosted)."""
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
               for path, leaf in traverse_util.flatten_dict(plan.weights).items() if hosted is None or not hosted(path))


# --- host RAM, measured -----------------------------------------------------------------------------------------

_RSS_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import traverse_util
from experiments.model_inputs import abstract_params
from experiments.plans.fp8_plan import dit_params
from helios_jax.config import TransformerConfig
from helios_jax.models import offload
layers, weight_dtype = int(sys.argv[1]), sys.argv[2]
cfg = TransformerConfig(num_layers=max(layers, 1))
device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
held = []
for path, leaf in traverse_util.flatten_dict(dit_params(cfg, weight_dtype)).items():
    if offload.is_block_leaf(path) and layers == 0:
        continue
    where = offload.host_sharding(device) if offload.is_block_leaf(path) else device
    held.append(jax.device_put(np.ones(leaf.shape, leaf.dtype), where).block_until_ready())
status = open("/proc/self/status").read()
kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines()) if k in ("VmRSS", "VmHWM")}
print(json.dumps({"bytes": sum(a.nbytes for a in held), "rss": kib["VmRSS"] * 1024, "hwm": kib["VmHWM"] * 1024,
                  "host": sum(a.nbytes for a in held if a.sharding.memory_kind == offload.HOST)}))
"""


def measure_host_rss(layers: int, weight_dtype: str) -> dict[str, int]:
    """The RSS of a fresh process holding the 14B DiT's params with ``layers`` layers of blocks in pinned host
    memory (0: the non-block params only), built leaf by leaf on jax's CPU device."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(layers), weight_dtype], check=True, text=True,
                         capture_output=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__))))).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- report -------------------------------------------------------------------------------------------------------

HEADERS = ["program", "compile s", "device GiB", "fits card", "host args GiB", "no stack resident",
           "copies overlapped", "PCIe GB / run", *(f"{k} ms / run" for k in PCIE_BANDWIDTHS)]


def plan_row(plan: gpu_plan.Plan, cap_gb: int, layers: int) -> list[Any]:
    """A chunk program's row (a run: one chunk)."""
    copies = [c for loop in layer_loops(plan.hlo).values() for c in loop]
    _, _, pcie = pcie_bytes_per_chunk(plan, layers)
    return _row(plan, cap_gb, not resident_stacks(plan), copies, pcie)


def _row(plan: gpu_plan.Plan, cap_gb: int, unstacked: bool | None, copies: list[dict[str, Any]], pcie: int
         ) -> list[Any]:
    fits = reporting.gib(device_bytes(plan)) <= USABLE_GIB[cap_gb]
    return [plan.name, plan.compile_s, reporting.gib(device_bytes(plan)), "yes" if fits else "NO",
            reporting.gib(host_argument_bytes(plan)), "-" if unstacked is None else "yes" if unstacked else "NO",
            f"{sum(c['overlapped'] for c in copies)}/{len(copies)}" if copies else "-", pcie / 1e9,
            *(1e3 * pcie / bw for bw in PCIE_BANDWIDTHS.values())]


def encode_row(plan: gpu_plan.Plan, cap_gb: int, layers: int, tokens: int) -> list[Any]:
    """The text encoding's row (a run: one prompt); its overlap counts the layer loop's copies."""
    gemms = {name for name, lines in computations(plan.hlo).items() if any(GEMM.search(x) for x in lines)}
    copies = [c for c in host_copies(plan.hlo) if c["computation"] in gemms]
    unstacked = not resident_stacks(plan, umt5.is_hosted_leaf, 2)
    return _row(plan, cap_gb, unstacked, copies, encode_pcie_bytes(plan, layers, tokens))


PIPELINE_HEADERS = ["card", "DiT weights", "VAE", "text encoding GiB", "chunk GiB", "VAE decode GiB",
                    "weights on the device GiB", "largest temporaries + outputs GiB", "peak GiB", "fits card"]


def pipeline_peak(encode: gpu_plan.Plan, chunk: gpu_plan.Plan, decode: gpu_plan.Plan) -> tuple[int, int]:
    """The whole offloaded pipeline's device memory as (weights, rest): every component's weights that stay on the
    device (the DiT's non-block params, the text encoder's final norm, the whole VAE: its encoder too, which the
    decode does not take), held throughout, and the largest of the three programs' temporaries and outputs (less
    what they alias). The programs run one after another on the GPU's stream, so their temporaries are not live at
    once; the non-weight inputs (the prompt's embeddings, the history window, the noise, a chunk's latents) are a
    few MB and not counted."""
    weights = (resident_weight_bytes(encode, umt5.is_hosted_leaf) + resident_weight_bytes(chunk, offload.is_block_leaf)
               + resident_weight_bytes(decode, None))
    return weights, max(device_bytes(p) - p.argument_bytes for p in (encode, chunk, decode))


def pipeline_row(cap_gb: int, weight_dtype: str, encode: gpu_plan.Plan, chunk: gpu_plan.Plan,
                 decode: gpu_plan.Plan) -> list[Any]:
    weights, rest = pipeline_peak(encode, chunk, decode)
    peak = reporting.gib(weights + rest)
    vae = {jnp.dtype(leaf.dtype).name for leaf in jax.tree.leaves(decode.weights)}
    return [f"{cap_gb} GB ({USABLE_GIB[cap_gb]} GiB usable)", weight_dtype, "/".join(sorted(vae)),
            *(reporting.gib(device_bytes(p)) for p in (encode, chunk, decode)), reporting.gib(weights),
            reporting.gib(rest), peak, "yes" if peak <= USABLE_GIB[cap_gb] else "NO"]


RSS_HEADERS = ["weights", "layers held", "bytes held GiB", "RSS GiB (measured)", "peak RSS GiB (measured, build)",
               "RSS per layer GiB (measured slope)", "RSS at 40 layers GiB (slope carried, not measured)"]


def rss_rows(weight_dtypes: tuple[str, ...], layer_counts: tuple[int, ...], total_layers: int) -> list[list[Any]]:
    """One row per measured process; the last row of a dtype carries its slope (from 0 layers) to ``total_layers``.
    The steady RSS is what a generation holds; the peak adds the build's one numpy stack in flight."""
    rows = []
    for weight_dtype in weight_dtypes:
        runs = {n: measure_host_rss(n, weight_dtype) for n in (0, *layer_counts)}
        for n, run in runs.items():
            slope = (run["rss"] - runs[0]["rss"]) / n if n else None
            rows.append([weight_dtype, n, reporting.gib(run["bytes"]), reporting.gib(run["rss"]),
                         reporting.gib(run["hwm"]), "" if slope is None else reporting.gib(slope),
                         "" if slope is None else reporting.gib(runs[0]["rss"] + total_layers * slope)])
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = gpu_plan.plan_parser(__doc__, autotune=False)
    parser.add_argument("--caps", type=int, nargs="+", default=list(CAPS_GB), choices=CAPS_GB)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--resident", action="store_true", help="also plan the resident chunk at each cap")
    parser.add_argument("--default_limit", action="store_true",
                        help="also plan the first offloaded chunk with XLA's default async limit (the copies it leaves "
                             "unhidden)")
    parser.add_argument("--rss_layers", type=int, nargs="*", default=[4, 8],
                        help="layer counts the host-RAM processes hold, besides 0 (none: skip the measurement)")
    parser.add_argument("--vae_dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="the VAE decodes planned (from_pretrained's default vae_dtype is float32)")
    parser.add_argument("--chunk_only", action="store_true",
                        help="plan the chunk alone, not the text encoding and VAE decode of the whole pipeline")
    args = parser.parse_args(argv)
    size = gpu_plan.plan_size(args)
    layers = size.cfg.num_layers
    text_cfg = TINY_TEXT if args.tiny else UMT5_XXL
    rows, pipeline = [], []
    for cap in args.caps:
        if not args.chunk_only:
            encode = encode_plan(text_cfg, size.text_tokens, cap)
            decodes = {d: decode_plan(size, cap, jnp.dtype(d)) for d in args.vae_dtypes}
            rows += [encode_row(encode, cap, text_cfg.num_layers, size.text_tokens),
                     *(_row(d, cap, None, [], 0) for d in decodes.values())]
            print(reporting.markdown_table(HEADERS, rows[-1 - len(decodes):]), flush=True)
        for weight_dtype in args.dtypes:
            for offloaded in (True, False) if args.resident else (True,):
                plan = chunk_plan(size, weight_dtype, offloaded, cap)
                rows.append(plan_row(plan, cap, layers))
                print(reporting.markdown_table(HEADERS, rows[-1:]), flush=True)
                if offloaded and not args.chunk_only:
                    pipeline += [pipeline_row(cap, weight_dtype, encode, plan, decode) for decode in decodes.values()]
                    print(reporting.markdown_table(PIPELINE_HEADERS, pipeline[-len(decodes):]), flush=True)
    if args.default_limit:
        rows.append(plan_row(chunk_plan(size, args.dtypes[0], True, args.caps[-1], True), args.caps[-1], layers))
    rss = rss_rows(tuple(args.dtypes), tuple(args.rss_layers), 40) if args.rss_layers else []
    env = gpu_plan.plan_environment()
    body = (f"Low-memory mode (blocks in pinned host memory, streamed a layer ahead): the distilled chunk 2+2+2 "
            f"({'tiny model' if args.tiny else '14B DiT'}, {layers} layers; {size.height}x{size.width}, "
            f"{size.latent_frames} latent frames, {size.text_tokens} text tokens) PLANNED for an H100 whose target "
            f"config is capped at {', '.join(f'{c} GB' for c in args.caps)} (compiled deviceless; nothing ran on a "
            f"GPU). PCIe times are bytes / assumed effective bandwidth "
            f"({', '.join(f'{k}: {v / 1e9:.0f} GB/s' for k, v in PCIE_BANDWIDTHS.items())}), a lower bound of the "
            f"chunk's time when the copies are the bottleneck (a run: one chunk; for the text encoding, one prompt, "
            f"batch 1, as the distilled model runs no CFG).\n\n" + reporting.markdown_table(HEADERS, rows))
    if pipeline:
        body += ("\nThe whole offloaded pipeline (PLANNED): the weights that stay on the device (the DiT's non-block "
                 "params, the text encoder's final norm, the whole VAE, its encoder included) held throughout, "
                 "plus the largest program's temporaries and outputs. The programs run one after another, so their "
                 "temporaries are not live at once; the non-weight inputs (the prompt's embeddings, the history "
                 "window, the noise, a chunk's latents) are a few MB and not counted.\n\n"
                 + reporting.markdown_table(PIPELINE_HEADERS, pipeline))
    if rss:
        body += ("\nHost RAM, MEASURED on this machine's CPU (23 GB of RAM, so fewer than 40 layers held): the RSS "
                 "(VmRSS, and the peak VmHWM of the build) of a fresh process holding the 14B DiT's non-block params "
                 "and that many layers of its blocks in pinned host memory, built leaf by leaf.\n\n"
                 + reporting.markdown_table(RSS_HEADERS, rss))
    return reporting.report("lowmem_plan", env, body, {"env": env, "headers": HEADERS, "rows": rows, "rss": rss,
                                                       "pipeline_headers": PIPELINE_HEADERS, "pipeline": pipeline}, args)


if __name__ == "__main__":
    gpu_plan.compile_on_cpu()
    sys.exit(main() and 0)
