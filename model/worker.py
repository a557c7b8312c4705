"""One worker thread owns the model; live sessions hand it sampled frames and questions.

The event loop never runs model code: it submits work here and gets results back through
callbacks, which run on the worker thread (wrap them with `loop.call_soon_threadsafe`).

Policy, per step (round robin over sessions with work, so one busy stream cannot starve others):
1. a session with an answer in progress decodes its next piece of text;
2. a session with a waiting question first appends the frames already sampled (so the answer
   sees the live edge), then starts the question;
3. otherwise a session with pending frames appends all of them in one chunk.
Pending frames per session are a bounded buffer: when the model is slower than the stream the
oldest are dropped (and counted), so memory stays flat and the model works near the live edge.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from livelens.model.sampling import SamplingParams, SessionError
from livelens.model.session import Answer, AppendResult, VideoSession

logger = logging.getLogger(__name__)


@dataclass
class QuestionJob:
    """A question for one session; the callbacks run on the worker thread."""

    question: str
    params: SamplingParams
    on_start: Callable[[], None]
    """Called just before the question's prefill (after the pending frames were appended)."""
    on_token: Callable[[str], None]
    on_done: Callable[[Answer], None]
    on_error: Callable[[Exception], None]
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop the answer at the next token (or never start it); on_error gets no call."""
        self.cancelled.set()


@dataclass
class FrameCallbacks:
    """How the scheduler reports a session's frame work (called on the worker thread)."""

    on_appended: Callable[[AppendResult], None]
    on_error: Callable[[Exception], None]
    """Appending failed (e.g. the context is full); the session takes no more frames."""


@dataclass
class _Slot:
    session: VideoSession
    callbacks: FrameCallbacks
    pending: deque[tuple[np.ndarray, float]]
    questions: deque[QuestionJob] = field(default_factory=deque)
    active: QuestionJob | None = None
    answer: Iterator[str] | None = None
    flushed: bool = False
    """The waiting question's pre-answer append has been done."""
    dropped: int = 0
    frames_closed: bool = False
    """No more frames are accepted (the context is full, or appending failed)."""
    closing: bool = False
    """close() was called while an answer ran; the worker removes the slot when it stops."""


class Scheduler:
    """Serializes all model work of all sessions on one thread."""

    def __init__(self, *, max_pending_frames: int = 8, name: str = "livelens-model") -> None:
        if max_pending_frames < 1:
            raise ValueError(f"max_pending_frames must be >= 1, got {max_pending_frames}")
        self.max_pending_frames = max_pending_frames
        self._slots: dict[str, _Slot] = {}
        self._order: deque[str] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.steps = 0
        self.busy_seconds = 0.0
        self.max_step_seconds = 0.0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, abandon queued work, and join the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -------------------------------------------------------------- sessions
    def open(self, key: str, session: VideoSession, callbacks: FrameCallbacks) -> None:
        with self._cond:
            if key in self._slots:
                raise KeyError(f"session {key} is already scheduled")
            self._slots[key] = _Slot(session, callbacks, deque(maxlen=self.max_pending_frames))
            self._order.append(key)

    def close(self, key: str) -> None:
        """Forget a session: pending frames and waiting questions are dropped.

        An answer in progress is cancelled; its generator is closed on the worker thread, which
        is the only thread that touches the session's cache.
        """
        with self._cond:
            slot = self._slots.get(key)
            if slot is None:
                return
            for job in [*slot.questions, *([slot.active] if slot.active else [])]:
                job.cancel()
            slot.pending.clear()
            slot.questions.clear()
            slot.frames_closed = slot.closing = True
            if slot.active is None:
                self._remove(key)
            self._cond.notify_all()

    def _remove(self, key: str) -> None:
        self._slots.pop(key, None)
        if key in self._order:
            self._order.remove(key)

    def submit_frame(self, key: str, image: np.ndarray, t: float) -> bool:
        """Queue a sampled frame; False if the session takes no more frames.

        When the buffer is full the oldest pending frame is dropped (counted in `dropped`).
        """
        with self._cond:
            slot = self._slots.get(key)
            if slot is None or slot.frames_closed:
                return False
            if len(slot.pending) == slot.pending.maxlen:
                slot.dropped += 1
            slot.pending.append((image, t))
            self._cond.notify()
            return True

    def submit_question(self, key: str, job: QuestionJob) -> int:
        """Queue a question; returns how many questions of this session are ahead of it."""
        with self._cond:
            slot = self._slots.get(key)
            if slot is None:
                raise KeyError(f"session {key} is not scheduled")
            ahead = len(slot.questions) + (slot.active is not None)
            slot.questions.append(job)
            self._cond.notify()
            return ahead

    def dropped(self, key: str) -> int:
        with self._cond:
            slot = self._slots.get(key)
            return slot.dropped if slot else 0

    def questions(self, key: str) -> int:
        """Questions of the session waiting or being answered (cancelled ones excluded)."""
        with self._cond:
            slot = self._slots.get(key)
            if slot is None:
                return 0
            jobs = [*slot.questions, *([slot.active] if slot.active else [])]
            return sum(not job.cancelled.is_set() for job in jobs)

    def pending(self, key: str) -> int:
        with self._cond:
            slot = self._slots.get(key)
            return len(slot.pending) if slot else 0

    # ---------------------------------------------------------------- worker
    def _run(self) -> None:
        while True:
            with self._cond:
                key = self._next_key()
                while key is None and not self._stopping:
                    self._cond.wait()
                    key = self._next_key()
                if self._stopping:
                    break
                work = self._take(key)
            started = time.perf_counter()
            try:
                work()
            except Exception:  # a bug in a step must not kill the worker for every session
                logger.exception("model step for session %s failed", key)
            took = time.perf_counter() - started
            self.busy_seconds += took
            self.max_step_seconds = max(self.max_step_seconds, took)
            self.steps += 1
        with self._cond:
            slots = list(self._slots.values())
        for slot in slots:
            if slot.answer is not None:
                slot.answer.close()

    def _next_key(self) -> str | None:
        """Round robin: the first session in order with work, which then goes to the back."""
        for _ in range(len(self._order)):
            key = self._order[0]
            self._order.rotate(-1)
            slot = self._slots[key]
            if slot.active is not None or slot.questions or slot.pending:
                return key
        return None

    def _take(self, key: str) -> Callable[[], None]:
        """Decide the step for `key` under the lock; the returned closure runs without it."""
        slot = self._slots[key]
        if slot.active is not None:
            return lambda: self._decode(key, slot)
        if slot.questions and (slot.flushed or not slot.pending):
            slot.active = slot.questions.popleft()
            slot.flushed = False
            return lambda: self._decode(key, slot)
        if slot.questions:
            slot.flushed = True
        frames = list(slot.pending)
        slot.pending.clear()
        return lambda: self._append(slot, frames)

    def _append(self, slot: _Slot, frames: list[tuple[np.ndarray, float]]) -> None:
        images = np.stack([image for image, _ in frames])
        times = [t for _, t in frames]
        try:
            result = slot.session.append(images, times)
        except Exception as exc:
            if not isinstance(exc, SessionError):
                logger.exception("appending %s frames failed", len(frames))
            with self._cond:
                slot.frames_closed = True
                slot.pending.clear()
            slot.callbacks.on_error(exc)
            return
        slot.callbacks.on_appended(result)

    def _decode(self, key: str, slot: _Slot) -> None:
        """Advance the slot's answer by one piece of text (the first call prefills)."""
        job = slot.active
        assert job is not None
        finished = True
        try:
            if job.cancelled.is_set():
                return
            if slot.answer is None:
                job.started = time.perf_counter()
                job.on_start()
                slot.answer = slot.session.ask(job.question, job.params)
            try:
                delta = next(slot.answer)
            except StopIteration:
                assert slot.session.last_answer is not None
                job.on_done(slot.session.last_answer)
                return
            job.on_token(delta)
            finished = False
        except Exception as exc:
            if not isinstance(exc, SessionError):
                logger.exception("answering %r failed", job.question[:80])
            job.on_error(exc)
        finally:
            if finished:
                if slot.answer is not None:
                    slot.answer.close()  # crops the cache back to the video if cut short
                with self._cond:
                    slot.active, slot.answer = None, None
                    if slot.closing:
                        self._remove(key)
