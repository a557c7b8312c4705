"""The scene generator: deterministic, its ground truth matches its pixels, it encodes to video."""

from __future__ import annotations

import random

import av
import numpy as np
import pytest

from livelens.model.grounding import parse_segments
from livelens.model.qa import Kind, QuestionMaker, corpus, frame_spans, grounding_answer
from livelens.model.scenes import COLOURS, FAMILIES, generate_scene, vocabulary


def _without(scene, *names: str):
    """The same scene without some objects (all by default): same background, same noise."""
    kept = tuple(o for o in scene.objects if names and o.name not in names)
    return type(scene)(**{**scene.__dict__, "objects": kept, "_noise_cache": {}})


def _changed(scene, other, t: float) -> np.ndarray:
    """Pixels where two renderings of the same moment differ."""
    return np.abs(scene.frame(t).astype(int) - other.frame(t).astype(int)).max(axis=2) > 8


def test_same_seed_same_scene_and_pixels() -> None:
    a, b = generate_scene(11), generate_scene(11)
    assert a.ground_truth() == b.ground_truth()
    t = a.objects[0].visible[0].start + 1
    assert np.array_equal(a.frame(t), b.frame(t))
    assert a.ground_truth() != generate_scene(12).ground_truth()


@pytest.mark.parametrize("seed", range(12))
def test_ground_truth_matches_pixels(seed: int) -> None:
    """Inside a visible interval the object is drawn; with nothing visible, nothing is."""
    scene = generate_scene(seed, noise=0.0)
    empty = _without(scene)
    assert 1 <= len(scene.objects) <= 3
    assert scene.family in FAMILIES and {o.name for o in scene.objects} <= set(vocabulary())
    checked = 0
    for obj in scene.objects:
        for stay in obj.visible:
            assert stay.length >= 4.0 and 0 <= stay.start < stay.end <= scene.duration
            t = (stay.start + stay.end) / 2
            colour = np.array(COLOURS[obj.colour])
            changed = _changed(scene, empty, t)
            # The object's own colour is drawn where the picture changed.
            near = np.abs(scene.frame(t)[changed].astype(int) - colour).max(axis=1) <= 10
            assert near.sum() > 0.002 * scene.width * scene.height, (obj.name, t)
            checked += 1
    assert checked >= len(scene.objects)


def _quiet_moments(scene) -> list[float]:
    """Moments with no object visible and no stay starting or ending within 0.3 s."""
    edges = [b for o in scene.objects for v in o.visible for b in (v.start, v.end)]
    return [
        float(t)
        for t in np.arange(0, scene.duration, 0.25)
        if not scene.visible_at(t) and all(abs(t - e) > 0.3 for e in edges)
    ]


def test_nothing_visible_renders_the_bare_background() -> None:
    checked = 0
    for seed in range(20):
        scene = generate_scene(seed, noise=0.0)
        empty = _without(scene)
        for t in _quiet_moments(scene)[:2]:
            diff = np.abs(scene.frame(t).astype(int) - empty.frame(t).astype(int))
            assert diff.max() == 0, (seed, t)
            checked += 1
    assert checked >= 20  # most scenes have quiet moments; some are never empty


def test_entering_object_is_half_visible_at_its_start() -> None:
    """Objects that enter cross the edge symmetric about `start`: half inside at that moment."""
    found = 0
    for seed in range(40):
        scene = generate_scene(seed, noise=0.0, duration=30.0)
        for obj in scene.objects:
            alone = _without(scene, obj.name)
            for occ in obj.occurrences:
                x0 = occ.path[0].x
                if not (x0 < 0 or x0 > 1) or occ.visible.start == 0:
                    continue
                before = _changed(scene, alone, occ.visible.start - 0.19).sum()
                after = _changed(scene, alone, occ.visible.start + 0.19).sum()
                assert after > 3 * max(1, before)
                found += 1
        if found >= 3:
            break
    assert found >= 3


def test_vocabulary_and_ranges() -> None:
    assert len(vocabulary()) == 20 and len(set(vocabulary())) == 20
    for seed in range(30):
        scene = generate_scene(seed)
        assert 10 <= scene.duration <= 300 and 10 <= scene.fps <= 30
        assert 320 <= scene.width <= 1280 and 240 <= scene.height <= 720
        assert len({o.name for o in scene.objects}) == len(scene.objects)
    with pytest.raises(ValueError):
        generate_scene(0, duration=5)
    with pytest.raises(ValueError):
        generate_scene(0, objects=["purple ball"])


@pytest.mark.parametrize("codec,suffix", [("h264", ".mp4"), ("vp8", ".webm")])
def test_write_encodes_every_frame(tmp_path, codec: str, suffix: str) -> None:
    scene = generate_scene(5, duration=10.0, fps=10, size=(320, 240))
    path = scene.write(tmp_path / f"scene{suffix}", codec=codec)
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == scene.frame_count == 100
    assert (frames[0].width, frames[0].height) == (320, 240)
    # The decoded picture is the rendered one up to compression error.
    rendered = scene.frame(5.0, index=50).astype(int)
    decoded = frames[50].to_ndarray(format="rgb24").astype(int)
    assert np.abs(rendered - decoded).mean() < 6


def test_frame_spans_end_at_the_frame_where_the_object_is_gone() -> None:
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # Gone at 3.0 (shown at 1.0-2.0), back at 4.0 and still there at the newest frame.
    assert frame_spans(times, [0, 1, 1, 0, 1, 1, 1]) == [(1.0, 3.0), (4.0, 6.0)]
    assert frame_spans(times, [1, 0, 0, 0, 0, 0, 1]) == [(0.0, 1.0), (6.0, 6.0)]
    assert frame_spans(times, [0] * 7) == []
    assert frame_spans([2.5], [1]) == [(2.5, 2.5)]


def test_question_answers_parse_back_to_their_frame_spans() -> None:
    scene = generate_scene(3, duration=40.0)
    times = [float(t) for t in range(40)]
    maker = QuestionMaker(scene, times)
    for obj in scene.objects:
        qa = maker.when(obj.name)
        spans = frame_spans(times, maker.seen(obj.name))
        assert spans, obj.name
        segments = parse_segments(qa.answer, stream_end=times[-1])
        assert [(s.start, s.end) for s in segments] == spans
        assert len(qa.truth) == len(obj.visible)
    absent = next(n for n in vocabulary() if scene.object(n) is None)
    assert parse_segments(maker.when(absent).answer) == []
    assert (
        grounding_answer([(1.0, 2.5), (7.0, 9.0)], "x")
        == "From 1.0s to 2.5s and from 7.0s to 9.0s."
    )


def test_clip_offset_shifts_truth_into_media_time() -> None:
    scene = generate_scene(8, duration=60.0)
    obj = scene.objects[0]
    stay = obj.visible[0]
    offset = max(0.0, stay.start - 5)
    times = [float(t) for t in range(20)]
    maker = QuestionMaker(scene, times, offset=offset)
    qa = maker.first(obj.name)
    assert qa.truth[0].start == pytest.approx(max(0.0, stay.start - offset))
    assert maker.at(obj.name, stay.start - offset + 1).answer == "Yes."
    # A clip whose media time starts later: the truth starts no earlier than its first frame.
    later = QuestionMaker(scene, [t + 100 for t in times], offset=offset - 100)
    first = later.first(obj.name).truth[0]
    assert first.start == pytest.approx(max(100.0, stay.start - offset + 100))


def test_every_kind_is_asked_and_answered() -> None:
    scene = generate_scene(21, duration=30.0)
    maker = QuestionMaker(scene, [float(t) for t in range(30)])
    asked = maker.questions(random.Random(0), 40)
    assert {q.kind for q in asked} == set(Kind)
    for q in asked:
        assert q.answer and q.question.endswith("?")
    assert all(line for line in corpus())
