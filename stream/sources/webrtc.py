"""Drain a received WebRTC video track: every decoded frame, timed from the track's first frame."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from fractions import Fraction

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from livelens.stream.frames import DecodedFrame

logger = logging.getLogger(__name__)

# aiortc stamps decoded video with RTP timestamps (90 kHz), already unwrapped and starting at 0.
_RTP_VIDEO_TIME_BASE = Fraction(1, 90000)
# The smallest step between two frames' times, used when a frame's pts does not advance.
_MIN_STEP = Fraction(1, 90000)


@dataclass
class TrackStats:
    """What draining a track met, for session info and logs."""

    frames: int = 0
    """Frames decoded and handed on."""
    dropped_frames: int = 0
    """Frames dropped because their pts was not after the previous frame's."""
    untimed_frames: int = 0
    """Frames without a pts, timed by their arrival instead."""
    width: int = 0
    """Size of the latest frame (a publisher may change resolution mid-stream)."""
    height: int = 0
    last_frame_at: float | None = None
    """time.monotonic() when the latest frame arrived."""


class WebRTCSource:
    """One remote video track; iterate frames() once, for as long as the track lives.

    aiortc decodes in a thread into an unbounded queue, so a consumer that pauses makes memory
    grow and latency drift: frames() must be iterated continuously, every frame, and whatever
    consumes it must be cheap (keep what the sampler wants, drop the rest).
    """

    def __init__(self, track: MediaStreamTrack) -> None:
        if track.kind != "video":
            raise ValueError(f"expected a video track, got {track.kind}")
        self._track = track
        self.stats = TrackStats()
        self._started = False
        # Exact rational times, so a long session's times carry no float error.
        self._start: Fraction | None = None
        self._last = Fraction(0)
        self._last_arrival = 0.0

    async def frames(self) -> AsyncIterator[DecodedFrame]:
        """Yield every decoded frame with strictly increasing times; ends when the track ends."""
        if self._started:
            raise RuntimeError("WebRTCSource.frames() can be iterated only once")
        self._started = True
        while True:
            try:
                frame = await self._track.recv()
            except MediaStreamError:
                logger.debug("track %s ended after %s frames", self._track.id, self.stats.frames)
                return
            if not isinstance(frame, av.VideoFrame):
                continue
            decoded = self._timed(frame, time.monotonic())
            if decoded is not None:
                yield decoded

    def _timed(self, frame: av.VideoFrame, arrival: float) -> DecodedFrame | None:
        """Attach the time from the first frame; None for a frame whose pts does not advance."""
        stats = self.stats
        if frame.pts is not None:
            absolute = frame.pts * (frame.time_base or _RTP_VIDEO_TIME_BASE)
            if self._start is None:
                self._start = absolute
            relative = absolute - self._start
        else:
            # Never seen from aiortc's decoders; fall back to the arrival clock so that times
            # still increase and stay roughly right.
            stats.untimed_frames += 1
            if self._start is None:
                self._start = Fraction(0)
            elapsed = Fraction(arrival - self._last_arrival) if stats.frames else Fraction(0)
            relative = self._last + max(_MIN_STEP, elapsed) if stats.frames else Fraction(0)
        if stats.frames and relative <= self._last:
            stats.dropped_frames += 1
            logger.debug(
                "dropped a frame of track %s: time %.4fs is not after %.4fs",
                self._track.id,
                float(relative),
                float(self._last),
            )
            return None
        self._last = relative
        self._last_arrival = arrival
        stats.frames += 1
        stats.width, stats.height = frame.width, frame.height
        stats.last_frame_at = arrival
        return DecodedFrame(float(relative), frame)
