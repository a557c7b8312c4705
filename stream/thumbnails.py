"""A bounded ring of small JPEG thumbnails of a session's sampled frames.

The console shows the frames at an answer's segments; keeping every sampled frame as RGB would
cost ~200 KB each, so each one is shrunk and JPEG-encoded once, when it is sampled (a few KB,
about a millisecond on one core), and the oldest fall out when the ring is full.
"""

from __future__ import annotations

import bisect
import io
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

DEFAULT_CAPACITY = 300
"""Thumbnails kept per session: five minutes at the default 1 fps sampling."""
DEFAULT_MAX_SIDE = 320
"""Longer side of a thumbnail in pixels."""
JPEG_QUALITY = 75


@dataclass(frozen=True)
class Thumbnail:
    time: float
    """Media seconds of the sampled frame."""
    jpeg: bytes
    width: int
    height: int


def encode_thumbnail(rgb: np.ndarray, max_side: int = DEFAULT_MAX_SIDE) -> tuple[bytes, int, int]:
    """RGB uint8 (H, W, 3) -> (JPEG bytes, width, height), shrunk to fit max_side."""
    image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), image.width, image.height


class ThumbnailRing:
    """The newest `capacity` thumbnails in media-time order; thread-safe."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, max_side: int = DEFAULT_MAX_SIDE) -> None:
        if capacity < 1 or max_side < 16:
            raise ValueError(f"need capacity >= 1 and max_side >= 16, got {capacity}, {max_side}")
        self.capacity = capacity
        self.max_side = max_side
        self._items: deque[Thumbnail] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, time: float, rgb: np.ndarray) -> Thumbnail | None:
        """Encode and keep one sampled frame; a time before the newest one is ignored (None)."""
        with self._lock:
            if self._items and time < self._items[-1].time:
                return None
        jpeg, width, height = encode_thumbnail(rgb, self.max_side)
        thumbnail = Thumbnail(time, jpeg, width, height)
        with self._lock:
            self._items.append(thumbnail)
        return thumbnail

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[Thumbnail]:
        with self._lock:
            return list(self._items)

    def between(self, start: float, end: float) -> list[Thumbnail]:
        """Thumbnails with start <= time <= end, oldest first."""
        return [t for t in self.items() if start <= t.time <= end]

    def nearest(self, time: float) -> Thumbnail | None:
        """The thumbnail closest in media time (the earlier one on a tie); None when empty."""
        items = self.items()
        if not items:
            return None
        times = [t.time for t in items]
        i = bisect.bisect_left(times, time)
        candidates = items[max(0, i - 1) : i + 1]
        return min(candidates, key=lambda t: abs(t.time - time))
