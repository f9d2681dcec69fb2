"""The EMA of a stage's trainables (docs/training.md §9.3, the official ``EMAModel_Zero3``), shared by the
single-player loop (stage 3a: an EMA call every step) and the two-player one (stage 3b: every step before
``start_step``, then on generator steps only, so the warm-up counts generator steps).

Only the trainable subtree is averaged: the frozen base is one shared copy. The EMA is what the official
merges into its released checkpoints, so each checkpoint exports it beside the trained LoRA
(``checkpoint-STEP/model_ema/``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

EMA_FOLDER = "model_ema"  # checkpoint-STEP/model_ema/: the EMA's LoRA (the official folder name)


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    """Official ``ema_decay`` / ``ema_start_step`` (its ``update_after_step``)."""

    decay: float = 0.99
    start_step: int = 750


def ema_decay(count: int | jax.Array, decay: float = 0.99, update_after: int = 750) -> jax.Array:
    """The official warm-up (``EMAModel_Zero3.get_decay``) at the ``count``-th EMA update (1-based):
    ``s = count - update_after - 1``; 0 (a copy) while ``s <= 0``, else ``min((1 + s) / (10 + s), decay)``."""
    s = jnp.maximum(jnp.asarray(count, jnp.float32) - update_after - 1, 0.0)
    return jnp.where(s <= 0, 0.0, jnp.minimum((1 + s) / (10 + s), decay))


def ema_update(ema: Any, params: Any, count: int | jax.Array, decay: float = 0.99, update_after: int = 750) -> Any:
    """``e <- d e + (1 - d) p`` over the trainable subtree only (the frozen base is shared, never copied)."""
    return optax.incremental_update(params, ema, 1.0 - ema_decay(count, decay, update_after))


class EmaState(NamedTuple):
    """The EMA tree and its call count (a checkpoint item ``ema``: ``{"params", "count"}``)."""

    params: Any
    count: jax.Array

    @classmethod
    def start(cls, trainable: Any) -> "EmaState":
        """Step 0: the EMA is a float32 copy of the trainables."""
        return cls(jax.tree.map(jnp.copy, trainable), jnp.zeros((), jnp.int32))

    def update(self, cfg: EmaConfig, trainable: Any, due: jax.Array | bool = True) -> tuple["EmaState", jax.Array]:
        """One EMA call when ``due`` (a traced bool; otherwise unchanged), and the decay it used (-1: none)."""
        due = jnp.asarray(due)
        count = self.count + due.astype(jnp.int32)
        updated = ema_update(self.params, trainable, count, cfg.decay, cfg.start_step)
        params = jax.tree.map(lambda new, old: jnp.where(due, new, old), updated, self.params)
        return EmaState(params, count), jnp.where(due, ema_decay(count, cfg.decay, cfg.start_step), -1.0)

    def items(self) -> dict[str, Any]:
        return {"params": self.params, "count": self.count}

    @classmethod
    def from_items(cls, item: dict[str, Any]) -> "EmaState":
        return cls(item["params"], item["count"])
