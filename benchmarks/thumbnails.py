"""Cost of the console's thumbnail ring on the ingest path: JPEG encode time and size per frame.

Every sampled frame is shrunk and encoded once (stream/thumbnails.py), on the source's thread,
so this is what a session pays per sampled frame, beside the resize to the grid it already does.
The frames are a gradient scene with moving blocks and camera-like sensor noise (std 3), at the
common camera sizes, each resized to its session grid first.

    python benchmarks/thumbnails.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import UTC, datetime

import numpy as np

from livelens.stream.grid import DEFAULT_TOKENS_PER_FRAME, choose_grid, resize_to_grid
from livelens.stream.thumbnails import DEFAULT_CAPACITY, ThumbnailRing, encode_thumbnail

CAMERAS = ((640, 360), (1280, 720), (1920, 1080))


def scene(index: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    ys = np.linspace(30, 200, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0, 50, width, dtype=np.float32)[None, :, None]
    image = np.broadcast_to(ys + xs * np.array([1.0, 0.6, 0.3]), (height, width, 3)).copy()
    for k in range(6):  # blocks that move a little every frame
        top, left = (k * height) // 7, (k * width // 6 + index * 4) % width
        image[top : top + height // 8, left : left + width // 10] = (40 * k) % 255
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def measure(width: int, height: int, repeats: int) -> tuple[str, float, float, float, int]:
    """(grid, resize ms, encode ms, median thumbnail KB, ring MB when full) for one camera size."""
    import av

    grid = choose_grid(height, width, tokens_per_frame=DEFAULT_TOKENS_PER_FRAME)
    frames = [av.VideoFrame.from_ndarray(scene(i, width, height), format="rgb24")
              for i in range(repeats)]  # fmt: skip
    started = time.perf_counter()
    images = [resize_to_grid(f, grid) for f in frames]
    resize_ms = (time.perf_counter() - started) / repeats * 1e3
    ring = ThumbnailRing()
    started = time.perf_counter()
    for i, image in enumerate(images):
        ring.add(float(i), image)
    encode_ms = (time.perf_counter() - started) / repeats * 1e3
    sizes = [len(encode_thumbnail(image)[0]) for image in images]
    kb = statistics.median(sizes) / 1024
    return f"{grid.width}x{grid.height}", resize_ms, encode_ms, kb, DEFAULT_CAPACITY * kb / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}; {datetime.now(UTC):%Y-%m-%d}; numpy "
          f"{np.__version__}; {args.repeats} frames per row")  # fmt: skip
    print("| camera | grid | resize to grid (ms) | thumbnail encode (ms) | JPEG (KB) "
          f"| ring of {DEFAULT_CAPACITY} (MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for width, height in CAMERAS:
        grid, resize_ms, encode_ms, kb, ring_mb = measure(width, height, args.repeats)
        print(f"| {width}x{height} | {grid} | {resize_ms:.2f} | {encode_ms:.2f} | {kb:.1f} "
              f"| {ring_mb:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
