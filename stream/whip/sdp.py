"""WHIP offers and answers as text: checking offers (aiortc answers even garbage), bitrate
hints in answers, reading trickle-ICE fragments (RFC 8840). No networking here."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiortc.codecs import CODECS, is_rtx
from aiortc.rtcpeerconnection import is_codec_compatible
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.sdp import SessionDescription

from livelens.stream.errors import ServiceError
from livelens.stream.sdp_checks import (
    DIRECTIONS,
    check_direction,
    check_mids,
    check_setup,
    parse_candidate,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

SDP_TYPE = "application/sdp"
TRICKLE_TYPE = "application/trickle-ice-sdpfrag"

# Codec names that repair or protect another codec's stream; they carry no bitrate hints.
_NOT_MEDIA_CODECS = {"rtx", "red", "ulpfec", "flexfec-03"}
# Payload types whose codec RFC 3551 fixes, so offers may omit their a=rtpmap.
_STATIC_PAYLOAD_TYPES = {0: ("PCMU", 8000), 8: ("PCMA", 8000), 9: ("G722", 8000)}


class WhipError(ServiceError):
    """A request the WHIP endpoint refuses: HTTP status, a stable code and a one-line message
    (answered by the WHIP router itself, with its CORS headers)."""


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


def malformed(message: str) -> WhipError:
    return WhipError(400, "malformed_sdp", message)


def _check(rule: Callable[..., _T], *args: Any) -> _T:
    """Apply one of sdp_checks' rules; its ValueError becomes a 400 malformed_sdp."""
    try:
        return rule(*args)
    except ValueError as exc:
        raise malformed(str(exc)) from None


def _sdp_lines(text: str) -> list[str]:
    return [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]


def _parse_sdp(sdp: str) -> tuple[_Section, list[_Section]]:
    """Split an SDP into its session part and m-sections; WhipError(400) if it is not SDP."""
    lines = _sdp_lines(sdp)
    if not lines:
        raise malformed("the offer is empty")
    if lines[0].strip() != "v=0":
        raise malformed("an SDP must start with a v=0 line")
    session = _Section()
    media: list[_Section] = []
    current = session
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        match = _SDP_LINE.fullmatch(line.rstrip())
        if match is None:
            raise malformed(f"line {number} is not an SDP <type>=<value> line: {line[:60]!r}")
        kind, value = match.groups()
        if kind == "m":
            m = _M_LINE.fullmatch(value)
            if m is None:
                raise malformed(f"line {number}: unparsable m= line: {value[:60]!r}")
            current = _Section(m[1], int(m[2]), tuple(m[4].split()))
            media.append(current)
        elif kind in _SESSION_ONLY:
            # aiortc's parser asserts on these out of place or twice; found by the fuzz suite.
            if media or (kind != "t" and kind in seen):
                raise malformed(f"line {number}: {kind}= belongs once, before the first m= line")
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
            raise malformed(f"unparsable a=rtpmap:{value[:60]}")
        rtpmaps[int(match[1])] = (match[2], int(match[3]))
    fmtps: dict[int, dict[str, str]] = {}
    for value in section.values("fmtp"):
        match = _FMTP.fullmatch(value.strip())
        if match is None:
            raise malformed(f"unparsable a=fmtp:{value[:60]}")
        params = fmtps.setdefault(int(match[1]), {})
        for item in (match[2] or "").split(";"):
            key, _, param = item.strip().partition("=")
            if key:
                params[key] = param
    codecs = []
    for fmt in section.formats:
        if not fmt.isdigit():
            raise malformed(f"{section.kind} m= line lists a non-numeric payload type {fmt!r}")
        pt = int(fmt)
        if pt in rtpmaps:
            name, rate = rtpmaps[pt]
            codecs.append(OfferedCodec(pt, name, rate, fmtps.get(pt, {})))
    return codecs


def aiortc_codec(kind: str, codec: OfferedCodec) -> RTCRtpCodecParameters | None:
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
        raise malformed("the offer has no m= section")
    for index, section in enumerate(media):
        where = f"m-section {index} ({section.kind})"
        if section.kind not in ("audio", "video", "application"):
            raise WhipError(406, "unsupported_media", f"{where}: media kind not supported")
        ufrag = section.first("ice-ufrag") or session.first("ice-ufrag")
        pwd = section.first("ice-pwd") or session.first("ice-pwd")
        if not ufrag or not pwd:
            raise malformed(f"{where} has no a=ice-ufrag / a=ice-pwd")
        fingerprints = section.values("fingerprint") or session.values("fingerprint")
        if not fingerprints:
            raise malformed(f"{where} has no a=fingerprint")
        for fingerprint in fingerprints:
            if _FINGERPRINT.fullmatch(fingerprint.strip()) is None:
                raise malformed(f"{where}: unparsable a=fingerprint:{fingerprint[:60]}")
    if sum(section.kind == "application" for section in media) > 1:
        raise WhipError(406, "unsupported_media", "more than one application m-section")

    chosen: tuple[int, OfferedCodec] | None = None
    unusable: list[str] = []
    for index, section in enumerate(media):
        if section.kind == "application":
            continue
        codecs = _codecs(section)
        usable = [c for c in codecs if aiortc_codec(section.kind, c) is not None]
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
        raise malformed(f"SDP the WebRTC stack cannot parse: {describe_error(exc)}") from None
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
            raise malformed(f"fragment line {number} is not an SDP line: {line[:60]!r}")
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


def describe_error(exc: BaseException) -> str:
    """One line for an exception, even one without a message (aiortc's bare asserts)."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
