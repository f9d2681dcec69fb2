"""Loading model components from diffusers folders (or from folders written by ``save_params``).

Every component goes through the same strict converter (``helios_jax.convert``): a component
supplies its config class, its param shapes, its key map and which params it keeps in float32.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

from helios_jax.config import TransformerConfig, UMT5Config, VAEConfig, read_config
from helios_jax.convert import KeyMap, dtype_policy, is_saved_params, load_params, restore_params, saved_config
from helios_jax.models import transformer, umt5, vae

C = TypeVar("C")
Params = dict[str, Any]


def load_component(
    path: str | os.PathLike,
    config_cls: type[C],
    shapes_fn: Callable[[C], Params],
    keymap_fn: Callable[[C], KeyMap],
    keeps_fp32: Callable[[tuple[str, ...]], bool],
    dtype: Any | None,
    desc: str,
) -> tuple[C, Params]:
    """Config and params of one component folder.

    A diffusers folder (``config.json`` and safetensors) is converted; a folder written by
    ``helios_jax.convert.save_params`` is restored. ``dtype`` None keeps the stored dtype; either
    way the params the reference keeps in float32 are float32.
    """
    folder = os.fspath(path)
    policy = dtype_policy(dtype, keeps_fp32)
    if is_saved_params(folder):
        return read_config(config_cls, saved_config(folder) or {}), restore_params(folder, policy)
    config = read_config(config_cls, folder)
    return config, load_params(folder, shapes_fn(config), keymap_fn(config), policy, desc=desc)


def load_transformer(path: str | os.PathLike, dtype: Any | None = None) -> tuple[TransformerConfig, Params]:
    """The Helios DiT from a diffusers ``transformer/`` folder: ``cfg, params = load_transformer(dir)``."""
    return load_component(
        path,
        TransformerConfig,
        transformer.param_shapes,
        transformer.keymap,
        transformer.keeps_fp32,
        dtype,
        desc="transformer",
    )


def load_text_encoder(path: str | os.PathLike, dtype: Any | None = None) -> tuple[UMT5Config, Params]:
    """The UMT5 encoder from a diffusers ``text_encoder/`` folder: ``cfg, params = load_text_encoder(dir)``.

    Run it with ``hj.UMT5Encoder(cfg)``. Loaded in float16, ``wo`` stays float32 as in the reference.
    """
    return load_component(
        path, UMT5Config, umt5.param_shapes, umt5.keymap, umt5.keeps_fp32(dtype), dtype, desc="text encoder"
    )


def load_vae(path: str | os.PathLike, dtype: Any | None = None) -> tuple[VAEConfig, Params]:
    """The Wan VAE from a diffusers ``vae/`` folder: ``cfg, params = load_vae(dir)``; use ``hj.WanVAE(cfg)``."""
    return load_component(path, VAEConfig, vae.param_shapes, vae.keymap, vae.keeps_fp32, dtype, desc="vae")
