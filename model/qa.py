"""Questions about a generated scene and their true answers, in VideoLLaMA3's answer style.

Answers name times by the `Time {t:.1f}s:` labels of the sampled frames the model saw, so a
perfect answer is a copy of labels: grounding answers are "From 12.0s to 15.5s." (one clause per
stay: from the first frame showing the object to the first one where it is gone, frame_spans),
yes/no answers are "Yes." / "No.", scene answers list the objects ("A red ball and a
blue box."). model/grounding.py reads every one of these forms.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass

from livelens.model.scenes import Interval, Scene, vocabulary


class Kind(enum.StrEnum):
    """What a question asks; benchmarks score each kind with its own metric."""

    WHEN = "when"
    """Every interval in which an object is visible."""
    FIRST = "first"
    """The first interval in which an object is visible."""
    AT = "at"
    """Yes/no: is an object visible at a given moment."""
    NOW = "now"
    """Yes/no: is an object visible in the newest frame (what standing alerts ask)."""
    SCENE = "scene"
    """What is visible in the newest frame."""
    SCENE_AT = "scene_at"
    """What is visible at a given moment."""


@dataclass(frozen=True)
class QA:
    kind: Kind
    question: str
    answer: str
    target: str | None = None
    """The object asked about (WHEN, FIRST, AT, NOW)."""
    truth: tuple[Interval, ...] = ()
    """Grounding kinds: the true intervals in media seconds (not rounded to frames)."""
    moment: float | None = None
    """AT, SCENE_AT: the moment asked about."""


_WHEN = (
    "When is the {o} visible?",
    "When is there a {o}?",
    "When does the {o} appear in the video?",
    "During which times is the {o} in the scene?",
)
_FIRST = (
    "When did the {o} first appear?",
    "When is the {o} visible for the first time?",
)
_AT = ("Is there a {o} at {t}s?", "Is the {o} visible at {t}s?")
STANDING_TEMPLATE = "Answer yes or no: is it true now that {condition}?"
"""How an alert's condition (a statement) becomes its yes/no question (stream/alerts.py)."""
_NOW = (
    "Is a {o} visible now?",
    "Is there a {o} in the scene now?",
    STANDING_TEMPLATE.format(condition="a {o} is visible"),
)
_SCENE = ("What is in the scene now?", "What can you see now?")
_SCENE_AT = ("What is in the scene at {t}s?",)


def standing_question(condition: str) -> str:
    """The yes/no question of an alert: the condition itself when it is a question ("Is the
    conveyor stopped?"), else STANDING_TEMPLATE around the statement ("a red ball is
    visible"); the tiny grounding model is trained on that form."""
    condition = condition.strip()
    if condition.endswith("?"):
        return condition
    return STANDING_TEMPLATE.format(condition=condition.rstrip(".!").strip())


def label(t: float) -> str:
    """A frame time as the prompt writes it (`Time {t:.1f}s:`)."""
    return f"{t:.1f}"


def frame_spans(times: Sequence[float], visible: Sequence[bool]) -> list[tuple[float, float]]:
    """Runs of consecutive visible frames as (start, end): `start` is the run's first frame,
    `end` the first frame after it without the object (the newest frame when the run reaches
    it).

    Both ends are frames where something changed: the object entered, or it left. A frame sees
    the frames before it, never the ones after, so the last frame showing the object cannot know
    it is the last, while the next frame can tell the object left. An answer that names the
    frame where the object is gone can be read off one frame, as the start is (run ptr5 named
    the last frame showing it: 47 of its 52 wrong ends were earlier frames of the same stay,
    docs/benchmarks.md). Against the true interval either convention is off by under one
    sampling period at the end, on average half of one.
    """
    spans: list[tuple[float, float]] = []
    start: float | None = None
    for t, v in zip(times, visible, strict=True):
        if v and start is None:
            start = t
        elif not v and start is not None:
            spans.append((start, t))
            start = None
    if start is not None:
        spans.append((start, times[-1]))
    return spans


def grounding_answer(spans: Sequence[tuple[float, float]], name: str) -> str:
    if not spans:
        return f"There is no {name} in the video."
    clauses = [f"from {label(a)}s to {label(b)}s" for a, b in spans]
    text = " and ".join(clauses)
    return text[0].upper() + text[1:] + "."


def scene_answer(names: Sequence[str]) -> str:
    if not names:
        return "Nothing."
    items = [f"a {n}" for n in names]
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return text[0].upper() + text[1:] + "."


def yes_no(value: bool) -> str:
    return "Yes." if value else "No."


class QuestionMaker:
    """True Q&A pairs about a scene as sampled at `times` (the frames the model sees).

    offset: scene time of media time 0, for a clip cut from the middle of a scene.
    """

    def __init__(self, scene: Scene, times: Sequence[float], *, offset: float = 0.0) -> None:
        if not times:
            raise ValueError("no sampled frames")
        self.scene = scene
        self.times = list(times)
        self.offset = offset
        self.present = [o.name for o in scene.objects]

    def _visible(self, name: str, t: float) -> bool:
        obj = self.scene.object(name)
        return obj is not None and obj.visible_at(t + self.offset)

    def _names_at(self, t: float) -> list[str]:
        return [o.name for o in self.scene.visible_at(t + self.offset)]

    def seen(self, name: str) -> list[bool]:
        return [self._visible(name, t) for t in self.times]

    def _truth(self, name: str) -> tuple[Interval, ...]:
        """Visible intervals in media time, clipped to [first frame, newest frame]."""
        obj = self.scene.object(name)
        if obj is None:
            return ()
        first, end = self.times[0], self.times[-1]
        spans = ((v.start - self.offset, v.end - self.offset) for v in obj.visible)
        return tuple(
            Interval(max(a, first), min(b, end)) for a, b in spans if a <= end and b >= first
        )

    def when(self, name: str, template: str = _WHEN[0]) -> QA:
        spans = frame_spans(self.times, self.seen(name))
        return QA(
            Kind.WHEN,
            template.format(o=name),
            grounding_answer(spans, name),
            name,
            self._truth(name),
        )

    def first(self, name: str, template: str = _FIRST[0]) -> QA:
        spans = frame_spans(self.times, self.seen(name))[:1]
        return QA(
            Kind.FIRST,
            template.format(o=name),
            grounding_answer(spans, name),
            name,
            self._truth(name)[:1],
        )

    def at(self, name: str, t: float, template: str = _AT[0]) -> QA:
        value = self._visible(name, t)
        question = template.format(o=name, t=label(t))
        return QA(Kind.AT, question, yes_no(value), name, moment=t)

    def now(self, name: str, template: str = _NOW[0]) -> QA:
        value = self.seen(name)[-1]
        return QA(Kind.NOW, template.format(o=name), yes_no(value), name, moment=self.times[-1])

    def scene_now(self, template: str = _SCENE[0]) -> QA:
        names = self._names_at(self.times[-1])
        return QA(Kind.SCENE, template, scene_answer(names), moment=self.times[-1])

    def scene_at(self, t: float, template: str = _SCENE_AT[0]) -> QA:
        names = self._names_at(t)
        question = template.format(t=label(t))
        return QA(Kind.SCENE_AT, question, scene_answer(names), moment=t)

    def yes_no(self, rng: random.Random, kind: Kind, want: bool, elsewhere: bool) -> QA | None:
        """An AT or NOW question answered `want` (None when the clip has none). With `elsewhere`,
        a "No." asks about an object the clip shows at other moments: the hard negative, which
        only reading the asked moment's frame answers ("was it ever there" is not enough)."""
        moments = [self.times[-1]] if kind is Kind.NOW else self.times
        names = self.present if want or elsewhere else list(vocabulary())
        pairs = []
        for name in names:
            seen = self.seen(name)
            if not want and elsewhere and not any(seen):
                continue
            at = seen[-1:] if kind is Kind.NOW else seen
            pairs += [(name, t) for t, v in zip(moments, at, strict=True) if v == want]
        if not pairs:
            return None
        name, t = rng.choice(pairs)
        if kind is Kind.NOW:
            return self.now(name, rng.choice(_NOW))
        return self.at(name, t, rng.choice(_AT))

    def sample(self, rng: random.Random, kinds: Sequence[Kind] = tuple(Kind)) -> QA:
        """One random question of one of `kinds`: about a present object 3 times in 4."""
        kind = rng.choice(list(kinds))
        if rng.random() < 0.75 or kind in (Kind.SCENE, Kind.SCENE_AT):
            name = rng.choice(self.present)
        else:
            name = rng.choice([n for n in vocabulary() if n not in self.present])
        # Objects that left before the clip or come after it are absent from it too.
        if kind is Kind.WHEN:
            return self.when(name, rng.choice(_WHEN))
        if kind is Kind.FIRST:
            return self.first(name, rng.choice(_FIRST))
        if kind is Kind.AT:
            return self.at(name, rng.choice(self.times), rng.choice(_AT))
        if kind is Kind.NOW:
            return self.now(name, rng.choice(_NOW))
        if kind is Kind.SCENE:
            return self.scene_now(rng.choice(_SCENE))
        return self.scene_at(rng.choice(self.times))

    def questions(
        self, rng: random.Random, count: int, kinds: Sequence[Kind] = tuple(Kind)
    ) -> list[QA]:
        """`count` distinct questions (fewer when the scene has fewer to ask)."""
        out: dict[str, QA] = {}
        for _ in range(count * 4):
            qa = self.sample(rng, kinds)
            out.setdefault(qa.question, qa)
            if len(out) == count:
                break
        return list(out.values())


def corpus() -> list[str]:
    """Every template and answer word, for training the tiny model's tokenizer."""
    lines = [t.format(o=n, t="12.0") for n in vocabulary() for t in (*_WHEN, *_FIRST, *_AT, *_NOW)]
    lines += [*_SCENE, *(t.format(t="3.5") for t in _SCENE_AT)]
    lines += [grounding_answer([(1.0, 2.5), (7.0, 9.0)], n) for n in vocabulary()]
    lines += [grounding_answer([], n) for n in vocabulary()]
    lines += [scene_answer(vocabulary()[i : i + 3]) for i in range(0, 18)]
    lines += ["Yes.", "No.", "Nothing."]
    return lines
