"""Standing questions (alerts): do they fire when the object appears and clear when it leaves?

Each stream is a held-out generated scene (seed HELD_OUT_SEED + --seed + k, never trained on),
written as H.264 and sampled at --fps the way `livelens ask` samples a file. Three streams in
four watch an object of the scene, the fourth one an object that never appears in it. Every
stream runs through the real engine (`Engine.watch`: the yes/no question of
`standing_question("a <object> is visible")`, forked off the video at each due frame, one greedy
token) and the service's edge logic (`AlertState.advance`: threshold, hysteresis); frames arrive
one at a time, each after the previous evaluation, as in real time. The cooldown is 0 here, so
an object that comes back is a second event to find.

Scoring, per stretch in which the object is visible in at least one sampled frame (media time
`a` to `b`; one sampling period `p = 1 / fps`):
- found: a rise in [a, a + p] (the first sampled frame at or after `a` is at most p later);
- cleared: after the rise, a fall in [b, b + p] (or the stream ends while it is visible);
- recall = found / stretches; precision = rises that fall inside some [a, b + p] / all rises;
- false alerts = rises outside every [a, b + p], on any stream; on the streams without the
  object every rise is one.

Prints a table per stream and ONE summary line:
`recall=<x> precision=<y> median_delay_s=<z> false_alerts=<n>` (plus clear rate, evaluations
and evaluations skipped by the cheap trigger).

    python benchmarks/alerts.py --streams 20 --seed 0 --model PATH/TO/tiny-grounding

`--trace` adds every evaluation's confidence against the truth, a line per stream (whether a
miss is a late rise or a confidence that never reaches the threshold).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from latency import add_model_args, load_from_args, open_stream

from livelens.model.engine import Engine, EngineConfig, Probe
from livelens.model.kv import DEFAULT_KV_BUDGET
from livelens.model.qa import standing_question
from livelens.model.runner import ModelRunner
from livelens.model.scenes import Scene, generate_scene, vocabulary
from livelens.model.training import HELD_OUT_SEED
from livelens.stream.alerts import AlertState
from livelens.stream.ingest import sample_file

EPS = 1e-6


@dataclass
class StreamRun:
    seed: int
    target: str
    present: bool
    stretches: list[tuple[float, float]]
    """The object's visible intervals (media s, clipped to the stream) that at least one
    sampled frame falls in."""
    end: float
    """Media time of the last sampled frame."""
    edges: list[tuple[float, str]] = field(default_factory=list)
    trace: list[tuple[float, float, bool]] = field(default_factory=list)
    """(media time, confidence, object visible in truth) of every evaluation."""
    evaluations: int = 0
    skipped: int = 0
    frames: int = 0
    seconds: float = 0.0


def trace_line(trace: list[tuple[float, float, bool]]) -> str:
    """Each evaluation as the truth (Y visible, . not) and its confidence in tenths: "Y7"."""
    return " ".join(f"{'Y' if shown else '.'}{min(int(c * 10), 9)}" for _, c, shown in trace)


def observable(truth: list[tuple[float, float]], times: list[float]) -> list[tuple[float, float]]:
    """The intervals at least one sampled frame falls in."""
    return [(a, b) for a, b in truth if any(a - EPS <= t <= b + EPS for t in times)]


def run_stream(
    loaded, seed: int, scene: Scene, video: Path, target: str, args: argparse.Namespace
) -> StreamRun:
    grid, sampled = sample_file(video, fps=args.fps, tokens_per_frame=args.tokens_per_frame)
    with sampled:
        frames = list(sampled)
    times = [f.time for f in frames]
    obj = scene.object(target)
    end = times[-1]
    truth = (
        [] if obj is None else [(v.start, min(v.end, end)) for v in obj.visible if v.start <= end]
    )
    run = StreamRun(seed, target, obj is not None, observable(truth, times), end)
    engine = Engine(
        ModelRunner(loaded),
        EngineConfig(kv_budget=args.kv_budget, skip_unchanged=not args.no_skip),
    )
    open_stream(engine, grid, args.prune_threshold, window_s=args.window)
    probes: list[Probe] = []
    errors: list[Exception] = []
    question = standing_question(args.condition.format(o=target))
    engine.watch(
        "s", "a", question, every=1.0 / args.fps, on_result=probes.append, on_error=errors.append
    )
    alert = AlertState(
        id="a",
        session_id="s",
        condition=f"a {target} is visible",
        every=1.0 / args.fps,
        cooldown=0.0,
        threshold=args.threshold,
        hysteresis=args.hysteresis,
        webhook=None,
        secret=None,
        created="",
    )
    started = time.perf_counter()
    for frame in frames:
        before = len(probes) + len(errors)
        engine.submit_frame("s", frame.image, frame.time)
        for _ in range(1000):
            engine.step()
            if len(probes) + len(errors) > before:
                break
        else:
            raise RuntimeError(f"no evaluation for the frame at {frame.time} s")
        if errors:
            raise RuntimeError(f"an evaluation failed: {errors[0]}")
        probe = probes[-1]
        shown = any(a - EPS <= probe.time <= b + EPS for a, b in truth)
        run.trace.append((probe.time, probe.confidence, shown))
        edge = alert.advance(probe)
        if edge == "rise":
            alert.current = {"started": probe.time}
        elif edge == "fall":
            alert.current = None
        if edge:
            run.edges.append((probe.time, edge))
    run.seconds = time.perf_counter() - started
    run.evaluations, run.skipped = alert.evaluations, alert.skipped
    run.frames = len(times)
    engine.close_session("s")
    return run


@dataclass
class Score:
    stretches: int = 0
    found: int = 0
    cleared: int = 0
    rises: int = 0
    correct: int = 0
    false_alerts: int = 0
    negative_alerts: int = 0
    delays: list[float] = field(default_factory=list)


def score_stream(run: StreamRun, period: float, out: Score) -> tuple[int, int, int]:
    """Adds the stream's counts to `out`; returns (stretches, found, false rises) for its row."""
    rises = [t for t, e in run.edges if e == "rise"]
    falls = [t for t, e in run.edges if e == "fall"]
    found = false = 0
    for a, b in run.stretches:
        hit = [t for t in rises if a - EPS <= t <= a + period + EPS]
        if not hit:
            continue
        found += 1
        out.delays.append(hit[0] - a)
        fall = next((t for t in falls if t > hit[0]), None)
        if fall is None:
            out.cleared += b >= run.end - EPS  # still visible when the stream ended
        else:
            out.cleared += b - EPS <= fall <= b + period + EPS
    for t in rises:
        if any(a - EPS <= t <= b + period + EPS for a, b in run.stretches):
            out.correct += 1
        else:
            false += 1
            if not run.present:
                out.negative_alerts += 1
    out.stretches += len(run.stretches)
    out.found += found
    out.rises += len(rises)
    out.false_alerts += false
    return len(run.stretches), found, false


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each stream")
    parser.add_argument("--fps", type=float, default=1.0, help="sampling rate = evaluation rate")
    parser.add_argument("--size", default="320x240", help="scene size WxH")
    parser.add_argument(
        "--tokens-per-frame",
        type=int,
        help="default: what the checkpoint was trained at (livelens.json), else 64",
    )
    parser.add_argument("--prune-threshold", type=float, default=0.1)
    parser.add_argument("--threshold", type=float, default=0.5, help="alert threshold")
    parser.add_argument("--hysteresis", type=float, default=0.1)
    parser.add_argument("--window", type=float, default=None, help="media seconds held")
    parser.add_argument("--kv-budget", default=DEFAULT_KV_BUDGET)
    parser.add_argument("--no-skip", action="store_true", help="evaluate every due frame")
    parser.add_argument(
        "--trace", action="store_true", help="print every evaluation's confidence against truth"
    )
    parser.add_argument(
        "--condition",
        default="a {o} is visible",
        help="the alert's condition, {o} = the object (a question ending in ? is asked as is)",
    )
    args = parser.parse_args(argv)
    width, height = (int(x) for x in args.size.split("x"))
    loaded = load_from_args(args)
    args.tokens_per_frame = args.tokens_per_frame or loaded.tokens_per_frame or 64
    period = 1.0 / args.fps

    print(f"# alerts: {args.streams} streams x {args.seconds:g} s at {args.fps:g} fps")
    print(
        f"machine: {platform.platform()}, {platform.processor() or 'cpu'}; "
        f"date {datetime.now(UTC):%Y-%m-%d}; model {loaded.name}"
    )
    print()
    print("| stream | object | present | stretches | found | rises | false | evals | skipped |")
    print("|---|---|---|---|---|---|---|---|---|")
    total = Score()
    traces: list[str] = []
    evaluations = skipped = frames = 0
    seconds = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.streams):
            seed = HELD_OUT_SEED + args.seed + k
            scene = generate_scene(seed, duration=args.seconds, size=(width, height))
            rng = random.Random(seed)
            present = k % 4 != 3
            names = [o.name for o in scene.objects]
            target = (
                rng.choice(names)
                if present
                else rng.choice([n for n in vocabulary() if n not in names])
            )
            video = scene.write(Path(tmp) / f"scene-{seed}.mp4")
            run = run_stream(loaded, seed, scene, video, target, args)
            stretches, found, false = score_stream(run, period, total)
            evaluations += run.evaluations
            skipped += run.skipped
            frames += run.frames
            seconds += run.seconds
            rises = sum(e == "rise" for _, e in run.edges)
            traces.append(f"{seed} {target}: {trace_line(run.trace)}")
            print(
                f"| {seed} | {target} | {'yes' if present else 'no'} | {stretches} | {found} | "
                f"{rises} | {false} | {run.evaluations} | {run.skipped} |",
                flush=True,
            )
    if args.trace:
        print()
        print("Confidence per evaluation, in tenths (Y: the object is visible then, .: not):")
        print()
        print("```")
        print("\n".join(traces))
        print("```")
    recall = total.found / total.stretches if total.stretches else float("nan")
    precision = total.correct / total.rises if total.rises else float("nan")
    delay = statistics.median(total.delays) if total.delays else float("nan")
    clear = total.cleared / total.found if total.found else float("nan")
    print()
    print(
        f"stretches {total.stretches}, found {total.found}, cleared in time {total.cleared}, "
        f"rises {total.rises}, alerts on streams without the object {total.negative_alerts}; "
        f"{frames} frames in {seconds:.1f} s of engine time"
    )
    print(
        f"recall={recall:.3f} precision={precision:.3f} median_delay_s={delay:.2f} "
        f"false_alerts={total.false_alerts} clear_rate={clear:.3f} evaluations={evaluations} "
        f"skipped={skipped}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
