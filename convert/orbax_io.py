"""Saving converted params with orbax and restoring them, optionally in another dtype.

Orbax writes into a temporary folder and renames it when complete, so an interrupted save never
leaves a checkpoint under the final name. A model's config travels beside the arrays as
``config.json`` so that a saved folder is self-describing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from typing import Any, Iterator, Mapping

import jax

from helios_jax.config import read_json
from helios_jax.convert.sources import CheckpointError
from helios_jax.convert.strict import DtypeFor, Params, cast_shapes
from helios_jax.diskspace import check_free, disk_full_as_error, orbax_failures_quiet, tree_nbytes

_PARAMS = "params"
_CONFIG = "config.json"


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def claim_staging(directory: str | os.PathLike) -> str:
    """The new staging folder ``directory.partial`` of a new ``directory``, after checking that neither exists
    (a stale staging folder is one a killed run left: it is named, never silently reused or removed)."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.lexists(directory):
        raise FileExistsError(f"{directory} already exists; choose a new folder or remove it first")
    parent = os.path.dirname(directory)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {directory}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {parent}")
    staging = directory + ".partial"
    if os.path.lexists(staging):
        raise FileExistsError(f"{staging} exists: a killed run left it (or one is still writing {directory}); "
                              f"remove it (rm -r {staging}) and run again")
    os.makedirs(staging)
    return staging


def remove_staging(staging: str) -> None:
    """Remove a staging folder after a failure; a folder that cannot be removed is reported, not hidden."""
    shutil.rmtree(staging, ignore_errors=True)
    if os.path.lexists(staging):
        print(f"could not remove {staging}: remove it by hand", file=sys.stderr)


def save_params(directory: str | os.PathLike, params: Params, config: Mapping[str, Any] | None = None) -> None:
    """Write ``params`` (and ``config``, if given) to a new folder ``directory``."""
    directory = os.path.abspath(os.fspath(directory))
    needed = tree_nbytes(params)
    check_free(directory, needed)
    staging = claim_staging(directory)
    checkpointer = _checkpointer()
    try:
        with orbax_failures_quiet(), disk_full_as_error(directory, needed):
            checkpointer.save(os.path.join(staging, _PARAMS), params)
            checkpointer.wait_until_finished()
        if config is not None:
            with open(os.path.join(staging, _CONFIG), "w", encoding="utf-8") as f:
                json.dump(dict(config), f, indent=2, sort_keys=True)
        os.rename(staging, directory)
    except BaseException:
        # Orbax writes from background threads: removing the folder under them would leave it behind.
        _settle(checkpointer)
        remove_staging(staging)
        raise
    finally:
        checkpointer.close()


def _settle(checkpointer) -> None:
    """Wait for an interrupted save's writer threads; their own failure is not the one to report."""
    try:
        checkpointer.wait_until_finished()
    except BaseException:  # noqa: BLE001 - the original exception is re-raised by the caller
        pass


def saved_shapes(directory: str | os.PathLike) -> Params:
    """The shape tree (``jax.ShapeDtypeStruct`` leaves) of saved params, read from metadata only."""
    path = os.path.join(os.path.abspath(os.fspath(directory)), _PARAMS)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no saved params in {directory}: expected a folder written by save_params")
    with _damaged_as_error(directory):
        tree = _checkpointer().metadata(path).item_metadata.tree
        return jax.tree.map(lambda meta: jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype), tree)


def restore_params(directory: str | os.PathLike, dtype_for: DtypeFor | None = None,
                   shardings: Params | None = None) -> Params:
    """Read params saved by :func:`save_params`; ``dtype_for`` (see ``dtype_policy``) casts on the way in;
    ``shardings`` (a tree like the saved one) restores every leaf split across devices as it is read."""
    shapes = saved_shapes(directory)
    target = shapes if dtype_for is None else cast_shapes(shapes, dtype_for)
    if shardings is not None:
        target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target, shardings)
    path = os.path.join(os.path.abspath(os.fspath(directory)), _PARAMS)
    with _damaged_as_error(directory):
        return _checkpointer().restore(path, target)


@contextlib.contextmanager
def _damaged_as_error(directory: str | os.PathLike) -> Iterator[None]:
    """A damaged params folder (truncated or missing array files, broken metadata) as one CheckpointError:
    orbax and tensorstore report it as OUT_OF_RANGE, FAILED_PRECONDITION, NOT_FOUND or an AttributeError deep
    inside. The device running out of memory is not damage, and goes on unchanged."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - what orbax raises for a damaged folder has no common type
        if "RESOURCE_EXHAUSTED" in str(err):
            raise
        raise CheckpointError(f"{directory}: its orbax params cannot be read, the folder is damaged or incomplete "
                              f"({_first_reason(err)}); convert it again") from err


def _first_reason(err: BaseException) -> str:
    """The most telling line of a read failure: tensorstore's status (``OUT_OF_RANGE: ...``) from anywhere in the
    chain of causes, else the error's own first line."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for link in chain:
        text = str(link).strip()
        if re.match(r"[A-Z_]{5,}: ", text):
            return text.splitlines()[0][:300]
    text = str(chain[0]).strip()
    return f"{type(chain[0]).__name__}: {text.splitlines()[0][:200]}" if text else type(chain[0]).__name__


def is_saved_params(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` was written by :func:`save_params` (rather than being a diffusers folder)."""
    return os.path.isdir(os.path.join(os.fspath(directory), _PARAMS))


def saved_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The config saved beside the params, if any."""
    path = os.path.join(os.fspath(directory), _CONFIG)
    if not os.path.isfile(path):
        return None
    return read_json(path, "config.json of saved params")
