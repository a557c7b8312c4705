"""FFmpeg's own WHIP muxer (PyAV's bundled FFmpeg 8) as a real publisher, in a child process.

It must run in its own process: PyAV holds the GIL while the muxer does its HTTP requests and
DTLS handshake, which would deadlock a server running in the test's process. Run as
`python ffmpeg_publisher.py URL TOKEN CERT KEY FPS COUNT WIDTH HEIGHT`: it sends COUNT
index-pattern frames in real time, then closes (the muxer sends DELETE).
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def self_signed(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whip-test")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )


def p256_certificate(folder: Path) -> tuple[Path, Path]:
    """A P-256 certificate and key: FFmpeg's default is P-224, which the server refuses."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(self_signed(key).public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def command(
    url: str, token: str, folder: Path, *, fps: int, count: int, width: int, height: int
) -> list[str]:
    """The child's command line (certificate written into `folder`)."""
    cert_file, key_file = p256_certificate(folder)
    args = [url, token, cert_file, key_file, fps, count, width, height]
    return [sys.executable, __file__, *map(str, args)]


def start(url: str, token: str, folder: Path, **frames: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(url, token, folder, **frames),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _publish(argv: list[str]) -> None:
    import av

    sys.path.insert(0, str(Path(__file__).parent))
    from videos import index_pattern

    url, token, cert, key = argv[:4]
    fps, count, width, height = (int(a) for a in argv[4:8])
    options = {"authorization": token, "cert_file": cert, "key_file": key}
    options["handshake_timeout"] = "10000"
    with av.open(url, "w", format="whip", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = fps
        # WebRTC has no B-frames; baseline is the H.264 profile aiortc negotiates.
        stream.options = {"profile": "baseline", "tune": "zerolatency", "preset": "ultrafast"}
        start_time = time.monotonic()
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(index_pattern(i, width, height), "rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
            time.sleep(max(0.0, start_time + (i + 1) / fps - time.monotonic()))
        container.mux(stream.encode(None))


if __name__ == "__main__":
    _publish(sys.argv[1:])
