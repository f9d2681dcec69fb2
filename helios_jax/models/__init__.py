"""Flax modules: the Helios DiT (and, as they land, the Wan VAE and the UMT5 text encoder)."""

from helios_jax.models.transformer import HeliosTransformer

__all__ = ["HeliosTransformer"]
