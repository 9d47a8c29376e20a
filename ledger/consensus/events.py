"""The engine's contract with its host: the events it takes and the actions it returns.

Every type here is a frozen value; the host (the Trio node in
:mod:`p2pgpu.consensus_driver`, or :mod:`devnet.sim`) turns actions into I/O
and I/O into events. Timers come in two kinds, each of which knows the event
it fires (:meth:`ScheduleTimeout.fired`, :meth:`ScheduleSync.fired`), so a
host treats them alike: after ``delay_s``, feed back ``action.fired()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ledger.blocks import FinalizedBlock
from ledger.codec import Record
from ledger.consensus.config import TimeoutStep
from ledger.keys import AccountKey
from ledger.state import State
from ledger.transactions import Evidence, SignedTransaction
from ledger.transition import tx_signing_bytes
from ledger.votes import SignedVote

__all__ = [
    "Action",
    "BlocksSynced",
    "Broadcast",
    "Commit",
    "Event",
    "MessageReceived",
    "REJECT_REASONS",
    "RejectMessage",
    "ReportEvidence",
    "RequestSync",
    "ScheduleSync",
    "ScheduleTimeout",
    "SyncTimerFired",
    "TimeoutFired",
    "Timer",
    "TxsAvailable",
    "make_evidence_tx",
]

# ============================================================ events


@dataclass(frozen=True, slots=True)
class MessageReceived:
    message: Record  # SignedProposal or VoteMessage
    peer: str | None = None


@dataclass(frozen=True, slots=True)
class TimeoutFired:
    """A consensus timer of ``(height, round)`` is due (stale ones are ignored, so hosts never cancel)."""

    height: int
    round: int
    step: TimeoutStep


@dataclass(frozen=True, slots=True)
class SyncTimerFired:
    """The catch-up schedule's timer is due. ``generation`` says which arming this is: only the newest
    counts, an earlier one was superseded (see :class:`~ledger.consensus.catchup.CatchUp`)."""

    generation: int


@dataclass(frozen=True, slots=True)
class BlocksSynced:
    """Finalized blocks from ``peer``: the answer to a :class:`RequestSync` (empty: nobody had any), or,
    with ``solicited=False``, a block announced on ``/block``. Only answers move the sync schedule."""

    blocks: tuple[FinalizedBlock, ...]
    peer: str | None = None
    solicited: bool = True


@dataclass(frozen=True, slots=True)
class TxsAvailable:
    """The mempool has executable transactions: a proposer in its post-commit pause may propose early.

    Hosts send it when a transaction is admitted; the engine ignores it unless it is the waiting proposer
    (Tendermint's ``TxsAvailable``, used here to shorten ``timeout_commit`` rather than to skip empty blocks).
    """


Event = Union[MessageReceived, TimeoutFired, SyncTimerFired, BlocksSynced, TxsAvailable]

# ============================================================ actions


@dataclass(frozen=True, slots=True)
class Broadcast:
    message: Record


@dataclass(frozen=True, slots=True)
class ScheduleTimeout:
    height: int
    round: int
    step: TimeoutStep
    delay_s: float

    def fired(self) -> TimeoutFired:
        """The event to feed back after ``delay_s``."""
        return TimeoutFired(self.height, self.round, self.step)


@dataclass(frozen=True, slots=True)
class ScheduleSync:
    """Arm the catch-up timer: after ``delay_s`` feed back :class:`SyncTimerFired` (``generation``)."""

    generation: int
    delay_s: float

    def fired(self) -> SyncTimerFired:
        """The event to feed back after ``delay_s``."""
        return SyncTimerFired(self.generation)


Timer = Union[ScheduleTimeout, ScheduleSync]


@dataclass(frozen=True, slots=True)
class Commit:
    finalized: FinalizedBlock
    state: State = field(compare=False)


@dataclass(frozen=True, slots=True)
class ReportEvidence:
    vote_a: SignedVote
    vote_b: SignedVote


@dataclass(frozen=True, slots=True)
class RequestSync:
    from_height: int
    peer: str | None = None
    max_blocks: int = 64  # ConsensusConfig.sync_batch


REJECT_REASONS = frozenset({
    "not_consensus_message",
    "not_proposer",  # a proposal signed by anyone but the proposer of its (height, round)
    "bad_pol_round",
    "block_mismatch",  # the proposal names another block than it carries
    "block_round",  # the block was built for a later round than its proposal
    "bad_signature",
    "unknown_vote_step",
    "not_validator",  # a vote by someone outside the height's committee
    "bad_certificate",  # a synced block's certificate does not prove a quorum
    "invalid_block",  # a certified block that does not apply on our state
})
"""Every ``RejectMessage.reason``: a closed set, so counting rejections by reason stays bounded."""


@dataclass(frozen=True, slots=True)
class RejectMessage:
    peer: str | None
    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")


Action = Union[Broadcast, ScheduleTimeout, ScheduleSync, Commit, ReportEvidence, RequestSync, RejectMessage]


def make_evidence_tx(
    key: AccountKey, chain_id: bytes, nonce: int, fee: int, vote_a: SignedVote, vote_b: SignedVote
) -> SignedTransaction:
    """The Evidence transaction a reporter submits for a :class:`ReportEvidence` action."""
    body = Evidence(sender=key.address, nonce=nonce, fee=fee, vote_a=vote_a, vote_b=vote_b)
    return SignedTransaction(body=body, public_key=key.public_key, signature=key.sign(tx_signing_bytes(chain_id, body)))
