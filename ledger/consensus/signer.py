"""A validator's signing key behind its slashing-protection guard."""

from __future__ import annotations

from dataclasses import dataclass

from ledger.committee import vote_signing_bytes
from ledger.consensus.messages import Proposal, proposal_signing_bytes
from ledger.keys import ValidatorKey
from ledger.signer_guard import SignerGuard, SignStep
from ledger.votes import SignedVote, Vote

__all__ = ["ValidatorSigner"]


@dataclass
class ValidatorSigner:
    """A validator's BLS key behind its slashing-protection guard: nothing is signed without approval.

    The guard raises its high-water mark before the key signs (:class:`ledger.signer_guard.SignRefused` if
    it says no). By default it also makes the mark durable first, so a vote or proposal this returns may be
    sent at once; a host that deferred the guard's writes (:meth:`~ledger.signer_guard.SignerGuard.defer_writes`)
    sends it only after it has made :attr:`~ledger.signer_guard.SignerGuard.pending` durable.
    """

    address: bytes
    key: ValidatorKey
    guard: SignerGuard

    def sign_vote(self, chain_id: bytes, vote: Vote) -> SignedVote:
        self.guard.approve(vote.height, vote.round, SignStep(vote.step), vote.block_hash)
        return SignedVote(vote=vote, validator=self.address, signature=self.key.sign(vote_signing_bytes(chain_id, vote)))

    def sign_proposal(self, chain_id: bytes, proposal: Proposal) -> bytes:
        self.guard.approve(proposal.height, proposal.round, SignStep.PROPOSAL, proposal.block_hash)
        return self.key.sign(proposal_signing_bytes(chain_id, proposal))
