"""The official stages 1 and 2 as losses for the generic trainer, and a whole run built from a recipe.

A stage is a loss (or a few) plus a config (``helios_jax.training.trainer.Stage``), not a subclass:

* :func:`stage1_loss`: the history context dropped and corrupted (``history.prepare_context``), one
  flow-matching example per sample (``losses.stage1_example``), the mean squared velocity error;
* :func:`pyramid_losses`: the same context shared by every pyramid stage at full resolution,
  ``losses.pyramid_examples`` of the YAML's ``stage2_sample_ratios``; stage 2-post ("sequential") is one
  loss term per example (the trainer runs one forward and backward each and sums the gradients),
  stage 2-init ("packed", ``is_navit_pyramid``) one term, the mean of the examples' losses from ONE
  forward of the packed DiT (``models.packed``: the segments side by side, block-diagonal attention).

Mixed precision (``mixed_precision: bf16``): the frozen base is stored in bfloat16 but the modules the
reference keeps in float32; the float32 trainables are cast to bfloat16 for the forward, their
gradients flow back to the float32 masters; the loss is float32.

:func:`prepare` turns a checked :class:`~helios_jax.training.recipes.Recipe` into the arguments of
``trainer.train``: the transformer of ``model_config`` (a Helios DiT, or the Wan 2.1
``WanTransformer3DModel`` stage 1-init starts from: ``loading.load_transformer_init``) with a fresh
LoRA, the offloaded data of ``data_config``, the LoRA export of every checkpoint and the validation
videos of ``validation_config``.
Everything that can be checked (paths, resume, buckets against the model) is checked before the first
weight is read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from grain import python as grain_python

from helios_jax import parallel
from helios_jax.checkpoint import PipelineSpec, read_checkpoint_configs
from helios_jax.config import ConfigError, TransformerConfig
from helios_jax.generate import DEFAULT_NEGATIVE_PROMPT
from helios_jax.loading import COMPONENTS, transformer_component
from helios_jax.models import lora as lora_lib
from helios_jax.models.packed import packed_like
from helios_jax.models.transformer import HeliosTransformer, compute_dtype, keeps_fp32
from helios_jax.pipeline import HeliosPipeline
from helios_jax.prompts import PromptEncoder
from helios_jax.sampling.schedule import HeliosDMDSchedulerConfig, HeliosSchedulerConfig
from helios_jax.training import losses, ode, recipes, trainer
from helios_jax.training.data import OffloadedDataset
from helios_jax.training.history import LATENT_WINDOW, ContextConfig, CorruptionConfig, prepare_context
from helios_jax.training.recipes import Recipe
from helios_jax.training.validation import Validator

Params = Any
Batch = Mapping[str, jax.Array]
DTYPES = {"bf16": jnp.bfloat16, "no": jnp.float32}  # the YAML's mixed_precision


@dataclasses.dataclass(frozen=True)
class StageModel:
    """The DiT as a stage's losses call it: ``(trainable, frozen)`` made into one variables tree in the
    compute ``dtype``, and ``model_fn(variables, noisy, timestep, conditioning)`` (``losses.ModelFn``)."""

    model: HeliosTransformer
    dtype: Any = jnp.bfloat16
    lora_scale: float = 1.0

    def variables(self, trainable: Params, frozen: Params) -> Params:
        return trainer.combine(trainer.cast_params(trainable, self.dtype, keeps_fp32), frozen)

    def __call__(self, variables: Params, noisy: jax.Array, timestep: jax.Array,
                 conditioning: Mapping[str, jax.Array]) -> jax.Array:
        return self.model.apply(variables, noisy, timestep, **conditioning, lora_scale=self.lora_scale)

    def packed(self, variables: Params, noisy: Sequence[jax.Array], timesteps: Sequence[jax.Array],
               conditioning: Mapping[str, jax.Array]) -> list[jax.Array]:
        """Several segments (each its own resolution and timestep, one shared history) in ONE forward
        with block-diagonal attention (``losses.PackedModelFn``; stage 2-init's NaViT packing)."""
        return packed_like(self.model).apply(variables, list(noisy), list(timesteps), **conditioning,
                                             lora_scale=self.lora_scale)


def conditioning(batch: Batch, key: jax.Array, context: ContextConfig, dtype: Any) -> dict[str, jax.Array]:
    """The transformer's text and history inputs of one batch (``x0``, ``history``, ``prompt_embeds``):
    the context dropped and corrupted as the official step does, floats in the compute ``dtype``."""
    inputs = prepare_context(key, batch["x0"], batch["history"], context)
    inputs = {k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in inputs.items()}
    return {"encoder_hidden_states": batch["prompt_embeds"].astype(dtype), **inputs}


def stage1_loss(net: StageModel, context: ContextConfig, sampling: losses.TimestepSampling,
                trainable: Params, frozen: Params, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
    """Stage 1 (``trainer.LossFn``; bind the first three arguments with :func:`make_losses`)."""
    k_context, k_example = jax.random.split(key)
    example = losses.stage1_example(k_example, batch["target"], sampling)
    loss = losses.example_loss(net, net.variables(trainable, frozen), example,
                               conditioning(batch, k_context, context, net.dtype), net.dtype)
    return loss, {"sigma": jnp.mean(example.sigma)}


@dataclasses.dataclass(frozen=True)
class PyramidSettings:
    """Stage 2's training scheduler and sampling (``stage2_*`` keys and ``weighting_scheme``)."""

    schedule: losses.PyramidSchedule
    sample_ratios: tuple[int, ...]
    sampling: losses.TimestepSampling


def pyramid_loss(net: StageModel, context: ContextConfig, pyramid: PyramidSettings, which: int | None,
                 trainable: Params, frozen: Params, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
    """Stage 2: example ``which`` of the pyramid (a sequential term), or the mean over all in one packed
    forward (``None``). Every term of one step gets the same key, so all see the same context and noise
    pyramid."""
    k_context, k_example = jax.random.split(key)
    examples = losses.pyramid_examples(k_example, batch["target"], pyramid.schedule, pyramid.sample_ratios,
                                       pyramid.sampling)
    cond = conditioning(batch, k_context, context, net.dtype)
    variables = net.variables(trainable, frozen)
    if which is not None:
        example = examples[which]
        return (losses.example_loss(net, variables, example, cond, net.dtype),
                {"sigma": jnp.mean(example.sigma), "stage": jnp.asarray(example.stage, jnp.float32)})
    return losses.packed_pyramid_loss(net.packed, variables, examples, cond, net.dtype), {}


def make_losses(recipe: Recipe, net: StageModel) -> trainer.LossFn | tuple[trainer.LossFn, ...]:
    """The loss term(s) of the recipe's stage (hashable partials, so ``trainer.compiled_step`` caches them)."""
    t = recipe.section("training_config")
    context = context_config(t)
    sampling = losses.TimestepSampling(t["weighting_scheme"], t["logit_mean"], t["logit_std"])
    if recipe.stage == "stage1":
        return functools.partial(stage1_loss, net, context, sampling)
    if recipe.stage == "stage3_ode":
        return functools.partial(ode.ode_regression_loss, net, ode_settings(recipe, net.model.config))
    schedule = losses.PyramidSchedule.create(t["stage2_timestep_shift"], t["stage2_num_stages"],
                                             tuple(t["stage2_stage_range"]), t["stage2_scheduler_gamma"])
    pyramid = PyramidSettings(schedule, tuple(t["stage2_sample_ratios"]), sampling)
    if recipe.stage == "stage2_packed":
        return functools.partial(pyramid_loss, net, context, pyramid, None)
    return tuple(functools.partial(pyramid_loss, net, context, pyramid, i) for i in range(sum(pyramid.sample_ratios)))


def ode_settings(recipe: Recipe, config: TransformerConfig) -> ode.ODESettings:
    """Stage 3a's loss settings: the training pyramid scheduler (``stage2_*``, the shift's ``base_*`` keys),
    ``ode_regression_weight`` and the section count."""
    t = recipe.section("training_config")
    scheduler = HeliosSchedulerConfig(
        shift=t["stage2_timestep_shift"], stages=t["stage2_num_stages"], stage_range=tuple(t["stage2_stage_range"]),
        gamma=t["stage2_scheduler_gamma"], base_image_seq_len=t["base_seq_len"], max_image_seq_len=t["max_seq_len"],
        base_shift=t["base_shift"], max_shift=t["max_shift"])
    return ode.ODESettings(scheduler, t["ode_regression_weight"], t["ode_num_latent_sections_max"],
                           tuple(config.patch_size))


def context_config(training: Mapping[str, Any]) -> ContextConfig:
    """Random drops and history corruption from the YAML's ``training_config`` (no saturation: only the
    distillation rollouts saturate)."""
    return ContextConfig(
        random_drop=training["is_random_drop"], t2v_ratio=training["random_drop_t2v_ratio"],
        v2v_ratio=training["random_drop_v2v_ratio"], i2v_ratio=training["random_drop_i2v_ratio"],
        corruption=CorruptionConfig.from_training_config(training) if training["corrupt_history"] else None,
    )


# ------------------------------------------------------------------------------------------ a whole run


@dataclasses.dataclass
class Prepared:
    """What ``trainer.train`` takes, built from a recipe."""

    run: trainer.RunConfig
    stage: trainer.Stage
    trainable: Params
    frozen: Params
    data: grain_python.DatasetIterator
    config: TransformerConfig
    spec: lora_lib.LoraSpec
    mesh: jax.sharding.Mesh | None = None

    def train(self) -> trainer.TrainState:
        return trainer.train(self.run, self.stage, self.trainable, self.frozen, self.data, self.mesh)


def transformer_folder(recipe: Recipe) -> str:
    m = recipe.section("model_config")
    path = m["transformer_model_name_or_path"]
    return os.path.join(path, m["subfolder"]) if m["subfolder"] else path


def check_buckets(dataset: OffloadedDataset, config: TransformerConfig, stage: str) -> None:
    """Every bucket's latents must fit the model: the latent channels, 9 frames per section, sizes the
    patch (and, for the pyramid, its two halvings) divide; and the prompt embeddings' width."""
    _, ph, pw = config.patch_size
    factor = 4 if stage != "stage1" else 1
    for frames, height, width in dataset.buckets:
        h, w = height // 8, width // 8
        if h % (ph * factor) or w % (pw * factor):
            raise ConfigError(f"data bucket {height}x{width} (latents {h}x{w}): {stage} needs latent sizes divisible "
                              f"by {ph * factor}x{pw * factor}; offload at a resolution that is a multiple of "
                              f"{8 * ph * factor}")
    first = dataset.load(dataset[0])
    channels, window = first["target"].shape[0], first["target"].shape[1]
    if channels != config.in_channels or window != LATENT_WINDOW:
        raise ConfigError(f"{dataset.files[0].path}: latents of {channels} channels x {window} frames per section; "
                          f"the transformer takes {config.in_channels} x {LATENT_WINDOW}")
    if first["prompt_embeds"].shape[-1] != config.text_dim:
        raise ConfigError(f"{dataset.files[0].path}: prompt embeddings of width {first['prompt_embeds'].shape[-1]}; "
                          f"the transformer's text_dim is {config.text_dim} (offload with this model's text encoder)")


STAGE1_VALIDATION_SHIFT = 3.0  # the official stage-1 validation sampler: UniPC with flow_shift 3 (scheduler_config.json)


def validation_scheduler(recipe: Recipe) -> HeliosSchedulerConfig | HeliosDMDSchedulerConfig:
    """The sampler of the official validation: UniPC for stage 1 (flow_shift 3, which dynamic shifting
    replaces), the training pyramid scheduler of the YAML's ``stage2_*`` keys for stage 2."""
    t, v = recipe.section("training_config"), recipe.section("validation_config")
    shifting = dict(use_dynamic_shifting=v["use_dynamic_shifting"], time_shift_type=v["time_shift_type"])
    if recipe.stage == "stage3_ode":  # the student's sampler: DMD 2/2/2 on the training pyramid
        return HeliosDMDSchedulerConfig(shift=t["stage2_timestep_shift"], stages=t["stage2_num_stages"],
                                        stage_range=tuple(t["stage2_stage_range"]), gamma=t["stage2_scheduler_gamma"],
                                        **shifting)
    if recipe.stage == "stage1":
        shift = 1.0 if v["use_dynamic_shifting"] else STAGE1_VALIDATION_SHIFT
        return HeliosSchedulerConfig(shift=shift, stages=1, stage_range=(0.0, 1.0), **shifting)
    return HeliosSchedulerConfig(shift=t["stage2_timestep_shift"], stages=t["stage2_num_stages"],
                                 stage_range=tuple(t["stage2_stage_range"]), gamma=t["stage2_scheduler_gamma"],
                                 **shifting)


def validation_pipeline(recipe: Recipe, scheduler: HeliosSchedulerConfig | HeliosDMDSchedulerConfig,
                        transformer: tuple[TransformerConfig, Params]) -> HeliosPipeline:
    """The inference pipeline around the training transformer, with the VAE and text encoder of
    ``pretrained_model_name_or_path`` (as the official validation)."""
    folder = recipe.section("model_config")["pretrained_model_name_or_path"]
    configs = read_checkpoint_configs(folder)
    spec = PipelineSpec(pyramid=recipe.stage != "stage1", is_distilled=recipe.stage == "stage3_ode",
                        is_cfg_zero_star=configs.spec.is_cfg_zero_star and recipe.stage != "stage3_ode")
    dtype = compute_dtype(transformer[1])
    text = COMPONENTS["text_encoder"].load(os.path.join(folder, "text_encoder"), dtype, configs.text_encoder)
    vae = COMPONENTS["vae"].load(os.path.join(folder, "vae"), jnp.float32, configs.vae)
    return HeliosPipeline(transformer, vae, PromptEncoder(*text, configs.tokenizer), scheduler, spec)


def validation_settings(recipe: Recipe) -> dict[str, Any]:
    """The pipeline's call arguments of the YAML's ``validation_config`` (official names mapped)."""
    v, d = recipe.section("validation_config"), recipe.section("data_config")
    settings = dict(height=v["validation_height"], width=v["validation_width"],
                    num_frames=v["validation_max_num_frames"], guidance_scale=v["validation_guidance_scale"],
                    negative_prompt=d["negative_prompt"] or DEFAULT_NEGATIVE_PROMPT)
    if recipe.stage == "stage1":
        settings["num_inference_steps"] = v["num_inference_steps"]
    else:
        settings["pyramid_num_inference_steps_list"] = tuple(v["stage2_simulated_inference_steps"])
    if recipe.stage == "stage3_ode":
        settings["is_amplify_first_chunk"] = True
    return settings


def prepare(recipe: Recipe, *, progress: bool | None = None,
            validate: bool = True, num_threads: int = 2) -> Prepared:
    """The model, data, loss and hooks of a recipe, checked in the order: paths, resume, data buckets,
    then the weights (the only slow step). ``validate=False`` skips the validation videos."""
    if recipe.stage == "stage3_dmd":  # two players: training.dmd_stage (which builds on this module)
        from helios_jax.training import dmd_stage

        return dmd_stage.prepare(recipe, progress=progress, validate=validate, num_threads=num_threads)
    recipes.check_paths(recipe)
    run = recipe.run(progress)
    trainer.check_resumable(run)
    d, t = recipe.section("data_config"), recipe.section("training_config")
    mesh = training_mesh(recipe.section("")["mesh"])
    if recipe.stage == "stage3_ode":
        dataset = ode.ODEPairDataset(d["ode_data_root"], batch_size=t["train_batch_size"] * batch_shards_per_process(mesh),
                                     seed=recipe.section("")["seed"], process_index=jax.process_index(),
                                     process_count=jax.process_count(), shuffle=d["use_shuffle"])
    else:
        dataset = OffloadedDataset(
            d["instance_data_root"], batch_size=t["train_batch_size"] * batch_shards_per_process(mesh),
            seed=recipe.section("")["seed"],
            process_index=jax.process_index(), process_count=jax.process_count(), shuffle=d["use_shuffle"],
            resolutions=[(d["single_height"], d["single_width"])] if d["single_res"] else None,
        )
    folder = transformer_folder(recipe)
    dtype = DTYPES[t["mixed_precision"]]
    component = transformer_component(folder)  # a Helios DiT, or the Wan 2.1 folder stage 1-init starts from
    config = component.read_config(folder)
    if recipe.stage == "stage3_ode":
        ode.check_pairs(dataset, config, ode_settings(recipe, config))
    else:
        check_buckets(dataset, config, recipe.stage)
    if recipe.stage == "stage2_packed" and config.is_amplify_history:
        raise ConfigError(f"{folder}: is_amplify_history is on, which the packed stage-2 forward does not run (no "
                          "official model has it); set training_config.is_navit_pyramid=false (the sequential variant)")
    if mesh is not None:
        parallel.check_mesh(mesh, heads=config.num_attention_heads)
    v = recipe.section("validation_config")
    validating = validate and bool(v["validation_prompts"])
    scheduler = validation_scheduler(recipe) if validating else None  # its errors before the weights

    config, params = component.load(folder, dtype, config, mesh=mesh)  # split as it is read, on a mesh
    spec, subset = recipe.lora()
    lora = lora_lib.init_lora(spec, params, jax.random.key(recipe.section("")["seed"]))
    variables = {"params": params, "lora": lora}
    trainable, frozen = trainer.partition(variables, lora_lib.trainable_mask(variables, subset))
    net = StageModel(HeliosTransformer(config, remat=t["gradient_checkpointing"]), dtype, spec.scale)
    validator = None
    if validating:
        merge = functools.partial(_merged, spec.scale)
        validator = Validator(validation_pipeline(recipe, scheduler, (config, merge(trainable, frozen))), merge,
                              v["validation_prompts"], validation_settings(recipe), v["num_validation_videos"],
                              seed=recipe.section("")["seed"])
    stage = trainer.Stage(make_losses(recipe, net), recipe.optimizer(),
                          export=functools.partial(export_lora, spec, config), validate=validator, ema=recipe.ema())
    return Prepared(run, stage, trainable, frozen, dataset.iterator(num_threads), config, spec, mesh)


def training_mesh(text: str | None) -> jax.sharding.Mesh | None:
    """The YAML's ``mesh: "data=2,fsdp=4"`` over every device of the run (None: one device)."""
    return None if text is None else parallel.make_mesh(**parallel.parse_mesh(text))


def batch_shards_per_process(mesh: jax.sharding.Mesh | None) -> int:
    """How many batch shards (``data`` x ``fsdp``) this process feeds: ``train_batch_size`` is per shard,
    as the official one is per GPU. Every process must feed its own shards."""
    if mesh is None:
        return 1
    shards = parallel.axis_size(mesh, "data") * parallel.axis_size(mesh, "fsdp")
    if shards % jax.process_count():
        raise parallel.MeshError(f"mesh {parallel.format_mesh(mesh)}: data x fsdp = {shards} batch shards cannot be "
                                 f"split over {jax.process_count()} processes; make it a multiple of the process count")
    return shards // jax.process_count()


def _merged(scale: float, trainable: Params, frozen: Params) -> Params:
    """The base params with the LoRA fused in (what the validation pipeline runs)."""
    variables = trainer.combine(trainable, frozen)
    dtype = compute_dtype(frozen["params"])
    params = lora_lib.merge_lora(variables["params"], variables["lora"], scale)
    return trainer.cast_params(params, dtype, keeps_fp32)


def export_lora(spec: lora_lib.LoraSpec, config: TransformerConfig, trainable: Params, folder: str) -> None:
    """Each checkpoint's ``pytorch_lora_weights.safetensors`` (and the fully trained history patch convs,
    ``transformer_partial.safetensors``, when the stage trains them)."""
    lora_lib.save_lora(folder, trainable["lora"], spec, config, partial=trainable.get("params") or None)


def train(paths: str | Sequence[str], overrides: Sequence[str] = (), *,
          progress: bool | None = None) -> trainer.TrainState:
    """``helios-jax train``'s whole job from Python: read and check the YAMLs, prepare, train."""
    return prepare(recipes.load(paths, overrides), progress=progress).train()
