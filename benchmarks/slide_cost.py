"""What a sliding window costs: extra prefill per frame, by slide size, against no window.

One session, --frames frames at 1 fps (a static noisy background, a moving box, sensor noise, at
the grid `choose_grid` picks for --size), through the engine driven step by step. For each slide
fraction (the share of the window that leaves at each slide; the rest is prefilled again from
cached features) and for no window at all, side by side in one process:

- rebuilt tokens per live token: what the re-prefills add, counted exactly from the plans;
- engine seconds per frame, and that over the run without a window (only meaningful while the
  windowed video stays shorter than the unwindowed one, so the latter also pays for a longer
  context: compare the token ratio first).

Prints a markdown table, then ONE summary line for the default slide fraction:
`slide=<f> extra_prefill=<tokens ratio> time_ratio=<x>`.

    python benchmarks/slide_cost.py --frames 240 --window 60
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import UTC, datetime

import torch
from latency import add_model_args, load_from_args, open_stream
from scale import Stream

from livelens.model.engine import Engine, EngineConfig
from livelens.model.runner import ModelRunner
from livelens.stream.grid import DEFAULT_TOKENS_PER_FRAME, choose_grid


def run(loaded, args: argparse.Namespace, fraction: float | None) -> dict[str, float]:
    grid = choose_grid(args.height, args.width, tokens_per_frame=args.tokens_per_frame)
    engine = Engine(
        ModelRunner(loaded),
        EngineConfig(slide_fraction=fraction or 0.5, max_pending_frames=4),
        num_blocks=args.blocks,
    )
    live = rebuilt = 0
    schedule = engine.scheduler.schedule

    def counting():
        nonlocal live, rebuilt
        plan = schedule()
        for prefill in plan.frames:
            for frame in prefill.frames:
                if frame.rebuild:
                    rebuilt += frame.tokens
                else:
                    live += frame.tokens
        return plan

    engine.scheduler.schedule = counting  # type: ignore[method-assign]
    window = None if fraction is None else args.window
    open_stream(engine, grid, args.prune_threshold, window_s=window)
    stream = Stream(0, grid.height, grid.width)
    started = time.perf_counter()
    for k in range(args.frames):
        engine.submit_frame("s", stream.frame(k), float(k))
        while engine.pending("s") or engine.scheduler.session("s").sliding:
            engine.step()
    seconds = time.perf_counter() - started
    stats = engine.stats("s")
    assert stats is not None
    return {
        "live": live,
        "rebuilt": rebuilt,
        "seconds": seconds,
        "slides": stats.slides,
        "held": stats.frames,
        "kv_tokens": stats.kv_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--window", type=float, default=60.0, help="media seconds")
    parser.add_argument("--fractions", default="0.25,0.5,0.75")
    parser.add_argument("--default", type=float, default=0.5, help="fraction for the summary")
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--tokens-per-frame", type=int, default=DEFAULT_TOKENS_PER_FRAME)
    parser.add_argument("--prune-threshold", type=float, default=4.0)
    parser.add_argument("--blocks", type=int, default=8192)
    args = parser.parse_args(argv)
    args.width, args.height = (int(x) for x in args.size.lower().split("x"))
    loaded = load_from_args(args)
    run(loaded, argparse.Namespace(**{**vars(args), "frames": 8}), 0.5)  # warm-up

    base = run(loaded, args, None)
    rows = {None: base}
    for fraction in (float(x) for x in args.fractions.split(",")):
        rows[fraction] = run(loaded, args, fraction)
        print(f"... slide {fraction} done", file=sys.stderr, flush=True)

    name = f"random-{args.arch}" if args.arch else args.model
    device = torch.cuda.get_device_name() if loaded.device.type == "cuda" else platform.processor()
    grid = choose_grid(args.height, args.width, tokens_per_frame=args.tokens_per_frame)
    print(f"# Sliding window cost ({name}, {args.device}: {device or 'cpu'})")
    print(
        f"date {datetime.now(UTC):%Y-%m-%d}, torch {torch.__version__}, {args.frames} frames at "
        f"1 fps, window {args.window:g} s, grid {grid.width}x{grid.height} ({grid.tokens} "
        f"tokens/frame), DiffFP threshold {args.prune_threshold}"
    )
    print()
    print(
        "| slide | slides | frames held at end | live tokens | rebuilt tokens | rebuilt / live "
        "| s | ms/frame | time / no window |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for fraction, row in rows.items():
        label = "no window" if fraction is None else f"{fraction:g} x window"
        print(
            f"| {label} | {row['slides']:.0f} | {row['held']:.0f} | {row['live']:.0f} | "
            f"{row['rebuilt']:.0f} | {row['rebuilt'] / row['live']:.2f} | {row['seconds']:.1f} | "
            f"{row['seconds'] / args.frames * 1e3:.1f} | {row['seconds'] / base['seconds']:.2f} |"
        )
    chosen = rows[args.default]
    print(
        f"\nslide={args.default:g} extra_prefill={chosen['rebuilt'] / chosen['live']:.2f} "
        f"time_ratio={chosen['seconds'] / base['seconds']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
