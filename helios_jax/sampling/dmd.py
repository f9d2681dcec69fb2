"""The distilled model's few-step rule, equal to ``HeliosDMDScheduler.step``.

Each step predicts the clean latents ``x0 = x - sigma * v`` and, unless it is the last step of the
stage, renoises them towards the next timestep with the *stage's start latents* as the noise:
``(1 - sigma_next) * x0 + sigma_next * start``. The reference finds both sigmas by looking up the
integer-truncated timestep among the schedule's timesteps; ``dmd_table`` does that lookup on the
host, so the device step is two multiply-adds.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.sampling.schedule import Schedule


class DMDTable(NamedTuple):
    """Per step: the sigma of the current timestep, and the renoise weights towards the next one
    (``keep = 1 - sigma_next``, ``noise = sigma_next``; 1 and 0 on the last step)."""

    sigma: np.ndarray
    keep: np.ndarray
    noise: np.ndarray


def _sigma_at(schedule: Schedule, timestep: float) -> float:
    """The reference's ``argmin(|timesteps - long(t)|)`` lookup of a timestep's sigma."""
    index = np.argmin(np.abs(schedule.timesteps - np.trunc(timestep)))
    return schedule.sigmas[index]


def dmd_table(schedule: Schedule) -> DMDTable:
    timesteps, n = schedule.timesteps, schedule.num_steps
    sigma = np.array([_sigma_at(schedule, t) for t in timesteps], np.float64)
    sigma_next = np.array([_sigma_at(schedule, timesteps[i + 1]) for i in range(n - 1)] + [0.0], np.float64)
    return DMDTable(sigma.astype(np.float32), (1 - sigma_next).astype(np.float32), sigma_next.astype(np.float32))


def dmd_step(row: DMDTable, model_output: jax.Array, sample: jax.Array, start: jax.Array) -> jax.Array:
    """One DMD step from ``sample`` given the flow prediction and the stage's start latents."""
    x0 = (sample.astype(jnp.float32) - row.sigma * model_output.astype(jnp.float32)).astype(model_output.dtype)
    prev = row.keep * x0.astype(jnp.float32) + row.noise * start.astype(jnp.float32)
    return prev.astype(start.dtype)
