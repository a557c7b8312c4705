"""Registry: session hashes, index and history streams in a real Redis, and the in-process fallback.

Every test talks to a real redis-server (tests/redis_server.py); outages are real stops of it.
Redis contents are checked with a plain redis client, independent of the registry's own reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime
from typing import Any

import pytest
import redis
from redis_server import RedisServer

from livelens.stream.registry import Registry, SessionRecord, history_key, session_key

CREATED = "2025-01-02T03:04:05.000+00:00"
LOGGER = "livelens.stream.registry"
# Small timings so a test sees several heartbeats and retries in well under a second.
FAST: dict[str, float] = {"heartbeat_s": 0.1, "ttl_s": 2.0, "retry_s": 0.1}


def record(session_id: str, node: str = "node-a", **changes: Any) -> SessionRecord:
    fields: dict[str, Any] = {
        "id": session_id,
        "node": node,
        "kind": "whip",
        "source": f"webrtc:{session_id}",
        "state": "live",
        "created": CREATED,
    }
    fields.update(changes)
    return SessionRecord(**fields)


def qa(n: int) -> dict[str, Any]:
    """A history entry shaped like the server's: question, answer, grounding segments, times."""
    return {
        "question": f"what happens at {n}?",
        "answer": f"answer {n}",
        "segments": [[n, n + 0.5]],
        "asked": n * 1.5,
    }


async def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


@pytest.fixture
def plain(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client to read what the registry wrote."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


def stream(plain: redis.Redis, session_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(id, entry) of every stream entry, oldest first."""
    return [(i, json.loads(f["entry"])) for i, f in plain.xrange(history_key(session_id))]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


def test_register_get_list_round_trip(redis_server: RedisServer, plain: redis.Redis) -> None:
    async def body() -> None:
        a = await Registry.open(redis_server.url, node="node-a", **FAST)
        b = await Registry.open(redis_server.url, node="node-b", **FAST)
        try:
            assert a.connected and b.connected
            mine = record("s1", stats={"frames": 3})
            await a.register(mine)

            fields = plain.hgetall(session_key("s1"))
            updated = fields.pop("updated")
            assert datetime.fromisoformat(updated).utcoffset() is not None
            assert fields == {
                "node": "node-a",
                "kind": "whip",
                "source": "webrtc:s1",
                "state": "live",
                "created": CREATED,
                "reason": "",
                "end_code": "",
                "stats": '{"frames":3}',
            }
            assert plain.zrange("livelens:sessions", 0, -1, withscores=True) == [
                ("s1", datetime.fromisoformat(CREATED).timestamp())
            ]
            expected = {**mine.to_json(), "updated": updated}
            got = await a.get("s1")
            assert got is not None and got.to_json() == expected
            remote = await b.get("s1")  # read from Redis by another node
            assert remote is not None and remote.to_json() == expected
            assert [r.to_json() for r in await b.list()] == [expected]
            assert await b.get("nope") is None
            with pytest.raises(ValueError, match="already registered"):
                await a.register(record("s1"))
            with pytest.raises(ValueError, match="node"):
                await a.register(record("s9", node="node-b"))
        finally:
            await a.close()
            await b.close()

    run(body)


def test_list_shows_every_nodes_sessions(redis_server: RedisServer) -> None:
    async def body() -> None:
        a = await Registry.open(redis_server.url, node="node-a", **FAST)
        b = await Registry.open(redis_server.url, node="node-b", **FAST)
        try:
            await a.register(record("s1", created="2025-01-02T03:04:05.000+00:00"))
            await b.register(record("s2", node="node-b", kind="pull", created=CREATED[:-6]))
            await a.register(record("s0", created="2024-12-31T00:00:00.000+00:00"))
            for registry in (a, b):
                listed = [(r.id, r.node, r.kind) for r in await registry.list()]
                # Oldest first; s1 and s2 were created at the same time (a naive time is UTC).
                assert listed == [
                    ("s0", "node-a", "whip"),
                    ("s1", "node-a", "whip"),
                    ("s2", "node-b", "pull"),
                ]
        finally:
            await a.close()
            await b.close()

    run(body)


def test_update_stats_state_and_reason(redis_server: RedisServer, plain: redis.Redis) -> None:
    async def body() -> None:
        a = await Registry.open(redis_server.url, node="node-a", **FAST)
        b = await Registry.open(redis_server.url, node="node-b", **FAST)
        try:
            await a.register(record("s1", state="starting", stats={"frames": 0}))
            await a.update("s1", state="live", stats={"frames": 10, "tokens": 640})
            assert plain.hget(session_key("s1"), "state") == "live"
            assert json.loads(plain.hget(session_key("s1"), "stats")) == {
                "frames": 10,
                "tokens": 640,
            }
            await a.update("s1", stats={"frames": 11})  # replaces, state kept
            await a.update("s1", state="ended", reason="client hung up")
            remote = await b.get("s1")
            assert remote is not None
            assert (remote.state, remote.reason, remote.stats) == (
                "ended",
                "client hung up",
                {"frames": 11},
            )
            with pytest.raises(ValueError, match="cannot become live"):
                await a.update("s1", state="live")
            with pytest.raises(ValueError, match="unknown session state"):
                await a.update("s1", state="paused")
            with pytest.raises(KeyError):
                await b.update("s1", stats={})  # held by node-a, not node-b
        finally:
            await a.close()
            await b.close()

    run(body)


def test_live_hash_has_ttl_refreshed_by_heartbeat(
    redis_server: RedisServer,
    plain: redis.Redis,
) -> None:
    async def body() -> None:
        a = await Registry.open(redis_server.url, node="node-a", heartbeat_s=0.2, ttl_s=1.0)
        await a.register(record("s1"))
        key = session_key("s1")
        assert 0 < plain.pttl(key) <= 1000
        first = plain.hget(key, "updated")
        await asyncio.sleep(1.5)  # longer than the TTL: only heartbeats keep it
        assert 0 < plain.pttl(key) <= 1000
        assert plain.hget(key, "updated") > first
        await a.close()
        # close() leaves live sessions to expire instead of deleting them.
        assert plain.hget(key, "state") == "live"
        await asyncio.sleep(1.2)
        assert plain.exists(key) == 0
        b = await Registry.open(redis_server.url, node="node-b", **FAST)
        try:
            assert await b.list() == []
            assert plain.zcard("livelens:sessions") == 0  # list() dropped the expired id
        finally:
            await b.close()

    run(body)


def test_ended_session_kept_for_retention(redis_server: RedisServer, plain: redis.Redis) -> None:
    async def body() -> None:
        a = await Registry.open(
            redis_server.url, node="node-a", heartbeat_s=0.1, ttl_s=1.0, retention_s=100.0
        )
        b = await Registry.open(redis_server.url, node="node-b", **FAST)
        try:
            await a.register(record("s1"))
            await a.append_history("s1", qa(1))
            assert 99_000 < plain.pttl(history_key("s1")) <= 100_000
            await a.update("s1", state="failed", reason="decoder error")
            await asyncio.sleep(1.5)  # past the live TTL; ended sessions are not heartbeated
            for key in (session_key("s1"), history_key("s1")):
                assert 95_000 < plain.pttl(key) <= 100_000
            remote = await b.get("s1")
            assert remote is not None and (remote.state, remote.reason) == (
                "failed",
                "decoder error",
            )
            assert [e["answer"] for e in await b.history("s1")] == ["answer 1"]
        finally:
            await a.close()
            await b.close()

    run(body)


def test_history_order_ids_and_count(redis_server: RedisServer, plain: redis.Redis) -> None:
    async def body() -> None:
        a = await Registry.open(redis_server.url, node="node-a", **FAST)
        try:
            await a.register(record("s1"))
            ids = [await a.append_history("s1", qa(n)) for n in range(5)]
            assert [i for i, _ in stream(plain, "s1")] == ids
            assert sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) == ids
            assert len(set(ids)) == 5
            expected = [{"id": i, **qa(n)} for n, i in enumerate(ids)]
            assert await a.history("s1") == expected
            assert await a.history("s1", count=2) == expected[3:]
            assert await a.history("s1", count=0) == []
            assert await a.history("other") == []
            with pytest.raises(ValueError, match="'id'"):
                await a.append_history("s1", {"id": 1, "answer": "x"})
            with pytest.raises(KeyError):
                await a.append_history("unknown", qa(0))
        finally:
            await a.close()

    run(body)


def test_history_readable_by_other_node_and_after_close(redis_server: RedisServer) -> None:
    async def body() -> None:
        a = await Registry.open(redis_server.url, node="node-a", **FAST)
        b = await Registry.open(redis_server.url, node="node-b", **FAST)
        try:
            await a.register(record("s1"))
            ids = [await a.append_history("s1", qa(n)) for n in range(3)]
            expected = [{"id": i, **qa(n)} for n, i in enumerate(ids)]
            assert await b.history("s1") == expected
            await a.close()
            assert await b.history("s1") == expected
            # node-a restarting reads its old history back.
            again = await Registry.open(redis_server.url, node="node-a", **FAST)
            try:
                assert await again.history("s1") == expected
            finally:
                await again.close()
        finally:
            await a.close()
            await b.close()

    run(body)


def test_in_process_only() -> None:
    async def body() -> None:
        a = await Registry.open(None, node="node-a", **FAST)
        try:
            assert not a.connected
            await a.register(record("s1", stats={"frames": 1}))
            await a.update("s1", stats={"frames": 2})
            ids = [await a.append_history("s1", qa(n)) for n in range(3)]
            assert ids == ["local-1", "local-2", "local-3"]
            assert await a.history("s1") == [{"id": i, **qa(n)} for n, i in enumerate(ids)]
            got = await a.get("s1")
            assert got is not None and got.stats == {"frames": 2}
            assert [r.id for r in await a.list()] == ["s1"]
            await a.update("s1", state="ended")
            got = await a.get("s1")
            assert got is not None and got.state == "ended"
            assert not a.connected
        finally:
            await a.close()

    run(body)


def test_unreachable_at_start_then_redis_appears(
    redis_server: RedisServer,
    plain: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    redis_server.stop()

    async def body() -> None:
        a = await Registry.open(redis_server.url, node="node-a", retention_s=1000.0, **FAST)
        try:
            assert not a.connected
            [warning] = warnings_of(caplog)
            assert warning.startswith(f"redis at {redis_server.url} unreachable (")
            assert warning.endswith("); running single-node with an in-process registry")

            await a.register(record("s1"))
            ids = [await a.append_history("s1", qa(n)) for n in range(3)]
            assert ids == ["local-1", "local-2", "local-3"]
            await a.update("s1", stats={"frames": 7})
            await a.register(record("s2", created="2025-01-03T00:00:00.000+00:00"))
            await a.append_history("s2", qa(9))
            await a.update("s2", state="ended", reason="done")
            await asyncio.sleep(0.5)  # several failed retries: still one warning
            assert len(warnings_of(caplog)) == 1
            assert await a.history("s1") == [{"id": i, **qa(n)} for n, i in enumerate(ids)]

            redis_server.start()
            await wait_until(lambda: a.connected)
            assert [e for _, e in stream(plain, "s1")] == [qa(0), qa(1), qa(2)]
            assert [e for _, e in stream(plain, "s2")] == [qa(9)]
            real = [i for i, _ in stream(plain, "s1")]
            assert await a.history("s1") == [{"id": i, **qa(n)} for n, i in enumerate(real)]
            s1 = plain.hgetall(session_key("s1"))
            assert (s1["node"], s1["state"], s1["stats"]) == ("node-a", "live", '{"frames":7}')
            assert 0 < plain.pttl(session_key("s1")) <= 2000
            s2 = plain.hgetall(session_key("s2"))
            assert (s2["state"], s2["reason"]) == ("ended", "done")
            assert 990_000 < plain.pttl(session_key("s2")) <= 1_000_000
            assert plain.zrange("livelens:sessions", 0, -1) == ["s1", "s2"]
            infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
            assert infos == [
                f"redis at {redis_server.url} reachable; re-registered 2 sessions and flushed "
                "4 history entries"
            ]
            # Straight to Redis from now on.
            new_id = await a.append_history("s1", qa(3))
            assert [i for i, _ in stream(plain, "s1")] == [*real, new_id]
        finally:
            await a.close()

    run(body)


def test_redis_lost_mid_session_and_restarted_empty(
    redis_server: RedisServer,
    plain: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def body() -> None:
        a = await Registry.open(redis_server.url, node="node-a", **FAST)
        try:
            await a.register(record("s1"))
            before = [await a.append_history("s1", qa(n)) for n in range(2)]

            redis_server.stop()
            during = [await a.append_history("s1", qa(n)) for n in range(2, 5)]
            assert during == ["local-1", "local-2", "local-3"]
            assert not a.connected
            await a.update("s1", stats={"frames": 50})
            # While down, history comes from the in-process copy, buffered entries included.
            ids = before + during
            assert await a.history("s1") == [{"id": i, **qa(n)} for n, i in enumerate(ids)]
            [warning] = warnings_of(caplog)
            assert warning.startswith(f"redis at {redis_server.url} lost (")

            redis_server.start()  # empty: no persistence
            await wait_until(lambda: a.connected)
            rows = stream(plain, "s1")
            # Everything is back exactly once, in order; entries Redis had before keep their ids.
            assert [e for _, e in rows] == [qa(n) for n in range(5)]
            assert [i for i, _ in rows][:2] == before
            assert await a.history("s1") == [{"id": i, **e} for i, e in rows]
            fields = plain.hgetall(session_key("s1"))
            assert (fields["state"], fields["stats"]) == ("live", '{"frames":50}')
            assert plain.zrange("livelens:sessions", 0, -1) == ["s1"]
            assert len(warnings_of(caplog)) == 1
        finally:
            await a.close()

    run(body)


def test_restart_between_heartbeats_restores_only_what_was_lost(
    redis_server: RedisServer,
    plain: redis.Redis,
) -> None:
    async def body() -> None:
        a = await Registry.open(redis_server.url, node="node-a", **FAST)
        try:
            await a.register(record("s1"))
            ids = [await a.append_history("s1", qa(n)) for n in range(2)]
            plain.save()  # the snapshot a restarted server loads: entries 0 and 1
            ids.append(await a.append_history("s1", qa(2)))
            redis_server.restart()
            assert plain.xlen(history_key("s1")) == 2
            # The heartbeat sees a new run id and writes back what the snapshot lacks.
            await wait_until(lambda: plain.xlen(history_key("s1")) == 3)
            await wait_until(lambda: a.connected)
            assert stream(plain, "s1") == [(i, qa(n)) for n, i in enumerate(ids)]
            assert plain.hget(session_key("s1"), "state") == "live"
        finally:
            await a.close()

    run(body)


@pytest.mark.parametrize("bad", ["", "a b", "a:b", "x" * 65, "ö", "../s"])
def test_invalid_session_id(bad: str) -> None:
    async def body() -> None:
        a = await Registry.open(None, node="node-a")
        try:
            with pytest.raises(ValueError, match="invalid session id"):
                await a.register(record(bad))
            with pytest.raises(ValueError, match="invalid session id"):
                await a.get(bad)
            with pytest.raises(ValueError, match="invalid session id"):
                await a.history(bad)
            with pytest.raises(ValueError, match="invalid session id"):
                await a.update(bad, state="ended")
            with pytest.raises(ValueError, match="invalid session id"):
                await a.append_history(bad, qa(0))
        finally:
            await a.close()

    run(body)
    assert session_key("ok_ID-1") == "livelens:session:ok_ID-1"


def test_restart_unseen_by_the_pool_is_caught_by_run_id(
    redis_server: RedisServer,
    plain: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def body() -> None:
        a = await Registry.open(redis_server.url, node="node-a", **FAST)
        try:
            await a.register(record("s1"))
            ids = [await a.append_history("s1", qa(n)) for n in range(2)]
            redis_server.restart()
            # Drop the pooled connections, as a pool that reconnects on its own would: the next
            # command meets a fresh server without any error, so only the run id reveals it.
            assert a._client is not None
            await a._client.connection_pool.disconnect()
            await wait_until(lambda: plain.xlen(history_key("s1")) == 2)
            assert stream(plain, "s1") == [(i, qa(n)) for n, i in enumerate(ids)]
            assert plain.hget(session_key("s1"), "state") == "live"
            assert warnings_of(caplog) == [
                f"redis at {redis_server.url} restarted; restoring this node's sessions and history"
            ]
        finally:
            await a.close()

    run(body)
