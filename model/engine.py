"""The serving engine: one thread owns the model and loops schedule -> execute -> update.

Every live session hands the engine its sampled frames and its questions; each step batches
the work of all of them (model/scheduler.py decides, model/runner.py executes):

    plan = scheduler.schedule()          # frames to prefill, questions to fork, answers to decode
    result = runner.execute(plan, ...)   # one vision pass, one packed decoder forward
    sampled = one token per question / answer, each with its own sampling options
    scheduler.update(sampled)            # stop tokens, lengths, freed blocks

Frames are DiffFP-pruned and their `Time t:` label tokenized when the engine takes them in
(intake), in stream order per session, so the scheduler budgets exact token counts. A session's
intake is bounded: frames wait in a small inbox (`max_pending_frames`, oldest dropped and counted
when the model falls behind) and at most that many more wait in the scheduler. A question takes
in every frame its session has already sampled, then forks off exactly that video.

Callbacks (`FrameCallbacks`, `QuestionJob`) run on the engine thread, outside its lock; the
service hops them onto its event loop. `step()` can also be driven synchronously (no thread):
`VideoSession` (model/session.py) does that for offline use.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from livelens.model.grounding import Segment, parse_segments
from livelens.model.kv import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_KV_BUDGET,
    BlockPool,
    KVBudget,
    KVCacheManager,
)
from livelens.model.prompt import PromptFormat
from livelens.model.pruner import DiffFramePruner
from livelens.model.runner import FrameInput, FrameKey, ModelRunner, StepResult, frame_key
from livelens.model.sampling import MAX_QUESTION_CHARS, SamplingParams, SessionError
from livelens.model.scheduler import (
    Frame,
    FullReason,
    Refusal,
    Refused,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    StepOutput,
    StepPlan,
)

logger = logging.getLogger(__name__)

ANSWER_RESERVE_TOKENS = 1024
"""Tokens kept free after a session's video for one question and its answer."""


# ----------------------------------------------------------------------- results
@dataclass(frozen=True)
class AppendResult:
    """A session's frames prefilled in one step."""

    frames: int
    kept_tokens: int
    total_tokens: int
    seconds: float


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    token_ids: list[int]
    segments: list[Segment]
    stream_position: float
    """Media time (s) of the last frame the answer saw."""
    prefill_seconds: float
    """From the question's fork until its first token was chosen (time to first token)."""
    total_seconds: float
    recalled: tuple[float, ...] = ()
    """Media times of the frames from before the window the answer also saw (`memory`)."""


@dataclass(frozen=True)
class SessionStats:
    frames: int
    """Frames prefilled into the session's KV cache."""
    kept_tokens: int
    total_tokens: int
    kv_tokens: int
    kv_blocks: int
    kv_bytes: int
    last_time: float | None
    window_start: float | None = None
    """Media time of the first frame the video holds (it moves when the window slides)."""
    frames_left: int = 0
    """Frames that have left the window."""
    slides: int = 0
    memory_start: float | None = None
    """Media time of the oldest frame kept for recall (None: no memory)."""
    memory_frames: int = 0

    @property
    def kept_ratio(self) -> float:
        return self.kept_tokens / self.total_tokens if self.total_tokens else 1.0


# --------------------------------------------------------------------- callbacks
@dataclass
class QuestionJob:
    """A question for one session; the callbacks run on the engine thread."""

    question: str
    params: SamplingParams
    on_start: Callable[[], None]
    """Called when the question forks off its video, just before its prefill runs."""
    on_token: Callable[[str], None]
    on_done: Callable[[Answer], None]
    on_error: Callable[[Exception], None]
    on_logits: Callable[[torch.Tensor], None] | None = None
    """Optional: the first answer token's logits, before any penalty (exactness checks)."""
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    memory: str = "auto"
    """Frames from before the window: "auto" (recalled unless the question is about now:
    `wants_memory`), "recall" (always), "window" (never)."""

    def cancel(self) -> None:
        """Stop the answer at the next step (or never start it); on_error gets no call."""
        self.cancelled.set()


@dataclass
class FrameCallbacks:
    """How the engine reports a session's frame work (called on the engine thread)."""

    on_appended: Callable[[AppendResult], None]
    on_error: Callable[[Exception], None]
    """The session takes no more frames (its context or the KV pool is full)."""


@dataclass(frozen=True)
class Probe:
    """One evaluation of a standing question (`Engine.watch`): a yes/no question over the
    session's video up to `time`."""

    watch_id: str
    time: float
    """Media time of the newest frame the evaluation saw."""
    confidence: float
    """P(yes) / (P(yes) + P(no)) at the answer's first token (yes/no: the first tokens of
    "Yes"/"yes" and "No"/"no")."""
    evaluated: bool
    """False: not run, because DiffFP found no changed token since the last evaluation and the
    window did not slide; `confidence` is the last evaluation's."""
    seconds: float = 0.0
    """From the evaluation's fork to its result (0 when not evaluated)."""


@dataclass
class _Watch:
    """A standing question of one session: evaluated every `every` media seconds."""

    watch_id: str
    question: str
    every: float
    on_result: Callable[[Probe], None]
    on_error: Callable[[Exception], None]
    next_due: float = -math.inf
    changed: bool = True
    """DiffFP kept a changed token (or the window slid) since the last evaluation."""
    confidence: float | None = None
    in_flight: set[str] = field(default_factory=set)
    """Request ids of the watch's evaluations waiting or running."""


# ------------------------------------------------------------------------ config
@dataclass(frozen=True)
class EngineConfig:
    kv_budget: str = DEFAULT_KV_BUDGET
    """Bytes (`8GiB`) or a fraction of the device memory free after loading (`0.8`)."""
    block_size: int = DEFAULT_BLOCK_SIZE
    max_pending_frames: int = 8
    """Per session: sampled frames waiting for intake (then the oldest is dropped)."""
    slide_fraction: float = 0.5
    """Share of a session's window that leaves it at each slide (docs/engine.md)."""
    sessions: int = 1
    """Sessions the pool is meant to hold at once (the service's --max-sessions): default
    windows are sized from an even share of it."""
    recall_frames: int = 32
    """At most this many frames from before the window join a question that recalls."""
    skip_unchanged: bool = True
    """Standing questions: skip an evaluation when DiffFP found no changed token since the last
    one (the model would see the same video but for the time labels)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.max_pending_frames < 1:
            raise ValueError(f"max_pending_frames must be >= 1, got {self.max_pending_frames}")
        if self.recall_frames < 1:
            raise ValueError(f"recall_frames must be >= 1, got {self.recall_frames}")
        if not 0 < self.slide_fraction < 1:
            raise ValueError(f"slide_fraction must be in (0, 1), got {self.slide_fraction}")
        KVBudget.parse(self.kv_budget)


def free_memory(device: torch.device) -> int:
    """Bytes the KV pool may come from: free accelerator memory, or available host memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# ---------------------------------------------------------------- engine state
@dataclass
class _Session:
    session_id: str
    inbox: deque[tuple[np.ndarray, float]]
    pending_text: str
    """Chat prefix and labels of fully pruned frames, not yet tokenized."""
    callbacks: FrameCallbacks | None = None
    pruner: DiffFramePruner | None = None
    height: int = 0
    width: int = 0
    tokens_per_frame: int = 0
    frames: dict[int, FrameInput] = field(default_factory=dict)
    """Admitted and not yet prefilled, by frame index."""
    times: list[float] = field(default_factory=list)
    """Media times of the prefilled frames."""
    kept: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    """Token ids the session's video holds (labels and visual placeholders)."""
    dropped: int = 0
    full_reason: str | None = None
    questions: set[str] = field(default_factory=set)
    """Request ids waiting or running."""
    window: _Window | None = None
    """The sliding window's state (None: the video only grows)."""
    recalls: list[tuple[QuestionJob, int]] = field(default_factory=list)
    """Questions that recall older frames, waiting for the frames admitted before them (their
    mark) to be prefilled, and for a slide in progress to end."""
    watches: dict[str, _Watch] = field(default_factory=dict)
    probes: set[str] = field(default_factory=set)
    """Request ids of standing-question evaluations waiting or running."""


@dataclass
class _Held:
    """A prefilled frame's cached features, for rebuilding the window without the vision tower."""

    index: int
    kept: torch.Tensor | None
    """The kept projected features (host memory); None when the frame kept no token."""
    full: torch.Tensor | None
    """Every projected feature, for anchors (frames a rebuilt window may start at)."""


@dataclass
class _Window:
    seconds: float
    """Media seconds of video the session holds at most."""
    slide_seconds: float
    """Anchors are at least this far apart; a slide drops the frames before the second one."""
    held: list[_Held] = field(default_factory=list)
    """One per prefilled frame in the window, in order (parallel to `_Session.times`)."""
    next_anchor: float = -math.inf
    """Media time from which the next frame taken in is an anchor."""
    slides: int = 0
    left: int = 0
    """Frames that have left the window."""
    rebuild: dict[int, FrameInput] | None = None
    """Inputs of the rebuilt window's frames while a slide is in progress."""
    after: tuple[list[float], list[int], list[int], list[_Held]] | None = None
    """times, kept, prompt ids and held frames of the window once the slide completes."""
    memory: _Memory | None = None
    """Frames that left the window, kept for recall (None: they are forgotten)."""


@dataclass
class _Recalled:
    """A frame that left the window: what a question that recalls it prefills again."""

    time: float
    features: torch.Tensor
    """Its projected visual features as the window held them (host memory)."""


@dataclass
class _Memory:
    seconds: float
    """Media seconds of stream before the window that are kept."""
    frames: deque[_Recalled] = field(default_factory=deque)

    def add(self, t: float, features: torch.Tensor) -> None:
        self.frames.append(_Recalled(t, features))
        while self.frames and t - self.frames[0].time > self.seconds:
            self.frames.popleft()


@dataclass
class _Active:
    """Engine-side state of one question beside its scheduler `Request` (token ids, detokenizer
    offsets, status): the asker's job and the sampling state."""

    request: Request
    """The scheduler's state of the question (ids, params, status); read, never written here
    except its detokenizer offsets (`text_delta`)."""
    job: QuestionJob
    penalty: float
    generator: torch.Generator
    seen: torch.Tensor | None = None
    emitted: str = ""
    first_token_at: float | None = None
    watch: _Watch | None = None
    """Set for a standing question's evaluation (one token, its yes/no confidence)."""
    confidence: float | None = None
    parent: str | None = None
    """A recalling question runs on a context of its own (`request.session_id`, closed with
    it); this is the session it was asked on."""
    recalled: tuple[float, ...] = ()


@dataclass
class _Callbacks:
    """Calls collected under the lock, made after it is released."""

    calls: list[Callable[[], None]] = field(default_factory=list)

    def add(self, fn: Callable[..., None], *args: object) -> None:
        self.calls.append(lambda: fn(*args))

    def run(self) -> None:
        for call in self.calls:
            try:
                call()
            except Exception:  # a failing callback must not kill the engine for everyone
                logger.exception("an engine callback failed")


# --------------------------------------------------------------------- the engine
class Engine:
    """All model work of all sessions, batched per step; thread-safe submission."""

    def __init__(
        self,
        runner: ModelRunner,
        config: EngineConfig | None = None,
        *,
        num_blocks: int | None = None,
        name: str = "livelens-engine",
    ) -> None:
        self.runner = runner
        self.config = config = config or EngineConfig()
        loaded = runner.loaded
        self.tokenizer = loaded.tokenizer
        self.prompt = PromptFormat.from_tokenizer(self.tokenizer, loaded.video_token_id)
        self.video_token_id = loaded.video_token_id
        text_config = runner.text_config
        self.max_model_len = int(text_config.max_position_embeddings)
        scheduler_config = replace(
            config.scheduler,
            max_model_len=self.max_model_len,
            answer_reserve_tokens=min(
                config.scheduler.answer_reserve_tokens, self.max_model_len - 1
            ),
        )
        layout = runner.kv_layout(config.block_size)
        if num_blocks is None:
            budget = KVBudget.parse(config.kv_budget).resolve(free_memory(runner.device))
            num_blocks = layout.blocks_in(budget)
        self.layout = layout
        runner.allocate_kv(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            KVCacheManager(BlockPool(num_blocks, config.block_size)), scheduler_config
        )
        self.stop_ids = _stop_ids(self.tokenizer, runner.model.generation_config)
        self.yes_ids, self.no_ids = _yes_no_ids(self.tokenizer)
        self._yes_index = torch.tensor(self.yes_ids, device=runner.device)
        self._no_index = torch.tensor(self.no_ids, device=runner.device)
        penalty = runner.model.generation_config.repetition_penalty
        self.default_repetition_penalty = float(penalty) if penalty is not None else 1.0

        self._cond = threading.Condition()
        self._sessions: dict[str, _Session] = {}
        self._inbox: deque[tuple[str, QuestionJob]] = deque()
        self._active: dict[str, _Active] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._name = name
        self.steps = 0
        self.busy_seconds = 0.0
        self.max_step_seconds = 0.0
        self.refused_sessions = 0
        self.probes_run = 0
        self.probes_skipped = 0

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, abandon queued work, and join the engine thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    # -------------------------------------------------------------- sessions
    def open_session(self, key: str) -> None:
        """Admit a session (its minimum of KV blocks is promised now); `Refused` if the pool
        cannot hold it. Frames come after `configure`."""
        with self._cond:
            try:
                self.scheduler.add_session(key)
            except Refused as exc:
                if exc.reason is Refusal.KV_POOL_EXHAUSTED:
                    self.refused_sessions += 1
                raise
            self._sessions[key] = _Session(
                key, deque(maxlen=self.config.max_pending_frames), self.prompt.prefix
            )

    def configure(
        self,
        key: str,
        *,
        height: int,
        width: int,
        threshold: float,
        min_tokens: int,
        callbacks: FrameCallbacks,
        window_s: float | None = None,
        memory_s: float | None = None,
    ) -> None:
        """Set the session's frame grid, DiffFP settings and window (once, at its first frame).

        window_s: media seconds of video the session holds; older frames leave in slides of
        `slide_fraction` of it, the rest re-prefilled as one forward over the window (None: the
        video grows until the context is full).
        memory_s: media seconds of stream before the window whose frames stay in host memory
        for questions that recall them (None or 0: none; needs a window).
        """
        unit = self.runner.patch_size * self.runner.merge_size
        if height <= 0 or width <= 0 or height % unit or width % unit:
            raise SessionError(f"frame grid {height}x{width} must be positive multiples of {unit}")
        if window_s is not None and not (math.isfinite(window_s) and window_s > 0):
            raise SessionError(f"the window must be a positive number of seconds, got {window_s}")
        if memory_s is not None and not (math.isfinite(memory_s) and memory_s >= 0):
            raise SessionError(f"the memory must be >= 0 seconds, got {memory_s}")
        pruner = DiffFramePruner(
            threshold=threshold, min_tokens=min_tokens, device=self.runner.device
        )
        with self._cond:
            session = self._session(key)
            if session.pruner is not None:
                raise ValueError(f"session {key} is already configured")
            session.pruner, session.callbacks = pruner, callbacks
            session.height, session.width = height, width
            merged = self.runner.patch_size * self.runner.merge_size
            session.tokens_per_frame = (height // merged) * (width // merged)
            if window_s is not None:
                session.window = _Window(window_s, window_s * self.config.slide_fraction)
                if memory_s:
                    session.window.memory = _Memory(memory_s)

    def close_session(self, key: str) -> None:
        """Forget a session: its frames are dropped, its questions cancelled (no callbacks),
        its KV blocks freed (a running step finishes writing into them first)."""
        with self._cond:
            session = self._sessions.pop(key, None)
            if session is None:
                return
            for request_id in (*session.questions, *session.probes):
                active = self._active.pop(request_id, None)
                if active is not None:
                    active.job.cancel()
                    if active.parent is not None:  # its own context goes with it
                        self._close_context(active.request.session_id)
            for job, _ in session.recalls:
                job.cancel()
            for _, job in [item for item in self._inbox if item[0] == key]:
                job.cancel()
            self._inbox = deque(item for item in self._inbox if item[0] != key)
            self.scheduler.close_session(key)
            self._cond.notify_all()

    def submit_frame(self, key: str, image: np.ndarray, t: float) -> bool:
        """Queue a sampled frame (uint8 (H, W, 3) at the session grid); False if the session
        takes no more. When the inbox is full the oldest frame is dropped (and counted)."""
        with self._cond:
            session = self._sessions.get(key)
            if session is None or session.pruner is None or session.full_reason is not None:
                return False
            if len(session.inbox) == session.inbox.maxlen:
                session.dropped += 1
            session.inbox.append((image, t))
            self._cond.notify()
            return True

    def submit_question(self, key: str, job: QuestionJob) -> int:
        """Queue a question; returns how many questions of the session are ahead of it.

        The engine does not bound its question inbox itself: its callers do (the service's
        per-session and per-connection question limits, `questions()` counting both)."""
        with self._cond:
            session = self._sessions.get(key)
            if session is None:
                raise KeyError(f"session {key} is not open")
            ahead = self._questions(key)
            self._inbox.append((key, job))
            self._cond.notify()
            return ahead

    def watch(
        self,
        key: str,
        watch_id: str,
        question: str,
        *,
        every: float,
        on_result: Callable[[Probe], None],
        on_error: Callable[[Exception], None],
    ) -> None:
        """Evaluate a yes/no question on the session every `every` media seconds, at the first
        frame taken in at or after each due time, forked off the video up to that frame like
        any question (its prompt prefilled, one token, then released). `on_result` gets a
        `Probe` per due time, in media-time order (on the engine thread). At most
        `MAX_PROBES_IN_FLIGHT` evaluations of a watch wait or run; a due time that passes while
        that many do is taken by the next frame."""
        validate_question(question)
        if not (math.isfinite(every) and every > 0):
            raise SessionError(f"every must be a positive number of seconds, got {every}")
        with self._cond:
            session = self._session(key)
            if watch_id in session.watches:
                raise ValueError(f"session {key} already has a watch {watch_id!r}")
            session.watches[watch_id] = _Watch(watch_id, question, every, on_result, on_error)

    def unwatch(self, key: str, watch_id: str) -> bool:
        """Stop a standing question (an evaluation in flight is cancelled, without a result)."""
        with self._cond:
            session = self._sessions.get(key)
            watch = session.watches.pop(watch_id, None) if session else None
            if watch is None:
                return False
            for request_id in watch.in_flight:
                self._active[request_id].job.cancel()
            return True

    # ----------------------------------------------------------------- views
    def questions(self, key: str) -> int:
        """Questions of the session waiting or being answered (cancelled ones excluded)."""
        with self._cond:
            return self._questions(key)

    def dropped(self, key: str) -> int:
        with self._cond:
            session = self._sessions.get(key)
            if session is None:
                return 0
            return session.dropped + self.scheduler.session(key).frames_dropped

    def pending(self, key: str) -> int:
        """Frames sampled and not yet prefilled."""
        with self._cond:
            session = self._sessions.get(key)
            return len(session.inbox) + len(session.frames) if session else 0

    def settled(self, key: str) -> bool:
        """No frame of the session waits for the model and no slide of its window runs."""
        with self._cond:
            session = self._sessions.get(key)
            if session is None:
                return True
            sliding = session.window is not None and session.window.rebuild is not None
            return not (session.inbox or session.frames or sliding)

    def stats(self, key: str) -> SessionStats | None:
        with self._cond:
            session = self._sessions.get(key)
            if session is None:
                return None
            view = self.scheduler.session(key)
            memory = session.window.memory if session.window else None
            return SessionStats(
                frames=len(session.times),
                kept_tokens=sum(session.kept),
                total_tokens=len(session.times) * session.tokens_per_frame,
                kv_tokens=view.tokens,
                kv_blocks=view.blocks,
                kv_bytes=view.blocks * self.layout.bytes_per_block,
                last_time=session.times[-1] if session.times else None,
                window_start=session.times[0] if session.times else None,
                frames_left=session.window.left if session.window else 0,
                slides=session.window.slides if session.window else 0,
                memory_start=memory.frames[0].time if memory and memory.frames else None,
                memory_frames=len(memory.frames) if memory else 0,
            )

    def session_record(self, key: str) -> _Session:
        """The session's engine record (read it only while the engine is not stepping)."""
        return self._session(key)

    def default_window(self, tokens_per_frame: int, fps: float) -> float:
        """Media seconds of window for a session at this grid and rate: what fits 90% of the
        context with no token pruned (the label takes ~8 tokens), and no more than half of an
        even share of the pool among `EngineConfig.sessions` (a slide holds the old and the
        rebuilt window at once). At least 10 s."""
        per_second = (tokens_per_frame + 8) * fps
        context = 0.9 * self.scheduler.config.max_video_tokens / per_second
        pool_tokens = self.scheduler.kv.pool.num_blocks * self.layout.block_size
        share = pool_tokens / (2 * self.config.sessions) / per_second
        return max(10.0, min(context, share))

    def pool_usage(self) -> tuple[int, int]:
        """(blocks used, blocks total)."""
        with self._cond:
            pool = self.scheduler.pool()
            return pool.blocks_used, pool.blocks_total

    # ------------------------------------------------------------------ steps
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._has_work():
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                ran = self.step()
            except Exception:  # a bug in a step must not kill the engine for every session
                logger.exception("engine step failed")
                ran = False
            if not ran:  # work that cannot run yet: do not spin
                with self._cond:
                    self._cond.wait(0.05)

    def _has_work(self) -> bool:
        if self._inbox or self.scheduler.num_waiting or self.scheduler.num_running:
            return True
        return any(
            s.frames
            or s.inbox
            or s.recalls
            or (s.window is not None and s.window.rebuild is not None)
            for s in self._sessions.values()
        )

    def step(self) -> bool:
        """One step: intake, schedule, execute, sample, update. False if nothing ran."""
        callbacks = _Callbacks()
        with self._cond:
            self._intake(callbacks)
            plan = self.scheduler.schedule()
            inputs = {
                frame_key(prefill.session_id, frame): self._frame_input(prefill.session_id, frame)
                for prefill in plan.frames
                for frame in prefill.frames
            }
            self._report_plan_events(plan, callbacks)  # after: a full session drops the rest
            forks = [self._active[q.request_id] for q in plan.questions]
            if plan.empty:
                self.scheduler.update(StepOutput(plan.step))
        if plan.empty:
            callbacks.run()
            return bool(callbacks.calls)
        started = time.perf_counter()
        for active in forks:
            active.job.started = started
            callbacks.add(active.job.on_start)
        callbacks.run()
        callbacks = _Callbacks()

        sampled: dict[str, int] = {}
        failed: dict[str, str] = {}
        try:
            result = self.runner.execute(plan, inputs)
        except Exception as exc:
            logger.exception("executing step %d failed", plan.step)
            result = None
            failed = {
                item.request_id: f"the model failed: {exc}"
                for item in (*plan.decodes, *plan.questions)
            }
        if result is not None:
            now = time.perf_counter()
            for request_id, logits in result.logits.items():
                active = self._active.get(request_id)
                if active is None:
                    sampled[request_id] = 0  # cancelled while the step ran; update skips it
                    continue
                if active.first_token_at is None:
                    active.first_token_at = now
                    if active.job.on_logits is not None:
                        callbacks.add(active.job.on_logits, logits)
                    if active.watch is not None:
                        active.confidence = self._confidence(logits)
                sampled[request_id] = self._sample(active, logits)
        took = time.perf_counter() - started

        with self._cond:
            self.steps += 1
            self.busy_seconds += took
            self.max_step_seconds = max(self.max_step_seconds, took)
            self._record_frames(plan, inputs, result, took, callbacks)
            for request in self.scheduler.update(StepOutput(plan.step, sampled, failed)):
                self._advance(request, callbacks)
        callbacks.run()
        return True

    def _frame_input(self, session_id: str, frame: Frame) -> FrameInput:
        session = self._sessions[session_id]
        if frame.rebuild:
            assert session.window is not None and session.window.rebuild is not None
            return session.window.rebuild.pop(frame.index)
        return session.frames.pop(frame.index)

    def _questions(self, key: str) -> int:
        session = self._sessions.get(key)
        if session is None:
            return 0
        waiting = sum(1 for k, job in self._inbox if k == key and not job.cancelled.is_set())
        waiting += sum(1 for job, _ in session.recalls if not job.cancelled.is_set())
        running = sum(
            1
            for rid in session.questions
            if rid in self._active and not self._active[rid].job.cancelled.is_set()
        )
        return waiting + running

    def _session(self, key: str) -> _Session:
        session = self._sessions.get(key)
        if session is None:
            raise KeyError(f"session {key} is not open")
        return session

    # ----------------------------------------------------------------- intake
    def _intake(self, callbacks: _Callbacks) -> None:
        """Under the lock: cancels, frames (bounded per session), then new questions."""
        for request_id, active in list(self._active.items()):
            if active.job.cancelled.is_set():
                self._drop_active(request_id)
                self.scheduler.cancel(request_id)
        while self._inbox:
            key, job = self._inbox.popleft()
            if job.cancelled.is_set() or key not in self._sessions:
                continue
            session = self._sessions[key]
            self._take_frames(session, everything=True, callbacks=callbacks)
            if self._recalls(session, job):
                mark = self.scheduler.session(key).frames_admitted
                session.recalls.append((job, mark))
            else:
                self._add_question(key, job, callbacks)
        for session in list(self._sessions.values()):
            if session.recalls:
                self._start_recalls(session, callbacks)
        for session in self._sessions.values():
            self._take_frames(session, everything=False, callbacks=callbacks)

    def _take_frames(self, session: _Session, *, everything: bool, callbacks: _Callbacks) -> None:
        if not session.inbox or session.pruner is None or session.full_reason is not None:
            return
        room = (
            len(session.inbox)
            if everything
            else self.config.max_pending_frames - len(session.frames)
        )
        if room <= 0:
            return
        taken = [session.inbox.popleft() for _ in range(min(room, len(session.inbox)))]
        images = torch.from_numpy(np.stack([image for image, _ in taken]))
        pruned = session.pruner(images)
        per_frame = session.height * session.width // self.runner.patch_size**2
        admitted = self.scheduler.session(session.session_id).frames_admitted
        # One device sync for the batch, and only when a standing question needs it.
        changed = (
            (pruned.distance > session.pruner.threshold).any(dim=1).tolist()
            if session.watches
            else []
        )
        for i, (_, t) in enumerate(taken):
            keep = pruned.keep[i]
            session.pending_text += self.prompt.frame_label(admitted + i, t)
            kept = int(keep.sum())
            label_ids: tuple[int, ...] = ()
            if kept:
                label_ids = tuple(self._tokenize(session.pending_text))
                session.pending_text = ""
            try:
                frame = self.scheduler.add_frame(
                    session.session_id, t, len(label_ids) + kept if kept else 0
                )
            except Refused as exc:
                self._close_frames(session, str(exc), callbacks)
                return
            window = session.window
            anchor = window is not None and t >= window.next_anchor
            if anchor:
                window.next_anchor = t + window.slide_seconds
            session.frames[frame.index] = FrameInput(
                label_ids=label_ids,
                patches=pruned.patches[i * per_frame : (i + 1) * per_frame],
                gh=session.height // self.runner.patch_size,
                gw=session.width // self.runner.patch_size,
                keep=keep,
                anchor=anchor,
            )
            if session.watches:
                self._due_watches(session, t, changed[i], callbacks)

    def _add_question(
        self, key: str, job: QuestionJob, callbacks: _Callbacks, watch: _Watch | None = None
    ) -> str | None:
        """Fork a question off the session's video admitted so far; its request id, or None
        when it is refused (job.on_error is told)."""
        session = self._sessions[key]
        try:
            question = validate_question(job.question)
            ids = self._tokenize(session.pending_text + self.prompt.question_text(question))
            room = self.scheduler.config.answer_reserve_tokens - len(ids) + 1
            params = job.params
            if room >= 1 and params.max_new_tokens > room:
                params = replace(params, max_new_tokens=room)  # the answer reserve is the limit
            request_id = f"q{next(self._ids)}"
            request = self.scheduler.add_request(request_id, key, ids, params, self.stop_ids)
        except (SessionError, Refused) as exc:
            callbacks.add(job.on_error, SessionError(str(exc)))
            return None
        penalty = params.repetition_penalty
        generator = torch.Generator(device=self.runner.device)
        generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self._active[request_id] = _Active(
            request=request,
            job=job,
            penalty=self.default_repetition_penalty if penalty is None else penalty,
            generator=generator,
            watch=watch,
        )
        (session.questions if watch is None else session.probes).add(request_id)
        return request_id

    def _due_watches(
        self, session: _Session, t: float, changed: bool, callbacks: _Callbacks
    ) -> None:
        """After a frame at media time `t` is admitted: start (or skip) the evaluations due."""
        for watch in session.watches.values():
            watch.changed |= changed
            if watch.next_due == -math.inf:
                watch.next_due = t  # due times: the first frame's, then every `every` seconds
            if len(watch.in_flight) >= MAX_PROBES_IN_FLIGHT or t < watch.next_due - _TIME_EPS:
                continue
            # The next due time on that grid after t: a frame that comes late brings no burst,
            # and frames whose period does not divide `every` keep its rate.
            passed = math.floor((t - watch.next_due + _TIME_EPS) / watch.every) + 1
            watch.next_due += passed * watch.every
            unchanged = not watch.changed and watch.confidence is not None
            # A skipped result repeats the last confidence: only once no evaluation is pending.
            if self.config.skip_unchanged and unchanged and not watch.in_flight:
                self.probes_skipped += 1
                probe = Probe(watch.watch_id, t, watch.confidence, evaluated=False)
                callbacks.add(watch.on_result, probe)
                continue
            job = QuestionJob(
                watch.question,
                _PROBE_PARAMS,
                on_start=_nothing,
                on_token=_ignore,
                on_done=_ignore,
                on_error=watch.on_error,
            )
            request_id = self._add_question(session.session_id, job, callbacks, watch)
            if request_id is not None:
                watch.in_flight.add(request_id)
                watch.changed = False

    # ------------------------------------------------------------------ memory
    def _recalls(self, session: _Session, job: QuestionJob) -> bool:
        """Whether a question is answered over recalled older frames + the window."""
        memory = session.window.memory if session.window is not None else None
        if job.memory == "window" or memory is None or not memory.frames:
            return False
        return job.memory == "recall" or wants_memory(job.question)

    def _start_recalls(self, session: _Session, callbacks: _Callbacks) -> None:
        """Start the recalling questions whose frames are prefilled (not during a slide)."""
        if session.window is not None and session.window.rebuild is not None:
            return
        view = self.scheduler.session(session.session_id)
        waiting = []
        for job, mark in session.recalls:
            if job.cancelled.is_set():
                continue
            if view.frames_prefilled + view.frames_dropped < mark:
                waiting.append((job, mark))
                continue
            self._recall(session, job, callbacks)
        session.recalls = waiting

    def _recall(self, session: _Session, job: QuestionJob, callbacks: _Callbacks) -> None:
        """Answer over the older frames that best match the question, then the window, as one
        context of its own: prefilled again from cached features (the vision tower never runs
        again), the frames in time order with their original time labels."""
        window = session.window
        assert window is not None
        try:
            question = validate_question(job.question)
        except SessionError as exc:
            callbacks.add(job.on_error, exc)
            return
        chosen = self._select(session, self._tokenize(question))
        if not chosen:  # nothing fits beside the window: the window alone answers
            self._add_question(session.session_id, job, callbacks)
            return
        key = f"{session.session_id}#recall{next(self._ids)}"
        try:
            self.scheduler.add_session(key)
        except Refused as exc:  # the pool cannot hold it now: the window alone answers
            logger.warning("session %s: answering without recall: %s", session.session_id, exc)
            self._add_question(session.session_id, job, callbacks)
            return
        context = _Session(key, deque(maxlen=1), "")
        self._sessions[key] = context
        frames = [(r.time, r.features) for r in chosen] + [
            (t, held.kept)
            for t, held in zip(session.times, window.held, strict=True)
            if held.kept is not None
        ]
        pending = self.prompt.prefix
        try:
            for position, (t, features) in enumerate(frames):
                ids = tuple(self._tokenize(pending + self.prompt.frame_label(position, t)))
                pending = ""
                frame = self.scheduler.add_frame(key, t, len(ids) + int(features.shape[0]))
                context.frames[frame.index] = FrameInput(label_ids=ids, features=features)
        except Refused as exc:  # the context is fuller than estimated: the window alone answers
            logger.warning("session %s: answering without recall: %s", session.session_id, exc)
            self._close_context(key)
            self._add_question(session.session_id, job, callbacks)
            return
        request_id = self._add_question(key, job, callbacks)
        if request_id is None:
            self._close_context(key)
            return
        active = self._active[request_id]
        active.parent, active.recalled = session.session_id, tuple(r.time for r in chosen)
        context.questions.discard(request_id)
        session.questions.add(request_id)

    def _select(self, session: _Session, question_ids: list[int]) -> list[_Recalled]:
        """The remembered frames most like the question (recall_scores), as many as
        `recall_frames` and the context allow, in time order."""
        assert session.window is not None and session.window.memory is not None
        remembered = list(session.window.memory.frames)
        if not remembered or not question_ids:
            return []
        with torch.inference_mode():
            query = self.runner.embed_tokens(question_ids).float().cpu()
        scores = recall_scores([r.features for r in remembered], query)
        video = self.scheduler.session(session.session_id).tokens
        room = self.scheduler.config.max_video_tokens - video
        chosen: list[_Recalled] = []
        for i in torch.argsort(scores, descending=True).tolist():
            need = int(remembered[i].features.shape[0]) + _LABEL_TOKENS
            if len(chosen) == self.config.recall_frames:
                break
            if need <= room:
                chosen.append(remembered[i])
                room -= need
        return sorted(chosen, key=lambda r: r.time)

    def _close_context(self, key: str) -> None:
        """Forget a recalling question's own context (its blocks go back to the pool)."""
        if self._sessions.pop(key, None) is not None:
            self.scheduler.close_session(key)

    # ---------------------------------------------------------------- results
    def _report_plan_events(self, plan: StepPlan, callbacks: _Callbacks) -> None:
        for full in plan.full:
            session = self._sessions.get(full.session_id)
            if session is None:
                continue
            session.frames.clear()  # the scheduler dropped them; _close_frames empties the inbox
            if full.reason is FullReason.CONTEXT:
                message = (
                    f"session context is full ({self.scheduler.session(full.session_id).tokens} "
                    f"of {self.max_model_len} tokens); lower --fps or raise --prune-threshold"
                )
            else:
                message = "the KV cache pool has no room for more of this session's frames"
            self._close_frames(session, message, callbacks)
        for request_id in plan.failed:
            active = self._drop_active(request_id)
            if active is not None:
                callbacks.add(active.job.on_error, SessionError("the session has no frames"))

    def _close_frames(self, session: _Session, message: str, callbacks: _Callbacks) -> None:
        if session.full_reason is not None:
            return
        session.full_reason = message
        session.inbox.clear()
        if session.callbacks is not None:
            callbacks.add(session.callbacks.on_error, SessionError(message))

    def _record_frames(
        self,
        plan: StepPlan,
        inputs: dict[FrameKey, FrameInput],
        result: StepResult | None,
        took: float,
        callbacks: _Callbacks,
    ) -> None:
        for prefill in plan.frames:
            session = self._sessions.get(prefill.session_id)
            if session is None:
                continue
            if result is None:
                self._close_frames(session, "the model failed on this session's frames", callbacks)
                continue
            if prefill.session_id in plan.rebuilt:
                self._finish_slide(session)  # live frames of this prefill follow the window
            live = [frame for frame in prefill.frames if not frame.rebuild]
            kept = 0
            for frame in live:
                item = inputs[frame_key(prefill.session_id, frame)]
                n = item.kept if frame.tokens else 0
                session.times.append(frame.time)
                session.kept.append(n)
                if n:
                    session.prompt_ids += [*item.label_ids, *[self.video_token_id] * n]
                kept += n
                if session.window is not None:
                    key = (prefill.session_id, frame.index)
                    features = result.features.get(key) if n else None
                    full = result.full.get(key)
                    session.window.held.append(
                        _Held(
                            frame.index,
                            None if features is None else features.to("cpu"),
                            None if full is None else full.to("cpu"),
                        )
                    )
            if live and session.callbacks is not None:
                appended = AppendResult(
                    frames=len(live),
                    kept_tokens=kept,
                    total_tokens=len(live) * session.tokens_per_frame,
                    seconds=took,
                )
                callbacks.add(session.callbacks.on_appended, appended)
            if session.window is not None:
                self._maybe_slide(session)

    # ------------------------------------------------------------------ window
    def _maybe_slide(self, session: _Session) -> None:
        """Start a slide when the window spans its seconds, or its tokens near the context."""
        window = session.window
        assert window is not None
        if window.rebuild is not None or session.full_reason is not None or not session.times:
            return
        tokens = self.scheduler.session(session.session_id).tokens
        span = session.times[-1] - session.times[0]
        near_full = tokens > 0.9 * self.scheduler.config.max_video_tokens
        if span < window.seconds and not near_full:
            return
        # The window starts at an anchor; it slides to the next one, or further when frames
        # came faster than slides (many in one step): to the first that brings it under its
        # seconds again.
        anchors = [i for i, h in enumerate(window.held) if i and h.full is not None]
        if not anchors:
            return
        newest = session.times[-1]
        start = next(
            (i for i in anchors if newest - session.times[i] < window.seconds), anchors[-1]
        )
        self._start_slide(session, start)

    def _start_slide(self, session: _Session, start: int) -> None:
        """Rebuild the window from frame `start` of `held`: the frame's full features first, as
        a forward over the window alone has them, then the others' kept features, labels
        tokenized as one prompt over these frames."""
        window = session.window
        assert window is not None
        held = window.held[start:]
        times = session.times[start:]
        pending = self.prompt.prefix
        layout: list[tuple[int, float, int]] = []  # (index, time, tokens) of frames with tokens
        inputs: dict[int, FrameInput] = {}
        kept: list[int] = []
        prompt_ids: list[int] = []
        for position, (frame, t) in enumerate(zip(held, times, strict=True)):
            features = frame.full if position == 0 else frame.kept
            n = 0 if features is None else int(features.shape[0])
            pending += self.prompt.frame_label(position, t)
            kept.append(n)
            if not n:
                # It adds no token: its label is in the next frame's text, or (the last ones)
                # in what live frames and questions were tokenized with already.
                continue
            ids = tuple(self._tokenize(pending))
            pending = ""
            inputs[frame.index] = FrameInput(label_ids=ids, features=features)
            prompt_ids += [*ids, *[self.video_token_id] * n]
            layout.append((frame.index, t, len(ids) + n))
        try:
            self.scheduler.slide(session.session_id, layout)
        except Refused as exc:
            logger.debug("session %s cannot slide yet: %s", session.session_id, exc)
            return
        window.rebuild = inputs
        first = _Held(held[0].index, held[0].full, held[0].full)  # shows all of its tokens now
        window.after = (times, kept, prompt_ids, [first, *held[1:]])

    def _finish_slide(self, session: _Session) -> None:
        window = session.window
        assert window is not None and window.after is not None
        leaving = len(session.times) - len(window.after[0])
        if window.memory is not None:
            for t, held in zip(session.times[:leaving], window.held[:leaving], strict=True):
                if held.kept is not None:
                    window.memory.add(t, held.kept)
        window.left += leaving
        session.times, session.kept, session.prompt_ids, window.held = window.after
        window.after, window.rebuild = None, None
        window.slides += 1
        for watch in session.watches.values():
            watch.changed = True  # the video is another one now: evaluate again

    def _advance(self, request: Request, callbacks: _Callbacks) -> None:
        active = self._active.get(request.request_id)
        if active is None:
            return
        if active.watch is not None:
            self._probe_done(active, request, callbacks)
            return
        job = active.job
        if request.status is RequestStatus.FINISHED_ERROR:
            self._drop_active(request.request_id)
            callbacks.add(job.on_error, SessionError(request.error or "the answer failed"))
            return
        if request.status is RequestStatus.FINISHED_CANCELLED:
            self._drop_active(request.request_id)
            return
        ids = list(request.output_ids)
        delta = text_delta(self.tokenizer, request)
        if delta:
            active.emitted += delta
            callbacks.add(job.on_token, delta)
        if not request.status.finished:
            return
        self._drop_active(request.request_id)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text.startswith(active.emitted) and len(text) > len(active.emitted):
            callbacks.add(job.on_token, text[len(active.emitted) :])  # held-back characters
        end = request.stream_position or 0.0
        now = time.perf_counter()
        started = job.started or now
        answer = Answer(
            question=job.question,
            text=text,
            token_ids=ids,
            segments=parse_segments(text, stream_start=0.0, stream_end=end),
            stream_position=end,
            prefill_seconds=(active.first_token_at or now) - started,
            total_seconds=now - started,
            recalled=active.recalled,
        )
        callbacks.add(job.on_done, answer)

    def _probe_done(self, active: _Active, request: Request, callbacks: _Callbacks) -> None:
        """A standing question's evaluation ended: its confidence to the watch, blocks freed."""
        if not request.status.finished:
            return  # max_new_tokens is 1: it finishes in the step it forks
        watch = active.watch
        assert watch is not None
        self._drop_active(request.request_id)
        if request.status is RequestStatus.FINISHED_CANCELLED:
            return
        if request.status is RequestStatus.FINISHED_ERROR or active.confidence is None:
            callbacks.add(watch.on_error, SessionError(request.error or "the evaluation failed"))
            return
        self.probes_run += 1
        watch.confidence = active.confidence
        started = active.job.started or active.job.submitted
        probe = Probe(
            watch.watch_id,
            request.stream_position or 0.0,
            active.confidence,
            evaluated=True,
            seconds=time.perf_counter() - started,
        )
        callbacks.add(watch.on_result, probe)

    def _confidence(self, logits: torch.Tensor) -> float:
        """P(yes) / (P(yes) + P(no)) = sigmoid(logsumexp(yes logits) - logsumexp(no logits))."""
        logits = logits.float()
        yes = torch.logsumexp(logits[self._yes_index.to(logits.device)], 0)
        no = torch.logsumexp(logits[self._no_index.to(logits.device)], 0)
        return float(torch.sigmoid(yes - no))

    def _drop_active(self, request_id: str) -> _Active | None:
        active = self._active.pop(request_id, None)
        if active is not None:
            session = self._sessions.get(active.request.session_id)
            if session is not None:
                session.questions.discard(request_id)
                session.probes.discard(request_id)
            if active.watch is not None:
                active.watch.in_flight.discard(request_id)
            if active.parent is not None:
                parent = self._sessions.get(active.parent)
                if parent is not None:
                    parent.questions.discard(request_id)
                self._close_context(active.request.session_id)
        return active

    # --------------------------------------------------------------- sampling
    def _sample(self, active: _Active, logits: torch.Tensor) -> int:
        if active.seen is not None:
            logits = penalize(logits, active.seen, active.penalty)
        token = choose(logits, active.request.params, active.generator)
        if active.penalty != 1.0:
            if active.seen is None:
                active.seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            active.seen[token] = True
        return token

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]


# ----------------------------------------------------------------------- helpers
_LABEL_TOKENS = 12
"""Room counted for a recalled frame's `Time t:` label when filling the context."""
_NOW = re.compile(
    r"\b(now|currently|current|right now|at the moment|at present|still|live|latest|newest)\b",
    re.IGNORECASE,
)
MAX_PROBES_IN_FLIGHT = 8
"""Evaluations of one standing question waiting or running at once."""
_TIME_EPS = 1e-6
"""Media-time slack for due times (frame times are floats)."""
_PROBE_PARAMS = SamplingParams(max_new_tokens=1, temperature=0.0, repetition_penalty=1.0)
"""A standing question's evaluation: one greedy token; its logits give the confidence."""


def _nothing() -> None:
    pass


def _ignore(_: object) -> None:
    pass


def _yes_no_ids(tokenizer: object) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The first tokens of "Yes"/"yes"/" Yes"/" yes" and of the same spellings of no, less
    the ones both share (a tokenizer may split " Yes" into a space token and "Yes")."""

    def first_tokens(word: str) -> set[int]:
        found = set()
        for text in (word, word.lower(), " " + word, " " + word.lower()):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            if ids:
                found.add(ids[0])
        return found

    yes, no = first_tokens("Yes"), first_tokens("No")
    yes, no = yes - no, no - yes
    if not yes or not no:
        raise ValueError("the tokenizer has no distinct first tokens for yes and no")
    return tuple(sorted(yes)), tuple(sorted(no))


def text_delta(tokenizer: object, request: Request) -> str:
    """The answer's new text since the last call, decoding only a short window per token.

    Re-decoding the whole answer per token is O(n^2). Decoding from the request's
    `prefix_offset` (the last emitted boundary) keeps byte-level merges and spacing right; a
    trailing U+FFFD means a UTF-8 character is still incomplete, so it waits for the next token.
    """
    decode = tokenizer.decode  # type: ignore[attr-defined]
    ids = request.output_ids
    before = decode(ids[request.prefix_offset : request.read_offset], skip_special_tokens=True)
    after = decode(ids[request.prefix_offset :], skip_special_tokens=True)
    if len(after) <= len(before) or after.endswith("\ufffd"):
        return ""
    request.prefix_offset, request.read_offset = request.read_offset, len(ids)
    return after[len(before) :]


_SCORE_FRAMES = 256
"""Remembered frames scored at once (bounds the similarity matrix a recall builds)."""


def recall_scores(frames: Sequence[torch.Tensor], query: torch.Tensor) -> torch.Tensor:
    """(F,) how well each remembered frame matches a question: for every question token, the
    best cosine between its input embedding and any of the frame's visual tokens, summed over
    the question's tokens.

    The best token rather than the frame's mean: an object covers a few of a frame's tokens, and
    a mean is mostly background (measured with the trained tiny model on held-out scenes: the
    frames ranked first show the asked object at R-precision 0.96 against 0.91 for the cosine of
    mean vectors; docs/benchmarks.md). Visual tokens and word embeddings share one space in
    VideoLLaMA3 (the projector feeds the LLM's input).
    """
    words = F.normalize(query.float(), dim=-1)
    out = torch.empty(len(frames))
    for first in range(0, len(frames), _SCORE_FRAMES):
        group = frames[first : first + _SCORE_FRAMES]
        tokens = F.normalize(torch.cat(list(group)).float(), dim=-1)
        owner = torch.repeat_interleave(torch.tensor([len(f) for f in group]))
        best = torch.full((len(group), len(words)), -1.0).scatter_reduce(
            0, owner[:, None].expand(-1, len(words)), tokens @ words.T, "amax"
        )
        out[first : first + len(group)] = best.sum(-1)
    return out


def wants_memory(question: str) -> bool:
    """How a question is routed when it leaves it to the engine (`memory="auto"`): about the
    present ("now", "currently", "still", ...) -> the window alone; anything else -> the
    frames that left the window are searched too."""
    return _NOW.search(question) is None


def validate_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise SessionError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise SessionError(
            f"the question has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}"
        )
    return question


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: the logits of tokens already in the
    answer are divided by `penalty` when positive, multiplied when negative.

    Only the answer's tokens count, not the prompt's: the original VideoLLaMA3 `generate` hands
    transformers `inputs_embeds` without `input_ids`, so the processor sees only the generated
    ids. Video placeholders, frame labels and the question are never penalized.
    """
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """Greedy at temperature 0; else temperature, top-k, top-p, then a draw from `gen`."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop tokens once the mass before them already exceeds top_p (keeps at least one).
        drop = probs.cumsum(-1) - probs > params.top_p
        scores = scores.scatter(0, order[drop], -math.inf)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def _stop_ids(tokenizer, generation_config) -> frozenset[int]:
    ids = {tokenizer.eos_token_id}
    eos = generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos])
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return frozenset(i for i in ids if i is not None)
