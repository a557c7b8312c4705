"""Pull a live source (RTSP, HLS or other HTTP stream, or a local file) and decode it in a thread.

The source is a PullTarget that passed the source policy (sources/policy.py), or a string the
operator gave, checked by the same rules without the destination limits.

Every video frame is decoded and handed to `on_frame` with a media time that starts at 0.0 and
only increases, across reconnects too: the first frame after an outage is placed at the last
frame's time plus the wall-clock time the outage took, so the timeline keeps wall-clock meaning
and the outage is reported as a gap. What happens to the source (connected, gap, reconnecting,
ended, failed) arrives as SourceEvents on `on_event`, from the same thread. Each connection is
demuxed, decoded and timed by sources/decode.py's Decoder, the one an offline file uses too.

Failure policy: every failure of a network source (refused, timed out, dropped, HTTP error,
garbage that is not a media stream) is retried with exponential backoff until it has lasted
`give_up_after_s`; a server can serve an error page or half a stream while it restarts, so
InvalidDataError is retried too. Permanent failures end the source at once: a stream that opens
but has no video stream (or no decoder for it), and every failure of a local file.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field, replace
from fractions import Fraction

import av
from av.container import InputContainer

from livelens.stream.errors import SourceError
from livelens.stream.frames import DecodedFrame, SourceStats
from livelens.stream.sources.decode import (
    Decoder,
    StreamLost,
    Warnings,
    ffmpeg_reason,
    video_stream,
)
from livelens.stream.sources.policy import PullTarget, operator_target

logger = logging.getLogger(__name__)

EVENT_KINDS = frozenset({"connected", "gap", "reconnecting", "ended", "failed"})

# Probe only half a second of a live stream when opening: FFmpeg's default (5 s) makes an HLS
# open at the live edge wait for segments that do not exist yet; codec and size come from the
# first keyframe's parameter sets anyway.
_LIVE_ANALYZE_US = 500_000
# PyAV's HTTP error classes share no base class below FFmpegError.
_HTTP_ERRORS = (av.error.HTTPError, av.error.HTTPClientError, av.error.HTTPServerError)
# Backoff jitter, as a fraction of the delay, so sources that dropped together do not retry
# in lockstep.
_JITTER = 0.1


@dataclass(frozen=True)
class PullConfig:
    """How a pull source reconnects, times out and paces; validated on creation."""

    reconnect_initial_s: float = 0.5
    """Wait before the first reconnect; doubled after each failed attempt."""
    reconnect_max_s: float = 10.0
    """Longest wait between reconnect attempts."""
    give_up_after_s: float = 60.0
    """A network source failing continuously for this long is failed (no frame in between)."""
    open_timeout_s: float = 10.0
    """Connect and read timeout: FFmpeg's socket timeouts, and the longest one open or read may
    block. A live source that delivers nothing for this long counts as dropped, so keep it above
    the HLS segment duration. It also bounds how long stop() waits for a blocked read."""
    realtime: bool = True
    """Local files only: deliver frames at their media rate, as a live stream would arrive."""
    loop: bool = False
    """Local files only: start over at the end; media time keeps increasing."""

    def __post_init__(self) -> None:
        for name in ("reconnect_initial_s", "reconnect_max_s", "open_timeout_s"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be positive and finite, got {value!r}")
        if not self.give_up_after_s >= 0:
            raise ValueError(f"give_up_after_s must be >= 0, got {self.give_up_after_s!r}")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) is below reconnect_initial_s "
                f"({self.reconnect_initial_s})"
            )


@dataclass(frozen=True)
class SourceEvent:
    """Something that happened to a pull source; `kind` is one of EVENT_KINDS."""

    kind: str
    message: str
    gap: tuple[float, float] | None = None
    """For "gap": media seconds (last frame before the outage, first frame after it)."""


@dataclass
class PullStats(SourceStats):
    """A file source's counters plus the network's; `PullSource.stats` returns a snapshot.

    `demux_errors` counts read errors: a dropped connection for a network source, a resync for
    a file; `frames` counts frames delivered to on_frame.
    """

    connects: int = 0
    """Successful opens (each one emitted a "connected" event)."""
    reconnects: int = 0
    """Reconnect attempts scheduled after a failure (each one a "reconnecting" event)."""
    loops: int = 0
    """Times a looping file started over."""
    gaps: list[tuple[float, float]] = field(default_factory=list)
    """Media-time (start, end) of every outage, as in the "gap" events."""
    last_error: str | None = None
    """The most recent failure's reason."""


class _Failure(Exception):
    """A connection could not be opened or was lost; `permanent` means retrying cannot help."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@dataclass
class _Connection:
    """One open container and its decoder, which places its frames on the media timeline."""

    container: InputContainer
    stream: av.VideoStream
    decoder: Decoder
    duration: float | None
    """Seconds, when the source says (a file, a VOD playlist, an RTSP clip); None when live."""
    frames: int = 0


class PullSource:
    """Decode a live source's first video stream in a daemon thread; start(), then stop()."""

    def __init__(
        self,
        source: str | PullTarget,
        *,
        on_frame: Callable[[DecodedFrame], None],
        on_event: Callable[[SourceEvent], None],
        config: PullConfig | None = None,
    ) -> None:
        self.target = source if isinstance(source, PullTarget) else operator_target(source)
        """What FFmpeg opens; the only place the real URL (and a camera's password) is kept."""
        self.name = self.target.name
        """The URL with any password masked: what messages and logs show."""
        self.config = config if config is not None else PullConfig()
        self.is_network = self.target.is_network
        self._on_frame = on_frame
        self._on_event = on_event
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = PullStats()
        self._warn = Warnings(logger, f"pull {self.name}")
        # Timeline, touched only by the source thread: the media time of the latest frame.
        self._last: Fraction | None = None
        self._quiet_since = 0.0
        self._pace_origin: float | None = None

    @property
    def stats(self) -> PullStats:
        """A snapshot of the counters (safe to read from any thread)."""
        return replace(self._stats, gaps=list(self._stats.gaps))

    @property
    def running(self) -> bool:
        """True while the source thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the source thread; a source starts once."""
        if self._thread is not None:
            raise RuntimeError("PullSource.start() can be called only once")
        self._thread = threading.Thread(target=self._run, name=f"pull {self.name}", daemon=True)
        self._thread.start()

    async def close(self, reason: str = "") -> None:
        """`Source.close`: stop() in a worker thread (it joins the pull thread)."""
        await asyncio.to_thread(self.stop)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait up to `timeout` s for it; no callback runs after it returns.

        Between packets, in backoff and in realtime pacing the thread stops at once. A read
        blocked inside FFmpeg cannot be cut short safely (closing the container under a running
        av_read_frame is a use-after-free), so it ends at the FFmpeg timeout (open_timeout_s);
        the thread then exits without further callbacks.
        """
        self._stop.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            logger.warning(
                "pull %s: still blocked in a read after %.1f s; it exits within %.1f s",
                self.name,
                timeout,
                self.config.open_timeout_s,
            )

    # --- the source thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as exc:  # the thread must never die silently
            logger.exception("pull %s: unexpected error in the source thread", self.name)
            reason = f"unexpected error pulling {self.name}: {type(exc).__name__}: {exc}"
            self._stats.last_error = reason
            try:
                self._emit("failed", reason)
            except Exception:
                logger.exception("pull %s: on_event raised while reporting a failure", self.name)

    def _serve(self) -> None:
        """Open, read, and on failure back off and reopen until stopped, ended or failed."""
        failing_since: float | None = None
        attempt = 0
        while not self._stop.is_set():
            frames_before = self._stats.frames
            attempt_started = time.monotonic()
            try:
                ended = self._connect_and_read()
            except _Failure as failure:
                reason, permanent = failure.reason, failure.permanent
            else:
                if self._stop.is_set():
                    return
                if ended is not None:
                    self._emit("ended", ended)
                    return
                continue  # a looping file starts over
            if self._stop.is_set():
                return
            self._stats.last_error = reason
            if permanent:
                self._emit("failed", reason)
                return
            now = time.monotonic()
            if self._stats.frames > frames_before:
                # The connection delivered frames: a new failing period starts with its loss.
                failing_since, attempt = now, 0
            elif failing_since is None:
                failing_since = attempt_started
            failing_for = now - failing_since
            give_up = self.config.give_up_after_s
            if failing_for >= give_up:
                self._emit("failed", f"{reason} (failing for {failing_for:.1f} s, gave up)")
                return
            # Never sleep past the give-up time: the last attempt is made right at it.
            delay = min(self._backoff(attempt), give_up - failing_for)
            attempt += 1
            self._stats.reconnects += 1
            self._emit("reconnecting", f"{reason}; reconnecting in {delay:.1f} s")
            if self._stop.wait(delay):
                return

    def _backoff(self, attempt: int) -> float:
        cfg = self.config
        delay = min(cfg.reconnect_max_s, cfg.reconnect_initial_s * 2.0 ** min(attempt, 60))
        return delay * (1 + _JITTER * random.random())

    def _connect_and_read(self) -> str | None:
        """One connection, read to its end: the "ended" message, or None for a file loop.

        Raises _Failure when it cannot open, is lost, or (live source) reaches its end.
        """
        conn = self._open()
        try:
            # A looping file reopens; that is neither a new connection nor worth an event.
            if self.is_network or self._stats.connects == 0:
                self._stats.connects += 1
                ctx = conn.stream.codec_context
                self._emit("connected", f"{self.name}: {ctx.name} {ctx.width}x{ctx.height}")
            self._read(conn)
        finally:
            conn.container.close()
            self._last = conn.decoder.last
            if conn.frames:
                self._quiet_since = conn.decoder.quiet_since
        if self._stop.is_set():
            return None
        if conn.frames == 0:
            if not self.is_network:
                raise _Failure(
                    f"no video frame could be decoded from {self.name} ({self._stats.problems()})",
                    permanent=True,
                )
            raise _Failure(f"stream ended before any frame: {self.name}")
        if not self.is_network:
            if self.config.loop:
                self._stats.loops += 1
                logger.debug("pull %s: looping (pass %d)", self.name, self._stats.loops + 1)
                return None
            return f"end of file: {self.name} ({self._stats.frames} frames)"
        if conn.duration is not None:
            # A stream with a known duration (VOD playlist, RTSP clip) is finite: its end is
            # the end. A live stream has none, and its end is an outage.
            return f"end of stream: {self.name} ({conn.duration:.1f} s)"
        raise _Failure(f"stream ended: {self.name}")

    def _open(self) -> _Connection:
        timeout = self.config.open_timeout_s if self.is_network else None
        try:
            container = av.open(
                self.target.url,
                options=self._options(),
                timeout=timeout,
                metadata_errors="replace",
            )
        except (av.FFmpegError, OSError) as exc:
            raise _Failure(self._describe(exc), permanent=not self.is_network) from None
        try:
            stream = video_stream(container, self.name)
        except SourceError as exc:
            container.close()
            raise _Failure(str(exc), permanent=True) from None
        duration = container.duration / av.time_base if container.duration is not None else None
        # Every network connection but the first follows a failure: its first frame opens a gap.
        # A looping file's next pass starts one frame after the last (the Decoder's default).
        after_drop = self.is_network and self._last is not None
        decoder = Decoder(
            container,
            stream,
            self._stats,
            self._warn,
            live=self.is_network,
            after=self._last,
            first_time=self._after_outage if after_drop else None,
            stopped=self._stop.is_set,
        )
        return _Connection(container, stream, decoder, duration)

    def _options(self) -> dict[str, str]:
        if not self.is_network:
            return dict(self.target.options)
        timeout_us = str(round(self.config.open_timeout_s * 1e6))
        options = {**self.target.options, "analyzeduration": str(_LIVE_ANALYZE_US)}
        if self.target.url.startswith(("rtsp://", "rtsps://")):
            # TCP interleaving: no UDP ports to open, no loss; `timeout` is the socket timeout.
            options |= {"rtsp_transport": "tcp", "timeout": timeout_us}
        else:
            # rw_timeout reaches the playlist and, through the HLS demuxer, every segment.
            options |= {"rw_timeout": timeout_us, "live_start_index": "-1"}
        return options

    def _read(self, conn: _Connection) -> None:
        """Deliver the connection's frames to its end; raise _Failure when a live one breaks."""
        try:
            with closing(conn.decoder.frames()) as frames:
                for decoded in frames:
                    self._deliver(conn, decoded)
                    if self._stop.is_set():
                        return
        except StreamLost as lost:
            raise _Failure(f"lost the stream ({self._describe(lost.cause)})") from None

    def _deliver(self, conn: _Connection, decoded: DecodedFrame) -> None:
        """Pace the frame (a realtime file) and hand it to on_frame."""
        if not self.is_network and self.config.realtime:
            now = time.monotonic()
            if self._pace_origin is None:
                self._pace_origin = now - decoded.time
            delay = self._pace_origin + decoded.time - now
            if delay > 0 and self._stop.wait(delay):
                return
        if self._stop.is_set():
            return
        conn.frames += 1
        self._stats.frames += 1
        self._on_frame(decoded)

    def _after_outage(self) -> Fraction:
        """Media time of the first frame after an outage, which is reported as a gap."""
        assert self._last is not None
        # The outage in wall-clock time, so the timeline keeps its wall-clock meaning. It is
        # counted from when the source ran dry, not from the last frame: the demuxer (an
        # MPEG-TS packet ends when the next begins) and the decoder (reordering) hold the
        # last frames back until the drop is detected, a whole HLS reload interval later.
        # For a steady stream the two are the same.
        elapsed = Fraction(round((time.monotonic() - self._quiet_since) * 1e6), 10**6)
        start = self._last + max(elapsed, Fraction(1, 1000))
        gap = (float(self._last), float(start))
        self._stats.gaps.append(gap)
        self._emit("gap", f"{self.name}: outage of {gap[1] - gap[0]:.2f} s", gap=gap)
        return start

    # --- helpers -------------------------------------------------------------------------------

    def _emit(self, kind: str, message: str, gap: tuple[float, float] | None = None) -> None:
        if self._stop.is_set():
            return
        level = {"failed": logging.ERROR, "reconnecting": logging.WARNING}.get(kind, logging.INFO)
        logger.log(level, "pull %s: %s", kind, message)
        self._on_event(SourceEvent(kind, message, gap))

    def _describe(self, exc: BaseException) -> str:
        """One line saying what went wrong, naming the source."""
        url, timeout = self.name, self.config.open_timeout_s
        # ExitError: PyAV's interrupt callback cut an open or read that ran past open_timeout_s;
        # TimeoutError: FFmpeg's own socket timeout. Whichever fires first, it is a timeout.
        if isinstance(exc, (av.error.ExitError, TimeoutError)):
            return f"timed out after {timeout:g} s: {url}"
        if isinstance(exc, ConnectionRefusedError):
            return f"connection refused: {url}"
        if isinstance(exc, ConnectionResetError):
            return f"connection reset by the server: {url}"
        if isinstance(exc, av.error.InvalidDataError):
            return f"not a media stream FFmpeg can read: {url}"
        if isinstance(exc, _HTTP_ERRORS):
            reason = ffmpeg_reason(exc)  # "Server returned 404 Not Found"
            return f"{reason[:1].lower()}{reason[1:]}: {url}"
        if isinstance(exc, av.error.EOFError):
            return f"stream ended before its header: {url}"
        if isinstance(exc, FileNotFoundError):
            return f"not found: {url}"
        if isinstance(exc, PermissionError):
            return f"permission denied: {url}"
        return f"cannot read {url}: {ffmpeg_reason(exc)}"
