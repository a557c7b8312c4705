"""Keep frames by media timestamp at a target rate (frames per second of media time)."""

from __future__ import annotations

import math

# Media times come from integer pts times a rational time base; a slot boundary computed as k/fps
# can differ from them by float rounding, so a frame this close to its slot counts as on time.
_SLOT_EPSILON = 1e-6


class FpsSampler:
    """Keep the first frame at or after each slot k/fps, slots counted from the first frame.

    Slots are anchored to the first frame, so sampling never drifts; a slot gets at most one frame,
    and slots with no frames in them (gaps, sources slower than fps) are skipped, not made up for.
    """

    def __init__(self, fps: float = 1.0) -> None:
        if not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be positive and finite, got {fps!r}")
        self.fps = float(fps)
        self._start: float | None = None
        self._next_slot = 0

    def offer(self, t: float) -> bool:
        """Return True if the frame at media time t (seconds) is kept."""
        if not math.isfinite(t):
            raise ValueError(f"frame time must be finite, got {t!r}")
        if self._start is None:
            self._start = t
        slot = math.floor((t - self._start) * self.fps + _SLOT_EPSILON)
        if slot < self._next_slot:
            return False
        self._next_slot = slot + 1
        return True
