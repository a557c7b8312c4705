"""LiveLens clients: the browser console's static files (served at /) and the Python client.

The Python client is imported lazily (`from livelens.clients import LiveLensClient, Publisher`),
so the server, which only needs CONSOLE_DIR, does not import it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

CONSOLE_DIR = Path(__file__).parent / "console"
"""index.html, console.js and console.css of the browser console; `livelens serve` serves them."""

_LAZY = {
    "LiveLensClient": "client",
    "BlockingClient": "client",
    "Answer": "client",
    "Segment": "client",
    "Latency": "client",
    "Status": "client",
    "SessionInfo": "client",
    "SessionStats": "client",
    "HistoryEntry": "client",
    "Thumbnail": "client",
    "Alert": "client",
    "AlertEvent": "client",
    "LiveLensError": "client",
    "ServerError": "client",
    "ConnectionFailed": "client",
    "Publisher": "publisher",
    "SourceUnavailable": "publisher",
}

__all__ = ["CONSOLE_DIR", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
