"""LiveLens clients: the browser console's static files (served at /) and the Python client."""

from __future__ import annotations

from pathlib import Path

CONSOLE_DIR = Path(__file__).parent / "console"
"""index.html, console.js and console.css of the browser console; `livelens serve` serves them."""
