"""Decode every video frame of a media file with PyAV, with media times starting at 0."""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import av.stream

from livelens.stream.errors import SourceError
from livelens.stream.frames import DecodedFrame, SourceStats

logger = logging.getLogger(__name__)

# A demuxer that fails this many reads in a row without producing a packet is stuck, not skipping.
_MAX_CONSECUTIVE_DEMUX_ERRORS = 32
# Each kind of problem is logged at warning this many times per file, then only counted.
_MAX_WARNINGS_PER_KIND = 5
# Frame spacing assumed when a stream carries no timestamps and no frame rate (FFmpeg's default).
_FALLBACK_FRAME_DURATION = Fraction(1, 25)


class FileSource:
    """A media file's first video stream; open it, then iterate frames() once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._check_file()
        try:
            self._container = av.open(str(self.path), metadata_errors="replace")
        except av.error.InvalidDataError:
            raise SourceError(f"not a media file FFmpeg can read: {self.path}") from None
        except av.error.EOFError:
            raise SourceError(
                f"file ends before its header does (truncated?): {self.path}"
            ) from None
        except PermissionError:
            raise SourceError(f"permission denied: {self.path}") from None
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {self.path}: {_reason(exc)}") from None
        try:
            self._stream = self._pick_video_stream()
        except SourceError:
            self._container.close()
            raise
        # Frame and slice threads: decoding every frame is the cost of a file source.
        self._stream.thread_type = "AUTO"
        ctx = self._stream.codec_context
        self.codec_name: str = ctx.name
        self.width: int = ctx.width
        self.height: int = ctx.height
        self.duration: float | None = self._duration()
        self.stats = SourceStats()
        self._started = False
        self._closed = False
        # Exact rational times, so relative times carry no float error from a large start pts.
        self._start: Fraction | None = None
        self._last = Fraction(0)

    def frames(self) -> Iterator[DecodedFrame]:
        """Decode every frame in order, skipping damaged packets; raise SourceError if none decode.

        Inter-frame codecs need every frame decoded even when few are sampled.
        """
        if self._started:
            raise RuntimeError("FileSource.frames() can be iterated only once")
        self._started = True
        warned: dict[str, int] = {}
        for packet in self._packets(warned):
            # An empty packet would flush the decoder and end it: PyAV's end-of-stream packets
            # are empty, and so are some containers' placeholders. The flush comes below.
            if packet.size == 0:
                continue
            self.stats.packets += 1
            if packet.is_corrupt:
                self.stats.corrupt_packets += 1
                self._warn(
                    warned, "corrupt", "corrupt packet at dts %s in %s", packet.dts, self.path
                )
            for frame in self._decode(packet, warned):
                decoded = self._timed(frame, packet, warned)
                if decoded is not None:
                    yield decoded
        for frame in self._decode(None, warned):
            decoded = self._timed(frame, None, warned)
            if decoded is not None:
                yield decoded
        if self.stats.frames == 0:
            raise SourceError(
                f"no video frame could be decoded from {self.path} ({self._problems()})"
            )
        logger.debug("decoded %s: %s", self.path, self.stats)

    def close(self) -> None:
        """Release the file; safe to call more than once."""
        if not self._closed:
            self._closed = True
            self._container.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_file(self) -> None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            raise SourceError(f"file not found: {self.path}") from None
        except PermissionError:
            raise SourceError(f"permission denied: {self.path}") from None
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {_reason(exc)}") from None
        if stat.S_ISDIR(info.st_mode):
            raise SourceError(f"is a directory, not a media file: {self.path}")
        # Only regular files: a pipe or device reports size 0 and may still stream media.
        if stat.S_ISREG(info.st_mode) and info.st_size == 0:
            raise SourceError(f"empty file (0 bytes): {self.path}")

    def _pick_video_stream(self) -> av.VideoStream:
        # Cover art in audio files is a one-picture "video" stream; it is not video.
        videos = [
            s
            for s in self._container.streams.video
            if not s.disposition & av.stream.Disposition.attached_pic
        ]
        if not videos:
            kinds = sorted({s.type for s in self._container.streams}) or ["none"]
            raise SourceError(f"no video stream in {self.path} (streams found: {', '.join(kinds)})")
        stream = videos[0]
        if stream.codec_context is None:
            raise SourceError(f"no decoder for the video codec of {self.path}")
        return stream

    def _duration(self) -> float | None:
        if self._stream.duration is not None and self._stream.time_base is not None:
            return float(self._stream.duration * self._stream.time_base)
        if self._container.duration is not None:
            return self._container.duration / av.time_base
        return None

    def _packets(self, warned: dict[str, int]) -> Iterator[av.Packet]:
        """Demux the video stream, resuming after read errors where the demuxer can resync."""
        failures = 0
        while True:
            try:
                for packet in self._container.demux(self._stream):
                    failures = 0
                    yield packet
                return
            except av.FFmpegError as exc:
                self.stats.demux_errors += 1
                failures += 1
                self._warn(warned, "demux", "read error in %s: %s", self.path, _reason(exc))
                if failures >= _MAX_CONSECUTIVE_DEMUX_ERRORS:
                    logger.warning(
                        "giving up reading %s after %s read errors in a row", self.path, failures
                    )
                    return

    def _decode(self, packet: av.Packet | None, warned: dict[str, int]) -> list[av.VideoFrame]:
        try:
            return self._stream.codec_context.decode(packet)
        except av.FFmpegError as exc:
            self.stats.decode_errors += 1
            where = "at end of stream" if packet is None else f"at dts {packet.dts}"
            self._warn(
                warned, "decode", "decode error %s in %s: %s", where, self.path, _reason(exc)
            )
            return []

    def _timed(
        self, frame: av.VideoFrame, packet: av.Packet | None, warned: dict[str, int]
    ) -> DecodedFrame | None:
        """Attach the time relative to the first frame; None for a frame not after the previous."""
        t = self._frame_time(frame, packet)
        if self._start is None:
            self._start = t
        elif t - self._start <= self._last:
            self.stats.dropped_frames += 1
            self._warn(
                warned,
                "time",
                "dropped a frame of %s: time %.3fs is not after %.3fs",
                self.path,
                float(t - self._start),
                float(self._last),
            )
            return None
        self._last = t - self._start
        self.stats.frames += 1
        return DecodedFrame(float(self._last), frame)

    def _frame_time(self, frame: av.VideoFrame, packet: av.Packet | None) -> Fraction:
        """Absolute media time of a frame: pts, else dts, else previous plus one frame duration."""
        time_base = frame.time_base or self._stream.time_base
        stamp = frame.pts if frame.pts is not None else frame.dts
        if stamp is None and packet is not None and packet.dts is not None:
            stamp, time_base = packet.dts, packet.time_base
        if stamp is not None and time_base is not None:
            return stamp * time_base
        if self._start is None:
            return Fraction(0)
        previous = self._start + self._last
        if frame.duration and time_base is not None:
            return previous + frame.duration * time_base
        rate = self._stream.average_rate or self._stream.guessed_rate
        return previous + (1 / Fraction(rate) if rate else _FALLBACK_FRAME_DURATION)

    def _problems(self) -> str:
        s = self.stats
        return (
            f"{s.packets} packets, {s.corrupt_packets} corrupt, {s.decode_errors} decode errors, "
            f"{s.demux_errors} read errors"
        )

    def _warn(self, warned: dict[str, int], kind: str, msg: str, *args: object) -> None:
        count = warned.get(kind, 0) + 1
        warned[kind] = count
        if count <= _MAX_WARNINGS_PER_KIND:
            logger.warning(msg, *args)
            if count == _MAX_WARNINGS_PER_KIND:
                logger.warning("further %s problems in %s are counted, not logged", kind, self.path)
        else:
            logger.debug(msg, *args)


def _reason(exc: BaseException) -> str:
    """FFmpeg's short error text without the errno and file name PyAV adds."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
