"""Checkpoint folders converted between formats: a diffusers folder (or one component of it) to orbax params and
back, optionally with a LoRA fused into the transformer or the transformer quantized to FP8. ``helios-jax convert``
is this module behind the command line.
"""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp

from helios_jax import hub
from helios_jax.checkpoint import COMPONENTS as PIPELINE_FOLDERS, PipelineError, PipelineSpec
from helios_jax.convert import export_safetensors, save_params
from helios_jax.convert.orbax_io import claim_staging, remove_staging
from helios_jax.loading import COMPONENTS, DTYPES, check_lora_base, check_quantize, component_of, holds_fp8
from helios_jax.models import fp8
from helios_jax.models.lora import apply_loaded, load_lora
from helios_jax.training.completeness import lora_folder_problem


def convert_checkpoint(source: str, destination: str, to: str, dtype: str | None, merge_lora: str | None = None,
                       revision: str | None = None) -> str:
    """A component folder, or a whole pipeline folder (or hub id, at ``revision``), to orbax params or back to
    diffusers safetensors; ``merge_lora`` fuses a LoRA folder into the transformer (as the official merge tool
    does). Returns what was written, in words. Every check runs before the first weight is read; the destination
    appears complete or not at all (a staging folder, renamed), and never replaces anything."""
    quantize = dtype if dtype in fp8.STORAGES else None
    jax_dtype = DTYPES[dtype] if dtype and not quantize else None
    if os.path.lexists(destination):
        raise FileExistsError(f"{os.path.abspath(destination)} already exists; choose a new folder or remove it first")
    source = hub.resolve(source, revision=revision)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source} is not a folder: give a checkpoint folder or one of its components")
    pipeline = os.path.isfile(os.path.join(source, "model_index.json"))
    transformer_folder = os.path.join(source, "transformer") if pipeline else source
    stored_fp8 = holds_fp8(transformer_folder)
    if (quantize or stored_fp8) and to != "orbax":
        what = f"--dtype {quantize} writes" if quantize else f"{transformer_folder} holds fp8 weights, which convert to"
        raise PipelineError(f"{what} orbax params only (diffusers has no fp8 Helios format): drop --to safetensors"
                            + ("" if quantize else ", or export the 16-bit checkpoint it was converted from"))
    if merge_lora:
        check_lora_base(transformer_folder)
    if quantize:
        component = "transformer" if pipeline else component_of(source).folder
        check_quantize(component, quantize, COMPONENTS[component].read_config(transformer_folder))
    lora = _read_lora(transformer_folder, merge_lora) if merge_lora else None
    if pipeline:
        PipelineSpec.read(source)
        staging = claim_staging(destination)
        try:
            for name in PIPELINE_FOLDERS:
                src = os.path.join(source, name)
                if name in COMPONENTS:
                    # fp8 is the transformer's; the other components keep their stored dtype.
                    component_quantize = quantize if name == "transformer" else None
                    _convert_component(src, os.path.join(staging, name), to, jax_dtype, lora, component_quantize)
                else:
                    shutil.copytree(src, os.path.join(staging, name))
            shutil.copy(os.path.join(source, "model_index.json"), staging)
            os.rename(staging, destination)
        except BaseException:
            remove_staging(staging)
            raise
    else:
        _convert_component(source, destination, to, jax_dtype, lora, quantize)
    return f"{destination} ({to}{', LoRA fused' if lora else ''}{f', {quantize} transformer' if quantize else ''})"


def _read_lora(transformer_folder: str, path: str):
    """The LoRA checked against the transformer's config, before any weight is read."""
    if component_of(transformer_folder).folder != "transformer":
        raise PipelineError(f"--merge_lora needs a transformer (or whole checkpoint) folder; "
                            f"{transformer_folder} is not one")
    if problem := lora_folder_problem(path):
        raise PipelineError(f"--merge_lora {problem}: give a complete checkpoint-STEP of the run")
    return load_lora(path, COMPONENTS["transformer"].read_config(transformer_folder))


def _convert_component(source: str, destination: str, to: str, dtype, lora=None, quantize: str | None = None) -> None:
    component = component_of(source)
    fuse = lora is not None and component.folder == "transformer"
    # fp8 rest-of-model leaves in bf16; a LoRA is fused into the 16-bit kernels before they are quantized.
    config, params = component.load(source, jnp.bfloat16 if quantize else dtype,
                                    quantize=None if fuse else quantize)
    if fuse:
        params = apply_loaded(params, lora)
        if quantize:
            params = fp8.quantize_params(params, quantize == fp8.FP8_EDGES)
    if to == "orbax":
        save_params(destination, params, config=component.config_json(config))
    else:
        export_safetensors(destination, params, component.module.keymap(config), component.config_json(config),
                           weights_name=component.weights_name)
