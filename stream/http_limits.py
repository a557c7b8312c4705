"""What enforces the HTTP-facing limits of stream/limits.py, below the app.

- `BodyLimit`, a pure ASGI middleware that counts request-body bytes as they arrive (whether
  announced by Content-Length or chunked) and answers 413 `payload_too_large` past the limit, or
  408 `request_timeout` when a started body stops arriving;
- `GuardedH11Protocol`, uvicorn's h11 protocol with a deadline for the request head, so idle and
  half-sent connections are closed (uvicorn only times out idle keep-alive connections);
- `RepeatFilter`, a logging filter that lets the same warning through a few times per interval
  and then summarises, so a flood of identical errors (accept() failing when out of file
  descriptors) cannot fill the disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ------------------------------------------------------------------------------ request bodies
async def send_error(send: Send, status: int, code: str, message: str) -> None:
    """A complete JSON error response that also closes the connection (the body is unread)."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: every HTTP request body is counted as it arrives and cut off at a limit.

    A Content-Length above the limit is refused before anything is read; a chunked body is
    refused as soon as the bytes received pass it. The app never sees more than the limit.
    `per_prefix` gives some paths their own, smaller limit (WHIP offers).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        timeout_s: float,
        per_prefix: tuple[tuple[str, int], ...] = (),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.per_prefix = per_prefix

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.per_prefix:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return min(limit, self.max_bytes)
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        too_large = f"request body larger than {limit} bytes"
        length = _content_length(scope)
        if length is not None and length > limit:
            await send_error(send, 413, "payload_too_large", too_large)
            return
        received = 0
        started = False  # whether the app began its response
        refused = False  # whether we answered in its place

        async def refuse(status: int, code: str, message: str) -> Message:
            # Answered here, not raised: an exception would reach FastAPI's body reading
            # wrapped by middleware task groups and come out as a generic 400.
            nonlocal refused
            if not refused and not started:
                await send_error(send, status, code, message)
            refused = True
            return {"type": "http.disconnect"}  # the app stops reading and gives up

        async def counted_receive() -> Message:
            nonlocal received
            if refused:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                stalled = f"no request body bytes for {self.timeout_s:g} s"
                return await refuse(408, "request_timeout", stalled)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    return await refuse(413, "payload_too_large", too_large)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the app's answer to the disconnect; ours went out already
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except Exception:
            if not refused:
                raise
            # The app failed over the body we cut off (a disconnect mid-read); answered.


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


# ---------------------------------------------------------------------------------- connections
class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that do not send a request head in time.

    uvicorn arms its keep-alive timer only after a response, so a connection that never sends
    anything, or sends a request head a byte at a time (slowloris), is otherwise kept forever.
    The deadline (`config.header_timeout_s`, set by `serve`) starts when the connection opens
    and again after each response, and is met once a complete head has arrived.
    """

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        if not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_overdue)

    def _disarm_head_deadline(self) -> None:
        handle = getattr(self, "_head_deadline", None)
        if handle is not None:
            handle.cancel()
            self._head_deadline = None

    def _head_overdue(self) -> None:
        self._head_deadline = None
        # IDLE: no complete request head since the connection opened or the last response.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.debug("closing a connection that sent no request head in time")
            self.transport.close()


def guarded_protocol(header_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's `http=`, with this header timeout."""
    return type("GuardedH11", (GuardedH11Protocol,), {"header_timeout_s": header_timeout_s})


# -------------------------------------------------------------------------------------- logging
class RepeatFilter(logging.Filter):
    """Lets each (logger, level, message template) of WARNING and above through `limit` times
    per `interval_s`; the first record after a suppressed stretch says how many were dropped.

    Keyed on the template, not the formatted text, so a flood whose lines differ only in an
    address or a count is still one flood. INFO and below (access logs) pass untouched.
    """

    def __init__(self, limit: int, interval_s: float, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.limit = limit
        self.interval_s = interval_s
        self.clock = clock
        self._windows: dict[tuple[str, int, str], list[float | int]] = {}
        """key -> [window start, records seen in it, records suppressed in it]."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        # One record reaches every handler; decide once, or each handler would count it.
        decided = getattr(record, "_livelens_repeat", None)
        if decided is not None:
            return bool(decided)
        keep = self._decide(record)
        record._livelens_repeat = keep  # type: ignore[attr-defined]
        return keep

    def _decide(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        window = self._windows.get(key)
        suppressed = 0
        if window is None or now - window[0] >= self.interval_s:
            suppressed = int(window[2]) if window is not None else 0
            if len(self._windows) >= 1024 and window is None:
                self._windows.clear()  # bounded: distinct templates are few in practice
            window = [now, 0, 0]
            self._windows[key] = window
        window[1] += 1
        if window[1] == self.limit + 1:
            # One line where the suppression starts, so a reader knows more is coming.
            record.msg = f"{record.msg} [repeated; further identical lines are suppressed]"
            return True
        if window[1] > self.limit:
            window[2] += 1
            return False
        if suppressed:
            record.msg = f"{record.msg} [suppressed {suppressed} identical lines before this]"
        return True


def install_repeat_filter(limit: int, interval_s: float) -> RepeatFilter:
    """Attach one RepeatFilter to the handlers of the root and uvicorn loggers."""
    repeat = RepeatFilter(limit, interval_s)
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if repeat not in handler.filters:
                handler.addFilter(repeat)
    return repeat
