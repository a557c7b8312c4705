"""The ASGI app: WHIP ingest, REST for sessions and history, the question websocket, metrics.

A thin layer over `LiveService`: it validates what arrives, maps errors to HTTP statuses and
JSON bodies (`{"error": {"code", "message"}}`), and moves websocket messages to and from the
session's watcher queue. OpenAPI is served at /docs and /openapi.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from livelens.clients import CONSOLE_DIR
from livelens.model.session import SessionError
from livelens.stream.live import LiveSession, Watcher, iso
from livelens.stream.protocol import (
    AskMessage,
    ErrorMessage,
    ProtocolError,
    PullRequest,
    ThumbnailList,
    ThumbnailOut,
    dump,
    error_responses,
    parse_client_message,
)
from livelens.stream.service import LiveService, ServiceError
from livelens.stream.whip import WhipError, WhipIngest, WhipSettings, whip_router

logger = logging.getLogger(__name__)

# Websocket close codes in the private range (4000-4999), mirroring HTTP statuses.
CLOSE_UNAUTHORIZED = 4401
CLOSE_UNKNOWN_SESSION = 4404
CLOSE_TOO_SLOW = 4408


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def create_app(
    service: LiveService,
    *,
    token: str | None = None,
    whip: WhipSettings | None = None,
    on_start: Callable[[LiveService], Awaitable[object]] | None = None,
) -> FastAPI:
    """Build the app around a not-yet-started service; the app's lifespan starts and stops it.

    `token` guards /v1 (and WHIP, through `whip.token`); None = no authentication. `on_start`
    runs once the service has started, before the first request (`serve --demo` opens its
    session there).
    """
    whip_settings = whip or WhipSettings(token=token)
    ingest = WhipIngest(whip_settings)

    async def end_publication(session_id: str) -> None:
        with contextlib.suppress(WhipError):  # the publisher had already gone
            await ingest.delete(session_id)

    service.closers["whip"] = end_publication

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            if on_start is not None:
                await on_start(service)
            yield
        finally:
            await ingest.close_all()
            await service.stop()

    app = FastAPI(
        title="LiveLens",
        summary="Ask questions about live video; answers come with timestamps.",
        version="0.1.0",
        lifespan=lifespan,
        responses=error_responses(401, 404, 422),
    )
    app.state.service = service
    app.state.ingest = ingest
    app.include_router(whip_router(ingest, service.open_whip, whip_settings))

    def authorized(header: str | None, query: str | None = None) -> bool:
        if token is None:
            return True
        given = query
        if header and header.lower().startswith("bearer "):
            given = header[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), token.encode())

    @app.middleware("http")
    async def require_token(request: Request, call_next):  # type: ignore[no-untyped-def]
        if request.url.path.startswith("/v1/") and not authorized(
            request.headers.get("authorization")
        ):
            return _error(
                401,
                "unauthorized",
                "missing or wrong bearer token",
                {"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"][1:]) or "body"
        return _error(422, "invalid_request", f"{where}: {first['msg']}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    # ------------------------------------------------------------- console
    # Static files only (no build step, no CDN); the page asks for the token itself.
    app.mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console")

    @app.get("/", include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(CONSOLE_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    # ---------------------------------------------------------------- REST
    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, Any]:
        """Liveness: the model is loaded and the worker thread runs."""
        registry = service.registry
        return {
            "status": "ok",
            "model": service.runner.loaded.name,
            "node": service.config.node,
            "redis": bool(registry and registry.connected),
            "sessions": len(service.sessions),
        }

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/sessions",
        status_code=201,
        tags=["sessions"],
        responses=error_responses(400, 403, 409, 503),
    )
    async def create_session(body: PullRequest) -> JSONResponse:
        """Start a pull session: RTSP, HLS, or a local file played as a live stream."""
        session = await service.open_pull(body)
        return JSONResponse(
            service.describe(session),
            status_code=201,
            headers={"Location": f"/v1/sessions/{session.id}"},
        )

    @app.get("/v1/sessions", tags=["sessions"])
    async def list_sessions() -> dict[str, Any]:
        """Every session of every node (from the registry), this node's with live stats."""
        return {"sessions": await service.records()}

    @app.get("/v1/sessions/{session_id}", tags=["sessions"])
    async def get_session(session_id: str) -> dict[str, Any]:
        record = await _record_or_404(session_id)
        session = service.get(session_id)
        if session is not None:
            record["status"] = session.status()
        return record

    @app.delete("/v1/sessions/{session_id}", tags=["sessions"], responses=error_responses(409))
    async def delete_session(session_id: str) -> dict[str, Any]:
        """End a session of this node and free its KV cache; its history stays readable."""
        if not await service.delete(session_id):
            await _held_here(session_id)
        return await _record_or_404(session_id)

    @app.get("/v1/sessions/{session_id}/history", tags=["sessions"])
    async def history(
        session_id: str, count: int | None = Query(default=None, ge=1, le=10000)
    ) -> dict[str, Any]:
        """Questions and answers of a session, oldest first (from the Redis Stream)."""
        await _record_or_404(session_id)
        assert service.registry is not None
        entries = await service.registry.history(session_id, count=count)
        return {"session_id": session_id, "entries": entries}

    async def _record_or_404(session_id: str) -> dict[str, Any]:
        try:
            record = await service.record(session_id)
        except ValueError:  # not a well-formed id
            record = None
        if record is None:
            raise ServiceError(404, "unknown_session", f"no session {session_id!r}")
        return record

    @app.get(
        "/v1/sessions/{session_id}/thumbnails",
        tags=["sessions"],
        responses=error_responses(409, 410),
    )
    async def thumbnails(
        session_id: str,
        start: float | None = Query(default=None, description="media seconds, inclusive"),
        end: float | None = Query(default=None, description="media seconds, inclusive"),
    ) -> ThumbnailList:
        """The session's kept thumbnails (the newest sampled frames), oldest first."""
        session = await _held_here(session_id)
        ring = session.thumbnails
        low = -math.inf if start is None else start
        high = math.inf if end is None else end
        wall_zero = session.wall_zero or session.created
        return ThumbnailList(
            session_id=session_id,
            capacity=ring.capacity,
            thumbnails=[
                ThumbnailOut(
                    time=t.time,
                    wall_time=iso(wall_zero + t.time),
                    width=t.width,
                    height=t.height,
                    url=f"/v1/sessions/{session_id}/thumbnail?at={t.time:.3f}",
                )
                for t in ring.between(low, high)
            ],
        )

    @app.get(
        "/v1/sessions/{session_id}/thumbnail",
        tags=["sessions"],
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {}}},
            **error_responses(409, 410),
        },
    )
    async def thumbnail(
        session_id: str, at: float = Query(description="media seconds; the nearest kept frame")
    ) -> Response:
        """One JPEG thumbnail: the kept frame nearest to `at` (its time in X-LiveLens-Time)."""
        session = await _held_here(session_id)
        found = session.thumbnails.nearest(at)
        if found is None:
            raise ServiceError(404, "no_thumbnail", f"session {session_id} has no frames yet")
        return Response(
            found.jpeg,
            media_type="image/jpeg",
            headers={"X-LiveLens-Time": f"{found.time:.3f}", "Cache-Control": "no-store"},
        )

    async def _held_here(session_id: str) -> LiveSession:
        """The session, if this node holds it in memory; else 404, 409 (another node) or 410."""
        session = service.get(session_id)
        if session is not None:
            return session
        record = await _record_or_404(session_id)
        if record["node"] != service.config.node:
            raise ServiceError(
                409, "not_on_this_node", f"session {session_id} is held by node {record['node']}"
            )
        raise ServiceError(410, "session_deleted", f"session {session_id} was deleted")

    # ------------------------------------------------------------ websocket
    @app.websocket("/v1/sessions/{session_id}/ws")
    async def questions(websocket: WebSocket, session_id: str) -> None:
        await websocket.accept()
        if not authorized(
            websocket.headers.get("authorization"), websocket.query_params.get("token")
        ):
            await _refuse(websocket, "unauthorized", "missing or wrong token", CLOSE_UNAUTHORIZED)
            return
        session = service.get(session_id)
        if session is None:
            await _refuse(
                websocket,
                "unknown_session",
                f"no session {session_id!r} on this node",
                CLOSE_UNKNOWN_SESSION,
            )
            return
        watcher = Watcher()
        session.watchers.add(watcher)
        watcher.send(session.status())
        sender = asyncio.create_task(_send_loop(websocket, watcher))
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text")
                if raw is None:
                    raw = message.get("bytes") or b""
                try:
                    parsed = parse_client_message(raw)
                except ProtocolError as exc:
                    watcher.send(
                        dump(ErrorMessage(id=exc.message_id, code=exc.code, message=exc.message))
                    )
                    continue
                if isinstance(parsed, AskMessage):
                    try:
                        session.ask(watcher, parsed)
                    except SessionError as exc:  # a limit of the model session itself
                        refusal = ErrorMessage(
                            id=parsed.id, code="invalid_message", message=str(exc)
                        )
                        watcher.send(dump(refusal))
                elif not session.cancel(watcher, parsed.id):
                    watcher.send(
                        dump(
                            ErrorMessage(
                                id=parsed.id,
                                code="unknown_question",
                                message=f"no question {parsed.id!r} of yours is in progress",
                            )
                        )
                    )
        except WebSocketDisconnect:
            pass
        finally:
            session.detach(watcher)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    return app


async def _send_loop(websocket: WebSocket, watcher: Watcher) -> None:
    try:
        while True:
            message = await watcher.queue.get()
            if message is None:
                await websocket.close(CLOSE_TOO_SLOW, "client reads too slowly")
                return
            try:
                # As starlette's send_json writes it, plus the UTF-8 check its encoder would do.
                text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
                text.encode()
            except (TypeError, ValueError) as exc:
                # One message that cannot be sent must not end the sender: the socket would
                # still take questions but never answer again.
                logger.warning("dropped an unsendable websocket message: %s", exc)
                continue
            await websocket.send_text(text)
    except (WebSocketDisconnect, RuntimeError):
        return  # the client went away; the receive side notices too


async def _refuse(websocket: WebSocket, code: str, message: str, close_code: int) -> None:
    await websocket.send_json(dump(ErrorMessage(code=code, message=message)))
    await websocket.close(close_code, message[:120])
