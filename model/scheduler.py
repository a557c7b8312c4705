"""The engine's step scheduler: policy only, plain data in and out, no model and no tensors.

One thread owns the engine and runs `schedule()` -> runner executes the plan -> `update()`.
A plan says, for one step, which frames each session prefills, which questions fork off their
session's video and prefill their prompt, which answers decode one token, and where in the
block pool (model/kv.py) every new token's KV goes.

Policy, per step:
1. every running answer decodes one token (oldest first);
2. waiting questions fork and prefill, oldest first; a question waits until its session has
   prefilled exactly the frames admitted before it, and the oldest question blocked on a
   budget or on memory holds back the younger ones (no starvation);
3. frames fill the rest of the budgets round robin over sessions, one frame per session per
   pass, starting one session later each step; a session's frames keep their order and stop at
   the admission point of its next waiting question.
A session is admitted only if the pool can hold its minimum; running sessions are never evicted.
A session whose context or whose share of the pool is exhausted becomes FULL (with a reason),
drops its waiting frames and takes no more; its questions are still answered.

Sliding window (`slide`): the engine hands the scheduler the frames still in a session's window,
with their token counts as one forward over them has them. They are prefilled again (from cached
visual features) into a new block table, interleaved with other work like any frames; meanwhile
questions fork off the old video and new frames wait. When the last of them is placed, the new
table becomes the session's video and the old one's blocks are freed (answers forked off it keep
theirs).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING

from livelens.model.kv import BlockCopy, BlockWrite, KVCacheManager, Placement

if TYPE_CHECKING:
    from livelens.model.sampling import SamplingParams


# --------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SchedulerConfig:
    """Budgets and limits of one engine step."""

    max_tokens_per_step: int = 8192
    """Tokens prefilled or decoded in one step, over all sessions and answers."""
    max_frames_per_step: int = 64
    """Frames through the one packed vision pass of a step."""
    max_concurrent_decodes: int = 256
    """Answers decoding at once, over all sessions."""
    max_model_len: int = 32768
    """Positions a sequence may reach (the model's trained range)."""
    answer_reserve_tokens: int = 1024
    """Room kept after a session's video for one question and its answer: the video stops at
    `max_model_len - answer_reserve_tokens`, and a question's prompt plus `max_new_tokens`
    must fit in it. The pool also keeps this much free beyond the videos, so a question can
    always start once running answers finish."""
    session_min_tokens: int = 2048
    """Blocks promised to a session at admission (its first frames); a session the pool cannot
    promise this much is refused."""
    max_sessions_per_step: int = 0
    """Sessions whose work (decodes, questions, frames) one step may hold; 0: no limit. One
    session per step is the engine run the way the service ran before batching (benchmarks
    compare the two)."""

    def __post_init__(self) -> None:
        for name in (
            "max_tokens_per_step",
            "max_frames_per_step",
            "max_concurrent_decodes",
            "max_model_len",
            "answer_reserve_tokens",
            "session_min_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_sessions_per_step < 0:
            raise ValueError(
                f"max_sessions_per_step must be >= 0, got {self.max_sessions_per_step}"
            )
        if self.max_concurrent_decodes > self.max_tokens_per_step:
            raise ValueError("max_concurrent_decodes must not exceed max_tokens_per_step")
        if self.answer_reserve_tokens >= self.max_model_len:
            raise ValueError("answer_reserve_tokens must be below max_model_len")

    @property
    def max_video_tokens(self) -> int:
        return self.max_model_len - self.answer_reserve_tokens


# ------------------------------------------------------------------------ states, reasons
class RequestStatus(IntEnum):
    """A question's lifecycle; everything from FINISHED_STOPPED on is finished."""

    WAITING = 0
    """Submitted; waits for its video, a decode slot, step budget or blocks."""
    RUNNING = 1
    """Forked off the video; prefilled or decoding."""
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_CANCELLED = 4
    FINISHED_ERROR = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class FinishReason(StrEnum):
    STOP = "stop"
    """A stop token was sampled (it is not part of the answer)."""
    LENGTH = "length"
    """`max_new_tokens` were generated."""
    CANCELLED = "cancelled"
    ERROR = "error"


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_CANCELLED: FinishReason.CANCELLED,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


class SessionState(IntEnum):
    ACTIVE = 0
    """Takes frames."""
    FULL = 1
    """Takes no more frames (see `FullReason`); questions are still answered."""


class FullReason(StrEnum):
    CONTEXT = "context_full"
    """The video reached `max_model_len - answer_reserve_tokens` tokens."""
    KV_POOL = "kv_pool_exhausted"
    """The block pool has no room for the session's next frame."""


class Refusal(StrEnum):
    """Machine-readable reasons for refusing a session, a frame or a question."""

    KV_POOL_EXHAUSTED = "kv_pool_exhausted"
    SLIDE_IN_PROGRESS = "slide_in_progress"
    SESSION_EXISTS = "session_exists"
    UNKNOWN_SESSION = "unknown_session"
    SESSION_FULL = "session_full"
    FRAME_TOO_LARGE = "frame_too_large"
    FRAME_OUT_OF_ORDER = "frame_out_of_order"
    REQUEST_EXISTS = "request_exists"
    NO_FRAMES = "no_frames"
    QUESTION_TOO_LONG = "question_too_long"


class Refused(Exception):
    """The scheduler refuses something; `reason` is for machines, the message for people."""

    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------ request, frames
@dataclass(frozen=True)
class Frame:
    """One sampled frame as the scheduler sees it: the tokens it adds to its session."""

    index: int
    """Position in the session's stream, 0-based; the runner finds the pixels by it."""
    time: float
    tokens: int
    """Frame label plus kept visual tokens (0 when every token was pruned)."""
    rebuild: bool = False
    """A frame already in the video, prefilled again into the session's rebuilt window."""


@dataclass
class Request:
    """One question and its answer: the single request state of the engine."""

    request_id: str
    session_id: str
    prompt_ids: tuple[int, ...]
    """The question's tokens after the video (pending label text, question, chat suffix)."""
    params: SamplingParams
    stop_ids: frozenset[int]
    frame_mark: int
    """Frames of the session the answer sees: those admitted before the question."""
    arrival: int
    output_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    """Detokenizer: start of the window re-decoded for the next text delta."""
    read_offset: int = 0
    """Detokenizer: output tokens already turned into text."""
    status: RequestStatus = RequestStatus.WAITING
    stream_position: float | None = None
    """Media time of the last frame the answer sees (set when it forks)."""
    error: str | None = None

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self.status)


@dataclass
class _Session:
    session_id: str
    waiting: deque[Frame] = field(default_factory=deque)
    admitted: int = 0
    """Frames accepted so far (the next frame's index)."""
    scheduled: int = 0
    """Frames prefilled (or in the step being executed)."""
    last_time: float | None = None
    """Time of the last scheduled frame."""
    last_admitted_time: float | None = None
    state: SessionState = SessionState.ACTIVE
    full_reason: FullReason | None = None
    dropped: int = 0
    """Waiting frames dropped when the session became full."""
    rebuild: deque[Frame] | None = None
    """The window being prefilled again (`slide`); None when no slide is in progress."""


@dataclass(frozen=True)
class SessionView:
    """A read-only snapshot of a session for status messages."""

    session_id: str
    state: SessionState
    full_reason: FullReason | None
    frames_admitted: int
    frames_prefilled: int
    frames_dropped: int
    tokens: int
    blocks: int
    """The video's blocks, and a rebuilt window's while a slide runs."""
    stream_position: float | None
    sliding: bool = False
    """A rebuilt window is being prefilled (`slide`)."""


@dataclass(frozen=True)
class PoolView:
    """Block pool occupancy for status messages and metrics."""

    blocks_total: int
    blocks_used: int
    blocks_available: int
    """Free and not promised to a session's minimum or an answer's worst case."""


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class FramePrefill:
    """A session's frames for this step, in stream order, and where their tokens go."""

    session_id: str
    frames: tuple[Frame, ...]
    placement: Placement
    block_table: tuple[int, ...]
    """The session's blocks after this step, in position order (what attention reads)."""


@dataclass(frozen=True)
class QuestionPrefill:
    """A question forked off its session's video at `placement.start`, prefilling its prompt."""

    request_id: str
    session_id: str
    token_ids: tuple[int, ...]
    placement: Placement
    block_table: tuple[int, ...]


@dataclass(frozen=True)
class DecodeStep:
    """An answer's next position: `token_id` (sampled last step) goes in, one token comes out."""

    request_id: str
    token_id: int
    placement: Placement
    block_table: tuple[int, ...]


@dataclass(frozen=True)
class SessionFull:
    session_id: str
    reason: FullReason
    dropped_frames: int


@dataclass(frozen=True)
class StepPlan:
    """Everything one step does; the runner copies blocks first, then runs the batch."""

    step: int
    decodes: tuple[DecodeStep, ...] = ()
    questions: tuple[QuestionPrefill, ...] = ()
    frames: tuple[FramePrefill, ...] = ()
    freed: tuple[int, ...] = ()
    """Blocks that became free since the previous plan (finished or cancelled answers)."""
    full: tuple[SessionFull, ...] = ()
    """Sessions that became full while this plan was made."""
    rebuilt: tuple[str, ...] = ()
    """Sessions whose rebuilt window became their video in this plan (the old blocks are freed;
    live frames of the same `FramePrefill` follow the rebuilt ones)."""
    failed: tuple[str, ...] = ()
    """Questions finished with an error while this plan was made (their video never came)."""

    @property
    def placements(self) -> tuple[Placement, ...]:
        items = (*self.decodes, *self.questions, *self.frames)
        return tuple(item.placement for item in items)

    @property
    def copies(self) -> tuple[BlockCopy, ...]:
        return tuple(p.copy for p in self.placements if p.copy is not None)

    @property
    def allocated(self) -> tuple[int, ...]:
        return tuple(block for p in self.placements for block in p.allocated)

    @property
    def num_tokens(self) -> int:
        return sum(p.tokens for p in self.placements)

    @property
    def num_frames(self) -> int:
        return sum(len(f.frames) for f in self.frames)

    @property
    def empty(self) -> bool:
        return not (self.decodes or self.questions or self.frames)


@dataclass(frozen=True)
class StepOutput:
    """What the runner reports for a plan: the token each question/answer sampled."""

    step: int
    sampled: Mapping[str, int] = field(default_factory=dict)
    failed: Mapping[str, str] = field(default_factory=dict)
    """Request id -> error message, for answers the runner could not advance."""


# ------------------------------------------------------------------------- the scheduler
def _session_key(session_id: str) -> tuple[str, str]:
    return ("session", session_id)


def _request_key(request_id: str) -> tuple[str, str]:
    return ("request", request_id)


def _rebuild_key(session_id: str) -> tuple[str, str]:
    return ("rebuild", session_id)


class Scheduler:
    """Sessions, their frames and questions; one `StepPlan` per `schedule()` call."""

    def __init__(self, kv: KVCacheManager, config: SchedulerConfig | None = None) -> None:
        self.kv = kv
        self.config = config or SchedulerConfig()
        self.block_size = kv.block_size
        # Worst case of one answer's own blocks: its tokens plus a copied partial video block.
        self.headroom_blocks = -(-self.config.answer_reserve_tokens // self.block_size) + 1
        self._sessions: dict[str, _Session] = {}
        self._order: deque[str] = deque()
        self._requests: dict[str, Request] = {}
        self._waiting: deque[str] = deque()
        self._running: list[str] = []
        self._freed: list[int] = []
        self._failed: list[str] = []
        self._arrivals = 0
        self._step = 0
        self._in_flight: StepPlan | None = None

    # ---------------------------------------------------------------- sessions
    def add_session(self, session_id: str) -> None:
        """Admit a session if the pool can promise it `session_min_tokens`; else `Refused`."""
        if session_id in self._sessions:
            raise Refused(Refusal.SESSION_EXISTS, f"session {session_id} already exists")
        minimum = -(-self.config.session_min_tokens // self.block_size)
        if self.kv.available - minimum < self.headroom_blocks:
            raise Refused(
                Refusal.KV_POOL_EXHAUSTED,
                f"the KV pool cannot hold another session: {self.kv.available} blocks "
                f"available, a session needs {minimum} plus {self.headroom_blocks} kept for "
                "answers",
            )
        key = _session_key(session_id)
        self.kv.open(key)
        self.kv.reserve(key, minimum)
        self._sessions[session_id] = _Session(session_id)
        self._order.append(session_id)

    def close_session(self, session_id: str) -> None:
        """Cancel the session's questions and free its blocks (shared ones stay with forks)."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        for request in list(self._requests.values()):
            if request.session_id == session_id:
                self.cancel(request.request_id)
        self._order.remove(session_id)
        self._freed += self.kv.free(_session_key(session_id))
        if session.rebuild is not None:
            self._freed += self.kv.free(_rebuild_key(session_id))

    def slide(self, session_id: str, frames: list[tuple[int, float, int]]) -> None:
        """Rebuild the session's video from `frames` (index, time, tokens), the frames still in
        its window with their token counts as one forward over them has them.

        The blocks for them are promised now; `Refused(KV_POOL_EXHAUSTED)` if the pool cannot
        (the engine tries again later), `Refused(SLIDE_IN_PROGRESS)` during another slide.
        Questions waiting for frames not prefilled yet fork off the current video instead.
        """
        session = self._session(session_id)
        if session.rebuild is not None:
            raise Refused(Refusal.SLIDE_IN_PROGRESS, f"session {session_id} is already sliding")
        if not frames or sum(n for *_, n in frames) > self.config.max_video_tokens:
            raise ValueError("a rebuilt window needs frames, and they must fit the context")
        blocks = -(-sum(n for *_, n in frames) // self.block_size)
        if blocks > self.kv.available - self.headroom_blocks:
            raise Refused(
                Refusal.KV_POOL_EXHAUSTED,
                f"the KV pool cannot hold session {session_id}'s rebuilt window ({blocks} blocks)",
            )
        key = _rebuild_key(session_id)
        self.kv.open(key)
        self.kv.reserve(key, blocks)
        session.rebuild = deque(Frame(i, t, n, rebuild=True) for i, t, n in frames)
        for request_id in self._waiting:
            request = self._requests[request_id]
            if request.session_id == session_id:
                request.frame_mark = min(request.frame_mark, session.scheduled)

    def add_frame(self, session_id: str, time: float, tokens: int) -> Frame:
        """Queue a frame at the end of its session's stream; `Refused` if it cannot be taken."""
        session = self._session(session_id)
        if session.state is SessionState.FULL:
            raise Refused(
                Refusal.SESSION_FULL, f"session {session_id} is full ({session.full_reason})"
            )
        if tokens < 0:
            raise ValueError(f"a frame adds >= 0 tokens, got {tokens}")
        if tokens > self.config.max_tokens_per_step:
            raise Refused(
                Refusal.FRAME_TOO_LARGE,
                f"a frame of {tokens} tokens does not fit a step of "
                f"{self.config.max_tokens_per_step}",
            )
        last = session.last_admitted_time
        if not (math.isfinite(time) and time >= 0) or (last is not None and time <= last):
            raise Refused(
                Refusal.FRAME_OUT_OF_ORDER,
                f"frame times must increase from 0; got {time} after {last}",
            )
        frame = Frame(session.admitted, time, tokens)
        session.waiting.append(frame)
        session.admitted += 1
        session.last_admitted_time = time
        return frame

    def session(self, session_id: str) -> SessionView:
        session = self._session(session_id)
        key = _session_key(session_id)
        return SessionView(
            session_id=session_id,
            state=session.state,
            full_reason=session.full_reason,
            frames_admitted=session.admitted,
            frames_prefilled=session.scheduled,
            frames_dropped=session.dropped,
            tokens=self.kv.tokens(key),
            # A slide holds the rebuilt window beside the video until it replaces it.
            blocks=len(self.kv.blocks(key))
            + (len(self.kv.blocks(_rebuild_key(session_id))) if session.rebuild is not None else 0),
            stream_position=session.last_time,
            sliding=session.rebuild is not None,
        )

    def pool(self) -> PoolView:
        pool = self.kv.pool
        return PoolView(pool.num_blocks, pool.num_used, self.kv.available)

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        session_id: str,
        prompt_ids: tuple[int, ...] | list[int],
        params: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
    ) -> Request:
        """Queue a question on the video admitted so far; `Refused` if it can never run."""
        session = self._session(session_id)
        if request_id in self._requests:
            raise Refused(Refusal.REQUEST_EXISTS, f"request {request_id} already exists")
        if session.admitted - session.dropped == 0:
            raise Refused(Refusal.NO_FRAMES, "the session has no frames yet")
        prompt = tuple(prompt_ids)
        own = len(prompt) + params.max_new_tokens - 1
        if not prompt or own > self.config.answer_reserve_tokens:
            raise Refused(
                Refusal.QUESTION_TOO_LONG,
                f"{len(prompt)} prompt tokens and {params.max_new_tokens} new tokens exceed "
                f"the {self.config.answer_reserve_tokens} tokens kept for an answer",
            )
        if len(prompt) > self.config.max_tokens_per_step:
            raise Refused(
                Refusal.QUESTION_TOO_LONG,
                f"{len(prompt)} prompt tokens exceed a step of {self.config.max_tokens_per_step}",
            )
        request = Request(
            request_id=request_id,
            session_id=session_id,
            prompt_ids=prompt,
            params=params,
            stop_ids=frozenset(stop_ids),
            # During a slide the video stops at what is prefilled: the question forks off it
            # now rather than wait for the rebuilt window.
            frame_mark=session.scheduled
            if session.rebuild is not None
            else session.admitted - session.dropped,
            arrival=self._arrivals,
        )
        self._arrivals += 1
        self._requests[request_id] = request
        self._waiting.append(request_id)
        return request

    def request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def cancel(self, request_id: str) -> Request | None:
        """Stop a question (waiting or running) and free its blocks."""
        request = self._requests.get(request_id)
        if request is not None:
            self._finish(request, RequestStatus.FINISHED_CANCELLED)
        return request

    @property
    def in_flight(self) -> StepPlan | None:
        """The plan scheduled and not yet updated."""
        return self._in_flight

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------- steps
    def schedule(self) -> StepPlan:
        """Plan the next step; the previous plan must have been passed to `update` first."""
        if self._in_flight is not None:
            raise RuntimeError(f"step {self._in_flight.step} has not been updated yet")
        budget = _Budget(
            self.config.max_tokens_per_step,
            self.config.max_frames_per_step,
            self._sessions_for_step(),
        )
        decodes = self._schedule_decodes(budget)
        questions = self._schedule_questions(budget)
        frames, full, rebuilt = self._schedule_frames(budget)
        plan = StepPlan(
            step=self._step,
            decodes=decodes,
            questions=questions,
            frames=frames,
            freed=tuple(self._freed),
            full=full,
            rebuilt=rebuilt,
            failed=tuple(self._failed),
        )
        self._freed, self._failed = [], []
        self._step += 1
        self._order.rotate(-1)
        self._in_flight = plan
        return plan

    def update(self, output: StepOutput) -> list[Request]:
        """Apply a step's sampled tokens; returns the requests it advanced or finished."""
        plan = self._in_flight
        if plan is None or output.step != plan.step:
            raise ValueError(f"output for step {output.step} does not match the plan in flight")
        items = (*plan.decodes, *plan.questions)
        missing = [
            item.request_id
            for item in items
            if item.request_id in self._requests  # not cancelled while the step ran
            and item.request_id not in output.sampled
            and item.request_id not in output.failed
        ]
        if missing:
            raise ValueError(f"step {plan.step} has no token for {', '.join(missing)}")
        self._in_flight = None
        advanced = []
        for item in items:
            request = self._requests.get(item.request_id)
            if request is None or request.status.finished:
                continue  # cancelled while the step ran
            if item.request_id in output.failed:
                request.error = output.failed[item.request_id]
                self._finish(request, RequestStatus.FINISHED_ERROR)
            else:
                self._accept(request, output.sampled[item.request_id])
            advanced.append(request)
        return advanced

    # ------------------------------------------------------------- internals
    def _session(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise Refused(Refusal.UNKNOWN_SESSION, f"session {session_id} does not exist")
        return session

    def _accept(self, request: Request, token: int) -> None:
        if token in request.stop_ids:
            self._finish(request, RequestStatus.FINISHED_STOPPED)
            return
        request.output_ids.append(token)
        if len(request.output_ids) >= request.params.max_new_tokens:
            self._finish(request, RequestStatus.FINISHED_LENGTH)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status.finished:
            return
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request.request_id)
            self._freed += self.kv.free(_request_key(request.request_id))
        else:
            self._waiting.remove(request.request_id)
        request.status = status
        del self._requests[request.request_id]

    def _sessions_for_step(self) -> frozenset[str] | None:
        """With `max_sessions_per_step`, the first sessions in round-robin order that have
        work; None when every session may go."""
        limit = self.config.max_sessions_per_step
        if not limit:
            return None
        busy = {self._requests[r].session_id for r in (*self._running, *self._waiting)}
        chosen = [
            sid
            for sid in self._order
            if sid in busy or self._sessions[sid].waiting or self._sessions[sid].rebuild
        ][:limit]
        return frozenset(chosen)

    def _schedule_decodes(self, budget: _Budget) -> tuple[DecodeStep, ...]:
        # Every running answer fits: max_concurrent_decodes <= max_tokens_per_step, and each
        # answer's blocks were reserved when it forked.
        steps = []
        for request_id in self._running:
            request = self._requests[request_id]
            if not budget.allows(request.session_id):
                continue
            key = _request_key(request_id)
            placement = self.kv.append(key, 1)
            budget.tokens -= 1
            steps.append(
                DecodeStep(request_id, request.output_ids[-1], placement, self.kv.blocks(key))
            )
        return tuple(steps)

    def _schedule_questions(self, budget: _Budget) -> tuple[QuestionPrefill, ...]:
        prefills = []
        for request_id in list(self._waiting):
            request = self._requests[request_id]
            session = self._sessions[request.session_id]
            if session.scheduled < request.frame_mark or not budget.allows(request.session_id):
                continue  # its video is not prefilled yet, or its session waits for its turn
            if len(self._running) >= self.config.max_concurrent_decodes:
                break
            if len(request.prompt_ids) > budget.tokens:
                break
            parent = _session_key(request.session_id)
            start = self.kv.tokens(parent)
            end = start + len(request.prompt_ids) + request.params.max_new_tokens - 1
            own_blocks = -(-end // self.block_size) - start // self.block_size
            if own_blocks > self.kv.available:
                break
            key = _request_key(request_id)
            self.kv.fork(parent, key)
            self.kv.reserve(key, own_blocks)
            placement = self.kv.append(key, len(request.prompt_ids))
            budget.tokens -= len(request.prompt_ids)
            self._waiting.remove(request_id)
            self._running.append(request_id)
            request.status = RequestStatus.RUNNING
            request.stream_position = session.last_time
            prefills.append(
                QuestionPrefill(
                    request_id,
                    request.session_id,
                    request.prompt_ids,
                    placement,
                    self.kv.blocks(key),
                )
            )
        return tuple(prefills)

    def _schedule_frames(
        self, budget: _Budget
    ) -> tuple[tuple[FramePrefill, ...], tuple[SessionFull, ...], tuple[str, ...]]:
        taken: dict[str, list[tuple[Frame, Placement | None]]] = {}
        full: list[SessionFull] = []
        rebuilt: list[str] = []
        marks: dict[str, int] = {}  # per session, the admission point of its next question
        for request_id in self._waiting:
            request = self._requests[request_id]
            mark = marks.get(request.session_id, request.frame_mark)
            marks[request.session_id] = min(mark, request.frame_mark)
        progress = True
        while progress and budget.frames > 0:
            progress = False
            for session_id in self._order:
                if budget.frames == 0:
                    break
                session = self._sessions[session_id]
                if not budget.allows(session_id):
                    continue
                frame = self._next_frame(session, budget, marks.get(session_id))
                if frame is None:
                    continue
                key = _rebuild_key(session_id) if frame.rebuild else _session_key(session_id)
                reason = None if frame.rebuild else self._frame_blocked(key, frame)
                if reason is not None:
                    full.append(self._mark_full(session, reason))
                    continue
                placement = self.kv.append(key, frame.tokens) if frame.tokens else None
                if frame.rebuild:
                    assert session.rebuild is not None
                    session.rebuild.popleft()
                    if not session.rebuild:
                        self._swap(session)
                        rebuilt.append(session_id)
                else:
                    session.waiting.popleft()
                    session.scheduled += 1
                    session.last_time = frame.time
                budget.tokens -= frame.tokens
                budget.frames -= 1
                taken.setdefault(session_id, []).append((frame, placement))
                progress = True
        prefills = []
        for session_id, items in taken.items():
            # Rebuild frames and live frames of one step share a table: live frames only follow
            # once the rebuilt window became the video.
            key = (
                _rebuild_key(session_id)
                if self._sessions[session_id].rebuild is not None
                else _session_key(session_id)
            )
            prefills.append(
                FramePrefill(
                    session_id,
                    tuple(frame for frame, _ in items),
                    _merge(self.kv.tokens(key), [p for _, p in items]),
                    self.kv.blocks(key),
                )
            )
        return tuple(prefills), tuple(full), tuple(rebuilt)

    def _swap(self, session: _Session) -> None:
        """The rebuilt window becomes the session's video; the old video's blocks are freed
        (forked answers hold their own references)."""
        key = _session_key(session.session_id)
        self._freed += self.kv.free(key)
        self.kv.rename(_rebuild_key(session.session_id), key)
        session.rebuild = None

    @staticmethod
    def _next_frame(session: _Session, budget: _Budget, mark: int | None) -> Frame | None:
        """The session's next frame if it may go this step (order, question mark, budget).
        During a slide that is the rebuilt window's next frame; live frames wait."""
        if session.rebuild is not None:
            frame = session.rebuild[0]
            return frame if frame.tokens <= budget.tokens else None
        if session.state is not SessionState.ACTIVE or not session.waiting:
            return None
        frame = session.waiting[0]
        if mark is not None and frame.index >= mark:
            return None  # a waiting question sees the video up to here: it forks first
        if frame.tokens > budget.tokens:
            return None
        return frame

    def _frame_blocked(self, key: tuple[str, str], frame: Frame) -> FullReason | None:
        if self.kv.tokens(key) + frame.tokens > self.config.max_video_tokens:
            return FullReason.CONTEXT
        needed = self.kv.blocks_needed(key, frame.tokens)
        if not self.kv.can_allocate(key, needed, keep_free=self.headroom_blocks):
            return FullReason.KV_POOL
        return None

    def _mark_full(self, session: _Session, reason: FullReason) -> SessionFull:
        session.state = SessionState.FULL
        session.full_reason = reason
        dropped = len(session.waiting)
        session.dropped += dropped
        session.waiting.clear()
        for request_id in list(self._waiting):
            request = self._requests[request_id]
            if request.session_id != session.session_id:
                continue
            # The frames it was to see will never come: it sees the video there is.
            request.frame_mark = min(request.frame_mark, session.scheduled)
            if request.frame_mark == 0:
                request.error = "the session became full before any frame was prefilled"
                self._finish(request, RequestStatus.FINISHED_ERROR)
                self._failed.append(request_id)
        return SessionFull(session.session_id, reason, dropped)


@dataclass
class _Budget:
    tokens: int
    frames: int
    sessions: frozenset[str] | None = None
    """Sessions that may have work in this step (None: all)."""

    def allows(self, session_id: str) -> bool:
        return self.sessions is None or session_id in self.sessions


def _merge(end: int, placements: list[Placement | None]) -> Placement:
    """One placement for a session's frames of a step (consecutive appends of one table)."""
    parts = [p for p in placements if p is not None]
    if not parts:
        return Placement(end, 0, (), None, ())
    writes: list[BlockWrite] = []
    for part in parts:
        for write in part.writes:
            last = writes[-1] if writes else None
            if last and last.block == write.block and last.start + last.count == write.start:
                writes[-1] = BlockWrite(write.block, last.start, last.count + write.count)
            else:
                writes.append(write)
    copies = [p.copy for p in parts if p.copy is not None]
    return Placement(
        start=parts[0].start,
        tokens=sum(p.tokens for p in parts),
        writes=tuple(writes),
        copy=copies[0] if copies else None,
        allocated=tuple(block for p in parts for block in p.allocated),
    )
