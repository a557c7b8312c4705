"""Limits on what clients can make a node hold, attacked through the real app.

Real components throughout: the tiny model on the worker thread, PyAV-written videos, a
redis-server, the FastAPI app (TestClient, or uvicorn on a port for WebRTC), aiortc publishers.
The `livelens serve` process-level limits (timeouts, connections, logs, SIGTERM) are in
test_limits_serve.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from fractions import Fraction

import av
import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, VideoStreamTrack
from browser import serve
from service_harness import (
    SlowRunner,
    fast_config,
    publish_offer,
    receive_until,
    running_app,
    wait_for,
)
from videos import make_video

from livelens.model.runner import ModelRunner
from livelens.stream.app import create_app
from livelens.stream.http_limits import BodyLimit, RepeatFilter
from livelens.stream.limits import LimitsConfig
from livelens.stream.service import LiveService
from livelens.stream.whip import WhipSettings


@pytest.fixture
def runner(tiny_model) -> ModelRunner:
    return ModelRunner(tiny_model)


def _limits(**changes) -> LimitsConfig:
    return replace(LimitsConfig(), **changes)


# ------------------------------------------------------------------------------ sessions held
def test_ended_sessions_are_freed_by_count_and_by_age(runner, tmp_path, redis_server) -> None:
    """Opening session after session (each ends at once) no longer piles them up in memory:
    at most max_held_sessions are held, the oldest ended go first, and after the retention
    none; what was freed stays readable (record and history) from Redis."""
    clip = make_video(tmp_path / "short.mp4", frames=6, fps=10, pattern="moving_square")
    limits = _limits(max_held_sessions=3, ended_retention_s=2.0)
    config = fast_config(redis_server.url, max_sessions=2, limits=limits, media_root=tmp_path)
    with running_app(runner, config) as (client, service):
        opened: list[str] = []
        held_max = 0
        for _ in range(8):
            response = client.post("/v1/sessions", json={"source": str(clip.path)})
            assert response.status_code == 201, response.text
            opened.append(response.json()["id"])
            wait_for(lambda: client.get(f"/v1/sessions/{opened[-1]}").json()["state"] == "ended")
            held_max = max(held_max, len(service.sessions))
        assert held_max == 3
        assert set(service.sessions) == set(opened[-3:])  # the newest three are held
        for session_id in opened[:5]:  # freed, yet still known
            record = client.get(f"/v1/sessions/{session_id}").json()
            assert (record["id"], record["state"]) == (session_id, "ended")
            history = client.get(f"/v1/sessions/{session_id}/history")
            assert history.status_code == 200 and history.json()["entries"] == []
        # Retention: 2 s after their end the last three go too (the status tick frees them).
        wait_for(lambda: not service.sessions, timeout=10)
        assert client.get(f"/v1/sessions/{opened[-1]}").json()["state"] == "ended"
        assert client.get("/healthz").json()["sessions"] == 0


def test_limits_refuse_values_out_of_range() -> None:
    for field, value in (
        ("max_body_bytes", 10),
        ("header_timeout_s", 0),
        ("max_held_sessions", 0),
        ("drain_timeout_s", -1),
    ):
        with pytest.raises(ValueError, match=field):
            _limits(**{field: value})
    with pytest.raises(ValueError, match="max_questions_per_connection"):
        _limits(max_questions_per_connection=9, max_questions_per_session=8)
    with pytest.raises(ValueError, match="max_held_sessions"):
        fast_config(None, max_sessions=10, limits=_limits(max_held_sessions=5))


# ------------------------------------------------------------------------------------ questions
def test_questions_are_capped_per_connection_and_per_session(
    tiny_model, tmp_path, redis_server
) -> None:
    """2,000 questions in a burst used to be accepted and starve the session; now each
    connection may have 2 outstanding and the session 3, the rest get too_many_questions, and
    the connection keeps working."""
    video = make_video(tmp_path / "v.mp4", frames=20, fps=10, pattern="moving_square")
    runner = SlowRunner(tiny_model, prefill_delay=0.3)
    limits = _limits(max_questions_per_connection=2, max_questions_per_session=3)
    config = fast_config(redis_server.url, limits=limits, media_root=tmp_path)
    with running_app(runner, config) as (client, service):
        sid = client.post("/v1/sessions", json={"source": str(video.path)}).json()["id"]
        wait_for(lambda: service.sessions[sid].model_started)
        path = f"/v1/sessions/{sid}/ws"
        with client.websocket_connect(path) as first, client.websocket_connect(path) as second:
            ask = {"type": "ask", "question": "what?", "max_new_tokens": 2}
            for i in range(50):
                first.send_json({**ask, "id": f"a{i}"})
            refused = [receive_until(first, "error", message_id=f"a{i}")[0] for i in range(2, 50)]
            assert {e["code"] for e in refused} == {"too_many_questions"}
            assert "connection" in refused[0]["message"]
            second.send_json({**ask, "id": "b0"})
            second.send_json({**ask, "id": "b1"})
            error, _ = receive_until(second, "error", message_id="b1")
            assert error["code"] == "too_many_questions" and "session" in error["message"]
            assert service.engine.questions(sid) == 3
            for message_id, ws in (("a0", first), ("a1", first), ("b0", second)):
                receive_until(ws, "answer", message_id=message_id)
            # Answered questions free their places.
            first.send_json({**ask, "id": "again"})
            answer, _ = receive_until(first, "answer", message_id="again")
            assert answer["question"] == "what?"


# ------------------------------------------------------------------------------- request bodies
def test_request_bodies_are_limited_on_every_route(runner, redis_server) -> None:
    """A token holder's huge JSON body is refused with 413 before it is read, whether its size
    is announced or not; WHIP offers keep their smaller limit through the same mechanism."""
    limits = _limits(max_body_bytes=4096)
    with running_app(runner, fast_config(redis_server.url, limits=limits), token="t") as (
        client,
        _,
    ):
        auth = {"Authorization": "Bearer t", "Content-Type": "application/json"}
        big = b'{"source": "' + b"x" * 10_000 + b'"}'

        def chunked():  # no Content-Length: the body arrives in pieces
            for start in range(0, len(big), 1000):
                yield big[start : start + 1000]

        for content in (big, chunked()):
            response = client.post("/v1/sessions", content=content, headers=auth)
            assert response.status_code == 413, response.text
            assert response.json()["error"]["code"] == "payload_too_large"
        # Under the limit, the route itself answers (its own validation).
        fine = client.post("/v1/sessions", content=b'{"source": 1}', headers=auth)
        assert fine.status_code == 422
        whip = {"Authorization": "Bearer t", "Content-Type": "application/sdp"}
        offer = client.post("/whip", content=b"v=0\r\n" * 2000, headers=whip)  # 10 KB, < 64 KiB
        assert offer.status_code == 413  # the global 4 KiB limit applies to WHIP too
        assert client.get("/healthz").status_code == 200


def _call(app, path: str, chunks: list[bytes | None], headers=()) -> tuple[int, bytes]:
    """One HTTP request through an ASGI app; a None chunk is a client that stops sending."""

    async def scenario() -> tuple[int, bytes]:
        pending = list(chunks)
        sent: list[dict] = []

        async def receive() -> dict:
            chunk = pending.pop(0)
            if chunk is None:
                await asyncio.sleep(3600)  # stalled mid-body
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
        await app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], body

    return asyncio.run(scenario())


def test_body_limit_counts_chunks_and_times_out_stalled_bodies() -> None:
    """The middleware itself: the app behind it never gets more than the limit of a chunked
    body (WHIP paths: their smaller one), and a body that stops arriving is answered 408."""
    seen: list[int] = []

    async def app(scope, receive, send) -> None:  # reads everything, like a JSON route
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RuntimeError("client went away mid-body")
            size += len(message["body"])
            more = message["more_body"]
        seen.append(size)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = BodyLimit(app, max_bytes=4096, timeout_s=0.2, per_prefix=(("/whip", 2048),))
    chunks = [b"x" * 1000] * 10
    assert _call(guarded, "/v1/sessions", chunks[:3]) == (200, b"ok")
    status, body = _call(guarded, "/v1/sessions", chunks)
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    status, body = _call(guarded, "/whip/abc", chunks)
    assert status == 413 and b"2048" in body
    length = [(b"content-length", b"5000")]
    assert _call(guarded, "/v1/x", [b"x" * 5000], length)[0] == 413  # refused unread
    status, body = _call(guarded, "/v1/sessions", [b"x" * 100, None])
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert seen == [3000]  # only the one request under its limit got through


# ------------------------------------------------------------------------------------- logging
def test_repeated_warnings_are_summarised() -> None:
    now = [0.0]
    repeat = RepeatFilter(limit=3, interval_s=10.0, clock=lambda: now[0])
    handler = logging.Handler()
    handler.addFilter(repeat)
    shown: list[str] = []
    handler.emit = lambda record: shown.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("livelens.test.repeat")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG)
    try:
        for i in range(100):
            log.error("accept() failed: %s", i)
        log.info("an info line %s", 1)  # never limited
        now[0] = 11.0
        log.error("accept() failed: %s", "again")
    finally:
        log.removeHandler(handler)
    assert shown[:3] == ["accept() failed: 0", "accept() failed: 1", "accept() failed: 2"]
    assert shown[3].startswith("accept() failed: 3 [repeated")
    assert shown[4] == "an info line 1"
    assert shown[5] == "accept() failed: again [suppressed 96 identical lines before this]"
    assert len(shown) == 6


# ------------------------------------------------------------------------------------------ WHIP
class ThinTrack(VideoStreamTrack):
    """Frames 404x2: an aspect ratio the session refuses, so it fails once video arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    async def recv(self) -> av.VideoFrame:
        await asyncio.sleep(1 / 15)
        frame = av.VideoFrame.from_ndarray(np.full((2, 404, 3), 128, np.uint8), "rgb24")
        frame.pts, frame.time_base = self.sent, Fraction(1, 15)
        self.sent += 1
        return frame


def test_failed_whip_session_closes_its_peer_connection(runner, redis_server) -> None:
    """A WHIP session that fails on the server's side (here: a frame size it refuses) used to
    leave the publisher connected, uncounted by the live-session cap; now its peer connection
    is closed."""
    service = LiveService(runner, fast_config(redis_server.url))
    whip = WhipSettings(allow_loopback=True, connect_timeout=15.0)
    app = create_app(service, whip=whip)

    async def publish(url: str) -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver(ThinTrack(), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                session_id = await publish_offer(http, url, pc)
            for _ in range(400):
                if pc.connectionState == "closed" or pc.connectionState == "failed":
                    break
                await asyncio.sleep(0.05)
            return session_id, pc.connectionState
        finally:
            await pc.close()

    with serve(app) as url:
        session_id, state = asyncio.run(publish(url))
        record = httpx.get(f"{url}/v1/sessions/{session_id}").json()
        ingest = app.state.ingest
    assert record["state"] == "failed" and "unsupported frame size" in record["reason"]
    assert state in ("closed", "failed")
    assert ingest.session_ids() == []
