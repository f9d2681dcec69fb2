"""The 14B training steps of stages 1 and 2 planned for one H100, on a CPU with no GPU (issue 11 item 6).

    .venv-gpu-plan/bin/python -m experiments.plans.train_plan         # the 14B steps (minutes each), to RESULTS.md
    .venv-gpu-plan/bin/python -m experiments.plans.train_plan --tiny  # the same steps of a 2-layer model (seconds)

Each step is the trainer's own (``trainer.make_step`` over ``stages.make_losses`` of the official YAML,
``trainer.make_optimizer``: AdamW with clipping, fp32 trainables and their two Adam moments, the bf16
frozen base, remat per block), compiled with gpu_plan's deviceless H100 from abstract inputs only:

* stage 1 (stage_1_init.yaml): LoRA r128 on every linear and the patch embedding, the full history patch
  convs trained ("lora+history_patches"), batch 1 and batch 2;
* stage 2-post (stage_2_post.yaml): LoRA r256 with the patch-embedding and history-patch LoRAs, the three
  pyramid terms run sequentially (one forward and backward each, gradients summed; the YAML's
  ``is_navit_pyramid`` is overridden to false), batch 1.

The batch is the official layout at 384x640: ``x0`` (B,16,1,48,80), ``history`` (B,16,19,48,80),
``target`` (B,16,9,48,80) float32 and ``prompt_embeds`` (B,512,4096). The table splits the arguments
into the frozen params, the trainable params, the optimizer state and the batch, beside XLA's
temporaries and peak of the compiled executable, beside the official benchmark's 60.8 GiB training peak
(benchmark_triton_results_helios.json: a full-gradient forward and backward of the bf16 DiT, not the LoRA
step; see OFFICIAL_PEAK_GIB).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp

from experiments import reporting
from experiments.model_inputs import abstract_params
from experiments.plans import gpu_plan
from helios_jax import parallel
from helios_jax.config import TransformerConfig
from helios_jax.models import lora as lora_lib, transformer as transformer_lib
from helios_jax.models.attention import default_impl
from helios_jax.training import configs, recipes, stages, trainer

CONFIGS = configs.FOLDER  # the official YAMLs, shipped in the package
# benchmark_triton_results_helios.json, "Baseline": training_memory_peak_gb 60.792, which is torch's
# max_memory_allocated() / 1024**3, so GiB: one forward + backward of the bf16 DiT with every weight's gradient
# (no LoRA, no optimizer), batch 1, 13 latent frames (12,480 tokens) at 384x640 without history, remat on.
OFFICIAL_PEAK_GIB = 60.792
LATENT = (48, 80)  # 384x640 / 8
TEXT_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class StepCase:
    """One training step to plan: an official YAML (with overrides) at a batch size."""

    name: str
    yaml: str
    batch: int
    overrides: tuple[str, ...] = ()


CASES = (
    StepCase("stage 1, batch 1", "stage_1_init.yaml", 1),
    StepCase("stage 1, batch 2", "stage_1_init.yaml", 2),
    StepCase("stage 2-post, 3 sequential terms, batch 1", "stage_2_post.yaml", 1,
             ("training_config.is_navit_pyramid=false",)),
)


def abstract_batch(cfg: TransformerConfig, batch: int, latent: tuple[int, int], text_tokens: int) -> dict:
    """The official sample layout (history 19 = 16 + 2 + 1 frames, 9 target frames, one first frame)."""
    c, (h, w) = cfg.in_channels, latent
    f32 = jnp.float32
    return {"x0": jax.ShapeDtypeStruct((batch, c, 1, h, w), f32),
            "history": jax.ShapeDtypeStruct((batch, c, 19, h, w), f32),
            "target": jax.ShapeDtypeStruct((batch, c, 9, h, w), f32),
            "prompt_embeds": jax.ShapeDtypeStruct((batch, text_tokens, cfg.text_dim), f32)}


def tree_bytes(tree: Any) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class StepPlan:
    """A compiled step and the byte sizes of what it takes."""

    case: StepCase
    plan: gpu_plan.Plan
    sizes: dict[str, int]  # frozen params, trainable params, optimizer state, batch

    @property
    def peak_bytes(self) -> int:
        return self.plan.peak_bytes


def step_plan(case: StepCase, cfg: TransformerConfig, sharding: jax.sharding.Sharding | None,
              latent: tuple[int, int] = LATENT, text_tokens: int = TEXT_TOKENS,
              mesh: jax.sharding.Mesh | None = None, platform: str = "gpu") -> StepPlan:
    """The trainer's step of ``case`` compiled for the H100 from shapes only; on ``mesh`` (of H100s, instead of
    ``sharding``) placed as ``trainer.train`` places it: state and base by the sharding tables, the batch over
    ``data`` x ``fsdp``, the step's new state pinned to the old one's shardings, the mesh current. ``platform``
    ("gpu", "tpu") picks the attention the trainer would pick on those devices."""
    recipe = recipes.load(os.path.join(CONFIGS, case.yaml), case.overrides)
    dtype = stages.DTYPES[recipe.section("training_config")["mixed_precision"]]
    spec, subset = recipe.lora()
    shapes = transformer_lib.param_shapes(cfg)
    variables = {"params": abstract_params(shapes, dtype), "lora": lora_lib.lora_shapes(spec, shapes)}
    trainable, frozen = trainer.partition(variables, lora_lib.trainable_mask(variables, subset))
    optimizer_cfg = recipe.optimizer()
    optimizer = trainer.make_optimizer(optimizer_cfg)
    state = jax.eval_shape(lambda t: trainer.init_state(t, optimizer), trainable)
    model = transformer_lib.HeliosTransformer(
        cfg, attention_impl=default_impl(dtype, platform),
        remat=recipe.section("training_config")["gradient_checkpointing"])
    net = stages.StageModel(model, dtype, spec.scale)
    batch = abstract_batch(cfg, case.batch, latent, text_tokens)
    key = jax.eval_shape(lambda: jax.random.key(0))
    losses, schedule = stages.make_losses(recipe, net), trainer.learning_rate(optimizer_cfg)
    if mesh is None:
        step = trainer.make_step(losses, optimizer, schedule)
        lowered = step.lower(*gpu_plan.on_device((state, frozen, batch, key), sharding))
    else:
        placement = trainer.state_shardings(state, mesh)
        step = trainer.make_step(losses, optimizer, schedule, placement)
        placed = (placed_like(state, placement), parallel.shard_params(frozen, mesh, trainer.TRAINING_RULES),
                  {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh, v.shape))
                   for k, v in batch.items()},
                  jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=parallel.replicated(mesh)))
        with trainer.on_mesh(mesh):
            lowered = step.lower(*placed)
        sharded = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                      for x in jax.tree.leaves(placed))
    sizes = {"frozen params": tree_bytes(frozen), "trainable params": tree_bytes(state.trainable),
             "optimizer state": tree_bytes(state.opt_state), "batch": tree_bytes(batch)}
    if mesh is not None:
        sizes["per device"] = sharded  # what the shardings leave each device of all the arguments
    return StepPlan(case, gpu_plan.compile_plan(case.name, lowered, frozen["params"]), sizes)


def placed_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


HEADERS = ["step", "compile s", "frozen params GiB", "trainable GiB", "optimizer state GiB", "batch GiB",
           "arguments GiB", "temporaries GiB", "peak GiB", "peak GB", "vs official 60.8 GiB", "fits 80 GB",
           "cuDNN attention"]


def table_rows(plans: list[StepPlan]) -> list[list[Any]]:
    rows = []
    for p in plans:
        g = reporting.gib
        rows.append([p.case.name, p.plan.compile_s, g(p.sizes["frozen params"]), g(p.sizes["trainable params"]),
                     g(p.sizes["optimizer state"]), g(p.sizes["batch"]), g(p.plan.argument_bytes),
                     g(p.plan.temp_bytes), g(p.peak_bytes), p.peak_bytes / 1e9,
                     f"{g(p.peak_bytes) - OFFICIAL_PEAK_GIB:+.1f} GiB",
                     "yes" if fits(p) else "no", "yes" if p.plan.cudnn_attention else "no"])
    return rows


def fits(p: StepPlan) -> bool:
    """Within the card as sold (80 GB) and as the target config states it (79.1 GiB)."""
    return p.peak_bytes < gpu_plan.GPU_MEMORY_GB * 1e9 and p.peak_bytes < gpu_plan.device_memory_bytes()


def main(argv: list[str] | None = None) -> dict:
    args = gpu_plan.plan_parser(__doc__, autotune=False).parse_args(argv)
    size = gpu_plan.plan_size(args)
    latent, tokens = (size.height // 8, size.width // 8), size.text_tokens
    plans = []
    for case in CASES:
        plans.append(step_plan(case, size.cfg, gpu_plan.h100(), latent, tokens))
        print(f"{case.name}: compiled in {plans[-1].plan.compile_s:.0f} s", flush=True)
    rows = table_rows(plans)
    env = gpu_plan.plan_environment("optax")
    body = (f"Training steps planned for one H100 from abstract inputs ({'tiny model' if args.tiny else '14B DiT'}, "
            f"{size.cfg.num_layers} layers; {size.height}x{size.width}, history 19 + 9 target latent frames, "
            f"{tokens} text tokens; bf16 frozen base, fp32 trainables and AdamW moments, remat per block; "
            "trainer.make_step over stages.make_losses of the official YAMLs; GEMMs not autotuned). "
            "Peak: XLA's memory analysis of the compiled executable (arguments included); "
            f"official benchmark: {OFFICIAL_PEAK_GIB} GiB peak (a full-gradient forward and backward, batch 1, "
            "no history, no optimizer).\n\n" + reporting.markdown_table(HEADERS, rows))
    return reporting.report("train_plan", env, body, {"env": env, "headers": HEADERS, "rows": rows}, args)


if __name__ == "__main__":
    gpu_plan.compile_on_cpu()
    sys.exit(main() and 0)
