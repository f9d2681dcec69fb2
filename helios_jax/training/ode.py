"""Stage 3a (docs/training.md §6): ODE pairs from a pyramid teacher, their grain dataset, the ODE-regression loss.

**ODE pairs** (``offload_ode_pairs``, ``helios-jax offload ode-pairs``): the teacher pipeline runs a prompt
over ``sections`` chunks as at inference (its own outputs are its history, first-frame anchor kept),
with UniPC, standard CFG and, per pyramid stage, the student's timesteps (2 per stage, 4 for the
history-free first section: the distilled model's amplified first chunk) *inserted* into the teacher's
``steps``-step schedule, then the whole stage schedule shifted (linear dynamic shift with ``mu`` of the
stage's own latent size), as the official ``pipeline_helios_ode.stage2_sample``. The sampler records the
state before every step and each stage's output (``sampling.denoise_chunk_trajectory``); only the states
at the student's timesteps and the stage output are kept. Inserted timesteps take the local sigma of the
nearest point of the dense 1000-point stage table, as the official. One safetensors file per prompt:
``latents_{k}_{s}`` (n + 1, 1, C, 9, h_s, w_s) float32 (the last = the teacher's end-of-stage latent),
``timesteps_{k}_{s}`` (n,) float32 for section k and stage s, ``prompt_embed`` (512, d), the prompt in
the metadata.

**The loss** (``ode_regression_loss``): per sample, ``sections`` of the K sections drawn without
replacement; per chosen section and stage one recorded state ``x`` at timestep ``t``;
``x0 = x - sigma'(t) f(x, t, prompt, history)`` regressed on the stage's end latent with 0.5 MSE, the
mean of the terms times ``weight``. The history of section k is teacher-forced: the 19 frames before it
in the teacher's final full-resolution chunks (zeros before the video), the anchor = section 0's first
frame (zero for k = 0), laid out as inference (``training.samples.history_inputs``). ``sigma'`` is the
sigma the teacher stepped from at ``t`` (the official looks it up in a 1000-point table).

Deviations from the official, on purpose (docs/training.md §13, items 7 and 15): every draw is per sample from the
step's explicit key (the official draws the sections with Python's ``random`` and the states unsynced,
identical streams on every rank); no EMA here (stage 3's EMA is the distillation trainer's).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from safetensors import safe_open

from helios_jax import hub
from helios_jax.checkpoint import PipelineSpec, read_checkpoint_configs
from helios_jax.convert.export import save_safetensors
from helios_jax.history import video_frames_per_chunk
from helios_jax.pipeline import HeliosPipeline
from helios_jax.prompts import DEFAULT_NEGATIVE_PROMPT
from helios_jax.request import check_request
from helios_jax.sampling import ChunkNoise, ChunkPlan, denoise_chunk_trajectory, plan_from_schedules
from helios_jax.sampling.pyramid import stage_sizes
from helios_jax.sampling.schedule import (
    HeliosDMDSchedulerConfig,
    HeliosSchedulerConfig,
    Schedule,
    SchedulerConfig,
    make_schedule,
    shift_for,
    stage_sigmas,
)
from helios_jax.training import DataError
from helios_jax.training.data import EpochDataset, shard
from helios_jax.training.samples import HISTORY_SIZES, LATENT_WINDOW, history_inputs

logger = logging.getLogger(__name__)
FORMAT = "helios-jax ode-pairs 1"
STUDENT_STEPS = (2, 2, 2)  # the distilled model's 2 + 2 + 2 steps (doubled for the first section)
_INSERT_TOLERANCE = 1e-4  # a student timestep this close to a teacher one is not inserted (the official's)

# ----------------------------------------------------------------------------- schedules


def teacher_scheduler(config: SchedulerConfig) -> HeliosSchedulerConfig:
    """The official teacher sampler: ``HeliosScheduler`` (UniPC, unshifted; the ODE pipeline shifts itself)
    with the checkpoint's pyramid (stages, ranges, gamma, shift)."""
    return HeliosSchedulerConfig(num_train_timesteps=config.num_train_timesteps, shift=config.shift,
                                 stages=config.stages, stage_range=tuple(config.stage_range), gamma=config.gamma)


def student_schedule(config: SchedulerConfig, stage: int, amplify: bool,
                     student_steps: Sequence[int] = STUDENT_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """The student's unshifted (timesteps, sigmas) of ``stage``: the DMD scheduler's on the same pyramid,
    doubled for the amplified first section (the official's hard-coded targets, e.g. 999, 871.26 for stage 0)."""
    dmd = HeliosDMDSchedulerConfig(num_train_timesteps=config.num_train_timesteps, shift=config.shift,
                                   stages=config.stages, stage_range=tuple(config.stage_range), gamma=config.gamma)
    schedule = make_schedule(dmd, student_steps[stage], stage, amplify_first_chunk=amplify)
    return schedule.timesteps, schedule.sigmas[:-1]


def linear_shift(sigmas: np.ndarray, mu: float) -> np.ndarray:
    """The linear dynamic shift ``mu s / (1 + (mu - 1) s)`` (``apply_schedule_shift``, "linear")."""
    return mu * sigmas / (1 + (mu - 1) * sigmas)


def stage_mu(config: SchedulerConfig, latent_shape: Sequence[int], patch: Sequence[int] = (1, 2, 2)) -> float:
    """``mu`` of latents (..., T, h, w) at their own resolution: tokens T h w / (patch)."""
    return shift_for(config, math.prod(latent_shape[-3:]) // math.prod(patch))


def stage_range(config: SchedulerConfig, stage: int) -> tuple[float, float]:
    """(t_min, t_max) of ``stage``'s dense timestep table: a shifted local sigma maps to
    ``t = t_min + sigma' (t_max - t_min)``."""
    dense_t = stage_sigmas(config).timesteps[stage]
    return float(dense_t.min()), float(dense_t.max())


def ode_schedule(config: HeliosSchedulerConfig, steps: int, stage: int, student: tuple[np.ndarray, np.ndarray],
                 latent_shape: Sequence[int], patch: Sequence[int] = (1, 2, 2)) -> tuple[Schedule, np.ndarray]:
    """The teacher's schedule of one stage with the ``student`` (timesteps, sigmas) inserted, then shifted;
    and the positions of the student's timesteps in it (the states the ODE pairs keep).

    Deviation: an inserted step keeps the student's own sigma, so after the shift it lands exactly on the
    student's shifted timestep (``distill.rollout_plan``). The official takes the sigma of the nearest point
    of the dense stage table instead, which puts it up to 0.12 timesteps off (834.08 for the student's
    833.96 in stage 0)."""
    base = make_schedule(config, steps, stage)
    t_min, t_max = stage_range(config, stage)
    times, sigmas = (np.asarray(a, np.float64) for a in student)
    new = np.array([np.all(np.abs(base.timesteps - t) >= _INSERT_TOLERANCE) for t in times], bool)
    merged_t = np.concatenate([base.timesteps, times[new]])
    merged_s = np.concatenate([base.sigmas[:-1], sigmas[new]])
    order = np.argsort(-merged_t, kind="stable")
    unshifted = merged_t[order]
    keep = np.array([int(np.argmin(np.abs(unshifted - t))) for t in times])
    shifted = linear_shift(np.concatenate([merged_s[order], base.sigmas[-1:]]), stage_mu(config, latent_shape, patch))
    timesteps = t_min + shifted[:-1] * (t_max - t_min)
    return dataclasses.replace(base, timesteps=timesteps, sigmas=shifted), keep


# ----------------------------------------------------------------------------- generation


@dataclasses.dataclass
class TrajectoryRecorder:
    """The teacher's chunk sampler (a ``pipeline.ChunkSampler``): plans with the ODE schedules (the student's
    timesteps inserted into the teacher's ``steps``-step stages) and the sampler's recording program; the
    chunk loop (history, anchor, noise order) is the pipeline's own. ``sections`` collects, per chunk, the
    states at the student's timesteps and each stage's output."""

    scheduler_config: HeliosSchedulerConfig
    patch: tuple[int, int, int]
    model_dtype: Any
    steps: int = 20
    student_steps: tuple[int, ...] = STUDENT_STEPS
    sections: list[list[dict[str, np.ndarray]]] = dataclasses.field(default_factory=list)
    # Per plan (its layout and step timesteps, by value): the kept step positions and timesteps, per stage.
    _keeps: dict[tuple, tuple] = dataclasses.field(default_factory=dict)

    @staticmethod
    def _key(plan: ChunkPlan) -> tuple:
        return plan.layout, tuple(np.asarray(stage.model_timesteps).tobytes() for stage in plan.stages)

    def plan(self, latent_shape: tuple[int, ...], guidance: str, amplify: bool) -> ChunkPlan:
        schedules, keeps = [], []
        for s, (h, w) in enumerate(stage_sizes(latent_shape[-2], latent_shape[-1], self.scheduler_config.stages)):
            student = student_schedule(self.scheduler_config, s, amplify, self.student_steps)
            schedule, keep = ode_schedule(self.scheduler_config, self.steps, s, student, (*latent_shape[:3], h, w),
                                          self.patch)
            schedules.append(schedule)
            keeps.append(keep)
        plan = plan_from_schedules(self.scheduler_config, schedules, latent_shape, patch_size=self.patch,
                                   guidance=guidance, model_dtype=self.model_dtype)
        kept = (tuple(keeps), tuple(s.timesteps for s in schedules))
        known = self._keeps.setdefault(self._key(plan), kept)
        if any(not np.array_equal(a, b) for a, b in zip((*known[0], *known[1]), (*kept[0], *kept[1]))):
            raise ValueError(f"two ODE plans sample the same steps but keep different ones ({self.steps} teacher "
                             f"steps absorb the student's {self.student_steps}); choose another teacher step count")
        return plan

    def denoise(self, model_fn: Any, model_args: Any, plan: ChunkPlan, noise: ChunkNoise, context: jax.Array,
                negative: jax.Array | None, guidance_scale: float, context_fn: Any) -> jax.Array:
        latents, trajectory = denoise_chunk_trajectory(model_fn, model_args, plan, noise, context, negative,
                                                       guidance_scale, context_fn)
        keeps, timesteps = self._keeps[self._key(plan)]
        section = []
        for states, keep, t in zip(trajectory, keeps, timesteps):
            rows = np.concatenate([keep, [states.shape[0] - 1]])
            section.append({"latents": np.asarray(states)[rows], "timesteps": t[keep].astype(np.float32)})
        self.sections.append(section)
        return latents


def load_teacher(folder: str, dtype: Any = jnp.bfloat16, steps: int = 20,
                 student_steps: Sequence[int] = STUDENT_STEPS, compilation_cache: bool = True) -> HeliosPipeline:
    """A pyramid checkpoint as the official teacher: UniPC (``teacher_scheduler``), plain CFG, and a
    :class:`TrajectoryRecorder` as its chunk sampler (``pipe.sampler``)."""
    pipe = HeliosPipeline.from_pretrained(folder, dtype=dtype, compilation_cache=compilation_cache)
    pipe.scheduler_config, pipe.spec = teacher_scheduler(pipe.scheduler_config), PipelineSpec(pyramid=True)
    pipe.sampler = TrajectoryRecorder(pipe.scheduler_config, tuple(pipe.transformer_config.patch_size),
                                      pipe.model_dtype, steps, tuple(student_steps))
    return pipe


def read_prompts(path: str) -> list[tuple[int, str]]:
    """(line index, prompt) of every non-blank line (the index names the file, as the official uttid)."""
    if not os.path.isfile(path):
        raise DataError(f"no prompt file at {path!r}: give a text file with one prompt per line")
    with open(path, encoding="utf-8") as f:
        prompts = [(i, line.strip()) for i, line in enumerate(f) if line.strip()]
    if not prompts:
        raise DataError(f"{path} holds no prompt (every line is blank): write one prompt per line")
    return prompts


def _sections(sections: int | None, num_frames: int | None) -> int:
    window = video_frames_per_chunk(LATENT_WINDOW)
    if sections is None and num_frames is None:
        sections = 5  # the official 165 frames
    if num_frames is not None:
        if num_frames < window or num_frames % window:
            raise DataError(f"num_frames = {num_frames} is not a whole number of {window}-frame sections; give "
                            f"a multiple of {window} (the official 165 = 5 sections) or --sections")
        if sections is not None and sections != num_frames // window:
            raise DataError(f"num_frames = {num_frames} is {num_frames // window} sections, not --sections {sections}")
        return num_frames // window
    if sections is None or isinstance(sections, bool) or not isinstance(sections, int) or sections < 1:
        raise DataError(f"sections = {sections!r}: expected an integer >= 1 (the official 5)")
    return sections


def ode_file_name(prompts_path: str, index: int) -> str:
    """``{prompt file stem}_{line:05d}.safetensors``, the official uttid."""
    return f"{os.path.splitext(os.path.basename(prompts_path))[0]}_{index:05d}.safetensors"


def offload_ode_pairs(teacher: str, prompts_path: str, output: str, *, sections: int | None = 5,
                      num_frames: int | None = None, height: int = 384, width: int = 640, steps: int = 20,
                      guidance_scale: float = 5.0, seed: int = 42, negative_prompt: str | None = None,
                      student_steps: Sequence[int] = STUDENT_STEPS, dtype: Any = jnp.bfloat16,
                      progress: bool | None = None, revision: str | None = None) -> list[str]:
    """Write one ODE-pair file per prompt of ``prompts_path`` into ``output`` (existing files kept); returns
    their paths. ``teacher`` is a folder or a hub id (at ``revision``). Every argument is checked before any
    weight is read."""
    count = _sections(sections, num_frames)
    teacher = hub.resolve(teacher, revision=revision)
    if not os.path.isdir(teacher):
        raise DataError(f"no teacher folder at {teacher!r}: give a diffusers pyramid checkpoint folder (Helios-Mid)")
    configs = read_checkpoint_configs(teacher)
    if not configs.spec.pyramid:
        raise DataError(f"{teacher} is a single-stage HeliosPipeline checkpoint: ODE pairs need a pyramid teacher "
                        "(HeliosPyramidPipeline, e.g. Helios-Mid)")
    scheduler = teacher_scheduler(configs.scheduler)
    if len(student_steps) != scheduler.stages:
        raise DataError(f"student_steps = {tuple(student_steps)}: give one count per stage ({scheduler.stages})")
    prompts = read_prompts(prompts_path)
    settings = dict(height=height, width=width, num_frames=count * video_frames_per_chunk(LATENT_WINDOW),
                    guidance_scale=guidance_scale, pyramid_num_inference_steps_list=(steps,) * scheduler.stages,
                    is_amplify_first_chunk=True)
    check_request(settings, pyramid=True, stages=scheduler.stages, scheduler_type="unipc")
    if os.path.exists(output) and not os.path.isdir(output):
        raise DataError(f"output {output!r} exists and is not a folder")

    pipe = load_teacher(teacher, dtype, steps, student_steps)
    negative = pipe.prompt_encoder.encode([negative_prompt or DEFAULT_NEGATIVE_PROMPT], dtype=pipe.model_dtype)
    os.makedirs(output, exist_ok=True)
    written = []
    for n, (index, prompt) in enumerate(prompts):
        path = os.path.join(output, ode_file_name(prompts_path, index))
        written.append(path)
        if os.path.exists(path):
            continue
        embeds = pipe.prompt_encoder.encode([prompt], dtype=pipe.model_dtype)
        pipe.sampler.sections.clear()
        pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, seed=seed, output_type="latent", progress=False,
             **settings)
        write_ode_pairs(path, pipe.sampler.sections, np.asarray(embeds[0]), prompt)
        if progress is not False:
            logger.info("ode-pairs %d/%d: %s", n + 1, len(prompts), os.path.basename(path))
    return written


# ----------------------------------------------------------------------------- files


def write_ode_pairs(path: str, sections: Sequence[Sequence[Mapping[str, np.ndarray]]], prompt_embed: np.ndarray,
                    prompt_raw: str) -> str:
    """One prompt's file, written atomically (see the module doc for the layout)."""
    tensors = {"prompt_embed": np.ascontiguousarray(prompt_embed)}
    for k, section in enumerate(sections):
        for s, stage in enumerate(section):
            tensors[f"latents_{k}_{s}"] = np.ascontiguousarray(stage["latents"], np.float32)
            tensors[f"timesteps_{k}_{s}"] = np.ascontiguousarray(stage["timesteps"], np.float32)
    meta = {"format": FORMAT, "prompt_raw": prompt_raw, "sections": str(len(sections)),
            "stages": str(len(sections[0]))}
    return save_safetensors(tensors, path, meta)


def read_ode_pairs(path: str) -> dict[str, Any]:
    """``sections[k][s] = {"latents", "timesteps"}``, ``prompt_embed`` (length, d) and ``prompt_raw``."""
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise DataError(f"{path}: not an ODE-pair file (format {meta.get('format')!r}, expected {FORMAT!r}); "
                                "write it with `helios-jax offload ode-pairs`")
            sections = [[{"latents": f.get_tensor(f"latents_{k}_{s}"), "timesteps": f.get_tensor(f"timesteps_{k}_{s}")}
                         for s in range(int(meta["stages"]))] for k in range(int(meta["sections"]))]
            embed = f.get_tensor("prompt_embed")
    except DataError:
        raise
    except Exception as err:  # safetensors raises several types for a bad or truncated file
        raise DataError(f"{path}: not a readable ODE-pair file ({err}); re-run `helios-jax offload ode-pairs`") from err
    return {"sections": sections, "prompt_embed": embed, "prompt_raw": meta.get("prompt_raw", "")}


def stack_sample(data: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One file as fixed-shape arrays for batching: per stage s ``states_s`` (K, P, C, T, h, w) (the kept
    states, zero-padded to the most any section has), ``timesteps_s`` (K, P), ``targets_s`` (K, C, T, h, w);
    ``counts`` (K, S) the states each section holds; ``prompt_embeds``."""
    sections = data["sections"]
    stages = len(sections[0])
    most = max(len(st["timesteps"]) for section in sections for st in section)
    out = {"counts": np.array([[len(st["timesteps"]) for st in section] for section in sections], np.int32)}
    for s in range(stages):
        states, times = [], []
        for section in sections:
            lat, t = section[s]["latents"][:, 0], section[s]["timesteps"]
            pad = most - len(t)
            states.append(np.concatenate([lat[:-1], np.zeros((pad, *lat.shape[1:]), np.float32)]))
            times.append(np.concatenate([t, np.zeros(pad, np.float32)]))
        out[f"states_{s}"] = np.stack(states)
        out[f"timesteps_{s}"] = np.stack(times)
        out[f"targets_{s}"] = np.stack([section[s]["latents"][-1, 0] for section in sections])
    out["prompt_embeds"] = data["prompt_embed"][0] if data["prompt_embed"].ndim == 3 else data["prompt_embed"]
    return out


def _shape_signature(path: str) -> tuple:
    """A file's tensor names and shapes, from its header alone (every file is read so before a run starts; a
    truncated or garbage file is one DataError here, not at the step that loads it)."""
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            signature = tuple(sorted((k, tuple(f.get_slice(k).get_shape())) for k in f.keys()))
    except Exception as err:  # safetensors raises several types for a bad or truncated file
        raise DataError(f"{path}: not a readable ODE-pair file ({err}); re-run `helios-jax offload ode-pairs`") from err
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: not an ODE-pair file; write it with `helios-jax offload ode-pairs`")
    return signature


class ODEPairDataset(EpochDataset):
    """Batches of ODE-pair files (``stack_sample`` arrays with a batch axis, plus ``index`` and ``epoch``):
    shuffled per epoch from ``seed + epoch``, this process's shard ``order[process_index::process_count]``,
    full batches only. ``iterator()`` is a checkpointable grain iterator (``get_state``/``set_state``)."""

    def __init__(self, roots: Sequence[str], *, batch_size: int = 1, seed: int = 42, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True, num_epochs: int | None = None):
        roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        missing = [r for r in roots if not os.path.isdir(r)]
        if missing:
            raise DataError(f"ODE-pair folder(s) {missing} do not exist: write them with `helios-jax offload ode-pairs`")
        if batch_size < 1 or not 0 <= process_index < process_count:
            raise DataError(f"batch_size = {batch_size}, process {process_index} of {process_count}: need "
                            "batch_size >= 1 and 0 <= process_index < process_count")
        self.files = [os.path.join(r, n) for r in roots for n in sorted(os.listdir(r)) if n.endswith(".safetensors")]
        if not self.files:
            raise DataError(f"no ODE-pair files (*.safetensors) in {roots}; run `helios-jax offload ode-pairs` first")
        signatures = {p: _shape_signature(p) for p in self.files}
        first = signatures[self.files[0]]
        odd = [p for p, sig in signatures.items() if sig != first]
        if odd:
            raise DataError(f"ODE-pair files of different layouts (sections, sizes) cannot be batched: {odd} differ "
                            f"from {self.files[0]}; keep one layout per data folder")
        self.batch_size, self.seed, self.shuffle, self.num_epochs = batch_size, seed, shuffle, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.batches_per_epoch = len(self.files) // process_count // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(self.files)} ODE-pair files: fewer than batch_size x processes = "
                            f"{batch_size} x {process_count}; lower the batch size or add prompts")

    def epoch_order(self, epoch: int) -> list[int]:
        """This process's file indices of ``epoch``, in order (whole batches only)."""
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.files)) if self.shuffle \
            else np.arange(len(self.files))
        return shard(order, self.process_index, self.process_count)[:self.batches_per_epoch * self.batch_size]

    epoch_items = epoch_order

    def load(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
        epoch, index = item
        return {**stack_sample(read_ode_pairs(self.files[index])), "index": np.int64(index), "epoch": np.int64(epoch)}


# ----------------------------------------------------------------------------- the loss


@dataclasses.dataclass(frozen=True)
class ODESettings:
    """The YAML's ODE keys: ``weight`` (``ode_regression_weight``), ``sections`` per step
    (``ode_num_latent_sections_*``), the training pyramid scheduler and the DiT's patch."""

    scheduler: HeliosSchedulerConfig
    weight: float = 80.0
    sections: int = 3
    patch: tuple[int, int, int] = (1, 2, 2)


class ODEDraws(NamedTuple):
    """What one step draws (``draw``)."""

    sections: jax.Array  # (B, n) sorted distinct section indices
    states: jax.Array  # (B, n, S) the recorded state of each chosen section and stage


def draw(key: jax.Array, counts: jax.Array, sections: int) -> ODEDraws:
    """Per sample: ``sections`` of the K sections without replacement (sorted) and, per chosen section and
    stage, a state index uniform in [0, count) (``counts`` (B, K, S))."""
    batch, total, _ = counts.shape
    if not 1 <= sections <= total:
        raise ValueError(f"ode sections per step = {sections}: the ODE pairs have {total} sections")
    k_sections, k_states = jax.random.split(key)
    chosen = jnp.sort(jnp.argsort(jax.random.uniform(k_sections, (batch, total)), axis=1)[:, :sections], axis=1)
    n = jnp.take_along_axis(counts, chosen[:, :, None], axis=1)
    u = jax.random.uniform(k_states, n.shape)
    return ODEDraws(chosen, jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1))


def teacher_context(targets: jax.Array, section: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x0 (B, C, 1, H, W) and history (B, C, 19, H, W) of ``section`` (B,) from the teacher's final
    full-resolution chunks ``targets`` (B, K, C, T, H, W): teacher-forced, zeros before the video."""
    b, k, c, t, h, w = targets.shape
    frames = jnp.moveaxis(targets, 1, 2).reshape(b, c, k * t, h, w)
    window = sum(HISTORY_SIZES)
    padded = jnp.concatenate([jnp.zeros((b, c, window, h, w), targets.dtype), frames], axis=2)
    history = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s * t, window, axis=1))(padded, section)
    x0 = jnp.where((section > 0)[:, None, None, None, None], frames[:, :, :1], 0.0)
    return x0, history


def stage_sigma(settings: ODESettings, stage: int, timestep: jax.Array) -> jax.Array:
    """sigma' of a recorded ``timestep`` (B,) of ``stage``, (B, 1, 1, 1, 1): the inverse of the map the
    schedule applied, ``(t - t_min) / (t_max - t_min)``, so exactly the sigma the teacher stepped from.
    (The official looks up the nearest point of the shifted 1000-point table: up to half a table step off.)"""
    t_min, t_max = stage_range(settings.scheduler, stage)
    return ((timestep.astype(jnp.float32) - t_min) / (t_max - t_min)).reshape(-1, 1, 1, 1, 1)


def ode_terms(net: Any, variables: Any, batch: Mapping[str, jax.Array], draws: ODEDraws,
              settings: ODESettings) -> jax.Array:
    """The 0.5 MSE of every (chosen section, stage), (n, S) averaged over the batch (``net`` as
    ``parts.StageModel``: ``net(variables, x, t, conditioning)`` and ``net.dtype``). The chosen sections
    run under ``lax.scan``, so the DiT is traced once per pyramid stage, not once per term."""
    stages = settings.scheduler.stages
    full = batch[f"targets_{stages - 1}"].astype(jnp.float32)
    rows = jnp.arange(full.shape[0])

    def section_terms(_, drawn):
        section, picks = drawn  # (B,), (B, S)
        x0, history = teacher_context(full, section)
        inputs = history_inputs(x0.astype(net.dtype), history.astype(net.dtype))
        cond = {"encoder_hidden_states": batch["prompt_embeds"].astype(net.dtype), **inputs}
        row = []
        for s in range(stages):
            x = batch[f"states_{s}"][rows, section, picks[:, s]].astype(jnp.float32)
            t = batch[f"timesteps_{s}"][rows, section, picks[:, s]].astype(jnp.float32)
            target = batch[f"targets_{s}"][rows, section].astype(jnp.float32)
            flow = net(variables, x.astype(net.dtype), t, cond).astype(jnp.float32)
            x0_hat = x - stage_sigma(settings, s, t) * flow
            row.append(0.5 * jnp.mean((x0_hat - target) ** 2))
        return None, jnp.stack(row)

    _, terms = jax.lax.scan(section_terms, None, (draws.sections.T, jnp.moveaxis(draws.states, 1, 0)))
    return terms


def ode_regression_loss(net: Any, settings: ODESettings, trainable: Any, frozen: Any, batch: Mapping[str, jax.Array],
                        key: jax.Array) -> tuple[jax.Array, dict]:
    """Stage 3a as a ``trainer.LossFn`` (bind ``net`` and ``settings``): ``weight`` x the mean of the terms."""
    draws = draw(key, batch["counts"], settings.sections)
    terms = ode_terms(net, net.variables(trainable, frozen), batch, draws, settings)
    return settings.weight * jnp.mean(terms), {"ode_mse": jnp.mean(terms)}


def check_pairs(dataset: ODEPairDataset, config: Any, settings: ODESettings) -> None:
    """The ODE pairs must fit the model and the recipe: latent channels, 9 frames a section, one entry per
    pyramid stage, at least ``settings.sections`` sections, prompt embeddings of the DiT's text width."""
    first = dataset.load((0, 0))
    total, stages = first["counts"].shape
    channels, window = first[f"targets_{stages - 1}"].shape[1:3]
    problems = []
    if stages != settings.scheduler.stages:
        problems.append(f"{stages} pyramid stages, the recipe's scheduler has {settings.scheduler.stages}")
    if channels != config.in_channels or window != LATENT_WINDOW:
        problems.append(f"latents of {channels} channels x {window} frames; the transformer takes "
                        f"{config.in_channels} x {LATENT_WINDOW}")
    if total < settings.sections:
        problems.append(f"{total} sections, fewer than the {settings.sections} drawn per step "
                        "(ode_num_latent_sections_max)")
    if first["prompt_embeds"].shape[-1] != config.text_dim:
        problems.append(f"prompt embeddings of width {first['prompt_embeds'].shape[-1]}, the DiT's text_dim is "
                        f"{config.text_dim}")
    if problems:
        raise DataError(f"{dataset.files[0]}: " + "; ".join(problems) + " (write the ODE pairs with this model's "
                        "teacher, or fix the recipe)")
