"""Offline ingest of a file: source -> sampler -> resize to the session grid."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from livelens.stream.errors import SourceError
from livelens.stream.frames import DecodedFrame
from livelens.stream.grid import (
    DEFAULT_TOKENS_PER_FRAME,
    MIN_TOKENS_PER_FRAME,
    Grid,
    choose_grid,
    resize_to_grid,
)
from livelens.stream.sampler import FpsSampler
from livelens.stream.sources.file import FileSource

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, float | None], None]
"""Called as on_progress(media_time, duration) while a file decodes; duration may be unknown."""

# Wall-clock seconds between progress calls: enough for a progress bar, cheap per frame.
_PROGRESS_INTERVAL = 0.1
_clock = time.monotonic


@dataclass(frozen=True)
class SampledFrame:
    """A kept frame, resized to the session grid."""

    index: int
    """Position among sampled frames: 0, 1, 2..."""
    time: float
    """Media seconds from the first frame of the source."""
    image: np.ndarray
    """uint8 RGB, shape (grid.height, grid.width, 3), C-contiguous."""


class SampledFrames(Iterator[SampledFrame]):
    """The sampled frames of one source; close() (or exhausting it) releases the file."""

    def __init__(
        self,
        source: FileSource,
        frames: Iterator[DecodedFrame],
        grid: Grid,
        sampler: FpsSampler,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.source = source
        self._frames = self._sample(frames, grid, sampler, on_progress)

    def __next__(self) -> SampledFrame:
        return next(self._frames)

    def close(self) -> None:
        self._frames.close()
        self.source.close()

    def __enter__(self) -> SampledFrames:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _sample(
        self,
        frames: Iterator[DecodedFrame],
        grid: Grid,
        sampler: FpsSampler,
        on_progress: ProgressCallback | None,
    ) -> Iterator[SampledFrame]:
        duration = self.source.duration
        index = 0
        last_report: float | None = None
        latest: float | None = None
        size_seen: tuple[int, int] | None = None
        try:
            for decoded in frames:
                latest = decoded.time
                if on_progress is not None:
                    now = _clock()
                    if last_report is None or now - last_report >= _PROGRESS_INTERVAL:
                        last_report = now
                        on_progress(decoded.time, duration)
                if not sampler.offer(decoded.time):
                    continue
                size = (decoded.frame.width, decoded.frame.height)
                if size_seen is not None and size != size_seen:
                    logger.info(
                        "%s changed frame size %sx%s -> %sx%s at %.3fs; still resized to %sx%s",
                        self.source.path,
                        *size_seen,
                        *size,
                        decoded.time,
                        grid.width,
                        grid.height,
                    )
                size_seen = size
                # Conversion and resizing only here, after sampling: most frames are never seen.
                yield SampledFrame(index, decoded.time, resize_to_grid(decoded.frame, grid))
                index += 1
            if on_progress is not None and latest is not None:
                on_progress(latest, duration)
            logger.info(
                "sampled %s frames of %s decoded from %s (%s)",
                index,
                self.source.stats.frames,
                self.source.path,
                self.source.stats,
            )
        finally:
            self.source.close()


def sample_file(
    path: str | Path,
    *,
    fps: float = 1.0,
    tokens_per_frame: int = DEFAULT_TOKENS_PER_FRAME,
    on_progress: ProgressCallback | None = None,
) -> tuple[Grid, SampledFrames]:
    """Open a media file and return its session grid and its sampled, resized frames.

    The first frame is decoded here, since the grid comes from its size; SourceError if the file
    cannot be opened or has no decodable video frame.
    """
    sampler = FpsSampler(fps)
    if (
        not isinstance(tokens_per_frame, int)
        or isinstance(tokens_per_frame, bool)
        or (tokens_per_frame < MIN_TOKENS_PER_FRAME)
    ):
        raise ValueError(
            f"tokens_per_frame must be an integer >= {MIN_TOKENS_PER_FRAME}, "
            f"got {tokens_per_frame!r}"
        )
    source = FileSource(path)
    try:
        frames = source.frames()
        first = next(frames)
        height, width = first.frame.height, first.frame.width
        try:
            grid = choose_grid(height, width, tokens_per_frame=tokens_per_frame)
        except ValueError as exc:
            raise SourceError(f"unsupported frame size {width}x{height} in {path}: {exc}") from None
    except BaseException:
        source.close()
        raise
    logger.info(
        "%s: %s %sx%s -> grid %sx%s (%s tokens/frame) at %s fps",
        path,
        source.codec_name,
        width,
        height,
        grid.width,
        grid.height,
        grid.tokens,
        fps,
    )
    return grid, SampledFrames(source, itertools.chain([first], frames), grid, sampler, on_progress)
