"""The WHIP HTTP resource (RFC 9725): POST an offer, PATCH trickle candidates, DELETE, OPTIONS;
the FastAPI router around `WhipIngest`."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from typing import Any

import fastapi
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from livelens.stream.auth import AuthError, KeyRing, Scope, bearer
from livelens.stream.protocol import error_responses
from livelens.stream.whip.peer import (
    SessionOpener,
    WhipIngest,
    WhipSettings,
)
from livelens.stream.whip.sdp import (
    SDP_TYPE,
    TRICKLE_TYPE,
    WhipError,
    malformed,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# HTTP


_EXPOSED = "Location, ETag, Link, X-LiveLens-Session, Accept-Post"


def _publish_options(query: Mapping[str, str]) -> dict[str, float]:
    """Session options in the WHIP URL's query: `window` (media seconds the model holds) and
    `memory` (media seconds before the window kept for questions about the past), as in
    `POST /v1/sessions`. Other parameters are ignored (RFC 9725 leaves the URL to the server);
    a bad value is refused with 400 `bad_parameter`."""
    options: dict[str, float] = {}
    for name, low_open, high in (("window", True, 86400.0), ("memory", False, 7 * 86400.0)):
        raw = query.get(name)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        low_ok = value > 0 if low_open else value >= 0
        if not (math.isfinite(value) and low_ok and value <= high):
            bounds = f"{'(' if low_open else '['}0, {high:g}]"
            raise WhipError(400, "bad_parameter", f"{name} must be a number of seconds in {bounds}")
        options[f"{name}_s"] = value
    return options


def whip_router(
    ingest: WhipIngest,
    open_session: SessionOpener,
    settings: WhipSettings,
    prefix: str = "/whip",
) -> fastapi.APIRouter:
    """POST {prefix} publishes; PATCH/DELETE {prefix}/{id} trickle and end; OPTIONS for CORS.

    `settings` governs the HTTP side (token, sizes, CORS); normally the ingest's own settings.
    """
    router = fastapi.APIRouter(prefix=prefix)
    cors = {
        "Access-Control-Allow-Origin": settings.cors_origin,
        "Access-Control-Expose-Headers": _EXPOSED,
    }
    if settings.cors_origin != "*":
        cors["Vary"] = "Origin"
    links = ", ".join(f'<{url}>; rel="ice-server"' for url in settings.ice_servers)

    def error(exc: WhipError) -> JSONResponse:
        headers = dict(cors)
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="whip"'
        return JSONResponse(
            {"error": {"code": exc.code, "message": exc.message}}, exc.status, headers=headers
        )

    async def body(request: Request, media_type: str) -> str:
        _authorize(request, settings.token)
        given = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if given != media_type:
            raise WhipError(415, "unsupported_media_type", f"Content-Type must be {media_type}")
        return await _read_text(request, settings.max_offer_bytes)

    def preflight(methods: str, extra: Mapping[str, str] | None = None) -> Response:
        headers = {
            **cors,
            **(extra or {}),
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
            "Access-Control-Max-Age": "600",
            "Allow": methods,
        }
        if links:
            headers["Link"] = links
        return Response(status_code=204, headers=headers)

    preflight_route = {
        "status_code": 204,
        "response_class": Response,
        "responses": {204: {"description": "CORS preflight: allowed methods and headers"}},
    }

    @router.options("", **preflight_route)
    async def options_endpoint() -> Response:
        return preflight("OPTIONS, POST", {"Accept-Post": SDP_TYPE})

    @router.options("/{session_id}", **preflight_route)
    async def options_session(session_id: str) -> Response:
        return preflight("OPTIONS, PATCH, DELETE")

    @router.post(
        "",
        status_code=201,
        response_class=Response,
        summary="Publish: an SDP offer in, the SDP answer out (RFC 9725)",
        responses={
            201: {"description": "the SDP answer", "content": {SDP_TYPE: _TEXT}},
            **error_responses(400, 401, 406, 413, 415, 503),
        },
        openapi_extra={
            **_text_body(SDP_TYPE),
            "parameters": [
                {
                    "name": "window",
                    "in": "query",
                    "required": False,
                    "description": "media seconds of video the model holds for this publication "
                    "(default: the server's --window)",
                    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
                },
                {
                    "name": "memory",
                    "in": "query",
                    "required": False,
                    "description": "media seconds before the window kept for questions about "
                    "the past (default: the server's --memory; 0: none)",
                    "schema": {"type": "number", "minimum": 0, "maximum": 604800},
                },
            ],
        },
    )
    async def publish(request: Request) -> Response:
        try:
            offer = await body(request, SDP_TYPE)
            client = request.client.host if request.client else "unknown"
            agent = request.headers.get("user-agent", "unknown client")
            options = _publish_options(request.query_params)
            opener = functools.partial(open_session, **options) if options else open_session
            publication = await ingest.publish(offer, opener, f"whip:{client} {agent}")
        except WhipError as exc:
            return error(exc)
        headers = {
            **cors,
            "Location": f"{request.url.path.rstrip('/')}/{publication.session_id}",
            "ETag": publication.etag,
            "X-LiveLens-Session": publication.session_id,
        }
        if links:
            headers["Link"] = links
        return Response(publication.answer_sdp, 201, headers=headers, media_type=SDP_TYPE)

    @router.patch(
        "/{session_id}",
        status_code=204,
        response_class=Response,
        summary="Trickle ICE candidates (RFC 8840 SDP fragment)",
        responses=error_responses(400, 401, 404, 412, 413, 415, 422),
        openapi_extra=_text_body(TRICKLE_TYPE),
    )
    async def trickle(session_id: str, request: Request) -> Response:
        try:
            fragment = await body(request, TRICKLE_TYPE)
            await ingest.patch(session_id, fragment, request.headers.get("if-match"))
        except WhipError as exc:
            return error(exc)
        return Response(status_code=204, headers=cors)

    @router.delete(
        "/{session_id}",
        response_class=Response,
        summary="End the publication",
        responses={200: {"description": "ended"}, **error_responses(401, 404)},
    )
    async def delete(session_id: str, request: Request) -> Response:
        try:
            _authorize(request, settings.token)
            await ingest.delete(session_id)
        except WhipError as exc:
            return error(exc)
        return Response(status_code=200, headers=cors)

    return router


_TEXT = {"schema": {"type": "string"}}


def _text_body(media_type: str) -> dict[str, Any]:
    """OpenAPI request body of a route that reads the raw body itself (SDP, not JSON)."""
    return {"requestBody": {"required": True, "content": {media_type: _TEXT}}}


def _authorize(request: Request, token: str | None) -> None:
    """The router's own check of `settings.token` as a publish key (stream/auth.py).

    Inside `livelens serve` the app's guard checks scoped keys first and the token is None.
    """
    try:
        KeyRing.from_token(token).require(
            bearer(request.headers.get("authorization")), Scope.PUBLISH
        )
    except AuthError as exc:
        raise WhipError(exc.status, exc.code, exc.message) from None


async def _read_text(request: Request, limit: int) -> str:
    """The request body as UTF-8, refusing (413) more than `limit` bytes without reading it all."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise WhipError(413, "payload_too_large", f"body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise WhipError(413, "payload_too_large", f"body larger than {limit} bytes")
        chunks.append(chunk)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise malformed("the body is not UTF-8 text") from None
