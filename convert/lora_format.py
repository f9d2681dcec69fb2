"""diffusers' LoRA file format for the Helios DiT, both ways, and the official "partial" full tensors.

``pytorch_lora_weights.safetensors`` is what ``HeliosPipeline.save_lora_weights`` writes and
``load_lora_weights`` reads: keys ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r) (conv LoRA: (r, in, kt, kh, kw) and (out, r, 1, 1, 1)), metadata
``{"format": "pt", "lora_adapter_metadata": JSON}`` with PEFT's ``LoraConfig`` fields prefixed by
``transformer.``. Without that metadata diffusers assumes alpha = rank, so this port always writes it.

The official trainer also saves fully trained tensors (``patch_short/mid/long``) as the pickle
``transformer_partial.pth``; this port writes the same keys (``patch_short.weight`` ...) as
``transformer_partial.safetensors`` and reads either. Both files are written under a temporary name and
renamed. Keys map to the flax tree by the package's one rule (:mod:`helios_jax.convert.keymap`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import warnings
from typing import Any

import numpy as np
from flax import traverse_util

from helios_jax.convert.export import save_safetensors
from helios_jax.convert.keymap import KeyMap, resolve_leaf, to_flax_layout, to_torch_layout
from helios_jax.convert.sources import CheckpointError, open_source

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PARTIAL_WEIGHTS = "transformer_partial.safetensors"
OFFICIAL_PARTIAL = "transformer_partial.pth"
PREFIX = "transformer."
METADATA_KEY = "lora_adapter_metadata"
# LoraConfig fields that say nothing about the arithmetic (or only about training): read and ignored.
INFORMATIONAL = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                 "peft_version", "target_modules", "exclude_modules", "init_lora_weights", "lora_dropout",
                 "layers_to_transform", "layers_pattern", "fan_in_fan_out", "modules_to_save", "megatron_config",
                 "megatron_core", "loftq_config", "runtime_config", "eva_config", "corda_config", "lora_ga_config",
                 "trainable_token_indices", "target_parameters", "ensure_weight_tying", "qalora_group_size",
                 "alora_invocation_tokens"}
# Fields whose non-default value changes the arithmetic in a way this port does not implement.
UNSUPPORTED = {"use_dora": False, "lora_bias": False, "use_rslora": False, "bias": "none", "rank_pattern": {},
               "alpha_pattern": {}, "use_qalora": False, "use_bdlora": None, "layer_replication": None,
               "arrow_config": None, "kasa_config": None, "monteclora_config": None, "velora_config": None}
# Training-only tensors the official partial file may hold (the critic's GAN heads): not part of the DiT.
TRAINING_ONLY = ("gan_heads.", "gan_final_head.")

Params = dict[str, Any]
Path = tuple[str, ...]


class LoraFormatError(CheckpointError):
    """A LoRA or partial file that does not fit the model or uses a variant this port cannot apply."""


def _stacked(keymap: KeyMap, path: Path) -> bool:
    return keymap.layer_count(path) is not None


def state_dict(lora: Params, keymap: KeyMap) -> dict[str, np.ndarray]:
    """A LoRA tree (or a tree of its gradients) as diffusers' keys and torch layouts, layer by layer."""
    tensors = {}
    for path, leaf in traverse_util.flatten_dict(lora).items():
        layers = range(leaf.shape[0]) if _stacked(keymap, path) else [None]
        for layer in layers:
            array = np.asarray(leaf if layer is None else leaf[layer])
            tensors[PREFIX + keymap.to_torch(path, layer)] = np.ascontiguousarray(to_torch_layout(path[-1], array))
    return tensors


def write_lora(folder: str | os.PathLike, lora: Params, keymap: KeyMap, config: dict[str, Any]) -> str:
    """``folder/pytorch_lora_weights.safetensors`` from a LoRA tree; ``config`` holds LoraConfig fields."""
    tensors = state_dict(lora, keymap)
    metadata = {"format": "pt",
                METADATA_KEY: json.dumps({PREFIX + k: v for k, v in config.items()}, indent=2, sort_keys=True)}
    return save_safetensors(tensors, os.path.join(os.fspath(folder), LORA_WEIGHTS), metadata)


def write_partial(folder: str | os.PathLike, partial: Params, keymap: KeyMap) -> str:
    """``folder/transformer_partial.safetensors``: full (not stacked) params in torch keys and layout."""
    tensors = {}
    for path, leaf in traverse_util.flatten_dict(partial).items():
        if _stacked(keymap, path):
            raise LoraFormatError(f"partial params under {'/'.join(path)}: only unstacked modules can be saved whole")
        tensors[keymap.to_torch(path, None)] = np.ascontiguousarray(to_torch_layout(path[-1], np.asarray(leaf)))
    return save_safetensors(tensors, os.path.join(os.fspath(folder), PARTIAL_WEIGHTS), {"format": "pt"})


@dataclasses.dataclass(frozen=True)
class ReadLora:
    lora: Params
    rank: int
    alpha: float


def first_of(problems: list[str], shown: int = 3) -> str:
    """The first few problems and how many more, on one line for the command line, however many tensors are
    off (a LoRA of another model size misfits hundreds)."""
    rest = len(problems) - shown
    return "; ".join(problems[:shown]) + (f"; and {rest} more" if rest > 0 else "")


def _lora_file(path: str) -> str:
    file = os.path.join(path, LORA_WEIGHTS) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no LoRA at {path!r}: expected a folder with {LORA_WEIGHTS} or that file")
    return file


def _read_config(file: str) -> dict[str, Any] | None:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="numpy") as f:  # it also refuses a header that does not cover the file
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as err:  # safetensors raises several types for a truncated, empty or garbage file
        raise LoraFormatError(f"{file}: not a readable LoRA file ({err}); write or download it again") from None
    if not raw:
        return None
    config = {k.removeprefix(PREFIX): v for k, v in json.loads(raw).items() if k.startswith(PREFIX)}
    bad = {k: config[k] for k, default in UNSUPPORTED.items() if config.get(k, default) not in (default, None, False)}
    if bad:
        raise LoraFormatError(f"{file}: LoRA variant {bad} is not supported (plain LoRA only: no DoRA, rsLoRA, "
                              "LoRA bias or per-module rank/alpha patterns); fuse it with diffusers first")
    unknown = sorted(set(config) - INFORMATIONAL - set(UNSUPPORTED) - {"r", "lora_alpha"})
    if unknown:
        warnings.warn(f"{file}: ignoring unknown LoRA adapter metadata keys {unknown}", stacklevel=3)
    return config


def read_lora(path: str | os.PathLike, shapes: Params, keymap: KeyMap, dtype: Any = np.float32) -> ReadLora:
    """A LoRA tree (flax layout, ``dtype``) from a diffusers LoRA file, checked against the model's ``shapes``.

    Layers of a stacked module missing from the file get zero factors, and smaller ranks are zero-padded
    to the largest one of that module (both exact). Every key is checked; one error names the first few that do not fit and counts the rest.
    """
    file = _lora_file(os.fspath(path))
    config = _read_config(file)
    source = open_source(file)
    kernels = {p[:-1]: tuple(leaf.shape) for p, leaf in traverse_util.flatten_dict(shapes).items() if p[-1] == "kernel"}
    factors: dict[Path, dict[int | None, dict[str, np.ndarray]]] = collections.defaultdict(dict)
    problems = []
    for key in source.keys():
        name = key.removeprefix(PREFIX)
        factor = next((f for f in ("lora_A", "lora_B") if name.endswith(f".{f}.weight")), None)
        if not key.startswith(PREFIX) or factor is None:
            problems.append(f"{key}: not a transformer LoRA factor (transformer.<module>.lora_A/lora_B.weight)")
            continue
        module, layer = keymap.to_flax(name.removesuffix(f".{factor}.weight") + ".weight")
        module = module[:-1]
        if module not in kernels or (layer is None) == _stacked(keymap, module):
            problems.append(f"{key}: the model has no linear or patch-conv module {name.rsplit('.', 2)[0]}")
            continue
        kernel = kernels[module][1:] if layer is not None else kernels[module]
        *window, fan_in, fan_out = kernel
        array = source.read(key)
        if factor == "lora_A":
            fits = array.ndim == 2 + len(window) and tuple(array.shape[1:]) == (fan_in, *window)
            want = f"(r, {fan_in}{''.join(f', {k}' for k in window)})"
        else:
            fits = array.ndim == 2 + len(window) and array.shape[0] == fan_out and tuple(array.shape[2:]) == (1,) * len(window)
            want = f"({fan_out}, r{', 1' * len(window)})"
        if not fits:
            problems.append(f"{key}: shape {tuple(array.shape)}, the model needs {want}")
            continue
        factors[module].setdefault(layer, {})[factor] = to_flax_layout("kernel", array).astype(dtype)
    for module, layers in factors.items():
        for layer, pair in layers.items():
            where = ".".join(keymap.to_torch((*module, "kernel"), layer).split(".")[:-1])
            if set(pair) != {"lora_A", "lora_B"}:
                problems.append(f"{PREFIX}{where}: has {sorted(pair)} but needs both lora_A and lora_B")
            elif pair["lora_A"].shape[-1] != pair["lora_B"].shape[-2]:
                problems.append(f"{PREFIX}{where}: lora_A rank {pair['lora_A'].shape[-1]} != lora_B rank "
                                f"{pair['lora_B'].shape[-2]}")
    if not factors and not problems:
        problems.append("no LoRA factors in the file")
    if problems:
        raise LoraFormatError(f"{file}: the LoRA does not fit this model: {first_of(problems)}")

    ranks = [pair["lora_A"].shape[-1] for layers in factors.values() for pair in layers.values()]
    rank = int(config["r"]) if config and "r" in config else collections.Counter(ranks).most_common(1)[0][0]
    if config and "r" in config and set(ranks) != {rank}:
        raise LoraFormatError(f"{file}: the metadata says r = {rank} but the factors have ranks {sorted(set(ranks))}")
    alpha = float(config.get("lora_alpha", rank)) if config else float(rank)
    tree = {}
    for module, layers in factors.items():
        top = max(pair["lora_A"].shape[-1] for pair in layers.values())
        count = keymap.layer_count(module)
        slots = [None] if count is None else range(count)
        for name, axis in (("lora_A", -1), ("lora_B", -2)):
            template = next(iter(layers.values()))[name]
            shape = list(template.shape)
            shape[axis] = top
            stack = []
            for layer in slots:
                array = np.zeros(shape, dtype)
                if layer in layers:
                    got = layers[layer][name]
                    index = [slice(None)] * array.ndim
                    index[axis] = slice(0, got.shape[axis])
                    array[tuple(index)] = got
                stack.append(array)
            tree[(*module, name, "kernel")] = stack[0] if count is None else np.stack(stack)
    return ReadLora(traverse_util.unflatten_dict(tree), rank, alpha)


def read_partial(path: str | os.PathLike, shapes: Params, keymap: KeyMap) -> Params | None:
    """Full params beside a LoRA file (``transformer_partial.safetensors``, else the official ``.pth``), or None.

    The official file may also hold the critic's GAN heads (training only): those are skipped with a warning.
    """
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = next((os.path.join(folder, n) for n in (PARTIAL_WEIGHTS, OFFICIAL_PARTIAL)
                 if os.path.isfile(os.path.join(folder, n))), None)
    if file is None:
        return None
    source = open_source(file)
    flat_shapes = traverse_util.flatten_dict(shapes)
    tree, problems, skipped = {}, [], []
    for key in source.keys():
        if key.startswith(TRAINING_ONLY):
            skipped.append(key)
            continue
        module, layer = keymap.to_flax(key)
        leaves = {p[-1] for p in flat_shapes if p[:-1] == module[:-1]}
        leaf = resolve_leaf(leaves, module[-1])
        target = flat_shapes.get((*module[:-1], leaf)) if leaf else None
        if target is None or layer is not None:
            problems.append(f"{key}: not an unstacked param of this model")
            continue
        array = to_flax_layout(leaf, source.read(key))
        if tuple(array.shape) != tuple(target.shape):
            problems.append(f"{key}: shape {tuple(source.shape(key))} does not fit the model's {tuple(target.shape)}")
            continue
        tree[(*module[:-1], leaf)] = array
    if problems:
        raise LoraFormatError(f"{file}: the partial weights do not fit this model: {first_of(problems)}")
    if skipped:
        warnings.warn(f"{file}: skipping {len(skipped)} training-only tensors (GAN heads)", stacklevel=3)
    return traverse_util.unflatten_dict(tree) if tree else None
