"""Grounding answers -> segments: the formats VideoLLaMA3 writes, and what is not a time."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livelens.model.grounding import Segment, parse_segments


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("12.0 - 15.5", [(12.0, 15.5)]),
        ("12.0-15.5 seconds", [(12.0, 15.5)]),
        ("12.0 – 15.5", [(12.0, 15.5)]),
        ("from 12.0s to 15.5s", [(12.0, 15.5)]),
        ("The white van parks from 12.0 to 15.5 seconds.", [(12.0, 15.5)]),
        ("The person opens the door between 3 and 5 seconds.", [(3.0, 5.0)]),
        ("It happens 12.0 to 15.5.", [(12.0, 15.5)]),
        ("[12.0, 15.5]", [(12.0, 15.5)]),
        ("The ball is kicked at 3.5 seconds.", [(3.5, 3.5)]),
        ("3.5s", [(3.5, 3.5)]),
        ("The light turns red around 7 s into the clip.", [(7.0, 7.0)]),
        ("A 3.5-second flash.", [(3.5, 3.5)]),
        ("Time 41.0s: the gate opens.", [(41.0, 41.0)]),
        ("From 15.5 to 12.0 seconds.", [(12.0, 15.5)]),
        ("between 1 and 2 minutes", [(60.0, 120.0)]),
        ("00:12 - 00:15", [(12.0, 15.0)]),
        ("The car stops at 1:05.", [(65.0, 65.0)]),
        ("1:02:03 to 1:02:10.5", [(3723.0, 3730.5)]),
        ("12.0 - 15.5 in the kitchen", [(12.0, 15.5)]),
        (
            "The van arrives at 4.0s, is unloaded from 20.5 to 31.0 seconds, and leaves 40.0 - "
            "42.5.",
            [(4.0, 4.0), (20.5, 31.0), (40.0, 42.5)],
        ),
        ("It occurs 12.0 - 15.5 and again [12.0, 15.5].", [(12.0, 15.5)]),
    ],
)
def test_answers(answer: str, expected: list[tuple[float, float]]) -> None:
    assert parse_segments(answer) == [Segment(start, end) for start, end in expected]


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "There are 3 people near the entrance.",
        "Check aisle 3.",
        "2 forklifts are moving.",
        "2-3 forklifts",
        "between 3 and 5 people",
        "3 to 5 workers wear helmets.",
        "The pallet is 3-5 m away, about 1.5 to 2.5 km from the gate.",
        "50% of the shelves are empty, 3-5% are damaged.",
        "Recorded on 2024-01-05 by camera 3 at 10:30 am.",
        "Firmware v2.0 on the 3rd camera.",
        "at 3 the van parks",
    ],
)
def test_numbers_that_are_not_times(answer: str) -> None:
    assert parse_segments(answer) == []


def test_clipping_to_the_stream() -> None:
    window = {"stream_start": 10.0, "stream_end": 20.0}
    assert parse_segments("from 5.0 to 25.0 seconds", **window) == [Segment(10.0, 20.0)]
    assert parse_segments("12.0 - 15.5", **window) == [Segment(12.0, 15.5)]
    assert parse_segments("at 3.0s, then 30.0 - 40.0 and 9.5 - 9.9", **window) == []
    # Touching the window counts as inside: it clips to an instant on the boundary.
    assert parse_segments("0.0 - 10.0 and at 20.0s", **window) == [
        Segment(10.0, 10.0),
        Segment(20.0, 20.0),
    ]
    # Two answers that clip to the same segment are one segment.
    assert parse_segments("5.0 - 25.0, 0.0 - 30.0", **window) == [Segment(10.0, 20.0)]
    assert parse_segments("at 3.0s and 900.0 - 950.0", stream_start=5.0) == [Segment(900.0, 950.0)]
    assert parse_segments("12.0 - 15.5", stream_start=20.0, stream_end=10.0) == []
    (clipped,) = parse_segments("3 - 50 s", **window)
    assert type(clipped.start) is float and type(clipped.end) is float


# --- properties -------------------------------------------------------------------------------

# Digit-free words that are not units, range separators or measures.
FILLER = (
    "the", "white", "van", "man", "opens", "door", "parks", "walks", "and", "then", "while",
    "camera", "scene", "person", "later", "again", "clip", "it", "happens", "is", "seen", "in",
    "event", "occurs", ",", ".", ";", "The", "Answer:",
)  # fmt: skip


def _decimal(tenths: int) -> tuple[str, float]:
    text = f"{tenths / 10:.1f}"
    return text, float(text)


def _whole_or_decimal(tenths: int, whole: bool) -> tuple[str, float]:
    return (str(tenths // 10), float(tenths // 10)) if whole else _decimal(tenths)


def _clock(tenths: int) -> tuple[str, float]:
    seconds = tenths // 10
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
    return text, float(seconds)


RANGE_FORMATS = (
    ("{a} - {b}", _decimal),
    ("{a}-{b}", _decimal),
    ("{a} – {b}", _decimal),
    ("{a} to {b}", _decimal),
    ("{a}-{b} seconds", None),
    ("from {a}s to {b}s", None),
    ("from {a} seconds to {b} seconds", None),
    ("between {a} and {b} seconds", None),
    ("[{a}, {b}]", None),
    ("{a} - {b}", _clock),
    ("from {a} to {b}", _clock),
)
SINGLE_FORMATS = (
    ("at {a} seconds", None),
    ("{a}s", None),
    ("around {a} s", None),
    ("at {a}", _clock),
)


@st.composite
def rendered_answers(draw: st.DrawFn) -> tuple[str, list[Segment]]:
    """An answer made of segments in random supported formats, with the segments it names."""
    parts = [draw(st.sampled_from(FILLER)) for _ in range(draw(st.integers(0, 3)))]
    expected: list[Segment] = []
    for _ in range(draw(st.integers(0, 5))):
        single = draw(st.booleans())
        template, render = draw(st.sampled_from(SINGLE_FORMATS if single else RANGE_FORMATS))
        if render is None:  # unit or brackets make any precision a time, whole numbers too
            whole = draw(st.booleans())
            render = lambda t, whole=whole: _whole_or_decimal(t, whole)  # noqa: E731
        a_text, a = render(draw(st.integers(0, 40_000)))
        if single:
            parts.append(template.format(a=a_text))
            segment = Segment(a, a)
        else:
            b_text, b = render(draw(st.integers(0, 40_000)))
            parts.append(template.format(a=a_text, b=b_text))
            segment = Segment(min(a, b), max(a, b))
        if segment not in expected:
            expected.append(segment)
        parts.extend(draw(st.sampled_from(FILLER)) for _ in range(draw(st.integers(1, 3))))
    return " ".join(parts), expected


@given(rendered_answers())
def test_rendered_segments_are_parsed_exactly(answer: tuple[str, list[Segment]]) -> None:
    text, expected = answer
    assert parse_segments(text) == expected


TIMEY = st.text(alphabet=st.sampled_from(list("0123456789.:,-–~[] sSmhtoandbewrfi%/\n")))
BOUNDS = st.tuples(
    st.floats(0, 1e4, allow_nan=False),
    st.one_of(st.none(), st.floats(0, 1e4, allow_nan=False)),
)


@given(st.one_of(st.text(), TIMEY), BOUNDS)
def test_any_text_gives_segments_inside_the_stream(text: str, bounds: tuple) -> None:
    stream_start, span = bounds
    stream_end = None if span is None else stream_start + span
    segments = parse_segments(text, stream_start=stream_start, stream_end=stream_end)

    upper = math.inf if stream_end is None else stream_end
    assert len(set(segments)) == len(segments)
    for segment in segments:
        assert math.isfinite(segment.start) and math.isfinite(segment.end)
        assert stream_start <= segment.start <= segment.end <= upper


@given(TIMEY, st.floats(0, 50, allow_nan=False), st.floats(0, 50, allow_nan=False))
def test_clipping_equals_clipping_the_unbounded_answer(text: str, lo: float, span: float) -> None:
    hi = lo + span
    clipped: list[Segment] = []
    for s in parse_segments(text):
        if s.end >= lo and s.start <= hi:
            segment = Segment(max(s.start, lo), min(s.end, hi))
            if segment not in clipped:
                clipped.append(segment)
    assert parse_segments(text, stream_start=lo, stream_end=hi) == clipped
