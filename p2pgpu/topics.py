"""Gossip topic names and protocol ids, scoped by chain (DESIGN section 4).

Topics carry the first 16 hex digits of the chain id, so two devnets on one
machine never share a mesh, and a peer of another chain never even
subscribes to ours.
"""

from __future__ import annotations

from dataclasses import dataclass

SYNC_PROTOCOL = "/p2pgpu/sync/1"
DATA_PROTOCOL = "/p2pgpu/data/1"
STREAM_PROTOCOL = "/p2pgpu/stream/1"


@dataclass(frozen=True, slots=True)
class Topics:
    tx: str
    task: str
    bid: str
    consensus: str
    block: str
    advert: str
    """Providers' signed warm models (``p2pgpu.market.advertise``); followed by the nodes that follow the market."""

    @classmethod
    def for_chain(cls, chain_id: bytes) -> Topics:
        scope = chain_id.hex()[:16]
        return cls(
            tx=f"/p2pgpu/{scope}/tx",
            task=f"/p2pgpu/{scope}/task",
            bid=f"/p2pgpu/{scope}/bid",
            consensus=f"/p2pgpu/{scope}/consensus",
            block=f"/p2pgpu/{scope}/block",
            advert=f"/p2pgpu/{scope}/advert",
        )

    def all(self) -> tuple[str, ...]:
        return (self.tx, self.task, self.bid, self.consensus, self.block, self.advert)

    def name_of(self, topic: str) -> str:
        """Short name (``tx``, ``bid``, ...) of one of our topics, for metrics labels."""
        return topic.rsplit("/", 1)[-1]
