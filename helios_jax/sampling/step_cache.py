"""Step caching inside the compiled chunk: MagCache's skip rule, decided per step on the device.

Why MagCache (Ma et al. 2025, also maxdiffusion's for Wan) and not TeaCache: its decision is a function of
per-step magnitude ratios recorded once per checkpoint (``||flow_i|| / ||flow_{i-1}||``, averaged over the
tokens), so a chunk's skip schedule is deterministic and the same for every prompt and chunk, and the number of
forwards follows from the calibration file alone. TeaCache decides from the current input's change through a
fitted polynomial: a per-content schedule, and a fit to make per model. Cache-DiT's DBCache runs the first
blocks every step and is a change to the DiT itself; this rule needs nothing from the model.

What is cached is the guided flow prediction, the quantity the solver consumes: with CFG the conditional and
unconditional forwards are skipped together (their combination is what a skip would reuse anyway), and a
skipped step runs the solver on the last computed flow. The rule, per pyramid stage (the cache never crosses
a stage: the latents change size), is MagCache's::

    the first ``retain`` steps are computed;
    then per step i: ratio *= r_i; error += |1 - ratio|; run += 1
        skip if error < threshold and run <= max_skips, else compute and reset ratio, error, run.

``threshold`` 0 never skips. No host code runs per step: the accumulators are the scan's carry and the model
call sits in a ``lax.cond``, so a skipped step costs no forward.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class CacheArrays(NamedTuple):
    """One stage's traced settings (a new calibration or threshold reuses the compiled chunk)."""

    ratios: jax.Array  # (steps,) float32: the calibrated magnitude ratio of step i's flow to step i-1's
    threshold: jax.Array  # () float32: the accumulated error below which a step is skipped
    max_skips: jax.Array  # () int32: the most consecutive skipped steps
    retain: jax.Array  # () int32: the first steps of the stage, always computed


class CacheState(NamedTuple):
    """The carry of MagCache's accumulators and the last computed flow."""

    flow: jax.Array
    ratio: jax.Array  # () float32: product of the ratios since the last computed step
    error: jax.Array  # () float32: accumulated |1 - ratio|
    run: jax.Array  # () int32: steps since the last computed one
    computed: jax.Array  # () int32: model calls so far


def cache_arrays(ratios, threshold: float, max_skips: int, retain: int) -> CacheArrays:
    """One stage's :class:`CacheArrays` from host values."""
    return CacheArrays(jnp.asarray(ratios, jnp.float32), jnp.asarray(threshold, jnp.float32),
                       jnp.asarray(max_skips, jnp.int32), jnp.asarray(retain, jnp.int32))


def initial_state(flow: jax.ShapeDtypeStruct) -> CacheState:
    """Nothing cached yet (step 0 is always computed: ``retain`` >= 1 is enforced by ``decide``)."""
    zero = jnp.zeros((), jnp.float32)
    return CacheState(jnp.zeros(flow.shape, flow.dtype), zero + 1.0, zero, jnp.zeros((), jnp.int32),
                      jnp.zeros((), jnp.int32))


def decide(arrays: CacheArrays, state: CacheState, index: jax.Array) -> tuple[jax.Array, CacheState]:
    """Whether step ``index`` reuses the cached flow, and the accumulators after it (MagCache's update)."""
    ratio = state.ratio * arrays.ratios[index]
    error = state.error + jnp.abs(1.0 - ratio)
    run = state.run + 1
    eligible = index >= jnp.maximum(arrays.retain, 1)
    skip = eligible & (error < arrays.threshold) & (run <= arrays.max_skips)
    one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
    return skip, state._replace(ratio=jnp.where(skip, ratio, one), error=jnp.where(skip, error, zero),
                                run=jnp.where(skip, run, 0), computed=state.computed + (~skip).astype(jnp.int32))


def magnitude_ratio(flow: jax.Array, previous: jax.Array) -> jax.Array:
    """MagCache's statistic: the mean over positions of ``||flow|| / ||previous||``, the norm over the channel
    axis (axis 1 of (B, C, T, H, W)); a position whose previous flow is zero (CFG-Zero*'s zero init) counts 1."""
    norm = jnp.linalg.norm(flow.astype(jnp.float32), axis=1)
    before = jnp.linalg.norm(previous.astype(jnp.float32), axis=1)
    return jnp.mean(jnp.where(before > 0, norm / jnp.where(before > 0, before, 1.0), 1.0))
