"""The DiT's weights and arguments as the experiments make them: random on the device (a benchmark), or as
shapes only (a plan or a compile study, no memory); in bf16 but the modules the reference keeps in float32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from experiments.workloads import Workload
from helios_jax.config import TransformerConfig
from helios_jax.models.transformer import keeps_fp32, param_shapes


def leaf_dtype(path: tuple, dtype: Any) -> Any:
    """A param's dtype after loading in ``dtype``: float32 for the modules the reference keeps so."""
    return jnp.float32 if keeps_fp32(tuple(getattr(k, "key", str(k)) for k in path)) else dtype


def normal(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Standard normal, drawn flat and reshaped (threefry over 4-D and 5-D shapes compiles very slowly on the CPU)."""
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def random_params(cfg: TransformerConfig, key: jax.Array, dtype: Any = jnp.bfloat16, std: float = 0.02) -> Any:
    """Random normal weights made on the device by one jitted function (no host copies), in the dtypes
    ``leaf_dtype`` gives."""
    flat, tree = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))

    @jax.jit
    def make(key):
        return tree.unflatten([std * normal(jax.random.fold_in(key, i), leaf.shape, leaf_dtype(path, dtype))
                               for i, (path, leaf) in enumerate(flat)])

    return make(key)


def stage_inputs(cfg: TransformerConfig, work: Workload, stage: int, key: jax.Array) -> dict[str, jax.Array]:
    """The DiT's arguments at one pyramid stage: random bf16 latents and text, the pipeline's frame indices."""
    b, c = work.batch, cfg.in_channels
    h, w = work.stages[stage]
    indices = work.frame_indices()
    keys = iter(jax.random.split(key, 8))
    normal = lambda shape: jax.random.normal(next(keys), shape, jnp.bfloat16)  # noqa: E731
    inputs = {
        "hidden_states": normal((b, c, work.frames, h, w)),
        "timestep": jnp.full((b,), 999.0, jnp.float32),
        "encoder_hidden_states": normal((b, work.text_tokens, cfg.text_dim)),
        "indices_hidden_states": jnp.array([indices["noisy"]], jnp.int32),
    }
    for name, frames in work.history_frames:
        inputs[f"latents_history_{name}"] = normal((b, c, frames, *work.history_hw))
        inputs[f"indices_latents_history_{name}"] = jnp.array([indices[name]], jnp.int32)
    return inputs


def abstract_params(shapes: Any, dtype: Any, keep_fp32: bool = True) -> Any:
    """Params as shapes in ``dtype`` (the transformer's float32-kept modules in float32)."""
    def leaf(path, x):
        return jax.ShapeDtypeStruct(x.shape, leaf_dtype(path, dtype) if keep_fp32 else dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def abstract_inputs(cfg: TransformerConfig, work: Workload, stage: int) -> dict:
    """The forward's arguments at ``stage`` as shapes only (``stage_inputs`` makes values)."""
    b, c = work.batch, cfg.in_channels
    h, w = work.stages[stage]
    sds, indices = jax.ShapeDtypeStruct, work.frame_indices()
    inputs = {
        "hidden_states": sds((b, c, work.frames, h, w), jnp.bfloat16),
        "timestep": sds((b,), jnp.float32),
        "encoder_hidden_states": sds((b, work.text_tokens, cfg.text_dim), jnp.bfloat16),
        "indices_hidden_states": sds((1, len(indices["noisy"])), jnp.int32),
    }
    for name, frames in work.history_frames:
        inputs[f"latents_history_{name}"] = sds((b, c, frames, *work.history_hw), jnp.bfloat16)
        inputs[f"indices_latents_history_{name}"] = sds((1, len(indices[name])), jnp.int32)
    return inputs
