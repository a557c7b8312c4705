"""An endless stream: flat KV, flat memory, steady answer latency, no growing lag.

One session of --frames 1-fps frames (a synthetic camera: static noisy background, a moving
box, sensor noise) through the engine on its own thread, pushed faster than real time (every
frame as soon as the inbox has room), with a --window of media seconds. Every --ask-every frames
a greedy question is asked; at checkpoints the script records the session's KV bytes, the
process's resident memory and the frames' lag (wall time from a frame's submission to its
prefill). Checks, as the issue words them:

- kv_flat: once the window has slid, the session's KV bytes (its rebuilt window's blocks
  included while a slide runs) rise and fall with each slide but do not grow: their maximum over
  the second half of the checkpoints is within 10% of that over the first half;
- rss_growth_pct: resident memory growth between the first and the last quarter of the run;
- ttft_ratio: the median time to first token over the last quarter / over the second quarter;
- lag_growth_s: the mean lag over the last quarter minus over the second quarter.

Prints a markdown table of checkpoints, then ONE summary line
`kv_flat=<yes|no> rss_growth_pct=<x> ttft_ratio=<y> lag_growth_s=<z>`.

    python benchmarks/endless.py --frames 14400 --window 300     # 4 hours at 1 fps
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch
from latency import add_model_args, load_from_args
from scale import Stream

from livelens.model.engine import Answer, Engine, EngineConfig, FrameCallbacks, QuestionJob
from livelens.model.loading import LoadedModel
from livelens.model.runner import ModelRunner
from livelens.model.sampling import SamplingParams
from livelens.stream.grid import DEFAULT_TOKENS_PER_FRAME, choose_grid

QUESTION = "Is the white box visible now?"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Checkpoint:
    frame: int
    kv_bytes: int
    rss: int
    window: tuple[float | None, float | None]
    slides: int


@dataclass
class Result:
    checkpoints: list[Checkpoint] = field(default_factory=list)
    ttft: list[tuple[int, float]] = field(default_factory=list)
    """(frame index when asked, seconds to first token)."""
    lag: list[tuple[int, float]] = field(default_factory=list)
    """(frame index, seconds from submission to prefill)."""
    failures: int = 0

    def summary(self, frames: int) -> dict[str, float | str]:
        quarter = frames // 4

        def window(points: list[tuple[int, float]], lo: int, hi: int) -> list[float]:
            return [v for k, v in points if lo <= k < hi]

        filled = [c for c in self.checkpoints if c.slides > 0]
        half = len(filled) // 2
        kv_flat = half > 0 and max(c.kv_bytes for c in filled[half:]) <= 1.1 * max(
            c.kv_bytes for c in filled[:half]
        )
        early = [c.rss for c in self.checkpoints if c.frame < quarter] or [0]
        late = [c.rss for c in self.checkpoints if c.frame >= frames - quarter] or [0]
        rss_growth = (statistics.mean(late) / statistics.mean(early) - 1) * 100
        ttft_mid = window(self.ttft, quarter, 2 * quarter)
        ttft_end = window(self.ttft, frames - quarter, frames)
        lag_mid = window(self.lag, quarter, 2 * quarter)
        lag_end = window(self.lag, frames - quarter, frames)
        return {
            "kv_flat": "yes" if kv_flat else "no",
            "rss_growth_pct": rss_growth,
            "ttft_ratio": statistics.median(ttft_end) / statistics.median(ttft_mid)
            if ttft_mid and ttft_end
            else float("nan"),
            "lag_growth_s": statistics.mean(lag_end) - statistics.mean(lag_mid)
            if lag_mid and lag_end
            else float("nan"),
        }


def run_endless(
    loaded: LoadedModel,
    *,
    frames: int,
    window_s: float,
    size: tuple[int, int] = (1280, 720),
    tokens_per_frame: int = DEFAULT_TOKENS_PER_FRAME,
    prune_threshold: float = 4.0,
    ask_every: int = 50,
    checkpoints: int = 40,
    num_blocks: int | None = 8192,
) -> Result:
    """Push `frames` frames through one windowed session; see the module docstring."""
    width, height = size
    grid = choose_grid(height, width, tokens_per_frame=tokens_per_frame)
    engine = Engine(ModelRunner(loaded), EngineConfig(max_pending_frames=4), num_blocks=num_blocks)
    result = Result()
    submitted: dict[float, float] = {}
    lock = threading.Lock()
    outstanding = threading.Semaphore(4)

    def appended(_result) -> None:
        stats = engine.stats("s")
        if stats is None or stats.last_time is None:
            return
        with lock:
            due = submitted.pop(stats.last_time, None)
            for t in [t for t in submitted if t < stats.last_time]:
                submitted.pop(t)  # frames of the same step
            if due is not None:
                result.lag.append((int(stats.last_time), time.perf_counter() - due))

    engine.open_session("s")
    engine.configure(
        "s",
        height=grid.height,
        width=grid.width,
        threshold=prune_threshold,
        min_tokens=1,
        callbacks=FrameCallbacks(appended, lambda exc: print(exc, file=sys.stderr)),
        window_s=window_s,
    )
    stream = Stream(0, grid.height, grid.width)
    every = max(1, frames // checkpoints)

    def ask(k: int) -> None:
        asked = time.perf_counter()
        first: list[float] = []

        def on_token(_text: str) -> None:
            if not first:
                first.append(time.perf_counter())

        def on_done(_answer: Answer) -> None:
            with lock:
                result.ttft.append((k, (first[0] if first else time.perf_counter()) - asked))
            outstanding.release()

        def on_error(exc: Exception) -> None:
            with lock:
                result.failures += 1
            outstanding.release()

        outstanding.acquire()
        job = QuestionJob(
            QUESTION, SamplingParams(max_new_tokens=4), lambda: None, on_token, on_done, on_error
        )
        engine.submit_question("s", job)

    engine.start()
    try:
        for k in range(frames):
            while engine.pending("s") >= 4:
                time.sleep(0.001)
            with lock:
                submitted[float(k)] = time.perf_counter()
            engine.submit_frame("s", stream.frame(k), float(k))
            if k and k % ask_every == 0:
                ask(k)
            if k % every == 0 or k == frames - 1:
                stats = engine.stats("s")
                assert stats is not None
                result.checkpoints.append(
                    Checkpoint(
                        k,
                        stats.kv_bytes,
                        rss_bytes(),
                        (stats.window_start, stats.last_time),
                        stats.slides,
                    )
                )
        while engine.pending("s"):
            time.sleep(0.01)
        for _ in range(4):
            outstanding.acquire()  # every question answered
    finally:
        engine.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--window", type=float, default=200.0, help="media seconds")
    parser.add_argument("--ask-every", type=int, default=50, help="frames between questions")
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--tokens-per-frame", type=int, default=DEFAULT_TOKENS_PER_FRAME)
    parser.add_argument("--prune-threshold", type=float, default=4.0)
    args = parser.parse_args(argv)
    width, height = (int(x) for x in args.size.lower().split("x"))
    loaded = load_from_args(args)
    started = time.perf_counter()
    result = run_endless(
        loaded,
        frames=args.frames,
        window_s=args.window,
        size=(width, height),
        tokens_per_frame=args.tokens_per_frame,
        prune_threshold=args.prune_threshold,
        ask_every=args.ask_every,
    )
    took = time.perf_counter() - started
    name = f"random-{args.arch}" if args.arch else args.model
    device = torch.cuda.get_device_name() if loaded.device.type == "cuda" else platform.processor()
    print(f"# Endless stream ({name}, {args.device}: {device or 'cpu'})")
    print(
        f"date {datetime.now(UTC):%Y-%m-%d}, torch {torch.__version__}, {args.frames} frames at "
        f"1 fps ({args.frames / 3600:.2f} h of stream) in {took:.0f} s, window {args.window:g} s, "
        f"a question every {args.ask_every} frames, {result.failures} failed"
    )
    print()
    print("| frame | window (s) | slides | KV MiB | RSS MiB | lag ms (last) |")
    print("|---:|---|---:|---:|---:|---:|")
    for c in result.checkpoints[:: max(1, len(result.checkpoints) // 12)] + result.checkpoints[-1:]:
        lags = [v for k, v in result.lag if k <= c.frame]
        start, end = c.window
        print(
            f"| {c.frame} | {start if start is not None else '-'}-{end if end is not None else '-'}"
            f" | {c.slides} | {c.kv_bytes / 2**20:.2f} | {c.rss / 2**20:.0f} | "
            f"{lags[-1] * 1e3 if lags else float('nan'):.0f} |"
        )
    summary = result.summary(args.frames)
    print(
        f"\nkv_flat={summary['kv_flat']} rss_growth_pct={summary['rss_growth_pct']:.1f} "
        f"ttft_ratio={summary['ttft_ratio']:.2f} lag_growth_s={summary['lag_growth_s']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
