"""Tendermint consensus for one validator, as sans-I/O state machines (see :mod:`.engine` for the contract).

One module per idea:

* :mod:`.messages` -- the wire: proposals, votes, sync requests and answers.
* :mod:`.config` -- the engine's tunables and step enums.
* :mod:`.events` -- the host contract: events in, actions out (two timer kinds).
* :mod:`.signer` -- a validator's key behind its slashing-protection guard.
* :mod:`.verifier` -- BLS checks with remembered verdicts and batch checks.
* :mod:`.certificate` -- the one check that a commit certificate proves a block.
* :mod:`.precheck` -- who signed a message, as far as a head state can tell (gossip validation).
* :mod:`.height_votes` -- one height's prevotes and precommits, tallied by stake, verified lazily.
* :mod:`.catchup` -- knowing when we are behind, and the sync schedule (its own SYNC timer).
* :mod:`.pacing` -- early blocks: when a waiting proposer may cut its post-commit pause short.
* :mod:`.engine` -- Algorithm 1's upon-rules over all of the above.

Every name is re-exported here, so ``from ledger.consensus import X`` works for all of them.
"""

from __future__ import annotations

from ledger.consensus.catchup import CatchUp, Claim, ClaimJudge, SyncPurpose
from ledger.consensus.certificate import CertificateVerifier, certificate_problem, verify_finalized_block
from ledger.consensus.config import ConsensusConfig, Step, TimeoutStep
from ledger.consensus.engine import BlockComputations, ConsensusEngine, TxSource
from ledger.consensus.events import (
    REJECT_REASONS,
    Action,
    BlocksSynced,
    Broadcast,
    Commit,
    Event,
    MessageReceived,
    RejectMessage,
    ReportEvidence,
    RequestSync,
    ScheduleSync,
    ScheduleTimeout,
    SyncTimerFired,
    TimeoutFired,
    Timer,
    TxsAvailable,
    make_evidence_tx,
)
from ledger.consensus.height_votes import HeightVotes, VoteEntry
from ledger.consensus.messages import (
    CONSENSUS_MESSAGES,
    MAX_SYNC_BLOCKS,
    PolRound,
    Proposal,
    SignedProposal,
    SyncRequest,
    SyncResponse,
    VoteMessage,
    proposal_signing_bytes,
)
from ledger.consensus.pacing import BlockPacer
from ledger.consensus.precheck import UNKNOWN_COMMITTEE, VOTE_STEPS, message_height, precheck_message, signer_problem
from ledger.consensus.signer import ValidatorSigner
from ledger.consensus.verifier import MAX_REMEMBERED_CERTIFICATES, SignatureVerifier

__all__ = [
    "CONSENSUS_MESSAGES",
    "MAX_REMEMBERED_CERTIFICATES",
    "MAX_SYNC_BLOCKS",
    "REJECT_REASONS",
    "UNKNOWN_COMMITTEE",
    "VOTE_STEPS",
    "Action",
    "BlockComputations",
    "BlockPacer",
    "BlocksSynced",
    "Broadcast",
    "CatchUp",
    "CertificateVerifier",
    "Claim",
    "ClaimJudge",
    "Commit",
    "ConsensusConfig",
    "ConsensusEngine",
    "Event",
    "HeightVotes",
    "MessageReceived",
    "PolRound",
    "Proposal",
    "RejectMessage",
    "ReportEvidence",
    "RequestSync",
    "ScheduleSync",
    "ScheduleTimeout",
    "SignatureVerifier",
    "SignedProposal",
    "Step",
    "SyncPurpose",
    "SyncRequest",
    "SyncResponse",
    "SyncTimerFired",
    "TimeoutFired",
    "TimeoutStep",
    "Timer",
    "TxSource",
    "TxsAvailable",
    "ValidatorSigner",
    "VoteEntry",
    "VoteMessage",
    "certificate_problem",
    "make_evidence_tx",
    "message_height",
    "precheck_message",
    "proposal_signing_bytes",
    "signer_problem",
    "verify_finalized_block",
]
