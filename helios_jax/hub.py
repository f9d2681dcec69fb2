"""A checkpoint named by a local folder or by a Hugging Face hub id (``BestWishYsh/Helios-Distilled``).

Every place that names a checkpoint (``generate``, ``convert``, ``offload``, the training YAMLs,
``HeliosPipeline.from_pretrained``) calls :func:`resolve`, so an id works wherever a folder does. An id goes
through ``huggingface_hub.snapshot_download``, which owns the cache and its environment (``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``): a cached snapshot is used as it is, a missing one is
fetched, and only the files the port reads (:func:`allow_patterns`) are fetched, not the repositories' other
formats. Anything that fails is one :class:`HubError` line naming the id and, when the hub cannot be reached,
the exact ``helios-jax download`` command that fetches it.
"""

from __future__ import annotations

import os
from typing import Sequence

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from helios_jax.checkpoint import COMPONENTS

# The files the port reads in each component folder of a diffusers checkpoint (checkpoint.py, loading.py and
# tokenizer.py read nothing else); a folder not named here (a training YAML's subfolder) is read as a model.
MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")
FOLDER_FILES: dict[str, tuple[str, ...]] = {
    "transformer": MODEL_FILES,
    "vae": MODEL_FILES,
    "text_encoder": MODEL_FILES,
    "tokenizer": ("tokenizer.json", "tokenizer_config.json"),
    "scheduler": ("scheduler_config.json",),
}
MODEL_INDEX = "model_index.json"


class HubError(OSError):
    """A checkpoint name that is neither an existing path nor a hub id the cache or the hub can supply: the
    environment's doing (an OSError), reported in one line by the CLI."""


def allow_patterns(folders: Sequence[str] | None = None) -> list[str]:
    """The ``snapshot_download`` patterns of a whole checkpoint (None: ``model_index.json`` and every component)
    or of only these folders of it (e.g. a training run's ``transformer`` subfolder)."""
    if folders is None:
        return [MODEL_INDEX, *allow_patterns(COMPONENTS)]
    return [f"{folder}/{name}" for folder in folders for name in FOLDER_FILES.get(folder, MODEL_FILES)]


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub id, not a path: ``org/name`` in the hub's characters, not an existing path,
    nor one whose ``org`` part is an existing folder (then it is a path with a typo)."""
    if os.path.exists(name) or name.count("/") != 1 or name.startswith((".", "~", "/")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not os.path.isdir(name.split("/")[0])


def download_command(repo_id: str, revision: str | None = None) -> str:
    """The command line that fetches ``repo_id`` into the cache (online, whatever HF_HUB_OFFLINE says)."""
    offline = "HF_HUB_OFFLINE=0 " if constants.HF_HUB_OFFLINE else ""
    return f"{offline}helios-jax download {repo_id}" + (f" --revision {revision}" if revision else "")


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None, local_files_only: bool = False,
            folders: Sequence[str] | None = None) -> str:
    """The local folder of a checkpoint: an existing path as it is; a hub id (``org/name``) the snapshot of
    ``revision`` (a branch, tag or commit; default main) in the Hugging Face cache, fetched (only the files of
    :func:`allow_patterns` ``(folders)``) unless ``local_files_only`` or ``HF_HUB_OFFLINE`` is set."""
    name = os.fspath(name_or_path)
    if os.path.exists(name):
        if revision:
            raise HubError(f"revision {revision!r} is for a hub id, and {name} is a local path: drop the revision")
        return name
    if not is_hub_id(name):
        raise HubError(f"{name} does not exist (and is not a hub id of the form org/name)")
    return _snapshot(name, revision=revision, local_files_only=local_files_only,
                     allow_patterns=allow_patterns(folders))


def download(repo_id: str, *, revision: str | None = None, local_dir: str | None = None) -> str:
    """``helios-jax download``: fetch the files of a whole checkpoint that the port reads, into the cache (or
    ``local_dir``); returns the local folder."""
    if not is_hub_id(repo_id):
        raise HubError(f"{repo_id} is not a hub id of the form org/name"
                       + (" (it is a local path)" if os.path.exists(repo_id) else ""))
    return _snapshot(repo_id, revision=revision, local_files_only=False, allow_patterns=allow_patterns(),
                     local_dir=local_dir)


def _snapshot(repo_id: str, *, revision: str | None, local_files_only: bool, allow_patterns: list[str],
              local_dir: str | None = None) -> str:
    """``snapshot_download`` with its errors said in one line."""
    at = f" at revision {revision}" if revision else ""
    try:
        return snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns,
                                 local_files_only=local_files_only, local_dir=local_dir)
    except LocalEntryNotFoundError as err:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
               "local_files_only is set" if local_files_only else "the hub could not be reached")
        held = "holds only part of" if isinstance(err, IncompleteSnapshotError) else "does not hold"
        cache = local_dir or constants.HF_HUB_CACHE
        raise HubError(f"{repo_id}{at}: the Hugging Face cache ({cache}) {held} it and {why}; fetch it with "
                       f"`{download_command(repo_id, revision)}`") from None
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its terms at https://huggingface.co/{repo_id} and log in "
                       "(`hf auth login`, or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r} (a branch, tag or commit)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id} does not exist on the hub (or is private: log in with `hf auth login`, or set "
                       "HF_TOKEN)") from None
    except HfHubHTTPError as err:
        raise HubError(f"{repo_id}{at}: the hub answered {err}") from None
