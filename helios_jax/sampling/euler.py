"""The flow-matching Euler step, equal to ``HeliosScheduler.step_euler``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.sampling.schedule import Schedule


class EulerTable(NamedTuple):
    """``sigma[i+1] - sigma[i]`` per step, taken in the schedule's dtype as the reference does."""

    dsigma: np.ndarray


def euler_table(schedule: Schedule) -> EulerTable:
    sigmas = schedule.sigmas
    return EulerTable((sigmas[1:] - sigmas[:-1]).astype(np.float32))


def euler_step(row: EulerTable, model_output: jax.Array, sample: jax.Array) -> jax.Array:
    """``x + (sigma_next - sigma) * v`` in float32, returned in the model output's dtype (as the
    reference casts it back)."""
    prev = sample.astype(jnp.float32) + row.dsigma * model_output
    return prev.astype(model_output.dtype)
