"""`livelens` command line: `livelens ask VIDEO "question"` streams an answer with timestamps.

`serve` runs the live service; `publish`, `sessions`, `watch`, `alerts` and `ask --server` are its
client
(livelens/clients/cli.py) and never load the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from livelens.stream.errors import SourceError, UsageError
from livelens.stream.grid import DEFAULT_TOKENS_PER_FRAME, MIN_TOKENS_PER_FRAME

if TYPE_CHECKING:
    from livelens.model.session import Answer
    from livelens.stream.auth import KeyRing

logger = logging.getLogger(__name__)

# Frames per append: batches the vision encoder without holding much of the video in memory.
DEFAULT_CHUNK = 8
DEFAULT_FPS = "1"
DEFAULT_PRUNE_THRESHOLD = "0.1"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
# `ask` flags that only make sense for a local file; with --server they are a usage error, so
# they default to None (the real defaults are filled in by cmd_ask).
_LOCAL_ASK_FLAGS = {
    "model": "--model",
    "fps": "--fps",
    "prune_threshold": "--prune-threshold",
    "tokens_per_frame": "--tokens-per-frame",
    "device": "--device",
    "chunk": "--chunk",
}
CLIENT_COMMANDS = ("publish", "sessions", "watch", "alerts")


def _number(flag: str, value: str, *, zero_ok: bool) -> float:
    """Parse a finite number for `flag`: > 0, or >= 0 when zero_ok."""
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{flag} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise UsageError(f"{flag} must be a finite number {bound}, got {value}")
    return number


class _ModelDefaultHelp(argparse.HelpFormatter):
    """Fills {default_model} into help texts only when help is shown.

    The constant lives with the model loader, which imports torch; client commands must not.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text and "{default_model}" in text:
            from livelens.model.loading import DEFAULT_MODEL

            text = text.replace("{default_model}", DEFAULT_MODEL)
        return text


def _add_client_options(parser: argparse.ArgumentParser, *, server_required: bool) -> None:
    parser.add_argument(
        "--server",
        required=server_required,
        metavar="URL",
        help="base URL of a `livelens serve`, e.g. http://gpu-node:8000",
    )
    parser.add_argument(
        "--key",
        "--token",
        dest="token",
        default=None,
        help="API key (or the server's --token) sent as the bearer token (default: "
        "$LIVELENS_KEY, else $LIVELENS_TOKEN)",
    )


def build_parser() -> argparse.ArgumentParser:
    from livelens.model.kv import DEFAULT_KV_BUDGET

    parser = argparse.ArgumentParser(
        prog="livelens", description="Ask questions about live video, answered with timestamps."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser(
        "ask",
        help="answer a question about a video file, or about a live session with --server",
        formatter_class=_ModelDefaultHelp,
    )
    ask.add_argument(
        "video",
        metavar="VIDEO|SESSION",
        help="path of any video file FFmpeg reads; with --server, the id of a live session",
    )
    ask.add_argument("question")
    _add_client_options(ask, server_required=False)
    ask.add_argument(
        "--model",
        default=None,
        help="hub id or local directory of a VideoLLaMA3 checkpoint, or 'tiny' (offline test "
        "model); default $LIVELENS_MODEL, else {default_model}",
    )
    ask.add_argument(
        "--fps", default=None, help=f"frames sampled per media second (default {DEFAULT_FPS})"
    )
    ask.add_argument(
        "--prune-threshold",
        default=None,
        help="DiffFP threshold: a token is kept when its mean pixel change x255 exceeds it "
        f"(default {DEFAULT_PRUNE_THRESHOLD}, the paper's; live cameras need ~4 to prune "
        "anything)",
    )
    ask.add_argument(
        "--tokens-per-frame",
        type=int,
        default=None,
        help="visual token budget per frame before pruning (default: what the checkpoint "
        f"asks for in its livelens.json, else {DEFAULT_TOKENS_PER_FRAME}; at least "
        f"{MIN_TOKENS_PER_FRAME}: VideoLLaMA3 enlarges smaller frames to that)",
    )
    ask.add_argument("--max-new-tokens", type=int, default=128)
    ask.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--top-k", type=int, default=0)
    ask.add_argument("--seed", type=int, default=None)
    ask.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="penalty on tokens already in the answer, greedy decoding included (default: the "
        "checkpoint's generation_config.json value, e.g. 1.1 for VideoLLaMA3-2B; 1 = off)",
    )
    ask.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    ask.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)

    publish = sub.add_parser(
        "publish", help="publish a video file, V4L2 camera or RTSP stream to a server (WHIP)"
    )
    publish.add_argument(
        "source",
        metavar="SOURCE",
        help="video file, V4L2 device (/dev/video0) or rtsp:// URL (pulled over TCP)",
    )
    _add_client_options(publish, server_required=True)
    publish.add_argument("--loop", action="store_true", help="files: start over at the end")
    publish.add_argument("--video-size", default=None, help="V4L2: capture size, e.g. 1280x720")
    publish.add_argument("--framerate", type=float, default=None, help="V4L2: frames per second")
    publish.add_argument(
        "--stun", action="append", metavar="URL", help="STUN server (stun:host:port); repeatable"
    )
    publish.add_argument(
        "--no-reconnect",
        action="store_true",
        help="stop instead of publishing again when the server restarts or drops the session",
    )

    sessions = sub.add_parser("sessions", help="list a server's sessions")
    _add_client_options(sessions, server_required=True)
    sessions.add_argument("--json", action="store_true", help="print the records as JSON")

    watch = sub.add_parser("watch", help="show a session's progress live until it ends")
    watch.add_argument("session", metavar="SESSION", help="session id")
    _add_client_options(watch, server_required=True)

    alerts = sub.add_parser("alerts", help="add, list, remove or watch a session's alerts")
    actions = alerts.add_subparsers(dest="alerts_command", required=True)
    add = actions.add_parser("add", help="add a standing yes/no question to a live session")
    add.add_argument("session", metavar="SESSION", help="session id")
    add.add_argument("condition", metavar="CONDITION", help='e.g. "a red ball is visible"')
    add.add_argument(
        "--every", type=float, default=1.0, metavar="S", help="media seconds between evaluations"
    )
    add.add_argument(
        "--cooldown", type=float, default=10.0, metavar="S", help="media seconds between events"
    )
    add.add_argument(
        "--threshold", type=float, default=0.5, metavar="P", help="confidence to become active"
    )
    add.add_argument(
        "--hysteresis",
        type=float,
        default=0.1,
        metavar="H",
        help="inactive again below threshold - H",
    )
    add.add_argument("--webhook", default=None, metavar="URL", help="POST each event here (signed)")
    _add_client_options(add, server_required=True)
    listed = actions.add_parser("list", help="the session's alerts")
    listed.add_argument("session", metavar="SESSION", help="session id")
    listed.add_argument("--json", action="store_true", help="print the alerts as JSON")
    _add_client_options(listed, server_required=True)
    remove = actions.add_parser("rm", help="remove an alert")
    remove.add_argument("session", metavar="SESSION", help="session id")
    remove.add_argument("alert_id", metavar="ALERT_ID", help="the alert's id (al_...)")
    _add_client_options(remove, server_required=True)
    watched = actions.add_parser("watch", help="print alert events as they happen")
    watched.add_argument("session", metavar="SESSION", help="session id")
    watched.add_argument("--json", action="store_true", help="raw JSON lines")
    _add_client_options(watched, server_required=True)

    serve = sub.add_parser(
        "serve",
        help="run the live service: WHIP/RTSP/HLS ingest, websocket questions, REST",
        formatter_class=_ModelDefaultHelp,
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    serve.add_argument(
        "--model",
        default=None,
        help="as for `ask` (default $LIVELENS_MODEL, else {default_model}; with --demo, "
        "tiny-grounding when installed, else tiny)",
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="also publish the session 'demo': a generated scene played in a loop (the model "
        "defaults to tiny-grounding, trained on such scenes)",
    )
    serve.add_argument(
        "--redis-url",
        default=None,
        help="Redis for the session registry and answer history; 'none' = single node, "
        f"in-process only (default $LIVELENS_REDIS_URL, else {DEFAULT_REDIS_URL}). A password "
        "here shows in the process list: use $LIVELENS_REDIS_URL or --redis-url-file for one",
    )
    serve.add_argument(
        "--redis-url-file",
        default=None,
        metavar="FILE",
        help="read the Redis URL (password included) from FILE instead",
    )
    serve.add_argument("--fps", default="1", help="default frames sampled per media second")
    serve.add_argument(
        "--prune-threshold", default="0.1", help="default DiffFP threshold (see `ask`)"
    )
    serve.add_argument(
        "--tokens-per-frame",
        type=int,
        default=None,
        help="visual token budget per frame (default: the checkpoint's livelens.json, else "
        f"{DEFAULT_TOKENS_PER_FRAME})",
    )
    serve.add_argument(
        "--token",
        default=None,
        help="one admin API key (default: $LIVELENS_TOKEN); with neither it nor --keys-file, "
        "anyone may do anything",
    )
    serve.add_argument(
        "--keys-file",
        default=None,
        metavar="FILE",
        help="scoped API keys, lines of 'NAME SCOPES sha256:HEX' (see `livelens key`); SIGHUP "
        "reads it again (default: $LIVELENS_KEYS_FILE)",
    )
    serve.add_argument("--max-sessions", type=int, default=16, help="live sessions per node")
    serve.add_argument(
        "--max-pending-frames",
        type=int,
        default=8,
        help="sampled frames a session may queue for the model before the oldest are dropped",
    )
    serve.add_argument(
        "--window",
        default="auto",
        help="media seconds of video each session's model holds; older frames slide out and the "
        "rest is re-prefilled (exact). 'auto' (default): what fits the context unpruned and a "
        "fair share of the KV pool, e.g. ~4.8 min at 1 fps and 91 tokens per frame",
    )
    serve.add_argument(
        "--memory",
        default="600",
        help="media seconds of stream before the window whose frames stay in host memory for "
        "questions about the past (answered over the best-matching older frames + the window); "
        "0 = none. Host memory per session ~ frames x kept tokens x hidden size x 2 bytes",
    )
    serve.add_argument(
        "--kv-budget",
        default=DEFAULT_KV_BUDGET,
        help="KV cache pool for all sessions: bytes ('8GiB', '512MB') or a fraction of the "
        "device memory free after loading the model (default %(default)s); a new session is "
        "refused with 503 kv_pool_exhausted when the pool cannot hold its minimum",
    )
    serve.add_argument(
        "--thumbnails",
        type=int,
        default=300,
        help="JPEG thumbnails of the newest sampled frames kept per session for the console "
        "(default 300)",
    )
    serve.add_argument("--status-interval", default="2", help="seconds between status messages")
    serve.add_argument(
        "--stall-after",
        default="5",
        help="seconds without a frame after which a live session shows `stalled` (default 5)",
    )
    serve.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    serve.add_argument(
        "--cors-origin", default="*", help="Access-Control-Allow-Origin for WHIP (default *)"
    )
    serve.add_argument(
        "--pull-give-up",
        default="60",
        help="seconds a pull source may stay unreachable before its session fails (default 60)",
    )
    from livelens.stream import limits

    limits.add_flags(serve)
    serve.add_argument(
        "--allow-source",
        action="append",
        default=[],
        metavar="HOST|CIDR",
        help="a host name or network that pull sources may reach although it is not public "
        "(loopback, private, link-local); repeatable, also $LIVELENS_ALLOW_SOURCES "
        "(comma-separated). Public addresses are always allowed",
    )
    serve.add_argument(
        "--media-root",
        default=None,
        metavar="DIR",
        help="pull sessions may play local files under DIR only (default $LIVELENS_MEDIA_ROOT; "
        "none = no local files)",
    )
    serve.add_argument(
        "--source-ca-file",
        default=None,
        metavar="PEM",
        help="certificate authorities trusted for https:// and rtsps:// pull sources, e.g. a "
        "private CA (default $LIVELENS_SOURCE_CA_FILE; none = the default trust store)",
    )
    serve.add_argument(
        "--alert-webhook-allow",
        action="append",
        default=[],
        metavar="HOST[:PORT]|CIDR",
        help="a destination alert webhooks may be sent to; repeatable, also "
        "$LIVELENS_ALERT_WEBHOOKS (comma-separated). Nothing is allowed by default",
    )
    serve.add_argument(
        "--max-alerts-per-session",
        type=int,
        default=8,
        help="standing questions (alerts) a session may have",
    )
    # Tests on one machine publish over 127.0.0.1, which aioice does not gather by default.
    serve.add_argument("--allow-loopback-ice", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])

    key = sub.add_parser(
        "key",
        help="make an API key: its keys-file line goes to stdout, the key itself to stderr",
    )
    key.add_argument("name", help="who or what holds the key (camera-1, analysts, ...)")
    key.add_argument(
        "--scopes",
        default="read",
        help="comma-separated: publish (WHIP), read (sessions, questions), admin (everything); "
        "default read",
    )
    key.add_argument(
        "--stdin",
        action="store_true",
        help="hash a key read from stdin instead of making one (e.g. to move --token into a file)",
    )
    return parser


def default_model() -> str:
    """--model when not given: $LIVELENS_MODEL (e.g. set once in a container), else the 2B."""
    from livelens.model.loading import DEFAULT_MODEL

    return os.environ.get("LIVELENS_MODEL") or DEFAULT_MODEL


def _fill_local_defaults(args: argparse.Namespace) -> None:
    """The defaults of `ask`'s local-only flags (None in the parser; see _LOCAL_ASK_FLAGS)."""
    defaults = {
        "model": default_model(),
        "fps": DEFAULT_FPS,
        "prune_threshold": DEFAULT_PRUNE_THRESHOLD,
        "chunk": DEFAULT_CHUNK,
    }
    for dest, value in defaults.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, value)


def model_tokens_per_frame(spec: str, preferred: int | None = None) -> int:
    """The per-frame token budget for a model: the checkpoint's own, else the default."""
    if preferred is None:
        from livelens.model.loading import preferred_tokens_per_frame, resolve_checkpoint

        preferred = preferred_tokens_per_frame(resolve_checkpoint(spec))
    return preferred or DEFAULT_TOKENS_PER_FRAME


def _is_client(args: argparse.Namespace) -> bool:
    """A command that talks to a server (and so must not load the model)."""
    if args.command == "ask" and args.server is None:
        if args.token is not None:
            raise UsageError("--token only applies with --server")
        return False
    if args.command == "ask":
        given = [flag for dest, flag in _LOCAL_ASK_FLAGS.items() if getattr(args, dest) is not None]
        if given:
            raise UsageError(
                f"{', '.join(given)} only applies to a local video file, not with --server"
            )
    return args.command == "ask" or args.command in CLIENT_COMMANDS


@dataclass(frozen=True)
class FileAnswer:
    """What `livelens ask VIDEO` answered, for callers that score it (`make demo`)."""

    answer: Answer
    times: list[float]
    """Media times of the frames the model saw."""


def cmd_ask(args: argparse.Namespace) -> int:
    ask_file(args)
    return 0


def ask_file(args: argparse.Namespace) -> FileAnswer:
    """`livelens ask VIDEO QUESTION`: stream the answer to stdout, then its segments and stats."""
    # Everything cheap is validated before the model loads, so bad input fails in milliseconds.
    from livelens.model.sampling import SamplingParams
    from livelens.model.session import VideoSession

    _fill_local_defaults(args)
    from livelens.stream.ingest import sample_file

    question = VideoSession.validate_question(args.question)
    fps = _number("--fps", args.fps, zero_ok=False)
    threshold = _number("--prune-threshold", args.prune_threshold, zero_ok=True)
    if args.tokens_per_frame is not None and args.tokens_per_frame < MIN_TOKENS_PER_FRAME:
        raise UsageError(
            f"--tokens-per-frame must be >= {MIN_TOKENS_PER_FRAME}, got {args.tokens_per_frame}"
        )
    if args.chunk <= 0:
        raise UsageError(f"--chunk must be > 0, got {args.chunk}")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
    )
    if args.tokens_per_frame is None:
        args.tokens_per_frame = model_tokens_per_frame(args.model)
    grid, frames = sample_file(
        args.video, fps=fps, tokens_per_frame=args.tokens_per_frame, on_progress=None
    )
    with frames:
        session = _open_session(args, grid, threshold)
        prefill_s = _ingest(session, frames, args.chunk)
        if session.stats.frames == 0:
            raise SourceError(f"{args.video}: no frame could be sampled")
        for piece in session.ask(question, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
    answer = session.last_answer
    sys.stdout.write("\n")
    segments = [{"start": s.start, "end": s.end} for s in answer.segments]
    print("segments: " + json.dumps(segments))
    stats = session.stats
    print(
        "stats: "
        + json.dumps(
            {
                "frames": stats.frames,
                "media_seconds": stats.last_time,
                "grid": [grid.width, grid.height],
                "kept_tokens": stats.kept_tokens,
                "total_tokens": stats.total_tokens,
                "kept_ratio": round(stats.kept_ratio, 4),
                "kv_tokens": stats.kv_tokens,
                "prefill_s": round(prefill_s, 3),
                "ttft_s": round(answer.prefill_seconds, 3),
                "answer_s": round(answer.total_seconds, 3),
                "answer_tokens": len(answer.token_ids),
            }
        )
    )
    return FileAnswer(answer, list(session.times))


def _open_session(args: argparse.Namespace, grid, threshold: float):
    from livelens.model.loading import load_model
    from livelens.model.runner import ModelRunner
    from livelens.model.session import VideoSession

    loaded = load_model(args.model, device=args.device)
    return VideoSession(
        ModelRunner(loaded), height=grid.height, width=grid.width, threshold=threshold
    )


def _ingest(session, frames, chunk: int) -> float:
    """Feed sampled frames to the session in chunks; returns seconds spent in the model."""
    from tqdm import tqdm

    duration = frames.source.duration
    model_seconds = 0.0
    bar = tqdm(
        total=round(duration, 1) if duration else None,
        unit="s",
        desc="ingest",
        file=sys.stderr,
        disable=None,  # no bar without a terminal (CI logs)
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} media s {postfix}",
    )
    images: list[np.ndarray] = []
    times: list[float] = []

    def flush() -> None:
        nonlocal model_seconds
        started = time.perf_counter()
        session.append(np.stack(images), times)
        model_seconds += time.perf_counter() - started
        bar.update(round(times[-1] - bar.n, 1))
        bar.set_postfix_str(f"kept {session.stats.kept_ratio:.0%}")
        images.clear()
        times.clear()

    with bar:
        for frame in frames:
            images.append(frame.image)
            times.append(frame.time)
            if len(images) == chunk:
                flush()
        if images:
            flush()
    return model_seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        client = _is_client(args)
    except UsageError as exc:
        print(f"livelens: error: {exc}", file=sys.stderr)
        return 2
    if client:
        return _client_main(args)
    if args.command == "key":
        return cmd_key(args)
    if args.command == "ask":
        return run_model_command(lambda: cmd_ask(args), verbose=args.verbose)
    if args.command == "serve":
        return run_model_command(lambda: cmd_serve(args), verbose=args.verbose)
    parser.error(f"unknown command {args.command}")
    return 2


def cmd_key(args: argparse.Namespace) -> int:
    """`livelens key NAME --scopes read`: a new random key and its keys-file line."""
    import secrets

    from livelens.stream.auth import entry, parse_scopes

    given = sys.stdin.read().strip() if args.stdin else None
    key = given or secrets.token_urlsafe(32)
    try:
        if args.stdin and not given:
            raise ValueError("no key on stdin")
        line = entry(args.name, parse_scopes(args.scopes), key)
    except ValueError as exc:
        print(f"livelens: error: {exc}", file=sys.stderr)
        return 2
    print(line)
    if not args.stdin:
        print(f"key for {args.name} (shown once; give it to its holder): {key}", file=sys.stderr)
    return 0


def redis_url(args: argparse.Namespace) -> str | None:
    """The Redis URL: --redis-url-file, --redis-url, $LIVELENS_REDIS_URL, else the default.

    A password in --redis-url is visible to every user of the machine (`ps`), so it gets a
    warning (which does not repeat the URL); None for 'none' (single node, no Redis).
    """
    from urllib.parse import urlsplit

    if args.redis_url is not None and args.redis_url_file is not None:
        raise UsageError("give --redis-url or --redis-url-file, not both")
    if args.redis_url_file is not None:
        try:
            url = Path(args.redis_url_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--redis-url-file: {exc}") from None
        if not url:
            raise UsageError(f"--redis-url-file: {args.redis_url_file} is empty")
    elif args.redis_url is not None:
        url = args.redis_url
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None  # the Redis client reports the malformed URL
        if password:
            logger.warning(
                "the Redis password given with --redis-url shows in the process list; pass the "
                "URL in $LIVELENS_REDIS_URL or --redis-url-file instead"
            )
    else:
        url = os.environ.get("LIVELENS_REDIS_URL") or DEFAULT_REDIS_URL
    return None if url.lower() in ("", "none") else url


def key_ring(args: argparse.Namespace) -> KeyRing:
    """--token/$LIVELENS_TOKEN as one admin key, plus --keys-file/$LIVELENS_KEYS_FILE."""
    from livelens.stream.auth import KeyRing, KeysFileError

    if args.token:
        logger.warning(
            "--token shows in the process list; pass it in $LIVELENS_TOKEN or put keys in "
            "--keys-file instead"
        )
    token = args.token or os.environ.get("LIVELENS_TOKEN") or None
    path = args.keys_file or os.environ.get("LIVELENS_KEYS_FILE") or None
    try:
        return KeyRing.from_token(token, Path(path) if path else None)
    except KeysFileError as exc:
        raise UsageError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from livelens.model.loading import demo_model
    from livelens.stream.server import serve

    # Secrets and key files are checked before the model loads; bad ones fail in milliseconds.
    args.keys = key_ring(args)
    args.redis_url = redis_url(args) or "none"
    args.model = args.model or (demo_model() if args.demo else default_model())
    return serve(args, number=_number)


def run_model_command(command: Callable[[], int], *, verbose: bool = False) -> int:
    """Run a command that loads the model; bad input ends with one error line and exit 2."""
    _quiet_libraries(verbose)
    from livelens.model.loading import ModelLoadError
    from livelens.model.sampling import SessionError

    try:
        return command()
    except (UsageError, SourceError, ModelLoadError, SessionError) as exc:
        print(f"livelens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _client_main(args: argparse.Namespace) -> int:
    """Run a client command; server and network errors become one line and exit status 2."""
    from livelens.clients.cli import COMMANDS, ClientUsageError
    from livelens.clients.client import LiveLensError

    try:
        return COMMANDS[args.command](args)
    except (ClientUsageError, LiveLensError) as exc:
        print(f"livelens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _quiet_libraries(verbose: bool) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not verbose:
        transformers.utils.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
