"""The console's Alerts panel in Debian's Chromium (Playwright), against the real app and redis.

Uses test_console's app and browser: the console publishes Chromium's fake camera over WHIP,
adds an alert through the panel's form with threshold 0 (the tiny model has random weights, so
only a 0 threshold makes every evaluation "yes"), and sees the event arrive over the websocket
with its evidence thumbnail, a marker on the timeline, the fall when the session ends, and the
alert gone after Remove.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from test_console import (  # noqa: F401  (server and browser are fixtures)
    AUTH,
    TOKEN,
    _enter_token,
    _open,
    _screenshot,
    browser,
    needs_chromium,
    server,
    sync_api,
)

CONDITION = "a person waves at the camera"


@pytest.mark.slow
@needs_chromium
def test_alerts_panel_adds_shows_events_and_removes(server, browser, tmp_path: Path) -> None:  # noqa: F811
    url, _ = server
    expect = sync_api.expect
    context, page, errors = _open(browser, url)
    _enter_token(page, TOKEN)
    add = page.locator("#alert-add")
    expect(add).to_be_disabled()  # no session selected yet

    page.get_by_role("button", name="Publish camera").click()
    page.wait_for_function("() => document.body.dataset.session === 'selected'")
    sid = page.evaluate("new URLSearchParams(location.hash.slice(1)).get('session')")
    expect(page.locator("#ws-state")).to_have_attribute("data-state", "open")
    page.wait_for_function(
        "() => Number(document.getElementById('stats').dataset.streamPosition) >= 1.0",
        timeout=60_000,
    )
    expect(page.locator("#alerts-empty")).to_be_visible()

    # A refusal is shown next to the form, with the server's status and code.
    page.get_by_label("Alert me when").fill("   ")
    add.click()
    error = page.locator("#alert-error")
    expect(error).to_have_text("the condition is empty (422 empty_condition)")
    expect(page.get_by_label("Alert me when")).to_have_attribute("aria-invalid", "true")

    # Threshold 0: the first evaluation rises.
    page.get_by_label("Alert me when").fill(CONDITION)
    page.get_by_label("Every").fill("0.5")
    page.get_by_label("Threshold").fill("0")
    add.click()
    item = page.locator("#alert-list .alert-item")
    expect(item).to_have_count(1)
    expect(error).to_be_hidden()
    expect(item.locator(".alert-condition")).to_have_text(CONDITION)
    [alert] = httpx.get(f"{url}/v1/sessions/{sid}/alerts", headers=AUTH).json()["alerts"]
    assert (alert["condition"], alert["threshold"], alert["every"]) == (CONDITION, 0.0, 0.5)
    assert alert["cooldown"] == 10.0
    expect(item).to_have_attribute("data-alert", alert["id"])
    expect(page.get_by_label("Alert me when")).to_have_value("")

    # The rise arrives over the websocket, with its thumbnail fetched with the key.
    rise = page.locator("#alert-feed .alert-event[data-edge='rise']")
    expect(rise).to_have_count(1, timeout=60_000)
    event_id = rise.get_attribute("data-event")
    page.wait_for_function(
        """() => {
          const img = document.querySelector("#alert-feed .alert-event[data-edge='rise'] img");
          return img && img.complete && img.naturalWidth > 0 && img.src.startsWith('blob:');
        }"""
    )
    expect(rise.locator(".alert-condition")).to_have_text(CONDITION)
    marker = page.locator(f'#lane-alerts .alert-marker[data-event="{event_id}"]')
    expect(marker).to_have_count(1)
    [stored] = httpx.get(f"{url}/v1/sessions/{sid}/alert-events", headers=AUTH).json()["events"]
    assert (stored["event_id"], stored["edge"]) == (event_id, "rise")
    expect(marker).to_have_attribute("data-started", str(stored["started"]).removesuffix(".0"))
    assert marker.get_attribute("data-ended") is None
    # The list catches up (refreshed on the event): active, one event.
    expect(item.locator(".badge-alert")).to_have_text("active")
    expect(item.locator(".alert-facts")).to_contain_text("1 event ")

    # The clip, fetched with the key, plays inline.
    rise.get_by_role("button", name="Play clip").click()
    expect(rise.locator("video")).to_have_attribute("src", re.compile(r"^blob:"))
    _screenshot(page, tmp_path, "alerts")

    # The session ends: the active alert falls; the marker spans rise to fall.
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#stat-state")).to_have_text("ended")
    fall = page.locator("#alert-feed .alert-event[data-edge='fall']")
    expect(fall).to_have_count(1)
    expect(fall).to_have_attribute("data-event", event_id)
    expect(page.locator("#alert-feed .alert-event").first).to_have_attribute("data-edge", "fall")
    ended = float(marker.get_attribute("data-ended"))
    assert ended >= stored["started"]

    # Remove: gone from the panel and from the server.
    item.get_by_role("button", name=f"Remove alert: {CONDITION}").click()
    expect(item).to_have_count(0)
    expect(page.locator("#alerts-empty")).to_be_visible()
    assert httpx.get(f"{url}/v1/sessions/{sid}/alerts", headers=AUTH).json()["alerts"] == []
    assert errors == []
    context.close()
