"""Every command block of README.md, run for real against a real `livelens serve`.

A block is fenced code preceded by `<!-- readme: NAME -->`; RUNNERS names the test that runs each
one, and test_every_block_is_exercised fails on a block without a marker or a marker without a
runner. The blocks run verbatim through bash or python, in a scratch directory where `.venv`
links to this interpreter's virtualenv, with these local adaptations:

- the `serve` block's `livelens serve` line gets `--port <free> --redis-url <the test's Redis>
  --device cpu --allow-loopback-ice` appended, with LIVELENS_MODEL=tiny (no checkpoint here);
- `localhost:8000` becomes `127.0.0.1:<that port>`;
- the `serve-demo` block gets the same flags, plus `--model tiny` until the trained
  model/tiny_grounding/ is committed;
- `camera.mp4` is a clip generated in the scratch directory;
- the RTSP camera URL becomes GStreamer's RTSP server serving that clip (tests/media_servers.py);
- `ffmpeg`: Debian's binary predates the whip muxer, so its arguments run through PyAV's FFmpeg 8
  libraries (tests/ffmpeg_publisher.py refuses any option it does not map);
- `docker compose`: no Docker engine here; tests/test_deploy.py parses the compose file against
  the real CLI and runs both services' commands and health checks as local processes;
- `make test` is what CI runs (.ci/run); `make demo` runs when .venv is the installed one;
- the training block writes into the scratch directory and runs 0.2% of its steps
  (`--scale 0.002 --eval-scenes 0`): the whole run takes most of an hour.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from ffmpeg_publisher import cli_command
from media_servers import RtspServer, closed_port
from service_harness import wait_for
from videos import make_video

from livelens.model.loading import TINY_GROUNDING_DIR
from livelens.stream.protocol import AskMessage, parse_client_message

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"<!-- readme: ([a-z0-9-]+) -->\n```(\w+)\n(.*?)```", re.S)
FENCE = re.compile(r"^```(\w*)$", re.M)
RTSP_EXAMPLE = "rtsp://user:pass@camera.local:554/stream1"
TRAINED = (TINY_GROUNDING_DIR / "config.json").is_file()
RUNNERS = {
    "setup": "test_setup_block",
    "serve": "test_quickstarts_against_a_real_server",
    "serve-demo": "test_serve_demo_block",
    "rtsp": "test_quickstarts_against_a_real_server",
    "watch": "test_quickstarts_against_a_real_server",
    "publish": "test_quickstarts_against_a_real_server",
    "python": "test_quickstarts_against_a_real_server",
    "ffmpeg": "test_quickstarts_against_a_real_server",
    "ask-file": "test_quickstarts_against_a_real_server",
    "compose": "test_compose_block",
    "ws-ask": "test_websocket_message_block",
    "train-tiny": "test_train_block",
}
"""Block name -> the test here that runs it."""


@dataclass(frozen=True)
class Block:
    name: str
    language: str
    text: str


def readme_blocks() -> dict[str, Block]:
    blocks: dict[str, Block] = {}
    for name, language, text in MARKER.findall(README.read_text()):
        assert name not in blocks, f"two README blocks are named {name!r}"
        blocks[name] = Block(name, language, text)
    return blocks


def commands(block: Block) -> list[str]:
    """The block's shell commands, line continuations joined, comments dropped."""
    joined = block.text.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def test_every_block_is_exercised() -> None:
    text = README.read_text()
    blocks = readme_blocks()
    assert set(blocks) == set(RUNNERS), "README blocks and their runners differ"
    tests = {name for name, value in globals().items() if name.startswith("test_")}
    assert set(RUNNERS.values()) <= tests
    # Any fenced block of commands or code without a marker is a command nobody runs.
    marked = {m.start(2) - 3 for m in MARKER.finditer(text)}
    fences = list(FENCE.finditer(text))
    for opening in fences[::2]:
        if opening.group(1) in ("bash", "sh", "python", "json", "console"):
            line = text.count("\n", 0, opening.start()) + 1
            assert opening.start() in marked, f"README line {line}: a block without a marker"


def test_websocket_message_block() -> None:
    message = parse_client_message(readme_blocks()["ws-ask"].text)
    assert isinstance(message, AskMessage) and message.question


def test_compose_block() -> None:
    """The block exports what docker-compose.yml reads; tests/test_deploy.py checks the rest."""
    block = readme_blocks()["compose"]
    lines = commands(block)
    assert lines[-1] == "docker compose up -d"
    exported = {word.split("=")[0] for word in shlex.split(lines[0])[1:]}
    compose = (ROOT / "docker-compose.yml").read_text()
    for name in exported:
        assert "${" + name in compose, f"docker-compose.yml does not read {name}"
    environment = yaml.safe_load(compose)["services"]["livelens"]["environment"]
    assert exported == {"LIVELENS_TOKEN", "HF_TOKEN"} <= set(environment)
    assert (ROOT / "tests" / "test_deploy.py").exists()


def test_setup_block() -> None:
    lines = commands(readme_blocks()["setup"])
    assert lines == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs the second line
    venv = ROOT / ".venv"
    stale = subprocess.run(["make", "-q", "venv"], cwd=ROOT, capture_output=True).returncode
    if not (venv / ".installed").exists() or stale or Path(sys.prefix) != venv:
        pytest.skip("make demo runs where .venv is the installed, up-to-date virtualenv (CI)")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", lines[0]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "answer:" in done.stdout and "segments:" in done.stdout
    assert re.search(r"^iou: [01]\.\d\d$", done.stdout, re.M), done.stdout


# ------------------------------------------------------------------------- the quickstarts
class Shell:
    """Runs README blocks in the scratch directory with the server's address substituted."""

    def __init__(self, cwd: Path, env: dict[str, str], port: int) -> None:
        self.cwd, self.env, self.port = cwd, env, port

    def adapt(self, text: str) -> str:
        return text.replace("localhost:8000", f"127.0.0.1:{self.port}")

    def run(self, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", self.adapt(script)],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"{script}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done

    def start(self, script: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", self.adapt(script)],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, so SIGINT reaches the command
        )


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> tuple[int, str]:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return proc.returncode, out


def _read_until(proc: subprocess.Popen[str], pattern: str, limit: int = 200) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    for _ in range(limit):
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no line matching {pattern!r} in {lines}")


@pytest.fixture
def scratch(tmp_path: Path, model_cache: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    (tmp_path / ".venv").symlink_to(sys.prefix)
    make_video(tmp_path / "camera.mp4", frames=40, fps=10, width=320, height=240)
    env = {**os.environ, "LIVELENS_CACHE": str(model_cache), "LIVELENS_MODEL": "tiny"}
    env.pop("LIVELENS_TOKEN", None)
    yield tmp_path, env


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's pull example uses curl")
def test_quickstarts_against_a_real_server(scratch, redis_server) -> None:
    cwd, env = scratch
    blocks = readme_blocks()
    port = closed_port()
    shell = Shell(cwd, env, port)
    server_url = f"http://127.0.0.1:{port}"

    # serve: the exported token is what every later block uses.
    serve_lines = commands(blocks["serve"])
    token = dict([shlex.split(serve_lines[0])[1].split("=", 1)])["LIVELENS_TOKEN"]
    env["LIVELENS_TOKEN"] = token
    local = f" --port {port} --redis-url {redis_server.url} --device cpu --allow-loopback-ice"
    local += " --allow-source 127.0.0.1"  # the RTSP server that stands in for camera.local
    serve_script = "\n".join(
        "exec " + line + local if line.startswith(".venv/bin/livelens serve") else line
        for line in serve_lines
    )
    server = shell.start(serve_script)
    auth = {"Authorization": f"Bearer {token}"}
    rtsp = None
    try:
        wait_for(lambda: _healthy(server_url, server), timeout=90, interval=0.2)
        console = httpx.get(server_url + "/")
        assert console.status_code == 200 and "LiveLens" in console.text

        # rtsp: a pull session through curl, then `sessions` and `ask --server`.
        rtsp = RtspServer(cwd / "camera.mp4")
        script = blocks["rtsp"].text.replace(RTSP_EXAMPLE, rtsp.url)
        done = shell.run(script + '\nprintf "\\nSESSION=%s\\n" "$SESSION"', timeout=180)
        session = re.findall(r"^SESSION=([0-9a-f]{32})$", done.stdout, re.M)[-1]
        assert session in done.stdout.split("SESSION=")[0]  # the `sessions` table lists it
        segments_line = next(
            line for line in done.stdout.splitlines() if line.startswith("segments: ")
        )
        assert isinstance(json.loads(segments_line.removeprefix("segments: ")), list)
        history = httpx.get(f"{server_url}/v1/sessions/{session}/history", headers=auth).json()
        assert [e["question"] for e in history["entries"]] == ["What is happening?"]

        # watch: status lines until the session ends (deleted here, as an operator would).
        watcher = shell.start(f"export SESSION={session}\n" + blocks["watch"].text)
        _read_until(watcher, r"frames \d+ received")
        assert httpx.delete(f"{server_url}/v1/sessions/{session}", headers=auth).is_success
        out, _ = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, out

        # publish: the Python WHIP publisher, stopped with Ctrl-C (it sends DELETE).
        publisher = shell.start(blocks["publish"].text)
        lines = _read_until(publisher, r"^websocket: ")
        published = re.search(r"^session: ([0-9a-f]{32})", "".join(lines), re.M)
        assert published is not None
        published_id = published.group(1)
        wait_for(lambda: _record(server_url, auth, published_id)["stats"]["frames_in_model"] > 2)
        code, out = _stop(publisher)
        assert code == 0, out
        ended = _record(server_url, auth, published_id)
        assert ended["state"] == "ended" and ended["reason"] == "publisher sent DELETE"

        # python: the script, verbatim (its pull source is the server's camera.mp4).
        script = cwd / "quickstart.py"
        script.write_text(shell.adapt(blocks["python"].text))
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.rstrip().endswith("1 answers so far")

        # ffmpeg: the certificate from openssl, the ffmpeg arguments through PyAV's FFmpeg 8.
        openssl, ffmpeg = commands(blocks["ffmpeg"])
        shell.run(openssl)
        argv = shlex.split(shell.adapt(ffmpeg).replace("$LIVELENS_TOKEN", token))
        assert argv[0] == "ffmpeg"
        before = {r["id"] for r in _records(server_url, auth)}
        done = subprocess.run(cli_command(argv[1:]), cwd=cwd, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        (new,) = [r for r in _records(server_url, auth) if r["id"] not in before]
        assert new["kind"] == "whip" and new["stats"]["frames_received"] > 20
    finally:
        if rtsp is not None:
            rtsp.stop()
        code, log = _stop(server)
    assert code == 0, log[-3000:]

    # ask-file: offline, no server.
    done = shell.run(blocks["ask-file"].text, timeout=300)
    stats = next(line for line in done.stdout.splitlines() if line.startswith("stats: "))
    assert json.loads(stats.removeprefix("stats: "))["frames"] == 4  # 4 s of video at 1 fps
    assert "segments: " in done.stdout


@pytest.mark.slow
def test_serve_demo_block(scratch, redis_server) -> None:
    """The session `demo` is there once the server answers, and takes frames in real time."""
    cwd, env = scratch
    (line,) = commands(readme_blocks()["serve-demo"])
    assert line.startswith(".venv/bin/livelens serve --demo")
    port = closed_port()
    local = f" --port {port} --redis-url {redis_server.url} --device cpu"
    if not TRAINED:
        local += " --model tiny"
    server = Shell(cwd, env, port).start("exec " + line + local)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url, server), timeout=90, interval=0.2)
        assert [r["id"] for r in _records(url, {})] == ["demo"]
        wait_for(lambda: _record(url, {}, "demo")["status"]["frames_in_model"] >= 2, timeout=60)
        assert "LiveLens" in httpx.get(url + "/").text
    finally:
        code, log = _stop(server)
    assert code == 0, log[-3000:]


def _healthy(url: str, server: subprocess.Popen[str]) -> bool:
    if server.poll() is not None:
        raise AssertionError(f"livelens serve exited: {server.communicate()[0][-3000:]}")
    try:
        return httpx.get(url + "/healthz", timeout=1).is_success
    except httpx.HTTPError:
        return False


def _records(url: str, auth: dict[str, str]) -> list[dict]:
    return httpx.get(url + "/v1/sessions", headers=auth).json()["sessions"]


def _record(url: str, auth: dict[str, str], session_id: str) -> dict:
    return httpx.get(f"{url}/v1/sessions/{session_id}", headers=auth).json()


def test_train_block(tmp_path: Path) -> None:
    """The retraining command, verbatim but for a few steps, writes a loadable checkpoint."""
    (line,) = commands(readme_blocks()["train-tiny"])
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "model").mkdir()
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", line + " --scale 0.002 --eval-scenes 0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "model" / "tiny_grounding"
    assert json.loads((out / "livelens.json").read_text())["tokens_per_frame"] == 24
    curve = json.loads((tmp_path / "curve.json").read_text())["curve"]
    assert curve and all(point["loss"] > 0 for point in curve)
