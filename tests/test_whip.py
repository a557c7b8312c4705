"""WHIP ingest against real publishers: aiortc peers, FFmpeg's whip muxer, headless Chromium.

Everything is real: a uvicorn server on 127.0.0.1 (tests/browser.py serve()), real ICE/DTLS/
SRTP, real encoders. The sink records what it is given: frame times, the frame counter drawn
in each picture (videos.index_pattern), sizes, and how the session finished.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import ffmpeg_publisher
import httpx
import pytest
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.rtcdtlstransport import RTCCertificate
from browser import chromium, chromium_available, serve
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.testclient import TestClient
from videos import index_pattern, read_index
from y4m import write_y4m

from livelens.stream.frames import DecodedFrame
from livelens.stream.lifecycle import EndCode
from livelens.stream.whip import (
    REASON_CLOSED,
    REASON_DELETE,
    REASON_FAILED,
    REASON_TRACK_ENDED,
    WhipError,
    WhipIngest,
    WhipSettings,
    add_bitrate_hints,
    close_peer_connection,
    parse_trickle_fragment,
    validate_offer,
    whip_router,
)
from livelens.stream.whip.peer import watchdog_interval

ASSETS = Path(__file__).parent / "assets"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SDP = {"Content-Type": "application/sdp", **AUTH}
GRACE = 1.5
"""disconnect_grace of the test server: short, so a vanished publisher is noticed quickly."""
SETTINGS = WhipSettings(
    token=TOKEN, allow_loopback=True, disconnect_grace=GRACE, connect_timeout=15.0
)
HINTS = "x-google-min-bitrate=1000;x-google-start-bitrate=4000;x-google-max-bitrate=8000"


# ---------------------------------------------------------------------------------------------
# The server side: a recording sink, an opener, an app


@dataclass
class Received:
    time: float
    index: int
    width: int
    height: int


class RecordingSink:
    """A real FrameSink: reads the counter out of each frame and records how it finished."""

    def __init__(self, session_id: str, source: str) -> None:
        self.session_id = session_id
        self.source = source
        self.received: list[Received] = []
        self.finishes: list[tuple[str, bool]] = []
        self.codes: list[EndCode | None] = []
        self._lock = threading.Lock()
        self.finished = threading.Event()

    def push(self, frame: DecodedFrame) -> None:
        image = frame.frame.to_ndarray(format="rgb24")
        item = Received(frame.time, read_index(image), frame.frame.width, frame.frame.height)
        with self._lock:
            self.received.append(item)

    def finish(self, reason: str, failed: bool = False, code: EndCode | None = None) -> None:
        with self._lock:
            self.finishes.append((reason, failed))
            self.codes.append(code)
        self.finished.set()

    def frames(self) -> list[Received]:
        with self._lock:
            return list(self.received)


@dataclass
class Sessions:
    """The SessionOpener: makes RecordingSinks, or refuses when told to."""

    sinks: dict[str, RecordingSink] = field(default_factory=dict)
    refuse: bool = False
    _count: int = 0

    def __call__(self, source: str) -> RecordingSink:
        if self.refuse:
            raise RuntimeError("at capacity")
        self._count += 1
        sink = RecordingSink(f"live-{self._count}", source)
        self.sinks[sink.session_id] = sink
        return sink


@dataclass
class Server:
    url: str
    sessions: Sessions
    ingest: WhipIngest

    @property
    def whip(self) -> str:
        return f"{self.url}/whip"


def make_app(settings: WhipSettings) -> tuple[FastAPI, Sessions, WhipIngest]:
    ingest = WhipIngest(settings)
    sessions = Sessions()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await ingest.close_all()

    app = FastAPI(lifespan=lifespan)
    app.include_router(whip_router(ingest, sessions, settings))
    app.mount("/assets", StaticFiles(directory=ASSETS), name="assets")  # test app only
    return app, sessions, ingest


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    app, sessions, ingest = make_app(SETTINGS)
    with serve(app) as url:
        yield Server(url, sessions, ingest)


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


async def async_wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


def assert_counted_frames(frames: list[Received], fps: int, width: int, height: int) -> None:
    """Frames decoded from an index-pattern publisher at a fixed rate: content matches time."""
    assert frames[0].time == 0.0
    assert all(b.time > a.time for a, b in itertools.pairwise(frames))
    assert all(b.index > a.index for a, b in itertools.pairwise(frames))
    first = frames[0].index
    for f in frames:
        # The publisher stamps frame n at n / fps, so time and drawn counter agree, to the
        # 90 kHz RTP tick that senders truncate to (aiortc converts through a float).
        assert f.time * fps == pytest.approx(f.index - first, abs=fps * 1.01 / 90000), f
        assert (f.width, f.height) == (width, height)


# ---------------------------------------------------------------------------------------------
# Publishers


class IndexTrack(VideoStreamTrack):
    """Sends index_pattern frames at `fps`, frame n stamped n / fps."""

    def __init__(self, width: int = 320, height: int = 240, fps: int = 15) -> None:
        super().__init__()
        self.size = (width, height)
        self.fps = fps
        self.sent = 0
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._start + self.sent / self.fps - time.monotonic()))
        width, height = self.size
        frame = av.VideoFrame.from_ndarray(index_pattern(self.sent, width, height), "rgb24")
        frame.pts, frame.time_base = self.sent, Fraction(1, self.fps)
        self.sent += 1
        return frame


async def aiortc_publisher(
    codec: str = "VP8", certificate: RTCCertificate | None = None
) -> tuple[RTCPeerConnection, IndexTrack]:
    """An aiortc peer with one sendonly index-pattern video, its offer set (non-trickle)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: no network here
    if certificate is not None:
        # Stand-in for a publisher with an RSA certificate (GStreamer's webrtcbin).
        pc._RTCPeerConnection__certificates = [certificate]  # type: ignore[attr-defined]
    track = IndexTrack()
    transceiver = pc.addTransceiver(track, direction="sendonly")
    capabilities = RTCRtpSender.getCapabilities("video")
    assert capabilities is not None
    transceiver.setCodecPreferences(
        [
            c
            for c in capabilities.codecs
            if c.mimeType.lower() in (f"video/{codec}".lower(), "video/rtx")
        ]
    )
    await pc.setLocalDescription(await pc.createOffer())
    return pc, track


def strip_candidates(sdp: str) -> tuple[str, list[str]]:
    lines = sdp.splitlines()
    candidates = [line for line in lines if line.startswith("a=candidate:")]
    kept = [line for line in lines if not line.startswith(("a=candidate:", "a=end-of-cand"))]
    return "\r\n".join(kept) + "\r\n", candidates


class RsaOnlyCertificate(RTCCertificate):
    """An RSA certificate whose DTLS handshakes allow ECDHE-RSA suites only, like webrtcbin's."""

    def _create_ssl_context(self, srtp_profiles):  # type: ignore[no-untyped-def]
        ctx = super()._create_ssl_context(srtp_profiles)
        ctx.set_cipher_list(b"ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384")
        return ctx


def rsa_certificate() -> RsaOnlyCertificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return RsaOnlyCertificate(key=key, cert=ffmpeg_publisher.self_signed(key))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# 1. Offer checks and answer munging, no network

# A real Chromium 156 offer (getUserMedia audio + video, both sendonly, non-trickle; captured
# from this machine's browser). Backslash-newlines only wrap long lines of this file.
CHROMIUM_OFFER = """\
v=0
o=- 335691522954357317 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1
a=extmap-allow-mixed
a=msid-semantic: WMS 0ef20559-f699-4798-86ad-95fa4b7cd1cc
m=audio 36748 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126
c=IN IP4 127.0.0.1
a=rtcp:9 IN IP4 0.0.0.0
a=candidate:442185111 1 udp 2122194687 127.0.0.1 36748 typ host generation 0 network-id 3 netwo\
rk-cost 50
a=candidate:4277913347 1 udp 2122063615 192.0.2.2 48620 typ host generation 0 network-id 1
a=candidate:192358175 1 udp 2122267903 ::1 33362 typ host generation 0 network-id 4 network-cos\
t 50
a=candidate:899483363 1 udp 2122134271 fd00::2 52834 typ host generation 0 network-id 2
a=candidate:3841057027 1 tcp 1518214911 127.0.0.1 9 typ host tcptype active generation 0 networ\
k-id 3 network-cost 50
a=candidate:5313431 1 tcp 1518083839 192.0.2.2 9 typ host tcptype active generation 0 network-i\
d 1
a=candidate:4124963723 1 tcp 1518288127 ::1 9 typ host tcptype active generation 0 network-id 4\
 network-cost 50
a=candidate:3409433207 1 tcp 1518154495 fd00::2 9 typ host tcptype active generation 0 network-\
id 2
a=ice-ufrag:OnFN
a=ice-pwd:75gJZxP148By1nFkVA3nI5b3
a=ice-options:trickle
a=fingerprint:sha-256 56:79:9D:71:90:05:BA:5E:27:36:A4:81:75:87:76:75:11:BD:B0:B8:00:14:5E:94:1\
0:42:91:10:90:B1:3F:4A
a=setup:actpass
a=mid:0
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=sendonly
a=msid:0ef20559-f699-4798-86ad-95fa4b7cd1cc 169b0c15-3b30-4023-ae05-8cfc0ece1384
a=rtcp-mux
a=rtcp-rsize
a=rtcp-xr:rcvr-rtt=all
a=rtpmap:111 opus/48000/2
a=rtcp-fb:111 transport-cc
a=fmtp:111 minptime=10;useinbandfec=1
a=rtpmap:63 red/48000/2
a=fmtp:63 111/111
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:13 CN/8000
a=rtpmap:110 telephone-event/48000
a=rtpmap:126 telephone-event/8000
a=ssrc:2864310265 cname:ouptAEn/YT1B8N/k
a=ssrc:2864310265 msid:0ef20559-f699-4798-86ad-95fa4b7cd1cc 169b0c15-3b30-4023-ae05-8cfc0ece138\
4
m=video 41234 UDP/TLS/RTP/SAVPF 96 97 102 103 104 107 108 109 114 115 116 117 39 40 45 46 98 99\
 100 101 118 119 120
c=IN IP4 127.0.0.1
a=rtcp:9 IN IP4 0.0.0.0
a=candidate:442185111 1 udp 2122194687 127.0.0.1 41234 typ host generation 0 network-id 3 netwo\
rk-cost 50
a=candidate:4277913347 1 udp 2122063615 192.0.2.2 41415 typ host generation 0 network-id 1
a=candidate:192358175 1 udp 2122267903 ::1 53226 typ host generation 0 network-id 4 network-cos\
t 50
a=candidate:899483363 1 udp 2122134271 fd00::2 51858 typ host generation 0 network-id 2
a=candidate:3841057027 1 tcp 1518214911 127.0.0.1 9 typ host tcptype active generation 0 networ\
k-id 3 network-cost 50
a=candidate:5313431 1 tcp 1518083839 192.0.2.2 9 typ host tcptype active generation 0 network-i\
d 1
a=candidate:4124963723 1 tcp 1518288127 ::1 9 typ host tcptype active generation 0 network-id 4\
 network-cost 50
a=candidate:3409433207 1 tcp 1518154495 fd00::2 9 typ host tcptype active generation 0 network-\
id 2
a=ice-ufrag:OnFN
a=ice-pwd:75gJZxP148By1nFkVA3nI5b3
a=ice-options:trickle
a=fingerprint:sha-256 56:79:9D:71:90:05:BA:5E:27:36:A4:81:75:87:76:75:11:BD:B0:B8:00:14:5E:94:1\
0:42:91:10:90:B1:3F:4A
a=setup:actpass
a=mid:1
a=extmap:14 urn:ietf:params:rtp-hdrext:toffset
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=extmap:13 urn:3gpp:video-orientation
a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01
a=extmap:5 http://www.webrtc.org/experiments/rtp-hdrext/playout-delay
a=extmap:6 http://www.webrtc.org/experiments/rtp-hdrext/video-content-type
a=extmap:7 http://www.webrtc.org/experiments/rtp-hdrext/video-timing
a=extmap:8 http://www.webrtc.org/experiments/rtp-hdrext/color-space
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id
a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id
a=sendonly
a=msid:0ef20559-f699-4798-86ad-95fa4b7cd1cc cf0ac31a-b85d-4d84-a9eb-34c96cb7d641
a=rtcp-mux
a=rtcp-rsize
a=rtcp-xr:rcvr-rtt=all
a=rtpmap:96 VP8/90000
a=rtcp-fb:96 goog-remb
a=rtcp-fb:96 transport-cc
a=rtcp-fb:96 ccm fir
a=rtcp-fb:96 nack
a=rtcp-fb:96 nack pli
a=rtpmap:97 rtx/90000
a=fmtp:97 apt=96
a=rtpmap:102 H264/90000
a=rtcp-fb:102 goog-remb
a=rtcp-fb:102 transport-cc
a=rtcp-fb:102 ccm fir
a=rtcp-fb:102 nack
a=rtcp-fb:102 nack pli
a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f
a=rtpmap:103 rtx/90000
a=fmtp:103 apt=102
a=rtpmap:104 H264/90000
a=rtcp-fb:104 goog-remb
a=rtcp-fb:104 transport-cc
a=rtcp-fb:104 ccm fir
a=rtcp-fb:104 nack
a=rtcp-fb:104 nack pli
a=fmtp:104 level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f
a=rtpmap:107 rtx/90000
a=fmtp:107 apt=104
a=rtpmap:108 H264/90000
a=rtcp-fb:108 goog-remb
a=rtcp-fb:108 transport-cc
a=rtcp-fb:108 ccm fir
a=rtcp-fb:108 nack
a=rtcp-fb:108 nack pli
a=fmtp:108 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f
a=rtpmap:109 rtx/90000
a=fmtp:109 apt=108
a=rtpmap:114 H264/90000
a=rtcp-fb:114 goog-remb
a=rtcp-fb:114 transport-cc
a=rtcp-fb:114 ccm fir
a=rtcp-fb:114 nack
a=rtcp-fb:114 nack pli
a=fmtp:114 level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f
a=rtpmap:115 rtx/90000
a=fmtp:115 apt=114
a=rtpmap:116 H264/90000
a=rtcp-fb:116 goog-remb
a=rtcp-fb:116 transport-cc
a=rtcp-fb:116 ccm fir
a=rtcp-fb:116 nack
a=rtcp-fb:116 nack pli
a=fmtp:116 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d001f
a=rtpmap:117 rtx/90000
a=fmtp:117 apt=116
a=rtpmap:39 H264/90000
a=rtcp-fb:39 goog-remb
a=rtcp-fb:39 transport-cc
a=rtcp-fb:39 ccm fir
a=rtcp-fb:39 nack
a=rtcp-fb:39 nack pli
a=fmtp:39 level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=4d001f
a=rtpmap:40 rtx/90000
a=fmtp:40 apt=39
a=rtpmap:45 AV1/90000
a=rtcp-fb:45 goog-remb
a=rtcp-fb:45 transport-cc
a=rtcp-fb:45 ccm fir
a=rtcp-fb:45 nack
a=rtcp-fb:45 nack pli
a=fmtp:45 level-idx=5;profile=0;tier=0
a=rtpmap:46 rtx/90000
a=fmtp:46 apt=45
a=rtpmap:98 VP9/90000
a=rtcp-fb:98 goog-remb
a=rtcp-fb:98 transport-cc
a=rtcp-fb:98 ccm fir
a=rtcp-fb:98 nack
a=rtcp-fb:98 nack pli
a=fmtp:98 profile-id=0
a=rtpmap:99 rtx/90000
a=fmtp:99 apt=98
a=rtpmap:100 VP9/90000
a=rtcp-fb:100 goog-remb
a=rtcp-fb:100 transport-cc
a=rtcp-fb:100 ccm fir
a=rtcp-fb:100 nack
a=rtcp-fb:100 nack pli
a=fmtp:100 profile-id=2
a=rtpmap:101 rtx/90000
a=fmtp:101 apt=100
a=rtpmap:118 red/90000
a=rtpmap:119 rtx/90000
a=fmtp:119 apt=118
a=rtpmap:120 ulpfec/90000
a=ssrc-group:FID 2576601404 1028832595
a=ssrc:2576601404 cname:ouptAEn/YT1B8N/k
a=ssrc:2576601404 msid:0ef20559-f699-4798-86ad-95fa4b7cd1cc cf0ac31a-b85d-4d84-a9eb-34c96cb7d64\
1
a=ssrc:1028832595 cname:ouptAEn/YT1B8N/k
a=ssrc:1028832595 msid:0ef20559-f699-4798-86ad-95fa4b7cd1cc cf0ac31a-b85d-4d84-a9eb-34c96cb7d64\
1
""".replace("\n", "\r\n")
SESSION_PART, AUDIO_SECTION, VIDEO_SECTION = CHROMIUM_OFFER.split("\r\nm=")
AUDIO_SECTION, VIDEO_SECTION = "m=" + AUDIO_SECTION, "m=" + VIDEO_SECTION
SESSION_PART += "\r\n"
FINGERPRINT = next(line for line in CHROMIUM_OFFER.split("\r\n") if line.startswith("a=fing"))


def video_only(codec_lines: str, formats: str) -> str:
    """The Chromium offer's session part and one video section offering only `codec_lines`."""
    section = (
        f"m=video 9 UDP/TLS/RTP/SAVPF {formats}\r\n"
        f"a=ice-ufrag:OnFN\r\na=ice-pwd:75gJZxP148By1nFkVA3nI5b3\r\n{FINGERPRINT}\r\n"
        "a=setup:actpass\r\na=mid:0\r\na=sendonly\r\na=rtcp-mux\r\n"
        + codec_lines.replace("\n", "\r\n")
    )
    return SESSION_PART.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0") + section


AUDIO_ONLY = SESSION_PART.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0") + AUDIO_SECTION
VIDEO_THEN_AUDIO = SESSION_PART + VIDEO_SECTION + AUDIO_SECTION
VP9_ONLY = video_only("a=rtpmap:98 VP9/90000\na=fmtp:98 profile-id=0\n", "98")
H265_ONLY = video_only("a=rtpmap:49 H265/90000\na=fmtp:49 level-id=93\n", "49")
H264_HIGH_ONLY = video_only(
    "a=rtpmap:106 H264/90000\na=fmtp:106 packetization-mode=1;profile-level-id=640034\n", "106"
)
H264_MODE0_ONLY = video_only(
    "a=rtpmap:102 H264/90000\na=fmtp:102 packetization-mode=0;profile-level-id=42e01f\n", "102"
)
H264_CB_ONLY = video_only(
    "a=rtpmap:104 H264/90000\na=fmtp:104 packetization-mode=1;profile-level-id=42e01f\n", "104"
)


def refusal(sdp: str, status: int, code: str, id: str) -> object:
    return pytest.param(sdp, status, code, id=id)


@pytest.mark.parametrize(
    ("sdp", "status", "code"),
    [
        refusal("", 400, "malformed_sdp", "empty"),
        refusal("hello world", 400, "malformed_sdp", "garbage"),
        refusal("\x00\x01\x02", 400, "malformed_sdp", "binary"),
        refusal("o=- 1 1 IN IP4 0.0.0.0\r\nv=0\r\n", 400, "malformed_sdp", "v-not-first"),
        refusal("v=0\r\ns=-\r\nt=0 0\r\n", 400, "malformed_sdp", "no-m-section"),
        refusal(
            CHROMIUM_OFFER.replace("a=ice-ufrag:OnFN\r\n", ""), 400, "malformed_sdp", "no-ufrag"
        ),
        refusal(CHROMIUM_OFFER.replace("a=ice-pwd:", "a=x-pwd:"), 400, "malformed_sdp", "no-pwd"),
        refusal(CHROMIUM_OFFER.replace("a=fingerprint:", "a=x-fp:"), 400, "malformed_sdp", "no-fp"),
        refusal(CHROMIUM_OFFER.replace(":9D:", ";9D:"), 400, "malformed_sdp", "bad-fingerprint"),
        refusal(
            CHROMIUM_OFFER.replace("m=video 41234", "m=video nine"), 400, "malformed_sdp", "m-line"
        ),
        refusal(
            CHROMIUM_OFFER.replace("a=rtpmap:96 VP8/90000", "a=rtpmap:96 VP8"),
            400,
            "malformed_sdp",
            "bad-rtpmap",
        ),
        refusal(
            CHROMIUM_OFFER.replace("a=mid:1\r\n", "a=mid:1\r\nthis is not sdp\r\n"),
            400,
            "malformed_sdp",
            "stray-line",
        ),
        refusal(AUDIO_ONLY, 406, "no_video", "audio-only"),
        refusal(
            CHROMIUM_OFFER.replace("a=sendonly", "a=recvonly"), 406, "no_video", "video-recvonly"
        ),
        refusal(VP9_ONLY, 406, "unsupported_codec", "vp9-only"),
        refusal(H265_ONLY, 406, "unsupported_codec", "h265-only"),
        refusal(H264_HIGH_ONLY, 406, "unsupported_codec", "h264-high-only"),
        refusal(H264_MODE0_ONLY, 406, "unsupported_codec", "h264-mode0-only"),
        refusal(
            # red and telephone-event only: aiortc refuses the whole offer over such a section.
            CHROMIUM_OFFER.replace("SAVPF 111 63 9 0 8 13 110 126", "SAVPF 63 110 126"),
            406,
            "unsupported_codec",
            "audio-without-known-codec",
        ),
        refusal(
            CHROMIUM_OFFER.replace("m=audio", "m=text"), 406, "unsupported_media", "text-section"
        ),
    ],
)
def test_validate_offer_refuses(sdp: str, status: int, code: str) -> None:
    with pytest.raises(WhipError) as caught:
        validate_offer(sdp)
    assert (caught.value.status, caught.value.code) == (status, code)
    assert caught.value.message


def test_validate_offer_chromium_picks_its_first_decodable_codec() -> None:
    info = validate_offer(CHROMIUM_OFFER)
    assert info.kinds == ("audio", "video")
    assert info.video_index == 1
    assert (info.codec.name, info.codec.payload_type) == ("VP8", 96)
    assert info.ice_ufrag == "OnFN"
    assert info.candidates == 16
    assert validate_offer(VIDEO_THEN_AUDIO).video_index == 0
    # Without VP8, the first H.264 that aiortc decodes (baseline, packetization-mode 1).
    no_vp8 = CHROMIUM_OFFER.replace("SAVPF 96 97 102", "SAVPF 102")
    h264 = validate_offer(no_vp8).codec
    assert (h264.payload_type, h264.parameters["profile-level-id"]) == (102, "42001f")
    h264 = validate_offer(H264_CB_ONLY).codec
    assert (h264.name, h264.parameters["profile-level-id"]) == ("H264", "42e01f")


def test_validate_offer_accepts_a_real_aiortc_offer() -> None:
    async def offer(codec: str) -> str:
        pc, _ = await aiortc_publisher(codec)
        try:
            return pc.localDescription.sdp
        finally:
            await pc.close()

    for codec in ("VP8", "H264"):
        info = validate_offer(asyncio.run(offer(codec)))
        assert info.kinds == ("video",)
        assert info.codec.name == codec
        assert info.candidates >= 1


def test_answer_gets_bitrate_hints_on_media_codecs_only() -> None:
    answer = (
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n"
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97 104 105\r\na=rtpmap:96 VP8/90000\r\n"
        "a=rtcp-fb:96 nack\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n"
        "a=rtpmap:104 H264/90000\r\na=fmtp:104 packetization-mode=1;profile-level-id=42e01f\r\n"
        "a=rtpmap:105 rtx/90000\r\na=fmtp:105 apt=104\r\n"
    )
    lines = add_bitrate_hints(answer, 1000, 4000, 8000).split("\r\n")
    assert lines[lines.index("a=rtpmap:96 VP8/90000") + 1] == f"a=fmtp:96 {HINTS}"
    assert f"a=fmtp:104 packetization-mode=1;profile-level-id=42e01f;{HINTS}" in lines
    assert "a=fmtp:97 apt=96" in lines and "a=fmtp:105 apt=104" in lines
    assert not any("x-google" in line for line in lines if line.startswith("a=fmtp:111"))
    assert sum("x-google" in line for line in lines) == 2


def test_trickle_fragment_parsing() -> None:
    fragment = (
        "a=ice-ufrag:Jq1H\r\na=ice-pwd:pwd\r\nm=video 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
        "a=candidate:1 1 udp 2122260223 192.0.2.2 54400 typ host\r\na=end-of-candidates\r\n"
    )
    trickle = parse_trickle_fragment(fragment)
    assert (trickle.ice_ufrag, trickle.ice_pwd) == ("Jq1H", "pwd")
    assert trickle.candidates == (("0", "1 1 udp 2122260223 192.0.2.2 54400 typ host"),)
    assert trickle.end_of_candidates
    with pytest.raises(WhipError) as caught:
        parse_trickle_fragment("not a fragment")
    assert caught.value.status == 400


def test_settings_bounds() -> None:
    assert WhipSettings().token is None and not WhipSettings().allow_loopback
    for bad in (
        {"token": ""},
        {"min_bitrate_kbps": 5000, "start_bitrate_kbps": 4000},
        {"disconnect_grace": 0},
        {"max_offer_bytes": 10},
    ):
        with pytest.raises(ValueError):
            WhipSettings(**bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# 2. HTTP errors, then a good publish still works


def test_http_errors_then_a_good_publish(server: Server) -> None:
    opened = len(server.sessions.sinks)
    with httpx.Client(timeout=10) as http:

        def post(body: str | bytes, headers: dict[str, str]) -> httpx.Response:
            return http.post(server.whip, content=body, headers=headers)

        def assert_error(r: httpx.Response, status: int, code: str) -> None:
            assert r.status_code == status, r.text
            assert r.json()["error"]["code"] == code
            assert r.json()["error"]["message"]
            assert r.headers["access-control-allow-origin"] == "*"

        r = post(CHROMIUM_OFFER, {"Content-Type": "text/plain", **AUTH})
        assert_error(r, 415, "unsupported_media_type")
        r = post(CHROMIUM_OFFER, {"Content-Type": "application/sdp"})
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = post(CHROMIUM_OFFER, {**SDP, "Authorization": "Bearer wrong-token!"})
        assert_error(r, 401, "unauthorized")
        r = post(CHROMIUM_OFFER, {**SDP, "Authorization": f"Basic {TOKEN}"})
        assert_error(r, 401, "unauthorized")
        assert_error(post("hello", SDP), 400, "malformed_sdp")
        assert_error(post(b"v=0\r\n\xff\xfe", SDP), 400, "malformed_sdp")
        assert_error(post(AUDIO_ONLY, SDP), 406, "no_video")
        assert_error(post(VP9_ONLY, SDP), 406, "unsupported_codec")
        assert_error(post(H265_ONLY, SDP), 406, "unsupported_codec")
        oversize = CHROMIUM_OFFER + "a=x-pad:" + "x" * SETTINGS.max_offer_bytes + "\r\n"
        assert_error(post(oversize, SDP), 413, "payload_too_large")
        # Charset parameters are fine; the content type is what counts.
        r = post(VP9_ONLY, {**SDP, "Content-Type": "application/sdp; charset=utf-8"})
        assert_error(r, 406, "unsupported_codec")

        frag = {"Content-Type": "application/trickle-ice-sdpfrag", **AUTH}
        assert_error(
            http.patch(f"{server.whip}/nope", content="a=x\r\n", headers=frag), 404, "not_found"
        )
        assert_error(http.delete(f"{server.whip}/nope", headers=AUTH), 404, "not_found")
        assert_error(http.delete(f"{server.whip}/nope"), 401, "unauthorized")

        server.sessions.refuse = True
        try:
            assert_error(post(CHROMIUM_OFFER, SDP), 503, "unavailable")
        finally:
            server.sessions.refuse = False

        r = http.options(server.whip)
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "*"
        assert "POST" in r.headers["access-control-allow-methods"]
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "if-match"} <= allowed
        exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
        assert {"location", "etag", "link", "x-livelens-session"} <= exposed
        assert r.headers["accept-post"] == "application/sdp"
        r = http.options(f"{server.whip}/anything")
        assert r.status_code == 204
        assert {"PATCH", "DELETE"} <= {m.strip() for m in r.headers["allow"].split(",")}

    # No refused request opened a session (the 503 refusal happens in the opener itself).
    assert len(server.sessions.sinks) == opened
    assert server.ingest.session_ids() == []
    # Nothing was lost: a good publish works.
    frames = asyncio.run(publish_and_delete(server, "VP8", min_frames=10))
    assert len(frames) >= 10


# ---------------------------------------------------------------------------------------------
# 3. aiortc publishers, VP8 and H.264; trickle; RSA certificates


async def publish_and_delete(server: Server, codec: str, min_frames: int) -> list[Received]:
    pc, track = await aiortc_publisher(codec)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(server.whip, content=pc.localDescription.sdp, headers=SDP)
            assert r.status_code == 201, r.text
            assert r.headers["content-type"] == "application/sdp"
            session_id = r.headers["x-livelens-session"]
            assert r.headers["location"] == f"/whip/{session_id}"
            assert r.headers["etag"].startswith('"')
            answer = r.text
            # One video codec in the answer, the one forced, with the bitrate hints.
            rtpmaps = [line for line in answer.splitlines() if line.startswith("a=rtpmap:")]
            assert [line.split()[1] for line in rtpmaps] == [f"{codec}/90000", "rtx/90000"]
            pt = rtpmaps[0].split(":")[1].split()[0]
            fmtp = next(line for line in answer.splitlines() if line.startswith(f"a=fmtp:{pt} "))
            assert fmtp.endswith(HINTS)
            assert " 127.0.0.1 " in answer  # allow_loopback gathers the loopback candidate
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

            sink = server.sessions.sinks[session_id]
            assert sink.source.startswith("whip:127.0.0.1 python-httpx/")
            await async_wait_until(lambda: len(sink.frames()) >= min_frames, 20, "frames")
            info = server.ingest.info(session_id)
            assert info is not None and info.codec == codec and info.frames >= min_frames
            assert (info.width, info.height) == (320, 240)

            r = await http.delete(f"{server.url}{r.headers['location']}", headers=AUTH)
            assert r.status_code == 200
            assert sink.finishes == [(REASON_DELETE, False)]
            assert sink.codes == [EndCode.PUBLISHER_DELETED]
            assert server.ingest.info(session_id) is None
            # The server closed its peer connection: its DTLS close reaches us.
            await async_wait_until(lambda: pc.connectionState == "closed", 10, "client closed")
            r = await http.delete(f"{server.url}/whip/{session_id}", headers=AUTH)
            assert r.status_code == 404
    finally:
        await pc.close()
    frames = sink.frames()
    assert_counted_frames(frames, track.fps, 320, 240)
    return frames


@pytest.mark.parametrize("codec", ["VP8", "H264"])
def test_aiortc_publisher(server: Server, codec: str) -> None:
    frames = asyncio.run(publish_and_delete(server, codec, min_frames=20))
    assert len(frames) >= 20


def test_trickle_ice_by_patch(server: Server) -> None:
    async def scenario() -> list[Received]:
        pc, track = await aiortc_publisher("VP8")
        offer, candidates = strip_candidates(pc.localDescription.sdp)
        assert candidates
        ufrag = next(line for line in offer.splitlines() if line.startswith("a=ice-ufrag:"))
        pwd = next(line for line in offer.splitlines() if line.startswith("a=ice-pwd:"))
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                r = await http.post(server.whip, content=offer, headers=SDP)
                assert r.status_code == 201, r.text
                url, etag = f"{server.url}{r.headers['location']}", r.headers["etag"]
                sink = server.sessions.sinks[r.headers["x-livelens-session"]]
                # Without the server's candidates the publisher cannot start the checks itself
                # (it would, and the server would learn it as peer-reflexive): only the
                # trickled candidates can connect them.
                answer, _ = strip_candidates(r.text)
                await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
                frag = {"Content-Type": "application/trickle-ice-sdpfrag", **AUTH}
                body = (
                    "\r\n".join(
                        [
                            ufrag,
                            pwd,
                            "m=video 9 UDP/TLS/RTP/SAVPF 0",
                            "a=mid:0",
                            *candidates,
                            "a=end-of-candidates",
                        ]
                    )
                    + "\r\n"
                )

                r = await http.patch(url, content=body, headers={**frag, "If-Match": '"stale"'})
                assert r.status_code == 412
                r = await http.patch(
                    url,
                    content=body,
                    headers={**AUTH, "If-Match": etag, "Content-Type": "text/plain"},
                )
                assert r.status_code == 415
                restart = body.replace(ufrag, "a=ice-ufrag:NEWU")
                r = await http.patch(url, content=restart, headers={**frag, "If-Match": "*"})
                assert r.status_code == 422
                assert r.json()["error"]["code"] == "ice_restart_unsupported"
                await asyncio.sleep(1.0)
                assert sink.frames() == []  # no candidate yet: nothing can connect

                r = await http.patch(url, content=body, headers={**frag, "If-Match": etag})
                assert r.status_code == 204, r.text
                await async_wait_until(lambda: len(sink.frames()) >= 10, 20, "frames")
                r = await http.delete(url, headers=AUTH)
                assert r.status_code == 200
        finally:
            await pc.close()
        frames = sink.frames()
        assert_counted_frames(frames, track.fps, 320, 240)
        return frames

    assert len(asyncio.run(scenario())) >= 10


def test_rsa_certificate_publisher(server: Server) -> None:
    """A publisher whose DTLS certificate is RSA (like GStreamer) connects with allow_rsa."""

    async def scenario(whip: str, sessions: Sessions) -> RecordingSink:
        pc, _ = await aiortc_publisher("VP8", certificate=rsa_certificate())
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                r = await http.post(whip, content=pc.localDescription.sdp, headers=SDP)
                assert r.status_code == 201, r.text
                sink = sessions.sinks[r.headers["x-livelens-session"]]
                await pc.setRemoteDescription(RTCSessionDescription(r.text, "answer"))
                await async_wait_until(
                    lambda: len(sink.frames()) >= 5 or sink.finishes, 15, "frames or an end"
                )
                if not sink.finishes:
                    await http.delete(whip + "/" + sink.session_id, headers=AUTH)
                return sink
        finally:
            await pc.close()

    sink = asyncio.run(scenario(server.whip, server.sessions))
    assert len(sink.frames()) >= 5
    assert sink.finishes == [(REASON_DELETE, False)]

    # The same publisher against a server that offers aiortc's ECDSA-only suites fails DTLS.
    app, sessions, _ = make_app(WhipSettings(token=TOKEN, allow_rsa=False, connect_timeout=15))
    with serve(app) as url:
        sink = asyncio.run(scenario(f"{url}/whip", sessions))
    assert sink.frames() == []
    assert sink.finishes == [(REASON_FAILED, True)]
    assert sink.codes == [EndCode.PUBLISHER_GONE]


def test_loopback_candidate_only_when_allowed() -> None:
    app, sessions, _ = make_app(WhipSettings(token=TOKEN))

    async def offer() -> str:
        pc, _ = await aiortc_publisher("VP8")
        await pc.close()
        return pc.localDescription.sdp

    with TestClient(app) as client:
        r = client.post("/whip", content=asyncio.run(offer()), headers=SDP)
        assert r.status_code == 201, r.text
        candidates = [line for line in r.text.splitlines() if line.startswith("a=candidate:")]
        assert candidates
        assert not any(" 127.0.0.1 " in line for line in candidates)
        assert client.delete(r.headers["location"], headers=AUTH).status_code == 200
    assert [s.finishes for s in sessions.sinks.values()] == [[(REASON_DELETE, False)]]


def test_answer_to_chromium_offer_receives_video_only() -> None:
    """Audio first, video second: the answer keeps the order, audio inactive, one video codec."""
    app, sessions, ingest = make_app(WhipSettings(token=TOKEN))
    with TestClient(app) as client:
        r = client.post("/whip", content=CHROMIUM_OFFER, headers=SDP)
        assert r.status_code == 201, r.text
        audio, video = r.text.split("\r\nm=")[1:]
        assert audio.startswith("audio ") and "\r\na=inactive\r\n" in audio
        assert video.startswith("video ") and "\r\na=recvonly\r\n" in video
        assert "\r\na=mid:1\r\n" in video
        rtpmaps = [line for line in video.split("\r\n") if line.startswith("a=rtpmap:")]
        assert rtpmaps == ["a=rtpmap:96 VP8/90000", "a=rtpmap:97 rtx/90000"]
        assert f"a=fmtp:96 {HINTS}" in video
        assert "link" not in r.headers  # no ICE servers configured
        info = ingest.info(r.headers["x-livelens-session"])
        assert info is not None and info.codec == "VP8" and info.frames == 0
        assert client.delete(r.headers["location"], headers=AUTH).status_code == 200
    assert [s.finishes for s in sessions.sinks.values()] == [[(REASON_DELETE, False)]]


def test_link_headers_name_the_ice_servers() -> None:
    servers = ("stun:stun.example.org:3478", "stun:[2001:db8::1]:3478")
    app, _, _ = make_app(WhipSettings(token=TOKEN, ice_servers=servers))
    with TestClient(app) as client:
        r = client.options("/whip")
    assert r.status_code == 204
    assert r.headers["link"] == ", ".join(f'<{url}>; rel="ice-server"' for url in servers)


# ---------------------------------------------------------------------------------------------
# 4. A publisher that leaves without DELETE


def test_publisher_closes_without_delete(server: Server) -> None:
    async def scenario() -> tuple[RecordingSink, float]:
        pc, _ = await aiortc_publisher("VP8")
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(server.whip, content=pc.localDescription.sdp, headers=SDP)
        assert r.status_code == 201, r.text
        sink = server.sessions.sinks[r.headers["x-livelens-session"]]
        await pc.setRemoteDescription(RTCSessionDescription(r.text, "answer"))
        await async_wait_until(lambda: len(sink.frames()) >= 5, 20, "frames")
        start = time.monotonic()
        await pc.close()  # sends a DTLS close_notify, nothing over HTTP
        await async_wait_until(sink.finished.is_set, 10, "finish")
        return sink, time.monotonic() - start

    sink, elapsed = asyncio.run(scenario())
    assert elapsed < GRACE  # the DTLS close ends it at once, not the grace
    assert len(sink.finishes) == 1
    reason, failed = sink.finishes[0]
    assert reason in (REASON_CLOSED, REASON_TRACK_ENDED) and not failed


def test_publisher_vanishes_from_the_network(server: Server) -> None:
    async def scenario() -> tuple[RecordingSink, float]:
        pc, _ = await aiortc_publisher("VP8")
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(server.whip, content=pc.localDescription.sdp, headers=SDP)
        assert r.status_code == 201, r.text
        sink = server.sessions.sinks[r.headers["x-livelens-session"]]
        await pc.setRemoteDescription(RTCSessionDescription(r.text, "answer"))
        await async_wait_until(lambda: len(sink.frames()) >= 5, 20, "frames")
        # Cut the network under the publisher: close its UDP sockets, so nothing more is sent
        # (no DTLS close, no RTCP), as when a laptop drops off Wi-Fi.
        start = time.monotonic()
        for transceiver in pc.getTransceivers():
            connection = transceiver.sender.transport.transport.iceGatherer._connection
            for protocol in connection._protocols:
                protocol.transport.close()
        await async_wait_until(sink.finished.is_set, GRACE + 10, "finish")
        elapsed = time.monotonic() - start
        await pc.close()
        return sink, elapsed

    sink, elapsed = asyncio.run(scenario())
    # The silence the watchdog counts starts at its last read that saw packets, which may
    # precede the cut by up to one read interval.
    assert GRACE - watchdog_interval(GRACE) <= elapsed < GRACE + 3
    assert sink.finishes == [(f"publisher disconnected (no packets for {GRACE:g} s)", False)]


# ---------------------------------------------------------------------------------------------
# 5. FFmpeg's whip muxer (PyAV), H.264


# PyAV holds the GIL while FFmpeg's whip muxer does its HTTP and handshakes, which would stall
# the in-process server it talks to: the muxer runs in a child Python, under a time limit.
def test_ffmpeg_whip_muxer(server: Server, tmp_path: Path) -> None:
    fps, count, width, height = 15, 45, 320, 240
    before = set(server.sessions.sinks)
    frames = {"fps": fps, "count": count, "width": width, "height": height}
    # A failed handshake can leave the muxer hanging: never wait without a limit.
    done = subprocess.run(
        ffmpeg_publisher.command(server.whip, TOKEN, tmp_path, **frames),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (session_id,) = set(server.sessions.sinks) - before
    sink = server.sessions.sinks[session_id]
    assert sink.source.startswith("whip:127.0.0.1 Lavf/")
    frames = sink.frames()
    assert len(frames) >= count - 10
    assert_counted_frames(frames, fps, width, height)
    wait_until(sink.finished.is_set, 10, "finish")
    assert sink.finishes == [(REASON_DELETE, False)]  # the muxer DELETEs on close


# Publishers must stay connected for hours. FFmpeg's muxer never answers ICE consent checks
# once it streams, and aioice gave up after 6 unanswered checks: every FFmpeg publication was
# cut at ~35 s. This publishes FFmpeg, aiortc and Chromium at once, well past that point.
LONG_PUBLISH_S = 92


def test_publishers_stay_connected_past_consent_expiry(server: Server, tmp_path: Path) -> None:
    fps, width, height = 10, 320, 240
    before = set(server.sessions.sinks)
    ffmpeg = ffmpeg_publisher.start(
        server.whip,
        TOKEN,
        tmp_path,
        fps=fps,
        count=fps * LONG_PUBLISH_S,
        width=width,
        height=height,
    )
    aiortc_result: dict[str, object] = {}

    async def publish_aiortc() -> None:
        pc, _ = await aiortc_publisher("VP8")
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                r = await http.post(server.whip, content=pc.localDescription.sdp, headers=SDP)
                assert r.status_code == 201, r.text
                aiortc_result["session"] = r.headers["x-livelens-session"]
                await pc.setRemoteDescription(RTCSessionDescription(r.text, "answer"))
                await asyncio.sleep(LONG_PUBLISH_S)
                aiortc_result["state"] = pc.connectionState
                r = await http.delete(f"{server.url}{r.headers['location']}", headers=AUTH)
                aiortc_result["delete"] = r.status_code
        finally:
            await pc.close()

    aiortc_thread = threading.Thread(
        target=lambda: aiortc_result.setdefault("error", _run_capturing(publish_aiortc))
    )
    aiortc_thread.start()
    sessions = {}
    try:
        if chromium_available():
            y4m = write_y4m(tmp_path / "camera.y4m", frames=30, width=width, height=height, fps=fps)
            query = f"whip={server.whip}&token={TOKEN}&width={width}&height={height}"
            with chromium(
                f"{server.url}/assets/whip_publisher.html?{query}", tmp_path, y4m=y4m
            ) as page:
                page.wait_for("whip.status !== 'starting'", timeout=20)
                assert page.evaluate("whip.status") == "published", page.evaluate("whip.error")
                sessions["chromium"] = page.evaluate("whip.session")
                time.sleep(LONG_PUBLISH_S)
                assert page.evaluate("whip.connection") == "connected"
                assert page.evaluate("whip.stop()") == 200
        _, stderr = ffmpeg.communicate(timeout=LONG_PUBLISH_S + 60)
        assert ffmpeg.returncode == 0, stderr[-3000:]
    finally:
        if ffmpeg.poll() is None:
            ffmpeg.kill()
            ffmpeg.communicate()
        aiortc_thread.join(timeout=LONG_PUBLISH_S + 60)
    assert aiortc_result.get("error") is None, aiortc_result["error"]
    assert aiortc_result["state"] == "connected" and aiortc_result["delete"] == 200
    sessions["aiortc"] = aiortc_result["session"]
    sessions["ffmpeg"] = next(
        s for s in set(server.sessions.sinks) - before if "Lavf/" in server.sessions.sinks[s].source
    )
    for name, session_id in sessions.items():
        sink = server.sessions.sinks[session_id]
        wait_until(sink.finished.is_set, 10, f"{name} to finish")
        # Each ended by its own DELETE, not by the server, after the whole span of video.
        assert sink.finishes == [(REASON_DELETE, False)], (name, sink.finishes)
        times = [f.time for f in sink.frames()]
        assert times[-1] - times[0] >= LONG_PUBLISH_S - 5, (name, times[-1])
        assert max(b - a for a, b in itertools.pairwise(times)) < 2.0, name


def _run_capturing(coroutine: Callable[[], Awaitable[None]]) -> BaseException | None:
    try:
        asyncio.run(coroutine())
    except BaseException as exc:  # reported by the test's thread
        return exc
    return None


# ---------------------------------------------------------------------------------------------
# 6. Headless Chromium with a fake camera


OUTBOUND_TARGET_BITRATE = """(async () => {
  let target = null;
  (await whip.pc.getStats()).forEach(s => {
    if (s.type === "outbound-rtp") target = s.targetBitrate;
  });
  return target;
})()"""


@pytest.mark.skipif(not chromium_available(), reason="needs Chromium at /usr/bin/chromium")
def test_chromium_publisher(server: Server, tmp_path: Path) -> None:
    width, height, loop = 640, 480, 60
    y4m = write_y4m(tmp_path / "camera.y4m", frames=loop, width=width, height=height, fps=30)
    query = f"whip={server.whip}&token={TOKEN}&width={width}&height={height}"
    page_url = f"{server.url}/assets/whip_publisher.html?{query}"
    with chromium(page_url, tmp_path, y4m=y4m) as page:
        page.wait_for("whip.status !== 'starting'", timeout=20)
        assert page.evaluate("whip.status") == "published", page.evaluate("whip.error")
        session_id = page.evaluate("whip.session")
        assert page.evaluate("whip.location") == f"{server.whip}/{session_id}"
        sink = server.sessions.sinks[session_id]
        assert "Chrome/" in sink.source
        wait_until(lambda: len(sink.frames()) >= 60, 30, "60 frames from Chromium")
        assert page.evaluate("whip.connection") == "connected"
        # Chromium took the answer's x-google bitrates: without them its target starts near
        # 300 kbps (measured here), with them at the 4 Mbps start, never below the 1 Mbps min.
        target = page.evaluate(OUTBOUND_TARGET_BITRATE)
        assert target >= SETTINGS.min_bitrate_kbps * 1000 * 0.95
        assert page.evaluate("whip.stop()") == 200
    assert sink.finishes == [(REASON_DELETE, False)]

    frames = sink.frames()
    assert frames[0].time == 0.0
    assert all(b.time > a.time for a, b in itertools.pairwise(frames))
    # The published resolution throughout, not a downscale.
    assert all((f.width, f.height) == (width, height) for f in frames)
    # The fake camera loops the file; the drawn counter advances modulo its length.
    steps = [(b.index - a.index) % loop for a, b in itertools.pairwise(frames)]
    assert all(0 <= f.index < loop for f in frames)
    assert sum(1 <= s <= 3 for s in steps) >= 0.9 * len(steps), steps
    # Capture timestamps match the counter: 30 fps.
    duration = frames[-1].time - frames[0].time
    assert sum(s for s in steps if s <= 3) / duration == pytest.approx(30, rel=0.15)


def test_close_all_finishes_every_publication() -> None:
    app, sessions, ingest = make_app(WhipSettings(token=TOKEN))

    async def offer() -> str:
        pc, _ = await aiortc_publisher("VP8")
        await pc.close()
        return pc.localDescription.sdp

    with TestClient(app) as client:
        for _ in range(2):
            assert (
                client.post("/whip", content=asyncio.run(offer()), headers=SDP).status_code == 201
            )
        assert len(ingest.session_ids()) == 2
    # Leaving the client ran the app's shutdown hook, WhipIngest.close_all().
    assert [s.finishes for s in sessions.sinks.values()] == [[("server shutting down", False)]] * 2
    assert ingest.session_ids() == []


# ---------------------------------------------------------------------------------------------
# 6. Hostile offers and trickle fragments (found by fuzzing): 400/422 with a JSON body, and no
# peer connection left open


class CountingIngest(WhipIngest):
    """The real ingest, keeping every peer connection it makes so a test can see it closed."""

    def __init__(self, settings: WhipSettings) -> None:
        super().__init__(settings)
        self.created: list[RTCPeerConnection] = []

    def _new_peer_connection(self) -> RTCPeerConnection:
        pc = super()._new_peer_connection()
        self.created.append(pc)
        return pc


def ice_transports_closed(pc: RTCPeerConnection) -> bool:
    """Every ICE transport of the peer connection stopped (its UDP sockets closed)."""
    dtls = [t.receiver.transport for t in pc.getTransceivers() if t.receiver.transport]
    return all(t.transport.state == "closed" for t in dtls)


def aiortc_offer() -> str:
    async def offer() -> str:
        pc, _ = await aiortc_publisher("VP8")
        await pc.close()
        return pc.localDescription.sdp

    return asyncio.run(offer())


def two_videos(offer: str, first_mid: str, second_mid: str, bundle: str) -> str:
    """An aiortc offer with its video m-section twice, mids and BUNDLE group as given."""
    session, video = offer.split("m=video", 1)
    session = session.replace("a=group:BUNDLE 0", f"a=group:BUNDLE {bundle}")
    first = ("m=video" + video).replace("a=mid:0", f"a=mid:{first_mid}")
    return session + first + ("m=video" + video).replace("a=mid:0", f"a=mid:{second_mid}")


HOSTILE_OFFERS = [
    # (what, how to make it from a real aiortc offer, status, code)
    ("BUNDLE names a missing first mid", lambda o: two_videos(o, "0", "1", "7 1"), 400),
    ("BUNDLE names a missing mid", lambda o: o.replace("BUNDLE 0", "BUNDLE 0 7"), 400),
    ("duplicate mids", lambda o: two_videos(o, "0", "0", "0 0"), 400),
    ("duplicate mids, no BUNDLE", lambda o: two_videos(o, "0", "0", "0 0 x"), 400),
    ("no a=setup", lambda o: o.replace("a=setup:actpass\r\n", ""), 400),
    ("two directions", lambda o: o.replace("a=sendonly", "a=sendonly\r\na=recvonly"), 400),
    ("o= in a media section", lambda o: o.replace("a=sendonly", "o=- 1 1 IN IP4 0.0.0.0"), 400),
    ("s= twice", lambda o: o.replace("s=-\r\n", "s=-\r\ns=-\r\n"), 400),
    (
        "candidate port 99999",
        lambda o: re.sub(
            r"a=candidate:[^\r\n]*", "a=candidate:1 1 udp 1 192.0.2.9 99999 typ host", o, count=1
        ),
        400,
    ),
]


def test_hostile_offers_are_refused_and_leak_nothing(caplog: pytest.LogCaptureFixture) -> None:
    ingest = CountingIngest(WhipSettings(token=TOKEN))
    sessions = Sessions()
    app = FastAPI()
    app.include_router(whip_router(ingest, sessions, ingest.settings))
    offer = aiortc_offer()
    with TestClient(app, raise_server_exceptions=False) as client:
        for what, mutate, status in HOSTILE_OFFERS:
            r = client.post("/whip", content=mutate(offer), headers=SDP)
            assert r.status_code == status, (what, r.text)
            assert r.json()["error"]["code"] == "malformed_sdp", what
            assert r.json()["error"]["message"], what
        assert ingest.session_ids() == []
        assert all(pc.connectionState == "closed" for pc in ingest.created)
        assert all(ice_transports_closed(pc) for pc in ingest.created)
        # The endpoint still publishes.
        r = client.post("/whip", content=offer, headers=SDP)
        assert r.status_code == 201, r.text
        assert client.delete(r.headers["location"], headers=AUTH).status_code == 200
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


@pytest.mark.parametrize(
    ("candidate", "status", "code"),
    [
        ("a=candidate:1 1 udp", 400, "malformed_sdp"),  # AssertionError inside aiortc: 500
        ("a=candidate:1 1 udp 1 192.0.2.9 99999 typ host", 400, "malformed_sdp"),
        ("a=candidate:1 1 udp 1 not-an-address 5000 typ host", 400, "malformed_sdp"),
        ("a=candidate:1 1 udp 1 192.0.2.9 5000 typ bogus", 400, "malformed_sdp"),
        ("a=candidate:1 1 udp 1 192.0.2.9 5000 typ host raddr x rport 1", 400, "malformed_sdp"),
    ],
)
def test_hostile_trickle_candidates(
    candidate: str, status: int, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    ingest = CountingIngest(WhipSettings(token=TOKEN))
    app = FastAPI()
    app.include_router(whip_router(ingest, Sessions(), ingest.settings))
    offer, _ = strip_candidates(aiortc_offer())
    frag = {"Content-Type": "application/trickle-ice-sdpfrag", **AUTH}
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/whip", content=offer, headers=SDP)
        assert r.status_code == 201, r.text
        url = r.headers["location"]
        r = client.patch(url, content=f"a=mid:0\r\n{candidate}\r\n", headers=frag)
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code
        good = "a=mid:0\r\na=candidate:1 1 udp 1 192.0.2.9 5000 typ host\r\n"
        assert client.patch(url, content=good, headers=frag).status_code == 204
        assert client.delete(url, headers=AUTH).status_code == 200
    assert all(pc.connectionState == "closed" for pc in ingest.created)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_half_built_peer_connection_is_closed() -> None:
    """aiortc's close() raises on a peer connection whose negotiation failed midway (a BUNDLE
    group naming a missing mid, before offers were checked for it), leaving sockets open;
    close_peer_connection stops every transport that exists and never raises."""
    bad = CHROMIUM_OFFER.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 5 1")

    async def scenario() -> RTCPeerConnection:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="inactive")  # as WhipIngest._negotiate does
        pc.addTransceiver("video", direction="recvonly")
        await pc.setRemoteDescription(RTCSessionDescription(bad, "offer"))
        with pytest.raises(AttributeError):
            await pc.createAnswer()
        await close_peer_connection(pc)
        return pc

    pc = asyncio.run(scenario())
    transports = [t.receiver.transport for t in pc.getTransceivers() if t.receiver.transport]
    assert transports  # the half: one transceiver got its transport, one did not
    assert ice_transports_closed(pc)
