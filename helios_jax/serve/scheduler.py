"""One generation on the device at a time: a bounded queue of jobs and the one worker thread that runs them.

The device serialises generations anyway, so one thread runs them all, each through the pipeline's steerable
``pipe.session`` (so every session shares the pipeline's compiled programs), and the asyncio side never waits
on the device: it hands a :class:`Job` to :meth:`Scheduler.submit` and hears back through the job's ``emit``
callback, which the job's owner makes thread-safe. Steering (a new prompt, pause, resume, stop, a client gone)
is recorded on the job at any time and applied by the worker at the next chunk boundary.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

import numpy as np

from helios_jax.checkpoint import PipelineError
from helios_jax.request import check_request
from helios_jax.serve.protocol import Defaults, Limits, ProtocolError, Start

logger = logging.getLogger(__name__)


class QueueFull(ProtocolError):
    """The queue holds as many waiting jobs as it may."""


def pipeline_settings(spec: Any, scheduler_config: Any, start: Start, defaults: Defaults) -> dict[str, Any]:
    """The pipeline's generation settings for ``start`` (``steps`` per pyramid stage, or in all), checked by the
    pipeline's own rules (sizes, frame counts) for a pipeline of this ``spec`` and scheduler before the job is
    queued: a bad request costs no device time."""
    settings: dict[str, Any] = dict(num_frames=start.num_frames, height=start.height, width=start.width,
                                    guidance_scale=start.guidance_scale,
                                    is_amplify_first_chunk=defaults.amplify_first_chunk)
    if spec.pyramid:
        settings["pyramid_num_inference_steps_list"] = [start.steps] * scheduler_config.stages
    else:
        settings["num_inference_steps"] = start.steps
    try:
        check_request(settings, pyramid=spec.pyramid, stages=scheduler_config.stages,
                      scheduler_type=scheduler_config.scheduler_type)
    except PipelineError as err:
        raise ProtocolError(str(err)) from None
    return settings


Chunk = Callable[[int, np.ndarray, float], None]


class Job:
    """One client's generation. ``emit(message)`` sends a JSON message to the client; ``on_chunk(index, frames,
    seconds)`` takes each chunk's uint8 frames (t, H, W, 3); ``on_end(complete)`` is told, once the job has run,
    whether every chunk was made; all are called from the worker thread.

    The steering methods may be called from any thread: they go to the session's own setters (which apply them
    at its next chunk boundary), or, before the session exists, wait here and are handed to it when it starts.
    """

    def __init__(self, start: Start, settings: dict[str, Any], emit: Callable[[dict], None], on_chunk: Chunk,
                 on_end: Callable[[bool], None] | None = None):
        self.start, self.settings, self.emit, self.on_chunk, self.on_end = start, settings, emit, on_chunk, on_end
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.error: str | None = None
        self.session: Any = None
        self.computing = False  # the worker is inside next(session)
        self._lock = threading.Lock()
        self._early: list[tuple[str, tuple]] = []  # steering before the session exists

    def _steer(self, method: str, *args: Any) -> None:
        with self._lock:
            if self.session is None:
                self._early.append((method, args))
                return
        try:
            getattr(self.session, method)(*args)
        except PipelineError as err:  # e.g. the session has ended meanwhile
            raise ProtocolError(str(err)) from None

    def set_prompt(self, prompt: str, transition_chunks: int) -> int:
        """Hand the session a new prompt; returns the chunk it applies from (the session's rule: the next
        boundary, which is one chunk later while a chunk is being computed)."""
        self._steer("set_prompt", prompt, transition_chunks)
        session = self.session
        return 0 if session is None else session.index + int(self.computing)

    def set_image(self, image: np.ndarray) -> None:
        self._steer("set_image", image)

    def pause(self) -> None:
        self._steer("pause")

    def resume(self) -> None:
        self._steer("resume")

    def cancel(self) -> None:
        """Stop at the next chunk boundary (a client that said stop, or one that is gone)."""
        self.cancelled.set()
        with self._lock:
            session = self.session
        if session is not None:
            session.stop()

    def attach(self, session: Any) -> None:
        """The job's session, now made: the steering that came before it is applied, in order."""
        with self._lock:
            self.session, early, self._early = session, self._early, []
        for method, args in early:
            getattr(session, method)(*args)
        if self.cancelled.is_set():
            session.stop()


class Scheduler:
    """The bounded queue (``queue_size`` jobs waiting besides the running one) and its worker thread."""

    def __init__(self, pipe: Any, queue_size: int, max_pause_s: float = Limits.max_pause_s):
        self.pipe, self.queue_size, self.max_pause_s = pipe, queue_size, max_pause_s
        self.running: Job | None = None
        self.completed = 0
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="helios-jax-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def settings(self, start: Start, defaults: Defaults) -> dict[str, Any]:
        """``start``'s generation settings for this pipeline, checked (:func:`pipeline_settings`)."""
        return pipeline_settings(self.pipe.spec, self.pipe.scheduler_config, start, defaults)

    def close(self) -> None:
        """Stop taking jobs, cancel the running one at its next boundary, and let the worker end."""
        with self._lock:
            self._closed = True
            for job in [*self._waiting, *([self.running] if self.running else [])]:
                job.cancel()
            self._lock.notify_all()
        self._thread.join(timeout=60)

    def status(self) -> dict[str, Any]:
        with self._lock:
            running = self.running
            return {"running": running is not None, "waiting": len(self._waiting), "queue_size": self.queue_size,
                    "completed": self.completed,
                    "chunk": None if running is None or running.session is None else running.session.index}

    def submit(self, job: Job) -> None:
        """Queue ``job`` (``queued`` with its place in line), or :class:`QueueFull`."""
        with self._lock:
            if len(self._waiting) >= self.queue_size:
                waiting = len(self._waiting)
                raise QueueFull(f"the queue is full: {waiting} generation{'s' * (waiting != 1)} waiting besides the "
                                f"running one (the limit, --queue_size, is {self.queue_size}); try again later")
            self._waiting.append(job)
            job.emit({"type": "queued", "position": len(self._waiting)})
            self._lock.notify_all()

    def withdraw(self, job: Job) -> bool:
        """Cancel ``job``: out of the queue if it waits (the others move up; True), else at its next boundary."""
        job.cancel()
        with self._lock:
            if job not in self._waiting:
                return False
            self._waiting.remove(job)
            job.finished.set()
            self._tell_positions()
            return True

    def _tell_positions(self) -> None:
        for position, waiting in enumerate(self._waiting, 1):
            waiting.emit({"type": "queued", "position": position})

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job = self.running = self._waiting.popleft()
                self._tell_positions()
            try:
                run_job(self.pipe, job, self.max_pause_s)
            finally:
                with self._lock:
                    self.running = None
                    self.completed += 1
                job.finished.set()


def run_job(pipe: Any, job: Job, max_pause_s: float = Limits.max_pause_s) -> None:
    """One job on this thread, chunk by chunk, through ``pipe.session``; a pause waits here (the device stays
    this job's, for ``max_pause_s`` at most), a cancel ends it at the next boundary; any failure is one
    ``error`` message to its client (the server goes on with the next job)."""
    from helios_jax.session import SessionPaused

    start = job.start
    try:
        job.emit({"type": "started"})
        job.attach(pipe.session(prompt=start.prompt, seed=start.seed, image=start.image, **job.settings))
        session = job.session
        while True:
            if session.paused and not session.done:
                job.emit({"type": "paused", "index": session.index})
                if not session.wait_while_paused(max_pause_s) and not session.done:
                    job.cancel()
                    job.emit({"type": "error", "message": f"paused for longer than the limit of {max_pause_s:g} s: "
                                                          "the generation was stopped to free the device"})
                if not session.done:
                    job.emit({"type": "resumed", "index": session.index})
            began = time.perf_counter()
            job.computing = True
            try:
                frames = next(session)
            except StopIteration:
                break
            except SessionPaused:
                continue
            finally:
                job.computing = False
            job.on_chunk(session.index - 1, frames, time.perf_counter() - began)
        job.emit({"type": "done", "stopped": job.cancelled.is_set()})
    except Exception as err:  # noqa: BLE001 - one job's failure is its client's error, not the server's end
        job.error = str(err)
        if not isinstance(err, (PipelineError, ProtocolError, ValueError, OSError)):
            logger.exception("a generation failed")
        job.emit({"type": "error", "message": f"the generation failed: {err}"})
    finally:
        if job.on_end is not None:
            try:
                job.on_end(job.error is None and not job.cancelled.is_set())
            except Exception as err:  # noqa: BLE001 - e.g. a full disk: the job's error; the worker goes on
                job.error = job.error or f"the video could not be written: {err}"
