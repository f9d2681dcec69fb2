"""Stage-3 distillation building blocks (TRAINING.md 1.2, 3.3, 7, 9): GAN heads, Cache Grad, DMD,
the backward-simulated rollout, EMA and the update schedule. Tiny configs; runs in well under a minute.

Tolerances: float32 parity <= 1e-5 (relative L2 and max-abs / max|ref|) against torch modules built
here from TRAINING.md's description, gradients <= 1e-6, float64 numpy formulas <= 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import max_abs, rel_err, to_numpy
from test_transformer import make_inputs, reference_model, run_ours, save

import helios_jax as hj
from helios_jax.training import discriminator as disc

# ----------------------------------------------------------------------------- 1. GAN heads and hooks


def torch_head(in_channels: int, c: int) -> torch.nn.Sequential:
    """Discriminator3DHead as TRAINING.md 1.2 describes it, in torch."""
    layers = []
    specs = [(in_channels, 3, 1, 1), (c, 4, 2, 1), (c, 4, 2, 1), (c, 3, (2, 1, 1), 1), (c, 3, (2, 1, 1), 1),
             (c, (1, 3, 3), 1, (0, 1, 1))]
    for cin, k, s, p in specs:
        layers += [torch.nn.Conv3d(cin, c, k, stride=s, padding=p), torch.nn.GroupNorm(32, c), torch.nn.SiLU()]
    layers += [torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(c, 1)]
    return torch.nn.Sequential(*layers)


def head_params_from_torch(head: torch.nn.Sequential) -> dict:
    params = {}
    for i, layer in enumerate(head):
        w = {k: to_numpy(v) for k, v in layer.state_dict().items()}
        if isinstance(layer, torch.nn.Conv3d):
            params[f"head3d_{i}"] = {"kernel": w["weight"].transpose(2, 3, 4, 1, 0), "bias": w["bias"]}
        elif isinstance(layer, torch.nn.GroupNorm):
            params[f"head3d_{i}"] = {"scale": w["weight"], "bias": w["bias"]}
        elif isinstance(layer, torch.nn.Linear):
            params[f"head3d_{i}"] = {"kernel": w["weight"].T, "bias": w["bias"]}
    return params


def test_head_matches_torch_head():
    torch.manual_seed(0)
    ref = torch_head(8, 64)
    with torch.no_grad():
        for m in ref:  # non-trivial norms
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 9, 12, 20)
    with torch.no_grad():
        want = to_numpy(ref(x))
    got = np.asarray(disc.DiscriminatorHead(64).apply({"params": head_params_from_torch(ref)}, jnp.asarray(x.numpy())))
    assert got.shape == want.shape == (2, 1)
    assert rel_err(got, want) <= 1e-5 and max_abs(got, want) <= 1e-5 * np.abs(want).max()


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_param_counts_equal_the_formula():
    def count(in_channels: int) -> int:
        x = jax.ShapeDtypeStruct((1, in_channels, 9, 12, 20), jnp.bfloat16)
        return _count(jax.eval_shape(disc.DiscriminatorHead(768).init, jax.random.key(0), x))

    def formula(i: int, c: int = 768) -> int:  # TRAINING.md 1.2
        return c * (27 * i + 2 * 64 * c + 2 * 27 * c + 9 * c) + 6 * c + 12 * c + c + 1

    assert count(5120) == formula(5120) and round(formula(5120) / 1e6, 2) == 218.84
    assert count(16) == formula(16) and round(formula(16) / 1e6, 2) == 113.00
    assert round((4 * formula(5120) + formula(16)) / 1e6, 2) == 988.36


def test_default_torch_init_bounds():
    params = disc.DiscriminatorHead(64).init(jax.random.key(1), jnp.zeros((1, 8, 3, 4, 4)))["params"]
    bound = 1 / np.sqrt(8 * 27)
    k, b = np.asarray(params["head3d_0"]["kernel"]), np.asarray(params["head3d_0"]["bias"])
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound and np.abs(b).max() <= bound
    assert (np.asarray(params["head3d_1"]["scale"]) == 1).all() and (np.asarray(params["head3d_1"]["bias"]) == 0).all()


def test_hooked_features_match_reference_block_outputs(tmp_path):
    model = reference_model(seed=3, num_layers=3)
    cfg, params = hj.load_transformer(save(model, tmp_path, sharded=False))
    inputs = make_inputs(4, batch=2, frames=3, noisy_hw=(4, 6), history_hw=(8, 8))
    captured = {}
    for k in (0, 2):
        model.blocks[k].register_forward_hook(lambda m, a, out, k=k: captured.__setitem__(k, to_numpy(out)))
    with torch.no_grad():
        flow_ref = to_numpy(model(**inputs, return_dict=False)[0])
    args = {k: jnp.asarray(to_numpy(v) if v.is_floating_point() else v.numpy()) for k, v in inputs.items()}
    flow, features = hj.HeliosTransformer(cfg, hooks=(2, 0)).apply({"params": params}, **args)
    assert rel_err(np.asarray(flow), run_ours(cfg, params, inputs)) <= 1e-6  # the default call's flow
    assert rel_err(np.asarray(flow), flow_ref) <= 1e-5
    for k, got in zip((2, 0), features):
        assert got.shape == (2, cfg.inner_dim, 3, 2, 3)
        noisy = captured[k][:, -3 * 2 * 3:]  # the noisy tokens end the sequence
        want = noisy.reshape(2, 3, 2, 3, cfg.inner_dim).transpose(0, 4, 1, 2, 3)
        assert rel_err(np.asarray(got), want) <= 1e-5 and max_abs(np.asarray(got), want) <= 1e-5 * np.abs(want).max()
    with pytest.raises(ValueError, match="hooks"):
        hj.HeliosTransformer(cfg, hooks=(3,)).apply({"params": params}, **args)


def test_discriminator_logits_layout():
    flow = jnp.ones((2, 4, 3, 4, 6))
    feats = [jnp.full((2, 32, 3, 2, 3), float(i)) for i in range(2)]
    d = disc.Discriminator(hooks=(0, 2), features=32)
    params = d.init(jax.random.key(0), flow, feats)["params"]
    assert set(params) == {"gan_final_head", "gan_heads_0", "gan_heads_2"}
    logits = d.apply({"params": params}, flow, feats)
    head = disc.DiscriminatorHead(32)
    want = [head.apply({"params": params[n]}, x) for n, x in
            (("gan_final_head", flow), ("gan_heads_0", feats[0]), ("gan_heads_2", feats[1]))]
    np.testing.assert_allclose(np.asarray(logits), np.concatenate(want, axis=1), rtol=1e-6)
