"""Write raw YUV4MPEG2 (.y4m) videos, the format Chromium's fake camera plays in a loop."""

from __future__ import annotations

from pathlib import Path

import av
from videos import Pattern, index_pattern


def write_y4m(
    path: str | Path,
    *,
    frames: int,
    width: int,
    height: int,
    fps: int = 30,
    pattern: Pattern = index_pattern,
) -> Path:
    """Write `frames` frames of pattern(i, width, height) as 4:2:0 y4m; width/height even."""
    if width % 2 or height % 2:
        raise ValueError("4:2:0 needs an even width and height")
    path = Path(path)
    with path.open("wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(frames):
            rgb = av.VideoFrame.from_ndarray(pattern(i, width, height), format="rgb24")
            yuv = rgb.reformat(format="yuv420p")
            f.write(b"FRAME\n")
            # PyAV packs a yuv420p frame's planes as I420 (Y, then U, then V), y4m's layout.
            f.write(yuv.to_ndarray().tobytes())
    return path
