"""`livelens serve` as users run it: the installed console script, a real port, a real Redis.

The `--demo` test with the trained model skips until model/tiny_grounding/ is committed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from media_servers import closed_port
from service_harness import wait_for

from livelens.clients import LiveLensClient
from livelens.model.loading import TINY_GROUNDING_DIR
from livelens.stream import demo

LIVELENS = shutil.which("livelens", path=str(Path(sys.executable).parent))
TRAINED = (TINY_GROUNDING_DIR / "config.json").is_file()


def _healthz(url: str) -> dict | None:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).json()
    except httpx.HTTPError:
        return None


@pytest.mark.skipif(LIVELENS is None, reason="the livelens console script is not installed")
def test_serve_starts_answers_probes_and_stops(model_cache, redis_server, tmp_path) -> None:
    port = closed_port()
    env = {**os.environ, "LIVELENS_CACHE": str(model_cache), "LIVELENS_TOKEN": "cli-token"}
    command = [LIVELENS, "serve", "--model", "tiny", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--redis-url", redis_server.url, "--device", "cpu", "--log-level", "warning"]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_for(lambda: _healthz(url), timeout=60, interval=0.2)
        assert health["status"] == "ok" and health["model"] == "tiny" and health["redis"] is True
        assert httpx.get(f"{url}/v1/sessions").status_code == 401  # LIVELENS_TOKEN applies
        listed = httpx.get(f"{url}/v1/sessions", headers={"Authorization": "Bearer cli-token"})
        assert listed.json() == {"sessions": []}
        assert "livelens_sessions" in httpx.get(f"{url}/metrics").text
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=30)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]


def test_serve_refuses_bad_flags_in_one_line(capsys) -> None:
    from livelens.stream.cli import main

    bad = (
        ["--fps", "0"],
        ["--port", "70000"],
        ["--prune-threshold", "x"],
        ["--tokens-per-frame", "15"],
        ["--max-body-bytes", "10"],
        ["--header-timeout", "0"],
        ["--max-held-sessions", "4"],  # under --max-sessions 16
    )
    for argv in bad:
        assert main(["serve", "--model", "tiny", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("livelens: error:") and err.count("\n") == 1, err
        assert argv[0] in err, err  # the message names the flag, not a config field


def test_service_config_refuses_a_budget_under_the_minimum() -> None:
    from livelens.stream.service import ServiceConfig

    with pytest.raises(ValueError, match="tokens_per_frame must be >= 16"):
        ServiceConfig(tokens_per_frame=15)
    assert ServiceConfig(tokens_per_frame=16).tokens_per_frame == 16


# --------------------------------------------------------------------------------- serve --demo
def test_serve_demo_defaults_to_the_trained_model(monkeypatch, tmp_path) -> None:
    """--model, else tiny-grounding with --demo when installed, else tiny (whatever
    $LIVELENS_MODEL says); without --demo the usual default."""
    import livelens.stream.server
    from livelens.model import loading
    from livelens.stream.cli import main

    seen: list[tuple[str, bool]] = []
    monkeypatch.setattr(
        livelens.stream.server, "serve", lambda args, number: seen.append((args.model, args.demo))
    )
    monkeypatch.setenv("LIVELENS_MODEL", "owner/other")
    installed = tmp_path / "installed"
    installed.mkdir()
    (installed / "config.json").write_text("{}")
    monkeypatch.setattr(loading, "TINY_GROUNDING_DIR", installed)
    main(["serve", "--demo"])
    main(["serve", "--demo", "--model", "owner/model"])
    main(["serve"])
    monkeypatch.setattr(loading, "TINY_GROUNDING_DIR", tmp_path / "absent")
    main(["serve", "--demo"])
    assert seen == [
        ("tiny-grounding", True),
        ("owner/model", True),
        ("owner/other", False),
        ("tiny", True),
    ]


@contextlib.contextmanager
def _serving(argv: list[str], env: dict[str, str], log: Path) -> Iterator[str]:
    """`livelens serve ARGV` on a free port, once healthy; the block gets its URL. Afterwards
    Ctrl-C stops it, as a user would, and it must exit 0; on a failure it is killed."""
    port = closed_port()
    command = [LIVELENS, "serve", *argv, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:  # the child keeps its own descriptor
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> dict | None:
        if server.poll() is not None:
            raise AssertionError(f"livelens serve exited: {log.read_text()[-3000:]}")
        return _healthz(url)

    try:
        wait_for(healthy, timeout=90, interval=0.2)
        yield url
    except BaseException:
        server.kill()
        server.wait()
        raise
    server.send_signal(signal.SIGINT)
    try:
        code = server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        raise AssertionError(f"no exit 60 s after SIGINT: {log.read_text()[-3000:]}") from None
    assert code == 0, log.read_text()[-3000:]


def _demo_record(url: str, auth: dict[str, str]) -> dict:
    return httpx.get(f"{url}/v1/sessions/{demo.DEMO_SESSION}", headers=auth).json()


@pytest.mark.slow
@pytest.mark.skipif(LIVELENS is None, reason="the livelens console script is not installed")
def test_serve_demo_publishes_the_generated_scene_as_session_demo(
    model_cache, redis_server, tmp_path
) -> None:
    """A first-time user's path: the session `demo` is there at start, live, taking frames in
    real time; a question over the websocket is answered; the video goes when the server does."""
    env = {**os.environ, "LIVELENS_CACHE": str(model_cache), "LIVELENS_TOKEN": "demo-token"}
    auth = {"Authorization": "Bearer demo-token"}
    argv = ["--demo", "--model", "tiny", "--redis-url", redis_server.url, "--device", "cpu"]
    with _serving(argv, env, tmp_path / "serve.log") as url:
        record = _demo_record(url, auth)
        assert (record["id"], record["kind"]) == ("demo", "pull")
        video = Path(record["source"])
        assert video.name == "demo-scene.mp4" and video.is_file()
        listed = httpx.get(f"{url}/v1/sessions", headers=auth).json()["sessions"]
        assert [s["id"] for s in listed] == ["demo"]

        def frames(n: int) -> dict | None:
            status = _demo_record(url, auth)["status"]
            return status if status["state"] == "live" and status["frames_in_model"] >= n else None

        status = wait_for(lambda: frames(3), timeout=60, interval=0.2)
        # Played as live: media time never runs ahead of the clock since the session opened
        # (read as fast as it decodes, the 48 s file would be far round the loop by now).
        created = datetime.fromisoformat(record["created"].replace("Z", "+00:00")).timestamp()
        assert status["live_edge"] <= time.time() - created + 0.5
        thumbs = httpx.get(f"{url}/v1/sessions/demo/thumbnails", headers=auth).json()
        assert len(thumbs["thumbnails"]) >= 3

        question = "When is the red ball visible?"
        with LiveLensClient.blocking(url, token="demo-token") as client:
            answer = client.ask("demo", question, max_new_tokens=8)
            assert answer.question == question and answer.stream_position >= 2.0
            assert [h.question for h in client.history("demo")] == [question]
    assert not video.parent.exists(), "the demo's temporary directory outlived the server"


@pytest.mark.slow
@pytest.mark.skipif(LIVELENS is None, reason="the livelens console script is not installed")
@pytest.mark.skipif(not TRAINED, reason="the trained model/tiny_grounding/ is not committed yet")
def test_serve_demo_answers_within_the_truth_with_the_trained_model(
    model_cache, redis_server, tmp_path
) -> None:
    """--demo without --model serves tiny-grounding (over $LIVELENS_MODEL), whose answer about
    the red ball, once its first stay is over, lies within the true stay."""
    env = {**os.environ, "LIVELENS_CACHE": str(model_cache), "LIVELENS_MODEL": "tiny"}
    env.pop("LIVELENS_TOKEN", None)
    argv = ["--demo", "--redis-url", redis_server.url, "--device", "cpu"]
    scene = demo.demo_scene(demo.LOOP_SECONDS)
    (stay,) = scene.object(demo.TARGET).visible
    with _serving(argv, env, tmp_path / "serve.log") as url:
        assert _healthz(url)["model"] == "tiny-grounding"
        wait_for(
            lambda: (_demo_record(url, {})["status"]["stream_position"] or 0) > stay.end + 1,
            timeout=stay.end + 30,
            interval=0.5,
        )
        with LiveLensClient.blocking(url) as client:
            answer = client.ask("demo", demo.demo_question(scene))
    truth = demo.looped_truth(scene, answer.stream_position)
    assert answer.segments, answer.text
    for segment in answer.segments:  # within a sampled frame (1 s) of a true stay
        assert any(t.start - 1 <= segment.start <= segment.end <= t.end + 1 for t in truth), (
            answer.text,
            truth,
        )
