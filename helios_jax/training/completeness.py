"""Whether a training checkpoint folder (``checkpoint-STEP/``) is complete: the one check that resume,
``generate --lora`` and ``convert --merge_lora`` make before they use one.

A checkpoint is committed as one unit: orbax writes its items (state, data position, ...) into a temporary
folder, the trainer's export item writes the LoRA files into that same folder and lists them in
``export/files.json``, and orbax renames the folder into place last. So a folder under the final name holds
everything, unless something removed or damaged it afterwards; that is what this module looks for, cheaply
(names, sizes and the safetensors headers; a damaged state shows when orbax restores it).

Nothing here imports orbax: the commands that only read a LoRA folder import this module too.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

import safetensors

from helios_jax.training.ema import EMA_FOLDER

CHECKPOINT_PREFIX = "checkpoint-"
UNFINISHED_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's temporary name for a checkpoint being written
COMMIT_FILE = "_CHECKPOINT_METADATA"  # orbax's step metadata: written into every committed checkpoint
PYTREE_METADATA = "_METADATA"  # written by orbax's pytree handler into each of its items
EXPORT_ITEM = "export"
MANIFEST = "files.json"  # in EXPORT_ITEM: the exported files, relative to the checkpoint folder


def is_training_checkpoint(folder: str) -> bool:
    """A folder this trainer wrote (or began to): orbax's temporary name, its commit file or the export item.
    A name alone does not tell: the official trainer's ``checkpoint-STEP`` folders hold a LoRA too."""
    name = os.path.basename(os.path.normpath(folder))
    return (re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+{re.escape(UNFINISHED_SUFFIX)}.*", name) is not None
            or os.path.isfile(os.path.join(folder, COMMIT_FILE)) or os.path.isdir(os.path.join(folder, EXPORT_ITEM)))


def incomplete(folder: str, pytree_items: Iterable[str] = ()) -> str | None:
    """Why the checkpoint ``folder`` is incomplete, in a few words, or None when it is complete:
    committed by orbax, every item in ``pytree_items`` with its metadata (the trainer names its state
    items; a reader of the LoRA alone names none), and every file the export manifest lists present and,
    for safetensors, readable."""
    if UNFINISHED_SUFFIX in os.path.basename(os.path.normpath(folder)):
        return "its write never finished (orbax's temporary folder)"
    if not os.path.isdir(folder):
        return "it is not a folder"
    if not os.listdir(folder):
        return "it is empty"
    if not os.path.isfile(os.path.join(folder, COMMIT_FILE)):
        return f"it has no {COMMIT_FILE} (orbax never committed it)"
    for item in pytree_items:
        if not os.path.isfile(os.path.join(folder, item, PYTREE_METADATA)):
            return f"{item}/{PYTREE_METADATA} is missing"
    manifest = os.path.join(folder, EXPORT_ITEM, MANIFEST)
    try:
        with open(manifest, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its list of exported files, {EXPORT_ITEM}/{MANIFEST}, is missing or unreadable ({type(err).__name__})"
    for name in files:
        problem = _file_problem(os.path.join(folder, name))
        if problem:
            return f"{name} {problem}"
    return None


def _file_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return "is missing"
    if path.endswith(".safetensors"):
        try:
            with safetensors.safe_open(path, "numpy"):
                pass
        except Exception as err:  # noqa: BLE001 - safetensors raises its own (untyped) error on a damaged file
            return f"is damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def lora_folder_problem(path: str) -> str | None:
    """Why the LoRA at ``path`` (a file, a folder, a training checkpoint or its ``model_ema/``) must not be used,
    or None. Only a training checkpoint is checked here; reading the files checks the rest."""
    folder = os.path.normpath(path)
    if os.path.isfile(folder):
        folder = os.path.dirname(folder)
    elif not os.path.isdir(folder):
        return None
    if os.path.basename(folder) == EMA_FOLDER and is_training_checkpoint(os.path.dirname(folder)):
        folder = os.path.dirname(folder)
    if not is_training_checkpoint(folder):
        return None
    reason = incomplete(folder)
    return None if reason is None else f"{path} is an incomplete training checkpoint: {reason}"
