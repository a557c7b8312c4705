"""WHIP (RFC 9725) ingest: the HTTP resource, offer checks, answer munging and aiortc peers.

A publisher (browser page, OBS, GStreamer, FFmpeg's `whip` muxer) POSTs an SDP offer; we check
it ourselves (aiortc answers even garbage), let aiortc answer with one receive-only video
section, and drain the decoded frames of that track into a FrameSink until the publisher
leaves. Audio is never received: audio sections are answered inactive.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import fastapi
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.codecs import CODECS, is_rtx
from aiortc.rtcdtlstransport import RTCCertificate
from aiortc.rtcpeerconnection import is_codec_compatible
from aiortc.rtcrtpparameters import RTCRtpCodecCapability, RTCRtpCodecParameters
from aiortc.sdp import SessionDescription
from OpenSSL import SSL
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from livelens.stream.auth import AuthError, KeyRing, Scope, bearer
from livelens.stream.frames import DecodedFrame
from livelens.stream.lifecycle import EndCode
from livelens.stream.protocol import error_responses
from livelens.stream.sdp_checks import (
    DIRECTIONS,
    check_direction,
    check_mids,
    check_setup,
    parse_candidate,
)
from livelens.stream.sources.webrtc import WebRTCSource

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

SDP_TYPE = "application/sdp"
TRICKLE_TYPE = "application/trickle-ice-sdpfrag"

# Reasons handed to FrameSink.finish(); the session manager shows them to users.
REASON_DELETE = "publisher sent DELETE"
REASON_TRACK_ENDED = "publisher ended the video track"
REASON_CLOSED = "publisher closed the connection (DTLS close)"
REASON_FAILED = "publisher disconnected (ICE/DTLS failed)"
REASON_SHUTDOWN = "server shutting down"
CLOSE_TIMEOUT_S = 5.0
"""The longest one peer connection's close may take (a shutdown waits no longer)."""

# aiortc's own DTLS suites (rtcdtlstransport.RTCCertificate._create_ssl_context) followed by the
# same suites for RSA certificates. The suite's signature type follows the DTLS *server's*
# certificate, and aiortc answers as the DTLS client, so a publisher with an RSA certificate
# (GStreamer's webrtcbin) finds no suite it can use unless the ECDHE-RSA ones are offered.
_CIPHERS_WITH_RSA = b":".join(
    [
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-ECDSA-AES128-SHA",
        b"ECDHE-ECDSA-AES256-SHA",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-AES128-SHA",
        b"ECDHE-RSA-AES256-SHA",
    ]
)
_LOOPBACK = "127.0.0.1"
# Codec names that repair or protect another codec's stream; they carry no bitrate hints.
_NOT_MEDIA_CODECS = {"rtx", "red", "ulpfec", "flexfec-03"}
# Payload types whose codec RFC 3551 fixes, so offers may omit their a=rtpmap.
_STATIC_PAYLOAD_TYPES = {0: ("PCMU", 8000), 8: ("PCMA", 8000), 9: ("G722", 8000)}


class FrameSink(Protocol):
    """Where a publication's frames go: one live session of the session manager."""

    session_id: str

    def push(self, frame: DecodedFrame) -> None:
        """Take one decoded frame; thread-safe, cheap, never blocks. Called for every frame."""
        ...

    def finish(self, reason: str, failed: bool = False, code: EndCode | None = None) -> None:
        """The publisher is gone or the session ended; idempotent."""
        ...


class SessionOpener(Protocol):
    """Creates a live session for a new publication; raises RuntimeError to refuse (-> 503).

    Options a publisher gives in the WHIP URL's query (`?window=SECONDS`) come as keywords."""

    def __call__(self, source: str, **options: float) -> FrameSink: ...


@dataclass(frozen=True)
class WhipSettings:
    """How the WHIP endpoint authenticates, negotiates and watches publishers."""

    token: str | None = None
    """Bearer token publishers must send; None accepts anyone (only behind an auth proxy)."""
    allow_loopback: bool = False
    """Also gather a 127.0.0.1 ICE candidate. Only for tests on one machine; off in production."""
    min_bitrate_kbps: int = 1000
    """x-google-min-bitrate put in the answer: Chromium's floor for its video bitrate."""
    start_bitrate_kbps: int = 4000
    """x-google-start-bitrate: where Chromium starts, so 1080p30 is sent from the first second."""
    max_bitrate_kbps: int = 8000
    """x-google-max-bitrate: Chromium's ceiling, enough for 1080p30."""
    allow_rsa: bool = True
    """Offer ECDHE-RSA DTLS suites too, so publishers with RSA certificates (GStreamer) connect."""
    max_offer_bytes: int = 64 * 1024
    """Largest offer or trickle fragment accepted (413 above); real offers are 2-10 KiB."""
    disconnect_grace: float = 10.0
    """Seconds without any packet from a connected publisher before its session ends.

    aiortc has no "disconnected" state and its consent checks give up only after ~30 s, so
    this is measured here, on the packets the DTLS transport receives (media and RTCP).
    """
    connect_timeout: float = 30.0
    """Seconds a publisher has after its POST to complete ICE and DTLS."""
    ice_servers: tuple[str, ...] = ()
    """STUN URLs ("stun:host:port") for our server-reflexive candidates, needed behind NAT;
    also sent to publishers as Link headers. None by default: no lookups at each publish."""
    cors_origin: str = "*"
    """Access-Control-Allow-Origin for browser publishers on other origins."""

    def __post_init__(self) -> None:
        if self.token is not None and not self.token:
            raise ValueError("token must be non-empty, or None for no authentication")
        if not 0 < self.min_bitrate_kbps <= self.start_bitrate_kbps <= self.max_bitrate_kbps:
            raise ValueError("bitrates must satisfy 0 < min <= start <= max")
        if self.max_offer_bytes < 1024:
            raise ValueError("max_offer_bytes must be at least 1024")
        if self.disconnect_grace <= 0 or self.connect_timeout <= 0:
            raise ValueError("disconnect_grace and connect_timeout must be positive")


class WhipError(Exception):
    """A request the WHIP endpoint refuses: HTTP status, a stable code and a one-line message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class OfferedCodec:
    """One codec of an offer's m-section, as its a=rtpmap and a=fmtp lines say."""

    payload_type: int
    name: str
    """Encoding name as written in a=rtpmap, e.g. "VP8", "H264", "opus"."""
    clock_rate: int
    parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class OfferInfo:
    """What a checked offer asks for."""

    kinds: tuple[str, ...]
    """Media kind of each m-section, in order ("video", "audio", "application")."""
    video_index: int
    """Index of the m-section whose video we receive (the first one sending a usable codec)."""
    codec: OfferedCodec
    """The publisher's preferred codec for that video that aiortc can decode."""
    mids: tuple[str | None, ...]
    """a=mid of each m-section (None where missing)."""
    bundle: tuple[str, ...]
    """Mids of the offer's BUNDLE group; its first m-section's transport carries them all."""
    ice_ufrag: str
    """ICE username fragment of the first m-section (the BUNDLE transport)."""
    candidates: int
    """a=candidate lines in the offer; 0 means the publisher will trickle them by PATCH."""


@dataclass(frozen=True)
class WhipPublication:
    """A publication accepted by WhipIngest.publish()."""

    session_id: str
    answer_sdp: str
    etag: str
    """Entity tag of the ICE session (quoted, as sent in the ETag header)."""
    codec: str
    """Video codec negotiated: "VP8" or "H264"."""


@dataclass(frozen=True)
class WhipSessionInfo:
    """A snapshot of one live publication."""

    session_id: str
    source: str
    codec: str
    connection_state: str
    """aiortc's RTCPeerConnection.connectionState: new, connecting, connected, failed, closed."""
    frames: int
    width: int
    """Size of the latest frame; 0 before the first."""
    height: int
    age: float
    """Seconds since the offer was accepted."""


@dataclass(frozen=True)
class TrickleFragment:
    """The content of a PATCH body (RFC 8840 SDP fragment)."""

    ice_ufrag: str | None
    ice_pwd: str | None
    candidates: tuple[tuple[str | None, str], ...]
    """(a=mid of its m-section or None, what follows "a=candidate:") for each candidate."""
    end_of_candidates: bool


# ---------------------------------------------------------------------------------------------
# SDP: checking offers, munging answers, reading trickle fragments


@dataclass
class _Section:
    """The session part or one m-section of an SDP, as (name, value) attribute pairs."""

    kind: str | None = None
    port: int = 0
    formats: tuple[str, ...] = ()
    attributes: list[tuple[str, str | None]] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.attributes if n == name and v is not None]

    def first(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.attributes)


_SDP_LINE = re.compile(r"([a-z])=(.*)")
_SESSION_ONLY = "vost"
"""Line types of the session part only (version, origin, session name; timing may repeat)."""
_M_LINE = re.compile(r"([a-z]+) (\d+)(?:/\d+)? ([A-Za-z0-9/]+)((?: \S+)*)")
_RTPMAP = re.compile(r"(\d{1,3}) ([A-Za-z0-9._-]+)/(\d+)(?:/\d+)?")
_FMTP = re.compile(r"(\d{1,3})(?: (.*))?")
_FINGERPRINT = re.compile(r"[A-Za-z0-9-]+ [0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})+")


def _malformed(message: str) -> WhipError:
    return WhipError(400, "malformed_sdp", message)


def _check(rule: Callable[..., _T], *args: Any) -> _T:
    """Apply one of sdp_checks' rules; its ValueError becomes a 400 malformed_sdp."""
    try:
        return rule(*args)
    except ValueError as exc:
        raise _malformed(str(exc)) from None


def _sdp_lines(text: str) -> list[str]:
    return [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]


def _parse_sdp(sdp: str) -> tuple[_Section, list[_Section]]:
    """Split an SDP into its session part and m-sections; WhipError(400) if it is not SDP."""
    lines = _sdp_lines(sdp)
    if not lines:
        raise _malformed("the offer is empty")
    if lines[0].strip() != "v=0":
        raise _malformed("an SDP must start with a v=0 line")
    session = _Section()
    media: list[_Section] = []
    current = session
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        match = _SDP_LINE.fullmatch(line.rstrip())
        if match is None:
            raise _malformed(f"line {number} is not an SDP <type>=<value> line: {line[:60]!r}")
        kind, value = match.groups()
        if kind == "m":
            m = _M_LINE.fullmatch(value)
            if m is None:
                raise _malformed(f"line {number}: unparsable m= line: {value[:60]!r}")
            current = _Section(m[1], int(m[2]), tuple(m[4].split()))
            media.append(current)
        elif kind in _SESSION_ONLY:
            # aiortc's parser asserts on these out of place or twice; found by the fuzz suite.
            if media or (kind != "t" and kind in seen):
                raise _malformed(f"line {number}: {kind}= belongs once, before the first m= line")
            seen.add(kind)
        elif kind == "a":
            name, sep, attr_value = value.partition(":")
            current.attributes.append((name, attr_value if sep else None))
    return session, media


def _codecs(section: _Section) -> list[OfferedCodec]:
    """The section's codecs in the offerer's order of preference (its m= line's format list)."""
    rtpmaps: dict[int, tuple[str, int]] = dict(_STATIC_PAYLOAD_TYPES)
    for value in section.values("rtpmap"):
        match = _RTPMAP.fullmatch(value.strip())
        if match is None:
            raise _malformed(f"unparsable a=rtpmap:{value[:60]}")
        rtpmaps[int(match[1])] = (match[2], int(match[3]))
    fmtps: dict[int, dict[str, str]] = {}
    for value in section.values("fmtp"):
        match = _FMTP.fullmatch(value.strip())
        if match is None:
            raise _malformed(f"unparsable a=fmtp:{value[:60]}")
        params = fmtps.setdefault(int(match[1]), {})
        for item in (match[2] or "").split(";"):
            key, _, param = item.strip().partition("=")
            if key:
                params[key] = param
    codecs = []
    for fmt in section.formats:
        if not fmt.isdigit():
            raise _malformed(f"{section.kind} m= line lists a non-numeric payload type {fmt!r}")
        pt = int(fmt)
        if pt in rtpmaps:
            name, rate = rtpmaps[pt]
            codecs.append(OfferedCodec(pt, name, rate, fmtps.get(pt, {})))
    return codecs


def _aiortc_codec(kind: str, codec: OfferedCodec) -> RTCRtpCodecParameters | None:
    """aiortc's own codec that can receive `codec` (its own negotiation rule), else None."""
    offered = RTCRtpCodecParameters(
        mimeType=f"{kind}/{codec.name}",
        clockRate=codec.clock_rate,
        payloadType=codec.payload_type,
        parameters=dict(codec.parameters),
    )
    if is_rtx(offered):
        return None
    return next((c for c in CODECS[kind] if is_codec_compatible(c, offered)), None)


def _describe(codecs: list[OfferedCodec]) -> str:
    names = [c.name for c in codecs if c.name.lower() not in _NOT_MEDIA_CODECS]
    return ", ".join(dict.fromkeys(names)) or "none"


def validate_offer(sdp: str) -> OfferInfo:
    """Check a WHIP offer before aiortc sees it: WhipError 400 malformed, 406 nothing usable."""
    session, media = _parse_sdp(sdp)
    if not media:
        raise _malformed("the offer has no m= section")
    for index, section in enumerate(media):
        where = f"m-section {index} ({section.kind})"
        if section.kind not in ("audio", "video", "application"):
            raise WhipError(406, "unsupported_media", f"{where}: media kind not supported")
        ufrag = section.first("ice-ufrag") or session.first("ice-ufrag")
        pwd = section.first("ice-pwd") or session.first("ice-pwd")
        if not ufrag or not pwd:
            raise _malformed(f"{where} has no a=ice-ufrag / a=ice-pwd")
        fingerprints = section.values("fingerprint") or session.values("fingerprint")
        if not fingerprints:
            raise _malformed(f"{where} has no a=fingerprint")
        for fingerprint in fingerprints:
            if _FINGERPRINT.fullmatch(fingerprint.strip()) is None:
                raise _malformed(f"{where}: unparsable a=fingerprint:{fingerprint[:60]}")
    if sum(section.kind == "application" for section in media) > 1:
        raise WhipError(406, "unsupported_media", "more than one application m-section")

    chosen: tuple[int, OfferedCodec] | None = None
    unusable: list[str] = []
    for index, section in enumerate(media):
        if section.kind == "application":
            continue
        codecs = _codecs(section)
        usable = [c for c in codecs if _aiortc_codec(section.kind, c) is not None]
        # aiortc refuses a whole offer when any audio/video section has no codec it knows,
        # even one it would answer inactive; say which section, in the offerer's terms.
        if not usable:
            unusable.append(f"{section.kind} m-section {index} offers {_describe(codecs)}")
            continue
        direction = next((d for d in DIRECTIONS if section.has(d)), None)
        direction = direction or next((d for d in DIRECTIONS if session.has(d)), "sendrecv")
        sends = section.port != 0 and direction in ("sendonly", "sendrecv")
        if section.kind == "video" and sends and chosen is None:
            chosen = (index, usable[0])
    kinds = tuple(str(section.kind) for section in media)
    if "video" not in kinds:
        raise WhipError(
            406, "no_video", "the offer has no video m-section (audio-only is not ingested)"
        )
    if unusable:
        raise WhipError(
            406,
            "unsupported_codec",
            "; ".join(unusable)
            + ". This server receives VP8 or H.264 constrained baseline (packetization-mode=1)"
            " video and Opus, G.722, PCMU or PCMA audio",
        )
    if chosen is None:
        raise WhipError(406, "no_video", "no video m-section is sent (sendonly or sendrecv)")
    _check_structure(session, media)
    # Last, aiortc's own parser: whatever it would choke on is the offer's fault (400), and
    # must be found before a peer connection exists.
    try:
        SessionDescription.parse(sdp)
    except Exception as exc:
        raise _malformed(f"SDP the WebRTC stack cannot parse: {_reason(exc)}") from None
    first = media[0]
    bundle = next(
        (g.split()[1:] for g in session.values("group") if g.split()[:1] == ["BUNDLE"]), []
    )
    return OfferInfo(
        kinds=kinds,
        video_index=chosen[0],
        codec=chosen[1],
        mids=tuple(section.first("mid") for section in media),
        bundle=tuple(bundle),
        ice_ufrag=str(first.first("ice-ufrag") or session.first("ice-ufrag")),
        candidates=sum(len(section.values("candidate")) for section in media),
    )


def _check_structure(session: _Section, media: list[_Section]) -> None:
    """What aiortc assumes without checking: mids, BUNDLE, DTLS role, direction, candidates."""
    for index, section in enumerate(media):
        where = f"m-section {index} ({section.kind})"
        _check(check_setup, where, section.values("setup") or session.values("setup"))
        _check(check_direction, where, [d for d in DIRECTIONS if section.has(d)])
        for value in section.values("candidate"):
            _check(parse_candidate, value.strip())
    _check(check_direction, "the session part", [d for d in DIRECTIONS if session.has(d)])
    groups = [g.strip() for g in session.values("group")]
    bundles = [g.removeprefix("BUNDLE") for g in groups if g.split()[:1] == ["BUNDLE"]]
    _check(check_mids, [section.values("mid") for section in media], bundles)


def add_bitrate_hints(answer_sdp: str, min_kbps: int, start_kbps: int, max_kbps: int) -> str:
    """Add x-google-{min,start,max}-bitrate to every video codec's a=fmtp in an answer.

    aiortc only sends REMB, and Chromium then holds ~200 kbps and downscales to 360p; these
    fmtp parameters (read by libwebrtc from the answer) make it send full resolution at once.
    """
    hints = (
        f"x-google-min-bitrate={min_kbps};x-google-start-bitrate={start_kbps};"
        f"x-google-max-bitrate={max_kbps}"
    )
    out: list[str] = []
    section: list[str] = []

    def flush() -> None:
        if section and section[0].startswith("m=video"):
            out.extend(_hint_section(section, hints))
        else:
            out.extend(section)
        section.clear()

    for line in _sdp_lines(answer_sdp):
        if line.startswith("m="):
            flush()
        section.append(line)
    flush()
    return "\r\n".join(out) + "\r\n"


def _hint_section(lines: list[str], hints: str) -> list[str]:
    media_pts: set[str] = set()
    for line in lines:
        if line.startswith("a=rtpmap:"):
            pt, _, rest = line[len("a=rtpmap:") :].partition(" ")
            if rest.split("/")[0].lower() not in _NOT_MEDIA_CODECS:
                media_pts.add(pt)
    with_fmtp = {
        line[len("a=fmtp:") :].partition(" ")[0] for line in lines if line.startswith("a=fmtp:")
    }
    out = []
    for line in lines:
        if line.startswith("a=fmtp:"):
            pt, _, params = line[len("a=fmtp:") :].partition(" ")
            if pt in media_pts and "x-google-" not in params:
                line = f"a=fmtp:{pt} {params};{hints}" if params else f"a=fmtp:{pt} {hints}"
        out.append(line)
        if line.startswith("a=rtpmap:"):
            pt = line[len("a=rtpmap:") :].partition(" ")[0]
            if pt in media_pts and pt not in with_fmtp:
                out.append(f"a=fmtp:{pt} {hints}")
    return out


def parse_trickle_fragment(fragment: str) -> TrickleFragment:
    """Read an RFC 8840 SDP fragment (PATCH body); WhipError(400) if it is not one."""
    ufrag = pwd = mid = None
    candidates: list[tuple[str | None, str]] = []
    end = False
    for number, line in enumerate(_sdp_lines(fragment), start=1):
        match = _SDP_LINE.fullmatch(line.rstrip())
        if match is None:
            raise _malformed(f"fragment line {number} is not an SDP line: {line[:60]!r}")
        kind, value = match.groups()
        if kind == "m":
            mid = None  # the a=mid of this m-section follows
            continue
        if kind != "a":
            continue
        name, _, attr_value = value.partition(":")
        if name == "ice-ufrag":
            ufrag = attr_value.strip()
        elif name == "ice-pwd":
            pwd = attr_value.strip()
        elif name == "mid":
            mid = attr_value.strip()
        elif name == "candidate":
            candidates.append((mid, attr_value.strip()))
        elif name == "end-of-candidates":
            end = True
    return TrickleFragment(ufrag, pwd, tuple(candidates), end)


# ---------------------------------------------------------------------------------------------
# aiortc peers


class _RsaCapableCertificate(RTCCertificate):
    """aiortc's ECDSA certificate, with ECDHE-RSA suites added to its DTLS cipher list."""

    def _create_ssl_context(self, srtp_profiles: list[Any]) -> SSL.Context:
        ctx = super()._create_ssl_context(srtp_profiles)
        ctx.set_cipher_list(_CIPHERS_WITH_RSA)
        return ctx


def _allow_rsa_suites(pc: RTCPeerConnection) -> None:
    """Make this one peer connection offer ECDHE-RSA suites in its DTLS handshakes.

    aiortc 1.16 has no setting for it: RTCPeerConnection.__init__ makes one RTCCertificate
    (private __certificates), and every RTCDtlsTransport it creates later builds its OpenSSL
    context from that certificate's _create_ssl_context(). Swapping in a subclass right after
    construction, before any transceiver exists, changes this peer connection only.
    """
    attribute = "_RTCPeerConnection__certificates"
    if not hasattr(pc, attribute):
        raise RuntimeError("aiortc internals changed: cannot enable RSA DTLS suites")
    setattr(pc, attribute, [_RsaCapableCertificate.generateCertificate()])


def _gather_loopback_too(pc: RTCPeerConnection) -> None:
    """Make this peer connection's ICE agents also gather a 127.0.0.1 host candidate.

    aioice.ice.Connection.gather_candidates() takes the host addresses from the module function
    get_host_addresses(), which skips 127.0.0.1, and passes them to its own
    get_component_candidates(); wrapping that method on these Connection objects (aiortc keeps
    each in RTCIceGatherer._connection) adds the loopback address for this peer only. Call it
    after setRemoteDescription (every transport exists) and before setLocalDescription (gathers).
    """
    transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    connections = {id(c): c for c in (t.transport.iceGatherer._connection for t in transports)}
    for connection in connections.values():
        connection.get_component_candidates = _with_loopback(connection.get_component_candidates)


def _with_loopback(gather: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def get_component_candidates(
        component: int, addresses: list[str], timeout: int = 5
    ) -> Any:
        return await gather(component=component, addresses=[*addresses, _LOOPBACK], timeout=timeout)

    return get_component_candidates


def _codec_preferences(codec: RTCRtpCodecParameters) -> list[RTCRtpCodecCapability]:
    """aiortc capabilities restricted to one codec (and RTX), so the answer offers only it."""
    capabilities = RTCRtpReceiver.getCapabilities("video")
    assert capabilities is not None
    return [
        c
        for c in capabilities.codecs
        if is_rtx(c)
        or (c.mimeType.lower() == codec.mimeType.lower() and c.parameters == codec.parameters)
    ]


@dataclass(eq=False)
class _Peer:
    """One publication: its peer connection, where its frames go, and its background tasks."""

    session_id: str
    source_desc: str
    pc: RTCPeerConnection
    sink: FrameSink
    etag: str
    offer: OfferInfo
    codec: str
    created: float = field(default_factory=time.monotonic)
    video: RTCRtpTransceiver | None = None
    media: WebRTCSource | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    connected: bool = False
    ended: bool = False


def _judge_liveness_by_packets(peer: _Peer) -> None:
    """Stop ICE consent freshness (RFC 7675) on a connected publication: `_watch` judges it.

    Consent freshness guards a *sender*; a WHIP server only receives (and sends RTCP back).
    FFmpeg's whip muxer never answers consent checks once it streams, so aioice closed every
    FFmpeg publication after 6 unanswered checks (~35 s, measured) although media still
    flowed. Liveness is instead judged on received packets (`disconnect_grace`, 10 s by
    default), which also bounds how long RTCP can go to a peer that stopped answering.
    """
    assert peer.video is not None
    ice = peer.video.receiver.transport.transport
    connection = getattr(ice, "_connection", None)
    task = getattr(connection, "_query_consent_task", None)
    if task is None:
        # aiortc/aioice changed their internals: publishers that never answer consent checks
        # (FFmpeg) will be cut after ~35 s again. tests/test_whip.py's 90 s publish catches it.
        logger.warning("WHIP session %s: cannot find ICE consent checks to stop", peer.session_id)
        return
    task.cancel()
    connection._query_consent_task = None


class WhipIngest:
    """The WHIP publications of one server, by session id; use it from one asyncio loop."""

    def __init__(self, settings: WhipSettings) -> None:
        self.settings = settings
        self._peers: dict[str, _Peer] = {}
        # Strong references to fire-and-forget tasks, which asyncio would otherwise collect.
        self._background: set[asyncio.Task[None]] = set()

    def session_ids(self) -> list[str]:
        return list(self._peers)

    def info(self, session_id: str) -> WhipSessionInfo | None:
        """A snapshot of a live publication, or None if there is none with that id."""
        peer = self._peers.get(session_id)
        if peer is None:
            return None
        stats = peer.media.stats if peer.media is not None else None
        return WhipSessionInfo(
            session_id=peer.session_id,
            source=peer.source_desc,
            codec=peer.codec,
            connection_state=peer.pc.connectionState,
            frames=stats.frames if stats else 0,
            width=stats.width if stats else 0,
            height=stats.height if stats else 0,
            age=time.monotonic() - peer.created,
        )

    async def publish(
        self, offer_sdp: str, sink_opener: SessionOpener, source_desc: str
    ) -> WhipPublication:
        """Check the offer, open a session, answer it; frames flow once ICE and DTLS connect."""
        offer = validate_offer(offer_sdp)
        try:
            sink = sink_opener(source_desc)
        except RuntimeError as exc:
            code = getattr(exc, "code", "unavailable")
            raise WhipError(503, code, f"cannot start a live session: {exc}") from None
        if sink.session_id in self._peers:
            sink.finish("duplicate session id", failed=True, code=EndCode.DUPLICATE_SESSION)
            raise WhipError(500, "internal", f"session id {sink.session_id} is already in use")
        local_codec = _aiortc_codec("video", offer.codec)
        assert local_codec is not None  # validate_offer chose a codec aiortc has
        peer = _Peer(
            session_id=sink.session_id,
            source_desc=source_desc,
            pc=self._new_peer_connection(),
            sink=sink,
            etag=f'"{secrets.token_urlsafe(12)}"',
            offer=offer,
            codec=local_codec.name,
        )
        try:
            answer = await self._negotiate(peer, offer, offer_sdp, local_codec)
        except Exception as exc:
            # aiortc answers from the offer alone, so whatever it raises on an offer that
            # passed validate_offer is the offer's fault: 400, logged without a traceback.
            reason = f"WebRTC negotiation failed: {_reason(exc)}"
            logger.warning("WHIP offer from %s: %s", source_desc, reason)
            await self._end(peer, reason, failed=True)
            raise WhipError(400, "negotiation_failed", reason) from None
        self._peers[peer.session_id] = peer
        peer.tasks = [
            asyncio.create_task(self._drain(peer), name=f"whip-drain-{peer.session_id}"),
            asyncio.create_task(self._watch(peer), name=f"whip-watch-{peer.session_id}"),
        ]
        logger.info(
            "WHIP publication %s from %s: %s video, %s offered candidates",
            peer.session_id,
            source_desc,
            peer.codec,
            offer.candidates,
        )
        return WhipPublication(peer.session_id, answer, peer.etag, peer.codec)

    async def patch(self, session_id: str, fragment: str, if_match: str | None) -> None:
        """Trickle ICE: add the publisher's candidates. ICE restarts are refused with 422."""
        peer = self._peer(session_id)
        if if_match is not None and not _etag_matches(if_match, peer.etag):
            raise WhipError(412, "precondition_failed", "If-Match does not match the session ETag")
        trickle = parse_trickle_fragment(fragment)
        if trickle.ice_ufrag is not None and trickle.ice_ufrag != peer.offer.ice_ufrag:
            raise WhipError(
                422, "ice_restart_unsupported", "ICE restarts are not supported; publish again"
            )
        candidates = []
        for mid, value in trickle.candidates:
            try:
                candidate = parse_candidate(value)
            except ValueError as exc:
                raise _malformed(f"unparsable candidate {value[:80]!r}: {exc}") from None
            # aioice connects over UDP only, and with rtcp-mux (required) on component 1 only.
            if candidate.protocol.lower() == "udp" and candidate.component == 1:
                candidate.sdpMid, candidate.sdpMLineIndex = _transport_of(peer.offer, mid)
                candidates.append(candidate)
        # Checked all before adding any, so a refused fragment changes nothing.
        try:
            for candidate in candidates:
                await peer.pc.addIceCandidate(candidate)
            if trickle.end_of_candidates:
                await peer.pc.addIceCandidate(None)
        except Exception as exc:
            logger.warning("WHIP session %s: candidate refused: %s", session_id, _reason(exc))
            raise WhipError(
                422, "candidate_refused", f"candidate refused: {_reason(exc)}"
            ) from None

    async def delete(self, session_id: str) -> None:
        """The publisher ended the publication (HTTP DELETE)."""
        await self._end(
            self._peer(session_id), REASON_DELETE, failed=False, code=EndCode.PUBLISHER_DELETED
        )

    async def end(self, session_id: str, reason: str) -> None:
        """The server ended the publication's session (it failed, or was deleted): close the
        peer connection too, so a dead session holds no publisher. No-op if already gone."""
        peer = self._peers.get(session_id)
        if peer is not None:
            await self._end(peer, reason, failed=False)

    async def close_all(self) -> None:
        """End every publication (server shutdown), within CLOSE_TIMEOUT_S: a shutdown never
        waits without bound on a peer connection that does not close."""
        ends = [
            self._end(p, REASON_SHUTDOWN, code=EndCode.SERVER_SHUTDOWN)
            for p in list(self._peers.values())
        ]
        # Ends already under way (a publisher that left just before) finish closing too.
        pending = [*(asyncio.ensure_future(e) for e in ends), *self._background]
        if not pending:
            return
        done, late = await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S)
        for task in late:
            task.cancel()
        if late:
            logger.warning("%d WHIP closes did not finish within %g s", len(late), CLOSE_TIMEOUT_S)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                logger.warning("closing a WHIP publication failed: %s", _reason(task.exception()))

    def _peer(self, session_id: str) -> _Peer:
        peer = self._peers.get(session_id)
        if peer is None:
            raise WhipError(404, "not_found", f"no WHIP session {session_id}")
        return peer

    def _new_peer_connection(self) -> RTCPeerConnection:
        servers = [RTCIceServer(url) for url in self.settings.ice_servers]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        if self.settings.allow_rsa:
            _allow_rsa_suites(pc)
        return pc

    async def _negotiate(
        self, peer: _Peer, offer: OfferInfo, offer_sdp: str, codec: RTCRtpCodecParameters
    ) -> str:
        pc = peer.pc
        # Transceivers made before setRemoteDescription are matched to the offer's m-sections
        # by kind, in order: one receive-only video restricted to the chosen codec, everything
        # else inactive (aiortc would otherwise receive and decode audio into unread queues).
        for index, kind in enumerate(offer.kinds):
            if kind == "application":
                continue
            if index == offer.video_index:
                peer.video = pc.addTransceiver("video", direction="recvonly")
                peer.video.setCodecPreferences(_codec_preferences(codec))
            else:
                pc.addTransceiver(kind, direction="inactive")
        pc.on("connectionstatechange", lambda: self._on_state(peer))
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        if self.settings.allow_loopback:
            _gather_loopback_too(pc)
        assert peer.video is not None and peer.video.receiver.track is not None
        peer.media = WebRTCSource(peer.video.receiver.track)
        await pc.setLocalDescription(await pc.createAnswer())
        s = self.settings
        return add_bitrate_hints(
            pc.localDescription.sdp, s.min_bitrate_kbps, s.start_bitrate_kbps, s.max_bitrate_kbps
        )

    def _on_state(self, peer: _Peer) -> None:
        state = peer.pc.connectionState
        logger.debug("WHIP session %s: connection %s", peer.session_id, state)
        if state == "connected":
            peer.connected = True
            _judge_liveness_by_packets(peer)
        elif state == "failed":
            # A handshake that never completed is a failed start, not a publisher leaving.
            self._spawn(self._end(peer, REASON_FAILED, failed=not peer.connected))
        elif state == "closed":
            self._spawn(self._end(peer, REASON_CLOSED, failed=False))

    async def _drain(self, peer: _Peer) -> None:
        """Hand every decoded frame to the sink, without pause, until the track ends."""
        assert peer.media is not None
        try:
            async for frame in peer.media.frames():
                if peer.ended:
                    return
                peer.sink.push(frame)
        except Exception as exc:
            logger.exception("WHIP session %s: draining the video track failed", peer.session_id)
            await self._end(peer, f"receiving video failed: {exc}", failed=True)
            return
        await self._end(peer, REASON_TRACK_ENDED, failed=False)

    async def _watch(self, peer: _Peer) -> None:
        """End a publication that never connects, or whose packets stop for disconnect_grace."""
        s = self.settings
        interval = min(0.5, s.disconnect_grace / 4)
        last_count, last_change = -1, time.monotonic()
        while not peer.ended:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if peer.pc.connectionState != "connected":
                if not peer.connected and now - peer.created > s.connect_timeout:
                    reason = (
                        f"publisher never connected (ICE/DTLS not done in {s.connect_timeout:g} s)"
                    )
                    await self._end(peer, reason, failed=True)
                    return
                continue
            count = await self._packets_received(peer)
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change > s.disconnect_grace:
                reason = f"publisher disconnected (no packets for {s.disconnect_grace:g} s)"
                await self._end(peer, reason, failed=False)
                return

    @staticmethod
    async def _packets_received(peer: _Peer) -> int:
        """Packets (media, RTCP, DTLS) the publication's transport has received so far."""
        assert peer.video is not None
        report = await peer.video.receiver.getStats()
        return sum(
            getattr(s, "packetsReceived", 0) for s in report.values() if s.type == "transport"
        )

    async def _end(
        self,
        peer: _Peer,
        reason: str,
        *,
        failed: bool = False,
        code: EndCode = EndCode.PUBLISHER_GONE,
    ) -> None:
        """Finish the sink once, stop the tasks and close the peer connection."""
        if peer.ended:
            return
        peer.ended = True
        if self._peers.get(peer.session_id) is peer:
            del self._peers[peer.session_id]
        current = asyncio.current_task()
        for task in peer.tasks:
            if task is not current:
                task.cancel()
        log = logger.warning if failed else logger.info
        log("WHIP session %s ended: %s", peer.session_id, reason)
        try:
            peer.sink.finish(reason, failed=failed, code=code)
        except Exception:
            logger.exception("WHIP session %s: sink.finish failed", peer.session_id)
        await close_peer_connection(peer.pc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def close_peer_connection(pc: RTCPeerConnection) -> None:
    """Close a peer connection, even one aiortc left half-built; never raises.

    RTCPeerConnection.close() stops every transceiver's transports in turn and raises on the
    first one missing (a negotiation that failed midway), leaving the rest, with their UDP
    sockets, open. Then each transport that exists is stopped here, one at a time.
    """
    try:
        await asyncio.wait_for(pc.close(), CLOSE_TIMEOUT_S)
        return
    except Exception as exc:  # TimeoutError included
        logger.warning("closing a peer connection failed (%s); stopping its parts", _reason(exc))
    dtls_transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        dtls_transports.append(pc.sctp.transport)
    for dtls in {id(t): t for t in dtls_transports if t is not None}.values():
        for part in (dtls, dtls.transport):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(part.stop(), CLOSE_TIMEOUT_S)
    pc.remove_all_listeners()


def _reason(exc: BaseException) -> str:
    """One line for an exception, even one without a message (aiortc's bare asserts)."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _transport_of(offer: OfferInfo, mid: str | None) -> tuple[str | None, int]:
    """(mid, m-line index) of the transport a trickled candidate of m-section `mid` is for.

    With BUNDLE (WHIP publishers use max-bundle) that is the group's first m-section, whatever
    mid the candidate came with; aiortc would drop a candidate addressed to a bundled mid.
    """
    if offer.bundle and (mid is None or mid in offer.bundle) and offer.bundle[0] in offer.mids:
        mid = offer.bundle[0]
    elif mid not in offer.mids or mid is None:
        mid = offer.mids[offer.video_index]
    return mid, offer.mids.index(mid)


def _etag_matches(if_match: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in if_match.split(",")]
    return "*" in tags or etag in tags


# ---------------------------------------------------------------------------------------------
# HTTP


_EXPOSED = "Location, ETag, Link, X-LiveLens-Session, Accept-Post"


def _publish_options(query: Mapping[str, str]) -> dict[str, float]:
    """Session options in the WHIP URL's query: `window` (media seconds the model holds, as in
    `POST /v1/sessions`). Other parameters are ignored (RFC 9725 leaves the URL to the
    server); a bad value is refused with 400 `bad_parameter`."""
    options: dict[str, float] = {}
    raw = query.get("window")
    if raw is not None:
        try:
            window = float(raw)
        except ValueError:
            window = math.nan
        if not (math.isfinite(window) and 0 < window <= 86400):
            raise WhipError(
                400, "bad_parameter", "window must be a number of seconds in (0, 86400]"
            )
        options["window_s"] = window
    return options


def whip_router(
    ingest: WhipIngest,
    open_session: SessionOpener,
    settings: WhipSettings,
    prefix: str = "/whip",
) -> fastapi.APIRouter:
    """POST {prefix} publishes; PATCH/DELETE {prefix}/{id} trickle and end; OPTIONS for CORS.

    `settings` governs the HTTP side (token, sizes, CORS); normally the ingest's own settings.
    """
    router = fastapi.APIRouter(prefix=prefix)
    cors = {
        "Access-Control-Allow-Origin": settings.cors_origin,
        "Access-Control-Expose-Headers": _EXPOSED,
    }
    if settings.cors_origin != "*":
        cors["Vary"] = "Origin"
    links = ", ".join(f'<{url}>; rel="ice-server"' for url in settings.ice_servers)

    def error(exc: WhipError) -> JSONResponse:
        headers = dict(cors)
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="whip"'
        return JSONResponse(
            {"error": {"code": exc.code, "message": exc.message}}, exc.status, headers=headers
        )

    async def body(request: Request, media_type: str) -> str:
        _authorize(request, settings.token)
        given = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if given != media_type:
            raise WhipError(415, "unsupported_media_type", f"Content-Type must be {media_type}")
        return await _read_text(request, settings.max_offer_bytes)

    def preflight(methods: str, extra: Mapping[str, str] | None = None) -> Response:
        headers = {
            **cors,
            **(extra or {}),
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
            "Access-Control-Max-Age": "600",
            "Allow": methods,
        }
        if links:
            headers["Link"] = links
        return Response(status_code=204, headers=headers)

    preflight_route = {
        "status_code": 204,
        "response_class": Response,
        "responses": {204: {"description": "CORS preflight: allowed methods and headers"}},
    }

    @router.options("", **preflight_route)
    async def options_endpoint() -> Response:
        return preflight("OPTIONS, POST", {"Accept-Post": SDP_TYPE})

    @router.options("/{session_id}", **preflight_route)
    async def options_session(session_id: str) -> Response:
        return preflight("OPTIONS, PATCH, DELETE")

    @router.post(
        "",
        status_code=201,
        response_class=Response,
        summary="Publish: an SDP offer in, the SDP answer out (RFC 9725)",
        responses={
            201: {"description": "the SDP answer", "content": {SDP_TYPE: _TEXT}},
            **error_responses(400, 401, 406, 413, 415, 503),
        },
        openapi_extra={
            **_text_body(SDP_TYPE),
            "parameters": [
                {
                    "name": "window",
                    "in": "query",
                    "required": False,
                    "description": "media seconds of video the model holds for this publication "
                    "(default: the server's --window)",
                    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
                }
            ],
        },
    )
    async def publish(request: Request) -> Response:
        try:
            offer = await body(request, SDP_TYPE)
            client = request.client.host if request.client else "unknown"
            agent = request.headers.get("user-agent", "unknown client")
            options = _publish_options(request.query_params)
            opener = functools.partial(open_session, **options) if options else open_session
            publication = await ingest.publish(offer, opener, f"whip:{client} {agent}")
        except WhipError as exc:
            return error(exc)
        headers = {
            **cors,
            "Location": f"{request.url.path.rstrip('/')}/{publication.session_id}",
            "ETag": publication.etag,
            "X-LiveLens-Session": publication.session_id,
        }
        if links:
            headers["Link"] = links
        return Response(publication.answer_sdp, 201, headers=headers, media_type=SDP_TYPE)

    @router.patch(
        "/{session_id}",
        status_code=204,
        response_class=Response,
        summary="Trickle ICE candidates (RFC 8840 SDP fragment)",
        responses=error_responses(400, 401, 404, 412, 413, 415, 422),
        openapi_extra=_text_body(TRICKLE_TYPE),
    )
    async def trickle(session_id: str, request: Request) -> Response:
        try:
            fragment = await body(request, TRICKLE_TYPE)
            await ingest.patch(session_id, fragment, request.headers.get("if-match"))
        except WhipError as exc:
            return error(exc)
        return Response(status_code=204, headers=cors)

    @router.delete(
        "/{session_id}",
        response_class=Response,
        summary="End the publication",
        responses={200: {"description": "ended"}, **error_responses(401, 404)},
    )
    async def delete(session_id: str, request: Request) -> Response:
        try:
            _authorize(request, settings.token)
            await ingest.delete(session_id)
        except WhipError as exc:
            return error(exc)
        return Response(status_code=200, headers=cors)

    return router


_TEXT = {"schema": {"type": "string"}}


def _text_body(media_type: str) -> dict[str, Any]:
    """OpenAPI request body of a route that reads the raw body itself (SDP, not JSON)."""
    return {"requestBody": {"required": True, "content": {media_type: _TEXT}}}


def _authorize(request: Request, token: str | None) -> None:
    """The router's own check of `settings.token` as a publish key (stream/auth.py).

    Inside `livelens serve` the app's guard checks scoped keys first and the token is None.
    """
    try:
        KeyRing.from_token(token).require(
            bearer(request.headers.get("authorization")), Scope.PUBLISH
        )
    except AuthError as exc:
        raise WhipError(exc.status, exc.code, exc.message) from None


async def _read_text(request: Request, limit: int) -> str:
    """The request body as UTF-8, refusing (413) more than `limit` bytes without reading it all."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise WhipError(413, "payload_too_large", f"body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise WhipError(413, "payload_too_large", f"body larger than {limit} bytes")
        chunks.append(chunk)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("the body is not UTF-8 text") from None
