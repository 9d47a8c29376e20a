"""Blocks and the finalized-block record the store and sync protocol carry.

Block ``h`` carries the commit certificate of block ``h-1`` (``last_commit``),
so anyone holding the genesis can check the chain link by link. The last
block of an epoch names the next epoch's committee in its header
(``next_committee``), signed over by the outgoing committee: that is what
lets a light client follow committee rotation without executing blocks.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from ledger.codec import U32, U64, Address, Hash32, ListOf, Maybe, Nested, Record, decode, encode, record
from ledger.state import Committee
from ledger.transactions import SignedTransaction
from ledger.votes import CommitCertificate

MAX_BLOCK_TXS = 20_000
MAX_BLOCK_BYTES = 64 << 20


@record
class BlockHeader(Record):
    height: U64
    round: U32
    prev_hash: Hash32
    proposer: Address
    timestamp_ms: U64  # informational only: deadlines are counted in blocks
    tx_root: Hash32
    state_root: Hash32  # root of the state after this block
    last_commit: Annotated[CommitCertificate | None, Maybe(Nested(CommitCertificate))]
    next_committee: Annotated[Committee | None, Maybe(Nested(Committee))]

    def block_hash(self) -> bytes:
        return hashlib.sha256(b"p2pgpu/block" + encode(self)).digest()


@record
class Block(Record):
    MAX_BYTES = MAX_BLOCK_BYTES
    header: BlockHeader
    transactions: Annotated[tuple[SignedTransaction, ...], ListOf(Nested(SignedTransaction), MAX_BLOCK_TXS)]

    @property
    def height(self) -> int:
        return self.header.height

    def block_hash(self) -> bytes:
        return self.header.block_hash()


@record
class FinalizedBlock(Record):
    """A block with the certificate that made it final: the unit of storage and sync."""

    MAX_BYTES = MAX_BLOCK_BYTES + 2048
    block: Block
    certificate: CommitCertificate

    @classmethod
    def from_bytes(cls, data: bytes) -> FinalizedBlock:
        return decode(cls, data)


def compute_tx_root(transactions: tuple[SignedTransaction, ...] | list[SignedTransaction]) -> bytes:
    """SHA-256 over the concatenated transaction hashes.

    A flat hash, not a Merkle tree: nothing needs inclusion proofs yet, and a
    light client verifies whole blocks.
    """
    h = hashlib.sha256(b"p2pgpu/txroot")
    for tx in transactions:
        h.update(tx.tx_hash())
    return h.digest()
