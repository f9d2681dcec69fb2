"""The real 14B configuration, checked without allocating weights.

The reference model is built on torch's meta device (shapes only); ours with ``jax.eval_shape``.
"""

from __future__ import annotations

import math
import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import HeliosTransformer3DModel

import helios_jax as hj
from helios_jax.convert import plan_conversion
from helios_jax.convert.keymap import WEIGHT_LEAVES
from helios_jax.models import transformer


class MetaSource:
    """A TensorSource with shapes only: the reference's state dict on the meta device."""

    def __init__(self, model: torch.nn.Module):
        self._shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def keys(self):
        return list(self._shapes)

    def shape(self, key):
        return self._shapes[key]

    def dtype(self, key):
        return np.dtype(np.float32)

    def read(self, key):
        raise AssertionError("a coverage check must not read data")


@pytest.fixture(scope="module")
def reference_14b():
    with torch.device("meta"):
        return HeliosTransformer3DModel()


def test_parameter_count_equals_the_reference(reference_14b):
    ours = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(transformer.param_shapes(hj.TransformerConfig())))
    theirs = sum(p.numel() for p in reference_14b.parameters())
    assert ours == theirs
    assert 14e9 < ours < 15e9


def test_every_reference_key_fills_exactly_one_param(reference_14b):
    cfg = hj.TransformerConfig()
    source = MetaSource(reference_14b)
    plan = plan_conversion(source, transformer.param_shapes(cfg), transformer.keymap(cfg))
    assert plan.num_tensors == len(source.keys())
    keymap = transformer.keymap(cfg)
    for path, entries in plan.slots.items():
        for layer, key in entries:
            assert keymap.to_torch(path, layer) == key
            assert path[-1] in (*WEIGHT_LEAVES, "bias") or path[-1] == key.split(".")[-1]


def test_forward_lowers_at_stage_2_without_allocating_weights():
    """jit-lower the bf16 forward over 11,040 tokens (48x80 noisy latents, 9 frames, full history)."""
    cfg = hj.TransformerConfig()
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), transformer.param_shapes(cfg))
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    index = lambda n: jax.ShapeDtypeStruct((1, n), jnp.int32)  # noqa: E731
    inputs = dict(
        hidden_states=bf16(1, 16, 9, 48, 80),
        timestep=jax.ShapeDtypeStruct((1,), jnp.float32),
        encoder_hidden_states=bf16(1, 512, 4096),
        indices_hidden_states=index(9),
        indices_latents_history_short=index(2),
        indices_latents_history_mid=index(2),
        indices_latents_history_long=index(16),
        latents_history_short=bf16(1, 16, 2, 48, 80),
        latents_history_mid=bf16(1, 16, 2, 48, 80),
        latents_history_long=bf16(1, 16, 16, 48, 80),
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lowered = jax.jit(hj.HeliosTransformer(cfg).apply).lower({"params": params}, **inputs)
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    out = lowered.out_info
    assert out.shape == (1, 16, 9, 48, 80) and out.dtype == jnp.bfloat16
    assert grown_gib < 2, f"lowering grew the peak RSS by {grown_gib:.1f} GiB (the weights are 28 GiB)"
    text = lowered.as_text()
    assert text.count("stablehlo.while") >= 1  # the 40 blocks are one scanned loop, not 40 copies
