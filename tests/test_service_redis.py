"""Redis as the system of record, seen through the service: outages lose nothing.

A real redis-server is stopped and restarted (empty, as after a crash without persistence)
while a session runs and answers questions.
"""

from __future__ import annotations

import json
import logging

import pytest
import redis
from redis_server import RedisServer, free_port
from service_harness import ask, fast_config, running_app, wait_for
from videos import make_video

from livelens.model.runner import ModelRunner


@pytest.fixture
def runner(tiny_model) -> ModelRunner:
    return ModelRunner(tiny_model)


def _redis_history(url: str, sid: str) -> list[str]:
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        return [
            json.loads(f["entry"])["question_id"] for _, f in r.xrange(f"livelens:history:{sid}")
        ]
    finally:
        r.close()


def _redis_state(url: str, sid: str) -> str | None:
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        return r.hget(f"livelens:session:{sid}", "state")
    finally:
        r.close()


def test_redis_restart_during_a_session_loses_nothing(runner, tmp_path, redis_server) -> None:
    video = make_video(tmp_path / "v.mp4", frames=100, fps=10, pattern="moving_square")
    config = fast_config(redis_server.url, media_root=tmp_path, redis_retry_s=0.2)
    with running_app(runner, config) as (client, service):
        response = client.post(
            "/v1/sessions", json={"source": str(video.path), "realtime": True, "loop": True}
        )
        sid = response.json()["id"]
        wait_for(lambda: service.sessions[sid].status()["frames_in_model"] >= 2)
        with client.websocket_connect(f"/v1/sessions/{sid}/ws") as ws:
            ask(ws, "before", max_new_tokens=2)
            wait_for(lambda: _redis_history(redis_server.url, sid) == ["before"])

            redis_server.stop()
            ask(ws, "during-1", max_new_tokens=2)  # answered while Redis is down
            ask(ws, "during-2", max_new_tokens=2)
            wait_for(lambda: not client.get("/healthz").json()["redis"])
            # Still readable from this node meanwhile, in order.
            entries = client.get(f"/v1/sessions/{sid}/history").json()["entries"]
            assert [e["question_id"] for e in entries] == ["before", "during-1", "during-2"]

            redis_server.start()  # empty: everything must be written again
            wait_for(lambda: client.get("/healthz").json()["redis"], timeout=20)
            wait_for(
                lambda: _redis_history(redis_server.url, sid) == ["before", "during-1", "during-2"],
                timeout=20,
            )
            assert _redis_state(redis_server.url, sid) == "live"
            ask(ws, "after", max_new_tokens=2)
        wait_for(lambda: _redis_history(redis_server.url, sid)[-1:] == ["after"], timeout=20)
        assert _redis_history(redis_server.url, sid) == ["before", "during-1", "during-2", "after"]


def test_redis_unreachable_at_start_then_arrives(runner, tmp_path, caplog) -> None:
    port = free_port()
    server = RedisServer(tmp_path / "redis", port=port)
    video = make_video(tmp_path / "v.mp4", frames=20, fps=10, pattern="moving_square")
    config = fast_config(server.url, media_root=tmp_path, redis_retry_s=0.2)
    caplog.set_level(logging.WARNING, logger="livelens")
    try:
        with running_app(runner, config) as (client, service):
            unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(unreachable) == 1, "one log line says Redis is unreachable"
            assert "single-node" in unreachable[0].getMessage()
            assert client.get("/healthz").json()["redis"] is False
            sid = client.post(
                "/v1/sessions", json={"source": str(video.path), "realtime": False}
            ).json()["id"]
            wait_for(lambda: service.sessions[sid].status()["frames_in_model"] == 4)
            with client.websocket_connect(f"/v1/sessions/{sid}/ws") as ws:
                ask(ws, "offline", max_new_tokens=2)
            assert [s["id"] for s in client.get("/v1/sessions").json()["sessions"]] == [sid]

            server.start()
            wait_for(lambda: _redis_history(server.url, sid) == ["offline"], timeout=20)
            wait_for(lambda: _redis_state(server.url, sid) == "ended", timeout=20)
    finally:
        server.stop()
