"""Webhook delivery against a real HTTP(S) server on loopback: signatures, retries, redirects,
timeouts, the queue bound, and the destination policy (allow-list, ports, DNS, URL syntax)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import ipaddress
import json
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from media_servers import self_signed_certificate, tls_context

from livelens.stream import webhooks
from livelens.stream.sources.policy import Address, SourcePolicy
from livelens.stream.webhooks import (
    BAD_WEBHOOK,
    NOT_ALLOWED,
    DeliveryResult,
    WebhookPolicy,
    WebhookRefused,
    WebhookSender,
    new_secret,
    parse_webhook_allow_list,
    sign,
)

EVENT = {
    "type": "alert",
    "event_id": "ev_5d1e2c3b4a69",
    "alert_id": "al_3f9c0e6a1b2d",
    "condition": "a red ball is visible",
    "confidence": 0.93,
}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HookServer:
    """An HTTP server on 127.0.0.1 recording every request; `fail` answers 500 that many times
    before 200s, `status` overrides every answer, `hang` holds requests until stopped."""

    fail: int = 0
    status: int | None = None
    hang: bool = False
    tls: ssl.SSLContext | None = None
    requests: list[Received] = field(default_factory=list)
    arrived: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    released: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append(Received(self.path, dict(self.headers), body))
                server.arrived.release()
                if server.hang:
                    server.released.wait(30)
                    return
                if server.status is not None:
                    status = server.status
                elif server.fail > 0:
                    server.fail -= 1
                    status = 500
                else:
                    status = 204
                self.send_response(status)
                if status in (301, 302, 307, 308):
                    self.send_header("Location", f"http://127.0.0.1:{server.port}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def stop(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def other() -> HookServer:
    """A second receiver, for deliveries to another destination."""
    hook = HookServer()
    yield hook
    hook.stop()


@pytest.fixture
def server() -> HookServer:
    hook = HookServer()
    yield hook
    hook.stop()


def deliver(
    sender: WebhookSender, url: str, secret: str = "s3cret", event: dict | None = None
) -> DeliveryResult:
    """Start the sender, deliver one event, wait for its result, close."""

    async def scenario() -> DeliveryResult:
        await sender.start()
        done: asyncio.Future[DeliveryResult] = asyncio.get_running_loop().create_future()
        assert sender.submit(url, secret, event or EVENT, done.set_result)
        try:
            return await asyncio.wait_for(done, 20)
        finally:
            await sender.close()

    return asyncio.run(scenario())


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[str]]]:
    """Names under .test resolve to the addresses listed for them, one list per lookup (the
    last one repeats); other names go to the real resolver."""
    answers: dict[str, list[list[str]]] = {}
    real = webhooks.resolve

    def resolve(host: str, port: int | None) -> list[Address]:
        if host not in answers:
            return real(host, port)
        queue = answers[host]
        now = queue.pop(0) if len(queue) > 1 else queue[0]
        return [ipaddress.ip_address(a) for a in now]

    monkeypatch.setattr(webhooks, "resolve", resolve)
    return answers


def certificate_for(name: str, folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate valid for the DNS name `name` only (no IP address in it)."""
    return self_signed_certificate(folder, name, address=None)


def fast(policy: WebhookPolicy, **kwargs: Any) -> WebhookSender:
    options: dict[str, Any] = {"backoff_s": 0.01, "timeout_s": 2.0} | kwargs
    return WebhookSender(policy, **options)


def loopback(server: HookServer) -> WebhookPolicy:
    return WebhookPolicy(allow=(f"127.0.0.1:{server.port}",))


# --- delivery --------------------------------------------------------------------------------


def test_delivery_is_signed_over_timestamp_and_raw_body(server: HookServer) -> None:
    secret = new_secret()
    result = deliver(fast(loopback(server)), server.url("/hook?x=1"), secret)
    assert result == DeliveryResult(ok=True, attempts=1, status=204, error=None)
    [request] = server.requests
    assert request.path == "/hook?x=1"
    payload = {k: v for k, v in EVENT.items() if k != "type"}
    assert request.body == json.dumps(payload, separators=(",", ":")).encode()  # compact
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers["x-livelens-event"] == "alert"
    assert headers["user-agent"] == "livelens"
    assert headers["host"] == f"127.0.0.1:{server.port}"
    timestamp = headers["x-livelens-timestamp"]
    expected = hmac.new(
        secret.encode(), timestamp.encode() + b"." + request.body, hashlib.sha256
    ).hexdigest()
    assert headers["x-livelens-signature"] == f"sha256={expected}"
    assert headers["x-livelens-signature"] != sign("another secret", int(timestamp), request.body)


def test_retries_until_success(server: HookServer) -> None:
    server.fail = 2
    result = deliver(fast(loopback(server)), server.url())
    assert result == DeliveryResult(ok=True, attempts=3, status=204, error=None)
    assert len(server.requests) == 3
    # Each attempt is signed afresh and carries the same body.
    assert len({r.body for r in server.requests}) == 1


def test_all_attempts_fail(server: HookServer) -> None:
    server.status = 503
    result = deliver(fast(loopback(server), attempts=4), server.url())
    assert result == DeliveryResult(ok=False, attempts=4, status=503, error="HTTP 503")
    assert len(server.requests) == 4


def test_backoff_doubles(server: HookServer) -> None:
    server.status = 500
    loop_times: list[float] = []
    sender = fast(loopback(server), attempts=3, backoff_s=0.2)

    async def scenario() -> DeliveryResult:
        await sender.start()
        done: asyncio.Future[DeliveryResult] = asyncio.get_running_loop().create_future()
        loop_times.append(asyncio.get_running_loop().time())
        sender.submit(server.url(), "k", EVENT, done.set_result)
        result = await done
        loop_times.append(asyncio.get_running_loop().time())
        await sender.close()
        return result

    assert asyncio.run(scenario()).attempts == 3
    assert 0.6 <= loop_times[1] - loop_times[0] < 3.0  # 0.2 + 0.4 s of backoff


def test_redirect_is_not_followed(server: HookServer) -> None:
    server.status = 302
    result = deliver(fast(loopback(server), attempts=2), server.url())
    assert result.ok is False and result.attempts == 2 and result.status == 302
    assert "redirect" in (result.error or "")
    assert [r.path for r in server.requests] == ["/hook", "/hook"]  # never /elsewhere


def test_timeout_counts_as_a_failed_attempt(server: HookServer) -> None:
    server.hang = True
    result = deliver(fast(loopback(server), attempts=2, timeout_s=0.3), server.url())
    assert result == DeliveryResult(
        ok=False, attempts=2, status=None, error="no answer within 0.3 s"
    )
    assert len(server.requests) == 2


def test_connection_refused_is_a_failed_attempt() -> None:
    hook = HookServer()
    hook.stop()  # nothing listens on its port any more
    result = deliver(fast(loopback(hook), attempts=2), hook.url())
    assert result.ok is False and result.attempts == 2 and result.status is None
    assert result.error == "connection failed"


def test_policy_is_checked_again_at_each_attempt(server: HookServer) -> None:
    """A destination allowed at submit time but not at delivery time is never contacted."""
    sender = fast(WebhookPolicy(allow=(f"127.0.0.1:{server.port + 1}",)), attempts=2)
    result = deliver(sender, server.url())
    assert result.ok is False and result.attempts == 2
    assert result.error is not None and "not allowed" in result.error
    assert server.requests == []


def test_a_malformed_url_is_not_retried() -> None:
    result = deliver(fast(WebhookPolicy(allow=("127.0.0.1",))), "ftp://127.0.0.1/x")
    assert result.ok is False and result.attempts == 1 and result.status is None
    assert result.error is not None and result.error.startswith("the webhook must be")


def test_queue_bound(server: HookServer) -> None:
    server.hang = True
    sender = fast(loopback(server), max_queue=1, concurrency=1, timeout_s=5.0)
    results: list[DeliveryResult] = []

    async def scenario() -> list[bool]:
        await sender.start()
        first = sender.submit(server.url(), "k", EVENT, results.append)
        # Wait until the only worker holds the first delivery (the server hangs on it).
        await asyncio.to_thread(server.arrived.acquire, True, 10)
        second = sender.submit(server.url(), "k", EVENT, results.append)  # waits in the queue
        third = sender.submit(server.url(), "k", EVENT, results.append)  # the queue is full
        await sender.close()
        after = sender.submit(server.url(), "k", EVENT, results.append)
        return [first, second, third, after]

    assert asyncio.run(scenario()) == [True, True, False, False]
    assert results == [
        DeliveryResult(ok=False, attempts=0, status=None, error="delivery queue full"),
        DeliveryResult(ok=False, attempts=0, status=None, error="webhook sender closed"),
    ]
    assert len(server.requests) == 1


def test_a_hanging_destination_holds_one_worker_and_the_others_deliver(
    server: HookServer, other: HookServer
) -> None:
    """Deliveries to a destination that never answers take one worker, one attempt at a time,
    even when more arrive while one is in flight; a delivery to another destination submitted
    after them arrives at once."""
    server.hang = True
    policy = WebhookPolicy(allow=(f"127.0.0.1:{server.port}", f"127.0.0.1:{other.port}"))
    sender = fast(policy, concurrency=2, timeout_s=4.0, attempts=2)
    results: list[tuple[str, DeliveryResult]] = []

    async def scenario() -> float:
        await sender.start()
        loop = asyncio.get_running_loop()

        def hanging() -> bool:
            return sender.submit(server.url(), "k", EVENT, lambda r: results.append(("a", r)))

        assert hanging()
        await asyncio.to_thread(server.arrived.acquire, True, 10)
        assert all(hanging() for _ in range(5))
        await asyncio.sleep(0.2)  # time for a second worker to take one of them, if it could
        started = loop.time()
        done: asyncio.Future[DeliveryResult] = loop.create_future()
        assert sender.submit(other.url(), "k", EVENT, done.set_result)
        assert (await asyncio.wait_for(done, 10)).ok
        elapsed = loop.time() - started
        await sender.close()
        return elapsed

    elapsed = asyncio.run(scenario())
    assert elapsed < 2.0  # not behind the hanging destination's 4 s timeouts
    assert len(server.requests) == 1  # one attempt in flight to the hanging destination
    assert len(other.requests) == 1 and results == []


def test_a_backoff_holds_no_worker(server: HookServer, other: HookServer) -> None:
    """While a failing delivery waits to be retried, the only worker delivers elsewhere."""
    server.status = 500
    policy = WebhookPolicy(allow=(f"127.0.0.1:{server.port}", f"127.0.0.1:{other.port}"))
    sender = fast(policy, concurrency=1, attempts=3, backoff_s=1.0)
    order: list[str] = []

    async def scenario() -> float:
        await sender.start()
        both = asyncio.Event()

        def record(name: str):
            def done(result: DeliveryResult) -> None:
                order.append(f"{name}:{result.ok}:{result.attempts}")
                if len(order) == 2:
                    both.set()

            return done

        sender.submit(server.url(), "k", EVENT, record("failing"))
        await asyncio.to_thread(server.arrived.acquire, True, 10)
        loop = asyncio.get_running_loop()
        started = loop.time()
        sender.submit(other.url(), "k", EVENT, record("other"))
        await asyncio.to_thread(other.arrived.acquire, True, 10)
        elapsed = loop.time() - started
        await asyncio.wait_for(both.wait(), 20)
        await sender.close()
        return elapsed

    elapsed = asyncio.run(scenario())
    assert elapsed < 0.8  # during the failing delivery's first 1 s backoff
    assert order == ["other:True:1", "failing:False:3"]


def test_per_destination_bound(server: HookServer, other: HookServer) -> None:
    """One destination cannot take the whole queue: past its bound only it is refused."""
    server.hang = True
    policy = WebhookPolicy(allow=(f"127.0.0.1:{server.port}", f"127.0.0.1:{other.port}"))
    sender = fast(policy, max_per_destination=2, concurrency=1, timeout_s=5.0)
    refused: list[DeliveryResult] = []

    async def scenario() -> list[bool]:
        await sender.start()
        accepted = [sender.submit(server.url(), "k", EVENT, refused.append) for _ in range(3)]
        # The same origin however the URL is written.
        accepted.append(sender.submit(server.url("/other?x"), "k", EVENT, refused.append))
        accepted.append(sender.submit(other.url(), "k", EVENT, refused.append))
        await sender.close()
        return accepted

    assert asyncio.run(scenario()) == [True, True, False, False, True]
    error = "delivery queue for this destination full"
    assert refused == [DeliveryResult(ok=False, attempts=0, status=None, error=error)] * 2


def test_a_failing_callback_does_not_kill_the_worker(
    server: HookServer, caplog: pytest.LogCaptureFixture
) -> None:
    sender = fast(loopback(server), concurrency=1)
    results: list[DeliveryResult] = []

    def broken(result: DeliveryResult) -> None:
        results.append(result)
        raise RuntimeError("callback bug")

    async def scenario() -> DeliveryResult:
        await sender.start()
        done: asyncio.Future[DeliveryResult] = asyncio.get_running_loop().create_future()
        sender.submit(server.url(), "k", EVENT, broken)
        sender.submit(server.url(), "k", EVENT, done.set_result)
        result = await asyncio.wait_for(done, 10)
        await sender.close()
        return result

    assert asyncio.run(scenario()).ok
    assert [r.ok for r in results] == [True] and len(server.requests) == 2
    assert "webhook result callback failed" in caplog.text


def test_https_goes_to_the_checked_address_with_the_name_for_tls(
    tmp_path: Path, fake_dns: dict[str, list[list[str]]]
) -> None:
    """`https://hooks.test:PORT` (a name no real DNS knows) reaches the server at 127.0.0.1,
    the certificate (valid for hooks.test only, not for the IP) is verified for the name (SNI),
    and the Host header carries the name."""
    fake_dns["hooks.test"] = [["127.0.0.1"]]
    cert, key = certificate_for("hooks.test", tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    hook = HookServer(tls=tls_context(cert, key))
    try:
        policy = WebhookPolicy(allow=("127.0.0.0/8",))
        result = deliver(fast(policy, verify=trust), hook.url(host="hooks.test"))
        assert result == DeliveryResult(ok=True, attempts=1, status=204, error=None)
        assert hook.requests[0].headers["Host"] == f"hooks.test:{hook.port}"
        # Without trusting that certificate the same delivery fails: TLS is really verified.
        failed = deliver(fast(policy, attempts=1), hook.url(host="hooks.test"))
        assert failed == DeliveryResult(
            ok=False, attempts=1, status=None, error="connection failed"
        )
        assert len(hook.requests) == 1
    finally:
        hook.stop()


def test_each_attempt_resolves_and_checks_again(
    server: HookServer, fake_dns: dict[str, list[list[str]]]
) -> None:
    """DNS rebinding between attempts: the lookup that gives a forbidden address costs an
    attempt and contacts nobody; the next one, allowed again, delivers."""
    server.fail = 1
    fake_dns["hooks.test"] = [["127.0.0.1"], ["169.254.169.254"], ["127.0.0.1"]]
    sender = fast(WebhookPolicy(allow=("127.0.0.0/8",)))
    result = deliver(sender, server.url(host="hooks.test"))
    assert result == DeliveryResult(ok=True, attempts=3, status=204, error=None)
    assert len(server.requests) == 2
    assert all(r.headers["Host"] == f"hooks.test:{server.port}" for r in server.requests)


# --- policy ----------------------------------------------------------------------------------


def _refused(policy: WebhookPolicy, url: str) -> str:
    with pytest.raises(WebhookRefused) as refused:
        policy.check(url)
    return refused.value.code


def test_empty_allow_list_refuses_everything(server: HookServer) -> None:
    policy = WebhookPolicy()
    for url in (
        server.url(),
        "https://hooks.example.com/x",
        "http://localhost/",
        "http://8.8.8.8/",
    ):
        assert _refused(policy, url) == NOT_ALLOWED


def test_loopback_refused_unless_allowed(server: HookServer) -> None:
    assert _refused(WebhookPolicy(allow=("hooks.example.com",)), server.url()) == NOT_ALLOWED
    assert _refused(WebhookPolicy(allow=("10.0.0.0/8",)), server.url()) == NOT_ALLOWED
    for entry in ("127.0.0.1", f"127.0.0.1:{server.port}", "127.0.0.0/8"):
        target = WebhookPolicy(allow=(entry,)).check(server.url("/a?b=c"))
        assert str(target.address) == "127.0.0.1" and target.port == server.port
        assert target.url == f"http://127.0.0.1:{server.port}/a?b=c"


def test_port_in_the_entry_limits_the_port() -> None:
    policy = WebhookPolicy(allow=("127.0.0.1:8080", "localhost:443", "[::1]:9000"))
    assert policy.check("http://127.0.0.1:8080/").port == 8080
    assert _refused(policy, "http://127.0.0.1:8081/") == NOT_ALLOWED
    assert _refused(policy, "http://127.0.0.1/") == NOT_ALLOWED  # port 80
    assert policy.check("https://localhost/").port == 443  # the scheme's default port
    assert _refused(policy, "http://localhost/") == NOT_ALLOWED
    assert policy.check("http://[::1]:9000/").host == "::1"
    assert _refused(policy, "http://[::1]:9001/") == NOT_ALLOWED


def test_a_name_passes_only_if_all_its_addresses_are_allowed() -> None:
    """The rule: a name entry allows what that exact name resolves to; a name not listed passes
    only when every one of its addresses is inside a listed network."""
    by_name = WebhookPolicy(allow=("localhost",)).check("http://LOCALHOST:8000/A?B")
    assert by_name.url == "http://localhost:8000/A?B"
    assert by_name.host == "localhost" and all(a.is_loopback for a in by_name.addresses)
    assert by_name.is_named and by_name.host_header == "localhost:8000"
    by_network = WebhookPolicy(allow=("127.0.0.0/8", "::1/128")).check("http://localhost:8000/")
    assert by_network.addresses == by_name.addresses
    # localhost's addresses are not in 10/8; a listed name does not allow other names.
    assert _refused(WebhookPolicy(allow=("10.0.0.0/8",)), "http://localhost/") == NOT_ALLOWED
    assert _refused(WebhookPolicy(allow=("localhost",)), "http://127.0.0.1/") == NOT_ALLOWED
    assert (
        _refused(WebhookPolicy(allow=("localhost", "10.0.0.0/8")), "http://nope.invalid/")
        == NOT_ALLOWED
    )


def test_an_address_outside_the_networks_of_a_name_refuses_it(
    fake_dns: dict[str, list[list[str]]],
) -> None:
    """One resolved address outside the allowed networks refuses the name."""
    fake_dns["hooks.test"] = [["10.1.2.3", "169.254.169.254"]]
    fake_dns["ok.test"] = [["10.1.2.3", "10.9.9.9"]]
    policy = WebhookPolicy(allow=("10.0.0.0/8",))
    assert _refused(policy, "http://hooks.test/") == NOT_ALLOWED
    assert [str(a) for a in policy.check("http://ok.test/").addresses] == ["10.1.2.3", "10.9.9.9"]


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/x",
        "file:///etc/passwd",
        "rtsp://127.0.0.1/x",
        "javascript:alert(1)",
        "127.0.0.1:8000/hook",
        "//127.0.0.1/hook",
        "http:127.0.0.1/hook",
        "http:///hook",
        "http://127.0.0.1/a b",
        "http://127.0.0.1/a\tb",
        "http://127.0.0.1/\r\nX-Injected: 1",
        "http://127.0.0.1/%0d%0a",
        "http://127.0.0.1/caf\u00e9",
        "http://user:pw@127.0.0.1/hook",
        "http://user@127.0.0.1/hook",
        "http://@127.0.0.1/hook",
        "http://127.0.0.1:99999/hook",
        "http://127.0.0.1:0/hook",
        "http://127.0.0.1:x/hook",
        "http://bad_host-.example/",
        "http://127.0.0.1/" + "a" * 2048,
    ],
)
def test_malformed_urls_are_bad_webhooks(url: str) -> None:
    policy = WebhookPolicy(allow=("127.0.0.0/8", "0.0.0.0/0"))
    with pytest.raises(WebhookRefused) as refused:
        policy.check(url)
    assert refused.value.code == BAD_WEBHOOK and refused.value.status == 422
    assert url not in refused.value.message  # generic client-facing message


def test_schemes_in_any_case_and_the_length_limit() -> None:
    policy = WebhookPolicy(allow=("127.0.0.1",))
    assert policy.check("HTTP://127.0.0.1/x").url == "http://127.0.0.1/x"
    assert policy.check("HttpS://127.0.0.1/x").scheme == "https"
    longest = "http://127.0.0.1/"
    longest += "a" * (2048 - len(longest))
    assert policy.check(longest).url == longest
    assert _refused(policy, longest + "a") == BAD_WEBHOOK


def test_refusal_messages_are_generic(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(WebhookRefused) as refused:
        WebhookPolicy(allow=("10.0.0.0/8",)).check("http://127.0.0.1:6379/")
    assert refused.value.status == 403
    assert "127.0.0.1" not in refused.value.message and "127.0.0.1" in refused.value.detail
    assert "127.0.0.1" in caplog.text


def test_async_check(server: HookServer) -> None:
    target = asyncio.run(loopback(server).acheck(server.url()))
    assert target.port == server.port


@pytest.mark.parametrize(
    "entry",
    ["", "host:", "host:0", "host:65536", "host:x", "10.0.0.0/8:80", "[::1", "[::1]x", "a b", "*"],
)
def test_malformed_allow_entries_are_refused_at_start_up(entry: str) -> None:
    with pytest.raises(ValueError):
        WebhookPolicy(allow=(entry,))


def test_allow_list_from_flags_and_env() -> None:
    entries = parse_webhook_allow_list(["hooks.example.com:8443", "10.0.0.0/8, [::1]:9000,"])
    assert entries == ("hooks.example.com:8443", "10.0.0.0/8", "[::1]:9000")
    with pytest.raises(ValueError):
        parse_webhook_allow_list(["ok.example.com,bad host"])


def test_source_policy_still_trusts_its_allow_entries() -> None:
    """The helpers shared with the source policy behave as before there."""
    assert SourcePolicy(allow=("127.0.0.1",)).check("http://127.0.0.1:1/x").is_network


def test_sign_matches_hmac() -> None:
    body = b'{"a":1}'
    digest = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k", 1700000000, body) == f"sha256={digest}"
    assert new_secret() != new_secret() and len(new_secret()) >= 43
