"""Scores for grounding answers against a scene's ground truth.

IoU is taken between unions of intervals, so an answer with two segments for an object that
occurs twice is scored against both stays; R@k counts answers whose IoU reaches k. Boundary error
is the distance of the predicted first start and last end from the true ones, in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from livelens.model.grounding import parse_segments
from livelens.model.qa import QA, Kind

IOU_THRESHOLDS = (0.3, 0.5, 0.7)


def _union(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(spans: Sequence[tuple[float, float]]) -> float:
    return sum(b - a for a, b in spans)


def iou(predicted: Iterable[tuple[float, float]], truth: Iterable[tuple[float, float]]) -> float:
    """Intersection over union of two sets of intervals; 1.0 when both are empty."""
    p, t = _union(predicted), _union(truth)
    if not p and not t:
        return 1.0
    inter = 0.0
    for a, b in p:
        for c, d in t:
            inter += max(0.0, min(b, d) - max(a, c))
    union = _length(p) + _length(t) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Scores:
    """Running totals over answered questions; `summary()` gives the benchmark's metrics."""

    ious: list[float] = field(default_factory=list)
    boundary_errors: list[float] = field(default_factory=list)
    absent_correct: list[bool] = field(default_factory=list)
    yes_no: list[bool] = field(default_factory=list)
    yes_no_by: dict[str, list[int]] = field(default_factory=dict)
    """Per "<kind> <true answer>" (e.g. "now Yes."): [answered right, asked]."""
    scene: list[bool] = field(default_factory=list)

    def add(self, qa: QA, answer: str, stream_end: float) -> float | None:
        """Score one answer to `qa`; returns its IoU for grounding questions."""
        if qa.kind in (Kind.WHEN, Kind.FIRST):
            segments = parse_segments(answer, stream_start=0.0, stream_end=stream_end)
            predicted = [(s.start, s.end) for s in segments]
            truth = [(i.start, i.end) for i in qa.truth]
            if not truth:
                self.absent_correct.append(not predicted)
                return None
            value = iou(predicted, truth)
            self.ious.append(value)
            if predicted:
                self.boundary_errors.append(abs(predicted[0][0] - truth[0][0]))
                self.boundary_errors.append(abs(predicted[-1][1] - truth[-1][1]))
            return value
        if qa.kind in (Kind.AT, Kind.NOW):
            right = _normal(answer) == _normal(qa.answer)
            self.yes_no.append(right)
            counts = self.yes_no_by.setdefault(f"{qa.kind} {qa.answer}", [0, 0])
            counts[0] += right
            counts[1] += 1
        else:
            self.scene.append(_normal(answer) == _normal(qa.answer))
        return None

    def summary(self) -> dict[str, float]:
        out = {"mIoU": _mean(self.ious)}
        for k in IOU_THRESHOLDS:
            out[f"R@{k}"] = _mean([v >= k for v in self.ious])
        out["yes_no"] = _mean(self.yes_no)
        out["boundary_s"] = _mean(self.boundary_errors)
        out["absent"] = _mean(self.absent_correct)
        out["scene"] = _mean(self.scene)
        out["grounding_n"] = len(self.ious)
        out["absent_n"] = len(self.absent_correct)
        out["yes_no_n"] = len(self.yes_no)
        out["scene_n"] = len(self.scene)
        out["n"] = len(self.ious) + len(self.absent_correct) + len(self.yes_no) + len(self.scene)
        return out


def _normal(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def _mean(values: Sequence[float | bool]) -> float:
    return sum(values) / len(values) if values else math.nan
