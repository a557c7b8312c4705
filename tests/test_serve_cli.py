"""`livelens serve` as users run it: the installed console script, a real port, a real Redis."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from media_servers import closed_port
from service_harness import wait_for

LIVELENS = shutil.which("livelens", path=str(Path(sys.executable).parent))


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
    )
    for argv in bad:
        assert main(["serve", "--model", "tiny", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("livelens: error:") and err.count("\n") == 1, err


def test_service_config_refuses_a_budget_under_the_minimum() -> None:
    from livelens.stream.service import ServiceConfig

    with pytest.raises(ValueError, match="tokens_per_frame must be >= 16"):
        ServiceConfig(tokens_per_frame=15)
    assert ServiceConfig(tokens_per_frame=16).tokens_per_frame == 16
