"""The browser console at `/`, driven in Debian's Chromium by Playwright, against the real app.

The app runs the tiny model (steered to answer "The person waves from 0.5 to 1.5 seconds.", so
the answer has a segment), a real redis-server and WHIP with loopback ICE. Chromium's fake camera
plays a generated y4m; the console publishes it, asks, streams the answer, puts its segment on the
timeline, shows the thumbnails kept in it, and after a reload shows the history from Redis.
Screenshots go to tmp_path; with LIVELENS_SCREENSHOTS=1 the main one also goes to
docs/screenshots/console.png (the README's picture).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import CHROMIUM, chromium_available, serve
from media_servers import RtspServer
from service_harness import SteeredRunner, fast_config
from videos import make_video
from y4m import write_y4m

from livelens.stream.app import create_app
from livelens.stream.auth import KeyRing, entry, parse_scopes
from livelens.stream.service import LiveService
from livelens.stream.whip import WhipSettings

sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright's Python package")

TOKEN = "console-token"
VIEWER_KEY = "console-viewer-key"
"""A key with the read scope only (from a keys file beside the admin TOKEN)."""
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STEERED = "The person waves from 0.5 to 1.5 seconds."
QUESTION = "When does the person wave?"
VIEWPORT = {"width": 1366, "height": 768}
SCREENSHOTS = Path(__file__).parent.parent / "docs" / "screenshots"

needs_chromium = pytest.mark.skipif(
    not chromium_available(), reason=f"needs Debian's chromium at {CHROMIUM}"
)


@pytest.fixture
def server(tiny_model, redis_server, tmp_path) -> Iterator[tuple[str, LiveService]]:
    service = LiveService(SteeredRunner(tiny_model, STEERED), fast_config(redis_server.url))
    keys_file = tmp_path / "keys"
    keys_file.write_text(entry("viewer", parse_scopes("read"), VIEWER_KEY) + "\n")
    keys = KeyRing.from_token(TOKEN, keys_file)
    app = create_app(service, keys=keys, whip=WhipSettings(allow_loopback=True))
    with serve(app) as url:
        yield url, service


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Chromium with a fake camera playing a generated y4m (frame counter drawn in blocks)."""
    y4m = write_y4m(tmp_path / "camera.y4m", frames=60, width=640, height=480, fps=30)
    playwright = sync_api.sync_playwright().start()
    try:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,  # Debian's; never `playwright install`
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                f"--use-file-for-fake-video-capture={y4m}",
                "--allow-loopback-in-peer-connection",
            ],
        )
        try:
            yield launched
        finally:
            launched.close()
    finally:
        playwright.stop()


def _open(browser: Any, url: str) -> tuple[Any, Any, list[str]]:
    """A fresh profile and page on the console; returns (context, page, page errors)."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(30_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    return context, page, errors


def _screenshot(page: Any, tmp_path: Path, name: str, *, publish: bool = False) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    if publish and os.environ.get("LIVELENS_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / "console.png")


def _enter_token(page: Any, token: str) -> None:
    page.get_by_label("API key").fill(token)
    page.get_by_role("button", name="Save", exact=True).click()


def _frames_loaded(page: Any) -> list[dict]:
    """The thumbnails in the strip once every <img> has decoded: time, caption, natural size."""
    page.wait_for_function(
        """() => {
          const imgs = [...document.querySelectorAll('#frame-strip img')];
          return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }"""
    )
    return page.locator("#frame-strip figure").evaluate_all(
        """figures => figures.map(f => ({
          time: Number(f.dataset.time),
          caption: f.querySelector('figcaption').textContent,
          width: f.querySelector('img').naturalWidth,
          height: f.querySelector('img').naturalHeight,
        }))"""
    )


@pytest.mark.slow
@needs_chromium
def test_publish_ask_timeline_thumbnails_history(server, browser, redis_server, tmp_path) -> None:
    url, service = server
    expect = sync_api.expect
    context, page, errors = _open(browser, url)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    assert page.title() == "LiveLens console"
    _enter_token(page, TOKEN)

    # Publish the fake camera over WHIP: the preview plays and the new session is selected.
    page.get_by_role("button", name="Publish camera").click()
    page.wait_for_function(
        "() => { const v = document.getElementById('preview');"
        " return v.readyState >= 2 && v.videoWidth === 640 && !v.paused; }"
    )
    page.wait_for_function("() => document.body.dataset.session === 'selected'")
    sid = page.evaluate("new URLSearchParams(location.hash.slice(1)).get('session')")
    assert sid in service.sessions and service.sessions[sid].kind == "whip"
    expect(page.locator(f'#session-list [data-session="{sid}"]')).to_have_attribute(
        "aria-current", "true"
    )
    expect(page.locator("#ws-state")).to_have_attribute("data-state", "open")
    # The websocket URL carries a single-use ticket, never the key (access logs keep URLs).
    assert sockets and all("?ticket=" in u and TOKEN not in u for u in sockets), sockets
    # Status messages fill the stats; wait until the model has seen past the answer's segment.
    page.wait_for_function(
        "() => Number(document.getElementById('stats').dataset.streamPosition) >= 2.0",
        timeout=60_000,
    )
    expect(page.locator("#stat-state")).to_have_text("live")
    assert int(page.locator("#stat-frames-in-model").inner_text().replace(",", "")) >= 5
    # What the model holds: its window, on the stats and as the timeline's model bar.
    expect(page.locator("#stat-window")).to_have_text(re.compile(r"^0\.0 s – \d+\.\d s$"))
    assert page.locator("#lane-model").get_attribute("data-window-start") == "0"
    assert page.locator("#stat-kept-ratio").inner_text().endswith("%")
    expect(page.locator("#publish-status")).to_have_attribute("data-state", "live")
    _screenshot(page, tmp_path, "1-published")

    # Ask: tokens stream into the card (its text grows through prefixes), then the final answer.
    page.evaluate(
        """() => {
          const text = document.getElementById('answer-text');
          window.answerSnapshots = [];
          new MutationObserver(() => window.answerSnapshots.push(text.textContent))
            .observe(text, {childList: true, characterData: true, subtree: true});
        }"""
    )
    page.get_by_label("Question about the video so far").fill(QUESTION)
    page.get_by_role("button", name="Ask", exact=True).click()
    card = page.locator("#answer-card")
    expect(card).to_have_attribute("data-state", "done", timeout=60_000)
    assert page.locator("#answer-text").inner_text() == STEERED
    assert page.locator("#answer-question").inner_text() == QUESTION
    assert int(card.get_attribute("data-tokens")) > 1
    partial = [s for s in page.evaluate("window.answerSnapshots") if s and s != STEERED]
    assert len(partial) >= 2 and all(STEERED.startswith(s) for s in partial), partial
    assert len(set(partial)) == len(partial)  # each snapshot longer than the one before

    # The answer's segment is on the timeline, highlighted as the latest answer's.
    segment = page.locator("#lane-latest button.segment")
    expect(segment).to_have_count(1)
    expect(segment).to_have_attribute("aria-label", "segment 0.5 to 1.5 s")
    expect(segment).to_have_attribute("data-latest", "true")
    expect(page.locator("#lane-earlier button.segment")).to_have_count(0)

    # Clicking it shows the thumbnails the server kept inside 0.5-1.5 s (2 fps: 0.5, 1.0, 1.5).
    segment.click()
    expect(segment).to_have_attribute("aria-pressed", "true")
    frames = _frames_loaded(page)
    listed = httpx.get(
        f"{url}/v1/sessions/{sid}/thumbnails", params={"start": 0.5, "end": 1.5}, headers=AUTH
    ).json()["thumbnails"]
    assert [f["time"] for f in frames] == [t["time"] for t in listed]
    assert [(f["width"], f["height"]) for f in frames] == [
        (t["width"], t["height"]) for t in listed
    ]
    assert frames and all(0.5 <= f["time"] <= 1.5 for f in frames)
    assert all(f["caption"].startswith(f"{f['time']:.2f} s") for f in frames)
    expect(page.locator("#frames-title")).to_have_text("Frames 0.5 to 1.5 s")
    # Laptop screen: nothing wider than the viewport.
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    _screenshot(page, tmp_path, "2-segment-frames", publish=True)

    # A reload (another tab: this one keeps publishing) gets token, session and history back.
    assert [h["text"] for h in redis_server.history(sid)] == [STEERED]
    other = context.new_page()
    other.goto(f"{url}/#session={sid}")
    item = other.locator("#history .history-item")
    expect(item).to_have_count(1)
    expect(item.locator(".history-q")).to_have_text(QUESTION)
    expect(item.locator(".history-a")).to_have_text(STEERED)
    expect(other.locator("#lane-latest button.segment")).to_have_attribute(
        "aria-label", "segment 0.5 to 1.5 s"
    )
    expect(other.locator("#ws-state")).to_have_attribute("data-state", "open")
    _screenshot(other, tmp_path, "3-reloaded-history")

    # Stop: WHIP DELETE ends the session; both tabs see it through their status messages.
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#publish-status")).to_have_text("Stopped.")
    expect(page.locator("#stat-state")).to_have_text("ended")
    expect(other.locator("#stat-state")).to_have_text("ended")
    record = httpx.get(f"{url}/v1/sessions/{sid}", headers=AUTH).json()
    assert record["state"] == "ended" and "DELETE" in record["reason"]
    page.reload()
    expect(page.locator("#history .history-item .history-a")).to_have_text(STEERED)
    expect(page.locator("#stat-state")).to_have_text("ended")
    _screenshot(page, tmp_path, "4-ended")
    assert errors == []
    context.close()


@pytest.mark.slow
@needs_chromium
def test_wrong_token_and_unknown_session_are_explained(server, browser, tmp_path) -> None:
    url, _ = server
    expect = sync_api.expect
    context, page, errors = _open(browser, url)

    # No token at all: the session list answers 401 and the page asks for the token.
    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("401")
    _enter_token(page, "not-the-token")
    expect(notice).to_contain_text("refused the API key")
    expect(page.get_by_label("API key")).to_have_attribute("aria-invalid", "true")
    _screenshot(page, tmp_path, "wrong-token")

    # A read-only key lists sessions but may not pull a source: the scope is named.
    _enter_token(page, VIEWER_KEY)
    expect(notice).to_be_hidden()
    page.get_by_label("Pull a stream (RTSP, HLS, file)").fill("rtsp://camera.invalid/s")
    page.get_by_role("button", name="Start", exact=True).click()
    lacks = "this key lacks the admin scope (key 'viewer' has: read)"
    expect(page.locator("#pull-status")).to_contain_text(f"{lacks} (forbidden_scope)")
    expect(notice).to_contain_text(f"This API key may not do that: {lacks}")
    _screenshot(page, tmp_path, "read-only-key")

    # The right token clears it; an unknown session in the link is named as unknown.
    _enter_token(page, TOKEN)
    expect(notice).to_be_hidden()
    missing = uuid.uuid4().hex
    page.goto(f"{url}/#session={missing}")
    page.reload()  # a fresh load from the link, with the saved token
    expect(notice).to_contain_text(f'Session "{missing}" was not found')
    expect(page.locator("#current-session")).to_have_text("No session selected")
    expect(page.locator("#ws-state")).to_have_attribute("data-state", "idle")
    expect(page.get_by_role("button", name="Ask", exact=True)).to_be_disabled()
    _screenshot(page, tmp_path, "unknown-session")

    # Every form control has a label (accessible name from <label> or aria-label).
    unlabeled = page.evaluate(
        """() => [...document.querySelectorAll('input, textarea, select')]
             .filter(c => c.labels.length === 0 && !c.getAttribute('aria-label'))
             .map(c => c.id)"""
    )
    assert unlabeled == []
    assert errors == []
    context.close()


def test_console_assets_are_served_without_external_urls(server) -> None:
    url, _ = server
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("/console/console.js", "/console/console.css"):
        assert f'"{asset}"' in page.text
        served = httpx.get(url + asset)
        assert served.status_code == 200, asset
        assert "http://" not in served.text and "https://" not in served.text, asset
    assert "http://" not in page.text and "https://" not in page.text


@pytest.mark.slow
@needs_chromium
def test_pull_an_rtsp_camera_from_the_console_and_ask(server, browser, tmp_path) -> None:
    """The pull form starts an RTSP session (GStreamer's RTSP server); the console picks it."""
    url, service = server
    expect = sync_api.expect
    clip = make_video(tmp_path / "camera.mp4", frames=90, fps=15, width=320, height=240)
    camera = RtspServer(clip.path)
    try:
        context, page, errors = _open(browser, url)
        _enter_token(page, TOKEN)
        page.get_by_label("Pull a stream (RTSP, HLS, file)").fill(camera.url)
        page.get_by_role("button", name="Start", exact=True).click()
        page.wait_for_function("() => document.body.dataset.session === 'selected'")
        sid = page.evaluate("new URLSearchParams(location.hash.slice(1)).get('session')")
        assert service.sessions[sid].kind == "pull" and service.sessions[sid].source == camera.url
        expect(page.locator(f'#session-list [data-session="{sid}"]')).to_have_attribute(
            "aria-current", "true"
        )
        page.wait_for_function(
            "() => Number(document.getElementById('stats').dataset.streamPosition) >= 2.0",
            timeout=60_000,
        )
        page.get_by_label("Question about the video so far").fill(QUESTION)
        page.get_by_role("button", name="Ask", exact=True).click()
        expect(page.locator("#answer-card")).to_have_attribute("data-state", "done", timeout=60_000)
        assert page.locator("#answer-text").inner_text() == STEERED
        segment = page.get_by_role("button", name="segment 0.5 to 1.5 s").first
        segment.click()
        frames = _frames_loaded(page)
        assert frames and all(0.5 <= f["time"] <= 1.5 for f in frames)
        _screenshot(page, tmp_path, "rtsp-session")
        assert not errors, errors
        context.close()
    finally:
        camera.stop()
