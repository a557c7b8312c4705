"""The ASGI app: WHIP ingest, REST for sessions and history, the question websocket, metrics.

A thin layer over `LiveService`: it validates what arrives, maps errors to HTTP statuses and
JSON bodies (`{"error": {"code", "message"}}`), and moves websocket messages to and from the
session's watcher queue. OpenAPI is served at /docs and /openapi.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from livelens.clients import CONSOLE_DIR
from livelens.model.sampling import SessionError
from livelens.stream import redact
from livelens.stream.auth import KeyRing, KeysFileError, Tickets
from livelens.stream.auth_guard import SCOPE_KEY, AuthGuard
from livelens.stream.errors import ServiceError
from livelens.stream.http_limits import BodyLimit
from livelens.stream.live import LiveSession, State, Watcher, iso
from livelens.stream.protocol import (
    AlertRequest,
    AskMessage,
    ErrorMessage,
    ProtocolError,
    PullRequest,
    ThumbnailList,
    ThumbnailOut,
    UnwatchMessage,
    WatchMessage,
    dump,
    error_responses,
    parse_client_message,
)
from livelens.stream.service import DRAINING_MESSAGE, LiveService
from livelens.stream.whip import WhipIngest, WhipSettings, whip_router

logger = logging.getLogger(__name__)

# Websocket close codes in the private range (4000-4999), mirroring HTTP statuses
# (4401 and 4403, refused credentials, are the guard's: stream/auth_guard.py).
CLOSE_UNKNOWN_SESSION = 4404
CLOSE_TOO_SLOW = 4408
CLOSE_DRAINING = 4503


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def create_app(
    service: LiveService,
    *,
    token: str | None = None,
    keys: KeyRing | None = None,
    whip: WhipSettings | None = None,
    on_start: Callable[[LiveService], Awaitable[object]] | None = None,
) -> FastAPI:
    """Build the app around a not-yet-started service; the app's lifespan starts and stops it.

    `keys` (scoped API keys, stream/auth.py) guard every route as `auth.ROUTE_SCOPES` says;
    `token` alone is one admin key, as `--token` always was (also `whip.token` when that is the
    only one given); neither = no authentication. `on_start` runs once the service has started,
    before the first request (`serve --demo` opens its session there).
    """
    whip_settings = whip or WhipSettings(token=token)
    if keys is None:
        keys = KeyRing.from_token(token or whip_settings.token)
    # The guard checks WHIP requests too, against the same keys; the router need not.
    whip_settings = dataclasses.replace(whip_settings, token=None)
    tickets = Tickets()
    ingest = WhipIngest(whip_settings)

    def open_whip(source: str, **options: float) -> LiveSession:
        """A new publication's session; the service closes the publisher when it ends."""
        return service.open_whip(source, lambda sid: ingest.publication(sid, source), **options)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        redact.install()  # after uvicorn has configured its loggers
        reloading = _reload_on_sighup(keys)
        await service.start()
        try:
            if on_start is not None:
                await on_start(service)
            yield
        finally:
            if reloading:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await ingest.close_all()
            await service.stop()

    app = FastAPI(
        title="LiveLens",
        summary="Ask questions about live video; answers come with timestamps.",
        version="0.1.0",
        lifespan=lifespan,
        responses=error_responses(401, 403, 404, 422),
    )
    app.state.service = service
    app.state.ingest = ingest
    app.include_router(whip_router(ingest, open_whip, whip_settings))
    whip_cors = {"Access-Control-Allow-Origin": whip_settings.cors_origin}
    app.add_middleware(
        AuthGuard,
        keys=keys,
        tickets=tickets,
        error_headers=lambda path: whip_cors if path.startswith("/whip") else {},
    )

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"][1:]) or "body"
        return _error(422, "invalid_request", f"{where}: {first['msg']}")

    @app.middleware("http")
    async def refuse_while_draining(request: Request, call_next):  # type: ignore[no-untyped-def]
        # POST is how new work arrives: pull sessions and WHIP publications.
        if service.draining and request.method == "POST":
            return _error(503, "draining", DRAINING_MESSAGE, {"Retry-After": "5"})
        return await call_next(request)

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
    async def healthz() -> JSONResponse:
        """Liveness: the model is loaded and the engine runs (503 while draining); the KV pool's
        occupancy."""
        registry = service.registry
        body = {
            "status": "draining" if service.draining else "ok",
            "model": service.runner.loaded.name,
            "node": service.config.node,
            "redis": bool(registry and registry.connected),
            "sessions": len(service.sessions),
            "kv_pool": service.pool_status(),
        }
        return JSONResponse(body, status_code=503 if service.draining else 200)

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/sessions",
        status_code=201,
        tags=["sessions"],
        responses=error_responses(400, 403, 409, 422, 503),
    )
    async def create_session(body: PullRequest) -> JSONResponse:
        """Start a pull session: RTSP, HLS, or a local file under the server's media root played
        as a live stream. The source passes the source policy and is opened before the answer:
        403 source_not_allowed, 422 bad_source, source_unavailable or source_unreadable."""
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
        assert service.registry is not None
        try:
            entries = await service.registry.history(session_id, count=count)
        except ValueError:  # not a well-formed id
            entries = []
        # The history outlives the record: a crashed node's live records expire within
        # seconds, their history only after the retention.
        if not entries:
            await _record_or_404(session_id)
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

    # --------------------------------------------------------------- alerts
    @app.post(
        "/v1/sessions/{session_id}/alerts",
        status_code=201,
        tags=["alerts"],
        responses=error_responses(403, 409, 410),
    )
    async def create_alert(session_id: str, body: AlertRequest) -> JSONResponse:
        """Add a standing question to a live session of this node (docs/api.md, "Standing
        questions: alerts"). The webhook secret is in this answer only."""
        session = await _alertable(session_id)
        alert = await service.alerts.create(session, body)
        return JSONResponse(
            alert.to_json() | {"secret": alert.secret},
            status_code=201,
            headers={"Location": f"/v1/sessions/{session_id}/alerts/{alert.id}"},
        )

    @app.get("/v1/sessions/{session_id}/alerts", tags=["alerts"])
    async def list_alerts(session_id: str) -> dict[str, Any]:
        """The session's alerts: with their state on the node that holds the session, else
        their definitions from Redis."""
        alerts = service.alerts.alerts(session_id) if service.get(session_id) else None
        if alerts is None:
            await _record_or_404(session_id)
            alerts = await service.alerts.stored(session_id)
        return {"session_id": session_id, "alerts": [a.to_json() for a in alerts]}

    @app.get(
        "/v1/sessions/{session_id}/alerts/{alert_id}",
        tags=["alerts"],
        responses=error_responses(409, 410),
    )
    async def get_alert(session_id: str, alert_id: str) -> dict[str, Any]:
        await _held_here(session_id)
        return service.alerts.get(session_id, alert_id).to_json()

    @app.delete(
        "/v1/sessions/{session_id}/alerts/{alert_id}",
        tags=["alerts"],
        responses=error_responses(409, 410),
    )
    async def delete_alert(session_id: str, alert_id: str) -> dict[str, Any]:
        """Remove an alert (its events stay in the session's stream)."""
        session = await _held_here(session_id)
        return (await service.alerts.delete(session, alert_id)).to_json()

    @app.get("/v1/sessions/{session_id}/alert-events", tags=["alerts"])
    async def alert_events(
        session_id: str, count: int | None = Query(default=None, ge=1, le=10000)
    ) -> dict[str, Any]:
        """The session's alert events, oldest first (from its Redis Stream)."""
        assert service.registry is not None
        try:
            events = await service.registry.alert_events(session_id, count=count)
        except ValueError:  # not a well-formed id
            events = []
        if not events:
            await _record_or_404(session_id)
        return {"session_id": session_id, "events": events}

    @app.get(
        "/v1/sessions/{session_id}/alert-events/{event_id}/thumbnail",
        tags=["alerts"],
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **error_responses(409, 410)},
    )
    async def alert_thumbnail(session_id: str, event_id: str) -> Response:
        """The JPEG of the frame at the event's rising edge."""
        await _held_here(session_id)
        evidence = service.alerts.evidence(session_id, event_id)
        if evidence.thumbnail is None:
            raise ServiceError(404, "no_thumbnail", "no frame was kept at the event's moment")
        return Response(
            evidence.thumbnail,
            media_type="image/jpeg",
            headers={"X-LiveLens-Time": f"{evidence.rise:.3f}", "Cache-Control": "no-store"},
        )

    @app.get(
        "/v1/sessions/{session_id}/alert-events/{event_id}/clip",
        tags=["alerts"],
        response_class=Response,
        responses={200: {"content": {"video/mp4": {}}}, **error_responses(409, 410)},
    )
    async def alert_clip(session_id: str, event_id: str) -> Response:
        """An MP4 of the sampled frames around the event's rising edge."""
        await _held_here(session_id)
        evidence = service.alerts.evidence(session_id, event_id)
        if not evidence.frames:
            raise ServiceError(404, "no_frames", "no frame was kept around the event")
        video = await evidence.clip()
        return Response(
            video,
            media_type="video/mp4",
            headers={
                "X-LiveLens-Clip-Complete": "true" if evidence.complete else "false",
                "Cache-Control": "no-store",
            },
        )

    async def _alertable(session_id: str) -> LiveSession:
        session = await _held_here(session_id)
        if session.state >= State.ENDED:
            raise ServiceError(410, "session_ended", f"session {session_id} has ended")
        return session

    # ----------------------------------------------------------------- keys
    @app.post(
        "/v1/sessions/{session_id}/ticket",
        tags=["sessions"],
        responses=error_responses(401, 403, 404),
    )
    async def ticket(session_id: str, request: Request) -> dict[str, Any]:
        """A single-use credential for this session's websocket (`?ticket=`), valid 30 s."""
        await _record_or_404(session_id)
        issued = tickets.issue(session_id, request.scope.get(SCOPE_KEY))
        return {"ticket": issued, "expires_in": tickets.ttl_s}

    @app.post("/v1/keys/reload", tags=["keys"], responses=error_responses(401, 403, 409, 422))
    async def reload_keys() -> dict[str, Any]:
        """Read the keys file again; a bad file keeps the keys in force (422, and a log line)."""
        if keys.path is None:
            raise ServiceError(409, "no_keys_file", "the server was started without --keys-file")
        try:
            count = keys.reload()
        except KeysFileError as exc:
            raise ServiceError(422, "invalid_keys_file", f"{exc}; the previous keys stay") from None
        return {"keys": count}

    # ------------------------------------------------------------ websocket
    @app.websocket("/v1/sessions/{session_id}/ws")
    async def questions(websocket: WebSocket, session_id: str) -> None:
        # The guard (stream/auth_guard.py) has checked the key or ticket before this runs.
        await websocket.accept()
        if service.draining:
            await _refuse(websocket, "draining", DRAINING_MESSAGE, CLOSE_DRAINING)
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
                if isinstance(parsed, AskMessage) and service.draining:
                    watcher.send(
                        dump(ErrorMessage(id=parsed.id, code="draining", message=DRAINING_MESSAGE))
                    )
                elif isinstance(parsed, AskMessage):
                    try:
                        session.ask(watcher, parsed)
                    except SessionError as exc:  # a limit of the model session itself
                        refusal = ErrorMessage(
                            id=parsed.id, code="invalid_message", message=str(exc)
                        )
                        watcher.send(dump(refusal))
                elif isinstance(parsed, WatchMessage | UnwatchMessage):
                    await _alert_message(session, watcher, parsed)
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

    async def _alert_message(
        session: LiveSession, watcher: Watcher, message: WatchMessage | UnwatchMessage
    ) -> None:
        try:
            if isinstance(message, UnwatchMessage):
                await service.alerts.delete(session, message.alert_id)
                reply = {"type": "unwatched", "id": message.id, "alert_id": message.alert_id}
            elif session.state >= State.ENDED:
                raise ServiceError(410, "session_ended", f"session {session.id} has ended")
            else:
                request = AlertRequest(**message.model_dump(exclude={"type", "id"}))
                alert = await service.alerts.create(session, request)
                reply = {
                    "type": "watching",
                    "id": message.id,
                    "alert": alert.to_json(),
                    "secret": alert.secret,
                }
        except ServiceError as exc:
            reply = dump(ErrorMessage(id=message.id, code=exc.code, message=exc.message))
        watcher.send(reply)

    # Outermost, so no layer below ever holds more of a body than the limit.
    limits = service.config.limits
    app.add_middleware(
        BodyLimit,
        max_bytes=limits.max_body_bytes,
        timeout_s=limits.body_timeout_s,
        per_prefix=(("/whip", whip_settings.max_offer_bytes),),
    )
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


def _reload_on_sighup(keys: KeyRing) -> bool:
    """SIGHUP reloads the keys file; only in the main thread (uvicorn's), never in tests'
    in-thread apps. Returns whether the handler was installed."""
    if keys.path is None or threading.current_thread() is not threading.main_thread():
        return False

    def reload() -> None:
        with contextlib.suppress(KeysFileError):  # logged; the old keys stay
            keys.reload()

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    return True


async def _refuse(websocket: WebSocket, code: str, message: str, close_code: int) -> None:
    await websocket.send_json(dump(ErrorMessage(code=code, message=message)))
    await websocket.close(close_code, message[:120])
