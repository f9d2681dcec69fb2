"""One generic training step and loop: a stage is a loss (or a few) plus a config, not a subclass.

A loss is ``loss_fn(trainable, frozen, batch, key) -> (loss, metrics)``. ``make_step`` turns one
or more of them into a jit-compiled, pure ``step(state, frozen, batch, key) -> (state, metrics)``:
gradients of every term (one forward and backward each, summed, as the official stage-2 sequential
variant accumulates its per-stage backwards), global-norm clipping and optax AdamW with the
official schedules, in ONE optimizer update. Every term is given the same key, so a draw the terms
share (stage 2's noise pyramid) is the same draw in each. jax.jit compiles it once per batch shape,
so once per data bucket.

``train`` runs a step over a data iterator with an orbax ``CheckpointManager`` (trainable params,
optimizer state, step and the grain iterator state in ``output_dir/checkpoint-STEP/``, the LoRA export
committed with them), resume from the newest complete checkpoint, a config-mismatch check on resume,
``metrics.jsonl``, a progress bar, and hooks for the LoRA export and validation videos.

On a mesh (``train(..., mesh=)``, ``helios_jax.parallel.make_mesh``) the frozen base, the trainables and
the optimizer state are split by the DiT's and the LoRA's sharding tables (``fsdp`` over the model
width, ``tensor`` over heads and MLP), each process's batch becomes its part of one global batch split
over ``data`` x ``fsdp``, and the step runs with the mesh current (attention runs context-parallel over
``context``). jit propagates the rest: XLA all-gathers each layer's weights and reduce-scatters their
gradients. Checkpoints are saved sharded and restored onto the shardings of the run that restores them,
so a run may resume on another mesh.

RNG: the key of step ``s`` on process ``p`` is ``fold_in(fold_in(key(seed), p), s)``. The official
code seeds every rank identically, so its timesteps, noise and drops repeat across GPUs (only the
data differs); here each process draws its own. Deriving the key from the step, rather than carrying
it in the state, makes a resumed run draw exactly what the uninterrupted run draws.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import time
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from grain import python as grain_python
from jax.experimental import multihost_utils

from helios_jax import parallel
from helios_jax.config import ConfigError
from helios_jax.diskspace import DiskFullError, check_free, disk_full_as_error, orbax_failures_quiet, tree_nbytes
from helios_jax.progress import Progress
from helios_jax.training import NonFiniteError
from helios_jax.training.completeness import CHECKPOINT_PREFIX, EXPORT_ITEM, MANIFEST, UNFINISHED_SUFFIX, incomplete
from helios_jax.training.ema import EMA_FOLDER, EmaConfig, EmaState
from helios_jax.video import PARTIALS_MADE

Params = Any
Batch = Any
LossFn = Callable[[Params, Params, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
SCHEDULES = ("constant", "constant_with_warmup")
STATE_ITEM, DATA_ITEM, EMA_ITEM = "state", "data", "ema"
METRICS_FILE, CONFIG_FILE = "metrics.jsonl", "config.json"
# Keys (and sections) that may change between a run and its resumption: they do not change what a step computes
# (output_dir among them: a run folder may be moved or copied, and resumed where it now is).
RESUMABLE_KEYS = ("output_dir", "training_config.max_train_steps", "training_config.resume_from_checkpoint",
                  "training_config.local_rank", "training_config.checkpointing_steps",
                  "training_config.checkpoints_total_limit", "mesh")
RESUMABLE_SECTIONS = ("validation_config",)
# With OptimizerConfig.skip_nonfinite: the metrics counting skipped updates, and how many in a row end the run
# (optax.apply_if_finite would apply the next one anyway, NaN included).
SKIPPED, NONFINITE_RUN, NONFINITE_PATIENCE = "skipped_steps", "nonfinite_run", 10


class TrainState(NamedTuple):
    """What a step updates and a checkpoint holds (besides the data iterator).

    Every state ``train`` runs (this one, :class:`EmaTrainState`, ``duel.DuelState``) has the same small
    protocol: ``step`` (steps so far), ``items()`` / ``from_items()`` (its checkpoint items), ``exported``
    (the trainables that each checkpoint exports and validation runs) and ``averaged`` (their EMA, exported
    beside them; None without)."""

    step: jax.Array
    trainable: Params
    opt_state: optax.OptState

    def items(self) -> dict[str, Any]:
        return {STATE_ITEM: self}

    @classmethod
    def from_items(cls, items: dict[str, Any]) -> "TrainState":
        return items[STATE_ITEM]

    @property
    def exported(self) -> Params:
        return self.trainable

    @property
    def averaged(self) -> Params | None:
        return None


class EmaTrainState(NamedTuple):
    """A single-player state with the EMA of its trainables (``Stage(ema=...)``, stage 3a): checkpoint items
    ``state`` (as without) and ``ema``."""

    train: TrainState
    ema: EmaState

    @property
    def step(self) -> jax.Array:
        return self.train.step

    def items(self) -> dict[str, Any]:
        return {STATE_ITEM: self.train, EMA_ITEM: self.ema.items()}

    @classmethod
    def from_items(cls, items: dict[str, Any]) -> "EmaTrainState":
        return cls(items[STATE_ITEM], EmaState.from_items(items[EMA_ITEM]))

    @property
    def exported(self) -> Params:
        return self.train.trainable

    @property
    def averaged(self) -> Params:
        return self.ema.params


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with the official names and defaults (stage 1); ``lr_scheduler`` one of SCHEDULES."""

    learning_rate: float = 5e-5
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    skip_nonfinite: bool = False  # skip (and count) updates with a non-finite gradient, as large runs do

    def __post_init__(self) -> None:
        numbers = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.type == "float"}
        bad = [f"{k} = {v!r}" for k, v in numbers.items() if not math.isfinite(v)]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: the optimizer's numbers must be finite")
        if self.lr_scheduler not in SCHEDULES:
            raise ConfigError(f"lr_scheduler = {self.lr_scheduler!r} is not supported: one of {SCHEDULES}")
        if self.lr_warmup_steps < 0 or self.learning_rate <= 0 or self.max_grad_norm <= 0:
            raise ConfigError(f"{self}: learning_rate and max_grad_norm must be > 0, lr_warmup_steps >= 0")


def learning_rate(cfg: OptimizerConfig) -> optax.Schedule:
    """The official schedules: "constant" ignores the warmup; "constant_with_warmup" rises linearly
    from 0 to the rate over ``lr_warmup_steps`` optimizer steps (diffusers' ``get_scheduler``)."""
    if cfg.lr_scheduler == "constant" or cfg.lr_warmup_steps == 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.linear_schedule(0.0, cfg.learning_rate, cfg.lr_warmup_steps)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then decoupled-weight-decay Adam (torch's AdamW) on the trainable tree; with
    ``skip_nonfinite`` inside ``optax.apply_if_finite``, which drops an update whose gradient is not finite."""
    optimizer = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(learning_rate(cfg), b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                    weight_decay=cfg.adam_weight_decay),
    )
    return optax.apply_if_finite(optimizer, NONFINITE_PATIENCE) if cfg.skip_nonfinite else optimizer


def nonfinite_counters(opt_state: Any) -> dict[str, jax.Array]:
    """The skipped updates so far and the current run of them, for an optimizer made with ``skip_nonfinite``
    (none otherwise): the loop lets a non-finite step pass only when these say it was skipped."""
    if not isinstance(opt_state, optax.ApplyIfFiniteState):
        return {}
    return {SKIPPED: opt_state.total_notfinite, NONFINITE_RUN: opt_state.notfinite_count}


def check_finite(step: int, metrics: dict[str, Any]) -> None:
    """One :class:`NonFiniteError` naming ``step`` and its non-finite metrics, unless the optimizer skipped
    the update (``skip_nonfinite``) and fewer than NONFINITE_PATIENCE in a row were skipped."""
    bad = sorted(k for k, v in metrics.items() if not np.all(np.isfinite(v)))
    if not bad:
        return
    runs = [int(v) for k, v in metrics.items() if k.endswith(NONFINITE_RUN)]
    if runs and 0 < max(runs) < NONFINITE_PATIENCE:
        return
    why = (f"{max(runs)} updates in a row were skipped" if runs else
           "set training_config.skip_nonfinite: true to skip such steps")
    raise NonFiniteError(f"step {step} gave a non-finite {', '.join(bad)}; stopped before writing a checkpoint "
                         f"of it ({why}): check the data for NaN/inf or lower the learning rate")


def init_state(trainable: Params, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0, float32 trainables (the fp32 masters of the mixed-precision policy), copied: the step
    donates its state, and the caller's arrays must survive that."""
    trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32), trainable)
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))


def cast_params(params: Params, dtype: Any = jnp.bfloat16,
                keep_fp32: Callable[[tuple[str, ...]], bool] = lambda path: False) -> Params:
    """``params`` in ``dtype`` except the modules ``keep_fp32(path)`` names (for the DiT:
    ``helios_jax.models.transformer.keeps_fp32``, the reference's ``_keep_in_fp32_modules``). The frozen
    base is stored so; a loss casts the float32 trainables so for its forward (bf16 compute, as the
    official autocast), and their gradients flow back to the float32 masters."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {p: v.astype(jnp.float32 if keep_fp32(p) else dtype) for p, v in flat.items()})


def partition(variables: Params, mask: Params) -> tuple[Params, Params]:
    """(trainable, frozen) halves of a variables tree by a same-structure bool ``mask`` (e.g.
    ``helios_jax.models.lora.trainable_mask``); :func:`combine` puts them back together."""
    flat, keep = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(mask)
    half = lambda want: traverse_util.unflatten_dict({p: v for p, v in flat.items() if bool(keep[p]) == want})  # noqa: E731
    return half(True), half(False)


def combine(trainable: Params, frozen: Params) -> Params:
    """The variables tree of :func:`partition`'s two halves."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)})


def make_step(losses: LossFn | Sequence[LossFn], optimizer: optax.GradientTransformation,
              schedule: optax.Schedule, state_sharding: TrainState | EmaTrainState | None = None,
              ema: EmaConfig | None = None) -> Callable[[Any, Params, Batch, jax.Array], tuple[Any, dict]]:
    """The jit-compiled step over one loss or the terms of a sequential stage (see the module doc).
    ``state_sharding`` (a state of shardings, on a mesh) pins the new state to the old one's
    shardings, so the step compiles once and the donated buffers are reused. With ``ema`` the step takes
    and returns an :class:`EmaTrainState` and makes one EMA call after the update, in the same program.

    Metrics: ``loss`` (the mean of the terms' losses; each term's as ``loss_i`` when there are several),
    ``grad_norm`` (global norm before clipping, as accelerate reports it), ``lr`` (the rate this update
    used), the terms' own metrics (prefixed ``i/`` when there are several), and with ``ema`` the
    ``ema_decay`` its call used."""
    terms = (losses,) if callable(losses) else tuple(losses)

    def step(state: TrainState, frozen: Params, batch: Batch, key: jax.Array) -> tuple[TrainState, dict]:
        grads, metrics, values = None, {}, []
        for i, term in enumerate(terms):
            (loss, aux), g = jax.value_and_grad(term, has_aux=True)(state.trainable, frozen, batch, key)
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            values.append(loss.astype(jnp.float32))
            prefix = f"{i}/" if len(terms) > 1 else ""
            metrics.update({f"{prefix}{k}": v for k, v in aux.items()})
            if len(terms) > 1:
                metrics[f"loss_{i}"] = values[-1]
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        metrics.update(loss=jnp.mean(jnp.stack(values)), grad_norm=optax.global_norm(grads),
                       lr=jnp.asarray(schedule(state.step), jnp.float32), **nonfinite_counters(opt_state))
        return TrainState(state.step + 1, optax.apply_updates(state.trainable, updates), opt_state), metrics

    def averaging_step(state: EmaTrainState, frozen: Params, batch: Batch, key: jax.Array
                       ) -> tuple[EmaTrainState, dict]:
        train, metrics = step(state.train, frozen, batch, key)
        averaged, metrics["ema_decay"] = state.ema.update(ema, train.trainable)
        return EmaTrainState(train, averaged), metrics

    program = step if ema is None else averaging_step
    if state_sharding is None:
        return jax.jit(program, donate_argnums=0)
    replicated = parallel.replicated(jax.tree.leaves(state_sharding)[0].mesh)
    return jax.jit(program, donate_argnums=0, out_shardings=(state_sharding, replicated))


@functools.lru_cache(maxsize=8)
def compiled_step(losses: LossFn | tuple[LossFn, ...], cfg: OptimizerConfig, ema: EmaConfig | None = None
                  ) -> Callable:
    """``make_step`` for a stage, kept per (losses, optimizer config, EMA): a run resumed in the same process
    (a notebook, the tests) reuses the compiled step instead of compiling it again."""
    return make_step(losses, make_optimizer(cfg), learning_rate(cfg), ema=ema)


# {"params": DiT, "lora": LoRA, "heads": the GAN heads} trees and their optimizer state
TRAINING_RULES = parallel.LORA_RULES + parallel.DIT_RULES + parallel.DISCRIMINATOR_RULES


def shard_variables(tree: Params, mesh: jax.sharding.Mesh | None) -> Params:
    """A trainable or frozen tree (``{"params": ..., "lora": ...}``) placed on ``mesh`` by the DiT's and the
    LoRA's tables; unchanged without a mesh."""
    return tree if mesh is None else parallel.shard_params(tree, mesh, TRAINING_RULES)


def state_shardings(state: TrainState | EmaTrainState, mesh: jax.sharding.Mesh) -> TrainState | EmaTrainState:
    """Where a state lives on ``mesh``: trainables, the optimizer state (whose moments mirror the
    trainables' paths) and the EMA by the sharding tables, the counters replicated."""
    if isinstance(state, EmaTrainState):
        return EmaTrainState(state_shardings(state.train, mesh), EmaState(
            parallel.shardings(state.ema.params, mesh, TRAINING_RULES), parallel.replicated(mesh)))
    return TrainState(parallel.replicated(mesh), parallel.shardings(state.trainable, mesh, TRAINING_RULES),
                      parallel.shardings(state.opt_state, mesh, TRAINING_RULES))


def global_batch(batch: Batch, mesh: jax.sharding.Mesh | None) -> Batch:
    """This process's batch as its part of the global batch on ``mesh`` (leading axis over ``data`` x
    ``fsdp``; the global batch is the processes' batches in process order). Unchanged without a mesh."""
    if mesh is None:
        return batch

    def place(x):
        x = np.asarray(x)
        shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(parallel.batch_sharding(mesh, shape), x, shape)

    return jax.tree.map(place, batch)


def step_key(seed: int, step: int, process_index: int | None = None) -> jax.Array:
    """The key of one step on one process (see the module doc for the deviation from the original)."""
    process = jax.process_index() if process_index is None else process_index
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), process), step)


# ------------------------------------------------------------------------------------------ the loop


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The loop's settings (official names). ``config`` is the whole run's config as plain JSON: it is
    written to ``output_dir/config.json`` and compared on resume."""

    output_dir: str
    max_train_steps: int
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = "latest"
    validation_steps: int | None = None
    first_step_valid: bool = False
    seed: int = 0
    config: dict = dataclasses.field(default_factory=dict)
    progress: bool | None = None

    def __post_init__(self) -> None:
        for key in ("max_train_steps", "checkpointing_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} = {getattr(self, key)} must be a positive number of steps")


StepFn = Callable[[Any, Params, Batch, jax.Array], tuple[Any, dict]]
Export = Callable[[Params, str], None]
Validate = Callable[[Params, Params, int, str], None]


class StepProgram(Protocol):
    """What :func:`train` runs: a one-player :class:`Stage` or a two-player ``duel.Duel``, the loop knowing
    neither. ``setup`` places the first state (on ``mesh``, if any) and returns it with the host's choice of
    compiled ``step(state, frozen, batch, key) -> (state, metrics)`` for each global step; ``headline``
    names the metric the progress bar shows; ``export(trainable, folder)`` writes extra files into each
    checkpoint folder (the LoRA), ``validate(trainable, frozen, step, folder)`` writes validation videos."""

    headline: str
    export: Export | None
    validate: Validate | None

    def setup(self, trainable: Params, mesh: jax.sharding.Mesh | None) -> tuple[Any, Callable[[int], StepFn]]: ...


def _hook() -> Any:
    """A hook field: not part of a program's value, so a program prepared again compares equal (a cache key)."""
    return dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A one-player stage: its loss terms and optimizer settings (a :class:`StepProgram`). ``ema``: an EMA
    of the trainables, one call per step in the same program (stage 3a), which ``export`` also writes, into
    ``checkpoint-STEP/model_ema/``. The losses should compare by value (:class:`Bound`, frozen dataclasses)
    so that a stage prepared again finds its compiled step (:func:`compiled_step`)."""

    losses: LossFn | Sequence[LossFn]
    optimizer: OptimizerConfig
    export: Export | None = _hook()
    validate: Validate | None = _hook()
    ema: EmaConfig | None = None
    headline = "loss"

    def setup(self, trainable: Params, mesh: jax.sharding.Mesh | None
              ) -> tuple[TrainState | EmaTrainState, Callable[[int], StepFn]]:
        """The state and the (one) step program of the loss terms."""
        losses = self.losses if callable(self.losses) else tuple(self.losses)
        state = init_state(shard_variables(trainable, mesh), make_optimizer(self.optimizer))
        if self.ema is not None:
            state = EmaTrainState(state, EmaState.start(state.trainable))
        if mesh is None:
            step_fn = compiled_step(losses, self.optimizer, self.ema)
        else:
            placement = state_shardings(state, mesh)
            state = jax.device_put(state, placement)
            step_fn = make_step(losses, make_optimizer(self.optimizer), learning_rate(self.optimizer), placement,
                                self.ema)
        return state, lambda step: step_fn


@dataclasses.dataclass(frozen=True)
class Bound:
    """``fn`` with its leading (static) arguments bound: a ``functools.partial`` that compares and hashes by
    value, so that the step programs built from a recipe prepared again in the same process are found in
    the compile caches (the bound arguments must compare by value too: frozen dataclasses, flax modules)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]

    def __call__(self, *rest: Any) -> Any:
        return self.fn(*self.args, *rest)


def bind(fn: Callable[..., Any], *args: Any) -> Bound:
    """``Bound(fn, args)``: ``bind(f, a, b)(x) == f(a, b, x)``."""
    return Bound(fn, args)


class _CheckpointNames(ocp.step.NameFormat):
    """``checkpoint-STEP`` folders, the official layout (orbax's standard format puts an underscore)."""

    def build_name(self, step: int) -> str:
        return f"{CHECKPOINT_PREFIX}{step}"

    def find_all(self, base_path: epath.PathLike) -> Iterator[ocp.step.Metadata]:
        base = epath.Path(base_path)
        if not base.exists():
            return iter(())
        found = []
        for path in base.iterdir():
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
            if match and ocp.step.is_path_finalized(path):
                found.append(ocp.step.Metadata(step=int(match[1]), path=path))
        return iter(sorted(found, key=lambda m: m.step))

    def find_step(self, base_path: epath.PathLike, step: int) -> ocp.step.Metadata:
        for metadata in self.find_all(base_path):
            if metadata.step == step:
                return metadata
        raise ValueError(f"no finished checkpoint for step {step} under {base_path}")


@dataclasses.dataclass
class ExportSave(ocp.args.CheckpointArgs):
    """The checkpoint item that exports files beside the orbax state: ``write(folder)`` writes them (the
    LoRA) into the checkpoint folder; None writes none (the manifest, empty, is still written)."""

    write: Callable[[str], None] | None = None


class ExportHandler(ocp.CheckpointHandler):
    """Writes a checkpoint's exported files while orbax saves it, into orbax's temporary folder, so that they
    are committed with the state by the one rename that finishes the checkpoint: the files go into the
    checkpoint folder itself (the official layout, where ``--lora`` finds them), their list into this item's
    ``files.json``, which ``completeness.incomplete`` checks. Only process 0 writes (every process saves)."""

    def save(self, directory: epath.Path, args: ExportSave) -> None:
        if jax.process_index() != 0:
            return
        root = os.fspath(directory.parent)
        before = _plain_files(root)
        if args.write is not None:
            args.write(root)
        files = sorted(_plain_files(root) - before)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))

    def restore(self, directory: epath.Path, args: Any = None) -> None:
        """Nothing to restore: the exported files are the trainables, which the state item holds."""
        return None


def _plain_files(root: str) -> set[str]:
    """The files an export may write under ``root``: its top-level files and those of ``model_ema/``, relative
    to ``root`` (the orbax item folders, written meanwhile by other threads, are not looked into)."""
    found = set()
    for entry in os.scandir(root):
        if entry.is_file():
            found.add(entry.name)
        elif entry.name == EMA_FOLDER:
            for folder, _, names in os.walk(entry.path):
                found.update(os.path.relpath(os.path.join(folder, n), root) for n in names)
    return found


def checkpoint_manager(run: RunConfig) -> ocp.CheckpointManager:
    """orbax's manager of ``output_dir``'s checkpoints. orbax finds the handlers of the state items and the
    data position by their save and restore arguments; the export item's is registered here. Unfinished
    writes a killed run left (orbax's temporary folders) are removed."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=run.checkpointing_steps, max_to_keep=run.checkpoints_total_limit,
        step_name_format=_CheckpointNames(), enable_async_checkpointing=False, create=True,
        cleanup_tmp_directories=True,
    )
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(EXPORT_ITEM, ExportSave, ExportHandler())
    return ocp.CheckpointManager(os.path.abspath(run.output_dir), options=options, handler_registry=registry)


def config_changes(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two JSON configs (added and removed keys too)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        changes = []
        for key in sorted(set(saved) | set(current)):
            name = f"{prefix}{key}"
            if name in RESUMABLE_KEYS or name in RESUMABLE_SECTIONS:
                continue
            if key not in saved or key not in current:
                changes.append(f"{name} ({'added' if key in current else 'removed'})")
            else:
                changes.extend(config_changes(saved[key], current[key], f"{name}."))
        return changes
    return [] if saved == current else [f"{prefix[:-1]}: {saved!r} -> {current!r}"]


def check_resumable(run: RunConfig) -> None:
    """One clear error, before anything is written, when ``output_dir`` holds a run of another config."""
    path = os.path.join(run.output_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except ValueError as err:
        raise ConfigError(
            f"{path} is damaged ({err}): it is the config of the run in {run.output_dir}. Put the run's config "
            f"back in it, or delete it to resume with this config (the checkpoints are kept)") from None
    changes = config_changes(saved, run.config)
    if changes:
        raise ConfigError(
            f"{run.output_dir} holds a run with another config ({path}); changed: {'; '.join(changes)}. "
            f"Resume with the same config, or choose a new output_dir"
        )


def _write_atomic(path: str, text: str) -> None:
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(partial, path)


def _resume_steps(manager: ocp.CheckpointManager, run: RunConfig) -> list[int]:
    """The steps to try resuming from, in order: a named ``checkpoint-STEP``, or every checkpoint newest first
    (``latest``), or none."""
    choice = run.resume_from_checkpoint
    if not choice:
        return []
    if choice == "latest":
        return sorted(manager.all_steps(), reverse=True)
    match = re.fullmatch(rf"(?:.*/)?{CHECKPOINT_PREFIX}(\d+)/?", choice)
    if not match or int(match[1]) not in manager.all_steps():
        raise ConfigError(f"resume_from_checkpoint = {choice!r}: no such checkpoint in {run.output_dir} "
                          f"(have {sorted(manager.all_steps())}); use 'latest' or an existing checkpoint-STEP")
    return [int(match[1])]


# What orbax, tensorstore and grain raise on a checkpoint with missing or damaged files: OSError, ValueError and
# KeyError, and, for an array whose data file is gone or cut short, a bare Exception ("Encountered error while
# reading array index"). Any failure to restore skips the checkpoint, its type and message given as the reason.
RESTORE_ERRORS = (Exception,)


def _resume(manager: ocp.CheckpointManager, run: RunConfig, state: Any, data: grain_python.DatasetIterator
            ) -> tuple[Any, int | None]:
    """The state restored from the newest complete checkpoint (``data`` moved to its position) and its step;
    ``(state, None)`` when there is none. An incomplete or damaged checkpoint is skipped with one warning saying
    why, and moved aside to ``checkpoint-STEP.incomplete`` (kept, not deleted; the run writes that step anew).
    A named ``resume_from_checkpoint`` that is incomplete, or checkpoints none of which is complete, is one
    ConfigError (a run is not started over by itself)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.items())
    skipped = []
    for step in _resume_steps(manager, run):
        folder = os.path.join(run.output_dir, f"{CHECKPOINT_PREFIX}{step}")
        reason = incomplete(folder, abstract)
        if reason is None:
            try:
                with orbax_failures_quiet():  # a damaged checkpoint is one reason below, not tensorstore's tracebacks
                    restored = manager.restore(step, args=ocp.args.Composite(
                        **{k: ocp.args.StandardRestore(v) for k, v in abstract.items()},
                        **{DATA_ITEM: grain_python.PyGrainCheckpointRestore(data)}))
            except RESTORE_ERRORS as err:  # noqa: BLE001 - see RESTORE_ERRORS
                reason = f"it does not restore ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]})"
        if reason is None:
            _move_aside(manager, run, skipped)
            return type(state).from_items({k: restored[k] for k in abstract}), step
        if run.resume_from_checkpoint != "latest":
            raise ConfigError(f"resume_from_checkpoint = {run.resume_from_checkpoint!r}: {folder} is incomplete: "
                              f"{reason}. Use 'latest' (the newest complete checkpoint) or another checkpoint-STEP")
        skipped.append((folder, reason))
    if skipped:
        raise ConfigError(
            f"{run.output_dir} holds no complete checkpoint to resume from: "
            + "; ".join(f"{os.path.basename(f)}: {r}" for f, r in skipped)
            + ". Set resume_from_checkpoint to null to start again from step 0, or choose a new output_dir")
    return state, None


def _move_aside(manager: ocp.CheckpointManager, run: RunConfig, skipped: list[tuple[str, str]]) -> None:
    """Rename each skipped checkpoint to ``checkpoint-STEP.incomplete`` (``-2``, ... if taken), which orbax does
    not see, and say so: the run may write that step again, and the user's files are kept."""
    for folder, reason in skipped:
        aside = f"{folder}.incomplete"
        n = 1
        while os.path.exists(aside):
            n += 1
            aside = f"{folder}.incomplete-{n}"
        if jax.process_index() == 0:
            os.rename(folder, aside)
        warnings.warn(f"resume: skipped {folder}: {reason}; moved it to {os.path.basename(aside)}", stacklevel=3)
    if skipped:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("helios-jax: incomplete checkpoints moved aside")
        manager.reload()


def _metric_record(step: int, metrics: dict, seconds: float) -> dict:
    record = {"step": step}
    record.update({k: float(v) for k, v in sorted(metrics.items())})
    record["seconds"] = seconds
    return record


def _metric_lines(path: str) -> list[tuple[str, dict]]:
    """``metrics.jsonl``'s complete lines with their records: a last line a kill cut short is left out."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    return [(line, json.loads(line)) for line in lines if line.strip()]


def _keep_metrics_until(path: str, step: int) -> None:
    """A resumed run continues ``metrics.jsonl`` from its checkpoint: later lines, and a half-written last
    line, are dropped."""
    if not os.path.isfile(path):
        return
    _write_atomic(path, "".join(line for line, record in _metric_lines(path) if record["step"] <= step))


def _tensorboard(folder: str):
    """flax's TensorBoard writer when its backend is installed; else None (metrics.jsonl is the record)."""
    try:
        from flax.metrics import tensorboard
    except ImportError:
        return None
    try:
        return tensorboard.SummaryWriter(folder)
    except Exception:  # noqa: BLE001 - the writer's backend (tensorflow) is missing or broken
        return None


def train(run: RunConfig, stage: StepProgram, trainable: Params, frozen: Params,
          data: grain_python.DatasetIterator, mesh: jax.sharding.Mesh | None = None) -> Any:
    """Train ``trainable`` for ``run.max_train_steps`` steps of ``stage``'s program over batches from ``data``
    (a grain iterator, whose position is checkpointed with the params), resuming from ``output_dir`` if
    asked; on ``mesh`` if given (see the module doc). Returns the last state (:class:`TrainState`, or
    :class:`EmaTrainState` with ``Stage.ema``, or the program's own, ``duel.DuelState`` for a duel)."""
    check_resumable(run)
    frozen = shard_variables(frozen, mesh)
    state, step_for = stage.setup(trainable, mesh)
    check_free(run.output_dir, tree_nbytes(state.items()))  # room for one checkpoint, before the first step
    manager = checkpoint_manager(run)
    state, start = _resume(manager, run, state, data)
    start = start or 0
    primary = jax.process_index() == 0  # one process writes the config, the metrics, the LoRA and the videos
    os.makedirs(run.output_dir, exist_ok=True)
    if primary and not os.path.isfile(os.path.join(run.output_dir, CONFIG_FILE)):
        _write_atomic(os.path.join(run.output_dir, CONFIG_FILE), json.dumps(run.config, indent=2, sort_keys=True))
    metrics_path = os.path.join(run.output_dir, METRICS_FILE)
    if primary:
        _keep_metrics_until(metrics_path, start)
    writer = _tensorboard(os.path.join(run.output_dir, "tensorboard")) if primary else None

    def validate(step: int) -> None:
        trainable, frozen_values = host_values(state.exported), host_values(frozen)  # every process gathers
        if primary:
            stage.validate(trainable, frozen_values, step, run.output_dir)

    if stage.validate and run.first_step_valid and start == 0:
        validate(0)

    def save(step: int, log: Any) -> None:
        """One checkpoint, committed as one unit (the state, the data position and the export, see
        ExportHandler), after the metrics up to its step are on disk."""
        write = None
        if stage.export:
            write = functools.partial(_export, stage.export, host_values(state.exported), host_values(state.averaged))
        if log is not None:
            os.fsync(log.fileno())
        folder = os.path.join(os.path.abspath(run.output_dir), f"{CHECKPOINT_PREFIX}{step}")
        unfinished = folder + UNFINISHED_SUFFIX
        needed = tree_nbytes(state.items())
        check_free(run.output_dir, needed)
        PARTIALS_MADE.add(unfinished)  # named by the CLI's interrupt report if it outlives the cleanup below
        try:
            with orbax_failures_quiet(), disk_full_as_error(folder, needed):
                manager.save(step, args=ocp.args.Composite(
                    **{k: ocp.args.StandardSave(v) for k, v in state.items().items()},
                    **{DATA_ITEM: grain_python.PyGrainCheckpointSave(data), EXPORT_ITEM: ExportSave(write)}),
                    force=True)
                manager.wait_until_finished()
        except BaseException as err:
            if isinstance(err, DiskFullError):
                _settle(manager)
            if primary:
                _remove_unfinished(run.output_dir, step)
            raise
        PARTIALS_MADE.discard(unfinished)

    log_file = open(metrics_path, "a", encoding="utf-8") if primary else contextlib.nullcontext()
    with log_file as log, Progress(run.max_train_steps - start, "training", unit="step",
                                      enabled=run.progress if primary else False, lines=100) as bar:
        for step in range(start, run.max_train_steps):
            try:
                batch = next(data)
            except StopIteration:
                warnings.warn(f"the data ran out after step {step}; stopping there", stacklevel=2)
                break
            began = time.perf_counter()
            with on_mesh(mesh):
                state, metrics = step_for(step)(state, frozen, global_batch(batch, mesh), step_key(run.seed, step))
            metrics = jax.device_get(metrics)
            record = _metric_record(step + 1, metrics, time.perf_counter() - began)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            check_finite(step + 1, metrics)
            if writer is not None:
                for name, value in record.items():
                    if name != "step":
                        writer.scalar(name, value, step + 1)
            bar.advance(note=f"{stage.headline} {record[stage.headline]:.4f}")
            if (step + 1) % run.checkpointing_steps == 0 or step + 1 == run.max_train_steps:
                save(step + 1, log)
            if stage.validate and run.validation_steps and (step + 1) % run.validation_steps == 0:
                validate(step + 1)
    manager.close()
    return state


def _export(export: Export, exported: Params, averaged: Params | None, folder: str) -> None:
    """A checkpoint's export into ``folder``: the trainables, and their EMA (if any) into ``model_ema/``."""
    export(exported, folder)
    if averaged is not None:
        export(averaged, os.path.join(folder, EMA_FOLDER))


def _remove_unfinished(output_dir: str, step: int) -> None:
    """What a failed save left of step ``step``'s checkpoint: orbax's temporary folder (``checkpoint-STEP`` plus
    its temporary suffix, and a timestamp after it in other orbax versions)."""
    base = os.path.abspath(output_dir)
    for name in os.listdir(base):
        if name.startswith(f"{CHECKPOINT_PREFIX}{step}{UNFINISHED_SUFFIX}"):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def _settle(manager: ocp.CheckpointManager) -> None:
    """After a failed save: orbax's writer threads finish and the manager closes, quietly (the failure is
    already being reported, once), before the unfinished folder is removed."""
    for settle in (manager.wait_until_finished, manager.close):
        try:
            settle()
        except Exception:  # noqa: BLE001 - the same full disk, reported by the caller
            pass


def host_values(tree: Params) -> Params:
    """``tree`` readable on the host of every process: arrays split across processes are all-gathered
    (every process must call this); anything else is returned as is."""
    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)


def on_mesh(mesh: jax.sharding.Mesh | None) -> contextlib.AbstractContextManager:
    """``mesh`` as JAX's current mesh (the attention dispatch then splits over ``context``), or nothing."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def read_metrics(output_dir: str) -> list[dict]:
    """The records of ``output_dir/metrics.jsonl`` (without a last line a kill cut short)."""
    return [record for _, record in _metric_lines(os.path.join(output_dir, METRICS_FILE))]
