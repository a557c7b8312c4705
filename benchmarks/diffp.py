"""GPU benchmark of normalize + patchify + DiffFP for many live streams: Triton vs torch reference.

Each step, every stream contributes one frame, compared with that stream's previous sampled
frame (kept on the device), one diffp call per stream as the service makes them. Prints a
markdown table. Run: python benchmarks/diffp.py [--streams 32 --height 720 --width 1280 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch

from livelens.kernels.diffp import DiffFPOutput, diffp_reference, diffp_triton

FACTOR = 28  # patch 14 x merge 2: the session grid is a multiple of this in both dimensions
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
Kernel = Callable[..., DiffFPOutput]


def session_grid(height: int, width: int) -> tuple[int, int]:
    """Full-resolution grid for a source size: each side rounded to the nearest multiple of 28."""
    return max(FACTOR, round(height / FACTOR) * FACTOR), max(FACTOR, round(width / FACTOR) * FACTOR)


def time_ms(fn: Callable[[int], object], iters: int, warmup: int) -> float:
    """Median GPU time of fn(i) in ms, from CUDA events, synchronizing between iterations."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(warmup + i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def step_bytes(streams: int, height: int, width: int, out_dtype: torch.dtype) -> int:
    """Bytes one step must move at least: read frame and prev, write patches, distance, keep."""
    pixels = height * width * 3
    tokens = (height // FACTOR) * (width // FACTOR)
    out_size = torch.empty((), dtype=out_dtype).element_size()
    return streams * (2 * pixels + pixels * out_size + tokens * (4 + 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32, help="live streams, one frame each/step")
    parser.add_argument("--height", type=int, default=720, help="source frame height")
    parser.add_argument("--width", type=int, default=1280, help="source frame width")
    parser.add_argument("--iters", type=int, default=200, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="patch dtype")
    parser.add_argument("--threshold", type=float, default=0.1, help="DiffFP threshold")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: benchmarks/diffp.py needs a GPU", file=sys.stderr)
        return 2
    if args.streams < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--streams and --iters must be >= 1, --warmup >= 0")

    out_dtype = DTYPES[args.dtype]
    height, width = session_grid(args.height, args.width)
    gen = torch.Generator(device="cuda").manual_seed(0)
    # Rolling buffer: per stream two slots that swap roles each step (current frame, previous
    # sampled frame), as the service keeps them on the device; random pixels: the work is the same.
    frames = torch.randint(
        0, 256, (args.streams, 2, height, width, 3), dtype=torch.uint8, device="cuda", generator=gen
    )
    options = {"threshold": args.threshold, "out_dtype": out_dtype}

    def per_stream(kernel: Kernel) -> Callable[[int], object]:
        def step(i: int) -> None:
            slot = i % 2
            for s in range(args.streams):
                kernel(frames[s, slot, None], frames[s, 1 - slot], **options)

        return step

    def one_launch(i: int) -> None:
        # Same bytes in one call: the streams' frames read as one clip (launch overhead paid once).
        diffp_triton(frames[:, i % 2], frames[0, 1 - i % 2], **options)

    got = diffp_triton(frames[0, 0, None], frames[0, 1], **options)
    want = diffp_reference(frames[0, 0, None], frames[0, 1], **options)
    # Expected bit-equal (tests/test_kernels_diffp.py checks that); this only guards the numbers.
    same_patches = torch.allclose(got.patches.float(), want.patches.float(), rtol=0, atol=1e-6)
    same_distance = torch.allclose(got.distance, want.distance, rtol=1e-5, atol=1e-5)
    if not (same_patches and same_distance):
        print("Triton and the reference disagree: not benchmarking", file=sys.stderr)
        return 1

    nbytes = step_bytes(args.streams, height, width, out_dtype)
    source = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    copy_ms = time_ms(lambda _: torch.empty_like(source).copy_(source), args.iters, args.warmup)
    # A copy reads and writes its size: count both, as for the kernels.
    copy_gbs = 2 * nbytes / copy_ms / 1e6
    rows = [
        ("torch reference", time_ms(per_stream(diffp_reference), args.iters, args.warmup)),
        ("triton", time_ms(per_stream(diffp_triton), args.iters, args.warmup)),
        ("triton, 1 launch for all streams", time_ms(one_launch, args.iters, args.warmup)),
    ]

    tokens = (height // FACTOR) * (width // FACTOR)
    print(f"device: {torch.cuda.get_device_name()}")
    print(
        f"{args.streams} streams x 1 frame/step; session grid {height}x{width} (HxW) = "
        f"{args.height}x{args.width} at full resolution rounded to multiples of {FACTOR}; "
        f"{tokens} merged tokens/frame; patches {args.dtype}; threshold {args.threshold}"
    )
    print(
        f"bytes/step (frames + prev read; patches, distance, keep written): {nbytes / 1e6:.1f} MB;"
        f" D2D copy of {nbytes / 1e6:.1f} MB: {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s (read + write)"
    )
    print()
    print(
        "| implementation | median ms/step | GB/s | fraction of D2D copy | speedup vs reference |"
    )
    print("|---|---:|---:|---:|---:|")
    reference_ms = rows[0][1]
    for name, ms in rows:
        gbs = nbytes / ms / 1e6
        print(
            f"| {name} | {ms:.3f} | {gbs:.0f} | {gbs / copy_gbs:.2f} | {reference_ms / ms:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
