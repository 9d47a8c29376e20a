"""Who signed a consensus message, as far as a node's head state can tell.

The gossip validator runs :func:`precheck_message` before relaying; the
engine runs :func:`signer_problem` on a message that would prove a new height.
"""

from __future__ import annotations

from ledger import exceptions as ex
from ledger.codec import Record
from ledger.committee import compute_proposer, vote_signing_bytes
from ledger.consensus.messages import SignedProposal, VoteMessage, proposal_signing_bytes
from ledger.consensus.verifier import SignatureVerifier
from ledger.state import State
from ledger.transition import committee_for_height
from ledger.votes import VoteStep

__all__ = ["UNKNOWN_COMMITTEE", "VOTE_STEPS", "message_height", "precheck_message", "signer_problem"]

VOTE_STEPS = frozenset((VoteStep.PREVOTE, VoteStep.PRECOMMIT))
"""The steps a gossiped vote may have."""

UNKNOWN_COMMITTEE = "unknown_committee"
"""What :func:`signer_problem` says of a height whose committee ``state`` does not know (not a rejection)."""


def message_height(message: object) -> int | None:
    """The consensus height a proposal or vote is for; None for anything else (:func:`precheck_message` refuses it)."""
    if isinstance(message, SignedProposal):
        return message.proposal.height
    if isinstance(message, VoteMessage):
        return message.signed.vote.height
    return None


def precheck_message(state: State, message: Record, verifier: SignatureVerifier) -> str | None:
    """What a node at head ``state`` can say about a consensus message before relaying it.

    A gossip validator runs this, so a message that fails is neither delivered
    nor forwarded. It checks who signed, wherever the height's committee is
    known: a vote must come from a member, a proposal from the proposer of its
    (height, round) with a valid signature (one BLS check per proposal, cached
    for the engine). Vote signatures are left to the engine, which checks them
    lazily and in aggregate, and reports a forged one when it finds it.
    Returns the rejection reason (one of :data:`~ledger.consensus.events.REJECT_REASONS`), or None: the
    message may be fine, or is old or too far ahead to tell (the node's validator ignores heights below its
    head before asking: ``p2pgpu.consensus_driver.validate_consensus_message``).
    """
    height = message_height(message)
    if height is None:
        return "not_consensus_message"
    if isinstance(message, VoteMessage) and message.signed.vote.step not in VOTE_STEPS:
        return "unknown_vote_step"
    if height <= state.height:
        return None  # old news: the engine drops it, and a late copy is nobody's fault
    problem = signer_problem(state, message, verifier, vote_signature=False)
    return None if problem == UNKNOWN_COMMITTEE else problem


def signer_problem(state: State, message: Record, verifier: SignatureVerifier, *, vote_signature: bool) -> str | None:
    """Whether a proposal or vote is signed by whom its height's committee says should sign it.

    A proposal must come from the proposer of its (height, round) with a valid
    signature; a vote from a member, with a valid signature if
    ``vote_signature`` (one BLS check: the relay skips it, the engine pays it
    only for a message that would prove a new height). Returns None (it is),
    a :data:`~ledger.consensus.events.REJECT_REASONS` label (it is not), or :data:`UNKNOWN_COMMITTEE`:
    the height is in an epoch ``state`` cannot tell, so the message proves
    nothing either way.
    """
    if isinstance(message, SignedProposal):
        height = message.proposal.height
    elif isinstance(message, VoteMessage):
        height = message.signed.vote.height
    else:
        return "not_consensus_message"
    try:
        committee = committee_for_height(state, height)
    except ex.InvalidBlock:
        return UNKNOWN_COMMITTEE
    if isinstance(message, VoteMessage):
        sv = message.signed
        member = next((m for m in committee.members if m.address == sv.validator), None)
        if member is None:
            return "not_validator"
        if vote_signature and not verifier.verify(
            member.bls_pubkey, vote_signing_bytes(state.chain_id, sv.vote), sv.signature
        ):
            return "bad_signature"
        return None
    p = message.proposal
    expected = compute_proposer(committee, height, p.round)
    if message.proposer != expected:
        return "not_proposer"
    pk = next(m.bls_pubkey for m in committee.members if m.address == expected)
    if not verifier.verify(pk, proposal_signing_bytes(state.chain_id, p), message.signature):
        return "bad_signature"
    return None
