"""Seeded generators of hostile input for tests/test_fuzz.py: SDP offers, trickle fragments,
websocket messages, REST bodies and pull-source URLs.

Each generator takes a `random.Random` and returns one case; the same seed gives the same
cases. Mutations start from real, valid input (an aiortc offer, the documented messages), so
most cases get past the first checks and reach deeper code. Every address a case could make
the server contact stays on loopback or in TEST-NET (192.0.2.0/24, 2001:db8::/32): the suite
sends no packet off this machine.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

# Values that broke parsers somewhere: empty, huge, negative, non-ASCII, control characters,
# lone surrogates (written as bytes with surrogatepass), format strings, path tricks.
JUNK_TEXT = [
    "",
    " ",
    "0",
    "-1",
    "65536",
    "99999",
    "4294967296",
    "18446744073709551616",
    "1" * 40,
    "NaN",
    "-Infinity",
    "1e400",
    "x",
    "\x00",
    "\r\n",
    "\n",
    "\t",
    "é",
    "💥",
    "\ud800",
    "%s%n%x",
    "../../etc/passwd",
    "a" * 300,
    ":",
    "::",
    "/",
    "=",
    "BUNDLE",
    "local",
    "a.local",
    "[",
    "{",
]

SDP_LINES = [
    "a=group:BUNDLE 7",
    "a=group:BUNDLE 0 0",
    "a=group:BUNDLE",
    "a=mid:0",
    "a=mid:",
    "a=setup:bogus",
    "a=setup:active",
    "a=sendrecv",
    "a=inactive",
    "a=rtcp-mux",
    "a=candidate:1 1 udp",
    "a=candidate:1 1 udp 2130706431 192.0.2.1 99999 typ host",
    "a=candidate:1 1 udp 2130706431 192.0.2.1 5000 typ host",
    "a=candidate:1 1 tcp 1 192.0.2.1 9 typ host tcptype active",
    "a=candidate:1 2 udp 1 192.0.2.1 5000 typ srflx raddr 0.0.0.0 rport 0",
    "a=end-of-candidates",
    "m=video 9 UDP/TLS/RTP/SAVPF 96",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    "a=rtpmap:96 VP8/90000",
    "a=rtpmap:300 VP8/90000",
    "a=fmtp:96 apt=",
    "a=rtcp-fb:96",
    "a=ssrc-group:FID",
    "a=ssrc:x cname:y",
    "a=extmap:1",
    "a=fingerprint:sha-256 00",
    "a=ice-ufrag:",
    "a=ice-pwd:x",
    "c=IN IP4",
    "b=AS:-1",
    "v=0",
    "a=" + "x" * 2000,
]

_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")


def contain(sdp: str) -> str:
    """Keep every candidate address of an SDP in TEST-NET, and mDNS names unresolvable."""
    lines = []
    for line in sdp.split("\n"):
        if line.startswith("a=candidate"):
            line = _IPV4.sub("192.0.2.1", line)
            line = _IPV6.sub("2001:db8::1", line)
            line = line.replace(".local", ".invalid")
        lines.append(line)
    return "\n".join(lines)


def _junk(rng: random.Random) -> str:
    return rng.choice(JUNK_TEXT)


def mutate_lines(text: str, rng: random.Random, library: list[str]) -> str:
    """One to three line-level mutations of an SDP-like text (CRLF line ends)."""
    lines = text.split("\r\n")
    for _ in range(rng.randint(1, 3)):
        if not lines:
            lines = [""]
        i = rng.randrange(len(lines))
        op = rng.randrange(8)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3:
            # Replace one space/colon-separated field with junk.
            parts = re.split(r"([ :=/])", lines[i])
            k = rng.randrange(0, len(parts), 2) if parts else 0
            if parts:
                parts[k] = _junk(rng)
            lines[i] = "".join(parts)
        elif op == 4:
            lines.insert(i, rng.choice(library))
        elif op == 5:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        elif op == 6:
            lines[i] = re.sub(
                r"\d+", lambda _: rng.choice(["0", "-1", "99999", "1" * 25]), lines[i]
            )
        else:
            lines[i] = lines[i] + _junk(rng)
    sep = rng.choice(["\r\n"] * 8 + ["\n", "\r"])
    return sep.join(lines)


def encode(text: str) -> bytes:
    """UTF-8, keeping lone surrogates as the invalid bytes a hostile client would send."""
    return text.encode("utf-8", errors="surrogatepass")


def is_utf8(text: str) -> bool:
    """False for text with lone surrogates, which no UTF-8 encoder accepts."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# ------------------------------------------------------------------------------------ WHIP
def sdp_offer(rng: random.Random, offer: str) -> bytes:
    return encode(contain(mutate_lines(offer, rng, SDP_LINES)))


def patch_fragment(rng: random.Random, ufrag: str, pwd: str) -> bytes:
    base = "\r\n".join(
        [
            f"a=ice-ufrag:{ufrag}",
            f"a=ice-pwd:{pwd}",
            "m=video 9 UDP/TLS/RTP/SAVPF 0",
            "a=mid:0",
            "a=candidate:1 1 udp 2130706431 192.0.2.1 5000 typ host",
            "a=candidate:2 1 udp 1694498815 192.0.2.1 5001 typ srflx raddr 192.0.2.1 rport 5000",
            "a=candidate:3 1 tcp 1518280447 192.0.2.1 9 typ host tcptype active",
            "a=end-of-candidates",
        ]
    )
    return encode(contain(mutate_lines(base, rng, SDP_LINES)))


# ------------------------------------------------------------------------------- websocket
def _junk_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return rng.choice([0, -1, 2**31, 2**63, 2**64, 2**70, -(2**64), 10**30])
    if kind == 1:
        return rng.choice([0.0, -0.0, 1e-300, 1e300, 0.5, 2.0000001])
    if kind == 2:
        return _junk(rng)
    if kind == 3:
        return None
    if kind == 4:
        return rng.choice([True, False])
    if kind == 5:
        return "q" * rng.choice([1, 64, 65, 2000, 2001])
    if kind == 6:
        return ""
    if kind == 7:
        return [_junk_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {_junk(rng): _junk_json(rng, depth + 1) for _ in range(rng.randrange(3))}


_RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 5000, "-0", "1.5e-400"]


def ws_message(rng: random.Random, index: int) -> str | bytes:
    """One websocket message: a mutated ask, cancel, watch or unwatch, or a text-level attack."""
    base: dict[str, Any] = rng.choice(
        [
            {"type": "ask", "id": f"f{index}", "question": "what?", "max_new_tokens": 1},
            {"type": "cancel", "id": f"f{index}"},
            {"type": "ask", "id": f"f{index}", "question": "what?", "max_new_tokens": 1},
            {"type": "cancel", "id": f"f{index}"},
            {"type": "watch", "id": f"f{index}", "condition": "a red ball", "every": 5},
            {"type": "unwatch", "id": f"f{index}", "alert_id": "al_000000000000"},
        ]
    )
    op = rng.randrange(7)
    if op == 0:
        fields = [*base, "top_p", "temperature", "seed", "every", "threshold", "webhook", "extra"]
        base[rng.choice(fields)] = _junk_json(rng)
        return json.dumps(base, ensure_ascii=rng.random() < 0.5)
    if op == 1:
        del base[rng.choice(list(base))]
        return json.dumps(base)
    if op == 2:  # a value JSON cannot carry in Python's json.dumps: spliced in as text
        key = rng.choice(["top_p", "temperature", "seed", "top_k", "max_new_tokens", "id"])
        return json.dumps(base)[:-1] + f', "{key}": {rng.choice(_RAW_NUMBERS)}}}'
    if op == 3:  # nesting, inside a field or as the whole message
        depth = rng.choice([2, 8, 9, 100, 5000])
        nested = "[" * depth + "]" * depth
        return nested if rng.random() < 0.5 else json.dumps(base)[:-1] + f', "x": {nested}}}'
    if op == 4:  # escapes that decode to lone surrogates or NUL
        escape = rng.choice(["\\ud800", "\\udfff", "\\u0000", "\\ud83d"])
        text = json.dumps(base)
        return text.replace(f'"f{index}"', f'"f{index}{escape}"')
    if op == 5:
        text = json.dumps(base)
        cut = rng.randrange(len(text) + 1)
        return text[:cut] + _junk(rng) + text[cut:]
    return encode(json.dumps(base)) if rng.random() < 0.5 else bytes(rng.randbytes(20))


# ------------------------------------------------------------------------------------ REST
def pull_body(rng: random.Random, source: str) -> bytes:
    """A mutated POST /v1/sessions body whose source, when valid, is a missing file."""
    body: dict[str, Any] = {"source": source, "fps": 1, "realtime": False}
    op = rng.randrange(5)
    if op == 0:
        body[rng.choice(["source", "fps", "prune_threshold", "realtime", "loop", "x"])] = (
            _junk_json(rng)
        )
    elif op == 1:
        body = _junk_json(rng)
    elif op == 2:
        key = rng.choice(["fps", "prune_threshold"])
        return encode(json.dumps(body)[:-1] + f', "{key}": {rng.choice(_RAW_NUMBERS)}}}')
    elif op == 3:
        depth = rng.choice([10, 100, 3000])
        return encode("[" * depth + "]" * depth)
    else:
        text = json.dumps(body)
        cut = rng.randrange(len(text) + 1)
        return encode(text[:cut] + _junk(rng) + text[cut:])
    return encode(json.dumps(body))


def alert_body(rng: random.Random) -> bytes:
    """A mutated POST /v1/sessions/{id}/alerts body."""
    body: dict[str, Any] = {"condition": "a red ball is visible", "every": 5, "cooldown": 10}
    op = rng.randrange(4)
    if op == 0:
        keys = ["condition", "every", "cooldown", "threshold", "hysteresis", "webhook", "x"]
        body[rng.choice(keys)] = _junk_json(rng)
    elif op == 1:
        body["webhook"] = rng.choice(
            [*JUNK_TEXT[:20], "http://127.0.0.1:1/x", "https://user:pw@host/x", "ftp://h/x"]
        )
    elif op == 2:
        key = rng.choice(["every", "cooldown", "threshold", "hysteresis"])
        return encode(json.dumps(body)[:-1] + f', "{key}": {rng.choice(_RAW_NUMBERS)}}}')
    else:
        text = json.dumps(body)
        cut = rng.randrange(len(text) + 1)
        return encode(text[:cut] + _junk(rng) + text[cut:])
    return encode(json.dumps(body))


def query_value(rng: random.Random) -> str:
    return rng.choice([*JUNK_TEXT[:20], "1", "10000", "10001", "1.5", "-0", "inf"])


# ---------------------------------------------------------------------------- source URLs
_SCHEMES = ["rtsp", "RTSP", "rtsps", "http", "HTTP", "https", "file", "ftp", "gopher", "", "r tsp"]
_USERINFO = ["", "user:pass@", "user:p%40ss@", "a:b:c@", "@", "user\r\n@", "%00@"]
_PATHS = [
    "/stream1",
    "/live.m3u8",
    "/",
    "",
    "/a b",
    "/x\r\nSET k v\r\n",
    "/x\nFLUSHALL",
    "/%0d%0aSET k v",
    "/../../etc/passwd",
    "/x?y=" + "z" * 3000,
    "/\x00",
    "/é",
    "/#frag",
]


def source_url(rng: random.Random, closed_port: int, files: list[str]) -> str:
    """A pull source: URLs whose host is always loopback (on a closed port), or local paths."""
    if rng.random() < 0.25:
        path = rng.choice([*files, "/etc/passwd", "/dev/zero", "/proc/self/environ", "."])
        return path + rng.choice(["", "", "\r\n", " ", "\x00", "/..", "%00"])
    host = rng.choice(["127.0.0.1", "[::1]", "localhost", "127.1", "0x7f.1", "[::ffff:127.0.0.1]"])
    port = rng.choice([f":{closed_port}", f":{closed_port}", ":0", ":99999", ":-1", ":x", ""])
    if port in ("", ":0", ":99999", ":-1", ":x"):
        port = f":{closed_port}" if rng.random() < 0.7 else port
    authority = f"{rng.choice(_SCHEMES)}://{rng.choice(_USERINFO)}{host}{port}"
    path = rng.choice(_PATHS)
    if rng.random() < 0.2:  # junk after the authority only: the host stays loopback
        cut = rng.randrange(len(path) + 1)
        path = path[:cut] + _junk(rng) + path[cut:]
    return authority + path
