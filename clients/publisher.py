"""`Publisher`: send a video file, a V4L2 camera or an RTSP stream to LiveLens over WHIP (aiortc).

The source is decoded with PyAV in a thread (video only), re-stamped on one monotonic clock, and
encoded by aiortc. A supervisor polls the session's record and watches the peer connection; when
the server restarts or drops the publication, it publishes again with bounded backoff, as a new
session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import httpx
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.exceptions import InvalidAccessError, InvalidStateError, OperationError
from aiortc.mediastreams import MediaStreamError

from livelens.clients.client import (
    ENDED_STATES,
    ConnectionFailed,
    LiveLensError,
    ServerError,
    describe_connection_error,
    one_key,
    send,
    server_url,
    session_path,
    websocket_url,
)
from livelens.stream.lifecycle import DELIBERATE_ENDS

logger = logging.getLogger(__name__)

USER_AGENT = "livelens-publisher/0.1"
"""Sent with the offer; the server shows it in the session's `source`."""
_TIME_BASE = Fraction(1, 90000)
"""RTP's video clock; frames are re-stamped on it so looping never goes back in time."""
_FATAL_STATUSES = frozenset({400, 401, 403, 406, 413, 415, 422})
"""WHIP refusals that publishing again cannot fix (bad token, unusable offer or media)."""
# A session someone ended on purpose (its record's end_code is in DELIBERATE_ENDS: a WHIP DELETE,
# or `DELETE /v1/sessions/{id}`) is not published again; every other end (server shutting down,
# ICE/DTLS failure) is.


class SourceUnavailable(LiveLensError):
    """The video source cannot be opened or has no video stream."""


def open_source(
    source: str, *, video_size: str | None = None, framerate: float | None = None
) -> tuple[Callable[[], Any], bool]:
    """How to open `source` with PyAV, and whether it is live (else it is paced at its rate).

    rtsp:// and rtsps:// are pulled over TCP; /dev/video* is a V4L2 camera; anything else is a
    file (or a URL FFmpeg reads) played at its native frame rate.
    """
    options: dict[str, str] = {}
    fmt: str | None = None
    timeout: tuple[float, float] | None = None
    if source.startswith(("rtsp://", "rtsps://")):
        options["rtsp_transport"] = "tcp"
        timeout, live = (10.0, 10.0), True
    elif source.startswith("/dev/video"):
        fmt, live = "v4l2", True
        if video_size:
            options["video_size"] = video_size
        if framerate:
            options["framerate"] = f"{framerate:g}"
    else:
        live = False
        if "://" not in source and not Path(source).is_file():
            raise SourceUnavailable(f"{source}: no such file")

    def opener() -> Any:
        try:
            container = av.open(source, format=fmt, options=options, timeout=timeout)
        except (av.FFmpegError, OSError) as exc:
            raise SourceUnavailable(f"{source}: {exc}") from None
        if not container.streams.video:
            container.close()
            raise SourceUnavailable(f"{source}: no video stream")
        return container

    return opener, live


class SourceTrack(MediaStreamTrack):
    """A video track decoding a PyAV container in a thread; frames on one monotonic clock.

    Files are paced at their frame rate (and optionally start over at the end, the clock
    running on); live sources are passed on as they arrive, dropping the oldest when the
    encoder falls behind.
    """

    kind = "video"

    def __init__(
        self,
        opener: Callable[[], Any],
        container: Any,
        *,
        live: bool,
        loop: bool = False,
        max_queue: int = 30,
    ) -> None:
        super().__init__()
        self._open = opener
        self._container = container
        self._live = live
        self._loop_playback = loop and not live
        self._max_queue = max_queue
        self._queue: asyncio.Queue[av.VideoFrame | None] = asyncio.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames = 0
        """Frames handed to the encoder."""
        self.dropped = 0
        self.exhausted = False
        """True once a non-looping file has been played to its end (or decoding failed)."""

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._decode,
                args=(asyncio.get_running_loop(),),
                name="livelens-publisher-decode",
                daemon=True,
            )
            self._thread.start()
        frame = await self._queue.get()
        if frame is None:
            self.exhausted = True
            self.stop()
            raise MediaStreamError
        self.frames += 1
        return frame

    def stop(self) -> None:
        self._stop.set()
        super().stop()

    def join(self) -> None:
        """Wait for the decoding thread (after stop()); closes the container. Blocking."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        elif self._container is not None:
            self._container.close()
            self._container = None

    def _deliver(self, frame: av.VideoFrame | None) -> None:
        if frame is not None and self._queue.qsize() >= self._max_queue:
            self._queue.get_nowait()  # the encoder fell behind: the oldest frame goes
            self.dropped += 1
        self._queue.put_nowait(frame)

    def _decode(self, loop: asyncio.AbstractEventLoop) -> None:
        container = self._container
        offset = 0.0  # where the current pass starts on the output clock
        last = -math.inf
        clock: float | None = None  # monotonic time of output time 0 (files)
        try:
            while not self._stop.is_set():
                stream = container.streams.video[0]
                rate = float(stream.average_rate) if stream.average_rate else 30.0
                first: float | None = None
                end = offset
                started = time.monotonic()
                for frame in container.decode(stream):
                    t = frame.time if frame.time is not None else time.monotonic() - started
                    if first is None:
                        first = t
                    out = max(offset + t - first, last + 1 / 90000)
                    if not self._live:
                        if clock is None:
                            clock = time.monotonic() - out
                        delay = clock + out - time.monotonic()
                        if delay > 0 and self._stop.wait(delay):
                            return
                    if self._stop.is_set():
                        return
                    frame.pts, frame.time_base = round(out * 90000), _TIME_BASE
                    last, end = out, out + 1 / rate
                    loop.call_soon_threadsafe(self._deliver, frame)
                if not self._loop_playback or first is None:
                    break
                offset = end
                container.close()
                container = self._container = self._open()
        except (av.FFmpegError, OSError, LiveLensError) as exc:
            logger.warning("video source failed: %s", exc)
        finally:
            container.close()
            self._container = None
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(self._deliver, None)


class Publisher:
    """Publishes one video source to a LiveLens server over WHIP, and keeps it published.

    `async with Publisher(url, "clip.mp4", loop=True) as pub: ...` or start()/close().
    `key` (or its older name `token`) needs the publish scope.
    """

    def __init__(
        self,
        server: str,
        source: str,
        *,
        token: str | None = None,
        key: str | None = None,
        loop: bool = False,
        video_size: str | None = None,
        framerate: float | None = None,
        reconnect: bool = True,
        poll_interval: float = 1.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        give_up_after: float | None = None,
        ice_servers: Sequence[str] = (),
        on_session: Callable[[str], object] | None = None,
        timeout: float = 10.0,
        window: float | None = None,
    ) -> None:
        self.server = server_url(server)
        self.window = window
        """Media seconds of video the server's model holds for this publication (the WHIP
        URL's `?window=`); None: the server's --window."""
        self.source = source
        self.token = one_key(token, key)
        self.loop = loop
        self.video_size = video_size
        self.framerate = framerate
        self.reconnect = reconnect
        self.poll_interval = poll_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.give_up_after = give_up_after
        self.ice_servers = tuple(ice_servers)
        self.on_session = on_session
        """Called with the new session id after each (re)publication."""
        self.timeout = timeout
        self.session_id: str | None = None
        self.resource_url: str | None = None
        """The WHIP resource (the POST's Location), which DELETE ends."""
        self.reconnects = 0
        self._frames_before = 0
        self._pc: RTCPeerConnection | None = None
        self._track: SourceTrack | None = None
        self._http: httpx.AsyncClient | None = None
        self._trouble = asyncio.Event()
        self._changed = asyncio.Event()
        self._done = asyncio.Event()
        self._error: BaseException | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False

    # --------------------------------------------------------------------------------- public
    @property
    def session_url(self) -> str | None:
        """The session's REST URL."""
        return None if self.session_id is None else self.server + session_path(self.session_id)

    @property
    def websocket_url(self) -> str | None:
        """The session's question websocket."""
        return None if self.session_id is None else websocket_url(self.server, self.session_id)

    @property
    def frames_sent(self) -> int:
        """Frames handed to the encoder, over all publications."""
        return self._frames_before + (self._track.frames if self._track else 0)

    @property
    def done(self) -> bool:
        """True once publishing has stopped: the file ended, close(), or an unfixable error."""
        return self._done.is_set()

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> str:
        """Publish; returns the session id. Errors (server, network, source) are raised as is."""
        if self._http is not None:
            raise RuntimeError("the publisher is already started")
        headers = {"User-Agent": USER_AGENT}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._http = httpx.AsyncClient(headers=headers, timeout=self.timeout)
        try:
            await self._publish()
        except BaseException:
            await self._http.aclose()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="livelens-publisher")
        return self.session_id  # type: ignore[return-value]

    async def wait(self) -> None:
        """Until publishing stops; raises what stopped it, if it was an error."""
        await self._done.wait()
        if self._error is not None:
            raise self._error

    async def next_session(self, after: str | None) -> str:
        """Wait until the session id differs from `after` (a republication); returns it."""
        while self.session_id == after or self.session_id is None:
            if self._done.is_set():
                raise self._error or ConnectionFailed("the publisher has stopped")
            await self._changed.wait()
        return self.session_id

    async def close(self) -> None:
        """Stop publishing: DELETE the WHIP resource, close the connection and the source."""
        if self._closing:
            return
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._teardown()
        if self._http is not None:
            await self._http.aclose()
        self._finish()

    # ------------------------------------------------------------------------------- internal
    async def _publish(self) -> None:
        opener, live = open_source(
            self.source, video_size=self.video_size, framerate=self.framerate
        )
        container = await asyncio.to_thread(opener)
        track = SourceTrack(opener, container, live=live, loop=self.loop)
        servers = [RTCIceServer(urls=url) for url in self.ice_servers]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))  # [] = no STUN lookups
        try:
            pc.addTransceiver(track, direction="sendonly")
            # aiortc gathers every candidate before setLocalDescription returns: no trickle.
            await pc.setLocalDescription(await pc.createOffer())
            response = await self._post_offer(pc.localDescription.sdp)
            location = response.headers.get("Location")
            if not location:
                raise ServerError(response.status_code, "bad_response", "no Location header")
            resource = str(httpx.URL(self.server + "/").join(location))
            session_id = response.headers.get("X-LiveLens-Session") or location.rsplit("/", 1)[-1]
            try:
                await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
            except (ValueError, InvalidAccessError, InvalidStateError, OperationError) as exc:
                await self._delete(resource)
                raise ServerError(
                    response.status_code, "bad_answer", f"unusable SDP answer: {exc}"
                ) from None
        except BaseException:
            await pc.close()
            track.stop()
            await asyncio.to_thread(track.join)
            raise

        @pc.on("connectionstatechange")
        def _on_state() -> None:
            if pc is self._pc and pc.connectionState in ("failed", "closed"):
                self._trouble.set()

        @track.on("ended")
        def _on_ended() -> None:
            if track is self._track:
                self._trouble.set()

        self._pc, self._track = pc, track
        self.session_id, self.resource_url = session_id, resource
        self._trouble.clear()
        logger.info("published %s as session %s", self.source, session_id)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self.on_session is not None:
            self.on_session(session_id)

    async def _post_offer(self, sdp: str) -> httpx.Response:
        assert self._http is not None
        return await send(
            self._http,
            self.server,
            self.timeout,
            "POST",
            f"{self.server}/whip" + (f"?window={self.window:g}" if self.window else ""),
            content=sdp,
            headers={"Content-Type": "application/sdp"},
        )

    async def _delete(self, resource: str) -> None:
        """Best effort: the server may be gone already."""
        assert self._http is not None
        try:
            response = await self._http.delete(resource, timeout=min(self.timeout, 5.0))
        except httpx.HTTPError as exc:
            logger.info("DELETE %s failed: %s", resource, describe_connection_error(exc))
            return
        logger.info("DELETE %s: %s", resource, response.status_code)

    async def _teardown(self) -> None:
        pc, track, resource = self._pc, self._track, self.resource_url
        self._pc, self._track = None, None
        if track is not None:
            self._frames_before += track.frames
        if resource is not None and self._http is not None:
            await self._delete(resource)
        if pc is not None:
            await pc.close()
        if track is not None:
            track.stop()
            await asyncio.to_thread(track.join)

    def _finish(self) -> None:
        self._done.set()
        self._changed.set()  # wake next_session() waiters

    async def _supervise(self) -> None:
        try:
            while True:
                problem = await self._watch()
                if problem is None:
                    return
                if not self.reconnect:
                    raise ConnectionFailed(f"session {self.session_id}: {problem}")
                logger.warning("session %s: %s; publishing again", self.session_id, problem)
                await self._republish()
        except asyncio.CancelledError:
            raise
        except LiveLensError as exc:
            self._error = exc
        except Exception as exc:
            logger.exception("publisher supervisor failed")
            self._error = exc
        finally:
            self._finish()

    async def _watch(self) -> str | None:
        """What went wrong, once something does; None when publishing is simply over."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._trouble.wait(), self.poll_interval)
            track, pc = self._track, self._pc
            assert track is not None and pc is not None
            if track.exhausted:
                logger.info("%s: end of the video", self.source)
                return None
            trouble = self._trouble.is_set()
            self._trouble.clear()
            # The record says why a connection closed: a restart, or a deliberate end.
            problem = await self._check_session()
            if problem == "":
                return None
            if problem is not None:
                return problem
            if trouble:
                return f"the WebRTC connection is {pc.connectionState}"

    async def _check_session(self) -> str | None:
        """A reason to publish again ("" = stop publishing), or None while all is well."""
        assert self._http is not None and self.session_id is not None
        url = self.server + session_path(self.session_id)
        try:
            response = await self._http.get(url)
        except httpx.HTTPError as exc:
            return f"the server is unreachable ({describe_connection_error(exc)})"
        if response.status_code == 404:
            return "the server no longer knows the session (restarted?)"
        if response.status_code in (401, 403):
            return f"the server refuses the key now ({response.status_code})"
        if not response.is_success:
            logger.info("GET %s: %s", url, response.status_code)
            return None
        record = response.json()
        if record.get("state") not in ENDED_STATES:
            return None
        if record.get("end_code") in DELIBERATE_ENDS:
            logger.warning("session %s was deleted on the server; stopping", self.session_id)
            return ""
        return f"the server ended the session ({record.get('reason')})"

    async def _republish(self) -> None:
        await self._teardown()
        delay, started = self.backoff_initial, time.monotonic()
        while True:
            try:
                await self._publish()
                break
            except ServerError as exc:
                if exc.status in _FATAL_STATUSES:
                    raise
                problem: str = str(exc)
            except (ConnectionFailed, SourceUnavailable) as exc:
                problem = str(exc)
            waited = time.monotonic() - started
            if self.give_up_after is not None and waited + delay > self.give_up_after:
                raise ConnectionFailed(f"gave up publishing again after {waited:.0f} s: {problem}")
            logger.info("publishing again failed (%s); next try in %.1f s", problem, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
        self.reconnects += 1
