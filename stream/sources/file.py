"""Decode every video frame of a local media file, with media times starting at 0.

The offline reader behind `livelens ask` (stream/ingest.py): the file is opened and checked
here, with errors that name the problem, and decoded by the same Decoder (sources/decode.py)
that a pulled file or stream runs through, so a file reads the same offline and live.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import av

from livelens.stream.errors import SourceError
from livelens.stream.frames import DecodedFrame, SourceStats
from livelens.stream.sources.decode import Decoder, Warnings, ffmpeg_reason, video_stream

logger = logging.getLogger(__name__)


class FileSource:
    """A media file's first video stream; open it, then iterate frames() once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._check_file()
        try:
            self._container = av.open(str(self.path), metadata_errors="replace")
        except av.error.InvalidDataError:
            raise SourceError(f"not a media file FFmpeg can read: {self.path}") from None
        except av.error.EOFError:
            raise SourceError(
                f"file ends before its header does (truncated?): {self.path}"
            ) from None
        except PermissionError:
            raise SourceError(f"permission denied: {self.path}") from None
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {self.path}: {ffmpeg_reason(exc)}") from None
        try:
            self._stream = video_stream(self._container, str(self.path))
        except SourceError:
            self._container.close()
            raise
        ctx = self._stream.codec_context
        self.codec_name: str = ctx.name
        self.width: int = ctx.width
        self.height: int = ctx.height
        self.duration: float | None = self._duration()
        self.stats = SourceStats()
        self._started = False
        self._closed = False

    def frames(self) -> Iterator[DecodedFrame]:
        """Decode every frame in order, skipping damaged packets; raise SourceError if none decode.

        Inter-frame codecs need every frame decoded even when few are sampled.
        """
        if self._started:
            raise RuntimeError("FileSource.frames() can be iterated only once")
        self._started = True
        decoder = Decoder(
            self._container, self._stream, self.stats, Warnings(logger, str(self.path))
        )
        for decoded in decoder.frames():
            self.stats.frames += 1
            yield decoded
        if self.stats.frames == 0:
            raise SourceError(
                f"no video frame could be decoded from {self.path} ({self.stats.problems()})"
            )
        logger.debug("decoded %s: %s", self.path, self.stats)

    def close(self) -> None:
        """Release the file; safe to call more than once."""
        if not self._closed:
            self._closed = True
            self._container.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_file(self) -> None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            raise SourceError(f"file not found: {self.path}") from None
        except PermissionError:
            raise SourceError(f"permission denied: {self.path}") from None
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {ffmpeg_reason(exc)}") from None
        if stat.S_ISDIR(info.st_mode):
            raise SourceError(f"is a directory, not a media file: {self.path}")
        # Only regular files: a pipe or device reports size 0 and may still stream media.
        if stat.S_ISREG(info.st_mode) and info.st_size == 0:
            raise SourceError(f"empty file (0 bytes): {self.path}")

    def _duration(self) -> float | None:
        if self._stream.duration is not None and self._stream.time_base is not None:
            return float(self._stream.duration * self._stream.time_base)
        if self._container.duration is not None:
            return self._container.duration / av.time_base
        return None
