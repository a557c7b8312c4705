"""`livelens publish/sessions/watch/ask --server` against the real app on a real port.

Commands run through main() in-process, or as the installed console script where signals and
process exit matter (publish until SIGINT). Errors must be one line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from browser import serve
from media_servers import closed_port
from service_harness import SteeredRunner, fast_config, wait_for
from videos import make_video

from livelens.clients import LiveLensClient
from livelens.clients.cli import cmd_watch
from livelens.model.runner import ModelRunner
from livelens.stream.app import create_app
from livelens.stream.cli import main
from livelens.stream.service import LiveService
from livelens.stream.whip import WhipSettings

TOKEN = "cli-client-token"
STEERED = "From 0.5 to 1.0 seconds."
LIVELENS = Path(sys.executable).with_name("livelens")
STATUS_LINE = re.compile(
    r"(starting|live|ended|failed): frames \d+ received, \d+ sampled, \d+ in model"
    r"( \(\d+ dropped\))?; kept (\d+%|-); at ([\d.]+s|-), lag ([\d.]+s|-)"
)


@contextlib.contextmanager
def live_server(
    runner: ModelRunner, media_root: Path | None = None
) -> Iterator[tuple[str, LiveService]]:
    service = LiveService(runner, fast_config(None, media_root=media_root))
    whip = WhipSettings(token=TOKEN, allow_loopback=True)  # loopback ICE: test-only
    with serve(create_app(service, token=TOKEN, whip=whip)) as url:
        yield url, service


@pytest.fixture
def server(tiny_model, clip) -> Iterator[tuple[str, LiveService]]:
    with live_server(SteeredRunner(tiny_model, STEERED), clip.parent) as running:
        yield running


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 s of 160x120 H.264 at 10 fps."""
    path = tmp_path_factory.mktemp("cli") / "clip.mp4"
    return make_video(path, frames=30, fps=10, width=160, height=120).path


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "second.mp4"
    return make_video(path, frames=10, fps=10, width=160, height=120).path


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch) -> None:
    monkeypatch.delenv("LIVELENS_TOKEN", raising=False)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("livelens: error: "), err
    return lines[0].removeprefix("livelens: error: ")


def _pull(url: str, source: Path, **options: object) -> str:
    with LiveLensClient.blocking(url, token=TOKEN) as client:
        return client.start_pull(str(source), **options).id  # type: ignore[arg-type]


def _position(service: LiveService, session_id: str) -> float:
    session = service.get(session_id)
    assert session is not None
    return session.status()["stream_position"] or 0.0


def test_sessions_table_and_json(server, clip, capsys, monkeypatch) -> None:
    url, service = server
    ids = {_pull(url, clip, loop=True), _pull(url, clip, loop=True, fps=1)}
    for sid in ids:
        wait_for(lambda sid=sid: _position(service, sid) > 0, timeout=20)

    code, out, _ = _run(capsys, "sessions", "--server", url, "--token", TOKEN)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "KIND", "STATE", "SOURCE", "FRAMES", "KEPT", "LAG"]
    assert {row.split()[0] for row in rows} == ids
    for row in rows:
        fields = row.split()
        assert fields[1:3] == ["pull", "live"]
        assert len(fields[3]) <= 40 and fields[3].endswith("/clip.mp4")  # middle cut out
        assert int(fields[4]) > 0 and re.fullmatch(r"\d+%", fields[5])
        assert re.fullmatch(r"\d+\.\ds", fields[6])
        # Columns are aligned under their headers.
        for name, value in zip(header.split(), fields, strict=True):
            assert row.index(value, header.index(name)) == header.index(name), (row, name)

    monkeypatch.setenv("LIVELENS_TOKEN", TOKEN)  # the token from the environment
    code, out, _ = _run(capsys, "sessions", "--server", url, "--json")
    assert code == 0
    listed = json.loads(out)["sessions"]
    assert {s["id"] for s in listed} == ids
    assert all(s["stats"]["frames_received"] > 0 and s["kind"] == "pull" for s in listed)


def test_ask_server_streams_the_answer_and_prints_segments(
    server, clip, capsys, monkeypatch
) -> None:
    url, service = server
    sid = _pull(url, clip, loop=True)
    wait_for(lambda: _position(service, sid) >= 1.0, timeout=30)
    jobs = []
    submit = service.engine.submit_question
    monkeypatch.setattr(
        service.engine, "submit_question", lambda key, job: jobs.append(job) or submit(key, job)
    )
    code, out, err = _run(
        capsys, "ask", "--server", url, "--token", TOKEN, sid, "When?", "--max-new-tokens", "16",
        "--repetition-penalty", "1.25",
    )  # fmt: skip
    assert code == 0, err
    # Sampling options travel through the client and the websocket to the session's decoder.
    assert [(job.params.max_new_tokens, job.params.repetition_penalty) for job in jobs] == [
        (16, 1.25)
    ]
    text, segments_line, stats_line = out.splitlines()
    assert text == STEERED
    [segment] = json.loads(segments_line.removeprefix("segments: "))
    assert segments_line.startswith("segments: ")
    assert (segment["start"], segment["end"]) == (0.5, 1.0)
    start, end = (datetime.fromisoformat(segment[k]) for k in ("start_time", "end_time"))
    assert (end - start).total_seconds() == 0.5 and start.tzinfo is not None
    stats = json.loads(stats_line.removeprefix("stats: "))
    assert stats["stream_position"] >= 1.0 and stats["latency_ms"]["total"] > 0


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_prints_status_until_the_session_ends(server, clip, capsys) -> None:
    url, _ = server
    first, second_id = _pull(url, clip, fps=2), _pull(url, clip, fps=2)
    # The same watch on a terminal, at the same time: one line rewritten in place.
    terminal = _Terminal()
    codes: list[int] = []
    args = argparse.Namespace(server=url, token=TOKEN, session=second_id)
    watcher = threading.Thread(target=lambda: codes.append(cmd_watch(args, terminal)))
    watcher.start()
    code, out, err = _run(capsys, "watch", "--server", url, "--token", TOKEN, first)
    watcher.join(timeout=30)

    assert code == 0, err
    *statuses, final = out.splitlines()
    assert len(statuses) >= 3 and all(STATUS_LINE.fullmatch(s) for s in statuses), statuses
    assert statuses[0].startswith(("starting:", "live:"))
    assert statuses[-1].startswith("ended: frames 30 received, 6 sampled, ")
    assert final.startswith("session ended: ")

    assert codes == [0]
    shown = terminal.getvalue()
    line, final = shown.rstrip("\n").split("\n")
    assert line.count("\r") >= 3 and line.startswith("\r")
    assert STATUS_LINE.fullmatch(line.rsplit("\r", 1)[1].rstrip())
    assert line.rsplit("\r", 1)[1].startswith("ended: frames 30 received")
    assert final.startswith("session ended: ")


def test_publish_until_sigint_then_delete(server, clip, tmp_path) -> None:
    url, service = server
    env = {**os.environ, "LIVELENS_TOKEN": TOKEN}
    command = [str(LIVELENS), "publish", str(clip), "--server", url, "--loop"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().rstrip("\n") for _ in range(3)]
        assert lines[0].startswith("session: "), (lines, process.stderr)
        sid = lines[0].removeprefix("session: ")
        assert lines[1:] == [
            f"rest: {url}/v1/sessions/{sid}",
            f"websocket: ws{url[4:]}/v1/sessions/{sid}/ws",
        ]
        wait_for(lambda: _position(service, sid) >= 0.5, timeout=30)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "Traceback" not in err and out == ""
    session = service.get(sid)
    assert session is not None and session.reason == "publisher sent DELETE"


def test_publish_plays_a_file_to_its_end(server, second, capsys) -> None:
    url, service = server
    code, out, err = _run(capsys, "publish", str(second), "--server", url, "--token", TOKEN)
    assert code == 0, err
    sid = out.splitlines()[0].removeprefix("session: ")
    session = service.get(sid)
    assert session is not None and session.reason == "publisher sent DELETE"
    assert session.status()["frames_received"] >= 8


def test_errors_are_one_line(tiny_model, clip, tmp_path, capsys) -> None:
    with live_server(ModelRunner(tiny_model), clip.parent) as (url, _):
        sid = _pull(url, clip, loop=True)
        unknown = "f" * 32
        cases = [
            (["sessions", "--server", url, "--token", "wrong"], "401 unauthorized"),
            (["sessions", "--server", url], "an API key is required (Authorization: Bearer <key>)"),
            (["ask", "--server", url, "--token", "wrong", sid, "q?"], "(401 unauthorized)"),
            (["watch", "--server", url, "--token", "wrong", sid], "(401 unauthorized)"),
            (["publish", str(clip), "--server", url, "--token", "wrong"], "(401 unauthorized)"),
            (["ask", "--server", url, "--token", TOKEN, unknown, "q?"], "404 unknown_session"),
            (["watch", "--server", url, "--token", TOKEN, unknown], "404 unknown_session"),
            (["ask", "--server", url, "--token", TOKEN, sid, " "], "(empty_question)"),
            (
                ["publish", str(tmp_path / "gone.mp4"), "--server", url, "--token", TOKEN],
                "gone.mp4: no such file",
            ),
        ]
        for argv, needle in cases:
            message = _one_line_error(*_run(capsys, *argv)[::2])
            assert needle in message, (argv, message)

    closed = f"http://127.0.0.1:{closed_port()}"
    for argv in (
        ["sessions", "--server", closed],
        ["watch", "--server", closed, unknown],
        ["ask", "--server", closed, unknown, "q?"],
        ["publish", str(clip), "--server", closed],
    ):
        message = _one_line_error(*_run(capsys, *argv)[::2])
        assert message == f"cannot reach the server at {closed}: connection refused"

    for bad in ("localhost:8000", "ftp://host", "http://host?x=1"):
        message = _one_line_error(*_run(capsys, "sessions", "--server", bad)[::2])
        assert message.startswith("--server: malformed server URL")

    message = _one_line_error(
        *_run(capsys, "ask", "--server", closed, "--model", "tiny", "--fps", "2", sid, "q?")[::2]
    )
    assert message == "--model, --fps only applies to a local video file, not with --server"
    message = _one_line_error(*_run(capsys, "ask", str(clip), "q?", "--token", "t")[::2])
    assert message == "--token only applies with --server"


def test_console_script_is_one_line_and_never_loads_the_model(server) -> None:
    url, _ = server
    done = subprocess.run(
        [str(LIVELENS), "sessions", "--server", url, "--token", "wrong"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        "livelens: error: the API key is not valid (unknown or revoked) (401 unauthorized)\n"
    )

    probe = (
        "import sys; from livelens.stream.cli import main; code = main(sys.argv[1:]); "
        "print(code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "sessions", "--server", url, "--token", TOKEN],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.stdout.splitlines()[-1] == "0 []", done.stderr
