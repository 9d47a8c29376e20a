"""The market's ``/task``, ``/bid`` and ``/advert`` gossip: validators that verify once, pumps that trust them.

Each validator decodes and verifies a message once (``p2pgpu.market``'s
record validators: schema, chain, window, signature, replay) and accepts it
*with* its record; the gossip router hands that record to the subscription
(``GossipMessage.record``), and the pumps here pass it on as it is: a bid
arrives at its client role as a :class:`~p2pgpu.market.VerifiedBid`, whose
signature nobody checks again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from ledger.state import State
from p2pgpu.dataplane import account_address_of_peer
from p2pgpu.market import (BidOffer, BidStart, DeclineNotice, MarketMessageError, SeenCache, SignedAdvert,
                           SignedAnnounce, SignedDecline, UnknownProvider, VerifiedBid, validate_bid_offer,
                           validate_task_message)
from p2pgpu.market.advertise import AdvertDirectory
from p2pgpu.net import GossipMessage, Verdict, accept, ignore, reject
from p2pgpu.net.ratelimit import KeyedRateLimiter

__all__ = ["GossipHead", "deliver_bid_record", "pump_announces", "pump_bids", "validate_advert", "validate_announce",
           "validate_bid"]


class _Chain(Protocol):
    @property
    def height(self) -> int: ...
    @property
    def state(self) -> State: ...


class GossipHead(Protocol):
    """What of the node the market validators read: its head, and whom a message's fault lies with."""

    @property
    def chain(self) -> _Chain: ...
    @property
    def announce_limiter(self) -> KeyedRateLimiter[bytes]: ...
    def _from_self(self, peer: str) -> bool: ...
    def _own_doing(self, peer: str, reason: str) -> Verdict[object]: ...
    def _over_rate(self, limiter: KeyedRateLimiter[bytes], key: bytes, peer: str,
                   reason: str) -> Verdict[object] | None: ...


def validate_announce(node: GossipHead, chain_id: bytes, seen: SeenCache | None, peer: str,
                      data: bytes) -> Verdict[SignedAnnounce]:
    """``/task`` validator: a valid announce from the client's own node, which can fund its escrow on our head."""
    try:
        rec = validate_task_message(chain_id, node.chain.height, data, seen)
    except MarketMessageError as exc:
        return reject(exc.reason) if exc.penalize else ignore(exc.reason)
    a = rec.announce
    # The spec and inputs are fetched from the announce's data_peer: it must be the signer's own node
    # (its libp2p identity is the client's account key), or a forged announce could send every
    # provider to a peer of the attacker's choosing (an honest client, which then turned its own
    # provider away as busy). Charged: the signer made it, and honest relays drop it.
    if account_address_of_peer(a.data_peer.decode("ascii", "replace")) != a.client:
        return reject("data_peer_not_signer")
    if not node._from_self(peer):
        # An announce whose client cannot fund its escrow on our head is never posted: not forwarded, so a
        # key with no funds cannot make every provider fetch specs from a peer of its choosing. Ignored,
        # not charged: the client's balance may differ on the relaying peer's head.
        if node.chain.state.get_balance(a.client) < a.max_unit_price * a.units:
            return node._own_doing(peer, "unfunded_client")  # type: ignore[return-value]
        # An announce costs its client nothing until it posts the task, yet every provider decodes it and
        # may fetch its spec: past the client's rate it is not relayed, and its publisher is charged.
        # Counted last, so only an announce we would otherwise relay takes one of the client's tokens.
        over = node._over_rate(node.announce_limiter, a.client, peer, "client_rate")
        if over is not None:
            return over  # type: ignore[return-value]
    return accept(rec)


def validate_bid(node: GossipHead, chain_id: bytes, seen: SeenCache | None, peer: str,
                 data: bytes) -> Verdict[BidOffer | SignedDecline]:
    """``/bid`` validator: accepted with the verified bid (and its verified warm/cold start), or the decline."""
    try:
        rec = validate_bid_offer(chain_id, node.chain.height, data, seen)
    except MarketMessageError as exc:
        return reject(exc.reason) if exc.penalize else ignore(exc.reason)
    return accept(rec)


async def pump_announces(channel: trio.MemoryReceiveChannel[GossipMessage[SignedAnnounce]],
                         on_announce: Callable[[SignedAnnounce], None]) -> None:
    """Announces from other nodes, as their validator accepted them."""
    async for msg in channel:
        if not msg.local and msg.record is not None:
            on_announce(msg.record)


async def pump_bids(channel: trio.MemoryReceiveChannel[GossipMessage[BidOffer | SignedDecline]],
                    on_bid: Callable[[VerifiedBid, BidStart | None], None],
                    on_decline: Callable[[DeclineNotice], None]) -> None:
    """Bids and declines from other nodes, as their validator accepted them (a bid: verified, with its start)."""
    async for msg in channel:
        if not msg.local and msg.record is not None:
            deliver_bid_record(msg.record, on_bid, on_decline)


def deliver_bid_record(rec: BidOffer | SignedDecline, on_bid: Callable[[VerifiedBid, BidStart | None], None],
                       on_decline: Callable[[DeclineNotice], None]) -> None:
    """What the ``/bid`` validator accepted, to its handler: a bid with its start, or a decline's notice (the same
    for a message from gossip and one over a bid link, :mod:`p2pgpu.bidlink`)."""
    if isinstance(rec, SignedDecline):
        on_decline(rec.notice)
    else:
        on_bid(rec.signed, rec.start)


def validate_advert(node: GossipHead, directory: AdvertDirectory, peer: str, data: bytes,
                    *, now: float) -> Verdict[SignedAdvert]:
    """``/advert`` validator: a registered provider's signed warm models, newer than its last; ``directory`` keeps it.

    Scored as the other market validators are: forged, malformed or
    wrong-chain bytes are rejected (charged to the peer that sent them);
    late, replayed or too-frequent ones ignored (not relayed, not charged).
    An advert from an address our head has no provider for is charged only
    to the peer that published it, unless we are the one behind
    (``_own_doing``): a relay's head may differ from ours.
    """
    try:
        rec = directory.admit(data, now=now, height=node.chain.height,
                              is_provider=node.chain.state.providers.__contains__)
    except UnknownProvider:
        return node._own_doing(peer, "unregistered_provider")  # type: ignore[return-value]
    except MarketMessageError as exc:
        return reject(exc.reason) if exc.penalize else ignore(exc.reason)
    return accept(rec)
