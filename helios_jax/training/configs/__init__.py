"""The official training YAMLs, shipped in the package (package data), so that ``helios-jax train
stage_1_init`` runs from any installed copy, not only from a checkout.

The files are the released ``scripts/training/configs/*.yaml`` of PKU-YuanGroup/Helios, verbatim: the one
source of every per-stage number (docs/training.md §11). ``correct.yaml`` is the official overlay that goes
after a stage file (``stage_1_init correct``); alone it is not a runnable config.
"""

from __future__ import annotations

import os

FOLDER = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The shipped configs' names, without ``.yaml``, sorted."""
    return sorted(f[: -len(".yaml")] for f in os.listdir(FOLDER) if f.endswith(".yaml"))


def find(name_or_path: str | os.PathLike) -> str:
    """``name_or_path`` when it is an existing path, else the shipped YAML of that bare name (``stage_1_init``
    or ``stage_1_init.yaml``). A path to a user's own file always wins over a shipped name."""
    path = os.fspath(name_or_path)
    if os.path.exists(path) or os.sep in path or (os.altsep and os.altsep in path):
        return path  # a path is the user's file: it is read (or refused as missing) as given
    name = path[: -len(".yaml")] if path.endswith(".yaml") else path
    return os.path.join(FOLDER, f"{name}.yaml") if name in names() else path
