"""Alerts (standing questions) through the real service: REST, websocket, Redis, webhooks.

The tiny test model has random weights, so what it answers says nothing about the video; these
tests check the plumbing with thresholds whose outcome does not depend on the answer (0: every
evaluation is "yes"; 1: none is), and the edge logic on its own with given confidences.
Whether alerts fire when the object appears is the trained model's part (benchmarks/alerts.py).
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import io
import json
import threading
from collections.abc import Iterator

import av
import pytest
from service_harness import fast_config, receive_until, running_app, wait_for
from videos import make_video

from livelens.model.engine import Probe
from livelens.model.qa import standing_question
from livelens.model.runner import ModelRunner
from livelens.stream.alerts import AlertState
from livelens.stream.protocol import PullRequest
from livelens.stream.webhooks import WebhookPolicy

TOKEN = "alert-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ------------------------------------------------------------------------------ edge logic
def _alert(**changes) -> AlertState:
    base = dict(
        id="al_1",
        session_id="s",
        condition="a red ball is visible",
        every=1.0,
        cooldown=10.0,
        threshold=0.5,
        hysteresis=0.1,
        webhook=None,
        secret=None,
        created="2026-12-01T00:00:00.000Z",
    )
    return AlertState(**(base | changes))


def _feed(alert: AlertState, confidences: list[float]) -> list[tuple[float, str]]:
    edges = []
    for t, c in enumerate(confidences):
        edge = alert.advance(Probe("al_1", float(t), c, evaluated=True))
        if edge == "rise":
            alert.current = {"started": float(t)}  # as AlertManager._emit does
        elif edge == "fall":
            alert.current = None
        if edge:
            edges.append((float(t), edge))
    return edges


def test_edges_have_hysteresis_and_a_cooldown() -> None:
    # Rises at 0.5; stays active down to 0.4 (hysteresis 0.1); falls below it.
    assert _feed(_alert(), [0.1, 0.6, 0.45, 0.41, 0.39, 0.2]) == [(1.0, "rise"), (4.0, "fall")]
    # A second rise within the cooldown (10 s of media from the first rise) is suppressed, and
    # so is its fall; after the cooldown it is an event again.
    alert = _alert()
    confidences = [0.9, 0.1, 0.9, 0.1] + [0.1] * 8 + [0.9, 0.1]
    assert _feed(alert, confidences) == [
        (0.0, "rise"),
        (1.0, "fall"),
        (12.0, "rise"),
        (13.0, "fall"),
    ]
    assert alert.suppressed == 1 and alert.evaluations == len(confidences)
    # Skipped evaluations count apart and carry the previous confidence.
    alert = _alert()
    alert.advance(Probe("al_1", 0.0, 0.2, evaluated=False))
    assert alert.skipped == 1 and alert.evaluations == 0 and alert.confidence == 0.2


def test_the_standing_question_is_the_condition_asked() -> None:
    assert standing_question("a red ball is visible") == (
        "Answer yes or no: is it true now that a red ball is visible?"
    )
    assert standing_question("  Is the conveyor stopped? ") == "Is the conveyor stopped?"


# ------------------------------------------------------------------------- a webhook receiver
class Receiver:
    """A real HTTP server on loopback that records the webhook POSTs it gets."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def clip(tmp_path):
    return make_video(tmp_path / "clip.mp4", frames=80, fps=10, width=320, height=240)


def _config(redis_url, clip, **changes):
    return fast_config(
        redis_url,
        media_root=clip.path.parent,
        webhooks=WebhookPolicy(allow=("127.0.0.1",)),
        **changes,
    )


# ------------------------------------------------------------------------------- the service
def test_an_alert_fires_with_evidence_over_every_channel(
    tiny_model, clip, redis_server, receiver
) -> None:
    with running_app(ModelRunner(tiny_model), _config(redis_server.url, clip), token=TOKEN) as (
        client,
        service,
    ):
        sid = client.post(
            "/v1/sessions", json={"source": str(clip.path), "realtime": True}, headers=AUTH
        ).json()["id"]
        wait_for(lambda: service.sessions[sid].frames_sampled >= 1)
        with client.websocket_connect(f"/v1/sessions/{sid}/ws", headers=AUTH) as ws:
            created = client.post(
                f"/v1/sessions/{sid}/alerts",
                json={
                    "condition": "a red ball is visible",
                    "threshold": 0.0,
                    "webhook": receiver.url,
                },
                headers=AUTH,
            )
            assert created.status_code == 201, created.text
            alert = created.json()
            assert alert["id"].startswith("al_") and alert["secret"]
            # The receiver's path (often its own token) is never shown back.
            assert alert["webhook"] == receiver.url.removesuffix("hook") + "…"
            assert alert["question"] == standing_question("a red ball is visible")
            never = client.post(
                f"/v1/sessions/{sid}/alerts",
                json={"condition": "a blue box is visible", "threshold": 1.0},
                headers=AUTH,
            ).json()
            assert never["secret"] is None

            event, _ = receive_until(ws, "alert")
            assert event["alert_id"] == alert["id"] and event["edge"] == "rise"
            assert event["ended"] is None and 0.0 <= event["confidence"] <= 1.0
            thumb = client.get(event["thumbnail_url"], headers=AUTH)
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
            assert float(thumb.headers["x-livelens-time"]) == event["started"]
            wait_for(lambda: service.sessions[sid].live_edge >= event["started"] + 2.5)
            clip_answer = client.get(event["clip_url"], headers=AUTH)
            assert clip_answer.status_code == 200, clip_answer.text
            assert clip_answer.headers["x-livelens-clip-complete"] == "true"
            with av.open(io.BytesIO(clip_answer.content)) as video:
                frames = list(video.decode(video=0))
            assert len(frames) >= 5  # 2 fps from 3 s before to 2 s after the rise
            # A complete clip is encoded once and kept.
            kept = service.alerts.evidence(sid, event["event_id"]).mp4
            assert kept == clip_answer.content

        # The webhook got the same event, signed with the alert's secret.
        headers, body = wait_for(lambda: receiver.received and receiver.received[0])
        stamp = headers["X-LiveLens-Timestamp"]
        want = hmac.new(alert["secret"].encode(), f"{stamp}.".encode() + body, hashlib.sha256)
        assert headers["X-LiveLens-Signature"] == "sha256=" + want.hexdigest()
        assert json.loads(body)["event_id"] == event["event_id"]

        # The session ends: the active alert falls at its last frame; the stream has both.
        wait_for(lambda: service.sessions[sid].state.label == "ended", timeout=30)

        def both_edges():
            listed = client.get(f"/v1/sessions/{sid}/alert-events", headers=AUTH).json()
            mine = [e for e in listed["events"] if e["event_id"] == event["event_id"]]
            return mine if len(mine) == 2 else None

        events = wait_for(both_edges)
        assert [e["edge"] for e in events] == ["rise", "fall"]
        assert events[1]["ended"] >= events[0]["started"]
        listed = client.get(f"/v1/sessions/{sid}/alerts", headers=AUTH).json()["alerts"]
        by_id = {a["id"]: a for a in listed}
        assert by_id[alert["id"]]["events"] == 1 and by_id[alert["id"]]["evaluations"] >= 1
        assert wait_for(lambda: receiver.received[1:])  # the fall went out too
        assert json.loads(receiver.received[1][1])["edge"] == "fall"
        # The receiver records a POST before it answers: the count follows its 204.
        wait_for(
            lambda: (
                client.get(f"/v1/sessions/{sid}/alerts/{alert['id']}", headers=AUTH).json()[
                    "webhook_deliveries"
                ]
                == 2
            )
        )
        assert by_id[never["id"]]["events"] == 0 and by_id[never["id"]]["evaluations"] >= 1
        assert "secret" not in by_id[alert["id"]]
        metrics = client.get("/metrics").text
        assert 'livelens_alert_events_total{edge="rise"} 1.0' in metrics


def test_bad_alert_requests_get_clear_errors(tiny_model, clip, redis_server) -> None:
    config = _config(redis_server.url, clip, max_alerts_per_session=2)
    with running_app(ModelRunner(tiny_model), config, token=TOKEN) as (client, service):
        sid = client.post(
            "/v1/sessions", json={"source": str(clip.path), "realtime": True}, headers=AUTH
        ).json()["id"]
        url = f"/v1/sessions/{sid}/alerts"

        def refused(body, status, code):
            answer = client.post(url, json=body, headers=AUTH)
            assert answer.status_code == status, answer.text
            assert answer.json()["error"]["code"] == code

        refused({"condition": "   "}, 422, "empty_condition")
        refused({"condition": "x" * 301}, 422, "condition_too_long")
        refused({"condition": "ok", "every": 0}, 422, "invalid_request")
        refused({"condition": "ok", "cooldown": -1}, 422, "invalid_request")
        refused({"condition": "ok", "every": "NaN"}, 422, "invalid_request")
        refused({"condition": "ok", "webhook": "http://10.1.2.3/hook"}, 403, "webhook_not_allowed")
        refused({"condition": "ok", "webhook": "ftp://127.0.0.1/x"}, 422, "bad_webhook")
        assert client.post(url, json={"condition": "a"}, headers=AUTH).status_code == 201
        assert client.post(url, json={"condition": "b"}, headers=AUTH).status_code == 201
        refused({"condition": "c"}, 409, "too_many_alerts")
        unknown = client.post(
            "/v1/sessions/" + "0" * 32 + "/alerts", json={"condition": "a"}, headers=AUTH
        )
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_session"
        gone = client.delete(f"{url}/al_000000000000", headers=AUTH)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_alert"
        assert client.post(url, json={"condition": "a"}).status_code == 401
        # Over the websocket: the same refusals, the connection keeps working.
        with client.websocket_connect(f"/v1/sessions/{sid}/ws", headers=AUTH) as ws:
            ws.send_json({"type": "watch", "id": "w1", "condition": "c"})
            error, _ = receive_until(ws, "error", message_id="w1")
            assert error["code"] == "too_many_alerts"
            first = client.get(url, headers=AUTH).json()["alerts"][0]["id"]
            ws.send_json({"type": "unwatch", "id": "w2", "alert_id": first})
            receive_until(ws, "unwatched", message_id="w2")
            ws.send_json(
                {"type": "watch", "id": "w3", "condition": "a red ball is visible", "threshold": 0}
            )
            watching, _ = receive_until(ws, "watching", message_id="w3")
            assert watching["alert"]["condition"] == "a red ball is visible"
            mine = watching["alert"]["id"]
            rise = _next_alert(ws, mine)
            # Removing an active alert ends its event: the fall goes out at its last evaluation.
            removed = client.delete(f"{url}/{mine}", headers=AUTH).json()
            fall = _next_alert(ws, mine)
            assert (fall["edge"], fall["event_id"]) == ("fall", rise["event_id"])
            assert fall["ended"] == removed["evaluated_at"]
            ws.send_json({"type": "watch", "id": "w5", "condition": "a red ball is visible"})
            receive_until(ws, "watching", message_id="w5")
            ws.send_json({"type": "unwatch", "id": "w4", "alert_id": "al_nope"})
            error, _ = receive_until(ws, "error", message_id="w4")
            assert error["code"] == "unknown_alert"
        assert len(client.get(url, headers=AUTH).json()["alerts"]) == 2
        assert service.sessions[sid].state.label in ("live", "starting", "stalled")


def _next_alert(ws, alert_id: str) -> dict:
    """The next alert event of one alert (the session's other alerts may fire meanwhile)."""
    while True:
        event, _ = receive_until(ws, "alert")
        if event["alert_id"] == alert_id:
            return event


def test_definitions_survive_a_restart(tiny_model, clip, redis_server) -> None:
    config = _config(redis_server.url, clip)

    async def open_camera(service) -> None:
        request = PullRequest(source=str(clip.path), realtime=True, loop=True)
        await service.open_pull(request, session_id="cam-1", operator=True)

    with running_app(ModelRunner(tiny_model), config, token=TOKEN, on_start=open_camera) as (
        client,
        _,
    ):
        created = client.post(
            "/v1/sessions/cam-1/alerts", json={"condition": "a red ball is visible"}, headers=AUTH
        ).json()
    with running_app(ModelRunner(tiny_model), config, token=TOKEN, on_start=open_camera) as (
        client,
        _,
    ):

        def evaluated():
            listed = client.get("/v1/sessions/cam-1/alerts", headers=AUTH).json()["alerts"]
            return listed if listed and listed[0]["evaluations"] >= 1 else None

        listed = wait_for(evaluated)
        assert [a["id"] for a in listed] == [created["id"]]
        assert listed[0]["condition"] == "a red ball is visible"
