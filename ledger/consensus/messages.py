"""The consensus wire: what validators gossip on ``/consensus`` and what ``/p2pgpu/sync/1`` carries.

Records only (encoding, limits, the bytes a proposer signs); who may sign
them is :mod:`ledger.consensus.precheck`, what they do is the engine's.
"""

from __future__ import annotations

from typing import Annotated

from ledger.blocks import Block, FinalizedBlock
from ledger.codec import U16, U32, U64, Address, Hash32, Int, ListOf, Nested, Record, RecordUnion, encode, record
from ledger.signing import Domain, signing_bytes
from ledger.votes import BLSSignature, SignedVote

__all__ = [
    "CONSENSUS_MESSAGES",
    "MAX_SYNC_BLOCKS",
    "PolRound",
    "Proposal",
    "SignedProposal",
    "SyncRequest",
    "SyncResponse",
    "VoteMessage",
    "proposal_signing_bytes",
]

PolRound = Annotated[int, Int(-1, 2**32 - 1)]
MAX_SYNC_BLOCKS = 256


@record
class Proposal(Record):
    """What a proposer signs: the block is named by hash, so the signature is small and cheap."""

    MAX_BYTES = 256
    height: U64
    round: U32
    pol_round: PolRound  # -1, or the round of the polka that justifies re-proposing this block
    block_hash: Hash32


@record
class SignedProposal(Record):
    """A proposal with its full block, the proposer's address and BLS signature."""

    TYPE_ID = 1
    MAX_BYTES = Block.MAX_BYTES + 1024
    proposal: Proposal
    block: Block
    proposer: Address
    signature: BLSSignature


@record
class VoteMessage(Record):
    """A prevote or precommit on the consensus topic (wraps the ledger's SignedVote)."""

    TYPE_ID = 2
    MAX_BYTES = 512
    signed: SignedVote


CONSENSUS_MESSAGES: RecordUnion[Record] = RecordUnion(
    "ConsensusMessage", [SignedProposal, VoteMessage], max_bytes=SignedProposal.MAX_BYTES
)


@record
class SyncRequest(Record):
    """``/p2pgpu/sync/1`` request: finalized blocks from ``from_height`` on."""

    MAX_BYTES = 64
    from_height: U64
    max_blocks: U16


@record
class SyncResponse(Record):
    MAX_BYTES = 256 << 20
    blocks: Annotated[tuple[FinalizedBlock, ...], ListOf(Nested(FinalizedBlock), MAX_SYNC_BLOCKS)]


def proposal_signing_bytes(chain_id: bytes, proposal: Proposal) -> bytes:
    return signing_bytes(Domain.PROPOSAL, chain_id, encode(proposal))
