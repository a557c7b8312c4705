"""Session registry and answer history: Redis is the system of record, in-process while it is down.

Redis layout (every key under ``livelens:``):

- ``livelens:session:{id}``: HASH with node, kind, source, state, created, updated, reason
  ("" for none) and stats (JSON). A live session's hash is rewritten by its node's heartbeat
  with a TTL of ``ttl_s``, so a crashed node's sessions expire; an ended or failed session's
  hash is written once more and kept for ``retention_s``.
- ``livelens:sessions``: ZSET index of session ids scored by creation time; list() drops the
  ids whose hash has expired.
- ``livelens:history:{id}``: STREAM, one entry per question/answer, field ``entry`` holding the
  JSON and ``uid`` a writer-unique id that makes re-flushing idempotent. Its TTL is
  ``retention_s``, refreshed while the session is live and counted from the end afterwards.

When Redis cannot be reached the registry keeps working from its in-process copy: writes are
buffered per session, a background task retries, and on reconnection this node's live sessions
(and the final state of those that ended meanwhile) are re-registered and the buffered history is
flushed in order. If Redis came back empty (restarted without persistence), the last
``mirror_len`` entries of every session this node still holds are written back, keeping their
original stream ids where possible; older entries of that session are lost with Redis's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from livelens.stream.lifecycle import FINAL_STATES, LIVE_STATES
from livelens.stream.redact import mask_url

logger = logging.getLogger(__name__)

KEY_PREFIX = "livelens"
INDEX_KEY = f"{KEY_PREFIX}:sessions"
# LIVE_STATES: the states a node heartbeats (the hash expires ttl_s after the node stops);
# FINAL_STATES: kept for retention_s, never left again.

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Every failure talking to Redis means "disconnected: buffer and retry". RedisError covers
# ConnectionError/TimeoutError and server-side refusals (READONLY after a failover, OOM);
# OSError covers socket errors that escape redis-py, asyncio's TimeoutError included.
_REDIS_ERRORS = (RedisError, OSError)
_FLUSH_CHUNK = 500
"""History entries per MULTI/EXEC while flushing a buffer."""

# Drops index ids whose hash is gone, atomically, so a session re-registered between list()'s
# read and this call keeps its index entry. KEYS = index, hash...; ARGV = ids.
_PRUNE_INDEX = """
for i, id in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then redis.call('ZREM', KEYS[1], id) end
end
return 0
"""


def validate_session_id(session_id: str) -> str:
    """Return the id if it is safe inside a Redis key ([A-Za-z0-9_-]{1,64}), else ValueError."""
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise ValueError(f"invalid session id {session_id!r}: expected [A-Za-z0-9_-]{{1,64}}")
    return session_id


def session_key(session_id: str) -> str:
    """Key of a session's hash."""
    return f"{KEY_PREFIX}:session:{validate_session_id(session_id)}"


def history_key(session_id: str) -> str:
    """Key of a session's history stream (for consumers that XREAD it)."""
    return f"{KEY_PREFIX}:history:{validate_session_id(session_id)}"


def alerts_key(session_id: str) -> str:
    """Key of a session's alert definitions (hash: alert id -> JSON)."""
    return f"{KEY_PREFIX}:alerts:{validate_session_id(session_id)}"


def alert_events_key(session_id: str) -> str:
    """Key of a session's alert events stream (for consumers that XREAD it)."""
    return f"{KEY_PREFIX}:alert-events:{validate_session_id(session_id)}"


MAX_ALERT_EVENTS = 10000
"""Alert events a session's stream keeps (approximately: XADD MAXLEN ~)."""
MAX_PENDING_ALERT_EVENTS = 1000
"""Alert events a session buffers while Redis is unreachable (the oldest are dropped)."""


def utc_now() -> str:
    """Current time as ISO-8601 UTC with milliseconds, the format of created/updated."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _epoch(iso: str) -> float:
    """Seconds since the epoch of an ISO-8601 time; a time without offset is taken as UTC."""
    stamp = datetime.fromisoformat(iso)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def _created_order(record: SessionRecord) -> tuple[float, str]:
    """Sort key: creation time (unparseable ones first), then id."""
    try:
        return _epoch(record.created), record.id
    except ValueError:
        return 0.0, record.id


def _stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class SessionRecord:
    """What the registry knows about one session, as stored in its Redis hash."""

    id: str
    node: str
    """Name of the node that holds the session."""
    kind: str
    """How media arrives: "whip" (pushed over WebRTC) or "pull" (read from a URL)."""
    source: str
    state: str
    """"starting" | "live" | "stalled" | "full" | "ended" | "failed"."""
    created: str
    """ISO-8601 UTC."""
    reason: str | None = None
    """Why a session ended or failed, for people."""
    end_code: str | None = None
    """Why, for programs: an `EndCode` value (stream/lifecycle.py), once the session is over."""
    stats: dict[str, Any] = field(default_factory=dict)
    """JSON-able counters the node reports (frames, tokens, ...)."""
    updated: str | None = None
    """ISO-8601 UTC of the last write (heartbeat or update)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of every field (stats copied)."""
        return dataclasses.asdict(self)

    def to_hash(self) -> dict[str, str]:
        """The Redis hash fields."""
        return {
            "node": self.node,
            "kind": self.kind,
            "source": self.source,
            "state": self.state,
            "created": self.created,
            "updated": self.updated or self.created,
            "reason": self.reason or "",
            "end_code": self.end_code or "",
            "stats": json.dumps(self.stats, separators=(",", ":"), allow_nan=False),
        }

    @classmethod
    def from_hash(cls, session_id: str, fields: dict[str, str]) -> SessionRecord:
        """Rebuild a record from its Redis hash fields."""
        return cls(
            id=session_id,
            node=fields.get("node", ""),
            kind=fields.get("kind", ""),
            source=fields.get("source", ""),
            state=fields.get("state", ""),
            created=fields.get("created", ""),
            reason=fields.get("reason") or None,
            end_code=fields.get("end_code") or None,
            stats=json.loads(fields.get("stats") or "{}"),
            updated=fields.get("updated") or None,
        )

    def copy(self) -> SessionRecord:
        return dataclasses.replace(self, stats=json.loads(json.dumps(self.stats)))


@dataclass
class _Entry:
    """One history entry as this node holds it."""

    uid: str
    """Writer-unique; how a flush tells whether Redis already has the entry."""
    data: str
    """The entry as JSON."""
    id: str
    """Stream id, or "local-N" until it reaches Redis."""
    stored: bool
    """Whether `id` is a real stream id."""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, **json.loads(self.data)}


@dataclass
class _Local:
    """A session this node holds: the authoritative copy while Redis is unreachable."""

    record: SessionRecord
    mirror: deque[_Entry]
    """Recent entries Redis has (bounded): written back if Redis comes back empty."""
    pending: list[_Entry] = field(default_factory=list)
    """Entries not yet in Redis, in order; never dropped."""
    dirty: bool = False
    """The record changed while Redis was unreachable."""
    ended_at: float | None = None
    """time.time() when the session reached a final state."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Serialises this session's Redis writes, so they land in the order they were made."""
    alerts: dict[str, str] | None = None
    """The session's alert definitions (id -> JSON) once changed here; None: never touched."""
    alerts_dirty: bool = False
    """The definitions changed while Redis was unreachable: rewritten whole on reconnection."""
    alert_events: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_ALERT_EVENTS))
    """Alert events (JSON) not yet in Redis, in order (bounded: the oldest are dropped)."""

    @property
    def live(self) -> bool:
        return self.record.state in LIVE_STATES

    @property
    def unsynced(self) -> bool:
        """Something of the session waits to be written to Redis."""
        return bool(self.pending or self.dirty or self.alerts_dirty or self.alert_events)


class Registry:
    """Sessions of every node and their question/answer history; see the module docstring."""

    def __init__(
        self,
        url: str | None,
        *,
        node: str,
        heartbeat_s: float = 5.0,
        ttl_s: float = 15.0,
        retention_s: float = 7 * 86400,
        retry_s: float = 2.0,
        mirror_len: int = 256,
        keep_ended: int = 64,
    ) -> None:
        """Use Registry.open(); this only checks and stores the settings.

        mirror_len: recent entries kept per session to restore a Redis that lost its data.
        keep_ended: ended sessions kept in-process (for get/history while Redis is down).
        """
        if not node:
            raise ValueError("node must be a non-empty name")
        if not 0 < heartbeat_s < ttl_s:
            raise ValueError(f"need 0 < heartbeat_s < ttl_s, got {heartbeat_s} and {ttl_s}")
        if retention_s <= 0 or retry_s <= 0 or mirror_len < 0 or keep_ended < 0:
            raise ValueError("retention_s and retry_s must be > 0, mirror_len and keep_ended >= 0")
        self.url = url
        self.node = node
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self.retention_s = retention_s
        self.retry_s = retry_s
        self.mirror_len = mirror_len
        self.keep_ended = keep_ended
        self._shown_url = mask_url(url) if url else ""
        self._client: aioredis.Redis | None = None
        self._online = False
        self._announced = False  # whether "redis is up" was the last thing the log said
        self._run_id: str | None = None
        self._local: dict[str, _Local] = {}
        self._boot = secrets.token_hex(4)
        self._seq = 0
        self._local_ids = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str | None, *, node: str, **settings: float) -> Registry:
        """Connect to Redis at `url` (None: in-process only); never fails for an unreachable one.

        `settings` are the constructor's keyword arguments (heartbeat_s, ttl_s, retention_s,
        retry_s, mirror_len, keep_ended), checked there.
        """
        self = cls(url, node=node, **settings)  # type: ignore[arg-type]
        if url is None:
            return self
        # No client-side retries: a failure must surface at once so writes get buffered,
        # and short timeouts keep a dead Redis from stalling the event loop.
        self._client = aioredis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            await self._restore()
        except _REDIS_ERRORS as exc:
            logger.warning(
                "redis at %s unreachable (%s); running single-node with an in-process registry",
                self._shown_url,
                exc,
            )
        else:
            self._announced = True
            logger.debug("registry on redis at %s (node %s)", self._shown_url, node)
        self._task = asyncio.create_task(self._maintain(), name=f"registry-{node}")
        return self

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """True while Redis is reachable and everything buffered has been written to it."""
        return self._online

    # ----------------------------------------------------------------------------- sessions

    async def register(self, record: SessionRecord) -> None:
        """Start holding a session on this node and publish it."""
        validate_session_id(record.id)
        self._check_state(record.state)
        if record.node != self.node:
            raise ValueError(f"record.node is {record.node!r} but this registry is {self.node!r}")
        if record.id in self._local:
            raise ValueError(f"session {record.id} is already registered")
        _epoch(record.created)  # ValueError now rather than at the first write
        own = record.copy()
        own.updated = own.updated or utc_now()
        own.to_hash()  # stats must be JSON-able
        local = _Local(own, deque(maxlen=self.mirror_len))
        if own.state in FINAL_STATES:
            local.ended_at = time.time()
        self._local[own.id] = local
        async with local.lock:
            await self._publish(local)
        self._prune_ended()

    async def update(
        self,
        session_id: str,
        *,
        state: str | None = None,
        reason: str | None = None,
        end_code: str | None = None,
        stats: dict[str, Any] | None = None,
    ) -> None:
        """Change a session this node holds; None leaves a field as it is, stats are replaced."""
        local = self._held(session_id)
        record = local.record
        if state is not None:
            self._check_state(state)
            if record.state in FINAL_STATES and state != record.state:
                raise ValueError(
                    f"session {session_id} is {record.state}; it cannot become {state}"
                )
        if stats is not None:
            json.dumps(stats, allow_nan=False)  # TypeError/ValueError before anything changes
        async with local.lock:
            if state is not None:
                if state in FINAL_STATES and local.ended_at is None:
                    local.ended_at = time.time()
                record.state = state
            if reason is not None:
                record.reason = reason
            if end_code is not None:
                record.end_code = end_code
            if stats is not None:
                record.stats = json.loads(json.dumps(stats))
            record.updated = utc_now()
            await self._publish(local)
        self._prune_ended()

    async def get(self, session_id: str) -> SessionRecord | None:
        """A session of this node (its own copy) or of any node (from Redis); None if unknown."""
        validate_session_id(session_id)
        local = self._local.get(session_id)
        if local is not None:
            return local.record.copy()
        if not self._online or self._client is None:
            return None
        try:
            fields = await self._client.hgetall(session_key(session_id))
        except _REDIS_ERRORS as exc:
            self._go_offline(exc)
            return None
        return SessionRecord.from_hash(session_id, fields) if fields else None

    async def list(self) -> list[SessionRecord]:
        """Every node's sessions (Redis) and this node's own, oldest first."""
        found: dict[str, SessionRecord] = {}
        if self._online and self._client is not None:
            try:
                found = await self._list_redis(self._client)
            except _REDIS_ERRORS as exc:
                self._go_offline(exc)
                found = {}
        self._prune_ended()
        for session_id, local in self._local.items():
            found[session_id] = local.record.copy()
        return sorted(found.values(), key=_created_order)

    async def _list_redis(self, client: aioredis.Redis) -> dict[str, SessionRecord]:
        ids: list[str] = await client.zrange(INDEX_KEY, 0, -1)
        found: dict[str, SessionRecord] = {}
        gone: list[str] = []
        async with client.pipeline(transaction=False) as pipe:
            for session_id in ids:
                pipe.hgetall(f"{KEY_PREFIX}:session:{session_id}")
            hashes = await pipe.execute()
        for session_id, fields in zip(ids, hashes, strict=True):
            if fields:
                found[session_id] = SessionRecord.from_hash(session_id, fields)
            else:
                gone.append(session_id)
        if gone:
            keys = [INDEX_KEY, *(f"{KEY_PREFIX}:session:{s}" for s in gone)]
            await client.eval(_PRUNE_INDEX, len(keys), *keys, *gone)
        return found

    # ------------------------------------------------------------------------------ history

    async def append_history(self, session_id: str, entry: dict[str, Any]) -> str:
        """Add a question/answer entry to a session of this node; returns its stream id.

        While Redis is unreachable the id is "local-N"; history() shows the real one once the
        entry is flushed. The key "id" is reserved for that and may not be in `entry`.
        """
        local = self._held(session_id)
        if "id" in entry:
            raise ValueError("history entries may not have an 'id' key; the registry assigns it")
        data = json.dumps(entry, separators=(",", ":"), allow_nan=False)
        self._seq += 1
        uid = f"{self.node}:{self._boot}:{self._seq}"
        async with local.lock:
            if self._online and self._client is not None and not local.pending:
                key = history_key(session_id)
                try:
                    async with self._client.pipeline(transaction=True) as pipe:
                        pipe.xadd(key, {"entry": data, "uid": uid})
                        pipe.pexpire(key, self._retention_ms(local))
                        stream_id, _ = await pipe.execute()
                except _REDIS_ERRORS as exc:
                    # The XADD may or may not have landed; the uid settles it at flush time.
                    self._go_offline(exc)
                else:
                    local.mirror.append(_Entry(uid, data, stream_id, stored=True))
                    return str(stream_id)
            self._local_ids += 1
            buffered = _Entry(uid, data, f"local-{self._local_ids}", stored=False)
            local.pending.append(buffered)
            return buffered.id

    async def history(self, session_id: str, *, count: int | None = None) -> list[dict[str, Any]]:
        """Entries oldest first, each with its "id"; `count` keeps only the most recent ones.

        From Redis for any node's session; while Redis is unreachable, this node's in-process
        copy (the last mirror_len stored entries plus everything buffered).
        """
        validate_session_id(session_id)
        if count is not None and count <= 0:
            return []
        if self._online and self._client is not None:
            try:
                if count is None:
                    rows = await self._client.xrange(history_key(session_id))
                else:
                    rows = await self._client.xrevrange(history_key(session_id), count=count)
                    rows.reverse()
            except _REDIS_ERRORS as exc:
                self._go_offline(exc)
            else:
                return [
                    {"id": stream_id, **json.loads(fields["entry"])}
                    for stream_id, fields in rows
                    if "entry" in fields
                ]
        local = self._local.get(session_id)
        if local is None:
            return []
        entries = [*local.mirror, *local.pending]
        if count is not None:
            entries = entries[-count:]
        return [e.to_dict() for e in entries]

    # ------------------------------------------------------------------------------- alerts

    async def save_alerts(self, session_id: str, alerts: dict[str, dict[str, Any]]) -> None:
        """Replace a held session's alert definitions (id -> JSON-able definition)."""
        local = self._held(session_id)
        local.alerts = {
            alert_id: json.dumps(d, separators=(",", ":"), allow_nan=False)
            for alert_id, d in alerts.items()
        }
        async with local.lock:
            local.alerts_dirty = True
            if self._online and self._client is not None:
                try:
                    await self._write_alerts(self._client, local)
                except _REDIS_ERRORS as exc:
                    self._go_offline(exc)

    async def load_alerts(self, session_id: str) -> dict[str, dict[str, Any]]:
        """A session's alert definitions: this node's copy if it changed them, else Redis's
        ({} when Redis is unreachable)."""
        local = self._local.get(validate_session_id(session_id))
        if local is not None and local.alerts is not None:
            return {k: json.loads(v) for k, v in local.alerts.items()}
        if not self._online or self._client is None:
            return {}
        try:
            fields = await self._client.hgetall(alerts_key(session_id))
        except _REDIS_ERRORS as exc:
            self._go_offline(exc)
            return {}
        found: dict[str, dict[str, Any]] = {}
        for alert_id, data in fields.items():
            try:
                found[alert_id] = json.loads(data)
            except ValueError:
                logger.warning("session %s: unreadable alert %s in redis", session_id, alert_id)
        return found

    async def append_alert_event(self, session_id: str, event: dict[str, Any]) -> None:
        """Add an event to a held session's alert stream (buffered while Redis is down)."""
        local = self._held(session_id)
        data = json.dumps(event, separators=(",", ":"), allow_nan=False)
        async with local.lock:
            local.alert_events.append(data)
            if self._online and self._client is not None:
                try:
                    await self._flush_alert_events(self._client, local)
                except _REDIS_ERRORS as exc:
                    self._go_offline(exc)

    async def alert_events(
        self, session_id: str, *, count: int | None = None
    ) -> list[dict[str, Any]]:
        """A session's alert events, oldest first, each with its stream "id"; `count` keeps the
        most recent. While Redis is unreachable: this node's unwritten ones."""
        validate_session_id(session_id)
        if count is not None and count <= 0:
            return []
        if self._online and self._client is not None:
            key = alert_events_key(session_id)
            try:
                if count is None:
                    rows = await self._client.xrange(key)
                else:
                    rows = list(reversed(await self._client.xrevrange(key, count=count)))
            except _REDIS_ERRORS as exc:
                self._go_offline(exc)
            else:
                return [
                    {"id": stream_id, **json.loads(fields["event"])}
                    for stream_id, fields in rows
                    if "event" in fields
                ]
        local = self._local.get(session_id)
        if local is None:
            return []
        pending = list(local.alert_events)[-count:] if count else list(local.alert_events)
        return [{"id": f"local-{i}", **json.loads(data)} for i, data in enumerate(pending)]

    async def _write_alerts(self, client: aioredis.Redis, local: _Local) -> None:
        key = alerts_key(local.record.id)
        async with client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if local.alerts:
                pipe.hset(key, mapping=local.alerts)
                pipe.pexpire(key, self._retention_ms(local))
            await pipe.execute()
        local.alerts_dirty = False

    async def _flush_alert_events(self, client: aioredis.Redis, local: _Local) -> None:
        if not local.alert_events:
            return
        key = alert_events_key(local.record.id)
        async with client.pipeline(transaction=True) as pipe:
            for data in local.alert_events:
                pipe.xadd(key, {"event": data}, maxlen=MAX_ALERT_EVENTS, approximate=True)
            pipe.pexpire(key, self._retention_ms(local))
            await pipe.execute()
        local.alert_events.clear()

    # -------------------------------------------------------------------------------- close

    async def close(self) -> None:
        """Stop the background task and the client; live sessions are left to expire by TTL.

        Anything still buffered gets one last attempt; a warning says what could not be written.
        """
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if not self._online and self._unsynced():
                self._client = client
                try:
                    await self._restore()
                except _REDIS_ERRORS as exc:
                    entries = sum(len(local.pending) for local in self._local.values())
                    records = sum(local.dirty for local in self._local.values())
                    logger.warning(
                        "closing without redis at %s (%s): %d history entries and %d session "
                        "states were not written",
                        self._shown_url,
                        exc,
                        entries,
                        records,
                    )
                finally:
                    self._client = None
        finally:
            self._online = False
            await client.aclose()

    # ----------------------------------------------------------------------------- internals

    def _held(self, session_id: str) -> _Local:
        validate_session_id(session_id)
        local = self._local.get(session_id)
        if local is None:
            raise KeyError(f"session {session_id} is not held by node {self.node}")
        return local

    @staticmethod
    def _check_state(state: str) -> None:
        if state not in LIVE_STATES and state not in FINAL_STATES:
            raise ValueError(f"unknown session state {state!r}")

    def _retention_ms(self, local: _Local) -> int:
        """What is left of a session's retention: all of it while live, less time since the end."""
        left = self.retention_s
        if local.ended_at is not None:
            left -= time.time() - local.ended_at
        return max(1, int(left * 1000))

    def _unsynced(self) -> bool:
        return any(local.unsynced for local in self._local.values())

    def _go_offline(self, exc: BaseException) -> None:
        """Switch to buffering after a Redis failure; the background task retries."""
        if not self._online:
            return
        self._online = False
        if self._announced:
            self._announced = False
            logger.warning(
                "redis at %s lost (%s); buffering in-process, retrying every %ss",
                self._shown_url,
                exc,
                self.retry_s,
            )
        self._wake.set()

    async def _publish(self, local: _Local) -> None:
        """Write a record now if Redis is up, else mark it for the next restore (lock held)."""
        if not self._online or self._client is None:
            local.dirty = True
            return
        try:
            await self._write_record(self._client, local)
        except _REDIS_ERRORS as exc:
            local.dirty = True
            self._go_offline(exc)

    async def _write_record(self, client: aioredis.Redis, local: _Local) -> None:
        """The hash (TTL ttl_s while live, remaining retention once ended), index and stream TTL."""
        record = local.record
        key = session_key(record.id)
        retention = self._retention_ms(local)
        async with client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=record.to_hash())
            pipe.pexpire(key, int(self.ttl_s * 1000) if local.live else retention)
            pipe.zadd(INDEX_KEY, {record.id: _epoch(record.created)})
            pipe.pexpire(history_key(record.id), retention)
            pipe.pexpire(alerts_key(record.id), retention)
            pipe.pexpire(alert_events_key(record.id), retention)
            await pipe.execute()
        local.dirty = False

    def _prune_ended(self) -> None:
        """Forget ended sessions past retention, and clean ones beyond the keep_ended newest."""
        now = time.time()
        ended = sorted(
            (local.ended_at, session_id)
            for session_id, local in self._local.items()
            if local.ended_at is not None
        )
        for ended_at, session_id in ended:
            if now - ended_at >= self.retention_s:
                del self._local[session_id]
        clean = [
            session_id
            for _, session_id in ended
            if session_id in self._local and not self._local[session_id].unsynced
        ]
        for session_id in clean[: max(0, len(clean) - self.keep_ended)]:
            del self._local[session_id]

    async def _maintain(self) -> None:
        """Heartbeat while Redis is up; retry every retry_s while it is not."""
        while True:
            if self._online:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.heartbeat_s)
                self._wake.clear()
                if self._online:
                    await self._heartbeat()
            else:
                await asyncio.sleep(self.retry_s)
                try:
                    await self._restore()
                except _REDIS_ERRORS as exc:
                    logger.debug("redis at %s still unreachable: %s", self._shown_url, exc)

    async def _heartbeat(self) -> None:
        """Refresh every live session of this node; restore everything if Redis restarted."""
        assert self._client is not None
        try:
            run_id = await self._server_run_id(self._client)
        except _REDIS_ERRORS as exc:
            self._go_offline(exc)
            return
        if run_id != self._run_id:
            # A restart between two commands goes unseen by the connection pool; Redis may
            # have lost everything, so write it all back.
            logger.warning(
                "redis at %s restarted; restoring this node's sessions and history",
                self._shown_url,
            )
            self._online = False
            self._announced = False
            try:
                await self._restore()
            except _REDIS_ERRORS as exc:
                logger.debug("restore after redis restart failed: %s", exc)
            return
        for local in list(self._local.values()):
            if not local.live:
                continue
            async with local.lock:
                if not local.live or not self._online:
                    continue
                local.record.updated = utc_now()
                try:
                    await self._write_record(self._client, local)
                except _REDIS_ERRORS as exc:
                    local.dirty = True
                    self._go_offline(exc)
                    return

    @staticmethod
    async def _server_run_id(client: aioredis.Redis) -> str:
        info = await client.info("server")
        return str(info["run_id"])

    async def _restore(self) -> None:
        """Bring Redis up to date with this node, then go online; raises on a Redis error.

        Called while offline, so new writes only buffer; passes repeat until nothing is left
        buffered, and going online happens with no await after the last check.
        """
        client = self._client
        assert client is not None
        run_id = await self._server_run_id(client)
        # A different server (or the first contact) may lack anything written before.
        fresh = run_id != self._run_id
        done: set[str] = set()
        registered = flushed = 0
        while True:
            todo = [
                (session_id, local)
                for session_id, local in self._local.items()
                if session_id not in done or local.unsynced
            ]
            if not todo:
                break
            for session_id, local in todo:
                first = session_id not in done
                done.add(session_id)
                async with local.lock:
                    if local.dirty or (first and (local.live or fresh)):
                        await self._write_record(client, local)
                        registered += 1
                    if local.pending or (first and fresh and local.mirror):
                        flushed += await self._flush_history(client, local, resend=first and fresh)
                    if local.alerts_dirty or (fresh and local.alerts):
                        await self._write_alerts(client, local)
                    await self._flush_alert_events(client, local)
        self._run_id = run_id
        self._online = True
        self._wake.clear()
        if not self._announced and self._task is not None:
            logger.info(
                "redis at %s reachable; re-registered %d sessions and flushed %d history entries",
                self._shown_url,
                registered,
                flushed,
            )
        self._announced = True

    async def _flush_history(self, client: aioredis.Redis, local: _Local, *, resend: bool) -> int:
        """Write what Redis lacks of a session's buffered (and, if resend, mirrored) entries.

        Only this node writes the stream, so Redis holds a prefix of our entries: the last one
        it has (matched by uid) splits them into present and missing. Returns entries written.
        """
        key = history_key(local.record.id)
        candidates = [*(local.mirror if resend else ()), *local.pending]
        tail = await client.xrevrange(key, count=len(candidates))
        in_redis = {fields.get("uid"): stream_id for stream_id, fields in tail}
        last_id = _stream_id(tail[0][0]) if tail else (0, 0)
        split = 0
        for i, entry in enumerate(candidates):
            if entry.uid in in_redis:
                split = i + 1
        for entry in candidates[:split]:
            if entry.uid in in_redis:
                entry.id, entry.stored = in_redis[entry.uid], True
        missing = candidates[split:]
        # Re-sent entries keep their stream id when it still sorts after the tail, so readers
        # resuming XREAD from an id they saw neither skip nor repeat entries.
        ids: list[str] = []
        for entry in missing:
            if entry.stored and _stream_id(entry.id) > last_id:
                ids.append(entry.id)
                last_id = _stream_id(entry.id)
            else:
                ids.append("*")
        written = 0
        for start in range(0, len(missing), _FLUSH_CHUNK):
            chunk = missing[start : start + _FLUSH_CHUNK]
            async with client.pipeline(transaction=True) as pipe:
                for entry, wanted in zip(chunk, ids[start : start + _FLUSH_CHUNK], strict=True):
                    pipe.xadd(key, {"entry": entry.data, "uid": entry.uid}, id=wanted)
                pipe.pexpire(key, self._retention_ms(local))
                results = await pipe.execute()
            for entry, stream_id in zip(chunk, results[:-1], strict=True):
                entry.id, entry.stored = str(stream_id), True
            written += len(chunk)
        # Everything buffered is in Redis now: it joins the mirror in order.
        for entry in local.pending:
            local.mirror.append(entry)
        local.pending.clear()
        return written
