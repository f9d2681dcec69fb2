"""The trainer's two-player loop (training.duel) on toy losses: the update schedule, the EMA's closed form
over its warm-up in the real loop, separate optimizer states, and a bit-identical resume. Fast (seconds)."""

from __future__ import annotations

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helios_jax.training import trainer
from helios_jax.training.duel import Duel, DuelState
from helios_jax.training.ema import EMA_FOLDER, EmaConfig

RATIO, EMA_START, DECAY = 3, 4, 0.9


def generator_loss(own, other, frozen, batch, key, step, phase):
    """The generator chases the critic's point, plus a keyed jitter so the key matters."""
    jitter = 0.01 * jax.random.normal(key, own["w"].shape)
    loss = jnp.sum((own["w"] - other["c"] - jitter) ** 2) * frozen["scale"]
    return loss, {"phase": jnp.asarray(phase, jnp.float32)}


def critic_loss(own, other, frozen, batch, key, step, phase):
    """The critic chases the (updated) generator times the batch value."""
    loss = jnp.sum((own["c"] - batch["x"].mean() * other["w"]) ** 2)
    return loss, {"step": step.astype(jnp.float32)}


def duel(phase_steps=(), export=None) -> Duel:
    return Duel(generator_loss, critic_loss, trainer.OptimizerConfig(learning_rate=0.05, adam_beta1=0.0),
                gen_update_ratio=RATIO, ema=EmaConfig(DECAY, EMA_START), phase_steps=phase_steps,
                optimizer=trainer.OptimizerConfig(learning_rate=0.1, adam_beta1=0.0), export=export)


def data():
    source = [{"x": np.full((2,), 1.0 + 0.1 * i, np.float32)} for i in range(50)]
    return iter(grain.MapDataset.source(source).batch(1).to_iter_dataset())


TRAINABLE = {"generator": {"w": np.arange(4, dtype=np.float32)}, "critic": {"c": -np.ones(4, np.float32)}}
FROZEN = {"scale": jnp.float32(1.0)}


def run(tmp_path, name, steps, **kw):
    return trainer.RunConfig(output_dir=str(tmp_path / name), max_train_steps=steps, checkpointing_steps=4,
                             seed=3, progress=False, **kw)


def official_ema(generator_history, due_steps, start=EMA_START, decay=DECAY):
    """EMAModel_Zero3: n += 1 per call; s = n - update_after - 1; d = 0 if s <= 0 else min((1+s)/(10+s), decay)."""
    ema, n = None, 0
    for step, params in enumerate(generator_history):
        if ema is None:
            ema = np.array(TRAINABLE["generator"]["w"], np.float64)
        if step in due_steps:
            n += 1
            s = n - start - 1
            d = 0.0 if s <= 0 else min((1 + s) / (10 + s), decay)
            ema = ema - (1 - d) * (ema - params)
    return ema, n


def test_schedule_and_ema_closed_form_in_the_loop(tmp_path):
    steps = 16
    gens, emas = [], []

    def export(trainable, folder):  # the generator's trainables, then the EMA's into model_ema/
        (emas if os.path.basename(folder) == EMA_FOLDER else gens).append(jax.device_get(trainable))

    cfg = run(tmp_path, "a", steps)
    cfg = trainer.RunConfig(**{**cfg.__dict__, "checkpointing_steps": 1})
    state = trainer.train(cfg, duel(export=export), TRAINABLE, FROZEN, data())
    records = trainer.read_metrics(cfg.output_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    gen_steps = [r["step"] - 1 for r in records if "generator_loss" in r]
    assert gen_steps == [s for s in range(steps) if s % RATIO == 0]  # generator exactly on ratio steps
    assert all("critic_loss" in r and np.isfinite(r["critic_loss"]) for r in records)  # critic every step
    assert int(state.critic.step) == steps and int(state.generator.step) == len(gen_steps)
    # The critic rolls out with the updated generator: its step metric is the global step.
    assert [r["critic/step"] for r in records] == list(range(steps))
    # EMA: every step before EMA_START, then on generator steps only; the closed form over the warm-up.
    due = {s for s in range(steps) if s < EMA_START or s % RATIO == 0}
    history = [np.asarray(g["w"], np.float64) for g in gens]
    expected, calls = official_ema(history, due)
    assert int(state.ema.count) == calls
    np.testing.assert_allclose(np.asarray(state.ema.params["w"]), expected, rtol=1e-5, atol=1e-6)
    assert len(emas) == steps and np.array_equal(emas[-1]["w"], np.asarray(state.ema.params["w"]))  # exported
    # Before the start the EMA is a copy (decay 0); the warm-up decays are (1+s)/(10+s) after it.
    decays = [r["ema_decay"] for r in records]
    assert all(decays[s] == 0.0 for s in range(EMA_START))
    assert all(decays[s] == -1.0 for s in range(steps) if s not in due)
    assert decays[6] == 0.0 and decays[9] == pytest.approx(2 / 11)  # calls 5 and 6 (steps 6, 9): s = 0, then 1
    assert not np.allclose(expected, history[-1])  # the EMA lags the generator after the warm-up


def test_phases_are_separate_programs():
    from helios_jax.training.duel import DuelSteps
    steps = DuelSteps(duel(phase_steps=(5,)), trainer.OptimizerConfig())
    assert steps(0) is steps(3) and steps(0) is not steps(1)  # generator+critic vs critic only
    assert steps(6) is not steps(0) and steps(7) is not steps(1)  # phase 1 from step 5
    assert len(steps.programs) == 4


def test_resume_is_bit_identical(tmp_path):
    whole = trainer.train(run(tmp_path, "whole", 10), duel(), TRAINABLE, FROZEN, data())
    trainer.train(run(tmp_path, "parts", 6), duel(), TRAINABLE, FROZEN, data())
    resumed = trainer.train(run(tmp_path, "parts", 10), duel(), TRAINABLE, FROZEN, data())
    assert isinstance(resumed, DuelState)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert trainer.read_metrics(str(tmp_path / "whole")) == [
        {**r, "seconds": w["seconds"]} for r, w in zip(trainer.read_metrics(str(tmp_path / "parts")),
                                                       trainer.read_metrics(str(tmp_path / "whole")))]


def test_runs_on_a_mesh_like_without(tmp_path):
    """The mesh path (state placed by duel_shardings, the step pinned to them) gives the same run."""
    from helios_jax import parallel

    mesh = parallel.make_mesh(data=1, fsdp=1, context=1, tensor=1)
    plain = trainer.train(run(tmp_path, "plain", 5), duel(), TRAINABLE, FROZEN, data())
    meshed = trainer.train(run(tmp_path, "mesh", 5), duel(), TRAINABLE, FROZEN, data(), mesh=mesh)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(meshed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert all(getattr(x, "sharding", None) is not None and x.sharding.mesh == mesh for x in jax.tree.leaves(meshed))
