"""denoise_chunk against the reference pipelines' whole sampling loop for one chunk.

``HeliosPipeline`` and ``HeliosPyramidPipeline`` run unmodified (``__call__``) with an analytic
stand-in transformer; both sides get the same initial and block noise (tests/sampling_stubs.py).
The chunk's final latents must agree to 1e-5 relative (L2).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import HeliosDMDScheduler, HeliosPipeline, HeliosPyramidPipeline, HeliosScheduler
from reference import max_abs, rel_err
from sampling_stubs import StubTransformer, run_reference, stub_model_fn

from helios_jax.sampling import (
    ChunkNoise,
    denoise_chunk,
    draw_chunk_noise,
    guidance_mode,
    noise_shapes,
    plan_pyramid_chunk,
    plan_single_stage_chunk,
    sample_chunk,
)
from helios_jax.sampling.chunk import _denoise_chunk

logging.getLogger("diffusers").setLevel(logging.ERROR)

TOL = 1e-5
TEXT_DIM = 8


def _inputs(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompt, negative = (rng.standard_normal((batch, 5, TEXT_DIM)).astype(np.float32) for _ in range(2))
    return prompt, negative, StubTransformer(4, TEXT_DIM, seed=seed)


def _noise(plan, seed: int) -> ChunkNoise:
    """Host noise of exactly the shapes the plan asks for."""
    rng = np.random.default_rng(seed)
    shapes = noise_shapes(plan)
    return ChunkNoise(rng.standard_normal(shapes.initial).astype(np.float32),
                      tuple(rng.standard_normal(s).astype(np.float32) for s in shapes.block))


def _scheduler(config: dict):
    cls = HeliosDMDScheduler if config.get("_class_name") == "HeliosDMDScheduler" else HeliosScheduler
    return cls.from_config(config)


PYRAMID_CASES = {
    # name: (scheduler config, steps per stage, latent shape, pipeline kwargs)
    "base-unipc-cfg": ({"gamma": 0.25}, [3, 3, 3], (1, 4, 2, 8, 12), {"guidance_scale": 5.0}),
    "base-unipc-cfgzero-default-gamma": ({}, [3, 2, 2], (2, 4, 2, 8, 12),
                                         {"guidance_scale": 5.0, "is_cfg_zero_star": True}),
    "unipc-cfgzero-steps2-order3-dynamic": (
        {"gamma": 0.2, "solver_order": 3, "use_dynamic_shifting": True}, [4, 3, 3], (2, 4, 2, 8, 16),
        {"guidance_scale": 4.0, "is_cfg_zero_star": True, "zero_steps": 2}),
    "unipc-cfgzero-no-zero-init-bh1": ({"gamma": 0.25, "solver_type": "bh1", "disable_corrector": [1]}, [2, 3, 2],
                                       (1, 4, 2, 8, 12),
                                       {"guidance_scale": 3.0, "is_cfg_zero_star": True, "use_zero_init": False}),
    "euler-cfg-2-stages": ({"scheduler_type": "euler", "stages": 2, "stage_range": [0, 0.5, 1], "gamma": 0.3},
                           [3, 4], (2, 4, 1, 8, 12), {"guidance_scale": 2.5}),
    "unipc-1-stage-no-cfg": ({"stages": 1, "shift": 3.0}, [5], (1, 4, 2, 6, 10), {"guidance_scale": 1.0}),
    "distilled-dmd": ({"_class_name": "HeliosDMDScheduler", "gamma": 0.25}, [2, 2, 2], (2, 4, 2, 8, 12),
                      {"guidance_scale": 1.0, "is_distilled": True}),
    "distilled-dmd-amplified-first-chunk": (
        {"_class_name": "HeliosDMDScheduler", "gamma": 0.25, "use_dynamic_shifting": True}, [1, 2, 2],
        (1, 4, 2, 8, 12), {"guidance_scale": 1.0, "is_distilled": True, "is_amplify_first_chunk": True}),
    "distilled-dmd-cfgzero-default-gamma": ({"_class_name": "HeliosDMDScheduler"}, [2, 2, 2], (1, 4, 2, 8, 12),
                                            {"guidance_scale": 3.0, "is_distilled": True,
                                             "is_cfg_zero_star": True}),
}


@pytest.mark.parametrize("name", list(PYRAMID_CASES))
def test_pyramid_chunk_equals_reference(name):
    config, steps, shape, call = PYRAMID_CASES[name]
    prompt, negative, transformer = _inputs(shape[0], seed=len(name))
    scale = call["guidance_scale"]
    plan = plan_pyramid_chunk(
        config, steps, shape, guidance=guidance_mode(scale, call.get("is_cfg_zero_star", False)),
        amplify_first_chunk=call.get("is_amplify_first_chunk", False), zero_steps=call.get("zero_steps", 1),
        use_zero_init=call.get("use_zero_init", True),
    )
    noise = _noise(plan, seed=len(name))
    gamma = _scheduler(config).config.gamma
    ref = run_reference(HeliosPyramidPipeline, _scheduler(config), transformer, prompt,
                        negative if scale > 1 else None, shape, noise.initial, noise.block,
                        float64_gamma=gamma if abs(gamma - 1 / 3) < 1e-12 else None,
                        pyramid_num_inference_steps_list=steps, **call)
    out = denoise_chunk(stub_model_fn, transformer.jax_args(), plan, noise, jnp.asarray(prompt),
                        jnp.asarray(negative), scale)
    assert out.shape == ref.shape == shape
    assert rel_err(out, ref) <= TOL, (rel_err(out, ref), max_abs(out, ref))


SINGLE_CASES = {
    "unipc-cfg": ({"stages": 1}, 6, {"guidance_scale": 5.0}),
    "euler-no-cfg-any-gamma": ({"stages": 1, "scheduler_type": "euler", "gamma": 0.5}, 5, {"guidance_scale": 1.0}),
    "unipc-order3-bh1-dynamic-cfg": ({"stages": 1, "solver_order": 3, "solver_type": "bh1",
                                      "use_dynamic_shifting": True}, 7, {"guidance_scale": 3.0}),
}


@pytest.mark.parametrize("name", list(SINGLE_CASES))
def test_single_stage_chunk_equals_reference(name):
    config, steps, call = SINGLE_CASES[name]
    shape = (2, 4, 3, 6, 10)
    prompt, negative, transformer = _inputs(shape[0], seed=len(name))
    scale = call["guidance_scale"]
    plan = plan_single_stage_chunk(config, steps, shape, guidance=guidance_mode(scale))
    noise = draw_chunk_noise(jax.random.key(len(name)), plan)
    ref = run_reference(HeliosPipeline, _scheduler(config), transformer, prompt, negative if scale > 1 else None,
                        shape, np.asarray(noise.initial), num_inference_steps=steps, **call)
    out = denoise_chunk(stub_model_fn, transformer.jax_args(), plan, noise, jnp.asarray(prompt),
                        jnp.asarray(negative), scale)
    assert rel_err(out, ref) <= TOL, (rel_err(out, ref), max_abs(out, ref))


def test_batched_cfg_equals_two_calls_and_reference():
    config, steps, shape, call = PYRAMID_CASES["base-unipc-cfgzero-default-gamma"]
    prompt, negative, transformer = _inputs(shape[0], seed=5)
    args = (transformer.jax_args(),)
    two_calls = plan_pyramid_chunk(config, steps, shape, guidance="cfg_zero_star")
    batched = plan_pyramid_chunk(config, steps, shape, guidance="cfg_zero_star", batch_cfg=True)
    noise = _noise(two_calls, seed=5)
    ref = run_reference(HeliosPyramidPipeline, _scheduler(config), transformer, prompt, negative, shape,
                        noise.initial, noise.block, float64_gamma=1 / 3, pyramid_num_inference_steps_list=steps,
                        **call)
    outs = [denoise_chunk(stub_model_fn, *args, plan, noise, jnp.asarray(prompt), jnp.asarray(negative), 5.0)
            for plan in (two_calls, batched)]
    assert rel_err(outs[1], outs[0]) <= 1e-6
    assert rel_err(outs[1], ref) <= TOL


def _counting_context_fn(args, context):
    """A context_fn (the pipeline's computes the DiT's text K/V) whose result the stub can check."""
    return context * args["A"][0, 0]  # depends on model_args, as the text K/V depend on the weights


def _scaled_context_model_fn(args, latents, timestep, context):
    return stub_model_fn(args, latents, timestep, context / args["A"][0, 0])


@pytest.mark.parametrize("guidance,batch_cfg", [("none", False), ("cfg", False), ("cfg", True)])
def test_context_fn_prepares_each_context_once_for_every_step(guidance, batch_cfg):
    """context_fn's output is what model_fn receives, for the conditional, unconditional and doubled contexts,
    and it is computed outside the step loops: once per context in the traced program."""
    shape = (2, 4, 2, 8, 12)
    prompt, negative, transformer = _inputs(shape[0], seed=4)
    plan = plan_pyramid_chunk({"gamma": 0.25}, [2, 2, 2], shape, guidance=guidance, batch_cfg=batch_cfg)
    noise = _noise(plan, seed=4)
    args = (transformer.jax_args(), plan, noise, jnp.asarray(prompt), jnp.asarray(negative), 5.0)
    plain = denoise_chunk(stub_model_fn, *args)
    prepared = denoise_chunk(_scaled_context_model_fn, *args, context_fn=_counting_context_fn)
    assert rel_err(prepared, plain) <= 1e-6
    calls = []
    jax.make_jaxpr(lambda *a: _denoise_chunk(_scaled_context_model_fn, *a, context_fn=lambda m, c: calls.append(c)
                                             or _counting_context_fn(m, c)))(*args[:5], jnp.float32(5.0))
    assert len(calls) == (1 if guidance == "none" or batch_cfg else 2)
    assert calls[0].shape[0] == shape[0] * (2 if batch_cfg else 1)


def test_a_new_chunk_with_the_same_step_counts_does_not_recompile():
    shape, steps = (1, 4, 2, 8, 12), [2, 2, 2]
    prompt, negative, transformer = _inputs(1)
    first = plan_pyramid_chunk({"gamma": 0.25}, steps, shape, guidance="cfg")
    denoise_chunk(stub_model_fn, transformer.jax_args(), first, _noise(first, 0), prompt, negative, 5.0)
    compiled = _denoise_chunk._cache_size()
    # Other schedule values, other gamma, other weights, other noise, other guidance scale: same program.
    other = plan_pyramid_chunk({"gamma": 0.1, "shift": 2.0, "stage_range": [0, 0.2, 0.5, 1]}, steps, shape,
                               guidance="cfg")
    _, _, other_transformer = _inputs(1, seed=9)
    out = denoise_chunk(stub_model_fn, other_transformer.jax_args(), other, _noise(other, 1), prompt, negative, 3.0)
    assert _denoise_chunk._cache_size() == compiled
    assert np.isfinite(np.asarray(out)).all()
    # The distilled model's amplified first chunk is a different static schedule: its own program.
    dmd = {"_class_name": "HeliosDMDScheduler", "gamma": 0.25}
    plain, amplified = (plan_pyramid_chunk(dmd, steps, shape, amplify_first_chunk=a) for a in (False, True))
    assert amplified.layout.stage_steps == (4, 4, 4) and plain.layout.stage_steps == (2, 2, 2)


def test_sample_chunk_draws_from_the_key():
    shape = (1, 4, 2, 8, 12)
    prompt, _, transformer = _inputs(1)
    plan = plan_pyramid_chunk({"_class_name": "HeliosDMDScheduler", "gamma": 0.25}, [1, 1, 1], shape)
    key = jax.random.key(3)
    out = sample_chunk(stub_model_fn, transformer.jax_args(), plan, key, prompt)
    again = denoise_chunk(stub_model_fn, transformer.jax_args(), plan, draw_chunk_noise(key, plan), prompt)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))


def test_bad_input_is_a_clear_error():
    shape = (1, 4, 2, 8, 12)
    prompt, negative, transformer = _inputs(1)
    args = transformer.jax_args()
    plan = plan_pyramid_chunk({"gamma": 0.25}, [1, 1, 1], shape, guidance="cfg")
    noise = _noise(plan, 0)
    with pytest.raises(ValueError, match="noise shapes"):
        denoise_chunk(stub_model_fn, args, plan, ChunkNoise(noise.initial[:, :2], noise.block), prompt, negative)
    with pytest.raises(ValueError, match="block-noise arrays"):
        denoise_chunk(stub_model_fn, args, plan, ChunkNoise(noise.initial, noise.block[:1]), prompt, negative)
    with pytest.raises(ValueError, match="needs negative_context"):
        denoise_chunk(stub_model_fn, args, plan, noise, prompt)
    with pytest.raises(ValueError, match="context must be"):
        denoise_chunk(stub_model_fn, args, plan, noise, prompt[0], negative)
    with pytest.raises(ValueError, match="stage_steps"):
        plan_pyramid_chunk({}, [1, 1], shape)
    with pytest.raises(ValueError, match="divisible by 2"):
        plan_pyramid_chunk({"gamma": 0.25}, [1, 1, 1], (1, 4, 2, 10, 12))
    with pytest.raises(ValueError, match="guidance = 'cfg0'"):
        plan_pyramid_chunk({}, [1, 1, 1], shape, guidance="cfg0")
    with pytest.raises(ValueError, match="single-stage"):
        plan_single_stage_chunk({}, 4, shape)
    with pytest.raises(ValueError, match="num_inference_steps = 0"):
        plan_pyramid_chunk({}, [2, 0, 2], shape)
    with pytest.raises(ValueError, match="gamma = 0.5"):
        plan_pyramid_chunk({"gamma": 0.5}, [1, 1, 1], shape)
