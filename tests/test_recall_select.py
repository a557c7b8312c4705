"""benchmarks/recall_select.py scores both selection rules on any checkpoint."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "recall_select.py"


def test_both_rules_are_scored_on_every_object_asked(model_cache, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LIVELENS_CACHE", str(model_cache))
    spec = importlib.util.spec_from_file_location("recall_select", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--model", "tiny", "--scenes", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if re.match(r"\| \d+ \|", line)]
    summary = re.fullmatch(
        r"max_rprec=(\S+) mean_rprec=(\S+) base_rate=(\S+) pairs=(\d+)", lines[-1]
    )
    assert summary, lines[-1]
    assert int(summary.group(4)) == len(rows) >= 1
    assert all(0.0 <= float(summary.group(i)) <= 1.0 for i in (1, 2, 3))
