"""Stage 3a (``stage_3_ode.yaml``): ODE regression of the pyramid student on a teacher's recorded ODE pairs.

One more loss of the one-player step (``ode.ode_regression_loss``) with the EMA of the trainables
(``use_ema``), on the ODE-pair files of ``ode_data_root`` (``ode.ODEPairDataset``); the validation runs the
student's sampler, DMD with 2/2/2 steps on the training pyramid, the first chunk amplified.
"""

from __future__ import annotations

from typing import Any

import jax

from helios_jax.config import TransformerConfig
from helios_jax.sampling.schedule import HeliosDMDSchedulerConfig
from helios_jax.training import ode, parts, trainer
from helios_jax.training.recipes import Recipe


def stage_losses(recipe: Recipe, net: parts.StageModel) -> trainer.Bound:
    """The ODE-regression loss over ``net``, comparing by value."""
    return trainer.bind(ode.ode_regression_loss, net, recipe.ode(net.model.config.patch_size))


def validation_scheduler(recipe: Recipe) -> HeliosDMDSchedulerConfig:
    """The student's sampler: DMD on the training pyramid of the ``stage2_*`` keys."""
    v = recipe.validation()
    pyramid = recipe.pyramid_scheduler()
    return HeliosDMDSchedulerConfig(shift=pyramid.shift, stages=pyramid.stages, stage_range=pyramid.stage_range,
                                    gamma=pyramid.gamma, use_dynamic_shifting=v.use_dynamic_shifting,
                                    time_shift_type=v.time_shift_type)


def _dataset(recipe: Recipe, mesh: jax.sharding.Mesh | None) -> ode.ODEPairDataset:
    data = recipe.data()
    return ode.ODEPairDataset(data.roots, batch_size=data.batch_size * parts.batch_shards_per_process(mesh),
                              seed=data.seed, process_index=jax.process_index(), process_count=jax.process_count(),
                              shuffle=data.shuffle)


def prepare(recipe: Recipe, *, progress: bool | None = None, validate: bool = True,
            num_threads: int = 2) -> parts.Prepared:
    """Stage 3a's run: the ODE pairs checked against the DiT and the recipe, then the weights."""

    def check(dataset: Any, config: TransformerConfig) -> None:
        ode.check_pairs(dataset, config, recipe.ode(config.patch_size))

    return parts.prepare_one_player(
        recipe, dataset=_dataset, check=check, losses=stage_losses, scheduler=validation_scheduler,
        call=parts.validation_call(recipe, pyramid=True, is_amplify_first_chunk=True), pyramid=True, distilled=True,
        progress=progress, validate=validate, num_threads=num_threads)
