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
  which by default persisted the signed position *before* the engine got the
  signature, so the host needs no ordering of its own for slashing safety. A
  host that deferred the guard's writes (the Trio driver, to keep fsyncs off
  its event loop) makes ``guard.pending`` durable before it carries out any
  action of the call that signed it.
* :class:`ScheduleTimeout`, :class:`ScheduleSync` -- after ``delay_s`` feed
  back ``action.fired()`` (a :class:`TimeoutFired` or a :class:`SyncTimerFired`).
  Stale timeouts are ignored, so the host never needs to cancel one.
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
:class:`TimeoutFired`, :class:`SyncTimerFired`, :class:`BlocksSynced`, and :class:`TxsAvailable`
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

When the node is behind, and when to ask peers for blocks, is the business of
:class:`~ledger.consensus.catchup.CatchUp`, a machine of its own the engine
owns; when a waiting proposer may cut its post-commit pause short is
:class:`~ledger.consensus.pacing.BlockPacer`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ledger import exceptions as ex
from ledger.blocks import Block, FinalizedBlock
from ledger.codec import Record
from ledger.committee import compute_proposer, has_quorum
from ledger.consensus.catchup import CatchUp, Claim
from ledger.consensus.certificate import certificate_problem, verify_finalized_block
from ledger.consensus.config import ConsensusConfig, Step, TimeoutStep
from ledger.consensus.events import (
    Action,
    BlocksSynced,
    Broadcast,
    Commit,
    Event,
    MessageReceived,
    RejectMessage,
    ReportEvidence,
    ScheduleTimeout,
    SyncTimerFired,
    TimeoutFired,
    TxsAvailable,
)
from ledger.consensus.height_votes import HeightVotes
from ledger.consensus.messages import Proposal, SignedProposal, VoteMessage, proposal_signing_bytes
from ledger.consensus.pacing import BlockPacer
from ledger.consensus.precheck import UNKNOWN_COMMITTEE, VOTE_STEPS, signer_problem
from ledger.consensus.signer import ValidatorSigner
from ledger.consensus.verifier import SignatureVerifier
from ledger.signer_guard import SignRefused, SignStep
from ledger.state import Committee, EvidenceKey, State
from ledger.transactions import SignedTransaction
from ledger.transition import apply_block, build_block, committee_for_height
from ledger.votes import NIL_BLOCK, CommitCertificate, SignedVote, Vote, VoteStep

__all__ = ["BlockComputations", "ConsensusEngine", "TxSource"]

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


# ============================================================ the engine


@dataclass
class _BlockVerdict:
    post: State | None
    reason: str = ""


class ConsensusEngine:
    """One validator's (or observer's) view of consensus. See the module docstring for the contract."""

    locked_hash: bytes | None
    """The locked block's hash: set with ``locked_value``, or alone for a lock restored from the guard."""

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
        self.catch_up = CatchUp(config, state.height + 1, self._claim_problem)
        self.pacer = BlockPacer(config)
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
        elif isinstance(event, SyncTimerFired):
            self.catch_up.on_timer(event, out)
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
        self.locked_hash = None
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
        return max(self.catch_up.proven, self.height)

    @property
    def catching_up(self) -> bool:
        """The last sync answer was a full batch: we are behind by more than we have fetched so far."""
        return self.catch_up.catching_up

    @property
    def claims_dropped(self) -> int:
        """Unproven claims given up after ``max_claim_requests`` sync requests."""
        return self.catch_up.claims_dropped

    @property
    def early_proposals(self) -> int:
        """Proposals made before ``timeout_commit_s`` because transactions waited."""
        return self.pacer.early_proposals

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
        if height > self.catch_up.proven:
            # one check per message that would raise what we know, so a forgery cannot make us believe we
            # are behind; at most one BLS check per height (a later message for it is not > proven)
            problem = signer_problem(self.state, message, self.verifier, vote_signature=True)
            if problem == UNKNOWN_COMMITTEE:
                self.catch_up.note_claim(Claim(height, peer, message), out)
            elif problem is not None:
                out.append(RejectMessage(peer, problem, f"message for height {height}: {problem}"))
                return
            else:
                self.catch_up.note_proven(height, peer, out)
        if height == self.height + 1 and len(self._future) < self.config.max_buffered_messages:
            self._future.append((message, peer))

    # ------------------------------------------------------------ judging what catch-up is told

    def _claim_problem(self, claim: Claim) -> str | None:
        """:func:`signer_problem` for a claim's message, or the certificate check for a claimed block."""
        message = claim.message
        if not isinstance(message, FinalizedBlock):
            return signer_problem(self.state, message, self.verifier, vote_signature=True)
        return self._certificate_problem(message)

    def _certificate_problem(self, fb: FinalizedBlock) -> str | None:
        return certificate_problem(self.state, fb, self.verifier, hash_block=self.computations.block_hash)

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
        if sv.vote.step not in VOTE_STEPS:
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
        if t.height != self.height:
            return
        if t.step == TimeoutStep.COMMIT:
            if t.round == self.round and self.step == Step.PROPOSE and self.round not in self.proposals:
                self.pacer.on_proposal(self.now_ms)
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

    def _maybe_propose_early(self, out: list[Action]) -> None:
        """As the waiting proposer of round 0 with executable transactions, end the pause early."""
        h = self.height
        if (self.round != 0 or self.step != Step.PROPOSE or 0 in self.proposals or not self._member
                or self.pacer.is_scheduled(h) or self.proposer(0) != self.address
                or self.txs is None or not self.txs.has_ready()):
            return
        delay_s = self.pacer.schedule_early(h, self.now_ms)
        if delay_s is not None:
            out.append(ScheduleTimeout(h, 0, TimeoutStep.COMMIT, delay_s))

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
                verify_finalized_block(fb, self.committee, self.chain_id, verifier=self.verifier, block_hash=bh)
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
        self.catch_up.on_answer(committed, len(event.blocks), event.peer, out)

    def _on_future_block(self, fb: FinalizedBlock, peer: str | None, out: list[Action]) -> None:
        """A finalized block beyond our height: with a certificate we can check, proof the network is past it."""
        height = fb.block.height + 1  # the consensus height the network is at, at least
        if height <= self.catch_up.proven:
            return
        problem = self._certificate_problem(fb)
        if problem == UNKNOWN_COMMITTEE:
            self.catch_up.note_claim(Claim(height, peer, fb), out)
        elif problem is not None:
            out.append(RejectMessage(peer, problem, f"block {fb.block.height}: certificate does not verify"))
        else:
            self.catch_up.note_proven(height, peer, out)

    # ------------------------------------------------------------ commit

    def _commit(self, block: Block, cert: CommitCertificate, post: State, out: list[Action], *, replay: bool = True) -> None:
        out.append(Commit(FinalizedBlock(block=block, certificate=cert), post))
        self.pacer.on_commit(self.now_ms)
        future = self._future
        self.state = post
        self.last_certificate = cert
        self._reset_height()
        self._future = []
        if self._started:
            self._start_round(0, out, proposal_delay_s=self.config.timeout_commit_s)
        for message, p in future:
            self._future.append((message, p))
        self.catch_up.on_commit(self.height, out)  # progress; and a claim may be judged now
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
                        self.catch_up.note_proven(height + 1, None, out)
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
