"""`livelens serve` under attack, as a real process on a real port with a real redis-server:
slowloris and idle connections, huge and stalled bodies, a log flood when file descriptors run
out, SIGTERM draining, and history that outlives a crashed node's records.

Sessions come from `--demo` (an operator-chosen looped pull of a generated scene), so no test
depends on which local files the source policy allows.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from media_servers import closed_port
from service_harness import wait_for
from websockets.sync.client import connect

from livelens.stream.demo import DEMO_SESSION

LIVELENS = shutil.which("livelens", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(LIVELENS is None, reason="the livelens console script is missing")

LIMIT_FLAGS = ["--header-timeout", "1", "--keep-alive-timeout", "1", "--body-timeout", "1"]
LIMIT_FLAGS += ["--max-body-bytes", "65536", "--log-repeat-limit", "2"]


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _healthz(url: str) -> httpx.Response | None:
    try:
        return httpx.get(f"{url}/healthz", timeout=1)
    except httpx.HTTPError:
        return None


@contextlib.contextmanager
def serving(argv: list[str], model_cache: Path, log: Path) -> Iterator[Served]:
    """`livelens serve --model tiny ARGV` once healthy; killed afterwards if still running."""
    port = closed_port()
    env = {**os.environ, "LIVELENS_CACHE": str(model_cache)}
    env.pop("LIVELENS_TOKEN", None)
    command = [LIVELENS, "serve", "--model", "tiny", "--device", "cpu", *argv]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    served = Served(process, f"http://127.0.0.1:{port}", port, log)

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"livelens serve exited: {served.log_text()[-3000:]}")
        return _healthz(served.url) is not None

    try:
        wait_for(healthy, timeout=90, interval=0.2)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(model_cache, tmp_path_factory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("limits-serve")
    with serving([*LIMIT_FLAGS, "--redis-url", "none"], model_cache, folder / "serve.log") as s:
        yield s


def _closed_by_server(sock: socket.socket, within: float) -> float:
    """Seconds until the server closes `sock` (recv returns b""); fails after `within`."""
    start = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {within} s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


# ---------------------------------------------------------------------------------- connections
def test_half_sent_request_head_is_closed_within_the_header_timeout(server: Served) -> None:
    with _connect(server.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
        for _ in range(3):  # slowloris: a byte now and then keeps no timer from firing
            time.sleep(0.3)
            sock.sendall(b"a")
        assert _closed_by_server(sock, within=5) < 2


def test_idle_sockets_do_not_stop_healthz_and_are_closed(server: Served) -> None:
    idle = [_connect(server.port) for _ in range(50)]
    try:
        start = time.monotonic()
        response = httpx.get(f"{server.url}/healthz", timeout=5)
        assert response.status_code == 200 and time.monotonic() - start < 1
        for sock in idle:
            assert _closed_by_server(sock, within=5) < 3
    finally:
        for sock in idle:
            sock.close()


# ------------------------------------------------------------------------------- request bodies
def test_huge_and_stalled_bodies_are_refused(server: Served) -> None:
    """A 2 MB chunked JSON body (the attack sent 200 MB) gets 413 at 64 KiB; a body that stops
    arriving gets 408 after the body timeout. The server answers healthz throughout."""

    def chunks() -> Iterator[bytes]:
        yield b'{"source": "'
        for _ in range(32):
            yield b"x" * 65536
        yield b'"}'

    with httpx.Client(timeout=10) as client:
        try:
            refused = client.post(
                f"{server.url}/v1/sessions",
                content=chunks(),
                headers={"Content-Type": "application/json"},
            )
        except httpx.WriteError:  # the server answered and closed while we were sending
            refused = None
        if refused is not None:
            assert refused.status_code == 413
            assert refused.json()["error"]["code"] == "payload_too_large"
    with _connect(server.port) as sock:
        sock.sendall(
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"source": "'
        )
        sock.settimeout(5)
        # The head and the body may come in separate segments: read until the server closes.
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"request_timeout"' in answer
    assert httpx.get(f"{server.url}/healthz").status_code == 200


# -------------------------------------------------------------------------------------- logging
def test_out_of_descriptors_healthz_recovers_and_the_log_stays_small(server: Served) -> None:
    """With its descriptors used up by idle connections, the server logs accept() failures;
    they are rate-limited (2 per interval, then one marker line), and once the header timeout
    has closed the idle connections /healthz answers again."""
    pid = server.process.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    before = server.log_text().count("socket.accept() out of system resource")
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 8, limits[1]))
    idle: list[socket.socket] = []
    try:
        idle = [_connect(server.port) for _ in range(60)]  # the kernel queues what is not taken
        time.sleep(5)  # accept() fails about once a second meanwhile
        start = time.monotonic()
        response = wait_for(lambda: _healthz(server.url), timeout=30, interval=0.2)
        assert response.status_code == 200
        recovered = time.monotonic() - start
    finally:
        for sock in idle:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    text = server.log_text()
    failures = text.count("socket.accept() out of system resource") - before
    assert "[repeated; further identical lines are suppressed]" in text
    assert 1 <= failures <= 3, text[-3000:]
    assert text.count("Traceback") <= 3  # the marker line keeps its traceback
    assert recovered < 30


# ------------------------------------------------------------------------------------- draining
def _ask(ws, message_id: str, **fields) -> None:  # type: ignore[no-untyped-def]
    message = {"type": "ask", "id": message_id, "question": "what moves?", **fields}
    ws.send(json.dumps(message))


def test_sigterm_drains_then_exits(model_cache, redis_server, tmp_path) -> None:
    """SIGTERM: new sessions and questions get 503/`draining`, the questions already queued
    finish or fail within --drain-timeout, each lands in the history (failed ones with their
    reason), and the process exits 0."""
    argv = ["--demo", "--redis-url", redis_server.url, "--drain-timeout", "2"]
    with serving(argv, model_cache, tmp_path / "serve.log") as served:
        url = served.url

        def frames() -> bool:
            record = httpx.get(f"{url}/v1/sessions/{DEMO_SESSION}").json()
            return record["status"]["frames_in_model"] >= 2

        wait_for(frames, timeout=60, interval=0.2)
        ws_url = f"ws://127.0.0.1:{served.port}/v1/sessions/{DEMO_SESSION}/ws"
        with connect(ws_url) as ws:
            asked = [f"q{i}" for i in range(8)]
            for message_id in asked:
                _ask(ws, message_id, max_new_tokens=1024, temperature=1.0, seed=1)
            while json.loads(ws.recv(timeout=30))["type"] != "token":
                pass
            served.process.send_signal(signal.SIGTERM)

            def draining() -> bool:
                response = _healthz(url)
                return response is not None and response.status_code == 503

            wait_for(draining, timeout=5, interval=0.05)
            refused = httpx.post(f"{url}/v1/sessions", json={"source": "/x.mp4"})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "draining"
            _ask(ws, "late")
            outcomes: dict[str, str] = {}
            with contextlib.suppress(Exception):  # the server closes the socket at the end
                while len(outcomes) < len(asked) + 1:
                    message = json.loads(ws.recv(timeout=10))
                    if message["type"] in ("answer", "error"):
                        outcomes[message["id"]] = message.get("code", "answered")
        code = served.process.wait(timeout=60)
    assert code == 0, served.log_text()[-3000:]
    assert outcomes["late"] == "draining"
    assert set(outcomes) == {*asked, "late"}
    assert "draining" in outcomes.values()  # 8 x 1024 tokens do not fit in 2 s
    history = redis_server.history(DEMO_SESSION)
    assert sorted(e["question_id"] for e in history) == sorted(asked)
    for entry in history:
        expected = outcomes[entry["question_id"]]
        if expected == "answered":
            assert "error" not in entry and entry["text"]
        else:
            assert entry["error"]["code"] == "draining" and entry["text"] == ""


# ------------------------------------------------------------------------------------ durability
def test_history_outlives_a_crashed_nodes_record(model_cache, redis_server, tmp_path) -> None:
    """A node is killed (no chance to write anything); its live record expires with the
    heartbeat TTL, but the answers in Redis stay readable through any other node."""
    argv = ["--demo", "--redis-url", redis_server.url]
    with serving(argv, model_cache, tmp_path / "first.log") as first:

        def frames() -> bool:
            record = httpx.get(f"{first.url}/v1/sessions/{DEMO_SESSION}").json()
            return record["status"]["frames_in_model"] >= 2

        wait_for(frames, timeout=60, interval=0.2)
        ws_url = f"ws://127.0.0.1:{first.port}/v1/sessions/{DEMO_SESSION}/ws"
        with connect(ws_url) as ws:
            _ask(ws, "before-crash", max_new_tokens=4)
            while json.loads(ws.recv(timeout=30))["type"] != "answer":
                pass
        wait_for(lambda: redis_server.history(DEMO_SESSION), timeout=10)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        # The record's TTL is the heartbeat's (15 s); the history's is the retention (7 days).
        wait_for(lambda: not r.exists(f"livelens:session:{DEMO_SESSION}"), timeout=30)
        assert r.xlen(f"livelens:history:{DEMO_SESSION}") == 1
    finally:
        r.close()
    with serving(["--redis-url", redis_server.url], model_cache, tmp_path / "second.log") as other:
        response = httpx.get(f"{other.url}/v1/sessions/{DEMO_SESSION}/history")
        assert response.status_code == 200, response.text
        assert [e["question_id"] for e in response.json()["entries"]] == ["before-crash"]
        assert httpx.get(f"{other.url}/v1/sessions/{DEMO_SESSION}").status_code == 404
        missing = httpx.get(f"{other.url}/v1/sessions/nosuchsession/history")
        assert missing.status_code == 404
