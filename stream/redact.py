"""Masking secrets in URLs before they are stored, returned or logged."""

from __future__ import annotations

import re

# scheme://user:password@host...: everything between the first ':' of the userinfo and the
# last '@' of the authority. Written as a pattern rather than with urlsplit so that a URL too
# malformed to parse (one a client sent, about to be refused) is masked as well.
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/?#:@]*):[^/?#]*@")


def mask_url(url: str) -> str:
    """The URL with its password (rtsp://user:pass@camera/..., redis://:pass@host) as ***."""
    return _USERINFO.sub(r"\g<head>:***@", url, count=1)
