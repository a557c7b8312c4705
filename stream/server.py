"""`livelens serve`: load the model once, build the app, run it on uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from livelens.stream.sources.policy import SourcePolicy

logger = logging.getLogger(__name__)

# Websocket messages above our 16 KiB protocol limit get a clear error message; far larger ones
# are cut off by the server before they are buffered.
WS_MAX_SIZE = 1 << 20


def serve(args: argparse.Namespace, *, number: Callable[..., float]) -> int:
    import uvicorn

    from livelens.model.loading import load_model
    from livelens.model.runner import ModelRunner
    from livelens.stream.app import create_app
    from livelens.stream.demo import loop_video
    from livelens.stream.grid import DEFAULT_TOKENS_PER_FRAME, MIN_TOKENS_PER_FRAME
    from livelens.stream.service import LiveService, ServiceConfig
    from livelens.stream.sources.pull import PullConfig
    from livelens.stream.whip import WhipSettings

    logging.getLogger().setLevel(args.log_level.upper())
    logging.getLogger("livelens").setLevel(args.log_level.upper())
    fps = number("--fps", args.fps, zero_ok=False)
    threshold = number("--prune-threshold", args.prune_threshold, zero_ok=True)
    interval = number("--status-interval", args.status_interval, zero_ok=False)
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
            from livelens.stream.cli import UsageError

            raise UsageError(f"{flag} out of range: {value}")
    if args.tokens_per_frame is not None and args.tokens_per_frame < MIN_TOKENS_PER_FRAME:
        from livelens.stream.cli import UsageError

        raise UsageError(f"--tokens-per-frame must be >= {MIN_TOKENS_PER_FRAME}")
    token = args.token or os.environ.get("LIVELENS_TOKEN") or None
    sources = source_policy(args)
    redis_url = None if args.redis_url.lower() in ("", "none") else args.redis_url

    loaded = load_model(args.model, device=args.device)
    logger.info("model %s loaded on %s (%s)", loaded.name, loaded.device, loaded.dtype)
    tokens_per_frame = args.tokens_per_frame or loaded.tokens_per_frame or DEFAULT_TOKENS_PER_FRAME
    config = ServiceConfig(
        fps=fps,
        prune_threshold=threshold,
        tokens_per_frame=tokens_per_frame,
        max_pending_frames=args.max_pending_frames,
        max_sessions=args.max_sessions,
        thumbnails=args.thumbnails,
        status_interval_s=interval,
        redis_url=redis_url,
        pull=PullConfig(give_up_after_s=give_up),
        sources=sources,
    )
    whip = WhipSettings(
        token=token,
        allow_loopback=args.allow_loopback_ice,
        cors_origin=args.cors_origin,
    )
    if token is None:
        logger.warning("no --token given: anyone who reaches this port can publish and ask")
    # The demo's video is written before the server listens and removed after uvicorn has
    # stopped the service (and with it the source reading the file).
    with loop_video() if args.demo else contextlib.nullcontext() as demo:
        service = LiveService(ModelRunner(loaded), config)
        on_start = demo.publish if demo is not None else None
        app = create_app(service, token=token, whip=whip, on_start=on_start)
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            ws="websockets",
            ws_max_size=WS_MAX_SIZE,
            log_level=args.log_level,
        )
    return 0


def source_policy(args: argparse.Namespace) -> SourcePolicy:
    """The source policy from --allow-source, --media-root, --source-ca-file and their env vars."""
    from livelens.stream.cli import UsageError
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
