"""Consensus votes and commit certificates.

A vote is a BLS signature over domain-separated ``(chain, height, round,
step, block hash)``. A commit certificate is the aggregate of the precommits
for one block plus a bitfield naming the signers within the committee; it is
valid when the signers hold more than 2/3 of the committee's stake.
"""

from __future__ import annotations

import enum
from typing import Annotated

from ledger.codec import U8, U32, U64, Address, Bytes, FixedBytes, Hash32, Record, record

BLS_PUBKEY_LEN = 48
BLS_SIGNATURE_LEN = 96
NIL_BLOCK = b"\x00" * 32  # a vote for no block in this round

BLSPubkey = Annotated[bytes, FixedBytes(BLS_PUBKEY_LEN)]
BLSSignature = Annotated[bytes, FixedBytes(BLS_SIGNATURE_LEN)]


class VoteStep(enum.IntEnum):
    PREVOTE = 1
    PRECOMMIT = 2


@record
class Vote(Record):
    """What a validator signs: the same bytes for every signer, so precommits aggregate."""

    MAX_BYTES = 256
    height: U64
    round: U32
    step: U8
    block_hash: Hash32


@record
class SignedVote(Record):
    """A vote with its signer's account address and BLS signature."""

    MAX_BYTES = 512
    vote: Vote
    validator: Address
    signature: BLSSignature


@record
class CommitCertificate(Record):
    """Proof that > 2/3 of the committee's stake precommitted ``block_hash``.

    ``signers`` is a bitfield over the committee in its canonical order: bit
    ``i`` (byte ``i // 8``, mask ``1 << (i % 8)``) set means member ``i`` signed.
    """

    MAX_BYTES = 1024
    height: U64
    round: U32
    block_hash: Hash32
    signers: Annotated[bytes, Bytes(max_len=128)]
    aggregate_signature: BLSSignature


def bitfield_from_indices(indices: list[int] | set[int], size: int) -> bytes:
    field = bytearray((size + 7) // 8)
    for i in indices:
        if not 0 <= i < size:
            raise ValueError(f"signer index {i} outside committee of {size}")
        field[i // 8] |= 1 << (i % 8)
    return bytes(field)


def indices_from_bitfield(field: bytes, size: int) -> list[int]:
    """Signer indices, or ValueError if the field has the wrong length or stray bits."""
    if len(field) != (size + 7) // 8:
        raise ValueError(f"signer bitfield has {len(field)} bytes, committee of {size} needs {(size + 7) // 8}")
    out = [i for i in range(size) if field[i // 8] >> (i % 8) & 1]
    if size % 8 and field and field[-1] >> (size % 8):
        raise ValueError("signer bitfield has bits set beyond the committee size")
    return out
