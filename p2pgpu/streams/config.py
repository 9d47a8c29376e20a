"""``/p2pgpu/stream/1`` settings and figures: the frozen config, one session's stats, both halves' counters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Final

__all__ = ["CLOSE_REASONS", "StreamConfig", "StreamMetrics", "StreamStats"]


@dataclass(frozen=True, slots=True)
class StreamConfig:
    max_item_bytes: int = 1 << 20
    """Largest item (element bytes) the provider accepts."""
    hello_timeout: float = 10.0
    """A connection that sends no StreamHello within this is dropped."""
    ready_timeout: float = 60.0
    """How long a hello may wait for our role to hand over the session and the model to load."""
    idle_timeout: float = 120.0
    """Provider: drop a connection that sends nothing for this long (the session stays)."""
    receipt_timeout: float = 30.0
    """Provider: with K items served and unreceipted, the client owes a receipt (it sends one as soon as it
    reads the K-th answer); a client that sends none for this long is cut off with ``no_receipt``, so a
    client that ignores the announced K learns why instead of stalling until ``idle_timeout``."""
    answer_timeout: float = 120.0
    """Client: give up when the provider answers nothing for this long."""
    connect_timeout: float = 180.0
    """Client: keep trying to reach the provider (not connected yet, model loading) for this long."""
    retry_interval: float = 1.0
    kept_stats: int = 256
    live_kept_bytes: int = 16 << 20
    """Client, per live session: the newest items and outputs kept for item disputes (older ones are dropped)."""

    def __post_init__(self) -> None:
        for name in ("max_item_bytes", "kept_stats", "live_kept_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("hello_timeout", "ready_timeout", "idle_timeout", "receipt_timeout", "answer_timeout",
                     "connect_timeout", "retry_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(slots=True)
class StreamStats:
    """One provider session, as served: the figures an operator (or a test) checks."""

    task_id: bytes
    items: int = 0
    model_loads: int = 0
    receipts: int = 0
    connections: int = 0
    closed_by: str = ""


CLOSE_REASONS: Final = ("client_ended", "settled", "role_closed", "model_failed")
"""Why a provider session (a loaded model) ended: the label values of its closed-sessions counter."""


@dataclass(slots=True)
class StreamMetrics:
    """Both halves' counters; ``p2pgpu.metrics_text.stream_metric_families`` renders them at /metrics."""

    # provider side
    sessions_served: int = 0
    """Sessions opened: the model loaded and the session was ready for its client."""
    sessions_closed: Counter[str] = field(default_factory=Counter)
    """Opened sessions that ended, per reason in :data:`CLOSE_REASONS`."""
    connections: int = 0
    """Client connections admitted to a session (a client may reconnect)."""
    items_served: int = 0
    receipts_received: int = 0
    claims_submitted: int = 0
    """StreamClaim transactions handed to the mempool (counted by the node's roles)."""
    claims_refused: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """Connections refused or cut off, per rejection code."""
    penalties: int = 0
    # client side
    sessions_started: int = 0
    """Sessions the provider accepted (StreamReady received)."""
    sessions_streamed: int = 0
    """Sessions that answered every item."""
    client_failures: int = 0
    items_streamed: int = 0
    items_answered: int = 0
    """Answers received and checked (signature, hashes)."""
    receipts_sent: int = 0

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name in (f.name for f in fields(self)):
            value = getattr(self, name)
            out[name] = dict(value) if isinstance(value, Counter) else value
        return out
