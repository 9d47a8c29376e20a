"""Domain-separated bytes to sign: one signature can never be replayed as another kind of message.

Every signature in p2pgpu, Ed25519 or BLS, covers::

    SIGNING_PREFIX || len(tag) (1 byte) || tag || chain_id (32 bytes) || payload

* ``SIGNING_PREFIX`` sets these bytes apart from anything else the same key
  signs outside the ledger. That matters because the account key is also the
  node's libp2p identity: libp2p signs Noise handshakes over
  ``"noise-libp2p-static-key:" || key`` and signed envelopes over
  ``varint(len(domain)) || domain || ...``; neither can begin with our prefix
  (its first byte 'p' = 0x70 would be a 112-byte envelope domain, and no
  libp2p domain starts with "2pgpu/sig").
* the tag is length-prefixed and the chain id has a fixed length, so the
  split between the parts is unambiguous: distinct (domain, chain, payload)
  triples never give the same bytes (:func:`parse_signing_bytes` inverts it).
* ``chain_id`` is the genesis hash, so a devnet's messages never verify on
  another chain.

The payload is the canonical encoding of a record (:mod:`ledger.codec`).
"""

from __future__ import annotations

import enum

__all__ = [
    "CHAIN_ID_SIZE",
    "SIGNING_PREFIX",
    "Domain",
    "SigningBytesError",
    "parse_signing_bytes",
    "signing_bytes",
]

SIGNING_PREFIX = b"p2pgpu/sig/1\x00"
CHAIN_ID_SIZE = 32


class SigningBytesError(ValueError):
    """Arguments that cannot form (or bytes that are not) domain-separated signing bytes."""


@enum.unique
class Domain(enum.Enum):
    """What a signature is for. Tags are wire constants: never change or reuse one."""

    TX = b"tx"
    """A ledger transaction, signed by the sender's account key."""
    BID = b"bid"
    """A provider's bid on a task (carried later inside ``Assign``)."""
    ANNOUNCE = b"announce"
    """A client's off-ledger task announcement on the task topic."""
    PROPOSAL = b"proposal"
    """A block proposal for (height, round), signed by the proposer's BLS key."""
    VOTE = b"vote"
    """A prevote or precommit; precommits aggregate into commit certificates."""
    RECEIPT = b"receipt"
    """A streaming client's cumulative receipt (units consumed so far)."""
    STREAM_OUTPUT = b"stream-output"
    """A provider's signature over one streamed output's hash."""
    DECLINE = b"decline"
    """A provider's off-ledger notice that it will not bid on a task."""
    POP = b"pop"
    """Binds a BLS key to an account: the BLS key signs the account address, so
    nobody can register another validator's public key (and its public
    proof of possession) under their own account."""
    STATUS = b"status"
    """A node's signed status / handshake on ``/p2pgpu/status/1``."""


def signing_bytes(domain: Domain, chain_id: bytes, payload: bytes) -> bytes:
    """The exact bytes a key signs for ``payload`` of kind ``domain`` on chain ``chain_id``."""
    if not isinstance(domain, Domain):
        raise SigningBytesError(f"domain must be a Domain, got {type(domain).__name__}")
    if not isinstance(chain_id, bytes) or len(chain_id) != CHAIN_ID_SIZE:
        got = f"{len(chain_id)} bytes" if isinstance(chain_id, bytes) else type(chain_id).__name__
        raise SigningBytesError(f"chain_id must be {CHAIN_ID_SIZE} bytes (the genesis hash), got {got}")
    if not isinstance(payload, bytes):
        raise SigningBytesError(f"payload must be bytes, got {type(payload).__name__}")
    tag = domain.value
    return b"".join((SIGNING_PREFIX, bytes([len(tag)]), tag, chain_id, payload))


def parse_signing_bytes(data: bytes) -> tuple[Domain, bytes, bytes]:
    """Split signing bytes back into (domain, chain_id, payload).

    The inverse of :func:`signing_bytes`, which is what makes the layout
    unambiguous; also lets a debugging tool say what a signature was over.
    """
    if not isinstance(data, bytes) or not data.startswith(SIGNING_PREFIX):
        raise SigningBytesError("not p2pgpu signing bytes: the prefix is missing")
    rest = data[len(SIGNING_PREFIX) :]
    if not rest:
        raise SigningBytesError("signing bytes end before the domain tag")
    tag_len = rest[0]
    tag = rest[1 : 1 + tag_len]
    try:
        domain = Domain(tag)
    except ValueError:
        raise SigningBytesError(f"unknown signing domain tag {tag!r}") from None
    chain_start = 1 + tag_len
    chain_id = rest[chain_start : chain_start + CHAIN_ID_SIZE]
    if len(chain_id) != CHAIN_ID_SIZE:
        raise SigningBytesError("signing bytes end inside the chain id")
    return domain, chain_id, rest[chain_start + CHAIN_ID_SIZE :]
