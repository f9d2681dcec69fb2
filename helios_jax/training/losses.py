"""Flow-matching objectives of stages 1 and 2 (docs/training.md §3-5), as functions the trainer composes.

Convention: ``x_sigma = (1 - sigma) x0 + sigma eps``, the model predicts the velocity ``eps - x0``,
sigma = 1 is pure noise, the model's timestep is ``1000 sigma`` (stage 1) or the stage's global
timestep (stage 2).

* Stage 1 (:func:`stage1_example`): one sigma per sample from the FlowMatch-Euler table
  ``sigma_i = (1000 - i) / 1000``, ``i = floor(1000 u)``, u logit-normal (or uniform / "mode").
* Stage 2 (:func:`pyramid_examples`): a clean pyramid (bilinear halvings of the target) and a
  coherent noise pyramid (times 2 per halving); stage s interpolates between its start point
  (noise, or the corrected start sigma's mix of noise and the upsampled coarser clean latent) and
  its end point with a local sigma, and the model sees the stage's global timestep.
* :func:`flow_loss` is the mean squared error in float32 (weight 1: "logit_normal" changes only the
  sampling); :func:`sequential_pyramid_grads` runs one forward and backward per stage and sums the
  gradients, as the official stage 2-post does under DDP; :func:`packed_pyramid_loss` runs stage 2-init's
  examples as segments of one packed forward (a ``PackedModelFn``) and :func:`mean_pyramid_loss` the
  same mean with one forward per example.

``model_fn(params, hidden_states, timestep, conditioning) -> velocity`` is any callable with the
transformer's layout; ``conditioning`` is a dict of its keyword arguments (text embeddings and the
history inputs of :func:`helios_jax.training.samples.prepare_context`), shared by every stage: the
history stays at full resolution at every pyramid level.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.sampling.pyramid import resize_bilinear, upsample_nearest
from helios_jax.sampling.schedule import HeliosSchedulerConfig, stage_sigmas
from helios_jax.training.samples import normal

NUM_TRAIN_TIMESTEPS = 1000
WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "uniform")
ModelFn = Callable[[Any, jax.Array, jax.Array, Mapping[str, jax.Array]], jax.Array]
# (params, [noisy_i], [timestep_i], conditioning) -> [velocity_i]: all segments in one packed forward.
PackedModelFn = Callable[[Any, Sequence[jax.Array], Sequence[jax.Array], Mapping[str, jax.Array]], Sequence[jax.Array]]


@dataclasses.dataclass(frozen=True)
class TimestepSampling:
    """How u in [0, 1) is drawn (the YAML's ``weighting_scheme``, ``logit_mean``, ``logit_std``, ``mode_scale``);
    "none" and "uniform" are U(0, 1), as diffusers' ``compute_density_for_timestep_sampling``."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme = {self.weighting_scheme!r}: expected one of {WEIGHTING_SCHEMES}")

    def sample(self, key: jax.Array, batch_size: int) -> jax.Array:
        """(batch_size,) float32 u."""
        if self.weighting_scheme == "logit_normal":
            return jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(key, (batch_size,)))
        u = jax.random.uniform(key, (batch_size,))
        if self.weighting_scheme == "mode":
            return 1 - u - self.mode_scale * (jnp.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u


def table_index(u: jax.Array, n: int = NUM_TRAIN_TIMESTEPS) -> jax.Array:
    """``floor(n u)`` clamped to [0, n - 1], int32: the row of a dense training table."""
    return jnp.clip(jnp.floor(u * n).astype(jnp.int32), 0, n - 1)


def stage1_sigmas(n: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The stage-1 sigma table, FlowMatchEulerDiscreteScheduler(shift=1)'s: ``(n - i) / n``, float32."""
    return (np.linspace(1, n, n, dtype=np.float32)[::-1] / n).astype(np.float32)


def _per_sample(x: jax.Array, ndim: int) -> jax.Array:
    return x.reshape((-1,) + (1,) * (ndim - 1))


def flow_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over every element, in float32."""
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


# ---------------------------------------------------------------------------------------------------
# stage 1


@dataclasses.dataclass(frozen=True)
class FlowExample:
    """One forward's worth of a flow-matching objective: the model's noisy input and timestep
    (B,), the velocity it should predict, and the sigma (B,) that made the input."""

    noisy: jax.Array
    timestep: jax.Array
    velocity: jax.Array
    sigma: jax.Array
    stage: int = 0


jax.tree_util.register_dataclass(FlowExample, data_fields=["noisy", "timestep", "velocity", "sigma"],
                                 meta_fields=["stage"])


def stage1_example(key: jax.Array, target: jax.Array, sampling: TimestepSampling = TimestepSampling(),
                   noise: jax.Array | None = None) -> FlowExample:
    """Stage 1 for a clean chunk ``target`` (B, C, 9, H, W): ``x_t = (1 - s) target + s eps``, velocity
    ``eps - target``, timestep ``1000 s``. ``noise`` replaces the eps draw (for error recycling or tests)."""
    k_u, k_eps = jax.random.split(key)
    if noise is None:
        noise = normal(k_eps, target.shape)
    sigma = jnp.asarray(stage1_sigmas())[table_index(sampling.sample(k_u, target.shape[0]))]
    s = _per_sample(sigma, target.ndim)
    target = target.astype(jnp.float32)
    return FlowExample(noisy=(1 - s) * target + s * noise, timestep=sigma * NUM_TRAIN_TIMESTEPS,
                       velocity=noise - target, sigma=sigma)


def example_loss(model_fn: ModelFn, params: Any, example: FlowExample, conditioning: Mapping[str, jax.Array],
                 dtype: Any = jnp.float32) -> jax.Array:
    """The flow loss of one example: ``mean((model_fn(noisy, timestep) - velocity)^2)`` in float32;
    the model input is cast to ``dtype`` (bf16 for mixed precision)."""
    prediction = model_fn(params, example.noisy.astype(dtype), example.timestep, conditioning)
    return flow_loss(prediction, example.velocity)


# ---------------------------------------------------------------------------------------------------
# stage 2: the pyramid


@dataclasses.dataclass(frozen=True)
class PyramidSchedule:
    """The per-stage constants of the training scheduler (``HeliosScheduler(shift, stages, stage_range,
    gamma)``): start (corrected) and end sigmas, and the dense (1000,) local sigma and global timestep
    tables of every stage, float64."""

    config: HeliosSchedulerConfig  # the tables' source: a schedule compares and hashes by it (a static jit key)
    start_sigmas: tuple[float, ...]
    end_sigmas: tuple[float, ...]
    ori_start_sigmas: tuple[float, ...]
    # (1000,) local sigma, the same for every stage: linspace(0.999, 0, 1001)[:-1]
    sigmas: np.ndarray = dataclasses.field(compare=False)
    timesteps: tuple[np.ndarray, ...] = dataclasses.field(compare=False)  # per stage (1000,) global timesteps

    @classmethod
    def create(cls, shift: float = 1.0, stages: int = 3, stage_range: tuple[float, ...] = (0, 1 / 3, 2 / 3, 1),
               gamma: float = 1 / 3) -> "PyramidSchedule":
        """From the YAML's ``stage2_timestep_shift``, ``stage2_num_stages``, ``stage2_stage_range``,
        ``stage2_scheduler_gamma``; the bounds are the sampler's own (``sampling.stage_sigmas``)."""
        config = HeliosSchedulerConfig(shift=shift, stages=stages, stage_range=tuple(stage_range), gamma=gamma)
        bounds = stage_sigmas(config)
        n = config.num_train_timesteps
        return cls(config, bounds.start_sigmas, bounds.end_sigmas, bounds.ori_start_sigmas,
                   np.linspace(0.999, 0, n + 1)[:-1], bounds.timesteps)

    @property
    def stages(self) -> int:
        return len(self.start_sigmas)


@dataclasses.dataclass(frozen=True)
class PyramidSettings:
    """Stage 2's training scheduler and sampling (``stage2_*`` keys and ``weighting_scheme``)."""

    schedule: PyramidSchedule
    sample_ratios: tuple[int, ...]
    sampling: TimestepSampling


def clean_pyramid(target: jax.Array, stages: int) -> list[jax.Array]:
    """The target at every stage, coarsest first: repeated bilinear halvings (floor sizes, no antialias)."""
    levels = [target]
    for _ in range(stages - 1):
        x = levels[-1]
        levels.append(resize_bilinear(x, x.shape[-2] // 2, x.shape[-1] // 2))
    return levels[::-1]


def noise_pyramid(noise: jax.Array, stages: int) -> list[jax.Array]:
    """Full-resolution noise and its halvings times 2 (unit variance kept), coarsest first."""
    levels = [noise]
    for _ in range(stages - 1):
        x = levels[-1]
        levels.append(resize_bilinear(x, x.shape[-2] // 2, x.shape[-1] // 2) * 2)
    return levels[::-1]


def pyramid_examples(
    key: jax.Array, target: jax.Array, schedule: PyramidSchedule = PyramidSchedule.create(),
    sample_ratios: tuple[int, ...] = (1, 1, 1), sampling: TimestepSampling = TimestepSampling("none"),
    noise: jax.Array | None = None,
) -> list[FlowExample]:
    """Stage-2 examples for a clean chunk (B, C, T, H, W), low resolution first, ``sample_ratios[s]``
    examples of stage s (each with its own u), as ``prepare_stage2_clean_input``:

    start_s = eps_0 (s = 0) or S_s eps_s + (1 - S_s) up2(c_{s-1}); end_s = c_last (last stage) or
    E_s eps_s + (1 - E_s) c_s; k = floor(1000 u); x = sigma_k start + (1 - sigma_k) end with the local
    sigma; velocity start - end; timestep = the stage's global timestep k.
    """
    stages = schedule.stages
    if len(sample_ratios) != stages:
        raise ValueError(f"stage2_sample_ratios = {list(sample_ratios)}: expected one count per stage ({stages})")
    height, width = target.shape[-2:]
    if height % (1 << (stages - 1)) or width % (1 << (stages - 1)):
        raise ValueError(f"latent {height}x{width}: a {stages}-stage pyramid needs sizes divisible by "
                         f"{1 << (stages - 1)}")
    k_eps, key = jax.random.split(key)
    target = target.astype(jnp.float32)
    if noise is None:
        noise = normal(k_eps, target.shape)
    clean, noises = clean_pyramid(target, stages), noise_pyramid(noise, stages)
    sigmas = jnp.asarray(schedule.sigmas, jnp.float32)
    examples = []
    for s, repeats in enumerate(sample_ratios):
        if s == 0:
            start = noises[0]
        else:
            S = schedule.start_sigmas[s]
            start = S * noises[s] + (1 - S) * upsample_nearest(clean[s - 1])
        if s == stages - 1:
            end = clean[s]
        else:
            E = schedule.end_sigmas[s]
            end = E * noises[s] + (1 - E) * clean[s]
        timesteps = jnp.asarray(schedule.timesteps[s], jnp.float32)
        for _ in range(repeats):
            key, k_u = jax.random.split(key)
            k = table_index(sampling.sample(k_u, target.shape[0]))
            sigma = sigmas[k]
            sig = _per_sample(sigma, target.ndim)
            examples.append(FlowExample(noisy=sig * start + (1 - sig) * end, timestep=timesteps[k],
                                        velocity=start - end, sigma=sigma, stage=s))
    return examples


def sequential_pyramid_grads(
    model_fn: ModelFn, params: Any, examples: list[FlowExample], conditioning: Mapping[str, jax.Array],
    dtype: Any = jnp.float32,
) -> tuple[jax.Array, Any]:
    """Stage 2-post: one forward and backward per example, gradients summed (each stage's loss has
    weight 1, as three ``backward`` calls before one optimizer step). Returns ``(losses, grads)`` with
    ``losses`` (n,) float32, in the examples' order; the original logs the last one."""
    grad_fn = jax.value_and_grad(lambda p, ex: example_loss(model_fn, p, ex, conditioning, dtype))
    losses, total = [], None
    for example in examples:
        loss, grads = grad_fn(params, example)
        losses.append(loss)
        total = grads if total is None else jax.tree_util.tree_map(jnp.add, total, grads)
    return jnp.stack(losses), total


def mean_pyramid_loss(model_fn: ModelFn, params: Any, examples: list[FlowExample],
                      conditioning: Mapping[str, jax.Array], dtype: Any = jnp.float32) -> jax.Array:
    """Stage 2-init's objective, the mean of the examples' losses (one backward), each example its own
    forward. It equals :func:`packed_pyramid_loss`, the official one-forward form, in value and gradient
    (tests/test_packed.py: <= 1e-5 in fp32, the LoRA gradients included), since there every segment attends
    only to itself and its copy of the shared history."""
    return jnp.mean(jnp.stack([example_loss(model_fn, params, ex, conditioning, dtype) for ex in examples]))


def packed_pyramid_loss(packed_fn: PackedModelFn, params: Any, examples: list[FlowExample],
                        conditioning: Mapping[str, jax.Array], dtype: Any = jnp.float32) -> jax.Array:
    """Stage 2-init's objective as the official code runs it (``is_navit_pyramid``): every example a segment
    of ONE packed forward (``helios_jax.models.packed.PackedHeliosTransformer``: block-diagonal attention per
    segment, the history copied into each), loss = the mean of the segment losses (with ratios [1, 2, 1] the
    middle stage weighs 2/4). ``packed_fn(params, [noisy_i], [timestep_i], conditioning) -> [velocity_i]``;
    the inputs are cast to ``dtype``."""
    predictions = packed_fn(params, [ex.noisy.astype(dtype) for ex in examples], [ex.timestep for ex in examples],
                            conditioning)
    if len(predictions) != len(examples):
        raise ValueError(f"packed_pyramid_loss: packed_fn returned {len(predictions)} velocities for "
                         f"{len(examples)} segments; it must return one per segment, in order")
    return jnp.mean(jnp.stack([flow_loss(p, ex.velocity) for p, ex in zip(predictions, examples)]))
