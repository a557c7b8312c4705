"""WHIP publications as aiortc peer connections: accept an offer, drain the decoded video track
into a FrameSink, watch liveness, close; `WhipIngest` owns them all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.codecs import is_rtx
from aiortc.rtcdtlstransport import RTCCertificate
from aiortc.rtcrtpparameters import RTCRtpCodecCapability, RTCRtpCodecParameters
from OpenSSL import SSL

from livelens.stream.frames import DecodedFrame
from livelens.stream.lifecycle import EndCode
from livelens.stream.sdp_checks import (
    parse_candidate,
)
from livelens.stream.sources.webrtc import WebRTCSource
from livelens.stream.whip.sdp import (
    OfferInfo,
    WhipError,
    add_bitrate_hints,
    aiortc_codec,
    describe_error,
    malformed,
    parse_trickle_fragment,
    validate_offer,
)

logger = logging.getLogger(__name__)

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


class FrameSink(Protocol):
    """Where a publication's frames go: one live session of the session manager."""

    session_id: str

    def push(self, frame: DecodedFrame) -> None:
        """Take one decoded frame; thread-safe, cheap, never blocks. Called for every frame."""
        ...

    def finish(self, reason: str, failed: bool = False, code: EndCode | None = None) -> None:
        """The publisher is gone or the session ended; idempotent."""
        ...


@dataclass(frozen=True)
class Publication:
    """A WHIP publisher as the service owns it (`Source`): closing it ends the publication."""

    ingest: WhipIngest
    session_id: str
    name: str
    is_network: bool = True

    async def close(self, reason: str) -> None:
        await self.ingest.end(self.session_id, reason)  # a no-op once the publisher has gone


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


def watchdog_interval(disconnect_grace: float) -> float:
    """How often a publication's packet counter is read: the silence it counts starts at the
    last read that saw it move, up to one interval before the packets stopped."""
    return min(0.5, disconnect_grace / 4)


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
        local_codec = aiortc_codec("video", offer.codec)
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
            reason = f"WebRTC negotiation failed: {describe_error(exc)}"
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
                raise malformed(f"unparsable candidate {value[:80]!r}: {exc}") from None
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
            logger.warning(
                "WHIP session %s: candidate refused: %s", session_id, describe_error(exc)
            )
            raise WhipError(
                422, "candidate_refused", f"candidate refused: {describe_error(exc)}"
            ) from None

    async def delete(self, session_id: str) -> None:
        """The publisher ended the publication (HTTP DELETE)."""
        await self._end(
            self._peer(session_id), REASON_DELETE, failed=False, code=EndCode.PUBLISHER_DELETED
        )

    def publication(self, session_id: str, name: str) -> Publication:
        """The publication of a session as a `Source` (stream/frames.py) its service closes."""
        return Publication(self, session_id, name)

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
                logger.warning(
                    "closing a WHIP publication failed: %s", describe_error(task.exception())
                )

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
        interval = watchdog_interval(s.disconnect_grace)
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
        logger.warning(
            "closing a peer connection failed (%s); stopping its parts", describe_error(exc)
        )
    dtls_transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        dtls_transports.append(pc.sctp.transport)
    for dtls in {id(t): t for t in dtls_transports if t is not None}.values():
        for part in (dtls, dtls.transport):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(part.stop(), CLOSE_TIMEOUT_S)
    pc.remove_all_listeners()


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
