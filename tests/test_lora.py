"""LoRA: parity with diffusers' HeliosTransformer3DModel carrying PEFT adapters, gradients, the file format, merge.

The reference is a tiny random DiT with the multi-term memory patch and PEFT's LoRA placed as the
official trainer places it (every nn.Linear but names with "norm", exclude_modules [down, up], conv
LoRA on patch_embedding and patch_short/mid/long, "gaussian" init), then random lora_B so that no
factor is zero. Tolerances (float32): relative L2 <= 1e-5 and max-abs <= 1e-5 * max|ref| for outputs;
relative L2 <= 1e-5 for the loss and every LoRA gradient.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import HeliosPipeline, HeliosTransformer3DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from reference import max_abs, randomize, rel_err, to_numpy
from safetensors import safe_open
from test_transformer import TINY, assert_close, make_inputs

import helios_jax as hj
from helios_jax import cli
from helios_jax.convert import lora_format
from helios_jax.models import lora as L, transformer as T

RANK, ALPHA = 3, 6.0
PATCHES = ("patch_embedding", "patch_short", "patch_mid", "patch_long")


def official_targets(model: torch.nn.Module) -> list[str]:
    """train_helios.py's "all-linear" list with both conv-LoRA switches on."""
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} | set(PATCHES)
    return sorted(n for n in names if "norm" not in n)


def peft_model(folder, seed: int = 0) -> HeliosTransformer3DModel:
    """A random reference DiT saved (without adapters) to ``folder``, then given random PEFT LoRA factors."""
    model = randomize(HeliosTransformer3DModel(**TINY), seed)
    model.save_pretrained(str(folder))
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", lora_dropout=0.0,
                                 target_modules=official_targets(model), exclude_modules=["down", "up"]))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def save_peft(model: HeliosTransformer3DModel, folder) -> str:
    """The LoRA as the official trainer writes it (save_lora_weights with the adapter config as metadata)."""
    HeliosPipeline.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(model),
                                     transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    return str(folder)


def jax_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(to_numpy(v) if v.is_floating_point() else v.numpy()) for k, v in inputs.items()}


def run_torch(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return to_numpy(model(**inputs, return_dict=False)[0])


@functools.lru_cache
def apply_fn(cfg):
    """One jitted apply per config (compiled once per input shapes and collections, shared by the tests)."""
    return jax.jit(lambda v, s, x: hj.HeliosTransformer(cfg).apply(v, **x, lora_scale=s))


def run_ours(cfg, params, lora, inputs, scale) -> np.ndarray:
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    return np.asarray(apply_fn(cfg)(variables, jnp.float32(1.0 if scale is None else scale), jax_inputs(inputs)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(torch model with PEFT LoRA, base folder, LoRA folder written by diffusers, cfg, base params, loaded LoRA)."""
    root = tmp_path_factory.mktemp("lora")
    model = peft_model(root / "base")
    lora_dir = save_peft(model, root / "peft_lora")
    cfg, params = hj.load_transformer(str(root / "base"))
    return model, str(root / "base"), lora_dir, cfg, params, L.load_lora(lora_dir, cfg)


def history_inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    return make_inputs(seed, batch=2, frames=2, noisy_hw=(4, 6), history_hw=(8, 8))


def test_official_targets_are_406_linears_and_rank_counts_match_the_spec():
    """The official trainer's LoRA at 14B (``lora_layers: all-linear`` in its stage YAMLs; docs/lora.md): 406 linear
    modules (5 embedder linears, 10 per block x 40, proj_out), 4,868,416 params per unit rank; conv LoRA per rank
    5184 (patch_embedding, short), 5632 (mid), 9216 (long)."""
    cfg = hj.config.read_config(hj.config.TransformerConfig, {
        "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
        "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40, "rope_dim": [44, 42, 42],
        "has_multi_term_memory_patch": True})
    shapes = T.param_shapes(cfg)
    linear = L.LoraSpec(rank=1)
    modules = L.target_modules(linear, shapes)
    assert sum(40 if m[0] == "blocks" else 1 for m in modules) == 406

    def count(spec):
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(L.lora_shapes(spec, shapes)))

    assert count(linear) == 4_868_416
    assert count(L.LoraSpec(rank=2)) == 2 * 4_868_416
    convs = count(L.LoraSpec(rank=1, patch_embedding=True, history_patches=True)) - count(linear)
    assert convs == 5184 + 5184 + 5632 + 9216


def test_gaussian_init():
    shapes = T.param_shapes(hj.config.read_config(hj.config.TransformerConfig, TINY))
    lora = L.init_lora(L.LoraSpec(rank=8, patch_embedding=True), shapes, jax.random.key(0))
    a = np.concatenate([np.ravel(a) for a, _ in L.factors(lora).values()])
    b = np.concatenate([np.ravel(b) for _, b in L.factors(lora).values()])
    assert not b.any()  # B = 0: the LoRA starts as a no-op
    assert a.size > 5000 and abs(a.std() * 8 - 1) < 0.05 and abs(a.mean()) < 0.01  # A ~ N(0, (1/r)^2)


def test_forward_matches_peft_linear_and_conv_lora(setup):
    model, _, _, cfg, params, loaded = setup
    assert loaded.spec == L.LoraSpec(rank=RANK, alpha=ALPHA, patch_embedding=True, history_patches=True)
    inputs = history_inputs()
    ref = run_torch(model, inputs)
    assert_close(run_ours(cfg, params, loaded.lora, inputs, loaded.spec.scale), ref)
    model.disable_adapters()
    try:
        base = run_torch(model, inputs)
    finally:
        model.enable_adapters()
    assert rel_err(base, ref) > 1e-2  # the LoRA changes the output: the comparison above is not vacuous


def test_lora_scale_is_traced_no_recompile(setup):
    """DMD's switch: one compiled program, LoRA off (scale 0: the base model) and on."""
    _, _, _, cfg, params, loaded = setup
    fn, inputs = apply_fn(cfg), jax_inputs(history_inputs())
    variables = {"params": params, "lora": loaded.lora}
    on = fn(variables, jnp.float32(loaded.spec.scale), inputs)
    size = fn._cache_size()
    off = fn(variables, jnp.float32(0.0), inputs)
    assert fn._cache_size() == size
    base = run_ours(cfg, params, None, history_inputs(), None)
    assert max_abs(off, base) <= 1e-6 * np.abs(base).max()
    assert rel_err(on, base) > 1e-2


@pytest.mark.parametrize("stage", ["stage1", "pyramid stage 1"])
def test_stage_loss_and_lora_gradients_match_torch_autograd(setup, stage):
    """The package's own loss path (``training.losses`` examples through ``training.stages.StageModel``) and
    d/d(every LoRA factor), against PEFT's autograd on the same noisy input, timestep and target: stage 1
    (sigma from the example, x_t re-made in torch) and the middle level of the stage-2 pyramid (its 4 x 4
    input, global timestep and velocity, with the full-resolution history)."""
    from helios_jax.training import losses, stages

    model, _, _, cfg, params, loaded = setup
    inputs = make_inputs(7, batch=2, frames=2, noisy_hw=(8, 8), history_hw=(8, 8))
    clean = inputs.pop("hidden_states")
    inputs.pop("timestep")
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(8))
    clean_j, noise_j = jnp.asarray(to_numpy(clean)), jnp.asarray(to_numpy(noise))
    key = jax.random.key(9)
    if stage == "stage1":
        example = losses.stage1_example(key, clean_j, noise=noise_j)
        sigma = torch.from_numpy(np.asarray(example.sigma))[:, None, None, None, None]
        x_t, target = (1 - sigma) * clean + sigma * noise, noise - clean
        assert np.abs(to_numpy(x_t) - np.asarray(example.noisy)).max() <= 1e-6
    else:
        example = losses.pyramid_examples(key, clean_j, noise=noise_j)[1]
        assert example.stage == 1 and example.noisy.shape[-2:] == (4, 4)
        x_t, target = torch.from_numpy(np.asarray(example.noisy)), torch.from_numpy(np.asarray(example.velocity))
    inputs["timestep"] = torch.from_numpy(np.asarray(example.timestep))

    model.zero_grad()
    ref_loss = torch.mean((model(x_t, **inputs, return_dict=False)[0] - target) ** 2)
    ref_loss.backward()
    ref_grads = {name.replace(".default", ""): to_numpy(p.grad) for name, p in model.named_parameters() if "lora_" in name}
    assert len(ref_grads) == 2 * (5 + 2 * 10 + 1 + 4)

    net = stages.StageModel(hj.HeliosTransformer(cfg), jnp.float32, loaded.spec.scale)
    conditioning = {k: v for k, v in jax_inputs(inputs).items() if k != "timestep"}
    loss = lambda lora: losses.example_loss(net, {"params": params, "lora": lora}, example, conditioning)  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(loss))(loaded.lora)
    assert abs(float(value) - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    ours = lora_format.state_dict(grads, T.keymap(cfg))
    assert sorted(k.removeprefix("transformer.") for k in ours) == sorted(ref_grads)
    for key_name, grad in ours.items():
        ref = ref_grads[key_name.removeprefix("transformer.")]
        assert np.linalg.norm(ref) > 0, key_name
        assert rel_err(grad, ref) <= 1e-5, f"{key_name}: relative error {rel_err(grad, ref):.2e}"


def test_saved_here_loads_in_diffusers_load_lora_weights(setup, tmp_path):
    model, base_dir, _, cfg, params, loaded = setup
    L.save_lora(tmp_path / "ours", loaded.lora, loaded.spec, cfg)
    with safe_open(str(tmp_path / "ours" / lora_format.LORA_WEIGHTS), framework="numpy") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in keys and meta["format"] == "pt"
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == ALPHA
    fresh = HeliosTransformer3DModel.from_pretrained(base_dir)
    pipe = HeliosPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=fresh)
    pipe.load_lora_weights(str(tmp_path / "ours"))
    inputs = history_inputs(seed=11)
    assert_close(run_torch(pipe.transformer.eval(), inputs), run_torch(model, inputs))
    assert_close(run_ours(cfg, params, loaded.lora, inputs, loaded.spec.scale), run_torch(pipe.transformer, inputs))


def test_partial_history_patches_round_trip(setup, tmp_path):
    _, _, _, cfg, params, loaded = setup
    partial = {name: jax.tree.map(lambda x: x + 1.0, params[name]) for name in ("patch_short", "patch_mid", "patch_long")}
    L.save_lora(tmp_path, loaded.lora, loaded.spec, cfg, partial=partial)
    with safe_open(str(tmp_path / lora_format.PARTIAL_WEIGHTS), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(f"{n}.{leaf}" for n in partial for leaf in ("bias", "weight"))
        assert f.get_tensor("patch_mid.weight").shape == (TINY["num_attention_heads"] * TINY["attention_head_dim"],
                                                         TINY["in_channels"], 2, 4, 4)
    again = L.load_lora(tmp_path, cfg)
    assert again.spec == loaded.spec
    for a, b in zip(jax.tree.leaves(again.lora), jax.tree.leaves(loaded.lora)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(again.partial), jax.tree.leaves(partial)):
        np.testing.assert_array_equal(a, b)


def test_merge_equals_unmerged_and_convert_merge_lora_loads_in_diffusers(setup, tmp_path):
    model, base_dir, lora_dir, cfg, params, loaded = setup
    inputs = history_inputs(seed=12)
    unmerged = run_ours(cfg, params, loaded.lora, inputs, loaded.spec.scale)
    merged = L.merge_lora(params, loaded.lora, loaded.spec.scale)
    assert_close(run_ours(cfg, merged, None, inputs, None), unmerged)
    out = tmp_path / "merged"
    assert cli.main(["convert", base_dir, str(out), "--to", "safetensors", "--merge-lora", lora_dir]) == 0
    fused = HeliosTransformer3DModel.from_pretrained(str(out)).eval()
    assert not any("lora" in k for k in fused.state_dict())
    assert_close(run_torch(fused, inputs), run_torch(model, inputs))


def test_lora_that_does_not_fit_is_one_error_listing_the_keys(setup, tmp_path, capsys):
    model, base_dir, _, cfg, _, _ = setup
    state = get_peft_model_state_dict(model)
    state["blocks.0.attn1.to_zz.lora_A.weight"] = torch.zeros(RANK, 32)
    state["blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(RANK, 31)
    HeliosPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=state)
    with pytest.raises(L.LoraError) as err:
        L.load_lora(tmp_path, cfg)
    message = str(err.value)
    assert "transformer.blocks.0.attn1.to_zz.lora_A.weight" in message
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight: shape (3, 31)" in message
    assert cli.main(["convert", base_dir, str(tmp_path / "never"), "--merge-lora", str(tmp_path)]) == 2
    assert "to_zz" in capsys.readouterr().err and not os.path.exists(tmp_path / "never")


def test_trainable_masks_for_optax(setup):
    """Only the chosen subset moves: labels with optax.multi_transform, the mask with optax.masked."""
    _, _, _, _, params, loaded = setup
    variables = {"params": params, "lora": loaded.lora}
    grads = jax.tree.map(jnp.ones_like, variables)
    for subset, trained in (("lora", set()), ("lora+history_patches", {"patch_short", "patch_mid", "patch_long"})):
        mask = L.trainable_mask(variables, subset)
        frozen = jax.tree.map(lambda m: not m, mask)
        for opt in (optax.multi_transform({"trainable": optax.sgd(1.0), "frozen": optax.set_to_zero()},
                                          L.trainable_labels(variables, subset)),
                    optax.chain(optax.masked(optax.sgd(1.0), mask), optax.masked(optax.set_to_zero(), frozen))):
            new = jax.jit(lambda g, v, opt=opt: optax.apply_updates(v, opt.update(g, opt.init(v), v)[0]))(grads, variables)
            for top, tree in params.items():
                changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(new["params"][top]))]
                assert all(changed) if top in trained else not any(changed), top
            assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded.lora), jax.tree.leaves(new["lora"])))
    with pytest.raises(ValueError, match="trainable subset"):
        L.trainable_mask(variables, "everything")


def test_pipeline_from_pretrained_fuses_the_lora(tmp_path):
    """``HeliosPipeline.from_pretrained(ckpt, lora=..., lora_scale=...)`` runs the merged DiT; a LoRA for
    another model is refused before any weight is read; ``generate`` takes --lora / --lora_scale."""
    from helios_jax import demo

    ckpt = demo.demo_checkpoint()  # the user cache's embedded checkpoint, shared with the other tests
    cfg, base = hj.load_transformer(os.path.join(ckpt, "transformer"), jnp.float32)
    spec = L.LoraSpec(rank=2, alpha=4.0, patch_embedding=True)
    lora = jax.tree.map(lambda x: x + 0.05, L.init_lora(spec, base, jax.random.key(0)))
    L.save_lora(tmp_path / "lora", lora, spec, cfg)
    pipe = hj.HeliosPipeline.from_pretrained(ckpt, dtype=jnp.float32, lora=str(tmp_path / "lora"), lora_scale=0.5,
                                             compilation_cache=False)
    want = L.merge_lora(base, lora, spec.scale * 0.5)
    for a, b in zip(jax.tree.leaves(pipe.transformer_params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(base)))

    other = hj.config.read_config(hj.config.TransformerConfig, TINY)
    L.save_lora(tmp_path / "other", L.init_lora(L.LoraSpec(rank=2), T.param_shapes(other), jax.random.key(1)), L.LoraSpec(rank=2), other)
    with pytest.raises(L.LoraError, match="does not fit"):
        hj.HeliosPipeline.from_pretrained(ckpt, lora=str(tmp_path / "other"), compilation_cache=False)
    args = cli.parser().parse_args(["generate", "--lora", "x", "--lora_scale", "0.7"])
    assert (args.lora, args.lora_scale) == ("x", 0.7)
