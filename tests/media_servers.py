"""Real local media servers for source tests: HLS over HTTP, misbehaving TCP peers, RTSP.

HLS segments are real H.264 in MPEG-TS written by FFmpeg's `hls` muxer, with the frame number
drawn in every picture (videos.index_pattern), so a test reads back which frames it got.
The HTTP server also serves a LIVE playlist whose window slides forward with wall-clock time, as
a live encoder's would. The RTSP server is GStreamer's gst-rtsp-server run by the system
python3 (python3-gi is not in the venv); rtsp_unavailable() says why when it cannot run.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import logging
import random
import re
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
from videos import index_pattern

logger = logging.getLogger(__name__)

SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_APT_PACKAGES = (
    "python3-gi",
    "gir1.2-gst-rtsp-server-1.0",
    "gstreamer1.0-plugins-base",
    "gstreamer1.0-plugins-good",
    "gstreamer1.0-plugins-bad",
)
"""Debian packages the RTSP test server needs (rtsp-server, qtdemux, h264parse, rtph264pay)."""


@dataclass(frozen=True)
class HlsMedia:
    """Segments written by the hls muxer and what is in them."""

    folder: Path
    segments: tuple[str, ...]
    """Segment file names, in order."""
    durations: tuple[float, ...]
    """EXTINF duration of each segment (seconds)."""
    fps: int
    frames_per_segment: int

    def first_frame(self, segment: int) -> int:
        """Index drawn in the first frame of a segment."""
        return segment * self.frames_per_segment


def make_hls(
    folder: Path,
    *,
    segments: int = 12,
    fps: int = 10,
    segment_s: int = 1,
    width: int = 160,
    height: int = 120,
) -> HlsMedia:
    """Encode `segments` segments of `segment_s` seconds of the index pattern as VOD HLS.

    A keyframe opens every segment (keyint = fps * segment_s, no scene cuts), so each segment
    decodes on its own, as a live client starting mid-stream needs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    per_segment = fps * segment_s
    options = {
        "hls_time": str(segment_s),
        "hls_list_size": "0",
        "hls_playlist_type": "vod",
        "hls_segment_filename": str(folder / "seg%03d.ts"),
    }
    with av.open(str(folder / "index.m3u8"), "w", format="hls", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        stream.codec_context.gop_size = per_segment
        stream.options = {
            "preset": "veryfast",
            "x264-params": f"keyint={per_segment}:min-keyint={per_segment}:scenecut=0",
        }
        for i in range(segments * per_segment):
            frame = av.VideoFrame.from_ndarray(index_pattern(i, width, height), format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    playlist = (folder / "index.m3u8").read_text()
    durations = tuple(float(d) for d in re.findall(r"#EXTINF:([0-9.]+),", playlist))
    names = tuple(line for line in playlist.splitlines() if line.endswith(".ts"))
    if len(names) != segments or len(durations) != segments:
        raise RuntimeError(f"hls muxer wrote {len(names)} segments, expected {segments}")
    return HlsMedia(folder, names, durations, fps, per_segment)


class LiveClock:
    """Which segments a live encoder has published: `preload` at start, then one per segment."""

    def __init__(self, media: HlsMedia, *, preload: int = 3, window: int = 3) -> None:
        self.media = media
        self.preload = preload
        self.window = window
        self.started = time.monotonic()

    def published(self) -> int:
        """Number of segments published so far (capped at those that exist)."""
        elapsed = time.monotonic() - self.started
        count = self.preload + int(elapsed / self.media.durations[0])
        return min(count, len(self.media.segments))

    def playlist(self) -> str:
        """A live media playlist (no EXT-X-ENDLIST) of the last `window` published segments."""
        end = self.published()
        first = max(0, end - self.window)
        target = max(1, round(max(self.media.durations)))
        lines = [
            "#EXTM3U",
            "#EXT-X-VERSION:3",
            f"#EXT-X-TARGETDURATION:{target}",
            f"#EXT-X-MEDIA-SEQUENCE:{first}",
        ]
        for k in range(first, end):
            lines += [f"#EXTINF:{self.media.durations[k]:.6f},", self.media.segments[k]]
        return "\n".join(lines) + "\n"


class MediaServer:
    """An HTTP(S) server on 127.0.0.1 (or `host`) serving a folder, plus /live.m3u8 from a
    LiveClock, and /redirect?to=URL answering 302 to URL.

    stop() closes the listening socket; a new MediaServer on the same port (and the same clock)
    models the server coming back after an outage.
    """

    def __init__(
        self,
        folder: Path,
        *,
        clock: LiveClock | None = None,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.hosts: list[str] = []
        """The Host header of every request, in order."""
        handler = _handler(folder, clock, self.hosts)
        self._server = http.server.ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        if tls is not None:
            # The handshake runs in accept(); a client that refuses the certificate makes it
            # raise, which the server counts as a failed accept and carries on.
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self._stopped = False

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}/{path}"

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)

    def __enter__(self) -> MediaServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _handler(
    folder: Path, clock: LiveClock | None, hosts: list[str]
) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so stopping the server ends every transfer.
        protocol_version = "HTTP/1.0"

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self) -> None:
            hosts.append(self.headers.get("Host", ""))
            path, _, query = self.path.partition("?")
            if path == "/redirect":
                self.send_response(302)
                self.send_header("Location", query.removeprefix("to="))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path.split("?")[0] == "/live.m3u8" and clock is not None:
                body = clock.playlist().encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.apple.mpegurl")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("http %s: " + format, self.address_string(), *args)

    return Handler


def self_signed_certificate(
    folder: Path, name: str = "localhost", address: str | None = "127.0.0.1"
) -> tuple[Path, Path]:
    """A self-signed certificate for the DNS name `name` (and `address`, unless None) and its
    key: (cert.pem, key.pem).

    It is its own CA, so the cert file doubles as the CA file that makes a client trust it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    alternatives: list[x509.GeneralName] = [x509.DNSName(name)]
    if address is not None:
        alternatives.append(x509.IPAddress(ipaddress.ip_address(address)))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side TLS context with this certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


class TcpPeer:
    """A TCP server on 127.0.0.1 that misbehaves on purpose, one thread per client.

    mode "silent": accepts and never sends (a hung server). "garbage": sends seeded random bytes
    and closes. "http-garbage": answers an HTTP 200 whose body is random bytes (not media).
    "reset": reads the request and resets the connection (RST, nothing sent).
    """

    def __init__(self, mode: str, *, size: int = 64 * 1024, seed: int = 0) -> None:
        if mode not in ("silent", "garbage", "http-garbage", "reset"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self._payload = random.Random(seed).randbytes(size)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self._clients: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def url(self, scheme: str, path: str = "x") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/{path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._clients.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            if self.mode == "silent":
                self._stop.wait()
                return
            if self.mode == "reset":
                client.settimeout(2)
                client.recv(4096)
                # Linger 0: close() sends RST instead of FIN.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if self.mode == "http-garbage":
                client.settimeout(2)
                client.recv(4096)  # the request; its content does not matter
                header = (
                    "HTTP/1.0 200 OK\r\nContent-Type: application/vnd.apple.mpegurl\r\n"
                    f"Content-Length: {len(self._payload)}\r\n\r\n"
                )
                client.sendall(header.encode())
            client.sendall(self._payload)
        except OSError:
            pass  # the client hung up first; that is its right
        finally:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def __enter__(self) -> TcpPeer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def closed_port() -> int:
    """A local TCP port nothing listens on (bound then released; good enough for a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The RTSP server script, run by the system python3. It serves one MP4's H.264 track at its
# media rate to every client (or, given a frame count, a live camera: a test pattern encoded to
# VP8 as it is made, with no duration, that ends after that many frames), on the port it prints
# (the OS picks it), until stdin closes. Every client gets its own pipeline.
_RTSP_SERVER = r"""
import sys, threading
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer

Gst.init(None)
path = sys.argv[1]
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service("0")
factory = GstRtspServer.RTSPMediaFactory()
if path.startswith("live:"):
    frames = int(path[5:])
    factory.set_launch(
        f'( videotestsrc is-live=true num-buffers={frames} pattern=ball '
        '! video/x-raw,width=160,height=120,framerate=10/1 ! vp8enc deadline=1 '
        '! rtpvp8pay name=pay0 pt=96 )'
    )
else:
    factory.set_launch(
        f'( filesrc location="{path}" ! qtdemux ! h264parse config-interval=-1 '
        '! rtph264pay name=pay0 pt=96 )'
    )
factory.set_shared(False)
server.get_mount_points().add_factory("/clip", factory)
if server.attach(None) == 0:
    sys.exit("could not attach the RTSP server")
print(server.get_bound_port(), flush=True)
loop = GLib.MainLoop()
threading.Thread(target=lambda: (sys.stdin.read(), loop.quit()), daemon=True).start()
loop.run()
"""

_RTSP_CHECK = r"""
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
missing = [e for e in ("filesrc", "qtdemux", "h264parse", "rtph264pay", "videotestsrc",
                       "vp8enc", "rtpvp8pay")
           if Gst.ElementFactory.find(e) is None]
print(" ".join(missing))
"""


def rtsp_unavailable() -> str | None:
    """Why the GStreamer RTSP test server cannot run here, or None when it can."""
    need = "apt-get install -y " + " ".join(RTSP_APT_PACKAGES)
    if shutil.which(SYSTEM_PYTHON) is None:
        return f"no {SYSTEM_PYTHON} for the GStreamer RTSP server ({need})"
    try:
        check = subprocess.run(
            [SYSTEM_PYTHON, "-c", _RTSP_CHECK], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {SYSTEM_PYTHON}: {exc}"
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"GStreamer RTSP server not installed ({last}); {need}"
    if check.stdout.strip():
        return f"GStreamer elements missing: {check.stdout.strip()}; {need}"
    return None


class RtspServer:
    """gst-rtsp-server in a subprocess serving an MP4 (H.264) at rtsp://127.0.0.1:<port>/clip,
    or with `live_frames`, a live camera that sends that many frames, then end-of-stream."""

    def __init__(self, mp4: Path | None = None, *, live_frames: int | None = None) -> None:
        if (mp4 is None) == (live_frames is None):
            raise ValueError("give an MP4 or live_frames")
        what = f"live:{live_frames}" if live_frames is not None else str(mp4)
        # stderr goes to a file: a pipe nobody reads could fill up and stall the server.
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by stop())
        self._proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", _RTSP_SERVER, what],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line.isdigit():
            log = self.stop()
            raise RuntimeError(f"RTSP server did not start: {line!r}\n{log}")
        self.url = f"rtsp://127.0.0.1:{int(line)}/clip"

    def stop(self) -> str:
        """Stop the server; returns what it wrote to stderr."""
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()
        if self._log.closed:
            return ""
        self._log.seek(0)
        log = self._log.read()
        self._log.close()
        return log

    def __enter__(self) -> RtspServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
