"""Peer id <-> ledger account: a node's libp2p identity is its Ed25519 account key.

Noise proves a peer holds the key its peer id embeds, so the account behind
a connection is read out of the peer id itself; no signature travels.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.keys import KeyType
from libp2p.peer.id import ID

from ledger.keys import address_of

__all__ = ["PeerKeys", "account_address_of_peer", "peer_id_of_account_key"]


PEERS_REMEMBERED = 4096
"""Both directions are pure and cost a base58 and protobuf round (~0.3 ms); a node meets the same few peers on
every stream, announce and probe, so the answers are memoized (bounded)."""


@lru_cache(maxsize=PEERS_REMEMBERED)
def peer_id_of_account_key(public_key: bytes) -> str:
    """The base58 peer id of the node whose account key is ``public_key`` (the key is its libp2p identity)."""
    return str(ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)).to_base58())


@lru_cache(maxsize=PEERS_REMEMBERED)
def account_address_of_peer(peer_id: str) -> bytes | None:
    """The ledger address behind a base58 peer id, or None if the id does not embed an Ed25519 key."""
    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except Exception:  # base58 / multihash / protobuf decoding raise unrelated types
        return None
    if key is None or key.get_type() != KeyType.Ed25519:
        return None
    raw = key.to_bytes()
    return address_of(raw) if len(raw) == 32 else None


class PeerKeys:
    """The X25519 key each peer last named for itself (in a sealed request, or a bid link's ``HELLO``), for the
    most recent ``limit`` peers.

    Nobody publishes these keys (:mod:`p2pgpu.sealed`); a peer names its own
    over a connection Noise authenticates, so sealing to the key it named
    gives it nothing it could not fetch.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._keys: OrderedDict[str, bytes] = OrderedDict()

    def note(self, peer: str, key: bytes) -> None:
        self._keys[peer] = key
        self._keys.move_to_end(peer)
        while len(self._keys) > self._limit:
            self._keys.popitem(last=False)

    def get(self, peer: str) -> bytes | None:
        return self._keys.get(peer)
