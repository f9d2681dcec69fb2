"""The gpu-plan tier for the low-memory mode: the 14B distilled chunk with its blocks in host memory, planned for
an H100 capped at 12 GB, fits the card, keeps no block weight stack on the device, and hides every layer copy
behind that layer's compute; the whole offloaded pipeline (text encoding, chunk, VAE decode) fits the card too.

Needs jax's CUDA plugin (``make gpu-plan``); skipped without it. Nothing runs on a device: the program is lowered
for CUDA on the CPU (whose device has host memory) and compiled for the H100 target from abstract inputs
(experiments/plans/lowmem_plan.py). Three compiles (the 14B chunk, umt5-xxl's encoding, the VAE decode): a few
minutes on 2 cores.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import pytest
from flax import traverse_util

from experiments.plans import gpu_plan, lowmem_plan
from helios_jax.models import offload, umt5
from helios_jax.models.transformer import TEXT_KV_PARAMS

pytestmark = [pytest.mark.gpu_plan, pytest.mark.slow,
              pytest.mark.skipif(gpu_plan.plugin_missing() is not None, reason=str(gpu_plan.plugin_missing()))]

GIB = 2**30
SIZE = gpu_plan.HELIOS_14B


@pytest.fixture(scope="module")
def plan():
    return lowmem_plan.chunk_plan(SIZE, "bf16", offloaded=True, cap_gb=12)


def _bytes(leaves) -> int:
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves)


def _block_leaves(plan) -> dict[tuple[str, ...], object]:
    return {p: leaf for p, leaf in traverse_util.flatten_dict(plan.weights).items() if offload.is_block_leaf(p)}


def test_the_14b_chunk_fits_a_12_gb_card(plan):
    """XLA's device plan (arguments + temporaries + outputs in device memory) under the 10.7 GiB a 12 GB card
    leaves; the resident bf16 chunk needs 27.4 GiB (RESULTS.md, gpu_plan)."""
    assert lowmem_plan.device_bytes(plan) < lowmem_plan.USABLE_GIB[12] * GIB, lowmem_plan.device_bytes(plan) / GIB


def test_every_block_weight_is_a_host_argument_and_no_stack_is_on_the_device(plan):
    """The host arguments are exactly the blocks' bytes (26 GiB), and no HLO value in device memory has the shape
    of a whole stack of a block weight (it would be a resident copy)."""
    assert lowmem_plan.host_argument_bytes(plan) == _bytes(_block_leaves(plan).values())
    assert lowmem_plan.resident_stacks(plan) == []


def test_each_layer_copy_overlaps_compute_inside_the_layer_loops(plan):
    """Each of the 3 pyramid stages' block loops (the computations that run attention) copies in one layer: every
    block weight but the text's K/V projections (the chunk computes those once), each copy with a GEMM scheduled
    between its start and its done. With XLA's default limit of 2 async copies, 2 to 4 of a loop's 22 were."""
    layer = sum(math.prod(leaf.shape[1:]) * leaf.dtype.itemsize for p, leaf in _block_leaves(plan).items()
                if not (p[1] == "attn2" and p[2] in TEXT_KV_PARAMS))
    loops = lowmem_plan.layer_loops(plan.hlo)
    assert len(loops) == 3, list(loops)
    for name, copies in loops.items():
        assert sum(c["bytes"] for c in copies) == layer, name
        assert all(c["overlapped"] for c in copies), f"{name}: {sum(c['overlapped'] for c in copies)}/{len(copies)}"


@pytest.fixture(scope="module")
def encode():
    return lowmem_plan.encode_plan(lowmem_plan.UMT5_XXL, SIZE.text_tokens, cap_gb=12)


def test_the_text_encoder_stays_in_host_memory(encode):
    """umt5-xxl's token embedding and 24 layers (10.6 GiB) are exactly the encoding's host arguments, and no value in
    device memory has the shape of the embedding table or of a stacked layer weight."""
    hosted = [leaf for p, leaf in traverse_util.flatten_dict(encode.weights).items() if umt5.is_hosted_leaf(p)]
    assert lowmem_plan.host_argument_bytes(encode) == _bytes(hosted)
    assert lowmem_plan.resident_stacks(encode, umt5.is_hosted_leaf, 2) == []


def test_the_whole_offloaded_pipeline_fits_a_12_gb_card(plan, encode):
    """With the VAE in bf16 (``from_pretrained(vae_dtype=jnp.bfloat16)``): the weights that stay on the device (the
    DiT's non-block params, the text encoder's final norm, the VAE) plus the largest program's temporaries and
    outputs, under the 10.7 GiB a 12 GB card leaves. (The float32 decode does not fit under that cap: RESULTS.md,
    lowmem_plan.)"""
    decode = lowmem_plan.decode_plan(SIZE, cap_gb=12, vae_dtype=jnp.bfloat16)
    weights, rest = lowmem_plan.pipeline_peak(encode, plan, decode)
    assert weights + rest < lowmem_plan.USABLE_GIB[12] * GIB, (weights / GIB, rest / GIB)
