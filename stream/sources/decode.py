"""Decode an opened container's video stream into DecodedFrames: the core every pulled source runs.

An offline file (sources/file.py) and a pulled stream or file (sources/pull.py) decode through
one Decoder: demuxing that resyncs after a file's read errors (a live stream's loses the
connection), decoding that counts and skips damaged packets, and frame timing (pts, else dts,
else the previous frame plus one frame) placed on a media timeline that only increases.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from fractions import Fraction

import av
import av.stream
from av.container import InputContainer

from livelens.stream.errors import SourceError
from livelens.stream.frames import DecodedFrame, SourceStats

# A file that fails this many reads in a row without producing a packet is stuck, not skipping.
_MAX_CONSECUTIVE_DEMUX_ERRORS = 32
# Each kind of problem is logged at warning this many times per source, then only counted.
_MAX_WARNINGS_PER_KIND = 5
# Frame spacing assumed when a stream carries no timestamps and no frame rate (FFmpeg's default).
_FALLBACK_FRAME_DURATION = Fraction(1, 25)
# A live stream whose timestamps jump back this far restarted its clock (encoder restart, MPEG-TS
# wrap): the timeline is re-anchored instead of dropping every frame until it catches up.
_DISCONTINUITY = Fraction(1)
# A read that took this long waited for data (a buffered packet comes back in microseconds).
_WAITED_S = 0.005


class StreamLost(Exception):
    """A live stream's read failed: its connection is gone (a file resyncs instead)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Warnings:
    """Logs each kind of problem of one source at warning a few times, then only at debug."""

    def __init__(self, log: logging.Logger, label: str) -> None:
        self._log = log
        self.label = label
        """Names the source at the start of every message."""
        self._counts: dict[str, int] = {}

    def always(self, msg: str, *args: object) -> None:
        """Log at warning, without a limit: for what happens once per source."""
        self._log.warning("%s: " + msg, self.label, *args)

    def __call__(self, kind: str, msg: str, *args: object) -> None:
        count = self._counts.get(kind, 0) + 1
        self._counts[kind] = count
        if count > _MAX_WARNINGS_PER_KIND:
            self._log.debug("%s: " + msg, self.label, *args)
            return
        self._log.warning("%s: " + msg, self.label, *args)
        if count == _MAX_WARNINGS_PER_KIND:
            self._log.warning("%s: further %s problems are counted, not logged", self.label, kind)


def video_stream(container: InputContainer, name: str) -> av.VideoStream:
    """The container's first video stream; SourceError when it has none or no decoder for it."""
    # Cover art in audio files is a one-picture "video" stream; it is not video.
    videos = [
        s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic
    ]
    if not videos:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise SourceError(f"no video stream in {name} (streams found: {', '.join(kinds)})")
    stream = videos[0]
    if stream.codec_context is None:
        raise SourceError(f"no decoder for the video codec of {name}")
    return stream


class Decoder:
    """Decode one container's video stream once, in order, into frames on a media timeline.

    `after` is the media time of the source's previous frame (an earlier connection or loop
    pass); the first frame is placed at `first_time()`, by default 0 or one frame after `after`.
    Every later frame keeps its distance from the first; a frame not after the previous one is
    dropped. Counters go to `stats` (all but `frames`, which the consumer counts on delivery).
    """

    def __init__(
        self,
        container: InputContainer,
        stream: av.VideoStream,
        stats: SourceStats,
        warn: Warnings,
        *,
        live: bool = False,
        after: Fraction | None = None,
        first_time: Callable[[], Fraction] | None = None,
        stopped: Callable[[], bool] = lambda: False,
    ) -> None:
        self._container = container
        self._stream = stream
        self._stats = stats
        self._warn = warn
        self._live = live
        self._first_time = first_time
        self._stopped = stopped
        # Files decode ahead with frame threads; live sources use slice threads only, since
        # frame threading holds back one frame per thread and adds that much latency.
        stream.codec_context.thread_type = "SLICE" if live else "AUTO"
        # Exact rationals, so media times carry no float error from a large start pts.
        self.last = after
        """Media time of the latest frame yielded (or `after`, before the first)."""
        self._anchor: tuple[Fraction, Fraction] | None = None
        self._previous: Fraction | None = None
        self.quiet_since = time.monotonic()
        """Monotonic time the last read that had to wait for data began: the source ran dry."""

    def step(self) -> Fraction:
        """Nominal frame spacing of the stream."""
        rate = self._stream.average_rate or self._stream.guessed_rate
        return 1 / Fraction(rate) if rate else _FALLBACK_FRAME_DURATION

    def frames(self) -> Iterator[DecodedFrame]:
        """Decode to the end, then flush the decoder; StreamLost when a live read fails."""
        lost: StreamLost | None = None
        packets = self._packets()
        try:
            for packet in packets:
                if self._stopped():
                    return
                # An empty packet would flush the decoder and end it: PyAV's end-of-stream
                # packets are empty, and so are some containers' placeholders. See below.
                if packet.size == 0:
                    continue
                self._stats.packets += 1
                if packet.is_corrupt:
                    self._stats.corrupt_packets += 1
                    self._warn("corrupt", "corrupt packet at dts %s", packet.dts)
                for frame in self._decode(packet):
                    decoded = self._timed(frame, packet)
                    if decoded is not None:
                        yield decoded
        except StreamLost as exc:
            lost = exc
        finally:
            packets.close()
        # Frames still inside the decoder (B-frame reordering) belong to the stream, also when
        # the connection broke.
        if self._stopped():
            return
        for frame in self._decode(None):
            decoded = self._timed(frame, None)
            if decoded is not None:
                yield decoded
        if lost is not None:
            raise lost

    def _packets(self) -> Iterator[av.Packet]:
        """Demux the video stream: a live read error loses the stream; a file resyncs."""
        failures = 0
        while True:
            demux = self._container.demux(self._stream)
            try:
                while True:
                    started = time.monotonic()
                    try:
                        packet = next(demux, None)
                    finally:
                        if time.monotonic() - started >= _WAITED_S:
                            self.quiet_since = started
                    if packet is None:
                        return
                    failures = 0
                    yield packet
            except (av.FFmpegError, OSError) as exc:
                if self._stopped():
                    return
                self._stats.demux_errors += 1
                if self._live:
                    raise StreamLost(exc) from None
                failures += 1
                self._warn("demux", "read error: %s", ffmpeg_reason(exc))
                if failures >= _MAX_CONSECUTIVE_DEMUX_ERRORS:
                    self._warn.always("giving up reading after %d read errors in a row", failures)
                    return
            finally:
                demux.close()

    def _decode(self, packet: av.Packet | None) -> list[av.VideoFrame]:
        try:
            return self._stream.codec_context.decode(packet)
        except av.FFmpegError as exc:
            self._stats.decode_errors += 1
            where = "at end of stream" if packet is None else f"at dts {packet.dts}"
            self._warn("decode", "decode error %s: %s", where, ffmpeg_reason(exc))
            return []

    def _timed(self, frame: av.VideoFrame, packet: av.Packet | None) -> DecodedFrame | None:
        """The frame at its media time; None (dropped) when it is not after the previous frame."""
        stamp = self._stream_time(frame, packet)
        self._previous = stamp
        if self._anchor is None:
            first = self._first_time() if self._first_time is not None else self._default_first()
            self._anchor = (stamp, first)
            return self._yielded(first, frame)
        assert self.last is not None
        t = self._anchor[1] + stamp - self._anchor[0]
        if t > self.last:
            return self._yielded(t, frame)
        if self._live and self.last - t > _DISCONTINUITY:
            self._warn(
                "clock",
                "timestamps jumped back %.3f s; timeline re-anchored",
                float(self.last - t),
            )
            self._anchor = (stamp, self.last + self.step())
            return self._yielded(self._anchor[1], frame)
        self._stats.dropped_frames += 1
        self._warn(
            "time",
            "dropped a frame: time %.3f s is not after %.3f s",
            float(t),
            float(self.last),
        )
        return None

    def _default_first(self) -> Fraction:
        return Fraction(0) if self.last is None else self.last + self.step()

    def _yielded(self, t: Fraction, frame: av.VideoFrame) -> DecodedFrame:
        self.last = t
        return DecodedFrame(float(t), frame)

    def _stream_time(self, frame: av.VideoFrame, packet: av.Packet | None) -> Fraction:
        """Stream time of a frame: pts, else dts, else the previous frame's plus one frame."""
        time_base = frame.time_base or self._stream.time_base
        stamp = frame.pts if frame.pts is not None else frame.dts
        if stamp is None and packet is not None and packet.dts is not None:
            stamp, time_base = packet.dts, packet.time_base
        if stamp is not None and time_base is not None:
            return stamp * time_base
        if self._previous is None:
            return Fraction(0)
        if frame.duration and time_base is not None:
            return self._previous + frame.duration * time_base
        return self._previous + self.step()


def ffmpeg_reason(exc: BaseException) -> str:
    """FFmpeg's short error text without the errno and file name PyAV adds."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
