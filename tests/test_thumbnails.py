"""The per-session JPEG thumbnail ring and its REST endpoints.

The clip draws its frame number into each picture, so a thumbnail proves which frame it is: the
number read back from the decoded JPEG must be the frame at the thumbnail's media time.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from service_harness import fast_config, running_app, wait_for
from videos import index_pattern, make_video, read_index

from livelens.model.runner import ModelRunner
from livelens.stream.thumbnails import ThumbnailRing, encode_thumbnail

TOKEN = "thumb-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _decode(jpeg: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG"
    return np.asarray(image.convert("RGB"))


# ------------------------------------------------------------------------------------- the ring
def test_encode_shrinks_to_max_side_and_keeps_the_picture() -> None:
    frame = index_pattern(1234, 640, 360)
    jpeg, width, height = encode_thumbnail(frame, max_side=320)
    assert (width, height) == (320, 180)
    decoded = _decode(jpeg)
    assert decoded.shape == (180, 320, 3)
    assert read_index(decoded) == 1234
    small = index_pattern(7, 96, 64)
    _, width, height = encode_thumbnail(small, max_side=320)
    assert (width, height) == (96, 64)  # never enlarged


def test_ring_keeps_the_newest_and_finds_by_time() -> None:
    ring = ThumbnailRing(capacity=3, max_side=64)
    for i in range(5):
        ring.add(i * 0.5, index_pattern(i, 96, 64))
    assert [t.time for t in ring.items()] == [1.0, 1.5, 2.0]
    assert len(ring) == 3
    assert [t.time for t in ring.between(1.2, 2.0)] == [1.5, 2.0]
    assert ring.between(5, 6) == []
    nearest = ring.nearest(1.6)
    assert nearest is not None and nearest.time == 1.5
    assert ring.nearest(1.75).time == 1.5  # a tie goes to the earlier frame
    assert ring.nearest(-10).time == 1.0 and ring.nearest(99).time == 2.0
    assert read_index(_decode(ring.nearest(2.0).jpeg)) == 4


def test_ring_ignores_times_going_back_and_checks_its_bounds() -> None:
    ring = ThumbnailRing(capacity=4, max_side=64)
    assert ring.nearest(0) is None
    assert ring.add(1.0, index_pattern(1, 64, 64)) is not None
    assert ring.add(0.5, index_pattern(2, 64, 64)) is None
    assert [t.time for t in ring.items()] == [1.0]
    with pytest.raises(ValueError, match="capacity"):
        ThumbnailRing(capacity=0)
    with pytest.raises(ValueError, match="max_side"):
        ThumbnailRing(capacity=1, max_side=8)


# ------------------------------------------------------------------------------------ over REST
@pytest.fixture
def clip(tmp_path):
    """3 s at 10 fps of numbered frames: sampled at 2 fps -> frames 0, 5, 10, ... at 0, 0.5, ..."""
    return make_video(tmp_path / "numbered.mp4", frames=30, fps=10, width=320, height=240)


def test_thumbnails_over_rest(tiny_model, clip, redis_server) -> None:
    config = fast_config(redis_server.url, media_root=clip.path.parent, thumbnails=4)
    with running_app(ModelRunner(tiny_model), config, token=TOKEN) as (client, service):
        body = client.post(
            "/v1/sessions", json={"source": str(clip.path), "realtime": False}, headers=AUTH
        ).json()
        sid = body["id"]
        session = service.sessions[sid]
        # The sixth frame is counted as sampled before its thumbnail is made.
        wait_for(lambda: [t.time for t in session.thumbnails.items()][-1:] == [2.5])
        assert session.stage.converted == 0  # a pull thread converts its own frames

        listing = client.get(f"/v1/sessions/{sid}/thumbnails", headers=AUTH)
        assert listing.status_code == 200, listing.text
        listed = listing.json()
        assert listed["capacity"] == 4
        # The ring holds the newest four sampled frames.
        assert [t["time"] for t in listed["thumbnails"]] == [1.0, 1.5, 2.0, 2.5]
        first = listed["thumbnails"][0]
        # Made from the frame as the model sees it (the session grid; under 320 px here).
        assert (first["width"], first["height"]) == (session.grid.width, session.grid.height)
        assert first["wall_time"].endswith("Z")

        for entry in listed["thumbnails"]:
            image = client.get(entry["url"], headers=AUTH)
            assert image.status_code == 200
            assert image.headers["content-type"] == "image/jpeg"
            assert float(image.headers["x-livelens-time"]) == entry["time"]
            # The picture is the frame at that media time: 10 fps -> frame number = 10 t.
            assert read_index(_decode(image.content)) == round(entry["time"] * 10)

        window = client.get(
            f"/v1/sessions/{sid}/thumbnails", params={"start": 1.2, "end": 2.0}, headers=AUTH
        ).json()
        assert [t["time"] for t in window["thumbnails"]] == [1.5, 2.0]

        nearest = client.get(f"/v1/sessions/{sid}/thumbnail", params={"at": 0.1}, headers=AUTH)
        assert nearest.headers["x-livelens-time"] == "1.000"  # older frames left the ring

        # Errors: no token, a malformed time, an unknown session, a deleted session.
        assert client.get(f"/v1/sessions/{sid}/thumbnails").status_code == 401
        bad = client.get(f"/v1/sessions/{sid}/thumbnail", params={"at": "soon"}, headers=AUTH)
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
        missing = client.get("/v1/sessions/" + "0" * 32 + "/thumbnails", headers=AUTH)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "unknown_session"
        assert client.delete(f"/v1/sessions/{sid}", headers=AUTH).status_code == 200
        gone = client.get(f"/v1/sessions/{sid}/thumbnail", params={"at": 1}, headers=AUTH)
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "session_deleted"
        again = client.delete(f"/v1/sessions/{sid}", headers=AUTH)
        assert again.status_code == 410


def test_session_without_frames_has_no_thumbnail(tiny_model) -> None:
    with running_app(ModelRunner(tiny_model), fast_config(None)) as (client, service):
        # A session whose publisher has sent nothing yet.
        session = client.portal.call(service.open_session, "whip", "test publisher")
        assert client.get(f"/v1/sessions/{session.id}/thumbnails").json()["thumbnails"] == []
        none = client.get(f"/v1/sessions/{session.id}/thumbnail", params={"at": 0})
        assert none.status_code == 404 and none.json()["error"]["code"] == "no_thumbnail"
