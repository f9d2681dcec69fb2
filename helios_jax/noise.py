"""Where a generation's randomness comes from: one object the pipeline asks for every draw.

The pipeline asks in the reference pipelines' order (posterior samples of the conditioning encodes,
the noise-level draws, then per chunk the initial latents and each stage's block noise). The default
source splits a ``jax.random`` key; a test can hand in the reference's own draws instead and compare
the two pipelines number for number.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class NoiseSource(Protocol):
    def normal(self, shape: Sequence[int]) -> jax.Array:
        """Standard normal float32 of ``shape``."""

    def uniform(self, shape: Sequence[int]) -> jax.Array:
        """Uniform [0, 1) float32 of ``shape``."""


class KeyNoise:
    """Draws from a ``jax.random`` key, splitting off one subkey per draw (deterministic per seed)."""

    def __init__(self, key: jax.Array | int):
        self._key = jax.random.key(key) if isinstance(key, (int, np.integer)) else key

    def _next(self) -> jax.Array:
        self._key, sub = jax.random.split(self._key)
        return sub

    def normal(self, shape: Sequence[int]) -> jax.Array:
        return _normal(self._next(), tuple(int(s) for s in shape))

    def uniform(self, shape: Sequence[int]) -> jax.Array:
        return _uniform(self._next(), tuple(int(s) for s in shape))


@functools.partial(jax.jit, static_argnums=1)
def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # Drawn flat and reshaped: threefry over a 5-D+ shape compiles very slowly on the CPU.
    return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape)


@functools.partial(jax.jit, static_argnums=1)
def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.uniform(key, (math.prod(shape),), jnp.float32).reshape(shape)


class ReplayNoise:
    """Hands out pre-recorded draws in order (each reshaped to the shape asked for); for parity tests."""

    def __init__(self, draws: Sequence[np.ndarray]):
        self._draws = list(draws)
        self.used = 0

    def _take(self, shape: Sequence[int], kind: str) -> jax.Array:
        if self.used >= len(self._draws):
            raise IndexError(f"draw {self.used} ({kind} {tuple(shape)}) asked for, but only {len(self._draws)} were recorded")
        draw = np.asarray(self._draws[self.used], np.float32)
        if draw.size != math.prod(shape):
            raise ValueError(f"draw {self.used}: recorded {draw.shape}, asked for {kind} {tuple(shape)}")
        self.used += 1
        return jnp.asarray(draw.reshape(tuple(shape)))

    def normal(self, shape: Sequence[int]) -> jax.Array:
        return self._take(shape, "normal")

    def uniform(self, shape: Sequence[int]) -> jax.Array:
        return self._take(shape, "uniform")
