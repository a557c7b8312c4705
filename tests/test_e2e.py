"""End to end with real publishers: Chromium and FFmpeg's whip muxer -> questions -> Redis.

`livelens serve`'s app (tiny model, real redis-server) runs on uvicorn on a free port; a real
publisher sends a generated picture whose frame counter the server-side frames must show; a
websocket client (the `websockets` package, over the network) asks and gets a grounded answer;
DELETE ends the session and its history is in Redis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ffmpeg_publisher
import httpx
import pytest
import redis
from browser import chromium, chromium_available, serve
from fastapi.staticfiles import StaticFiles
from service_harness import fast_config, wait_for
from videos import read_index
from websockets.sync.client import connect
from y4m import write_y4m

from livelens.model.runner import ModelRunner
from livelens.stream.app import create_app
from livelens.stream.service import LiveService
from livelens.stream.whip import WhipSettings

TOKEN = "e2e-token"
ASSETS = Path(__file__).parent / "assets"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def server(tiny_model, redis_server):
    """The real app: model worker, Redis registry, WHIP with loopback ICE (test-only setting)."""
    service = LiveService(
        ModelRunner(tiny_model), fast_config(redis_server.url, tokens_per_frame=48)
    )
    app = create_app(service, token=TOKEN, whip=WhipSettings(token=TOKEN, allow_loopback=True))
    app.mount("/assets", StaticFiles(directory=ASSETS), name="assets")  # the publisher page
    with serve(app) as url:
        yield url, service, redis_server


def _ask_over_websocket(url: str, session_id: str, question: str) -> tuple[dict, list[str]]:
    ws_url = url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/ws?token={TOKEN}"
    tokens: list[str] = []
    with connect(ws_url, open_timeout=10) as ws:
        first = json.loads(ws.recv(timeout=10))
        assert first["type"] == "status" and first["state"] == "live"
        ws.send(json.dumps({"type": "ask", "id": "e2e", "question": question, "max_new_tokens": 8}))
        while True:
            message = json.loads(ws.recv(timeout=60))
            assert message["type"] != "error", message
            if message["type"] == "token":
                tokens.append(message["text"])
            elif message["type"] == "answer":
                return message, tokens


def _assert_answer(answer: dict, tokens: list[str], session: Any) -> None:
    assert "".join(tokens) == answer["text"]
    assert 0 < answer["stream_position"] <= session.live_edge
    for segment in answer["segments"]:  # inside the published time range
        assert 0 <= segment["start"] <= segment["end"] <= answer["stream_position"]


def _sampled_index(session: Any) -> int:
    assert session.last_sampled is not None
    return read_index(session.last_sampled[1])


@pytest.mark.slow
@pytest.mark.skipif(not chromium_available(), reason="needs Debian's chromium")
def test_chromium_publishes_over_whip_and_questions_are_answered(server, tmp_path) -> None:
    url, service, redis_server = server
    loop_frames = 90
    y4m = write_y4m(tmp_path / "camera.y4m", frames=loop_frames, width=640, height=480, fps=30)
    page_url = f"{url}/assets/whip_publisher.html?whip={url}/whip&token={TOKEN}"
    with chromium(page_url, tmp_path, y4m=y4m) as page:
        page.wait_for("whip.status !== 'starting'", timeout=30)
        assert page.evaluate("whip.status") == "published", page.evaluate("whip.error")
        sid = page.evaluate("whip.session")
        session = service.sessions[sid]
        wait_for(lambda: session.status()["frames_in_model"] >= 3, timeout=60)

        # The server decoded what Chromium's camera played: the counter drawn in the frame.
        seen = set()
        for _ in range(3):
            before = session.last_sampled[0]
            wait_for(lambda before=before: session.last_sampled[0] > before, timeout=10)
            seen.add(_sampled_index(session))
        assert all(0 <= i < loop_frames for i in seen) and len(seen) == 3
        assert session.status()["frames_received"] > session.status()["frames_sampled"]

        answer, tokens = _ask_over_websocket(url, sid, "When does the counter reach 40?")
        _assert_answer(answer, tokens, session)

        listed = httpx.get(f"{url}/v1/sessions", headers=AUTH).json()["sessions"]
        assert [(s["id"], s["kind"], s["state"]) for s in listed] == [(sid, "whip", "live")]
        assert page.evaluate("whip.stop()") == 200  # the WHIP DELETE

    record = wait_for(
        lambda: (
            (r := httpx.get(f"{url}/v1/sessions/{sid}", headers=AUTH).json())["state"] == "ended"
            and r
        )
    )
    assert "DELETE" in record["reason"]
    history = redis_server.history(sid)
    assert [(h["question_id"], h["text"]) for h in history] == [("e2e", answer["text"])]
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert r.hget(f"livelens:session:{sid}", "state") == "ended"
    finally:
        r.close()


@pytest.mark.slow
def test_ffmpeg_whip_muxer_publishes_and_questions_are_answered(server, tmp_path) -> None:
    url, service, redis_server = server
    fps = 15
    publisher = ffmpeg_publisher.start(
        f"{url}/whip", TOKEN, tmp_path, fps=fps, count=150, width=320, height=240
    )
    try:
        sid = wait_for(lambda: next(iter(service.sessions), None), timeout=20)
        session = service.sessions[sid]
        assert session.kind == "whip" and "Lavf/" in session.source
        wait_for(lambda: session.status()["frames_in_model"] >= 2, timeout=30)
        # The track is read on the event loop; its sampled frames were resized and
        # thumbnailed by the frame workers, not there.
        assert session.stage.converted >= 2 and session.stage.dropped == 0
        # The counter in the sampled frame matches its media time (frame i is sent at i / fps).
        t, image = session.last_sampled
        assert abs(read_index(image) - round(t * fps)) <= 1
        answer, tokens = _ask_over_websocket(url, sid, "What number is shown?")
        _assert_answer(answer, tokens, session)
        # A failed handshake can hang the muxer: bounded wait.
        _, stderr = publisher.communicate(timeout=60)
        assert publisher.returncode == 0, stderr[-3000:]
    finally:
        if publisher.poll() is None:
            publisher.kill()
            publisher.communicate()
    # FFmpeg's muxer sends DELETE when it closes; the session ends with its history stored.
    record = wait_for(
        lambda: (
            (r := httpx.get(f"{url}/v1/sessions/{sid}", headers=AUTH).json())["state"] == "ended"
            and r
        ),
        timeout=30,
    )
    assert "DELETE" in record["reason"]
    history = redis_server.history(sid)
    assert [h["question_id"] for h in history] == ["e2e"]
