"""FileSource and sample_file on real encoded files: timing, content, damage and bad input."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
from videos import (
    BAR_COLOURS,
    Video,
    bar_colour,
    blank_mp4_media,
    corrupt_middle,
    make_audio_only,
    make_video,
    moving_square,
    read_index,
    square_box,
    truncate,
)

from livelens.stream import ingest
from livelens.stream.errors import SourceError
from livelens.stream.grid import Grid
from livelens.stream.ingest import sample_file
from livelens.stream.sources.file import FileSource

# Matroska stores times in whole milliseconds, so 1/30 s comes back as 0.033 s.
TIME_TOL = 0.0005 + 1e-9

FORMATS = {
    "mp4-h264": ("clip.mp4", "libx264"),
    "mkv-h264": ("clip.mkv", "libx264"),
    "webm-vp8": ("clip.webm", "libvpx"),
    "webm-vp9": ("clip9.webm", "libvpx-vp9"),
    "avi-mpeg4": ("clip.avi", "mpeg4"),
    "avi-mjpeg": ("clipj.avi", "mjpeg"),
    "ts-mpeg2": ("clip.ts", "mpeg2video"),
    "raw-h264": ("clip.h264", "libx264"),  # no container timestamps at all
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Video]:
    """3 s at 10 fps of the index pattern in every format, written once for the module."""
    folder = tmp_path_factory.mktemp("videos")
    return {
        key: make_video(folder / name, codec=codec, frames=30, fps=10)
        for key, (name, codec) in FORMATS.items()
    }


def rgb(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def decode_all(path: Path) -> tuple[list[float], list[int], FileSource]:
    with FileSource(path) as source:
        frames = list(source.frames())
    return [f.time for f in frames], [read_index(rgb(f.frame)) for f in frames], source


@pytest.mark.parametrize("key", FORMATS)
def test_decodes_every_frame_with_encoded_times(videos: dict[str, Video], key: str) -> None:
    video = videos[key]
    with FileSource(video.path) as source:
        assert (source.width, source.height) == (160, 120)
        frames = list(source.frames())
    assert source.stats.frames == source.stats.packets == 30
    assert source.stats.decode_errors == source.stats.dropped_frames == 0
    assert [read_index(rgb(f.frame)) for f in frames] == list(range(30))
    assert frames[0].time == 0.0
    expected = [t - video.times[0] for t in video.times]
    assert [f.time for f in frames] == pytest.approx(expected, abs=TIME_TOL)


@pytest.mark.parametrize("key", FORMATS)
def test_sample_file_picks_the_right_frames(videos: dict[str, Video], key: str) -> None:
    grid, frames = sample_file(videos[key].path, fps=2.0)
    assert grid == Grid(112, 168)
    sampled = list(frames)
    assert [s.index for s in sampled] == list(range(6))
    assert [s.time for s in sampled] == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5], abs=TIME_TOL)
    assert [read_index(s.image) for s in sampled] == [0, 5, 10, 15, 20, 25]
    for s in sampled:
        assert s.image.shape == (112, 168, 3) and s.image.dtype == np.uint8
        assert s.image.flags.c_contiguous


@pytest.mark.parametrize("key", ["mp4-h264", "avi-mjpeg", "webm-vp9"])
def test_colours_survive_decode_and_resize(videos: dict[str, Video], key: str) -> None:
    # RGB order and colour range (mjpeg is full-range yuvj420p) come out right.
    _, frames = sample_file(videos[key].path)
    image = next(frames).image
    frames.close()
    for bar, colour in enumerate(BAR_COLOURS):
        np.testing.assert_allclose(bar_colour(image, bar), colour, atol=12)


def test_source_properties(videos: dict[str, Video]) -> None:
    with FileSource(videos["mp4-h264"].path) as source:
        assert source.codec_name == "h264"
        assert source.duration == pytest.approx(3.0)
    with FileSource(videos["raw-h264"].path) as source:
        assert source.duration is None


@pytest.mark.parametrize("name", ["late.mp4", "late.mkv"])
def test_nonzero_start_time(tmp_path: Path, name: str) -> None:
    video = make_video(tmp_path / name, frames=20, fps=10, start_time=10.0)
    assert video.times[0] == 10.0
    times, indices, _ = decode_all(video.path)
    assert times == pytest.approx([i / 10 for i in range(20)], abs=TIME_TOL)
    assert indices == list(range(20))


def test_variable_frame_rate(tmp_path: Path) -> None:
    stamps = [0.0, 0.04, 0.3, 0.95, 1.0, 1.02, 2.6, 2.61, 4.2, 5.0]
    video = make_video(tmp_path / "vfr.mp4", times=stamps)
    times, indices, _ = decode_all(video.path)
    assert times == pytest.approx(stamps, abs=1e-9)
    assert indices == list(range(len(stamps)))
    _, frames = sample_file(video.path, fps=1.0)
    # Slots at 0, 1, 2, ... s: 3 s has no frame, 4 s is first reached at 4.2 s.
    assert [(s.time, read_index(s.image)) for s in frames] == [
        (0.0, 0),
        (1.0, 4),
        (2.6, 6),
        (4.2, 8),
        (5.0, 9),
    ]


def test_resize_only_for_sampled_frames(
    videos: dict[str, Video], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    real = ingest.resize_to_grid

    def counting(frame: av.VideoFrame, grid: Grid) -> np.ndarray:
        calls.append((frame.width, frame.height))
        return real(frame, grid)

    monkeypatch.setattr(ingest, "resize_to_grid", counting)
    _, frames = sample_file(videos["mp4-h264"].path, fps=1.0)
    sampled = list(frames)
    assert len(sampled) == 3
    assert calls == [(160, 120)] * 3
    assert frames.source.stats.frames == 30


def test_progress_is_throttled(videos: dict[str, Video], monkeypatch: pytest.MonkeyPatch) -> None:
    reports: list[tuple[float, float | None]] = []
    clock = iter(i / 16 for i in range(1000))  # 62.5 ms per decoded frame, exact in binary
    monkeypatch.setattr(ingest, "_clock", lambda: next(clock))
    _, frames = sample_file(
        videos["mp4-h264"].path, on_progress=lambda t, d: reports.append((t, d))
    )
    list(frames)
    # Every second frame passes the 100 ms interval, then a final report at the last frame.
    expected_times = [i / 10 for i in range(0, 30, 2)] + [2.9]
    assert [t for t, _ in reports] == pytest.approx(expected_times)
    assert {d for _, d in reports} == {3.0}


def test_frames_can_be_iterated_once(videos: dict[str, Video]) -> None:
    with FileSource(videos["avi-mjpeg"].path) as source:
        assert len(list(source.frames())) == 30
        with pytest.raises(RuntimeError):
            next(source.frames())


def test_closing_early_releases_the_source(videos: dict[str, Video]) -> None:
    _, frames = sample_file(videos["mkv-h264"].path)
    with frames:
        assert next(frames).index == 0
    with pytest.raises(StopIteration):
        next(frames)


def test_moving_square_pattern(tmp_path: Path) -> None:
    video = make_video(tmp_path / "square.mp4", frames=12, fps=10, pattern="moving_square")
    with FileSource(video.path) as source:
        images = [rgb(f.frame) for f in source.frames()]
    assert len(images) == 12
    for i, image in enumerate(images):
        top, left, size = square_box(i, 160, 120)
        inner = image[top + 3 : top + size - 3, left + 3 : left + size - 3]
        assert inner.min() > 200, i
        # Away from the square the frame is the static background.
        np.testing.assert_allclose(
            image[5:20, 100:140], moving_square(0, 160, 120)[5:20, 100:140], atol=12
        )
    assert square_box(1, 160, 120)[1] > square_box(0, 160, 120)[1]


# ---- damaged files ----------------------------------------------------------------------------


# The MP4 decoder is handed damaged packets and recovers at the next keyframe (every 10 frames);
# the Matroska demuxer loses its place and resyncs at a later cluster.
@pytest.mark.parametrize(("name", "recovered_at"), [("damaged.mp4", 60), ("damaged.mkv", 80)])
def test_corrupt_middle_still_decodes_what_follows(
    tmp_path: Path, name: str, recovered_at: int, caplog: pytest.LogCaptureFixture
) -> None:
    video = make_video(tmp_path / name, frames=90, fps=30, gop=10)
    corrupt_middle(video.path, at=0.5, length=600, seed=1)
    with caplog.at_level(logging.WARNING, logger="livelens.stream.sources.file"):
        times, indices, source = decode_all(video.path)
    stats = source.stats
    assert stats.decode_errors + stats.corrupt_packets + stats.demux_errors > 0
    assert 0 < len(times) < 90
    assert caplog.records, "damage is logged at warning"
    assert times == sorted(set(times))
    # After the damage, decoding recovers: every later frame is there, with its own time.
    tail = [(round(t * 30), i) for t, i in zip(times, indices, strict=True) if t >= 2.0]
    assert [frame for frame, _ in tail] == list(range(recovered_at, 90))
    assert all(frame == index for frame, index in tail)


@pytest.mark.parametrize(("name", "faststart"), [("cut.mkv", False), ("cut.mp4", True)])
def test_truncated_file_yields_a_prefix(tmp_path: Path, name: str, faststart: bool) -> None:
    video = make_video(tmp_path / name, frames=60, fps=30, faststart=faststart)
    truncate(video.path, 0.5)
    times, indices, _ = decode_all(video.path)
    assert 10 < len(indices) < 60
    assert indices == list(range(len(indices)))
    assert times == pytest.approx([i / 30 for i in range(len(indices))], abs=TIME_TOL)


def test_truncated_mp4_without_index_is_a_source_error(tmp_path: Path) -> None:
    # An MP4 written with its index at the end is unreadable when cut short.
    video = make_video(tmp_path / "cut.mp4", frames=30, fps=30)
    truncate(video.path, 0.5)
    with pytest.raises(SourceError, match="not a media file"):
        FileSource(video.path)


def test_no_decodable_frame_is_a_source_error(tmp_path: Path) -> None:
    video = make_video(tmp_path / "blank.mp4", frames=20, fps=10)
    blank_mp4_media(video.path)
    source = FileSource(video.path)
    with source, pytest.raises(SourceError, match="no video frame could be decoded") as err:
        list(source.frames())
    assert "\n" not in str(err.value)
    assert source.stats.packets == 20 and source.stats.decode_errors > 0
    with pytest.raises(SourceError, match="no video frame could be decoded"):
        sample_file(video.path)


class _FlakyContainer:
    """A container whose demuxer fails with a read error `failures` times after 10 packets."""

    def __init__(self, container: av.container.InputContainer, failures: int) -> None:
        self._container = container
        self._failures = failures
        self._packets = 0

    def demux(self, stream: av.VideoStream) -> Iterator[av.Packet]:
        for packet in self._container.demux(stream):
            self._packets += 1
            if self._packets > 10 and self._failures > 0:
                self._failures -= 1
                raise av.error.InvalidDataError(-1094995529, "Invalid data found")
            yield packet

    def close(self) -> None:
        self._container.close()


def test_read_errors_resume_demuxing(videos: dict[str, Video]) -> None:
    with FileSource(videos["avi-mjpeg"].path) as source:
        source._container = _FlakyContainer(source._container, failures=1)  # type: ignore[assignment]
        indices = [read_index(rgb(f.frame)) for f in source.frames()]
    # One packet was lost to the read error; everything after it still comes through.
    assert indices == [i for i in range(30) if i != 10]
    assert source.stats.demux_errors == 1


def test_persistent_read_errors_end_the_stream(videos: dict[str, Video]) -> None:
    with FileSource(videos["avi-mjpeg"].path) as source:
        source._container = _FlakyContainer(source._container, failures=10_000)  # type: ignore[assignment]
        indices = [read_index(rgb(f.frame)) for f in source.frames()]
    assert indices == list(range(10))
    assert source.stats.demux_errors == 32


# ---- bad input --------------------------------------------------------------------------------


def check_error(path: Path, match: str) -> None:
    for open_it in (FileSource, sample_file):
        with pytest.raises(SourceError, match=match) as err:
            open_it(path)
        message = str(err.value)
        assert "\n" not in message and str(path) in message


def test_missing_file(tmp_path: Path) -> None:
    check_error(tmp_path / "nope.mp4", "file not found")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    check_error(folder, "is a directory")


def test_text_file_named_mp4(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("these are not frames\n" * 100)
    check_error(path, "not a media file")


def test_zero_length_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.touch()
    check_error(path, "empty file")


@pytest.mark.parametrize("name", ["tone.m4a", "tone.wav", "tone.mp3"])
def test_audio_only_file(tmp_path: Path, name: str) -> None:
    path = make_audio_only(tmp_path / name)
    check_error(path, r"no video stream .*\(streams found: audio\)")


def test_bad_arguments(videos: dict[str, Video]) -> None:
    path = videos["mp4-h264"].path
    with pytest.raises(ValueError):
        sample_file(path, fps=0)
    with pytest.raises(ValueError):
        sample_file(path, tokens_per_frame=0)
    with pytest.raises(ValueError, match=">= 16"):
        sample_file(path, tokens_per_frame=15)
