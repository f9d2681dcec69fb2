"""Running the reference Helios pipelines' sampling loops without a real model.

The pipelines are run unmodified through ``__call__`` with an analytic stand-in transformer (a
fixed linear map of the latents, the timestep and the mean text embedding), a VAE whose decode
is the identity, ``output_type="latent"`` and given text embeddings. Their noise draws are
replaced by arrays the test supplies, so our ``denoise_chunk`` can be fed exactly the same noise.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import diffusers.pipelines.helios.pipeline_helios as single_module
import diffusers.pipelines.helios.pipeline_helios_pyramid as pyramid_module
import jax.numpy as jnp
import numpy as np
import pytest
import torch


class StubTransformer(torch.nn.Module):
    """``A x + (t / 1000) b + W^T mean(context)``: linear in everything the sampler feeds it."""

    def __init__(self, channels: int, text_dim: int, seed: int = 0, patch_size=(1, 2, 2)):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = torch.nn.Parameter(torch.randn(channels, channels, generator=g) * 0.2 - torch.eye(channels) * 0.6)
        self.b = torch.nn.Parameter(torch.randn(channels, generator=g))
        self.W = torch.nn.Parameter(torch.randn(text_dim, channels, generator=g) * 0.5)
        self.config = types.SimpleNamespace(patch_size=list(patch_size), in_channels=channels)

    dtype = property(lambda self: torch.float32)
    device = property(lambda self: torch.device("cpu"))

    def cache_context(self, name):
        return contextlib.nullcontext()

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False, **history):
        x = torch.einsum("oc,bcthw->bothw", self.A, hidden_states)
        t = (timestep.float() / 1000)[:, None, None, None, None] * self.b[None, :, None, None, None]
        c = (encoder_hidden_states.mean(1) @ self.W)[:, :, None, None, None]
        return ((x + t + c).contiguous(),)  # the real transformer returns contiguous output

    def jax_args(self) -> dict:
        return {k: jnp.asarray(v.detach().numpy()) for k, v in (("A", self.A), ("b", self.b), ("W", self.W))}


def stub_model_fn(args, latents, timestep, context):
    """The JAX twin of ``StubTransformer`` (the ``model_fn`` of ``denoise_chunk``)."""
    x = jnp.einsum("oc,bcthw->bothw", args["A"], latents)
    t = (timestep / 1000)[:, None, None, None, None] * args["b"][None, :, None, None, None]
    c = (context.mean(1) @ args["W"])[:, :, None, None, None]
    return x + t + c


class StubVAE(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.config = types.SimpleNamespace(scale_factor_temporal=4, scale_factor_spatial=8, z_dim=channels,
                                            latents_mean=[0.0] * channels, latents_std=[1.0] * channels)

    dtype = property(lambda self: torch.float32)
    device = property(lambda self: torch.device("cpu"))

    def decode(self, z, return_dict=False):
        return (z,)


class _TorchWithFedNoise:
    """Stands in for the ``torch`` module inside the pyramid pipeline: ``torch.randn`` hands out the
    given block-noise draws in order, and with ``float64_gamma`` ``torch.linalg.cholesky`` factors
    the covariance rebuilt in float64 (its 1e-8 jitter survives there, not in float32), so the
    reference runs at gamma = 1/3, where its float32 factor fails on the CPU."""

    def __init__(self, draws: list[np.ndarray], float64_gamma: float | None):
        self._draws = list(draws)
        self._gamma = float64_gamma
        self.linalg = torch.linalg if float64_gamma is None else types.SimpleNamespace(cholesky=self._cholesky)

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, *shape, generator=None, device=None, dtype=None):
        z = self._draws.pop(0)
        assert tuple(shape) == (int(np.prod(z.shape[:-1])), z.shape[-1]), (shape, z.shape)
        return torch.from_numpy(np.ascontiguousarray(z, np.float32)).reshape(shape)

    def _cholesky(self, a):
        n, gamma = a.shape[0], self._gamma
        cov = torch.eye(n, dtype=torch.float64) * (1 + gamma + 1e-8) - torch.ones(n, n, dtype=torch.float64) * gamma
        assert torch.allclose(cov.to(a.dtype), a), "the covariance is not the one for this gamma"
        return torch.linalg.cholesky(cov).to(a.dtype)


@contextlib.contextmanager
def fed_noise(initial: np.ndarray | None, blocks: list[np.ndarray] = (), float64_gamma: float | None = None
              ) -> Iterator[None]:
    """Make the reference pipelines draw ``initial`` as the chunk's latents and ``blocks`` as the
    per-stage block noise (factored in float64 for ``float64_gamma``)."""
    used = []

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == initial.shape, (shape, initial.shape)
        used.append(True)
        return torch.from_numpy(np.array(initial, np.float32)).to(dtype or torch.float32)

    fake_torch = _TorchWithFedNoise(list(blocks), float64_gamma)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pyramid_module, "randn_tensor", randn_tensor)
        mp.setattr(single_module, "randn_tensor", randn_tensor)
        mp.setattr(pyramid_module, "torch", fake_torch)
        yield
    assert (initial is None or used) and not fake_torch._draws, "the reference did not draw all the fed noise"


def run_reference(pipeline_cls, scheduler, transformer: StubTransformer, prompt_embeds, negative_embeds,
                  latent_shape, noise, blocks=(), float64_gamma=None, **call_kwargs) -> np.ndarray:
    """One chunk through the reference pipeline's ``__call__``; returns its final latents."""
    b, c, t, h, w = latent_shape
    extra = {k: call_kwargs.pop(k) for k in ("is_cfg_zero_star", "is_distilled") if k in call_kwargs}
    pipe = pipeline_cls(tokenizer=None, text_encoder=None, vae=StubVAE(c), scheduler=scheduler,
                        transformer=transformer, **extra)
    pipe.set_progress_bar_config(disable=True)
    with fed_noise(noise, list(blocks), float64_gamma), torch.no_grad():
        out = pipe(
            prompt_embeds=torch.from_numpy(np.asarray(prompt_embeds)),
            negative_prompt_embeds=None if negative_embeds is None else torch.from_numpy(np.asarray(negative_embeds)),
            height=8 * h, width=8 * w, num_frames=4 * (t - 1) + 1, num_latent_frames_per_chunk=t,
            history_sizes=[2, 1, 1], output_type="latent", **call_kwargs,
        )
    return out.frames.numpy()
