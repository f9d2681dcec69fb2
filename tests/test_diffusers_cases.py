"""diffusers' own Helios test cases, run through the port beside the live reference on the same weights.

From huggingface/diffusers (the Helios tests as of the 0.42 line):
tests/models/transformers/test_models_transformer_helios.py (``get_init_dict`` and ``get_dummy_inputs``: float
indices, a 1-frame short and mid history, 16x16 latents) and tests/pipelines/helios/test_helios.py
(``get_dummy_components``: VAE base_dim 3, a 16-channel transformer, a single-stage dynamic-shift
HeliosScheduler and a T5EncoderModel text encoder; ``get_dummy_inputs``: "dance monkey", 2 steps, guidance 1,
16x16, 9 frames, 16 tokens). There are no Helios scheduler tests in diffusers.

The hub's ``hf-internal-testing/tiny-random-t5`` cannot be reached, so its kind of model is built here from a
config (d_model 32, which text_dim = 32 requires; d_kv 8, d_ff 37, 5 layers, 4 heads, 8 buckets, ReLU) with the
project's small T5 tokenizer. Tolerances: float32, relative L2 <= 1e-5 for the DiT and <= 1e-4 for the
pipeline's frames (max-abs stated per test); float16, the port's error against the float32 reference at most
twice the reference's own float16 error. About 30 s on 2 cores.
"""

from __future__ import annotations

import functools
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, HeliosPipeline, HeliosScheduler, HeliosTransformer3DModel
from diffusers.utils.torch_utils import randn_tensor
from pipeline_fixtures import record_draws
from reference import max_abs, rel_err, to_numpy
from transformers import AutoTokenizer, T5Config, T5EncoderModel
from umt5_fixtures import PIECES, write_tokenizer

import helios_jax as hj
from helios_jax.noise import ReplayNoise

# --- tests/models/transformers/test_models_transformer_helios.py ------------------------------------------

MODEL_INIT = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4,
    "text_dim": 16, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "rope_dim": (4, 4, 4), "has_multi_term_memory_patch": True,
    "guidance_cross_attn": True, "zero_history_timestep": True, "is_amplify_history": False,
}


def model_inputs() -> dict[str, torch.Tensor]:
    """``get_dummy_inputs`` as written (one generator, drawn in its order)."""
    generator = torch.Generator("cpu").manual_seed(0)
    batch, channels, frames, height, width, text_dim, length = 1, 4, 2, 16, 16, 16, 12
    return {
        "hidden_states": randn_tensor((batch, channels, frames, height, width), generator=generator),
        "timestep": torch.randint(0, 1000, size=(batch,), generator=generator),
        "encoder_hidden_states": randn_tensor((batch, length, text_dim), generator=generator),
        "indices_hidden_states": torch.ones((batch, frames)),
        "indices_latents_history_short": torch.ones((batch, frames - 1)),
        "indices_latents_history_mid": torch.ones((batch, frames - 1)),
        "indices_latents_history_long": torch.ones((batch, (frames - 1) * 4)),
        "latents_history_short": randn_tensor((batch, channels, frames - 1, height, width), generator=generator),
        "latents_history_mid": randn_tensor((batch, channels, frames - 1, height, width), generator=generator),
        "latents_history_long": randn_tensor((batch, channels, (frames - 1) * 4, height, width), generator=generator),
    }


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("diffusers_model") / "transformer")
    HeliosTransformer3DModel(**MODEL_INIT).save_pretrained(folder)
    return folder


def _reference_forward(folder: str, dtype: torch.dtype) -> np.ndarray:
    model = HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=dtype).eval()
    inputs = {k: v.to(dtype) if v.is_floating_point() and k.startswith(("hidden", "encoder", "latents")) else v
              for k, v in model_inputs().items()}
    with torch.no_grad():
        return to_numpy(model(**inputs, return_dict=False)[0])


def _port_forward(folder: str, dtype) -> np.ndarray:
    cfg, params = hj.load_transformer(folder, dtype)
    inputs = {k: jnp.asarray(v.numpy(), dtype) if k.startswith(("hidden", "encoder", "latents")) else jnp.asarray(v.numpy())
              for k, v in model_inputs().items()}
    return np.asarray(hj.HeliosTransformer(cfg).apply({"params": params}, **inputs), np.float32)


def test_transformer_case_float32(model_folder):
    ref, out = _reference_forward(model_folder, torch.float32), _port_forward(model_folder, jnp.float32)
    assert out.shape == ref.shape == (1, 4, 2, 16, 16)
    assert np.abs(ref).max() > 0.1  # the default init gives a non-trivial output to compare
    assert rel_err(out, ref) <= 1e-5 and max_abs(out, ref) <= 1e-5 * np.abs(ref).max()


def test_transformer_case_float16_on_the_cpu(model_folder):
    """An fp16 checkpoint run in fp16 on the CPU (XLA has no F16_F16_F32 dot there)."""
    exact = _reference_forward(model_folder, torch.float32)
    ref16, out16 = _reference_forward(model_folder, torch.float16), _port_forward(model_folder, jnp.float16)
    assert np.isfinite(out16).all()
    assert rel_err(out16, exact) <= 2 * rel_err(ref16, exact), (rel_err(out16, exact), rel_err(ref16, exact))
    assert max_abs(out16, exact) <= 2 * max_abs(ref16, exact)


# --- the T5 text encoder of test_helios.py ------------------------------------------------------------

def t5_config() -> T5Config:
    """tiny-random-t5's kind of config, with the local tokenizer's vocabulary."""
    return T5Config(vocab_size=len(PIECES), d_model=32, d_kv=8, d_ff=37, num_layers=5, num_heads=4,
                    relative_attention_num_buckets=8, feed_forward_proj="relu", decoder_start_token_id=0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_t5_encoder_matches_transformers(tmp_path, dtype):
    """T5: the first layer's relative bias serves every layer; ReLU feed-forward; wo kept float32 in fp16."""
    torch.manual_seed(0)
    T5EncoderModel(t5_config()).save_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(0, len(PIECES), (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, 7:] = 0

    def reference(torch_dtype):
        model = T5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch_dtype).eval()
        with torch.no_grad():
            return to_numpy(model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state)

    cfg, params = hj.load_text_encoder(tmp_path, getattr(jnp, dtype))
    assert cfg.model_type == "t5" and "relative_attention_bias" in params["encoder"]
    out = np.asarray(hj.UMT5Encoder(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)), np.float32)
    exact = reference(torch.float32)
    if dtype == "float32":
        assert rel_err(out, exact) <= 1e-5 and max_abs(out, exact) <= 1e-5 * np.abs(exact).max()
    else:
        ref16 = reference(torch.float16)
        assert rel_err(out, exact) <= 2 * rel_err(ref16, exact)
        assert max_abs(out, exact) <= 2 * max_abs(ref16, exact)


# --- tests/pipelines/helios/test_helios.py ----------------------------------------------------------------

def pipeline_components(folder: str) -> dict:
    """``get_dummy_components`` as written, with the local T5 and tokenizer for the hub's tiny-random-t5."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    scheduler = HeliosScheduler(stage_range=[0, 1], stages=1, use_dynamic_shifting=True)
    text_encoder = T5EncoderModel(t5_config())
    tokenizer = AutoTokenizer.from_pretrained(write_tokenizer(os.path.join(folder, "_tokenizer")))
    torch.manual_seed(0)
    transformer = HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_dim=(4, 4, 4), has_multi_term_memory_patch=True, guidance_cross_attn=True, zero_history_timestep=True,
        is_amplify_history=False,
    )
    return dict(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


EXPECTED_SLICE = np.array([0.4529, 0.4527, 0.4499, 0.4542, 0.4528, 0.4524, 0.4531, 0.4534, 0.5328, 0.5340, 0.5012,
                           0.5135, 0.5322, 0.5203, 0.5144, 0.5101], np.float32)
PIPELINE_INPUTS = dict(prompt="dance monkey", negative_prompt="negative", num_inference_steps=2, guidance_scale=1.0,
                       height=16, width=16, num_frames=9, max_sequence_length=16)


@functools.lru_cache(maxsize=None)
def _pipelines(folder: str):
    reference = HeliosPipeline(**pipeline_components(folder))
    # Built by its constructor, the test's T5EncoderModel is in training mode: dropout (0.1) would draw from
    # torch's generator inside the text encoder. Inference (and the port) has none.
    reference.text_encoder.eval()
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(os.path.join(folder, "ckpt"))
    return reference, hj.HeliosPipeline.from_pretrained(os.path.join(folder, "ckpt"), dtype=jnp.float32,
                                                        compilation_cache=False)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("diffusers_pipeline"))


def test_pipeline_case_inference(pipeline_folder):
    """``test_inference``: 33 frames of 16x16 from the T5-conditioned single-stage pipeline, as the reference's."""
    reference, ours = _pipelines(pipeline_folder)
    draws = []
    with record_draws(draws):
        ref = reference(**PIPELINE_INPUTS, generator=torch.Generator("cpu").manual_seed(0), output_type="np").frames[0]
    noise = ReplayNoise(draws)
    out = ours(**PIPELINE_INPUTS, noise=noise, output_type="np", progress=False)
    assert noise.used == len(draws)
    assert out.shape == ref.shape == (33, 16, 16, 3) and out.dtype == np.float32
    assert rel_err(out, ref) <= 1e-4 and max_abs(out, ref) <= 1e-4 * np.abs(ref).max()
    # diffusers' own expected values (its frames are (T, 3, H, W); atol 1e-3 as there). Its T5 weights came from
    # the hub: the first 8 values (the first frame's top row of red) hold with any T5 here, the last 8 (the last
    # frame) depend on those weights, so only the first 8 are asserted.
    flat = np.moveaxis(out, -1, 1).reshape(-1)
    np.testing.assert_allclose(flat[:8], EXPECTED_SLICE[:8], atol=1e-3)


def test_pipeline_case_reads_the_saved_folder_without_warnings(pipeline_folder, recwarn):
    """The folder diffusers and transformers 5 write for the test's components is read without a ConfigWarning."""
    _pipelines(pipeline_folder)
    configs = hj.read_checkpoint_configs(os.path.join(pipeline_folder, "ckpt"))
    assert configs.text_encoder.model_type == "t5" and not configs.spec.pyramid
    assert not [w for w in recwarn if issubclass(w.category, hj.ConfigWarning)]
