"""The gpu-plan tier for fp8 weights: the 14B distilled chunk and its VAE decode fit a 24 GB card's 22 GiB.

Needs jax's CUDA plugin (``make gpu-plan``); skipped without it. Nothing runs on a device: the programs are
compiled for an H100 from abstract inputs (experiments/plans/fp8_plan.py). The two 14B compiles take a few
minutes on 2 cores.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from experiments.plans import fp8_plan, gpu_plan

pytestmark = [pytest.mark.gpu_plan, pytest.mark.slow,
              pytest.mark.skipif(gpu_plan.plugin_missing() is not None, reason=str(gpu_plan.plugin_missing()))]

GIB = 2**30


@pytest.fixture(scope="module")
def plans():
    h100 = gpu_plan.h100()
    size = gpu_plan.HELIOS_14B
    return {"chunk": fp8_plan.distilled_chunk(size, "fp8", h100),
            "decode": gpu_plan.decode_program(size, h100, jnp.bfloat16)}


def test_fp8_distilled_chunk_with_the_bf16_vae_decode_fits_22_gib(plans):
    """XLA's plan (arguments + temporaries + outputs) of the chunk and of its decode, resident at once."""
    both = gpu_plan.chunk_with_vae_bytes(plans["chunk"], plans["decode"])
    assert both < fp8_plan.CARD_LIMIT_GIB * GIB, both / GIB


def test_fp8_weights_halve_the_arguments(plans):
    """The bf16 14B weights are 26.7 GiB; with the block linears in fp8 the arguments are about 13.6 GiB."""
    assert 12 * GIB < plans["chunk"].argument_bytes < 15 * GIB


def test_the_block_linears_are_fp8_gemms(plans):
    """Every linear of every block, at each of the chunk's 6 forwards, is a GEMM on fp8 operands."""
    fp8_launches = sum(n for g, n in fp8_plan.gemms(plans["chunk"].hlo).items()
                       if g.operands.startswith("f8e4m3fn x f8e4m3fn"))
    layers, forwards = gpu_plan.HELIOS_14B.cfg.num_layers, 6
    assert fp8_launches >= 7 * layers * forwards, fp8_launches  # 7: q/k/v and the cross k/v each fused into one
