"""Counters of the network layer: a plain object owned by one ``Network``.

No globals, so several nodes in one process (tests, benches) keep separate
figures. The node's ``/metrics`` endpoint renders :meth:`NetMetrics.snapshot`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class NetMetrics:
    published: Counter[str] = field(default_factory=Counter)
    """Messages we published, per topic."""
    delivered: Counter[str] = field(default_factory=Counter)
    """Validated messages handed to the application queue, per topic."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Validated messages lost because the application queue was full, per topic."""
    duplicates: int = 0
    """Messages received again after a first valid copy (seen-cache hits)."""
    duplicates_by_topic: Counter[str] = field(default_factory=Counter)
    """``duplicates`` per topic: where the mesh's redundancy is paid."""
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Rejected messages per (topic, reason)."""
    ignored: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Ignored messages per (topic, reason)."""
    publish_waits: int = 0
    """Times a publish waited for a peer's outbound queue to drain (backpressure)."""
    publish_wait_timeouts: int = 0
    """Publishes that went ahead after ``publish_max_wait`` because some peer's queue stayed full."""
    peers_connected: int = 0
    bans: int = 0
    """Peers banned (``Network.penalize``: gossip, engine rejections, bad requests, bad sync answers)."""
    requests_served: Counter[str] = field(default_factory=Counter)
    """Inbound request/response streams handled, per protocol."""
    request_errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Failed inbound or outbound exchanges per (protocol, error kind)."""
    inbound_refused: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Inbound streams refused per (protocol, reason): ``banned``, ``peer_quota``, ``protocol_budget``,
    ``node_limit`` (see :mod:`p2pgpu.net.quota`), or reset as ``idle`` (no request in time)."""
    inbound_active: dict[str, int] = field(default_factory=dict)
    """Inbound streams being served now, per protocol (a gauge: back to 0 when all are done)."""
    charges: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Score charges per (topic or protocol, reason), whatever the path (``Network.penalize``)."""

    def snapshot(self) -> dict[str, Any]:
        """A JSON-friendly copy of every counter."""
        return {
            "published": dict(self.published),
            "delivered": dict(self.delivered),
            "dropped": dict(self.dropped),
            "duplicates": self.duplicates,
            "duplicates_by_topic": dict(self.duplicates_by_topic),
            "rejected": {f"{t}|{r}": n for (t, r), n in self.rejected.items()},
            "ignored": {f"{t}|{r}": n for (t, r), n in self.ignored.items()},
            "publish_waits": self.publish_waits,
            "publish_wait_timeouts": self.publish_wait_timeouts,
            "peers_connected": self.peers_connected,
            "bans": self.bans,
            "requests_served": dict(self.requests_served),
            "request_errors": {f"{p}|{k}": n for (p, k), n in self.request_errors.items()},
            "inbound_refused": {f"{p}|{r}": n for (p, r), n in self.inbound_refused.items()},
            "inbound_active": dict(self.inbound_active),
            "charges": {f"{w}|{r}": n for (w, r), n in self.charges.items()},
        }
