"""Stage-3 distillation (docs/training.md §7, §9.3): DMD, the backward-simulated pyramid rollout and the
generator/critic update schedule (the EMA it schedules is ``training.ema``), as pure functions a trainer
composes ("a loss plus a config").

Conventions: flow matching ``x_t = (1 - sigma) x0 + sigma eps``, the model predicts ``v = eps - x0``,
``x0 = x_t - sigma v``; ``t = 1000 sigma``. Latents stay float32 between steps (bf16 latents between
DMD steps drift visibly; the official converts through float64).

Official bug 7 (docs/training.md §13: identical random streams on every rank): every draw here comes from an
explicit key and per-sample draws are made over the whole (global) batch, so under ``jit`` on a
sharded batch every sample, hence every device, gets its own noise, timestep and crop. The rollout's
exit steps are one draw per stage for the whole batch, which is what the official's rank-0 broadcast
of them intends.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.sampling.pyramid import (
    block_noise,
    block_noise_factor,
    block_noise_shape,
    downsample_to_first_stage,
    renoise,
    renoise_coefficients,
    stage_sizes,
    upsample_nearest,
)
from helios_jax.sampling.schedule import HeliosDMDSchedulerConfig, calculate_shift, make_schedule, shift_for
from helios_jax.training import samples

# ----------------------------------------------------------------------------- 3. DMD


class SigmaTable(NamedTuple):
    """The global DMD/critic sigma table (docs/training.md §7.2): ``sigmas[i]`` at ``timesteps[i] = 1000 sigmas[i]``."""

    sigmas: jax.Array
    timesteps: jax.Array
    shift: float  # mu, also the timestep shift of ``sample_dynamic_timestep``


def dmd_sigma_table(latent_shape: tuple[int, ...] = (1, 16, 9, 48, 80), num_train_timesteps: int = 1000,
                    base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> SigmaTable:
    """``linspace(1, 1/N, N)`` under the linear dynamic shift ``s sigma / (1 + (s - 1) sigma)``,
    ``s = mu(T H W / 4)`` of the critic's full-resolution chunk (1.9192 at 9 x 48 x 80)."""
    seq_len = math.prod(latent_shape[-3:]) // 4
    mu = calculate_shift(seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    sigmas = np.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps)
    sigmas = mu * sigmas / (1 + (mu - 1) * sigmas)
    return SigmaTable(jnp.asarray(sigmas, jnp.float32), jnp.asarray(sigmas * num_train_timesteps, jnp.float32), mu)


def sigma_at(table: SigmaTable, timestep: jax.Array) -> jax.Array:
    """Nearest-timestep lookup, (B,) -> (B, 1, 1, 1, 1) (official ``add_noise``/``convert_flow_pred_to_x0``)."""
    index = jnp.argmin(jnp.abs(table.timesteps[None, :] - timestep.astype(jnp.float32)[:, None]), axis=1)
    return table.sigmas[index].reshape(-1, 1, 1, 1, 1)


def add_noise(x0: jax.Array, noise: jax.Array, timestep: jax.Array, table: SigmaTable) -> jax.Array:
    sigma = sigma_at(table, timestep)
    return (1 - sigma) * x0.astype(jnp.float32) + sigma * noise.astype(jnp.float32)


def flow_to_x0(flow: jax.Array, x_t: jax.Array, timestep: jax.Array, table: SigmaTable) -> jax.Array:
    return x_t.astype(jnp.float32) - sigma_at(table, timestep) * flow.astype(jnp.float32)


def sample_dynamic_timestep(key: jax.Array, batch: int, *, step: int | jax.Array = 0, shift: float = 1.0,
                            kind: str = "uniform", alpha: float = 4.0, beta: float = 1.5,
                            dynamic_step: int = 500, min_timestep: float = 0.0, max_timestep: float = 1000.0,
                            clamp: tuple[float, float] = (20.0, 980.0),
                            num_train_timesteps: int = 1000) -> jax.Array:
    """Integer DMD/critic timesteps (B,), official ``sample_dynamic_timestep``.

    ``r ~ U(0.001, 1)`` ("uniform") or ``Beta(a, b)`` ("beta") with ``a = 1 + (alpha - 1) c``,
    ``b = 1 + (beta - 1) c``, ``c = (1 + cos(pi min(step / dynamic_step, 1))) / 2`` (cosine annealing
    from Beta(alpha, beta) to uniform); ``t = min + r (max - min)``, shifted by ``shift`` when it
    exceeds 1 (as the official), clamped to ``clamp`` and rounded.
    """
    if kind == "uniform":
        r = jax.random.uniform(key, (batch,), jnp.float32) * (1.0 - 0.001) + 0.001
    elif kind == "beta":
        progress = jnp.minimum(jnp.asarray(step, jnp.float32) / dynamic_step, 1.0) if dynamic_step > 0 else 0.0
        c = 0.5 * (1.0 + jnp.cos(progress * jnp.pi))
        r = jax.random.beta(key, 1.0 + (alpha - 1.0) * c, 1.0 + (beta - 1.0) * c, (batch,), jnp.float32)
    else:
        raise ValueError(f"timestep sampling kind = {kind!r}: expected 'uniform' or 'beta' (the official options)")
    t = min_timestep + r * (max_timestep - min_timestep)
    if shift > 1:
        u = t / num_train_timesteps
        t = shift * u / (1 + (shift - 1) * u) * num_train_timesteps
    return jnp.round(jnp.clip(t, *clamp)).astype(jnp.int32)


def dmd_gradient(x: jax.Array, fake_x0: jax.Array, real_cond_x0: jax.Array, real_uncond_x0: jax.Array,
                 real_guidance_scale: float = 3.0) -> jax.Array:
    """The DMD gradient ``(fake - real) / mean_{C,T,H,W} |x - real|`` per sample, NaN -> 0.

    ``real = cond + scale (cond - uncond)`` (the official ``real_guidance_scale = 3``, i.e. CFG weight 4
    in the ``uncond + w (cond - uncond)`` convention); all x0 predictions at the noised ``x``.
    """
    f32 = jnp.float32
    real = real_cond_x0.astype(f32) + real_guidance_scale * (real_cond_x0.astype(f32) - real_uncond_x0.astype(f32))
    normalizer = jnp.mean(jnp.abs(x.astype(f32) - real), axis=(1, 2, 3, 4), keepdims=True)
    return jnp.nan_to_num((fake_x0.astype(f32) - real) / normalizer)


def dmd_loss(x: jax.Array, gradient: jax.Array) -> jax.Array:
    """``0.5 mean((x - stop_gradient(x - g))^2)``: its gradient w.r.t. ``x`` is ``g / x.size``."""
    x = x.astype(jnp.float32)
    return 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - gradient)) ** 2)


def fake_score_loss(flow: jax.Array, noise: jax.Array, x: jax.Array) -> jax.Array:
    """The critic's denoising loss: its flow at ``add_noise(x, noise, t)`` regressed on ``noise - x``."""
    f32 = jnp.float32
    return jnp.mean((flow.astype(f32) - (noise.astype(f32) - x.astype(f32))) ** 2)


# ----------------------------------------------------------------------------- 4. the rollout

ModelFn = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, latents (B,C,T,h,w), timesteps (B,)) -> flow


@dataclasses.dataclass(frozen=True)
class RolloutStage:
    """One pyramid stage of the student: per step the model timestep, its sigma and the sigma the
    x0 prediction is renoised to (towards the stage's start latents); the renoise entering it."""

    size: tuple[int, int]
    timesteps: np.ndarray
    sigmas: np.ndarray
    next_sigmas: np.ndarray
    renoise: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class RolloutPlan:
    latent_shape: tuple[int, int, int, int, int]
    patch: tuple[int, int]
    stages: tuple[RolloutStage, ...]
    block_factor: np.ndarray


def rollout_plan(latent_shape: tuple[int, ...], stage_steps: tuple[int, ...] = (2, 2, 2), *,
                 amplify_first_chunk: bool = False, scheduler_config: HeliosDMDSchedulerConfig | None = None,
                 patch: tuple[int, int] = (2, 2)) -> RolloutPlan:
    """The student's schedule (docs/training.md §3.3, §7.3), built on the host from the DMD scheduler.

    ``amplify_first_chunk`` doubles every stage's steps (the history-free first chunk). Each stage is
    shifted with ``mu`` of its *own* resolution, as the official rollout and ODE pairs do; note that
    diffusers' pyramid pipeline computes ``mu`` before upsampling, so its stage 1 and 2 timesteps differ.
    Sigmas are the schedule's own, where the official looks them up in a dense 1000-point stage
    table (nearest timestep, at most half a grid step away): the student trains on exactly the
    steps it samples with.
    """
    config = scheduler_config or HeliosDMDSchedulerConfig(use_dynamic_shifting=True)
    if config.scheduler_type != "dmd" or config.stages != len(stage_steps) or not config.use_dynamic_shifting:
        raise ValueError(f"rollout_plan needs a dynamic-shifting DMD scheduler with one step count per stage; "
                         f"got {config} and stage_steps = {stage_steps} (use Helios-Distilled's scheduler config)")
    shape = tuple(int(d) for d in latent_shape)
    stages = []
    for s, ((h, w), steps) in enumerate(zip(stage_sizes(shape[-2], shape[-1], config.stages), stage_steps)):
        block_noise_shape((h, w), patch)
        mu = shift_for(config, shape[2] * h * w // (patch[0] * patch[1]))
        schedule = make_schedule(config, steps, s, mu=mu, amplify_first_chunk=amplify_first_chunk)
        sigmas = schedule.sigmas.astype(np.float32)
        stages.append(RolloutStage((h, w), schedule.timesteps.astype(np.float32), sigmas[:-1], sigmas[1:],
                                   renoise_coefficients(config, s) if s else (0.0, 0.0)))
    factor = block_noise_factor(config.gamma, patch).astype(np.float32)
    return RolloutPlan(shape, patch, tuple(stages), factor)


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape)


def _stage_arrays(stage: RolloutStage, other: RolloutStage | None, use_other: jax.Array | None):
    """(timesteps, sigmas, next_sigmas, step count) of a stage, or of ``other`` where ``use_other``
    (traced): the shorter schedule padded to the longer one's length, so ONE program runs either."""
    arrays = (stage.timesteps, stage.sigmas, stage.next_sigmas)
    if other is None:
        return (*(jnp.asarray(a) for a in arrays), len(stage.timesteps))
    n = max(len(stage.timesteps), len(other.timesteps))
    pad = lambda a: jnp.asarray(np.pad(a, (0, n - len(a)), mode="edge"))  # noqa: E731
    picked = [jnp.where(use_other, pad(b), pad(a)) for a, b in zip(arrays, (other.timesteps, other.sigmas, other.next_sigmas))]
    return (*picked, jnp.where(use_other, len(other.timesteps), len(stage.timesteps)))


def rollout(model_fn: ModelFn, params: Any, plan: RolloutPlan, key: jax.Array, *,
            amplified: RolloutPlan | None = None, use_amplified: jax.Array | None = None,
            ) -> tuple[jax.Array, jax.Array]:
    """The backward-simulated pyramid rollout: the chunk's x0 (B, C, T, H, W) float32 and the exit steps (S,).

    Per stage one exit step ``e ~ U{0, n)``: steps before it run under ``stop_gradient`` (a
    ``lax`` loop of x0-parameterised Euler steps renoising towards the stage start); the exit
    step's x0 carries the gradient and, upsampled and renoised with block noise, starts the next
    stage. So the gradient reaches a stage's exit only through later exits at step 0.

    ``amplified`` (the same stages with more steps: the history-free first chunk) is used instead of
    ``plan`` where the traced ``use_amplified`` is true, in the same compiled program (one model
    call per stage in the loop and one at the exit, whichever schedule runs).
    """
    if amplified is not None and [s.size for s in amplified.stages] != [s.size for s in plan.stages]:
        raise ValueError("rollout: the amplified plan must have the plan's stages (sizes); build both with "
                         "rollout_plan on the same latent shape")
    batch = plan.latent_shape[0]
    keys = jax.random.split(key, 1 + 2 * len(plan.stages))
    x = downsample_to_first_stage(_normal(keys[0], plan.latent_shape), len(plan.stages))
    frozen = jax.lax.stop_gradient(params)
    x0, exits = x, []
    for s, stage in enumerate(plan.stages):
        if s:
            z = _normal(keys[2 * s], block_noise_shape((*plan.latent_shape[:3], *stage.size), plan.patch))
            x = renoise(upsample_nearest(x0), block_noise(z, plan.block_factor, plan.patch), *stage.renoise)
        timesteps, sigmas, next_sigmas, count = _stage_arrays(
            stage, amplified.stages[s] if amplified is not None else None, use_amplified)
        start, fixed_start = x, jax.lax.stop_gradient(x)
        exit_step = jax.random.randint(keys[2 * s + 1], (), 0, count)

        def no_grad_step(j, x, fixed_start=fixed_start, timesteps=timesteps, sigmas=sigmas, next_sigmas=next_sigmas):
            flow = model_fn(frozen, x, jnp.full((batch,), timesteps[j]))
            x0 = x - sigmas[j] * flow.astype(jnp.float32)
            return (1 - next_sigmas[j]) * x0 + next_sigmas[j] * fixed_start

        x = jnp.where(exit_step == 0, start, jax.lax.fori_loop(0, exit_step, no_grad_step, fixed_start))
        flow = model_fn(params, x, jnp.full((batch,), timesteps[exit_step]))
        x0 = x - sigmas[exit_step] * flow.astype(jnp.float32)
        exits.append(exit_step)
    return x0, jnp.stack(exits)


# ----------------------------------------------------------------------------- 5. The update schedule (the EMA: training.ema)


class UpdatePlan(NamedTuple):
    """What one training step updates, in this order: generator, then critic (which rolls out with the
    updated generator), then the EMA of the generator."""

    generator: Any
    critic: Any
    ema: Any
    gan: Any


def update_plan(step: int | jax.Array, *, gen_update_ratio: int = 5, ema_start_step: int = 750,
                gan_start_step: int | None = None) -> UpdatePlan:
    """The official schedule as a pure function of the (0-based) step; works on ints and traced arrays.

    Generator when ``step % ratio == 0``; critic every step; EMA every step before ``ema_start_step``
    (its warm-up copies) and afterwards on generator steps only, so the warm-up counts generator
    steps; the GAN terms from ``gan_start_step`` (None: never). One critic update per step, the
    denoising and GAN losses summed (official bug 6: under DeepSpeed each of its two backwards was an
    optimizer step).
    """
    generator = step % gen_update_ratio == 0
    ema = (step < ema_start_step) | generator
    gan = step >= gan_start_step if gan_start_step is not None else False
    return UpdatePlan(generator, True, ema, gan)


# ----------------------------------------------------------------------------- stage 3b's settings


@dataclasses.dataclass(frozen=True)
class TimestepDraw:
    """``sample_dynamic_timestep``'s settings of one player (``{generator,critic}_dynamic_*``)."""

    kind: str = "uniform"
    alpha: float = 4.0
    beta: float = 1.5
    dynamic_step: int = 500


@dataclasses.dataclass(frozen=True)
class GanSettings:
    """The GAN terms (``gan_*``, ``r1_*``); hooks are the backbone's (empty: the final head only)."""

    hooks: tuple[int, ...] = (5, 15, 25, 35)
    features: int = 768
    g_weight: float = 0.05
    d_weight: float = 0.01
    r1_weight: float = 100.0
    r1_sigma: float = 0.1


@dataclasses.dataclass(frozen=True)
class DmdSettings:
    """Stage 3b's losses' settings: the rollout's steps per pyramid stage, the scores' CFG, both players'
    timestep draws, the context (drop, corruption, saturation) and the GAN (None: DMD alone)."""

    stage_steps: tuple[int, ...] = (2, 2, 2)
    amplify_first_chunk: bool = True
    real_guidance_scale: float = 3.0
    generator_timestep: TimestepDraw = TimestepDraw("beta")
    critic_timestep: TimestepDraw = TimestepDraw("uniform")
    context: samples.ContextConfig = samples.ContextConfig(t2v_ratio=0.4, v2v_ratio=0.5)  # drop + corruption
    saturation: samples.SaturationConfig | None = samples.SaturationConfig()
    gan: GanSettings | None = None
