"""LoRA for the Helios DiT: a separate params tree, applied at call time, merged on request.

The ``lora`` variables collection mirrors the ``params`` tree: a LoRA'd module ``blocks/attn1/to_q``
(params ``kernel`` (in, out)) gets ``blocks/attn1/to_q/lora_A/kernel`` (in, r) and ``.../lora_B/kernel``
(r, out), stacked on the layer axis under ``blocks`` like the params. A patch embedding (kernel
(kt, kh, kw, in, out)) gets PEFT's conv LoRA: A (kt, kh, kw, in, r), B (1, 1, 1, r, out). With these
leaf names the torch keys follow the package's one naming rule (``lora_A.weight`` (r, in) ...), so the
diffusers file format (``helios_jax.convert.lora_format``) needs no names of its own.

``HeliosTransformer(cfg).apply({"params": base, "lora": lora}, ..., lora_scale=spec.scale)`` computes
``x W + scale * (x A) B`` at every LoRA'd layer, never forming ``W + A B`` nor copying the base;
``lora_scale`` may be a traced array (DMD's critic LoRA on and off on one base, one compiled program).
The pipeline and the trainer both use this module, so neither imports the other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from helios_jax.config import TransformerConfig
from helios_jax.convert import lora_format
from helios_jax.convert.keymap import KeyMap
from helios_jax.models import transformer

Params = dict[str, Any]
Path = tuple[str, ...]

STACKED = ("blocks",)  # subtrees whose leaves carry a leading layer axis
HISTORY_PATCHES = ("patch_short", "patch_mid", "patch_long")
PATCH_EMBEDDING = "patch_embedding"
# The official exclusions of "all-linear": names containing "norm", and modules ``down``/``up``.
EXCLUDE_MODULES = ("down", "up")
# Trainable subsets for optax: params subtrees trained in full beside the LoRA (docs/training.md §1.3).
SUBSETS: dict[str, tuple[str, ...]] = {"lora": (), "lora+history_patches": HISTORY_PATCHES}


LoraError = lora_format.LoraFormatError  # a LoRA that does not fit the model, in a file or in memory
_NAMES = KeyMap(literal=transformer.LITERAL_NAMES)  # module paths as the reference names them


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which layers get a LoRA and how it is scaled (PEFT's ``LoraConfig`` as the official trainer sets it).

    targets: ``"all-linear"`` (every linear layer of the DiT but names containing "norm" and modules in
        ``exclude``: the 406 linears of the 14B model) or module names matched as PEFT matches them (a
        dotted name equal to, or ending in ``.`` + a target, without layer indices: ``"attn1.to_q"``).
    patch_embedding / history_patches: conv LoRA on ``patch_embedding`` / on ``patch_short/mid/long``.
    alpha: None means ``rank`` (scale 1, the official setting).
    """

    rank: int
    alpha: float | None = None
    targets: str | tuple[str, ...] = "all-linear"
    patch_embedding: bool = False
    history_patches: bool = False
    exclude: tuple[str, ...] = EXCLUDE_MODULES

    def __post_init__(self) -> None:
        if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"LoRA rank = {self.rank!r} must be a positive integer (official: 128 or 256)")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoRA alpha = {self.alpha!r} must be positive (None: alpha = rank)")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            raise ValueError(f"LoRA targets = {self.targets!r}: give 'all-linear' or a tuple of module names")

    @property
    def scale(self) -> float:
        """``alpha / rank``: the multiplier of ``B(A(x))``."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def _dotted(path: Path) -> str:
    """A module path as the reference names it, without layer index (``blocks.attn1.to_out.0``)."""
    return _NAMES.to_torch((*path, "kernel"), None).removesuffix(".weight")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _module_kernels(params: Params) -> dict[Path, Any]:
    """Module path -> kernel (array or shape struct) of every linear or patch-conv module."""
    return {path[:-1]: leaf for path, leaf in traverse_util.flatten_dict(params).items() if path[-1] == "kernel"}


def _window_ndim(path: Path, kernel: Any) -> int:
    """How many kernel axes come before (in, out): 0 for a linear layer, 3 for a 3D conv."""
    return len(kernel.shape) - 2 - (path[0] in STACKED)


def target_modules(spec: LoraSpec, params: Params) -> list[Path]:
    """The module paths (in the params tree) that ``spec`` puts a LoRA on, sorted."""
    found = []
    for path, kernel in _module_kernels(params).items():
        name = _dotted(path)
        if _window_ndim(path, kernel) == 0:
            excluded = "norm" in name or _matches(name, spec.exclude)
            chosen = spec.targets == "all-linear" or _matches(name, spec.targets)
            if chosen and not excluded:
                found.append(path)
        elif path == (PATCH_EMBEDDING,) and spec.patch_embedding:
            found.append(path)
        elif path[0] in HISTORY_PATCHES and spec.history_patches:
            found.append(path)
    if not found:
        raise ValueError(f"LoRA targets {spec.targets!r} match no module of this model")
    return sorted(found)


def lora_factor_shapes(path: Path, kernel_shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A and B for a module with this kernel: linear (in, r), (r, out); conv (k..., in, r), (1.., r, out)."""
    stack = kernel_shape[:1] if path[0] in STACKED else ()
    *window, fan_in, fan_out = kernel_shape[len(stack):]
    ones = (1,) * len(window)
    return (*stack, *window, fan_in, rank), (*stack, *ones, rank, fan_out)


def init_lora(spec: LoraSpec, params: Params, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """The official "gaussian" init: A ~ N(0, (1/r)^2), B = 0 (so the LoRA starts as a no-op).

    ``params`` may be arrays or ``jax.ShapeDtypeStruct`` leaves (``transformer.param_shapes``).
    """
    kernels = _module_kernels(params)
    shapes = tuple((path, *lora_factor_shapes(path, tuple(kernels[path].shape), spec.rank))
                   for path in target_modules(spec, params))
    return _draw_lora(key, shapes, spec.rank, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_lora(key: jax.Array, shapes: tuple[tuple[Path, tuple[int, ...], tuple[int, ...]], ...], rank: int,
               dtype: jnp.dtype) -> Params:
    """One draw for every A, one small compiled program (threefry compiles slowly). Its static arguments are
    tuples of paths and shapes, the rank and the dtype, so each LoRA layout compiles once per process."""
    sizes = [math.prod(a_shape) for _, a_shape, _ in shapes]
    normal = jax.random.normal(key, (sum(sizes),), dtype) / rank
    tree: dict[Path, jax.Array] = {}
    for start, size, (path, a_shape, b_shape) in zip(np.cumsum([0, *sizes]), sizes, shapes):
        tree[(*path, "lora_A", "kernel")] = normal[start:start + size].reshape(a_shape)
        tree[(*path, "lora_B", "kernel")] = jnp.zeros(b_shape, dtype)
    return traverse_util.unflatten_dict(tree)


def lora_shapes(spec: LoraSpec, params: Params, dtype: Any = jnp.float32) -> Params:
    """The LoRA tree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
    return jax.eval_shape(lambda k: init_lora(spec, params, k, dtype), jax.random.key(0))


def factors(lora: Params) -> dict[Path, tuple[Any, Any]]:
    """Module path -> (A, B) kernels of a LoRA tree."""
    flat = traverse_util.flatten_dict(lora)
    modules = sorted({path[:-2] for path in flat})
    out = {}
    for path in modules:
        a, b = flat.get((*path, "lora_A", "kernel")), flat.get((*path, "lora_B", "kernel"))
        extra = [p for p in flat if p[:-2] == path and p[-2:] not in (("lora_A", "kernel"), ("lora_B", "kernel"))]
        if a is None or b is None or extra:
            raise LoraError(f"LoRA module {'/'.join(path)} must hold exactly lora_A/kernel and lora_B/kernel; "
                            f"has {sorted('/'.join(p[len(path):]) for p in flat if p[:-2] == path)}")
        out[path] = (a, b)
    return out


def check_lora(lora: Params, params: Params) -> None:
    """One error naming the first LoRA modules that are not in the model or whose shapes do not fit it (with
    their shapes and the model's) and counting the rest."""
    kernels = _module_kernels(params)
    problems = []
    for path, (a, b) in factors(lora).items():
        name = "/".join(path)
        if path not in kernels:
            problems.append(f"{name}: no such linear or patch-conv module in the model")
            continue
        rank = a.shape[-1]
        want_a, want_b = lora_factor_shapes(path, tuple(kernels[path].shape), rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(f"{name}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; the model needs "
                            f"{want_a}, {want_b} for rank {rank}")
    if problems:
        raise LoraError(f"the LoRA does not fit this model: {lora_format.first_of(problems)}")


def merge_lora(params: Params, lora: Params, scale: float = 1.0) -> Params:
    """``params`` with ``W + scale * A B`` for every LoRA'd kernel (computed in float32, cast to W's dtype).

    ``scale`` is the full multiplier (``spec.scale`` times the adapter strength). Other leaves are shared.
    """
    check_lora(lora, params)
    flat = traverse_util.flatten_dict(params)
    for path, (a, b) in factors(lora).items():
        kernel = flat[(*path, "kernel")]
        a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        delta = jnp.einsum("...ir,...ro->...io", a32, b32)  # a conv's B (1, 1, 1, r, out) broadcasts
        flat[(*path, "kernel")] = (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def trainable_mask(variables: dict[str, Params], subset: str = "lora") -> dict[str, Params]:
    """A bool tree over ``{"params": base, "lora": lora}``: True for every LoRA leaf, and with
    ``"lora+history_patches"`` for the full ``patch_short/mid/long`` params (stage 1). ``optax.masked``
    passes masked-out updates through unchanged, so pair it with ``optax.masked(optax.set_to_zero(), not
    mask)``, or use :func:`trainable_labels` with ``optax.multi_transform``; better still, differentiate
    only the trainable leaves."""
    if subset not in SUBSETS:
        raise ValueError(f"trainable subset {subset!r} is not one of {sorted(SUBSETS)}")
    full = SUBSETS[subset]
    unknown = sorted(set(variables) - {"params", "lora"})
    if unknown or "lora" not in variables:
        raise ValueError(f"trainable_mask takes {{'params': ..., 'lora': ...}}; got collections {sorted(variables)}")
    return {
        "params": traverse_util.path_aware_map(lambda path, _: path[0] in full, variables.get("params", {})),
        "lora": jax.tree.map(lambda _: True, variables["lora"]),
    }


def trainable_labels(variables: dict[str, Params], subset: str = "lora") -> dict[str, Params]:
    """``"trainable"``/``"frozen"`` labels for ``optax.multi_transform({"trainable": adamw, "frozen":
    optax.set_to_zero()}, labels)``; the same choice as :func:`trainable_mask`."""
    return jax.tree.map(lambda m: "trainable" if m else "frozen", trainable_mask(variables, subset))


def save_lora(folder: str | os.PathLike, lora: Params, spec: LoraSpec, cfg: TransformerConfig,
              partial: Params | None = None) -> str:
    """Write ``folder/pytorch_lora_weights.safetensors`` as diffusers' ``HeliosPipeline.save_lora_weights``
    does (alpha in the adapter metadata), and the fully trained history patch convs, if any, beside it
    (``transformer_partial.safetensors``). Files are written atomically; returns the folder."""
    shapes = transformer.param_shapes(cfg)
    check_lora(lora, shapes)
    ranks = {a.shape[-1] for a, _ in factors(lora).values()}
    if ranks != {spec.rank}:
        raise LoraError(f"the LoRA tree has ranks {sorted(ranks)} but the spec says rank {spec.rank}")
    if partial:
        _check_partial(partial, shapes)
    config = {"r": spec.rank, "lora_alpha": spec.rank if spec.alpha is None else spec.alpha,
              "target_modules": sorted(_indexed_names(lora, cfg)), "init_lora_weights": "gaussian",
              "lora_dropout": 0.0}
    keymap = transformer.keymap(cfg)
    lora_format.write_lora(folder, lora, keymap, config)
    if partial:
        lora_format.write_partial(folder, partial, keymap)
    return os.fspath(folder)


def _check_partial(partial: Params, shapes: Params) -> None:
    flat = traverse_util.flatten_dict(shapes)
    bad = [f"{'/'.join(p)} {tuple(np.shape(v))}" for p, v in traverse_util.flatten_dict(partial).items()
           if p not in flat or tuple(np.shape(v)) != tuple(flat[p].shape)]
    if bad:
        raise LoraError(f"partial params that are not params of this model (or of another shape): {bad}")


def _indexed_names(lora: Params, cfg: TransformerConfig) -> list[str]:
    """The torch module names (with layer indices) a LoRA tree covers: PEFT's ``target_modules``."""
    keymap = transformer.keymap(cfg)
    names = []
    for path, (a, _) in factors(lora).items():
        layers = range(a.shape[0]) if path[0] in STACKED else [None]
        names += [keymap.to_torch((*path, "kernel"), layer).removesuffix(".weight") for layer in layers]
    return names


@dataclasses.dataclass(frozen=True)
class LoadedLora:
    """A LoRA read from a file: its spec, its tree, and the full params it replaces (or None)."""

    spec: LoraSpec
    lora: Params
    partial: Params | None


def load_lora(path: str | os.PathLike, cfg: TransformerConfig, dtype: Any = jnp.float32) -> LoadedLora:
    """Read a diffusers/PEFT LoRA (a folder with ``pytorch_lora_weights.safetensors``, or that file) for
    this model; a ``transformer_partial.safetensors`` (or the official ``transformer_partial.pth``) beside
    it is read too. Anything that does not fit the model is one :class:`LoraError` naming the first keys."""
    shapes = transformer.param_shapes(cfg)
    keymap = transformer.keymap(cfg)
    read = lora_format.read_lora(path, shapes, keymap, dtype)
    check_lora(read.lora, shapes)
    linear = {p for p in factors(read.lora) if _window_ndim(p, _module_kernels(shapes)[p]) == 0}
    all_linear = set(target_modules(LoraSpec(1), shapes))
    targets = "all-linear" if linear == all_linear else tuple(sorted(_dotted(p) for p in linear))
    present = set(factors(read.lora))
    spec = LoraSpec(
        rank=read.rank,
        alpha=read.alpha,
        targets=targets if linear else (),
        patch_embedding=(PATCH_EMBEDDING,) in present,
        history_patches=any(p[0] in HISTORY_PATCHES for p in present),
    )
    partial = lora_format.read_partial(path, shapes, keymap)
    return LoadedLora(spec, read.lora, partial)


def apply_loaded(params: Params, loaded: LoadedLora, strength: float = 1.0) -> Params:
    """Base params with a loaded LoRA fused (``spec.scale * strength``) and its partial params swapped in."""
    merged = merge_lora(params, loaded.lora, loaded.spec.scale * strength)
    if loaded.partial:
        flat = traverse_util.flatten_dict(merged)
        for p, leaf in traverse_util.flatten_dict(loaded.partial).items():
            flat[p] = jnp.asarray(leaf, flat[p].dtype)
        merged = traverse_util.unflatten_dict(flat)
    return merged
