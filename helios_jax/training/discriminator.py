"""The stage-3 critic's multi-head GAN: 3D conv heads, crops, losses and Cache Grad (docs/training.md §1.2, §7.4, §7.5, §9.1).

The discriminator is the fake-score backbone called with ``HeliosTransformer(hooks=...)`` plus these
heads: ``Discriminator`` maps the backbone's flow output and hooked block features to logits
(B, 1 + K) = [final, hook_0, ...]. Params mirror the official state dict
(``gan_heads.5.head3d.0.weight`` -> ``gan_heads_5/head3d_0/kernel``).

Sign convention (official ``cal_gan_loss``): real samples are pushed to *negative* logits
(``softplus(real)``), fakes to positive (``softplus(-fake)``); the generator pushes its fakes
negative with ``softplus(fake)``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from helios_jax.training.samples import normal

# (kernel, stride, padding) of the six convolutions of ``Discriminator3DHead``.
_CONVS = (
    ((3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ((4, 4, 4), (2, 2, 2), (1, 1, 1)),
    ((4, 4, 4), (2, 2, 2), (1, 1, 1)),
    ((3, 3, 3), (2, 1, 1), (1, 1, 1)),
    ((3, 3, 3), (2, 1, 1), (1, 1, 1)),
    ((1, 3, 3), (1, 1, 1), (0, 1, 1)),
)
GROUPS = 32
_GN_EPS = 1e-5  # torch.nn.GroupNorm's default (flax's is 1e-6)

Discriminate = Callable[[jax.Array], jax.Array]


def _torch_uniform(fan_in: int) -> nn.initializers.Initializer:
    """torch's default init of conv/linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class DiscriminatorHead(nn.Module):
    """``Discriminator3DHead``: six Conv3d (GroupNorm(32, c), SiLU after each), mean pool, Linear c -> 1.

    Input (B, C, T, H, W), channels first like the reference; output (B, 1) float32.
    """

    features: int = 768

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.features % GROUPS:
            raise ValueError(f"DiscriminatorHead: features = {self.features} must be a multiple of {GROUPS} "
                             "(GroupNorm(32, c)); Helios uses 768")
        h = jnp.moveaxis(x, 1, -1)
        for i, (kernel, stride, pad) in enumerate(_CONVS):
            fan_in = h.shape[-1] * math.prod(kernel)
            h = nn.Conv(self.features, kernel, stride, padding=[(p, p) for p in pad],
                        kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in),
                        name=f"head3d_{3 * i}")(h)
            h = nn.silu(nn.GroupNorm(GROUPS, epsilon=_GN_EPS, name=f"head3d_{3 * i + 1}")(h))
        pooled = h.astype(jnp.float32).mean(axis=(1, 2, 3))
        init = _torch_uniform(self.features)
        return nn.Dense(1, kernel_init=init, bias_init=init, name="head3d_20")(pooled)


class Discriminator(nn.Module):
    """The final head on the flow output (16 channels) and one head per hooked block feature.

    ``hooks`` must be the backbone's ``HeliosTransformer.hooks`` (same order); ``remat`` recomputes
    each head in the backward pass, as the official gradient checkpointing does.
    """

    hooks: tuple[int, ...] = (5, 15, 25, 35)
    features: int = 768
    remat: bool = False

    @nn.compact
    def __call__(self, flow: jax.Array, hooked: Sequence[jax.Array]) -> jax.Array:
        if len(hooked) != len(self.hooks):
            raise ValueError(f"Discriminator: {len(hooked)} hooked features for hooks {self.hooks}; build the "
                             "backbone with HeliosTransformer(..., hooks=<the same hooks>)")
        head = nn.remat(DiscriminatorHead) if self.remat else DiscriminatorHead
        logits = [head(self.features, name="gan_final_head")(flow)]
        logits += [head(self.features, name=f"gan_heads_{k}")(f) for k, f in zip(self.hooks, hooked)]
        return jnp.concatenate(logits, axis=1)


# ----------------------------------------------------------------------------- crops and losses


def crop_half(key: jax.Array, latents: jax.Array) -> jax.Array:
    """One random spatial crop to (H // 2, W // 2) per sample (official ``gan_crop_video_spatial``)."""
    batch, _, _, height, width = latents.shape
    h2, w2 = height // 2, width // 2
    k_top, k_left = jax.random.split(key)
    tops = jax.random.randint(k_top, (batch,), 0, height - h2 + 1)
    lefts = jax.random.randint(k_left, (batch,), 0, width - w2 + 1)

    def one(x: jax.Array, top: jax.Array, left: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(x, (0, 0, top, left), (*x.shape[:2], h2, w2))

    return jax.vmap(one)(latents, tops, lefts)


def generator_gan_loss(logits: jax.Array) -> jax.Array:
    """``mean(softplus(logits))``: the generator pushes its fakes to the real (negative) side."""
    return jnp.mean(jax.nn.softplus(logits.astype(jnp.float32)))


def cache_grad_gan_loss(discriminate: Discriminate, y: jax.Array) -> jax.Array:
    """The generator's GAN loss at ``y`` with Cache Grad (``Gan_D_Loss_With_Cached_Grad``).

    The frozen discriminator's input gradient ``gy`` comes from its own ``jax.vjp`` on a
    stop-gradient copy of ``y``; the result is ``loss + sum(gy * (y - stop_gradient(y)))``: its
    value is the loss, its gradient w.r.t. ``y`` is exactly ``gy``, and the outer differentiation
    never sees the discriminator's activations, so they are dead once ``gy`` exists.
    """
    loss, pullback = jax.vjp(lambda z: generator_gan_loss(discriminate(z)), jax.lax.stop_gradient(y))
    (gy,) = pullback(jnp.ones_like(loss))
    gy, loss = jax.lax.stop_gradient(gy), jax.lax.stop_gradient(loss)
    return loss + jnp.sum(gy * (y - jax.lax.stop_gradient(y)))


def critic_gan_loss(
    discriminate: Discriminate,
    key: jax.Array,
    fake: jax.Array,
    real: jax.Array,
    *,
    d_weight: float = 0.01,
    r1_weight: float = 100.0,
    r1_sigma: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The critic's GAN loss ``d_weight * D + r1_weight * approximate R1`` (docs/training.md §7.5.4).

    ``fake``, ``real``: the noisy fake and real chunks (same noise and timestep), full size.
    ``discriminate`` maps a batch to logits and is called ONCE on ``[fake, real, real + r1_sigma
    * noise]`` (3B), so its conditioning (timesteps, text, history) must be tiled by the caller
    in that order. Each input gets its own crop, except the R1 input, which takes the real's crop.

    Official bugs fixed here (docs/training.md §13):
    * 4: the official crops the real and perturbed-real tensors independently, so its "R1"
      measures a random spatial shift too; here both share one crop, so the penalty is the
      logit change under the sigma = 0.1 input noise alone.
    * 3: the official scores the real chunk (primary sample) with the *secondary* sample's
      history; this function takes whatever conditioning ``discriminate`` closes over, and the
      evident right use is the real chunk's own history for the real and R1 inputs.
    * 1 and 6: the official runs the denoising and GAN losses as two backwards (two optimizer
      steps under DeepSpeed, and an outer backward behind a config key that crashes); here the
      critic's loss is one sum, ``denoising + this``, for one update.
    """
    k_fake, k_real, k_noise = jax.random.split(key, 3)
    inputs = [crop_half(k_fake, fake), crop_half(k_real, real)]
    if r1_weight > 0:
        perturbed = real + r1_sigma * normal(k_noise, real.shape, real.dtype)
        inputs.append(crop_half(k_real, perturbed))
    logits = discriminate(jnp.concatenate(inputs, axis=0)).astype(jnp.float32)
    parts = jnp.split(logits, len(inputs), axis=0)
    d_loss = d_weight * (jnp.mean(jax.nn.softplus(-parts[0])) + jnp.mean(jax.nn.softplus(parts[1])))
    r1 = r1_weight * jnp.mean((parts[1] - parts[2]) ** 2) if r1_weight > 0 else jnp.zeros((), jnp.float32)
    return d_loss + r1, {"gan_d_loss": d_loss, "r1_loss": r1}
