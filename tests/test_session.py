"""``pipe.session(...)``: a generation steered between chunks (helios_jax/session.py).

The steered frames are compared with the same generation planned ahead (``interactive_prompts``, the CSV
mode), which is what a live change must equal: same programs, same noise, same history, so the comparisons are
exact (tolerance 0, uint8 frames). Run on the embedded random-weight demo checkpoint (no torch) at its smallest:
64x64, one step per pyramid stage.
"""

from __future__ import annotations

import threading

import jax.numpy as jnp
import numpy as np
import pytest

from helios_jax import demo
from helios_jax.pipeline import HeliosPipeline, PipelineError
from helios_jax.prompts import ChunkPrompt, PromptSchedule
from helios_jax.session import SessionPaused
from helios_jax.video import MediaError

SMALL = dict(height=64, width=64, guidance_scale=1.0, pyramid_num_inference_steps_list=[1, 1, 1],
             max_sequence_length=16)
A, B = "a red circle moves right on a dark blue background", "a green square moves up on a white background"


@pytest.fixture(scope="module")
def pipe():
    return HeliosPipeline.from_pretrained(demo.demo_checkpoint(), dtype=jnp.float32, compilation_cache=False)


@pytest.fixture
def contexts(pipe, monkeypatch):
    """The text embeddings handed to each chunk's sampling program, in order (the program computes every block's
    text K/V from them inside: transformer.text_kv through sampling.denoise_chunk's context_fn)."""
    seen: list[np.ndarray] = []
    denoise = pipe._denoise

    def recording(plan, history, noise, context, *args):
        seen.append(np.asarray(context))
        return denoise(plan, history, noise, context, *args)

    monkeypatch.setattr(pipe, "_denoise", recording)
    return seen


def _steered(pipe, changes: dict, **kwargs) -> np.ndarray:
    """A session's whole video, ``changes[k](session)`` called between chunks k - 1 and k (so it applies at k)."""
    session = pipe.session(**SMALL, **kwargs)
    frames = []
    while not session.done:
        changes.get(session.index, lambda s: None)(session)
        frames.append(next(session))
    assert session.index == session.num_chunks == len(frames)
    with pytest.raises(StopIteration):
        next(session)
    return np.concatenate(frames)


def test_a_live_switch_equals_the_switch_planned_ahead(pipe):
    """set_prompt after chunk 0, blended over 3 chunks, gives the frames of the CSV mode's schedule with prompt B from
    chunk 1 and interpolation_chunks=3 (weights 0, 0.5, 1 on chunks 1-3), exactly; and it changes the video."""
    args = dict(num_frames=33 * 4, seed=5)
    planned = pipe(**SMALL, **args, interactive_prompts=[(0, A), (1, B)], interpolation_chunks=3, progress=False)
    live = _steered(pipe, {1: lambda s: s.set_prompt(B, transition_chunks=3)}, prompt=A, **args)
    np.testing.assert_array_equal(live, planned)
    kept = pipe(**SMALL, **args, prompt=A, progress=False)
    np.testing.assert_array_equal(live[:33], kept[:33])
    assert not np.array_equal(live[33 * 2:], kept[33 * 2:]), "the switch must change the chunks after it"


def test_no_text_of_the_old_prompt_survives_a_switch(pipe, contexts):
    """With no transition, every chunk from the switch on is conditioned on B's embeddings alone, exactly, and its
    frames are those of a generation that had B from that chunk on (given the same history)."""
    args = dict(num_frames=33 * 3, seed=7)
    live = _steered(pipe, {1: lambda s: s.set_prompt(B, transition_chunks=0)}, prompt=A, **args)
    embeds = {p: np.asarray(pipe.prompt_encoder.encode(p, max_sequence_length=16)) for p in (A, B)}
    assert len(contexts) == 3
    np.testing.assert_array_equal(contexts[0], embeds[A])
    for chunk in (1, 2):
        np.testing.assert_array_equal(contexts[chunk], embeds[B], err_msg=f"chunk {chunk}")
    planned = pipe(**SMALL, **args, interactive_prompts=[(0, A), (1, B)], progress=False)
    np.testing.assert_array_equal(live, planned)


def test_switched_schedules():
    """PromptSchedule.switched: the rest of the video from the switch on, blended from what the last chunk used (a
    pure prompt's own row; a finished blend's target, exactly; mid-blend the mixed embeddings), two rows at most."""
    rows = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 2)), jnp.float32)
    new = jnp.full((1, 4, 2), 7.0)
    planned = PromptSchedule(rows[:2], [ChunkPrompt(0, 0, 0.0), ChunkPrompt(0, 1, 0.0), ChunkPrompt(0, 1, 1.0),
                                        ChunkPrompt(1, 1, 0.0), ChunkPrompt(1, 1, 0.0)])
    after = planned.switched(3, new, 3)  # after the finished blend: from prompt 1's row exactly
    assert len(after) == 2 and after.plan == (ChunkPrompt(0, 1, 0.0), ChunkPrompt(0, 1, 0.5))
    np.testing.assert_array_equal(after[0], rows[1][None])
    np.testing.assert_array_equal(after.embeds[1:], new)
    mid = PromptSchedule(rows, [ChunkPrompt(0, 1, 0.0), ChunkPrompt(0, 1, 0.5), ChunkPrompt(0, 1, 1.0)])
    switched = mid.switched(2, new, 0)  # during a blend: from chunk 1's mixture; no transition: new at once
    np.testing.assert_allclose(switched.embeds[0], (rows[0] + rows[1]) / 2, atol=1e-6)
    assert switched.plan == (ChunkPrompt(1, 1, 0.0),) and switched.embeds.shape == (2, 4, 2)
    np.testing.assert_array_equal(switched[0], new)
    start = mid.switched(0, new, 3)  # before any chunk: the prompt itself from the start, no blend
    assert start.plan == (ChunkPrompt(0, 0, 0.0),) * 3
    np.testing.assert_array_equal(start.embeds, new)


def test_set_image_before_the_first_chunk_is_image_to_video(pipe):
    """A text-to-video session given an image before its first chunk runs exactly as one started with ``image=``;
    given later, the chunks before are untouched and the ones after change (the first-frame prefix is the image's)."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = (255, 40, 40)
    args = dict(prompt=A, num_frames=33 * 3, seed=3)
    started = _steered(pipe, {}, image=image, **args)
    session = pipe.session(**SMALL, **args)
    session.set_image(image)
    np.testing.assert_array_equal(np.concatenate(list(session)), started)
    plain = _steered(pipe, {}, **args)
    later = _steered(pipe, {1: lambda s: s.set_image(image)}, **args)
    np.testing.assert_array_equal(later[:33], plain[:33])
    assert not np.array_equal(later[33:], plain[33:]), "the image must condition the chunks after it"


def test_pause_resume_stop(pipe):
    session = pipe.session(**SMALL, prompt=A, num_frames=33 * 3, seed=1)
    first = next(session)
    assert first.shape == (33, 64, 64, 3) and first.dtype == np.uint8
    session.pause()
    assert session.paused and not session.wait_while_paused(timeout=0.01)
    with pytest.raises(SessionPaused, match="paused before chunk 2 of 3: call resume"):
        next(session)
    assert session.index == 1 and not session.done  # nothing computed, nothing changed
    threading.Timer(0.05, session.resume).start()
    assert session.wait_while_paused(timeout=30)
    second = next(session)
    whole = pipe(**SMALL, prompt=A, num_frames=33 * 3, seed=1, progress=False)
    np.testing.assert_array_equal(np.concatenate([first, second]), whole[:66])
    session.stop()
    assert session.done and session.index == 2
    with pytest.raises(StopIteration):
        next(session)
    with pytest.raises(PipelineError, match="set_prompt: the session has ended"):
        session.set_prompt(B)
    assert len(session.chunk_seconds) == 2 and min(session.chunk_seconds) > 0


def test_a_setter_during_next_applies_at_the_next_boundary(pipe, contexts, monkeypatch):
    """set_prompt and pause, called from another thread while chunk 1 is being computed, leave chunk 1 as it was
    and apply from chunk 2 on; a second thread calling next meanwhile is refused; stop() during chunk 2 lets
    chunk 2 arrive and ends the session there, one chunk early."""
    session = pipe.session(**SMALL, prompt=A, num_frames=33 * 4, seed=2)
    gates = {chunk: (threading.Event(), threading.Event()) for chunk in (1, 2)}  # (inside, release)
    denoise = pipe._denoise

    def blocking(*args):
        inside, release = gates.get(len(contexts), (None, None))  # chunk k's program: k contexts recorded before
        if inside is not None:
            inside.set()
            assert release.wait(timeout=60)
        return denoise(*args)

    def in_another_thread(chunk: int, steer) -> None:
        worker = threading.Thread(target=lambda: frames.append(next(session)))
        worker.start()
        inside, release = gates[chunk]
        assert inside.wait(timeout=60)
        steer()
        release.set()
        worker.join(timeout=60)
        assert len(frames) == chunk + 1 and session.index == chunk + 1

    def during_chunk_1() -> None:
        session.set_prompt(B, transition_chunks=0)
        session.pause()
        with pytest.raises(RuntimeError, match="already running in another thread"):
            next(session)

    monkeypatch.setattr(pipe, "_denoise", blocking)
    frames = [next(session)]
    in_another_thread(1, during_chunk_1)
    with pytest.raises(SessionPaused):
        next(session)
    session.resume()
    in_another_thread(2, session.stop)
    assert session.done
    with pytest.raises(StopIteration):
        next(session)
    embeds = {p: np.asarray(pipe.prompt_encoder.encode(p, max_sequence_length=16)) for p in (A, B)}
    assert len(contexts) == 3
    for chunk, prompt in enumerate((A, A, B)):
        np.testing.assert_array_equal(contexts[chunk], embeds[prompt], err_msg=f"chunk {chunk}")
    planned = pipe(**SMALL, interactive_prompts=[(0, A), (2, B)], num_frames=33 * 4, seed=2, progress=False)
    np.testing.assert_array_equal(np.concatenate(frames), planned[:33 * 3])


def test_a_failed_chunk_ends_the_session(pipe, monkeypatch):
    def failing(*args):
        raise RuntimeError("the device is gone")

    session = pipe.session(**SMALL, prompt=A, num_frames=33 * 2, seed=0)
    monkeypatch.setattr(pipe, "_denoise", failing)
    with pytest.raises(RuntimeError, match="the device is gone"):
        next(session)
    assert session.done and session.index == 0 and session._window is None
    with pytest.raises(StopIteration):
        next(session)
    stopped = pipe.session(**SMALL, prompt=A, num_frames=33, seed=0)
    stopped.stop()  # before any chunk: nothing is computed
    assert stopped.done and list(stopped) == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=[A, B]), "a session steers one video: give one prompt; got a batch of 2"),
    (dict(prompt=A, output_type="latent"), "session: output_type = 'latent'"),
    (dict(prompt=A, height=60), "height"),
    (dict(prompt=A, seed="one"), "seed = 'one'"),
])
def test_bad_session_arguments_are_one_error_before_any_work(pipe, contexts, kwargs, match):
    with pytest.raises(PipelineError, match=match):
        pipe.session(**{**SMALL, **kwargs})
    assert contexts == []


@pytest.mark.parametrize("call,error,match", [
    (lambda s: s.set_prompt(3), PipelineError, "set_prompt: the prompt must be a non-empty str; got 3"),
    (lambda s: s.set_prompt("  "), PipelineError, "the prompt must be a non-empty str"),
    (lambda s: s.set_prompt(B, transition_chunks=1), PipelineError, "transition_chunks = 1: give 0 .* or n >= 2"),
    (lambda s: s.set_prompt(B, transition_chunks=-2), PipelineError, "transition_chunks = -2"),
    (lambda s: s.set_image("/no/such/image.png"), MediaError, "image.png"),
    (lambda s: s.set_image(np.zeros((8, 8), np.float32)), MediaError, "uint8"),
])
def test_bad_steering_is_one_error_and_changes_nothing(pipe, call, error, match):
    session = pipe.session(**SMALL, prompt=A, num_frames=33, seed=0)
    with pytest.raises(error, match=match):
        call(session)
    assert session._next_prompt is None and session._next_image is None and session.index == 0


def test_set_prompt_needs_embeddings_of_the_encoded_length(pipe):
    """A session started from prompt_embeds of another length than max_sequence_length cannot take a text: the
    blend would mix two lengths (and the chunk program would compile again)."""
    embeds = np.zeros((1, 8, pipe.transformer_config.text_dim), np.float32)
    session = pipe.session(**{**SMALL, "max_sequence_length": 16}, prompt_embeds=embeds, num_frames=33, seed=0)
    with pytest.raises(PipelineError, match="prompt_embeds have 8 tokens, and a text is encoded to "
                                            "max_sequence_length = 16: start it with max_sequence_length=8"):
        session.set_prompt(B)


def test_set_image_needs_a_first_frame_prefix(pipe):
    session = pipe.session(**SMALL, prompt=A, num_frames=33, seed=0, keep_first_frame=False)
    with pytest.raises(PipelineError, match="keep_first_frame=False"):
        session.set_image(np.zeros((64, 64, 3), np.uint8))
