"""Stage-3 distillation building blocks (docs/training.md §1.2, §3.3, §7, §9): GAN heads, Cache Grad, DMD,
the backward-simulated rollout, EMA and the update schedule. Tiny configs; runs in well under a minute.

Tolerances: float32 parity <= 1e-5 (relative L2 and max-abs / max|ref|) against torch modules built
here from docs/training.md's description, gradients <= 1e-6, float64 numpy formulas <= 1e-6.
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
from helios_jax.training import discriminator as disc, distill, ema as ema_lib

# ----------------------------------------------------------------------------- 1. GAN heads and hooks


def torch_head(in_channels: int, c: int) -> torch.nn.Sequential:
    """Discriminator3DHead as docs/training.md §1.2 describes it, in torch."""
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

    def formula(i: int, c: int = 768) -> int:  # docs/training.md §1.2
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


# ----------------------------------------------------------------------------- 2. Cache Grad and the critic's GAN loss


def test_cache_grad_equals_the_gradient_through_the_discriminator():
    cfg = hj.TransformerConfig(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                               text_dim=8, freq_dim=16, ffn_dim=32, num_layers=1, rope_dim=(12, 10, 10),
                               has_multi_term_memory_patch=False)
    backbone = hj.HeliosTransformer(cfg, hooks=(0,))
    critic_params = hj.models.transformer.init_params(cfg, jax.random.key(1))
    heads = disc.Discriminator(hooks=(0,), features=64)
    head_params = heads.init(jax.random.key(2), jnp.zeros((1, 4, 9, 8, 12)), [jnp.zeros((1, 64, 9, 4, 6))])
    z = jax.random.normal(jax.random.key(3), (1, 4, 9, 16, 24))  # a 9-frame chunk, cropped to 8 x 12
    t, ctx = jnp.full((1,), 500.0), jax.random.normal(jax.random.key(5), (1, 5, 8))
    gen_params = {"w": jax.random.normal(jax.random.key(6), (4, 1, 16, 24)), "b": jnp.full((4, 1, 1, 1), 0.1)}

    def discriminate(y):
        flow, features = backbone.apply({"params": critic_params}, y, t, ctx)
        return heads.apply(head_params, flow, features)

    def noisy_crop(g):  # a stand-in generator, noised and cropped as in the G step
        return disc.crop_half(jax.random.key(4), 0.7 * jnp.tanh(g["w"] * z + g["b"]) + 0.3 * z)

    def direct(g):
        return disc.generator_gan_loss(discriminate(noisy_crop(g)))

    def cached(g):
        return disc.cache_grad_gan_loss(discriminate, noisy_crop(g))

    compiled = [jax.jit(jax.value_and_grad(f)).lower(gen_params).compile() for f in (direct, cached)]
    (loss, want), (got_loss, got) = (c(gen_params) for c in compiled)
    np.testing.assert_allclose(float(got_loss), float(loss), rtol=1e-6)
    scale = max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(want))
    assert scale > 0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert float(jnp.abs(a - b).max()) <= 1e-6 * scale
    # XLA's memory plan: one program, the same dataflow either way, so the same temporaries up to the
    # surrogate's few scalars (measured 2,787,712 vs 2,787,840 B; RESULTS.md). Cache Grad must not hold more.
    temp = [c.memory_analysis().temp_size_in_bytes for c in compiled]
    print("temporaries (direct, cache grad):", temp)
    assert temp[1] <= temp[0] + 1024, temp


def test_crop_half_one_independent_crop_per_sample():
    x = jnp.arange(3 * 2 * 1 * 7 * 10, dtype=jnp.float32).reshape(3, 2, 1, 7, 10)
    crops = np.asarray(disc.crop_half(jax.random.key(0), x))
    assert crops.shape == (3, 2, 1, 3, 5)
    offsets = []
    for b in range(3):
        top, left = divmod(int(crops[b, 0, 0, 0, 0]) - b * 140, 10)
        np.testing.assert_array_equal(crops[b], np.asarray(x)[b, :, :, top:top + 3, left:left + 5])
        offsets.append((top, left))
    other = np.asarray(disc.crop_half(jax.random.key(1), x))
    assert len(set(offsets)) > 1 or not np.array_equal(other, crops)


def test_critic_gan_loss_one_batched_forward_and_formula():
    k = jax.random.split(jax.random.key(0), 3)
    fake, real = jax.random.normal(k[0], (2, 3, 2, 8, 8)), jax.random.normal(k[1], (2, 3, 2, 8, 8))
    w = jax.random.normal(k[2], (3, 5))
    calls = []

    def discriminate(y):  # a stand-in with (B, 5) logits
        calls.append(y.shape)
        return jnp.einsum("bcthw,cl->bl", y, w) / 10

    loss, aux = disc.critic_gan_loss(discriminate, jax.random.key(7), fake, real, r1_sigma=0.1)
    assert calls == [(6, 3, 2, 4, 4)]
    kf, kr, kn = jax.random.split(jax.random.key(7), 3)
    pert = real + 0.1 * jax.random.normal(kn, real.shape)
    lf, lr, lp = (np.asarray(discriminate(disc.crop_half(kk, x)), np.float64)
                  for kk, x in ((kf, fake), (kr, real), (kr, pert)))

    def softplus(v):
        return np.log1p(np.exp(v))

    d_want = 0.01 * (softplus(-lf).mean() + softplus(lr).mean())
    r1_want = 100 * ((lr - lp) ** 2).mean()
    np.testing.assert_allclose([float(aux["gan_d_loss"]), float(aux["r1_loss"]), float(loss)],
                               [d_want, r1_want, d_want + r1_want], rtol=1e-5)
    # The R1 input shares the real's crop: without perturbation the penalty is exactly zero.
    _, aux0 = disc.critic_gan_loss(discriminate, jax.random.key(7), fake, real, r1_sigma=0.0)
    assert float(aux0["r1_loss"]) == 0.0


# ----------------------------------------------------------------------------- 3. DMD


def test_dmd_sigma_table():
    table = distill.dmd_sigma_table()
    assert round(table.shift, 4) == 1.9192
    s = np.linspace(1, 0.001, 1000)
    want = table.shift * s / (1 + (table.shift - 1) * s)
    np.testing.assert_allclose(np.asarray(table.sigmas), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(table.timesteps), 1000 * want, rtol=1e-6)


def test_dmd_gradient_equals_float64_formula():
    k = jax.random.split(jax.random.key(0), 4)
    x, fake, cond, uncond = (np.asarray(jax.random.normal(kk, (3, 4, 2, 4, 6)), np.float64) for kk in k)
    x[2], fake[2], cond[2], uncond[2] = 0.5, 0.5, 0.5, 0.5  # 0 / 0 -> NaN -> 0
    real = cond + 3 * (cond - uncond)
    want = (fake - real) / np.abs(x - real).mean(axis=(1, 2, 3, 4), keepdims=True)
    with np.errstate(invalid="ignore"):
        want = np.nan_to_num(want)
    got = np.asarray(distill.dmd_gradient(*(jnp.asarray(a, jnp.float32) for a in (x, fake, cond, uncond))))
    assert np.isfinite(got).all() and (got[2] == 0).all()
    assert rel_err(got, want) <= 1e-6 and max_abs(got, want) <= 1e-6 * np.abs(want).max()


def test_dmd_surrogate_gradient_is_g_over_n_and_fake_score_target():
    k = jax.random.split(jax.random.key(1), 3)
    x, g, noise = (jax.random.normal(kk, (2, 4, 3, 4, 4)) for kk in k)
    got, want = np.asarray(jax.grad(distill.dmd_loss)(x, g)), np.asarray(g, np.float64) / x.size
    assert max_abs(got, want) <= 1e-5 * np.abs(want).max()  # float32 rounding of x - (x - g)
    np.testing.assert_allclose(float(distill.dmd_loss(x, g)), 0.5 * np.mean(np.asarray(g, np.float64) ** 2), rtol=1e-6)
    flow = jax.random.normal(jax.random.key(9), x.shape)
    want = np.mean((np.asarray(flow, np.float64) - (np.asarray(noise, np.float64) - np.asarray(x, np.float64))) ** 2)
    np.testing.assert_allclose(float(distill.fake_score_loss(flow, noise, x)), want, rtol=1e-6)


def _uniform_cdf(k: np.ndarray, mu: float) -> np.ndarray:
    """P(T <= k) for T = round(clip(1000 s(r))), s the linear shift by mu, r ~ U(0.001, 1)."""
    v = (k + 0.5) / 1000
    r = v / (mu - (mu - 1) * v)  # inverse of the shift
    return np.clip((r - 0.001) / 0.999, 0, 1)


@pytest.mark.parametrize("kind,step", [("uniform", 0), ("beta", 0), ("beta", 250), ("beta", 500), ("beta", 900)])
def test_sample_dynamic_timestep_distribution(kind, step):
    from scipy import stats

    mu, n = 1.9192, 200_000
    t = np.asarray(distill.sample_dynamic_timestep(jax.random.key(step), n, step=step, shift=mu, kind=kind))
    assert t.dtype == np.int32 and t.min() >= 20 and t.max() == 980
    assert kind == "beta" or t.min() == 20
    k = np.arange(20, 980)
    v = (k + 0.5) / 1000
    r = v / (mu - (mu - 1) * v)
    if kind == "uniform":
        cdf = np.clip((r - 0.001) / 0.999, 0, 1)
    else:
        c = 0.5 * (1 + np.cos(np.pi * min(step / 500, 1)))
        cdf = stats.beta.cdf(r, 1 + 3 * c, 1 + 0.5 * c)
    empirical = np.searchsorted(np.sort(t), k, side="right") / n
    assert np.abs(empirical - cdf).max() < 0.006  # ~4 sigma of a 200k-sample KS statistic


# ----------------------------------------------------------------------------- 4. the rollout


def test_student_timesteps_equal_training_md():
    shape = (1, 16, 9, 48, 80)
    two = [np.round(s.timesteps.astype(np.float64), 2).tolist() for s in distill.rollout_plan(shape).stages]
    assert two == [[998.53, 833.96], [742.82, 547.19], [385.41, 253.99]]
    four = [np.round(s.timesteps.astype(np.float64), 2).tolist()
            for s in distill.rollout_plan(shape, amplify_first_chunk=True).stages]
    assert four == [[998.53, 902.22, 833.96, 783.07], [742.82, 640.00, 547.19, 463.00],
                    [385.41, 328.62, 253.99, 151.53]]
    last = distill.rollout_plan(shape).stages[2]
    assert np.round(np.array([*last.sigmas, last.next_sigmas[-1]], np.float64), 4).tolist() == [0.9995, 0.6574, 0.0]


@pytest.mark.parametrize("amplify", [False, True])
def test_rollout_gradient_comes_only_from_exit_steps(amplify):
    plan = distill.rollout_plan((1, 2, 1, 8, 8), amplify_first_chunk=amplify)
    table = jnp.asarray(np.stack([s.timesteps for s in plan.stages]))  # (S, n)

    def model_fn(params, x, t):  # one scalar weight per (stage, step): flow = w x + 0.1
        w = jnp.sum(params * (table == t[0]))
        return w * x + 0.1

    params = jnp.full(table.shape, 0.3)

    @jax.jit
    def run(params, key):
        return distill.rollout(model_fn, params, plan, key)

    grad = jax.jit(jax.grad(lambda p, key: run(p, key)[0].sum()))
    seen = set()
    for seed in range(12):
        key = jax.random.key(seed)
        out, exits = run(params, key)
        exits = [int(e) for e in exits]
        seen.add(tuple(exits))
        g = np.asarray(grad(params, key))
        expected = np.zeros(table.shape, bool)
        expected[2, exits[2]] = True
        expected[1, exits[1]] = exits[2] == 0  # the chain reaches an exit only through later exits at step 0
        expected[0, exits[0]] = exits[2] == 0 and exits[1] == 0
        assert ((g != 0) == expected).all(), (exits, g)
        for s, e in enumerate(exits):  # the steps before an exit ran: they change the output, gradient 0
            if e > 0:
                bumped = params.at[s, 0].add(0.1)
                assert not np.allclose(np.asarray(run(bumped, key)[0]), np.asarray(out))
    assert len(seen) > 3


# ----------------------------------------------------------------------------- 5. EMA and the schedule


def test_ema_follows_its_closed_form_over_the_warm_up():
    after, decay, n = 3, 0.99, 30
    ps = [np.random.default_rng(i).normal(size=(3,)) for i in range(n + 1)]
    ema = {"lora": jnp.asarray(ps[0])}
    for count in range(1, n + 1):
        ema = ema_lib.ema_update(ema, {"lora": jnp.asarray(ps[count])}, count, decay, after)
    s = np.maximum(np.arange(1, n + 1) - after - 1, 0)
    d = np.where(s <= 0, 0.0, np.minimum((1 + s) / (10 + s), decay))
    weights = [(1 - d[i]) * np.prod(d[i + 1:]) for i in range(n)]  # e_N = sum_i (1 - d_i) prod_{j>i} d_j p_i
    want = np.prod(d) * ps[0] + sum(w * p for w, p in zip(weights, ps[1:]))
    np.testing.assert_allclose(np.asarray(ema["lora"]), want, rtol=1e-5)
    assert float(ema_lib.ema_decay(after + 1, decay, after)) == 0.0
    assert np.isclose(float(ema_lib.ema_decay(after + 2, decay, after)), 2 / 11)
    assert float(ema_lib.ema_decay(750 + 1 + 890)) == pytest.approx(0.99) and float(ema_lib.ema_decay(750 + 890)) < 0.99


def test_update_plan():
    plans = [distill.update_plan(s, gen_update_ratio=5, ema_start_step=7, gan_start_step=10) for s in range(13)]
    assert [s for s, p in enumerate(plans) if p.generator] == [0, 5, 10]
    assert all(p.critic for p in plans)
    assert [s for s, p in enumerate(plans) if p.ema] == [0, 1, 2, 3, 4, 5, 6, 10]
    assert [s for s, p in enumerate(plans) if p.gan] == [10, 11, 12]
    traced = jax.jit(lambda s: distill.update_plan(s, gen_update_ratio=5, ema_start_step=7, gan_start_step=10))
    assert all(tuple(bool(v) for v in traced(s)) == tuple(bool(v) for v in plans[s]) for s in range(13))


def test_amplified_rollout_runs_in_the_same_program():
    """``rollout(..., amplified=, use_amplified=)`` (a traced switch) equals the rollout of whichever plan
    it picks: same output and exit steps as calling that plan alone, per key."""
    shape = (1, 2, 1, 8, 8)
    plan = distill.rollout_plan(shape)
    amplified = distill.rollout_plan(shape, amplify_first_chunk=True)

    def model_fn(params, x, t):
        return params * x * (t[:, None, None, None, None] / 1000.0) + 0.1

    switched = jax.jit(lambda use, key: distill.rollout(model_fn, 0.3, plan, key, amplified=amplified,
                                                        use_amplified=use))
    for seed in range(4):
        key = jax.random.key(seed)
        for use, alone in ((False, plan), (True, amplified)):
            out, exits = switched(jnp.asarray(use), key)
            ref_out, ref_exits = distill.rollout(model_fn, 0.3, alone, key)
            np.testing.assert_array_equal(np.asarray(exits), np.asarray(ref_exits))
            np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-6, atol=1e-6)
