"""Flax modules: the Helios DiT (and, as they land, the Wan VAE and the UMT5 text encoder)."""

from helios_jax.models.packed import PackedHeliosTransformer
from helios_jax.models.transformer import HeliosTransformer
from helios_jax.models.umt5 import UMT5Encoder
from helios_jax.models.vae import WanVAE

__all__ = ["HeliosTransformer", "PackedHeliosTransformer", "UMT5Encoder", "WanVAE"]
