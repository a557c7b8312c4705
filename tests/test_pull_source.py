"""PullSource on real encoded media from real local servers: HLS, RTSP, files, outages, garbage."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from media_servers import (
    HlsMedia,
    LiveClock,
    MediaServer,
    RtspServer,
    TcpPeer,
    closed_port,
    make_hls,
    rtsp_unavailable,
)
from videos import Video, make_audio_only, make_video, read_index

from livelens.stream.errors import SourceError
from livelens.stream.frames import DecodedFrame
from livelens.stream.sources.pull import PullConfig, PullSource, SourceEvent

FPS = 10
# Times come from 90 kHz MPEG-TS/RTP clocks whose frame steps (9000 ticks) are exact.
TIME_TOL = 1e-6


@dataclass(frozen=True)
class Got:
    """A delivered frame as the test saw it."""

    wall: float
    time: float
    index: int
    pix_fmt: str


class Recorder:
    """Collects frames and events from the source thread; tests wait on it with a deadline."""

    def __init__(self, fail_on_frame: bool = False) -> None:
        self.frames: list[Got] = []
        self.events: list[tuple[float, SourceEvent]] = []
        self.threads: set[str] = set()
        self._fail_on_frame = fail_on_frame
        self._cond = threading.Condition()

    def on_frame(self, decoded: DecodedFrame) -> None:
        if self._fail_on_frame:
            raise RuntimeError("boom")
        frame = decoded.frame
        got = Got(
            time.monotonic(),
            decoded.time,
            read_index(frame.to_ndarray(format="rgb24")),
            frame.format.name,
        )
        with self._cond:
            self.threads.add(threading.current_thread().name)
            self.frames.append(got)
            self._cond.notify_all()

    def on_event(self, event: SourceEvent) -> None:
        with self._cond:
            self.events.append((time.monotonic(), event))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out after {timeout} s waiting for {what}: {self}")

    def wait_frames(self, count: int, timeout: float = 10) -> None:
        self.wait_for(lambda: len(self.frames) >= count, timeout, f"{count} frames")

    def wait_kind(self, kind: str, timeout: float = 10) -> SourceEvent:
        self.wait_for(lambda: kind in self.kinds(), timeout, f"a {kind!r} event")
        return next(e for _, e in self.events if e.kind == kind)

    def kinds(self) -> list[str]:
        return [e.kind for _, e in self.events]

    def event_time(self, kind: str) -> float:
        return next(t for t, e in self.events if e.kind == kind)

    def __repr__(self) -> str:
        return f"Recorder({len(self.frames)} frames, events={[e for _, e in self.events]})"


Pull = Callable[..., tuple[PullSource, Recorder]]


@pytest.fixture
def pull() -> Iterator[Pull]:
    """Start PullSources that are stopped at teardown, whatever the test did."""
    sources: list[PullSource] = []

    def start(url: str, recorder: Recorder | None = None, **config: object) -> tuple:
        recorder = recorder or Recorder()
        source = PullSource(
            url,
            on_frame=recorder.on_frame,
            on_event=recorder.on_event,
            config=PullConfig(**config),  # type: ignore[arg-type]
        )
        sources.append(source)
        source.start()
        return source, recorder

    yield start
    for source in sources:
        source.stop()
        assert not source.running


@pytest.fixture(scope="module")
def hls(tmp_path_factory: pytest.TempPathFactory) -> HlsMedia:
    """12 one-second H.264 segments at 10 fps; frame i shows the number i."""
    return make_hls(tmp_path_factory.mktemp("hls"), segments=12, fps=FPS, segment_s=1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Video:
    """2 s at 10 fps (H.264 in MP4, with B-frames), for file and RTSP sources."""
    return make_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=20, fps=FPS, gop=10)


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Video:
    return make_video(tmp_path_factory.mktemp("short") / "short.mp4", frames=10, fps=FPS, gop=5)


def assert_increasing(frames: list[Got]) -> None:
    times = [f.time for f in frames]
    assert all(b > a for a, b in itertools.pairwise(times)), times


def assert_pts_spacing(frames: list[Got]) -> None:
    """Within one connection, media time follows the stream's timestamps exactly."""
    first = frames[0]
    expected = [first.time + (f.index - first.index) / FPS for f in frames]
    assert [f.time for f in frames] == pytest.approx(expected, abs=TIME_TOL)


# --- HLS -------------------------------------------------------------------------------------


def test_hls_vod_decodes_every_frame_then_ends(hls: HlsMedia, pull: Pull) -> None:
    with MediaServer(hls.folder) as server:
        url = server.url("index.m3u8")
        source, got = pull(url)
        ended = got.wait_kind("ended")
    assert got.kinds() == ["connected", "ended"]
    assert got.events[0][1].message == f"{url}: h264 160x120"
    assert ended.message == f"end of stream: {url} (12.0 s)"
    assert [f.index for f in got.frames] == list(range(120))
    assert [f.time for f in got.frames] == pytest.approx([i / FPS for i in range(120)])
    assert got.frames[0].time == 0.0
    assert {f.pix_fmt for f in got.frames} == {"yuv420p"}, "frames come as decoded, not RGB"
    assert got.threads == {f"pull {url}"}
    stats = source.stats
    assert (stats.frames, stats.connects, stats.reconnects) == (120, 1, 0)
    assert stats.decode_errors == stats.dropped_frames == 0
    assert stats.gaps == []


def test_progressive_http_file_plays_to_its_end(clip: Video, pull: Pull) -> None:
    with MediaServer(clip.path.parent) as server:
        url = server.url(clip.path.name)
        _source, got = pull(url)
        ended = got.wait_kind("ended")
    assert got.kinds() == ["connected", "ended"]
    assert ended.message == f"end of stream: {url} (2.0 s)"
    assert [f.index for f in got.frames] == list(range(20))
    assert [f.time for f in got.frames] == pytest.approx([i / FPS for i in range(20)])


def test_hls_live_starts_at_the_live_edge(hls: HlsMedia, pull: Pull) -> None:
    # Segments 0-4 are out, the playlist lists 2-4: a live client starts at segment 4.
    clock = LiveClock(hls, preload=5, window=3)
    with MediaServer(hls.folder, clock=clock) as server:
        source, got = pull(server.url("live.m3u8"))
        got.wait_frames(15)
        source.stop()
    first = got.frames[0].index
    assert first in (40, 50), "started at the newest segment (50 if the clock ticked meanwhile)"
    indexes = [f.index for f in got.frames]
    assert indexes == list(range(first, first + len(indexes)))
    assert got.frames[0].time == 0.0
    assert_pts_spacing(got.frames)
    assert got.kinds() == ["connected"]
    # Segment 5 is published 1 s after the clock started; its frames cannot come sooner.
    next_segment = [f for f in got.frames if f.index >= first + 10]
    assert next_segment, "the source waited for the next live segment"
    assert next_segment[0].wall >= clock.started + (first // 10 - 4) * 1.0 - 0.05


def test_hls_outage_reconnects_and_continues_the_timeline(hls: HlsMedia, pull: Pull) -> None:
    clock = LiveClock(hls, preload=3, window=3)
    server = MediaServer(hls.folder, clock=clock)
    try:
        source, got = pull(
            server.url("live.m3u8"),
            reconnect_initial_s=0.2,
            reconnect_max_s=0.4,
            give_up_after_s=10,
            open_timeout_s=3,
        )
        got.wait_frames(15)
        port = server.port
        server.stop()
        down = time.monotonic()
        time.sleep(1.0)
        server = MediaServer(hls.folder, clock=clock, port=port)
        outage = time.monotonic() - down
        gap_event = got.wait_kind("gap", timeout=10)
        before = len([f for f in got.frames if f.time <= gap_event.gap[0]])
        got.wait_frames(before + 10)
        source.stop()
    finally:
        server.stop()

    kinds = got.kinds()
    assert kinds[0] == "connected"
    assert kinds[-2:] == ["connected", "gap"]
    assert set(kinds[1:-2]) == {"reconnecting"}
    assert gap_event.gap is not None
    start, end = gap_event.gap
    stats = source.stats
    assert stats.gaps == [gap_event.gap]
    assert stats.connects == 2
    assert stats.reconnects == kinds.count("reconnecting") >= 1
    # The drop shows either as the playlist ending (the demuxer reloaded it after the server
    # was back) or as a refused reload (it reloaded during the outage): timing decides which.
    url = server.url("live.m3u8")
    assert stats.last_error in (
        f"stream ended: {url}",
        f"lost the stream (connection refused: {url})",
    )

    # Media time continues across the outage by at least the outage's wall-clock length.
    assert end - start >= outage - 0.05, (end - start, outage)
    assert end - start <= outage + 2.5, (end - start, outage)
    assert_increasing(got.frames)
    old = [f for f in got.frames if f.time <= start]
    new = [f for f in got.frames if f.time >= end]
    assert len(old) + len(new) == len(got.frames)
    assert old[-1].time == start and new[0].time == end
    for side in (old, new):
        assert [f.index for f in side] == list(range(side[0].index, side[-1].index + 1))
        assert_pts_spacing(side)
    assert new[0].index > old[-1].index, "resumed at the live edge, not replaying old segments"


# --- failures --------------------------------------------------------------------------------


def test_unreachable_rtsp_backs_off_then_gives_up(pull: Pull) -> None:
    url = f"rtsp://127.0.0.1:{closed_port()}/x"
    started = time.monotonic()
    source, got = pull(url, reconnect_initial_s=0.2, reconnect_max_s=0.4, give_up_after_s=1.5)
    failed = got.wait_kind("failed", timeout=10)
    took = got.event_time("failed") - started
    assert 1.5 <= took < 2.5
    assert failed.message.startswith(f"connection refused: {url} (failing for 1.5 s")
    kinds = got.kinds()
    assert kinds[-1] == "failed" and set(kinds[:-1]) == {"reconnecting"}
    retries = [(t, e) for t, e in got.events if e.kind == "reconnecting"]
    assert retries[0][1].message == f"connection refused: {url}; reconnecting in 0.2 s"
    # Exponential backoff from 0.2 s, doubled, capped at 0.4 s, jitter at most +10%.
    waits = [b[0] - a[0] for a, b in itertools.pairwise(retries)]
    for k, wait in enumerate(waits):
        expected = min(0.4, 0.2 * 2**k)
        assert expected <= wait <= expected * 1.1 + 0.1, (k, waits)
    stats = source.stats
    assert stats.connects == stats.frames == 0
    assert stats.reconnects == len(retries)
    assert stats.last_error == f"connection refused: {url}"
    source.stop(timeout=1)
    assert not source.running


def test_passwords_stay_out_of_messages(pull: Pull) -> None:
    port = closed_port()
    source, got = pull(f"rtsp://cam:s3cret@127.0.0.1:{port}/x", give_up_after_s=0)
    failed = got.wait_kind("failed")
    shown = f"rtsp://cam:***@127.0.0.1:{port}/x"
    assert source.name == shown
    assert failed.message.startswith(f"connection refused: {shown} (")
    assert "s3cret" not in failed.message


@pytest.mark.parametrize(
    ("mode", "scheme", "reason"),
    [
        ("http-garbage", "http", "not a media stream FFmpeg can read"),
        ("garbage", "rtsp", "not a media stream FFmpeg can read"),
        # Garbage then FIN over HTTP races FFmpeg's read of the response against the reset:
        # an explicit RST after the request is the deterministic case.
        ("reset", "http", "connection reset by the server"),
    ],
)
def test_garbage_is_retried_then_fails_with_a_clear_reason(
    pull: Pull, mode: str, scheme: str, reason: str
) -> None:
    with TcpPeer(mode) as peer:
        url = peer.url(scheme, "live.m3u8")
        source, got = pull(url, reconnect_initial_s=0.2, give_up_after_s=1.0, open_timeout_s=2)
        failed = got.wait_kind("failed", timeout=10)
        assert peer.connections >= 2, "garbage is retried like any other failure"
    assert failed.message.startswith(f"{reason}: {url} (failing for")
    assert got.kinds()[0] == "reconnecting"
    assert source.stats.frames == 0


def test_missing_playlist_is_retried_then_fails(tmp_path: Path, pull: Pull) -> None:
    with MediaServer(tmp_path) as server:
        url = server.url("missing.m3u8")
        source, got = pull(url, reconnect_initial_s=0.1, give_up_after_s=0.5)
        failed = got.wait_kind("failed")
    assert failed.message.startswith(f"server returned 404 Not Found: {url} (failing for")
    assert got.kinds().count("reconnecting") == source.stats.reconnects >= 2


def test_hung_server_times_out_and_is_retried(pull: Pull) -> None:
    with TcpPeer("silent") as peer:
        url = peer.url("http", "live.m3u8")
        started = time.monotonic()
        _source, got = pull(url, reconnect_initial_s=0.1, give_up_after_s=0.8, open_timeout_s=0.5)
        failed = got.wait_kind("failed", timeout=10)
        took = time.monotonic() - started
    assert failed.message.startswith(f"timed out after 0.5 s: {url} (failing for 1.")
    assert "reconnecting" in got.kinds()
    # Two or three attempts of 0.5 s each before the 0.8 s give-up is seen, never a hang.
    assert 0.8 <= took < 2.5


def test_stop_interrupts_a_blocked_read(pull: Pull) -> None:
    with TcpPeer("silent") as peer:
        source, got = pull(peer.url("http", "live.m3u8"), open_timeout_s=1.0)
        deadline = time.monotonic() + 5
        while peer.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # now blocked inside FFmpeg, waiting for an answer
        started = time.monotonic()
        source.stop()
        took = time.monotonic() - started
    assert took < 1.0 + 0.3, "a blocked read ends at open_timeout_s at the latest"
    assert not source.running
    assert got.events == [], "no callback after stop()"


def test_stream_without_video_fails_at_once(tmp_path: Path, pull: Pull) -> None:
    make_audio_only(tmp_path / "tone.m4a")
    with MediaServer(tmp_path) as server:
        url = server.url("tone.m4a")
        source, got = pull(url, reconnect_initial_s=0.1)
        failed = got.wait_kind("failed")
    assert got.kinds() == ["failed"], "no retry: the stream has no video"
    assert failed.message == f"no video stream in {url} (streams found: audio)"
    assert source.stats.reconnects == 0


def test_callback_error_fails_the_source_loudly(
    clip: Video, pull: Pull, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="livelens.stream.sources.pull"):
        source, got = pull(str(clip.path), Recorder(fail_on_frame=True), realtime=False)
        failed = got.wait_kind("failed")
        source.stop()
    assert failed.message == f"unexpected error pulling {clip.path}: RuntimeError: boom"
    assert got.kinds() == ["connected", "failed"]
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert logged and logged[0].exc_info[0] is RuntimeError


# --- local files -----------------------------------------------------------------------------


def test_file_plays_in_real_time(clip: Video, pull: Pull) -> None:
    _source, got = pull(str(clip.path))
    ended = got.wait_kind("ended", timeout=10)
    assert got.kinds() == ["connected", "ended"]
    assert ended.message == f"end of file: {clip.path} (20 frames)"
    assert [f.index for f in got.frames] == list(range(20))
    assert [f.time for f in got.frames] == pytest.approx([i / FPS for i in range(20)])
    first = got.frames[0].wall
    assert got.frames[-1].wall - first >= 1.5, "a 2 s clip takes about 2 s"
    for f in got.frames:
        assert f.time - 0.02 <= f.wall - first <= f.time + 0.5, "each frame at its media time"


def test_file_as_fast_as_decoding(clip: Video, pull: Pull) -> None:
    started = time.monotonic()
    _source, got = pull(str(clip.path), realtime=False)
    got.wait_kind("ended")
    assert time.monotonic() - started < 1.0
    assert [f.index for f in got.frames] == list(range(20))


def test_file_loop_keeps_media_time_increasing(short_clip: Video, pull: Pull) -> None:
    source, got = pull(str(short_clip.path), realtime=False, loop=True)
    got.wait_frames(35)
    source.stop()
    frames = got.frames[:35]
    assert [f.index for f in frames] == [i % 10 for i in range(35)]
    # The next pass starts one frame after the last one: 0.9 s, then 1.0 s.
    assert [f.time for f in frames] == pytest.approx([i / FPS for i in range(35)])
    assert_increasing(got.frames)
    assert got.kinds() == ["connected"], "a loop is neither a reconnect nor an end"
    assert source.stats.loops >= 3


def test_stop_is_prompt_during_real_time_playback(clip: Video, pull: Pull) -> None:
    source, got = pull(str(clip.path))
    got.wait_frames(3)
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 0.3
    assert not source.running
    count = len(got.frames)
    time.sleep(0.3)
    assert len(got.frames) == count < 20
    assert "ended" not in got.kinds()


def test_unreadable_file_fails_at_once(tmp_path: Path, pull: Pull) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n" * 100)
    _source, got = pull(str(path))
    failed = got.wait_kind("failed")
    assert got.kinds() == ["failed"]
    assert failed.message == f"not a media stream FFmpeg can read: {path}"


def test_audio_only_file_fails_at_once(tmp_path: Path, pull: Pull) -> None:
    path = make_audio_only(tmp_path / "tone.m4a")
    _source, got = pull(str(path))
    failed = got.wait_kind("failed")
    assert failed.message == f"no video stream in {path} (streams found: audio)"


def test_file_path_with_a_colon(clip: Video, tmp_path: Path, pull: Pull) -> None:
    path = tmp_path / "cam:1.mp4"
    path.write_bytes(clip.path.read_bytes())
    _source, got = pull(str(path), realtime=False)
    got.wait_kind("ended")
    assert len(got.frames) == 20


# --- arguments -------------------------------------------------------------------------------


def test_bad_sources_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.touch()
    cases = {
        str(tmp_path / "missing.mp4"): "file not found",
        str(tmp_path): "is a directory",
        str(empty): r"empty file \(0 bytes\)",
        "udp://127.0.0.1:5000": "unsupported scheme udp: use rtsp://",
        "file:///tmp/x.mp4": "unsupported scheme file",
        "rtsp:///stream": "no host in the rtsp:// URL",
        "http://[::1/x.m3u8": "malformed URL",
        "rtsp://cam/x\r\nSET k v": "character 12 of the source is a control character",
    }
    for url, match in cases.items():
        with pytest.raises(SourceError, match=match):
            PullSource(url, on_frame=print, on_event=print)


@pytest.mark.parametrize(
    "bad",
    [
        {"reconnect_initial_s": 0},
        {"reconnect_max_s": 0.1, "reconnect_initial_s": 0.5},
        {"open_timeout_s": -1},
        {"open_timeout_s": float("nan")},
        {"give_up_after_s": -1},
    ],
)
def test_config_is_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="_s"):
        PullConfig(**bad)


def test_start_once_and_stop_any_time(clip: Video) -> None:
    source = PullSource(str(clip.path), on_frame=lambda f: None, on_event=lambda e: None)
    source.stop()  # before start: nothing to stop
    source = PullSource(str(clip.path), on_frame=lambda f: None, on_event=lambda e: None)
    source.start()
    with pytest.raises(RuntimeError, match="only once"):
        source.start()
    source.stop()
    source.stop()
    assert not source.running


# --- RTSP ------------------------------------------------------------------------------------

_RTSP_MISSING = rtsp_unavailable()


@pytest.mark.skipif(_RTSP_MISSING is not None, reason=f"RTSP test server: {_RTSP_MISSING}")
def test_rtsp_pulls_every_frame_of_a_served_clip(clip: Video, pull: Pull) -> None:
    with RtspServer(clip.path) as server:
        source, got = pull(server.url)
        ended = got.wait_kind("ended", timeout=15)
    assert got.kinds() == ["connected", "ended"]
    assert got.events[0][1].message == f"{server.url}: h264 160x120"
    assert ended.message == f"end of stream: {server.url} (2.0 s)"
    assert [f.index for f in got.frames] == list(range(20))
    assert got.frames[0].time == 0.0
    assert_pts_spacing(got.frames)
    # Served at the media rate: the clip spans about 2 s of wall-clock time.
    assert got.frames[-1].wall - got.frames[0].wall >= 1.2
    assert source.stats.decode_errors == 0


@pytest.mark.skipif(_RTSP_MISSING is not None, reason=f"RTSP test server: {_RTSP_MISSING}")
def test_live_rtsp_end_of_stream_is_an_outage_not_the_end(pull: Pull) -> None:
    """A live camera (no duration) that sends end-of-stream, as a restarting camera or relay
    does, is reconnected with backoff and its timeline continues; only finite media end."""
    with RtspServer(live_frames=15) as server:
        source, got = pull(server.url, reconnect_initial_s=0.2, reconnect_max_s=0.5)
        got.wait_kind("reconnecting", timeout=20)
        got.wait_frames(20, timeout=20)  # frames of the next connection
    assert "ended" not in got.kinds() and "failed" not in got.kinds()
    assert got.kinds().count("connected") >= 2
    assert "stream ended" in got.wait_kind("reconnecting").message
    assert_increasing(got.frames)
    assert source.stats.reconnects >= 1
