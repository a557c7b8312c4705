"""The client commands of `livelens`: publish, sessions, watch, alerts, and `ask --server`.

stream/cli.py registers them; each takes the parsed arguments and returns the exit status.
Errors from the server or the network are raised (LiveLensError) and shown by stream/cli.py
main() as one line. Nothing here loads the model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TextIO

from livelens.clients.client import (
    Alert,
    AlertEvent,
    Answer,
    LiveLensClient,
    SessionInfo,
    Status,
    server_url,
    session_path,
    websocket_url,
)


class ClientUsageError(ValueError):
    """A bad command-line value of a client command; stream/cli.py shows it as a usage error."""


def token(args: argparse.Namespace) -> str | None:
    """--key (or --token), else $LIVELENS_KEY, else $LIVELENS_TOKEN, else none."""
    return args.token or os.environ.get("LIVELENS_KEY") or os.environ.get("LIVELENS_TOKEN") or None


def server(args: argparse.Namespace) -> str:
    try:
        return server_url(args.server)
    except ValueError as exc:
        raise ClientUsageError(f"--server: {exc}") from None


def _run(make: Callable[[], Coroutine[Any, Any, int]]) -> int:
    return asyncio.run(make())


# ------------------------------------------------------------------------------------------- ask
def cmd_ask(args: argparse.Namespace) -> int:
    """`livelens ask --server URL SESSION "question"`: stream the answer, then its segments."""
    base = server(args)
    sampling = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "repetition_penalty": args.repetition_penalty,
    }

    async def ask() -> int:
        answer: Answer | None = None
        async with LiveLensClient(base, token=token(args)) as client:
            async for piece in client.ask(args.video, args.question, **sampling):
                if isinstance(piece, Answer):
                    answer = piece
                else:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        assert answer is not None
        sys.stdout.write("\n")
        print("segments: " + json.dumps([dataclasses.asdict(s) for s in answer.segments]))
        stats = {
            "stream_position": answer.stream_position,
            "live_edge": answer.live_edge,
            "lag": answer.lag,
            "latency_ms": dataclasses.asdict(answer.latency_ms),
            "asked_at": answer.asked_at,
            "answered_at": answer.answered_at,
        }
        print("stats: " + json.dumps(stats), flush=True)
        return 0

    return _run(ask)


# -------------------------------------------------------------------------------------- sessions
def cmd_sessions(args: argparse.Namespace) -> int:
    """`livelens sessions --server URL [--json]`: every session, as a table or JSON."""
    base = server(args)

    async def sessions() -> list[SessionInfo]:
        async with LiveLensClient(base, token=token(args)) as client:
            return await client.sessions()

    found = asyncio.run(sessions())
    if args.json:
        print(json.dumps({"sessions": [dataclasses.asdict(s) for s in found]}, indent=2))
        return 0
    if not found:
        print("no sessions")
        return 0
    rows = [("ID", "KIND", "STATE", "SOURCE", "FRAMES", "KEPT", "LAG")]
    for s in found:
        rows.append(
            (
                s.id,
                s.kind,
                s.state,
                _shorten(s.source, 40),
                str(s.stats.frames_received),
                _percent(s.stats.kept_ratio),
                _seconds(s.stats.lag),
            )
        )
    _table(rows)
    return 0


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def _shorten(text: str, limit: int) -> str:
    """Cut the middle out of a long source: its scheme and its file name both matter."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 3
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.0%}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


# ----------------------------------------------------------------------------------------- watch
def status_line(status: Status) -> str:
    """One line of a session's progress, as `livelens watch` shows it."""
    dropped = f" ({status.frames_dropped} dropped)" if status.frames_dropped else ""
    return (
        f"{status.state}: frames {status.frames_received} received, "
        f"{status.frames_sampled} sampled, {status.frames_in_model} in model{dropped}; "
        f"kept {_percent(status.kept_ratio)}; at {_seconds(status.stream_position)}, "
        f"lag {_seconds(status.lag)}"
    )


def cmd_watch(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`livelens watch --server URL SESSION`: a live status line until the session ends.

    Exit status 0 when the session ends, 1 when it fails.
    """
    base = server(args)
    out = out or sys.stdout
    rewrite = out.isatty()

    async def watch() -> int:
        last: Status | None = None
        width = 0
        async with LiveLensClient(base, token=token(args)) as client:
            try:
                async for status in client.watch(args.session):
                    last = status
                    line = status_line(status)
                    if rewrite:
                        out.write("\r" + line.ljust(width))
                        width = len(line)
                    else:
                        out.write(line + "\n")
                    out.flush()
            finally:
                if rewrite and width:
                    out.write("\n")
                    out.flush()
        assert last is not None
        if last.reason:
            print(f"session {last.state}: {last.reason}", file=out, flush=True)
        return 1 if last.state == "failed" else 0

    return _run(watch)


# ---------------------------------------------------------------------------------------- alerts
def cmd_alerts(args: argparse.Namespace) -> int:
    """`livelens alerts add|list|rm|watch`: a session's standing questions."""
    return ALERT_COMMANDS[args.alerts_command](args)


def cmd_alerts_add(args: argparse.Namespace) -> int:
    """`livelens alerts add SESSION CONDITION`: prints the alert's id (and its webhook secret)."""
    base = server(args)

    async def add() -> Alert:
        async with LiveLensClient(base, token=token(args)) as client:
            return await client.add_alert(
                args.session,
                args.condition,
                every=args.every,
                cooldown=args.cooldown,
                threshold=args.threshold,
                hysteresis=args.hysteresis,
                webhook=args.webhook,
            )

    alert = asyncio.run(add())
    print(f"alert: {alert.id}")
    print(f"question: {alert.question}")
    if alert.secret:
        print(f"secret: {alert.secret}")
        print(
            "note: the secret is shown only once; keep it to check the webhook's "
            "X-LiveLens-Signature",
            file=sys.stderr,
        )
    return 0


def cmd_alerts_list(args: argparse.Namespace) -> int:
    """`livelens alerts list SESSION [--json]`: the session's alerts as a table or JSON."""
    base = server(args)

    async def alerts() -> list[Alert]:
        async with LiveLensClient(base, token=token(args)) as client:
            return await client.alerts(args.session)

    found = asyncio.run(alerts())
    if args.json:
        print(json.dumps({"alerts": [dataclasses.asdict(a) for a in found]}, indent=2))
        return 0
    if not found:
        print("no alerts")
        return 0
    rows = [("ID", "ACTIVE", "CONFIDENCE", "EVENTS", "CONDITION")]
    for a in found:
        confidence = "-" if a.confidence is None else f"{a.confidence:.2f}"
        active = "yes" if a.active else "no"
        rows.append((a.id, active, confidence, str(a.events), a.condition))
    _table(rows)
    return 0


def cmd_alerts_rm(args: argparse.Namespace) -> int:
    """`livelens alerts rm SESSION ALERT_ID`."""
    base = server(args)

    async def remove() -> Alert:
        async with LiveLensClient(base, token=token(args)) as client:
            return await client.delete_alert(args.session, args.alert_id)

    removed = asyncio.run(remove())
    print(f"removed {removed.id}: {removed.condition}")
    return 0


def alert_line(event: AlertEvent) -> str:
    """One line of an alert event, as `livelens alerts watch` shows it."""
    confidence = "-" if event.confidence is None else f"{event.confidence:.2f}"
    media = f"{event.started:.1f}s-" + ("" if event.ended is None else f"{event.ended:.1f}s")
    return (
        f"{event.time}  {event.edge:<4}  {json.dumps(event.condition)}  "
        f"confidence {confidence}  media {media}  {event.event_id}"
    )


def cmd_alerts_watch(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`livelens alerts watch SESSION [--json]`: one line per alert event until the session ends."""
    base = server(args)
    out = out or sys.stdout

    async def watch() -> int:
        async with LiveLensClient(base, token=token(args)) as client:
            async for message in client.alert_messages(args.session):
                if args.json:
                    out.write(json.dumps(message) + "\n")
                else:
                    out.write(alert_line(AlertEvent.from_json(message)) + "\n")
                out.flush()
        return 0

    return _run(watch)


ALERT_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "add": cmd_alerts_add,
    "list": cmd_alerts_list,
    "rm": cmd_alerts_rm,
    "watch": cmd_alerts_watch,
}


# --------------------------------------------------------------------------------------- publish
def cmd_publish(args: argparse.Namespace) -> int:
    """`livelens publish SOURCE --server URL`: publish until Ctrl-C/SIGTERM or the file's end."""
    from livelens.clients.publisher import Publisher

    base = server(args)
    if args.framerate is not None and not args.framerate > 0:
        raise ClientUsageError(f"--framerate must be > 0, got {args.framerate}")

    def announce(session_id: str) -> None:
        print(f"session: {session_id}", flush=True)
        print(f"rest: {base}{session_path(session_id)}", flush=True)
        print(f"websocket: {websocket_url(base, session_id)}", flush=True)

    async def publish() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        handled = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        publisher = Publisher(
            base,
            args.source,
            token=token(args),
            loop=args.loop,
            video_size=args.video_size,
            framerate=args.framerate,
            reconnect=not args.no_reconnect,
            ice_servers=args.stun or (),
            on_session=announce,
        )
        try:
            await publisher.start()
            finished = asyncio.create_task(publisher.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({finished, stopped}, return_when=asyncio.FIRST_COMPLETED)
            pending = stopped if finished.done() else finished
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
            if finished.done() and not finished.cancelled():
                finished.result()  # raises what stopped the publisher, if it was an error
        finally:
            await publisher.close()
            for sig in handled:
                loop.remove_signal_handler(sig)
        if publisher.reconnects:
            print(f"published again {publisher.reconnects} times", file=sys.stderr)
        return 0

    return _run(publish)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ask": cmd_ask,
    "sessions": cmd_sessions,
    "watch": cmd_watch,
    "publish": cmd_publish,
    "alerts": cmd_alerts,
}
