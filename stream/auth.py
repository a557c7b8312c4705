"""Scoped API keys: who may publish, read or administer, and the one table that says which.

A key has a name and scopes: `publish` (WHIP only), `read` (sessions, history, thumbnails, the
question websocket) and `admin` (pull sources, DELETE, key reload; it implies the other two).
Keys come from `--token`/`LIVELENS_TOKEN` (one admin key, as before scopes existed) and from a
keys file of SHA-256 digests (docs/deploy.md, "Keys and scopes"), which SIGHUP or
`POST /v1/keys/reload` reads again without a restart. Presented keys are compared with every
stored digest in constant time.

The websocket also takes a short-lived single-use ticket (`POST /v1/sessions/{id}/ticket`), so
browsers need not put a key in a URL that access logs keep.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)


class Scope(enum.StrEnum):
    """What a key may do; ADMIN implies the others."""

    PUBLISH = "publish"
    READ = "read"
    ADMIN = "admin"


OPEN: Final = None
"""A route anyone may call (health, metrics, the console's static files, OpenAPI)."""

Need = Scope | frozenset[Scope] | None
"""What a route needs: one scope, any one of several, or nothing (OPEN)."""

WEBSOCKET: Final = "WS"
"""The "method" of websocket routes in ROUTE_SCOPES."""

ROUTE_SCOPES: Final[dict[tuple[str, str], Need]] = {
    # Open, as before keys existed: probes, scrapers, the console page and the API docs.
    ("GET", "/healthz"): OPEN,
    ("GET", "/metrics"): OPEN,
    ("GET", "/"): OPEN,
    ("GET", "/console/{path:path}"): OPEN,
    ("GET", "/openapi.json"): OPEN,
    ("GET", "/docs"): OPEN,
    ("GET", "/docs/oauth2-redirect"): OPEN,
    ("GET", "/redoc"): OPEN,
    # WHIP: CORS preflights carry no credentials.
    ("OPTIONS", "/whip"): OPEN,
    ("OPTIONS", "/whip/{session_id}"): OPEN,
    ("POST", "/whip"): Scope.PUBLISH,
    ("PATCH", "/whip/{session_id}"): Scope.PUBLISH,
    ("DELETE", "/whip/{session_id}"): Scope.PUBLISH,
    # Reading sessions, their history and frames, and asking questions.
    ("GET", "/v1/sessions"): Scope.READ,
    # Publishers read their own session's record (`livelens publish` learns from it whether the
    # session was deleted on purpose); ids are random, and publish keys cannot list sessions.
    ("GET", "/v1/sessions/{session_id}"): frozenset({Scope.READ, Scope.PUBLISH}),
    ("GET", "/v1/sessions/{session_id}/history"): Scope.READ,
    ("GET", "/v1/sessions/{session_id}/thumbnails"): Scope.READ,
    ("GET", "/v1/sessions/{session_id}/thumbnail"): Scope.READ,
    ("POST", "/v1/sessions/{session_id}/ticket"): Scope.READ,
    (WEBSOCKET, "/v1/sessions/{session_id}/ws"): Scope.READ,
    # Standing questions are questions: the read scope (webhooks go only where the operator's
    # allow-list lets them).
    ("POST", "/v1/sessions/{session_id}/alerts"): Scope.READ,
    ("GET", "/v1/sessions/{session_id}/alerts"): Scope.READ,
    ("GET", "/v1/sessions/{session_id}/alerts/{alert_id}"): Scope.READ,
    ("DELETE", "/v1/sessions/{session_id}/alerts/{alert_id}"): Scope.READ,
    ("GET", "/v1/sessions/{session_id}/alert-events"): Scope.READ,
    ("GET", "/v1/sessions/{session_id}/alert-events/{event_id}/thumbnail"): Scope.READ,
    ("GET", "/v1/sessions/{session_id}/alert-events/{event_id}/clip"): Scope.READ,
    # Pulling a URL makes the server connect somewhere: admin, as are deletion and key reload.
    ("POST", "/v1/sessions"): Scope.ADMIN,
    ("DELETE", "/v1/sessions/{session_id}"): Scope.ADMIN,
    ("POST", "/v1/keys/reload"): Scope.ADMIN,
}
"""(method, route path) -> the scope a caller needs; OPEN for none. Every route of the app is
here (tests/test_auth.py checks); under /v1/ and /whip a path missing from it needs ADMIN, so a
forgotten route stays shut (stream/auth_guard.py)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def digest(key: str) -> bytes:
    """The SHA-256 digest under which a key is stored."""
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiKey:
    """A stored key: its name (for logs and messages), its digest and its scopes."""

    name: str
    digest: bytes = field(repr=False)
    scopes: frozenset[Scope]

    def allows(self, need: Scope | frozenset[Scope]) -> bool:
        wanted = need if isinstance(need, frozenset) else {need}
        return Scope.ADMIN in self.scopes or bool(self.scopes & wanted)


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the file and line."""


def entry(name: str, scopes: frozenset[Scope] | set[Scope], key: str) -> str:
    """One keys-file line for `key` (what `livelens key` prints)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"key name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")
    if not scopes:
        raise ValueError("a key needs at least one scope")
    order = list(Scope)
    listed = ",".join(s.value for s in sorted(scopes, key=order.index))
    return f"{name} {listed} sha256:{digest(key).hex()}"


def parse_scopes(text: str) -> frozenset[Scope]:
    """`read,publish` -> the scopes; ValueError naming an unknown one."""
    scopes = set()
    for part in text.split(","):
        try:
            scopes.add(Scope(part.strip().lower()))
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise ValueError(f"unknown scope {part.strip()!r} (known: {known})") from None
    return frozenset(scopes)


def parse_keys_file(text: str, source: str = "keys file") -> list[ApiKey]:
    """Read `NAME SCOPES sha256:HEX` lines (`#` comments, blank lines allowed)."""
    keys: list[ApiKey] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        fields = line.split()
        if len(fields) != 3:
            raise KeysFileError(f"{where}: expected 'NAME SCOPES sha256:HEX' (3 fields)")
        name, scope_text, stored = fields
        if not _NAME.fullmatch(name):
            raise KeysFileError(f"{where}: bad key name {name!r}")
        if name in names:
            raise KeysFileError(f"{where}: the name {name!r} is used twice")
        try:
            scopes = parse_scopes(scope_text)
        except ValueError as exc:
            raise KeysFileError(f"{where}: {exc}") from None
        found = _DIGEST.fullmatch(stored.lower())
        if found is None:
            raise KeysFileError(f"{where}: the key must be given as sha256:<64 hex digits>")
        value = bytes.fromhex(found.group(1))
        if value in digests:
            raise KeysFileError(f"{where}: the same key is listed twice")
        names.add(name)
        digests.add(value)
        keys.append(ApiKey(name, value, scopes))
    return keys


class AuthError(Exception):
    """A refused request: 401 (no or unknown credentials) or 403 (wrong scope)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _unauthorized(message: str) -> AuthError:
    return AuthError(401, "unauthorized", message)


def bearer(header: str | None) -> str | None:
    """The credential of an `Authorization: Bearer X` header, else None."""
    scheme, _, given = (header or "").partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None


class KeyRing:
    """The keys in force: fixed ones (`--token`) plus those of a reloadable keys file.

    `enabled` is False when no key at all is configured: then everyone may do everything, as
    `livelens serve` without `--token` always allowed (it logs a warning).
    """

    def __init__(self, fixed: list[ApiKey] | None = None, path: Path | None = None) -> None:
        self.fixed = list(fixed or [])
        self.path = path
        self._from_file: list[ApiKey] = []
        if path is not None:
            self._from_file = self._read(path)

    @classmethod
    def from_token(cls, token: str | None, path: Path | None = None) -> KeyRing:
        """`--token` as one admin key named "token", plus the keys file if any."""
        fixed = [ApiKey("token", digest(token), frozenset({Scope.ADMIN}))] if token else []
        return cls(fixed, path)

    @property
    def enabled(self) -> bool:
        return self.path is not None or bool(self.fixed)

    @property
    def keys(self) -> list[ApiKey]:
        return [*self.fixed, *self._from_file]

    @staticmethod
    def _read(path: Path) -> list[ApiKey]:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeysFileError(f"cannot read the keys file {path}: {exc}") from None
        return parse_keys_file(text, str(path))

    def reload(self) -> int:
        """Read the keys file again; on any error keep the old keys and raise KeysFileError."""
        if self.path is None:
            raise KeysFileError("no keys file is configured (--keys-file)")
        try:
            keys = self._read(self.path)
        except KeysFileError as exc:
            logger.error("keys not reloaded, the previous keys stay in force: %s", exc)
            raise
        self._from_file = keys  # one reference swap: a lookup sees the old list or the new
        logger.info("reloaded %d keys from %s", len(keys), self.path)
        return len(keys)

    def find(self, given: str) -> ApiKey | None:
        """The key whose digest matches `given`; every stored digest is compared, in constant
        time, so neither the timing nor the order of the keys tells anything."""
        wanted = digest(given)
        found = None
        for key in self.keys:
            if hmac.compare_digest(wanted, key.digest):
                found = key
        return found

    def holds(self, key: ApiKey) -> bool:
        """Whether `key` is still in force (a ticket's key may have been revoked since)."""
        return any(k == key for k in self.keys)

    def authenticate(self, given: str | None) -> ApiKey | None:
        """The key for `given`, whatever its scopes; AuthError 401 if there is none.

        None when no keys are configured at all (everyone is let in).
        """
        if not self.enabled:
            return None
        if given is None:
            raise _unauthorized("an API key is required (Authorization: Bearer <key>)")
        key = self.find(given)
        if key is None:
            raise _unauthorized("the API key is not valid (unknown or revoked)")
        return key

    def require(self, given: str | None, scope: Need) -> ApiKey | None:
        """The key for `given` if it may use `scope`; AuthError (401 or 403) otherwise.

        None when nothing is required (an OPEN route, or no keys configured at all).
        """
        if scope is OPEN:
            return None
        key = self.authenticate(given)
        if key is not None:
            check_scope(key, scope)
        return key


def check_scope(key: ApiKey, need: Scope | frozenset[Scope]) -> None:
    """AuthError 403 `forbidden_scope` unless `key` has (one of) the scope(s) needed."""
    if key.allows(need):
        return
    wanted = sorted(need, key=list(Scope).index) if isinstance(need, frozenset) else [need]
    held = ", ".join(s.value for s in sorted(key.scopes, key=list(Scope).index))
    raise AuthError(
        403,
        "forbidden_scope",
        f"this key lacks the {' or '.join(s.value for s in wanted)} scope "
        f"(key {key.name!r} has: {held})",
    )


@dataclass(frozen=True)
class Ticket:
    """A one-time websocket credential for one session, on behalf of a key."""

    session_id: str
    key: ApiKey | None
    expires: float


class Tickets:
    """Single-use websocket tickets: issued for a session, valid `ttl_s`, bounded in number.

    A key holds at most `per_key` valid tickets (its oldest gives way), so a client asking in
    a loop neither grows memory nor pushes out other keys' tickets; `capacity` bounds them all.
    """

    def __init__(self, ttl_s: float = 30, per_key: int = 32, capacity: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.per_key = per_key
        self.capacity = capacity
        self._tickets: OrderedDict[str, Ticket] = OrderedDict()
        # Each key's newest tickets, oldest first; used ones stay listed until pushed out.
        self._by_key: dict[str | None, deque[str]] = {}

    def __len__(self) -> int:
        return len(self._tickets)

    def issue(self, session_id: str, key: ApiKey | None) -> str:
        now = time.monotonic()
        self._expire(now)
        mine = self._by_key.setdefault(key.name if key else None, deque())
        while len(mine) >= self.per_key:
            self._tickets.pop(mine.popleft(), None)
        while len(self._tickets) >= self.capacity:
            self._tickets.popitem(last=False)
        ticket = secrets.token_urlsafe(24)
        self._tickets[ticket] = Ticket(session_id, key, now + self.ttl_s)
        mine.append(ticket)
        return ticket

    def redeem(self, ticket: str, session_id: str) -> Ticket:
        """The ticket, used up; AuthError 401 when unknown, used, expired or for another session."""
        found = self._tickets.pop(ticket, None)
        if found is None or found.expires < time.monotonic():
            raise _unauthorized(
                f"the ticket is unknown, used or expired (tickets last {self.ttl_s:g} s)"
            )
        if found.session_id != session_id:
            raise _unauthorized("the ticket was issued for another session")
        return found

    def _expire(self, now: float) -> None:
        while self._tickets:
            first = next(iter(self._tickets.values()))
            if first.expires >= now:
                return
            self._tickets.popitem(last=False)
