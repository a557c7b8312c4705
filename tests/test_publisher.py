"""Publisher against the real app on a real port: looping, end of file, restarts, refusals.

The server restart is real: the first app stops (its WHIP peers closed, the port shut), a new
one starts on the same port after a pause, and the publisher must find it and publish again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import serve
from media_servers import RtspServer, closed_port
from service_harness import fast_config
from videos import make_video, read_index

from livelens.clients import ConnectionFailed, LiveLensClient, Publisher, ServerError
from livelens.clients.publisher import SourceUnavailable
from livelens.model.runner import ModelRunner
from livelens.stream.app import create_app
from livelens.stream.service import LiveService
from livelens.stream.whip import WhipSettings

TOKEN = "publisher-token"


def make_server(
    tiny_model: Any, *, port: int = 0
) -> tuple[contextlib.AbstractContextManager[str], LiveService]:
    service = LiveService(ModelRunner(tiny_model), fast_config(None))
    whip = WhipSettings(token=TOKEN, allow_loopback=True)  # loopback ICE: test-only
    return serve(create_app(service, token=TOKEN, whip=whip), port=port), service


@contextlib.contextmanager
def running(tiny_model: Any) -> Iterator[tuple[str, LiveService]]:
    server, service = make_server(tiny_model)
    with server as url:
        yield url, service


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 s of video: 10 frames at 10 fps."""
    path = tmp_path_factory.mktemp("publisher") / "second.mp4"
    return make_video(path, frames=10, fps=10, width=160, height=120).path


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    names = [t.name for t in threading.enumerate()]
    assert not [n for n in names if n.startswith("livelens-")], names


async def until(predicate: Any, timeout: float = 20.0) -> Any:
    for _ in range(int(timeout / 0.05)):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {predicate}")


def received(service: LiveService, session_id: str) -> int:
    session = service.get(session_id)
    return 0 if session is None else session.status()["frames_received"]


def test_looping_file_keeps_publishing_past_its_end(tiny_model, second) -> None:
    with running(tiny_model) as (url, service):

        async def scenario() -> None:
            async with Publisher(url, str(second), token=TOKEN, loop=True) as publisher:
                sid = publisher.session_id
                assert sid is not None
                session = service.get(sid)
                assert session is not None
                # Media time runs on past the file's 1 s, at the file's rate, in one session.
                started = asyncio.get_running_loop().time()
                await until(lambda: (session.live_edge or 0) >= 2.5)
                elapsed = asyncio.get_running_loop().time() - started
                assert 1.0 < elapsed < 6.0, elapsed
                assert not publisher.done and publisher.reconnects == 0
                assert publisher.frames_sent >= 25
                assert session.status()["state"] == "live"

        asyncio.run(scenario())


def test_rtsp_camera_is_republished_over_whip(tiny_model, tmp_path) -> None:
    """An RTSP camera (GStreamer's RTSP server) relayed over WHIP: its pictures reach the model."""
    clip = make_video(tmp_path / "camera.mp4", frames=60, fps=15, width=320, height=240)
    camera = RtspServer(clip.path)
    try:
        with running(tiny_model) as (url, service):

            async def scenario() -> None:
                async with Publisher(url, camera.url, token=TOKEN) as publisher:
                    session = service.get(publisher.session_id or "")
                    assert session is not None
                    await until(lambda: session.status()["frames_in_model"] >= 2)
                    assert session.last_sampled is not None
                    # The picture survived RTSP, decoding, VP8 over WebRTC and decoding again.
                    frame_number = read_index(session.last_sampled[1])
                    assert 0 < frame_number < 60
                    assert publisher.reconnects == 0

            asyncio.run(scenario())
    finally:
        camera.stop()


def test_file_end_stops_publishing_and_close_deletes(tiny_model, second) -> None:
    with running(tiny_model) as (url, _):

        async def scenario() -> int:
            publisher = Publisher(url, str(second), token=TOKEN)
            sid = await publisher.start()
            try:
                await asyncio.wait_for(publisher.wait(), timeout=15)  # returns at the end
                assert publisher.done and publisher.frames_sent == 10
            finally:
                await publisher.close()
            await publisher.close()  # idempotent
            async with LiveLensClient(url, token=TOKEN) as client:
                record = await client.session(sid)
            assert (record.state, record.reason) == ("ended", "publisher sent DELETE")
            assert record.end_code == "publisher_deleted"
            return record.stats.frames_received

        frames = asyncio.run(scenario())
        assert 8 <= frames <= 10  # the last frames may still be in flight at DELETE


def test_republishes_when_the_server_restarts_on_the_same_port(tiny_model, second) -> None:
    first, first_service = make_server(tiny_model)
    url = first.__enter__()
    port = int(url.rsplit(":", 1)[1])
    changes: list[str] = []

    async def scenario() -> None:
        publisher = Publisher(
            url,
            str(second),
            token=TOKEN,
            loop=True,
            poll_interval=0.3,
            backoff_initial=0.2,
            backoff_max=0.5,
            on_session=changes.append,
        )
        try:
            old = await publisher.start()
            await until(lambda: received(first_service, old) >= 5)
            await asyncio.to_thread(first.__exit__, None, None, None)
            await asyncio.sleep(1.0)  # down for a while: connection refused, backoff
            assert publisher.session_id == old and publisher.reconnects == 0
            second_server, second_service = make_server(tiny_model, port=port)
            assert await asyncio.to_thread(second_server.__enter__) == url
            try:
                new = await asyncio.wait_for(publisher.next_session(old), timeout=20)
                assert new != old and second_service.get(old) is None
                await until(lambda: received(second_service, new) >= 5)  # frames flow again
                assert publisher.reconnects == 1 and changes == [old, new]
                assert not publisher.done
                await publisher.close()
                session = second_service.get(new)
                assert session is not None and session.reason == "publisher sent DELETE"
            finally:
                await publisher.close()
                await asyncio.to_thread(second_server.__exit__, None, None, None)
        finally:
            await publisher.close()

    try:
        asyncio.run(scenario())
    finally:
        first.__exit__(None, None, None)


def test_session_deleted_through_the_api_is_not_republished(tiny_model, second) -> None:
    with running(tiny_model) as (url, _):

        async def scenario() -> None:
            async with (
                Publisher(url, str(second), token=TOKEN, loop=True, poll_interval=0.2) as pub,
                LiveLensClient(url, token=TOKEN) as client,
            ):
                deleted = await client.delete(pub.session_id)  # type: ignore[arg-type]
                assert (deleted.state, deleted.reason) == ("ended", "deleted through the API")
                assert deleted.end_code == "deleted"  # what the publisher decides by
                await asyncio.wait_for(pub.wait(), timeout=10)
                assert pub.reconnects == 0 and len(await client.sessions()) == 1

        asyncio.run(scenario())


def test_refusals_are_reported_and_not_retried(tiny_model, second, tmp_path) -> None:
    with running(tiny_model) as (url, service):

        async def scenario() -> None:
            with pytest.raises(ServerError) as refused:
                await Publisher(url, str(second), token="wrong").start()
            assert (refused.value.status, refused.value.code) == (401, "unauthorized")
            assert not service.sessions

            with pytest.raises(SourceUnavailable, match="no such file"):
                await Publisher(url, str(tmp_path / "missing.mp4"), token=TOKEN).start()
            not_video = tmp_path / "notes.mp4"
            not_video.write_text("not a video\n" * 20)
            with pytest.raises(SourceUnavailable, match=r"notes\.mp4"):
                await Publisher(url, str(not_video), token=TOKEN).start()

            gone = f"http://127.0.0.1:{closed_port()}"
            with pytest.raises(ConnectionFailed, match="connection refused"):
                await Publisher(gone, str(second)).start()

        asyncio.run(scenario())
    with pytest.raises(ValueError, match="malformed server URL"):
        Publisher("127.0.0.1:8000", str(second))
