"""JSON-lines recordings: write events as they happen, read them back line by line.

A recording is the inspector's whole input (every figure is computed from
events), so replaying one reproduces the live session's summary exactly.
Reading is strict: the first bad line raises :class:`RecordingError` with
its line number, unless the caller asked to skip bad lines, in which case
each one is reported to ``on_bad`` and nothing else is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from p2pgpu.inspect.events import RecordingError, TraceEvent, parse_event

__all__ = ["RecordWriter", "read_recording"]


class RecordWriter:
    """Appends one JSON object per event; flushed per line so a killed inspector keeps what it saw."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.written = 0

    def write(self, ev: TraceEvent) -> None:
        self._stream.write(ev.to_json() + "\n")
        self._stream.flush()
        self.written += 1


def read_recording(
    path: Path,
    *,
    skip_bad: bool = False,
    on_bad: Callable[[RecordingError], None] | None = None,
) -> Iterator[TraceEvent]:
    """Events of a recording in file order; blank lines are allowed (a trailing newline is normal)."""
    try:
        stream = path.open("r", encoding="utf-8", newline="")
    except FileNotFoundError:
        raise RecordingError(0, "no such file", str(path)) from None
    except OSError as exc:
        raise RecordingError(0, f"cannot read: {exc.strerror or exc}", str(path)) from None
    with stream:
        line_no = 0
        while True:
            try:
                line = stream.readline()
            except UnicodeDecodeError as exc:
                raise RecordingError(line_no + 1, f"not UTF-8 text: {exc.reason}", str(path)) from None
            if not line:
                return
            line_no += 1
            if not line.strip():
                continue
            try:
                yield parse_event(line, line_no)
            except RecordingError as exc:
                located = RecordingError(exc.line, exc.problem, str(path))
                if not skip_bad:
                    raise located from None
                if on_bad is not None:
                    on_bad(located)
