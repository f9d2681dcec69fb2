"""The gpu-plan tier on 8 H100s (topology 1x1x8): the per-device programs of experiments/plans/mesh_plan.py at a toy
size (8 heads so that context=8 and 4 run Ulysses, 2 layers, 64x64), and the collectives they must hold.

Needs jax's CUDA plugin (``make gpu-plan``); skipped without it. Three compiles of 8-device programs: about
2 minutes on 2 cores (the training step is most of it).
"""

from __future__ import annotations

import dataclasses

import pytest

from experiments import flop_counts
from experiments.plans import gpu_plan, mesh_plan

pytestmark = [pytest.mark.gpu_plan,
              pytest.mark.skipif(gpu_plan.plugin_missing() is not None, reason=str(gpu_plan.plugin_missing()))]

SIZE = dataclasses.replace(mesh_plan.TINY, height=64, width=64)


@pytest.fixture(scope="module")
def chunks():
    return {p.name.split()[0]: p for p in mesh_plan.chunk_plans(SIZE)}


@pytest.fixture(scope="module")
def train():
    return mesh_plan.train_step_plan(SIZE)


def activation_bytes(stage: int = 2, batch: int = 1) -> int:
    """One block's (B, L, D) bf16 activations over the whole sequence of a pyramid stage."""
    noisy, history = flop_counts.token_counts(SIZE.cfg, SIZE.work, stage)
    return batch * (noisy + history) * SIZE.cfg.inner_dim * 2


def stacked_weights(plan: mesh_plan.MeshPlan) -> set[tuple[int, ...]]:
    from flax import traverse_util

    return {tuple(x.shape) for path, x in traverse_util.flatten_dict(plan.plan.weights).items()
            if path[0] == "blocks" and x.ndim == 3}


def gathered(plan: mesh_plan.MeshPlan) -> list[tuple[str, tuple[int, ...]]]:
    return [shape for op in plan.ops if op.kind == "all-gather" for shape in op.result_shapes]


def test_the_mesh_is_8_h100s():
    mesh = gpu_plan.h100_mesh(data=2, context=4)
    assert mesh.devices.size == 8 and dict(mesh.shape)["context"] == 4
    assert {d.device_kind for d in mesh.devices.flat} == {"NVIDIA H100 80GB HBM3"}


@pytest.mark.parametrize("chunk,group", [("distilled", 8), ("base", 4)])
def test_chunks_run_ulysses_and_gather_no_activation(chunks, chunk, group):
    """Self-attention by all-to-all over the context group, inside the layer loop of every step (q, k, v in
    and o out per layer; the base chunk also exchanges CFG's pair over data); no all-gather of a whole
    weight, nor of as much as half of one block's activations
    (the K/V all-gather fallback would gather all of them), and no all-reduce of as much."""
    plan = chunks[chunk]
    ulysses = [op for op in plan.ops if op.kind == "all-to-all" and op.group == group]
    steps = 6 if chunk == "distilled" else mesh_plan.BASE_STEPS
    assert sum(op.count for op in ulysses) >= 4 * SIZE.cfg.num_layers * steps
    assert not {dims for _, dims in gathered(plan)} & stacked_weights(plan)
    biggest = max((op.result_bytes for op in plan.ops if op.kind == "all-gather"), default=0)
    assert biggest < activation_bytes() / 2, (biggest, activation_bytes())
    reduced = max((op.operand_bytes for op in plan.ops if op.kind == "all-reduce"), default=0)
    assert reduced < activation_bytes() / 2


def test_the_base_chunk_splits_cfg_over_data(chunks):
    """The CFG pair is a batch of 2 split over data=2: per device the base chunk's arguments are the
    distilled chunk's (the same weights, replicated), and its attention all-to-alls are over 4 devices."""
    assert chunks["base"].plan.argument_bytes == pytest.approx(chunks["distilled"].plan.argument_bytes, rel=0.05)


def test_fsdp_step_gathers_layer_by_layer_and_reduce_scatters(train):
    """fsdp=8: the program holds per device what the shardings give it, a third of all its arguments at
    this toy size (an eighth of the blocks' weights, LoRA and AdamW state; the LoRAs outside the blocks,
    a fifth of the toy's trainables, are whole); each layer's weights are all-gathered inside the layer
    loop, never a whole stack; LoRA gradients are reduce-scattered; the activations are not all-reduced
    (what XLA did when their width followed the weights' split: see parallel.context.constrain_tokens)."""
    parts = train.parts
    whole = sum(v for k, v in parts.items() if k != "per device")
    assert train.plan.argument_bytes == pytest.approx(parts["per device"], rel=0.02)
    assert parts["per device"] < whole / 3, (parts["per device"], whole)
    assert any(op.count >= SIZE.cfg.num_layers for op in train.ops if op.kind == "all-gather")
    assert not {dims for _, dims in gathered(train)} & stacked_weights(train)
    assert any(op.kind == "reduce-scatter" for op in train.ops)
    all_reduced = sum(op.count * op.operand_bytes for op in train.ops if op.kind == "all-reduce")
    assert all_reduced < parts["trainable params"], (all_reduced, parts["trainable params"])


def test_scaling_columns_are_consistent(chunks, train):
    """The table's arithmetic: speed-ups are one device's time over the mesh's, within 8x."""
    for plan in (*chunks.values(), train):
        t = plan.times()
        assert 0 < t["speedup_serial"] <= t["speedup_overlap"] <= 8 + 1e-6
        assert t["speedup_serial"] == pytest.approx(t["one"] / (t["compute"] + t["comm"]))
