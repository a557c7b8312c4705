"""Standing questions ("alerts"): definitions, edge detection, evidence and delivery.

The engine evaluates each alert's yes/no question every `every` media seconds (`Engine.watch`);
this module turns the confidences into events and delivers them:

    Probe (engine thread) -> loop -> AlertState.advance() -> rise / fall edge
        -> websocket watchers of the session, the session's Redis Stream, the webhook
        -> evidence: the frame at the rise and a short clip around it (thumbnail ring copies)

An alert is active from an evaluation at or above `threshold` until one below
`threshold - hysteresis`. A rise within `cooldown` media seconds of the previous event's rise
is counted as suppressed and sends nothing (nor does its fall). Definitions are stored in Redis
per session (`Registry.save_alerts`) and come back when a session opens again under the same id.
docs/api.md ("Standing questions: alerts") is the contract.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from PIL import Image

from livelens.model.engine import Probe
from livelens.model.qa import standing_question
from livelens.model.sampling import SessionError
from livelens.stream.errors import ServiceError
from livelens.stream.live import LiveSession, iso
from livelens.stream.protocol import MAX_CONDITION_CHARS, AlertRequest
from livelens.stream.webhooks import (
    DeliveryResult,
    WebhookPolicy,
    WebhookRefused,
    WebhookSender,
    new_secret,
    redact_webhook,
)

if TYPE_CHECKING:
    from livelens.stream.registry import Registry

logger = logging.getLogger(__name__)

DEFAULT_MAX_ALERTS = 8
"""Alerts a session may have (`--max-alerts-per-session`)."""
CLIP_BEFORE_S = 3.0
CLIP_AFTER_S = 2.0
"""An event's clip: the sampled frames from this long before to this long after its rise."""
MAX_EVIDENCE = 32
"""Events per session whose evidence (thumbnail, clip frames) stays in memory."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


# ------------------------------------------------------------------------------ one alert
@dataclass
class AlertState:
    """One alert's definition (what Redis keeps) and its running state (this node's)."""

    id: str
    session_id: str
    condition: str
    every: float
    cooldown: float
    threshold: float
    hysteresis: float
    webhook: str | None
    secret: str | None
    created: str
    active: bool = False
    confidence: float | None = None
    evaluated_at: float | None = None
    evaluations: int = 0
    skipped: int = 0
    events: int = 0
    suppressed: int = 0
    webhook_deliveries: int = 0
    webhook_failures: int = 0
    last_webhook_error: str | None = None
    last_rise: float | None = None
    current: dict[str, Any] | None = None
    """The event of the activity in progress (None when inactive or suppressed)."""

    @property
    def question(self) -> str:
        return standing_question(self.condition)

    def definition(self) -> dict[str, Any]:
        """What persists (Redis): the request, the id, the secret and the creation time."""
        return {name: getattr(self, name) for name in _DEFINITION}

    @classmethod
    def from_definition(cls, session_id: str, d: dict[str, Any]) -> AlertState:
        numbers = {
            name: float(d[name]) for name in ("every", "cooldown", "threshold", "hysteresis")
        }
        return cls(
            id=str(d["id"]),
            session_id=session_id,
            condition=str(d["condition"]),
            webhook=d.get("webhook"),
            secret=d.get("secret"),
            created=str(d["created"]),
            **numbers,
        )

    def to_json(self) -> dict[str, Any]:
        """The alert as the API shows it: never the secret, the webhook redacted."""
        shown = self.definition() | {
            "session_id": self.session_id,
            "question": self.question,
            "webhook": None if self.webhook is None else redact_webhook(self.webhook),
        }
        del shown["secret"]
        return shown | {name: getattr(self, name) for name in _STATE}

    def advance(self, probe: Probe) -> str | None:
        """Take one evaluation; returns "rise" or "fall" when an event edge is to be sent."""
        self.evaluations += probe.evaluated
        self.skipped += not probe.evaluated
        self.confidence, self.evaluated_at = probe.confidence, probe.time
        if not self.active and probe.confidence >= self.threshold:
            self.active = True
            if self.last_rise is not None and probe.time - self.last_rise < self.cooldown:
                self.suppressed += 1
                return None
            self.last_rise = probe.time
            return "rise"
        if self.active and probe.confidence < self.threshold - self.hysteresis:
            self.active = False
            return "fall" if self.current is not None else None
        return None


_DEFINITION = (
    "id", "condition", "every", "cooldown", "threshold", "hysteresis", "webhook", "secret",
    "created",
)  # fmt: skip
"""AlertState's fields that persist (`definition`)."""
_STATE = (
    "active", "confidence", "evaluated_at", "evaluations", "skipped", "events", "suppressed",
    "webhook_deliveries", "webhook_failures", "last_webhook_error",
)  # fmt: skip
"""AlertState's running state the API shows beside the definition (`to_json`)."""


def check_condition(condition: str) -> str:
    if not condition.strip():
        raise ServiceError(422, "empty_condition", "the condition is empty")
    if len(condition) > MAX_CONDITION_CHARS:
        raise ServiceError(
            422,
            "condition_too_long",
            f"the condition has {len(condition)} characters; the limit is {MAX_CONDITION_CHARS}",
        )
    return condition.strip()


# ------------------------------------------------------------------------------- evidence
@dataclass
class Evidence:
    """What an event shows: the frame at its rise and the sampled frames around it."""

    rise: float
    thumbnail: bytes | None
    frames: dict[float, bytes] = field(default_factory=dict)
    """Media time -> JPEG, from CLIP_BEFORE_S before the rise to CLIP_AFTER_S after."""
    complete: bool = False
    mp4: bytes | None = None
    """The clip, encoded once it is complete (`clip`)."""

    def top_up(self, session: LiveSession) -> None:
        """Copy the clip's frames the session's thumbnail ring holds now."""
        if self.complete:
            return
        for thumb in session.thumbnails.between(
            self.rise - CLIP_BEFORE_S, self.rise + CLIP_AFTER_S
        ):
            self.frames.setdefault(thumb.time, thumb.jpeg)
        edge = session.live_edge
        self.complete = edge is not None and edge >= self.rise + CLIP_AFTER_S

    async def clip(self) -> bytes:
        """The MP4 of the frames held, encoded in a worker thread; kept once the clip is
        complete, so it is encoded at most once however often it is fetched."""
        if self.mp4 is not None:
            return self.mp4
        complete, frames = self.complete, dict(self.frames)  # on the loop, which adds frames
        video = await asyncio.to_thread(encode_clip, frames)
        if complete:
            self.mp4 = video
        return video


def encode_clip(frames: dict[float, bytes]) -> bytes:
    """An MP4 (H.264, yuv420p) of JPEG frames at their media times."""
    out = io.BytesIO()
    times = sorted(frames)
    images = [np.asarray(Image.open(io.BytesIO(frames[t])).convert("RGB")) for t in times]
    height = max(1, min(i.shape[0] for i in images)) // 2 * 2
    width = max(1, min(i.shape[1] for i in images)) // 2 * 2
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        start = times[0]
        last = -1
        for t, image in zip(times, images, strict=True):
            frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(image[:height, :width]), format="rgb24"
            )
            pts = max(last + 1, round((t - start) * 1000))
            frame.pts, frame.time_base, last = pts, stream.time_base, pts
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return out.getvalue()


# ----------------------------------------------------------------------- a session's alerts
@dataclass
class SessionAlerts:
    session: LiveSession
    alerts: dict[str, AlertState] = field(default_factory=dict)
    evidence: OrderedDict[str, Evidence] = field(default_factory=OrderedDict)


class AlertManager:
    """Every alert of this node's sessions; runs on the event loop."""

    def __init__(
        self,
        *,
        registry: Registry,
        webhooks: WebhookPolicy,
        sender: WebhookSender | None,
        max_alerts: int = DEFAULT_MAX_ALERTS,
        metrics: Any = None,
    ) -> None:
        self.registry = registry
        self.policy = webhooks
        self.sender = sender
        self.max_alerts = max_alerts
        self.metrics = metrics
        self._sessions: dict[str, SessionAlerts] = {}

    # --------------------------------------------------------------------------- sessions
    async def restore(self, session: LiveSession) -> int:
        """Attach the alerts Redis keeps for this session id (a session opened again under
        its id, `serve --demo`); returns how many."""
        stored = await self.stored(session.id)
        if session.ended_at is not None:
            return 0  # it ended (and may be forgotten) while Redis answered
        held = self._held(session)
        for alert in stored:
            if len(held.alerts) >= self.max_alerts:
                logger.warning("session %s: stored alert %s over the limit", session.id, alert.id)
            elif alert.id not in held.alerts:
                try:
                    self._start(held, alert)
                except ServiceError as exc:  # the session ended meanwhile
                    logger.info("session %s: alert %s not restored: %s", session.id, alert.id, exc)
        return len(held.alerts)

    async def stored(self, session_id: str) -> list[AlertState]:
        """The definitions Redis keeps for a session id (malformed ones skipped, logged)."""
        alerts = []
        for d in (await self.registry.load_alerts(session_id)).values():
            try:
                alerts.append(AlertState.from_definition(session_id, d))
            except (KeyError, TypeError, ValueError):
                logger.warning("session %s: skipped a malformed stored alert", session_id)
        return alerts

    def forget(self, session_id: str) -> None:
        """The node no longer holds the session: its evidence goes (definitions stay in Redis)."""
        self._sessions.pop(session_id, None)

    def session_ended(self, session: LiveSession) -> None:
        """A final state: active alerts fall at the last frame; evaluations stop."""
        held = self._sessions.get(session.id)
        if held is None:
            return
        end = session.status().get("stream_position")
        for alert in held.alerts.values():
            session.engine.unwatch(session.id, alert.id)
            if alert.active and alert.current is not None:
                alert.active = False
                self._emit(held, alert, "fall", end if end is not None else alert.evaluated_at)
        for evidence in held.evidence.values():
            evidence.top_up(session)
            evidence.complete = True

    # ---------------------------------------------------------------------------- the API
    async def create(self, session: LiveSession, request: AlertRequest) -> AlertState:
        """Add an alert; ServiceError when refused. The secret is on the returned state."""
        condition = check_condition(request.condition)
        held = self._held(session)
        self._check_room(held)
        webhook = None
        if request.webhook is not None:
            try:
                target = await self.policy.acheck(request.webhook)
            except WebhookRefused as exc:
                raise ServiceError(exc.status, exc.code, exc.message) from None
            webhook = target.url
            self._check_room(held)  # others may have been added while the name resolved
        alert = AlertState(
            id=new_id("al"),
            session_id=session.id,
            condition=condition,
            every=request.every,
            cooldown=request.cooldown,
            threshold=request.threshold,
            hysteresis=request.hysteresis,
            webhook=webhook,
            secret=new_secret() if webhook else None,
            created=iso(time.time()),
        )
        self._start(held, alert)
        await self._save(held)
        return alert

    async def delete(self, session: LiveSession, alert_id: str) -> AlertState:
        held = self._held(session)
        alert = held.alerts.pop(alert_id, None)
        if alert is None:
            raise ServiceError(
                404, "unknown_alert", f"session {session.id} has no alert {alert_id!r}"
            )
        session.engine.unwatch(session.id, alert_id)
        if alert.active and alert.current is not None:  # its event ends with it
            alert.active = False
            self._emit(held, alert, "fall", alert.evaluated_at)
        await self._save(held)
        return alert

    def alerts(self, session_id: str) -> list[AlertState] | None:
        held = self._sessions.get(session_id)
        return None if held is None else list(held.alerts.values())

    def get(self, session_id: str, alert_id: str) -> AlertState:
        held = self._sessions.get(session_id)
        alert = held.alerts.get(alert_id) if held else None
        if alert is None:
            raise ServiceError(
                404, "unknown_alert", f"session {session_id} has no alert {alert_id!r}"
            )
        return alert

    def evidence(self, session_id: str, event_id: str) -> Evidence:
        held = self._sessions.get(session_id)
        found = held.evidence.get(event_id) if held else None
        if found is None:
            raise ServiceError(
                410, "evidence_expired", f"no evidence of event {event_id!r} is held any more"
            )
        if held is not None:
            found.top_up(held.session)
        return found

    # --------------------------------------------------------------------------- internals
    def _check_room(self, held: SessionAlerts) -> None:
        if len(held.alerts) >= self.max_alerts:
            raise ServiceError(
                409,
                "too_many_alerts",
                f"the session has {len(held.alerts)} alerts, its limit; remove one first",
            )

    def _held(self, session: LiveSession) -> SessionAlerts:
        held = self._sessions.get(session.id)
        if held is None:
            held = self._sessions[session.id] = SessionAlerts(session)
        return held

    def _start(self, held: SessionAlerts, alert: AlertState) -> None:
        session = held.session
        loop = session.loop

        def on_result(probe: Probe) -> None:
            loop.call_soon_threadsafe(self._probed, held, alert.id, probe)

        def on_error(exc: Exception) -> None:
            logger.warning(
                "session %s: alert %s could not be evaluated: %s", session.id, alert.id, exc
            )

        try:
            session.engine.watch(
                session.id,
                alert.id,
                alert.question,
                every=alert.every,
                on_result=on_result,
                on_error=on_error,
            )
        except (KeyError, SessionError) as exc:
            raise ServiceError(
                410, "session_released", f"the session's video is no longer held: {exc}"
            ) from None
        held.alerts[alert.id] = alert

    async def _save(self, held: SessionAlerts) -> None:
        definitions = {a.id: a.definition() for a in held.alerts.values()}
        await self.registry.save_alerts(held.session.id, definitions)

    def _probed(self, held: SessionAlerts, alert_id: str, probe: Probe) -> None:
        alert = held.alerts.get(alert_id)
        if alert is None:
            return  # removed meanwhile
        if self.metrics is not None:
            self.metrics.alert_evaluations.labels("run" if probe.evaluated else "skipped").inc()
        edge = alert.advance(probe)
        for evidence in held.evidence.values():
            evidence.top_up(held.session)
        if edge is not None:
            self._emit(held, alert, edge, probe.time)

    def _emit(self, held: SessionAlerts, alert: AlertState, edge: str, at: float | None) -> None:
        session = held.session
        wall_zero = session.wall_zero or session.created
        at = at if at is not None else 0.0
        if edge == "rise":
            event_id = new_id("ev")
            alert.events += 1
            base = f"/v1/sessions/{session.id}/alert-events/{event_id}"
            alert.current = {
                "event_id": event_id,
                "alert_id": alert.id,
                "session_id": session.id,
                "condition": alert.condition,
                "edge": "rise",
                "confidence": alert.confidence,
                "started": at,
                "started_at": iso(wall_zero + at),
                "ended": None,
                "ended_at": None,
                "thumbnail_url": f"{base}/thumbnail",
                "clip_url": f"{base}/clip",
            }
            nearest = session.thumbnails.nearest(at)
            evidence = Evidence(at, nearest.jpeg if nearest else None)
            evidence.top_up(session)
            held.evidence[event_id] = evidence
            while len(held.evidence) > MAX_EVIDENCE:
                held.evidence.popitem(last=False)
            event = dict(alert.current)
        else:
            assert alert.current is not None
            event = alert.current | {
                "edge": "fall",
                "confidence": alert.confidence,
                "ended": at,
                "ended_at": iso(wall_zero + at),
            }
            alert.current = None
        event["time"] = iso(time.time())
        if self.metrics is not None:
            self.metrics.alert_events.labels(edge).inc()
        message = {"type": "alert", **event}
        for watcher in list(session.watchers):
            watcher.send(message)
        task = asyncio.ensure_future(self.registry.append_alert_event(session.id, event))
        task.add_done_callback(_log_failure)
        if alert.webhook and alert.secret and self.sender is not None:
            self.sender.submit(alert.webhook, alert.secret, event, _delivered(alert, self.metrics))


def _delivered(alert: AlertState, metrics: Any) -> Callable[[DeliveryResult], None]:
    def record(result: DeliveryResult) -> None:
        if result.ok:
            alert.webhook_deliveries += 1
        else:
            alert.webhook_failures += 1
            alert.last_webhook_error = result.error
        if metrics is not None:
            metrics.webhook_deliveries.labels("ok" if result.ok else "failed").inc()

    return record


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("storing an alert event failed", exc_info=task.exception())
