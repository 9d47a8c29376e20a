"""Repeating third-party warnings folded into one line with a count.

py-libp2p logs some warnings once per message or per peer ("pending message
queue ... exceeded limit", "GRAFT flood detected ..."): under load that was
most of a node's log (16 MB in 49 minutes), burying our own events. The
first record of a kind (logger, level, message template) goes through; the
same kind within ``window_s`` is counted instead, and the next one after
the window goes through saying how many were folded. Our own loggers
(``p2pgpu``) are never folded: their events are structured and each counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RepeatFolder"]


class RepeatFolder(logging.Filter):
    """A handler filter; ``clock`` is injectable for tests."""

    def __init__(self, window_s: float = 60.0, *, own_prefix: str = "p2pgpu",
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self.own_prefix = own_prefix
        self._clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}  # kind -> (window start, folded count)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == self.own_prefix or record.name.startswith(self.own_prefix + "."):
            return True
        kind = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        seen = self._seen.get(kind)
        if seen is not None and now - seen[0] < self.window_s:
            self._seen[kind] = (seen[0], seen[1] + 1)
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} [and {seen[1]} more like it in the last {self.window_s:g} s]"
        self._seen[kind] = (now, 0)
        if len(self._seen) > 4096:  # bounded: forget the oldest kinds
            for old in list(self._seen)[:1024]:
                del self._seen[old]
        return True
