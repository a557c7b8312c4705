"""The live service's core: sessions by id, their sources, the model scheduler, the registry.

The ASGI app (stream/app.py) is a thin HTTP/websocket layer over this object; everything here
runs on the event loop except model work (the scheduler's thread) and pull decoding (one thread
per pull source).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from livelens.model.runner import ModelRunner
from livelens.model.scheduler import Scheduler
from livelens.stream.errors import SourceError
from livelens.stream.grid import DEFAULT_TOKENS_PER_FRAME, MIN_TOKENS_PER_FRAME
from livelens.stream.live import LiveSession, SessionSettings, State, iso
from livelens.stream.metrics import Metrics
from livelens.stream.protocol import PullRequest
from livelens.stream.registry import (
    LIVE_STATES,
    Registry,
    SessionRecord,
    validate_session_id,
)
from livelens.stream.sources.file import DecodedFrame
from livelens.stream.sources.pull import PullConfig, PullSource, SourceEvent
from livelens.stream.thumbnails import DEFAULT_CAPACITY

logger = logging.getLogger(__name__)


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
    thumbnails: int = DEFAULT_CAPACITY
    """JPEG thumbnails each session keeps of its newest sampled frames (served by REST)."""
    max_sessions: int = 16
    """Live sessions this node accepts; more are refused with 503."""
    status_interval_s: float = 2.0
    """Seconds between status messages, registry heartbeats and metric refreshes."""
    redis_url: str | None = "redis://localhost:6379/0"
    redis_retry_s: float = 2.0
    """Seconds between reconnection attempts while Redis is unreachable."""
    node: str = field(default_factory=default_node)
    ended_retention_s: float = 600.0
    """How long an ended session keeps its KV cache for late questions."""
    pull: PullConfig = field(default_factory=PullConfig)

    def __post_init__(self) -> None:
        # Refused here rather than as an "unsupported frame size" ending every session.
        if self.tokens_per_frame < MIN_TOKENS_PER_FRAME:
            raise ValueError(
                f"tokens_per_frame must be >= {MIN_TOKENS_PER_FRAME}, got {self.tokens_per_frame}"
            )


class ServiceError(Exception):
    """A request the service refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class LiveService:
    """Owns every live session of this node."""

    def __init__(self, runner: ModelRunner, config: ServiceConfig | None = None) -> None:
        self.runner = runner
        self.config = config or ServiceConfig()
        self.scheduler = Scheduler(max_pending_frames=self.config.max_pending_frames)
        self.metrics = Metrics()
        self.sessions: dict[str, LiveSession] = {}
        self.pulls: dict[str, PullSource] = {}
        self.registry: Registry | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = time.time()
        self._status_task: asyncio.Task[None] | None = None
        self.closers: dict[str, Callable[[str], Awaitable[object]]] = {}
        """By session kind: how to stop a push source, e.g. {"whip": ingest.delete}."""

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
        self.scheduler.start()
        self._status_task = asyncio.create_task(self._status_loop(), name="livelens-status")

    async def stop(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._status_task
        for session_id, source in list(self.pulls.items()):
            await asyncio.to_thread(source.stop)
            self.pulls.pop(session_id, None)
        # Sessions that ended earlier had their final record written then (and the registry
        # may have forgotten them since): only the ones ending now are written here.
        ending = [s for s in self.sessions.values() if s.state < State.ENDED]
        for session in ending:
            session.finish("server shutting down")
        await asyncio.sleep(0)  # let the state announcements run
        for session in ending:
            await self._sync_record(session)
        await asyncio.to_thread(self.scheduler.stop)
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
        live = sum(s.state < State.ENDED for s in self.sessions.values())
        if live >= self.config.max_sessions:
            raise ServiceError(
                503,
                "too_many_sessions",
                f"this node holds {live} live sessions, its limit; try again later",
            )
        settings = SessionSettings(
            fps=fps or self.config.fps,
            prune_threshold=(
                self.config.prune_threshold if prune_threshold is None else prune_threshold
            ),
            tokens_per_frame=self.config.tokens_per_frame,
            thumbnails=self.config.thumbnails,
        )
        session = LiveSession(
            session_id,
            kind=kind,
            source=source,
            runner=self.runner,
            scheduler=self.scheduler,
            settings=settings,
            loop=self.loop,
            on_history=self.registry.append_history,
            on_state=self._state_changed,
            metrics=self.metrics,
        )
        self.sessions[session.id] = session
        self._spawn(self.registry.register(self._record(session)))
        logger.info("session %s opened (%s: %s)", session.id, kind, source)
        return session

    def open_whip(self, source: str) -> LiveSession:
        """The WHIP endpoint's session opener."""
        try:
            return self.open_session("whip", source)
        except ServiceError as exc:
            raise RuntimeError(exc.message) from None

    async def open_pull(
        self, request: PullRequest, *, session_id: str | None = None
    ) -> LiveSession:
        """Start pulling `request.source` in a thread; errors in the URL are refused here.

        session_id: a fixed id (see open_session), refused while another node holds a live
        session by that id.
        """
        if session_id is not None:
            await self._check_unclaimed(session_id)
        config = PullConfig(
            reconnect_initial_s=self.config.pull.reconnect_initial_s,
            reconnect_max_s=self.config.pull.reconnect_max_s,
            give_up_after_s=self.config.pull.give_up_after_s,
            open_timeout_s=self.config.pull.open_timeout_s,
            realtime=request.realtime,
            loop=request.loop,
        )
        assert self.loop is not None
        loop = self.loop
        target: list[LiveSession] = []  # the session, once the source is known to be valid

        def on_frame(frame: DecodedFrame) -> None:
            target[0].push(frame)

        def on_event(event: SourceEvent) -> None:
            loop.call_soon_threadsafe(self._pull_event, target[0], event)

        try:
            source = PullSource(request.source, on_frame=on_frame, on_event=on_event, config=config)
        except (SourceError, ValueError) as exc:  # a URL or path we cannot pull
            raise ServiceError(400, "bad_source", str(exc)) from None
        session = self.open_session(
            "pull",
            request.source,
            fps=request.fps,
            prune_threshold=request.prune_threshold,
            session_id=session_id,
        )
        target.append(session)
        self.pulls[session.id] = source
        source.start()
        return session

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
            session.finish(event.message, True)
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
        session.finish("deleted through the API")
        source = self.pulls.pop(session_id, None)
        if source is not None:
            await asyncio.to_thread(source.stop)
        closer = self.closers.get(session.kind)
        if closer is not None:
            await closer(session_id)
        session.release_model()
        await asyncio.sleep(0)
        await self._sync_record(session)
        self.sessions.pop(session_id, None)
        return True

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
            stats=_stats(session),
            updated=iso(time.time()),
        )

    def _state_changed(self, session: LiveSession) -> None:
        self._spawn(self._sync_record(session))

    async def _sync_record(self, session: LiveSession) -> None:
        assert self.registry is not None
        await self.registry.update(
            session.id, state=session.state.label, reason=session.reason, stats=_stats(session)
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_failure)

    # --------------------------------------------------------------- status
    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            try:
                await self.status_tick()
            except Exception:
                logger.exception("status update failed")

    async def status_tick(self) -> None:
        """Push status to watchers, refresh the registry and the gauges, expire old KV."""
        assert self.registry is not None
        now = time.time()
        counts = dict.fromkeys(("starting", "live", "ended", "failed"), 0)
        kv = 0
        for session in list(self.sessions.values()):
            counts[session.state.label] += 1
            if session.session is not None:
                kv += session.session.kv_bytes()
            status = session.status()
            for watcher in list(session.watchers):
                watcher.send(status)
            if session.state < State.ENDED:
                await self.registry.update(session.id, stats=_stats(session, status))
            elif (
                session.ended_at is not None
                and session.session is not None
                and now - session.ended_at > self.config.ended_retention_s
            ):
                logger.info("session %s: releasing its KV cache (ended long ago)", session.id)
                session.release_model()
        for state, n in counts.items():
            self.metrics.sessions.labels(state).set(n)
        self.metrics.kv_bytes.set(kv)
        self.metrics.redis_connected.set(1 if self.registry.connected else 0)


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
