"""The nano Helios' sizes and its untrained base checkpoint: the one place the tests, the demo, `make nano` and the
experiments take them from.

The base is what the official stage 1 starts from, scaled down: a Helios DiT with the stage-1 flags at a random
init (the flax initialisers of ``helios_jax.models.transformer.init_params``; the official run starts from Wan 2.1,
which has no nano counterpart), the VAE trained on the world by ``helios-jax train-vae``, and a frozen random UMT5
whose tokenizer has one token per word of the world's captions (the DiT learns to read its embeddings: distinct
words give distinct, fixed vectors, which is all cross-attention needs). The DiT is 128 wide, so the official
LoRA rank of 128 is a full-rank update of every linear layer: the recipe's LoRA stages train the whole network.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from helios_jax import demo
from helios_jax.config import TransformerConfig, UMT5Config, VAEConfig
from helios_jax.loading import COMPONENTS
from helios_jax.models import transformer as dit
from helios_jax.nano import world

SEED = 0
HEIGHT, WIDTH = world.WORLD.height, world.WORLD.width
CHECKPOINT = os.path.join(os.path.dirname(__file__), "checkpoint")  # the trained student `make nano` ships
PROMPT = "a red circle moves right on a dark blue background"  # `helios-jax generate`'s default for it
TRANSFORMER = TransformerConfig(
    num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=64, freq_dim=64,
    ffn_dim=256, num_layers=6, rope_dim=(12, 10, 10),
)
VAE = VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
PIECES = demo.word_pieces(world.VOCABULARY)
# The text length it is trained and sampled at (its tokenizer's model_max_length): a caption is at most 13 tokens.
# At the reference's 512, 500 zero-padded slots take nearly all of the cross-attention that the frozen norms of a
# DiT trained from nothing leave it, and the caption barely reaches the video (docs/nano.md, "Text length").
TEXT_TOKENS = 16
TEXT_ENCODER = UMT5Config(vocab_size=len(PIECES), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)

_INDEX = {"_diffusers_version": "0.42.1", "is_cfg_zero_star": False,
          "scheduler": ["diffusers", "HeliosScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
          "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "HeliosTransformer3DModel"],
          "vae": ["diffusers", "AutoencoderKLWan"]}
_UNIPC = {"_class_name": "HeliosScheduler", "num_train_timesteps": 1000, "shift": 1.0, "gamma": 1 / 3,
          "prediction_type": "flow_prediction", "use_flow_sigmas": True, "use_dynamic_shifting": True,
          "time_shift_type": "exponential", "scheduler_type": "unipc", "solver_order": 2, "solver_type": "bh2",
          "predict_x0": True, "lower_order_final": True, "disable_corrector": [], "solver_p": None,
          "thresholding": False}
_PYRAMID = {"stages": 3, "stage_range": [0, 1 / 3, 2 / 3, 1]}
# The published checkpoints' pipeline configs (Helios-Base, -Mid, -Distilled), one per stage of the recipe.
PIPELINES = {
    "base": ({**_INDEX, "_class_name": "HeliosPipeline", "is_distilled": False},
             {**_UNIPC, "stages": 1, "stage_range": [0, 1]}),
    "mid": ({**_INDEX, "_class_name": "HeliosPyramidPipeline", "is_distilled": False}, {**_UNIPC, **_PYRAMID}),
    "distilled": ({**_INDEX, "_class_name": "HeliosPyramidPipeline", "is_distilled": True,
                   "scheduler": ["diffusers", "HeliosDMDScheduler"]},
                  {"_class_name": "HeliosDMDScheduler", "num_train_timesteps": 1000, "shift": 1.0, "gamma": 1 / 3,
                   "prediction_type": "flow_prediction", "scheduler_type": "dmd", "use_flow_sigmas": True,
                   "use_dynamic_shifting": True, "time_shift_type": "linear", **_PYRAMID}),
}


def build_base(folder: str | os.PathLike, vae_folder: str) -> str:
    """The untrained base pipeline folder (Helios-Base's layout): a fresh DiT, the trained VAE at ``vae_folder``
    copied, the random text encoder and the world's tokenizer."""
    rng = np.random.default_rng(SEED)
    text_module = COMPONENTS["text_encoder"].module
    text = demo.random_params(text_module.param_shapes(TEXT_ENCODER), text_module.keymap(TEXT_ENCODER), rng)
    transformer = jax.tree.map(np.asarray, dit.init_params(TRANSFORMER, jax.random.key(SEED)))
    index, scheduler = PIPELINES["base"]
    return demo.write_checkpoint(folder, {"transformer": (TRANSFORMER, transformer), "text_encoder": (TEXT_ENCODER, text)},
                                 pieces=PIECES, scheduler=scheduler, model_index=index, copies={"vae": vae_folder},
                                 text_tokens=TEXT_TOKENS)
