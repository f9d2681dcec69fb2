"""helios-jax: a JAX/Flax port of Helios, the autoregressive video diffusion transformer."""

from helios_jax import sampling  # hj.sampling: schedules, steps, denoise_chunk
from helios_jax.checkpoint import CheckpointConfigs, read_checkpoint_configs
from helios_jax.config import ConfigError, ConfigWarning, TransformerConfig, UMT5Config, VAEConfig
from helios_jax.loading import load_text_encoder, load_transformer, load_vae
from helios_jax.models import HeliosTransformer, UMT5Encoder, WanVAE
from helios_jax.pipeline import HeliosPipeline
from helios_jax.prompts import PromptEncoder, PromptSchedule, plan_prompt_chunks
from helios_jax.tokenizer import PromptTokenizer, clean_prompt

__all__ = [
    "CheckpointConfigs",
    "ConfigError",
    "ConfigWarning",
    "HeliosPipeline",
    "HeliosTransformer",
    "PromptEncoder",
    "PromptSchedule",
    "PromptTokenizer",
    "TransformerConfig",
    "UMT5Config",
    "UMT5Encoder",
    "VAEConfig",
    "WanVAE",
    "clean_prompt",
    "load_text_encoder",
    "load_transformer",
    "load_vae",
    "plan_prompt_chunks",
    "read_checkpoint_configs",
    "sampling",
]
__version__ = "0.1.0"
