"""What the pipeline's compiled programs hold, and that they are reused.

No host callback in the chunk or the decode program: a host callback inside the chunk is a device-to-host
round trip per DiT forward on a GPU, and it makes the program impossible to compile ahead of time for a
GPU from a CPU machine. Those programs are lowered from abstract inputs (the pipeline's own
``lower_chunk`` / ``lower_decode``), so no weight is made.

Reused: a second pipeline of the same folder, a second ``stream``, a second steered ``session`` and a second
``helios-jax generate`` in the same process compile nothing new, because every static argument of a jitted function (the chunk's
model and context functions, the VAE decoder and encoder, the text encoder's module) compares and hashes by
value rather than by identity (docs/design.md, Conventions).
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helios_jax import cli, demo
from helios_jax.models import lora as lora_lib, transformer as transformer_lib, vae as vae_lib
from helios_jax.pipeline import HeliosPipeline, PipelineSpec, TextContext
from helios_jax.prompts import PromptEncoder
from helios_jax.video import read_mp4

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


# ------------------------------------------------------------------------------ programs reused across pipelines


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counting_compiles():
    """The names of the XLA programs compiled inside the block (a list, filled as they compile).

    Counted with jax's public monitoring hook, ``jax.monitoring.register_event_duration_secs_listener``, on
    the event ``/jax/core/compile/backend_compile_duration`` (``jax._src.dispatch.BACKEND_COMPILE_EVENT``),
    which jax records once per program it hands to XLA, with the program's name: once per miss of its
    in-memory cache of compiled programs. The event wraps ``compile_or_get_cached``, so it is recorded even
    when the persistent compilation cache (off in the tests, conftest.py) would serve the executable: what
    is counted is a program traced, lowered and compiled again, which is the cost a reused program avoids.
    This is the most stable of the ways: the hook is public API and the event name has stayed the same
    across jax releases, where counting calls of ``jax._src.interpreters.pxla`` functions depends on
    private names, and ``jax.log_compiles`` writes log lines meant for people. ``jax.eval_shape`` and
    lowering without compiling record nothing.
    """
    names: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            names.append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# The demo checkpoint (3-stage distilled pyramid) at its smallest: one chunk of 64x64, one step per stage.
REQUEST = dict(prompt="a train in the fields", height=64, width=64, num_frames=33, seed=0, guidance_scale=1.0,
               pyramid_num_inference_steps_list=[1, 1, 1], max_sequence_length=16, progress=False)


def _load(folder: str) -> HeliosPipeline:
    return HeliosPipeline.from_pretrained(folder, dtype=jnp.float32, compilation_cache=False)


def _has(names: list[str], *parts: str) -> bool:
    return all(any(part in name for name in names) for part in parts)


def test_a_second_pipeline_of_the_same_folder_compiles_nothing():
    """A second ``from_pretrained`` of the same folder in the same process, asked the same request, runs
    the programs the first one compiled: the chunk (its model and text-K/V functions are static arguments
    that compare by value), the VAE decode and the text encoder. ``stream`` on it reuses them too, and a
    request of another shape does compile (so the counter can fail)."""
    folder = demo.demo_checkpoint()
    jax.clear_caches()  # the first count must not depend on what ran earlier in this process
    with counting_compiles() as first:
        video = _load(folder)(**REQUEST)
    assert _has(first, "denoise_chunk", "decode_chunk", "encode"), first

    with counting_compiles() as second:
        pipe = _load(folder)
        again = pipe(**REQUEST)
        streamed = np.concatenate([frames[0] for frames in pipe.stream(**REQUEST)])
    assert second == [], f"a second pipeline of the same folder compiled {len(second)} programs: {second}"
    np.testing.assert_array_equal(again, video)
    np.testing.assert_array_equal(streamed, video)

    with counting_compiles() as other:
        pipe(**{**REQUEST, "width": 128, "max_sequence_length": 8})
    assert _has(other, "denoise_chunk", "decode_chunk", "encode"), other


def test_a_second_session_compiles_nothing():
    """A steered session (``pipe.session``, a prompt switch blended over the next chunks) compiles its programs
    once: a second session of the same shapes, switched the same way, on a second pipeline of the same folder, runs
    them all (the chunk, decode, text encoder and the blend), as a server's sessions do."""
    def steered(pipe: HeliosPipeline) -> np.ndarray:
        session = pipe.session(**{**REQUEST, "num_frames": 33 * 3})
        first = next(session)
        session.set_prompt("a red circle moves right", transition_chunks=2)
        return np.concatenate([first, *session])

    video = steered(_load(demo.demo_checkpoint()))
    with counting_compiles() as second:
        again = steered(_load(demo.demo_checkpoint()))
    assert second == [], f"a second session compiled {len(second)} programs: {second}"
    np.testing.assert_array_equal(again, video)


def test_generate_twice_in_one_process_compiles_nothing_the_second_time(tmp_path):
    """``helios-jax generate`` run twice in one process (a notebook, a server calling ``cli.main``) with the
    same settings loads the folder again and runs the first run's programs."""
    args = ["generate", "--checkpoint", demo.demo_checkpoint(), "--weight_dtype", "fp32", "--no_compilation_cache",
            "--height", "64", "--width", "64", "--num_frames", "33", "--pyramid_num_inference_steps_list", "1", "1", "1"]
    assert cli.main([*args, "--output", str(tmp_path / "first.mp4")]) == 0
    with counting_compiles() as second:
        assert cli.main([*args, "--output", str(tmp_path / "second.mp4")]) == 0
    assert second == [], f"the second generate compiled {len(second)} programs: {second}"
    np.testing.assert_array_equal(read_mp4(tmp_path / "second.mp4"), read_mp4(tmp_path / "first.mp4"))


def test_static_callables_compare_by_value():
    """Each callable the pipeline hands a jitted function as a static argument (or binds one to) is equal,
    with an equal hash, in two pipelines of the same model: jax keys its compiled programs on them."""
    one, two = _pipeline(pyramid=True), _pipeline(pyramid=True)
    pairs = [(one._model_fn, two._model_fn), (one._context_fn, two._context_fn), (one._encode, two._encode),
             *((one._decoders[k], two._decoders[k]) for k in one._decoders),
             (PromptEncoder(demo.TEXT_ENCODER, None, None)._encode.args, PromptEncoder(demo.TEXT_ENCODER, None, None)._encode.args),
             (vae_lib.chunk_decoder(demo.VAE, jnp.float32), vae_lib.chunk_decoder(demo.VAE, np.dtype("float32")))]
    for a, b in pairs:
        assert a is not b and a == b and hash(a) == hash(b), (a, b)
    assert TextContext(dataclasses.replace(demo.TRANSFORMER, num_layers=2)) != one._context_fn
    assert vae_lib.chunk_decoder(demo.VAE, jnp.float32) != vae_lib.chunk_decoder(demo.VAE, jnp.bfloat16)


def test_init_lora_compiles_once_per_layout():
    """``init_lora``'s draw is one program per LoRA layout (paths, shapes, rank, dtype), not one per call."""
    shapes = transformer_lib.param_shapes(demo.TRANSFORMER)
    spec = lora_lib.LoraSpec(rank=2)
    lora_lib.init_lora(spec, shapes, jax.random.key(0))
    with counting_compiles() as again:
        lora_lib.init_lora(spec, shapes, jax.random.key(1))
    assert again == []
    with counting_compiles() as other:
        lora_lib.init_lora(lora_lib.LoraSpec(rank=4), shapes, jax.random.key(1))
    assert _has(other, "draw_lora"), other
