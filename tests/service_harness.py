"""Build a real LiveLens app around the tiny model for tests, and talk to it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import torch
from aiortc import RTCPeerConnection, RTCSessionDescription
from fastapi.testclient import TestClient

from livelens.model.runner import ModelRunner
from livelens.stream.app import create_app
from livelens.stream.auth import KeyRing
from livelens.stream.service import LiveService, ServiceConfig
from livelens.stream.sources.policy import SourcePolicy


class SlowRunner(ModelRunner):
    """The real tiny model, made deliberately slow: each vision pass and decoder forward sleeps
    first."""

    def __init__(self, loaded, *, encode_delay: float = 0.0, prefill_delay: float = 0.0) -> None:
        super().__init__(loaded)
        self.encode_delay = encode_delay
        self.prefill_delay = prefill_delay

    def encode_frames(self, patches, rows):  # type: ignore[no-untyped-def]
        time.sleep(self.encode_delay)
        return super().encode_frames(patches, rows)

    def prefill_packed(self, embeds, positions, mask, kv):  # type: ignore[no-untyped-def]
        time.sleep(self.prefill_delay)
        return super().prefill_packed(embeds, positions, mask, kv)


class SteeredRunner(ModelRunner):
    """The real tiny model, with its answers steered to spell `text` (then end-of-sequence).

    Everything runs for real (vision encoder, DiffFP, prefill into the KV cache, decoding,
    streaming, grounding); only the LM head's logits get a large bonus on the next token of
    `text`, counted per answer. A random-weight model almost never writes a time, so tests that
    need an answer with segments (the console's timeline, the CLI's segment lines) use this.
    """

    BONUS = 1e4

    def __init__(self, loaded, text: str) -> None:
        super().__init__(loaded)
        tokenizer = loaded.tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.target = [*ids, tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self._steps: dict[str, int] = {}

    def logits(self, hidden: torch.Tensor, request_ids) -> torch.Tensor:  # type: ignore[no-untyped-def]
        logits = super().logits(hidden, request_ids).clone()  # inference tensors are read-only
        for row, request_id in enumerate(request_ids):
            step = self._steps.get(request_id, 0)
            if step < len(self.target):
                logits[row, self.target[step]] += self.BONUS
            self._steps[request_id] = step + 1
        return logits


LOOPBACK = ("127.0.0.1", "::1")
"""Where the tests' own media servers listen: allowed as pull destinations."""


def fast_config(
    redis_url: str | None, *, media_root: Path | None = None, **changes: Any
) -> ServiceConfig:
    """Small, fast settings: 2 fps sampling, a small grid, quick status messages; pull sources
    on loopback, and local files under `media_root` (none without it)."""
    base = ServiceConfig(
        fps=2.0,
        tokens_per_frame=16,
        status_interval_s=0.25,
        redis_url=redis_url,
        node="test-node",
        sources=SourcePolicy(allow=LOOPBACK, media_root=media_root),
    )
    return replace(base, **changes)


@contextlib.contextmanager
def running_app(
    runner: ModelRunner,
    config: ServiceConfig,
    *,
    token: str | None = None,
    keys: KeyRing | None = None,
    on_start: Callable[[LiveService], Awaitable[object]] | None = None,
) -> Iterator[tuple[TestClient, LiveService]]:
    """The app with its lifespan running (model worker, registry, status loop)."""
    service = LiveService(runner, config)
    app = create_app(service, token=token, keys=keys, on_start=on_start)
    with TestClient(app) as client:
        yield client, service


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll until predicate() is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(interval)


def receive_until(ws, kind: str, *, message_id: str | None = None, limit: int = 10_000):  # type: ignore[no-untyped-def]
    """Read messages until one of `kind` (and id) arrives; returns (it, everything before it)."""
    seen: list[dict[str, Any]] = []
    for _ in range(limit):
        message = ws.receive_json()
        if message["type"] == kind and (message_id is None or message.get("id") == message_id):
            return message, seen
        seen.append(message)
    raise AssertionError(f"no {kind} message in {limit} messages")


def ask(ws, message_id: str, question: str = "what happened?", **fields: Any):  # type: ignore[no-untyped-def]
    """Ask and collect: returns (answer message, token texts in order)."""
    ws.send_json({"type": "ask", "id": message_id, "question": question, **fields})
    answer, before = receive_until(ws, "answer", message_id=message_id)
    errors = [m for m in before if m["type"] == "error" and m.get("id") == message_id]
    assert not errors, errors
    tokens = [m["text"] for m in before if m["type"] == "token" and m["id"] == message_id]
    return answer, tokens


async def publish_offer(http: httpx.AsyncClient, server: str, pc: RTCPeerConnection) -> str:
    """POST an aiortc peer's offer to `server`'s WHIP endpoint (no key), apply the answer;
    returns the session id."""
    response = await http.post(
        f"{server}/whip",
        content=pc.localDescription.sdp,
        headers={"Content-Type": "application/sdp"},
    )
    assert response.status_code == 201, response.text
    await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
    return response.headers["x-livelens-session"]
