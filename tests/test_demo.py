"""`make demo` (stream/demo.py): a held-out scene, the trained wording, answer vs ground truth.

The answer-quality test needs the trained checkpoint (model/tiny_grounding/) and skips without
it; the format test steers the random-weight tiny model to a known answer, so the printed
segments, truth and IoU are checked exactly.
"""

from __future__ import annotations

import json
import re

import pytest
from service_harness import SteeredRunner

from livelens.model import qa
from livelens.model.loading import TINY_GROUNDING_DIR
from livelens.model.scenes import Interval
from livelens.model.training import HELD_OUT_SEED
from livelens.stream import demo

TRAINED = (TINY_GROUNDING_DIR / "config.json").is_file()
LINES = (
    "video: ",
    "model: ",
    "question: ",
    "answer: ",
    "segments: ",
    "stats: ",
    "truth: ",
    "iou: ",
)


def _printed(text: str) -> dict[str, str]:
    """The demo's output lines by prefix, checking they come in order, one each."""
    lines = text.splitlines()
    assert [next(p for p in LINES if line.startswith(p)) for line in lines] == list(LINES), text
    return {prefix: line.removeprefix(prefix) for prefix, line in zip(LINES, lines, strict=True)}


@pytest.mark.parametrize("duration", [demo.ASK_SECONDS, demo.LOOP_SECONDS])
def test_demo_scene_is_held_out_and_the_ball_comes_and_goes_once(duration: float) -> None:
    scene = demo.demo_scene(duration)
    assert scene.seed >= HELD_OUT_SEED
    assert scene.duration == duration and scene.frame_count == duration * 10
    (stay,) = scene.object("red ball").visible
    # Well inside the clip, several sampled frames long, and overlapping the blue box.
    assert duration / 4 <= stay.start and stay.end <= duration * 3 / 4 and stay.length >= 6
    assert any(
        box.start < stay.end and stay.start < box.end for box in scene.object("blue box").visible
    )
    question = demo.demo_question(scene)
    assert question == "When is the red ball visible?" and question in qa.corpus()


def test_looped_truth_repeats_the_stay_every_pass() -> None:
    scene = demo.demo_scene(demo.LOOP_SECONDS)
    (stay,) = scene.object("red ball").visible
    assert demo.loop_period(scene) == 48.0
    assert demo.looped_truth(scene, 10.0) == []
    assert demo.looped_truth(scene, 25.0) == [Interval(stay.start, 25.0)]
    assert demo.looped_truth(scene, 100.0) == [
        Interval(stay.start, stay.end),
        Interval(stay.start + 48, stay.end + 48),
    ]


def test_demo_prints_answer_segments_truth_and_iou(
    tiny_model, model_cache, monkeypatch, capsys
) -> None:
    """Whatever the model says, the demo scores it against the truth: here the tiny model is
    steered to 10-16 s, while the ball is visible 10.04-16.86 s (IoU 5.96/6.86)."""
    import livelens.model.runner

    monkeypatch.setenv("LIVELENS_CACHE", str(model_cache))
    monkeypatch.setattr(
        livelens.model.runner,
        "ModelRunner",
        lambda loaded: SteeredRunner(loaded, "From 10.0s to 16.0s."),
    )
    assert demo.main(["--model", "tiny", "--device", "cpu"]) == 0
    printed = _printed(capsys.readouterr().out)
    assert printed["model: "] == "tiny"
    assert printed["question: "] == "When is the red ball visible?"
    assert printed["answer: "] == "From 10.0s to 16.0s."
    assert json.loads(printed["segments: "]) == [{"start": 10.0, "end": 16.0}]
    assert json.loads(printed["stats: "])["frames"] == 24
    assert printed["truth: "] == (
        '[{"start": 10.04, "end": 16.86}] (a perfect answer: From 11.0s to 17.0s.)'
    )
    assert printed["iou: "] == "0.87"


@pytest.mark.slow
@pytest.mark.skipif(not TRAINED, reason="the trained model/tiny_grounding/ is not committed yet")
def test_make_demo_grounds_the_red_ball_with_the_trained_model(capsys) -> None:
    assert demo.main(["--device", "cpu"]) == 0  # the default model: tiny-grounding
    printed = _printed(capsys.readouterr().out)
    assert printed["model: "] == "tiny-grounding"
    segments = json.loads(printed["segments: "])
    assert segments, printed["answer: "]
    truth_json = re.match(r"(\[.*?\]) \(", printed["truth: "]).group(1)
    (truth,) = json.loads(truth_json)
    for segment in segments:  # within a sampled frame (1 s) of the true stay
        assert truth["start"] - 1 <= segment["start"] <= segment["end"] <= truth["end"] + 1
    assert float(printed["iou: "]) >= 0.5, printed


def test_without_the_trained_model_the_demo_says_so_and_asks_tiny(
    tmp_path, model_cache, monkeypatch, capsys, caplog
) -> None:
    from livelens.model import loading

    monkeypatch.setenv("LIVELENS_CACHE", str(model_cache))
    monkeypatch.setattr(loading, "TINY_GROUNDING_DIR", tmp_path)  # an installation without it
    assert demo.main(["--device", "cpu"]) == 0
    printed = _printed(capsys.readouterr().out)
    assert printed["model: "] == "tiny"
    assert "not trained yet" in caplog.text and "noise" in caplog.text
    with pytest.raises(loading.ModelLoadError, match=r"python -m livelens\.model\.training"):
        loading.resolve_checkpoint("tiny-grounding")
