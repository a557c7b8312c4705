"""`livelens ask` on real encoded files: the happy path and every bad input in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from videos import make_audio_only, make_video, truncate

from livelens.model.grounding import parse_segments
from livelens.stream.cli import main


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    make_video(path, frames=40, fps=10, width=160, height=120, pattern="moving_square")
    return path


@pytest.fixture(autouse=True)
def _model_cache(model_cache, monkeypatch):
    monkeypatch.setenv("LIVELENS_CACHE", str(model_cache))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("livelens: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_ask_prints_answer_segments_and_stats(capsys, clip):
    code, out, _ = _run(
        capsys, "ask", str(clip), "when does the square move?", "--model", "tiny",
        "--max-new-tokens", "6", "--fps", "2",
    )  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    segments = json.loads(lines[-2].removeprefix("segments: "))
    stats = json.loads(lines[-1].removeprefix("stats: "))
    answer = "\n".join(lines[:-2])
    expected = parse_segments(answer, stream_start=0.0, stream_end=stats["media_seconds"])
    assert segments == [{"start": seg.start, "end": seg.end} for seg in expected]
    # 40 frames at 10 fps sampled at 2 fps: media times 0.0, 0.5, ..., 3.5.
    assert stats["frames"] == 8
    assert stats["media_seconds"] == pytest.approx(3.5)
    assert stats["total_tokens"] == 8 * (stats["grid"][0] // 28) * (stats["grid"][1] // 28)
    assert 0 < stats["kept_tokens"] <= stats["total_tokens"]
    assert stats["kv_tokens"] > stats["kept_tokens"]
    assert 0 < stats["answer_tokens"] <= 6


def test_threshold_changes_kept_tokens(capsys, clip):
    kept = []
    for threshold in ("0", "40"):
        code, out, _ = _run(
            capsys, "ask", str(clip), "what moves?", "--model", "tiny", "--max-new-tokens", "1",
            "--prune-threshold", threshold,
        )  # fmt: skip
        assert code == 0
        kept.append(json.loads(out.splitlines()[-1].removeprefix("stats: "))["kept_ratio"])
    assert kept[0] == 1.0
    assert kept[1] < 0.5


@pytest.mark.parametrize(
    ("question", "needle"), [("", "empty"), ("   ", "empty"), ("x" * 2001, "limit is 2000")]
)
def test_bad_questions(capsys, clip, question, needle):
    code, _, err = _run(capsys, "ask", str(clip), question, "--model", "tiny")
    _one_line_error(code, err, needle)


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "abc"])
def test_bad_threshold(capsys, clip, value):
    code, _, err = _run(
        capsys, "ask", str(clip), "q?", "--model", "tiny", "--prune-threshold", value
    )
    _one_line_error(code, err, "--prune-threshold")


@pytest.mark.parametrize("value", ["0", "-1", "10.5", "nan"])
def test_bad_repetition_penalty(capsys, clip, value):
    code, _, err = _run(
        capsys, "ask", str(clip), "q?", "--model", "tiny", "--repetition-penalty", value
    )
    _one_line_error(code, err, "repetition_penalty must be in (0, 10]")


def test_repetition_penalty_reaches_the_session(capsys, clip, monkeypatch):
    from livelens.model.session import VideoSession

    asked = []
    real_ask = VideoSession.ask

    def spy(self, question, params=None):
        asked.append((self.default_repetition_penalty, params.repetition_penalty))
        return real_ask(self, question, params)

    monkeypatch.setattr(VideoSession, "ask", spy)
    for extra in ([], ["--repetition-penalty", "1.25"]):
        code, _, err = _run(
            capsys, "ask", str(clip), "q?", "--model", "tiny", "--max-new-tokens", "1", *extra
        )
        assert code == 0, err
    # The tiny checkpoint sets no penalty: None (the checkpoint's) resolves to 1.0 in the session.
    assert asked == [(1.0, None), (1.0, 1.25)]


@pytest.mark.parametrize("value", ["0", "15"])
def test_tokens_per_frame_under_the_minimum(capsys, clip, value):
    code, _, err = _run(
        capsys, "ask", str(clip), "q?", "--model", "tiny", "--tokens-per-frame", value
    )
    _one_line_error(code, err, "--tokens-per-frame must be >= 16")


@pytest.mark.parametrize("value", ["0", "-2", "nan"])
def test_bad_fps(capsys, clip, value):
    code, _, err = _run(capsys, "ask", str(clip), "q?", "--model", "tiny", "--fps", value)
    _one_line_error(code, err, "--fps")


def test_unreadable_files(capsys, tmp_path, clip):
    missing = tmp_path / "missing.mp4"
    code, _, err = _run(capsys, "ask", str(missing), "q?", "--model", "tiny")
    _one_line_error(code, err, "missing.mp4")

    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    code, _, err = _run(capsys, "ask", str(text), "q?", "--model", "tiny")
    _one_line_error(code, err, "notes.mp4")

    empty = tmp_path / "empty.mp4"
    empty.touch()
    code, _, err = _run(capsys, "ask", str(empty), "q?", "--model", "tiny")
    _one_line_error(code, err, "empty.mp4")

    audio = make_audio_only(tmp_path / "voice.m4a")
    code, _, err = _run(capsys, "ask", str(audio), "q?", "--model", "tiny")
    _one_line_error(code, err, "no video")


def test_truncated_mp4(capsys, tmp_path):
    # Without faststart the index (moov) sits at the end: cutting the file loses it entirely.
    video = make_video(tmp_path / "cut.mp4", frames=30, fps=10, width=160, height=120)
    truncate(video.path, 0.5)
    code, _, err = _run(capsys, "ask", str(video.path), "q?", "--model", "tiny")
    _one_line_error(code, err, "cut.mp4")


def test_truncated_stream_answers_on_what_decodes(capsys, tmp_path):
    video = make_video(tmp_path / "cut.mkv", frames=60, fps=10, width=160, height=120)
    truncate(video.path, 0.5)
    code, out, _ = _run(capsys, "ask", str(video.path), "q?", "--model", "tiny",
                        "--max-new-tokens", "2")  # fmt: skip
    assert code == 0
    stats = json.loads(out.splitlines()[-1].removeprefix("stats: "))
    assert 1 <= stats["frames"] < 6


def test_unknown_model(capsys, clip):
    code, _, err = _run(capsys, "ask", str(clip), "q?", "--model", "no such model")
    _one_line_error(code, err, "unknown model", "tiny")

    code, _, err = _run(capsys, "ask", str(clip), "q?", "--model", str(clip.parent))
    _one_line_error(code, err, "config.json")


def test_unreachable_hub_fails_fast_and_names_alternatives(capsys, clip, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what "unreachable" looks like, made certain
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, _, err = _run(capsys, "ask", str(clip), "q?", "--model", "someone/some-model")
    _one_line_error(code, err, "--model tiny", "local")


def test_console_script_on_real_mp4(clip, model_cache):
    """The installed `livelens` entry point, as a user runs it."""
    exe = Path(sys.executable).with_name("livelens")
    env = {**os.environ, "LIVELENS_CACHE": str(model_cache)}
    done = subprocess.run(
        [str(exe), "ask", str(clip), "what happens?", "--model", "tiny", "--max-new-tokens", "4"],
        capture_output=True, text=True, env=env, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("stats: {")
    bad = subprocess.run(
        [str(exe), "ask", str(clip), "", "--model", "tiny"],
        capture_output=True, text=True, env=env, timeout=240, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip() == "livelens: error: the question is empty"
