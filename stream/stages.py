"""The frame stages of a live session after the sampler: resize + thumbnail, then the engine.

    source (WHIP track, pull thread) -> LiveSession.push: count, sample by media time
        -> FrameStage (a worker): resize to the session grid, JPEG thumbnail, engine inbox

Resizing (swscale) and JPEG encoding cost milliseconds per frame. A WHIP track is read on the
event loop that also carries RTP/DTLS and every websocket, so that work must not run there:
`FrameStage` runs it on a thread pool the service shares, one frame at a time per session (a
session's frames stay in order), with a small bounded queue. When the workers fall behind, the
oldest waiting frame is dropped and counted, as the engine's own inbox does. (Pull sources read
in a thread of their own and convert there: LiveSession.push.)
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

from livelens.stream.frames import DecodedFrame

logger = logging.getLogger(__name__)

MAX_WAITING = 4
"""Sampled frames a session's stage holds before the oldest is dropped."""


class FrameStage:
    """Runs `work(frame)` for a session's sampled frames, in order, on a shared executor.

    `put` never blocks and never runs `work` itself (unless no executor is given: then it runs
    inline, for callers that are already off the event loop, e.g. tests and offline tools).
    """

    def __init__(
        self,
        work: Callable[[DecodedFrame], None],
        executor: Executor | None,
        *,
        name: str = "",
        max_waiting: int = MAX_WAITING,
    ) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self._work = work
        self._executor = executor
        self._name = name
        self._waiting: deque[DecodedFrame] = deque()
        self._max = max_waiting
        self._lock = threading.Lock()
        self._running = False
        self._closed = False
        self.dropped = 0
        """Sampled frames dropped because the stage fell behind."""
        self.converted = 0
        """Frames the workers converted (not counting inline work)."""

    def put(self, frame: DecodedFrame) -> None:
        if self._executor is None:
            self._run(frame)
            return
        with self._lock:
            if self._closed:
                return
            if len(self._waiting) >= self._max:
                self._waiting.popleft()
                self.dropped += 1
            self._waiting.append(frame)
            if self._running:
                return
            self._running = True
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # the executor is shutting down: the service is stopping
            with self._lock:
                self._running = False
                self._waiting.clear()

    def close(self) -> None:
        """Drop what waits; a frame being converted finishes."""
        with self._lock:
            self._closed = True
            self._waiting.clear()

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    self._running = False
                    return
                frame = self._waiting.popleft()
            self._run(frame)
            self.converted += 1

    def _run(self, frame: DecodedFrame) -> None:
        try:
            self._work(frame)
        except Exception:  # one bad frame must not stop the session's stage
            logger.exception("session %s: converting a sampled frame failed", self._name)
