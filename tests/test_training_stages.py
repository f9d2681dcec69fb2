"""training/stages: the registry's programs compare by value, so that a recipe prepared again in the same
process (a resume in a notebook, the tests) finds its compiled step programs and compiles nothing new."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
import training_fixtures as tf
from jax import monitoring

from helios_jax.models import transformer as dit
from helios_jax.training import configs, duel, recipes, stages, trainer
from helios_jax.training.stages import dmd

CONFIGS = configs.FOLDER  # the shipped official YAMLs
COMPILES = [0]
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: COMPILES.__setitem__(0, COMPILES[0] + (event == "/jax/core/compile/backend_compile_duration")))


def load(name: str) -> recipes.Recipe:
    return recipes.load(os.path.join(CONFIGS, f"{name}.yaml"))


def as_key(losses):
    return losses if callable(losses) else tuple(losses)


@pytest.mark.parametrize("name", ["stage_1_init", "stage_2_init", "stage_2_post", "stage_3_ode"])
def test_losses_of_a_recipe_built_twice_are_one_cache_key(name):
    recipe = load(name)
    first, again = (as_key(stages.make_losses(recipe, tf.stage_model())) for _ in range(2))
    assert first == again and hash(first) == hash(again)
    assert trainer.compiled_step(first, recipe.optimizer(), recipe.ema()) is \
        trainer.compiled_step(again, recipe.optimizer(), recipe.ema())


def test_duel_of_a_recipe_built_twice_is_one_cache_key():
    recipe = load("stage_3_post_gan_version")

    def build() -> duel.Duel:
        settings = recipe.dmd()
        nets = dmd.DmdNets(dit.HeliosTransformer(tf.CONFIG), jnp.bfloat16, 1.0, 1.0, settings.gan)
        return dmd.make_duel(recipe, nets, settings, export=trainer.bind(print), validate=object())  # hooks differ

    first, again = build(), build()
    assert first == again and hash(first) == hash(again)
    assert duel.compiled_duel_step(first, first.optimizer, True, 1) is duel.compiled_duel_step(again, again.optimizer,
                                                                                                True, 1)


@pytest.mark.slow  # two minutes on two shared cores: one stage-1 step compiled
def test_a_stage_prepared_again_compiles_nothing():
    """One step of stage 1 (the official YAML's loss over the tiny DiT), built twice as ``prepare`` builds it:
    the second build's step, state and key run on the programs the first compiled."""
    recipe = load("stage_1_init")
    trainable, frozen = tf.stage1_variables()
    latents = np.random.default_rng(0).standard_normal((1, 3, 16, 9, 4, 4)).astype(np.float32)
    prompts = np.random.default_rng(1).standard_normal((1, tf.TEXT_TOKENS, tf.CONFIG.text_dim)).astype(np.float32)
    batch = tf.dataset(latents, prompts, batch=1)[0]

    def one_step() -> int:
        before = COMPILES[0]
        stage = trainer.Stage(stages.make_losses(recipe, tf.stage_model(remat=False)), recipe.optimizer(),
                              export=trainer.bind(print), ema=recipe.ema())
        state, step_for = stage.setup(trainable, None)
        _, metrics = step_for(0)(state, frozen, batch, trainer.step_key(recipe.seed, 0))
        assert np.isfinite(float(metrics["loss"]))
        return COMPILES[0] - before

    assert one_step() > 0
    assert one_step() == 0
