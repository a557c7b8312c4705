"""Sessions under a KV budget (`--kv-budget`): admission, refusal with a reason, and `full`.

The real tiny model, a real redis-server, pull sessions from real H.264 files and a real aiortc
WHIP offer. With a pool that holds two sessions' minimum, the third session (pull or WHIP) is
refused with 503 and the machine-readable reason `kv_pool_exhausted`; running sessions are never
evicted to make room; a session whose next frame the pool cannot hold says `full` everywhere (the
REST record, the Redis hash, the websocket status) and still answers questions.
"""

from __future__ import annotations

import pytest
from service_harness import ask, fast_config, running_app, wait_for
from test_whip import aiortc_offer
from videos import make_video

from livelens.model.engine import Engine, EngineConfig
from livelens.model.runner import ModelRunner
from livelens.model.scheduler import SchedulerConfig

SDP = {"Content-Type": "application/sdp"}


def _budget(runner: ModelRunner, spare_blocks: int) -> str:
    """Bytes for two sessions' minimum, the blocks kept for answers, and `spare_blocks`."""
    config = SchedulerConfig()
    layout = runner.kv_layout(16)
    minimum = -(-config.session_min_tokens // 16)
    headroom = -(-config.answer_reserve_tokens // 16) + 1
    return str((2 * minimum + headroom + spare_blocks) * layout.bytes_per_block)


@pytest.fixture
def runner(tiny_model) -> ModelRunner:
    return ModelRunner(tiny_model)


def test_third_session_is_refused_and_a_full_session_says_so(runner, tmp_path, redis_server):
    clip = make_video(tmp_path / "long.mp4", frames=400, fps=4, pattern="moving_square")
    config = fast_config(
        redis_server.url,
        media_root=tmp_path,
        kv_budget=_budget(runner, spare_blocks=4),
        max_pending_frames=256,  # a file read fast is delayed, not thinned
    )
    with running_app(runner, config) as (client, service):
        pool_blocks = service.engine.pool_usage()[1]
        assert pool_blocks == 2 * 128 + 65 + 4
        # Every visual token kept: ~22 tokens per frame, the share of the pool lasts ~100 frames
        # (a window longer than the stream: it never slides). Looped, so it stays full.
        first = client.post(
            "/v1/sessions",
            json={
                "source": str(clip.path),
                "realtime": False,
                "loop": True,
                "prune_threshold": 0,
                "window": 10_000,
            },
        )
        second = client.post("/v1/sessions", json={"source": str(clip.path), "realtime": True})
        assert first.status_code == second.status_code == 201

        third = client.post("/v1/sessions", json={"source": str(clip.path)})
        assert third.status_code == 503
        assert third.json()["error"]["code"] == "kv_pool_exhausted"
        whip = client.post("/whip", content=aiortc_offer(), headers=SDP)
        assert whip.status_code == 503
        assert whip.json()["error"]["code"] == "kv_pool_exhausted"

        # The first session (read faster than real time) outgrows its share: `full`.
        sid = first.json()["id"]
        record = wait_for(
            lambda: (r := client.get(f"/v1/sessions/{sid}").json())["state"] == "full" and r,
            timeout=60,
        )
        assert "KV cache pool" in record["reason"]
        assert client.get(f"/v1/sessions/{second.json()['id']}").json()["state"] == "live"
        with client.websocket_connect(f"/v1/sessions/{sid}/ws") as ws:
            status = ws.receive_json()
            assert status["type"] == "status" and status["state"] == "full"
            assert status["kv_bytes"] > 0
            answer, _ = ask(ws, "q", max_new_tokens=3)
            assert answer["type"] == "answer"
            # Over the whole video held (frames already planned when the pool ran out included).
            assert answer["stream_position"] == service.engine.stats(sid).last_time
            assert answer["stream_position"] >= status["stream_position"]

        pool = client.get("/healthz").json()["kv_pool"]
        assert pool["blocks_total"] == pool_blocks and 0 < pool["blocks_used"] <= pool_blocks
        # Gauges follow on the next status tick.
        metrics = wait_for(
            lambda: (
                (m := client.get("/metrics").text)
                and 'livelens_sessions{state="full"} 1.0' in m
                and m
            )
        )
        assert 'livelens_sessions_refused_total{reason="kv_pool_exhausted"} 2.0' in metrics
        assert f'livelens_kv_pool_blocks{{state="total"}} {float(pool_blocks)}' in metrics


def test_an_ended_session_gives_its_blocks_to_a_new_one(runner, tmp_path, redis_server):
    short = make_video(tmp_path / "short.mp4", frames=8, fps=4, pattern="moving_square")
    config = fast_config(
        redis_server.url, media_root=tmp_path, kv_budget=_budget(runner, spare_blocks=0)
    )
    with running_app(runner, config) as (client, service):
        ids = []
        for _ in range(2):
            response = client.post("/v1/sessions", json={"source": str(short.path)})
            assert response.status_code == 201
            ids.append(response.json()["id"])
        wait_for(lambda: client.get(f"/v1/sessions/{ids[0]}").json()["state"] == "ended")
        third = client.post("/v1/sessions", json={"source": str(short.path)})
        assert third.status_code == 201, third.text  # the ended session's blocks were freed
        assert ids[0] not in service.sessions  # its record and history stay in Redis
        assert client.get(f"/v1/sessions/{ids[0]}").json()["state"] == "ended"


def test_engine_pool_comes_from_the_budget(runner) -> None:
    layout = runner.kv_layout(16)
    engine = Engine(runner, EngineConfig(kv_budget=str(100 * layout.bytes_per_block)))
    assert engine.pool_usage() == (0, 100)


def test_a_window_keeps_a_session_taking_frames_past_its_share(runner, tmp_path, redis_server):
    """The same budget and stream that make a session `full`, with a 10 s window: the window
    slides, the session takes every frame to the end, and REST shows what the model holds."""
    clip = make_video(tmp_path / "long.mp4", frames=400, fps=4, pattern="moving_square")
    config = fast_config(
        redis_server.url,
        media_root=tmp_path,
        kv_budget=_budget(runner, spare_blocks=4),
        max_pending_frames=256,
    )
    with running_app(runner, config) as (client, service):
        response = client.post(
            "/v1/sessions",
            json={
                "source": str(clip.path),
                "realtime": False,
                "prune_threshold": 0,
                "window": 10,
            },
        )
        assert response.status_code == 201, response.text
        sid = response.json()["id"]
        # The record follows the model past the source's end to its last slide: the window
        # then holds the last 10 s at most, at least half of it (slides of half the window).
        record = wait_for(
            lambda: (
                (r := client.get(f"/v1/sessions/{sid}").json())["state"] == "ended"
                and r["stats"]["window_end"] == 99.5
                and 99.5 - 10 <= r["stats"]["window_start"] < 99.5 - 4
                and r
            ),
            timeout=120,
        )
        stats = record["stats"]
        assert stats["frames_dropped"] == 0 and stats["frames_sampled"] == 200
        assert stats["window_start"] == service.engine.stats(sid).window_start
        engine_stats = service.engine.stats(sid)
        assert engine_stats.slides >= 2  # frames come in bursts: a slide may skip anchors
        assert engine_stats.frames_left + engine_stats.frames == 200
        with client.websocket_connect(f"/v1/sessions/{sid}/ws") as ws:
            status = ws.receive_json()
            assert status["window_start"] == stats["window_start"]
            answer, _ = ask(ws, "q", max_new_tokens=3)
            assert answer["stream_position"] == 99.5


def test_a_whip_publisher_chooses_its_window_in_the_url(runner, tmp_path, redis_server):
    with running_app(runner, fast_config(redis_server.url, media_root=tmp_path)) as (
        client,
        service,
    ):
        for query in (
            *(f"window={bad}" for bad in ("0", "-3", "abc", "inf", "nan", "86401")),
            *(f"memory={bad}" for bad in ("-1", "x", "nan", "604801")),
        ):
            response = client.post(f"/whip?{query}", content=aiortc_offer(), headers=SDP)
            assert response.status_code == 400, (query, response.text)
            assert response.json()["error"]["code"] == "bad_parameter"
        assert not service.sessions  # a refused offer opens nothing
        # More memory than the server's --memory is the operator's to refuse.
        response = client.post("/whip?memory=601", content=aiortc_offer(), headers=SDP)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "memory_too_large"
        assert not service.sessions
        response = client.post("/whip?window=30&memory=0", content=aiortc_offer(), headers=SDP)
        assert response.status_code == 201, response.text
        sid = response.headers["x-livelens-session"]
        assert service.sessions[sid].settings.window_s == 30
        assert service.sessions[sid].settings.memory_s == 0
