"""A two-player stage for the generic trainer: a generator, a critic and an EMA of the generator (stage 3b).

Model-agnostic: the players are two loss functions over their own trainable trees,

    loss(own, other, frozen, batch, key, step, phase) -> (loss, metrics)

``other`` is the other player's trainables (under ``stop_gradient``: the official's ``requires_grad``
toggling), ``step`` the global (0-based) step as a traced int32, ``phase`` a static int, the number of
``Duel.phase_steps`` thresholds reached (stage 3b: 1 from ``gan_start_step``, the GAN terms on).

One step (``distill.update_plan``): the generator's update when ``step % gen_update_ratio == 0``, then
the critic's update every step, rolling out with the updated generator, then the EMA of the
generator's trainables (official warm-up, ``ema.EmaState.update``: every step before
``ema_start_step``, then on generator steps only, so the warm-up counts generator steps). Each
player has its own optax AdamW state (optimizer config, clipping). The host picks one jit-compiled
program per kind of step, (generator updated?, phase), each with the state donated; the EMA inside
it is a traced ``where``.

The global step is the critic's update count (the critic updates every step); the generator's count
is its own optimizer's step (its learning-rate schedule). A checkpoint holds the items ``generator``,
``critic`` and ``ema`` (TrainStates and the EMA tree with its call count) beside the data iterator.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from helios_jax import parallel
from helios_jax.training import distill
from helios_jax.training.ema import EmaConfig, EmaState
from helios_jax.training.trainer import (
    TRAINING_RULES,
    Export,
    OptimizerConfig,
    Params,
    TrainState,
    Validate,
    init_state,
    learning_rate,
    make_optimizer,
    nonfinite_counters,
    shard_variables,
)

PlayerLoss = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Duel:
    """A two-player stage (a ``trainer.StepProgram``): the players' losses, their optimizers (``optimizer``
    the generator's), the update ratio and the EMA of the generator (``ema=None``: none). ``phase_steps``:
    steps from which the phase number rises. ``export`` gets the generator's trainables and the EMA's.
    The progress bar shows ``critic_loss``: the critic updates every step."""

    generator_loss: PlayerLoss
    critic_loss: PlayerLoss
    critic_optimizer: OptimizerConfig
    gen_update_ratio: int = 5
    ema: EmaConfig | None = EmaConfig()
    phase_steps: tuple[int, ...] = ()
    optimizer: OptimizerConfig = OptimizerConfig()
    export: Export | None = dataclasses.field(default=None, compare=False)
    validate: Validate | None = dataclasses.field(default=None, compare=False)
    headline = "critic_loss"

    def phase(self, step: int) -> int:
        return sum(step >= s for s in self.phase_steps)

    def updates_generator(self, step: int) -> bool:
        return bool(distill.update_plan(step, gen_update_ratio=self.gen_update_ratio).generator)

    def setup(self, trainable: dict[str, Params], mesh: jax.sharding.Mesh | None) -> tuple["DuelState", "DuelSteps"]:
        """What ``trainer.train`` runs: the initial state of ``{"generator": ..., "critic": ...}`` (on
        ``mesh``, if any) and the step programs."""
        state = init_duel(self, self.optimizer, shard_variables(trainable["generator"], mesh),
                          shard_variables(trainable["critic"], mesh))
        placement = None
        if mesh is not None:
            placement = duel_shardings(state, mesh)
            state = jax.device_put(state, placement)
        return state, DuelSteps(self, self.optimizer, placement)


class DuelState(NamedTuple):
    """Both players and the generator's EMA (params ``{}`` without one); ``trainer.TrainState``'s protocol."""

    generator: TrainState
    critic: TrainState
    ema: EmaState

    @property
    def step(self) -> jax.Array:
        return self.critic.step

    def items(self) -> dict[str, Any]:
        """The checkpoint items."""
        return {"generator": self.generator, "critic": self.critic, "ema": self.ema.items()}

    @classmethod
    def from_items(cls, items: dict[str, Any]) -> "DuelState":
        return cls(items["generator"], items["critic"], EmaState.from_items(items["ema"]))

    @property
    def exported(self) -> Params:
        return self.generator.trainable

    @property
    def averaged(self) -> Params | None:
        return self.ema.params or None


def init_duel(duel: Duel, generator_optimizer: OptimizerConfig, generator: Params, critic: Params) -> DuelState:
    """Step 0: float32 copies of both players' trainables, fresh optimizer states, the EMA = the generator."""
    gen = init_state(generator, make_optimizer(generator_optimizer))
    ema = EmaState.start(gen.trainable) if duel.ema is not None else EmaState({}, jnp.zeros((), jnp.int32))
    return DuelState(gen, init_state(critic, make_optimizer(duel.critic_optimizer)), ema)


def _update(loss: PlayerLoss, optimizer: optax.GradientTransformation, player: TrainState, other: Params,
            frozen: Params, batch: Any, key: jax.Array, step: jax.Array, phase: int,
            ) -> tuple[TrainState, jax.Array, jax.Array, dict]:
    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(
        player.trainable, jax.lax.stop_gradient(other), frozen, batch, key, step, phase)
    updates, opt_state = optimizer.update(grads, player.opt_state, player.trainable)
    new = TrainState(player.step + 1, optax.apply_updates(player.trainable, updates), opt_state)
    return new, value.astype(jnp.float32), optax.global_norm(grads), aux


def make_duel_step(duel: Duel, generator_optimizer: OptimizerConfig, *, update_generator: bool, phase: int,
                   state_sharding: DuelState | None = None) -> Callable:
    """The jit-compiled ``step(state, frozen, batch, key) -> (state, metrics)`` of one kind of step.

    Metrics: ``critic_loss``, ``critic_grad_norm`` (before clipping), ``critic_lr``, the critic loss's
    own (prefixed ``critic/``), ``ema_decay`` (the decay this step's EMA used; -1 when it did not run),
    and on generator steps ``generator_loss``, ``generator_grad_norm``, ``lr`` and ``generator/...``."""
    g_opt, c_opt = make_optimizer(generator_optimizer), make_optimizer(duel.critic_optimizer)
    g_lr, c_lr = learning_rate(generator_optimizer), learning_rate(duel.critic_optimizer)

    def step(state: DuelState, frozen: Params, batch: Any, key: jax.Array) -> tuple[DuelState, dict]:
        k_gen, k_critic = jax.random.split(key)
        global_step, metrics, generator = state.step, {}, state.generator
        if update_generator:
            generator, loss, norm, aux = _update(duel.generator_loss, g_opt, generator, state.critic.trainable,
                                                 frozen, batch, k_gen, global_step, phase)
            metrics.update({f"generator/{k}": v for k, v in aux.items()}, generator_loss=loss,
                           generator_grad_norm=norm, lr=jnp.asarray(g_lr(state.generator.step), jnp.float32))
            metrics.update({f"generator_{k}": v for k, v in nonfinite_counters(generator.opt_state).items()})
        critic, loss, norm, aux = _update(duel.critic_loss, c_opt, state.critic, generator.trainable,
                                          frozen, batch, k_critic, global_step, phase)
        metrics.update({f"critic/{k}": v for k, v in aux.items()}, critic_loss=loss, critic_grad_norm=norm,
                       critic_lr=jnp.asarray(c_lr(state.critic.step), jnp.float32))
        metrics.update({f"critic_{k}": v for k, v in nonfinite_counters(critic.opt_state).items()})
        ema = state.ema
        if duel.ema is not None:
            due = (global_step < duel.ema.start_step) | update_generator
            ema, metrics["ema_decay"] = ema.update(duel.ema, generator.trainable, due)
        return DuelState(generator, critic, ema), metrics

    if state_sharding is None:
        return jax.jit(step, donate_argnums=0)
    replicated = parallel.replicated(jax.tree.leaves(state_sharding)[0].mesh)
    return jax.jit(step, donate_argnums=0, out_shardings=(state_sharding, replicated))


class DuelSteps:
    """The compiled programs of a run, one per kind of step, made on first use and chosen on the host."""

    def __init__(self, duel: Duel, generator_optimizer: OptimizerConfig, state_sharding: DuelState | None = None):
        self.duel, self.optimizer, self.sharding = duel, generator_optimizer, state_sharding
        self.programs: dict[tuple[bool, int], Callable] = {}

    def __call__(self, step: int) -> Callable:
        kind = (self.duel.updates_generator(step), self.duel.phase(step))
        if kind not in self.programs:
            if self.sharding is None:
                self.programs[kind] = compiled_duel_step(self.duel, self.optimizer, *kind)
            else:
                self.programs[kind] = make_duel_step(self.duel, self.optimizer, update_generator=kind[0],
                                                     phase=kind[1], state_sharding=self.sharding)
        return self.programs[kind]


@functools.lru_cache(maxsize=8)
def compiled_duel_step(duel: Duel, generator_optimizer: OptimizerConfig, update_generator: bool,
                       phase: int) -> Callable:
    """``make_duel_step`` kept per (duel, optimizer, kind), as ``trainer.compiled_step``: a run resumed in
    the same process (a notebook, the tests) reuses the traced and compiled programs when its players
    compare equal (``trainer.Bound``). A DMD step program takes minutes to compile on a CPU."""
    return make_duel_step(duel, generator_optimizer, update_generator=update_generator, phase=phase)


def duel_shardings(state: DuelState, mesh: jax.sharding.Mesh) -> DuelState:
    """Where a DuelState lives on ``mesh``: both players' trainables, optimizer states and the EMA by the
    DiT's, LoRA's and the discriminator heads' sharding tables; counters replicated."""
    def player(s: TrainState) -> TrainState:
        return TrainState(parallel.replicated(mesh), parallel.shardings(s.trainable, mesh, TRAINING_RULES),
                          parallel.shardings(s.opt_state, mesh, TRAINING_RULES))

    return DuelState(player(state.generator), player(state.critic),
                     EmaState(parallel.shardings(state.ema.params, mesh, TRAINING_RULES), parallel.replicated(mesh)))
