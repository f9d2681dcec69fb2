"""Stage 1 (``stage_1_init.yaml``, ``stage_1_post.yaml``): flow matching of one chunk on its history.

The history context dropped and corrupted (``samples.prepare_context``), one flow-matching example per
sample (``losses.stage1_example``: logit-normal timesteps), the mean squared velocity error. The trained
set is the LoRA plus the full history patch convs (``Recipe.lora``); the validation sampler is the
official stage-1 one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from helios_jax.config import TransformerConfig
from helios_jax.sampling.schedule import HeliosSchedulerConfig
from helios_jax.training import losses, parts, trainer
from helios_jax.training.recipes import Recipe
from helios_jax.training.samples import ContextConfig

STAGE = "stage1"
VALIDATION_SHIFT = 3.0  # the official stage-1 validation sampler: UniPC with flow_shift 3 (scheduler_config.json)


def stage1_loss(net: parts.StageModel, context: ContextConfig, sampling: losses.TimestepSampling,
                trainable: Any, frozen: Any, batch: parts.Batch, key: jax.Array) -> tuple[jax.Array, dict]:
    """Stage 1's ``trainer.LossFn`` (bind the first three arguments: :func:`stage_losses`)."""
    k_context, k_example = jax.random.split(key)
    example = losses.stage1_example(k_example, batch["target"], sampling)
    loss = losses.example_loss(net, net.variables(trainable, frozen), example,
                               parts.conditioning(batch, k_context, context, net.dtype), net.dtype)
    return loss, {"sigma": jnp.mean(example.sigma)}


def stage_losses(recipe: Recipe, net: parts.StageModel) -> trainer.Bound:
    """The recipe's loss over ``net``, comparing by value (a second ``prepare`` finds its compiled step)."""
    return trainer.bind(stage1_loss, net, recipe.context(), recipe.timestep_sampling())


def validation_scheduler(recipe: Recipe) -> HeliosSchedulerConfig:
    """UniPC with flow_shift 3, which dynamic shifting replaces."""
    v = recipe.validation()
    shift = 1.0 if v.use_dynamic_shifting else VALIDATION_SHIFT
    return HeliosSchedulerConfig(shift=shift, stages=1, stage_range=(0.0, 1.0),
                                 use_dynamic_shifting=v.use_dynamic_shifting, time_shift_type=v.time_shift_type)


def _check(dataset: Any, config: TransformerConfig) -> None:
    parts.check_buckets(dataset, config, STAGE, pyramid=False)


def prepare(recipe: Recipe, *, progress: bool | None = None, validate: bool = True,
            num_threads: int = 2) -> parts.Prepared:
    """Stage 1's run: the offloaded short latents, the DiT (or stage 1-init's Wan 2.1 folder) with a fresh LoRA."""
    return parts.prepare_one_player(
        recipe, dataset=lambda r, mesh: parts.offloaded_dataset(r.data(), mesh), check=_check,
        losses=stage_losses, scheduler=validation_scheduler, call=parts.validation_call(recipe, pyramid=False),
        pyramid=False, progress=progress, validate=validate, num_threads=num_threads)
