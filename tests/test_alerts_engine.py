"""Standing questions in the engine (`Engine.watch`): evaluated by media time, exact, batched.

Each evaluation's confidence must equal the one computed from transformers' own offline forward
(model/reference.py) over exactly the frames up to the evaluated one; evaluations of several
sessions run in the same step as other work; the cheap trigger skips only evaluations whose
video DiffFP found unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from test_engine import Plans, Recorder, _clip, _engine, _open, _run
from test_exactness import THRESHOLD

from livelens.model.engine import Engine, Probe
from livelens.model.reference import OfflineReference

CONDITION = "Is a red ball visible now?"


class Results:
    def __init__(self) -> None:
        self.probes: list[Probe] = []
        self.errors: list[Exception] = []


def _watch(engine: Engine, key: str, every: float, question: str = CONDITION) -> Results:
    results = Results()
    engine.watch(
        key,
        f"w-{key}",
        question,
        every=every,
        on_result=results.probes.append,
        on_error=results.errors.append,
    )
    return results


def _reference_confidence(
    engine: Engine, loaded, frames: np.ndarray, times: list[float], question: str
) -> float:
    logits = OfflineReference(loaded, frames, times, threshold=THRESHOLD).logits(question)
    probs = torch.softmax(logits.float(), dim=-1)
    yes = float(probs[list(engine.yes_ids)].sum())
    no = float(probs[list(engine.no_ids)].sum())
    return yes / (yes + no)


def test_each_evaluation_equals_the_offline_forward_and_batches(tiny_model) -> None:
    engine = _engine(tiny_model)
    plans = Plans(engine)
    clips = {"a": _clip(1, 4), "b": _clip(2, 4)}
    results = {}
    for key in clips:
        _open(engine, key)
        results[key] = _watch(engine, key, every=1.25)  # the clips' frame period
    for i in range(4):
        for key, (frames, times) in clips.items():
            assert engine.submit_frame(key, frames[i], times[i])
        engine.step()
    _run(engine, lambda: all(len(r.probes) == 4 for r in results.values()))

    for key, (frames, times) in clips.items():
        probes = results[key].probes
        assert not results[key].errors
        assert [p.time for p in probes] == times
        assert all(p.evaluated for p in probes)
        for i, probe in enumerate(probes):
            want = _reference_confidence(
                engine, tiny_model, frames[: i + 1], times[: i + 1], CONDITION
            )
            assert abs(probe.confidence - want) < 1e-4, (key, i, probe.confidence, want)
    # Both sessions' evaluations forked in one step, beside frame prefill.
    assert any(len(p.questions) == 2 and p.frames for p in plans.plans)
    assert engine.questions("a") == 0  # evaluations are not the session's questions
    assert engine.pool_usage()[0] == engine.stats("a").kv_blocks + engine.stats("b").kv_blocks


def test_every_is_media_time_and_a_question_still_answers_beside_it(tiny_model) -> None:
    engine = _engine(tiny_model)
    frames, times = _clip(3, 6)  # frames every 1.25 s from 0.5 s
    _open(engine, "a")
    results = _watch(engine, "a", every=2.5)
    for image, t in zip(frames, times, strict=True):
        engine.submit_frame("a", image, t)
        engine.step()
    question = Recorder()
    engine.submit_question("a", question.job)
    _run(engine, question.done.is_set)
    assert [p.time for p in results.probes] == times[::2]  # due at 0.5, 3.0, 5.5
    assert question.answer is not None and question.answer.stream_position == times[-1]


def test_due_times_keep_their_rate_when_frames_do_not_divide_it(tiny_model) -> None:
    """Frames every 0.9 s, every=1: due at 0, 1, 2, ... s, each taken by the first frame at or
    after it (not one evaluation per 1.8 s, as due times counted from each frame would give)."""
    engine = _engine(tiny_model)
    frames, _ = _clip(6, 8)
    times = [round(0.9 * i, 1) for i in range(8)]
    _open(engine, "a")
    results = _watch(engine, "a", every=1.0)
    for image, t in zip(frames, times, strict=True):
        engine.submit_frame("a", image, t)
        _run(engine, lambda: engine.pending("a") == 0 and not engine.session_record("a").probes)
    assert [p.time for p in results.probes] == [0.0, 1.8, 2.7, 3.6, 4.5, 5.4, 6.3]


def test_unchanged_video_skips_the_evaluation_and_a_change_runs_it(tiny_model) -> None:
    def run(skip: bool) -> list[Probe]:
        engine = _engine(tiny_model, skip_unchanged=skip)
        frames, _ = _clip(4, 2)
        still = [frames[0], frames[0], frames[0], frames[1]]  # a frozen scene, then a change
        _open(engine, "a")
        results = _watch(engine, "a", every=1.0)
        for i, image in enumerate(still):  # each after the last evaluation, as in real time
            engine.submit_frame("a", image, float(i))
            _run(engine, lambda i=i: len(results.probes) == i + 1)
        return results.probes

    probes = run(skip=True)
    assert [p.evaluated for p in probes] == [True, False, False, True]
    assert probes[1].confidence == probes[2].confidence == probes[0].confidence
    assert [p.time for p in probes] == [0.0, 1.0, 2.0, 3.0]
    assert all(p.evaluated for p in run(skip=False))


def test_unwatch_stops_the_evaluations(tiny_model) -> None:
    engine = _engine(tiny_model)
    frames, times = _clip(5, 4)
    _open(engine, "a")
    results = _watch(engine, "a", every=1.25)
    engine.submit_frame("a", frames[0], times[0])
    _run(engine, lambda: len(results.probes) == 1)
    assert engine.unwatch("a", "w-a") and not engine.unwatch("a", "w-a")
    for image, t in zip(frames[1:], times[1:], strict=True):
        engine.submit_frame("a", image, t)
    _run(engine, lambda: engine.pending("a") == 0)
    for _ in range(3):
        engine.step()
    assert len(results.probes) == 1
    assert engine.pool_usage()[0] == engine.stats("a").kv_blocks
