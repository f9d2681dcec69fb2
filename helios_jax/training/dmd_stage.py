"""Deprecated name of :mod:`helios_jax.training.stages.dmd` (stage 3b); ``settings_from(recipe)`` is now
``recipe.dmd()``."""

import warnings

from helios_jax.training.distill import DmdSettings, GanSettings, TimestepDraw  # noqa: F401
from helios_jax.training.recipes import Recipe
from helios_jax.training.stages.dmd import *  # noqa: F401,F403


def settings_from(recipe: Recipe) -> DmdSettings:
    return recipe.dmd()


warnings.warn("helios_jax.training.dmd_stage is now helios_jax.training.stages.dmd", DeprecationWarning, stacklevel=2)
