"""Stage 2 (``stage_2_init.yaml``, ``stage_2_post.yaml``): the pyramid objective.

The same context as stage 1, shared by every pyramid stage at full resolution; the examples of
``losses.pyramid_examples`` at the YAML's ``stage2_sample_ratios``. Stage 2-post ("sequential") is one
loss term per example (the trainer runs one forward and backward each and sums the gradients); stage
2-init ("packed", ``is_navit_pyramid``) one term, the mean of the examples' losses from ONE forward of the
packed DiT (``models.packed``: the segments side by side, block-diagonal attention).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from helios_jax.config import ConfigError, TransformerConfig
from helios_jax.sampling.schedule import HeliosSchedulerConfig
from helios_jax.training import losses, parts, trainer
from helios_jax.training.recipes import Recipe
from helios_jax.training.samples import ContextConfig


def pyramid_loss(net: parts.StageModel, context: ContextConfig, pyramid: losses.PyramidSettings, which: int | None,
                 trainable: Any, frozen: Any, batch: parts.Batch, key: jax.Array) -> tuple[jax.Array, dict]:
    """Example ``which`` of the pyramid (a sequential term), or the mean over all in one packed forward
    (``None``). Every term of one step gets the same key, so all see the same context and noise pyramid."""
    k_context, k_example = jax.random.split(key)
    examples = losses.pyramid_examples(k_example, batch["target"], pyramid.schedule, pyramid.sample_ratios,
                                       pyramid.sampling)
    cond = parts.conditioning(batch, k_context, context, net.dtype)
    variables = net.variables(trainable, frozen)
    if which is not None:
        example = examples[which]
        return (losses.example_loss(net, variables, example, cond, net.dtype),
                {"sigma": jnp.mean(example.sigma), "stage": jnp.asarray(example.stage, jnp.float32)})
    return losses.packed_pyramid_loss(net.packed, variables, examples, cond, net.dtype), {}


def stage_losses(recipe: Recipe, net: parts.StageModel, *, packed: bool) -> trainer.Bound | tuple[trainer.Bound, ...]:
    """The packed loss, or one term per pyramid example, comparing by value."""
    context, pyramid = recipe.context(), recipe.pyramid()
    if packed:
        return trainer.bind(pyramid_loss, net, context, pyramid, None)
    return tuple(trainer.bind(pyramid_loss, net, context, pyramid, i) for i in range(sum(pyramid.sample_ratios)))


def validation_scheduler(recipe: Recipe) -> HeliosSchedulerConfig:
    """The training pyramid scheduler of the YAML's ``stage2_*`` keys."""
    v = recipe.validation()
    return recipe.pyramid_scheduler(use_dynamic_shifting=v.use_dynamic_shifting, time_shift_type=v.time_shift_type)


def prepare(recipe: Recipe, *, packed: bool, progress: bool | None = None, validate: bool = True,
            num_threads: int = 2) -> parts.Prepared:
    """Stage 2's run (``packed``: stage 2-init's NaViT forward) on the offloaded short latents."""
    name = "stage2_packed" if packed else "stage2_sequential"

    def check(dataset: Any, config: TransformerConfig) -> None:
        parts.check_buckets(dataset, config, name, pyramid=True)
        if packed and config.is_amplify_history:
            raise ConfigError(f"{recipe.model().transformer}: is_amplify_history is on, which the packed stage-2 "
                              "forward does not run (no official model has it); set "
                              "training_config.is_navit_pyramid=false (the sequential variant)")

    return parts.prepare_one_player(
        recipe, dataset=lambda r, mesh: parts.offloaded_dataset(r.data(), mesh), check=check,
        losses=lambda r, net: stage_losses(r, net, packed=packed), scheduler=validation_scheduler,
        call=parts.validation_call(recipe, pyramid=True), pyramid=True, progress=progress, validate=validate,
        num_threads=num_threads)
