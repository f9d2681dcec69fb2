"""One generation as an iterator that can be steered between chunks: ``pipe.session(...)``.

``next(session)`` computes the next chunk and returns its frames; ``set_prompt``, ``set_image``, ``pause``,
``resume`` and ``stop`` may be called from any thread, also while another thread is inside ``next``, and each
takes effect at the next chunk boundary (the next chunk whose programs have not been dispatched yet).
``pipe.stream`` is the same chunk loop with its changes planned ahead (the interactive prompts of the CSV
mode), driven by :meth:`StreamSession.pipelined`.

The chunk loop lives here rather than in pipeline.py because its state (the history window, the first-frame
prefix, the prompt schedule, the noise source) is what a steered generation changes between chunks; it calls
the pipeline's compiled programs and conditioning helpers, and holds nothing the pipeline could share.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.checkpoint import PipelineError
from helios_jax.compilation import note_first_run
from helios_jax.history import VAE_SPATIAL_FACTOR, HistoryLayout, output_frames, push
from helios_jax.noise import NoiseSource
from helios_jax.progress import ChunkProgress
from helios_jax.prompts import PromptSchedule, plan_prompt_chunks
from helios_jax.request import Request, is_int
from helios_jax.sampling import ChunkNoise, noise_shapes
from helios_jax.video import ImageLike, load_image


class SessionPaused(RuntimeError):
    """``next(session)`` on a paused session. Nothing was computed and nothing changed: ``resume()`` (or wait for
    another thread to, with ``wait_while_paused``) and call ``next`` again."""


@dataclasses.dataclass(frozen=True)
class _Dispatched:
    """A chunk whose programs are running on the device: its output, whether its latents are finite, its index."""

    out: jax.Array
    finite: jax.Array | None
    index: int


class StreamSession(Iterator[np.ndarray]):
    """A generation, one chunk per ``next()``, steerable between chunks (see the module docstring).

    Made by ``HeliosPipeline.session``, which checks every argument first (``pipe`` is that pipeline, typed
    ``Any`` because pipeline.py imports this module). ``next(session)`` returns the next
    chunk's frames, uint8 (t, H, W, 3) (float32 in [0, 1] with ``output_type="float"``): what ``pipe.stream``
    yields for one prompt without its batch axis, the last chunk trimmed the same way. It raises
    StopIteration after the last chunk or once ``stop()`` took effect, and :class:`SessionPaused` while paused.

    Unlike ``stream``, which dispatches chunk k before it hands over chunk k - 1's frames (the device works
    while the caller writes), ``next`` dispatches and fetches one chunk, so a change made between two ``next``
    calls applies to the very next chunk. A change made while a ``next`` runs applies to the chunk after the
    one being computed. The programs are the pipeline's, shared by every session and ``stream`` of the same
    shapes: a second session compiles nothing.
    """

    def __init__(self, pipe: Any, request: Request, layout: HistoryLayout, num_chunks: int,
                 guidance: str, prompts: Sequence[jax.Array], negative: jax.Array | None, image: np.ndarray | None,
                 video: np.ndarray | None, source: NoiseSource, output_type: str, progress: bool | None,
                 interpolation_chunks: int = 0, single: bool = False):
        self._pipe, self.request, self._layout = pipe, request, layout
        self.num_chunks = num_chunks
        self._schedule, self._schedule_start = prompts, 0  # chunk k takes self._schedule[k - start]
        self._negative, self._image, self._video, self._source = negative, image, video, source
        self._output_type, self._progress, self._single = output_type, progress, single
        self._interpolation_chunks = interpolation_chunks
        self._frames_left = output_frames(num_chunks, request.num_latent_frames_per_chunk)
        batch = prompts[0].shape[0]
        latent_hw = (request.height // VAE_SPATIAL_FACTOR, request.width // VAE_SPATIAL_FACTOR)
        self._latent_shape = (batch, pipe.transformer_config.in_channels, request.num_latent_frames_per_chunk,
                              *latent_hw)
        self._plans = [pipe._plan(request, self._latent_shape, guidance,
                                  amplify=request.is_amplify_first_chunk and k == 0) for k in range(num_chunks)]
        # The device state, made at the first chunk and dropped at the end.
        self._window: jax.Array | None = None
        self._prefix: jax.Array | None = None
        self._kept: list[jax.Array] = []
        self._indices: dict[str, jax.Array] = {}
        self._bar: ChunkProgress | None = None
        self._dispatched = self._returned = 0
        # What the setters leave for the next boundary, and whether a thread is inside next, under one lock.
        self._control = threading.Condition()
        self._running = self._paused = self._stopped = False
        self._next_prompt: tuple[str, int] | None = None
        self._next_image: np.ndarray | None = None
        self.chunk_seconds: list[float] = []  # the wall time of each next(), in order

    # ------------------------------------------------------------------------------------ state

    @property
    def index(self) -> int:
        """The index of the next chunk ``next`` returns (the number returned so far)."""
        return self._returned

    @property
    def done(self) -> bool:
        """Whether ``next`` will raise StopIteration: every chunk returned, or ``stop()`` called (a ``next``
        running when it was called still returns its chunk)."""
        return self._stopped or self._returned >= self.num_chunks

    @property
    def paused(self) -> bool:
        return self._paused

    # ------------------------------------------------------------------------------------ steering

    def set_prompt(self, text: str, transition_chunks: int | None = None) -> None:
        """From the next chunk on, condition on ``text``, blended from the current prompt over
        ``transition_chunks`` chunks (None: the session's ``interpolation_chunks``; 0 switches at once; n >= 2
        blends with weights 0, 1/(n-1), ..., 1 as the CSV mode's interpolation does, cut short at the video's
        end). The text is encoded at the boundary, on the thread inside ``next``. The last call before a boundary
        wins; a change replaces the rest of the schedule, planned switches after it included. Before the first
        chunk it replaces the prompt outright."""
        if not isinstance(text, str) or not text.strip():
            raise PipelineError(f"set_prompt: the prompt must be a non-empty str; got {text!r}")
        if transition_chunks is None:
            transition_chunks = self._interpolation_chunks
        if not is_int(transition_chunks) or transition_chunks < 0 or transition_chunks == 1:
            raise PipelineError(f"set_prompt: transition_chunks = {transition_chunks!r}: give 0 to switch at once, or "
                                "n >= 2 to blend over n chunks")
        if not isinstance(self._schedule, PromptSchedule):
            raise PipelineError("set_prompt: this generation is a batch of prompts; a session steers one")
        tokens, length = self._schedule.embeds.shape[1], self.request.max_sequence_length
        if tokens != length:
            raise PipelineError(f"set_prompt: this session's prompt_embeds have {tokens} tokens, and a text is encoded "
                                f"to max_sequence_length = {length}: start it with max_sequence_length={tokens}")
        self._pipe._prompts()  # no text encoder is one error now, not at the boundary
        with self._control:
            self._check_open("set_prompt")
            self._next_prompt = (text, int(transition_chunks))

    def set_image(self, image: ImageLike) -> None:
        """Condition on ``image`` (a path, a PIL image or a uint8 array, fitted to the session's size) from the next
        chunk on. Before the first chunk of a text- or image-to-video session it is the start image: the session
        is image-to-video exactly as if ``image=`` had been given. Later, and on a video-to-video session, the
        image's latents (noised as the request's image noise says) replace the first-frame prefix the history
        keeps (Helios I2V's conditioning), and the window of generated latents stays: the video moves toward
        the image rather than cutting to it. Needs ``keep_first_frame`` (the default)."""
        if not self.request.keep_first_frame:
            raise PipelineError("set_image: this session has keep_first_frame=False: no first-frame prefix for an "
                                "image to condition")
        pixels = load_image(image, self.request.height, self.request.width)
        with self._control:
            self._check_open("set_image")
            self._next_image = pixels

    def pause(self) -> None:
        """From the next boundary on, ``next`` raises :class:`SessionPaused` until ``resume()``."""
        with self._control:
            self._paused = True

    def resume(self) -> None:
        with self._control:
            self._paused = False
            self._control.notify_all()

    def stop(self) -> None:
        """End the session at the next boundary (a ``next`` running now still returns its chunk) and release its
        device buffers as soon as no ``next`` runs."""
        with self._control:
            self._stopped = True
            self._control.notify_all()
            if not self._running:
                self._release()

    def wait_while_paused(self, timeout: float | None = None) -> bool:
        """Block while the session is paused and not stopped (at most ``timeout`` seconds); whether ``next`` may
        be called now (not paused). For a thread that drives the session while another steers it."""
        with self._control:
            self._control.wait_for(lambda: not self._paused or self._stopped, timeout)
            return not self._paused

    def _check_open(self, what: str) -> None:
        if self.done:
            raise PipelineError(f"{what}: the session has ended (stopped, or all {self.num_chunks} chunks made)")

    # ------------------------------------------------------------------------------------ iteration

    def __iter__(self) -> "StreamSession":
        return self

    def __next__(self) -> np.ndarray:
        with self._control:
            if self._running:
                raise RuntimeError("next(session) is already running in another thread; drive a session from one "
                                   "thread")
            if self.done:
                self._release()
                raise StopIteration
            if self._paused:
                raise SessionPaused(f"the session is paused before chunk {self._returned + 1} of {self.num_chunks}: "
                                    "call resume() first")
            self._running = True
        start = time.perf_counter()
        try:
            frames = self._fetch(self._dispatch())
            self.chunk_seconds.append(time.perf_counter() - start)
        except BaseException:
            self._stopped = True  # a failed chunk leaves the history unusable: the session ends
            raise
        finally:
            with self._control:
                self._running = False
                if self.done:
                    self._release()
        return frames[0] if self._single else frames

    def pipelined(self) -> Iterator[np.ndarray]:
        """Every chunk's output with its batch axis, chunk k dispatched before chunk k - 1's output is fetched
        (the device works while the caller handles the last chunk): what ``pipe.stream`` iterates. A change made
        while it runs applies one chunk later than with ``next``."""
        pending = None
        try:
            while self._dispatched < self.num_chunks and not self._stopped:
                dispatched = self._dispatch()
                if pending is not None:
                    yield self._fetch(pending)
                pending = dispatched
            if pending is not None:
                yield self._fetch(pending)
        finally:
            self._release()

    # ------------------------------------------------------------------------------------ the chunk loop

    def _start(self) -> None:
        """The conditioning latents, drawn in the reference's order (encodes first, then noise levels)."""
        pipe, request, layout = self._pipe, self.request, self._layout
        batch, channels, _, *latent_hw = self._latent_shape
        self._window = pipe._placed(jnp.zeros((batch, channels, layout.window, *latent_hw), jnp.float32))
        if self._image is not None:
            self._prefix, fake = pipe._placed(pipe._image_latents(self._image, request, self._source))
            self._window = jnp.concatenate([self._window[:, :, :-1], fake], axis=2)
            self._kept.append(fake)
        if self._video is not None:
            self._prefix, encoded = pipe._placed(pipe._video_latents(self._video, request, self._source))
            self._window = push(self._window, encoded)
            self._kept.append(encoded)
        self._indices = pipe._placed({k: jnp.asarray(v) for k, v in layout.indices().items()})
        self._negative = pipe._placed(self._negative)
        self._bar = ChunkProgress([sum(p.layout.stage_steps) for p in self._plans], enabled=self._progress)

    def _boundary(self, k: int) -> bool:
        """Apply what the setters left (at chunk k, before its programs run); whether an image was applied."""
        with self._control:
            prompt, self._next_prompt = self._next_prompt, None
            image, self._next_image = self._next_image, None
        if image is not None and k == 0 and self._video is None:
            self._image, image = image, None  # the start image: image-to-video from chunk 0
        if k == 0:
            self._start()
        if prompt is not None:
            text, blend = prompt
            embeds = self._pipe._prompts().encode(text, max_sequence_length=self.request.max_sequence_length,
                                                  dtype=self._pipe.model_dtype)
            self._schedule = self._schedule.switched(k - self._schedule_start, embeds, blend)
            self._schedule_start = k
        if image is not None:
            self._prefix = self._pipe._placed(self._pipe._image_prefix(image, self.request, self._source))
        return image is not None

    def _dispatch(self) -> _Dispatched:
        """Chunk k's sampling and decode, dispatched (JAX runs them asynchronously), and the state advanced."""
        pipe, request, layout = self._pipe, self.request, self._layout
        k = self._dispatched
        image_now = self._boundary(k)
        plan = self._plans[k]
        if layout.keep_first_frame and self._prefix is None:
            self._prefix = pipe._placed(jnp.zeros((*self._latent_shape[:2], 1, *self._latent_shape[3:]), jnp.float32))
        history = pipe._history(layout, self._indices, self._window, self._prefix)
        shapes = noise_shapes(plan)
        noise = pipe._placed(ChunkNoise(self._source.normal(shapes.initial),
                                        tuple(self._source.normal(s) for s in shapes.block)))
        context = pipe._placed(self._schedule[k - self._schedule_start])
        note_first_run((pipe._model_fn, pipe._context_fn, pipe.sampler is None, pipe.step_cache is None,
                        plan.layout),
                       f"chunk {k + 1}'s sampling program")
        with pipe._on_mesh():
            latents, finite = pipe._denoise(plan, history, noise, context, self._negative, request.guidance_scale)
            latents = pipe._placed(latents)
        conditioned = self._image is not None or self._video is not None
        if layout.keep_first_frame and (
            (k == 0 and not conditioned) or (request.is_skip_first_chunk and k == 1 and not image_now)
        ):
            self._prefix = latents[:, :, :1]
        self._window = push(self._window, latents)
        if self._output_type == "latent":
            out = jnp.concatenate([*self._kept, latents], axis=2) if k == 0 else latents
        else:
            out = pipe.decode(latents, self._output_type)
        self._dispatched += 1
        return _Dispatched(out, finite, k)

    def _fetch(self, chunk: _Dispatched) -> np.ndarray:
        """One chunk's output on the host (frames trimmed to the reference's count), once its latents are known to
        be finite."""
        host = np.asarray(chunk.out)
        if chunk.finite is not None and not bool(chunk.finite):
            raise PipelineError(f"chunk {chunk.index + 1} of {self.num_chunks} produced non-finite latents: the "
                                f"checkpoint's weights or the inputs hold NaN/inf")
        if self._output_type != "latent":
            take = min(host.shape[1], self._frames_left)
            self._frames_left -= take
            host = host[:, :take]
        self._returned += 1
        if self._bar is not None:
            self._bar.chunk_done(host.shape[2 if self._output_type == "latent" else 1])
        return host

    def _release(self) -> None:
        """Drop the device state and close the progress bars (at the end, on stop, on an error)."""
        self._window = self._prefix = None
        self._kept, self._indices = [], {}
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def single_prompt_schedule(embeds: jax.Array, num_chunks: int) -> Sequence[jax.Array]:
    """One prompt's embeddings for every chunk: a schedule a session can switch when the batch is one prompt,
    else the batch's embeddings repeated."""
    if embeds.shape[0] == 1:
        return PromptSchedule(embeds, plan_prompt_chunks([0], num_chunks))
    return [embeds] * num_chunks

