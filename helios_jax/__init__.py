"""helios-jax: a JAX/Flax port of Helios, the autoregressive video diffusion transformer."""

from helios_jax.config import ConfigError, TransformerConfig
from helios_jax.loading import load_transformer
from helios_jax.models import HeliosTransformer

# The UMT5 text encoder and the prompt path.
from helios_jax.config import UMT5Config
from helios_jax.loading import load_text_encoder
from helios_jax.models import UMT5Encoder
from helios_jax.prompts import PromptEncoder, PromptSchedule, plan_prompt_chunks
from helios_jax.tokenizer import PromptTokenizer, clean_prompt

__all__ = ["ConfigError", "HeliosTransformer", "TransformerConfig", "load_transformer"]
__all__ += [
    "PromptEncoder",
    "PromptSchedule",
    "PromptTokenizer",
    "UMT5Config",
    "UMT5Encoder",
    "clean_prompt",
    "load_text_encoder",
    "plan_prompt_chunks",
]
__version__ = "0.1.0"
