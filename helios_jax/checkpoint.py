"""Every config of a Helios checkpoint folder, read and validated before the first weight is read.

A diffusers Helios folder holds ``model_index.json`` and six components. Loading 27 GB of weights
to find that the scheduler config is wrong wastes minutes, so :func:`read_checkpoint_configs` reads
and checks them all first (in well under a second; the tokenizer file is the only large one, and it
is read last): the pipeline and the CLI call it before loading anything. The rules are the config
policy of ``helios_jax.config``: unknown keys warned once per file, known no-op keys silent, values
this port cannot run one ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from helios_jax.config import ConfigError, TransformerConfig, UMT5Config, VAEConfig, read_json, warn_unknown
from helios_jax.loading import COMPONENTS as MODEL_COMPONENTS
from helios_jax.sampling import SchedulerConfig, read_scheduler_config
from helios_jax.tokenizer import TOKENIZER_CLASSES, PromptTokenizer

PIPELINE_CLASSES = ("HeliosPipeline", "HeliosPyramidPipeline")
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# The classes model_index.json may name for each component (the reference loads them by these names).
COMPONENT_CLASSES: dict[str, tuple[str, ...]] = {
    "transformer": ("HeliosTransformer3DModel",),
    "vae": ("AutoencoderKLWan",),
    "text_encoder": ("UMT5EncoderModel", "T5EncoderModel"),
    "tokenizer": (*TOKENIZER_CLASSES, "AutoTokenizer"),
    "scheduler": ("HeliosScheduler", "HeliosDMDScheduler"),
}
_FLAGS = ("is_distilled", "is_cfg_zero_star")


class PipelineError(ValueError):
    """Arguments or a checkpoint folder the pipeline cannot run with; raised before any compute."""


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """What ``model_index.json`` says: which reference pipeline this checkpoint is run by."""

    pyramid: bool
    is_distilled: bool = False
    is_cfg_zero_star: bool = False

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "PipelineSpec":
        """``model_index.json`` of ``folder``, checked: pipeline class, component classes, flags, folders."""
        folder = os.fspath(folder)
        path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(path):
            raise PipelineError(f"{folder} is not a Helios checkpoint folder: it has no model_index.json")
        index = read_json(path, "model_index.json")
        name = index.get("_class_name")
        if name not in PIPELINE_CLASSES:
            raise PipelineError(f"{path}: _class_name {name!r} is not one of {PIPELINE_CLASSES}")
        for component, classes in COMPONENT_CLASSES.items():
            entry = index.get(component)
            if entry is None:
                continue  # a folder of the component is still required below, as diffusers loads by folder too
            if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in classes):
                raise ConfigError(
                    f"{path}: {component} = {entry!r} is not supported: this port runs {component} as one of "
                    f"{list(classes)} (written [library, class]); use a Helios checkpoint's model_index.json"
                )
        for flag in _FLAGS:
            if not isinstance(index.get(flag, False), bool):
                raise ConfigError(f"{path}: {flag} = {index[flag]!r} must be true or false")
        warn_unknown(path, name, [k for k in index if not k.startswith("_") and k not in (*COMPONENT_CLASSES, *_FLAGS)],
                     (*COMPONENT_CLASSES, *_FLAGS))
        missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(folder, c))]
        if missing:
            raise PipelineError(f"{folder} lacks the component folder(s) {missing}; download the complete checkpoint")
        return cls(
            pyramid=name == "HeliosPyramidPipeline",
            is_distilled=index.get("is_distilled", False),
            is_cfg_zero_star=index.get("is_cfg_zero_star", False),
        )


@dataclasses.dataclass(frozen=True)
class CheckpointConfigs:
    """The validated configs of one checkpoint folder (and its tokenizer, which is config only)."""

    folder: str
    spec: PipelineSpec
    scheduler: SchedulerConfig
    transformer: TransformerConfig
    vae: VAEConfig
    text_encoder: UMT5Config
    tokenizer: PromptTokenizer


def check_spec_matches_scheduler(spec: PipelineSpec, scheduler: SchedulerConfig, origin: str) -> None:
    """The pipeline class and the scheduler must describe the same sampler (the reference mixes them silently)."""
    single = scheduler.stages == 1 and scheduler.scheduler_type != "dmd"
    if spec.pyramid == single:
        kind = "HeliosPyramidPipeline" if spec.pyramid else "HeliosPipeline"
        raise PipelineError(
            f"{origin}: {kind} with a scheduler of {scheduler.stages} stage(s) of type {scheduler.scheduler_type!r}: "
            "the pyramid pipeline needs the multi-stage scheduler and HeliosPipeline the single-stage one"
        )
    if spec.pyramid and spec.is_distilled != (scheduler.scheduler_type == "dmd"):
        raise ConfigError(
            f"{origin}: is_distilled = {str(spec.is_distilled).lower()} with scheduler_type "
            f"{scheduler.scheduler_type!r}: the distilled model samples with DMD and the others do not, so set "
            "is_distilled true exactly when the scheduler is HeliosDMDScheduler"
        )


def read_checkpoint_configs(folder: str | os.PathLike) -> CheckpointConfigs:
    """Read and validate every config of a Helios checkpoint folder; no weight is read.

    Order: model_index, scheduler, transformer, VAE, text encoder, then the tokenizer (the one large file).
    """
    folder = os.fspath(folder)
    spec = PipelineSpec.read(folder)
    scheduler = read_scheduler_config(os.path.join(folder, "scheduler"))
    check_spec_matches_scheduler(spec, scheduler, os.path.join(folder, "model_index.json"))
    models: dict[str, Any] = {
        name: MODEL_COMPONENTS[name].read_config(os.path.join(folder, name))
        for name in ("transformer", "vae", "text_encoder")
    }
    if models["transformer"].in_channels != models["vae"].z_dim:
        raise ConfigError(
            f"{folder}: the transformer takes {models['transformer'].in_channels} latent channels (in_channels) but "
            f"the VAE makes {models['vae'].z_dim} (z_dim): these components come from different models"
        )
    if models["transformer"].text_dim != models["text_encoder"].d_model:
        raise ConfigError(
            f"{folder}: the transformer reads text features of {models['transformer'].text_dim} (text_dim) but the "
            f"text encoder makes {models['text_encoder'].d_model} (d_model): these components come from different models"
        )
    tokenizer = PromptTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    return CheckpointConfigs(folder, spec, scheduler, tokenizer=tokenizer, **models)
