"""Errors the stream stages raise for problems a user can act on."""

from __future__ import annotations


class SourceError(Exception):
    """A video source cannot be opened or decoded; the message is one human-readable line.

    The CLI prints it as ``error: <message>`` and exits non-zero without a traceback.
    """


class ServiceError(Exception):
    """A request the service refuses, over HTTP or the websocket: `status` is the HTTP status to
    answer with, `code` the stable machine-readable reason, `message` one line for people.

    The one error type of the API layers (sessions, alerts, WHIP's `WhipError` is one); the app
    answers each with `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class UsageError(ValueError):
    """A command-line value is out of range; reported as one line (`livelens` exits 2)."""
