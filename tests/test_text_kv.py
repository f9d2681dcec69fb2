"""The text K/V computed once per prompt (``text_kv``) gives the plain forward's velocity.

The cross-attention keys and values of every block depend only on the prompt and the weights, so the
sampling loop computes them once per chunk instead of once per step. Exact-answer tests against the
plain forward (itself tested against diffusers in test_transformer.py): float32, tiny random model,
relative L2 <= 1e-6, max-abs <= 1e-5 of the velocity's scale. A LoRA on ``attn2.to_k``/``to_v`` must be
part of the precomputed keys and values. Four compilations of the tiny forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helios_jax.config import TransformerConfig
from helios_jax.models import lora as L
from helios_jax.models.transformer import HeliosTransformer, TextKV, init_params, text_kv

CFG = TransformerConfig(num_attention_heads=2, attention_head_dim=32, rope_dim=(10, 10, 12), in_channels=4,
                        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=48, num_layers=2)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(seed: int = 0, batch: int = 2) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(seed), 6)
    inputs = {
        "hidden_states": jax.random.normal(keys[0], (batch, 4, 2, 4, 6)),
        "timestep": jnp.array([700.0, 300.0][:batch]),
        "encoder_hidden_states": jax.random.normal(keys[1], (batch, 5, 16)),
        "indices_hidden_states": jnp.array([[3, 4]]),
    }
    for i, (name, frames) in enumerate((("short", 1), ("mid", 2), ("long", 4))):
        inputs[f"latents_history_{name}"] = jax.random.normal(keys[2 + i], (batch, 4, frames, 4, 6))
        inputs[f"indices_latents_history_{name}"] = jnp.arange(frames)[None]
    return inputs


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(1))


_text_kv = jax.jit(text_kv, static_argnums=0)


@jax.jit
def _forward(variables, inputs, kv=None, lora_scale=1.0):
    return HeliosTransformer(CFG).apply(variables, **inputs, lora_scale=lora_scale, text_kv=kv)


def test_precomputed_text_kv_gives_the_plain_forward(params):
    inputs = _inputs()
    variables = {"params": params}
    kv = _text_kv(CFG, variables, inputs["encoder_hidden_states"])
    assert kv.key.shape == kv.value.shape == (CFG.num_layers, 2, 5, 2, 32)
    plain, cached = _forward(variables, inputs), _forward(variables, inputs, kv)
    assert _rel(cached, plain) <= 1e-6
    assert float(jnp.max(jnp.abs(cached - plain))) <= 1e-5 * float(jnp.max(jnp.abs(plain)))
    # The keys matter: another prompt's keys and values give another velocity.
    other = _text_kv(CFG, variables, _inputs(seed=5)["encoder_hidden_states"])
    assert _rel(_forward(variables, inputs, other), plain) > 1e-2


def test_lora_on_the_text_projections_is_part_of_the_keys_and_values(params):
    spec = L.LoraSpec(rank=4, targets=("attn2.to_k", "attn2.to_v", "attn1.to_q"))
    lora = L.init_lora(spec, params, jax.random.key(2))
    lora = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(3), x.shape), lora)  # B != 0
    assert set(lora["blocks"]["attn2"]) == {"to_k", "to_v"}
    inputs, variables, scale = _inputs(seed=1), {"params": params, "lora": lora}, jnp.float32(0.7)
    context = inputs["encoder_hidden_states"]
    plain = _forward(variables, inputs, lora_scale=scale)
    kv = _text_kv(CFG, variables, context, scale)
    assert _rel(_forward(variables, inputs, kv, scale), plain) <= 1e-6
    without = _text_kv(CFG, {"params": params}, context)  # the text projections without their LoRA
    assert _rel(_forward(variables, inputs, without, scale), plain) > 1e-3


def test_text_kv_of_another_shape_is_refused(params):
    inputs = _inputs()
    kv = _text_kv(CFG, {"params": params}, inputs["encoder_hidden_states"][:, :3])
    with pytest.raises(ValueError, match=r"text_kv must be a TextKV .*\(2, 2, 5, 2, 32\)"):
        HeliosTransformer(CFG).apply({"params": params}, **inputs, text_kv=kv)
    with pytest.raises(ValueError, match="text_kv must be a TextKV"):
        HeliosTransformer(CFG).apply({"params": params}, **inputs, text_kv=tuple(kv))
    assert isinstance(kv, TextKV)
