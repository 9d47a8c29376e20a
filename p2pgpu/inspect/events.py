"""Trace events: what the inspector saw, one frozen record per observation.

Event names follow go-libp2p-pubsub's tracer (``pb/trace.proto``), so a
reader who knows ``tracestat`` knows what each line means:

* ``DELIVER``   -- a message passed validation and reached us (``peer`` is
  the forwarder it first came from).
* ``REJECT``    -- a message failed validation; ``reason`` is a short stable
  label (``bad-signature``, ``malformed``, ...), ``fields["detail"]`` the
  full explanation, ``fields["blame"]`` whether the forwarder is at fault
  (go's "validation ignored" vs "validation failed").
* ``DUPLICATE`` -- a copy of a message already delivered.
* ``PUBLISH``   -- our own publication (never emitted by the passive
  inspector; kept so a recording from another source reads the same).
* ``ADD_PEER`` / ``REMOVE_PEER`` -- a connection to a peer opened / closed.
* ``JOIN`` / ``LEAVE`` -- a topic subscription appeared / went away; with a
  ``peer`` it is that peer's subscription (as announced to us), without one
  it is our own.
* ``GRAFT`` / ``PRUNE`` -- a peer entered / left our mesh for a topic.

The JSON form (:meth:`TraceEvent.to_json`) is the recording format: one
object per line. :func:`parse_event` reads it back and raises
:class:`RecordingError` naming the line and the field for anything else.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EventType",
    "FieldValue",
    "RecordingError",
    "TraceEvent",
    "parse_event",
]

FieldValue = int | float | bool | str | None | list[Any]
"""A summary field: JSON scalars, or lists of them (task ids a block touches)."""

MAX_RECORDING_LINE = 1 << 20


class EventType(enum.Enum):
    PUBLISH = "PUBLISH"
    DELIVER = "DELIVER"
    REJECT = "REJECT"
    DUPLICATE = "DUPLICATE"
    ADD_PEER = "ADD_PEER"
    REMOVE_PEER = "REMOVE_PEER"
    JOIN = "JOIN"
    LEAVE = "LEAVE"
    GRAFT = "GRAFT"
    PRUNE = "PRUNE"


MESSAGE_EVENTS = frozenset({EventType.PUBLISH, EventType.DELIVER, EventType.REJECT, EventType.DUPLICATE})


class RecordingError(ValueError):
    """A recording line that is not a trace event; ``line`` is 1-based (0 when not from a file)."""

    def __init__(self, line: int, problem: str, source: str = "") -> None:
        self.line = line
        self.problem = problem
        self.source = source
        where = ": ".join(p for p in (source, f"line {line}" if line else "") if p)
        super().__init__(f"{where}: {problem}" if where else problem)


@dataclass(frozen=True, slots=True)
class TraceEvent:
    ts: float
    """Wall-clock seconds (Unix time) when the inspector saw it."""
    event: EventType
    topic: str = ""
    """Short topic name (``tx``, ``task``, ``bid``, ``consensus``, ``block``); empty for peer events."""
    peer: str = ""
    msg_id: str = ""
    """Hex SHA-256 of the payload (the gossip layer's content id)."""
    size: int = 0
    kind: str = ""
    """Decoded record type (``Transfer``, ``VoteMessage``, ``FinalizedBlock``, ...)."""
    fields: Mapping[str, FieldValue] = field(default_factory=dict)
    reason: str = ""

    def to_json(self) -> str:
        out: dict[str, Any] = {"ts": round(self.ts, 6), "event": self.event.value}
        for name in ("topic", "peer", "msg_id", "size", "kind", "reason"):
            value = getattr(self, name)
            if value:
                out[name] = value
        if self.fields:
            out["fields"] = dict(self.fields)
        return json.dumps(out, separators=(",", ":"), sort_keys=False)


_STR_FIELDS = ("topic", "peer", "msg_id", "kind", "reason")
_KNOWN_KEYS = frozenset({"ts", "event", "size", "fields", *_STR_FIELDS})


def parse_event(line: str, line_no: int = 0) -> TraceEvent:
    """One recording line back into a :class:`TraceEvent`; :class:`RecordingError` names what is wrong."""
    if len(line) > MAX_RECORDING_LINE:
        raise RecordingError(line_no, f"line is longer than {MAX_RECORDING_LINE} characters")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordingError(line_no, f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise RecordingError(line_no, f"expected a JSON object, got {type(obj).__name__}")
    extra = sorted(set(obj) - _KNOWN_KEYS)
    if extra:
        raise RecordingError(line_no, f"unknown key(s): {', '.join(extra)}")
    ts = obj.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise RecordingError(line_no, f"'ts' must be a non-negative number of seconds, got {ts!r}")
    name = obj.get("event")
    try:
        event = EventType(name)
    except ValueError:
        known = ", ".join(e.value for e in EventType)
        raise RecordingError(line_no, f"'event' must be one of {known}, got {name!r}") from None
    strings: dict[str, str] = {}
    for key in _STR_FIELDS:
        value = obj.get(key, "")
        if not isinstance(value, str):
            raise RecordingError(line_no, f"{key!r} must be a string, got {type(value).__name__}")
        strings[key] = value
    if strings["msg_id"]:
        try:
            bytes.fromhex(strings["msg_id"])
        except ValueError:
            raise RecordingError(line_no, f"'msg_id' is not hex: {strings['msg_id'][:80]!r}") from None
    size = obj.get("size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise RecordingError(line_no, f"'size' must be a non-negative integer, got {size!r}")
    fields = obj.get("fields", {})
    if not isinstance(fields, dict):
        raise RecordingError(line_no, f"'fields' must be an object, got {type(fields).__name__}")
    for key, value in fields.items():
        if isinstance(value, dict):
            raise RecordingError(line_no, f"fields.{key} must be a scalar or a list, got an object")
    if event in MESSAGE_EVENTS and not strings["topic"]:
        raise RecordingError(line_no, f"a {event.value} event needs a 'topic'")
    if event is EventType.REJECT and not strings["reason"]:
        raise RecordingError(line_no, "a REJECT event needs a 'reason'")
    return TraceEvent(ts=float(ts), event=event, size=size, fields=fields, **strings)
