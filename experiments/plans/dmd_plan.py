"""The 14B DMD + GAN training steps of stage 3b planned for H100s, on a CPU with no GPU (issue 12 item 6).

    .venv-gpu-plan/bin/python -m experiments.plans.dmd_plan         # the 14B steps (30-40 min each, 2 cores)
    .venv-gpu-plan/bin/python -m experiments.plans.dmd_plan --tiny  # the same steps of a 2-layer model (seconds)

The programs are the ones ``trainer.train`` jits for ``stage_3_post_gan_version.yaml``:
``duel.make_duel_step`` over ``stages.dmd.make_duel`` of the recipe, in phase 1 (from ``gan_start_step``:
DMD + the Cache-Grad GAN term, the critic's denoising + discriminator + approximate R1 loss):

* the generator step (``update_generator=True``, every ``dfake_gen_update_ratio``-th step): the generator's
  rollout and update, then the critic's update and the EMA, in ONE program;
* the critic step (``update_generator=False``, the other steps).

Trees as ``stages.dmd.prepare`` builds them, with one shared bf16 base (the critic's folder = the
generator's: the generator, the real score and the fake score are the base with the generator LoRA, without
a LoRA, and with the critic LoRA): LoRA r256 on every linear + the history patch convs (generator), r256 on
every linear (critic), the GAN heads on blocks 5/15/25/35 and the output, fp32 trainables, AdamW's two fp32
moments each, the generator's fp32 EMA; remat per block (``gradient_checkpointing``), cuDNN attention.
The batch: the official 384x640 layout of train_plan plus the critic's second section (``x0_2``,
``history_2``, ``target_2``), batch 1 per device.

Placements: one H100; and 8 H100s on ``fsdp=8`` as ``trainer.train`` places a duel on a mesh
(``duel.duel_shardings``, the base by the sharding tables, the batch over fsdp: 8 samples, one per GPU).
The arguments' split by role is exact (the trees' bytes); the temporaries and peak are XLA's memory plan.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import jax

from experiments import reporting
from experiments.model_inputs import abstract_params
from experiments.plans import gpu_plan, train_plan
from helios_jax import parallel
from helios_jax.config import TransformerConfig
from helios_jax.models import lora as lora_lib, transformer as transformer_lib
from helios_jax.models.attention import default_impl
from helios_jax.training import duel, recipes, stages, trainer
from helios_jax.training.stages import dmd

YAML = "stage_3_post_gan_version.yaml"
GAN_PHASE = 1  # the phase number from gan_start_step on (duel.Duel.phase)
# The paper's claim (Helios, section on training memory): the generator, the real score and the fake score
# (one shared 14B base) and the discriminator trained in 80 GB per GPU, without offloading or sharding the base.
PAPER_CLAIM = "four 14B models (generator, real score, fake score on one base, + the discriminator) in 80 GB"


@dataclasses.dataclass(frozen=True)
class DmdCase:
    name: str
    update_generator: bool
    fsdp: int = 1  # 1: one H100; else that many H100s of one host on fsdp


CASES = (
    DmdCase("generator step (+ critic + EMA), 1 H100", True),
    DmdCase("critic step, 1 H100", False),
    DmdCase("generator step (+ critic + EMA), fsdp=8", True, 8),
)


def abstract_dmd_batch(cfg: TransformerConfig, batch: int, latent: tuple[int, int], text_tokens: int) -> dict:
    """train_plan's sample layout plus the critic's second section of the clip (``OffloadedDataset(secondary=True)``)."""
    first = train_plan.abstract_batch(cfg, batch, latent, text_tokens)
    return {**first, **{f"{k}_2": first[k] for k in ("x0", "history", "target")}}


@dataclasses.dataclass
class DmdTrees:
    """The abstract arguments of a duel step and what the trainer compiles over them."""

    duel: duel.Duel
    optimizer: trainer.OptimizerConfig
    state: duel.DuelState
    frozen: dict
    batch: dict
    nets: dmd.DmdNets


def dmd_trees(cfg: TransformerConfig, latent: tuple[int, int], text_tokens: int, batch: int = 1,
              platform: str = "gpu") -> DmdTrees:
    """``stages.dmd.prepare``'s trees for the official GAN-version YAML, as shapes (one shared base), with the
    attention the trainer picks on ``platform``."""
    recipe = recipes.load(os.path.join(train_plan.CONFIGS, YAML))
    t = recipe.section("training_config")
    dtype = stages.DTYPES[t["mixed_precision"]]
    settings = recipe.dmd()
    if any(k >= cfg.num_layers for k in settings.gan.hooks):  # the tiny model: hook its blocks instead
        settings = dataclasses.replace(settings, gan=dataclasses.replace(
            settings.gan, hooks=tuple(range(cfg.num_layers))[-len(settings.gan.hooks):]))
    spec, _ = recipe.lora()
    critic_spec = recipe.critic_lora()
    shapes = transformer_lib.param_shapes(cfg)
    params = abstract_params(shapes, dtype)
    model = transformer_lib.HeliosTransformer(cfg, attention_impl=default_impl(dtype, platform),
                                              remat=t["gradient_checkpointing"])
    nets = dmd.DmdNets(model, dtype, spec.scale, critic_spec.scale, settings.gan)
    heads = jax.eval_shape(lambda k: dmd.init_heads(nets, cfg, k, latent), jax.random.key(0))
    generator = {"lora": lora_lib.lora_shapes(spec, shapes)}
    critic = {"lora": lora_lib.lora_shapes(critic_spec, shapes), "heads": heads}
    the_duel = dmd.make_duel(recipe, nets, settings)
    optimizer = recipe.optimizer()
    state = jax.eval_shape(lambda g, c: duel.init_duel(the_duel, optimizer, g, c), generator, critic)
    frozen = {"params": params,
              "negative_prompt_embeds": jax.ShapeDtypeStruct((1, text_tokens, cfg.text_dim), dtype)}
    return DmdTrees(the_duel, optimizer, state, frozen, abstract_dmd_batch(cfg, batch, latent, text_tokens), nets)


@dataclasses.dataclass
class DmdPlan:
    case: DmdCase
    plan: gpu_plan.Plan
    sizes: dict[str, int]  # bytes of each argument role (whole trees, all devices together)
    per_device: int  # bytes of all arguments one device holds
    remat_barriers: int  # optimization barriers in the lowered program: what ``jax.checkpoint`` (remat) leaves

    @property
    def peak_bytes(self) -> int:
        return self.plan.peak_bytes


def sizes_of(trees: DmdTrees) -> dict[str, int]:
    s, b = trees.state, train_plan.tree_bytes
    return {"base (bf16, shared)": b(trees.frozen["params"]),
            "generator LoRA": b(s.generator.trainable), "generator AdamW": b(s.generator.opt_state),
            "generator EMA": b(s.ema),
            "critic LoRA": b(s.critic.trainable["lora"]), "GAN heads": b(s.critic.trainable["heads"]),
            "critic AdamW": b(s.critic.opt_state),
            "batch + negative prompt": b(trees.batch) + b(trees.frozen["negative_prompt_embeds"])}


def dmd_plan(case: DmdCase, size: gpu_plan.Size, mesh: jax.sharding.Mesh | None = None,
             sharding: jax.sharding.Sharding | None = None, platform: str = "gpu") -> DmdPlan:
    """``case``'s duel step compiled for H100s from shapes only; or for ``platform``'s devices: on ``mesh`` (its
    fsdp axis taking the batch) when ``case.fsdp`` > 1, else on ``sharding``'s one device."""
    latent = (size.height // 8, size.width // 8)
    trees = dmd_trees(size.cfg, latent, size.text_tokens, batch=case.fsdp, platform=platform)
    key = jax.eval_shape(lambda: jax.random.key(0))
    kind = dict(update_generator=case.update_generator, phase=GAN_PHASE)
    args = (trees.state, trees.frozen, trees.batch, key)
    if case.fsdp == 1:
        step = duel.make_duel_step(trees.duel, trees.optimizer, **kind)
        placed = gpu_plan.on_device(args, sharding or gpu_plan.h100())
        lowered = step.lower(*placed)
    else:
        mesh = mesh or gpu_plan.h100_mesh(fsdp=case.fsdp)
        placement = duel.duel_shardings(trees.state, mesh)
        step = duel.make_duel_step(trees.duel, trees.optimizer, **kind, state_sharding=placement)
        placed = (train_plan.placed_like(trees.state, placement),
                  parallel.shard_params(trees.frozen, mesh, trainer.TRAINING_RULES),
                  {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh, v.shape))
                   for k, v in trees.batch.items()},
                  jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=parallel.replicated(mesh)))
        with trainer.on_mesh(mesh):
            lowered = step.lower(*placed)
    per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(placed))
    barriers = lowered.as_text().count("optimization_barrier")
    plan = gpu_plan.compile_plan(case.name, lowered, trees.frozen["params"])
    return DmdPlan(case, plan, sizes_of(trees), per_device, barriers)


def fits(p: DmdPlan) -> bool:
    return train_plan.fits(p)  # type: ignore[arg-type]  (the same peak rule: 80 GB and the target's 79.1 GiB)


HEADERS = ["step", "compile s", "base GiB", "generator LoRA + AdamW + EMA GiB", "critic LoRA + heads + AdamW GiB",
           "arguments GiB/device", "temporaries GiB/device", "peak GiB/device", "peak GB/device", "fits 80 GB",
           "cuDNN attention", "remat barriers"]


def table_rows(plans: list[DmdPlan]) -> list[list[Any]]:
    g, rows = reporting.gib, []
    for p in plans:
        s = p.sizes
        rows.append([p.case.name, p.plan.compile_s, g(s["base (bf16, shared)"]),
                     g(s["generator LoRA"] + s["generator AdamW"] + s["generator EMA"]),
                     g(s["critic LoRA"] + s["GAN heads"] + s["critic AdamW"]), g(p.plan.argument_bytes),
                     g(p.plan.temp_bytes), g(p.peak_bytes), p.peak_bytes / 1e9, "yes" if fits(p) else "no",
                     "yes" if p.plan.cudnn_attention else "no", p.remat_barriers])
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = gpu_plan.plan_parser(__doc__, autotune=False)
    parser.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))),
                        help="which CASES to compile (comma-separated indices)")
    args = parser.parse_args(argv)
    size = gpu_plan.plan_size(args)
    plans = []
    for i in map(int, args.cases.split(",")):
        plans.append(dmd_plan(CASES[i], size))
        print(f"{CASES[i].name}: compiled in {plans[-1].plan.compile_s:.0f} s, peak "
              f"{plans[-1].peak_bytes / 1e9:.1f} GB", flush=True)
    rows = table_rows(plans)
    sizes = plans[0].sizes
    env = gpu_plan.plan_environment("optax")
    body = (f"Stage-3b DMD + GAN steps ({YAML}, phase 1) planned for H100s from abstract inputs "
            f"({'tiny model' if args.tiny else '14B DiT'}, {size.cfg.num_layers} layers; {size.height}x{size.width}, "
            f"history 19 + 9 target latent frames and a second section for the critic, {size.text_tokens} text "
            "tokens, batch 1 per GPU; one shared bf16 base; generator LoRA r256 + history-patch LoRA, critic LoRA "
            "r256 + GAN heads, fp32 trainables, AdamW moments and EMA; remat per block; duel.make_duel_step; "
            "GEMMs not autotuned). Peak: XLA's memory analysis of the compiled executable, per device, arguments "
            f"included. Paper: {PAPER_CLAIM}.\n\n" + reporting.markdown_table(HEADERS, rows)
            + "\nArguments by role (exact, whole trees): "
            + ", ".join(f"{k} {reporting.gib(v):.2f} GiB" for k, v in sizes.items()) + ".\n")
    return reporting.report("dmd_plan", env, body, {"env": env, "headers": HEADERS, "rows": rows}, args)


if __name__ == "__main__":
    gpu_plan.compile_on_cpu()
    sys.exit(main() and 0)
