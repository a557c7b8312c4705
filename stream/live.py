"""A live session: decoded frames in (from any source), sampled frames to the model, answers out.

Sources call `push()` for every decoded frame, from their own thread or the event loop; it only
counts and samples by media time. The few sampled frames go to the session's `FrameStage`
(stream/stages.py), which resizes them to the session grid, keeps a JPEG thumbnail and hands
them to the engine's bounded inbox, never on the event loop: on the service's frame workers for
a WHIP track (read on the loop), in its own thread for a pull source (so a file read faster than
real time is held back rather than dropped). Answers and status go to the
watchers (one per websocket) through bounded asyncio queues; the model's callbacks hop onto the
loop first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

import numpy as np

from livelens.model.engine import Answer, AppendResult, Engine, FrameCallbacks, QuestionJob
from livelens.model.sampling import SamplingParams
from livelens.stream.frames import DecodedFrame
from livelens.stream.grid import Grid, choose_grid, resize_to_grid
from livelens.stream.lifecycle import EndCode
from livelens.stream.protocol import (
    AnswerMessage,
    AskMessage,
    ErrorMessage,
    LatencyOut,
    SegmentOut,
    StatusMessage,
    TokenMessage,
    dump,
)
from livelens.stream.sampler import FpsSampler
from livelens.stream.stages import FrameStage
from livelens.stream.thumbnails import DEFAULT_CAPACITY, ThumbnailRing

logger = logging.getLogger(__name__)

# Messages a watcher may have unread before it counts as stuck and is dropped: a full answer of
# MAX_NEW_TOKENS tokens plus status messages fits easily.
WATCHER_QUEUE = 4096


class State(IntEnum):
    """Session lifecycle; anything >= ENDED is finished.

    STALLED is LIVE without frames: the source sent none for `ServiceConfig.stall_after_s`
    (a frozen feed, a reconnecting camera, a publisher gone silent) and the session goes back to
    LIVE with its next frame. FULL: the source still sends, but the model takes no more of its
    frames (the context or the KV pool is full; `reason` says which); questions are answered over
    the video held. Every other move is forward only.
    """

    STARTING = 0
    LIVE = 1
    STALLED = 2
    FULL = 3
    ENDED = 4
    FAILED = 5

    @property
    def label(self) -> str:
        return self.name.lower()


def iso(ts: float) -> str:
    """Wall-clock seconds since the epoch -> ISO-8601 UTC with milliseconds."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class SessionSettings:
    fps: float
    prune_threshold: float
    tokens_per_frame: int
    min_tokens: int = 1
    window_s: float | None = None
    memory_s: float = 0.0
    """Media seconds of stream before the window kept for questions about the past."""
    """Media seconds of video the model holds; None: derived from the context and the KV pool
    (`Engine.default_window`)."""
    thumbnails: int = DEFAULT_CAPACITY
    """JPEG thumbnails of sampled frames kept for the console (a ring: the newest)."""
    max_questions: int = 32
    """Questions of the session waiting or being answered; more are refused."""
    max_questions_per_watcher: int = 8
    """Questions of one websocket waiting or being answered; more are refused."""


class Watcher:
    """One websocket's view of a session: a bounded queue of outgoing messages."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(WATCHER_QUEUE)
        self.jobs: dict[str, QuestionJob] = {}
        self.overflowed = False

    def send(self, message: dict[str, Any]) -> None:
        """Queue a message (on the loop); a watcher that stops reading is closed, not waited for."""
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.overflowed = True
            logger.warning("a watcher stopped reading; closing it")
            self.queue.get_nowait()
            self.queue.put_nowait(None)


HistorySink = Callable[[str, dict[str, Any]], Awaitable[object]]
"""append_history(session_id, entry), run on the loop when an answer completes."""


class LiveSession:
    """One stream's state from first frame to end; `push` and `finish` are thread-safe."""

    def __init__(
        self,
        session_id: str,
        *,
        kind: str,
        source: str,
        engine: Engine,
        settings: SessionSettings,
        loop: asyncio.AbstractEventLoop,
        on_history: HistorySink,
        on_state: Callable[[LiveSession], None],
        metrics: Any = None,
        executor: Executor | None = None,
    ) -> None:
        """executor: where sampled frames are resized and thumbnailed: the service's pool for
        sources read on the event loop (WHIP); None: in the pushing thread (a pull source's own,
        which keeps backpressure on a file read faster than real time)."""
        self.id = session_id
        self.kind = kind
        self.source = source
        self.settings = settings
        self.created = time.time()
        self.engine = engine
        self.loop = loop
        self._on_history = on_history
        self._on_state = on_state
        self.metrics = metrics
        # Labelled children looked up once: push() runs for every decoded frame.
        self._received = metrics.frames_received.labels(kind) if metrics else None
        self._sampled = metrics.frames_sampled.labels(kind) if metrics else None
        self.state = State.STARTING
        self.reason: str | None = None
        self.end_code: EndCode | None = None
        """Why the session is over, as a code (stream/lifecycle.py); None while it goes on."""
        self.ended_at: float | None = None
        self.watchers: set[Watcher] = set()
        self.sampler = FpsSampler(settings.fps)
        self.grid: Grid | None = None
        self.model_started = False
        """The engine knows the session's grid (set at the first sampled frame)."""
        self.wall_zero: float | None = None
        """Wall-clock time of media time 0 (the first frame's arrival)."""
        self._lock = threading.Lock()
        self.frames_received = 0
        self.frames_sampled = 0
        self.live_edge: float | None = None
        self.last_frame_at: float | None = None
        """time.monotonic() of the newest decoded frame: how long the source has been silent."""
        self.last_sampled: tuple[float, np.ndarray] | None = None
        """The newest sampled frame (media time, RGB at the session grid)."""
        self.thumbnails = ThumbnailRing(settings.thumbnails)
        self.gaps: list[tuple[float, float]] = []
        """Media-time spans (s) the source was down; times continue across them."""
        self.final_stats = False
        """An ended session's record has the stats of everything its model took in."""
        self.history_writes: set[asyncio.Task[object]] = set()
        """History entries being written (awaited when the server drains)."""
        self.stage = FrameStage(self._convert, executor, name=session_id)

    @property
    def session_id(self) -> str:
        return self.id

    # ------------------------------------------------------------ frames in
    def push(self, decoded: DecodedFrame) -> None:
        """Take one decoded frame; cheap unless the sampler keeps it."""
        if self._received is not None:
            self._received.inc()
        with self._lock:
            if self.state >= State.ENDED:
                return
            self.frames_received += 1
            self.live_edge = decoded.time
            self.last_frame_at = time.monotonic()
            if self.state == State.STALLED:
                self.loop.call_soon_threadsafe(self._set_activity, State.LIVE, None)
            if self.wall_zero is None:
                self.wall_zero = time.time() - decoded.time
            if not self.sampler.offer(decoded.time):
                return
            self.frames_sampled += 1
            first = self.grid is None
            if first:
                self._start_model(decoded)
        if self._sampled is not None:
            self._sampled.inc()
        if first:
            self.loop.call_soon_threadsafe(self._set_state, State.LIVE, None)
        if self.grid is None or not self.model_started:
            return
        self.stage.put(decoded)

    def _convert(self, decoded: DecodedFrame) -> None:
        """The stage's work (a worker thread): only sampled frames are ever converted."""
        grid = self.grid
        if grid is None or not self.model_started:
            return
        image = resize_to_grid(decoded.frame, grid)
        self.last_sampled = (decoded.time, image)
        self.engine.submit_frame(self.id, image, decoded.time)
        self.thumbnails.add(decoded.time, image)

    def _start_model(self, decoded: DecodedFrame) -> None:
        height, width = decoded.frame.height, decoded.frame.width
        try:
            self.grid = choose_grid(height, width, tokens_per_frame=self.settings.tokens_per_frame)
            window = self.settings.window_s or self.engine.default_window(
                self.grid.tokens, self.settings.fps
            )
            self.engine.configure(
                self.id,
                height=self.grid.height,
                width=self.grid.width,
                threshold=self.settings.prune_threshold,
                min_tokens=self.settings.min_tokens,
                callbacks=FrameCallbacks(self._appended, self._append_failed),
                window_s=window,
                memory_s=self.settings.memory_s,
            )
        except (ValueError, KeyError) as exc:
            self.loop.call_soon_threadsafe(
                self.finish,
                f"unsupported frame size {width}x{height}: {exc}",
                True,
                EndCode.UNSUPPORTED_VIDEO,
            )
            return
        self.model_started = True
        logger.info(
            "session %s: %sx%s -> grid %sx%s (%s tokens/frame), window %.0f s",
            self.id,
            width,
            height,
            self.grid.width,
            self.grid.height,
            self.grid.tokens,
            window,
        )

    def _appended(self, result: AppendResult) -> None:
        if self.metrics is not None:
            self.metrics.tokens(result.kept_tokens, result.total_tokens)

    def _append_failed(self, exc: Exception) -> None:
        # The session keeps answering over what it holds; it only stops taking frames.
        logger.warning("session %s takes no more frames: %s", self.id, exc)
        self.loop.call_soon_threadsafe(self._set_state, State.FULL, str(exc))

    def finish(self, reason: str, failed: bool = False, code: EndCode | None = None) -> None:
        """The source ended (or failed). Idempotent; callable from any thread.

        code: why, for programs (the record's `end_code`); default source_failed /
        source_ended.
        """
        with self._lock:
            if self.state >= State.ENDED:
                return
            self.state = State.FAILED if failed else State.ENDED
            self.reason = reason
            self.end_code = code or (EndCode.SOURCE_FAILED if failed else EndCode.SOURCE_ENDED)
            self.ended_at = time.time()
        logger.info("session %s %s: %s", self.id, self.state.label, reason)
        self.loop.call_soon_threadsafe(self._announce_state)

    def _set_state(self, state: State, reason: str | None) -> None:
        with self._lock:
            if self.state >= state:
                return
            self.state = state
            self.reason = reason
        self._announce_state()

    def check_stalled(self, after_s: float) -> bool:
        """Mark a LIVE session STALLED once its source sent no frame for `after_s` seconds;
        returns whether it did (the event loop's status tick calls this)."""
        last = self.last_frame_at
        if self.state != State.LIVE or last is None or time.monotonic() - last <= after_s:
            return False
        self._set_activity(State.STALLED, f"no frames from the source for {after_s:g} s")
        return True

    def _set_activity(self, state: State, reason: str | None) -> None:
        """The one move back and forth: LIVE <-> STALLED (a finished session stays finished)."""
        with self._lock:
            if self.state not in (State.LIVE, State.STALLED) or self.state == state:
                return
            self.state = state
            self.reason = reason
        logger.info("session %s %s%s", self.id, state.label, f": {reason}" if reason else "")
        self._announce_state()

    def _announce_state(self) -> None:
        status = self.status()
        for watcher in list(self.watchers):
            watcher.send(status)
        self._on_state(self)

    # ------------------------------------------------------------ questions
    def ask(self, watcher: Watcher, message: AskMessage) -> None:
        """Queue a question (called on the loop); the answer streams to `watcher` only."""
        refusal = self._over_question_limit(watcher)
        if refusal is not None:
            watcher.send(
                dump(ErrorMessage(id=message.id, code="too_many_questions", message=refusal))
            )
            return
        if message.id in watcher.jobs:
            watcher.send(
                dump(
                    ErrorMessage(
                        id=message.id,
                        code="duplicate_id",
                        message=f"question {message.id!r} is still being answered",
                    )
                )
            )
            return
        if not self.model_started:
            watcher.send(
                dump(
                    ErrorMessage(
                        id=message.id,
                        code="no_frames",
                        message="the session has no frames yet; ask again once video arrives",
                    )
                )
            )
            return
        asked = time.time()
        context: dict[str, Any] = {}
        post = self.loop.call_soon_threadsafe

        def on_start() -> None:
            context["live_edge"] = self.live_edge

        def on_token(text: str) -> None:
            post(watcher.send, dump(TokenMessage(id=message.id, text=text)))

        def on_done(answer: Answer) -> None:
            post(self._answered, watcher, message, job, answer, asked, context.get("live_edge"))

        def on_error(exc: Exception) -> None:
            post(self._question_failed, watcher, message, exc)

        params = SamplingParams(
            max_new_tokens=message.max_new_tokens,
            temperature=message.temperature,
            top_p=message.top_p,
            top_k=message.top_k,
            seed=message.seed,
            repetition_penalty=message.repetition_penalty,
        )
        job = QuestionJob(
            message.question, params, on_start, on_token, on_done, on_error, memory=message.memory
        )
        watcher.jobs[message.id] = job
        try:
            self.engine.submit_question(self.id, job)
        except KeyError:  # the session's model state was released
            watcher.jobs.pop(message.id, None)
            watcher.send(
                dump(
                    ErrorMessage(
                        id=message.id,
                        code="session_released",
                        message="the session's video is no longer held; ask another session",
                    )
                )
            )

    def _over_question_limit(self, watcher: Watcher) -> str | None:
        """Why one more question of `watcher` is refused, or None if it may queue."""
        mine = len(watcher.jobs)
        if mine >= self.settings.max_questions_per_watcher:
            return (
                f"this connection has {mine} questions waiting or being answered, its limit; "
                "wait for an answer or cancel one"
            )
        queued = self.engine.questions(self.id)
        if queued >= self.settings.max_questions:
            return (
                f"the session has {queued} questions waiting or being answered, its limit; "
                "try again shortly"
            )
        return None

    def cancel(self, watcher: Watcher, message_id: str) -> bool:
        job = watcher.jobs.pop(message_id, None)
        if job is None:
            return False
        job.cancel()
        return True

    def detach(self, watcher: Watcher) -> None:
        """A websocket closed: its questions, queued or being answered, are cancelled (nobody
        would read the answers, and they would hold up everyone else's)."""
        self.watchers.discard(watcher)
        for job in watcher.jobs.values():
            job.cancel()
        if watcher.jobs:
            logger.info(
                "session %s: cancelled %d questions of a closed connection",
                self.id,
                len(watcher.jobs),
            )
        watcher.jobs.clear()

    def fail_questions(self, code: str, reason: str) -> int:
        """Cancel every question still waiting or being answered, tell its asker, and record it
        in the history as unanswered with `code` and `reason`. Returns how many there were."""
        failed = 0
        now = time.time()
        for watcher in list(self.watchers):
            for message_id, job in list(watcher.jobs.items()):
                job.cancel()
                failed += 1
                watcher.send(dump(ErrorMessage(id=message_id, code=code, message=reason)))
                waited = time.perf_counter() - job.submitted
                self._record(
                    {
                        "question_id": message_id,
                        "question": job.question,
                        "text": "",
                        "segments": [],
                        "stream_position": self._position() or 0.0,
                        "live_edge": self.live_edge,
                        "lag": None,
                        "latency_ms": {"queue": waited * 1e3, "ttft": 0.0, "total": waited * 1e3},
                        "asked_at": iso(now - waited),
                        "answered_at": iso(now),
                        "error": {"code": code, "message": reason},
                    }
                )
            watcher.jobs.clear()
        return failed

    def _record(self, entry: dict[str, Any]) -> None:
        """Write a history entry in the background (on the loop)."""
        task = self.loop.create_task(self._on_history(self.id, entry))
        self.history_writes.add(task)
        task.add_done_callback(self.history_writes.discard)
        task.add_done_callback(_log_failure)

    def _answered(
        self,
        watcher: Watcher,
        message: AskMessage,
        job: QuestionJob,
        answer: Answer,
        asked: float,
        live_edge: float | None,
    ) -> None:
        if job.cancelled.is_set() and watcher.jobs.get(message.id) is not job:
            return  # cancelled (or failed by a drain) while its last token was computed
        watcher.jobs.pop(message.id, None)
        now = time.time()
        wall_zero = self.wall_zero or self.created
        queue_s = (job.started or job.submitted) - job.submitted
        out = AnswerMessage(
            id=message.id,
            question=message.question,
            text=answer.text,
            segments=[
                SegmentOut(
                    start=s.start,
                    end=s.end,
                    start_time=iso(wall_zero + s.start),
                    end_time=iso(wall_zero + s.end),
                )
                for s in answer.segments
            ],
            stream_position=answer.stream_position,
            recalled=list(answer.recalled),
            live_edge=live_edge,
            lag=None if live_edge is None else max(0.0, live_edge - answer.stream_position),
            latency_ms=LatencyOut(
                queue=queue_s * 1e3,
                ttft=answer.prefill_seconds * 1e3,
                total=(now - asked) * 1e3,
            ),
            asked_at=iso(asked),
            answered_at=iso(now),
        )
        body = dump(out)
        watcher.send(body)
        if self.metrics is not None:
            self.metrics.answered(answer.prefill_seconds, now - asked)
        entry = {"question_id": message.id} | {
            k: v for k, v in body.items() if k not in ("type", "id")
        }
        self._record(entry)

    def _question_failed(self, watcher: Watcher, message: AskMessage, exc: Exception) -> None:
        watcher.jobs.pop(message.id, None)
        if self.metrics is not None:
            self.metrics.question_failed()
        watcher.send(dump(ErrorMessage(id=message.id, code="question_failed", message=str(exc))))

    # --------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        stats = self.engine.stats(self.id)
        position = stats.last_time if stats else None
        edge = self.live_edge
        return dump(
            StatusMessage(
                session_id=self.id,
                state=self.state.label,
                reason=self.reason,
                end_code=self.end_code,
                frames_received=self.frames_received,
                frames_sampled=self.frames_sampled,
                frames_dropped=self.engine.dropped(self.id) + self.stage.dropped,
                frames_in_model=stats.frames if stats else 0,
                kept_tokens=stats.kept_tokens if stats else 0,
                total_tokens=stats.total_tokens if stats else 0,
                kept_ratio=stats.kept_ratio if stats and stats.total_tokens else None,
                kv_tokens=stats.kv_tokens if stats else 0,
                kv_bytes=stats.kv_bytes if stats else 0,
                live_edge=edge,
                stream_position=position,
                lag=self._lag(edge, position),
                window_start=stats.window_start if stats else None,
                window_end=position,
                memory_start=stats.memory_start if stats else None,
                questions_waiting=self.engine.questions(self.id),
                time=iso(time.time()),
            )
        )

    def _lag(self, edge: float | None, position: float | None) -> float | None:
        """How far the model's last frame trails the stream, by the newest frame received and
        by the wall clock, whichever is more: a frozen or silent feed shows a growing lag, not
        the last frame's. (Frames read faster than real time, a file, lead the wall clock.)"""
        if edge is None or position is None:
            return None
        lag = edge - position
        if self.wall_zero is not None:
            now = self.ended_at if self.ended_at is not None else time.time()
            lag = max(lag, now - self.wall_zero - position)
        return max(0.0, lag)

    def _position(self) -> float | None:
        stats = self.engine.stats(self.id)
        return stats.last_time if stats else None

    def release_model(self) -> None:
        """Drop the session's KV blocks (the session is gone or its retention ran out)."""
        self.stage.close()
        self.engine.close_session(self.id)
        self.model_started = False


def _log_failure(task: asyncio.Task[object]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("storing an answer in the history failed", exc_info=task.exception())
