"""Structured ``key=value`` log lines on top of the stdlib :mod:`logging`.

One event name plus context fields per line keeps logs greppable
(``grep 'event=bootstrap_dial_failed'``) without a logging dependency.
"""

from __future__ import annotations

import logging
from typing import Any


def _fmt(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(event: str, **fields: Any) -> str:
    """Render ``event=<event> k=v ...`` with values quoted when needed."""
    parts = [f"event={_fmt(event)}"]
    parts.extend(f"{key}={_fmt(value)}" for key, value in fields.items())
    return " ".join(parts)


def log(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log one structured event; formatting is skipped when the level is off."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", kv(event, **fields))
