"""DiffFP kept-token ratio at several thresholds, on real clips (paths) and a generated clip.

Frames are sampled at --fps and resized to the session grid exactly as `livelens ask` does, then
run through the DiffFP reference (the kernel's CPU path). No model is needed.

    python benchmarks/kept_ratio.py [--clip camera.mp4 ...] [--fps 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from livelens.kernels.diffp import diffp_reference
from livelens.stream.demo import make_scene
from livelens.stream.ingest import sample_file

THRESHOLDS = (0.1, 1.0, 2.0, 4.0, 8.0)


def kept_ratios(path: Path, fps: float, tokens_per_frame: int) -> tuple[int, str, list[float]]:
    grid, frames = sample_file(path, fps=fps, tokens_per_frame=tokens_per_frame)
    with frames:
        images = np.stack([f.image for f in frames])
    batch = torch.from_numpy(images)
    ratios = [diffp_reference(batch, None, threshold=t).keep.float().mean().item()
              for t in THRESHOLDS]  # fmt: skip
    return len(images), f"{grid.width}x{grid.height}", ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", action="append", default=[], help="a real video file")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--tokens-per-frame", type=int, default=91)
    parser.add_argument("--seconds", type=int, default=60, help="length of the generated clips")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clean = make_scene(Path(tmp) / "clean.mp4", seconds=args.seconds, fps=10)
        noisy = make_scene(Path(tmp) / "noisy.mp4", seconds=args.seconds, fps=10, sensor_noise=3)
        clips = [
            ("generated: static car park + van, no sensor noise", clean),
            ("generated: same scene + Gaussian sensor noise (std 3)", noisy),
        ] + [(f"real: {Path(c).name}", Path(c)) for c in args.clip]
        for name, path in clips:
            rows.append((name, *kept_ratios(path, args.fps, args.tokens_per_frame)))

    print(f"# DiffFP kept-token ratio ({datetime.now(UTC):%Y-%m-%d}, fps {args.fps}, "
          f"{args.tokens_per_frame} tokens/frame budget)")  # fmt: skip
    print()
    header = " | ".join(f"thr {t:g}" + (" (default)" if t == 0.1 else "") for t in THRESHOLDS)
    print(f"| clip | frames | grid | {header} |")
    print("|---|---:|---|" + "---:|" * len(THRESHOLDS))
    for name, n, grid, ratios in rows:
        cells = " | ".join(f"{r:.1%}" for r in ratios)
        print(f"| {name} | {n} | {grid} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
