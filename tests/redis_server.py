"""A real redis-server for tests: free port, no persistence, stop() and start() on the same port.

Tests import the `redis_server` fixture from here (``from redis_server import redis_server``);
it skips with a reason when redis-server is not installed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

REDIS_SERVER = "redis-server"
_START_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    """True when a server on the port answers PING with +PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: up, with a password
    except OSError:
        return False


class RedisServer:
    """One redis-server process on a fixed port; restartable, with nothing saved to disk.

    After stop() the port is closed, so clients see connection refused; start() brings up an
    empty server on the same port, as a restart without persistence would.
    """

    def __init__(self, folder: Path, port: int | None = None, password: str | None = None) -> None:
        self.folder = folder
        self.port = port if port is not None else free_port()
        self.password = password
        """requirepass, set in a config file so it is not on redis-server's own command line."""
        self._process: subprocess.Popen[bytes] | None = None
        self._log = folder / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        """The URL with the password, if the server has one."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        if self.running:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        config: list[str] = []
        if self.password:
            conf = self.folder / "redis.conf"
            conf.write_text(f"requirepass {self.password}\n")
            conf.chmod(0o600)
            config = [str(conf)]
        command = [
            REDIS_SERVER,
            *config,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.folder),
            "--logfile", str(self._log),
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _ping(self.port):
            if self._process.poll() is not None:
                _, err = self._process.communicate()
                self._process = None
                log = self._log.read_text() if self._log.exists() else ""
                raise RuntimeError(f"redis-server exited on start: {err.decode()}{log[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def stop(self) -> None:
        """Terminate the server (its data is lost) and wait until the port is closed."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        if process.stderr is not None:
            process.stderr.close()

    def history(self, session_id: str) -> list[dict[str, Any]]:
        """A session's answers as stored in its Redis Stream, read with a plain redis client."""
        client = redis.Redis.from_url(self.url, decode_responses=True)
        try:
            entries = client.xrange(f"livelens:history:{session_id}")
            return [json.loads(fields["entry"]) for _, fields in entries]
        finally:
            client.close()

    def restart(self) -> None:
        """Stop and start again on the same port: an empty server, as after a crash."""
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server on a free port, stopped at teardown."""
    if shutil.which(REDIS_SERVER) is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
