"""Messages of the question websocket (`/v1/sessions/{id}/ws`) and the REST bodies.

Everything arriving from the network is parsed here with pydantic; docs/api.md documents each
message with examples, and tests check that the examples there parse with these models.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from livelens.model.sampling import MAX_NEW_TOKENS, MAX_QUESTION_CHARS, MIN_TEMPERATURE

MAX_MESSAGE_BYTES = 16 * 1024
"""A client message larger than this is refused without being parsed."""
MAX_JSON_DEPTH = 8
"""Deepest nesting of arrays/objects a client message may have (ours are flat: depth 1)."""
MAX_ID_CHARS = 64
MAX_TOP_K = 1 << 20
"""top_k above any vocabulary size means no top-k filtering; larger values are refused."""
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
"""Seeds torch.Generator.manual_seed accepts: any signed or unsigned 64-bit integer."""


class ProtocolError(ValueError):
    """A client message the server refuses; `code` is the machine-readable reason."""

    def __init__(self, code: str, message: str, message_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.message_id = message_id


class _Strict(BaseModel):
    # NaN and infinities are never meaningful here, and NaN slips through range checks.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ------------------------------------------------------------------------------ client messages
class AskMessage(_Strict):
    """Ask a question about the session's video so far."""

    type: Literal["ask"]
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="chosen by the client")
    question: str = Field(description=f"1 to {MAX_QUESTION_CHARS} characters")
    max_new_tokens: int = Field(default=128, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    repetition_penalty: float | None = Field(
        default=None,
        gt=0.0,
        le=10.0,
        description="default: the checkpoint's generation_config.json value (1.0 = off)",
    )
    memory: Literal["auto", "recall", "window"] = Field(
        default="auto",
        description="frames from before the window: auto (searched unless the question is "
        "about now), recall (always), window (never)",
    )

    @field_validator("temperature")
    @classmethod
    def _greedy_or_warm_enough(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return value


class CancelMessage(_Strict):
    """Stop one of this connection's own questions (queued or answering)."""

    type: Literal["cancel"]
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)


MAX_CONDITION_CHARS = 300
"""An alert's condition: one short sentence."""
MAX_WEBHOOK_CHARS = 2048


class AlertRequest(_Strict):
    """A standing question on a session (docs/api.md, "Standing questions: alerts")."""

    condition: str = Field(
        description=f"1 to {MAX_CONDITION_CHARS} characters: a statement, or a yes/no question"
    )
    every: float = Field(default=1.0, ge=0.1, le=3600, description="media seconds")
    cooldown: float = Field(default=10.0, ge=0, le=86400, description="media seconds")
    threshold: float = Field(default=0.5, ge=0, le=1, description="confidence to become active")
    hysteresis: float = Field(default=0.1, ge=0, le=0.5, description="inactive below threshold-h")
    webhook: str | None = Field(
        default=None,
        max_length=MAX_WEBHOOK_CHARS,
        description="http(s) URL the operator allowed (--alert-webhook-allow)",
    )


class WatchMessage(AlertRequest):
    """Create an alert over the websocket (as POST /v1/sessions/{id}/alerts)."""

    type: Literal["watch"]
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="chosen by the client")


class UnwatchMessage(_Strict):
    """Remove an alert of the session."""

    type: Literal["unwatch"]
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    alert_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)


ClientMessage = Annotated[
    AskMessage | CancelMessage | WatchMessage | UnwatchMessage, Field(discriminator="type")
]
_client_adapter: TypeAdapter[AskMessage | CancelMessage | WatchMessage | UnwatchMessage] = (
    TypeAdapter(ClientMessage)
)
CLIENT_TYPES = ("ask", "cancel", "watch", "unwatch")


def parse_client_message(
    raw: str | bytes,
) -> AskMessage | CancelMessage | WatchMessage | UnwatchMessage:
    """Parse one websocket message, or raise ProtocolError with a stable code.

    Size and nesting depth are checked before the JSON parser runs, and every string must be
    encodable as UTF-8 (JSON escapes can spell lone surrogates, which no reply could echo).
    """
    size = len(raw.encode(errors="surrogatepass") if isinstance(raw, str) else raw)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            "message_too_large", f"message has {size} bytes; the limit is {MAX_MESSAGE_BYTES}"
        )
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise ProtocolError(
            "message_too_deep", f"message nests deeper than {MAX_JSON_DEPTH} levels"
        )
    try:
        data = json.loads(raw)
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeError:
        raise ProtocolError("invalid_json", "message is not valid UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers longer than Python converts.
        raise ProtocolError("invalid_json", f"message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_message", "message must be a JSON object")
    message_id = data.get("id") if isinstance(data.get("id"), str) else None
    kind = data.get("type")
    if kind not in CLIENT_TYPES:
        raise ProtocolError(
            "unknown_type",
            f"unknown message type {kind!r:.40}; expected one of {', '.join(CLIENT_TYPES)}",
            message_id,
        )
    try:
        message = _client_adapter.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "message"
        raise ProtocolError("invalid_message", f"{where}: {first['msg']}", message_id) from None
    if isinstance(message, AskMessage):
        if not message.question.strip():
            raise ProtocolError("empty_question", "the question is empty", message_id)
        if len(message.question) > MAX_QUESTION_CHARS:
            raise ProtocolError(
                "question_too_long",
                f"the question has {len(message.question)} characters; "
                f"the limit is {MAX_QUESTION_CHARS}",
                message_id,
            )
    return message


def json_depth(raw: str | bytes) -> int:
    """How deeply arrays and objects nest in a JSON text, counted without parsing it.

    Brackets inside strings do not count; the text need not be valid JSON. Linear time and
    constant memory, so it is safe on any input the size check let through.
    """
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


# ------------------------------------------------------------------------------ server messages
class SegmentOut(BaseModel):
    start: float = Field(description="media seconds from the session's first frame")
    end: float
    start_time: str = Field(description="wall clock (ISO-8601, UTC) of `start`")
    end_time: str


class LatencyOut(BaseModel):
    queue: float = Field(description="ms from receiving the question to starting it")
    ttft: float = Field(description="ms of question prefill until the first token")
    total: float = Field(description="ms from receiving the question to the answer")


class TokenMessage(BaseModel):
    type: Literal["token"] = "token"
    id: str
    text: str


class AnswerMessage(BaseModel):
    type: Literal["answer"] = "answer"
    id: str
    question: str
    text: str
    segments: list[SegmentOut]
    stream_position: float = Field(description="media time (s) of the last frame the answer saw")
    recalled: list[float] = Field(
        default_factory=list,
        description="media times (s) of the frames from before the window the answer also saw",
    )
    live_edge: float | None = Field(description="media time (s) of the newest received frame")
    lag: float | None = Field(description="live_edge - stream_position when the answer started")
    latency_ms: LatencyOut
    asked_at: str
    answered_at: str


class StatusMessage(BaseModel):
    type: Literal["status"] = "status"
    session_id: str
    state: str
    reason: str | None = None
    end_code: str | None = Field(
        default=None, description="why the session is over, for programs (EndCode); null while live"
    )
    frames_received: int
    frames_sampled: int
    frames_dropped: int = Field(description="sampled frames dropped because the model lagged")
    frames_in_model: int
    kept_tokens: int
    total_tokens: int
    kept_ratio: float | None
    kv_tokens: int
    kv_bytes: int
    live_edge: float | None
    stream_position: float | None
    lag: float | None = Field(description="seconds between the newest frame and the model's")
    window_start: float | None = Field(
        default=None, description="media time of the oldest frame the model holds"
    )
    window_end: float | None = Field(
        default=None, description="media time of the newest frame the model holds"
    )
    memory_start: float | None = Field(
        default=None,
        description="media time of the oldest frame kept for questions about the past",
    )
    questions_waiting: int
    time: str


class ErrorMessage(BaseModel):
    type: Literal["error"] = "error"
    id: str | None = None
    code: str
    message: str


def dump(message: BaseModel) -> dict[str, Any]:
    return message.model_dump(mode="json")


# ------------------------------------------------------------------------------ REST bodies
class PullRequest(_Strict):
    """Start a session that pulls a stream: RTSP, HLS, or a local file played as live."""

    source: str = Field(
        min_length=1, max_length=4096, description="rtsp://..., http(s)://...m3u8, or a path"
    )
    fps: float | None = Field(default=None, gt=0, le=30, description="default: the server's")
    prune_threshold: float | None = Field(default=None, ge=0, le=255)
    window: float | None = Field(
        default=None,
        gt=0,
        le=86400,
        description="media seconds of video the model holds (older frames slide out); "
        "default: the server's --window",
    )
    memory: float | None = Field(
        default=None,
        ge=0,
        le=7 * 86400,
        description="media seconds before the window kept for questions about the past; "
        "default: the server's --memory (0: none)",
    )
    realtime: bool = Field(default=True, description="files only: play at the media rate")
    loop: bool = Field(default=False, description="files only: start over at the end")


class ThumbnailOut(BaseModel):
    time: float = Field(description="media seconds of the sampled frame")
    wall_time: str = Field(description="wall clock (ISO-8601, UTC) of `time`")
    width: int
    height: int
    url: str = Field(description="GET it (with the bearer token) for the JPEG")


class ThumbnailList(BaseModel):
    session_id: str
    capacity: int = Field(description="thumbnails the session keeps; older ones are dropped")
    thumbnails: list[ThumbnailOut]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error statuses, each with the JSON error body."""
    return {status: {"model": ErrorResponse, "description": "refused"} for status in statuses}
