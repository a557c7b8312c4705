"""benchmarks/pointer_diag.py runs on any checkpoint and counts every pointed answer token."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

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
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    clip = module.scene_clip(module.HELD_OUT_SEED, 24)
    objects = len(clip.questions) // 3
    # One pointed token per AT and NOW answer, one per digit and point of every WHEN time.
    assert rows["at"].split("|")[2].strip() == str(objects)
    assert rows["now"].split("|")[2].strip() == str(objects)
    times = sum(len(re.findall(r"\d+\.\d", q.answer)) for q in clip.questions[:objects])
    assert objects >= 1 and times >= 2  # the scene's objects are there: each WHEN has 2 times
    assert int(rows["when"].split("|")[2]) >= 3 * times
    summary = lines[-1]
    assert re.fullmatch(
        r"when_pointer=\S+ at_pointer=\S+ now_pointer=\S+ when_token_pointer_right=\S+ "
        r"when_first_digit=\S+",
        summary,
    ), summary
