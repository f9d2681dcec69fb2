"""The pieces every stage builds a run with, so that no stage module imports another.

The DiT as the losses call it (:class:`StageModel`) and the history conditioning of a batch; the data set
of a recipe (built once, here), its check against the model; the mesh and the batch shards per process;
the LoRA export, the merged weights and the pipeline of the validation videos; :class:`Prepared`, what a
stage's builder returns and ``trainer.train`` takes.

Mixed precision (``mixed_precision: bf16``): the frozen base is stored in bfloat16 but the modules the
reference keeps in float32; the float32 trainables are cast to bfloat16 for the forward, their
gradients flow back to the float32 masters; the loss is float32.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from grain import python as grain_python

from helios_jax import parallel
from helios_jax.checkpoint import PipelineSpec, read_checkpoint_configs
from helios_jax.config import ConfigError, TransformerConfig
from helios_jax.loading import COMPONENTS, transformer_component
from helios_jax.models import lora as lora_lib
from helios_jax.models.attention import default_impl
from helios_jax.models.packed import packed_like
from helios_jax.models.transformer import HeliosTransformer, compute_dtype, keeps_fp32
from helios_jax.pipeline import HeliosPipeline
from helios_jax.prompts import PromptEncoder
from helios_jax.sampling.schedule import HeliosDMDSchedulerConfig, HeliosSchedulerConfig
from helios_jax.training import recipes, trainer
from helios_jax.training.data import OffloadedDataset
from helios_jax.training.recipes import DataConfig, Recipe
from helios_jax.training.samples import ContextConfig, prepare_context
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


@dataclasses.dataclass
class Prepared:
    """What ``trainer.train`` takes, built from a recipe by its stage's builder."""

    run: trainer.RunConfig
    stage: trainer.StepProgram
    trainable: Params
    frozen: Params
    data: grain_python.DatasetIterator
    config: TransformerConfig
    spec: lora_lib.LoraSpec
    mesh: jax.sharding.Mesh | None = None

    def train(self) -> Any:
        return trainer.train(self.run, self.stage, self.trainable, self.frozen, self.data, self.mesh)


def offloaded_dataset(data: DataConfig, mesh: jax.sharding.Mesh | None, *, secondary: bool = False
                      ) -> OffloadedDataset:
    """The offloaded short latents of ``data`` as this process's share of the batches (stages 1, 2, 3b;
    ``secondary``: stage 3b's second section of each clip)."""
    return OffloadedDataset(
        data.roots, batch_size=data.batch_size * batch_shards_per_process(mesh), seed=data.seed,
        process_index=jax.process_index(), process_count=jax.process_count(), shuffle=data.shuffle,
        resolutions=list(data.resolutions) if data.resolutions else None, secondary=secondary)


def check_buckets(dataset: OffloadedDataset, config: TransformerConfig, stage: str, pyramid: bool) -> None:
    """Every bucket's latents must fit the model: sizes the patch (and, for the ``pyramid``, its two halvings)
    divide; and every file readable, with the model's latent channels and prompt-embedding width."""
    _, ph, pw = config.patch_size
    factor = 4 if pyramid else 1
    for frames, height, width in dataset.buckets:
        h, w = height // 8, width // 8
        if h % (ph * factor) or w % (pw * factor):
            raise ConfigError(f"data bucket {height}x{width} (latents {h}x{w}): {stage} needs latent sizes divisible "
                              f"by {ph * factor}x{pw * factor}; offload at a resolution that is a multiple of "
                              f"{8 * ph * factor}")
    dataset.check_files(config.in_channels, config.text_dim)


def validation_pipeline(recipe: Recipe, scheduler: HeliosSchedulerConfig | HeliosDMDSchedulerConfig,
                        transformer: tuple[TransformerConfig, Params], *, pyramid: bool, distilled: bool = False
                        ) -> HeliosPipeline:
    """The inference pipeline around the training transformer, with the VAE and text encoder of
    ``pretrained_model_name_or_path`` (as the official validation); a ``distilled`` student runs without
    CFG-Zero*."""
    folder = recipe.model().pipeline
    configs = read_checkpoint_configs(folder)
    spec = PipelineSpec(pyramid=pyramid, is_distilled=distilled,
                        is_cfg_zero_star=configs.spec.is_cfg_zero_star and not distilled)
    dtype = compute_dtype(transformer[1])
    text = COMPONENTS["text_encoder"].load(os.path.join(folder, "text_encoder"), dtype, configs.text_encoder)
    vae = COMPONENTS["vae"].load(os.path.join(folder, "vae"), jnp.float32, configs.vae)
    return HeliosPipeline(transformer, vae, PromptEncoder(*text, configs.tokenizer), scheduler, spec)


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


def merged_params(scale: float, trainable: Params, frozen: Params) -> Params:
    """The base params with the LoRA fused in (what the validation pipeline runs)."""
    variables = trainer.combine(trainable, frozen)
    dtype = compute_dtype(frozen["params"])
    params = lora_lib.merge_lora(variables["params"], variables["lora"], scale)
    return trainer.cast_params(params, dtype, keeps_fp32)


def export_lora(spec: lora_lib.LoraSpec, config: TransformerConfig, trainable: Params, folder: str) -> None:
    """Each checkpoint's ``pytorch_lora_weights.safetensors`` (and the fully trained history patch convs,
    ``transformer_partial.safetensors``, when the stage trains them)."""
    lora_lib.save_lora(folder, trainable["lora"], spec, config, partial=trainable.get("params") or None)


def validation_call(recipe: Recipe, *, pyramid: bool, **extra: Any) -> dict[str, Any]:
    """The pipeline's call arguments of the YAML's ``validation_config`` (official names mapped): stage 1's
    ``num_inference_steps`` or the pyramid's steps per stage, and a stage's ``extra`` arguments."""
    v = recipe.validation()
    call = dict(height=v.height, width=v.width, num_frames=v.num_frames, guidance_scale=v.guidance_scale,
                negative_prompt=recipe.data().negative_prompt)
    if pyramid:
        call["pyramid_num_inference_steps_list"] = v.pyramid_steps
    else:
        call["num_inference_steps"] = v.num_inference_steps
    return {**call, **extra}


def prepare_one_player(recipe: Recipe, *, dataset: Callable[[Recipe, jax.sharding.Mesh | None], Any],
                       check: Callable[[Any, TransformerConfig], None],
                       losses: Callable[[Recipe, StageModel], trainer.LossFn | tuple[trainer.LossFn, ...]],
                       scheduler: Callable[[Recipe], HeliosSchedulerConfig | HeliosDMDSchedulerConfig],
                       call: dict[str, Any], pyramid: bool, distilled: bool = False, progress: bool | None = None,
                       validate: bool = True, num_threads: int = 2) -> Prepared:
    """A one-player stage's run (stages 1, 2, 3a) from its pieces: the ``dataset`` and its ``check``
    against the model, the ``losses`` over the DiT, the validation ``scheduler`` and ``call`` arguments.
    Checked in the order: paths, resume, data, mesh, validation sampler, then the weights (the only slow
    step); ``validate=False`` skips the validation videos."""
    recipes.check_paths(recipe)
    run = recipe.run(progress)
    trainer.check_resumable(run)
    model = recipe.model()
    mesh = training_mesh(recipe.mesh)
    data = dataset(recipe, mesh)
    dtype = DTYPES[model.mixed_precision]
    component = transformer_component(model.transformer)  # a Helios DiT, or the Wan 2.1 folder of stage 1-init
    config = component.read_config(model.transformer)
    check(data, config)
    if mesh is not None:
        parallel.check_mesh(mesh, heads=config.num_attention_heads)
    v = recipe.validation()
    validating = validate and bool(v.prompts)
    sampler = scheduler(recipe) if validating else None  # its errors before the weights

    config, params = component.load(model.transformer, dtype, config, mesh=mesh)  # split as it is read, on a mesh
    spec, subset = recipe.lora()
    lora = lora_lib.init_lora(spec, params, jax.random.key(recipe.seed))
    variables = {"params": params, "lora": lora}
    trainable, frozen = trainer.partition(variables, lora_lib.trainable_mask(variables, subset))
    # The platform's attention (cuDNN on a GPU, splash on a TPU, in 16-bit), as the pipeline picks it: XLA's
    # materialises (heads x tokens x tokens) float32 logits, which no chip holds at Helios' 11,040 tokens.
    net = StageModel(HeliosTransformer(config, default_impl(dtype), remat=model.remat), dtype, spec.scale)
    validator = None
    if validating:
        merge = trainer.bind(merged_params, spec.scale)
        pipeline = validation_pipeline(recipe, sampler, (config, merge(trainable, frozen)), pyramid=pyramid,
                                       distilled=distilled)
        validator = Validator(pipeline, merge, list(v.prompts), call, v.videos, seed=recipe.seed)
    stage = trainer.Stage(losses(recipe, net), recipe.optimizer(), export=trainer.bind(export_lora, spec, config),
                          validate=validator, ema=recipe.ema())
    return Prepared(run, stage, trainable, frozen, data.iterator(num_threads), config, spec, mesh)
