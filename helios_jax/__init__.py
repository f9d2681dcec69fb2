"""helios-jax: a JAX/Flax port of Helios, the autoregressive video diffusion transformer."""

from helios_jax.config import ConfigError, TransformerConfig
from helios_jax.loading import load_transformer
from helios_jax.models import HeliosTransformer

from helios_jax import sampling  # hj.sampling: schedules, steps, denoise_chunk

__all__ = ["ConfigError", "HeliosTransformer", "TransformerConfig", "load_transformer"]
__version__ = "0.1.0"
