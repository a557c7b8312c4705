"""Many streams on one engine: throughput and time to first token, batched vs one session per step.

Each simulated stream is a 1-fps feed of its own synthetic video (a static noisy background, a
moving box, light sensor noise) at the session grid `choose_grid` picks for --size, so DiffFP
prunes as on a fixed camera. Every stream asks a question (greedy, --answer-tokens tokens) every
--ask-every seconds of its media. For each N in --streams the same workload runs twice in one
process, side by side: through the batched engine, and through the same engine limited to one
session per step (`SchedulerConfig.max_sessions_per_step=1`, how the service worked before).

Modes:
- saturate (default): every stream's frames are available as fast as the engine takes them (a
  feeder keeps each session's inbox topped up, nothing is dropped): frames/s is the engine's
  capacity. TTFT is from a question's submission to its first token, under that load.
- --realtime: frames arrive at 1 fps of wall clock per stream (staggered); a stream is held in
  real time when its lag (prefilled media time vs the wall clock) does not grow. With
  --find-max, N doubles until streams fall behind (then bisects): the largest N held.

Prints a markdown table, then ONE summary line for the largest N:
`streams=<n> frames_per_s=<x> ttft_p95_ms=<y> speedup_vs_sequential=<z>`.

    python benchmarks/scale.py --device cpu --model tiny --streams 16 --seconds 30
    python benchmarks/scale.py --device cuda --arch 2b --realtime --find-max --seconds 60
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import torch
from latency import add_model_args, load_from_args

from livelens.model.engine import (
    Answer,
    Engine,
    EngineConfig,
    FrameCallbacks,
    Probe,
    QuestionJob,
)
from livelens.model.loading import LoadedModel
from livelens.model.qa import standing_question
from livelens.model.runner import ModelRunner
from livelens.model.sampling import SamplingParams
from livelens.model.scheduler import SchedulerConfig
from livelens.stream.grid import DEFAULT_TOKENS_PER_FRAME, choose_grid

QUESTION = "When did the white box first move? Answer with start and end seconds."
ALERTS = tuple(
    standing_question(c)
    for c in ("a white box is visible", "a person is visible", "the box stopped", "it is dark")
)


class Stream:
    """One simulated camera: its own background, a moving box, sensor noise (deterministic).

    The background is kept within [2, 253] so that adding the noise (a bank of 7 fields, cycled)
    needs no clipping: the feeder must cost little next to the engine it feeds.
    """

    NOISE_FIELDS = 7

    def __init__(self, index: int, height: int, width: int) -> None:
        self.key = f"s{index}"
        rng = np.random.default_rng(index)
        self.background = rng.integers(2, 254, (height, width, 3), dtype=np.uint8)
        self.noise = [
            (rng.integers(-2, 3, (height, width, 3)) % 256).astype(np.uint8)
            for _ in range(self.NOISE_FIELDS)
        ]
        self.box = max(16, height // 5)
        self.index = index

    def frame(self, k: int) -> np.ndarray:
        height, width = self.background.shape[:2]
        # uint8 arithmetic wraps: adding 254 subtracts 2.
        frame = self.background + self.noise[k % self.NOISE_FIELDS]
        y = (k * 7 + self.index * 13) % (height - self.box)
        x = (k * 11 + self.index * 5) % (width - self.box)
        frame[y : y + self.box, x : x + self.box] = (240, 240, 240)
        return frame


@dataclass
class Run:
    """What one workload measured."""

    streams: int
    mode: str
    frames: int = 0
    seconds: float = 0.0
    answer_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    lag_end: list[float] = field(default_factory=list)
    lag_growth: float = 0.0
    steps: int = 0
    dropped: int = 0
    kv_bytes: int = 0
    questions_failed: int = 0
    alerts: int = 0
    """Standing questions per stream (`Engine.watch`, every --alert-every media seconds)."""
    evaluations: int = 0
    skipped: int = 0
    busy_seconds: float = 0.0

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    def ttft_ms(self, q: float) -> float:
        if not self.ttft:
            return float("nan")
        return float(np.percentile(self.ttft, q)) * 1e3


class Workload:
    """N streams fed into one engine on its own thread; questions timed from submission."""

    def __init__(
        self, loaded: LoadedModel, args: argparse.Namespace, n: int, mode: str, alerts: int = 0
    ) -> None:
        self.args = args
        grid = choose_grid(args.height, args.width, tokens_per_frame=args.tokens_per_frame)
        self.grid = grid
        sequential = mode == "sequential"
        config = EngineConfig(
            kv_budget=args.kv_budget,
            max_pending_frames=args.depth,
            scheduler=SchedulerConfig(
                max_sessions_per_step=1 if sequential else 0,
                session_min_tokens=args.session_min_tokens,
            ),
        )
        self.engine = Engine(ModelRunner(loaded), config)
        self.streams = [Stream(i, grid.height, grid.width) for i in range(n)]
        self.run = Run(n, mode, alerts=alerts)
        self.lock = threading.Lock()
        self.outstanding = 0
        self.prefilled: dict[str, list[tuple[float, float]]] = {s.key: [] for s in self.streams}
        """Per stream: (media time of the newest prefilled frame, wall clock)."""
        self.t0 = 0.0
        for stream in self.streams:
            self.engine.open_session(stream.key)
            self.engine.configure(
                stream.key,
                height=grid.height,
                width=grid.width,
                threshold=args.prune_threshold,
                min_tokens=1,
                callbacks=FrameCallbacks(self._appended(stream.key), self._full),
            )
            for j in range(alerts):
                self.engine.watch(
                    stream.key,
                    f"alert{j}",
                    ALERTS[j % len(ALERTS)],
                    every=args.alert_every,
                    on_result=self._probed,
                    on_error=self._full,
                )

    def _probed(self, probe: Probe) -> None:
        with self.lock:
            self.run.evaluations += probe.evaluated
            self.run.skipped += not probe.evaluated

    def _appended(self, key: str):
        def on_appended(_result) -> None:
            stats = self.engine.stats(key)
            if stats is not None and stats.last_time is not None:
                self.prefilled[key].append((stats.last_time, time.perf_counter()))

        return on_appended

    def _full(self, exc: Exception) -> None:
        print(f"warning: a stream takes no more frames: {exc}", file=sys.stderr)

    def _ask(self, key: str) -> None:
        submitted = time.perf_counter()
        first: list[float] = []

        def on_token(_text: str) -> None:
            if not first:
                first.append(time.perf_counter())

        def on_done(answer: Answer) -> None:
            with self.lock:
                self.run.ttft.append((first[0] if first else time.perf_counter()) - submitted)
                self.run.answer_tokens += len(answer.token_ids)
                self.outstanding -= 1

        def on_error(exc: Exception) -> None:
            with self.lock:
                self.run.questions_failed += 1
                self.outstanding -= 1
            print(f"warning: a question failed: {exc}", file=sys.stderr)

        params = SamplingParams(max_new_tokens=self.args.answer_tokens)
        job = QuestionJob(QUESTION, params, lambda: None, on_token, on_done, on_error)
        with self.lock:
            self.outstanding += 1
        self.engine.submit_question(key, job)

    def execute(self) -> Run:
        args, engine = self.args, self.engine
        frames = int(args.seconds)
        engine.start()
        self.t0 = start = time.perf_counter()
        sent = dict.fromkeys((s.key for s in self.streams), 0)
        stagger = {s.key: i / len(self.streams) for i, s in enumerate(self.streams)}
        try:
            while any(k < frames for k in sent.values()):
                progressed = False
                now = time.perf_counter() - start
                for stream in self.streams:
                    k = sent[stream.key]
                    if k >= frames:
                        continue
                    if args.realtime and now < k + stagger[stream.key]:
                        continue
                    if not args.realtime and engine.pending(stream.key) >= args.depth:
                        continue
                    engine.submit_frame(stream.key, stream.frame(k), float(k))
                    sent[stream.key] = k + 1
                    progressed = True
                    if k and k % args.ask_every == 0:
                        self._ask(stream.key)
                if not progressed:
                    time.sleep(0.002)
            while any(engine.pending(s.key) for s in self.streams) or self.outstanding:
                time.sleep(0.002)
            self.run.seconds = time.perf_counter() - start
        finally:
            engine.stop()
        run = self.run
        for stream in self.streams:
            stats = engine.stats(stream.key)
            assert stats is not None
            run.frames += stats.frames
            run.kv_bytes += stats.kv_bytes
            run.dropped += engine.dropped(stream.key)
        run.steps = engine.steps
        run.busy_seconds = engine.busy_seconds
        if args.realtime:
            self._lags()
        return run

    def _lags(self) -> None:
        """Lag = wall clock since the run began minus the newest prefilled media time (minus
        the stream's stagger); growth = mean lag over the last third minus the first third."""
        first, last = [], []
        for i, stream in enumerate(self.streams):
            points = self.prefilled[stream.key]
            if not points:
                continue
            offset = i / len(self.streams)
            lags = [wall - self.t0 - offset - media for media, wall in points]
            third = max(1, len(lags) // 3)
            first.append(statistics.mean(lags[:third]))
            last.append(statistics.mean(lags[-third:]))
            self.run.lag_end.append(lags[-1])
        self.run.lag_growth = statistics.mean(last) - statistics.mean(first) if first else 0.0


def held(run: Run) -> bool:
    """Real time: lag grew by less than one frame period and ended under two."""
    return (
        run.dropped == 0 and run.lag_growth < 1.0 and max(run.lag_end, default=float("inf")) < 2.0
    )


def measure(
    loaded: LoadedModel, args: argparse.Namespace, n: int, mode: str, alerts: int = 0
) -> Run:
    run = Workload(loaded, args, n, mode, alerts).execute()
    print(
        f"... {n} streams {mode}, {alerts} alerts each: {run.frames_per_s:.1f} frames/s, "
        f"TTFT p95 {run.ttft_ms(95):.0f} ms",
        file=sys.stderr,
        flush=True,
    )
    return run


def find_max(loaded: LoadedModel, args: argparse.Namespace) -> list[Run]:
    """Double N while streams are held in real time, then bisect to the largest N held."""
    runs, low, high, n = [], 0, None, max(1, args.start)
    while high is None or high - low > max(1, low // 16):
        run = measure(loaded, args, n, "batched")
        runs.append(run)
        if held(run):
            low = n
        else:
            high = n
        n = n * 2 if high is None else (low + high) // 2
        if n <= low or (high is not None and n >= high):
            break
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--streams", default="1,4,16", help="comma-separated stream counts")
    parser.add_argument("--seconds", type=float, default=30, help="media seconds per stream")
    parser.add_argument("--size", default="1280x720", help="source frame size WxH")
    parser.add_argument("--tokens-per-frame", type=int, default=DEFAULT_TOKENS_PER_FRAME)
    parser.add_argument("--prune-threshold", type=float, default=4.0)
    parser.add_argument("--ask-every", type=int, default=10, help="media seconds per question")
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4, help="frames each inbox may hold")
    parser.add_argument("--kv-budget", default="0.8")
    parser.add_argument("--session-min-tokens", type=int, default=2048)
    parser.add_argument("--realtime", action="store_true", help="1 fps of wall clock per stream")
    parser.add_argument("--find-max", action="store_true", help="with --realtime: largest N held")
    parser.add_argument("--start", type=int, default=16, help="--find-max: first N")
    parser.add_argument("--no-sequential", action="store_true", help="batched engine only")
    parser.add_argument(
        "--alerts",
        default="0",
        help="comma-separated standing questions per stream: each count is a batched run",
    )
    parser.add_argument("--alert-every", type=float, default=1.0, help="media s between evals")
    args = parser.parse_args(argv)
    args.width, args.height = (int(x) for x in args.size.lower().split("x"))
    if args.find_max and not args.realtime:
        parser.error("--find-max needs --realtime")

    loaded = load_from_args(args)
    measure(loaded, argparse.Namespace(**{**vars(args), "seconds": 3}), 2, "batched")  # warm-up
    if args.find_max:
        runs = find_max(loaded, args)
    else:
        runs = []
        counts = [int(x) for x in args.alerts.split(",")]
        for n in sorted(int(x) for x in args.streams.split(",")):
            for alerts in counts:
                runs.append(measure(loaded, args, n, "batched", alerts))
            if not args.no_sequential:
                runs.append(measure(loaded, args, n, "sequential", counts[0]))

    name = f"random-{args.arch}" if args.arch else args.model
    if args.arch and args.layers:
        name += f", {args.layers} layers"
    device = torch.cuda.get_device_name() if loaded.device.type == "cuda" else platform.processor()
    grid = choose_grid(args.height, args.width, tokens_per_frame=args.tokens_per_frame)
    mode = "real time (1 fps per stream)" if args.realtime else "saturated"
    print(f"# Engine scale ({name}, {args.device}: {device or 'cpu'}, {mode})")
    print(
        f"date {datetime.now(UTC):%Y-%m-%d}, torch {torch.__version__}, {args.size} -> grid "
        f"{grid.width}x{grid.height} ({grid.tokens} tokens/frame), DiffFP threshold "
        f"{args.prune_threshold}, {args.seconds:g} s per stream, a {args.answer_tokens}-token "
        f"answer every {args.ask_every} s per stream, {torch.get_num_threads()} CPU threads"
    )
    print()
    print(
        "| streams | engine | alerts/stream | frames | s | frames/s | answer tok/s | TTFT p50 ms "
        "| TTFT p95 ms | frames/step | KV MiB/stream | lag end s | lag growth s | dropped "
        "| evals (skipped) | evals/engine-s |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        lag_end = f"{max(run.lag_end):.2f}" if run.lag_end else "-"
        growth = f"{run.lag_growth:.2f}" if args.realtime else "-"
        rate = run.evaluations / run.busy_seconds if run.busy_seconds else 0.0
        print(
            f"| {run.streams} | {run.mode} | {run.alerts} | {run.frames} | {run.seconds:.1f} | "
            f"{run.frames_per_s:.1f} | {run.answer_tokens / run.seconds:.1f} | "
            f"{run.ttft_ms(50):.0f} | {run.ttft_ms(95):.0f} | "
            f"{run.frames / max(1, run.steps):.2f} | "
            f"{run.kv_bytes / run.streams / 2**20:.1f} | {lag_end} | {growth} | {run.dropped} "
            f"| {run.evaluations} ({run.skipped}) | {rate:.1f} |"
        )
    if loaded.device.type == "cuda":
        print(f"\npeak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    first = int(args.alerts.split(",")[0]) if not args.find_max else 0
    batched = [r for r in runs if r.mode == "batched" and r.alerts == first]
    top = max(batched, key=lambda r: r.streams) if not args.find_max else None
    if args.find_max:
        held_runs = [r for r in batched if held(r)]
        top = max(held_runs, key=lambda r: r.streams) if held_runs else batched[0]
    assert top is not None
    sequential = [r for r in runs if r.mode == "sequential" and r.streams == top.streams]
    speedup = top.frames_per_s / sequential[0].frames_per_s if sequential else float("nan")
    print(
        f"\nstreams={top.streams} frames_per_s={top.frames_per_s:.1f} "
        f"ttft_p95_ms={top.ttft_ms(95):.0f} speedup_vs_sequential={speedup:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
