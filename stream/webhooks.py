"""Webhooks: signed POSTs of alert events to destinations the operator allowed.

A webhook URL passes `WebhookPolicy.check` when the alert is created and again before every
delivery attempt: strict syntax (the source policy's URL parser, http/https only, no userinfo,
at most 2048 characters), then the operator's allow-list (`HOST[:PORT]|CIDR`, nothing allowed
by default), then DNS: the host is resolved once per check and every address must be allowed.
The request goes to a checked address (the IP stands in the URL) while the name is kept for the
Host header and for TLS (SNI and certificate verification), so a name that resolves elsewhere a
moment later (DNS rebinding) changes nothing. `WebhookSender` runs a bounded queue and a few
worker tasks; a delivery is the event's compact JSON signed with HMAC-SHA256 over
`"<timestamp>.<body>"`, retried with exponential backoff while the answer is not 2xx; redirects
are never followed. Its outcome reaches the caller as a `DeliveryResult` on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpx

from livelens.stream.sources.policy import (
    Address,
    Network,
    SourceRefused,
    allowed,
    parse_allow,
    parse_source,
    resolve,
)

logger = logging.getLogger(__name__)

BAD_WEBHOOK = "bad_webhook"
NOT_ALLOWED = "webhook_not_allowed"
MAX_URL_LENGTH = 2048

SCHEMES = {"http": 80, "https": 443}
"""Webhook schemes and their default ports."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_BAD_MESSAGE = f"the webhook must be an http(s):// URL of at most {MAX_URL_LENGTH} characters"
_NOT_ALLOWED_MESSAGE = "the webhook's destination is not allowed by this server's webhook policy"


class WebhookRefused(Exception):
    """A webhook URL the policy refuses: `code` and the generic `message` are for the client,
    `detail` (never shown to the client) for the server log."""

    def __init__(self, code: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.detail = detail or message

    @property
    def status(self) -> int:
        """The HTTP status of the refusal: 403 for a destination, 422 for a malformed URL."""
        return 403 if self.code == NOT_ALLOWED else 422


@dataclass(frozen=True)
class WebhookTarget:
    """A webhook URL that passed the policy, and the addresses it was checked against."""

    url: str
    """Rebuilt from the parsed parts (scheme and host lower-cased, no fragment)."""
    host: str
    """The host name, or the IP address when the URL has one (IPv6 without brackets)."""
    port: int
    """The port, the scheme's default when the URL has none."""
    addresses: tuple[Address, ...]
    """Every address the host resolved to, all checked; connections go to these only."""
    scheme: str
    path: str
    """Path and query, at least "/"."""

    @property
    def address(self) -> Address:
        """The checked address to connect to first."""
        return self.addresses[0]

    @property
    def is_named(self) -> bool:
        """True when the host is a name (SNI and the Host header carry it), not an address."""
        return not _is_ip(self.host)

    @property
    def host_header(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return shown if self.port == SCHEMES[self.scheme] else f"{shown}:{self.port}"

    def connect_url(self, address: Address) -> str:
        """The URL with the checked `address` in place of the host name."""
        shown = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{shown}:{self.port}{self.path}"


@dataclass(frozen=True)
class _Entry:
    """One allow-list entry: a host name or network (as the source policy parses it), and a
    port it is limited to (None = any port)."""

    host: Network | str
    port: int | None

    def applies_to(self, port: int) -> bool:
        return self.port is None or self.port == port


def _parse_entry(entry: str) -> _Entry:
    """An --alert-webhook-allow entry: `HOST[:PORT]` (a name, an IPv4 address, a bracketed
    IPv6 address: `[::1]:8080`) or a CIDR (any port). ValueError when malformed."""
    text = entry.strip()
    port: str | None = None
    if text.startswith("["):  # [IPv6] or [IPv6]:port
        inner, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"--alert-webhook-allow {entry!r}: malformed bracketed address")
        text, port = inner, (rest[1:] if rest else None)
        if "/" in text:
            raise ValueError(f"--alert-webhook-allow {entry!r}: a CIDR takes no brackets")
    elif text.count(":") == 1:  # name:port or IPv4:port; more colons = a bare IPv6 address
        text, _, port = text.partition(":")
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"--alert-webhook-allow {entry!r}: the port must be 1-65535")
    if port is not None and "/" in text:
        raise ValueError(f"--alert-webhook-allow {entry!r}: a CIDR takes no port")
    try:
        host = parse_allow(text)
    except ValueError:
        raise ValueError(
            f"--alert-webhook-allow {entry!r} is neither HOST[:PORT] nor a CIDR"
        ) from None
    return _Entry(host, None if port is None else int(port))


def parse_webhook_allow_list(values: Iterable[str]) -> tuple[str, ...]:
    """Flag and env values, each possibly comma-separated, as policy entries (validated)."""
    entries = tuple(e.strip() for value in values for e in value.split(",") if e.strip())
    for entry in entries:
        _parse_entry(entry)
    return entries


@dataclass(frozen=True)
class WebhookPolicy:
    """Where alert webhooks may be sent (--alert-webhook-allow, $LIVELENS_ALERT_WEBHOOKS).

    An entry is a host name, an IP address (either optionally with `:PORT`; IPv6 in brackets
    when a port follows) or a CIDR. A URL passes when every address its host resolves to is
    allowed by an entry that applies to its port (explicit, or 80/443 by scheme): a name entry
    allows whatever that exact name resolves to, a network entry the addresses inside it (so a
    name not listed passes only if all of its addresses fall into listed networks). Empty:
    nothing is allowed.
    """

    allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for entry in self.allow:
            _parse_entry(entry)  # ValueError for a malformed entry, at start-up

    def check(self, url: str) -> WebhookTarget:
        """The target of a webhook URL; WebhookRefused otherwise. Resolves DNS (blocks)."""
        parts = _parse(url)
        host = parts.hostname or ""
        port = parts.port or SCHEMES[parts.scheme]
        shown = _shown(parts)
        entries = [e for e in map(_parse_entry, self.allow) if e.applies_to(port)]
        names = [e.host for e in entries if isinstance(e.host, str)]
        networks = [e.host for e in entries if not isinstance(e.host, str)]
        # A name that no entry can match is refused before any DNS query is made for it.
        if not (_is_ip(host) or host.rstrip(".") in names or networks):
            raise _refused(shown, f"no allow-list entry matches {host} port {port}")
        addresses = resolve(host, port)
        if not addresses:
            raise _refused(shown, f"cannot resolve {host!r}")
        permitted = allowed([str(e.host) for e in entries], host)
        for address in addresses:
            if not permitted(address):
                raise _refused(shown, f"{host} resolves to {address}, which is not allowed")
        path = parts.path or "/"
        if parts.query:
            path += f"?{parts.query}"
        return WebhookTarget(
            url=shown,
            host=host,
            port=port,
            addresses=tuple(addresses),
            scheme=parts.scheme,
            path=path,
        )

    async def acheck(self, url: str) -> WebhookTarget:
        """`check` in a worker thread, for callers on the event loop."""
        return await asyncio.to_thread(self.check, url)


def _parse(url: str) -> SplitResult:
    """The parsed URL (scheme and host lower-cased) or WebhookRefused(bad_webhook)."""
    scheme = _SCHEME.match(url)
    if len(url) > MAX_URL_LENGTH:
        detail = f"the URL has {len(url)} characters"
    elif scheme is None or scheme.group(1).lower() not in SCHEMES:
        detail = "not an http:// or https:// URL"
    else:
        try:
            parts = parse_source(url)
        except SourceRefused as exc:
            detail = exc.detail
        else:
            if parts is not None and "@" not in parts.netloc:
                return parts
            detail = "the URL has a user name or password"
    logger.info("refused webhook %r: %s", redact_webhook(url[:200]), detail)
    raise WebhookRefused(BAD_WEBHOOK, _BAD_MESSAGE, detail)


def _shown(parts: SplitResult) -> str:
    """The URL rebuilt from its parts (host lower-cased), for the target and the log."""
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    url = f"{parts.scheme}://{netloc}{parts.path or '/'}"
    return f"{url}?{parts.query}" if parts.query else url


def redact_webhook(url: str) -> str:
    """A webhook URL as logs and the API show it: scheme, host and port; a path or query
    (which often carries the receiver's own token) becomes "/…"."""
    head, sep, rest = url.partition("://")
    if not sep:
        return "…"
    netloc, slash, tail = rest.partition("/")
    netloc = netloc.split("?", 1)[0].rsplit("@", 1)[-1]
    hidden = (slash and tail) or "?" in rest.split("/", 1)[0]
    return f"{head}://{netloc}/…" if hidden else f"{head}://{netloc}/"


def _refused(url: str, detail: str) -> WebhookRefused:
    logger.warning("refused webhook %s: %s", redact_webhook(url), detail)
    return WebhookRefused(NOT_ALLOWED, _NOT_ALLOWED_MESSAGE, detail)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-LiveLens-Signature value: HMAC-SHA256 of `"<timestamp>.<body>"` keyed by `secret`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def new_secret() -> str:
    """A fresh webhook secret (32 random bytes, URL-safe base64)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class DeliveryResult:
    """How one delivery ended."""

    ok: bool
    attempts: int
    """Attempts made (0 when the delivery was refused before the first)."""
    status: int | None
    """The last answer's HTTP status; None when there was none."""
    error: str | None
    """Why the last attempt failed (None on success); safe to show to the alert's owner."""


@dataclass
class _Delivery:
    url: str
    secret: str
    body: bytes
    on_result: Callable[[DeliveryResult], None]
    destination: str
    attempts: int = 0
    backoff: asyncio.TimerHandle | None = None


class _AttemptFailed(Exception):
    def __init__(self, error: str, status: int | None = None, *, final: bool = False) -> None:
        super().__init__(error)
        self.error, self.status, self.final = error, status, final


def destination_of(url: str) -> str:
    """The origin deliveries are grouped by (`scheme://host:port`, lower case); the URL itself
    when it does not parse (its first attempt then fails for good)."""
    try:
        parts = urlsplit(url)
        port = parts.port or SCHEMES.get(parts.scheme.lower(), 0)
        host = (parts.hostname or "").lower()
    except ValueError:
        return url
    return f"{parts.scheme.lower()}://{host}:{port}" if host else url


class WebhookSender:
    """Delivers webhooks with `concurrency` worker tasks; one per service.

    Fair across destinations (origins): deliveries wait per destination, workers take
    destinations in turn, and a destination has at most one attempt in flight, so one that hangs
    or keeps failing holds one worker for one timeout at a time while the others deliver. A
    failed attempt's backoff holds no worker. Bounds: `max_queue` deliveries waiting in all
    (backoffs included, attempts in flight not), `max_per_destination` held for one destination.
    Deliveries to one destination are attempted in submission order, a retry before newer ones.
    """

    def __init__(
        self,
        policy: WebhookPolicy,
        *,
        max_queue: int = 1000,
        max_per_destination: int = 100,
        attempts: int = 5,
        backoff_s: float = 1.0,
        timeout_s: float = 5.0,
        concurrency: int = 4,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if min(max_queue, max_per_destination, attempts, concurrency) < 1:
            raise ValueError(
                "max_queue, max_per_destination, attempts and concurrency must be at least 1"
            )
        self.policy = policy
        self.attempts, self.backoff_s, self.timeout_s = attempts, backoff_s, timeout_s
        self.concurrency = concurrency
        self.max_queue, self.max_per_destination = max_queue, max_per_destination
        self._verify = verify
        self._waiting: dict[str, collections.deque[_Delivery]] = {}
        """Per destination, deliveries ready for their next attempt."""
        self._held: collections.Counter[str] = collections.Counter()
        """Per destination, deliveries not finished (waiting, backing off or in flight)."""
        self._turns: collections.deque[str] = collections.deque()
        """Destinations with a waiting delivery and no attempt in flight, in turn order."""
        self._turn_ready = asyncio.Semaphore(0)
        """Counts `_turns`."""
        self._in_flight: set[str] = set()
        self._backoffs: set[asyncio.TimerHandle] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        """Deliveries waiting for an attempt or backing off."""
        return sum(self._held.values()) - len(self._in_flight)

    async def start(self) -> None:
        """Open the HTTP client and start the workers."""
        if self._client is not None:
            return
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=self.timeout_s,
            verify=self._verify,
            # No proxy from the environment: the connection must go to the checked address.
            trust_env=False,
            # No keep-alive: connections are pooled by address, and a connection verified for
            # one name must not carry another name's webhook to the same IP.
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self._workers = [
            asyncio.create_task(self._work(), name=f"webhook-worker-{i}")
            for i in range(self.concurrency)
        ]

    async def close(self) -> None:
        """Stop the workers (deliveries in progress or waiting are dropped without a result)
        and close the HTTP client."""
        self._closed = True
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        for handle in self._backoffs:
            handle.cancel()
        self._backoffs.clear()
        self._waiting.clear()
        self._held.clear()
        self._turns.clear()
        self._in_flight.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def submit(
        self,
        url: str,
        secret: str,
        event: dict[str, Any],
        on_result: Callable[[DeliveryResult], None],
    ) -> bool:
        """Queue a delivery of `event` (its `type` key left out) to `url`; call on the event loop.

        False, after `on_result` got a failed result, when the sender is closed or a bound is
        reached.
        """
        payload = {k: v for k, v in event.items() if k != "type"}
        body = json.dumps(payload, separators=(",", ":")).encode()
        destination = destination_of(url)
        if self._closed:
            error = "webhook sender closed"
        elif self.queued >= self.max_queue:
            error = "delivery queue full"
        elif self._held[destination] >= self.max_per_destination:
            error = "delivery queue for this destination full"
        else:
            self._held[destination] += 1
            self._ready(_Delivery(url, secret, body, on_result, destination))
            return True
        logger.warning("webhook delivery to %s refused: %s", redact_webhook(url[:200]), error)
        _report(on_result, DeliveryResult(ok=False, attempts=0, status=None, error=error))
        return False

    def _ready(self, delivery: _Delivery, *, retry: bool = False) -> None:
        """`delivery` waits for its next attempt; a retry goes before newer deliveries."""
        waiting = self._waiting.setdefault(delivery.destination, collections.deque())
        if retry:
            waiting.appendleft(delivery)
        else:
            waiting.append(delivery)
        self._offer_turn(delivery.destination)

    def _offer_turn(self, destination: str) -> None:
        idle = destination not in self._in_flight and destination not in self._turns
        if idle and self._waiting.get(destination):
            self._turns.append(destination)
            self._turn_ready.release()

    async def _work(self) -> None:
        while True:
            await self._turn_ready.acquire()
            destination = self._turns.popleft()
            delivery = self._waiting[destination].popleft()
            if not self._waiting[destination]:
                del self._waiting[destination]
            self._in_flight.add(destination)
            try:
                result = await self._attempt_once(delivery)
            except Exception:  # a bug here must not cost the service a worker
                logger.exception("webhook delivery crashed")
                result = DeliveryResult(ok=False, attempts=0, status=None, error="internal error")
            finally:
                self._in_flight.discard(destination)
                self._offer_turn(destination)
            if result is None:
                delay = self.backoff_s * 2 ** (delivery.attempts - 1)
                loop = asyncio.get_running_loop()
                delivery.backoff = loop.call_later(delay, self._retry, delivery)
                self._backoffs.add(delivery.backoff)
                continue
            self._finish(delivery, result)

    def _retry(self, delivery: _Delivery) -> None:
        if delivery.backoff is not None:
            self._backoffs.discard(delivery.backoff)
            delivery.backoff = None
        if not self._closed:
            self._ready(delivery, retry=True)

    def _finish(self, delivery: _Delivery, result: DeliveryResult) -> None:
        self._held[delivery.destination] -= 1
        if self._held[delivery.destination] <= 0:
            del self._held[delivery.destination]
        _report(delivery.on_result, result)

    async def _attempt_once(self, delivery: _Delivery) -> DeliveryResult | None:
        """One attempt; its result when the delivery ends, None when it is to be retried."""
        delivery.attempts += 1
        attempt = delivery.attempts
        try:
            status = await self._attempt(delivery)
        except _AttemptFailed as exc:
            logger.info("webhook attempt %d/%d failed: %s", attempt, self.attempts, exc.error)
            if exc.final:
                return DeliveryResult(False, attempt, exc.status, exc.error)
            if attempt < self.attempts:
                return None
            logger.warning(
                "webhook delivery failed after %d attempts: %s", self.attempts, exc.error
            )
            return DeliveryResult(False, attempt, exc.status, exc.error)
        return DeliveryResult(True, attempt, status, None)

    async def _attempt(self, delivery: _Delivery) -> int:
        """One attempt: check the policy again, POST to a checked address; the 2xx status."""
        try:
            async with asyncio.timeout(self.timeout_s):
                target = await self.policy.acheck(delivery.url)
                return await self._post(target, delivery)
        except WebhookRefused as exc:
            # A malformed URL stays malformed; a destination may be allowed again later.
            raise _AttemptFailed(exc.message, final=exc.code == BAD_WEBHOOK) from None
        except TimeoutError:
            raise _AttemptFailed(f"no answer within {self.timeout_s:g} s") from None

    async def _post(self, target: WebhookTarget, delivery: _Delivery) -> int:
        assert self._client is not None, "start() the sender first"
        timestamp = int(time.time())
        headers = {
            "Host": target.host_header,
            "Content-Type": "application/json",
            "User-Agent": "livelens",
            "X-LiveLens-Event": "alert",
            "X-LiveLens-Timestamp": str(timestamp),
            "X-LiveLens-Signature": sign(delivery.secret, timestamp, delivery.body),
        }
        extensions = {"sni_hostname": target.host} if target.is_named else {}
        error = "connection failed"
        for address in target.addresses:  # the next checked address only if one cannot connect
            request = self._client.build_request(
                "POST",
                target.connect_url(address),
                headers=headers,
                content=delivery.body,
                extensions=extensions,
            )
            try:
                # The answer's body is never read: a receiver cannot make us hold megabytes.
                response = await self._client.send(request, stream=True)
            except httpx.ConnectError as exc:
                logger.info("webhook connection to %s failed: %s", address, exc)
                continue
            except httpx.TimeoutException:
                raise _AttemptFailed(f"no answer within {self.timeout_s:g} s") from None
            except httpx.HTTPError as exc:
                raise _AttemptFailed(f"request failed ({type(exc).__name__})") from None
            await response.aclose()
            if 200 <= response.status_code < 300:
                return response.status_code
            if response.is_redirect:
                raise _AttemptFailed(
                    f"HTTP {response.status_code} (redirects are not followed)",
                    response.status_code,
                )
            raise _AttemptFailed(f"HTTP {response.status_code}", response.status_code)
        raise _AttemptFailed(error)


def _report(on_result: Callable[[DeliveryResult], None], result: DeliveryResult) -> None:
    """Hand a result to the caller's callback; its exceptions are logged, never raised."""
    try:
        on_result(result)
    except Exception:
        logger.exception("webhook result callback failed")
