"""Seeded, bounded fuzzing of every network input of `livelens serve`, run by plain `pytest`.

One real app for the module (in-process through Starlette's TestClient, around the tiny model,
a real redis-server and a live pull session of a real encoded clip) takes 3,400 hostile cases: WHIP
offers mutated from a real aiortc offer, trickle-ICE PATCH fragments, websocket messages (asks,
cancels, alert watches), REST bodies and query strings (sessions, history, thumbnails, alerts),
and pull-source URLs. For every case: no 5xx, a 4xx carries the JSON
error shape, every websocket reply is valid UTF-8 (what uvicorn's encoder would need; the
TestClient does not encode), and no traceback reaches the log; after each group the app still
answers a question on the good session.

LIVELENS_FUZZ_SEED=<int> replays a run (the default is fixed, so CI is deterministic); every
failure message starts with the seed and the case number.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import fuzz_cases
import httpx
import pytest
from fastapi.testclient import TestClient
from media_servers import closed_port
from redis_server import RedisServer
from service_harness import fast_config, wait_for
from starlette.testclient import WebSocketTestSession
from test_whip import aiortc_offer, strip_candidates
from videos import make_video

from livelens.model.runner import ModelRunner
from livelens.stream.app import create_app
from livelens.stream.protocol import ProtocolError, parse_client_message
from livelens.stream.service import LiveService
from livelens.stream.sources.pull import PullConfig
from livelens.stream.whip import WhipIngest

SEED = int(os.environ.get("LIVELENS_FUZZ_SEED", "20261201"))
CASES = {"sdp": 500, "patch": 400, "ws": 1200, "rest": 800, "source": 500}
"""Cases per group: 3,400 in all, about 30 s on a 2-core machine."""


class LogRecorder(logging.Handler):
    """Keeps every record with a traceback (exc_info or a formatted one in the message)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.tracebacks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info or "Traceback (most recent call last)" in text:
            self.tracebacks.append(f"{record.name}: {text[:300]}")


@dataclass
class Target:
    http: TestClient
    service: LiveService
    good: str
    """A pull session of a real clip, asked a question after each group."""
    files: list[str]
    logs: LogRecorder
    ingest: WhipIngest


def where(group: str, index: int, case: object) -> str:
    return (
        f"LIVELENS_FUZZ_SEED={SEED} {group} case {index}: {case!r:.300} "
        f"(replay: LIVELENS_FUZZ_SEED={SEED} pytest tests/test_fuzz.py -k {group})"
    )


def url_quote(text: str) -> str:
    """Percent-encoded, lone surrogates included (as the invalid UTF-8 a client could send)."""
    return quote(text, safe="", errors="surrogatepass")


def check(response: httpx.Response, context: str) -> None:
    """No 5xx; a 4xx has the app's error shape."""
    assert response.status_code < 500, f"{context} -> {response.status_code} {response.text:.300}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"], context


@pytest.fixture(scope="module")
def target(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    folder = tmp_path_factory.mktemp("fuzz")
    redis = RedisServer(folder / "redis")
    redis.start()
    clip = make_video(folder / "clip.mp4", frames=40, fps=10, pattern="moving_square")
    pull = PullConfig(
        reconnect_initial_s=0.1, reconnect_max_s=0.2, give_up_after_s=0.5, open_timeout_s=2.0
    )
    config = fast_config(redis.url, pull=pull, media_root=folder)
    service = LiveService(ModelRunner(tiny_model), config)
    recorder = LogRecorder()
    root = logging.getLogger()
    root.addHandler(recorder)
    try:
        app = create_app(service)
        with TestClient(app, raise_server_exceptions=False) as http:
            # Live for the whole module (a looped file at its media rate), as a camera would be.
            source = {"source": str(clip.path), "realtime": True, "loop": True, "fps": 0.5}
            created = http.post("/v1/sessions", json=source)
            assert created.status_code == 201, created.text
            good = created.json()["id"]
            wait_for(lambda: service.sessions[good].status()["frames_in_model"] >= 2)
            yield Target(http, service, good, [str(clip.path)], recorder, app.state.ingest)
    finally:
        root.removeHandler(recorder)
        redis.stop()


def ask_good_session(target: Target) -> None:
    """The server still serves: health, the session list, and an answer on the good session."""
    assert target.http.get("/healthz").status_code == 200
    assert target.http.get("/v1/sessions").status_code == 200
    with target.http.websocket_connect(f"/v1/sessions/{target.good}/ws") as ws:
        ws.send_text(
            json.dumps({"type": "ask", "id": "alive", "question": "hi", "max_new_tokens": 2})
        )
        while (message := receive(ws))["type"] != "answer":
            assert message["type"] in ("status", "token"), message


def receive(ws: WebSocketTestSession) -> dict:
    """The next server message, checked to be sendable: valid UTF-8 JSON."""
    text = ws.receive_text()
    assert fuzz_cases.is_utf8(text), f"seed {SEED}: a reply no UTF-8 encoder takes: {text!r:.200}"
    return json.loads(text)


def finish_group(target: Target) -> None:
    assert not target.logs.tracebacks, f"seed {SEED}: tracebacks logged: {target.logs.tracebacks}"
    ask_good_session(target)


def test_fuzz_whip_offers(target: Target) -> None:
    rng = random.Random(f"{SEED}-sdp")
    offer = aiortc_offer()
    statuses: dict[int, int] = {}
    for index in range(CASES["sdp"]):
        body = fuzz_cases.sdp_offer(rng, offer)
        response = target.http.post(
            "/whip", content=body, headers={"Content-Type": "application/sdp"}
        )
        check(response, where("sdp", index, body))
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code == 201:
            check(target.http.delete(response.headers["location"]), where("sdp", index, body))
    # The mutations reach both sides: accepted offers and each kind of refusal.
    assert statuses.get(201, 0) > 0 and statuses.get(400, 0) > 0, statuses
    assert target.ingest.session_ids() == []  # every accepted publication was deleted
    finish_group(target)


def test_fuzz_trickle_patch(target: Target) -> None:
    rng = random.Random(f"{SEED}-patch")
    offer, _ = strip_candidates(aiortc_offer())
    ufrag = next(line for line in offer.splitlines() if line.startswith("a=ice-ufrag:"))[12:]
    pwd = next(line for line in offer.splitlines() if line.startswith("a=ice-pwd:"))[10:]
    sdp = {"Content-Type": "application/sdp"}

    def publish() -> tuple[str, str]:
        response = target.http.post("/whip", content=offer, headers=sdp)
        assert response.status_code == 201, response.text
        return response.headers["location"], response.headers["etag"]

    location, etag = publish()
    accepted = 0
    for index in range(CASES["patch"]):
        body = fuzz_cases.patch_fragment(rng, ufrag, pwd)
        headers = {"Content-Type": "application/trickle-ice-sdpfrag"}
        choice = rng.random()
        if choice < 0.1:
            headers["If-Match"] = rng.choice(['"stale"', "*", "", 'W/"x", *', "\x7f"])
        elif choice < 0.2:
            headers["If-Match"] = etag
        elif choice < 0.25:
            headers["Content-Type"] = rng.choice(["text/plain", "", "application/sdp"])
        response = target.http.patch(location, content=body, headers=headers)
        check(response, where("patch", index, body))
        accepted += response.status_code == 204
        if response.status_code == 404:  # ICE gave up on the fuzzed candidates: publish again
            location, etag = publish()
    assert accepted > 0
    target.http.delete(location)
    finish_group(target)


def test_fuzz_websocket_messages(target: Target) -> None:
    rng = random.Random(f"{SEED}-ws")
    refused = watched = 0
    with target.http.websocket_connect(f"/v1/sessions/{target.good}/ws") as ws:
        for index in range(CASES["ws"]):
            raw = fuzz_cases.ws_message(rng, index)
            if isinstance(raw, str) and not fuzz_cases.is_utf8(raw):
                raw = fuzz_cases.encode(raw)  # a text frame must be UTF-8: it comes as bytes
            try:
                parsed = parse_client_message(raw)
                expected = None
                if getattr(parsed, "max_new_tokens", 1) > 2:
                    continue  # a valid question, but a long one: not what this test is for
            except ProtocolError as exc:
                expected = exc.code
                refused += 1
            if isinstance(raw, str):
                ws.send_text(raw)
            else:
                ws.send_bytes(raw)
            # A cancel of an unknown id is answered at once, in order: everything the server
            # said about `raw` arrives before it, and it proves the socket still listens.
            ping = f"ping-{index}"
            ws.send_text(json.dumps({"type": "cancel", "id": ping}))
            codes = []
            while True:
                message = receive(ws)
                if message["type"] == "error" and message["id"] == ping:
                    break
                if message["type"] == "error":
                    assert message["code"] and message["message"], where("ws", index, raw)
                    codes.append(message["code"])
                watched += message["type"] == "watching"
            if expected is not None:
                assert expected in codes, where("ws", index, raw)
    assert refused > CASES["ws"] // 2
    assert watched > 0  # some watches were valid: alerts were made (and their limit met)
    for alert in target.http.get(f"/v1/sessions/{target.good}/alerts").json()["alerts"]:
        target.http.delete(f"/v1/sessions/{target.good}/alerts/{alert['id']}")
    finish_group(target)


def test_fuzz_rest_bodies_and_queries(target: Target) -> None:
    rng = random.Random(f"{SEED}-rest")
    good = target.good
    for index in range(CASES["rest"]):
        kind = rng.randrange(5)
        if kind == 4:  # alerts: definitions, removal, events
            choice = rng.randrange(3)
            if choice == 0:
                case = body = fuzz_cases.alert_body(rng)
                response = target.http.post(
                    f"/v1/sessions/{good}/alerts",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
            elif choice == 1:
                case = alert_id = fuzz_cases.query_value(rng) or "x"
                response = target.http.delete(f"/v1/sessions/{good}/alerts/{url_quote(alert_id)}")
            else:
                case = value = fuzz_cases.query_value(rng)
                response = target.http.get(
                    f"/v1/sessions/{good}/alert-events?count={url_quote(value)}"
                )
        elif kind < 2:
            body = fuzz_cases.pull_body(rng, "/nonexistent/fuzz.mp4")
            content_type = rng.choice(["application/json"] * 6 + ["text/plain", ""])
            response = target.http.post(
                "/v1/sessions", content=body, headers={"Content-Type": content_type}
            )
            case: object = body
        elif kind == 2:
            path = rng.choice(
                [f"/v1/sessions/{good}/history", f"/v1/sessions/{good}/thumbnails"]
                + [f"/v1/sessions/{good}/thumbnail"] * 2
            )
            name = rng.choice(["count", "start", "end", "at", "x"])
            case = (path, name, value := fuzz_cases.query_value(rng))
            response = target.http.get(f"{path}?{name}={url_quote(value)}")
        else:
            session_id = fuzz_cases.query_value(rng) or "x"
            method = rng.choice(["GET", "DELETE"])
            case = (method, session_id)
            suffix = rng.choice(["", "/history", "/thumbnails"]) if method == "GET" else ""
            response = target.http.request(method, f"/v1/sessions/{url_quote(session_id)}{suffix}")
        check(response, where("rest", index, case))
        if response.status_code == 201:
            target.http.delete(response.headers["location"])
    assert target.good in target.service.sessions
    # Alerts the cases made go; what they sent was checked like everything else.
    for alert in target.http.get(f"/v1/sessions/{good}/alerts").json()["alerts"]:
        check(target.http.delete(f"/v1/sessions/{good}/alerts/{alert['id']}"), "cleanup")
    finish_group(target)


def test_fuzz_pull_sources(target: Target) -> None:
    """Whatever the source validation decides, it decides with a 4xx or a session: no 5xx."""
    rng = random.Random(f"{SEED}-source")
    port = closed_port()
    for index in range(CASES["source"]):
        source = fuzz_cases.source_url(rng, port, target.files)
        body = json.dumps({"source": source, "realtime": False}).encode()
        response = target.http.post(
            "/v1/sessions", content=body, headers={"Content-Type": "application/json"}
        )
        check(response, where("source", index, source))
        if response.status_code == 201:
            check(target.http.delete(response.headers["location"]), where("source", index, source))
    # No assertion on how many were opened: a strict source policy may refuse every one.
    finish_group(target)


def test_fuzz_case_generation_is_seeded() -> None:
    """The same seed gives the same cases (what makes LIVELENS_FUZZ_SEED a replay)."""
    first = [fuzz_cases.ws_message(random.Random("s"), i) for i in range(50)]
    again = [fuzz_cases.ws_message(random.Random("s"), i) for i in range(50)]
    assert first == again
    assert len(set(map(repr, first))) > 1


def test_contain_keeps_candidates_off_the_network() -> None:
    line = "a=candidate:1 1 udp 1 8.8.8.8 53 typ srflx raddr 2a00:1450::1 rport 9 x.local"
    assert fuzz_cases.contain(line) == (
        "a=candidate:1 1 udp 1 192.0.2.1 53 typ srflx raddr 2001:db8::1 rport 9 x.invalid"
    )
