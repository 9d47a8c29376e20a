"""Tendermint consensus for one validator, as a sans-I/O state machine.

This is Algorithm 1 of Buchman, Kwon and Milosevic, "The latest gossip on
BFT consensus" (2018): rounds of propose → prevote → precommit, with a
locked value/round (never prevote against a lock unless a later polka
justifies it) and a valid value/round (re-propose the newest block that had a
polka), timeouts that grow per round, and "f+1 messages from a later round"
round skipping. Quorums are by stake: "2f+1" is strictly more than 2/3 of the
committee's stake, "f+1" strictly more than 1/3.

Contract with the host (the Trio node, or :mod:`devnet.sim`)
-------------------------------------------------------------

The engine has no I/O and no clock. The host calls::

    engine = ConsensusEngine(config, state, last_certificate, signer=..., txs=mempool, verifier=...)
    actions = engine.start(now_ms=...)
    actions = engine.handle(event, now_ms=...)

and performs the returned actions **in order**:

* :class:`Broadcast` -- gossip ``message`` (a member of
  :data:`CONSENSUS_MESSAGES`) on ``/consensus``. Every vote or proposal in
  a Broadcast was approved by the :class:`~ledger.signer_guard.SignerGuard`,
  which persisted the signed position *before* the engine got the
  signature, so the host needs no ordering of its own for slashing safety.
* :class:`ScheduleTimeout` -- after ``delay_s`` feed back
  ``TimeoutFired(height, round, step)``. Stale timeouts are ignored, so the
  host never needs to cancel one.
* :class:`Commit` -- block ``finalized.block`` is final with
  ``finalized.certificate``; ``state`` is the ledger state after it. Persist
  it (``ChainStore.append_block``) and update the mempool. The engine has
  already moved to the next height.
* :class:`ReportEvidence` -- two valid conflicting votes by one validator:
  wrap them in an :class:`~ledger.transactions.Evidence` transaction (see
  :func:`make_evidence_tx`) and submit it to the mempool.
* :class:`RequestSync` -- peers are ahead: ask one (``peer`` is a hint, the
  one whose message showed it) for up to ``max_blocks`` finalized blocks from
  ``from_height`` and feed the answer back as :class:`BlocksSynced`; an empty
  one if no peer had any.
* :class:`RejectMessage` -- a message (from ``peer``) was invalid; lower the
  peer's score. ``reason`` is a short stable label (one of
  :data:`REJECT_REASONS`, fit for a metric label), ``detail`` says what was
  wrong in words. A vote stored unchecked can be found forged later, while
  another message is handled: its sender is reported then.

Events: :class:`MessageReceived` (a decoded consensus message),
:class:`TimeoutFired`, :class:`BlocksSynced`, and :class:`TxsAvailable`
(send it when a transaction is admitted, and after a commit's mempool update
if executable transactions remain). Transactions are pulled from the
injected :class:`TxSource` (the mempool) when this validator proposes.
``now_ms`` stamps blocks (informational) and paces early blocks: a proposer
with transactions waiting ends its post-commit pause after
``min_commit_pause_s`` (and ``tx_batch_s`` after the first transaction),
as long as its last ``pace_window`` commits stay ``timeout_commit_s`` apart
on average (see :class:`ConsensusConfig`).

Signatures: a received vote is stored unverified; it is checked only when it
is about to matter (a quorum is crossed, or it conflicts with another vote).
Then all pending votes on the same message are checked with one batch check
(:meth:`ledger.bls.BLSBackend.batch_verify`: a random linear combination, so
two forged signatures whose errors cancel cannot pass together, as they would
in a plain aggregate), and one by one only if that fails, so the batch path
is the common one. :class:`SignatureVerifier` caches verdicts per
(public key, message, signature) in a bounded LRU; the simulator shares one
across all its engines in a process, so each distinct vote is checked once.

Messages for the next height are buffered and replayed after the commit;
messages from further ahead trigger block sync. A periodic rebroadcast of the
engine's own current proposal and votes stands in for gossip's eventual
delivery when links drop messages.

Knowing when we are behind
--------------------------

A height counts as *seen* (:attr:`ConsensusEngine.highest_seen_height`, which
the node's health reports) only on proof: a message for it signed by whom
that height's committee says should sign it (checked once, when it would
raise the figure; a forgery is rejected), a certificate that verifies, or a
precommit quorum for a block we lack. A message for a height whose committee
we do not know (a later epoch) proves nothing: it is kept as an unproven
*claim* (the highest one only), which may start sync requests, but at most
``max_claim_requests`` of them, spaced by a backoff that only a sync that
delivers a full batch (we really are far behind) or a claim later proven
resets; then the claim is dropped. A claim is checked as soon as our state
knows its committee: proven, it counts; forged, its sender is reported.
Sync requests that bring nothing back off exponentially (``sync_retry_s``
doubling up to ``sync_retry_max_s``), so nothing, proven or not, makes a
node poll its peers in a tight loop.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Protocol, Union

from ledger import exceptions as ex
from ledger.blocks import Block, FinalizedBlock
from ledger.codec import U16, U32, U64, Address, Hash32, Int, ListOf, Nested, Record, RecordUnion, encode, record
from ledger.committee import compute_proposer, has_quorum, verify_certificate, vote_signing_bytes
from ledger.keys import AccountKey, ValidatorKey
from ledger.signer_guard import SignerGuard, SignRefused, SignStep
from ledger.signing import Domain, signing_bytes
from ledger.state import Committee, EvidenceKey, State
from ledger.transactions import Evidence, SignedTransaction
from ledger.transition import apply_block, build_block, committee_for_height, tx_signing_bytes
from ledger.votes import (
    NIL_BLOCK,
    BLSSignature,
    CommitCertificate,
    SignedVote,
    Vote,
    VoteStep,
    bitfield_from_indices,
)

__all__ = [
    "CONSENSUS_MESSAGES",
    "Action",
    "BlocksSynced",
    "Broadcast",
    "Commit",
    "ConsensusConfig",
    "ConsensusEngine",
    "Event",
    "MessageReceived",
    "Proposal",
    "REJECT_REASONS",
    "RejectMessage",
    "ReportEvidence",
    "RequestSync",
    "ScheduleTimeout",
    "SignatureVerifier",
    "SignedProposal",
    "Step",
    "SyncRequest",
    "SyncResponse",
    "TimeoutFired",
    "TimeoutStep",
    "TxSource",
    "TxsAvailable",
    "ValidatorSigner",
    "BlockComputations",
    "VoteMessage",
    "make_evidence_tx",
    "UNKNOWN_COMMITTEE",
    "precheck_message",
    "proposal_signing_bytes",
    "signer_problem",
]

_VOTE_STEPS = frozenset((VoteStep.PREVOTE, VoteStep.PRECOMMIT))
_PRECOMMIT = VoteStep.PRECOMMIT

# ============================================================ wire messages

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


# ============================================================ configuration


@dataclass(frozen=True, slots=True)
class ConsensusConfig:
    timeout_propose_s: float = 0.3
    timeout_propose_delta_s: float = 0.15
    timeout_prevote_s: float = 0.1
    timeout_prevote_delta_s: float = 0.05
    timeout_precommit_s: float = 0.1
    timeout_precommit_delta_s: float = 0.05
    rebroadcast_s: float = 0.5  # re-send own proposal and votes while a round lasts (lossy links)
    sync_wait_s: float = 0.2  # how long next-height messages may precede our own commit before we sync
    max_block_txs: int = 1000
    max_block_bytes: int = 4 << 20
    max_buffered_messages: int = 4096  # next-height messages held until we commit
    max_round_ahead: int = 64  # votes further ahead than this are dropped
    sync_batch: int = 64  # blocks per sync request; a full batch back means we are further behind
    sync_retry_s: float = 0.5  # a sync request that brought nothing is retried after this, doubling each time
    sync_retry_max_s: float = 10.0  # ... up to this
    max_claim_requests: int = 4  # sync requests an unproven claim (unknown committee) may cause before it is dropped
    # Tendermint's timeout_commit: after a commit the next proposer waits this long before proposing,
    # which paces blocks (deadlines are counted in blocks) and lets transactions gather. 0 = no pause.
    timeout_commit_s: float = 0.0
    # Early blocks: with executable transactions waiting, the proposer may propose as soon as
    # ``min_commit_pause_s`` after the commit, instead of ``timeout_commit_s``, provided the last
    # ``pace_window`` blocks (by this node's commit times) still average at least ``timeout_commit_s``
    # apart. Latency borrows the time consensus itself took; the pace of blocks is kept.
    # ``min_commit_pause_s >= timeout_commit_s`` or ``pace_window = 0`` turns it off.
    min_commit_pause_s: float = 0.0
    pace_window: int = 0
    # ... and not before ``tx_batch_s`` after the first transaction became available at this height, so a
    # burst of related transactions (a PostTask, then its Assign once bids are in) shares one block.
    tx_batch_s: float = 0.0

    @property
    def early_blocks(self) -> bool:
        """Whether a proposer with transactions waiting may end its post-commit pause early."""
        return self.pace_window > 0 and self.min_commit_pause_s < self.timeout_commit_s

    def timeout_propose(self, round_: int) -> float:
        return self.timeout_propose_s + round_ * self.timeout_propose_delta_s

    def timeout_prevote(self, round_: int) -> float:
        return self.timeout_prevote_s + round_ * self.timeout_prevote_delta_s

    def timeout_precommit(self, round_: int) -> float:
        return self.timeout_precommit_s + round_ * self.timeout_precommit_delta_s


class Step(enum.IntEnum):
    PROPOSE = 0
    PREVOTE = 1
    PRECOMMIT = 2


class TimeoutStep(enum.IntEnum):
    PROPOSE = 0
    PREVOTE = 1
    PRECOMMIT = 2
    REBROADCAST = 3
    SYNC = 4  # the sync schedule is due; its ``round`` is the schedule's generation, not a consensus round
    COMMIT = 5  # the pause after a commit is over: the proposer of round 0 proposes


# ============================================================ events and actions


@dataclass(frozen=True, slots=True)
class MessageReceived:
    message: Record  # SignedProposal or VoteMessage
    peer: str | None = None


@dataclass(frozen=True, slots=True)
class TimeoutFired:
    height: int
    round: int
    step: TimeoutStep


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


Event = Union[MessageReceived, TimeoutFired, BlocksSynced, TxsAvailable]


@dataclass(frozen=True, slots=True)
class Broadcast:
    message: Record


@dataclass(frozen=True, slots=True)
class ScheduleTimeout:
    height: int
    round: int
    step: TimeoutStep
    delay_s: float


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


Action = Union[Broadcast, ScheduleTimeout, Commit, ReportEvidence, RequestSync, RejectMessage]


# ============================================================ collaborators


class BlockComputations:
    """The pure functions of blocks and committees the engine calls, gathered so a host can share them.

    A real node computes each of these once per block for itself. A host running many engines in one
    process (:mod:`devnet.sim`) injects one instance that remembers results for all of them
    (:class:`devnet.shared_exec.SharedComputations`), since every engine meets the same blocks; each
    method must then stay a pure function of its arguments.
    """

    def execute(self, state: State, block: Block) -> State:
        """The post-state of ``block`` on ``state``, or :class:`~ledger.exceptions.LedgerError`.

        ``last_commit`` is not checked here: the engine verifies it first, through its (caching)
        :class:`SignatureVerifier`.
        """
        return apply_block(state, block, check_last_commit=False)

    def block_hash(self, block: Block) -> bytes:
        return block.block_hash()

    def proposer(self, committee: Committee, height: int, round_: int) -> bytes:
        return compute_proposer(committee, height, round_)


class TxSource(Protocol):
    """Where a proposer gets transactions (the mempool)."""

    def reap(self, max_txs: int, max_bytes: int) -> list[SignedTransaction]: ...

    def has_ready(self) -> bool: ...

    def discard_rejected(self, rejected: Iterable[tuple[SignedTransaction, ex.InvalidTransaction]]) -> int: ...


@dataclass
class ValidatorSigner:
    """A validator's BLS key behind its slashing-protection guard: nothing is signed without approval."""

    address: bytes
    key: ValidatorKey
    guard: SignerGuard

    def sign_vote(self, chain_id: bytes, vote: Vote) -> SignedVote:
        self.guard.approve(vote.height, vote.round, SignStep(vote.step), vote.block_hash)
        return SignedVote(vote=vote, validator=self.address, signature=self.key.sign(vote_signing_bytes(chain_id, vote)))

    def sign_proposal(self, chain_id: bytes, proposal: Proposal) -> bytes:
        self.guard.approve(proposal.height, proposal.round, SignStep.PROPOSAL, proposal.block_hash)
        return self.key.sign(proposal_signing_bytes(chain_id, proposal))


MAX_REMEMBERED_CERTIFICATES = 4096
"""Certificate verdicts a :class:`SignatureVerifier` keeps (least recently used go first)."""


class SignatureVerifier:
    """BLS checks with a bounded LRU of verdicts per (public key, message, signature).

    ``verify_same_message`` is the hot path: one batch check for the votes on
    one message, individual checks only if it fails. A vote is cached as
    valid only on a verdict that speaks for its own signature: a single
    check, or a random-linear-combination batch (never a plain aggregate,
    which two invalid signatures summing to a valid one would pass).
    """

    def __init__(self, backend: object | None = None, cache_size: int = 200_000) -> None:
        from ledger.bls import get_backend

        self.backend = backend if backend is not None else get_backend()
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[bytes, bytes, bytes], bool] = OrderedDict()
        self._certs: OrderedDict[bytes, bool] = OrderedDict()
        # committee hashes by object identity (the object is kept, so its id cannot be reused): hashing
        # a committee encodes every member, and each engine asks for the same few committees
        self._committee_hashes: OrderedDict[int, tuple[Committee, bytes]] = OrderedDict()
        self.single_checks = 0
        self.aggregate_checks = 0
        self.aggregate_failures = 0
        self.cache_hits = 0

    def _get(self, key: tuple[bytes, bytes, bytes]) -> bool | None:
        verdict = self._cache.get(key)
        if verdict is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
        return verdict

    def _put(self, key: tuple[bytes, bytes, bytes], verdict: bool) -> None:
        self._cache[key] = verdict
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def aggregate(self, sigs: Sequence[bytes]) -> bytes:
        """Aggregate signatures (for a certificate); raises :class:`ledger.bls.BLSInputError` on a malformed one.

        The blspy backend keeps decompressed signatures in a bounded cache, so
        a vote decoded for its batch check is not decoded again here.
        """
        return self.backend.aggregate(sigs)  # type: ignore[attr-defined]

    def verify(self, pk: bytes, msg: bytes, sig: bytes) -> bool:
        key = (pk, msg, sig)
        verdict = self._get(key)
        if verdict is None:
            self.single_checks += 1
            verdict = bool(self.backend.verify(pk, msg, sig))  # type: ignore[attr-defined]
            self._put(key, verdict)
        return verdict

    def verify_same_message(self, msg: bytes, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """Verdicts for (pk, sig) pairs all signing ``msg``: one batch check, singles if it fails.

        The batch check is :meth:`ledger.bls.BLSBackend.batch_verify`, which
        weights each signature by a secret random 64-bit scalar: it passes
        only if every signature is valid on its own (except with probability
        2^-64), so a pass may be cached per vote. A plain FastAggregateVerify
        of the summed signatures could not be: ``S_A + P`` and ``S_B - P``
        sum to a valid aggregate while neither is a signature.
        """
        out: list[bool | None] = [self._get((pk, msg, sig)) for pk, sig in items]
        todo = [i for i, v in enumerate(out) if v is None]
        if len(todo) >= 2:
            self.aggregate_checks += 1
            ok = bool(self.backend.batch_verify(  # type: ignore[attr-defined]
                [items[i][0] for i in todo], msg, [items[i][1] for i in todo]))
            if ok:
                for i in todo:
                    out[i] = True
                    self._put((items[i][0], msg, items[i][1]), True)
                todo = []
            else:
                self.aggregate_failures += 1
        for i in todo:
            out[i] = self.verify(items[i][0], msg, items[i][1])
        return [bool(v) for v in out]

    def _committee_hash(self, committee: Committee) -> bytes:
        hit = self._committee_hashes.get(id(committee))
        if hit is not None and hit[0] is committee:
            return hit[1]
        digest = committee.committee_hash()
        self._committee_hashes[id(committee)] = (committee, digest)
        while len(self._committee_hashes) > 64:
            self._committee_hashes.popitem(last=False)
        return digest

    def _certificate_key(self, committee: Committee, chain_id: bytes, cert: CommitCertificate, height: int,
                         block_hash: bytes) -> bytes:
        return self._committee_hash(committee) + chain_id + encode(cert) + height.to_bytes(8, "big") + block_hash

    def note_valid_certificate(
        self, committee: Committee, chain_id: bytes, cert: CommitCertificate, *, height: int, block_hash: bytes
    ) -> None:
        """Remember a certificate the caller aggregated itself from signatures this verifier accepted."""
        self._remember_certificate(self._certificate_key(committee, chain_id, cert, height, block_hash), True)

    def _remember_certificate(self, key: bytes, valid: bool) -> None:
        self._certs[key] = valid
        self._certs.move_to_end(key)
        while len(self._certs) > MAX_REMEMBERED_CERTIFICATES:
            self._certs.popitem(last=False)

    def verify_certificate(
        self, committee: Committee, chain_id: bytes, cert: CommitCertificate, *, height: int, block_hash: bytes
    ) -> None:
        """:func:`ledger.committee.verify_certificate`, remembered (raises InvalidCertificate)."""
        key = self._certificate_key(committee, chain_id, cert, height, block_hash)
        if key in self._certs:
            self._certs.move_to_end(key)
            self.cache_hits += 1
            if not self._certs[key]:
                raise ex.InvalidCertificate(f"height {cert.height}: certificate already found invalid")
            return
        try:
            self.aggregate_checks += 1
            verify_certificate(committee, chain_id, cert, height=height, block_hash=block_hash)
        except ex.InvalidCertificate:
            self._remember_certificate(key, False)
            raise
        self._remember_certificate(key, True)


def make_evidence_tx(
    key: AccountKey, chain_id: bytes, nonce: int, fee: int, vote_a: SignedVote, vote_b: SignedVote
) -> SignedTransaction:
    """The Evidence transaction a reporter submits for a :class:`ReportEvidence` action."""
    body = Evidence(sender=key.address, nonce=nonce, fee=fee, vote_a=vote_a, vote_b=vote_b)
    return SignedTransaction(body=body, public_key=key.public_key, signature=key.sign(tx_signing_bytes(chain_id, body)))


def precheck_message(state: State, message: Record, verifier: SignatureVerifier) -> str | None:
    """What a node at head ``state`` can say about a consensus message before relaying it.

    A gossip validator runs this, so a message that fails is neither delivered
    nor forwarded. It checks who signed, wherever the height's committee is
    known: a vote must come from a member, a proposal from the proposer of its
    (height, round) with a valid signature (one BLS check per proposal, cached
    for the engine). Vote signatures are left to the engine, which checks them
    lazily and in aggregate, and reports a forged one when it finds it.
    Returns the rejection reason (one of :data:`REJECT_REASONS`), or None: the
    message may be fine, or is old or too far ahead to tell.
    """
    if isinstance(message, SignedProposal):
        height = message.proposal.height
    elif isinstance(message, VoteMessage):
        height = message.signed.vote.height
        if message.signed.vote.step not in _VOTE_STEPS:
            return "unknown_vote_step"
    else:
        return "not_consensus_message"
    if height <= state.height:
        return None  # old news: the engine drops it, and a late copy is nobody's fault
    problem = signer_problem(state, message, verifier, vote_signature=False)
    return None if problem == UNKNOWN_COMMITTEE else problem


UNKNOWN_COMMITTEE = "unknown_committee"
"""What :func:`signer_problem` says of a height whose committee ``state`` does not know (not a rejection)."""


def signer_problem(state: State, message: Record, verifier: SignatureVerifier, *, vote_signature: bool) -> str | None:
    """Whether a proposal or vote is signed by whom its height's committee says should sign it.

    A proposal must come from the proposer of its (height, round) with a valid
    signature; a vote from a member, with a valid signature if
    ``vote_signature`` (one BLS check: the relay skips it, the engine pays it
    only for a message that would prove a new height). Returns None (it is),
    a :data:`REJECT_REASONS` label (it is not), or :data:`UNKNOWN_COMMITTEE`:
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


# ============================================================ votes of one height


class _Entry:
    __slots__ = ("signed", "msg", "stake", "verified", "peer")

    def __init__(self, signed: SignedVote, msg: bytes, stake: int, verified: bool, peer: str | None) -> None:
        self.signed = signed
        self.msg = msg
        self.stake = stake
        self.verified = verified
        self.peer = peer  # who sent it: charged if the signature turns out bad


class _RoundStepVotes:
    """Votes of one (round, step): each validator counted once, by its first not-disproved vote."""

    __slots__ = ("by_validator", "tally", "total")

    def __init__(self) -> None:
        self.by_validator: dict[bytes, list[_Entry]] = {}
        self.tally: dict[bytes, int] = {}
        self.total = 0

    def counted(self) -> Iterable[_Entry]:
        for entries in self.by_validator.values():
            yield entries[0]


class HeightVotes:
    """Prevotes and precommits for one height, over that height's committee."""

    MAX_ENTRIES_PER_SLOT = 2  # enough to prove an equivocation

    def __init__(
        self,
        chain_id: bytes,
        height: int,
        committee: Committee,
        verifier: SignatureVerifier,
        forgers: list[str | None] | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.height = height
        self.committee = committee
        self.total_stake = committee.total_stake
        self.members = {m.address: (i, m) for i, m in enumerate(committee.members)}
        self.verifier = verifier
        self.slots: dict[tuple[int, int], _RoundStepVotes] = {}
        self._precommit_slots: list[tuple[int, _RoundStepVotes]] = []  # checked after every message
        # signing bytes per distinct vote: a height has a handful of distinct votes and hundreds of signers
        self._signing: dict[tuple[int, int, int, bytes], bytes] = {}
        self.round_stake: dict[int, dict[bytes, int]] = {}  # round -> validator -> stake (any message)
        self.drops = 0  # entries dropped after a failed check (see ConsensusEngine._advance)
        # senders of the dropped entries, for the engine to report (a list it owns: it outlives this height)
        self.forgers: list[str | None] = forgers if forgers is not None else []

    def slot(self, round_: int, step: int) -> _RoundStepVotes:
        s = self.slots.get((round_, step))
        if s is None:
            s = self.slots[(round_, step)] = _RoundStepVotes()
            if step == _PRECOMMIT:
                self._precommit_slots.append((round_, s))
        return s

    def add(self, sv: SignedVote, *, verified: bool = False, peer: str | None = None) -> tuple[str, _Entry | None]:
        """Store a vote. Returns (outcome, other): outcome in new/duplicate/invalid/conflict/full."""
        member = self.members.get(sv.validator)
        if member is None:
            return "not_member", None
        stake = member[1].stake
        vote = sv.vote
        slot = self.slot(vote.round, vote.step)
        entries = slot.by_validator.get(sv.validator)
        key = (vote.height, vote.round, vote.step, vote.block_hash)
        msg = self._signing.get(key)
        if msg is None:
            msg = self._signing[key] = vote_signing_bytes(self.chain_id, vote)
        entry = _Entry(sv, msg, stake, verified, peer)
        if not entries:
            slot.by_validator[sv.validator] = [entry]
            slot.tally[vote.block_hash] = slot.tally.get(vote.block_hash, 0) + stake
            slot.total += stake
            participants = self.round_stake.get(vote.round)
            if participants is None:
                participants = self.round_stake[vote.round] = {}
            participants[sv.validator] = stake
            return "new", None
        for e in entries:
            if e.signed.vote.block_hash == vote.block_hash:
                if e.signed.signature == sv.signature:
                    return "duplicate", None
                # BLS is deterministic: a different signature on the same vote is a forgery (or ours is)
                if not self.verifier.verify(member[1].bls_pubkey, msg, sv.signature):
                    return "invalid", None
                if not e.verified and not self._check(e):
                    self._drop(slot, sv.validator, e)
                    return self.add(sv, verified=True, peer=peer)
                return "duplicate", None
        # a different block from the same validator in the same (round, step): check both now
        if not verified and not self.verifier.verify(member[1].bls_pubkey, msg, sv.signature):
            return "invalid", None
        entry.verified = True
        first = entries[0]
        if not first.verified and not self._check(first):
            self._drop(slot, sv.validator, first)
            return self.add(sv, verified=True, peer=peer)
        if len(entries) >= self.MAX_ENTRIES_PER_SLOT:
            return "full", None
        entries.append(entry)
        return "conflict", first

    def _check(self, e: _Entry) -> bool:
        pk = self.members[e.signed.validator][1].bls_pubkey
        e.verified = self.verifier.verify(pk, e.msg, e.signed.signature)
        return e.verified

    def _drop(self, slot: _RoundStepVotes, validator: bytes, e: _Entry) -> None:
        """Forget an entry whose signature failed its check."""
        self.drops += 1
        self.forgers.append(e.peer)
        entries = slot.by_validator[validator]
        was_counted = entries[0] is e
        entries.remove(e)
        if was_counted:
            h = e.signed.vote.block_hash
            slot.tally[h] -= e.stake
            slot.total -= e.stake
            if entries:
                nxt = entries[0].signed.vote.block_hash
                slot.tally[nxt] = slot.tally.get(nxt, 0) + e.stake
                slot.total += e.stake
            else:
                del slot.by_validator[validator]
                r = e.signed.vote.round
                if not any(
                    validator in self.slots[(r, s)].by_validator for s in (1, 2) if (r, s) in self.slots
                ):
                    self.round_stake.get(r, {}).pop(validator, None)

    def _verify_pending(self, slot: _RoundStepVotes, block_hash: bytes | None) -> None:
        """Verify every counted, unverified entry (for ``block_hash``, or all), aggregate first."""
        groups: dict[bytes, list[tuple[bytes, _Entry]]] = {}
        for validator, entries in slot.by_validator.items():
            e = entries[0]
            if e.verified or (block_hash is not None and e.signed.vote.block_hash != block_hash):
                continue
            groups.setdefault(e.msg, []).append((validator, e))
        for msg, items in groups.items():
            pks = [(self.members[v][1].bls_pubkey, e.signed.signature) for v, e in items]
            verdicts = self.verifier.verify_same_message(msg, pks)
            for (validator, e), ok in zip(items, verdicts):
                if ok:
                    e.verified = True
                else:
                    self._drop(slot, validator, e)

    def quorum_for(self, round_: int, step: int, block_hash: bytes) -> bool:
        slot = self.slots.get((round_, step))
        if slot is None or not has_quorum(slot.tally.get(block_hash, 0), self.total_stake):
            return False
        self._verify_pending(slot, block_hash)
        return has_quorum(slot.tally.get(block_hash, 0), self.total_stake)

    def quorum_any(self, round_: int, step: int) -> bool:
        slot = self.slots.get((round_, step))
        if slot is None or not has_quorum(slot.total, self.total_stake):
            return False
        self._verify_pending(slot, None)
        return has_quorum(slot.total, self.total_stake)

    def round_participation(self, round_: int) -> int:
        return sum(self.round_stake.get(round_, {}).values())

    def verify_round(self, round_: int) -> None:
        for step in (VoteStep.PREVOTE, VoteStep.PRECOMMIT):
            slot = self.slots.get((round_, step))
            if slot is not None:
                self._verify_pending(slot, None)

    def blocks_with_precommits(self) -> list[tuple[int, bytes]]:
        """(round, block) pairs whose precommit tally (pending included) crosses 2/3."""
        out = []
        total_stake = self.total_stake
        for r, slot in self._precommit_slots:
            # a block's tally is part of the slot's total: below quorum, no block in it can have one
            if not has_quorum(slot.total, total_stake):
                continue
            for h, stake in slot.tally.items():
                if h != NIL_BLOCK and has_quorum(stake, self.total_stake):
                    out.append((r, h))
        if len(out) > 1:
            out.sort()
        return out

    def certificate(self, round_: int, block_hash: bytes) -> CommitCertificate:
        """Aggregate the verified precommits for (round, block) into a commit certificate."""
        slot = self.slots[(round_, VoteStep.PRECOMMIT)]
        indices, sigs = [], []
        for validator, entries in slot.by_validator.items():
            e = entries[0]
            if e.verified and e.signed.vote.block_hash == block_hash:
                indices.append(self.members[validator][0])
                sigs.append((self.members[validator][0], e.signed.signature))
        sigs.sort()
        return CommitCertificate(
            height=self.height,
            round=round_,
            block_hash=block_hash,
            signers=bitfield_from_indices(indices, len(self.committee.members)),
            aggregate_signature=self.verifier.aggregate([s for _, s in sigs]),
        )

    def own_votes(self, address: bytes, round_: int) -> list[SignedVote]:
        out = []
        for step in (VoteStep.PREVOTE, VoteStep.PRECOMMIT):
            slot = self.slots.get((round_, step))
            if slot is not None and address in slot.by_validator:
                out.append(slot.by_validator[address][0].signed)
        return out


# ============================================================ the engine


@dataclass
class _BlockVerdict:
    post: State | None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class _Claim:
    """An unproven sign that the network is at consensus height ``height``: ``message`` (a vote, proposal or
    finalized block) from ``peer``, for a height whose committee we do not know yet."""

    height: int
    peer: str | None
    message: Record


class ConsensusEngine:
    """One validator's (or observer's) view of consensus. See the module docstring for the contract."""

    def __init__(
        self,
        config: ConsensusConfig,
        state: State,
        last_certificate: CommitCertificate | None,
        *,
        signer: ValidatorSigner | None = None,
        txs: TxSource | None = None,
        verifier: SignatureVerifier | None = None,
        computations: BlockComputations | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.computations = computations if computations is not None else BlockComputations()
        self.last_certificate = last_certificate
        self.signer = signer
        self.txs = txs
        self.verifier = verifier if verifier is not None else SignatureVerifier()
        self.chain_id = state.chain_id
        self.address = signer.address if signer is not None else None
        self.now_ms = 0
        self.refused_signatures = 0
        self.reported: set[EvidenceKey] = set()
        self._forgers: list[str | None] = []  # senders of stored votes later found forged, not yet reported
        self._started = False
        self._settled = False  # the last rules pass left a fixpoint (see _advance)
        # -- knowing when we are behind (see the module docstring); kept across heights
        self._proven = state.height + 1  # the highest consensus height shown by proof
        self._proven_peer: str | None = None  # who showed it: the first peer to ask for blocks
        self._claim: _Claim | None = None  # the highest unproven claim
        self._claim_requests = 0  # sync requests the current claim has caused
        self._claim_stalls = 0  # claim-driven requests since one brought a full batch (the claims' backoff)
        self._sync_stalls = 0  # proof-driven requests since the last commit (their backoff)
        self._sync_timer: str | None = None  # what the pending SYNC timer is for: "proven", "claim", "more"
        self._sync_gen = 0  # generation of the next SYNC timer
        self._sync_timer_gen = -1  # generation of the pending one: a timer of any other is stale when it fires
        self._catching_up = False  # the last sync answer was a full batch: more blocks are waiting
        self._server: str | None = None  # the peer that sent it
        self._answers = 0  # sync answers received (BlocksSynced, solicited)
        self._more_asked = -1  # _answers when we last asked for "the rest": unchanged at the next timer = lost
        self.claims_dropped = 0  # unproven claims given up after max_claim_requests requests
        # -- early blocks (ConsensusConfig.min_commit_pause_s): our commit times of the last pace_window
        # blocks (the newest last), and the height whose early proposal is already scheduled
        self._commit_times: deque[int] = deque(maxlen=max(config.pace_window, 1))
        self._early_scheduled = -1
        self._txs_seen: tuple[int, int] = (-1, 0)  # (height, now_ms) of the first TxsAvailable at that height
        self.early_proposals = 0  # proposals made before timeout_commit_s because transactions waited
        self._reset_height()

    # ------------------------------------------------------------ public API

    @property
    def height(self) -> int:
        return self.state.height + 1

    def start(self, *, now_ms: int = 0) -> list[Action]:
        """Begin consensus at ``state.height + 1`` (after a restart: at the round the guard last signed)."""
        self.now_ms = now_ms
        self._started = True
        out: list[Action] = []
        round_ = 0
        voted = False
        if self.signer is not None:
            last = self.signer.guard.last
            if last is not None and last.height == self.height:
                round_ = last.round
                voted = last.step >= SignStep.PREVOTE
                if last.step == SignStep.PRECOMMIT and last.block_hash != NIL_BLOCK:
                    # we precommitted, hence locked on, that block in this round: keep the lock (by hash)
                    self.locked_hash, self.locked_round = last.block_hash, last.round
        self._start_round(round_, out)
        if voted:
            # We voted in this round and lost the votes and the block with the process. The guard lets us sign
            # those same votes again (should the block come back) but nothing new, and Algorithm 1 leaves a
            # round only on a quorum of votes or of a later round: had enough of the committee restarted like
            # this (devnet down stops every node at once), the round would wait for ever. So we leave it, at
            # the latest, after the timeouts a round without progress takes (line 65's move to round + 1).
            wait = (self.config.timeout_propose(round_) + self.config.timeout_prevote(round_)
                    + self.config.timeout_precommit(round_))
            out.append(ScheduleTimeout(self.height, round_, TimeoutStep.PRECOMMIT, wait))
        self._advance(out)
        return out

    def handle(self, event: Event, *, now_ms: int | None = None) -> list[Action]:
        if now_ms is not None:
            self.now_ms = now_ms
        out: list[Action] = []
        quiet = False
        if isinstance(event, MessageReceived):
            quiet = self._on_message(event.message, event.peer, out)
        elif isinstance(event, TimeoutFired):
            self._on_timeout(event, out)
        elif isinstance(event, BlocksSynced):
            self._on_synced(event, out)
        elif isinstance(event, TxsAvailable):
            self._maybe_propose_early(out)
            quiet = True
        else:
            raise TypeError(f"unknown consensus event {type(event).__name__}")
        if self._started and not (quiet and self._settled):
            self._advance(out)
        if self._forgers:
            out.extend(RejectMessage(p, "bad_signature", "vote signature does not verify") for p in self._forgers)
            self._forgers.clear()
        return out

    # ------------------------------------------------------------ height / round state

    def _reset_height(self) -> None:
        h = self.height
        self.committee = committee_for_height(self.state, h)
        self.votes = HeightVotes(self.chain_id, h, self.committee, self.verifier, self._forgers)
        self._proposers: dict[int, bytes] = {}
        self.round = 0
        self.step = Step.PROPOSE
        self.locked_value: Block | None = None
        self.locked_hash: bytes | None = None
        """The locked block's hash: set with ``locked_value``, or alone for a lock restored from the guard."""
        self.locked_round = -1
        self.valid_value: Block | None = None
        self.valid_round = -1
        self.proposals: dict[int, SignedProposal] = {}
        self.blocks: dict[bytes, Block] = {}
        self.verdicts: dict[bytes, _BlockVerdict] = {}
        self._done: set[tuple[str, int]] = set()  # "for the first time" rules already fired
        self._future: list[tuple[Record, str | None]] = []
        self._member = self.address is not None and any(m.address == self.address for m in self.committee.members)

    @property
    def highest_seen_height(self) -> int:
        """The highest consensus height proven to exist (ours if none is ahead).

        Proof is a message signed by that height's committee, a certificate, or a precommit quorum for a
        block we lack; a claim we cannot check (a later epoch) does not count (see the module docstring).
        """
        return max(self._proven, self.height)

    @property
    def catching_up(self) -> bool:
        """The last sync answer was a full batch: we are behind by more than we have fetched so far."""
        return self._catching_up

    def proposer(self, round_: int) -> bytes:
        p = self._proposers.get(round_)
        if p is None:
            p = self._proposers[round_] = self.computations.proposer(self.committee, self.height, round_)
        return p

    def _start_round(self, round_: int, out: list[Action], *, proposal_delay_s: float = 0.0) -> None:
        self.round = round_
        self.step = Step.PROPOSE
        h = self.height
        out.append(ScheduleTimeout(h, round_, TimeoutStep.REBROADCAST, self.config.rebroadcast_s))
        if self._member and self.proposer(round_) == self.address:
            if proposal_delay_s > 0:
                out.append(ScheduleTimeout(h, round_, TimeoutStep.COMMIT, proposal_delay_s))
            else:
                self._propose_own(round_, out)
        # the proposer schedules it too: if its guard refused to sign, the round must still move on
        out.append(ScheduleTimeout(h, round_, TimeoutStep.PROPOSE, proposal_delay_s + self.config.timeout_propose(round_)))

    def _propose_own(self, round_: int, out: list[Action]) -> None:
        if self.valid_value is not None:
            self._propose(self.valid_value, self.valid_round, out)
        else:
            block = self._build_block(round_)
            if block is not None:
                self._propose(block, -1, out)

    def _build_block(self, round_: int) -> Block | None:
        candidates = self.txs.reap(self.config.max_block_txs, self.config.max_block_bytes) if self.txs else []
        block, post, rejected = build_block(
            self.state,
            candidates,
            proposer=self.address,  # type: ignore[arg-type]
            round_=round_,
            timestamp_ms=self.now_ms,
            last_commit=self.last_certificate,
        )
        if rejected and self.txs is not None:
            self.txs.discard_rejected(rejected)
        bh = self.computations.block_hash(block)
        self.verdicts[bh] = _BlockVerdict(post)
        return block

    def _propose(self, block: Block, pol_round: int, out: list[Action]) -> None:
        assert self.signer is not None
        proposal = Proposal(height=self.height, round=self.round, pol_round=pol_round, block_hash=self.computations.block_hash(block))
        try:
            sig = self.signer.sign_proposal(self.chain_id, proposal)
        except SignRefused:
            self.refused_signatures += 1
            return
        sp = SignedProposal(proposal=proposal, block=block, proposer=self.signer.address, signature=sig)
        self.proposals[self.round] = sp
        self.blocks[proposal.block_hash] = block
        out.append(Broadcast(sp))

    def _vote(self, step: VoteStep, block_hash: bytes, out: list[Action]) -> None:
        """Sign and send a vote (if we are a member and the guard agrees); always moves the step on."""
        if not self._member:
            return
        assert self.signer is not None
        vote = Vote(height=self.height, round=self.round, step=step, block_hash=block_hash)
        try:
            sv = self.signer.sign_vote(self.chain_id, vote)
        except SignRefused:
            self.refused_signatures += 1
            return
        self.votes.add(sv, verified=True)
        out.append(Broadcast(VoteMessage(sv)))

    # ------------------------------------------------------------ block validity

    def _verdict(self, block: Block) -> _BlockVerdict:
        bh = self.computations.block_hash(block)
        v = self.verdicts.get(bh)
        if v is not None:
            return v
        try:
            header = block.header
            if header.height != self.height:
                raise ex.InvalidBlock(f"block is for height {header.height}, not {self.height}")
            if header.height > 1:
                if header.last_commit is None:
                    raise ex.InvalidBlock(f"block {header.height} lacks the previous certificate")
                self.verifier.verify_certificate(
                    committee_for_height(self.state, header.height - 1),
                    self.chain_id,
                    header.last_commit,
                    height=header.height - 1,
                    block_hash=self.state.last_block_hash,
                )
            post = self.computations.execute(self.state, block)
            v = _BlockVerdict(post)
        except ex.LedgerError as exc:
            v = _BlockVerdict(None, f"{type(exc).__name__}: {exc}")
        self.verdicts[bh] = v
        return v

    def _valid(self, block: Block) -> bool:
        return self._verdict(block).post is not None

    # ------------------------------------------------------------ messages

    def _on_message(self, message: Record, peer: str | None, out: list[Action]) -> bool:
        """Take in a message. True if it is *quiet*: it changed nothing an upon-rule reads, or nothing that
        could make one fire (see :meth:`_advance`)."""
        if isinstance(message, SignedProposal):
            height, round_ = message.proposal.height, message.proposal.round
        elif isinstance(message, VoteMessage):
            height, round_ = message.signed.vote.height, message.signed.vote.round
        else:
            out.append(RejectMessage(peer, "not_consensus_message", f"a {type(message).__name__}"))
            return False
        current = self.state.height + 1  # self.height
        if height < current:
            return True  # old news; not misbehaviour (gossip delivers late)
        if height > current:
            self._on_future(message, height, peer, out)
            return False
        if round_ > self.round + self.config.max_round_ahead:
            return True
        if isinstance(message, SignedProposal):
            self._on_proposal(message, peer, out)
            return False
        return self._on_vote(message.signed, peer, out)

    def _on_future(self, message: Record, height: int, peer: str | None, out: list[Action]) -> None:
        if height > self._proven:
            # one check per message that would raise what we know, so a forgery cannot make us believe we
            # are behind; at most one BLS check per height (a later message for it is not > _proven)
            problem = signer_problem(self.state, message, self.verifier, vote_signature=True)
            if problem == UNKNOWN_COMMITTEE:
                self._note_claim(_Claim(height, peer, message), out)
            elif problem is not None:
                out.append(RejectMessage(peer, problem, f"message for height {height}: {problem}"))
                return
            else:
                self._note_proven(height, peer, out)
        if height == self.height + 1 and len(self._future) < self.config.max_buffered_messages:
            self._future.append((message, peer))

    # ------------------------------------------------------------ the sync schedule

    def _first_delay(self, height: int) -> float:
        """A peer just one height ahead is normal (it committed first): give our own commit a moment."""
        return self.config.sync_wait_s if height == self.height + 1 else 0.0

    def _backoff(self, stalls: int) -> float:
        if stalls <= 0:
            return 0.0
        return min(self.config.sync_retry_max_s, self.config.sync_retry_s * 2 ** min(stalls - 1, 32))

    def _schedule_sync(self, purpose: str, delay: float, out: list[Action]) -> None:
        """(Re)arm the one SYNC timer; a timer armed before is superseded (stale when it fires)."""
        self._sync_timer = purpose
        self._sync_timer_gen = self._sync_gen
        self._sync_gen += 1
        out.append(ScheduleTimeout(self.height, self._sync_timer_gen, TimeoutStep.SYNC, delay))

    def _note_proven(self, height: int, peer: str | None, out: list[Action], *, schedule: bool = True) -> None:
        """Proof that the network is at consensus height ``height``."""
        if height <= self._proven:
            return
        self._proven = height
        if peer is not None:
            self._proven_peer = peer
        if schedule and height > self.height and self._sync_timer != "proven":
            # a claim's timer may be far off (its backoff): proof does not wait for it
            self._schedule_sync("proven", max(self._first_delay(height), self._backoff(self._sync_stalls)), out)

    def _note_claim(self, claim: _Claim, out: list[Action]) -> None:
        """An unproven claim: kept if it is the highest, and it may start the sync schedule, at the claims' pace."""
        if self._claim is not None and claim.height <= self._claim.height:
            return
        self._claim = claim
        self._claim_requests = 0
        if self._sync_timer is None:
            self._schedule_sync("claim", self._first_delay(claim.height) + self._backoff(self._claim_stalls), out)

    def _claim_problem(self, claim: _Claim) -> str | None:
        """:func:`signer_problem` for a claim's message, or the certificate check for a claimed block."""
        message = claim.message
        if not isinstance(message, FinalizedBlock):
            return signer_problem(self.state, message, self.verifier, vote_signature=True)
        return self._certificate_problem(message)

    def _certificate_problem(self, fb: FinalizedBlock) -> str | None:
        height = fb.block.height
        try:
            committee = committee_for_height(self.state, height)
        except ex.InvalidBlock:
            return UNKNOWN_COMMITTEE
        try:
            self.verifier.verify_certificate(
                committee, self.chain_id, fb.certificate, height=height, block_hash=self.computations.block_hash(fb.block)
            )
        except ex.InvalidCertificate:
            return "bad_certificate"
        return None

    def _review_claim(self, out: list[Action], *, schedule: bool = True) -> None:
        """Check the claim once our state knows its committee: proven it counts, forged its sender is charged."""
        claim = self._claim
        if claim is None:
            return
        problem = self._claim_problem(claim)
        if problem == UNKNOWN_COMMITTEE:
            if claim.height <= self.height:
                self._claim = None  # we are past it (its epoch is gone): nothing left to chase or to judge
            return
        self._claim = None
        if problem is None:
            self._claim_stalls = 0  # it was true: the requests it caused were not wasted
            self._note_proven(claim.height, claim.peer, out, schedule=schedule)
        else:
            out.append(RejectMessage(claim.peer, problem, f"claim of height {claim.height} found false: {problem}"))

    def _on_sync_timer(self, t: TimeoutFired, out: list[Action]) -> None:
        if self._sync_timer is None or t.round != self._sync_timer_gen:
            return  # superseded
        self._sync_timer = None
        self._review_claim(out, schedule=False)  # what it proves is acted on just below
        if self._proven > self.height:
            self._sync_stalls += 1
            out.append(RequestSync(self.height, self._proven_peer, self.config.sync_batch))
            self._schedule_sync("proven", self._backoff(self._sync_stalls), out)
            return
        claim = self._claim
        if claim is not None and claim.height <= self.height:
            claim = self._claim = None
        if claim is not None and self._claim_requests >= self.config.max_claim_requests:
            claim = self._claim = None  # nobody could supply what it claimed: stop chasing it
            self.claims_dropped += 1
        if claim is None:
            if not self._catching_up:
                return
            if self._more_asked == self._answers:
                self._catching_up = False  # our last request for the rest was never answered: stop waiting
                return
            # the last batch was full: ask for the rest; the answer tells whether there is more
            self._more_asked = self._answers
            out.append(RequestSync(self.height, self._server, self.config.sync_batch))
            self._schedule_sync("more", self.config.sync_retry_max_s, out)
            return
        self._claim_requests += 1
        self._claim_stalls += 1
        out.append(RequestSync(self.height, claim.peer, self.config.sync_batch))
        self._schedule_sync("claim", self._backoff(self._claim_stalls), out)

    def _on_proposal(self, sp: SignedProposal, peer: str | None, out: list[Action]) -> None:
        p = sp.proposal
        if p.round in self.proposals:
            known = self.proposals[p.round]
            if known.proposal == p and known.signature == sp.signature:
                return
            # a second, different proposal for this round: keep the first (no evidence type for proposals)
            if known.proposer == sp.proposer and known.proposal != p:
                return
        expected = self.proposer(p.round)
        if sp.proposer != expected:
            out.append(RejectMessage(peer, "not_proposer", f"round {p.round} proposal signed by {sp.proposer.hex()}"))
            return
        if not -1 <= p.pol_round < p.round:
            out.append(RejectMessage(peer, "bad_pol_round", f"pol_round {p.pol_round} not below round {p.round}"))
            return
        if self.computations.block_hash(sp.block) != p.block_hash:
            out.append(RejectMessage(peer, "block_mismatch", "proposal names a different block than it carries"))
            return
        if sp.block.header.round > p.round:
            out.append(RejectMessage(peer, "block_round", "proposal carries a block built for a later round"))
            return
        pk = self.votes.members[expected][1].bls_pubkey
        if not self.verifier.verify(pk, proposal_signing_bytes(self.chain_id, p), sp.signature):
            out.append(RejectMessage(peer, "bad_signature", "proposer signature does not verify"))
            return
        self.proposals[p.round] = sp
        self.blocks.setdefault(p.block_hash, sp.block)
        self.votes.round_stake.setdefault(p.round, {})[sp.proposer] = self.votes.members[expected][1].stake

    def _on_vote(self, sv: SignedVote, peer: str | None, out: list[Action]) -> bool:
        """Take in a vote; True if it is quiet (see :meth:`_advance`)."""
        if sv.vote.step not in _VOTE_STEPS:
            out.append(RejectMessage(peer, "unknown_vote_step", f"vote step {sv.vote.step}"))
            return False
        votes = self.votes
        outcome, other = votes.add(sv, peer=peer)
        if outcome == "new":
            # A new vote only adds stake to its (round, step) slot and to its round's participation. Every
            # upon-rule that reads them needs more than 2/3 of the slot (any block's tally is part of the
            # slot's total) or, for a later round, more than 1/3 participation; below both, it cannot fire.
            v = sv.vote
            return not has_quorum(votes.slots[(v.round, v.step)].total, votes.total_stake) and (
                v.round <= self.round or 3 * votes.round_participation(v.round) <= votes.total_stake
            )
        if outcome == "not_member":
            out.append(RejectMessage(peer, "not_validator", f"vote by {sv.validator.hex()}, not in the committee"))
        elif outcome == "invalid":
            out.append(RejectMessage(peer, "bad_signature", "vote signature does not verify"))
        elif outcome == "conflict" and other is not None:
            v = sv.vote
            key = EvidenceKey(validator=sv.validator, height=v.height, round=v.round, step=v.step)
            if key not in self.reported and key not in self.state.evidence_seen and sv.validator in self.state.validators:
                self.reported.add(key)
                out.append(ReportEvidence(other.signed, sv))
        return False

    # ------------------------------------------------------------ timeouts

    def _on_timeout(self, t: TimeoutFired, out: list[Action]) -> None:
        if t.step == TimeoutStep.SYNC:
            self._on_sync_timer(t, out)
            return
        if t.height != self.height:
            return
        if t.step == TimeoutStep.COMMIT:
            if t.round == self.round and self.step == Step.PROPOSE and self.round not in self.proposals:
                if self.now_ms < self._regular_proposal_ms():
                    self.early_proposals += 1
                self._propose_own(self.round, out)
            return
        if t.step == TimeoutStep.REBROADCAST:
            if t.round == self.round:
                if self.round in self.proposals and self.proposals[self.round].proposer == self.address:
                    out.append(Broadcast(self.proposals[self.round]))
                if self.address is not None:
                    for sv in self.votes.own_votes(self.address, self.round):
                        out.append(Broadcast(VoteMessage(sv)))
                out.append(ScheduleTimeout(self.height, self.round, TimeoutStep.REBROADCAST, self.config.rebroadcast_s))
            return
        if t.round != self.round:
            return
        if t.step == TimeoutStep.PROPOSE and self.step == Step.PROPOSE:  # line 57
            self._vote(VoteStep.PREVOTE, NIL_BLOCK, out)
            self.step = Step.PREVOTE
        elif t.step == TimeoutStep.PREVOTE and self.step == Step.PREVOTE:  # line 61
            self._vote(VoteStep.PRECOMMIT, NIL_BLOCK, out)
            self.step = Step.PRECOMMIT
        elif t.step == TimeoutStep.PRECOMMIT:  # line 65
            self._start_round(self.round + 1, out)

    # ------------------------------------------------------------ early blocks

    def _regular_proposal_ms(self) -> int:
        """When the post-commit pause ends (``timeout_commit_s`` after our last commit)."""
        if not self._commit_times:
            return self.now_ms
        return self._commit_times[-1] + round(self.config.timeout_commit_s * 1000)

    def _early_proposal_ms(self) -> int | None:
        """The earliest time this height's block may be proposed with transactions waiting, or None.

        Not before ``min_commit_pause_s`` after the commit, and not before the last ``pace_window`` blocks
        would average ``timeout_commit_s`` apart (so under steady load blocks keep their configured pace, and
        deadlines counted in blocks keep their length); never later than the regular pause.
        """
        cfg = self.config
        # fewer than pace_window commits since start: the same rule over the ones we saw (at least 2)
        known = len(self._commit_times)
        if not cfg.early_blocks or known < 2:
            return None
        seen_height, seen_ms = self._txs_seen
        first_tx_ms = seen_ms if seen_height == self.height else self.now_ms
        earliest = max(self._commit_times[-1] + round(cfg.min_commit_pause_s * 1000),
                       self._commit_times[0] + round(known * cfg.timeout_commit_s * 1000),
                       first_tx_ms + round(cfg.tx_batch_s * 1000))
        regular = self._regular_proposal_ms()
        return earliest if earliest < regular else None

    def _maybe_propose_early(self, out: list[Action]) -> None:
        """As the waiting proposer of round 0 with executable transactions, end the pause early."""
        h = self.height
        if (self.round != 0 or self.step != Step.PROPOSE or 0 in self.proposals or not self._member
                or self._early_scheduled == h or self.proposer(0) != self.address
                or self.txs is None or not self.txs.has_ready()):
            return
        if self._txs_seen[0] != h:
            self._txs_seen = (h, self.now_ms)
        at = self._early_proposal_ms()
        if at is None:
            return
        self._early_scheduled = h
        out.append(ScheduleTimeout(h, 0, TimeoutStep.COMMIT, max(0, at - self.now_ms) / 1000))

    # ------------------------------------------------------------ block sync

    def _on_synced(self, event: BlocksSynced, out: list[Action]) -> None:
        committed = 0
        for fb in sorted(event.blocks, key=lambda b: b.block.height):
            if fb.block.height < self.height:
                continue
            if fb.block.height > self.height:
                self._on_future_block(fb, event.peer, out)
                break
            bh = self.computations.block_hash(fb.block)
            try:
                self.verifier.verify_certificate(
                    self.committee, self.chain_id, fb.certificate, height=self.height, block_hash=bh
                )
            except ex.InvalidCertificate as exc:
                out.append(RejectMessage(event.peer, "bad_certificate", f"synced block {fb.block.height}: {exc}"))
                break
            verdict = self._verdict(fb.block)
            if verdict.post is None:
                # a quorum certified a block that does not apply here: our state or the chain is broken
                detail = f"synced block {fb.block.height}: {verdict.reason}"
                out.append(RejectMessage(event.peer, "invalid_block", detail))
                break
            self._commit(fb.block, fb.certificate, verdict.post, out, replay=False)
            committed += 1
        self._replay_future(out)
        if not event.solicited:
            return
        self._answers += 1
        # a full batch means the peer had more: we are further behind than we can prove yet
        self._catching_up = committed > 0 and len(event.blocks) >= self.config.sync_batch
        self._server = event.peer
        if self._catching_up:
            self._claim_stalls = 0
            self._claim_requests = 0
        if committed:
            if self._proven > self.height:
                self._schedule_sync("proven", 0.0, out)  # go on at once while blocks keep coming
            elif self._claim is not None and self._claim.height > self.height:
                self._schedule_sync("claim", 0.0, out)
            elif self._catching_up:
                self._schedule_sync("more", 0.0, out)

    def _on_future_block(self, fb: FinalizedBlock, peer: str | None, out: list[Action]) -> None:
        """A finalized block beyond our height: with a certificate we can check, proof the network is past it."""
        height = fb.block.height + 1  # the consensus height the network is at, at least
        if height <= self._proven:
            return
        problem = self._certificate_problem(fb)
        if problem == UNKNOWN_COMMITTEE:
            self._note_claim(_Claim(height, peer, fb), out)
        elif problem is not None:
            out.append(RejectMessage(peer, problem, f"block {fb.block.height}: certificate does not verify"))
        else:
            self._note_proven(height, peer, out)

    # ------------------------------------------------------------ commit

    def _commit(self, block: Block, cert: CommitCertificate, post: State, out: list[Action], *, replay: bool = True) -> None:
        out.append(Commit(FinalizedBlock(block=block, certificate=cert), post))
        self._commit_times.append(self.now_ms)
        future = self._future
        self.state = post
        self.last_certificate = cert
        self._reset_height()
        self._sync_stalls = 0  # progress: proof-driven requests start again from a short wait
        self._future = []
        if self._started:
            self._start_round(0, out, proposal_delay_s=self.config.timeout_commit_s)
        for message, p in future:
            self._future.append((message, p))
        self._review_claim(out)
        if replay:
            self._replay_future(out)

    def _replay_future(self, out: list[Action]) -> None:
        pending, self._future = self._future, []
        for message, peer in pending:
            self._on_message(message, peer, out)

    # ------------------------------------------------------------ the upon-rules

    def _advance(self, out: list[Action]) -> None:
        """Apply Algorithm 1's upon-rules until none fires.

        The pass that fires nothing may still have acted (rules guarded by ``_done`` that only schedule a
        timeout) and verified pending votes. If that verification dropped none, the state it leaves is a
        fixpoint: another pass would evaluate every condition the same way and do nothing. ``_settled``
        records that, so :meth:`handle` can skip the passes after a *quiet* message (an old-height one, or
        a new vote that leaves every threshold uncrossed), which are most messages in a large committee.
        A dropped vote can move its validator's stake to its other vote and make a rule checked earlier in
        the pass true, so then the next message runs the passes again.
        """
        while True:
            votes = self.votes
            drops = votes.drops
            if not self._rules_once(out):
                self._settled = votes is self.votes and votes.drops == drops
                return

    def _rules_once(self, out: list[Action]) -> bool:
        height, r = self.state.height + 1, self.round  # self.height, without a property call per message
        votes = self.votes
        # line 49: 2f+1 precommits for a block in any round, and we have the (valid) block -> decide
        for rr, bh in votes.blocks_with_precommits():
            if votes.quorum_for(rr, VoteStep.PRECOMMIT, bh):
                block = self.blocks.get(bh)
                if block is None:
                    if ("missing", rr) not in self._done:
                        self._done.add(("missing", rr))
                        # a verified quorum decided this height: the network is at the next one
                        self._note_proven(height + 1, None, out)
                    continue
                verdict = self._verdict(block)
                if verdict.post is not None:
                    cert = votes.certificate(rr, bh)
                    # aggregated from verified precommits: valid by construction, so the host's
                    # Chain.commit (given this verifier) need not pay for the check again
                    self.verifier.note_valid_certificate(self.committee, self.chain_id, cert, height=self.height,
                                                         block_hash=bh)
                    self._commit(block, cert, verdict.post, out)
                    return True
        prop = self.proposals.get(r)
        if self.step == Step.PROPOSE and prop is not None:
            p, block = prop.proposal, prop.block
            if p.pol_round == -1:  # line 22
                ok = self._valid(block) and (self.locked_round == -1 or self._is_locked_on(p.block_hash))
                self._vote(VoteStep.PREVOTE, p.block_hash if ok else NIL_BLOCK, out)
                self.step = Step.PREVOTE
                return True
            if votes.quorum_for(p.pol_round, VoteStep.PREVOTE, p.block_hash):  # line 28
                ok = self._valid(block) and (self.locked_round <= p.pol_round or self._is_locked_on(p.block_hash))
                self._vote(VoteStep.PREVOTE, p.block_hash if ok else NIL_BLOCK, out)
                self.step = Step.PREVOTE
                return True
        if self.step == Step.PREVOTE and ("prevote-timeout", r) not in self._done:  # line 34
            if votes.quorum_any(r, VoteStep.PREVOTE):
                self._done.add(("prevote-timeout", r))
                out.append(ScheduleTimeout(height, r, TimeoutStep.PREVOTE, self.config.timeout_prevote(r)))
        if prop is not None and self.step >= Step.PREVOTE and ("polka", r) not in self._done:  # line 36
            bh = prop.proposal.block_hash
            if votes.quorum_for(r, VoteStep.PREVOTE, bh) and self._valid(prop.block):
                self._done.add(("polka", r))
                if self.step == Step.PREVOTE:
                    self.locked_value, self.locked_hash, self.locked_round = prop.block, bh, r
                    self._vote(VoteStep.PRECOMMIT, bh, out)
                    self.step = Step.PRECOMMIT
                self.valid_value, self.valid_round = prop.block, r
                return True
        if self.step == Step.PREVOTE and votes.quorum_for(r, VoteStep.PREVOTE, NIL_BLOCK):  # line 44
            self._vote(VoteStep.PRECOMMIT, NIL_BLOCK, out)
            self.step = Step.PRECOMMIT
            return True
        if ("precommit-timeout", r) not in self._done and votes.quorum_any(r, VoteStep.PRECOMMIT):  # line 47
            self._done.add(("precommit-timeout", r))
            out.append(ScheduleTimeout(height, r, TimeoutStep.PRECOMMIT, self.config.timeout_precommit(r)))
        # line 55: f+1 (by stake) of the committee is already in a later round -> join it
        later = [rr for rr in votes.round_stake if rr > r]
        if len(later) > 1:
            later.sort(reverse=True)
        for rr in later:
            if 3 * votes.round_participation(rr) > votes.total_stake:
                votes.verify_round(rr)
                if 3 * votes.round_participation(rr) > votes.total_stake:
                    self._start_round(rr, out)
                    return True
        return False

    def _is_locked_on(self, block_hash: bytes) -> bool:
        return self.locked_hash is not None and self.locked_hash == block_hash
