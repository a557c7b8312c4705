"""WHIP (RFC 9725) ingest: the HTTP resource, offer checks, answer munging and aiortc peers.

A publisher (browser page, OBS, GStreamer, FFmpeg's `whip` muxer) POSTs an SDP offer; we check
it ourselves (aiortc answers even garbage), let aiortc answer with one receive-only video
section, and drain the decoded frames of that track into a FrameSink until the publisher
leaves. Audio is never received: audio sections are answered inactive.

- `sdp`: offers and answers as text (validation, bitrate hints, trickle fragments);
- `peer`: aiortc peer connections and their lifecycle (`WhipIngest`);
- `routes`: the HTTP resource (`whip_router`).
"""

from livelens.stream.whip.peer import (
    REASON_CLOSED,
    REASON_DELETE,
    REASON_FAILED,
    REASON_SHUTDOWN,
    REASON_TRACK_ENDED,
    FrameSink,
    Publication,
    SessionOpener,
    WhipIngest,
    WhipPublication,
    WhipSessionInfo,
    WhipSettings,
    close_peer_connection,
)
from livelens.stream.whip.routes import whip_router
from livelens.stream.whip.sdp import (
    SDP_TYPE,
    TRICKLE_TYPE,
    OfferedCodec,
    OfferInfo,
    TrickleFragment,
    WhipError,
    add_bitrate_hints,
    parse_trickle_fragment,
    validate_offer,
)

__all__ = [
    "REASON_CLOSED",
    "REASON_DELETE",
    "REASON_FAILED",
    "REASON_SHUTDOWN",
    "REASON_TRACK_ENDED",
    "SDP_TYPE",
    "TRICKLE_TYPE",
    "FrameSink",
    "OfferInfo",
    "OfferedCodec",
    "Publication",
    "SessionOpener",
    "TrickleFragment",
    "WhipError",
    "WhipIngest",
    "WhipPublication",
    "WhipSessionInfo",
    "WhipSettings",
    "add_bitrate_hints",
    "close_peer_connection",
    "parse_trickle_fragment",
    "validate_offer",
    "whip_router",
]
