"""What the pipeline's compiled programs hold: no host callback in the chunk or the decode program.

A host callback inside the chunk is a device-to-host round trip per DiT forward on a GPU, and it makes
the program impossible to compile ahead of time for a GPU from a CPU machine. The programs are lowered
from abstract inputs (the pipeline's own ``lower_chunk`` / ``lower_decode``), so no weight is made.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from helios_jax import demo
from helios_jax.models import transformer as transformer_lib
from helios_jax.models import vae as vae_lib
from helios_jax.pipeline import HeliosPipeline, PipelineSpec

# What a host callback lowers to: jax.debug.callback / io_callback / pure_callback are custom calls to these.
CALLBACK_MARKERS = ("callback", "host_compute", "outfeed", "send_to_host", "recv_from_host")
SMALL = dict(height=64, width=64, max_sequence_length=16)
BASE_SCHEDULER = {"_class_name": "HeliosScheduler", "stages": 1, "stage_range": [0, 1], "gamma": 1 / 3,
                  "shift": 3.0, "scheduler_type": "unipc"}


def _pipeline(pyramid: bool) -> HeliosPipeline:
    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), tree)

    scheduler = demo.SCHEDULER if pyramid else BASE_SCHEDULER
    spec = PipelineSpec(pyramid=pyramid, is_distilled=pyramid)
    return HeliosPipeline((demo.TRANSFORMER, abstract(transformer_lib.param_shapes(demo.TRANSFORMER))),
                          (demo.VAE, abstract(vae_lib.param_shapes(demo.VAE))), None, scheduler, spec)


def _callbacks(text: str) -> list[str]:
    return [line.strip()[:160] for line in text.splitlines() if any(m in line.lower() for m in CALLBACK_MARKERS)]


@pytest.mark.parametrize("kind,settings", [
    ("distilled", dict(guidance_scale=1.0, pyramid_num_inference_steps_list=[2, 2, 2])),
    ("distilled amplified", dict(guidance_scale=1.0, pyramid_num_inference_steps_list=[1, 1, 1],
                                 is_amplify_first_chunk=True)),
    ("base with CFG", dict(guidance_scale=5.0, num_inference_steps=2)),
])
def test_chunk_program_holds_no_host_callback(kind, settings):
    pipe = _pipeline(pyramid=kind != "base with CFG")
    text = pipe.lower_chunk(**SMALL, **settings).as_text()
    assert "stablehlo.while" in text, "the lowered chunk should hold its step loops"
    assert _callbacks(text) == []


def test_decode_program_holds_no_host_callback():
    text = _pipeline(pyramid=True).lower_decode(height=64, width=64, latent_frames=3).as_text()
    assert "stablehlo.convolution" in text and _callbacks(text) == []


def test_the_check_sees_a_callback():
    """The check itself: a program with jax.debug.callback is caught by it."""
    def f(x):
        jax.debug.callback(lambda: None)
        return x + 1

    assert _callbacks(jax.jit(f).lower(jax.ShapeDtypeStruct((2,), jnp.float32)).as_text())
