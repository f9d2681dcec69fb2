"""The official stages, one module each, named by what it trains, and the one registry of them.

=====================  ===================================  ==========================================
``Recipe.stage``       module                               the official YAMLs
=====================  ===================================  ==========================================
``stage1``             :mod:`.flow_matching`                ``stage_1_init.yaml``, ``stage_1_post.yaml``
``stage2_packed``      :mod:`.pyramid` (packed)             ``stage_2_init.yaml`` (``is_navit_pyramid``)
``stage2_sequential``  :mod:`.pyramid` (sequential)         ``stage_2_post.yaml``
``stage3_ode``         :mod:`.ode_regression`               ``stage_3_ode.yaml`` (stage 3a)
``stage3_dmd``         :mod:`.dmd`                          ``stage_3_post*.yaml`` (stage 3b)
=====================  ===================================  ==========================================

The rule of the folder: a stage module builds a run from a checked recipe (its typed configs) and the
shared pieces of :mod:`helios_jax.training.parts`; no stage module imports another. A one-player stage
(a loss plus a config) gives ``trainer.Stage``, the two-player stage ``duel.Duel``: both are a
``trainer.StepProgram``, so the loop knows neither.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

from helios_jax.training import recipes, trainer
from helios_jax.training.losses import PyramidSettings
from helios_jax.training.parts import DTYPES, Prepared, StageModel, export_lora
from helios_jax.training.recipes import Recipe
from helios_jax.training.stages import dmd, flow_matching, ode_regression, pyramid
from helios_jax.training.stages.flow_matching import stage1_loss
from helios_jax.training.stages.pyramid import pyramid_loss

__all__ = ["STAGES", "Builder", "DTYPES", "Prepared", "PyramidSettings", "StageModel", "export_lora",
           "make_losses", "prepare", "pyramid_loss", "stage1_loss", "train"]


@dataclasses.dataclass(frozen=True)
class Builder:
    """How a stage is built: ``prepare(recipe, *, progress, validate, num_threads) -> Prepared``, and for a
    one-player stage its ``losses(recipe, net)`` alone (what experiments/train_plan.py compiles)."""

    prepare: Callable[..., Prepared]
    losses: Callable[[Recipe, StageModel], Any] | None = None


STAGES: dict[str, Builder] = {
    "stage1": Builder(flow_matching.prepare, flow_matching.stage_losses),
    "stage2_packed": Builder(functools.partial(pyramid.prepare, packed=True),
                             functools.partial(pyramid.stage_losses, packed=True)),
    "stage2_sequential": Builder(functools.partial(pyramid.prepare, packed=False),
                                 functools.partial(pyramid.stage_losses, packed=False)),
    "stage3_ode": Builder(ode_regression.prepare, ode_regression.stage_losses),
    "stage3_dmd": Builder(dmd.prepare),
}


def make_losses(recipe: Recipe, net: StageModel) -> trainer.LossFn | tuple[trainer.LossFn, ...]:
    """The loss term(s) of a one-player recipe's stage over ``net`` (comparing by value)."""
    losses = STAGES[recipe.stage].losses
    if losses is None:
        raise ValueError(f"{recipe.stage} has two players (training.duel), not loss terms")
    return losses(recipe, net)


def prepare(recipe: Recipe, *, progress: bool | None = None, validate: bool = True, num_threads: int = 2) -> Prepared:
    """The model, data, step program and hooks of a recipe, all checked before the first weight is read
    (``validate=False`` skips the validation videos)."""
    return STAGES[recipe.stage].prepare(recipe, progress=progress, validate=validate, num_threads=num_threads)


def train(paths: str | Sequence[str], overrides: Sequence[str] = (), *, progress: bool | None = None) -> Any:
    """``helios-jax train``'s whole job from Python: read and check the YAMLs, prepare, train."""
    return prepare(recipes.load(paths, overrides), progress=progress).train()
