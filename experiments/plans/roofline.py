"""A roofline of the H100's compiled programs, read from their optimised GPU HLO on a CPU.

    .venv-gpu-plan/bin/python -m experiments.plans.roofline           # 14B: DiT per stage, distilled chunk, VAE decode
    .venv-gpu-plan/bin/python -m experiments.plans.roofline --tiny
    .venv-gpu-plan/bin/python -m experiments.plans.roofline --only stage2 --top 30 --results ''  # one program

The programs are experiments/plans/gpu_plan.py's (deviceless, abstract inputs). Each kernel the program launches
(a fusion, a custom call such as cuBLAS or cuDNN attention, an unfused copy) is one row with its FLOPs and the
bytes it moves, times the trip count of every loop around it (the 40-layer scan, the step scans). FLOPs: the
dots and convolutions in the kernel (2 x output elements x contraction; a convolution's taps on its padding not
counted), cuDNN attention analytically
(4 x B x heads x Tq x Tk x head_dim, which XLA's cost analysis does not report), one per output element for the
rest. Bytes: every operand and the output once (an operand read only through a dynamic-slice counts the slice).
Lower bound per kernel: max(FLOPs / 790 TFLOP/s, bytes / 3.35 TB/s), the H100's measured bf16 matmul rate and
its HBM3 bandwidth; the sum is the predicted time (no overlap between kernels, no launch gaps).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import sys
from typing import Any, Iterator

import jax

from experiments import provenance, reporting, workloads
from experiments.plans import gpu_plan

MATMUL_FLOPS = 790e12
HBM_BYTES = 3.35e12
KINDS = ("GEMM", "attention", "norms/modulation/RoPE/elementwise", "copies/transposes", "collectives")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
         "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "token": 0}
SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e4m3fn|f8e5m2|c64|token)\[([\d,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.+?)\s+([\w\-$]+)\((.*?)\)(.*)$")
COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")
COPIES = {"dynamic-slice", "dynamic-update-slice", "copy", "transpose", "slice", "pad", "reverse", "gather",
          "scatter", "broadcast", "bitcast", "reshape", "concatenate"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all")
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id",
        "opt-barrier", "iota"}


def shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in SHAPE.findall(text)]


def nbytes(text: str) -> int:
    return sum(BYTES.get(t, 4) * math.prod(dims) for t, dims in shapes(text))


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result's shape text (a tuple for some)
    opcode: str
    operands: list[str]
    attrs: str
    index: int = -1  # a parameter's number

    def calls(self) -> list[str]:
        return re.findall(r"(?:calls|body|to_apply|branch_computations)=\{?%([\w.\-]+)", self.attrs)


def parse(hlo: str) -> tuple[dict[str, list[Instruction]], str]:
    """The module's computations (name -> instructions) and the entry computation's name."""
    computations, current, entry = {}, None, ""
    for line in hlo.splitlines():
        head = COMPUTATION.match(line)
        if head and not line[0].isspace():
            current = head.group(1)
            computations[current] = []
            entry = current if line.startswith("ENTRY") else entry
            continue
        match = INSTRUCTION.match(line) if current else None
        if match:
            name, shape, opcode, operands, attrs = match.groups()
            index = int(operands) if opcode == "parameter" and operands.isdigit() else -1
            computations[current].append(
                Instruction(name, shape, opcode, re.findall(r"%([\w.\-]+)", operands), attrs, index))
    return computations, entry


@dataclasses.dataclass
class Kernel:
    kind: str
    name: str
    flops: float
    bytes: float
    count: int  # launches (loop trip counts multiplied in)

    @property
    def seconds(self) -> float:
        return self.count * max(self.flops / MATMUL_FLOPS, self.bytes / HBM_BYTES)


class Module:
    """The kernels of one optimised HLO module, with loop trip counts applied."""

    def __init__(self, hlo: str):
        self.hlo = hlo
        self.computations, self.entry = parse(hlo)
        self.shape = {i.name: i.shape for c in self.computations.values() for i in c}

    def kernels(self) -> list[Kernel]:
        return [self._kernel(inst, count) for inst, count in self.instructions()
                if inst.opcode not in FREE and not inst.opcode.endswith("-done")]

    def instructions(self, computation: str | None = None, count: int = 1) -> Iterator[tuple[Instruction, int]]:
        """Every instruction the program runs (loop bodies and called computations entered, not fusions),
        with how many times it runs: the trip counts of the loops around it multiplied."""
        for inst in self.computations[computation or self.entry]:
            if inst.opcode == "while":
                body = re.search(r"body=%([\w.\-]+)", inst.attrs).group(1)
                yield from self.instructions(body, count * self.trip_count(inst.attrs))
            elif inst.opcode in ("call", "conditional", "async-start"):
                for callee in inst.calls():
                    yield from self.instructions(callee, count)
            else:
                yield inst, count

    def trip_count(self, attrs: str) -> int:
        """A while loop's trip count: the GPU compiler states it (``known_trip_count``); the TPU compiler does not,
        and there it is read from the loop's condition, ``counter < N`` with the counter from 0 (a scan). 1 when
        neither says."""
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
        if known:
            return int(known.group(1))
        condition = re.search(r"condition=%([\w.\-]+)", attrs)
        block = condition and re.search(r"^%" + re.escape(condition.group(1)) + r" .*?^\}", self.hlo, re.S | re.M)
        if block and "direction=LT" in block.group(0):
            bounds = re.findall(r"= s32\[\]\S* constant\((\d+)\)", block.group(0))
            if len(bounds) == 1:
                return int(bounds[0])
        return 1

    def _operand_bytes(self, inst: Instruction) -> float:
        """Operands read once; a fusion parameter used only by (dynamic-)slices reads only the slices, also where
        the slice is in a fusion nested in this one (the TPU compiler nests them)."""
        full = [nbytes(self.shape.get(o, "")) for o in inst.operands]
        if inst.opcode != "fusion":
            return sum(full)
        body = self.computations[inst.calls()[0]]
        total = 0.0
        for param in (i for i in body if i.opcode == "parameter"):
            whole = full[param.index] if param.index < len(full) else nbytes(param.shape)
            total += min(whole, self._param_read(body, param.name, whole))
        return total

    def _param_read(self, body: list[Instruction], name: str, whole: float) -> float:
        """Bytes a fused computation reads of its parameter ``name``: the slices taken of it, followed into nested
        fusions; ``whole`` where anything else uses it."""
        users = [i for i in body if name in i.operands]
        if not users:
            return whole
        read = 0.0
        for user in users:
            if user.opcode in ("dynamic-slice", "slice") and user.operands[0] == name:
                read += nbytes(user.shape)
            elif user.opcode == "fusion" and user.operands.count(name) == 1:
                inner = self.computations.get(user.calls()[0], [])
                index = user.operands.index(name)
                param = next((i for i in inner if i.opcode == "parameter" and i.index == index), None)
                read += whole if param is None else self._param_read(inner, param.name, whole)
            else:
                return whole
        return read

    def _flops(self, computation: str) -> float:
        flops = 0.0
        for inst in self.computations.get(computation, []):
            if inst.opcode == "dot":
                out = math.prod(shapes(inst.shape)[0][1])
                lhs = shapes(self.shape[inst.operands[0]])[0][1]
                dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs).group(1)
                flops += 2 * out * math.prod(lhs[int(d)] for d in dims.split(",") if d)
            elif inst.opcode == "convolution":
                flops += self._conv_flops(inst)
            for callee in inst.calls():
                flops += self._flops(callee)
        return flops

    def _moves_only(self, computation: str) -> bool:
        """Whether a fused computation only moves data: every op on arrays (not scalar index math) a copy."""
        for inst in self.computations.get(computation, []):
            scalar = all(not dims for _, dims in shapes(inst.shape))
            if not scalar and inst.opcode not in COPIES | FREE and inst.opcode != "fusion":
                return False
            if not all(self._moves_only(c) for c in inst.calls()):
                return False
        return True

    def _mosaic_attention_flops(self, inst: Instruction) -> float:
        """4 x (q elements) x (k tokens) for the first two adjacent operands shaped like q and k (same rank >= 3,
        same head_dim): a splash forward's two matmuls; its backward kernels are counted the same (a lower bound)."""
        dims = [s[0][1] for s in (shapes(self.shape.get(o, "")) for o in inst.operands) if s]
        for q, k in zip(dims, dims[1:]):
            if len(q) >= 3 and len(k) == len(q) and q[-1] == k[-1] and q[-1] >= 64:
                return 4.0 * math.prod(q) * k[-2]
        return 0.0

    def _conv_flops(self, inst: Instruction) -> float:
        """2 x (batch x output features) x input features per group x the (output position, kernel tap) pairs that
        land on a real input element, per spatial dimension (XLA's own cost analysis counts the same way). Taps on
        the padding are no work: libtpu writes a dot as a convolution whose window slides over zero padding (a
        (88, 512) x (512, 8 x 64) projection as window 8 over padding 7 on each side of one position), and counting
        every tap made such a dot 8 times its FLOPs."""
        lhs = shapes(self.shape[inst.operands[0]])[0][1]
        kernel = shapes(self.shape[inst.operands[1]])[0][1]
        out = shapes(inst.shape)[0][1]
        lhs_labels, kernel_labels, out_labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs).groups()
        window = re.search(r"window=\{([^}]*)\}", inst.attrs)
        fields = dict(f.split("=") for f in window.group(1).split()) if window else {}
        spatial = [str(d) for d in range(len(lhs) - 2)]

        def per_dim(key: str, default: str) -> list[str]:
            return fields[key].split("x") if key in fields else [default] * len(spatial)

        pairs = 1
        for d, stride, pad, lhs_dilate, rhs_dilate in zip(spatial, per_dim("stride", "1"), per_dim("pad", "0_0"),
                                                           per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")):
            pairs *= valid_taps(lhs[lhs_labels.index(d)], kernel[kernel_labels.index(d)], out[out_labels.index(d)],
                                int(stride), int(pad.split("_")[0]), int(lhs_dilate), int(rhs_dilate))
        batch_features = math.prod(out) / math.prod(out[out_labels.index(d)] for d in spatial)
        return 2 * batch_features * kernel[kernel_labels.index("i")] * pairs

    def _kernel(self, inst: Instruction, count: int) -> Kernel:
        out_bytes = nbytes(inst.shape)
        io = self._operand_bytes(inst) + out_bytes
        elements = sum(math.prod(d) for _, d in shapes(inst.shape))
        if inst.opcode == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', inst.attrs).group(1)
            if target.startswith("__cudnn$fmha"):
                q, k = (shapes(self.shape[o])[0][1] for o in inst.operands[:2])
                batch, tq, heads, dim = q
                return Kernel("attention", target, 4 * batch * heads * tq * k[1] * dim, io, count)
            if target == "tpu_custom_call":  # a Mosaic kernel: splash attention, counted from its q and k
                return Kernel("attention", target, self._mosaic_attention_flops(inst) or elements, io, count)
            if "conv" in target:
                return Kernel("GEMM", target, self._conv_flops(inst), io, count)
            if "gemm" in target or "matmul" in target:
                out = math.prod(shapes(inst.shape)[0][1])
                lhs = shapes(self.shape[inst.operands[0]])[0][1]
                dims = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attrs).group(1)
                contraction = math.prod(lhs[int(d.strip('" '))] for d in dims.split(",") if d.strip())
                return Kernel("GEMM", target, 2 * out * contraction, io, count)
            return Kernel("norms/modulation/RoPE/elementwise", target, elements, io, count)
        if inst.opcode.startswith(COLLECTIVES):
            return Kernel("collectives", inst.opcode, 0.0, io, count)
        if inst.opcode == "fusion":
            flops = self._flops(inst.calls()[0])
            if flops:
                return Kernel("GEMM", inst.name, flops, io, count)
            kind = "copies/transposes" if self._moves_only(inst.calls()[0]) else "norms/modulation/RoPE/elementwise"
            return Kernel(kind, inst.name, elements, io, count)
        kind = "copies/transposes" if inst.opcode in COPIES else "norms/modulation/RoPE/elementwise"
        return Kernel(kind, inst.opcode, elements, io, count)


def valid_taps(size: int, taps: int, positions: int, stride: int, low: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """Along one spatial dimension of a convolution: the (output position, kernel tap) pairs whose input position
    is a real element of the (``lhs_dilate``-dilated, ``low``-padded) input, not padding or a dilation hole. A
    kernel's reversal maps its taps onto the same positions, so it does not change the count."""
    last = (size - 1) * lhs_dilate
    return sum(1 for o in range(positions) for k in range(taps)
               if 0 <= (p := o * stride - low + k * rhs_dilate) <= last and p % lhs_dilate == 0)


def summary(kernels: list[Kernel]) -> dict[str, dict[str, float]]:
    """Per kind: launches, TFLOP, GiB moved, lower-bound ms and share of the total."""
    groups = collections.defaultdict(lambda: {"launches": 0, "tflop": 0.0, "gib": 0.0, "ms": 0.0})
    for k in kernels:
        g = groups[k.kind]
        g["launches"] += k.count
        g["tflop"] += k.count * k.flops / 1e12
        g["gib"] += k.count * k.bytes / 2**30
        g["ms"] += k.seconds * 1e3
    total = sum(g["ms"] for g in groups.values()) or 1.0
    for g in groups.values():
        g["share"] = 100 * g["ms"] / total
    return {kind: groups[kind] for kind in KINDS if kind in groups}


def matmul_flops(kernels: list[Kernel]) -> float:
    """The FLOPs that experiments/flop_counts.dit_flops counts: GEMMs and attention."""
    return sum(k.count * k.flops for k in kernels if k.kind in ("GEMM", "attention"))


def predicted_ms(kernels: list[Kernel]) -> float:
    return 1e3 * sum(k.seconds for k in kernels)


def other_share(kernels: list[Kernel]) -> float:
    """The share of the predicted time that is neither GEMM nor attention (the optimisation target)."""
    groups = summary(kernels)
    return sum(g["share"] for kind, g in groups.items() if kind not in ("GEMM", "attention"))


HEADERS = ["program", "kind", "launches", "TFLOP", "GiB moved", "lower-bound ms", "share %"]


def rows_for(name: str, kernels: list[Kernel]) -> list[list[Any]]:
    rows = [[name, kind, g["launches"], g["tflop"], g["gib"], g["ms"], g["share"]] for kind, g in summary(kernels).items()]
    rows.append([name, "total", sum(k.count for k in kernels), matmul_flops(kernels) / 1e12,
                 sum(k.count * k.bytes for k in kernels) / 2**30, predicted_ms(kernels), 100.0])
    return rows


def analyse(plans: dict[str, gpu_plan.Plan]) -> dict[str, list[Kernel]]:
    return {name: Module(plan.hlo).kernels() for name, plan in plans.items()}


def top(kernels: list[Kernel], n: int) -> str:
    """The ``n`` kernels with the most lower-bound time, with the HLO op they came from (what to optimise next)."""
    lines = [f"{'kind':<34} {'kernel':<44} {'launches':>8} {'GiB moved':>10} {'ms':>8}"]
    for k in sorted(kernels, key=lambda k: -k.seconds)[:n]:
        lines.append(f"{k.kind:<34} {k.name[:44]:<44} {k.count:>8} {k.count * k.bytes / 2**30:>10.2f} "
                     f"{k.seconds * 1e3:>8.2f}")
    return "\n".join(lines)


PROGRAMS = ("stage0", "stage1", "stage2", "chunk", "vae")


def plans_for(size: gpu_plan.Size, h100: jax.sharding.Sharding, only: list[str]) -> dict[str, gpu_plan.Plan]:
    """The programs named in ``only`` (of PROGRAMS), compiled for the H100."""
    plans = {p.name: p for p in [gpu_plan.dit_forward(size.cfg, size.work, s, h100) for s in range(3)
                                 if f"stage{s}" in only]}
    if "chunk" in only:
        plans["distilled chunk 2+2+2"] = gpu_plan.chunk_programs(size, h100)[0]
    for dtype in ("float32", "bfloat16") if "vae" in only else ():
        plans[f"VAE decode {dtype}"] = gpu_plan.decode_program(size, h100, dtype)
    return plans


def main(argv: list[str] | None = None) -> dict:
    parser = gpu_plan.plan_parser(__doc__)
    parser.add_argument("--only", default=",".join(PROGRAMS), help=f"programs to compile, of {','.join(PROGRAMS)}")
    parser.add_argument("--top", type=int, default=0, help="also print each program's N costliest kernels")
    args = parser.parse_args(argv)
    only = args.only.split(",")
    if not only or set(only) - set(PROGRAMS):
        raise SystemExit(f"--only {args.only}: expected a comma-separated subset of {','.join(PROGRAMS)}")
    size = gpu_plan.plan_size(args)
    h100 = gpu_plan.h100(args.autotune)
    kernels = analyse(plans_for(size, h100, only))
    for name, ks in kernels.items() if args.top else ():
        print(f"{name}: the {args.top} costliest kernels\n{top(ks, args.top)}\n", flush=True)
    rows = [row for name, ks in kernels.items() for row in rows_for(name, ks)]
    frames = workloads.video_frames(size.latent_frames)
    chunk = kernels.get("distilled chunk 2+2+2")
    chunk_ms = predicted_ms(chunk) if chunk else None
    lines = []
    for vae in ("float32", "bfloat16") if chunk and "vae" in only else ():
        total = chunk_ms + predicted_ms(kernels[f"VAE decode {vae}"])
        lines.append(f"- distilled chunk 2+2+2 + VAE decode ({vae}): {total:.0f} ms per {frames} frames, "
                     f"{1e3 * frames / total:.1f} FPS (sampling alone {1e3 * frames / chunk_ms:.1f} FPS)")
    shares = [f"{other_share(ks):.1f}% of the {name}" for name, ks in kernels.items() if not name.startswith("VAE")]
    lines.append("- not GEMM or attention: " + ", ".join(shares))
    env = provenance.environment("NVIDIA H100 80GB HBM3 roofline (790 TFLOP/s, 3.35 TB/s), compiled deviceless on the CPU",
                             provenance.versions("jax", "jaxlib", "jax-cuda12-plugin", "flax"))
    body = (f"Roofline of the H100 plans ({'tiny model' if args.tiny else '14B DiT'}, {size.height}x{size.width}, "
            f"bf16 DiT, GEMM choices {'from ' + args.autotune if args.autotune else 'default'}): per kind, every "
            f"launch's max(FLOPs / 790 TFLOP/s, bytes / 3.35 TB/s), loops unrolled by their trip counts. The "
            "'total' row's TFLOP are GEMM + attention only.\n\n" + reporting.markdown_table(HEADERS, rows)
            + "\n" + "\n".join(lines) + "\n")
    result = {"env": env, "headers": HEADERS, "rows": rows, "chunk_ms": chunk_ms}
    return reporting.report("roofline", env, body, result, args)


if __name__ == "__main__":
    gpu_plan.compile_on_cpu()
    sys.exit(main() and 0)
