"""Errors the stream stages raise for problems a user can act on."""

from __future__ import annotations


class SourceError(Exception):
    """A video source cannot be opened or decoded; the message is one human-readable line.

    The CLI prints it as ``error: <message>`` and exits non-zero without a traceback.
    """


class UsageError(ValueError):
    """A command-line value is out of range; reported as one line (`livelens` exits 2)."""
