"""The endless-stream soak at reduced scale: benchmarks/endless.py as a user runs it.

2,000 frames at 1 fps through a 200 s window (ten window lengths) with the tiny model, pushed
faster than real time, a question every 50 frames. The resource bounds are asserted as the
issue states them: the session's KV stays flat once the window slides, resident memory grows
less than 5% between the first and the last quarter. Latency and lag are timings on a shared
machine, so they only have to show no growth with the stream (a cost linear in the frames seen
would multiply them over ten windows); the benchmark reports the exact figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "endless.py"


def test_two_thousand_frames_through_a_window_stay_flat(tiny_model, model_cache) -> None:
    args = (
        "--model tiny --device cpu --frames 2000 --window 200 --size 320x240 --tokens-per-frame 16"
    )
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), *args.split()],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "LIVELENS_CACHE": str(model_cache)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    values = dict(pair.split("=") for pair in summary.split())
    assert set(values) == {"kv_flat", "rss_growth_pct", "ttft_ratio", "lag_growth_s"}, summary
    assert "0 failed" in done.stdout
    assert values["kv_flat"] == "yes", done.stdout
    assert float(values["rss_growth_pct"]) < 5, done.stdout
    assert float(values["ttft_ratio"]) < 3, done.stdout
    assert float(values["lag_growth_s"]) < 1.0, done.stdout
    [last] = [line for line in done.stdout.splitlines() if line.startswith("| 1999 |")]
    slides = int(last.split("|")[3])
    assert slides >= 9, last  # half a window leaves at each slide: ~2 per 200 frames
