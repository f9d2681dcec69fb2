"""The tiny stage-1 training setup that the step benchmark (experiments/benchmarks/bench_train_step.py) times and
the trainer tests (tests/training_fixtures.py) train: a 2-layer DiT, LoRA r16 plus the full history patch convs,
the package's own stage-1 loss with the official context. Nothing runs at import but building configs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from helios_jax.config import TransformerConfig
from helios_jax.models import lora as lora_lib, transformer as dit
from helios_jax.training import losses, samples, stages, trainer

PIXELS = 32  # video height and width: latents of 4 x 4
TEXT_TOKENS = 8
CONFIG = TransformerConfig(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=64,
                           freq_dim=32, ffn_dim=128, num_layers=2, rope_dim=(12, 10, 10))
SPEC = lora_lib.LoraSpec(rank=16, patch_embedding=True)  # stage 1: LoRA on every linear and the patch embedding
SUBSET = "lora+history_patches"


def stage_model(remat: bool = True, dtype=jnp.bfloat16) -> stages.StageModel:
    return stages.StageModel(dit.HeliosTransformer(CONFIG, remat=remat), dtype, SPEC.scale)


def make_stage1_loss(remat: bool = True, dtype=jnp.bfloat16):
    """The real stage-1 loss with the official context (random drops 0.4 / 0.4, noise corruption)."""
    return functools.partial(stages.stage1_loss, stage_model(remat, dtype), samples.ContextConfig(),
                             losses.TimestepSampling())


def stage1_variables(seed: int = 0, dtype=jnp.bfloat16) -> tuple[dict, dict]:
    """(trainable, frozen) of a random tiny DiT with a fresh LoRA: the frozen base in ``dtype`` but the
    reference's float32 modules, the trainables in float32."""
    params = dit.init_params(CONFIG, jax.random.key(seed))
    variables = {"params": params, "lora": lora_lib.init_lora(SPEC, params, jax.random.key(seed + 1))}
    trainable, frozen = trainer.partition(variables, lora_lib.trainable_mask(variables, SUBSET))
    frozen = trainer.cast_params(frozen, dtype, dit.keeps_fp32)
    return trainable, frozen
