"""Peers of another chain are refused when they connect, and a node alone with them never says it is ready.

Gossip topics carry the chain id, so a peer of another chain never shares a
message with us; but it did share a connection, count as a peer, and let a
node with the wrong ``genesis.json`` report ``ready`` to its operator (its
peers were there; only its blocks were not). Each new connection is asked
for its status (``/p2pgpu/status/1``, which every node answers with its
chain tag); a peer that names another chain is refused for
:data:`FORGET_AFTER_S` (``Network.refuse``: disconnected, never dialled,
dropped at once if it connects again), and counted.
A peer that does not answer the status protocol (a plain libp2p peer) is
left to the network's scoring: only a positive claim of another chain is
refused; it is asked again after :data:`RECHECK_UNKNOWN_S` (a same-chain peer
whose answer timed out under load is not left unconfirmed for as long as it
stays connected).

Refusing is not proof of the opposite: until a peer has *confirmed* our chain
(:attr:`ChainGuard.has_confirmed_peer`), a node that was told where the
network is (bootstrap peers) does not say it is ready -- neither in the half
second before its first peer is classified, nor after a peer of another chain
has been forgotten.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import trio

from p2pgpu.net.log import log

__all__ = ["ChainGuard", "classify_peer"]

logger = logging.getLogger(__name__)

FORGET_AFTER_S = 600.0
CHECK_INTERVAL_S = 0.5
STATUS_TIMEOUT_S = 5.0
REFUSE_GRACE_S = 1.0
RECHECK_UNKNOWN_S = 30.0

PeerChain = Literal["same", "other", "unknown"]


def classify_peer(our_chain: str, status: Mapping[str, Any] | None) -> PeerChain:
    """``same`` / ``other`` by the chain tag a peer's status names; ``unknown`` without one."""
    if status is None:
        return "unknown"
    chain = status.get("chain")
    if not isinstance(chain, str) or not chain:
        return "unknown"
    return "same" if chain == our_chain else "other"


class ChainGuard:
    """Checks each connected peer's chain once; keeps who is ours and who is not."""

    def __init__(self, network: Any, our_chain: str) -> None:
        self.network = network
        self.our_chain = our_chain
        self.same: set[str] = set()
        self.other: dict[str, tuple[str, float]] = {}  # peer -> (its chain tag, when we refused it)
        self.refused = 0
        self._checking: set[str] = set()
        self._unknown: dict[str, float] = {}  # peer -> when it gave no chain tag (asked again later)

    @property
    def has_confirmed_peer(self) -> bool:
        """Whether a connected peer has named our chain: the proof a node needs before it says it is ready."""
        return bool(self.same & self.network.connected_peers())

    @property
    def isolated_detail(self) -> str | None:
        """Why the node must not say it is ready: every peer it met is of another chain (None: not so)."""
        live = self.network.connected_peers()
        if self.same & live or not self.other:
            return None
        chains = sorted({chain for chain, _ in self.other.values()})
        return (f"connected only to peers of another chain ({', '.join(chains)}; ours is {self.our_chain}): "
                "this node's genesis differs from the network's; check genesis.json")

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                self.other = {p: v for p, v in self.other.items() if now - v[1] < FORGET_AFTER_S}
                live = self.network.connected_peers()
                self.same &= live
                self._unknown = {p: t for p, t in self._unknown.items()
                                 if p in live and now - t < RECHECK_UNKNOWN_S}
                for peer in live:
                    if peer not in self.same and peer not in self.other and peer not in self._unknown \
                            and peer not in self._checking:
                        self._checking.add(peer)
                        nursery.start_soon(self._check, peer)
                await trio.sleep(CHECK_INTERVAL_S)

    async def _check(self, peer: str) -> None:
        try:
            try:
                status = await self.network.request_status(peer, timeout=STATUS_TIMEOUT_S)
            except Exception:  # no status protocol, a timeout, a reset: not a claim of another chain
                status = None
            verdict = classify_peer(self.our_chain, status)
            if verdict == "same":
                self.same.add(peer)
            elif verdict == "unknown":
                if peer in self.network.connected_peers():
                    # a peer that does not speak the protocol (or did not answer in time): ask again later
                    self._unknown[peer] = trio.current_time()
            else:
                assert status is not None
                self.other[peer] = (str(status["chain"]), trio.current_time())
                self.refused += 1
                log(logger, logging.WARNING, "peer_of_another_chain", peer=peer, chain=status["chain"],
                    ours=self.our_chain, action="refused")
                # A moment before hanging up: the peer's own check of us (sent at the same time as ours) gets
                # its answer, so it learns that its genesis differs instead of seeing a peer that just drops.
                await trio.sleep(REFUSE_GRACE_S)
                self.network.refuse(peer, FORGET_AFTER_S, "another chain")
        finally:
            self._checking.discard(peer)
