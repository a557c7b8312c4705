"""`make demo`: encode a short scene with PyAV, then ask LiveLens about it with the tiny model.

The tiny model has random weights, so its answer is noise; the demo shows the whole path working
offline (decode, sample, DiffFP, incremental prefill, streamed answer, segments, stats). Pass a
real checkpoint with --model to get a real answer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from livelens.stream import cli


def make_scene(path: Path, *, seconds: int = 12, fps: int = 10, sensor_noise: float = 0.0) -> Path:
    """A static car park with a white van that drives in at 3 s and parks at 6 s (H.264 mp4).

    sensor_noise: std of per-frame Gaussian pixel noise, as a real camera sensor adds.
    """
    width, height = 448, 252
    rng = np.random.default_rng(0)
    ground = np.full((height, width, 3), (90, 90, 96), np.uint8)
    ground[height // 2 :, :, :] = (60, 62, 60)
    ground = np.clip(ground + rng.integers(-6, 7, ground.shape), 0, 255).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            t = i / fps
            frame = ground.copy()
            if sensor_noise:
                noise = rng.normal(0, sensor_noise, frame.shape)
                frame = np.clip(frame + noise, 0, 255).astype(np.uint8)
            if t >= 3:
                x = int(min(t - 3, 3) / 3 * 260)  # drives in for 3 s, then parks
                frame[140:200, x : x + 120] = (235, 235, 235)
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--question", default="When did the white van park?")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="livelens-demo-") as tmp:
        clip = make_scene(Path(tmp) / "carpark.mp4")
        print(f"sample video: {clip.name}, 12 s of H.264 at 10 fps (made just now)")
        print(f"question: {args.question}")
        print("answer: ", end="", flush=True)
        return cli.main(["ask", str(clip), args.question, "--model", args.model])


if __name__ == "__main__":
    sys.exit(main())
