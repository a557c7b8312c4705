"""Scoped API keys, websocket tickets and secrets kept out of logs and command lines.

The unit tests read keys files, tickets and log redaction directly; the app tests run the real
app (tiny model, in-process registry) with a keys file; the last test runs `livelens serve` as
a process against a redis-server that requires a password and reads the process's log and
/proc/PID/cmdline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser import serve
from media_servers import closed_port
from redis_server import REDIS_SERVER, RedisServer
from service_harness import fast_config, running_app, wait_for
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocketDisconnect
from videos import make_video
from websockets.sync.client import connect as ws_connect

from livelens.clients import Publisher
from livelens.clients.client import LiveLensClient, ServerError, websocket_url
from livelens.model.runner import ModelRunner
from livelens.stream import redact
from livelens.stream.app import create_app
from livelens.stream.auth import (
    ROUTE_SCOPES,
    WEBSOCKET,
    ApiKey,
    AuthError,
    KeyRing,
    KeysFileError,
    Scope,
    Tickets,
    digest,
    entry,
    parse_keys_file,
    parse_scopes,
)
from livelens.stream.cli import UsageError, build_parser, key_ring, main, redis_url
from livelens.stream.service import LiveService
from livelens.stream.whip import WhipSettings

LIVELENS = shutil.which("livelens", path=str(Path(sys.executable).parent))

KEYS = {
    "camera-1": ("publish", "camera-key-0c1d2e"),
    "analyst": ("read", "analyst-key-7f8e9d"),
    "ops": ("admin", "ops-key-3a4b5c"),
}
TOKEN = "legacy-admin-token"
SDP = {"Content-Type": "application/sdp"}


def write_keys(path: Path, names: tuple[str, ...] = tuple(KEYS)) -> Path:
    lines = [entry(n, parse_scopes(KEYS[n][0]), KEYS[n][1]) for n in names]
    path.write_text("# name scopes digest\n\n" + "\n".join(lines) + "\n")
    return path


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name][1]}"}


def error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    return response.json()["error"]["message"]


# ------------------------------------------------------------------------------ keys files
def test_keys_file_round_trip_and_scopes(tmp_path) -> None:
    keys = KeyRing.from_token(TOKEN, write_keys(tmp_path / "keys"))
    assert [k.name for k in keys.keys] == ["token", "camera-1", "analyst", "ops"]
    camera, analyst, ops = (keys.find(KEYS[n][1]) for n in ("camera-1", "analyst", "ops"))
    assert camera is not None and camera.name == "camera-1"
    assert keys.find(TOKEN).name == "token" and keys.find("guess") is None
    assert camera.allows(Scope.PUBLISH) and not camera.allows(Scope.READ)
    assert analyst.allows(Scope.READ) and not analyst.allows(Scope.ADMIN)
    assert all(ops.allows(s) for s in Scope)  # admin implies the others
    # The file stores digests only; the line names the scopes in a fixed order.
    text = (tmp_path / "keys").read_text()
    assert KEYS["ops"][1] not in text and digest(KEYS["ops"][1]).hex() in text
    both = entry("relay", {Scope.READ, Scope.PUBLISH}, "k")
    assert both == f"relay publish,read sha256:{digest('k').hex()}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cam publish", "line 1: expected 'NAME SCOPES sha256:HEX'"),
        (f"cam raed sha256:{'0' * 64}", "line 1: unknown scope 'raed'"),
        ("cam read 0123", "line 1: the key must be given as sha256:<64 hex digits>"),
        (f"cam read sha256:{'0' * 63}", "line 1: the key must be given as sha256"),
        (f"# c\ncam read sha256:{'0' * 64}\ncam admin sha256:{'1' * 64}", "line 3: the name"),
        (f"a read sha256:{'2' * 64}\nb admin sha256:{'2' * 64}", "line 2: the same key"),
        (f"bad/name read sha256:{'0' * 64}", "line 1: bad key name"),
    ],
)
def test_keys_file_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(KeysFileError, match="keys file " + message.replace("(", r"\(")):
        parse_keys_file(text)


def test_reload_swaps_keys_and_a_bad_file_keeps_the_old_ones(tmp_path, caplog) -> None:
    path = write_keys(tmp_path / "keys")
    keys = KeyRing(path=path)
    write_keys(path, ("ops",))
    assert keys.reload() == 1
    assert keys.find(KEYS["analyst"][1]) is None and keys.find(KEYS["ops"][1]) is not None
    path.write_text("ops admin sha256:nothex\n")
    with caplog.at_level(logging.ERROR, "livelens.stream.auth"), pytest.raises(KeysFileError):
        keys.reload()
    assert keys.find(KEYS["ops"][1]) is not None  # still in force
    assert "keys not reloaded, the previous keys stay in force" in caplog.text
    assert "line 1" in caplog.text
    path.unlink()
    with pytest.raises(KeysFileError, match="cannot read the keys file"):
        keys.reload()
    with pytest.raises(KeysFileError, match="cannot read"):
        KeyRing(path=tmp_path / "missing")


def test_livelens_key_makes_a_key_and_its_line(capsys, tmp_path, monkeypatch) -> None:
    assert main(["key", "camera-7", "--scopes", "publish,read"]) == 0
    out, err = capsys.readouterr()
    key = err.rsplit(": ", 1)[1].strip()
    assert len(key) >= 40 and key not in out
    (tmp_path / "keys").write_text(out)
    (found,) = parse_keys_file(out)
    assert found.name == "camera-7" and found.scopes == {Scope.PUBLISH, Scope.READ}
    assert KeyRing(path=tmp_path / "keys").find(key) == found
    # Moving an existing --token into the file: the key comes from stdin, nothing is printed
    # but the line.
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{TOKEN}\n"))
    assert main(["key", "ops", "--scopes", "admin", "--stdin"]) == 0
    out, err = capsys.readouterr()
    assert out == f"ops admin sha256:{digest(TOKEN).hex()}\n" and err == ""
    assert main(["key", "x", "--scopes", "root"]) == 2
    assert "unknown scope 'root'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- tickets
def test_tickets_are_single_use_short_lived_per_session_and_bounded() -> None:
    tickets = Tickets(ttl_s=30.0, per_key=3)
    first = tickets.issue("s1", None)
    assert tickets.redeem(first, "s1").session_id == "s1"
    with pytest.raises(AuthError, match="unknown, used or expired"):
        tickets.redeem(first, "s1")
    other = tickets.issue("s1", None)
    with pytest.raises(AuthError, match="another session"):
        tickets.redeem(other, "s2")
    short = Tickets(ttl_s=0.01)
    old = short.issue("s1", None)
    time.sleep(0.05)
    with pytest.raises(AuthError, match="expired"):
        short.redeem(old, "s1")


def test_a_key_asking_for_tickets_in_a_loop_pushes_out_only_its_own() -> None:
    analyst, flooder = (ApiKey(n, digest(n), frozenset({Scope.READ})) for n in ("a", "f"))
    tickets = Tickets(per_key=3, capacity=100)
    kept = tickets.issue("s1", analyst)
    flood = [tickets.issue("s1", flooder) for _ in range(1000)]
    assert len(tickets) == 4  # the flooder's newest 3, and the analyst's
    assert tickets.redeem(kept, "s1").key == analyst
    with pytest.raises(AuthError, match="unknown"):
        tickets.redeem(flood[-4], "s1")
    assert tickets.redeem(flood[-1], "s1").key == flooder
    crowded = Tickets(per_key=50, capacity=10)  # the overall bound holds too
    for _ in range(30):
        crowded.issue("s1", analyst)
    assert len(crowded) == 10


# ---------------------------------------------------------------------------- log redaction
def test_redaction_masks_query_credentials_and_url_passwords() -> None:
    line = (
        'GET /v1/sessions/a/ws?token=abc123&x=1 ticket=no "/ws?ticket=t-1" '
        "/x?api_key=k9;y redis://:hunter2@db:6379/0 rtsp://cam:pa55@10.0.0.7/s "
        "http://host/ok?at=1.5"
    )
    assert redact.redact(line) == (
        'GET /v1/sessions/a/ws?token=***&x=1 ticket=no "/ws?ticket=***" '
        "/x?api_key=***;y redis://:***@db:6379/0 rtsp://cam:***@10.0.0.7/s "
        "http://host/ok?at=1.5"
    )


def test_redacting_filter_keeps_positional_arguments(caplog) -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', None, None
    )
    record.args = ("127.0.0.1:5", "GET", "/v1/sessions/x/ws?token=s3cret", "1.1", 200)
    assert redact.RedactingFilter().filter(record)
    assert record.args == ("127.0.0.1:5", "GET", "/v1/sessions/x/ws?token=***", "1.1", 200)
    assert record.getMessage() == '127.0.0.1:5 - "GET /v1/sessions/x/ws?token=*** HTTP/1.1" 200'


# ------------------------------------------------------------------------- the Redis URL
def _serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_redis_url_from_env_or_file_and_a_warning_for_the_command_line(
    tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.delenv("LIVELENS_REDIS_URL", raising=False)
    assert redis_url(_serve_args()) == "redis://localhost:6379/0"
    monkeypatch.setenv("LIVELENS_REDIS_URL", "redis://:envpw@db:6379/1")
    assert redis_url(_serve_args()) == "redis://:envpw@db:6379/1"
    (tmp_path / "url").write_text("redis://:filepw@db:6379/2\n")
    assert redis_url(_serve_args("--redis-url-file", str(tmp_path / "url"))) == (
        "redis://:filepw@db:6379/2"
    )
    assert redis_url(_serve_args("--redis-url", "none")) is None
    with caplog.at_level(logging.WARNING, "livelens.stream.cli"):
        assert redis_url(_serve_args("--redis-url", "redis://:argpw@db/0")).endswith("db/0")
    assert "shows in the process list" in caplog.text and "argpw" not in caplog.text
    with pytest.raises(UsageError, match="not both"):
        redis_url(_serve_args("--redis-url", "x", "--redis-url-file", "y"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UsageError, match="is empty"):
        redis_url(_serve_args("--redis-url-file", str(tmp_path / "empty")))
    with pytest.raises(UsageError, match=r"--redis-url-file: .*No such file"):
        redis_url(_serve_args("--redis-url-file", str(tmp_path / "gone")))


def test_serve_keys_from_token_and_keys_file_flags_or_env(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.delenv("LIVELENS_TOKEN", raising=False)
    monkeypatch.delenv("LIVELENS_KEYS_FILE", raising=False)
    with caplog.at_level(logging.WARNING, "livelens.stream.cli"):
        keys = key_ring(_serve_args("--token", TOKEN))
    assert keys.find(TOKEN).scopes == {Scope.ADMIN}
    assert "--token shows in the process list" in caplog.text and TOKEN not in caplog.text
    caplog.clear()
    monkeypatch.setenv("LIVELENS_TOKEN", TOKEN)
    with caplog.at_level(logging.WARNING, "livelens.stream.cli"):
        assert key_ring(_serve_args()).find(TOKEN) is not None
    assert caplog.text == ""
    monkeypatch.setenv("LIVELENS_KEYS_FILE", str(write_keys(tmp_path / "keys")))
    assert key_ring(_serve_args()).find(KEYS["analyst"][1]).name == "analyst"
    (tmp_path / "bad").write_text("x read sha256:00\n")
    with pytest.raises(UsageError, match="bad line 1: the key must be given as sha256"):
        key_ring(_serve_args("--keys-file", str(tmp_path / "bad")))


# ------------------------------------------------------------------------- the route table
def _app_routes(app) -> set[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """Every (method, path) the app serves: the OpenAPI schema (which includes routers'
    routes) plus the top-level routes it leaves out (console, websocket, docs pages)."""
    found = {
        (method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item
    }
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            found.add((WEBSOCKET, route.path))
        elif isinstance(route, Mount):
            found.add(("GET", f"{route.path}/{{path:path}}"))
        elif isinstance(route, Route):
            found.update((m, route.path) for m in route.methods or () if m != "HEAD")
    return found


def test_every_route_has_exactly_one_entry_in_the_scope_table() -> None:
    routes = _app_routes(create_app(LiveService(None)))  # type: ignore[arg-type]
    assert len(routes) >= 20
    assert sorted(routes - set(ROUTE_SCOPES)) == []  # a new route must be classified
    assert sorted(set(ROUTE_SCOPES) - routes) == []  # and the table names no stale one


# ------------------------------------------------------------------- through the real app
@pytest.fixture
def runner(tiny_model) -> ModelRunner:
    return ModelRunner(tiny_model)


@pytest.fixture
def clip(tmp_path):
    return make_video(tmp_path / "clip.mp4", frames=20, fps=10, pattern="moving_square")


@contextlib.contextmanager
def keyed_app(runner, tmp_path: Path, token: str | None = TOKEN):  # type: ignore[no-untyped-def]
    keys = KeyRing.from_token(token, write_keys(tmp_path / "keys"))
    with running_app(runner, fast_config(None, media_root=tmp_path), keys=keys) as (
        client,
        service,
    ):
        yield client, service


def _pull(client, clip, who: str = "ops") -> str:  # type: ignore[no-untyped-def]
    body = {"source": str(clip.path), "realtime": False}
    response = client.post("/v1/sessions", json=body, headers=bearer(who))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _refused(ws) -> tuple[dict, int]:  # type: ignore[no-untyped-def]
    """The error message of a refused websocket, and its close code."""
    message = ws.receive_json()
    with pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()
    return message, closed.value.code


def test_each_scope_reaches_its_routes_only(runner, clip, tmp_path) -> None:
    with keyed_app(runner, tmp_path) as (client, _):
        # Open as before: probes, scrapers, the console and the API docs.
        for path in ("/healthz", "/metrics", "/", "/console/console.js", "/openapi.json", "/docs"):
            assert client.get(path).status_code == 200, path
        assert client.options("/whip").status_code == 204
        # No key, an unknown key, a key in the query string of an HTTP request: 401.
        for headers, url in (
            ({}, "/v1/sessions"),
            ({"Authorization": "Bearer nope"}, "/v1/sessions"),
            ({}, f"/v1/sessions?token={KEYS['ops'][1]}"),
        ):
            response = client.get(url, headers=headers)
            error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
        # read: sessions yes; pulling, deleting and publishing no (403 with a clear message).
        assert client.get("/v1/sessions", headers=bearer("analyst")).status_code == 200
        response = client.post("/v1/sessions", json={"source": "x"}, headers=bearer("analyst"))
        message = error(response, 403, "forbidden_scope")
        assert message == "this key lacks the admin scope (key 'analyst' has: read)"
        assert 'error="insufficient_scope"' in response.headers["www-authenticate"]
        response = client.post("/whip", content="v=0", headers={**SDP, **bearer("analyst")})
        assert error(response, 403, "forbidden_scope").startswith("this key lacks the publish")
        assert response.headers["access-control-allow-origin"] == "*"  # browsers can read it
        # publish: WHIP only (past the guard, the offer itself is judged).
        response = client.post("/whip", content="not sdp", headers={**SDP, **bearer("camera-1")})
        error(response, 400, "malformed_sdp")
        message = error(
            client.get("/v1/sessions", headers=bearer("camera-1")), 403, "forbidden_scope"
        )
        assert message == "this key lacks the read scope (key 'camera-1' has: publish)"
        # admin, from the file or as the old --token.
        session = _pull(client, clip, "ops")
        sid_url = f"/v1/sessions/{session}"
        assert client.get(sid_url, headers=bearer("camera-1")).status_code == 200  # its record
        for who in ("camera-1", "analyst"):
            error(client.delete(sid_url, headers=bearer(who)), 403, "forbidden_scope")
        assert client.get(f"{sid_url}/history", headers=bearer("analyst")).status_code == 200
        error(client.get(f"{sid_url}/history", headers=bearer("camera-1")), 403, "forbidden_scope")
        legacy = {"Authorization": f"Bearer {TOKEN}"}
        assert client.delete(sid_url, headers=legacy).status_code == 200
        # Paths the table does not know stay shut below /v1 (fail closed), 404 for admins.
        error(client.get("/v1/nothing", headers=bearer("analyst")), 403, "forbidden_scope")
        error(client.get("/v1/nothing", headers=bearer("ops")), 404, "not_found")
        assert client.get("/nothing").status_code == 404


def test_websocket_scopes_and_single_use_tickets(runner, clip, tmp_path) -> None:
    with keyed_app(runner, tmp_path) as (client, _):
        first, second = _pull(client, clip), _pull(client, clip)
        ws_path = f"/v1/sessions/{first}/ws"
        with client.websocket_connect(ws_path, headers=bearer("analyst")) as ws:
            assert ws.receive_json()["type"] == "status"
        with client.websocket_connect(ws_path, headers=bearer("camera-1")) as ws:
            message, code = _refused(ws)
        assert (message["code"], code) == ("forbidden_scope", 4403)
        with client.websocket_connect(ws_path) as ws:
            message, code = _refused(ws)
        assert (message["code"], code) == ("unauthorized", 4401)
        # A ticket: asked for with the key in a header, used once in the URL, within 30 s.
        response = client.post(f"/v1/sessions/{first}/ticket", headers=bearer("analyst"))
        assert response.status_code == 200 and response.json()["expires_in"] == 30
        ticket = response.json()["ticket"]
        assert KEYS["analyst"][1] not in ticket
        with client.websocket_connect(f"{ws_path}?ticket={ticket}") as ws:
            assert ws.receive_json()["session_id"] == first
        with client.websocket_connect(f"{ws_path}?ticket={ticket}") as ws:
            message, code = _refused(ws)
        assert code == 4401 and "unknown, used or expired" in message["message"]
        other = client.post(f"/v1/sessions/{first}/ticket", headers=bearer("analyst")).json()
        with client.websocket_connect(f"/v1/sessions/{second}/ws?ticket={other['ticket']}") as ws:
            message, code = _refused(ws)
        assert code == 4401 and "another session" in message["message"]
        # Tickets need the read scope and a session that exists.
        error(
            client.post(f"/v1/sessions/{first}/ticket", headers=bearer("camera-1")),
            403,
            "forbidden_scope",
        )
        unknown = client.post(f"/v1/sessions/{'0' * 32}/ticket", headers=bearer("analyst"))
        error(unknown, 404, "unknown_session")
        # The old `?token=` still opens the websocket (the access log masks it).
        with client.websocket_connect(f"{ws_path}?token={KEYS['analyst'][1]}") as ws:
            assert ws.receive_json()["type"] == "status"


def test_keys_reload_endpoint_revokes_without_restart(runner, clip, tmp_path, caplog) -> None:
    with keyed_app(runner, tmp_path) as (client, _):
        session = _pull(client, clip)
        ticket = client.post(f"/v1/sessions/{session}/ticket", headers=bearer("analyst"))
        write_keys(tmp_path / "keys", ("camera-1", "ops"))  # the analyst's key is revoked
        error(client.post("/v1/keys/reload", headers=bearer("analyst")), 403, "forbidden_scope")
        assert client.post("/v1/keys/reload", headers=bearer("ops")).json() == {"keys": 2}
        error(client.get("/v1/sessions", headers=bearer("analyst")), 401, "unauthorized")
        with client.websocket_connect(
            f"/v1/sessions/{session}/ws?ticket={ticket.json()['ticket']}"
        ) as ws:
            message, code = _refused(ws)
        assert code == 4401 and "revoked" in message["message"]
        # A broken file: 422, a log line, and the keys in force stay.
        (tmp_path / "keys").write_text("ops admin,root sha256:00\n")
        with caplog.at_level(logging.ERROR, "livelens.stream.auth"):
            response = client.post("/v1/keys/reload", headers=bearer("ops"))
        assert "line 1: unknown scope 'root'" in error(response, 422, "invalid_keys_file")
        assert "keys not reloaded" in caplog.text
        assert client.get("/v1/sessions", headers=bearer("ops")).status_code == 200
    with running_app(runner, fast_config(None), token=TOKEN) as (client, _):
        response = client.post("/v1/keys/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        error(response, 409, "no_keys_file")


def test_no_keys_at_all_still_means_an_open_server(runner, clip) -> None:
    with running_app(runner, fast_config(None, media_root=clip.path.parent)) as (client, _):
        session = _pull(client, clip)
        ticket = client.post(f"/v1/sessions/{session}/ticket").json()["ticket"]
        with client.websocket_connect(f"/v1/sessions/{session}/ws?ticket={ticket}") as ws:
            assert ws.receive_json()["type"] == "status"


def test_python_client_and_cli_explain_a_missing_scope(runner, clip, tmp_path, capsys) -> None:
    keys = KeyRing(path=write_keys(tmp_path / "keys"))
    service = LiveService(runner, fast_config(None, media_root=tmp_path))
    with serve(create_app(service, keys=keys)) as url:
        with LiveLensClient.blocking(url, key=KEYS["ops"][1]) as admin:
            session = admin.start_pull(str(clip.path), realtime=False)
        with LiveLensClient.blocking(url, key=KEYS["camera-1"][1]) as camera:
            with pytest.raises(ServerError) as refused:
                camera.sessions()
            assert (refused.value.status, refused.value.code) == (403, "forbidden_scope")
            with pytest.raises(ServerError) as refused:
                camera.ask(session.id, "what?", max_new_tokens=1)
            assert str(refused.value) == (
                "this key lacks the read scope (key 'camera-1' has: publish) (403 forbidden_scope)"
            )
        with LiveLensClient.blocking(url, key=KEYS["analyst"][1]) as analyst:
            ticket = analyst.ticket(session.id)
            with ws_connect(websocket_url(url, session.id, ticket), proxy=None) as ws:
                assert json.loads(ws.recv(timeout=10))["type"] == "status"
        code = main(["sessions", "--server", url, "--key", KEYS["camera-1"][1]])
        err = capsys.readouterr().err
        assert code == 2
        assert err == (
            "livelens: error: this key lacks the read scope (key 'camera-1' has: publish) "
            "(403 forbidden_scope)\n"
        )
        with pytest.raises(ValueError, match="not two different"):
            LiveLensClient(url, key="a", token="b")


def test_a_camera_with_a_publish_key_publishes_and_stops_when_deleted(runner, clip, tmp_path):
    """A publish-only key is enough for `Publisher`: WHIP, and its own session's record, from
    which it learns that an admin deleted the session (so it does not publish it again)."""
    keys = KeyRing(path=write_keys(tmp_path / "keys"))
    service = LiveService(runner, fast_config(None))
    whip = WhipSettings(allow_loopback=True)  # loopback ICE: test-only
    with serve(create_app(service, keys=keys, whip=whip)) as url:

        async def scenario() -> None:
            camera = KEYS["camera-1"][1]
            async with (
                Publisher(url, str(clip.path), key=camera, loop=True, poll_interval=0.2) as pub,
                LiveLensClient(url, key=KEYS["ops"][1]) as admin,
            ):
                assert pub.session_id in service.sessions
                deleted = await admin.delete(pub.session_id)  # type: ignore[arg-type]
                assert deleted.reason == "deleted through the API"
                await asyncio.wait_for(pub.wait(), timeout=10)
                assert pub.reconnects == 0 and len(await admin.sessions()) == 1

        asyncio.run(scenario())


# ------------------------------------------------------ `livelens serve` as a real process
@contextlib.contextmanager
def _serve_process(command: list[str], env: dict[str, str], log: Path) -> Iterator[int]:
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process.pid
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _health(url: str) -> dict | None:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).json()
    except httpx.HTTPError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(LIVELENS is None, reason="the livelens console script is not installed")
@pytest.mark.skipif(shutil.which(REDIS_SERVER) is None, reason="redis-server is not on PATH")
def test_serve_keeps_keys_tickets_and_the_redis_password_out_of_logs_and_ps(
    model_cache, tmp_path
) -> None:
    password = "redis-pw-5e6f7a"
    redis = RedisServer(tmp_path / "redis", password=password)
    redis.start()
    keys_file = write_keys(tmp_path / "keys")
    port = closed_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "LIVELENS_CACHE": str(model_cache),
        "LIVELENS_TOKEN": TOKEN,
        "LIVELENS_REDIS_URL": redis.url,  # the password travels in the environment
    }
    command = [LIVELENS, "serve", "--model", "tiny", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--device", "cpu", "--log-level", "info", "--keys-file", str(keys_file)]
    log = tmp_path / "serve.log"
    try:
        with _serve_process(command, env, log) as pid:
            health = wait_for(lambda: _health(url), timeout=90, interval=0.2)
            assert health["redis"] is True  # it authenticated with the password from the env
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"--keys-file" in cmdline and password.encode() not in cmdline
            # Credentials in URLs, as old scripts and careless users send them.
            assert httpx.get(f"{url}/v1/sessions?token={KEYS['ops'][1]}").status_code == 401
            ws_base = f"ws://127.0.0.1:{port}/v1/sessions/{'0' * 32}/ws"
            with ws_connect(f"{ws_base}?token={KEYS['analyst'][1]}", proxy=None) as ws:
                # The key was accepted; then the session is unknown.
                assert json.loads(ws.recv(timeout=10))["code"] == "unknown_session"
            with ws_connect(f"{ws_base}?ticket=ticket-d4c3b2a1", proxy=None) as ws:
                assert json.loads(ws.recv(timeout=10))["code"] == "unauthorized"
            # SIGHUP reloads the keys file: the analyst's key is revoked at once.
            analyst = {"Authorization": f"Bearer {KEYS['analyst'][1]}"}
            assert httpx.get(f"{url}/v1/sessions", headers=analyst).status_code == 200
            write_keys(keys_file, ("ops",))
            os.kill(pid, signal.SIGHUP)
            wait_for(lambda: httpx.get(f"{url}/v1/sessions", headers=analyst).status_code == 401)
            keys_file.write_text("broken\n")  # a bad file on SIGHUP keeps the keys in force
            os.kill(pid, signal.SIGHUP)
            wait_for(lambda: "keys not reloaded" in log.read_text())
            ops = {"Authorization": f"Bearer {KEYS['ops'][1]}"}
            assert httpx.get(f"{url}/v1/sessions", headers=ops).status_code == 200
    finally:
        redis.stop()
    text = log.read_text()
    assert "Application shutdown complete" in text, text[-2000:]
    assert "/v1/sessions?token=***" in text and "ws?ticket=***" in text, text[-3000:]
    for secret in (KEYS["ops"][1], KEYS["analyst"][1], "ticket-d4c3b2a1", password, TOKEN):
        assert secret not in text, secret
