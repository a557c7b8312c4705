"""Make real encoded test videos with PyAV whose frames say which frame they are.

The "index" pattern writes the frame number as black/white blocks (top half) above fixed colour
bars (bottom half), so a test recovers the frame index from decoded, resized pixels with
read_index(). The "moving_square" pattern is a static background with one square that moves,
for DiffFP tests: square_box() says where the square is.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

Pattern = Callable[[int, int, int], np.ndarray]
"""pattern(index, width, height) -> uint8 RGB array of shape (height, width, 3)."""

INDEX_BITS = 12
"""Frame numbers up to 4095 fit the index pattern."""
_BIT_ROWS, _BIT_COLS = 2, 6
BAR_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
)
"""Colour bars of the index pattern, left to right: red, green, blue, yellow, cyan, magenta."""

# Encoders in PyAV's bundled FFmpeg (checked with av.codecs_available): libx264, mpeg4, libvpx
# (VP8), libvpx-vp9, mjpeg, mpeg2video, ffv1, libsvtav1. Not there: libopenh264, libaom-av1.
_PIX_FMT = {"mjpeg": "yuvj420p"}
_ENCODER_OPTIONS = {
    # veryfast keeps B-frames (so decode order differs from presentation order) and stays quick.
    "libx264": {"preset": "veryfast"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"},
}
_AUDIO_CODEC = {".m4a": "aac", ".mp4": "aac", ".mp3": "mp3", ".wav": "pcm_s16le", ".ogg": "libopus"}


@dataclass(frozen=True)
class Video:
    """A written test video and what was put into it."""

    path: Path
    times: tuple[float, ...]
    """Presentation time of each frame as encoded (seconds, including any start offset)."""
    width: int
    height: int
    codec: str


def index_pattern(index: int, width: int, height: int) -> np.ndarray:
    """Frame number as 12 black/white blocks (2 rows x 6, top half) over 6 colour bars."""
    if not 0 <= index < 2**INDEX_BITS:
        raise ValueError(f"index {index} does not fit in {INDEX_BITS} bits")
    img = np.zeros((height, width, 3), np.uint8)
    half = height // 2
    for bit in range(INDEX_BITS):
        row, col = divmod(bit, _BIT_COLS)
        if index >> bit & 1:
            top, bottom = row * half // _BIT_ROWS, (row + 1) * half // _BIT_ROWS
            left, right = col * width // _BIT_COLS, (col + 1) * width // _BIT_COLS
            img[top:bottom, left:right] = 255
    for i, colour in enumerate(BAR_COLOURS):
        left, right = i * width // len(BAR_COLOURS), (i + 1) * width // len(BAR_COLOURS)
        img[half:, left:right] = colour
    return img


def read_index(image: np.ndarray) -> int:
    """Recover the frame number from an index-pattern image of any size (RGB, H x W x 3)."""
    height, width = image.shape[:2]
    luma = image.astype(np.float32).mean(axis=2)
    half = height / 2
    index = 0
    for bit in range(INDEX_BITS):
        row, col = divmod(bit, _BIT_COLS)
        y, x = (row + 0.5) * half / _BIT_ROWS, (col + 0.5) * width / _BIT_COLS
        if _block_centre(luma, y, x) > 128:
            index |= 1 << bit
    return index


def bar_colour(image: np.ndarray, bar: int) -> np.ndarray:
    """Mean RGB at the centre of colour bar `bar` of an index-pattern image."""
    height, width = image.shape[:2]
    y, x = 0.75 * height, (bar + 0.5) * width / len(BAR_COLOURS)
    return np.array([_block_centre(image[:, :, c].astype(np.float32), y, x) for c in range(3)])


def square_box(index: int, width: int, height: int) -> tuple[int, int, int]:
    """(top, left, size) in pixels of the moving square in frame `index` of moving_square."""
    size = max(2, min(width, height) // 4)
    step = max(1, size // 2)
    span = width - size
    left = (index * step) % (span + 1)
    top = (height - size) // 2
    return top, left, size


def moving_square(index: int, width: int, height: int) -> np.ndarray:
    """Static background (gradient + fixed blocks) with a white square moving left to right."""
    ys = np.linspace(40, 160, height, dtype=np.float32)[:, None]
    xs = np.linspace(0, 60, width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), np.uint8)
    img[:, :, 0] = (ys + xs).astype(np.uint8)
    img[:, :, 1] = (ys * 0.5 + 30).astype(np.uint8)
    img[:, :, 2] = (200 - xs).astype(np.uint8)
    img[: height // 6, : width // 6] = (0, 0, 160)
    img[-(height // 6) :, -(width // 6) :] = (160, 0, 0)
    top, left, size = square_box(index, width, height)
    img[top : top + size, left : left + size] = 255
    return img


PATTERNS: dict[str, Pattern] = {"index": index_pattern, "moving_square": moving_square}


def make_video(
    path: str | Path,
    *,
    frames: int = 30,
    fps: float = 30,
    width: int = 160,
    height: int = 120,
    codec: str = "libx264",
    pattern: str | Pattern = "index",
    start_time: float = 0.0,
    times: Sequence[float] | None = None,
    gop: int = 10,
    faststart: bool = False,
) -> Video:
    """Encode a video; the container comes from the file extension (.mp4, .mkv, .webm, .avi...).

    Frames are at start_time + i / fps, or at the given `times` (variable frame rate, in ms
    precision). A keyframe every `gop` frames lets decoding recover soon after damage.
    """
    path = Path(path)
    draw = PATTERNS[pattern] if isinstance(pattern, str) else pattern
    if times is None:
        rate = Fraction(fps).limit_denominator(1001)
        time_base = 1 / rate
        pts = [round(start_time * rate) + i for i in range(frames)]
    else:
        rate = Fraction(fps).limit_denominator(1001)
        time_base = Fraction(1, 1000)
        pts = [round(t * 1000) for t in times]
        if any(b <= a for a, b in itertools.pairwise(pts)):
            raise ValueError("times must increase by at least 1 ms")
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = _PIX_FMT.get(codec, "yuv420p")
        stream.codec_context.time_base = time_base
        stream.codec_context.gop_size = gop
        stream.options = dict(_ENCODER_OPTIONS.get(codec, {}))
        for i, p in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(draw(i, width, height), format="rgb24")
            frame.pts = p
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return Video(path, tuple(float(p * time_base) for p in pts), width, height, codec)


def make_audio_only(path: str | Path, *, seconds: float = 1.0, sample_rate: int = 16000) -> Path:
    """Encode a tone with no video stream; the codec follows the extension (.m4a, .mp3, .wav)."""
    path = Path(path)
    codec = _AUDIO_CODEC[path.suffix]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=sample_rate)
        stream.layout = "mono"
        chunk = 1024
        total = int(seconds * sample_rate)
        for start in range(0, total, chunk):
            t = np.arange(start, min(start + chunk, total)) / sample_rate
            samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def corrupt_middle(
    path: str | Path, *, at: float = 0.5, length: int | None = None, seed: int = 0
) -> tuple[int, int]:
    """Overwrite bytes mid-file with seeded random bytes; returns (offset, length)."""
    size = os.path.getsize(path)
    length = length if length is not None else max(64, size // 20)
    offset = int(size * at)
    length = min(length, size - offset)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(seed).randbytes(length))
    return offset, length


def truncate(path: str | Path, fraction: float) -> int:
    """Keep the first `fraction` of a file's bytes, like a copy cut off; returns the new size."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    size = int(os.path.getsize(path) * fraction)
    os.truncate(path, size)
    return size


def blank_mp4_media(path: str | Path) -> None:
    """Zero every byte of an MP4's media data, keeping its index: demuxes, decodes nothing."""
    with open(path, "r+b") as f:
        data = f.read()
        offset = 0
        while offset + 8 <= len(data):
            size = int.from_bytes(data[offset : offset + 4], "big")
            kind = data[offset + 4 : offset + 8]
            header = 8
            if size == 1:
                size, header = int.from_bytes(data[offset + 8 : offset + 16], "big"), 16
            elif size == 0:
                size = len(data) - offset
            if kind == b"mdat":
                f.seek(offset + header)
                f.write(bytes(size - header))
                return
            offset += size
    raise ValueError(f"no mdat box in {path}")


def _block_centre(channel: np.ndarray, y: float, x: float) -> float:
    """Mean of a small window at (y, x): robust to codec noise near block edges."""
    height, width = channel.shape
    ry, rx = max(1, height // 40), max(1, width // 40)
    yi, xi = int(y), int(x)
    return float(channel[max(0, yi - ry) : yi + ry + 1, max(0, xi - rx) : xi + rx + 1].mean())
