"""ASGI middleware that enforces `auth.ROUTE_SCOPES` on every HTTP request and websocket.

It matches the request's path against the table's route paths, looks up the scope that route
and method need, and checks the caller's credentials before the app runs: `Authorization:
Bearer <key>` everywhere, and on the question websocket also a single-use `?ticket=` (or, for
old scripts, `?token=<key>`). Refusals are JSON errors (HTTP), or an error message and close
code 4401/4403 (websocket).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Final
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from livelens.stream import auth
from livelens.stream.auth import AuthError, KeyRing, Tickets
from livelens.stream.protocol import ErrorMessage, dump

SCOPE_KEY = "livelens.api_key"
"""Where the caller's `auth.ApiKey` (None without keys) is left in the ASGI scope."""

# Websocket close codes in the private range (4000-4999), mirroring HTTP statuses.
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403

ANY_KEY: Final = "any key"
"""What a known path needs for a method it does not serve (a 405 follows): any valid key."""

# Under these, a path the table does not know needs admin (fail closed: a route left out of
# the table stays shut); elsewhere it is a 404 for anyone.
_PRIVATE_PREFIXES = ("/v1/", "/whip")


class RouteTable:
    """auth.ROUTE_SCOPES compiled: path templates as regular expressions, methods per path."""

    def __init__(self, scopes: Mapping[tuple[str, str], auth.Need]) -> None:
        by_path: dict[str, dict[str, auth.Need]] = {}
        for (method, path), scope in scopes.items():
            by_path.setdefault(path, {})[method] = scope
        self._paths = [(compile_path(path)[0], methods) for path, methods in by_path.items()]

    def needed(self, method: str, path: str) -> tuple[auth.Need | str, dict[str, str]]:
        """The scope `method` on `path` needs, and the path's parameters."""
        private = path.startswith(_PRIVATE_PREFIXES)
        for regex, methods in self._paths:
            found = regex.match(path)
            if found is None:
                continue
            if method in methods:
                return methods[method], found.groupdict()
            # A known path, another method: the app answers 405, to key holders only there.
            return (ANY_KEY if private else auth.OPEN), found.groupdict()
        return (auth.Scope.ADMIN if private else auth.OPEN), {}


class AuthGuard:
    """Checks each request against the route table before the app sees it."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyRing,
        tickets: Tickets,
        error_headers: Callable[[str], Mapping[str, str]] | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.tickets = tickets
        self.routes = RouteTable(auth.ROUTE_SCOPES)
        self.error_headers = error_headers or (lambda path: {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            scope[SCOPE_KEY] = self._authorize(scope)
        except AuthError as exc:
            if scope["type"] == "http":
                await self._refuse_http(exc, scope, receive, send)
            else:
                await _refuse_websocket(exc, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorize(self, scope: Scope) -> auth.ApiKey | None:
        websocket = scope["type"] == "websocket"
        method = auth.WEBSOCKET if websocket else scope["method"].upper()
        method = "GET" if method == "HEAD" else method
        needed, params = self.routes.needed(method, scope["path"])
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        given = auth.bearer(headers.get("authorization"))
        if websocket and needed is not auth.OPEN and given is None:
            query = _query(scope)
            if "ticket" in query:
                return self._redeem(query["ticket"], params.get("session_id", ""), needed)
            given = query.get("token")  # old scripts; the access log masks it
        if needed == ANY_KEY:
            return self.keys.authenticate(given)
        return self.keys.require(given, needed)

    def _redeem(self, ticket: str, session_id: str, needed: auth.Need | str) -> auth.ApiKey | None:
        found = self.tickets.redeem(ticket, session_id)
        if found.key is None:
            return None  # issued while no keys were configured
        if not self.keys.holds(found.key):
            raise AuthError(401, "unauthorized", "the key the ticket was issued to is revoked")
        if isinstance(needed, auth.Scope | frozenset):
            auth.check_scope(found.key, needed)
        return found.key

    async def _refuse_http(
        self, exc: AuthError, scope: Scope, receive: Receive, send: Send
    ) -> None:
        headers = dict(self.error_headers(scope["path"]))
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        else:
            headers["WWW-Authenticate"] = 'Bearer error="insufficient_scope"'
        body = {"error": {"code": exc.code, "message": exc.message}}
        await JSONResponse(body, exc.status, headers=headers)(scope, receive, send)


def _query(scope: Scope) -> dict[str, str]:
    raw = scope.get("query_string", b"").decode("latin-1")
    return dict(parse_qsl(raw, keep_blank_values=True))


async def _refuse_websocket(exc: AuthError, receive: Receive, send: Send) -> None:
    """Accept, send one error message, close with 4401/4403: browsers cannot read a refused
    handshake's status, but they do get the message and the close code."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    close_code = CLOSE_UNAUTHORIZED if exc.status == 401 else CLOSE_FORBIDDEN
    error = dump(ErrorMessage(code=exc.code, message=exc.message))
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": json.dumps(error)})
    await send({"type": "websocket.close", "code": close_code, "reason": exc.message[:120]})
