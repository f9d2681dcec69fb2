"""Helios' 14B programs planned for TPU slices (v5e, v6e, v5p), compiled on a CPU with no TPU (issue 22).

    make tpu-plan                                            # installs libtpu (locks/tpu-plan.txt), runs the tier
    .venv-tpu-plan/bin/python -m experiments.plans.tpu_plan          # every program and slice, to RESULTS.md
    .venv-tpu-plan/bin/python -m experiments.plans.tpu_plan --tiny   # the same programs at a toy size (seconds)
    .venv-tpu-plan/bin/python -m experiments.plans.tpu_plan --only v5e:4,v5p:8 --programs distilled
    .venv-tpu-plan/bin/python -m experiments.plans.tpu_plan --only v5e:16 --programs dmd --mesh fsdp=8,context=2

The devices are libtpu's (``jax.experimental.topologies.get_topology_desc("v5e:2x2", "tpu")``), so nothing is
allocated and no TPU is needed; libtpu's compiler writes each chip's program and memory plan, and refuses one
that does not fit the chip's HBM (``RESOURCE_EXHAUSTED``): that refusal is the "does not fit" of the table. The
programs are the project's own, on ``parallel.make_mesh`` over those devices, exactly as on GPUs (the same sharding
tables, the attention ``default_impl`` picks for a TPU):

* the distilled 2+2+2 chunk (``HeliosPipeline.lower_chunk``) and its VAE decode (``lower_decode``, bf16; on a
  mesh split by rows over the chips, as ``stream`` runs it), and (``decode``) that decode alone, whole on one chip
  or split on the chunk's mesh;
* the base chunk, 50 UniPC steps with CFG;
* the stage-1 LoRA step (train_plan's: stage_1_init.yaml, LoRA r128 + the history patch convs, remat, AdamW);
* the stage-3b DMD + GAN generator step (dmd_plan's: one shared base, both LoRAs, the heads, EMA).

Each program runs in the smallest slice of ``SLICES`` it fits and in 8 chips, on the mesh ``LAYOUTS`` gives
(why each: the comment beside it). Per chip: arguments and temporaries (XLA's memory analysis), the collectives'
bytes one chip sends (mesh_plan's ring accounting, loop trip counts applied), and a roofline: every kernel of the
optimised HLO at max(FLOPs / bf16 peak, bytes / HBM bandwidth) (roofline.Module's accounting; the splash
kernel's FLOPs from its q and k shapes) plus the collectives at the ICI bandwidth, no
overlap. The chips' figures are Google's published ones (``CHIPS``, with their pages). These are plans, not
measurements: no TPU ran them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from experiments import provenance, reporting, workloads
from experiments.plans import dmd_plan, gpu_plan, mesh_plan, roofline, train_plan
from helios_jax import demo, parallel
from helios_jax.pipeline import HeliosPipeline

SPLASH_CALL = "tpu_custom_call"  # a Mosaic (Pallas TPU) kernel in the compiled HLO
REALTIME_FPS = 24.0  # real time: 24 video frames a second


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: libtpu's name and topologies, and its published per-chip figures."""

    name: str
    kind: str  # libtpu's device_kind
    hbm_bytes: float  # HBM per chip, as sold
    bf16_flops: float  # peak bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    ici_bandwidth: float  # bytes/s one chip sends: half the published bidirectional ICI bandwidth per chip
    source: str
    topologies: tuple[tuple[int, str], ...]  # (chips, topology name) of the slices planned

    def topology(self, chips: int) -> str:
        return dict(self.topologies)[chips]


# Google Cloud TPU documentation, the "system architecture" tables of each page (read 2026-12):
CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v5e", "TPU v5 lite", 16e9, 197e12, 819e9, 400e9 / 2, "https://cloud.google.com/tpu/docs/v5e",
         ((1, "1x1"), (4, "2x2"), (8, "2x4"), (16, "4x4"))),
    Chip("v6e", "TPU v6 lite", 32e9, 918e12, 1638e9, 800e9 / 2, "https://cloud.google.com/tpu/docs/v6e",
         ((1, "1x1"), (4, "2x2"), (8, "2x4"), (16, "4x4"))),
    Chip("v5p", "TPU v5", 95e9, 459e12, 2765e9, 1200e9 / 2, "https://cloud.google.com/tpu/docs/v5p",
         ((1, "1x1x1"), (4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"))),
)}


def libtpu_missing() -> str | None:
    """Why the TPU plans cannot be compiled here (None when they can)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return ("libtpu is not installed: `make tpu-plan` installs it (locks/tpu-plan.txt, "
                f"jax[tpu]=={jax.__version__}'s libtpu)")
    return None


def compile_on_cpu() -> None:
    """The CPU as JAX's platform (the TPU is not here); called by the entry point, before any backend starts."""
    deviceless_libtpu()
    gpu_plan.compile_on_cpu()


def deviceless_libtpu() -> None:
    """libtpu told that no TPU is to be found here: not to ask a TPU VM's metadata server for its accelerator type
    (``TPU_SKIP_MDS_QUERY``), and not to take the lock that keeps a TPU to one process
    (``ALLOW_MULTIPLE_LIBTPU_LOAD``), so that two plans compile at once. Read when libtpu starts."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@functools.cache
def devices(chip: str, chips: int) -> tuple[jax.Device, ...]:
    """``chips`` TPU chips of ``chip``'s generation that are not here. libtpu's default host is 2x2 chips, so a
    one-chip slice names its host bounds (``chips_per_host_bounds``)."""
    from jax.experimental import topologies

    deviceless_libtpu()
    extra = {"chips_per_host_bounds": [1, 1, 1]} if chips == 1 else {}
    name = f"{chip}:{CHIPS[chip].topology(chips)}"
    return tuple(topologies.get_topology_desc(name, "tpu", **extra).devices)


def tpu_mesh(chip: str, **sizes: int) -> jax.sharding.Mesh:
    """The project's mesh (data, fsdp, context, tensor) over that many ``chip`` chips."""
    return parallel.make_mesh(**sizes, devices=devices(chip, math.prod(sizes.values()) or 1))


# --- the programs and their layouts -------------------------------------------------------------------------

PROGRAMS = ("distilled", "base", "decode", "stage1", "dmd")
TITLES = {"distilled": "distilled chunk 2+2+2", "base": "base chunk 50 steps CFG", "decode": "VAE decode bf16",
          "stage1": "stage-1 LoRA step", "dmd": "stage-3b DMD generator step"}
BASE_STEPS = 50
# The mesh of each program on 4 and 8 chips (one chip: none). Generation splits the weights over ``tensor``
# (heads and MLP; 40 heads divide by 4 and 8), since a replicated 14B bf16 DiT (28.7 GB) fits no v5e or v6e chip;
# the base chunk puts CFG's pair on ``data`` and the rest on ``tensor``. Training splits weights, LoRA and AdamW
# state over ``fsdp``, one sample per chip (as the H100 plans); 16 chips only for training, whose DMD step fits no
# 8 v5e (40 heads do not divide by 16). ``decode`` is the distilled chunk's decode alone, on one chip or split by
# rows over the chunk's mesh: its peak beside the DiT's weights is what a chip must hold after the chunk.
# ``COMPARE`` holds the context-parallel alternatives of item 4 (Ulysses: 40 heads over 4 or 8).
LAYOUTS: dict[str, dict[int, dict[str, int]]] = {
    "distilled": {4: {"tensor": 4}, 8: {"tensor": 8}},
    "base": {4: {"data": 2, "tensor": 2}, 8: {"data": 2, "tensor": 4}},
    "decode": {4: {"tensor": 4}, 8: {"tensor": 8}},
    "stage1": {4: {"fsdp": 4}, 8: {"fsdp": 8}, 16: {"fsdp": 16}},
    "dmd": {4: {"fsdp": 4}, 8: {"fsdp": 8}, 16: {"fsdp": 16}},
}
COMPARE: dict[int, dict[str, int]] = {4: {"context": 4}, 8: {"context": 8}}
SLICES = (1, 4, 8, 16)


@dataclasses.dataclass
class TpuPlan:
    """One program compiled for one slice (or refused by the compiler as too large for it)."""

    program: str
    chip: Chip
    chips: int
    mesh: dict[str, int]
    plans: list[gpu_plan.Plan]  # the compiled programs (the distilled chunk: the chunk and its decode)
    compile_s: float
    refused: str | None = None  # the compiler's out-of-memory message
    samples: int = 0  # training: samples per step (0 for generation)

    @property
    def fits(self) -> bool:
        return self.refused is None

    @property
    def argument_bytes(self) -> int:
        return sum(p.argument_bytes for p in self.plans)

    @property
    def temp_bytes(self) -> int:
        return sum(p.temp_bytes for p in self.plans)

    @property
    def peak_bytes(self) -> int:
        """The largest of its programs' peaks: the chunk and its decode run one after the other, each with the
        arguments it names."""
        return max(p.peak_bytes for p in self.plans)

    @functools.cached_property
    def ops(self) -> list[mesh_plan.Collective]:
        return [op for p in self.plans for op in mesh_plan.collectives(p.hlo)]

    @functools.cached_property
    def kernels(self) -> list[roofline.Kernel]:
        return [k for p in self.plans for k in roofline.Module(p.hlo).kernels()]

    def totals(self) -> dict[str, float]:
        """Per chip and chunk or step: FLOPs, HBM bytes and collective bytes sent (what the roofline divides by the
        chip's rates; another chip's roofline of the same program scales them by its own)."""
        kernels = [k for k in self.kernels if k.kind != "collectives"]
        return {"flops": sum(k.count * k.flops for k in kernels), "hbm_bytes": sum(k.count * k.bytes for k in kernels),
                "sent_bytes": sum(mesh_plan.sent_by_kind(self.ops).values())}

    def times(self) -> dict[str, float]:
        """Seconds per chunk or step by the roofline: per kernel the larger of its FLOPs and HBM times, summed,
        and the collectives' bytes at the ICI bandwidth; the bound is the largest of the three totals."""
        chip, kernels = self.chip, [k for k in self.kernels if k.kind != "collectives"]
        flops = sum(k.count * k.flops for k in kernels) / chip.bf16_flops
        hbm = sum(k.count * k.bytes for k in kernels) / chip.hbm_bandwidth
        device = sum(k.count * max(k.flops / chip.bf16_flops, k.bytes / chip.hbm_bandwidth) for k in kernels)
        ici = sum(mesh_plan.sent_by_kind(self.ops).values()) / chip.ici_bandwidth
        bound = max((("FLOPs", flops), ("HBM", hbm), ("ICI", ici)), key=lambda kv: kv[1])[0]
        return {"flops": flops, "hbm": hbm, "ici": ici, "total": device + ici, "bound": bound}

    @property
    def title(self) -> str:
        return TITLES[self.program] + (" + VAE decode" if len(self.plans) > 1 else "")

    def rate(self, frames: int) -> float:
        """Generation: video frames a second; training: samples a second."""
        return (self.samples or frames) / self.times()["total"]


def out_of_memory(error: Exception) -> str | None:
    """libtpu's refusal of a program larger than the chip's HBM, as one line; None for any other error."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    found = re.search(r"(Ran out of memory[^\n]*)", text)
    return (found.group(1) if found else text.splitlines()[0])[:200]


def compiled(name: str, lower: Callable[[], jax.stages.Lowered], weights: Any = None) -> gpu_plan.Plan:
    return gpu_plan.compile_plan(name, lower(), weights)


def pipeline(program: str, size: gpu_plan.Size, chip: str,
             mesh_sizes: dict[str, int]) -> tuple[HeliosPipeline, jax.sharding.Sharding | None]:
    """The distilled or base pipeline of shape-only weights (bf16 VAE) on a mesh of ``chip`` chips, or on one chip
    (``mesh_sizes`` empty), and the sharding its programs are lowered with (None: the mesh's own)."""
    distilled = program != "base"
    spec = gpu_plan.DISTILLED if distilled else gpu_plan.BASE
    scheduler = dict(demo.SCHEDULER) if distilled else workloads.base_scheduler(1.0)
    if mesh_sizes:
        return mesh_plan.mesh_pipeline(size.cfg, size.vae, scheduler, spec, tpu_mesh(chip, **mesh_sizes),
                                       platform="tpu", vae_dtype=jnp.bfloat16), None
    return (gpu_plan.abstract_pipeline(size.cfg, size.vae, scheduler, spec, vae_dtype=jnp.bfloat16, platform="tpu"),
            jax.sharding.SingleDeviceSharding(devices(chip, 1)[0]))


def generation_plans(program: str, size: gpu_plan.Size, chip: str, mesh_sizes: dict[str, int],
                     decode: bool = True) -> list[gpu_plan.Plan]:
    """The distilled chunk and (``decode``) its bf16 decode, or the base chunk, or (``"decode"``) the decode alone,
    on a mesh or one chip. On a mesh the decode is split by rows over the chips, as ``stream`` runs it."""
    pipe, sharding = pipeline(program, size, chip, mesh_sizes)
    if program == "decode":
        return [decode_plan(pipe, size, sharding)]
    settings = (dict(guidance_scale=1.0, pyramid_num_inference_steps_list=[2, 2, 2]) if program == "distilled"
                else dict(guidance_scale=5.0, num_inference_steps=BASE_STEPS))
    plans = [compiled(TITLES[program], lambda: pipe.lower_chunk(**size.settings(), **settings, sharding=sharding),
                      pipe.transformer_params)]
    if program == "distilled" and decode:
        plans.append(decode_plan(pipe, size, sharding))
    return plans


def decode_plan(pipe: HeliosPipeline, size: gpu_plan.Size, sharding: jax.sharding.Sharding | None) -> gpu_plan.Plan:
    """The bf16 VAE decode of one chunk's latents: on one chip (``sharding``), or on the pipeline's mesh (None),
    split by rows over its ``tensor`` or ``context`` chips as ``stream`` runs it."""
    return compiled(TITLES["decode"], lambda: pipe.lower_decode(
        height=size.height, width=size.width, latent_frames=size.latent_frames, sharding=sharding))


def training_plan(program: str, size: gpu_plan.Size, chip: str, chips: int,
                  mesh_sizes: dict[str, int]) -> gpu_plan.Plan:
    """The stage-1 step (train_plan) or the DMD generator step (dmd_plan), one sample per ``data`` x ``fsdp``
    group of chips (``samples``): one a chip on an fsdp mesh; a ``context`` group shares its sample's tokens."""
    mesh = tpu_mesh(chip, **mesh_sizes) if mesh_sizes else None
    one = jax.sharding.SingleDeviceSharding(devices(chip, 1)[0]) if mesh is None else None
    latent = (size.height // 8, size.width // 8)
    if program == "stage1":
        case = dataclasses.replace(train_plan.CASES[0], batch=samples(mesh_sizes))
        return train_plan.step_plan(case, size.cfg, one, latent, size.text_tokens, mesh=mesh, platform="tpu").plan
    case = dmd_plan.DmdCase(TITLES[program], True, samples(mesh_sizes))
    return dmd_plan.dmd_plan(case, size, mesh=mesh, sharding=one, platform="tpu").plan


def samples(mesh_sizes: dict[str, int]) -> int:
    """A training step's samples on that mesh: one per ``data`` x ``fsdp`` group (one on one chip)."""
    return mesh_sizes.get("data", 1) * mesh_sizes.get("fsdp", 1)


def plan(program: str, size: gpu_plan.Size, chip: str, chips: int, mesh_sizes: dict[str, int] | None = None,
         decode: bool = True) -> TpuPlan:
    """``program`` compiled for ``chips`` chips of ``chip`` on its layout (or ``mesh_sizes``); a refusal of the
    compiler for want of HBM is kept as the plan's ``refused``. ``decode``: the distilled chunk's decode too."""
    sizes = LAYOUTS[program].get(chips, {}) if mesh_sizes is None else mesh_sizes
    if math.prod(sizes.values()) != chips:
        raise SystemExit(f"{program} has no layout on {chips} chips (LAYOUTS: {sorted(LAYOUTS[program])})")
    start = time.perf_counter()
    training = program in ("stage1", "dmd")
    try:
        plans = ([training_plan(program, size, chip, chips, sizes)] if training
                 else generation_plans(program, size, chip, sizes, decode))
        refused = None
    except Exception as error:  # the compiler's out-of-memory refusal is a result; anything else is a bug
        refused = out_of_memory(error)
        if refused is None:
            raise
        plans = []
    result = TpuPlan(program, CHIPS[chip], chips, sizes, plans, time.perf_counter() - start, refused,
                     samples=samples(sizes) if training else 0)
    print(f"{result.title} on {chip} x {chips} ({mesh_label(sizes)}): "
          f"{'fits' if result.fits else 'does not fit: ' + refused}, {result.compile_s:.0f} s", flush=True)
    return result


def mesh_label(sizes: dict[str, int]) -> str:
    return " x ".join(f"{a}={n}" for a, n in sizes.items()) or "one chip"


def smallest_and_eight(program: str, size: gpu_plan.Size, chip: str, decode: bool = True) -> list[TpuPlan]:
    """``program`` on the smallest slice of ``SLICES`` it has a layout for and fits on ``chip`` (the smaller ones
    tried first, their refusals kept), and on 8 chips."""
    found = []
    for chips in SLICES:
        if chips > 1 and chips not in LAYOUTS[program]:
            continue
        found.append(plan(program, size, chip, chips, decode=decode))
        if found[-1].fits and chips < 8:
            found.append(plan(program, size, chip, 8, decode=decode))
            break
        if found[-1].fits:
            break
    return found


# --- report -------------------------------------------------------------------------------------------------

HEADERS = ["program", "slice", "mesh", "fits", "compile s", "arguments GiB/chip", "temporaries GiB/chip",
           "peak GiB/chip", "collective GB/chip", "FLOPs ms", "HBM ms", "ICI ms", "roofline ms", "bound", "FPS or samples/s",
           "custom calls"]


def table_rows(plans: list[TpuPlan], frames: int) -> list[list[Any]]:
    rows = []
    for p in plans:
        where = f"{p.chip.name} x {p.chips}"
        if not p.fits:
            rows.append([p.title, where, mesh_label(p.mesh), "no: " + p.refused, p.compile_s,
                         *["-"] * (len(HEADERS) - 5)])
            continue
        t, sent = p.times(), sum(mesh_plan.sent_by_kind(p.ops).values())
        calls = sorted({c for q in p.plans for c in q.custom_calls})
        rows.append([p.title, where, mesh_label(p.mesh), "yes", p.compile_s,
                     reporting.gib(p.argument_bytes), reporting.gib(p.temp_bytes), reporting.gib(p.peak_bytes),
                     sent / 1e9, 1e3 * t["flops"],
                     1e3 * t["hbm"], 1e3 * t["ici"], 1e3 * t["total"], t["bound"], p.rate(frames),
                     ", ".join(calls) or "-"])
    return rows


def chips_note() -> str:
    return "; ".join(f"{c.name}: {c.bf16_flops / 1e12:.0f} TFLOP/s bf16, {c.hbm_bytes / 1e9:.0f} GB HBM at "
                     f"{c.hbm_bandwidth / 1e9:.0f} GB/s, ICI {2 * c.ici_bandwidth / 1e9:.0f} GB/s both ways ({c.source})"
                     for c in CHIPS.values())


def parse_only(text: str) -> list[tuple[str, int]]:
    """``"v5e:4,v5p:8"`` -> [("v5e", 4), ("v5p", 8)]."""
    found = []
    for item in filter(None, text.split(",")):
        chip, _, chips = item.partition(":")
        if chip not in CHIPS or not chips.isdigit() or int(chips) not in SLICES:
            raise SystemExit(f"--only {text!r}: expected CHIP:CHIPS with CHIP in {tuple(CHIPS)}, CHIPS in {SLICES}")
        found.append((chip, int(chips)))
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = gpu_plan.plan_parser(__doc__, autotune=False)
    parser.add_argument("--programs", default=",".join(PROGRAMS), help=f"which of {PROGRAMS} (comma-separated)")
    parser.add_argument("--chips", default=",".join(CHIPS), help=f"which of {tuple(CHIPS)} (comma-separated)")
    parser.add_argument("--only", default="", help="these slices instead of the smallest that fits and 8: v5e:4,v5p:8")
    parser.add_argument("--mesh", default="", help="with --only: this mesh instead of LAYOUTS' (e.g. fsdp=8,context=2)")
    parser.add_argument("--compare", action="store_true", help="also the distilled chunk context-parallel (item 4)")
    parser.add_argument("--no-decode", action="store_true", help="the distilled chunk without its VAE decode, whose "
                        "TPU compile is the slowest of all (minutes of CPU at 384x640)")
    args = parser.parse_args(argv)
    missing = libtpu_missing()
    if missing:
        raise SystemExit(missing)
    size = mesh_plan.TINY if args.tiny else gpu_plan.HELIOS_14B
    if args.mesh and not args.only:
        raise SystemExit("--mesh goes with --only (the slices it is for)")
    mesh = parallel.parse_mesh(args.mesh) if args.mesh else None
    programs = [p for p in args.programs.split(",") if p]
    decode = not args.no_decode
    plans = []
    for program in programs:
        if args.only:
            plans += [plan(program, size, chip, n, mesh, decode) for chip, n in parse_only(args.only)]
        else:
            for chip in args.chips.split(","):
                plans += smallest_and_eight(program, size, chip, decode)
    if args.compare:
        chip_slices = parse_only(args.only) if args.only else [(c, n) for c in args.chips.split(",") for n in COMPARE]
        plans += [plan("distilled", size, chip, n, COMPARE[n], decode) for chip, n in chip_slices if n in COMPARE]
    frames = workloads.video_frames(size.latent_frames)
    env = provenance.environment("TPU v5e / v6e / v5p slices of libtpu's topologies, compiled deviceless on the CPU",
                                 provenance.versions("jax", "jaxlib", "libtpu", "flax", "optax"))
    body = (f"PLANS, not measurements (no TPU ran them): TPU programs compiled by libtpu on a CPU from abstract inputs "
            f"({'8-head toy' if args.tiny else '14B DiT'}, {size.cfg.num_layers} layers; {size.height}x{size.width}, "
            f"{size.latent_frames} latent frames ({frames} video frames) per chunk, {size.text_tokens} text tokens; bf16 "
            "DiT, bf16 VAE; training: one sample per data x fsdp group of chips). fits: libtpu compiled it for the chip's "
            "HBM (it refuses a program whose peak does not fit). Peak: XLA's peak of the program's heap, arguments "
            "included (the largest of the chunk's and its decode's); what libtpu holds against HBM. Collective GB: what one chip sends per chunk or step (ring algorithms). "
            "Roofline: each kernel at max(FLOPs / peak, bytes / HBM bandwidth), plus the collectives at the ICI "
            "bandwidth one way, no overlap; bound: the largest of the FLOPs, HBM and ICI totals. FPS: the chunk's "
            f"video frames over its roofline time (with its decode where the row says so); training: samples/s. "
            f"Chips (Google Cloud TPU docs): {chips_note()}.\n\n" + reporting.markdown_table(HEADERS, table_rows(plans, frames)))
    totals = [{"program": p.program, "chip": p.chip.name, "chips": p.chips, "mesh": p.mesh, **p.totals()}
              for p in plans if p.fits]
    return reporting.report("tpu_plan", env, body, {"env": env, "headers": HEADERS, "rows": table_rows(plans, frames),
                                                    "totals": totals}, args)


if __name__ == "__main__":
    compile_on_cpu()
    sys.exit(main() and 0)
