"""Secrets out of stored, returned and logged text: credentials in query strings and passwords
in URLs are masked.

`mask_url` masks one source URL before it is stored in a record, returned or logged.

Defense in depth: clients should send keys in headers and websocket tickets expire at once,
but an old script's `?token=` or a `redis://:password@host` URL must still never reach a log.
The filter goes on every handler (uvicorn's access and error logs included) once logging is
configured, and rewrites only the arguments that hold a secret.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

# `token=`, `ticket=`, `key=` (and spellings like access_token=, api_key=) in a query string.
_QUERY_SECRET = re.compile(
    r"(?i)([?&;](?:[a-z_]*token|ticket|[a-z_]*key|password|secret)=)[^&;#\s\"']*"
)
# The password of `scheme://user:password@host` (Redis, RTSP cameras, proxies).
_URL_PASSWORD = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@")


# A URL's own userinfo password, anchored at its start: written as a pattern rather than with
# urlsplit so that a URL too malformed to parse (one a client sent, about to be refused) is
# masked as well.
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/?#:@]*):[^/?#]*@")


def mask_url(url: str) -> str:
    """The URL with its password (rtsp://user:pass@camera/..., redis://:pass@host) as ***."""
    return _USERINFO.sub(rf"\g<head>:{MASK}@", url, count=1)


def redact(text: str) -> str:
    """`text` with query-string credentials and URL passwords replaced by ***."""
    text = _QUERY_SECRET.sub(rf"\g<1>{MASK}", text)
    return _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text)


def _clean(value: Any) -> Any:
    """A log argument with secrets masked; unchanged (same object) when it holds none."""
    if isinstance(value, int | float | bool) or value is None:
        return value
    text = value if isinstance(value, str) else str(value)
    masked = redact(text)
    return value if masked == text else masked


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message and arguments; never drops a record.

    The arguments are rewritten one by one rather than merged into the message, so formatters
    that read them by position (uvicorn's access log) keep working.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_clean(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _clean(v) for k, v in record.args.items()}
        return True


_FILTER = RedactingFilter()


def install() -> int:
    """Put the filter on every handler of every logger configured so far; returns how many got
    it. Call it after logging is configured (uvicorn configures its loggers in `run`)."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    for candidate in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(candidate, logging.Logger):
            loggers.append(candidate)
    added = 0
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
                added += 1
    return added
