"""Parity of the Helios DiT with diffusers' ``HeliosTransformer3DModel``.

Every test builds the reference with random weights, writes it with ``save_pretrained``, loads it
with ``hj.load_transformer`` and runs both on the same inputs. Tolerances (float32):
relative L2 error <= 1e-5 and max-abs error <= 1e-5 * max|ref|.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import HeliosTransformer3DModel
from reference import max_abs, randomize, rel_err, to_numpy

import helios_jax as hj

TINY = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=8,
    freq_dim=16,
    ffn_dim=24,
    num_layers=2,
    rope_dim=(6, 6, 4),
)
REL_TOL = 1e-5


def reference_model(seed: int = 0, **flags) -> HeliosTransformer3DModel:
    return randomize(HeliosTransformer3DModel(**{**TINY, **flags}), seed)


def save(model: HeliosTransformer3DModel, folder, sharded: bool = True) -> str:
    model.save_pretrained(str(folder), max_shard_size="30KB" if sharded else "10GB")
    return str(folder)


def pipeline_indices(keep_first_frame: bool, frames: int, history_sizes=(16, 2, 1)) -> dict[str, torch.Tensor]:
    """The frame indices HeliosPipeline builds for one chunk (its __call__, 'prepare indices')."""
    sizes = list(history_sizes)
    if keep_first_frame:
        idx = torch.arange(0, sum([1, *sizes, frames]))
        prefix, long, mid, one_x, noisy = idx.split([1, *sizes, frames])
        short = torch.cat([prefix, one_x])
    else:
        sizes[-1] += 1
        long, mid, short, noisy = torch.arange(0, sum([*sizes, frames])).split([*sizes, frames])
    return {
        "indices_hidden_states": noisy[None],
        "indices_latents_history_short": short[None],
        "indices_latents_history_mid": mid[None],
        "indices_latents_history_long": long[None],
    }


def make_inputs(
    seed: int,
    batch: int,
    frames: int,
    noisy_hw: tuple[int, int],
    history_hw: tuple[int, int] | None,
    keep_first_frame: bool = True,
    terms: tuple[str, ...] = ("short", "mid", "long"),
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = TINY["in_channels"]
    inputs = {
        "hidden_states": torch.randn(batch, c, frames, *noisy_hw, generator=g),
        "timestep": torch.randint(1, 1000, (batch,), generator=g).float(),
        "encoder_hidden_states": torch.randn(batch, 7, TINY["text_dim"], generator=g),
    }
    if history_hw is None:
        return inputs
    indices = pipeline_indices(keep_first_frame, frames)
    inputs["indices_hidden_states"] = indices["indices_hidden_states"]
    for name in terms:
        index = indices[f"indices_latents_history_{name}"]
        inputs[f"indices_latents_history_{name}"] = index
        inputs[f"latents_history_{name}"] = torch.randn(batch, c, index.shape[1], *history_hw, generator=g)
    return inputs


def run_reference(model: HeliosTransformer3DModel, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return to_numpy(model(**inputs, return_dict=False)[0])


def run_ours(cfg, params, inputs: dict[str, torch.Tensor], dtype=jnp.float32) -> np.ndarray:
    args = {k: jnp.asarray(to_numpy(v) if v.is_floating_point() else v.numpy()) for k, v in inputs.items()}
    args = {k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) and k != "timestep" else v for k, v in args.items()}
    out = jax.jit(hj.HeliosTransformer(cfg).apply)({"params": params}, **args)
    return np.asarray(out.astype(jnp.float32))


def assert_close(out: np.ndarray, ref: np.ndarray, rel: float = REL_TOL) -> None:
    assert out.shape == ref.shape
    assert np.isfinite(out).all()
    assert rel_err(out, ref) <= rel, f"relative L2 error {rel_err(out, ref):.2e} > {rel:.0e}"
    assert max_abs(out, ref) <= rel * np.abs(ref).max(), f"max-abs error {max_abs(out, ref):.2e}"


FLAG_GRID = [
    dict(guidance_cross_attn=g, zero_history_timestep=z, is_amplify_history=a is not None,
         history_scale_mode=a or "per_head", has_multi_term_memory_patch=m)
    for g, z, a, m in itertools.product([True, False], [True, False], [None, "scalar", "per_head"], [True, False])
]


@pytest.mark.parametrize("flags", FLAG_GRID, ids=lambda f: "-".join(f"{k[:4]}={v}" for k, v in f.items()))
def test_flag_grid_matches_reference(tmp_path, flags):
    model = reference_model(seed=1, **flags)
    cfg, params = hj.load_transformer(save(model, tmp_path))
    cases = [make_inputs(2, batch=2, frames=2, noisy_hw=(4, 6), history_hw=None)]
    if flags["has_multi_term_memory_patch"]:
        cases.append(make_inputs(3, batch=2, frames=2, noisy_hw=(4, 6), history_hw=(6, 10)))
    for inputs in cases:
        assert_close(run_ours(cfg, params, inputs), run_reference(model, inputs))


SHAPES = [
    # batch, noisy frames, noisy (h, w), history (h, w), keep_first_frame
    (2, 1, (6, 10), (6, 10), True),
    (2, 3, (4, 6), (6, 10), False),  # stage-0 noisy latents smaller than the history
    (1, 9, (2, 2), (10, 14), True),
    (2, 4, (8, 8), (16, 8), False),
]


@pytest.mark.parametrize("batch,frames,noisy_hw,history_hw,keep_first_frame", SHAPES)
def test_shapes_and_pipeline_index_layouts(tmp_path, batch, frames, noisy_hw, history_hw, keep_first_frame):
    model = reference_model(seed=4, is_amplify_history=True)
    cfg, params = hj.load_transformer(save(model, tmp_path, sharded=False))
    inputs = make_inputs(5, batch, frames, noisy_hw, history_hw, keep_first_frame)
    assert_close(run_ours(cfg, params, inputs), run_reference(model, inputs))


def test_per_sample_indices_and_short_history_only(tmp_path):
    model = reference_model(seed=6, is_amplify_history=True, history_scale_mode="scalar")
    cfg, params = hj.load_transformer(save(model, tmp_path))
    inputs = make_inputs(7, batch=2, frames=3, noisy_hw=(4, 4), history_hw=(6, 6), terms=("short",))
    inputs["indices_hidden_states"] = torch.tensor([[5, 6, 7], [9, 10, 11]])  # one row per sample
    inputs["indices_latents_history_short"] = torch.tensor([[0, 4], [0, 8]])
    assert_close(run_ours(cfg, params, inputs), run_reference(model, inputs))


@pytest.mark.parametrize("flags", [dict(), dict(guidance_cross_attn=False, zero_history_timestep=False)])
def test_bf16_error_within_twice_the_references_own(tmp_path, flags):
    """bf16 weights and inputs: our error against the float32 reference is at most twice the
    reference's own bf16 error. (With is_amplify_history the reference cannot run in bf16 at all:
    its attention rejects the float32 keys its own concatenation produces.)"""
    model = reference_model(seed=8, **flags)
    folder = save(model, tmp_path)
    inputs = make_inputs(9, batch=2, frames=3, noisy_hw=(4, 6), history_hw=(6, 10))
    ref32 = run_reference(model, inputs)
    ref16_model = HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    bf16_inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()}
    ref16 = run_reference(ref16_model, bf16_inputs)
    cfg, params = hj.load_transformer(folder, dtype=jnp.bfloat16)
    ours16 = run_ours(cfg, params, inputs, dtype=jnp.bfloat16)
    ref_error, our_error = rel_err(ref16, ref32), rel_err(ours16, ref32)
    assert 0 < ref_error < 0.1
    assert our_error <= 2 * ref_error, f"ours {our_error:.3e} vs reference bf16 {ref_error:.3e}"
    assert max_abs(ours16, ref32) <= 2 * max_abs(ref16, ref32)


def test_bf16_params_keep_the_references_fp32_modules(tmp_path):
    model = reference_model(seed=10, is_amplify_history=True)
    folder = save(model, tmp_path)
    ref = HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    cfg, params = hj.load_transformer(folder, dtype=jnp.bfloat16)
    keymap = hj.models.transformer.keymap(cfg)
    flat = {"/".join(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] for path in [
        tuple(getattr(k, "key", str(k)) for k in path)]}
    for key, tensor in ref.state_dict().items():
        path, _ = keymap.to_flax(key)
        leaf = {"weight": ("kernel" if tensor.ndim >= 2 else "scale")}.get(path[-1], path[-1])
        ours = flat["/".join(path[:-1] + (leaf,))]
        expected = jnp.float32 if tensor.dtype == torch.float32 else jnp.bfloat16
        assert ours.dtype == expected, f"{key}: reference {tensor.dtype}, ours {ours.dtype}"


def test_orbax_round_trip_gives_the_same_model(tmp_path):
    from helios_jax.config import to_dict
    from helios_jax.convert import save_params

    model = reference_model(seed=11)
    folder = save(model, tmp_path / "diffusers")
    cfg, params = hj.load_transformer(folder, dtype=jnp.float32)
    save_params(tmp_path / "orbax", params, config=to_dict(cfg))
    cfg2, restored = hj.load_transformer(tmp_path / "orbax", dtype=jnp.bfloat16)
    assert cfg2 == cfg
    _, direct = hj.load_transformer(folder, dtype=jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(direct)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("shard_bytes", [20_000, 10**9])
def test_export_back_to_safetensors_loads_in_diffusers(tmp_path, shard_bytes):
    """Our params written back as a diffusers folder give diffusers the original state dict."""
    from helios_jax.config import to_dict
    from helios_jax.convert import export_safetensors

    model = reference_model(seed=12, is_amplify_history=True)
    cfg, params = hj.load_transformer(save(model, tmp_path / "in"))
    out = export_safetensors(tmp_path / "out", params, hj.models.transformer.keymap(cfg),
                             {"_class_name": "HeliosTransformer3DModel", **to_dict(cfg)}, max_shard_bytes=shard_bytes)
    reloaded = HeliosTransformer3DModel.from_pretrained(out)
    expected, got = model.state_dict(), reloaded.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
