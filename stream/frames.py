"""The frame types every stage shares: what sources decode, what the sampler and the engine see.

A source (a WHIP track, a pull thread, a file) yields `DecodedFrame`s with media times that start
at 0 and only increase; `SourceStats` counts what decoding met. stream/live.py takes them from
there (sampler -> resize + thumbnail -> engine; stream/stages.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import av


class Source(Protocol):
    """What feeds one live session, as the service owns it: a pull thread (RTSP, HLS, a file
    played as live: stream/sources/pull.py) or a WHIP publication (stream/whip). Either pushes
    its `DecodedFrame`s into the session (`LiveSession.push`) until it ends or is closed."""

    name: str
    """What the source reads, for logs and the session record (credentials masked)."""
    is_network: bool
    """A remote source: failures are reported to clients generically (they could probe)."""

    async def close(self, reason: str) -> None:
        """Stop it for good (idempotent): a pull thread is joined, a publisher disconnected."""
        ...


@dataclass(frozen=True)
class DecodedFrame:
    """One decoded frame, still in the decoder's pixel format (RGB only for sampled frames)."""

    time: float
    """Media seconds from the stream's first frame (the first frame is 0.0)."""
    frame: av.VideoFrame


@dataclass
class SourceStats:
    """Counters of what decoding a source met, for logs and the CLI summary."""

    packets: int = 0
    """Video packets read (end-of-stream flush packets excluded)."""
    frames: int = 0
    """Frames decoded and yielded."""
    corrupt_packets: int = 0
    """Packets the demuxer flagged corrupt; they are still decoded (decoders conceal damage)."""
    decode_errors: int = 0
    """Packets the decoder rejected; skipped."""
    demux_errors: int = 0
    """Read errors the demuxer was restarted after."""
    dropped_frames: int = 0
    """Frames dropped because their time was not after the previous frame's."""

    def problems(self) -> str:
        """The damage counters in one line, for an error that says why nothing decoded."""
        return (
            f"{self.packets} packets, {self.corrupt_packets} corrupt, "
            f"{self.decode_errors} decode errors, {self.demux_errors} read errors"
        )
