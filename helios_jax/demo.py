"""``make demo``: one jit-compiled forward of a small random-weight Helios DiT over a chunk with full memory.

No torch and no download: the weights are random, so the output means nothing; the run shows that the
model builds, compiles and runs on this machine, and how long each takes.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import helios_jax as hj
from helios_jax.models.transformer import init_params

CONFIG = hj.TransformerConfig(
    num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=64,
    freq_dim=64, ffn_dim=256, num_layers=4, rope_dim=(12, 10, 10),
)


def chunk_inputs(key: jax.Array, height: int = 24, width: int = 40, frames: int = 9) -> dict[str, jax.Array]:
    """A chunk as the pipeline feeds it: 9 noisy latent frames, the first-frame prefix plus short (1),
    mid (2) and long (16) history at full latent resolution, and 512 text tokens."""
    keys = jax.random.split(key, 6)
    c = CONFIG.in_channels
    indices = jnp.arange(1 + 16 + 2 + 1 + frames)
    return dict(
        hidden_states=jax.random.normal(keys[0], (1, c, frames, height, width)),
        timestep=jnp.array([999.0]),
        encoder_hidden_states=jax.random.normal(keys[1], (1, 512, CONFIG.text_dim)),
        indices_hidden_states=indices[None, 20:],
        indices_latents_history_short=jnp.stack([indices[0], indices[19]])[None],
        indices_latents_history_mid=indices[None, 17:19],
        indices_latents_history_long=indices[None, 1:17],
        latents_history_short=jax.random.normal(keys[2], (1, c, 2, height, width)),
        latents_history_mid=jax.random.normal(keys[3], (1, c, 2, height, width)),
        latents_history_long=jax.random.normal(keys[4], (1, c, 16, height, width)),
    )


def main() -> None:
    params = init_params(CONFIG, jax.random.key(0))
    inputs = chunk_inputs(jax.random.key(1))
    forward = jax.jit(hj.HeliosTransformer(CONFIG).apply)
    start = time.perf_counter()
    compiled = forward.lower({"params": params}, **inputs).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = compiled({"params": params}, **inputs).block_until_ready()
    run_s = time.perf_counter() - start
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(f"Helios DiT (random weights): {CONFIG.num_layers} layers, {count / 1e6:.2f}M params, device {jax.devices()[0]}")
    for name, value in inputs.items():
        print(f"  {name:32s} {tuple(value.shape)}")
    print(f"  {'output':32s} {tuple(out.shape)}")
    print(f"compile {compile_s:.2f} s, run {run_s * 1e3:.1f} ms, output finite: {bool(jnp.isfinite(out).all())}")


if __name__ == "__main__":
    main()
