"""Sampling: host-side schedules (numpy) and jit-able steps, pyramid ops, guidance and the chunk loop."""

from helios_jax.sampling.chunk import (
    CachedChunk,
    ChunkLayout,
    ChunkNoise,
    ChunkPlan,
    StageArrays,
    denoise_chunk,
    denoise_chunk_cached,
    denoise_chunk_checked,
    denoise_chunk_trajectory,
    draw_chunk_noise,
    lower_denoise_chunk,
    noise_shapes,
    plan_from_schedules,
    plan_pyramid_chunk,
    plan_single_stage_chunk,
    sample_chunk,
)
from helios_jax.sampling.dmd import DMDTable, dmd_step, dmd_table
from helios_jax.sampling.euler import EulerTable, euler_step, euler_table
from helios_jax.sampling.guidance import cfg, cfg_zero_star, guidance_mode, optimized_scale
from helios_jax.sampling.pyramid import (
    block_noise,
    block_noise_factor,
    block_noise_shape,
    downsample_to_first_stage,
    renoise,
    renoise_coefficients,
    resize_bilinear,
    stage_sizes,
    upsample_nearest,
)
from helios_jax.sampling.schedule import (
    HeliosDMDSchedulerConfig,
    HeliosSchedulerConfig,
    Schedule,
    SchedulerConfig,
    calculate_shift,
    make_schedule,
    read_scheduler_config,
    shift_for,
    stage_sigmas,
)
from helios_jax.sampling.step_cache import CacheArrays, cache_arrays
from helios_jax.sampling.unipc import UniPCState, UniPCTable, convert_model_output, unipc_init, unipc_step, unipc_table

__all__ = [
    "CacheArrays", "CachedChunk", "cache_arrays", "denoise_chunk_cached",
    "ChunkLayout", "ChunkNoise", "ChunkPlan", "DMDTable", "EulerTable", "HeliosDMDSchedulerConfig",
    "HeliosSchedulerConfig", "Schedule", "SchedulerConfig", "StageArrays", "UniPCState", "UniPCTable",
    "block_noise", "block_noise_factor", "block_noise_shape", "calculate_shift", "cfg", "cfg_zero_star",
    "convert_model_output", "denoise_chunk", "denoise_chunk_checked", "denoise_chunk_trajectory", "dmd_step", "dmd_table", "downsample_to_first_stage",
    "draw_chunk_noise", "euler_step", "euler_table", "guidance_mode", "lower_denoise_chunk", "make_schedule", "noise_shapes",
    "optimized_scale", "plan_from_schedules", "plan_pyramid_chunk", "plan_single_stage_chunk", "read_scheduler_config", "renoise",
    "renoise_coefficients", "resize_bilinear", "sample_chunk", "shift_for", "stage_sigmas", "stage_sizes",
    "unipc_init", "unipc_step", "unipc_table", "upsample_nearest",
]
