"""A session's lifecycle as clients see it: state names and why a session ended, as codes.

Dependency-free so that clients (clients/) share it with the server: the REST record, the Redis
hash and the websocket status carry `state` and, once a session is over, `end_code` beside the
human `reason`. Code that decides something (a publisher that stops or republishes) reads the
code, never the English reason.
"""

from __future__ import annotations

from enum import StrEnum

LIVE_STATES = frozenset({"starting", "live", "stalled", "full"})
"""States a node heartbeats: the session goes on."""
FINAL_STATES = frozenset({"ended", "failed"})
"""Terminal states, never left again."""


class EndCode(StrEnum):
    """Why a session is over (`end_code`); `reason` says it for people."""

    SOURCE_ENDED = "source_ended"
    """A pull source reached its end (a file, an HLS playlist that ended)."""
    SOURCE_FAILED = "source_failed"
    """A pull source could not be read any more (the server log has the details)."""
    PUBLISHER_DELETED = "publisher_deleted"
    """The WHIP publisher sent DELETE: it stopped on purpose."""
    PUBLISHER_GONE = "publisher_gone"
    """The WHIP publisher went away: its track ended, it closed DTLS, ICE failed, or no media
    arrived for the disconnect grace."""
    DELETED = "deleted"
    """`DELETE /v1/sessions/{id}`."""
    SERVER_SHUTDOWN = "server_shutdown"
    UNSUPPORTED_VIDEO = "unsupported_video"
    """The video's frames cannot be processed (for instance a frame size below the grid)."""
    DUPLICATE_SESSION = "duplicate_session"


DELIBERATE_ENDS = frozenset({EndCode.PUBLISHER_DELETED, EndCode.DELETED})
"""Ends a publisher must not undo by publishing again."""
