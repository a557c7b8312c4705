"""benchmarks/pointer_diag.py runs on any checkpoint and counts every pointed answer token."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "pointer_diag.py"


def _module():
    spec = importlib.util.spec_from_file_location("pointer_diag", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagnosis_counts_every_pointed_token(model_cache, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LIVELENS_CACHE", str(model_cache))
    module = _module()
    assert module.main(["--model", "tiny", "--scenes", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    split = lines.index("Wrong pointers: what the frame pointed at shows")
    rows = {line.split("|")[1].strip(): line for line in lines[:split] if line.startswith("| ")}
    clip = module.scene_clip(module.HELD_OUT_SEED, 24)
    objects = len(clip.questions) // 3
    # One pointed token per AT and NOW answer, one per digit and point of every WHEN time.
    assert rows["at"].split("|")[2].strip() == str(objects)
    assert rows["now"].split("|")[2].strip() == str(objects)
    times = sum(len(re.findall(r"\d+\.\d", q.answer)) for q in clip.questions[:objects])
    assert objects >= 1 and times >= 2  # the scene's objects are there: each WHEN has 2 times
    assert int(rows["when"].split("|")[2]) >= 3 * times
    # Every WHEN time is a start or an end of a stay; each answer has as many of both.
    starts, ends = (int(rows[f"when {part}"].split("|")[2]) for part in ("start", "end"))
    assert starts + ends == int(rows["when"].split("|")[2])
    assert min(starts, ends) >= 3 * (times // 2)
    # Every wrong pointer of a question about an object is classified once.
    misses = {line.split("|")[1].strip(): line for line in lines[split:] if line.startswith("| ")}
    for row in ("when", "at", "now"):
        cells = [int(c) for c in misses[row].split("|")[2:6]]
        pointed, exact = int(rows[row].split("|")[2]), float(rows[row].split("|")[3])
        assert cells[0] == sum(cells[1:]) == round(pointed * (1 - exact))
    summary = lines[-1]
    assert re.fullmatch(
        r"when_pointer=\S+ when_start_pointer=\S+ when_end_pointer=\S+ at_pointer=\S+ "
        r"now_pointer=\S+ when_token_pointer_right=\S+ "
        r"when_first_digit=\S+",
        summary,
    ), summary


def test_a_wrong_pointer_is_classified_by_what_its_frame_shows() -> None:
    module = _module()
    shown = np.zeros(len(module.VOCABULARY), np.float32)
    assert module.miss_kind(shown, "red ball") == "no object"
    shown[module.VOCABULARY_INDEX["blue box"]] = 1
    assert module.miss_kind(shown, "red ball") == "another object"
    shown[module.VOCABULARY_INDEX["red ball"]] = 1
    assert module.miss_kind(shown, "red ball") == "asked object"


def test_a_shifted_scene_asks_the_same_under_later_labels() -> None:
    """--shift: same frames, every time in the questions and answers later by the shift."""
    module = _module()
    plain = module.scene_clip(module.HELD_OUT_SEED, 24)
    later = module.scene_clip(module.HELD_OUT_SEED, 24, shift=1200.0)
    assert (plain.frames == later.frames).all()
    assert later.times == [t + 1200.0 for t in plain.times]

    def times(text: str) -> list[float]:
        return [float(x) for x in re.findall(r"\d+\.\d", text)]

    assert any(times(q.answer) for q in plain.questions)
    for a, b in zip(plain.questions, later.questions, strict=True):
        assert times(b.answer) == [t + 1200.0 for t in times(a.answer)]
        assert times(b.question) == [t + 1200.0 for t in times(a.question)]
