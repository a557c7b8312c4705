"""benchmarks/alerts.py's scoring: what counts as found, cleared, a false alert (no model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def alerts():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import alerts as module
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_a_rise_within_one_period_is_found_and_a_fall_within_one_period_clears(alerts) -> None:
    run = alerts.StreamRun(1, "red ball", True, [(3.2, 7.5), (20.0, 30.0)], end=30.0)
    # First stay: rise at 4.0 (0.8 s late, inside one period), fall at 8.0 (inside b + 1).
    # Second stay: the rise at 21.5 is 1.5 s late: not found, but not a false alert either.
    # The rise at 12.0 is outside every stay: a false alert.
    run.edges = [(4.0, "rise"), (8.0, "fall"), (12.0, "rise"), (13.0, "fall"), (21.5, "rise")]
    score = alerts.Score()
    assert alerts.score_stream(run, 1.0, score) == (2, 1, 1)
    assert (score.found, score.cleared, score.rises, score.correct) == (1, 1, 3, 2)
    assert score.delays == [pytest.approx(0.8)]
    assert score.negative_alerts == 0


def test_every_rise_on_a_stream_without_the_object_is_a_negative_alert(alerts) -> None:
    run = alerts.StreamRun(2, "blue box", False, [], end=40.0)
    run.edges = [(5.0, "rise"), (6.0, "fall")]
    score = alerts.Score()
    assert alerts.score_stream(run, 1.0, score) == (0, 0, 1)
    assert (score.false_alerts, score.negative_alerts) == (1, 1)


def test_trace_line_marks_truth_and_confidence_in_tenths(alerts) -> None:
    trace = [(0.0, 0.04, False), (1.0, 0.71, True), (2.0, 1.0, True)]
    assert alerts.trace_line(trace) == ".0 Y7 Y9"
