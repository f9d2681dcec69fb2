"""The VAE decode in bf16 (``HeliosPipeline.from_pretrained(..., vae_dtype=jnp.bfloat16)``) against fp32.

Same random weights (the demo checkpoint's recipe) and latents; the bound is stated here and in RESULTS.md:
on this tiny random VAE bf16 measured rel L2 7.9e-3, max-abs 0.029 of the [0, 1] frames, PSNR 47 dB.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.config import VAEConfig
from helios_jax.demo import random_params
from helios_jax.models import vae as vae_lib


def test_bf16_decode_is_within_its_stated_error_of_fp32():
    cfg = VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    params = random_params(vae_lib.param_shapes(cfg), vae_lib.keymap(cfg), np.random.default_rng(0))
    latents = jnp.asarray(np.random.default_rng(1).standard_normal((1, 16, 3, 8, 8)), jnp.float32)
    fp32 = np.asarray(vae_lib.chunk_decoder(cfg, jnp.float32, "float")(params, latents))
    bf16_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    bf16 = np.asarray(vae_lib.chunk_decoder(cfg, jnp.bfloat16, "float")(bf16_params, latents))
    assert bf16.shape == fp32.shape == (1, 9, 64, 64, 3)
    rel = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
    psnr = 10 * np.log10(1.0 / np.mean((bf16 - fp32) ** 2))
    assert 1e-4 < rel < 2e-2 and np.abs(bf16 - fp32).max() < 0.1 and psnr > 40, (rel, psnr)
