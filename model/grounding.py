"""Parse VideoLLaMA3 temporal-grounding answers ("12.0 - 15.5", "from 3s to 5s") into segments.

VideoLLaMA3 answers grounding questions in plain media seconds (the original Charades-STA eval
reads "x.x - y.y" and "from x.x to y.y"). Only numbers in a time context become segments: two
values joined by a range separator, a value with a time unit, a clock form ("1:05"), or an
"[a, b]" pair. Counts ("3 people", "2-3 forklifts", "aisle 3") and measures ("3-5 m") do not.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """A time span of the stream in media seconds; start == end for a single instant."""

    start: float
    end: float


_NUMBER = r"\d+(?:\.\d+)?"
_CLOCK = r"\d+:[0-5]\d(?::[0-5]\d)?(?:\.\d+)?"
_UNIT = r"seconds?|secs?|s|minutes?|mins?|hours?|hrs?|h"
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}  # keyed by the unit's first letter

# A value starts on a word boundary that is not inside a date, version or code ("2024-01",
# "v2.0", "A3", "#3") and ends where no digit, letter or "%" continues it, unless a time unit
# follows ("3.5s", "7 seconds", "3.5-second").
_START = r"(?<![\w.:$#€£])(?<!\d[-/])"


def _value(name: str) -> str:
    return (
        rf"(?P<{name}>{_CLOCK}|{_NUMBER})(?!\d)(?![.:]\d)"
        rf"(?:(?:-|\s*)(?P<{name}u>{_UNIT})(?![^\W\d_])|(?![^\W\d_]|%))"
    )


_PATTERN = re.compile(
    rf"""
    \[\s*{_START}{_value("a1")}\s*,\s*{_value("a2")}\s*\]           # [12.0, 15.5]
    | \bbetween\s+{_START}{_value("b1")}\s+and\s+{_value("b2")}     # between 3 and 5 seconds
      (?![-/]\d)
    | {_START}{_value("r1")}                                         # 12.0 - 15.5, 3s to 5s
      (?:\s*[-–—~]\s*|\s+(?:to|until|till)\s+){_value("r2")}
      (?![-/]\d)
    | {_START}{_value("s1")}                                         # 3.5s, 1:05
    """,
    re.IGNORECASE | re.VERBOSE,
)
# Words after a unitless range that make it a measure, not a time ("in" is left out: "12.0 -
# 15.5 in the kitchen" is far likelier than inches).
_NON_TIME_WORDS = frozenset(
    {"m", "cm", "mm", "km", "meter", "meters", "metre", "metres", "ft", "feet", "foot", "inch",
     "inches", "mi", "mile", "miles", "mph", "kmh", "kg", "g", "lb", "lbs", "pounds", "kilograms",
     "degrees", "am", "pm", "percent", "times", "x"}
)  # fmt: skip
_FOLLOWER = re.compile(r"\s*(%|[^\W\d_]+)")
_AM_PM = re.compile(r"\s*[ap]\.?m\b", re.IGNORECASE)


def _seconds(value: str, unit: str | None) -> float:
    """Seconds for one matched value; Decimal keeps "1:02:03.3" and "1.5 min" exact."""
    try:
        if ":" in value:
            total = Decimal(0)
            for part in value.split(":"):
                total = total * 60 + Decimal(part)
            return float(total)
        factor = _UNIT_SECONDS[unit[0].lower()] if unit else 1
        return float(Decimal(value) * factor)
    except (InvalidOperation, OverflowError):
        return math.nan


def _is_time_range(text: str, match: re.Match[str], first: str, second: str) -> bool:
    """Whether a range with no unit on either side is a time and not a count or a measure."""
    follower = _FOLLOWER.match(text, match.end())
    word = follower.group(1).lower() if follower else ""
    if word == "%" or word in _NON_TIME_WORDS:
        return False
    # VideoLLaMA3 writes times with a decimal ("12.0"); whole numbers followed by a word are
    # counts ("2-3 forklifts", "between 3 and 5 people").
    whole = first.isdigit() and second.isdigit()
    return not (whole and word.isalpha())


def _spans(text: str) -> list[tuple[float, float]]:
    """Raw (start, end) pairs in order of appearance, before clipping."""
    spans: list[tuple[float, float]] = []
    for match in _PATTERN.finditer(text):
        groups = match.groupdict()
        name = next(prefix for prefix in ("a", "b", "r", "s") if groups[prefix + "1"] is not None)
        first, first_unit = groups[name + "1"], groups[name + "1u"]
        if name == "s":
            if first_unit is None and ":" not in first:
                continue  # a bare number: "3 people", "aisle 3"
            if first_unit is None and _AM_PM.match(text, match.end()):
                continue  # wall-clock time of day
            value = _seconds(first, first_unit)
            spans.append((value, value))
            continue
        second, second_unit = groups[name + "2"], groups[name + "2u"]
        unitless = first_unit is None and second_unit is None
        if unitless and name != "a" and not _is_time_range(text, match, first, second):
            continue
        # A unit written once ("3 to 5 seconds", "from 3s to 5") covers both ends.
        start = _seconds(first, first_unit or second_unit)
        end = _seconds(second, second_unit or first_unit)
        spans.append((min(start, end), max(start, end)))
    return spans


def parse_segments(
    text: str, *, stream_start: float = 0.0, stream_end: float | None = None
) -> list[Segment]:
    """Segments named in an answer, in order of appearance, clipped to the stream, no duplicates.

    Single instants become zero-length segments; reversed ranges are swapped; segments wholly
    outside [stream_start, stream_end] (no upper bound when stream_end is None) are dropped.
    Never raises on any text.
    """
    upper = math.inf if stream_end is None else stream_end
    if not isinstance(text, str) or not stream_start <= upper:
        return []
    segments: list[Segment] = []
    seen: set[Segment] = set()
    for start, end in _spans(text):
        if not (math.isfinite(start) and math.isfinite(end)):
            continue
        if end < stream_start or start > upper:
            logger.debug("segment %.3f-%.3f lies outside the stream", start, end)
            continue
        segment = Segment(float(max(start, stream_start)), float(min(end, upper)))
        if segment not in seen:
            seen.add(segment)
            segments.append(segment)
    return segments
