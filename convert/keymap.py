"""How the keys of a PyTorch state dict name the leaves of a flax params tree, both ways.

One rule serves every model in this package:

* dotted components become tree levels, and a list index joins its parent with ``_``
  (``ffn.net.0.proj`` -> ``ffn/net_0/proj``), which is how flax names list submodules;
* a prefix of repeated layers (``blocks.{i}``) that the flax model runs under ``nn.scan`` becomes
  one tree level whose leaves carry a leading layer axis;
* ``weight`` becomes the flax leaf that the target module has (``kernel``, ``scale`` or
  ``embedding``); a ``kernel`` is stored transposed to flax's layout, (in, out) for a linear layer and
  (*window, in, out) for a convolution. Every other leaf keeps its name and its shape.

Names that contain ``_<digits>`` in the reference itself (``linear_1``) are listed as literals so that
the way back, from a flax path to a torch key, is unambiguous.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

WEIGHT_LEAVES = ("kernel", "scale", "embedding")
_INDEXED = re.compile(r"^(.*)_(\d+)$")

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """The model-specific part of the mapping.

    stacked: ``(torch prefix, layer count)`` pairs of repeated layers that live on a leading axis.
    ignore: key components the reference itself skips on load (``norm_added_q``).
    literal: flax components whose ``_<digits>`` is part of the reference's name, not a list index.
    tied: ``(key, alias)`` pairs naming one tied tensor that a checkpoint may store under either name or
        both (``save_pretrained`` writes tied weights once). ``key`` names the param and fills it when
        stored; otherwise ``alias`` fills it. A stored alias beside its key is only checked for its shape.
    renamed: ``(torch key, key as the flax tree names it)`` pairs for the odd tensor that lives in one
        layer of a stacked prefix but belongs to the whole stack (T5's first-layer relative bias).
    """

    stacked: tuple[tuple[str, int], ...] = ()
    ignore: tuple[str, ...] = ()
    literal: tuple[str, ...] = ()
    tied: tuple[tuple[str, str], ...] = ()
    renamed: tuple[tuple[str, str], ...] = ()

    def ignored(self, key: str) -> bool:
        return any(part in self.ignore for part in key.split("."))

    def to_flax(self, key: str) -> tuple[Path, int | None]:
        """``blocks.3.attn1.to_out.0.weight`` -> (``("blocks","attn1","to_out_0","weight")``, 3).

        The leaf is still the torch leaf name; :func:`resolve_leaf` picks the flax one.
        """
        parts = dict(self.renamed).get(key, key).split(".")
        layer = None
        for prefix, count in self.stacked:
            head = prefix.split(".")
            if parts[: len(head)] == head and len(parts) > len(head) and parts[len(head)].isdigit():
                layer = int(parts[len(head)])
                parts = head + parts[len(head) + 1 :]
                break
        path: list[str] = []
        for part in parts:
            if part.isdigit() and path:
                path[-1] = f"{path[-1]}_{part}"
            else:
                path.append(part)
        return tuple(path), layer

    def to_torch(self, path: Path, layer: int | None) -> str:
        """The inverse of :meth:`to_flax` for a resolved flax leaf path."""
        parts: list[str] = []
        for part in path[:-1]:
            match = _INDEXED.match(part)
            if match and part not in self.literal:
                parts.extend(match.groups())
            else:
                parts.append(part)
        leaf = path[-1]
        parts.append("weight" if leaf in WEIGHT_LEAVES else leaf)
        if layer is not None:
            for prefix, _ in self.stacked:
                head = prefix.split(".")
                if parts[: len(head)] == head:
                    parts.insert(len(head), str(layer))
                    break
            else:
                raise KeyError(f"{'/'.join(path)} has a layer index but no stacked prefix matches it")
        key = ".".join(parts)
        return {flax: torch for torch, flax in self.renamed}.get(key, key)

    def layer_count(self, path: Path) -> int | None:
        """The number of stacked layers under ``path``, or None when it is not stacked."""
        for prefix, count in self.stacked:
            head = tuple(prefix.split("."))
            if path[: len(head)] == head:
                return count
        return None


def resolve_leaf(module_leaves: set[str], torch_leaf: str) -> str | None:
    """The flax leaf name for a torch leaf, given the leaf names of the target module."""
    candidates = (*WEIGHT_LEAVES, "weight") if torch_leaf == "weight" else (torch_leaf,)
    found = [name for name in candidates if name in module_leaves]
    return found[0] if len(found) == 1 else None


def to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """A torch tensor in the layout of the flax leaf (a transposed view for kernels)."""
    if leaf == "kernel" and array.ndim >= 2:
        return np.transpose(array, (*range(2, array.ndim), 1, 0))
    return array


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_flax_layout`."""
    if leaf == "kernel" and array.ndim >= 2:
        nd = array.ndim
        return np.transpose(array, (nd - 1, nd - 2, *range(nd - 2)))
    return array


def flax_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape :func:`to_flax_layout` gives, computed from a header without reading data."""
    if leaf == "kernel" and len(shape) >= 2:
        return (*shape[2:], shape[1], shape[0])
    return tuple(shape)
