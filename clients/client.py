"""`LiveLensClient`: the server's REST API and question websocket from Python (docs/clients.md).

Questions are checked before they are sent by the server's own parser (stream/protocol.py,
torch-free), so the client refuses exactly what the server would, with the same codes.

Async first (httpx for REST, the `websockets` package for questions); `BlockingClient` runs the
same client on a private event loop in a daemon thread, so scripts and notebooks (whose own loop
is already running) can call it without `await`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from livelens.stream.lifecycle import FINAL_STATES
from livelens.stream.protocol import ProtocolError, parse_client_message

logger = logging.getLogger(__name__)

T = TypeVar("T")

ENDED_STATES = tuple(sorted(FINAL_STATES))  # ("ended", "failed")
"""Session states after which no more frames arrive."""

# Close codes of the question websocket (stream/app.py), as the HTTP statuses they mirror.
_CLOSE_CODES = {
    4401: ("unauthorized", 401),
    4403: ("forbidden_scope", 403),
    4404: ("unknown_session", 404),
    4408: ("too_slow", 408),
}
_ERROR_STATUS = {"unauthorized": 401, "forbidden_scope": 403, "unknown_session": 404}
ENDING_GRACE_S = 1.0
"""How long watch_alerts() still listens after the final status, for the last falling edges."""


# ---------------------------------------------------------------------------------------- errors
class LiveLensError(Exception):
    """Anything the client reports: the server refused, or could not be reached."""


class ServerError(LiveLensError):
    """The server refused a request: HTTP status (None on the websocket), stable code, message."""

    def __init__(self, status: int | None, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        where = f"{self.status} {self.code}" if self.status is not None else self.code
        return f"{self.message} ({where})"


class ConnectionFailed(LiveLensError):
    """The server could not be reached, timed out, or dropped the connection."""


def server_url(url: str) -> str:
    """Check a server base URL (http or https, a host, no query) and drop its trailing slash."""
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"malformed server URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"malformed server URL {url!r}: expected http://HOST[:PORT]")
    if parsed.query or parsed.fragment:
        raise ValueError(f"malformed server URL {url!r}: it must not have a query or fragment")
    return str(parsed.copy_with(path=parsed.path.rstrip("/") or "")).rstrip("/")


def websocket_url(server: str, session_id: str, ticket: str | None = None) -> str:
    """The question websocket's URL of a session (ws:// or wss://), with a ticket if given."""
    scheme, rest = server.split("://", 1)
    query = f"?ticket={quote(ticket, safe='')}" if ticket else ""
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{session_path(session_id)}/ws{query}"


def session_path(session_id: str) -> str:
    if not session_id:
        raise ValueError("the session id is empty")
    return f"/v1/sessions/{quote(session_id, safe='')}"


def alert_event_path(session_id: str, event_id: str) -> str:
    if not event_id:
        raise ValueError("the event id is empty")
    return f"{session_path(session_id)}/alert-events/{quote(event_id, safe='')}"


def describe_connection_error(exc: BaseException) -> str:
    """The root cause of a failed connection in a few words ("connection refused")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or (
            isinstance(seen, OSError) and seen.errno == errno.ECONNREFUSED
        ):
            return "connection refused"
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def raise_for_response(response: httpx.Response) -> None:
    """ServerError from an HTTP error's JSON body ({"error": {"code", "message"}})."""
    if response.is_success:
        return
    code, message = "http_error", response.reason_phrase or "request failed"
    try:
        body = response.json()
        code, message = str(body["error"]["code"]), str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()
        if text:
            message = text.splitlines()[0][:200]
    raise ServerError(response.status_code, code, message)


# -------------------------------------------------------------------------------------- messages
async def send(
    http: httpx.AsyncClient, server: str, timeout: float, method: str, url: str, **kwargs: Any
) -> httpx.Response:
    """One request: transport failures raise ConnectionFailed, error statuses ServerError."""
    try:
        response = await http.request(method, url, **kwargs)
    except httpx.TimeoutException:
        raise ConnectionFailed(
            f"the server at {server} did not answer within {timeout:g} s"
        ) from None
    except httpx.TransportError as exc:
        raise ConnectionFailed(
            f"cannot reach the server at {server}: {describe_connection_error(exc)}"
        ) from None
    raise_for_response(response)
    return response


def _known(cls: type[T], data: dict[str, Any]) -> dict[str, Any]:
    """The items of `data` that are fields of `cls` (a newer server may send more)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class Segment:
    """A time span an answer names, in media seconds and as wall clock (ISO-8601, UTC)."""

    start: float
    end: float
    start_time: str
    end_time: str


@dataclass(frozen=True)
class Latency:
    """Milliseconds: queued behind other work, prefill to first token, received to answered."""

    queue: float
    ttft: float
    total: float


@dataclass(frozen=True)
class Answer:
    """The final answer to a question (the websocket's `answer` message)."""

    id: str
    """The question's id (chosen by the client)."""
    question: str
    text: str
    segments: tuple[Segment, ...]
    stream_position: float
    """Media time (s) of the last frame the answer saw."""
    live_edge: float | None
    lag: float | None
    latency_ms: Latency
    asked_at: str
    answered_at: str
    recalled: tuple[float, ...] = ()
    """Media times (s) of the frames from before the window the answer also saw."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Answer:
        fields = _known(cls, data)
        fields["segments"] = tuple(Segment(**_known(Segment, s)) for s in data["segments"])
        fields["recalled"] = tuple(data.get("recalled", ()))
        fields["latency_ms"] = Latency(**_known(Latency, data["latency_ms"]))
        return cls(**fields)


@dataclass(frozen=True)
class HistoryEntry(Answer):
    """One stored answer of a session's history; `id` is the question id as in Answer."""

    entry_id: str = ""
    """Its Redis Stream id (usable with XREAD on livelens:history:{session})."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HistoryEntry:
        answer = Answer.from_json({**data, "id": data.get("question_id", "")})
        fields = {f.name: getattr(answer, f.name) for f in dataclasses.fields(Answer)}
        return cls(**fields, entry_id=str(data.get("id", "")))


@dataclass(frozen=True)
class Status:
    """A session's progress (the websocket's `status` message)."""

    session_id: str
    state: str
    """starting, live, stalled (live, but no frames lately), full (live, but the model takes no
    more frames: its context or the KV pool is full), ended or failed."""
    reason: str | None
    end_code: str | None
    """Why the session is over, for programs (an EndCode value); None while it goes on."""
    frames_received: int
    frames_sampled: int
    frames_dropped: int
    frames_in_model: int
    kept_tokens: int
    total_tokens: int
    kept_ratio: float | None
    kv_tokens: int
    kv_bytes: int
    live_edge: float | None
    stream_position: float | None
    lag: float | None
    window_start: float | None
    """Media time of the oldest frame the model holds (the window slides on long streams)."""
    window_end: float | None
    memory_start: float | None
    """Media time of the oldest frame kept for questions about the past (None: no memory)."""
    questions_waiting: int
    time: str

    @property
    def finished(self) -> bool:
        """True once the session is ended or failed."""
        return self.state in ENDED_STATES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Status:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class SessionStats:
    """The progress counters kept with a session's record."""

    frames_received: int = 0
    frames_sampled: int = 0
    frames_dropped: int = 0
    frames_in_model: int = 0
    kept_ratio: float | None = None
    kv_tokens: int = 0
    live_edge: float | None = None
    stream_position: float | None = None
    lag: float | None = None
    window_start: float | None = None
    window_end: float | None = None
    memory_start: float | None = None
    gaps: tuple[tuple[float, float], ...] = ()
    """Media-time spans a pull source was down."""


@dataclass(frozen=True)
class SessionInfo:
    """A session's record (`GET /v1/sessions/{id}`)."""

    id: str
    node: str
    kind: str
    """whip or pull."""
    source: str
    state: str
    created: str
    updated: str | None
    reason: str | None
    stats: SessionStats
    end_code: str | None = None
    """Why the session is over, for programs (an EndCode value); None while it goes on."""
    status: Status | None = None
    """The live status, when the node answering holds the session."""

    @property
    def finished(self) -> bool:
        return self.state in ENDED_STATES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionInfo:
        fields = _known(cls, data)
        stats = dict(data.get("stats") or {})
        stats["gaps"] = tuple(tuple(g) for g in stats.get("gaps") or ())
        fields["stats"] = SessionStats(**_known(SessionStats, stats))
        status = data.get("status")
        fields["status"] = Status.from_json(status) if status else None
        fields.setdefault("updated", None)
        fields.setdefault("reason", None)
        return cls(**fields)


@dataclass(frozen=True)
class Thumbnail:
    """A kept thumbnail: media seconds, wall clock, size, and its URL (relative to the server)."""

    time: float
    wall_time: str
    width: int
    height: int
    url: str


@dataclass(frozen=True)
class Alert:
    """A standing question on a session (docs/api.md, "Standing questions: alerts")."""

    id: str
    session_id: str
    condition: str
    question: str
    """What the model is asked: the condition as written if it ends with "?", else wrapped."""
    every: float
    """Media seconds between evaluations."""
    cooldown: float
    threshold: float
    hysteresis: float
    webhook: str | None
    created: str
    active: bool
    confidence: float | None
    """The last evaluation's P(yes) / (P(yes) + P(no)); None before the first."""
    evaluated_at: float | None
    evaluations: int
    skipped: int
    events: int
    suppressed: int
    webhook_deliveries: int
    webhook_failures: int
    last_webhook_error: str | None
    secret: str | None = None
    """The webhook's HMAC key: only in the answer that created the alert (None otherwise)."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Alert:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class AlertEvent:
    """One edge of an alert: `rise` (it became active) or `fall` (same event_id, `ended` set)."""

    event_id: str
    alert_id: str
    session_id: str
    condition: str
    edge: str
    confidence: float | None
    started: float
    """Media seconds of the rising edge's evaluation."""
    started_at: str
    ended: float | None
    ended_at: str | None
    thumbnail_url: str
    """Relative to the server; `alert_thumbnail()` fetches it with the key."""
    clip_url: str
    time: str
    """Wall clock when the server sent it."""
    entry_id: str | None = None
    """Its Redis Stream id, for events read back with `alert_events()`."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AlertEvent:
        fields = _known(cls, data)
        if "id" in data:
            fields["entry_id"] = str(data["id"])
        return cls(**fields)


# ---------------------------------------------------------------------------------------- client
def one_key(token: str | None, key: str | None) -> str | None:
    """`key=` and the older `token=` name the same credential; refuse two different ones."""
    if token and key and token != key:
        raise ValueError("give key= or token=, not two different credentials")
    return key or token or None


class LiveLensClient:
    """Async client of one LiveLens server; use as `async with LiveLensClient(url) as client`.

    `key` is an API key (docs/api.md, "Authentication"); `token` is its older name. A key
    without the scope a call needs raises ServerError 403 `forbidden_scope`.
    """

    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        key: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.server = server_url(server)
        token = one_key(token, key)
        self.token = token
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.server, headers=self._headers, timeout=timeout)

    @classmethod
    def blocking(
        cls,
        server: str,
        *,
        token: str | None = None,
        key: str | None = None,
        timeout: float = 10.0,
    ) -> BlockingClient:
        """The same client for synchronous code (scripts, notebooks)."""
        return BlockingClient(server, token=token, key=key, timeout=timeout)

    async def __aenter__(self) -> LiveLensClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---------------------------------------------------------------------------------- REST
    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await send(self._http, self.server, self.timeout, method, path, **kwargs)

    async def sessions(self) -> list[SessionInfo]:
        """Every session of every node, as the registry lists them."""
        response = await self._request("GET", "/v1/sessions")
        return [SessionInfo.from_json(r) for r in response.json()["sessions"]]

    async def session(self, session_id: str) -> SessionInfo:
        response = await self._request("GET", session_path(session_id))
        return SessionInfo.from_json(response.json())

    async def start_pull(
        self,
        source: str,
        *,
        fps: float | None = None,
        prune_threshold: float | None = None,
        realtime: bool = True,
        loop: bool = False,
    ) -> SessionInfo:
        """Have the server pull `source` (rtsp://, an HLS .m3u8 URL, or a path on the server)."""
        body: dict[str, Any] = {"source": source, "realtime": realtime, "loop": loop}
        if fps is not None:
            body["fps"] = fps
        if prune_threshold is not None:
            body["prune_threshold"] = prune_threshold
        response = await self._request("POST", "/v1/sessions", json=body)
        return SessionInfo.from_json(response.json())

    async def delete(self, session_id: str) -> SessionInfo:
        """End a session and free its KV cache; returns its final record."""
        response = await self._request("DELETE", session_path(session_id))
        return SessionInfo.from_json(response.json())

    async def history(self, session_id: str, count: int | None = None) -> list[HistoryEntry]:
        """The session's answers, oldest first; `count` keeps the most recent ones."""
        params = {"count": count} if count is not None else None
        response = await self._request("GET", f"{session_path(session_id)}/history", params=params)
        return [HistoryEntry.from_json(e) for e in response.json()["entries"]]

    async def thumbnails(
        self, session_id: str, start: float | None = None, end: float | None = None
    ) -> list[Thumbnail]:
        """The kept thumbnails with media time in [start, end], oldest first."""
        params = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
        response = await self._request(
            "GET", f"{session_path(session_id)}/thumbnails", params=params
        )
        return [Thumbnail(**_known(Thumbnail, t)) for t in response.json()["thumbnails"]]

    async def thumbnail(self, session_id: str, at: float) -> bytes:
        """The JPEG of the kept frame nearest to media second `at`."""
        response = await self._request(
            "GET", f"{session_path(session_id)}/thumbnail", params={"at": at}
        )
        return response.content

    # -------------------------------------------------------------------------------- alerts
    async def add_alert(
        self,
        session_id: str,
        condition: str,
        *,
        every: float = 1.0,
        cooldown: float = 10.0,
        threshold: float = 0.5,
        hysteresis: float = 0.1,
        webhook: str | None = None,
    ) -> Alert:
        """Add a standing question; the returned Alert holds the webhook's `secret` (the only
        time the server sends it)."""
        body = {
            "condition": condition,
            "every": every,
            "cooldown": cooldown,
            "threshold": threshold,
            "hysteresis": hysteresis,
            "webhook": webhook,
        }
        response = await self._request("POST", f"{session_path(session_id)}/alerts", json=body)
        return Alert.from_json(response.json())

    async def alerts(self, session_id: str) -> list[Alert]:
        response = await self._request("GET", f"{session_path(session_id)}/alerts")
        return [Alert.from_json(a) for a in response.json()["alerts"]]

    async def alert(self, session_id: str, alert_id: str) -> Alert:
        response = await self._request("GET", _alert_path(session_id, alert_id))
        return Alert.from_json(response.json())

    async def delete_alert(self, session_id: str, alert_id: str) -> Alert:
        """Remove an alert; returns it as it was (its events stay in the session's stream)."""
        response = await self._request("DELETE", _alert_path(session_id, alert_id))
        return Alert.from_json(response.json())

    async def alert_events(self, session_id: str, count: int | None = None) -> list[AlertEvent]:
        """The session's alert events (rise and fall edges), oldest first; `count` keeps the
        most recent."""
        params = {"count": count} if count is not None else None
        response = await self._request(
            "GET", f"{session_path(session_id)}/alert-events", params=params
        )
        return [AlertEvent.from_json(e) for e in response.json()["events"]]

    async def alert_thumbnail(self, session_id: str, event_id: str) -> bytes:
        """The JPEG of the frame at the event's rising edge (410 once the evidence expired)."""
        response = await self._request("GET", f"{alert_event_path(session_id, event_id)}/thumbnail")
        return response.content

    async def alert_clip(self, session_id: str, event_id: str) -> bytes:
        """An MP4 (H.264) of the sampled frames from 3 s before to 2 s after the rising edge;
        shorter while the frames after it have not arrived yet."""
        response = await self._request("GET", f"{alert_event_path(session_id, event_id)}/clip")
        return response.content

    async def ticket(self, session_id: str) -> str:
        """A single-use credential for the session's websocket, valid 30 s: for handing
        `websocket_url(server, session_id, ticket)` to a program that cannot set headers."""
        response = await self._request("POST", f"{session_path(session_id)}/ticket")
        return str(response.json()["ticket"])

    # ----------------------------------------------------------------------------- websocket
    @contextlib.asynccontextmanager
    async def _socket(self, session_id: str) -> AsyncIterator[tuple[ClientConnection, Status]]:
        """The session's question websocket and the status the server greets with.

        The key goes in the Authorization header, which access logs do not record.
        """
        url = websocket_url(self.server, session_id)
        try:
            ws = await connect(
                url, additional_headers=self._headers, open_timeout=self.timeout, proxy=None
            )
        except InvalidStatus as exc:
            raise_for_response(
                httpx.Response(exc.response.status_code, content=exc.response.body or b"")
            )
            raise ConnectionFailed(f"websocket refused: {exc}") from None
        except (InvalidURI, InvalidHandshake) as exc:
            raise ConnectionFailed(f"cannot open the websocket {url}: {exc}") from None
        except TimeoutError:
            raise ConnectionFailed(f"the websocket {url} did not open in time") from None
        except OSError as exc:
            raise ConnectionFailed(
                f"cannot reach the server at {self.server}: {describe_connection_error(exc)}"
            ) from None
        try:
            first = await self._receive(ws)
            if first is None or first.get("type") != "status":
                raise ConnectionFailed(f"unexpected greeting from the server: {first}")
            yield ws, Status.from_json(first)
        finally:
            await ws.close()

    async def _receive(self, ws: ClientConnection) -> dict[str, Any] | None:
        """The next message (error messages raised as ServerError); None on a normal close."""
        try:
            raw = await ws.recv()
        except ConnectionClosed as exc:
            close = exc.rcvd
            if close is not None and close.code in _CLOSE_CODES:
                code, status = _CLOSE_CODES[close.code]
                raise ServerError(status, code, close.reason or code) from None
            if close is not None and close.code in (1000, 1001):
                return None
            raise ConnectionFailed(f"the server closed the connection: {exc}") from None
        message = json.loads(raw)
        if message.get("type") == "error" and message.get("id") is None:
            raise _error(message)
        return message

    async def ask(
        self,
        session_id: str,
        question: str,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
        memory: str | None = None,
        question_id: str | None = None,
    ) -> AsyncIterator[str | Answer]:
        """Ask about the video so far: yields the answer's text pieces, then the `Answer`.

        Closing the iterator early cancels the question on the server.
        """
        qid = question_id or uuid.uuid4().hex[:16]
        message: dict[str, Any] = {"type": "ask", "id": qid, "question": question}
        sampling = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "seed": seed,
            "repetition_penalty": repetition_penalty,
            "memory": memory,
        }
        message.update({k: v for k, v in sampling.items() if v is not None})
        text = json.dumps(message)
        try:  # the server's own parser (stream/protocol.py): same limits, same codes
            parse_client_message(text)
        except ProtocolError as exc:
            raise ServerError(None, exc.code, exc.message) from None
        async with self._socket(session_id) as (ws, _):
            await ws.send(text)
            answered = False
            try:
                while True:
                    reply = await self._receive(ws)
                    if reply is None:
                        raise ConnectionFailed("the server closed the connection before answering")
                    if reply.get("id") != qid:
                        continue  # status messages
                    if reply["type"] == "token":
                        yield reply["text"]
                    elif reply["type"] == "answer":
                        answered = True
                        yield Answer.from_json(reply)
                        return
                    elif reply["type"] == "error":
                        answered = True  # nothing left to cancel
                        raise _error(reply)
            finally:
                if not answered:
                    with contextlib.suppress(ConnectionClosed, OSError):
                        await ws.send(json.dumps({"type": "cancel", "id": qid}))

    async def answer(self, session_id: str, question: str, **sampling: Any) -> Answer:
        """Ask and wait for the whole answer."""
        async for piece in self.ask(session_id, question, **sampling):
            if isinstance(piece, Answer):
                return piece
        raise ConnectionFailed("no answer")  # pragma: no cover (ask ends with one or raises)

    async def watch(self, session_id: str) -> AsyncIterator[Status]:
        """The session's status messages, from the current one until it is ended or failed."""
        async with self._socket(session_id) as (ws, status):
            yield status
            while not status.finished:
                message = await self._receive(ws)
                if message is None:
                    raise ConnectionFailed("the server closed the connection")
                if message.get("type") == "status":
                    status = Status.from_json(message)
                    yield status

    async def alert_messages(self, session_id: str) -> AsyncIterator[dict[str, Any]]:
        """The session's `alert` websocket messages as the server sends them (JSON objects),
        until the session is ended or failed."""
        async with self._socket(session_id) as (ws, status):
            while not status.finished:
                message = await self._receive(ws)
                if message is None:
                    return
                if message.get("type") == "alert":
                    yield message
                elif message.get("type") == "status":
                    status = Status.from_json(message)
            # The falling edges of alerts active at the end follow the final status closely.
            while True:
                try:
                    message = await asyncio.wait_for(self._receive(ws), ENDING_GRACE_S)
                except TimeoutError:
                    return
                if message is None:
                    return
                if message.get("type") == "alert":
                    yield message

    async def watch_alerts(self, session_id: str) -> AsyncIterator[AlertEvent]:
        """The session's alert events as they happen, until the session is ended or failed."""
        async for message in self.alert_messages(session_id):
            yield AlertEvent.from_json(message)


def _alert_path(session_id: str, alert_id: str) -> str:
    if not alert_id:
        raise ValueError("the alert id is empty")
    return f"{session_path(session_id)}/alerts/{quote(alert_id, safe='')}"


def _error(message: dict[str, Any]) -> ServerError:
    code = str(message.get("code", "error"))
    return ServerError(_ERROR_STATUS.get(code), code, str(message.get("message", code)))


# -------------------------------------------------------------------------------------- blocking
class BlockingClient:
    """LiveLensClient for synchronous code: a private event loop in a daemon thread runs it.

    Works inside Jupyter, whose own loop is already running in the calling thread.
    """

    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        key: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        server = server_url(server)  # bad URLs fail here, before a thread exists
        token = one_key(token, key)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="livelens-client", daemon=True
        )
        self._thread.start()

        async def make() -> LiveLensClient:
            return LiveLensClient(server, token=token, timeout=timeout)

        self.client = self._call(make())
        """The async client, bound to the private loop."""

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Close the connections, stop the loop and its thread; idempotent."""
        if self._loop.is_closed():
            return
        self._call(self.client.aclose())
        self._call(self._loop.shutdown_asyncgens())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def sessions(self) -> list[SessionInfo]:
        return self._call(self.client.sessions())

    def session(self, session_id: str) -> SessionInfo:
        return self._call(self.client.session(session_id))

    def start_pull(self, source: str, **options: Any) -> SessionInfo:
        return self._call(self.client.start_pull(source, **options))

    def delete(self, session_id: str) -> SessionInfo:
        return self._call(self.client.delete(session_id))

    def history(self, session_id: str, count: int | None = None) -> list[HistoryEntry]:
        return self._call(self.client.history(session_id, count))

    def thumbnails(
        self, session_id: str, start: float | None = None, end: float | None = None
    ) -> list[Thumbnail]:
        return self._call(self.client.thumbnails(session_id, start, end))

    def thumbnail(self, session_id: str, at: float) -> bytes:
        return self._call(self.client.thumbnail(session_id, at))

    def ticket(self, session_id: str) -> str:
        return self._call(self.client.ticket(session_id))

    def add_alert(self, session_id: str, condition: str, **options: Any) -> Alert:
        return self._call(self.client.add_alert(session_id, condition, **options))

    def alerts(self, session_id: str) -> list[Alert]:
        return self._call(self.client.alerts(session_id))

    def alert(self, session_id: str, alert_id: str) -> Alert:
        return self._call(self.client.alert(session_id, alert_id))

    def delete_alert(self, session_id: str, alert_id: str) -> Alert:
        return self._call(self.client.delete_alert(session_id, alert_id))

    def alert_events(self, session_id: str, count: int | None = None) -> list[AlertEvent]:
        return self._call(self.client.alert_events(session_id, count))

    def alert_thumbnail(self, session_id: str, event_id: str) -> bytes:
        return self._call(self.client.alert_thumbnail(session_id, event_id))

    def alert_clip(self, session_id: str, event_id: str) -> bytes:
        return self._call(self.client.alert_clip(session_id, event_id))

    def watch_alerts(self, session_id: str) -> Iterator[AlertEvent]:
        """As LiveLensClient.watch_alerts; close() the iterator to stop early."""
        return self._iterate(self.client.watch_alerts(session_id))

    def ask(
        self,
        session_id: str,
        question: str,
        *,
        on_token: Callable[[str], object] | None = None,
        **sampling: Any,
    ) -> Answer:
        """Ask and return the Answer; `on_token` is called with each piece as it arrives."""
        for piece in self.stream(session_id, question, **sampling):
            if isinstance(piece, Answer):
                return piece
            if on_token is not None:
                on_token(piece)
        raise ConnectionFailed("no answer")  # pragma: no cover (ask ends with one or raises)

    def stream(self, session_id: str, question: str, **sampling: Any) -> Iterator[str | Answer]:
        """As LiveLensClient.ask: the answer's pieces as they arrive, then the Answer."""
        return self._iterate(self.client.ask(session_id, question, **sampling))

    def watch(self, session_id: str) -> Iterator[Status]:
        return self._iterate(self.client.watch(session_id))

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.is_closed():
                self._call(agen.aclose())  # type: ignore[attr-defined]
