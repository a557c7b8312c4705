"""Temporal grounding on held-out generated scenes: offline, live (pull, WHIP) and the oracle.

Each scene (seed HELD_OUT_SEED + k, never trained on; 12-30 s, size and frame rate drawn by the
generator) is written as H.264 and asked the same questions on every path: a WHEN question for
every object in it and for one absent object, FIRST for objects that come twice, yes/no AT
questions at sampled frame times and NOW questions. Answers are greedy.

- offline: what `livelens ask` runs (stream/ingest.py sample_file -> VideoSession), in process,
  one session per scene with every question asked on it;
- pull: a real `livelens serve` (its own process, uvicorn, Redis) plays the file in real time as
  a pull source (POST /v1/sessions); questions go over the websocket once it has played;
- whip: the same server, the file published by clients/publisher.py's Publisher over WHIP;
- oracle: transformers' own `model.generate` over the whole prompt (model/reference.py) on the
  frames the offline path sampled; its answers must be token-identical to offline's.

`live` in --paths stands for pull and whip. Live sessions all run concurrently (they play in real
time). Ground truth per path uses that path's sampled frame times (the live ones are read back from
the server's thumbnails); model/scoring.py computes the metrics.

    python benchmarks/grounding.py --scenes 8 --seed 0 --paths offline,live,oracle \\
        --model tiny-grounding --json grounding.json

The last line is `mIoU=<x> R@0.5=<y> yes_no=<z>` for the first path given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from livelens.model.qa import QA, Kind, QuestionMaker
from livelens.model.scenes import Scene, generate_scene, vocabulary
from livelens.model.scoring import Scores
from livelens.model.training import HELD_OUT_SEED
from livelens.stream.sampler import FpsSampler

PATHS = ("offline", "pull", "whip", "oracle")
ALIASES = {"live": ("pull", "whip")}
LIVE_PATHS = ("pull", "whip")
DEFAULT_PATHS = "offline,live,oracle"
# Seconds `livelens serve` may take to load the model and answer /healthz on a busy CPU.
SERVER_START_S = 180.0


# ------------------------------------------------------------------------------------ scenes
@dataclass(frozen=True)
class Ask:
    """A question to ask about a scene, before it is phrased against a path's frame times."""

    kind: Kind
    name: str
    moment: float | None = None


@dataclass
class Case:
    """One held-out scene, its video file, its nominal sampled times and its questions."""

    seed: int
    scene: Scene
    video: Path
    times: list[float]
    """Times a sampler at --fps keeps from the file (frame i is at i / scene fps)."""
    plan: list[Ask]

    def questions(self, times: Sequence[float]) -> list[QA]:
        """The plan as Q&A pairs, true for frames sampled at `times`."""
        maker = QuestionMaker(self.scene, times)
        out = []
        for ask in self.plan:
            if ask.kind is Kind.WHEN:
                out.append(maker.when(ask.name))
            elif ask.kind is Kind.FIRST:
                out.append(maker.first(ask.name))
            elif ask.kind is Kind.AT:
                assert ask.moment is not None
                out.append(maker.at(ask.name, ask.moment))
            else:
                out.append(maker.now(ask.name))
        return out


def plan_questions(scene: Scene, times: Sequence[float], rng: random.Random, at: int) -> list[Ask]:
    """WHEN for every object and one absent one, FIRST for repeat visitors, AT and NOW yes/no.

    AT questions alternate, where the moment allows, between an object visible then (yes) and
    one that is not (no), so answering always the same word scores about 0.5 on them.
    """
    present = [o.name for o in scene.objects]
    absent = rng.choice([n for n in vocabulary() if n not in present])
    plan = [Ask(Kind.WHEN, n) for n in present] + [Ask(Kind.WHEN, absent)]
    plan += [Ask(Kind.FIRST, o.name) for o in scene.objects if len(o.visible) > 1]
    for i, t in enumerate(sorted(rng.sample(list(times), min(at, len(times))))):
        seen = [o.name for o in scene.visible_at(t)]
        unseen = [n for n in present if n not in seen] or [absent]
        pool = seen if i % 2 == 0 and seen else unseen
        plan.append(Ask(Kind.AT, rng.choice(pool), t))
    plan += [Ask(Kind.NOW, n) for n in [*present, absent]]
    return plan


def make_cases(
    count: int,
    seed: int,
    workdir: Path,
    *,
    fps: float,
    seconds: tuple[float, float],
    size: tuple[int, int] | None,
    scene_fps: int | None,
    at_questions: int,
) -> list[Case]:
    """`count` held-out scenes written as H.264 under `workdir`."""
    cases = []
    for k in range(count):
        scene_seed = HELD_OUT_SEED + seed + k
        rng = random.Random(scene_seed)
        duration = round(rng.uniform(*seconds), 1)
        scene = generate_scene(scene_seed, duration=duration, fps=scene_fps, size=size)
        video = scene.write(workdir / f"scene-{scene_seed}.mp4")
        sampler = FpsSampler(fps)
        times = [t for t in scene.frame_times() if sampler.offer(t)]
        plan = plan_questions(scene, times, rng, at_questions)
        cases.append(Case(scene_seed, scene, video, times, plan))
    return cases


# ------------------------------------------------------------------------------------ answers
@dataclass
class Reply:
    question: str
    text: str
    stream_end: float
    """Media time of the last frame the answer saw."""
    token_ids: list[int] | None = None


@dataclass
class SceneRun:
    """One path's view of one scene: the frame times it sampled and its answers."""

    times: list[float]
    replies: list[Reply]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PathRun:
    path: str
    scenes: dict[int, SceneRun] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


def run_local(
    cases: Sequence[Case],
    loaded: Any,
    paths: Sequence[str],
    *,
    fps: float,
    threshold: float,
    tokens_per_frame: int,
    max_new_tokens: int,
) -> dict[str, PathRun]:
    """offline and oracle, in this process, over the frames `livelens ask` samples."""
    from livelens.model.reference import OfflineReference
    from livelens.model.runner import ModelRunner
    from livelens.model.sampling import SamplingParams
    from livelens.model.session import VideoSession
    from livelens.stream.cli import DEFAULT_CHUNK
    from livelens.stream.ingest import sample_file

    runner = ModelRunner(loaded)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    runs = {p: PathRun(p) for p in paths}
    for case in cases:
        started = time.perf_counter()
        grid, frames = sample_file(case.video, fps=fps, tokens_per_frame=tokens_per_frame)
        with frames:
            sampled = list(frames)
        images = np.stack([f.image for f in sampled])
        times = [f.time for f in sampled]
        questions = [qa.question for qa in case.questions(times)]
        decode_s = time.perf_counter() - started
        info = {"frames": len(times), "grid": [grid.width, grid.height]}
        if "offline" in runs:
            started = time.perf_counter()
            session = VideoSession(
                runner, height=grid.height, width=grid.width, threshold=threshold
            )
            for i in range(0, len(times), DEFAULT_CHUNK):
                session.append(images[i : i + DEFAULT_CHUNK], times[i : i + DEFAULT_CHUNK])
            replies = []
            for question in questions:
                answer = session.answer(question, params)
                replies.append(
                    Reply(question, answer.text, answer.stream_position, list(answer.token_ids))
                )
            info["kept_ratio"] = round(session.stats.kept_ratio, 4)
            runs["offline"].scenes[case.seed] = SceneRun(times, replies, dict(info))
            runs["offline"].seconds += decode_s + time.perf_counter() - started
        if "oracle" in runs:
            started = time.perf_counter()
            reference = OfflineReference(loaded, images, times, threshold=threshold)
            replies = []
            for question in questions:
                ids = reference.generate(question, max_new_tokens)
                text = loaded.tokenizer.decode(ids, skip_special_tokens=True)
                replies.append(Reply(question, text, times[-1], ids))
            runs["oracle"].scenes[case.seed] = SceneRun(times, replies, dict(info))
            runs["oracle"].seconds += decode_s + time.perf_counter() - started
        print(f"... scene {case.seed}: {', '.join(runs)} done", file=sys.stderr, flush=True)
    return runs


# --------------------------------------------------------------------------------- live server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server on a free port (no persistence); yields its URL."""
    port = _free_port()
    command = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {workdir / 'redis.log'})")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(process)


@contextlib.contextmanager
def live_server(
    workdir: Path,
    *,
    model: str,
    device: str | None,
    redis_url: str | None,
    fps: float,
    threshold: float,
    tokens_per_frame: int,
    sessions: int,
    pending_frames: int,
) -> Iterator[tuple[str, str]]:
    """`livelens serve` in its own process on a free port; yields (base URL, token)."""
    import httpx

    port = _free_port()
    token = secrets.token_urlsafe(24)
    command = [
        sys.executable, "-m", "livelens.stream.cli", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--model", model,
        "--redis-url", redis_url or "none", "--fps", str(fps),
        "--prune-threshold", str(threshold), "--tokens-per-frame", str(tokens_per_frame),
        "--max-sessions", str(sessions), "--max-pending-frames", str(pending_frames),
        "--allow-loopback-ice", "--log-level", "warning",
    ]  # fmt: skip
    if device:
        command += ["--device", device]
    log = workdir / "serve.log"
    env = {**os.environ, "LIVELENS_TOKEN": token}  # never on the command line
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).is_success:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"livelens serve did not come up:\n{tail}")
            time.sleep(0.25)
        yield url, token
    finally:
        _stop(process)


async def _settled(client: Any, session_id: str, *, ended: bool, timeout: float) -> Any:
    """Poll until the model holds every sampled frame (and, with `ended`, the source ended).

    Without `ended` (WHIP: the publisher has stopped sending, the session stays live), the
    session counts as settled once frames_received has not moved for two polls.
    """
    deadline = time.monotonic() + timeout
    previous = None
    steady = 0
    while True:
        status = (await client.session(session_id)).status
        if status is not None:
            done = status.frames_in_model + status.frames_dropped >= status.frames_sampled > 0
            steady = steady + 1 if status.frames_received == previous else 0
            previous = status.frames_received
            if (
                done
                and (status.finished if ended else steady >= 2)
                and not status.questions_waiting
            ):
                return status
            if status.state == "failed":
                raise RuntimeError(f"session {session_id} failed: {status.reason}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"session {session_id} did not settle in {timeout:.0f} s: {status}")
        await asyncio.sleep(0.5)


async def _ask_all(client: Any, session_id: str, questions: Sequence[str], tokens: int) -> list:
    replies = []
    for question in questions:
        answer = await client.answer(session_id, question, max_new_tokens=tokens, temperature=0)
        replies.append(Reply(question, answer.text, answer.stream_position))
    return replies


async def _one_live(
    path: str, case: Case, url: str, token: str, *, fps: float, threshold: float, tokens: int
) -> SceneRun:
    from livelens.clients import LiveLensClient, Publisher

    questions = [qa.question for qa in case.questions(case.times)]
    timeout = case.scene.duration * 4 + 120
    async with LiveLensClient(url, token=token, timeout=30.0) as client:
        if path == "pull":
            started = await client.start_pull(
                str(case.video), fps=fps, prune_threshold=threshold, realtime=True
            )
            sid = started.id
            status = await _settled(client, sid, ended=True, timeout=timeout)
            publisher = None
        else:
            publisher = Publisher(url, str(case.video), token=token, reconnect=False)
            sid = await publisher.start()
            await asyncio.wait_for(publisher.wait(), timeout)
            status = await _settled(client, sid, ended=False, timeout=timeout)
        try:
            times = [t.time for t in await client.thumbnails(sid)]
            replies = await _ask_all(client, sid, questions, tokens)
        finally:
            if publisher is not None:
                await publisher.close()
            with contextlib.suppress(Exception):
                await client.delete(sid)
    info = {
        "frames": status.frames_in_model,
        "frames_received": status.frames_received,
        "frames_dropped": status.frames_dropped,
        "kept_ratio": status.kept_ratio,
    }
    return SceneRun(times, replies, info)


async def run_live(
    cases: Sequence[Case],
    paths: Sequence[str],
    url: str,
    token: str,
    *,
    fps: float,
    threshold: float,
    max_new_tokens: int,
) -> dict[str, PathRun]:
    """Every (path, scene) session at once; a path that fails is reported, not fatal."""
    runs = {p: PathRun(p) for p in paths}
    jobs = [(p, c) for p in paths for c in cases]
    started = time.perf_counter()

    async def one(path: str, case: Case) -> None:
        try:
            run = await _one_live(
                path, case, url, token, fps=fps, threshold=threshold, tokens=max_new_tokens
            )
        except Exception as exc:
            runs[path].error = f"scene {case.seed}: {type(exc).__name__}: {exc}"
            print(f"... {path} scene {case.seed} failed: {exc}", file=sys.stderr, flush=True)
            return
        runs[path].scenes[case.seed] = run
        runs[path].seconds = time.perf_counter() - started
        print(f"... scene {case.seed}: {path} done", file=sys.stderr, flush=True)

    await asyncio.gather(*(one(p, c) for p, c in jobs))
    return runs


# ------------------------------------------------------------------------------------ scoring
def score(
    run: PathRun, cases: Sequence[Case], offline: PathRun | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The path's summary (scoring.py's metrics + agreement with offline) and per-answer rows."""
    scores = Scores()
    rows: list[dict[str, Any]] = []
    same = compared = 0
    times_same = 0
    for case in cases:
        scene = run.scenes.get(case.seed)
        if scene is None:
            continue
        base = offline.scenes.get(case.seed) if offline is not None else None
        times_same += base is not None and base.times == scene.times
        by_question = {r.question: r for r in base.replies} if base is not None else {}
        for qa, reply in zip(case.questions(scene.times), scene.replies, strict=True):
            assert qa.question == reply.question
            value = scores.add(qa, reply.text, reply.stream_end)
            row = {"scene": case.seed, "kind": str(qa.kind), "question": qa.question}
            row |= {"truth": qa.answer, "answer": reply.text, "stream_end": reply.stream_end}
            if value is not None:
                row["iou"] = round(value, 4)
            other = by_question.get(qa.question)
            if other is not None and run.path != "offline":
                # Token ids where both sides have them (oracle), else the text (live paths).
                if reply.token_ids is not None and other.token_ids is not None:
                    equal = reply.token_ids == other.token_ids
                else:
                    equal = reply.text == other.text
                row["same_as_offline"] = equal
                same += equal
                compared += 1
            rows.append(row)
    summary: dict[str, Any] = scores.summary()
    summary["yes_no_by"] = scores.yes_no_by
    summary["scenes"] = len(run.scenes)
    summary["same_as_offline"] = same if compared else None
    summary["compared"] = compared
    summary["times_as_offline"] = (
        times_same if offline is not None and run.path != "offline" else None
    )
    summary["seconds"] = round(run.seconds, 1)
    summary["error"] = run.error
    return summary, rows


def _cell(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown table: one row per path."""
    lines = [
        "| path | n | mIoU | R@0.3 | R@0.5 | R@0.7 | yes/no | boundary s | absent | "
        "= offline | frames = offline | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path, s in summaries.items():
        same = "-" if s["same_as_offline"] is None else f"{s['same_as_offline']}/{s['compared']}"
        frames = "-" if s["times_as_offline"] is None else f"{s['times_as_offline']}/{s['scenes']}"
        lines.append(
            f"| {path} | {s['n']} | {_cell(s['mIoU'])} | {_cell(s['R@0.3'])} | "
            f"{_cell(s['R@0.5'])} | {_cell(s['R@0.7'])} | {_cell(s['yes_no'])} | "
            f"{_cell(s['boundary_s'], 2)} | {_cell(s['absent'])} | {same} | {frames} | "
            f"{s['seconds']:.0f} |"
        )
    return lines


def yes_no_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown table: per path and yes/no kind, how often each true answer was given (a model
    that leans to one answer shows here, not in the overall accuracy)."""
    lines = ['| path | kind | "Yes." when yes | "No." when no |', "|---|---|---:|---:|"]
    for path, s in summaries.items():
        for kind in (Kind.AT, Kind.NOW):
            cells = [s["yes_no_by"].get(f"{kind} {truth}", [0, 0]) for truth in ("Yes.", "No.")]
            lines.append(
                f"| {path} | {kind} | " + " | ".join(f"{r} of {n}" for r, n in cells) + " |"
            )
    return lines


def summary_line(summary: dict[str, Any]) -> str:
    return f"mIoU={summary['mIoU']:.3f} R@0.5={summary['R@0.5']:.3f} yes_no={summary['yes_no']:.3f}"


# --------------------------------------------------------------------------------------- main
def parse_paths(text: str) -> list[str]:
    out: list[str] = []
    for name in (p.strip() for p in text.split(",") if p.strip()):
        for path in ALIASES.get(name, (name,)):
            if path not in PATHS:
                raise argparse.ArgumentTypeError(
                    f"unknown path {name!r}: choose from {', '.join([*PATHS, *ALIASES])}"
                )
            if path not in out:
                out.append(path)
    if not out:
        raise argparse.ArgumentTypeError("no path given")
    return out


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=8, help="held-out scenes (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="first scene is HELD_OUT_SEED + seed")
    parser.add_argument(
        "--paths",
        type=parse_paths,
        default=parse_paths(DEFAULT_PATHS),
        help=f"comma-separated, from {', '.join([*PATHS, *ALIASES])} (default {DEFAULT_PATHS})",
    )
    parser.add_argument("--model", default="tiny-grounding")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--fps", type=float, default=1.0, help="frames sampled per media second")
    parser.add_argument("--prune-threshold", type=float, default=0.1)
    parser.add_argument(
        "--tokens-per-frame", type=int, default=None, help="default: the checkpoint's own"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--min-seconds", type=float, default=12.0)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--size", type=_size, default=None, help="WxH (default: the generator's)")
    parser.add_argument("--scene-fps", type=int, default=None, help="default: the generator's")
    parser.add_argument("--at-questions", type=int, default=4, help="AT questions per scene")
    parser.add_argument(
        "--redis-url",
        default="auto",
        help="Redis of the live server: 'auto' starts a redis-server on a free port (if "
        "installed), 'none' runs it single-node",
    )
    parser.add_argument(
        "--max-pending-frames",
        type=int,
        default=256,
        help="live server: frames a session may queue, so a slow CPU delays rather than drops",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep scenes and logs here")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from livelens.model.loading import load_model
    from livelens.stream.cli import model_tokens_per_frame

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        loaded = load_model(args.model, device=args.device)
        # As `livelens ask` and `serve` choose it: the flag, else the checkpoint's livelens.json.
        tokens_per_frame = args.tokens_per_frame or model_tokens_per_frame(
            args.model, loaded.tokens_per_frame
        )
        cases = make_cases(
            args.scenes,
            args.seed,
            workdir,
            fps=args.fps,
            seconds=(args.min_seconds, args.max_seconds),
            size=args.size,
            scene_fps=args.scene_fps,
            at_questions=args.at_questions,
        )
        runs: dict[str, PathRun] = {}
        local = [p for p in args.paths if p in ("offline", "oracle")]
        live = [p for p in args.paths if p in LIVE_PATHS]
        if local:
            runs |= run_local(
                cases,
                loaded,
                local,
                fps=args.fps,
                threshold=args.prune_threshold,
                tokens_per_frame=tokens_per_frame,
                max_new_tokens=args.max_new_tokens,
            )
        if live:
            redis_url = None if args.redis_url.lower() == "none" else args.redis_url
            if args.redis_url == "auto":
                redis_url = (
                    stack.enter_context(redis_server(workdir))
                    if shutil.which("redis-server")
                    else None
                )
            url, token = stack.enter_context(
                live_server(
                    workdir,
                    model=args.model,
                    device=args.device,
                    redis_url=redis_url,
                    fps=args.fps,
                    threshold=args.prune_threshold,
                    tokens_per_frame=tokens_per_frame,
                    sessions=len(cases) * len(live),
                    pending_frames=args.max_pending_frames,
                )
            )
            runs |= asyncio.run(
                run_live(
                    cases,
                    live,
                    url,
                    token,
                    fps=args.fps,
                    threshold=args.prune_threshold,
                    max_new_tokens=args.max_new_tokens,
                )
            )

    offline = runs.get("offline")
    summaries: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[dict[str, Any]]] = {}
    for path in args.paths:
        summaries[path], answers[path] = score(runs[path], cases, offline)

    print(f"# Grounding on {len(cases)} held-out scenes ({args.model})")
    print(
        f"date {datetime.now(UTC):%Y-%m-%d}, seeds {cases[0].seed}..{cases[-1].seed}, "
        f"{args.fps:g} fps, {tokens_per_frame} tokens/frame, threshold {args.prune_threshold:g}, "
        f"greedy, max {args.max_new_tokens} new tokens, {platform.machine()}"
    )
    print()
    for line in table(summaries):
        print(line)
    print()
    for line in yes_no_table(summaries):
        print(line)
    for path, s in summaries.items():
        if s["error"]:
            print(f"{path}: {s['error']}")
    if args.json:
        result = {
            "config": vars(args) | {"tokens_per_frame": tokens_per_frame},
            "scenes": [
                {**c.scene.ground_truth(), "video": str(c.video), "times": c.times} for c in cases
            ],
            "paths": {
                p: {
                    "summary": summaries[p],
                    "scenes": {str(k): asdict(v) for k, v in runs[p].scenes.items()},
                    "answers": answers[p],
                }
                for p in args.paths
            },
        }
        args.json.write_text(json.dumps(_clean(result), indent=1) + "\n")
    print(summary_line(summaries[args.paths[0]]))
    return 0


def _clean(value: Any) -> Any:
    """JSON-ready: NaN (a metric with nothing to average) becomes null, paths become text."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
