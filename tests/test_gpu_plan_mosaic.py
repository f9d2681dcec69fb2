"""The gpu-plan tier: the Mosaic GPU attention (``impl="mosaic"``) compiled for an H100 on this CPU, to ptxas.

No GPU is needed because Mosaic GPU compiles its kernel (MLIR -> PTX for sm_90a -> ptxas) inside XLA's compile of
the program, with the target config's compute capability (experiments/plans/mosaic_plan.py says how); these tests
would fail if that moved to the first run on a device. Two shapes: the largest self-attention (2 ragged lengths:
q padded and the last K/V block masked) and the stage-2 cross-attention (512 text keys: whole K/V blocks).
"""

from __future__ import annotations

import pytest

from experiments.plans import gpu_plan, mosaic_plan
from helios_jax.kernels import mosaic

pytestmark = [pytest.mark.gpu_plan,
              pytest.mark.skipif(gpu_plan.plugin_missing() is not None, reason=str(gpu_plan.plugin_missing()))]

SHAPES = [(11040, 11040), (8640, 512)]
HEADS, HEAD_DIM, BF16 = 40, 128, 2


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("mosaic"))
    return {shape: mosaic_plan.compile_kernel(*shape, gpu_plan.h100(), folder) for shape in SHAPES}


@pytest.mark.parametrize("shape", SHAPES)
def test_the_kernel_compiles_for_sm90a_without_a_gpu(plans, shape):
    plan = plans[shape]
    assert plan.target == "sm_90a"  # wgmma and setmaxnreg need the "a" (arch-specific) features
    assert plan.spill_bytes == 0
    assert plan.registers <= 232  # the compute warpgroups' setmaxnreg budget
    assert plan.wgmma > 0 and plan.tma_loads > 0 and plan.exp2 > 0  # Hopper's matrix unit, TMA, the softmax


@pytest.mark.parametrize("shape", SHAPES)
def test_the_only_temporaries_are_the_padded_operands(plans, shape):
    """Padding copies exactly the operands whose length is not whole tiles (q and out to 2 x 64 rows, k and v to
    128 keys): their bytes, from the shapes alone, are the program's temporaries."""
    q_len, kv_len = shape
    rows = 2 * mosaic.H100_CONFIG.block_q
    q_pad, kv_pad = -(-q_len // rows) * rows, -(-kv_len // mosaic.H100_CONFIG.block_kv) * mosaic.H100_CONFIG.block_kv
    per_token = HEADS * HEAD_DIM * BF16
    expected = (2 * q_pad * per_token if q_pad != q_len else 0) + (2 * kv_pad * per_token if kv_pad != kv_len else 0)
    assert plans[shape].xla_temp_bytes == expected


def test_shared_memory_fits_an_sm90_block():
    assert mosaic_plan.shared_bytes(mosaic.H100_CONFIG, HEAD_DIM) <= 227 * 1024
