"""Loading model components from diffusers folders (or from folders written by ``save_params``).

Every component goes through the same strict converter (``helios_jax.convert``); a
:class:`Component` names what differs: its config class, its model module (``param_shapes``,
``keymap``) and which params it keeps in float32. The same records drive converting and exporting.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from types import ModuleType
from typing import Any, Callable

import jax
import jax.numpy as jnp

from helios_jax import parallel
from helios_jax.config import (
    ConfigError,
    TransformerConfig,
    UMT5Config,
    VAEConfig,
    build_config,
    config_dict,
    read_json,
    to_dict,
)
from helios_jax.convert import (
    CheckpointError,
    dtype_policy,
    is_saved_params,
    load_params,
    restore_params,
    saved_config,
    saved_shapes,
)
from helios_jax.models import fp8, offload as offload_lib, transformer, umt5, vae
from helios_jax.models.memory import HISTORY_TERMS

Params = dict[str, Any]
# transformers' text encoder class of each model_type this port runs.
TEXT_ENCODERS = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel"}
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}  # the names the CLI takes for weights
KeepFp32 = Callable[[tuple[str, ...]], bool]


@dataclasses.dataclass(frozen=True)
class Component:
    """One model of a Helios checkpoint, as its folder, its reference class and its port."""

    folder: str  # the subfolder of a pipeline checkpoint
    class_name: str  # the reference class, as config.json names it
    config_cls: type
    module: ModuleType  # provides param_shapes(cfg) and keymap(cfg)
    keeps_fp32: Callable[[Any], KeepFp32]  # dtype -> which params stay float32
    weights_name: str  # the safetensors file stem save_pretrained uses
    hosted: offload_lib.Hosted | None = None  # the leaves offload="blocks" keeps in host memory (None: cannot offload)

    def read_config(self, path: str | os.PathLike) -> Any:
        """The validated config of a component folder, diffusers' config.json or the one ``save_params``
        wrote; reads no weight. A saved-params folder without its config.json is refused: its shapes
        alone do not say the model (and the class defaults are the 14B model's)."""
        folder = os.fspath(path)
        if is_saved_params(folder):
            raw = saved_config(folder)
            if raw is None:
                raise ConfigError(
                    f"{folder} holds saved params but no config.json beside them, so its {self.class_name} "
                    "configuration is unknown; convert the component again (helios-jax convert writes it) or copy "
                    "the diffusers config.json of the same model there"
                )
            origin = os.path.join(folder, "config.json")
        else:
            raw, origin = config_dict(folder)
        self._check_class(raw, origin)
        return build_config(self.config_cls, raw, origin)

    def _check_class(self, raw: dict[str, Any], origin: str) -> None:
        """The config must be this component's reference class (a Wan or T5 config would half-fit)."""
        if self.config_cls is UMT5Config:
            names = raw.get("architectures") or []
            model_type = raw.get("model_type", "umt5")
            if model_type not in TEXT_ENCODERS or (names and TEXT_ENCODERS[model_type] not in names):
                raise ConfigError(
                    f"{origin}: model_type {model_type!r}, architectures {names}: this port runs the text encoders "
                    f"{sorted(TEXT_ENCODERS.values())} (model_type {sorted(TEXT_ENCODERS)}) only; use the "
                    "checkpoint's umt5-xxl text_encoder"
                )
            return
        name = raw.get("_class_name", self.class_name)
        if name != self.class_name:
            raise ConfigError(
                f"{origin}: _class_name {name!r} is not {self.class_name!r}: this folder holds another model's "
                f"{self.folder}; use the Helios checkpoint's own"
            )

    def load(self, path: str | os.PathLike, dtype: Any | None = None, config: Any | None = None,
             quantize: str | None = None, mesh: jax.sharding.Mesh | None = None,
             offload: str | None = None) -> tuple[Any, Params]:
        """Config and params of a component folder: converted from diffusers safetensors, or restored
        from ``save_params``. ``dtype`` None keeps the stored dtype; either way the params the
        reference keeps in float32 are float32. ``config``, if given, is the folder's config already read
        (``read_config``), so a pipeline can check every config before its first weight. ``quantize="fp8"``
        (the transformer only) stores the block linears as fp8 (``helios_jax.models.fp8``), leaf by leaf
        as they load, and ``"fp8-edges"`` all but the first and last blocks'; saved params that are fp8 already
        load in their saved layout, whatever ``quantize`` says, except that all-fp8 blocks cannot give "fp8-edges".
        ``mesh`` places every leaf split by the component's sharding table as it is read (``parallel.TABLES``),
        so a model larger than one device's memory loads onto the mesh. ``offload="blocks"`` (the transformer and
        the text encoder) puts every ``hosted`` leaf (the DiT's blocks; UMT5's layers and token embedding) in pinned
        host memory as it is read (``helios_jax.models.offload``): the device holds the rest and, while loading, one
        stacked leaf (quantized there when asked)."""
        folder = os.fspath(path)
        check_offload(self, offload)
        config = self.read_config(folder) if config is None else config
        check_quantize(self.folder, quantize, config, offload)
        edges = quantize == fp8.FP8_EDGES
        policy = dtype_policy(dtype, self.keeps_fp32(dtype))

        def placement(shapes: Params) -> Params | None:
            return None if mesh is None else parallel.shardings(shapes, mesh, parallel.TABLES[self.folder])

        if is_saved_params(folder):
            shapes = saved_shapes(folder)
            if self.folder == "transformer":
                check_saved_storage(folder, shapes, config, quantize, offload)
            if offload and quantize and not fp8.is_fp8(shapes):
                raise CheckpointError(f"{folder}: its saved params are 16-bit, and offloaded blocks are quantized as "
                                      f"they load only from safetensors: convert it to fp8 first (helios-jax convert "
                                      f"SRC DST --dtype fp8) or drop the offload")
            where = placement(shapes)
            params = restore_params(folder, policy, offload_lib.host_blocks(shapes, where, self.hosted) if offload else where)
            return config, fp8.quantize_params(params, edges) if quantize and not fp8.is_fp8(params) else params
        shapes, keymap = self.module.param_shapes(config), self.module.keymap(config)
        finish = functools.partial(fp8.quantize_leaf, bf16_edges=edges) if quantize else None
        if offload:
            finish = offload_lib.leaf_to_host(finish, self.hosted)
        return config, load_params(folder, shapes, keymap, policy, desc=self.folder, finish=finish,
                                   shardings=placement(shapes))

    def config_json(self, config: Any) -> dict[str, Any]:
        """The config.json the reference library writes for ``config`` (with its class marker)."""
        marker = ({"architectures": [TEXT_ENCODERS[config.model_type]]} if self.config_cls is UMT5Config
                  else {"_class_name": self.class_name})
        return {**marker, **to_dict(config)}


def weight_settings(name: str) -> tuple[Any, str | None]:
    """``from_pretrained``'s ``(dtype, weight_dtype)`` for a weight name the CLI takes (``DTYPES`` or one of
    ``fp8.STORAGES``): an fp8 storage computes in bf16. One mapping for every command that loads a pipeline."""
    if name in fp8.STORAGES:
        return jnp.bfloat16, name
    return DTYPES[name], None


def check_quantize(component: str, quantize: str | None, config: Any | None = None, offload: str | None = None
                   ) -> None:
    """fp8 is a storage of the DiT's block linears only, named by one of ``fp8.STORAGES``; "fp8-edges" needs a
    middle between its first and last blocks (``config``'s layers, when given) and cannot be offloaded (offload
    streams one block stack): one clear error for anything else, before any weight is read."""
    if quantize is None:
        return
    if quantize not in fp8.STORAGES:
        raise CheckpointError(f"quantize = {quantize!r} is not supported: the quantized storages are "
                              f"{', '.join(map(repr, fp8.STORAGES))}")
    if component != "transformer":
        raise CheckpointError(
            f"fp8 weights are for the transformer only, not the {component}: its layers stay 16- or 32-bit "
            "(give the VAE and text encoder bf16, fp16 or fp32, or convert the transformer/ folder alone to fp8)"
        )
    if quantize == fp8.FP8_EDGES and offload:
        raise CheckpointError(f"{fp8.FP8_EDGES!r} keeps the first and last blocks apart from the block stack that "
                              f"offload = {offload!r} streams: use {fp8.FP8!r} with the offload, or drop the offload")
    if quantize == fp8.FP8_EDGES and config is not None and config.num_layers < 3:
        raise CheckpointError(f"{fp8.FP8_EDGES!r} keeps the first and last blocks 16-bit, which needs at least 3 "
                              f"blocks; this transformer has {config.num_layers}: use {fp8.FP8!r}")


def check_saved_storage(folder: str, shapes: Params, config: TransformerConfig, quantize: str | None,
                        offload: str | None) -> None:
    """A saved transformer's block layout (``fp8.layout_problem``) and what was asked of it: one clear error for an
    inconsistent layout, for "fp8-edges" asked of all-fp8 blocks (their 16-bit edges are gone) and for offloading
    the split edges. Read from the shapes, before any weight."""
    if problem := fp8.layout_problem(shapes, config.num_layers):
        raise CheckpointError(f"{folder}: its saved params are not a Helios transformer's layout: {problem}; "
                              "convert it again from the diffusers checkpoint")
    stored = fp8.storage_of(shapes)
    if stored == fp8.FP8 and quantize == fp8.FP8_EDGES:
        raise CheckpointError(f"{folder} holds every block in fp8, so its first and last blocks cannot load 16-bit "
                              f"({fp8.FP8_EDGES!r}): ask for {fp8.FP8!r}, or convert the 16-bit checkpoint with "
                              f"--dtype {fp8.FP8_EDGES}")
    if stored == fp8.FP8_EDGES and offload:
        raise CheckpointError(f"{folder} holds the {fp8.FP8_EDGES!r} layout, whose first and last blocks are apart "
                              f"from the block stack that offload = {offload!r} streams: convert the 16-bit "
                              f"checkpoint with --dtype {fp8.FP8} to offload it, or drop the offload")


def check_offload(component: Component, offload: str | None) -> None:
    """``offload`` is None or "blocks", and only the transformer and the text encoder have layers to offload."""
    if offload_lib.check_mode(offload) and component.hosted is None:
        raise CheckpointError(f"offload = {offload!r} applies to the transformer's and the text encoder's layers "
                              f"only, not the {component.folder}")


def holds_fp8(folder: str | os.PathLike) -> bool:
    """Whether a component folder holds saved fp8 params (read from their metadata only)."""
    return is_saved_params(folder) and fp8.is_fp8(saved_shapes(folder))


def check_lora_base(transformer_folder: str | os.PathLike) -> None:
    """A LoRA is fused into 16-bit kernels: one clear error for a transformer that is fp8 already."""
    if holds_fp8(transformer_folder):
        raise CheckpointError(f"{transformer_folder} holds fp8 weights, into which a LoRA cannot be fused: fuse it "
                              "into the 16-bit checkpoint (weight_dtype='fp8' with the LoRA, or helios-jax convert "
                              "SRC DST --merge-lora LORA --dtype fp8)")


def _transformer_fp32(path: tuple[str, ...]) -> bool:
    """The reference's float32 modules, and the fp8 kernels' scales."""
    return transformer.keeps_fp32(path) or path[-1] == fp8.SCALE


COMPONENTS: dict[str, Component] = {
    c.folder: c
    for c in (
        Component("transformer", "HeliosTransformer3DModel", TransformerConfig, transformer,
                  lambda dtype: _transformer_fp32, "diffusion_pytorch_model", offload_lib.is_block_leaf),
        Component("vae", "AutoencoderKLWan", VAEConfig, vae, lambda dtype: vae.keeps_fp32, "diffusion_pytorch_model"),
        Component("text_encoder", "UMT5EncoderModel", UMT5Config, umt5, umt5.keeps_fp32, "model", umt5.is_hosted_leaf),
    )
}


def load_transformer(path: str | os.PathLike, dtype: Any | None = None) -> tuple[TransformerConfig, Params]:
    """The Helios DiT from a diffusers ``transformer/`` folder: ``cfg, params = load_transformer(dir)``."""
    return COMPONENTS["transformer"].load(path, dtype)


# --- stage 1-init: a Wan 2.1 transformer as the Helios DiT it starts from ---------------------------------

WAN_CLASS = "WanTransformer3DModel"
# Wan config keys a Helios DiT has no use for: the image-to-video embedders (must be off) and Wan's RoPE
# table length (Helios computes its RoPE from the frame indices).
WAN_IMAGE_KEYS = ("image_dim", "pos_embed_seq_len")
WAN_ONLY_KEYS = (*WAN_IMAGE_KEYS, "rope_max_seq_len")
# The Helios flags of the official stage 1 (train_helios.py builds the model with them from the Wan folder).
STAGE1_FLAGS = dict(has_multi_term_memory_patch=True, zero_history_timestep=True, guidance_cross_attn=True)


def wan_rope_dim(head_dim: int) -> tuple[int, int, int]:
    """Wan's RoPE split of a head (``WanRotaryPosEmbed``): h = w = 2 (d // 6), t the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


@dataclasses.dataclass(frozen=True)
class WanInit:
    """A diffusers ``WanTransformer3DModel`` folder read as the Helios DiT that stage 1-init trains (the
    ``read_config``/``load`` of :class:`Component`). Every Wan weight is used as it is (Wan's
    ``scale_shift_table`` is Helios' ``norm_out.scale_shift_table``); the history patch convs Wan lacks
    are derived from the loaded ``patch_embedding`` by :func:`history_patches_from`."""

    class_name: str = WAN_CLASS

    def read_config(self, path: str | os.PathLike) -> TransformerConfig:
        raw, origin = config_dict(os.fspath(path))
        if raw.get("_class_name") != WAN_CLASS:
            raise ConfigError(f"{origin}: _class_name {raw.get('_class_name')!r} is not {WAN_CLASS!r}; "
                              "a Helios transformer folder loads with load_transformer")
        for key in WAN_IMAGE_KEYS:
            if raw.get(key) is not None:
                raise ConfigError(f"{origin}: {key} = {raw[key]!r} is not supported: Helios starts from the "
                                  f"text-to-video Wan 2.1 ({key} null); use Wan-AI/Wan2.1-T2V-14B-Diffusers")
        head_dim = raw.get("attention_head_dim", TransformerConfig.attention_head_dim)
        values = {**raw, "rope_dim": list(wan_rope_dim(head_dim)), **STAGE1_FLAGS}
        return build_config(TransformerConfig, values, origin, ignore=WAN_ONLY_KEYS)

    def load(self, path: str | os.PathLike, dtype: Any | None = None, config: TransformerConfig | None = None,
             mesh: jax.sharding.Mesh | None = None) -> tuple[TransformerConfig, Params]:
        folder = os.fspath(path)
        config = self.read_config(folder) if config is None else config
        shapes = dict(transformer.param_shapes(config))
        for name, _ in HISTORY_TERMS:
            del shapes[f"patch_{name}"]
        renamed = (("scale_shift_table", "norm_out.scale_shift_table"),)
        keymap = dataclasses.replace(transformer.keymap(config), renamed=renamed)
        placement = None if mesh is None else parallel.shardings(shapes, mesh, parallel.DIT_RULES)
        params = load_params(folder, shapes, keymap, dtype_policy(dtype, transformer.keeps_fp32), desc="transformer",
                             shardings=placement)
        return config, {**params, **history_patches_from(params["patch_embedding"])}


def history_patches_from(patch_embedding: Params) -> Params:
    """``patch_short/mid/long`` from a patch embedding, as the official ``initialize_weight_from_another_conv3d``:
    the kernel (its ``[:, :16]`` is the whole kernel of the 16-channel text-to-video model) repeated 1, 2 and
    4 times along t, h and w and divided by the repeat count (a constant block then gives the patch
    embedding's response), biases copied. The official code runs it on the random init before the Wan
    weights load (docs/training.md §13, item 2); here it runs on the loaded weights."""
    kernel = patch_embedding["kernel"]  # flax layout (t, h, w, in, out)
    out = {}
    for name, factor in HISTORY_TERMS:
        tiled = kernel.astype(jnp.float32)
        for axis in range(3):
            tiled = jnp.repeat(tiled, factor, axis=axis)
        out[f"patch_{name}"] = {"kernel": (tiled / factor**3).astype(kernel.dtype), "bias": patch_embedding["bias"]}
    return out


def transformer_component(path: str | os.PathLike) -> Component | WanInit:
    """What loads a training run's ``transformer_model_name_or_path``: a Helios DiT folder, or the Wan 2.1
    folder stage 1-init starts from (by its config's ``_class_name``)."""
    folder = os.fspath(path)
    if not is_saved_params(folder):
        raw, _ = config_dict(folder)
        if raw.get("_class_name") == WAN_CLASS:
            return WanInit()
    return COMPONENTS["transformer"]


def load_transformer_init(path: str | os.PathLike, dtype: Any | None = None) -> tuple[TransformerConfig, Params]:
    """The DiT a training run starts from: a Helios folder as :func:`load_transformer` loads it, or a Wan 2.1
    ``WanTransformer3DModel`` folder with the Helios stage-1 flags and history patch convs derived from its
    patch embedding: ``cfg, params = load_transformer_init("Wan2.1-T2V-14B-Diffusers/transformer")``."""
    return transformer_component(path).load(path, dtype)


def load_text_encoder(path: str | os.PathLike, dtype: Any | None = None) -> tuple[UMT5Config, Params]:
    """The UMT5 (or T5) encoder from a diffusers ``text_encoder/`` folder: ``cfg, params = load_text_encoder(dir)``.

    Run it with ``hj.UMT5Encoder(cfg)``. Loaded in float16, ``wo`` stays float32 as in the reference.
    """
    return COMPONENTS["text_encoder"].load(path, dtype)


def load_vae(path: str | os.PathLike, dtype: Any | None = None) -> tuple[VAEConfig, Params]:
    """The Wan VAE from a diffusers ``vae/`` folder: ``cfg, params = load_vae(dir)``; use ``hj.WanVAE(cfg)``."""
    return COMPONENTS["vae"].load(path, dtype)


def component_of(folder: str | os.PathLike) -> Component:
    """Which component a folder holds, from its config's class marker (diffusers or saved params)."""
    folder = os.fspath(folder)
    config = saved_config(folder) if is_saved_params(folder) else None
    if config is None:
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder} has no config.json: it is not a model component folder")
        config = read_json(path)
    names = [config.get("_class_name"), *config.get("architectures", [])]
    if any(name in TEXT_ENCODERS.values() for name in names):
        return COMPONENTS["text_encoder"]
    for component in COMPONENTS.values():
        if component.class_name in names:
            return component
    raise ConfigError(f"{folder}: class {names} is not a Helios component; this port converts and loads "
                      f"{[c.class_name for c in COMPONENTS.values()]}")
