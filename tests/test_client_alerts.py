"""Alerts from the Python client and `livelens alerts`, against the real app on a real port.

The tiny model has random weights, so its answers say nothing about the video: an alert with
threshold 0 is "yes" at every evaluation (it rises at its first and stays active) and one with
threshold 1 never rises; that tests the plumbing without depending on what the model answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import av
import pytest
from browser import serve
from service_harness import fast_config, wait_for
from videos import make_video

from livelens.clients import Alert, AlertEvent, BlockingClient, LiveLensClient, ServerError
from livelens.clients.cli import cmd_alerts_watch
from livelens.model.runner import ModelRunner
from livelens.stream.app import create_app
from livelens.stream.cli import main
from livelens.stream.service import LiveService
from livelens.stream.webhooks import WebhookPolicy

TOKEN = "alerts-client-token"
CONDITION = "a red ball is visible"
LIVELENS = Path(sys.executable).with_name("livelens")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 s of 160x120 H.264 at 10 fps (sessions loop it)."""
    path = tmp_path_factory.mktemp("alerts") / "clip.mp4"
    return make_video(path, frames=40, fps=10, width=160, height=120).path


@pytest.fixture
def server(tiny_model, redis_server, clip) -> Iterator[tuple[str, LiveService]]:
    # Webhooks may go to loopback only: enough to get a secret, and to see 10.x refused.
    config = fast_config(
        redis_server.url, media_root=clip.parent, webhooks=WebhookPolicy(allow=("127.0.0.1",))
    )
    service = LiveService(ModelRunner(tiny_model), config)
    with serve(create_app(service, token=TOKEN)) as url:
        yield url, service


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch) -> None:
    monkeypatch.delenv("LIVELENS_TOKEN", raising=False)
    monkeypatch.delenv("LIVELENS_KEY", raising=False)


def _watchers(service: LiveService, sid: str) -> int:
    session = service.get(sid)
    return 0 if session is None else len(session.watchers)


async def _until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {predicate}")


def test_client_adds_lists_watches_and_removes_alerts(server, clip) -> None:
    url, service = server

    async def scenario() -> tuple[str, Alert, AlertEvent, list[AlertEvent], bytes, bytes]:
        async with LiveLensClient(url, token=TOKEN) as client:
            sid = (await client.start_pull(str(clip), loop=True)).id
            await _until(lambda: (service.sessions[sid].frames_sampled or 0) >= 1)

            # Refusals come back as ServerError with the server's status and code.
            for options, status, code in [
                ({"condition": "   "}, 422, "empty_condition"),
                ({"condition": "x" * 301}, 422, "condition_too_long"),
                ({"condition": "ok", "every": 0}, 422, "invalid_request"),
                ({"condition": "ok", "threshold": 1.5}, 422, "invalid_request"),
                (
                    {"condition": "ok", "webhook": "http://10.1.2.3/hook"},
                    403,
                    "webhook_not_allowed",
                ),
            ]:
                with pytest.raises(ServerError) as refused:
                    await client.add_alert(sid, **options)  # type: ignore[arg-type]
                assert (refused.value.status, refused.value.code) == (status, code), options
            with pytest.raises(ServerError) as refused:
                await client.add_alert("f" * 32, CONDITION)
            assert (refused.value.status, refused.value.code) == (404, "unknown_session")

            # Listen first, so the rise (at the first evaluation) cannot come before it.
            events = client.watch_alerts(sid)
            first = asyncio.ensure_future(anext(events))
            await _until(lambda: _watchers(service, sid) >= 1)
            never = await client.add_alert(sid, "a blue box is visible", threshold=1.0)
            alert = await client.add_alert(sid, CONDITION, every=0.5, cooldown=30, threshold=0.0)
            rise = await asyncio.wait_for(first, 60)
            await events.aclose()  # type: ignore[attr-defined]

            listed = await client.alerts(sid)
            got = await client.alert(sid, alert.id)
            stored = await client.alert_events(sid)
            jpeg = await client.alert_thumbnail(sid, rise.event_id)
            await _until(lambda: service.sessions[sid].live_edge >= rise.started + 2.5)
            mp4 = await client.alert_clip(sid, rise.event_id)

            assert [a.id for a in listed] == [never.id, alert.id]
            assert got.id == alert.id and got.active and got.events == 1 and got.evaluations >= 1
            assert got.secret is None  # only the creation answer has it
            removed = await client.delete_alert(sid, alert.id)
            assert removed.id == alert.id and removed.condition == CONDITION
            assert [a.id for a in await client.alerts(sid)] == [never.id]
            for call in (client.alert(sid, alert.id), client.delete_alert(sid, alert.id)):
                with pytest.raises(ServerError) as missing:
                    await call
                assert (missing.value.status, missing.value.code) == (404, "unknown_alert")
            with pytest.raises(ServerError) as expired:
                await client.alert_thumbnail(sid, "ev_000000000000")
            assert (expired.value.status, expired.value.code) == (410, "evidence_expired")
            return sid, alert, rise, stored, jpeg, mp4

    sid, alert, rise, stored, jpeg, mp4 = asyncio.run(scenario())
    assert alert.id.startswith("al_") and alert.session_id == sid and alert.secret is None
    assert (alert.every, alert.cooldown, alert.threshold, alert.hysteresis) == (0.5, 30, 0.0, 0.1)
    assert alert.question == f"Answer yes or no: is it true now that {CONDITION}?"
    assert (rise.alert_id, rise.edge, rise.condition, rise.ended) == (
        alert.id,
        "rise",
        CONDITION,
        None,
    )
    assert 0.0 <= rise.confidence <= 1.0  # type: ignore[operator]
    assert rise.thumbnail_url == f"/v1/sessions/{sid}/alert-events/{rise.event_id}/thumbnail"
    assert [(e.event_id, e.edge) for e in stored] == [(rise.event_id, "rise")]
    assert stored[0].entry_id and stored[0].started == rise.started  # from the Redis Stream
    assert jpeg[:3] == b"\xff\xd8\xff"
    with av.open(io.BytesIO(mp4)) as video:
        frames = list(video.decode(video=0))
        assert video.streams.video[0].codec_context.name == "h264"
    assert len(frames) >= 5  # 2 fps, from 3 s before to 2 s after the rise


def test_blocking_client_watches_alerts(server, clip) -> None:
    url, service = server
    with BlockingClient(url, token=TOKEN) as client:
        sid = client.start_pull(str(clip), loop=True).id
        received: list[AlertEvent] = []
        events = client.watch_alerts(sid)
        reader = threading.Thread(target=lambda: received.append(next(events)))
        reader.start()
        wait_for(lambda: _watchers(service, sid) >= 1)
        alert = client.add_alert(sid, CONDITION, threshold=0.0, webhook="http://127.0.0.1:9/hook")
        reader.join(timeout=60)
        events.close()  # type: ignore[attr-defined]
        assert alert.secret and len(alert.secret) >= 32 and alert.webhook
        assert [(e.alert_id, e.edge) for e in received] == [(alert.id, "rise")]
        assert client.alert_thumbnail(sid, received[0].event_id)[:3] == b"\xff\xd8\xff"
        assert [e.event_id for e in client.alert_events(sid, count=1)] == [received[0].event_id]
        assert client.delete_alert(sid, alert.id).id == alert.id
        assert client.alerts(sid) == []


# ------------------------------------------------------------------------------------ the CLI
def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_alerts_add_list_watch_rm(server, clip, capsys) -> None:
    url, service = server
    auth = ("--server", url, "--key", TOKEN)
    with BlockingClient(url, token=TOKEN) as client:
        sid = client.start_pull(str(clip), loop=True).id

    # `alerts watch` twice from the start: the console script (lines) and in-process (--json).
    watch = subprocess.Popen(
        [str(LIVELENS), "alerts", "watch", sid, *auth],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    raw = io.StringIO()
    codes: list[int] = []
    args = argparse.Namespace(server=url, token=TOKEN, session=sid, json=True)
    watcher = threading.Thread(target=lambda: codes.append(cmd_alerts_watch(args, raw)))
    watcher.start()
    try:
        wait_for(lambda: _watchers(service, sid) >= 2 or watch.poll() is not None, timeout=60)
        assert watch.poll() is None, watch.communicate()

        code, out, err = _run(capsys, "alerts", "add", sid, CONDITION, "--threshold", "0", *auth)
        assert code == 0, err
        [line_id, line_question] = out.splitlines()
        alert_id = line_id.removeprefix("alert: ")
        assert alert_id.startswith("al_") and "secret" not in out and err == ""
        assert line_question == f"question: Answer yes or no: is it true now that {CONDITION}?"
        code, out, err = _run(
            capsys, "alerts", "add", sid, "a blue box is visible", "--threshold", "1",
            "--every", "2", "--cooldown", "5", "--webhook", "http://127.0.0.1:9/hook", *auth,
        )  # fmt: skip
        assert code == 0, err
        never_id = out.splitlines()[0].removeprefix("alert: ")
        secret = out.splitlines()[2].removeprefix("secret: ")
        assert len(secret) >= 32 and "shown only once" in err

        # Refusals: exit status 2 and the server's message on one line.
        for argv, needle in [
            (["--webhook", "http://10.1.2.3/hook"], "(403 webhook_not_allowed)"),
            (["--every", "0"], "(422 invalid_request)"),
        ]:
            code, out, err = _run(capsys, "alerts", "add", sid, CONDITION, *argv, *auth)
            assert code == 2 and out == "", (argv, out)
            assert err.startswith("livelens: error: ") and err.count("\n") == 1, err
            assert needle in err, (argv, err)
        code, _, err = _run(capsys, "alerts", "list", sid, "--server", url, "--key", "wrong")
        assert code == 2 and "(401 unauthorized)" in err

        wait_for(lambda: service.alerts.get(sid, alert_id).events == 1, timeout=60)
        code, out, err = _run(capsys, "alerts", "list", sid, *auth)
        assert code == 0, err
        header, *rows = out.splitlines()
        assert header.split() == ["ID", "ACTIVE", "CONFIDENCE", "EVENTS", "CONDITION"]
        by_id = {row.split()[0]: row.split(None, 4) for row in rows}
        assert by_id[alert_id][1:4] == ["yes", by_id[alert_id][2], "1"]
        assert 0.0 <= float(by_id[alert_id][2]) <= 1.0 and by_id[alert_id][4] == CONDITION
        assert by_id[never_id][1] == "no" and by_id[never_id][3:] == ["0", "a blue box is visible"]
        code, out, _ = _run(capsys, "alerts", "list", sid, "--json", *auth)
        assert [a["id"] for a in json.loads(out)["alerts"]] == [alert_id, never_id]

        code, out, err = _run(capsys, "alerts", "rm", sid, never_id, *auth)
        assert (code, out) == (0, f"removed {never_id}: a blue box is visible\n"), err
        code, _, err = _run(capsys, "alerts", "rm", sid, never_id, *auth)
        assert code == 2 and "(404 unknown_alert)" in err

        # Ending the session makes the active alert fall; both watches print it and exit 0.
        with BlockingClient(url, token=TOKEN) as client:
            client.delete(sid)
        out, err = watch.communicate(timeout=30)
        watcher.join(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            watch.kill()
    assert watch.returncode == 0, err
    lines = out.splitlines()
    assert [line.split()[1] for line in lines] == ["rise", "fall"], out
    for line in lines:
        assert f'"{CONDITION}"  confidence 0.' in line or f'"{CONDITION}"  confidence 1.' in line
    rise, fall = (line.split("  ") for line in lines)
    assert rise[4].startswith("media ") and rise[4].endswith("s-")
    assert fall[4].startswith(rise[4]) and fall[4].endswith("s") and rise[5] == fall[5]

    assert codes == [0]
    messages = [json.loads(line) for line in raw.getvalue().splitlines()]
    assert [(m["type"], m["edge"], m["alert_id"]) for m in messages] == [
        ("alert", "rise", alert_id),
        ("alert", "fall", alert_id),
    ]
    assert messages[0]["event_id"] == rise[5] and messages[1]["ended"] >= messages[0]["started"]
    # The client's AlertEvent has every field the server sends (and no other but entry_id).
    fields = {f.name for f in dataclasses.fields(AlertEvent)}
    assert set(messages[0]) - {"type"} == fields - {"entry_id"}


def test_alert_fields_mirror_the_server() -> None:
    """Alert keeps its own dataclass (the client must not import the server) and drops unknown
    keys; a field the server adds or renames is caught here."""
    from livelens.stream.alerts import AlertState

    state = AlertState(
        id="al_1", session_id="s", condition="c", every=1.0, cooldown=10.0, threshold=0.5,
        hysteresis=0.1, webhook=None, secret="k", created="2026-12-01T00:00:00.000Z",
    )  # fmt: skip
    created = state.to_json() | {"secret": state.secret}  # as POST answers
    assert {f.name for f in dataclasses.fields(Alert)} == set(created)
    assert Alert.from_json(created | {"new_field": 1}).secret == "k"
