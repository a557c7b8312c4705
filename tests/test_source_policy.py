"""The source policy against the attacks it exists for, through the real app where it matters.

Real parts only: a redis-server on a free port (the CR/LF injection target), HTTP and HTTPS
servers on loopback serving PyAV-made video, FFmpeg through PyAV opening what the policy built,
the tiny model behind the real FastAPI app.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from media_servers import (
    LiveClock,
    MediaServer,
    closed_port,
    make_hls,
    self_signed_certificate,
    tls_context,
)
from service_harness import LOOPBACK, fast_config, running_app, wait_for
from videos import make_video

from livelens.model.runner import ModelRunner
from livelens.stream.cli import UsageError, build_parser
from livelens.stream.redact import mask_url
from livelens.stream.server import source_policy
from livelens.stream.service import SOURCE_FAILED, SOURCE_UNREADABLE
from livelens.stream.sources.policy import SourcePolicy, SourceRefused, operator_target
from livelens.stream.sources.pull import PullConfig, PullSource

QUICK_FAIL = PullConfig(
    reconnect_initial_s=0.1, reconnect_max_s=0.2, give_up_after_s=0.5, open_timeout_s=3.0
)
"""Network sources that cannot be read fail within about a second."""


@pytest.fixture
def runner(tiny_model) -> ModelRunner:
    return ModelRunner(tiny_model)


def _refusal(policy: SourcePolicy, source: str) -> tuple[int, str, str]:
    with pytest.raises(SourceRefused) as refused:
        policy.check(source)
    return refused.value.status, refused.value.code, refused.value.message


def _final(client, session_id: str) -> dict | None:
    record = client.get(f"/v1/sessions/{session_id}").json()
    return record if record["state"] in ("ended", "failed") else None


# --- syntax ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "rtsp://127.0.0.1:6379/x\r\nSET injected 1",
        "rtsp://127.0.0.1:6379/x%0d%0aSET%20injected%201",
        "rtsp://127.0.0.1:6379/x%0D%0A",
        "http://host.example/a\tb",
        "http://host.example/a b",
        "http://host.example/\u2028",
        "http://host.example/caf\u00e9",
        "http://host.example/%00",
        "/media/clip\r\n.mp4",
        "/media/clip\u202e4pm.mp4",
        "/media/\x00clip.mp4",
        "file:///etc/passwd",
        "file:/etc/passwd",
        "FILE:///etc/passwd",
        "ftp://host.example/x",
        "udp://127.0.0.1:5000",
        "concat:/etc/passwd|/etc/hosts",
        "rtsp:///stream",
        "rtsp:cam/stream",
        "rtsp://cam:99999/stream",
        "rtsp://cam:0/stream",
        "rtsp://u:p@w@host.example/stream",
        "http://[::1/x.m3u8",
        "http://[fe80::1%25eth0]/x",
        "http://host..example/x",
        "http://host.example/a\\b",
        'http://host.example/"x"',
    ],
)
def test_malformed_or_foreign_sources_are_refused_before_anything_opens(source: str) -> None:
    status, code, message = _refusal(SourcePolicy(allow=LOOPBACK), source)
    assert (status, code) == (422, "bad_source")
    assert "SET" not in message and "passwd" not in message


def test_the_url_is_rebuilt_and_the_scheme_normalised() -> None:
    target = operator_target("HTTP://Cam.Example:8080/live/index.m3u8?token=a%20b#part")
    assert target.url == "http://cam.example:8080/live/index.m3u8?token=a%20b"
    assert target.is_network and target.options == {
        "protocol_whitelist": "http,https,tls,tcp",
        "max_redirects": "0",
    }
    rtsp = operator_target("RTSP://user:pw@10.1.2.3/stream1")
    assert rtsp.url == "rtsp://user:pw@10.1.2.3/stream1"
    assert rtsp.name == "rtsp://user:***@10.1.2.3/stream1"
    assert rtsp.options == {"protocol_whitelist": "rtsp,tcp"}
    secure = operator_target("rtsps://cam.example/stream1", ca_file=Path("/ca.pem"))
    assert secure.options == {
        "protocol_whitelist": "rtsps,tls,tcp",
        "tls_verify": "1",
        "ca_file": "/ca.pem",
    }


def test_mask_url_masks_every_password_form() -> None:
    assert mask_url("rtsp://admin:hunter2@cam/x") == "rtsp://admin:***@cam/x"
    assert mask_url("rtsp://admin:hun@ter2@cam/x") == "rtsp://admin:***@cam/x"
    assert mask_url("redis://:hunter2@redis:6379/0") == "redis://:***@redis:6379/0"
    assert mask_url("rtsp://admin:hunter2@cam:99999/\r\n") == "rtsp://admin:***@cam:99999/\r\n"
    for unchanged in ("rtsp://admin@cam/x", "rtsp://cam:554/x@y", "/videos/a:b@c.mp4"):
        assert mask_url(unchanged) == unchanged


# --- destinations (SSRF) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "rtsp://10.0.0.1/x",
        "rtsp://192.168.1.20:554/x",
        "http://169.254.169.254/latest/meta-data/",
        "rtsp://127.0.0.1:6379/x",
        "rtsp://[::1]:554/x",
        "rtsp://localhost/x",
        "http://0.0.0.0:8000/x",
        "rtsp://224.0.0.1/x",
        "rtsp://100.64.0.1/x",
        "rtsp://[fe80::1]/x",
        "rtsp://[::ffff:10.0.0.1]/x",
        "http://2130706433/x",
        "rtsp://name-that-does-not-resolve.invalid/x",
    ],
)
def test_non_public_destinations_are_refused_alike(source: str) -> None:
    assert _refusal(SourcePolicy(), source) == (
        403,
        "source_not_allowed",
        "the source's host cannot be resolved or is not allowed by this server's source policy",
    )


def test_the_allow_list_opens_hosts_and_networks_and_connects_to_the_checked_address() -> None:
    by_network = SourcePolicy(allow=("127.0.0.0/8", "10.0.0.0/8"))
    for source in ("rtsp://localhost:8554/cam", "rtsp://10.9.8.7/cam"):
        assert by_network.check(source).is_network
    assert _refusal(by_network, "rtsp://192.168.1.1/cam")[0] == 403
    by_name = SourcePolicy(allow=("localhost",))
    assert by_name.check("rtsp://localhost/cam").is_network
    assert _refusal(by_name, "rtsp://127.0.0.1/cam")[0] == 403  # the name, not its address

    # FFmpeg gets the address that was checked; the name travels as Host and TLS name.
    plain = by_network.check("http://localhost:8080/a.m3u8")
    assert plain.url == "http://127.0.0.1:8080/a.m3u8"
    assert plain.options["headers"] == "Host: localhost:8080\r\n"
    secure = by_network.check("https://localhost/a.m3u8")
    assert secure.url == "https://127.0.0.1/a.m3u8"
    assert (secure.options["verifyhost"], secure.options["tls_verify"]) == ("localhost", "1")
    with pytest.raises(ValueError, match="neither a host name nor a CIDR"):
        SourcePolicy(allow=("10.0.0.0/33",))


def test_serve_flags_and_env_build_the_policy(tmp_path: Path, monkeypatch) -> None:
    cert, _ = self_signed_certificate(tmp_path)
    monkeypatch.setenv("LIVELENS_ALLOW_SOURCES", "cams.example, 192.168.0.0/16")
    monkeypatch.setenv("LIVELENS_MEDIA_ROOT", str(tmp_path))
    args = build_parser().parse_args(
        ["serve", "--allow-source", "10.0.0.0/8", "--source-ca-file", str(cert)]
    )
    policy = source_policy(args)
    assert policy.allow == ("10.0.0.0/8", "cams.example", "192.168.0.0/16")
    assert (policy.media_root, policy.ca_file) == (tmp_path.resolve(), cert.resolve())
    for bad in (["--allow-source", "not a host"], ["--media-root", str(tmp_path / "none")]):
        with pytest.raises(UsageError):
            source_policy(build_parser().parse_args(["serve", *bad]))


# --- through the app --------------------------------------------------------------------------


def test_crlf_in_an_rtsp_source_never_reaches_redis(runner, redis_server) -> None:
    """The probe's attack: an rtsp:// source aimed at the server's own Redis, commands after
    CR/LF. Loopback is allowed here, so only the syntax check stands in the way."""
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    payload = "SET injected 1\r\nXADD livelens:history:forged * entry x\r\n"
    attacks = [
        f"rtsp://127.0.0.1:{port}/x\r\n{payload}",
        f"rtsp://127.0.0.1:{port}/x{quote(chr(13) + chr(10) + payload)}",
    ]
    with running_app(runner, fast_config(redis_server.url, pull=QUICK_FAIL)) as (client, _):
        for source in attacks:
            response = client.post("/v1/sessions", json={"source": source})
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "bad_source"
        listed = client.get("/v1/sessions")
        assert listed.status_code == 200 and listed.json() == {"sessions": []}
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert r.get("injected") is None and r.exists("livelens:history:forged") == 0
    finally:
        r.close()


def test_an_uppercase_scheme_plays(runner, tmp_path) -> None:
    make_video(tmp_path / "clip.mp4", frames=20, fps=10)
    with (
        MediaServer(tmp_path) as http,
        running_app(runner, fast_config(None, pull=QUICK_FAIL)) as (client, _),
    ):
        source = http.url("clip.mp4").replace("http://", "HTTP://")
        created = client.post("/v1/sessions", json={"source": source})
        assert created.status_code == 201, created.text
        assert created.json()["source"] == http.url("clip.mp4")
        record = wait_for(lambda: _final(client, created.json()["id"]))
        assert record["state"] == "ended", record
        assert record["stats"]["frames_received"] == 20


def test_private_destinations_are_refused_by_the_app(runner) -> None:
    with running_app(runner, fast_config(None, sources=SourcePolicy())) as (client, service):
        answers = set()
        for source in ("rtsp://10.0.0.1/x", "http://169.254.169.254/", "rtsp://[::1]/x"):
            response = client.post("/v1/sessions", json={"source": source})
            answers.add((response.status_code, response.text))
        (only,) = answers
        assert only[0] == 403 and "source_not_allowed" in only[1]
        assert service.sessions == {}


def test_a_redirect_cannot_lead_to_an_unchecked_destination(runner, tmp_path) -> None:
    """An allowed server redirects to one that is not allowed (127.0.0.2: loopback, not in
    the allow-list): FFmpeg must not follow."""
    make_video(tmp_path / "clip.mp4", frames=10, fps=10)
    with (
        MediaServer(tmp_path) as allowed,
        MediaServer(tmp_path, host="127.0.0.2") as internal,
        running_app(runner, fast_config(None, pull=QUICK_FAIL)) as (client, _),
    ):
        source = allowed.url(f"redirect?to={internal.url('clip.mp4')}")
        refused = client.post("/v1/sessions", json={"source": source})
        assert refused.status_code == 422, refused.text
        assert internal.hosts == [] and len(allowed.hosts) == 1
        direct = client.post("/v1/sessions", json={"source": internal.url("clip.mp4")})
        assert direct.status_code == 403  # what the redirect would have reached


def test_an_hls_playlist_cannot_make_ffmpeg_read_local_files(runner, tmp_path) -> None:
    """A playlist on an allowed server whose segments are file: URLs of the server's disk.

    The protocol whitelist refuses them; FFmpeg's own default for HLS does too, so this guards
    the behaviour, and test_the_url_is_rebuilt_and_the_scheme_normalised the option itself."""
    media = make_hls(tmp_path / "hls", segments=2)
    playlist = (media.folder / "index.m3u8").read_text()
    for segment in media.segments:
        playlist = playlist.replace(segment, f"file://{media.folder / segment}")
    web = tmp_path / "web"
    web.mkdir()
    (web / "evil.m3u8").write_text(playlist)
    with (
        MediaServer(web) as http,
        running_app(runner, fast_config(None, pull=QUICK_FAIL)) as (client, _),
    ):
        refused = client.post("/v1/sessions", json={"source": http.url("evil.m3u8")})
        assert (refused.status_code, refused.json()["error"]["code"]) == (
            422,
            "source_unreadable",
        )
        assert http.hosts == [f"127.0.0.1:{http.port}"]  # the playlist was read, nothing else


def test_tls_is_verified_and_a_private_ca_can_be_trusted(runner, tmp_path, caplog) -> None:
    make_video(tmp_path / "clip.mp4", frames=20, fps=10)
    cert, key = self_signed_certificate(tmp_path)
    with MediaServer(tmp_path, tls=tls_context(cert, key)) as https:
        with running_app(runner, fast_config(None, pull=QUICK_FAIL)) as (client, service):
            refused = client.post("/v1/sessions", json={"source": https.url("clip.mp4")})
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["message"] == SOURCE_UNREADABLE
            assert service.sessions == {}
        assert https.hosts == []  # no request got past the handshake

        trusting = fast_config(
            None, pull=QUICK_FAIL, sources=SourcePolicy(allow=LOOPBACK, ca_file=cert)
        )
        with running_app(runner, trusting) as (client, _):
            # By name: FFmpeg connects to the checked 127.0.0.1 and verifies "localhost".
            source = https.url("clip.mp4", host="localhost")
            created = client.post("/v1/sessions", json={"source": source})
            assert created.status_code == 201, created.text
            record = wait_for(lambda: _final(client, created.json()["id"]))
            assert record["state"] == "ended" and record["stats"]["frames_received"] == 20
        assert set(https.hosts) == {f"localhost:{https.port}"}


class TlsListener:
    """A TLS server on 127.0.0.1 that keeps the first bytes each client sends after the
    handshake (b"" when the client hung up during it), then hangs up."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.received: list[bytes] = []
        self._context = context
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._socket.accept()
            except OSError:
                return  # closed
            with client:
                try:
                    with self._context.wrap_socket(client, server_side=True) as tls:
                        tls.settimeout(5)
                        self.received.append(tls.recv(200))
                except OSError:
                    self.received.append(b"")

    def close(self) -> None:
        self._socket.close()


def test_rtsps_certificates_are_verified_by_name(tmp_path) -> None:
    """rtsps:// by name: FFmpeg connects to the checked address and verifies the name; without
    the CA it hangs up in the handshake, before sending its first RTSP request."""
    cert, key = self_signed_certificate(tmp_path)
    listener = TlsListener(tls_context(cert, key))
    try:
        untrusted = _first_contact(SourcePolicy(allow=LOOPBACK), listener)
        trusted = _first_contact(SourcePolicy(allow=LOOPBACK, ca_file=cert), listener)
    finally:
        listener.close()
    assert untrusted == (b"", "reconnecting")
    assert trusted[0].startswith(b"OPTIONS rtsps://127.0.0.1:")
    assert trusted[1] == "reconnecting"  # no RTSP server behind it either way


def _first_contact(policy: SourcePolicy, listener: TlsListener) -> tuple[bytes, str]:
    """What the listener got from a pull of rtsps://localhost, and the source's first event."""
    target = policy.check(f"rtsps://localhost:{listener.port}/cam")
    events: list[str] = []
    source = PullSource(target, on_frame=lambda f: None, on_event=lambda e: events.append(e.kind))
    source.start()
    try:
        wait_for(lambda: events and listener.received)
    finally:
        source.stop()
    first = listener.received[0]
    listener.received.clear()
    return first, events[0]


def test_local_files_only_under_the_media_root_with_one_answer(runner, tmp_path) -> None:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    make_video(root / "clip.mp4", frames=10, fps=10)
    make_video(root / "sub" / "car park, cam 2.mp4", frames=10, fps=10)
    secret = make_video(tmp_path / "secret.mp4", frames=10, fps=10).path
    (root / "escape.mp4").symlink_to(secret)
    (root / "inside.mp4").symlink_to(root / "clip.mp4")
    (root / "empty.mp4").touch()
    locked = make_video(root / "locked.mp4", frames=10, fps=10).path
    locked.chmod(0)
    probes = [
        "/etc/passwd",
        "/etc",
        str(secret),
        "../secret.mp4",
        "sub/../../secret.mp4",
        "escape.mp4",
        "missing.mp4",
        str(root / "missing.mp4"),
        "sub",
        "empty.mp4",
        "sub/../../media/../secret.mp4",
    ]
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        probes.append("locked.mp4")
    with running_app(runner, fast_config(None)) as (client, _):
        off = client.post("/v1/sessions", json={"source": str(root / "clip.mp4")})
        assert off.status_code == 403 and off.json()["error"]["code"] == "source_not_allowed"
    with running_app(runner, fast_config(None, media_root=root)) as (client, service):
        answers = {}
        for probe in probes:
            response = client.post("/v1/sessions", json={"source": probe})
            answers[probe] = (response.status_code, response.json())
        assert len({repr(a) for a in answers.values()}) == 1, answers
        status, body = answers["/etc/passwd"]
        assert (status, body["error"]["code"]) == (422, "source_unavailable")
        assert service.sessions == {}
        goods = ("clip.mp4", str(root / "clip.mp4"), "inside.mp4", "sub/car park, cam 2.mp4")
        for good in goods:
            created = client.post("/v1/sessions", json={"source": good, "realtime": False})
            assert created.status_code == 201, (good, created.text)
            assert created.json()["source"] == good


def test_a_source_that_does_not_open_is_refused_when_posted(runner, tmp_path) -> None:
    """An HLS 404 and a closed RTSP port: one answer at once, no session left "starting"."""
    with (
        MediaServer(tmp_path) as http,
        running_app(runner, fast_config(None, pull=QUICK_FAIL)) as (client, service),
    ):
        for source in (http.url("missing.m3u8"), f"rtsp://127.0.0.1:{closed_port()}/x"):
            refused = client.post("/v1/sessions", json={"source": source})
            assert (refused.status_code, refused.json()["error"]) == (
                422,
                {"code": "source_unreadable", "message": SOURCE_UNREADABLE},
            )
        assert service.sessions == {} and service.sources == {}
        assert http.hosts == [f"127.0.0.1:{http.port}"]


def test_a_source_that_dies_fails_with_the_generic_reason(runner, tmp_path, caplog) -> None:
    clock = LiveClock(make_hls(tmp_path / "hls", segments=12), preload=3, window=3)
    http = MediaServer(tmp_path / "hls", clock=clock)
    try:
        with running_app(runner, fast_config(None, pull=QUICK_FAIL)) as (client, _):
            created = client.post("/v1/sessions", json={"source": http.url("live.m3u8")})
            assert created.status_code == 201, created.text
            sid = created.json()["id"]
            wait_for(lambda: client.get(f"/v1/sessions/{sid}").json()["state"] == "live")
            http.stop()
            record = wait_for(lambda: _final(client, sid))
    finally:
        http.stop()
    assert (record["state"], record["reason"]) == ("failed", SOURCE_FAILED)
    assert "connection refused" in caplog.text  # the details are in the log


def test_camera_passwords_never_leave_the_pull_source(runner, redis_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="livelens")
    password = "Hunter2-camera"
    make_video(tmp_path / "clip.mp4", frames=10, fps=10)
    config = fast_config(redis_server.url, pull=QUICK_FAIL)
    with MediaServer(tmp_path) as http, running_app(runner, config) as (client, _):
        source = http.url("clip.mp4").replace("://", f"://admin:{password}@")
        shown = source.replace(password, "***")
        created = client.post("/v1/sessions", json={"source": source})
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        assert created.json()["source"] == shown
        record = wait_for(lambda: _final(client, sid))
        assert (record["source"], record["state"]) == (shown, "ended")
        assert [s["source"] for s in client.get("/v1/sessions").json()["sessions"]] == [shown]
        for refused_source in (
            f"rtsp://admin:{password}@127.0.0.1:{closed_port()}/stream1",  # does not open
            f"rtsp://admin:{password}@10.0.0.1/stream1",  # not allowed
            source + "\r\nx",  # malformed
        ):
            refused = client.post("/v1/sessions", json={"source": refused_source})
            assert refused.status_code in (403, 422) and password not in refused.text
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        stored = r.hgetall(f"livelens:session:{sid}")
    finally:
        r.close()
    assert stored["source"] == shown
    assert "connection refused: rtsp://admin:***@127.0.0.1" in caplog.text  # logged, masked
    assert password not in caplog.text and password not in repr(stored)
