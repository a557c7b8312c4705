"""benchmarks/grounding.py on one short held-out scene with the random tiny model (CPU).

The offline path (what `livelens ask` runs) and the oracle (transformers' own generate over the
whole prompt) must give token-identical answers to every question; the table and the last line
have the documented format; the questions cover every object of the scene.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from livelens.model.qa import Kind
from livelens.stream.cli import main as livelens

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "grounding.py"


@pytest.fixture(scope="module")
def grounding() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grounding_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_plan_asks_about_every_object_and_balances_yes_no(grounding, tmp_path) -> None:
    [case] = grounding.make_cases(
        1, 3, tmp_path, fps=1.0, seconds=(10, 10), size=(160, 120), scene_fps=5, at_questions=4
    )
    names = [o.name for o in case.scene.objects]
    when = [a.name for a in case.plan if a.kind is Kind.WHEN]
    assert when[:-1] == names and when[-1] not in names  # one absent object
    assert [a.name for a in case.plan if a.kind is Kind.NOW] == when
    qas = case.questions(case.times)
    at = [qa.answer for qa in qas if qa.kind is Kind.AT]
    assert len(at) == 4 and at.count("Yes.") == at.count("No.") == 2, at
    assert all(qa.moment in case.times for qa in qas if qa.kind is Kind.AT)


def test_offline_and_oracle_agree_token_for_token(
    grounding, capsys, tmp_path, model_cache, monkeypatch
) -> None:
    monkeypatch.setenv("LIVELENS_CACHE", str(model_cache))
    out = tmp_path / "grounding.json"
    code = grounding.main(
        [
            "--scenes", "1", "--seed", "0", "--paths", "offline,oracle", "--model", "tiny",
            "--min-seconds", "10", "--max-seconds", "10", "--size", "160x120",
            "--scene-fps", "5", "--max-new-tokens", "6", "--at-questions", "2",
            "--workdir", str(tmp_path), "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"mIoU=\d\.\d{3} R@0\.5=\d\.\d{3} yes_no=\d\.\d{3}", lines[-1]), lines[-1]
    header = lines.index(next(line for line in lines if line.startswith("| path |")))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    assert columns[:8] == ["path", "n", "mIoU", "R@0.3", "R@0.5", "R@0.7", "yes/no", "boundary s"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2 :][:2]]
    assert [r[0] for r in rows] == ["offline", "oracle"]

    result = json.loads(out.read_text())
    offline, oracle = result["paths"]["offline"], result["paths"]["oracle"]
    n = offline["summary"]["n"]
    assert n == len(offline["answers"]) >= 6 and rows[1][1] == str(n)
    summary = offline["summary"]
    expected = f"mIoU={summary['mIoU']:.3f} R@0.5={summary['R@0.5']:.3f}"
    assert lines[-1] == f"{expected} yes_no={summary['yes_no']:.3f}"
    # The exactness guarantee, on every answer of the benchmark: same tokens, same frames.
    assert oracle["summary"]["same_as_offline"] == oracle["summary"]["compared"] == n
    assert rows[1][columns.index("= offline")] == f"{n}/{n}"
    [(seed, ours)] = offline["scenes"].items()
    theirs = oracle["scenes"][seed]
    assert ours["times"] == theirs["times"] == [float(t) for t in range(10)]
    ids = [r["token_ids"] for r in ours["replies"]]
    assert ids == [r["token_ids"] for r in theirs["replies"]] and all(ids)

    # The yes/no table: per kind, each true answer's right/asked, as the answers say.
    start = lines.index('| path | kind | "Yes." when yes | "No." when no |')
    printed_by = {(r[0], r[1]): r[2:4] for r in (
        [c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2 : start + 6]
    )}  # fmt: skip
    asked = 0
    for kind in (Kind.AT, Kind.NOW):
        cells = []
        for truth in ("Yes.", "No."):
            mine = [a for a in offline["answers"] if a["kind"] == kind and a["truth"] == truth]
            right = sum(a["answer"].strip().lower() == truth.lower() for a in mine)
            cells.append(f"{right} of {len(mine)}")
            asked += len(mine)
        assert printed_by[("offline", str(kind))] == cells
    assert asked == summary["yes_no_n"] > 0

    # The offline path is what `livelens ask` answers.
    [scene] = result["scenes"]
    first = ours["replies"][0]
    argv = ["ask", scene["video"], first["question"], "--model", "tiny", "--max-new-tokens", "6"]
    assert livelens(argv) == 0
    printed = capsys.readouterr().out
    assert printed.split("\nsegments: ")[0] == first["text"]
