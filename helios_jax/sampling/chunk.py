"""One chunk's whole pyramid sampling as a single jit-compiled function.

The host builds a :class:`ChunkPlan` once (``plan_pyramid_chunk`` mirrors ``HeliosPyramidPipeline``,
``plan_single_stage_chunk`` mirrors ``HeliosPipeline``). A plan is a pytree: its *layout* (solver,
shapes, step counts, guidance mode) is static and keys the compiled program; its per-stage arrays
(model timesteps, solver coefficients, zero-init flags, renoise weights, block-noise factor) are
traced, so the next chunk with the same step counts reuses the compiled program whatever its
schedule values. The distilled model's amplified first chunk has twice the steps: a different
layout, hence its own program, with no branch inside the loop.

The model is a static callable ``model_fn(model_args, latents, timestep, context) -> flow`` with
``model_args`` a traced pytree (weights, history latents and indices), so weights are never baked
into the program. ``model_fn`` and ``context_fn`` key the compiled program, so give callables that hash
and compare by value (a module-level function, or a frozen dataclass of configs with ``__call__``, as the
pipeline's ``Denoiser`` and ``TextContext``): a new ``functools.partial`` or closure per call is a new key,
and compiles the chunk again. All randomness is the explicit :class:`ChunkNoise`; ``noise_shapes`` tells a
caller exactly what to draw and ``draw_chunk_noise`` draws it from a ``jax.random`` key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.sampling.dmd import DMDTable, dmd_step, dmd_table
from helios_jax.sampling.euler import EulerTable, euler_step, euler_table
from helios_jax.sampling.guidance import GUIDANCE_MODES, cfg, cfg_zero_star
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
from helios_jax.sampling.schedule import Schedule, SchedulerConfig, make_schedule, read_scheduler_config, shift_for
from helios_jax.sampling.step_cache import CacheArrays, decide, initial_state, magnitude_ratio
from helios_jax.sampling.unipc import UniPCTable, unipc_init, unipc_step, unipc_table

ModelFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
# ``context_fn(model_args, context) -> what model_fn takes as its context``, once per chunk (e.g. text K/V).
ContextFn = Callable[[Any, jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """The static part of a plan: everything that fixes the compiled program."""

    solver: str  # "unipc", "euler" or "dmd"
    latent_shape: tuple[int, int, int, int, int]  # (B, C, T, H, W) at full resolution
    stage_steps: tuple[int, ...]  # model calls per stage (DMD's amplified first chunk doubles them)
    patch: tuple[int, int]  # spatial patch of the block noise
    guidance: str  # "none", "cfg" or "cfg_zero_star"
    solver_order: int = 1
    prediction_type: str = "flow_prediction"
    predict_x0: bool = True
    model_dtype: str = "float32"  # the latents are cast to it for the model, the block noise rounded to it
    batch_cfg: bool = False  # run the conditional and unconditional predictions as one doubled batch

    @property
    def stage_sizes(self) -> tuple[tuple[int, int], ...]:
        return stage_sizes(self.latent_shape[-2], self.latent_shape[-1], len(self.stage_steps))


class StageArrays(NamedTuple):
    """The traced per-stage inputs; the first three have a leading step axis."""

    model_timesteps: np.ndarray  # what the model is called with, float32
    zero_init: np.ndarray  # CFG-Zero*'s zero-init flag, bool
    steps: UniPCTable | EulerTable | DMDTable
    renoise: np.ndarray  # (alpha, beta) of the renoise entering this stage; unused for stage 0


@functools.partial(jax.tree_util.register_dataclass, data_fields=["stages", "block_factor"],
                   meta_fields=["layout"])
@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """Everything about sampling one chunk that is fixed on the host."""

    layout: ChunkLayout
    stages: tuple[StageArrays, ...]
    block_factor: np.ndarray | None  # Cholesky factor of the block covariance (float32); None for one stage


class ChunkNoise(NamedTuple):
    """The standard normal draws of one chunk.

    ``initial``: (B, C, T, H, W) at full resolution, the pipelines' ``prepare_latents`` draw.
    ``block``: one array per stage after the first, (B, C, T, h/ph, w/pw, ph*pw), the
    ``(block_number, block_size)`` draw of ``sample_block_noise`` in the same memory order.
    """

    initial: Any
    block: tuple[Any, ...]


class CachedChunk(NamedTuple):
    """What ``denoise_chunk_cached`` returns: the chunk's latents, whether they are all finite, the model calls
    it made (each a DiT forward, two with CFG unless batched), and per stage each step's measured magnitude
    ratio (steps,), 1 at a stage's first step; a calibration run (threshold 0) records these."""

    latents: jax.Array
    finite: jax.Array
    computed: jax.Array
    ratios: tuple[jax.Array, ...]


# ----------------------------------------------------------------------------- host: plans


def _solver_table(schedule: Schedule) -> UniPCTable | EulerTable | DMDTable:
    kind = schedule.config.scheduler_type
    if kind == "unipc":
        return unipc_table(schedule)
    if kind == "euler":
        return euler_table(schedule)
    return dmd_table(schedule)


def _spatial_patch(patch_size: Sequence[int]) -> tuple[int, int]:
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"patch_size = {tuple(patch_size)}: expected the transformer's (t, h, w) patch")
    return int(patch_size[1]), int(patch_size[2])


def _check_latent_shape(latent_shape: Sequence[int], num_stages: int, patch: tuple[int, int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in latent_shape)
    if len(shape) != 5 or min(shape) < 1:
        raise ValueError(f"latent_shape = {tuple(latent_shape)}: expected five positive sizes (B, C, T, H, W)")
    height, width = shape[-2:]
    factor = 2 ** (num_stages - 1)
    if height % factor or width % factor:
        raise ValueError(
            f"latent size {height}x{width} must be divisible by 2^(stages - 1) = {factor} so that the "
            f"{num_stages}-stage pyramid returns to full size; choose a height and width divisible by {8 * factor}"
        )
    for h, w in stage_sizes(height, width, num_stages)[1:]:
        block_noise_shape((h, w), patch)
    return shape


def _check_guidance(guidance: str) -> None:
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"guidance = {guidance!r}: expected one of {GUIDANCE_MODES} (see guidance_mode)")


def _plan(config: SchedulerConfig, schedules: Sequence[Schedule], latent_shape: Sequence[int],
          patch_size: Sequence[int], guidance: str, truncate_timesteps: bool, zero_init_steps: int,
          model_dtype: Any, batch_cfg: bool) -> ChunkPlan:
    patch = _spatial_patch(patch_size)
    shape = _check_latent_shape(latent_shape, len(schedules), patch)
    if guidance != "cfg_zero_star":
        zero_init_steps = -1
    stages = []
    for s, schedule in enumerate(schedules):
        n = schedule.num_steps
        timesteps = np.trunc(schedule.timesteps) if truncate_timesteps else schedule.timesteps
        zero_init = np.arange(n) <= zero_init_steps if s == 0 else np.zeros(n, bool)
        alpha_beta = renoise_coefficients(config, s) if s > 0 else (0.0, 0.0)
        stages.append(StageArrays(timesteps.astype(np.float32), zero_init, _solver_table(schedule),
                                  np.array(alpha_beta, np.float32)))
    unipc = config.scheduler_type == "unipc"
    layout = ChunkLayout(
        solver=config.scheduler_type,
        latent_shape=shape,
        stage_steps=tuple(schedule.num_steps for schedule in schedules),
        patch=patch,
        guidance=guidance,
        solver_order=config.solver_order if unipc else 1,
        prediction_type=config.prediction_type if unipc else "flow_prediction",
        predict_x0=config.predict_x0 if unipc else True,
        model_dtype=jnp.dtype(model_dtype).name,
        batch_cfg=bool(batch_cfg) and guidance != "none",
    )
    # A single stage never renoises, so its gamma need not give a valid block covariance.
    factor = block_noise_factor(config.gamma, patch).astype(np.float32) if len(stages) > 1 else None
    return ChunkPlan(layout, tuple(stages), factor)


def plan_pyramid_chunk(
    scheduler_config: SchedulerConfig | Mapping[str, Any],
    stage_steps: Sequence[int],
    latent_shape: Sequence[int],
    *,
    patch_size: Sequence[int] = (1, 2, 2),
    guidance: str = "none",
    amplify_first_chunk: bool = False,
    zero_steps: int = 1,
    use_zero_init: bool = True,
    model_dtype: Any = jnp.float32,
    batch_cfg: bool = False,
) -> ChunkPlan:
    """The plan of one ``HeliosPyramidPipeline`` chunk.

    ``stage_steps`` is ``pyramid_num_inference_steps_list``; ``latent_shape`` the chunk's full
    latents (B, C, T, H, W); ``patch_size`` the transformer's. ``amplify_first_chunk`` is the
    pipeline's ``is_amplify_first_chunk and is_first_chunk`` (it only changes DMD schedules).
    ``zero_steps``/``use_zero_init`` are CFG-Zero*'s; the model is called with integer timesteps.
    """
    config = read_scheduler_config(scheduler_config)
    _check_guidance(guidance)
    if len(stage_steps) != config.stages:
        raise ValueError(
            f"stage_steps = {tuple(stage_steps)}: the scheduler has {config.stages} stages, so give one step "
            f"count per stage"
        )
    shape = _check_latent_shape(latent_shape, config.stages, _spatial_patch(patch_size))
    sizes = stage_sizes(shape[-2], shape[-1], config.stages)
    schedules = []
    for s, steps in enumerate(stage_steps):
        # The pipeline computes mu from the latents it holds when the stage begins, i.e. before
        # upsampling: stage s > 0 uses the size of stage s - 1.
        h, w = sizes[max(s - 1, 0)]
        mu = shift_for(config, shape[2] * h * w // math.prod(patch_size))
        stage_index = s if config.stages > 1 else None
        schedules.append(make_schedule(config, steps, stage_index, mu=mu, amplify_first_chunk=amplify_first_chunk))
    return _plan(config, schedules, shape, patch_size, guidance, True, zero_steps if use_zero_init else -1,
                 model_dtype, batch_cfg)


def plan_from_schedules(
    scheduler_config: SchedulerConfig | Mapping[str, Any],
    schedules: Sequence[Schedule],
    latent_shape: Sequence[int],
    *,
    patch_size: Sequence[int] = (1, 2, 2),
    guidance: str = "none",
    model_dtype: Any = jnp.float32,
) -> ChunkPlan:
    """A pyramid chunk's plan from schedules made elsewhere, one per stage (the ODE pairs' teacher
    schedule with the student's timesteps inserted); integer model timesteps, as ``plan_pyramid_chunk``."""
    config = read_scheduler_config(scheduler_config)
    _check_guidance(guidance)
    if len(schedules) != config.stages:
        raise ValueError(f"{len(schedules)} schedules for a scheduler of {config.stages} stages: give one per stage")
    return _plan(config, schedules, latent_shape, patch_size, guidance, True, -1, model_dtype, False)


def plan_single_stage_chunk(
    scheduler_config: SchedulerConfig | Mapping[str, Any],
    num_inference_steps: int,
    latent_shape: Sequence[int],
    *,
    patch_size: Sequence[int] = (1, 2, 2),
    sigmas: np.ndarray | None = None,
    guidance: str = "none",
    model_dtype: Any = jnp.float32,
    batch_cfg: bool = False,
) -> ChunkPlan:
    """The plan of one ``HeliosPipeline`` chunk: one full-resolution stage, float timesteps.

    ``sigmas`` default to the pipeline's ``linspace(0.999, 0, steps + 1)[:-1]``.
    """
    config = read_scheduler_config(scheduler_config)
    if config.stages != 1 or config.scheduler_type == "dmd":
        raise ValueError(
            f"HeliosPipeline samples with a single-stage UniPC or Euler scheduler; this config has "
            f"stages = {config.stages}, scheduler_type = {config.scheduler_type!r} (use plan_pyramid_chunk)"
        )
    _check_guidance(guidance)
    if guidance == "cfg_zero_star":
        raise ValueError("HeliosPipeline has no CFG-Zero*; use guidance='cfg' (or the pyramid pipeline)")
    shape = _check_latent_shape(latent_shape, 1, _spatial_patch(patch_size))
    if sigmas is None and isinstance(num_inference_steps, int) and num_inference_steps >= 1:
        sigmas = np.linspace(0.999, 0.0, num_inference_steps + 1)[:-1]
    mu = shift_for(config, math.prod(shape[2:]) // math.prod(patch_size))
    schedule = make_schedule(config, num_inference_steps, mu=mu, sigmas=sigmas)
    return _plan(config, [schedule], shape, patch_size, guidance, False, -1, model_dtype, batch_cfg)


def noise_shapes(plan: ChunkPlan) -> ChunkNoise:
    """The shapes of the noise a chunk needs, in a :class:`ChunkNoise` (all float32 standard normal)."""
    b, c, t, _, _ = plan.layout.latent_shape
    blocks = tuple(block_noise_shape((b, c, t, h, w), plan.layout.patch) for h, w in plan.layout.stage_sizes[1:])
    return ChunkNoise(plan.layout.latent_shape, blocks)


def draw_chunk_noise(key: jax.Array, plan: ChunkPlan) -> ChunkNoise:
    """Standard normal :class:`ChunkNoise` for ``plan`` from one ``jax.random`` key."""
    return _draw_noise(key, noise_shapes(plan))


@functools.partial(jax.jit, static_argnums=1)
def _draw_noise(key: jax.Array, shapes: ChunkNoise) -> ChunkNoise:
    def normal(k: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        # Drawn flat: XLA compiles the partitionable threefry of a 5-D+ shape very slowly on the CPU.
        return jax.random.normal(k, (math.prod(shape),), jnp.float32).reshape(shape)

    keys = jax.random.split(key, 1 + len(shapes.block))
    return ChunkNoise(normal(keys[0], shapes.initial), tuple(normal(k, s) for k, s in zip(keys[1:], shapes.block)))


# ----------------------------------------------------------------------------- device: the loop


def _model_contexts(context_fn: ContextFn | None, model_args: Any, layout: ChunkLayout, context: jax.Array,
                    negative_context: jax.Array | None) -> tuple[Any, ...]:
    """What ``model_fn`` is called with as its context, computed once per chunk rather than per step: the
    context alone, the doubled batch's (batch_cfg), or the conditional and unconditional ones."""
    def prepare(c: jax.Array) -> Any:
        return c if context_fn is None else context_fn(model_args, c)

    if layout.guidance == "none":
        return (prepare(context),)
    if layout.batch_cfg:
        return (prepare(jnp.concatenate([context, negative_context])),)
    return prepare(context), prepare(negative_context)


def _predict(model_fn: ModelFn, model_args: Any, layout: ChunkLayout, latents: jax.Array, timestep: jax.Array,
             contexts: tuple[Any, ...], guidance_scale: jax.Array, zero_init: jax.Array) -> jax.Array:
    """The (guided) flow prediction at one step (``contexts`` from ``_model_contexts``)."""
    x = latents.astype(layout.model_dtype)
    if layout.guidance == "none":
        return model_fn(model_args, x, timestep, contexts[0])
    if layout.batch_cfg:
        both = model_fn(model_args, jnp.concatenate([x, x]), jnp.concatenate([timestep, timestep]), contexts[0])
        cond, uncond = jnp.split(both, 2)
    else:
        cond = model_fn(model_args, x, timestep, contexts[0])
        uncond = model_fn(model_args, x, timestep, contexts[1])
    if layout.guidance == "cfg":
        return cfg(cond, uncond, guidance_scale)
    return cfg_zero_star(cond, uncond, guidance_scale, zero_init)


def _run_stage(model_fn: ModelFn, model_args: Any, layout: ChunkLayout, stage: StageArrays, latents: jax.Array,
               contexts: tuple[Any, ...], guidance_scale: jax.Array, record: bool = False,
               cache: CacheArrays | None = None) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """All steps of one stage under ``lax.scan``; the solver history is reset per stage. With ``record``
    the scan also returns the latents before each step, (steps, B, C, T, h, w); with ``cache`` (MagCache's rule,
    ``sampling.step_cache``) it returns each step's measured magnitude ratio (steps,) and the number of model
    calls; else None (nothing extra is traced, so the inference program is the same)."""
    start = latents  # DMD renoises towards the stage's start latents
    batch = latents.shape[0]

    def predict(x, timestep, zero_init):
        return _predict(model_fn, model_args, layout, x, jnp.full((batch,), timestep, jnp.float32), contexts,
                        guidance_scale, zero_init)

    def solve(x, state, flow, coefficients):
        if layout.solver == "unipc":
            new, state = unipc_step(coefficients, state, flow, x, prediction_type=layout.prediction_type,
                                    predict_x0=layout.predict_x0)
        elif layout.solver == "euler":
            new = euler_step(coefficients, flow, x)
        else:
            new = dmd_step(coefficients, flow, x, start)
        return new.astype(jnp.float32), state

    def step(carry, row):
        x, state = carry
        timestep, zero_init, coefficients = row
        return solve(x, state, predict(x, timestep, zero_init), coefficients), (x if record else None)

    def cached_step(carry, row):
        x, state, memo = carry
        timestep, zero_init, coefficients, index = row
        skip, decided = decide(cache, memo, index)
        flow = jax.lax.cond(skip, lambda: memo.flow, lambda: predict(x, timestep, zero_init))
        ratio = jnp.where(index > 0, magnitude_ratio(flow, memo.flow), 1.0)
        return (*solve(x, state, flow, coefficients), decided._replace(flow=flow)), ratio

    state = unipc_init(latents, layout.solver_order) if layout.solver == "unipc" else ()
    rows = (stage.model_timesteps, stage.zero_init, stage.steps)
    if cache is None:
        (latents, _), states = jax.lax.scan(step, (latents, state), rows)
        return latents, states, None
    flow = jax.eval_shape(predict, latents, stage.model_timesteps[0], stage.zero_init[0])
    steps = len(stage.model_timesteps)
    (latents, _, memo), ratios = jax.lax.scan(cached_step, (latents, state, initial_state(flow)),
                                              (*rows, jnp.arange(steps)))
    return latents, ratios, memo.computed


def _sample(model_fn: ModelFn, model_args: Any, plan: ChunkPlan, noise: ChunkNoise, context: jax.Array,
            negative_context: jax.Array | None, guidance_scale: jax.Array, context_fn: ContextFn | None,
            record: bool, cache: tuple[CacheArrays, ...] | None = None
            ) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array | None]:
    """The chunk's final latents; with ``record``, each stage's trajectory (see ``denoise_chunk_trajectory``),
    with ``cache`` each stage's measured ratios (see ``denoise_chunk_cached``); and the model calls with a cache."""
    layout = plan.layout
    contexts = _model_contexts(context_fn, model_args, layout, context, negative_context)
    latents = downsample_to_first_stage(noise.initial.astype(jnp.float32), len(plan.stages))
    per_stage, computed = [], None
    for s, stage in enumerate(plan.stages):
        if s > 0:
            block = block_noise(noise.block[s - 1].astype(jnp.float32), plan.block_factor, layout.patch)
            latents = renoise(upsample_nearest(latents), block.astype(layout.model_dtype),
                              stage.renoise[0], stage.renoise[1]).astype(jnp.float32)
        latents, ys, calls = _run_stage(model_fn, model_args, layout, stage, latents, contexts, guidance_scale, record,
                                        None if cache is None else cache[s])
        if record:
            per_stage.append(jnp.concatenate([ys, latents[None]]))
        if cache is not None:
            per_stage.append(ys)
            computed = calls if computed is None else computed + calls
    return latents, tuple(per_stage), computed


def _denoise_chunk(model_fn: ModelFn, model_args: Any, plan: ChunkPlan, noise: ChunkNoise, context: jax.Array,
                   negative_context: jax.Array | None, guidance_scale: jax.Array,
                   context_fn: ContextFn | None = None) -> tuple[jax.Array, jax.Array]:
    """The chunk's latents and whether they are all finite: computed in the program, so a caller that fetches
    the chunk anyway learns of a NaN without a host round trip per step."""
    latents = _sample(model_fn, model_args, plan, noise, context, negative_context, guidance_scale, context_fn, False)[0]
    return latents, jnp.isfinite(latents).all()


# The same program with the DiT's blocks streamed from host memory (``helios_jax.models.offload``). XLA:GPU's
# scheduler lets 2 asynchronous copies run beside compute by default; one layer's weights are 22 copies (more in
# fp8), so it put 20 of them before the layer's first GEMM, where nothing hides them (the compiled H100 plan,
# experiments/plans/lowmem_plan.py). With room for all of them, every copy spans the layer's compute.
STREAMED_COMPILER_OPTIONS = {"xla_gpu_experimental_parallel_async_compute_limit": 64}
_denoise_chunk_streamed = jax.jit(_denoise_chunk, static_argnames=("model_fn", "context_fn"),
                                  compiler_options=STREAMED_COMPILER_OPTIONS)
_denoise_chunk = jax.jit(_denoise_chunk, static_argnames=("model_fn", "context_fn"))  # both named jit__denoise_chunk


def _chunk_program(model_fn: ModelFn) -> Any:
    """The jitted chunk for ``model_fn``: the streamed variant when its DiT's blocks live in host memory."""
    return _denoise_chunk_streamed if getattr(getattr(model_fn, "model", None), "offload", False) else _denoise_chunk


@functools.partial(jax.jit, static_argnames=("model_fn", "context_fn"))
def _denoise_chunk_cached(model_fn: ModelFn, model_args: Any, plan: ChunkPlan, noise: ChunkNoise,
                          context: jax.Array, negative_context: jax.Array | None, guidance_scale: jax.Array,
                          cache: tuple[CacheArrays, ...], context_fn: ContextFn | None = None) -> CachedChunk:
    latents, ratios, computed = _sample(model_fn, model_args, plan, noise, context, negative_context, guidance_scale,
                                        context_fn, False, cache)
    return CachedChunk(latents, jnp.isfinite(latents).all(), computed, ratios)


@functools.partial(jax.jit, static_argnames=("model_fn", "context_fn"))
def _denoise_chunk_recorded(model_fn: ModelFn, model_args: Any, plan: ChunkPlan, noise: ChunkNoise,
                            context: jax.Array, negative_context: jax.Array | None, guidance_scale: jax.Array,
                            context_fn: ContextFn | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    return _sample(model_fn, model_args, plan, noise, context, negative_context, guidance_scale, context_fn, True)[:2]


def _checked_negative(plan: ChunkPlan, noise: ChunkNoise, context: Any, negative_context: Any) -> Any:
    """Validate a chunk's inputs against its plan (shapes only); returns the negative context to use."""
    if not isinstance(plan, ChunkPlan):
        raise TypeError(f"plan must be a ChunkPlan (plan_pyramid_chunk / plan_single_stage_chunk); got {type(plan)}")
    layout = plan.layout
    expected = noise_shapes(plan)
    if not isinstance(noise, ChunkNoise) or len(noise.block) != len(expected.block):
        raise ValueError(f"noise must be a ChunkNoise with {len(expected.block)} block-noise arrays (see noise_shapes)")
    got = ChunkNoise(tuple(noise.initial.shape), tuple(tuple(z.shape) for z in noise.block))
    if got != expected:
        raise ValueError(f"noise shapes {got} do not match this plan's {expected}; draw them with noise_shapes(plan)")
    batch = layout.latent_shape[0]
    if context.ndim != 3 or context.shape[0] != batch:
        raise ValueError(f"context must be (B, S, D) text embeddings with B = {batch}; got shape {context.shape}")
    if layout.guidance == "none":
        return None
    if negative_context is None or negative_context.shape[0] != batch or negative_context.ndim != 3:
        raise ValueError(
            f"guidance {layout.guidance!r} needs negative_context of shape (B={batch}, S, D); got "
            f"{None if negative_context is None else negative_context.shape}"
        )
    if layout.batch_cfg and negative_context.shape != context.shape:
        raise ValueError(
            f"batch_cfg runs both contexts as one batch, so they need one shape; got {context.shape} and "
            f"{negative_context.shape} (pad them to one length, or plan with batch_cfg=False)"
        )
    return negative_context


def denoise_chunk(
    model_fn: ModelFn,
    model_args: Any,
    plan: ChunkPlan,
    noise: ChunkNoise,
    context: jax.Array,
    negative_context: jax.Array | None = None,
    guidance_scale: float | jax.Array = 1.0,
    context_fn: ContextFn | None = None,
) -> jax.Array:
    """Sample one chunk: every step of every stage, from noise to the chunk's (B, C, T, H, W) latents.

    ``model_fn(model_args, latents, timestep, context)`` returns the flow prediction for latents
    (B, C, T, h, w) at the stage's size, timesteps (B,) and text embeddings (B, S, D); it must be
    hashable (a module-level function or a ``functools.partial`` of one) and is called once per
    step, twice with CFG (or once on a doubled batch with ``batch_cfg``: then its batch is 2B and
    per-sample entries of ``model_args`` must be tiled by ``model_fn``). ``negative_context`` is
    needed with guidance; ``guidance_scale`` is traced, so changing it does not recompile.
    ``model_fn`` is a static argument compared by identity: build it once and reuse it for every
    chunk (a fresh ``functools.partial`` per call would compile the chunk again).

    ``context_fn(model_args, context)``, static and hashable like ``model_fn``, turns each text context
    into what ``model_fn`` takes, once per chunk instead of once per step (the pipeline's: the DiT's
    per-block text K/V, ``helios_jax.models.transformer.text_kv``); None passes the contexts as they are.
    """
    return denoise_chunk_checked(model_fn, model_args, plan, noise, context, negative_context, guidance_scale,
                                 context_fn)[0]


def denoise_chunk_checked(
    model_fn: ModelFn,
    model_args: Any,
    plan: ChunkPlan,
    noise: ChunkNoise,
    context: jax.Array,
    negative_context: jax.Array | None = None,
    guidance_scale: float | jax.Array = 1.0,
    context_fn: ContextFn | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``denoise_chunk``'s latents and a scalar bool, whether they are all finite, from the same compiled program
    (the pipeline checks it when it fetches the chunk: NaN weights or inputs are an error, not a blank video)."""
    negative_context = _checked_negative(plan, noise, context, negative_context)
    scale = jnp.asarray(guidance_scale, jnp.float32)
    return _chunk_program(model_fn)(model_fn, model_args, plan, noise, context, negative_context, scale, context_fn)


def denoise_chunk_trajectory(
    model_fn: ModelFn,
    model_args: Any,
    plan: ChunkPlan,
    noise: ChunkNoise,
    context: jax.Array,
    negative_context: jax.Array | None = None,
    guidance_scale: float | jax.Array = 1.0,
    context_fn: ContextFn | None = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """``denoise_chunk`` that also records every state: the chunk's latents and, per pyramid stage, the
    latents before each of its steps followed by the stage's output, float32 (steps + 1, B, C, T, h, w).

    The ODE pairs of stage-3 distillation (``helios_jax.training.ode``) are these states. It is its own
    compiled program; ``denoise_chunk``'s is untouched (it traces no recording).
    """
    negative_context = _checked_negative(plan, noise, context, negative_context)
    scale = jnp.asarray(guidance_scale, jnp.float32)
    return _denoise_chunk_recorded(model_fn, model_args, plan, noise, context, negative_context, scale, context_fn)


def denoise_chunk_cached(
    model_fn: ModelFn,
    model_args: Any,
    plan: ChunkPlan,
    noise: ChunkNoise,
    context: jax.Array,
    negative_context: jax.Array | None,
    guidance_scale: float | jax.Array,
    cache: Sequence[CacheArrays],
    context_fn: ContextFn | None = None,
) -> CachedChunk:
    """``denoise_chunk_checked`` with step caching (``sampling.step_cache``): one :class:`CacheArrays` per stage
    of the plan, its ratios one per step. The decision to skip is taken inside the program; the cache's arrays
    are traced, so a new calibration or threshold runs the same compiled program. Threshold 0 never skips and
    gives ``denoise_chunk``'s latents. Its own compiled program: ``denoise_chunk``'s is untouched."""
    negative_context = _checked_negative(plan, noise, context, negative_context)
    cache = tuple(cache)
    steps = plan.layout.stage_steps
    if len(cache) != len(steps) or any(tuple(np.shape(c.ratios)) != (n,) for c, n in zip(cache, steps)):
        raise ValueError(f"the step cache has ratios of shapes {[tuple(np.shape(c.ratios)) for c in cache]} for a "
                         f"plan of {steps} steps per stage: give one ratio per step of each stage")
    scale = jnp.asarray(guidance_scale, jnp.float32)
    return _denoise_chunk_cached(model_fn, model_args, plan, noise, context, negative_context, scale, cache,
                                 context_fn)


def lower_denoise_chunk(
    model_fn: ModelFn,
    model_args: Any,
    plan: ChunkPlan,
    noise: ChunkNoise,
    context: Any,
    negative_context: Any = None,
    guidance_scale: Any = None,
    context_fn: ContextFn | None = None,
    lowering_platforms: tuple[str, ...] | None = None,
) -> jax.stages.Lowered:
    """``denoise_chunk``'s program lowered, not run, so its plan can be read before (or without) a device.

    Any argument may be a ``jax.ShapeDtypeStruct``, also one whose sharding names a device that is not
    here (an H100 of ``jax.experimental.topologies``): nothing is allocated. ``guidance_scale`` None is
    an abstract float32 scalar. ``.compile()`` the result for its optimised HLO and memory plan.
    ``lowering_platforms`` (e.g. ``("cuda",)``) lowers for another platform than the arguments' devices: the
    host-memory placements of offloaded weights, which a deviceless topology's devices cannot carry, are
    lowered on this machine's devices for the GPU (experiments/plans/lowmem_plan.py compiles the result).
    """
    negative_context = _checked_negative(plan, noise, context, negative_context)
    scale = jax.ShapeDtypeStruct((), jnp.float32) if guidance_scale is None else guidance_scale
    traced = _chunk_program(model_fn).trace(model_fn, model_args, plan, noise, context, negative_context, scale,
                                            context_fn)
    return traced.lower(lowering_platforms=lowering_platforms)


def sample_chunk(
    model_fn: ModelFn,
    model_args: Any,
    plan: ChunkPlan,
    key: jax.Array,
    context: jax.Array,
    negative_context: jax.Array | None = None,
    guidance_scale: float | jax.Array = 1.0,
) -> jax.Array:
    """``denoise_chunk`` with the noise drawn from ``key`` (``draw_chunk_noise``)."""
    return denoise_chunk(model_fn, model_args, plan, draw_chunk_noise(key, plan), context, negative_context,
                         guidance_scale)
