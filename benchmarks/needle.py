"""Needle in an hour: does an answer about the past find an object that left the window long ago?

Each stream is 60 minutes at 1 fps (--minutes) of one generated camera (seed HELD_OUT_SEED +
--seed + k, never trained on): its background with sensor noise throughout, and one object
that is visible only inside minutes 2-3 (a 60 s generated scene with that object is played
there). The session holds a 5-minute window (--window) and remembers the rest (--memory), so by
the end the object has been out of the window for more than 50 minutes. Frames go through the
real engine one at a time as in real time (DiffFP, the window's slides, memory). At the end the
stream is asked "When did the <object> first appear?" twice, side by side:

- recall: `memory="recall"`, answered over the best-matching remembered frames + the window;
- window: `memory="window"`, the window alone (the cost baseline; it cannot see the object).

A recall answer scores when one of its segments has IoU >= 0.5 with the object's first visible
interval (target, issue 12: >= 80% of 20 streams). Times are from the question's submission to
its first token (the recalling context's prefill included).

Prints a table per stream and ONE summary line:
`found=<x> recall_ttft_ms=<y> window_ttft_ms=<z> memory_frames=<n> needle_recalled=<r>`
(needle_recalled: share of streams where at least one recalled frame shows the object: the
selection's part, whatever the answer says).

    python benchmarks/needle.py --streams 20 --seed 0 --model PATH/TO/tiny-grounding
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import threading
import time
from datetime import UTC, datetime

import av
import numpy as np
from latency import add_model_args, load_from_args, open_stream

from livelens.model.engine import Answer, Engine, EngineConfig, QuestionJob
from livelens.model.grounding import Segment
from livelens.model.runner import ModelRunner
from livelens.model.sampling import SamplingParams
from livelens.model.scenes import generate_scene, vocabulary
from livelens.model.training import HELD_OUT_SEED
from livelens.stream.grid import choose_grid, resize_to_grid

NEEDLE_AT = 120.0
"""Stream seconds at which the needle's 60 s scene starts playing."""


def iou(segment: Segment, truth: tuple[float, float]) -> float:
    inter = max(0.0, min(segment.end, truth[1]) - max(segment.start, truth[0]))
    union = max(segment.end, truth[1]) - min(segment.start, truth[0])
    return inter / union if union > 0 else 0.0


def ask(engine: Engine, question: str, memory: str, tokens: int) -> tuple[Answer, float]:
    """Submit, step until answered; (answer, seconds from submission to the first token)."""
    done = threading.Event()
    out: dict = {}

    def on_token(_: str) -> None:
        out.setdefault("first", time.perf_counter())

    def on_done(answer: Answer) -> None:
        out["answer"] = answer
        done.set()

    def on_error(exc: Exception) -> None:
        out["error"] = exc
        done.set()

    job = QuestionJob(
        question,
        SamplingParams(max_new_tokens=tokens),
        lambda: None,
        on_token,
        on_done,
        on_error,
        memory=memory,
    )
    submitted = time.perf_counter()
    engine.submit_question("s", job)
    while not done.is_set():
        engine.step()
    if "error" in out:
        raise RuntimeError(f"the question failed: {out['error']}")
    first = out.get("first", time.perf_counter())
    return out["answer"], first - submitted


def run_stream(loaded, k: int, args: argparse.Namespace) -> dict:
    seed = HELD_OUT_SEED + args.seed + k
    target = random.Random(seed).choice(vocabulary())
    needle = generate_scene(seed, duration=60.0, objects=[target], size=(args.width, args.height))
    visible = needle.object(target).visible  # type: ignore[union-attr]
    truth = (NEEDLE_AT + visible[0].start, NEEDLE_AT + visible[0].end)
    # Outside minutes 2-3 the camera shows the same background at a moment without the object.
    empty = next((t for t in needle.frame_times() if not needle.visible_at(t)), None)
    grid = choose_grid(args.height, args.width, tokens_per_frame=args.tokens_per_frame)
    engine = Engine(ModelRunner(loaded), EngineConfig(kv_budget=args.kv_budget))
    open_stream(engine, grid, args.prune_threshold, window_s=args.window, memory_s=args.memory)
    started = time.perf_counter()
    for i in range(int(args.minutes * 60)):
        t = float(i)
        if NEEDLE_AT <= t < NEEDLE_AT + 60.0:
            rgb = needle.frame(t - NEEDLE_AT, index=i)
        else:
            rgb = needle.frame(empty if empty is not None else 0.0, index=i)
            if empty is None:  # the object never leaves its scene: draw the background only
                rgb = np.ascontiguousarray(needle._background)
        image = resize_to_grid(av.VideoFrame.from_ndarray(rgb, format="rgb24"), grid)
        engine.submit_frame("s", image, t)
        while engine.pending("s") or not engine.settled("s"):
            engine.step()
    feed_s = time.perf_counter() - started
    question = f"When did the {target} first appear?"
    recall, recall_ttft = ask(engine, question, "recall", args.answer_tokens)
    _, window_ttft = ask(engine, question, "window", args.answer_tokens)
    stats = engine.stats("s")
    best = max((iou(s, truth) for s in recall.segments), default=0.0)
    return {
        "seed": seed,
        "target": target,
        "truth": truth,
        "answer": recall.text,
        "iou": best,
        "recalled": recall.recalled,
        "hits": sum(truth[0] <= t <= truth[1] for t in recall.recalled),
        "recall_ttft": recall_ttft,
        "window_ttft": window_ttft,
        "memory_frames": stats.memory_frames if stats else 0,
        "window_start": stats.window_start if stats else None,
        "feed_s": feed_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--window", type=float, default=300.0, help="media seconds held")
    parser.add_argument("--memory", type=float, default=3600.0, help="media seconds remembered")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument(
        "--tokens-per-frame",
        type=int,
        help="default: what the checkpoint was trained at (livelens.json), else 64",
    )
    parser.add_argument("--prune-threshold", type=float, default=4.0)
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--kv-budget", default="2GiB")
    args = parser.parse_args(argv)
    if args.minutes * 60 < NEEDLE_AT + 60 + args.window:
        parser.error("--minutes must leave the needle out of the window by the end")
    loaded = load_from_args(args)
    args.tokens_per_frame = args.tokens_per_frame or loaded.tokens_per_frame or 64

    print(
        f"# needle: {args.streams} streams x {args.minutes:g} min at 1 fps, window "
        f"{args.window:g} s, memory {args.memory:g} s"
    )
    print(
        f"machine: {platform.platform()}, {platform.processor() or 'cpu'}; "
        f"date {datetime.now(UTC):%Y-%m-%d}; model {loaded.name}"
    )
    print()
    print(
        "| stream | object | truth s | recall answer | IoU | recalled frames (showing it) "
        "| recall TTFT ms | window TTFT ms | memory frames | feed s |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for k in range(args.streams):
        row = run_stream(loaded, k, args)
        rows.append(row)
        a, b = row["truth"]
        print(
            f"| {row['seed']} | {row['target']} | {a:.0f}-{b:.0f} | {row['answer'][:40]!r} | "
            f"{row['iou']:.2f} | {len(row['recalled'])} ({row['hits']}) | "
            f"{row['recall_ttft'] * 1e3:.0f} | "
            f"{row['window_ttft'] * 1e3:.0f} | {row['memory_frames']} | {row['feed_s']:.0f} |",
            flush=True,
        )
    found = sum(r["iou"] >= 0.5 for r in rows) / len(rows)
    recall_ms = statistics.median(r["recall_ttft"] for r in rows) * 1e3
    window_ms = statistics.median(r["window_ttft"] for r in rows) * 1e3
    memory = statistics.median(r["memory_frames"] for r in rows)
    hit = sum(r["hits"] > 0 for r in rows) / len(rows)
    print()
    print(
        f"found={found:.2f} recall_ttft_ms={recall_ms:.0f} window_ttft_ms={window_ms:.0f} "
        f"memory_frames={memory:.0f} needle_recalled={hit:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
