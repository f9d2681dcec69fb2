"""Pallas kernels for Helios on NVIDIA GPUs (installed as ``helios_jax.kernels``).

Models reach them only through ``helios_jax.models.attention.attention(..., impl="pallas" or "mosaic")``.
"""

from helios_jax.kernels.flash import H100_CONFIGS, FlashConfig, default_config, flash_attention
from helios_jax.kernels.mosaic import MosaicConfig, mosaic_attention
from helios_jax.kernels.reference import attention_reference

__all__ = ["FlashConfig", "H100_CONFIGS", "MosaicConfig", "attention_reference", "default_config", "flash_attention",
           "mosaic_attention"]
