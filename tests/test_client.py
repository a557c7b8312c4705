"""The Python client against the real app: uvicorn on a port, the tiny model, redis, WHIP.

A real aiortc publisher (livelens.clients.Publisher) sends an encoded file; LiveLensClient
lists, asks over the websocket, reads history and thumbnails, deletes. Answers that must name
a time span come from SteeredRunner (the real model, its LM head steered to spell the text).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from browser import serve
from media_servers import closed_port
from service_harness import SteeredRunner, fast_config
from videos import make_video

from livelens.clients import (
    Answer,
    BlockingClient,
    ConnectionFailed,
    HistoryEntry,
    LiveLensClient,
    Publisher,
    ServerError,
    SessionInfo,
    Status,
)
from livelens.model.runner import ModelRunner
from livelens.stream.app import create_app
from livelens.stream.service import LiveService
from livelens.stream.whip import WhipSettings

TOKEN = "client-token"
STEERED = "From 0.5 to 1.0 seconds."


@contextlib.contextmanager
def live_server(
    runner: ModelRunner, redis_url: str | None, media_root: Path | None = None
) -> Iterator[tuple[str, LiveService]]:
    service = LiveService(runner, fast_config(redis_url, media_root=media_root))
    whip = WhipSettings(token=TOKEN, allow_loopback=True)  # loopback ICE: test-only
    with serve(create_app(service, token=TOKEN, whip=whip)) as url:
        yield url, service


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 s of 160x120 H.264 at 10 fps."""
    path = tmp_path_factory.mktemp("client") / "clip.mp4"
    return make_video(path, frames=30, fps=10, width=160, height=120).path


@pytest.fixture
def server(tiny_model, redis_server, clip) -> Iterator[tuple[str, LiveService]]:
    with live_server(SteeredRunner(tiny_model, STEERED), redis_server.url, clip.parent) as running:
        yield running


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    names = [t.name for t in threading.enumerate()]
    assert not [n for n in names if n.startswith("livelens-")], names


async def wait_until_position(client: LiveLensClient, session_id: str, seconds: float) -> Status:
    """Poll the session until the model has seen `seconds` of media."""
    for _ in range(300):
        status = (await client.session(session_id)).status
        if status is not None and (status.stream_position or 0) >= seconds:
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"session {session_id} never reached {seconds} s")


def _instant(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def test_publish_list_ask_history_and_delete(server, clip) -> None:
    url, _ = server

    async def scenario() -> tuple[str, list[Any], SessionInfo, list[HistoryEntry]]:
        async with (
            LiveLensClient(url, token=TOKEN) as client,
            Publisher(url, str(clip), token=TOKEN, loop=True) as publisher,
        ):
            sid = publisher.session_id
            assert sid is not None and publisher.session_url == f"{url}/v1/sessions/{sid}"
            assert publisher.websocket_url == f"ws{url[4:]}/v1/sessions/{sid}/ws"
            listed = await client.sessions()
            assert [(s.id, s.kind, s.node) for s in listed] == [(sid, "whip", "test-node")]
            assert listed[0].source.startswith("whip:127.0.0.1 livelens-publisher/")
            await wait_until_position(client, sid, 1.0)
            pieces = [p async for p in client.ask(sid, "When?", max_new_tokens=16)]
            history = await client.history(sid)
        # Publisher.close() sent DELETE to the WHIP resource.
        async with LiveLensClient(url, token=TOKEN) as client:
            final = await client.session(sid)
        return sid, pieces, final, history

    sid, pieces, final, history = asyncio.run(scenario())
    *tokens, answer = pieces
    assert isinstance(answer, Answer) and all(isinstance(t, str) for t in tokens)
    assert len(tokens) > 3 and "".join(tokens) == answer.text == STEERED
    assert answer.question == "When?" and answer.stream_position >= 1.0
    [segment] = answer.segments
    assert (segment.start, segment.end) == (0.5, 1.0)
    # Wall clock: media 0 is the first frame's arrival, so the span is 0.5 s long and before
    # the question was asked.
    start, end = _instant(segment.start_time), _instant(segment.end_time)
    assert start.tzinfo is not None and end - start == timedelta(seconds=0.5)
    assert _instant(final.created) < start < end < _instant(answer.asked_at)
    assert answer.latency_ms.total >= answer.latency_ms.ttft > 0

    [entry] = history
    assert (entry.id, entry.text, entry.segments) == (answer.id, answer.text, answer.segments)
    assert entry.entry_id and not entry.entry_id.startswith("local-")  # stored in Redis

    assert final.id == sid and final.state == "ended"
    assert final.reason == "publisher sent DELETE"
    assert final.stats.frames_received >= 10


def test_pull_session_thumbnails_watch_and_delete(tiny_model, clip) -> None:
    with live_server(ModelRunner(tiny_model), None, clip.parent) as (url, _):

        async def scenario() -> tuple[SessionInfo, list[Status], Any, bytes, SessionInfo]:
            async with LiveLensClient(url, token=TOKEN) as client:
                started = await client.start_pull(str(clip), fps=2, realtime=True)
                assert started.kind == "pull" and started.source == str(clip)
                statuses = [s async for s in client.watch(started.id)]
                thumbnails = await client.thumbnails(started.id, start=0.5, end=1.5)
                jpeg = await client.thumbnail(started.id, at=1.0)
                return started, statuses, thumbnails, jpeg, await client.delete(started.id)

        started, statuses, thumbnails, jpeg, deleted = asyncio.run(scenario())
    # watch() runs from the first status to the one saying the file ended, then stops.
    assert statuses[0].state in ("starting", "live") and statuses[-1].state == "ended"
    assert [s.finished for s in statuses] == [False] * (len(statuses) - 1) + [True]
    assert statuses[-1].frames_received == 30 and statuses[-1].frames_sampled == 6
    assert [t.time for t in thumbnails] == [0.5, 1.0, 1.5]
    assert all(
        (t.width, t.height) == (thumbnails[0].width, thumbnails[0].height) for t in thumbnails
    )
    assert thumbnails[1].url == f"/v1/sessions/{started.id}/thumbnail?at=1.000"
    assert jpeg[:3] == b"\xff\xd8\xff"
    assert deleted.id == started.id and deleted.state == "ended"


def test_blocking_client_in_plain_code_and_inside_a_running_loop(tiny_model, clip) -> None:
    with live_server(SteeredRunner(tiny_model, STEERED), None, clip.parent) as (url, _):
        # Plain synchronous code, as in a script.
        with LiveLensClient.blocking(url, token=TOKEN) as client:
            sid = client.start_pull(str(clip), loop=True).id
            statuses = client.watch(sid)
            for status in statuses:
                if (status.stream_position or 0) >= 1.0:
                    break
            statuses.close()  # type: ignore[attr-defined]  (ends the websocket early)
            pieces: list[str] = []
            answer = client.ask(sid, "When?", on_token=pieces.append, max_new_tokens=16)
            assert "".join(pieces) == answer.text == STEERED
            streamed = list(client.stream(sid, "Again?", max_new_tokens=16))
            assert "".join(streamed[:-1]) == streamed[-1].text == STEERED  # type: ignore[union-attr]
            assert [e.id for e in client.history(sid)] == [answer.id, streamed[-1].id]  # type: ignore[union-attr]

        # Inside a running event loop, as in a Jupyter cell: the calls block, nothing deadlocks.
        async def notebook_cell() -> tuple[list[SessionInfo], Answer]:
            assert asyncio.get_running_loop().is_running()
            with BlockingClient(url, token=TOKEN) as client:
                return client.sessions(), client.ask(sid, "When?", max_new_tokens=16)

        listed, again = asyncio.run(notebook_cell())
        assert [s.id for s in listed] == [sid]
        assert again.text == STEERED and again.segments[0].start == 0.5
    with pytest.raises(RuntimeError, match="closed"):
        client.sessions()


def test_errors_name_the_cause(tiny_model, clip) -> None:
    with live_server(ModelRunner(tiny_model), None, clip.parent) as (url, _):

        async def scenario() -> None:
            async with LiveLensClient(url, token="wrong") as client:
                with pytest.raises(ServerError) as refused:
                    await client.sessions()
                assert (refused.value.status, refused.value.code) == (401, "unauthorized")
                assert str(refused.value) == (
                    "the API key is not valid (unknown or revoked) (401 unauthorized)"
                )
                with pytest.raises(ServerError) as refused:
                    await anext(aiter(client.ask("0" * 32, "q?")))
                assert (refused.value.status, refused.value.code) == (401, "unauthorized")

            async with LiveLensClient(url, token=TOKEN) as client:
                unknown = "f" * 32
                for call in (
                    lambda: client.session(unknown),
                    lambda: client.history(unknown),
                    lambda: anext(aiter(client.ask(unknown, "q?"))),
                    lambda: anext(aiter(client.watch(unknown))),
                ):
                    with pytest.raises(ServerError) as missing:
                        await call()
                    assert (missing.value.status, missing.value.code) == (404, "unknown_session")
                    assert unknown in missing.value.message

                sid = (await client.start_pull(str(clip), loop=True)).id
                with pytest.raises(ServerError) as empty:
                    await anext(aiter(client.ask(sid, "   ")))
                assert (empty.value.status, empty.value.code) == (None, "empty_question")
                with pytest.raises(ServerError) as bad:
                    await client.start_pull("/no/such/file.mp4")
                assert (bad.value.status, bad.value.code) == (422, "source_unavailable")
                with pytest.raises(ServerError) as bad:
                    await client.start_pull(str(clip), fps=100)
                assert (bad.value.status, bad.value.code) == (422, "invalid_request")

            async with LiveLensClient(f"http://127.0.0.1:{closed_port()}") as client:
                with pytest.raises(ConnectionFailed, match="connection refused"):
                    await client.sessions()
                with pytest.raises(ConnectionFailed, match="connection refused"):
                    await anext(aiter(client.watch(unknown)))

        asyncio.run(scenario())
    for bad_url in ("localhost:8000", "ftp://host", "http://", "http://host/?x=1"):
        with pytest.raises(ValueError, match="malformed server URL"):
            LiveLensClient(bad_url)
        with pytest.raises(ValueError, match="malformed server URL"):
            BlockingClient(bad_url)


def test_client_types_mirror_the_server_messages() -> None:
    """The client keeps its own dataclasses (it must not import the server, which loads torch)
    and drops fields it does not know; so any field the server adds or renames is caught here."""
    import dataclasses

    from livelens.clients.client import Latency, Segment, SessionStats, Thumbnail
    from livelens.stream import protocol
    from livelens.stream.registry import SessionRecord
    from livelens.stream.service import STATS_KEYS

    def names(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def message(model: type) -> set[str]:
        return set(model.model_fields) - {"type"}

    assert names(Status) == message(protocol.StatusMessage)
    assert names(Answer) == message(protocol.AnswerMessage)
    assert names(Segment) == message(protocol.SegmentOut)
    assert names(Latency) == message(protocol.LatencyOut)
    assert names(Thumbnail) == message(protocol.ThumbnailOut)
    assert names(SessionInfo) == names(SessionRecord) | {"status"}
    assert names(SessionStats) == {*STATS_KEYS, "gaps"}


def test_questions_are_checked_by_the_server_parser_before_sending() -> None:
    """The client refuses what the server would, with the server's codes, and never connects:
    the server here is a closed port (a connection attempt would be ConnectionFailed)."""

    async def ask(**fields) -> ServerError:
        async with LiveLensClient(f"http://127.0.0.1:{closed_port()}") as client:
            with pytest.raises(ServerError) as refused:
                await client.answer("0" * 32, **fields)
            return refused.value

    for fields, code in (
        ({"question": "q", "max_new_tokens": 5000}, "invalid_message"),
        ({"question": "q", "temperature": 0.0001}, "invalid_message"),
        ({"question": "q", "memory": "everything"}, "invalid_message"),
        ({"question": "   "}, "empty_question"),
        ({"question": "x" * 2001}, "question_too_long"),
    ):
        error = asyncio.run(ask(**fields))
        assert (error.status, error.code) == (None, code), fields
