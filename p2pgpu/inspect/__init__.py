"""The gossip inspector (DESIGN section 7): a passive peer that decodes, verifies and times every message.

Pure core, thin shell:

* :mod:`.events`    -- :class:`TraceEvent` (go-libp2p-pubsub tracer names) and its JSON-lines form;
* :mod:`.decode`    -- :class:`MessageDecoder`: (topic, bytes) -> decoded record + summary, or a reason;
* :mod:`.state`     -- :class:`InspectorState`: events -> :class:`Summary` (rates, rejects, delays, task timeline);
* :mod:`.render`    -- rich renderables, a plain status line and JSON for a summary;
* :mod:`.recording` -- writing and strictly reading recordings;
* :mod:`.shell`     -- the Trio loop on :mod:`p2pgpu.net` (imports libp2p; import it only to go live).

The CLI is :mod:`p2pgpu.inspect_cli` (``p2pgpu inspect``, ``p2pgpu inspect replay``).
"""

from .events import EventType, RecordingError, TraceEvent, parse_event
from .recording import RecordWriter, read_recording
from .state import DelayStats, Head, InspectorState, Summary, TimelineEntry, TopicSummary, delay_stats

__all__ = [
    "DelayStats",
    "EventType",
    "Head",
    "InspectorState",
    "RecordWriter",
    "RecordingError",
    "Summary",
    "TimelineEntry",
    "TopicSummary",
    "TraceEvent",
    "delay_stats",
    "parse_event",
    "read_recording",
]
