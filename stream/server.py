"""`livelens serve`: load the model once, build the app, run it on uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from livelens.stream.errors import UsageError

if TYPE_CHECKING:
    from livelens.stream.service import LiveService
    from livelens.stream.sources.policy import SourcePolicy
    from livelens.stream.webhooks import WebhookPolicy

logger = logging.getLogger(__name__)

# Websocket messages above our 16 KiB protocol limit get a clear error message; far larger ones
# are cut off by the server before they are buffered.
WS_MAX_SIZE = 1 << 20


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM first drains the service (no new sessions or
    questions; queued questions finish or fail within the drain timeout), then shuts down.

    SIGINT, or a second SIGTERM, stops at once as before.
    """

    def __init__(self, config: uvicorn.Config, service: LiveService, drain_timeout_s: float):
        super().__init__(config)
        self.service = service
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.should_exit or not self.started or self._loop is None:
            super().handle_exit(sig, frame)
        elif self._drain is None:
            self._loop.call_soon_threadsafe(self._start_drain)
        else:
            super().handle_exit(sig, frame)  # a second SIGTERM while draining: stop now

    def _start_drain(self) -> None:
        logger.warning("SIGTERM: draining (at most %g s), then exiting", self.drain_timeout_s)
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.service.drain(self.drain_timeout_s)
        except Exception:
            logger.exception("draining failed; shutting down anyway")
        self.should_exit = True


def serve(args: argparse.Namespace, *, number: Callable[..., float]) -> int:
    from livelens.model.kv import KVBudget
    from livelens.model.loading import load_model
    from livelens.model.runner import ModelRunner
    from livelens.stream import limits as limit_flags
    from livelens.stream.app import create_app
    from livelens.stream.demo import loop_video
    from livelens.stream.grid import DEFAULT_TOKENS_PER_FRAME, MIN_TOKENS_PER_FRAME
    from livelens.stream.http_limits import guarded_protocol, install_repeat_filter
    from livelens.stream.service import LiveService, ServiceConfig
    from livelens.stream.sources.pull import PullConfig
    from livelens.stream.whip import WhipSettings

    logging.getLogger().setLevel(args.log_level.upper())
    logging.getLogger("livelens").setLevel(args.log_level.upper())
    fps = number("--fps", args.fps, zero_ok=False)
    threshold = number("--prune-threshold", args.prune_threshold, zero_ok=True)
    interval = number("--status-interval", args.status_interval, zero_ok=False)
    stall_after = number("--stall-after", args.stall_after, zero_ok=False)
    give_up = number("--pull-give-up", args.pull_give_up, zero_ok=False)
    for flag, value in (
        ("--port", args.port),
        ("--tokens-per-frame", args.tokens_per_frame),
        ("--max-sessions", args.max_sessions),
        ("--max-pending-frames", args.max_pending_frames),
        ("--thumbnails", args.thumbnails),
    ):
        if value is None:
            continue  # --tokens-per-frame: the checkpoint decides, below
        if value <= 0 or (flag == "--port" and value > 65535):
            raise UsageError(f"{flag} out of range: {value}")
    if args.tokens_per_frame is not None and args.tokens_per_frame < MIN_TOKENS_PER_FRAME:
        raise UsageError(f"--tokens-per-frame must be >= {MIN_TOKENS_PER_FRAME}")
    try:
        limits = limit_flags.from_args(args)
        if limits.max_held_sessions < args.max_sessions:
            raise ValueError(
                f"--max-held-sessions ({limits.max_held_sessions}) must be >= --max-sessions "
                f"({args.max_sessions})"
            )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    window = None
    if args.window != "auto":
        window = number("--window", args.window, zero_ok=False)
    memory = number("--memory", args.memory, zero_ok=True)
    try:
        KVBudget.parse(args.kv_budget)
    except ValueError as exc:
        raise UsageError(f"--kv-budget: {exc}") from None
    sources = source_policy(args)
    webhooks = webhook_policy(args)
    if args.max_alerts_per_session < 0:
        raise UsageError(f"--max-alerts-per-session out of range: {args.max_alerts_per_session}")
    redis_url = None if args.redis_url.lower() in ("", "none") else args.redis_url

    loaded = load_model(args.model, device=args.device)
    logger.info("model %s loaded on %s (%s)", loaded.name, loaded.device, loaded.dtype)
    tokens_per_frame = args.tokens_per_frame or loaded.tokens_per_frame or DEFAULT_TOKENS_PER_FRAME
    config = ServiceConfig(
        fps=fps,
        prune_threshold=threshold,
        tokens_per_frame=tokens_per_frame,
        max_pending_frames=args.max_pending_frames,
        kv_budget=args.kv_budget,
        window_s=window,
        memory_s=memory,
        max_sessions=args.max_sessions,
        thumbnails=args.thumbnails,
        status_interval_s=interval,
        stall_after_s=stall_after,
        redis_url=redis_url,
        pull=PullConfig(give_up_after_s=give_up),
        limits=limits,
        sources=sources,
        webhooks=webhooks,
        max_alerts_per_session=args.max_alerts_per_session,
    )
    whip = WhipSettings(
        allow_loopback=args.allow_loopback_ice,
        cors_origin=args.cors_origin,
    )
    if not args.keys.enabled:
        logger.warning(
            "no --token or --keys-file given: anyone who reaches this port can publish and ask"
        )
    # The demo's video is written before the server listens and removed after uvicorn has
    # stopped the service (and with it the source reading the file).
    with loop_video() if args.demo else contextlib.nullcontext() as demo:
        service = LiveService(ModelRunner(loaded), config)
        on_start = demo.publish if demo is not None else None
        app = create_app(service, keys=args.keys, whip=whip, on_start=on_start)
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            http=guarded_protocol(limits.header_timeout_s),
            ws="websockets",
            ws_max_size=WS_MAX_SIZE,
            log_level=args.log_level,
            timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
            limit_concurrency=limits.max_connections,
        )
        # After uvicorn's Config, which installs its logging handlers.
        install_repeat_filter(limits.log_repeat_limit, limits.log_repeat_interval_s)
        server = DrainingServer(config, service, limits.drain_timeout_s)
        # As uvicorn.run(): uvicorn re-raises the SIGINT it handled, Ctrl-C is a clean exit.
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
    return 0 if server.started else 3  # 3: uvicorn's status for a failed start-up


def webhook_policy(args: argparse.Namespace) -> WebhookPolicy:
    """Where alert webhooks may go: --alert-webhook-allow and $LIVELENS_ALERT_WEBHOOKS."""
    from livelens.stream.webhooks import WebhookPolicy, parse_webhook_allow_list

    values = [*args.alert_webhook_allow, os.environ.get("LIVELENS_ALERT_WEBHOOKS", "")]
    try:
        return WebhookPolicy(allow=parse_webhook_allow_list(values))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def source_policy(args: argparse.Namespace) -> SourcePolicy:
    """The source policy from --allow-source, --media-root, --source-ca-file and their env vars."""
    from livelens.stream.sources.policy import SourcePolicy, parse_allow_list

    env = os.environ.get
    media_root = args.media_root or env("LIVELENS_MEDIA_ROOT") or None
    ca_file = args.source_ca_file or env("LIVELENS_SOURCE_CA_FILE") or None
    try:
        return SourcePolicy(
            allow=parse_allow_list([*args.allow_source, env("LIVELENS_ALLOW_SOURCES", "")]),
            media_root=Path(media_root).resolve() if media_root else None,
            ca_file=Path(ca_file).resolve() if ca_file else None,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
