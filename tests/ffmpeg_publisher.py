"""FFmpeg's own WHIP muxer (PyAV's bundled FFmpeg 8) as a real publisher, in a child process.

It must run in its own process: PyAV holds the GIL while the muxer does its HTTP requests and
DTLS handshake, which would deadlock a server running in the test's process. Run as
`python ffmpeg_publisher.py URL TOKEN CERT KEY FPS COUNT WIDTH HEIGHT`: it sends COUNT
index-pattern frames in real time, then closes (the muxer sends DELETE).

`python ffmpeg_publisher.py --cli FFMPEG_ARGS...` runs the `ffmpeg` command line the README shows
through the same libraries (Debian's ffmpeg binary predates the whip muxer): only the options
listed in FFMPEG_OPTIONS are understood, anything else is refused.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from dataclasses import dataclass, field
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


# ffmpeg option -> where it goes: "codec" options of the video encoder, "muxer" options.
FFMPEG_OPTIONS = {
    "-profile:v": ("codec", "profile"),
    "-tune": ("codec", "tune"),
    "-bf": ("codec", "bf"),
    "-authorization": ("muxer", "authorization"),
    "-cert_file": ("muxer", "cert_file"),
    "-key_file": ("muxer", "key_file"),
}


@dataclass
class FfmpegArgs:
    input: str = ""
    output: str = ""
    realtime: bool = False
    codec: str = ""
    format: str = ""
    audio: bool = True
    codec_options: dict[str, str] = field(default_factory=dict)
    muxer_options: dict[str, str] = field(default_factory=dict)


def parse_ffmpeg(argv: list[str]) -> FfmpegArgs:
    """The README's ffmpeg arguments (after `ffmpeg`); ValueError on anything else."""
    out = FfmpegArgs()
    args = iter(argv)
    for arg in args:
        if arg == "-re":
            out.realtime = True
        elif arg == "-an":
            out.audio = False
        elif arg == "-i":
            out.input = next(args)
        elif arg == "-c:v":
            out.codec = next(args)
        elif arg == "-f":
            out.format = next(args)
        elif arg in FFMPEG_OPTIONS:
            kind, name = FFMPEG_OPTIONS[arg]
            target = out.codec_options if kind == "codec" else out.muxer_options
            target[name] = next(args)
        elif arg.startswith("-") or out.output:
            raise ValueError(f"ffmpeg option {arg!r} is not understood here")
        else:
            out.output = arg
    if not (out.input and out.output and out.codec and out.format):
        raise ValueError(f"incomplete ffmpeg command: {argv}")
    return out


def cli_command(argv: list[str]) -> list[str]:
    parse_ffmpeg(argv)  # refuse early, in the test's process
    return [sys.executable, __file__, "--cli", *argv]


def _cli(argv: list[str]) -> None:
    """Decode the input, encode it as the options say, send it through the named muxer."""
    import av

    args = parse_ffmpeg(argv)
    options = {**args.muxer_options, "handshake_timeout": "10000"}
    with (
        av.open(args.input) as source,
        av.open(args.output, "w", format=args.format, options=options) as sink,
    ):
        video = source.streams.video[0]
        rate = video.average_rate or 25
        stream = sink.add_stream(args.codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = video.width, video.height, "yuv420p"
        stream.options = dict(args.codec_options)
        started = time.monotonic()
        for i, frame in enumerate(source.decode(video)):
            if args.realtime and frame.time is not None:  # -re: at the input's own pace
                time.sleep(max(0.0, started + frame.time - time.monotonic()))
            out = frame.reformat(format="yuv420p")
            out.pts, out.time_base = i, Fraction(1) / rate
            sink.mux(stream.encode(out))
        sink.mux(stream.encode(None))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cli"]:
        _cli(sys.argv[2:])
    else:
        _publish(sys.argv[1:])
