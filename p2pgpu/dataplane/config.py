"""Data-plane settings, counters and the callback types the node plugs in."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["DataPlaneConfig", "DataPlaneMetrics", "Entitlement", "Progress", "Served"]

Entitlement = Callable[[str, bytes, bytes], bool]
"""``(peer_id, account_address, blob_hash) -> may this peer have this blob?``

For a sealed request ``blob_hash`` is the blob's name (its plaintext hash)."""

Served = Callable[[str, bytes, bytes], None]
"""``(peer_id, account_address, blob_hash)``: called once a blob's last byte went out to that peer."""

Progress = Callable[[int, int], None]
"""``(bytes_received_so_far, total_size)``, called after every frame (resumed bytes included)."""


@dataclass(frozen=True, slots=True)
class DataPlaneConfig:
    frame_size: int = 256 << 10
    """Payload bytes per DATA frame (must fit the network's ``max_frame_size``)."""
    max_serve_bytes: int = 1 << 30
    """Largest blob this node serves."""
    send_timeout: float = 30.0
    """A client that takes longer than this to accept one frame is cut off."""
    flush_every: int = 8 << 20
    """Make a partial download durable after this many new bytes (and whenever a transfer stops)."""

    def __post_init__(self) -> None:
        for name in ("frame_size", "max_serve_bytes", "flush_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.send_timeout <= 0:
            raise ValueError(f"send_timeout must be > 0, got {self.send_timeout}")


@dataclass(slots=True)
class DataPlaneMetrics:
    served: int = 0
    """Transfers completed as a server."""
    served_bytes: int = 0
    wraps: int = 0
    """Key wraps made for entitled fetchers of sealed blobs."""
    denied: Counter[str] = field(default_factory=Counter)
    """Requests refused, per reason (``not_entitled``, ``not_found``, ``too_large`` …)."""
    fetched: int = 0
    fetched_bytes: int = 0
    opened: int = 0
    """Sealed blobs fetched (or found locally) that opened and matched their name."""
    resumed: int = 0
    """Fetches that continued a partial download."""
    truncated: int = 0
    integrity_failures: int = 0
    sealed_rejected: Counter[str] = field(default_factory=Counter)
    """Sealed blobs that did not open, per reason (``tampered``, ``wrong_context``, ``plaintext_mismatch`` …)."""
    penalties: int = 0
    pushed: Counter[str] = field(default_factory=Counter)
    """Sealed blobs a peer pushed to us instead of our fetching them (:meth:`DataPlane.accept_pushed_sealed`),
    per outcome: ``stored``, ``had`` (a copy was here already), ``refused`` (it did not check out)."""

    def snapshot(self) -> dict[str, object]:
        return {
            "served": self.served,
            "served_bytes": self.served_bytes,
            "wraps": self.wraps,
            "denied": dict(self.denied),
            "fetched": self.fetched,
            "fetched_bytes": self.fetched_bytes,
            "opened": self.opened,
            "resumed": self.resumed,
            "truncated": self.truncated,
            "integrity_failures": self.integrity_failures,
            "sealed_rejected": dict(self.sealed_rejected),
            "penalties": self.penalties,
            "pushed": dict(self.pushed),
        }
