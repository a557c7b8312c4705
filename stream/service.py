"""The live service's core: sessions by id, their sources, the model scheduler, the registry.

The ASGI app (stream/app.py) is a thin HTTP/websocket layer over this object; everything here
runs on the event loop except model work (the engine's thread) and pull decoding (one thread
per pull source).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from livelens.model.engine import Engine, EngineConfig
from livelens.model.kv import DEFAULT_KV_BUDGET
from livelens.model.runner import ModelRunner
from livelens.model.scheduler import Refusal, Refused
from livelens.stream.alerts import DEFAULT_MAX_ALERTS, AlertManager
from livelens.stream.errors import ServiceError, SourceError
from livelens.stream.frames import DecodedFrame, Source
from livelens.stream.grid import DEFAULT_TOKENS_PER_FRAME, MIN_TOKENS_PER_FRAME
from livelens.stream.lifecycle import EndCode
from livelens.stream.limits import LimitsConfig
from livelens.stream.live import LiveSession, SessionSettings, State, iso
from livelens.stream.metrics import Metrics
from livelens.stream.protocol import PullRequest
from livelens.stream.registry import (
    LIVE_STATES,
    Registry,
    SessionRecord,
    validate_session_id,
)
from livelens.stream.sources.policy import PullTarget, SourcePolicy, SourceRefused, operator_target
from livelens.stream.sources.pull import PullConfig, PullSource, SourceEvent
from livelens.stream.thumbnails import DEFAULT_CAPACITY
from livelens.stream.webhooks import WebhookPolicy, WebhookSender

logger = logging.getLogger(__name__)

DRAINING_MESSAGE = "the server is shutting down and admits no new work; try another node"
SOURCE_FAILED = "the source could not be read (the server log has the details)"
"""The reason a failed network pull session gives clients."""
SOURCE_UNREADABLE = "the source could not be opened (the server log has the details)"
"""The answer to a POST whose source does not open, whatever the cause."""
# How much longer than the source's own open timeout a POST waits for the first open.
_OPEN_GRACE_S = 2.0


def default_node() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class ServiceConfig:
    fps: float = 1.0
    """Frames sampled per media second, unless a session asks for another rate."""
    prune_threshold: float = 0.1
    """DiffFP threshold (mean pixel change x255); live cameras need ~4 to prune anything."""
    tokens_per_frame: int = DEFAULT_TOKENS_PER_FRAME
    """Merged visual tokens per frame before pruning; at least MIN_TOKENS_PER_FRAME (16)."""
    max_pending_frames: int = 8
    """Sampled frames a session may have waiting for the model before the oldest is dropped."""
    window_s: float | None = None
    """Media seconds of video each session's model holds (older frames slide out); None: derived
    per session from the context and the KV pool (`Engine.default_window`)."""
    memory_s: float = 600.0
    """Media seconds of stream before the window kept in host memory for questions about the
    past (0: none)."""
    kv_budget: str = DEFAULT_KV_BUDGET
    """KV cache pool: bytes (`8GiB`) or a fraction of the device memory free after loading the
    model (`0.8`). A session is admitted only if the pool can hold its minimum."""
    thumbnails: int = DEFAULT_CAPACITY
    """JPEG thumbnails each session keeps of its newest sampled frames (served by REST)."""
    max_sessions: int = 16
    """Live sessions this node accepts; more are refused with 503."""
    status_interval_s: float = 2.0
    """Seconds between status messages, registry heartbeats and metric refreshes."""
    stall_after_s: float = 5.0
    """Seconds without a decoded frame after which a live session shows `stalled` (checked on
    each status tick). Below WHIP's 10 s disconnect grace, so a dead publisher is seen stalled
    before its session ends."""
    redis_url: str | None = "redis://localhost:6379/0"
    redis_retry_s: float = 2.0
    """Seconds between reconnection attempts while Redis is unreachable."""
    node: str = field(default_factory=default_node)
    pull: PullConfig = field(default_factory=PullConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Sessions held, questions queued, retention of ended sessions (and the HTTP limits)."""
    sources: SourcePolicy = field(default_factory=SourcePolicy)
    """Where network-given pull sources may lead (hosts, local files, trusted CAs)."""
    webhooks: WebhookPolicy = field(default_factory=WebhookPolicy)
    """Where alert webhooks may be sent (nothing by default)."""
    max_alerts_per_session: int = DEFAULT_MAX_ALERTS

    def __post_init__(self) -> None:
        # Refused here rather than as an "unsupported frame size" ending every session.
        if self.tokens_per_frame < MIN_TOKENS_PER_FRAME:
            raise ValueError(
                f"tokens_per_frame must be >= {MIN_TOKENS_PER_FRAME}, got {self.tokens_per_frame}"
            )
        if not self.stall_after_s > 0:
            raise ValueError(f"stall_after_s must be > 0, got {self.stall_after_s}")
        if self.max_alerts_per_session < 0:
            raise ValueError(
                f"max_alerts_per_session must be >= 0, got {self.max_alerts_per_session}"
            )
        if self.limits.max_held_sessions < self.max_sessions:
            raise ValueError(
                f"limits.max_held_sessions ({self.limits.max_held_sessions}) must be >= "
                f"max_sessions ({self.max_sessions})"
            )


class SessionRefused(RuntimeError):
    """A WHIP publication the service cannot take; `code` is the machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LiveService:
    """Owns every live session of this node."""

    def __init__(self, runner: ModelRunner, config: ServiceConfig | None = None) -> None:
        self.runner = runner
        self.config = config or ServiceConfig()
        self._engine: Engine | None = None
        """Made by start(): its KV pool is sized from the memory free once the model is loaded."""
        self.metrics = Metrics()
        self.sessions: dict[str, LiveSession] = {}
        self.sources: dict[str, Source] = {}
        """What feeds each session this node holds (a pull thread or a WHIP publication); closed
        when the session reaches a final state, whoever ended it."""
        self.registry: Registry | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = time.time()
        self._status_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.draining = False
        """Set by drain(): no new sessions or questions are admitted."""
        self._alerts: AlertManager | None = None
        self._webhooks: WebhookSender | None = None
        self.frame_workers = ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="livelens-frames"
        )
        """Resize + thumbnail of every session's sampled frames (stream/stages.py)."""

    @property
    def alerts(self) -> AlertManager:
        if self._alerts is None:
            raise RuntimeError("the service has not started")
        return self._alerts

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the service has not started")
        return self._engine

    def pool_status(self) -> dict[str, int] | None:
        """The KV pool's occupancy (None before start)."""
        if self._engine is None:
            return None
        used, total = self._engine.pool_usage()
        size = self._engine.layout.bytes_per_block
        return {
            "blocks_used": used,
            "blocks_total": total,
            "block_tokens": self._engine.layout.block_size,
            "bytes_used": used * size,
            "bytes_total": total * size,
        }

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.registry = await Registry.open(
            self.config.redis_url,
            node=self.config.node,
            heartbeat_s=self.config.status_interval_s,
            ttl_s=max(15.0, 5 * self.config.status_interval_s),
            retry_s=self.config.redis_retry_s,
        )
        self._engine = Engine(
            self.runner,
            EngineConfig(
                kv_budget=self.config.kv_budget,
                max_pending_frames=self.config.max_pending_frames,
                sessions=self.config.max_sessions,
            ),
        )
        self._engine.start()
        self._webhooks = WebhookSender(self.config.webhooks)
        await self._webhooks.start()
        self._alerts = AlertManager(
            registry=self.registry,
            webhooks=self.config.webhooks,
            sender=self._webhooks,
            max_alerts=self.config.max_alerts_per_session,
            metrics=self.metrics,
        )
        self._status_task = asyncio.create_task(self._status_loop(), name="livelens-status")

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting sessions and questions, let queued questions finish for up to
        timeout_s, then fail the rest; every question ends in the history either way."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        logger.info("draining: %d questions to finish in %g s", self._questions(), timeout_s)
        while self._questions() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        failed = sum(
            session.fail_questions("draining", "the server shut down before answering")
            for session in self.sessions.values()
        )
        if failed:
            logger.warning("draining: %d questions failed unanswered", failed)
        writes = [t for s in self.sessions.values() for t in s.history_writes]
        await asyncio.gather(*writes, return_exceptions=True)

    def _questions(self) -> int:
        """Questions waiting or being answered on this node."""
        return sum(len(w.jobs) for s in self.sessions.values() for w in s.watchers)

    async def stop(self) -> None:
        if self._status_task is not None:
            # Cancelled, and also told to stop: a cancellation that lands inside a Redis
            # command can be swallowed by the client library (seen as a shutdown that hung for
            # good under load); the loop then ends at its next turn, which is waited for.
            self._stopping = True
            self._status_task.cancel()
            await asyncio.wait({self._status_task}, timeout=self.config.status_interval_s + 5)
        for session_id, source in list(self.sources.items()):
            await source.close("server shutting down")
            self.sources.pop(session_id, None)
        # Sessions that ended earlier had their final record written then (and the registry
        # may have forgotten them since): only the ones ending now are written here.
        ending = [s for s in self.sessions.values() if s.state < State.ENDED]
        for session in ending:
            session.finish("server shutting down", code=EndCode.SERVER_SHUTDOWN)
        await asyncio.sleep(0)  # let the state announcements run
        for session in ending:
            await self._sync_record(session)
        await asyncio.to_thread(self.frame_workers.shutdown, wait=True, cancel_futures=True)
        if self._engine is not None:
            await asyncio.to_thread(self._engine.stop)
        if self._webhooks is not None:
            await self._webhooks.close()
        if self.registry is not None:
            await self.registry.close()

    # -------------------------------------------------------------- sessions
    def open_session(
        self,
        kind: str,
        source: str,
        *,
        fps: float | None = None,
        prune_threshold: float | None = None,
        window_s: float | None = None,
        memory_s: float | None = None,
        session_id: str | None = None,
    ) -> LiveSession:
        """Create a live session (on the loop); its source then pushes frames into it.

        session_id: a fixed id chosen by the operator (`serve --demo`), never by a network
        client; default a random one.
        """
        assert self.loop is not None and self.registry is not None, "service not started"
        if session_id is None:
            session_id = uuid.uuid4().hex
        elif validate_session_id(session_id) in self.sessions:
            raise ServiceError(409, "session_exists", f"session {session_id!r} already exists")
        if self.draining:
            raise ServiceError(503, "draining", DRAINING_MESSAGE)
        live = sum(s.state < State.ENDED for s in self.sessions.values())
        if live >= self.config.max_sessions:
            self.metrics.sessions_refused.labels("too_many_sessions").inc()
            raise ServiceError(
                503,
                "too_many_sessions",
                f"this node holds {live} live sessions, its limit; try again later",
            )
        memory = self._memory(memory_s)  # refused before anything is admitted
        self._make_room()
        self._admit(session_id)
        limits = self.config.limits
        settings = SessionSettings(
            fps=fps or self.config.fps,
            prune_threshold=(
                self.config.prune_threshold if prune_threshold is None else prune_threshold
            ),
            tokens_per_frame=self.config.tokens_per_frame,
            window_s=window_s or self.config.window_s,
            memory_s=memory,
            thumbnails=self.config.thumbnails,
            max_questions=limits.max_questions_per_session,
            max_questions_per_watcher=limits.max_questions_per_connection,
        )
        session = LiveSession(
            session_id,
            kind=kind,
            source=source,
            engine=self.engine,
            settings=settings,
            loop=self.loop,
            on_history=self.registry.append_history,
            on_state=self._state_changed,
            metrics=self.metrics,
            # A WHIP track is read on the event loop: its frames are converted elsewhere.
            executor=self.frame_workers if kind == "whip" else None,
        )
        self.sessions[session.id] = session
        self._spawn(self._register(session))
        logger.info("session %s opened (%s: %s)", session.id, kind, source)
        return session

    async def _register(self, session: LiveSession) -> None:
        """Publish a new session, then give it back the alerts Redis keeps for its id."""
        assert self.registry is not None
        await self.registry.register(self._record(session))
        restored = await self.alerts.restore(session)
        if restored:
            logger.info("session %s: %d alerts restored from redis", session.id, restored)

    def _memory(self, asked: float | None) -> float:
        """A session's memory: the server's --memory, or less when a client asks for less; more
        is refused (host memory is the operator's to give)."""
        if asked is None:
            return self.config.memory_s
        if asked > self.config.memory_s:
            raise ServiceError(
                422,
                "memory_too_large",
                f"memory of {asked:g} s asked; this server keeps at most "
                f"{self.config.memory_s:g} s (--memory)",
            )
        return asked

    def _admit(self, session_id: str) -> None:
        """Promise the session its minimum of KV blocks, or refuse it with 503.

        Running sessions are never evicted to make room; ended ones (kept only so their video
        can still be asked about) are freed, oldest first, before a new session is refused.
        """
        ended = sorted(
            (s for s in self.sessions.values() if s.ended_at is not None),
            key=lambda s: s.ended_at or 0.0,
        )
        while True:
            try:
                self.engine.open_session(session_id)
                return
            except Refused as exc:
                if exc.reason is not Refusal.KV_POOL_EXHAUSTED or not ended:
                    self.metrics.sessions_refused.labels(exc.reason.value).inc()
                    raise ServiceError(
                        503, exc.reason.value, f"{exc}; try again later or another node"
                    ) from None
                self._forget(ended.pop(0), "its KV blocks were needed by a new session")

    def open_whip(
        self,
        source: str,
        publication: Callable[[str], Source],
        window_s: float | None = None,
        memory_s: float | None = None,
    ) -> LiveSession:
        """The WHIP endpoint's session opener (`window_s`, `memory_s` from the WHIP URL's
        `?window=` and `?memory=`);
        `publication(session_id)` is the publisher as a `Source` the service closes when the
        session ends."""
        try:
            session = self.open_session("whip", source, window_s=window_s, memory_s=memory_s)
        except ServiceError as exc:
            raise SessionRefused(exc.code, exc.message) from None
        self.sources[session.id] = publication(session.id)
        return session

    def _make_room(self) -> None:
        """Free the oldest ended sessions while the node holds max_held_sessions or more."""
        excess = len(self.sessions) - self.config.limits.max_held_sessions + 1
        if excess <= 0:
            return
        ended = sorted(
            (s for s in self.sessions.values() if s.ended_at is not None),
            key=lambda s: s.ended_at or 0.0,
        )
        for session in ended[:excess]:
            self._forget(session, "the node holds too many sessions")

    def _forget(self, session: LiveSession, why: str) -> None:
        """Drop an ended session from memory (KV cache, thumbnails); Redis keeps its record and
        history. Its source was stopped when it ended (_stop_source)."""
        logger.info("session %s freed: %s", session.id, why)
        self.sessions.pop(session.id, None)
        self.alerts.forget(session.id)
        session.release_model()

    async def open_pull(
        self, request: PullRequest, *, session_id: str | None = None, operator: bool = False
    ) -> LiveSession:
        """Start pulling `request.source` in a thread; sources the policy refuses are refused here.

        session_id: a fixed id (see open_session), refused while another node holds a live
        session by that id. operator: the source comes from the operator (`serve --demo`), not
        from the network: syntax checked, not limited to the allowed hosts and media root.
        """
        if session_id is not None:
            await self._check_unclaimed(session_id)
        self._memory(request.memory)  # refused before the source is opened
        checked = await self._target(request.source, operator=operator)
        config = PullConfig(
            reconnect_initial_s=self.config.pull.reconnect_initial_s,
            reconnect_max_s=self.config.pull.reconnect_max_s,
            give_up_after_s=self.config.pull.give_up_after_s,
            open_timeout_s=self.config.pull.open_timeout_s,
            realtime=request.realtime,
            loop=request.loop,
        )
        assert self.loop is not None
        handoff = _Handoff(self.loop, self._pull_event)
        source = PullSource(
            checked, on_frame=handoff.on_frame, on_event=handoff.on_event, config=config
        )
        source.start()
        try:
            # Checked up front: a source that cannot be opened is refused now, instead of
            # leaving a session "starting" until the give-up time.
            try:
                first = await asyncio.wait_for(handoff.first, config.open_timeout_s + _OPEN_GRACE_S)
            except TimeoutError:
                first = None
            if first is None or first.kind != "connected":
                raise ServiceError(422, "source_unreadable", SOURCE_UNREADABLE)
            session = self.open_session(
                "pull",
                source.name,
                fps=request.fps,
                prune_threshold=request.prune_threshold,
                window_s=request.window,
                memory_s=request.memory,
                session_id=session_id,
            )
        except BaseException:  # refused, or the request was cancelled: no session, no source
            handoff.detach()
            await asyncio.to_thread(source.stop)
            raise
        self.sources[session.id] = source
        handoff.attach(session)
        return session

    async def _target(self, source: str, *, operator: bool) -> PullTarget:
        """The checked source (DNS is resolved in a thread); ServiceError if refused."""
        policy = self.config.sources
        try:
            if operator:
                return operator_target(source, policy.ca_file)
            return await asyncio.to_thread(policy.check, source)
        except SourceRefused as exc:
            raise ServiceError(exc.status, exc.code, exc.message) from None
        except SourceError as exc:  # the operator's own source: the exact reason
            raise ServiceError(422, "bad_source", str(exc)) from None

    async def _check_unclaimed(self, session_id: str) -> None:
        """ServiceError 409 if another node's live session has this id in the registry."""
        assert self.registry is not None
        record = await self.registry.get(validate_session_id(session_id))
        if record is not None and record.node != self.config.node and record.state in LIVE_STATES:
            raise ServiceError(
                409,
                "session_exists",
                f"session {session_id!r} is live on node {record.node} (the record of a node "
                f"that stopped expires {self.registry.ttl_s:g} s after its last heartbeat)",
            )

    def _pull_event(self, session: LiveSession, event: SourceEvent) -> None:
        if event.kind == "failed":
            source = self.sources.get(session.id)
            # Which way a network source failed (refused, timed out, not media) would tell a
            # client which ports are open: the record says only that it failed; the source
            # logged the details.
            generic = source is not None and source.is_network
            session.finish(SOURCE_FAILED if generic else event.message, True)
        elif event.kind == "ended":
            session.finish(event.message)
        elif event.kind == "gap" and event.gap is not None:
            session.gaps.append(event.gap)
            logger.info("session %s: gap %.2f-%.2f s", session.id, *event.gap)
        else:
            logger.info("session %s: %s: %s", session.id, event.kind, event.message)

    def get(self, session_id: str) -> LiveSession | None:
        return self.sessions.get(session_id)

    async def delete(self, session_id: str) -> bool:
        """End a session this node holds and free its model state; history stays."""
        session = self.sessions.get(session_id)
        if session is None:
            return False
        # Finished first, so the record says why, not what stopping the source reports.
        reason = "deleted through the API"
        session.finish(reason, code=EndCode.DELETED)
        await self._stop_source(session, reason)
        self.alerts.session_ended(session)
        self.alerts.forget(session_id)
        session.release_model()
        await asyncio.sleep(0)
        await self._sync_record(session)
        self.sessions.pop(session_id, None)
        return True

    async def _stop_source(self, session: LiveSession, reason: str) -> None:
        """Close what feeds a session (`Source.close`: its pull thread, or its WHIP publisher).

        Called whenever a session reaches a final state, whoever ended it: a session that
        fails on the server's side must not leave its publisher's connection open.
        """
        source = self.sources.pop(session.id, None)
        if source is not None:
            await source.close(reason)

    async def record(self, session_id: str) -> dict[str, Any] | None:
        session = self.sessions.get(session_id)
        if session is not None:
            return self.describe(session)
        assert self.registry is not None
        record = await self.registry.get(session_id)
        return None if record is None else record.to_json()

    async def records(self) -> list[dict[str, Any]]:
        assert self.registry is not None
        local = {sid: self.describe(s) for sid, s in self.sessions.items()}
        others = [r.to_json() for r in await self.registry.list() if r.id not in local]
        return [*local.values(), *others]

    def describe(self, session: LiveSession) -> dict[str, Any]:
        return self._record(session).to_json()

    def _record(self, session: LiveSession) -> SessionRecord:
        return SessionRecord(
            id=session.id,
            node=self.config.node,
            kind=session.kind,
            source=session.source,
            state=session.state.label,
            created=iso(session.created),
            reason=session.reason,
            end_code=session.end_code,
            stats=_stats(session),
            updated=iso(time.time()),
        )

    def _state_changed(self, session: LiveSession) -> None:
        self._spawn(self._sync_record(session))
        if session.state >= State.ENDED:
            if self._alerts is not None:
                self._alerts.session_ended(session)
            self._spawn(self._stop_source(session, session.reason or "session ended"))

    async def _sync_record(self, session: LiveSession) -> None:
        assert self.registry is not None
        await self.registry.update(
            session.id,
            state=session.state.label,
            reason=session.reason,
            end_code=session.end_code,
            stats=_stats(session),
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_failure)

    # --------------------------------------------------------------- status
    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            if self._stopping:
                return
            try:
                await self.status_tick()
            except Exception:
                logger.exception("status update failed")

    async def status_tick(self) -> None:
        """Push status to watchers, refresh the registry and the gauges, expire old KV."""
        assert self.registry is not None
        now = time.time()
        counts = dict.fromkeys((s.label for s in State), 0)
        kv = 0
        for session in list(self.sessions.values()):
            session.check_stalled(self.config.stall_after_s)
            counts[session.state.label] += 1
            # Asked before the snapshot: once an ended session is settled nothing changes it.
            settled = session.state >= State.ENDED and self.engine.settled(session.id)
            status = session.status()
            kv += status["kv_bytes"]
            for watcher in list(session.watchers):
                watcher.send(status)
            if session.state < State.ENDED or not session.final_stats:
                # An ended session's model may still be prefilling its last frames (or sliding
                # its window): its record follows until the engine is done with it.
                await self.registry.update(session.id, stats=_stats(session, status))
                session.final_stats = settled
            elif (
                session.ended_at is not None
                and now - session.ended_at > self.config.limits.ended_retention_s
            ):
                self._forget(session, "its retention after the end ran out")
        for state, n in counts.items():
            self.metrics.sessions.labels(state).set(n)
        self.metrics.kv_bytes.set(kv)
        used, total = self.engine.pool_usage()
        self.metrics.kv_blocks.labels("used").set(used)
        self.metrics.kv_blocks.labels("total").set(total)
        self.metrics.engine_steps.set(self.engine.steps)
        self.metrics.engine_busy.set(self.engine.busy_seconds)
        self.metrics.redis_connected.set(1 if self.registry.connected else 0)


class _Handoff:
    """Links a pull source's thread to its session, which is created once the source opened.

    The first event resolves `first`. Until attach() frames wait (the decode thread blocks for
    the few milliseconds the session takes to open) and events are kept; after detach() (the
    POST was refused) frames and events are dropped.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[LiveSession, SourceEvent], None],
    ) -> None:
        self.loop = loop
        self.first: asyncio.Future[SourceEvent] = loop.create_future()
        self._deliver = on_event
        self._session: LiveSession | None = None
        self._pending: list[SourceEvent] = []
        self._settled = threading.Event()

    def on_frame(self, frame: DecodedFrame) -> None:
        self._settled.wait()
        if self._session is not None:
            self._session.push(frame)

    def on_event(self, event: SourceEvent) -> None:
        self.loop.call_soon_threadsafe(self._event, event)

    def _event(self, event: SourceEvent) -> None:
        if not self.first.done():
            self.first.set_result(event)
        if self._session is not None:
            self._deliver(self._session, event)
        elif not self._settled.is_set():
            self._pending.append(event)

    def attach(self, session: LiveSession) -> None:
        """On the loop: the session exists; kept events reach it, then frames flow."""
        self._session = session
        for event in self._pending:
            self._deliver(session, event)
        self._pending.clear()
        self._settled.set()

    def detach(self) -> None:
        """The source was refused: nothing reaches a session."""
        self._pending.clear()
        self._settled.set()


STATS_KEYS = (
    "frames_received",
    "frames_sampled",
    "frames_dropped",
    "frames_in_model",
    "kept_ratio",
    "kv_tokens",
    "live_edge",
    "stream_position",
    "lag",
    "window_start",
    "window_end",
    "memory_start",
)
"""The status fields a session's registry record keeps (plus its gaps)."""


def _stats(session: LiveSession, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """The registry's stats of a session, from its status message (computed if not given)."""
    status = status or session.status()
    stats = {k: status[k] for k in STATS_KEYS}
    stats["gaps"] = [list(g) for g in session.gaps]
    return stats


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background registry call failed", exc_info=task.exception())
