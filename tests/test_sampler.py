"""FpsSampler: the first frame at or after each slot k/fps, slots anchored at the first frame."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livelens.stream.sampler import FpsSampler


def kept(times: list[float], fps: float) -> list[float]:
    sampler = FpsSampler(fps)
    return [t for t in times if sampler.offer(t)]


def cfr(rate: Fraction, seconds: float) -> list[float]:
    """Frame times of a constant-rate stream, as pts * time_base gives them."""
    return [float(i / rate) for i in range(int(seconds * rate))]


def test_30_fps_to_1_fps() -> None:
    times = cfr(Fraction(30), 10)
    assert kept(times, 1.0) == [float(i) for i in range(10)]


def test_25_fps_to_2_fps() -> None:
    # Slots every 0.5 s; 0.5 s is 12.5 frames, so the first frame at or after it is frame 13.
    times = cfr(Fraction(25), 3)
    frames = [round(t * 25) for t in kept(times, 2.0)]
    assert frames == [0, 13, 25, 38, 50, 63]


def test_ntsc_rate_does_not_drift() -> None:
    # 29.97 fps: frame 30 is at 1.001 s; after 100 s the kept frame is still the first of its slot.
    rate = Fraction(30000, 1001)
    frames = [round(t * rate) for t in kept(cfr(rate, 120), 1.0)]
    assert frames[:4] == [0, 30, 60, 90]
    assert frames[100] == math.ceil(100 * rate) == 2998
    assert len(frames) == 120


def test_jittered_timestamps() -> None:
    times = [0.0, 0.49, 0.98, 1.01, 1.52, 1.99, 2.03, 2.5, 2.999, 3.0]
    assert kept(times, 1.0) == [0.0, 1.01, 2.03, 3.0]


def test_gaps_skip_missed_slots_without_drift() -> None:
    times = [0.0, 0.5, 3.2, 3.4, 4.0, 4.1, 7.9, 8.05]
    # Slots 1-2 and 5-6 are empty; 4.0 is kept 0.8 s after 3.2 because slots stay anchored at 0.
    assert kept(times, 1.0) == [0.0, 3.2, 4.0, 7.9, 8.05]


def test_source_slower_than_fps_keeps_every_frame() -> None:
    times = cfr(Fraction(1), 10)
    assert kept(times, 4.0) == times


def test_slots_count_from_the_first_frame() -> None:
    times = [100.0 + t for t in cfr(Fraction(10), 3)]
    assert kept(times, 1.0) == [100.0, 101.0, 102.0]


def test_float_rounding_at_slot_boundaries() -> None:
    # Accumulated 0.1 steps land a hair below k/10 (0.7999999999999999); each is still its slot's.
    times, t = [], 0.0
    for _ in range(50):
        times.append(t)
        t += 0.1
    assert kept(times, 10.0) == times


def test_time_going_back_is_not_kept() -> None:
    sampler = FpsSampler(1.0)
    assert [sampler.offer(t) for t in (0.0, 1.0, 0.5, 1.5, 2.0)] == [True, True, False, False, True]


def test_fractional_fps() -> None:
    times = cfr(Fraction(5), 20)
    assert kept(times, 0.25) == [0.0, 4.0, 8.0, 12.0, 16.0]


@pytest.mark.parametrize("fps", [0, -1.0, math.nan, math.inf, -math.inf])
def test_rejects_bad_fps(fps: float) -> None:
    with pytest.raises(ValueError):
        FpsSampler(fps)


@pytest.mark.parametrize("t", [math.nan, math.inf])
def test_rejects_non_finite_time(t: float) -> None:
    with pytest.raises(ValueError):
        FpsSampler().offer(t)


# Rates with small denominators: with millisecond times no frame lies within 1e-6 slot of a
# boundary, so the exact rational oracle below is not blurred by float rounding.
RATES = [Fraction(1, 4), Fraction(1, 2), Fraction(1), Fraction(2), Fraction(3), Fraction(5)]
RATES += [Fraction(25, 2), Fraction(10), Fraction(30)]


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.integers(1, 3000), min_size=1, max_size=200),
    start=st.integers(0, 100_000),
    fps=st.sampled_from(RATES),
)
def test_first_frame_of_every_non_empty_slot(steps: list[int], start: int, fps: Fraction) -> None:
    millis = [start]
    for step in steps:
        millis.append(millis[-1] + step)
    times = [ms / 1000 for ms in millis]
    result = kept(times, float(fps))

    # Exact oracle: slot = floor((t - t0) * fps) in rationals; keep each slot's first frame.
    slots = [math.floor(Fraction(ms - millis[0], 1000) * fps) for ms in millis]
    expected = [t for i, t in enumerate(times) if i == 0 or slots[i] != slots[i - 1]]
    assert result == expected

    # Kept frames are a slot apart, less how late the earlier one came into its slot, which is
    # under one input frame interval: no slot is skipped while it has frames, none gets two.
    max_step = max(steps) / 1000
    for a, b in itertools.pairwise(result):
        assert b - a >= 1 / float(fps) - max_step - 1e-9
