"""Bounds on what one node holds and how long it waits: the `LimitsConfig` and its flags.

`livelens serve` fills one LimitsConfig from its flags (`add_flags` / `from_args`); the
mechanisms that enforce the HTTP-facing limits are in stream/http_limits.py, the session and
question limits in stream/service.py and stream/live.py. docs/deploy.md ("Limits") lists every
limit with its flag, default and the error a client sees.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class LimitsConfig:
    """What one node holds at most, and how long it waits for slow clients."""

    max_body_bytes: int = 1 << 20
    """Largest request body of any route (413 `payload_too_large` above). WHIP offers have
    their own, smaller limit (`WhipSettings.max_offer_bytes`) checked by the same counting."""
    body_timeout_s: float = 30.0
    """Seconds a started request body may pause between chunks (408 `request_timeout`)."""
    header_timeout_s: float = 10.0
    """Seconds a connection has to send a complete request head; then it is closed."""
    keep_alive_s: float = 5.0
    """Seconds an idle keep-alive connection stays open between requests."""
    max_connections: int = 1000
    """Open HTTP connections and websockets; requests beyond it get 503 from uvicorn."""
    max_held_sessions: int = 64
    """Sessions held in memory, live and ended together; the oldest ended are freed first."""
    ended_retention_s: float = 600.0
    """Seconds an ended or failed session stays in memory (KV cache, thumbnails, late questions);
    then it is freed, its record and history stay in Redis."""
    max_questions_per_session: int = 32
    """Questions of one session waiting or being answered (`too_many_questions` above)."""
    max_questions_per_connection: int = 8
    """Questions of one websocket waiting or being answered (`too_many_questions` above)."""
    drain_timeout_s: float = 20.0
    """On SIGTERM: seconds to let queued questions finish before they are failed; keep it
    below the orchestrator's grace period (docker-compose.yml: stop_grace_period 30 s)."""
    log_repeat_limit: int = 10
    """Identical warnings (same logger and message template) logged per interval."""
    log_repeat_interval_s: float = 60.0
    """The interval of `log_repeat_limit`; a summary line says how many were suppressed."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "drain_timeout_s":
                if not 0 <= value <= 3600:
                    raise ValueError(f"drain_timeout_s must be in [0, 3600], got {value}")
            elif not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_questions_per_connection > self.max_questions_per_session:
            raise ValueError("max_questions_per_connection must be <= max_questions_per_session")


# (flag, field, type, help): the serve flags of each limit; defaults come from LimitsConfig.
FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--max-body-bytes", "max_body_bytes", int, "largest request body of any route (413)"),
    ("--body-timeout", "body_timeout_s", float, "seconds a request body may stall (408)"),
    ("--header-timeout", "header_timeout_s", float, "seconds to send a request head"),
    ("--keep-alive-timeout", "keep_alive_s", float, "seconds an idle connection stays open"),
    ("--max-connections", "max_connections", int, "open connections before 503"),
    ("--max-held-sessions", "max_held_sessions", int, "sessions in memory, live and ended"),
    ("--session-retention", "ended_retention_s", float, "seconds an ended session stays in memory"),
    (
        "--max-questions-per-session",
        "max_questions_per_session",
        int,
        "questions waiting or answered per session",
    ),
    (
        "--max-questions-per-connection",
        "max_questions_per_connection",
        int,
        "questions waiting or answered per websocket",
    ),
    ("--drain-timeout", "drain_timeout_s", float, "seconds SIGTERM lets questions finish"),
    ("--log-repeat-limit", "log_repeat_limit", int, "identical warnings logged per interval"),
    ("--log-repeat-interval", "log_repeat_interval_s", float, "seconds of --log-repeat-limit"),
)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The limit flags of `livelens serve`, each defaulting to LimitsConfig's value."""
    defaults = LimitsConfig()
    group = parser.add_argument_group("limits (docs/deploy.md, section Limits)")
    for flag, name, kind, text in FLAGS:
        default = getattr(defaults, name)
        group.add_argument(
            flag,
            dest=f"limit_{name}",
            type=kind,
            default=default,
            metavar="SECONDS" if kind is float else "N",
            help=f"{text} (default {default:g})"
            if kind is float
            else f"{text} (default {default})",
        )


def from_args(args: argparse.Namespace) -> LimitsConfig:
    """The LimitsConfig the flags ask for; ValueError names the flag of a value out of range."""
    values = {name: getattr(args, f"limit_{name}") for _, name, _, _ in FLAGS}
    try:
        return LimitsConfig(**values)
    except ValueError as exc:
        text = str(exc)
        for flag, name, _, _ in FLAGS:
            text = text.replace(name, flag)
        raise ValueError(text) from None
