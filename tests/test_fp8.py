"""FP8 block linears on the CPU (emulated): the quantization's exact answers, the error of the DiT and of a
whole tiny pipeline against float32, loading and converting to fp8, and the one clear error for misuse.

Error bounds (tiny random model of 2 blocks, 2 heads x 32, demo weight recipe): the DiT's velocity in fp8
(bf16 elsewhere) against float32, relative L2 < 5e-2 (measured 2.45e-2; bf16 alone gives about 5.6e-3);
the final latents of a one-chunk distilled pipeline run (1+1+1 steps, 64x64), relative L2 < 5e-2
(measured 2.1e-2); a LoRA fused before quantizing, against the live PyTorch reference with the PEFT LoRA,
relative L2 < 1e-1 on a smaller model (measured 7.0e-2); fp8 with the first and last blocks kept bf16 on a
4-block model (the tiny checkpoint's blocks twice), between bf16's error and all-fp8's and < 5e-2 (measured
2.3e-2 against 7.4e-3 and 4.1e-2).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from reference import max_abs, rel_err
from test_lora import run_ours, run_torch, setup  # noqa: F401 - setup: the PEFT LoRA fixture
from test_transformer import make_inputs

from helios_jax import cli, conversion, demo, generate
from helios_jax.config import TransformerConfig
from helios_jax.convert import CheckpointError, is_saved_params, save_params
from helios_jax.loading import COMPONENTS
from helios_jax.models import fp8, transformer as transformer_lib
from helios_jax.models.transformer import HeliosTransformer
from helios_jax.pipeline import HeliosPipeline, PipelineError

TINY = TransformerConfig(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
                         text_dim=demo.TEXT_ENCODER.d_model, freq_dim=32, ffn_dim=64, num_layers=2,
                         rope_dim=(12, 10, 10))  # no history amplification, as the published configs
DIT_BOUND = 5e-2
LATENT_BOUND = 5e-2
LORA_BOUND = 1e-1
SMALL = dict(prompt="a speeding train", height=64, width=64, guidance_scale=1.0, num_frames=33,
             pyramid_num_inference_steps_list=[1, 1, 1], max_sequence_length=16, progress=False, seed=5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo.build_demo_checkpoint(tmp_path_factory.mktemp("fp8") / "ckpt", transformer=TINY)


def transformer(checkpoint: str, dtype, quantize: str | None = None):
    return COMPONENTS["transformer"].load(os.path.join(checkpoint, "transformer"), dtype, quantize=quantize)


def test_quantize_kernel_known_answer():
    """absmax / 448 per output channel; codes round to the nearest e4m3 value; stored (out, in)."""
    kernel = jnp.asarray([[224.0, 1.0], [-112.0, 0.3], [0.5, -2.0]])  # (in=3, out=2)
    codes, scale = fp8.quantize_kernel(kernel)
    assert codes.dtype == jnp.float8_e4m3fn and codes.shape == (2, 3) and scale.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(scale), np.float32([224.0 / 448, 2.0 / 448]))
    # column 0 / 0.5 = 448, -224, 1 (exact); column 1 / (2/448) = 224, 67.2 -> 64 (e4m3 spacing 8 there), -448
    np.testing.assert_array_equal(np.asarray(codes, np.float32), [[448, -224, 1], [224, 64, -448]])


def test_dit_velocity_in_fp8_is_within_its_bound(checkpoint):
    cfg, exact = transformer(checkpoint, jnp.float32)
    _, quantized = transformer(checkpoint, jnp.bfloat16, fp8.FP8)
    to_q = quantized["blocks"]["attn1"]["to_q"]
    assert set(to_q) == {"bias", fp8.KERNEL, fp8.SCALE} and to_q[fp8.KERNEL].dtype == jnp.float8_e4m3fn
    assert quantized["proj_out"]["kernel"].dtype == jnp.bfloat16  # embedders and proj_out stay 16-bit
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 16, 2, 8, 8)).astype(np.float32)
    context = rng.standard_normal((1, 7, cfg.text_dim)).astype(np.float32)
    model = HeliosTransformer(cfg)
    run = jax.jit(lambda p, x, c: model.apply({"params": p}, x, jnp.asarray([600.0]), c))
    ref = run(exact, latents, context)
    args = (quantized, latents.astype(ml_dtypes.bfloat16), context.astype(ml_dtypes.bfloat16))
    out = run(*args)
    assert "f8_e4m3fn" in str(jax.make_jaxpr(run)(*args))  # the dots take fp8 operands
    err = rel_err(out, ref)
    print(f"DiT fp8 vs fp32: rel L2 {err:.3g}, max-abs {max_abs(out, ref):.3g} of max {np.max(np.abs(ref)):.3g}")
    assert 0 < err < DIT_BOUND, err
    assert max_abs(out, ref) < 0.25 * float(np.max(np.abs(ref)))


@pytest.mark.slow  # two pipelines compiled on the CPU: about a minute alone, more on a shared machine
def test_pipeline_latents_in_fp8_are_within_their_bound(checkpoint):
    exact = HeliosPipeline.from_pretrained(checkpoint, dtype=jnp.float32, compilation_cache=False)
    quantized = HeliosPipeline.from_pretrained(checkpoint, weight_dtype="fp8", compilation_cache=False)
    assert fp8.is_fp8(quantized.transformer_params) and quantized.model_dtype == jnp.bfloat16
    ref = exact(**SMALL, output_type="latent")
    out = quantized(**SMALL, output_type="latent")
    err = rel_err(out, ref)
    print(f"pipeline latents fp8 vs fp32: rel L2 {err:.3g}, max-abs {max_abs(out, ref):.3g}")
    assert 0 < err < LATENT_BOUND, err


def test_convert_to_fp8_and_load_it_back(checkpoint, tmp_path):
    assert cli.main(["convert", checkpoint, str(tmp_path / "fp8"), "--dtype", "fp8"]) == 0
    folder = tmp_path / "fp8" / "transformer"
    assert is_saved_params(folder)
    _, restored = transformer(str(tmp_path / "fp8"), None)  # saved fp8 loads as it is
    _, direct = transformer(checkpoint, jnp.bfloat16, fp8.FP8)
    flat_r, flat_d = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (restored, direct))
    assert [p for p, _ in flat_r] == [p for p, _ in flat_d]
    for (path, a), (_, b) in zip(flat_r, flat_d):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # the other components keep their stored dtype and format; the pipeline runs the fp8 transformer
    pipe = HeliosPipeline.from_pretrained(tmp_path / "fp8", compilation_cache=False)
    assert fp8.is_fp8(pipe.transformer_params)
    # fp8 params have no diffusers export, and take no LoRA: one error each, before any weight is read
    with pytest.raises(PipelineError, match="holds fp8 weights, which convert to orbax params only"):
        conversion.convert_checkpoint(str(tmp_path / "fp8"), str(tmp_path / "again"), "safetensors", None)
    with pytest.raises(CheckpointError, match="into which a LoRA cannot be fused"):
        conversion.convert_checkpoint(str(tmp_path / "fp8"), str(tmp_path / "again"), "orbax", None, merge_lora=str(tmp_path))
    with pytest.raises(CheckpointError, match="into which a LoRA cannot be fused"):
        HeliosPipeline.from_pretrained(tmp_path / "fp8", lora=str(tmp_path), compilation_cache=False)
    assert not os.path.exists(tmp_path / "again")


@pytest.mark.parametrize("argv, message", [
    (["vae", "--dtype", "fp8"], "fp8 weights are for the transformer only, not the vae"),
    (["vae", "--dtype", "fp8-edges"], "fp8 weights are for the transformer only, not the vae"),
    (["transformer", "--dtype", "fp8-edges"], "needs at least 3 blocks; this transformer has 2: use 'fp8'"),
    (["transformer", "--dtype", "fp8-edges", "--to", "safetensors"], "--dtype fp8-edges writes orbax params only"),
    (["text_encoder", "--dtype", "fp8"], "fp8 weights are for the transformer only, not the text_encoder"),
    (["transformer", "--dtype", "fp8", "--to", "safetensors"], "--dtype fp8 writes orbax params only"),
])
def test_fp8_misuse_on_convert_is_one_error_and_writes_nothing(checkpoint, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert cli.main(["convert", os.path.join(checkpoint, argv[0]), str(out), *argv[1:]]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(out) and not os.path.exists(f"{out}.partial")


def test_fp8_misuse_in_python_is_one_error(checkpoint):
    with pytest.raises(CheckpointError, match="transformer only, not the vae"):
        COMPONENTS["vae"].load(os.path.join(checkpoint, "vae"), jnp.float32, quantize=fp8.FP8)
    with pytest.raises(PipelineError, match="weight_dtype = 'int8'"):
        HeliosPipeline.from_pretrained(checkpoint, weight_dtype="int8", compilation_cache=False)


def test_generate_flag_selects_fp8_weights(checkpoint, tmp_path):
    args = cli.parser().parse_args(["generate", "--checkpoint", checkpoint, "--output", str(tmp_path / "v.mp4"),
                                    "--weight_dtype", "fp8", "--height", "64", "--width", "64",
                                    "--pyramid_num_inference_steps_list", "1", "1", "1"])
    job = generate.prepare(args)
    assert job.weight_dtype == fp8.FP8 and job.dtype == jnp.bfloat16


def test_sharding_table_places_the_fp8_leaves_by_their_own_axes():
    """fp8 kernels are (out, in): the table must not give them the 16-bit kernels' (in, out) axes."""
    from jax.sharding import PartitionSpec as P

    from helios_jax.models.transformer import param_shapes
    from helios_jax.parallel.rules import DIT_RULES, logical_specs

    specs = logical_specs(fp8.quantized_shapes(param_shapes(TINY)), DIT_RULES)["blocks"]
    assert specs["attn1"]["to_q"] == {"bias": P(None, "heads"), fp8.KERNEL: P(None, "heads", "embed"),
                                      fp8.SCALE: P(None, "heads")}
    assert specs["attn2"]["to_out_0"][fp8.KERNEL] == P(None, "embed", "heads")
    assert specs["ffn"]["net_0"]["proj"][fp8.KERNEL] == P(None, "mlp", "embed")
    assert specs["ffn"]["net_2"][fp8.KERNEL] == P(None, "embed", "mlp")
    assert specs["ffn"]["net_2"][fp8.SCALE] == P(None, "embed")


def test_a_lora_is_fused_into_the_16_bit_kernels_before_they_are_quantized(setup, tmp_path):  # noqa: F811
    """convert --merge-lora --dtype fp8 against the live reference with its PEFT LoRA active. This is
    test_transformer's smaller model (2 heads x 16, ffn 24), whose per-token fp8 rounding shows more: bound
    LORA_BOUND (measured 7.0e-2). The LoRA's own effect (0.91) is far above it, so a lost LoRA would fail."""
    model, base, lora_dir, _, _, _ = setup
    out = tmp_path / "fp8_lora"
    assert cli.main(["convert", base, str(out), "--dtype", "fp8", "--merge-lora", lora_dir]) == 0
    cfg, params = COMPONENTS["transformer"].load(out)
    assert fp8.is_fp8(params)
    inputs = make_inputs(3, batch=1, frames=2, noisy_hw=(4, 6), history_hw=None)
    ref = run_torch(model, inputs)
    model.disable_adapters()
    try:
        without_lora = run_torch(model, inputs)
    finally:
        model.enable_adapters()
    err = rel_err(run_ours(cfg, params, None, inputs, None), ref)
    print(f"fp8 + fused LoRA vs the reference with its LoRA: rel L2 {err:.3g}; the LoRA's effect "
          f"{rel_err(without_lora, ref):.3g}")
    assert err < LORA_BOUND < rel_err(without_lora, ref) / 3, err


EDGES = dataclasses.replace(TINY, num_layers=4)


@pytest.fixture(scope="module")
def edges_checkpoint(checkpoint, tmp_path_factory):
    """A 4-block pipeline folder: the tiny checkpoint's two blocks twice (its VAE, text encoder, tokenizer and
    scheduler copied), so that the first and last blocks have a middle between them; no init to compile."""
    _, two = transformer(checkpoint, jnp.float32)
    four = {**two, "blocks": jax.tree.map(lambda a: jnp.concatenate([a, a]), two["blocks"])}
    return demo.write_checkpoint(
        tmp_path_factory.mktemp("fp8-edges") / "ckpt", {"transformer": (EDGES, four)},
        copies={name: os.path.join(checkpoint, name) for name in ("vae", "text_encoder")},
        pieces=demo.word_pieces(demo.WORDS), scheduler=demo.SCHEDULER, model_index=demo.MODEL_INDEX)


@pytest.fixture(scope="module")
def edges_params(edges_checkpoint):
    """The 4-block DiT in float32 and in bf16 (the reference's float32 modules stay float32), and the bf16 one
    quantized by hand with ``bf16_edges``: what every way of asking for "fp8-edges" must give, exactly."""
    _, exact = transformer(edges_checkpoint, jnp.float32)
    _, bf16 = transformer(edges_checkpoint, jnp.bfloat16)
    return exact, bf16, fp8.quantize_params(bf16, bf16_edges=True)


def assert_same_params(got, want) -> None:
    """Exact equality: the same paths, dtypes and values."""
    flat_g, flat_w = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
    assert sorted(flat_g) == sorted(flat_w)
    for path, leaf in flat_w.items():
        assert flat_g[path].dtype == leaf.dtype, path
        np.testing.assert_array_equal(np.asarray(flat_g[path], np.float32), np.asarray(leaf, np.float32), str(path))


def test_first_and_last_blocks_in_bf16_are_closer_to_float32_than_all_fp8(edges_params):
    """fp8 with the first and last blocks kept 16-bit (``bf16_edges``, SGLang's choice), on the 4-block model: its
    velocity against float32 must be closer than all-fp8's and within DIT_BOUND; the text K/V path gives the same
    velocity as the plain one (bound 2e-2 of bf16 rounding: the two programs round differently)."""
    exact, bf16, edges = edges_params
    all_fp8 = fp8.quantize_params(bf16)
    assert edges[fp8.FIRST_BLOCK]["attn1"]["to_q"]["kernel"].dtype == jnp.bfloat16
    assert edges["blocks"]["ffn"]["net_2"][fp8.KERNEL].shape[0] == EDGES.num_layers - 2
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((1, 16, 2, 8, 8)).astype(np.float32)
    context = rng.standard_normal((1, 7, EDGES.text_dim)).astype(np.float32)
    model = HeliosTransformer(EDGES)
    run = jax.jit(lambda p, x, c: model.apply({"params": p}, x, jnp.asarray([600.0]), c))
    ref = run(exact, latents, context)
    low = (latents.astype(ml_dtypes.bfloat16), context.astype(ml_dtypes.bfloat16))
    errors = {name: rel_err(run(p, *low), ref) for name, p in (("bf16", bf16), ("fp8", all_fp8), ("edges", edges))}
    against_bf16 = {name: rel_err(run(p, *low), run(bf16, *low)) for name, p in (("fp8", all_fp8), ("edges", edges))}
    print(f"4-block DiT vs fp32, rel L2: {errors}; vs bf16: {against_bf16}")
    assert errors["bf16"] < errors["edges"] < errors["fp8"] and errors["edges"] < DIT_BOUND, errors
    with_kv = jax.jit(lambda p, x, c: model.apply({"params": p}, x, jnp.asarray([600.0]), c,
                                                  text_kv=transformer_lib.text_kv(EDGES, {"params": p}, c)))
    assert rel_err(with_kv(edges, *low), run(edges, *low)) < 2e-2


def test_weight_dtype_fp8_edges_is_quantize_params_by_hand(edges_checkpoint, edges_params):
    """``from_pretrained(weight_dtype="fp8-edges")`` holds exactly the params of ``quantize_params(bf16_edges=True)``
    on the bf16 DiT (so every output is the same); offloading that layout is one error, from the loader and from
    the constructor alike, before any weight is read or moved."""
    pipe = HeliosPipeline.from_pretrained(edges_checkpoint, weight_dtype=fp8.FP8_EDGES, compilation_cache=False)
    assert_same_params(pipe.transformer_params, edges_params[2])
    assert pipe.model_dtype == jnp.bfloat16
    with pytest.raises(CheckpointError, match="keeps the first and last blocks apart from the block stack"):
        HeliosPipeline.from_pretrained(edges_checkpoint, weight_dtype=fp8.FP8_EDGES, offload="blocks",
                                       compilation_cache=False)
    with pytest.raises(PipelineError, match="these transformer params keep their first and last blocks apart"):
        HeliosPipeline((pipe.transformer_config, pipe.transformer_params), (pipe.vae_config, pipe.vae_params), None,
                       pipe.scheduler_config, pipe.spec, offload="blocks")


def test_convert_to_fp8_edges_and_load_it_back(edges_checkpoint, edges_params, tmp_path):
    """``convert --dtype fp8-edges`` saves the split layout, and it loads back exactly, whatever is asked; all-fp8
    saved blocks cannot give "fp8-edges", a saved split layout cannot be offloaded, and an inconsistent one is one
    error: each before any weight is read."""
    out = str(tmp_path / "edges")
    assert cli.main(["convert", os.path.join(edges_checkpoint, "transformer"), out, "--dtype", fp8.FP8_EDGES]) == 0
    load = COMPONENTS["transformer"].load
    for quantize in (fp8.FP8, fp8.FP8_EDGES):  # saved fp8 loads in its saved layout, whatever is asked
        assert_same_params(load(out, quantize=quantize)[1], edges_params[2])
    with pytest.raises(CheckpointError, match="holds the 'fp8-edges' layout, whose first and last blocks are apart"):
        load(out, offload="blocks")
    config = COMPONENTS["transformer"].config_json(EDGES)
    all_fp8 = str(tmp_path / "all-fp8")
    save_params(all_fp8, fp8.quantize_params(edges_params[1]), config=config)
    with pytest.raises(CheckpointError, match="holds every block in fp8, so its first and last blocks cannot"):
        load(all_fp8, quantize=fp8.FP8_EDGES)
    lopsided = str(tmp_path / "lopsided")
    save_params(lopsided, {k: v for k, v in edges_params[2].items() if k != fp8.LAST_BLOCK}, config=config)
    with pytest.raises(CheckpointError, match="not a Helios transformer's layout: it holds first_block without"):
        load(lopsided)


def test_inconsistent_saved_layouts_are_named():
    """``fp8.layout_problem`` on shape trees (nothing allocated): the split layout of a config, and each way a
    saved one can be wrong."""
    from helios_jax.models.transformer import param_shapes

    edges = fp8.quantized_shapes(param_shapes(EDGES), bf16_edges=True)
    assert fp8.layout_problem(edges, EDGES.num_layers) is None
    assert fp8.layout_problem(fp8.quantized_shapes(param_shapes(EDGES)), EDGES.num_layers) is None
    assert "hold 4 layers and its config 5" in fp8.layout_problem(edges, 5)
    fp8_first = {**edges, fp8.FIRST_BLOCK: fp8.quantized_shapes({"blocks": edges[fp8.FIRST_BLOCK]})["blocks"]}
    assert "must be 16-bit and the blocks between them fp8" in fp8.layout_problem(fp8_first, EDGES.num_layers)
    wrong = jax.ShapeDtypeStruct((3, 3), jnp.bfloat16)
    odd_last = {**edges, fp8.LAST_BLOCK: {**edges[fp8.LAST_BLOCK], "scale_shift_table": wrong}}
    assert "last_block's params are not those of one layer" in fp8.layout_problem(odd_last, EDGES.num_layers)


def test_generate_flag_selects_fp8_edges_and_refuses_what_cannot_run(checkpoint, edges_checkpoint, tmp_path,
                                                                     capsys):
    flags = ["--output", str(tmp_path / "v.mp4"), "--weight_dtype", fp8.FP8_EDGES, "--height", "64", "--width", "64",
             "--pyramid_num_inference_steps_list", "1", "1", "1"]
    job = generate.prepare(cli.parser().parse_args(["generate", "--checkpoint", edges_checkpoint, *flags]))
    assert job.weight_dtype == fp8.FP8_EDGES and job.dtype == jnp.bfloat16
    for argv, message in ((["--checkpoint", edges_checkpoint, "--offload", "blocks"], "use 'fp8' with the offload"),
                          (["--checkpoint", checkpoint], "needs at least 3 blocks; this transformer has 2")):
        assert cli.main(["generate", *argv, *flags]) == 2
        assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)
