"""Prometheus metrics of one server process (its own registry, so apps in one process never mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Answer latencies on a GPU run from ~50 ms (short answers) to tens of seconds (long ones on CPU).
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Counters the sessions update, gauges refreshed by the status loop."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames_received = Counter(
            "livelens_frames_received", "Decoded frames received", ["kind"], registry=r
        )
        self.frames_sampled = Counter(
            "livelens_frames_sampled", "Frames kept by the fps sampler", ["kind"], registry=r
        )
        self.tokens_kept = Counter(
            "livelens_video_tokens_kept", "Video tokens kept by DiffFP", registry=r
        )
        self.tokens_total = Counter(
            "livelens_video_tokens", "Video tokens before DiffFP pruning", registry=r
        )
        self.kept_ratio = Gauge(
            "livelens_kept_ratio", "Kept / total video tokens over all sessions", registry=r
        )
        self.sessions = Gauge("livelens_sessions", "Sessions by state", ["state"], registry=r)
        self.kv_bytes = Gauge(
            "livelens_kv_bytes", "Device memory held by all sessions' KV caches", registry=r
        )
        self.kv_blocks = Gauge(
            "livelens_kv_pool_blocks",
            "KV cache pool blocks, used and total",
            ["state"],
            registry=r,
        )
        self.sessions_refused = Counter(
            "livelens_sessions_refused",
            "Sessions refused at admission, by reason (kv_pool_exhausted, too_many_sessions, ...)",
            ["reason"],
            registry=r,
        )
        self.engine_steps = Gauge(
            "livelens_engine_steps", "Engine steps run since start", registry=r
        )
        self.engine_busy = Gauge(
            "livelens_engine_busy_seconds", "Seconds the engine spent executing steps", registry=r
        )
        self.ttft = Histogram(
            "livelens_answer_ttft_seconds",
            "Question prefill until the first answer token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "livelens_answer_latency_seconds",
            "Question received until the full answer",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.questions = Counter(
            "livelens_questions", "Questions by outcome", ["outcome"], registry=r
        )
        self.redis_connected = Gauge(
            "livelens_redis_connected", "1 when the registry reaches Redis", registry=r
        )
        self.alert_evaluations = Counter(
            "livelens_alert_evaluations",
            "Standing-question evaluations: run, or skipped (DiffFP saw no change)",
            ["result"],
            registry=r,
        )
        self.alert_events = Counter(
            "livelens_alert_events", "Alert events sent, by edge (rise, fall)", ["edge"], registry=r
        )
        self.webhook_deliveries = Counter(
            "livelens_webhook_deliveries",
            "Alert webhook deliveries by result (ok, failed)",
            ["result"],
            registry=r,
        )
        self._kept = 0
        self._total = 0

    def tokens(self, kept: int, total: int) -> None:
        self.tokens_kept.inc(kept)
        self.tokens_total.inc(total)
        self._kept += kept
        self._total += total
        self.kept_ratio.set(self._kept / self._total if self._total else 1.0)

    def answered(self, ttft_s: float, total_s: float) -> None:
        self.ttft.observe(ttft_s)
        self.latency.observe(total_s)
        self.questions.labels("answered").inc()

    def question_failed(self) -> None:
        self.questions.labels("failed").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
