"""Structural SDP rules checked before aiortc sees an offer or a trickle fragment.

aiortc trusts its peer: a candidate with too few fields trips an assert, a port above 65535
raises inside asyncio's datagram transport, a BUNDLE group naming a missing mid or two
m-sections sharing a mid leave a half-built peer connection that cannot even be closed. Each
function here raises ValueError with a one-line message for the HTTP layer to return as 400.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from aiortc import RTCIceCandidate

# RFC 8839 section 5.1 grammar pieces, and RFC 8866's token (the syntax of a mid).
_FOUNDATION = re.compile(r"[A-Za-z0-9+/]{1,32}")
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]{1,32}")
_HOSTNAME = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+local\.?")
_CANDIDATE_TYPES = ("host", "srflx", "prflx", "relay")
_TCP_TYPES = ("active", "passive", "so")
SETUP_ROLES = ("active", "passive", "actpass", "holdconn")
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


def _number(text: str, what: str, low: int, high: int) -> int:
    if not text.isdigit() or len(text) > 10 or not low <= int(text) <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {text[:20]!r}")
    return int(text)


def _address(text: str, what: str) -> str:
    """An IP literal, or an mDNS name (the only names aioice resolves)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if _HOSTNAME.fullmatch(text) is None:
            raise ValueError(f"{what} must be an IP address or a .local name") from None
    return text


def parse_candidate(value: str) -> RTCIceCandidate:
    """An `a=candidate:` value (what follows the colon), checked field by field."""
    bits = value.split()
    if len(bits) < 8:
        raise ValueError("a candidate has at least 8 fields")
    foundation, component, transport, priority, host, port, typ, kind = bits[:8]
    if _FOUNDATION.fullmatch(foundation) is None:
        raise ValueError("candidate foundation must be 1-32 letters, digits, '+' or '/'")
    if _TOKEN.fullmatch(transport) is None:
        raise ValueError("candidate transport must be a token such as UDP or TCP")
    if typ != "typ" or kind not in _CANDIDATE_TYPES:
        raise ValueError(f"candidate type must be 'typ' and one of {', '.join(_CANDIDATE_TYPES)}")
    candidate = RTCIceCandidate(
        component=_number(component, "candidate component", 1, 256),
        foundation=foundation,
        ip=_address(host, "candidate address"),
        port=_number(port, "candidate port", 0, 65535),
        priority=_number(priority, "candidate priority", 1, 2**32 - 1),
        protocol=transport,
        type=kind,
    )
    extensions = bits[8:]
    for name, ext in zip(extensions[::2], extensions[1::2], strict=False):
        if name == "raddr":
            candidate.relatedAddress = _address(ext, "candidate raddr")
        elif name == "rport":
            candidate.relatedPort = _number(ext, "candidate rport", 0, 65535)
        elif name == "tcptype":
            if ext not in _TCP_TYPES:
                raise ValueError(f"candidate tcptype must be one of {', '.join(_TCP_TYPES)}")
            candidate.tcpType = ext
    return candidate


def check_mids(mids: Sequence[Sequence[str]], bundle_groups: Sequence[str]) -> None:
    """Every m-section has exactly one a=mid, all distinct; one BUNDLE group of known mids.

    `mids` holds the a=mid values of each m-section, `bundle_groups` the mids listed by each
    a=group:BUNDLE line (as written after "BUNDLE").
    """
    seen: set[str] = set()
    for index, values in enumerate(mids):
        if len(values) != 1:
            raise ValueError(f"m-section {index} must have exactly one a=mid, has {len(values)}")
        mid = values[0].strip()
        if _TOKEN.fullmatch(mid) is None:
            raise ValueError(f"m-section {index}: a=mid must be a token of 1-32 characters")
        if mid in seen:
            raise ValueError(f"m-section {index} repeats a=mid:{mid}")
        seen.add(mid)
    if len(bundle_groups) > 1:
        raise ValueError("only one a=group:BUNDLE is supported")
    for group in bundle_groups:
        members = group.split()
        if not members:
            raise ValueError("a=group:BUNDLE names no m-section")
        unknown = [m for m in members if m not in seen]
        if unknown:
            raise ValueError(f"a=group:BUNDLE names a missing mid {unknown[0][:32]!r}")
        if len(set(members)) != len(members):
            raise ValueError("a=group:BUNDLE names an m-section twice")


def check_setup(where: str, values: Sequence[str]) -> None:
    """Exactly one a=setup with a known DTLS role (aiortc cannot answer without one)."""
    if len(values) != 1 or values[0].strip() not in SETUP_ROLES:
        raise ValueError(f"{where} needs exactly one a=setup: {', '.join(SETUP_ROLES)}")


def check_direction(where: str, directions: Sequence[str]) -> None:
    """At most one of sendrecv/sendonly/recvonly/inactive."""
    if len(directions) > 1:
        raise ValueError(f"{where} has more than one direction attribute")
