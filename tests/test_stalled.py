"""A source that stops sending frames is visibly `stalled`, with a lag that grows by the wall
clock, and `live` again with its next frame: a real aiortc publisher over WHIP to a real server.

Before, a frozen feed looked healthy ("live, lag 0.25 s") until the publisher's session ended.
"""

from __future__ import annotations

import asyncio
import time
from fractions import Fraction

import av
import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, VideoStreamTrack
from browser import serve
from service_harness import fast_config, publish_offer

from livelens.model.runner import ModelRunner
from livelens.stream.app import create_app
from livelens.stream.service import LiveService
from livelens.stream.whip import WhipSettings

STALL_AFTER = 0.8


class PausableTrack(VideoStreamTrack):
    """Gray 320x240 frames at 15 fps while `sending` is set; silence (but a live connection:
    RTCP keeps flowing) while it is clear."""

    def __init__(self) -> None:
        super().__init__()
        self.sending = asyncio.Event()
        self.sending.set()
        self.sent = 0

    async def recv(self) -> av.VideoFrame:
        await self.sending.wait()
        await asyncio.sleep(1 / 15)
        frame = av.VideoFrame.from_ndarray(np.full((240, 320, 3), 90, np.uint8), "rgb24")
        frame.pts, frame.time_base = round(time.monotonic() * 15), Fraction(1, 15)
        self.sent += 1
        return frame


async def _until(get, predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {value}")
        await asyncio.sleep(0.1)


def test_a_silent_publisher_is_stalled_then_live_again(tiny_model) -> None:
    config = fast_config(None, stall_after_s=STALL_AFTER)
    service = LiveService(ModelRunner(tiny_model), config)
    # A grace long enough that the silence below is a stall, not a disconnect.
    app = create_app(service, whip=WhipSettings(allow_loopback=True, disconnect_grace=30.0))

    async def scenario(url: str) -> dict[str, list]:
        seen: dict[str, list] = {}
        track = PausableTrack()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver(track, direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        async with httpx.AsyncClient(timeout=10) as http:
            session = f"{url}/v1/sessions/{await publish_offer(http, url, pc)}"

            async def record() -> dict:
                return (await http.get(session)).json()

            try:
                live = await _until(
                    record,
                    lambda r: r["state"] == "live" and r["stats"].get("stream_position"),
                    30,
                    "live with frames in the model",
                )
                seen["live"] = [live["reason"], live["stats"]["lag"]]
                track.sending.clear()
                stalled = await _until(record, lambda r: r["state"] == "stalled", 10, "stalled")
                await asyncio.sleep(1.5)
                later = await record()
                seen["stalled"] = [stalled["reason"], stalled["stats"]["lag"]]
                seen["later"] = [later["state"], later["stats"]["lag"]]
                track.sending.set()
                back = await _until(record, lambda r: r["state"] == "live", 10, "live again")
                seen["back"] = [back["reason"]]
            finally:
                await pc.close()
        return seen

    with serve(app) as url:
        seen = asyncio.run(scenario(url))
    assert seen["live"][0] is None and seen["live"][1] < STALL_AFTER + 1.0
    reason, lag = seen["stalled"]
    assert reason == f"no frames from the source for {STALL_AFTER:g} s"
    assert lag >= STALL_AFTER
    state, later_lag = seen["later"]
    # The lag follows the wall clock while nothing arrives (1.5 s later, ~1.5 s more).
    assert state == "stalled" and later_lag >= lag + 1.0
    assert seen["back"] == [None]
