"""Real-network test helpers: serve an ASGI app with uvicorn, and drive headless Chromium.

serve(app) runs uvicorn on a free 127.0.0.1 port in a thread and yields the base URL.
chromium(url, tmp_path, y4m=...) starts Debian's Chromium with a fake camera playing a .y4m
file, opens `url`, and yields a ChromiumPage whose evaluate()/wait_for() run JavaScript in it
over the DevTools protocol (the `websockets` package; no Playwright, no downloaded browser).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from websockets.sync.client import ClientConnection, connect

CHROMIUM = os.environ.get("LIVELENS_CHROMIUM", "/usr/bin/chromium")
"""The browser binary; tests needing it skip when it is missing."""

# The flags measured to work here (docs: webrtc-interop.md), minus the per-run ones.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--remote-debugging-port=0",
)


def chromium_available() -> bool:
    return shutil.which(CHROMIUM) is not None


@contextlib.contextmanager
def serve(app: Any, *, startup_timeout: float = 10.0, port: int = 0) -> Iterator[str]:
    """Serve an ASGI app on 127.0.0.1 in a background thread; yields its base URL.

    `port` 0 picks a free port; a fixed one lets a test restart a server where it was.
    Lifespan events run, so an app's shutdown hooks run (on the server's loop) on exit.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


class ChromiumError(RuntimeError):
    """JavaScript threw, or the browser or page did not do what was waited for."""


class ChromiumPage:
    """One page of a running Chromium, driven over the DevTools protocol."""

    def __init__(self, ws: ClientConnection, log_path: Path) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self.log_path = log_path
        self.console: list[str] = []
        """console.* messages and uncaught exceptions of the page, in order."""

    def evaluate(self, expression: str, *, timeout: float = 30.0) -> Any:
        """Run a JavaScript expression (promises are awaited) and return its JSON value."""
        result = self._call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise ChromiumError(f"{expression[:80]!r} threw: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 30.0, interval: float = 0.1) -> Any:
        """Evaluate `expression` until it is truthy; return that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise ChromiumError(
                    f"timed out after {timeout:g} s waiting for {expression!r} "
                    f"(last value {value!r}; console: {self.console[-5:]})"
                )
            time.sleep(interval)

    def _call(self, method: str, params: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChromiumError(f"no reply to {method} within {timeout:g} s")
            message = json.loads(self._ws.recv(timeout=remaining))
            if message.get("id") == call_id:
                if "error" in message:
                    raise ChromiumError(f"{method} failed: {message['error']}")
                return message["result"]
            self._event(message)

    def _event(self, message: dict[str, Any]) -> None:
        params = message.get("params", {})
        if message.get("method") == "Runtime.consoleAPICalled":
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append(f"{params['type']}: {args}")
        elif message.get("method") == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            self.console.append(f"exception: {text}")


@contextlib.contextmanager
def chromium(
    page_url: str,
    tmp_path: Path,
    *,
    y4m: Path | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 30.0,
) -> Iterator[ChromiumPage]:
    """Start headless Chromium on `page_url` (fake camera playing `y4m`); yield the page.

    The browser gets a fresh profile under tmp_path, and is killed (its whole process group)
    on exit. Its stderr goes to tmp_path/chromium.log, named in errors.
    """
    profile = tmp_path / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    # A profile used before still holds the last run's port.
    (profile / "DevToolsActivePort").unlink(missing_ok=True)
    log_path = tmp_path / "chromium.log"
    args = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra_args]
    if y4m is not None:
        args.append(f"--use-file-for-fake-video-capture={y4m}")
    args.append(page_url)
    with log_path.open("wb") as log:
        # Its own process group, so the renderer and helper processes end with it.
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        port = _devtools_port(proc, profile, log_path, startup_timeout)
        ws_url = _page_target(port, page_url, log_path, startup_timeout)
        with connect(ws_url, max_size=None, open_timeout=startup_timeout) as ws:
            page = ChromiumPage(ws, log_path)
            page._call("Runtime.enable", {}, timeout=startup_timeout)
            # The target can exist before its document does: wait for the page itself.
            page.wait_for(
                f"location.href.startsWith({json.dumps(page_url.split('?')[0])})"
                " && document.readyState === 'complete'",
                timeout=startup_timeout,
            )
            yield page
    finally:
        _stop(proc)


def _devtools_port(proc: subprocess.Popen[bytes], profile: Path, log: Path, timeout: float) -> int:
    """Chromium writes the port it chose for --remote-debugging-port=0 into the profile."""
    active = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ChromiumError(f"chromium exited with {proc.returncode}: {_tail(log)}")
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int(active.read_text().splitlines()[0])
        time.sleep(0.05)
    raise ChromiumError(f"chromium wrote no DevToolsActivePort in {timeout:g} s: {_tail(log)}")


def _page_target(port: int, page_url: str, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as reply:
                targets = json.load(reply)
        except OSError:  # listening soon after writing the port file, not always before
            time.sleep(0.05)
            continue
        for target in targets:
            if target.get("type") == "page" and target.get("url", "").startswith(
                page_url.split("?")[0]
            ):
                return str(target["webSocketDebuggerUrl"])
        time.sleep(0.05)
    raise ChromiumError(f"no page for {page_url} in {timeout:g} s: {_tail(log)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the browser's process group, SIGKILL whatever of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
