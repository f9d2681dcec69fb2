"""The tpu-plan tier: Helios' programs compiled by libtpu for TPU slices on this CPU (experiments/plans/tpu_plan.py),
and what their plans must hold: the splash kernel is in them and no (tokens x tokens) float32 logits buffer is, the
collectives are the ones the mesh implies, and the 14B distilled chunk fits a v5e slice of 4 chips.
They compile at the default matmul precision (see ``default_precision``).

Needs libtpu (``make tpu-plan`` installs it from locks/tpu-plan.txt); without it every test here is skipped with
that reason. Nothing runs on a TPU: inputs are abstract, placed on libtpu's topologies. The toy is mesh_plan's
(8 heads, so that context=4 and tensor=4 divide them; 2 layers) at 64x64.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import pytest

from experiments import flop_counts
from experiments.plans import gpu_plan, mesh_plan, roofline, tpu_plan

pytestmark = [pytest.mark.tpu_plan,
              pytest.mark.skipif(tpu_plan.libtpu_missing() is not None, reason=str(tpu_plan.libtpu_missing()))]

SIZE = dataclasses.replace(mesh_plan.TINY, height=64, width=64)
STEPS = 6  # the distilled chunk's 2+2+2 forwards


@pytest.fixture(scope="module", autouse=True)
def default_precision():
    """The matmul precision a user's program has: tests/conftest.py asks for "highest" everywhere (float32 parity),
    and Mosaic refuses a bf16 matmul at float32 contract precision inside the splash kernel."""
    with jax.default_matmul_precision("default"):
        yield


@pytest.fixture(scope="module")
def tensor4():
    return tpu_plan.plan("distilled", SIZE, "v5e", 4, {"tensor": 4}, decode=False)


@pytest.fixture(scope="module")
def context4():
    return tpu_plan.plan("distilled", SIZE, "v5e", 4, {"context": 4}, decode=False)


@pytest.fixture(scope="module")
def fsdp4():
    return tpu_plan.plan("stage1", SIZE, "v5e", 4)


def self_attention_tokens(stage: int) -> int:
    noisy, history = flop_counts.token_counts(SIZE.cfg, SIZE.work, stage)
    return noisy + history


def logits_buffers(plan: tpu_plan.TpuPlan) -> list[str]:
    """float32 arrays of the chunk's HLO shaped (..., T, T) for a stage's self-attention length T (noisy + history
    tokens, or T padded to a multiple of the context split, as XLA's attention holds its logits and probabilities);
    the splash kernel pads T to its blocks and keeps its logits tiles inside the kernel."""
    lengths = {-(-self_attention_tokens(s) // c) * c for s in range(len(SIZE.work.stages)) for c in (1, 4)}
    found = set()
    for dims in re.findall(r"\bf32\[([\d,]+)\]", "\n".join(p.hlo for p in plan.plans)):
        shape = [int(d) for d in dims.split(",")]
        if len(shape) >= 2 and shape[-1] == shape[-2] and shape[-1] in lengths:
            found.add(f"f32[{dims}]")
    return sorted(found)


@pytest.mark.parametrize("chip,chips,kind", [("v5e", 1, "TPU v5 lite"), ("v5e", 4, "TPU v5 lite"),
                                             ("v5e", 8, "TPU v5 lite"), ("v6e", 1, "TPU v6 lite"),
                                             ("v6e", 8, "TPU v6 lite"), ("v5p", 1, "TPU v5"), ("v5p", 4, "TPU v5"),
                                             ("v5p", 8, "TPU v5")])
def test_libtpu_gives_the_slices(chip, chips, kind):
    """The topology names the plans use give that many chips of that kind, with no TPU here."""
    found = tpu_plan.devices(chip, chips)
    assert len(found) == chips and {d.device_kind for d in found} == {kind}
    assert tpu_plan.CHIPS[chip].kind == kind


@pytest.mark.parametrize("layout", ["tensor4", "context4"])
def test_the_chunk_runs_splash_and_no_logits_buffer(layout, request):
    """The Mosaic splash kernel is in the chunk, and no float32 (tokens x tokens) buffer: XLA's attention would hold
    one per head (the whole point of the kernel on a TPU)."""
    plan = request.getfixturevalue(layout)
    assert plan.fits
    assert tpu_plan.SPLASH_CALL in plan.plans[0].custom_calls, plan.plans[0].custom_calls
    assert not logits_buffers(plan), logits_buffers(plan)


def test_tensor_parallel_all_reduces_per_layer_and_exchanges_no_tokens(tensor4):
    """tensor=4 splits heads and MLP: each block's attention output and MLP output are summed over the 4 chips
    (all-reduce, or its reduce-scatter + all-gather halves), at least twice per layer and forward; the tokens are
    never exchanged (no all-to-all) and no weight is gathered whole."""
    ops = tensor4.ops
    reductions = sum(op.count for op in ops if op.kind in ("all-reduce", "reduce-scatter") and op.group == 4)
    assert reductions >= 2 * SIZE.cfg.num_layers * STEPS, reductions
    assert not [op for op in ops if op.kind == "all-to-all"]


def test_context_parallel_runs_ulysses(context4):
    """context=4 (8 heads: 2 a chip): q, k, v in and o out by all-to-all over the 4 chips, per layer and forward;
    nothing all-reduced as large as a block's activations."""
    ops = context4.ops
    ulysses = sum(op.count for op in ops if op.kind == "all-to-all" and op.group == 4)
    assert ulysses >= 4 * SIZE.cfg.num_layers * STEPS, ulysses
    activations = self_attention_tokens(len(SIZE.work.stages) - 1) * SIZE.cfg.inner_dim * 2
    assert max((op.operand_bytes for op in ops if op.kind == "all-reduce"), default=0) < activations / 2


def test_fsdp_step_gathers_weights_and_reduce_scatters_gradients(fsdp4):
    """The stage-1 step on fsdp=4, one sample a chip: splash in the step (forward and backward), the weights
    all-gathered over the 4 chips, gradients summed over them (reduce-scatter or all-reduce). (At this toy size
    no all-gather runs once per layer, where the H100 plan gathers a layer at a time and reduce-scatters; the 14B
    step is the plan script's.)"""
    plan = fsdp4
    assert plan.fits and tpu_plan.SPLASH_CALL in plan.plans[0].custom_calls
    assert any(op.kind == "all-gather" and op.group == 4 for op in plan.ops)
    assert any(op.kind in ("reduce-scatter", "all-reduce") and op.group == 4 for op in plan.ops)


def test_roofline_columns_are_consistent(tensor4):
    """The table's arithmetic: the total is at least each of its FLOPs, HBM and ICI parts, the bound the largest."""
    t = tensor4.times()
    parts = {"FLOPs": t["flops"], "HBM": t["hbm"], "ICI": t["ici"]}
    assert t["total"] >= max(t["flops"], t["hbm"]) and t["total"] >= t["ici"] > 0
    assert t["bound"] == max(parts, key=parts.get)


@pytest.mark.slow
def test_the_14b_distilled_chunk_fits_four_v5e():
    """The 14B distilled chunk compiles for v5e x 4 on tensor=4 (libtpu refuses what exceeds a chip's 16 GB), with
    splash in it. Its VAE decode is left to the plan script: its TPU compile is the slowest of all."""
    plan = tpu_plan.plan("distilled", gpu_plan.HELIOS_14B, "v5e", 4, decode=False)
    assert plan.fits, plan.refused
    assert tpu_plan.SPLASH_CALL in plan.plans[0].custom_calls
    assert plan.peak_bytes < tpu_plan.CHIPS["v5e"].hbm_bytes  # libtpu's own test (test_libtpu_refuses_by_the_peak)


def test_roofline_counts_no_flops_on_a_convolutions_padding():
    """libtpu writes a dot as a convolution sliding over zero padding ((88, 512) x (512, 8 x 64): window 8, padding
    7 each side of one position); the roofline counts the taps that meet real input only, so a toy program of that
    dot and a 3x3 convolution padded by 1 on a 5x5 image counts exactly their FLOPs, worked out by hand here:
    2 x 88 x 512 x 512, and 2 x (2 images x 128 out x 128 in) x 13 x 13 (per axis, 5 positions x 3 taps less the two
    on the padding). Exact (integer counts). Also one strided axis by hand: 4 inputs, 3 taps, stride 2, padding 1 in
    front: outputs at -1..1 and 1..3, 2 + 3 taps on the input."""
    one = jax.sharding.SingleDeviceSharding(tpu_plan.devices("v5e", 1)[0])
    args = [jax.ShapeDtypeStruct(s, jax.numpy.bfloat16, sharding=one)
            for s in ((1, 88, 512), (512, 8, 64), (2, 5, 5, 128), (3, 3, 128, 128))]

    def program(x, w, images, kernel):
        return (jax.numpy.einsum("btd,dhk->bthk", x, w),
                jax.lax.conv_general_dilated(images, kernel, (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))

    hlo = jax.jit(program).lower(*args).compile().as_text()
    assert re.search(r"convolution\(.*window=\{size=8 pad=7_7", hlo), "libtpu no longer writes this dot as a conv"
    flops = roofline.matmul_flops(roofline.Module(hlo).kernels())
    assert flops == 2 * 88 * 512 * 512 + 2 * (2 * 128 * 128) * 13 * 13
    assert roofline.valid_taps(4, 3, 2, stride=2, low=1, lhs_dilate=1, rhs_dilate=1) == 5


def test_libtpu_refuses_by_the_peak():
    """What libtpu holds against a v5e's 15.75 GiB is the peak of the program's heap: its arguments, outputs and
    the temporaries live at once. A toy whose live set is known, two float32 arguments x and w of R rows x 2^28
    and three temporaries made one after another, each kept whole by an optimization barrier: at R = 2 the plan's
    peak is 8 GiB (4 of arguments, 2 of temporaries, 2 of output) and it compiles; at R = 4 it would be 16 GiB and
    the refusal names 16.00G. Exact: whole GiB, nothing padded (rows a multiple of 2, lanes of 128)."""
    one = jax.sharding.SingleDeviceSharding(tpu_plan.devices("v5e", 1)[0])

    def step(x, w):
        a = jax.lax.optimization_barrier(x * 2)
        b = jax.lax.optimization_barrier(jax.numpy.sin(a) + w)
        return jax.lax.optimization_barrier(jax.numpy.cos(b) * a)

    def lowered(rows):
        arg = jax.ShapeDtypeStruct((rows, 2**28), jax.numpy.float32, sharding=one)
        return jax.jit(step).lower(arg, arg)

    memory = lowered(2).compile().memory_analysis()
    gib = 2**30
    assert (memory.argument_size_in_bytes, memory.output_size_in_bytes) == (4 * gib, 2 * gib)
    assert memory.peak_memory_in_bytes == 8 * gib
    with pytest.raises(Exception) as refusal:
        lowered(4).compile()
    assert "(16.00G) exceeds available HBM (15.75G)" in tpu_plan.out_of_memory(refusal.value)


def test_the_decode_is_split_by_rows_on_a_tensor_mesh():
    """On the distilled chunk's tensor=4 mesh the bf16 decode runs on row bands at every stage (split_rows over
    ``tensor``, restated after the mid block and each up block): the chips exchange halo rows (collective-permute)
    at the frames' full width, and each holds under half what one chip decoding the whole chunk holds at its peak
    (toy VAE at 128x128: 16.1 against 53.7 MB measured; a quarter of the activations, the weights whole). Without
    the restatement the mesh's peak equalled one chip's (the mid block's attention gathers, and every later stage ran
    whole). In the 14B plan this is what lets the decode sit beside the DiT's weights on a v5e (docs/tpu.md)."""
    size = dataclasses.replace(SIZE, height=128, width=128)
    pipe, _ = tpu_plan.pipeline("distilled", size, "v5e", {"tensor": 4})
    split = tpu_plan.decode_plan(pipe, size, None)
    whole = tpu_plan.generation_plans("decode", size, "v5e", {})[0]
    halos = [s for op in mesh_plan.collectives(split.hlo) if op.kind == "collective-permute"
             for _, s in op.result_shapes]
    assert any(128 in s for s in halos), f"no halo rows at the frames' width: {halos}"
    assert split.peak_bytes < whole.peak_bytes / 2, (split.peak_bytes, whole.peak_bytes)
