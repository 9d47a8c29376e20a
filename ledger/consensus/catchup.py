"""Catch-up: knowing when a node is behind, and when to ask its peers for blocks.

A sans-I/O machine the engine owns. The engine judges what it hears (who
signed a message, whether a certificate verifies) and tells this machine what
that proved; the machine decides when to ask for blocks and answers with
actions: :class:`~ledger.consensus.events.RequestSync`, and its own timer
(:class:`~ledger.consensus.events.ScheduleSync`, fed back as
:class:`~ledger.consensus.events.SyncTimerFired`). At most one SYNC timer is
pending: arming it again supersedes the one before, which is then *stale*
when it fires; each arming has a generation number, so the host never needs
to cancel one.

Knowing when we are behind
--------------------------

A height counts as *seen* (:attr:`CatchUp.proven`, which the node's health
reports) only on proof: a message for it signed by whom that height's
committee says should sign it (checked once, when it would raise the figure; a
forgery is rejected), a certificate that verifies, or a precommit quorum for a
block we lack. A message for a height whose committee we do not know (a later
epoch) proves nothing: it is kept as an unproven *claim* (the highest one
only), which may start sync requests, but at most ``max_claim_requests`` of
them, spaced by a backoff that only a sync that delivers a full batch (we
really are far behind) or a claim later proven resets; then the claim is
dropped. A claim is checked as soon as our state knows its committee
(:meth:`CatchUp.on_commit`): proven, it counts; forged, its sender is reported.
Sync requests that bring nothing back off exponentially (``sync_retry_s``
doubling up to ``sync_retry_max_s``), so nothing, proven or not, makes a node
poll its peers in a tight loop.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from ledger.codec import Record
from ledger.consensus.config import ConsensusConfig
from ledger.consensus.events import Action, RejectMessage, RequestSync, ScheduleSync, SyncTimerFired
from ledger.consensus.precheck import UNKNOWN_COMMITTEE

__all__ = ["CatchUp", "Claim", "ClaimJudge", "SyncPurpose"]


@dataclass(frozen=True, slots=True)
class Claim:
    """An unproven sign that the network is at consensus height ``height``: ``message`` (a vote, proposal or
    finalized block) from ``peer``, for a height whose committee we do not know yet."""

    height: int
    peer: str | None
    message: Record


ClaimJudge = Callable[[Claim], "str | None"]
"""The engine's verdict on a claim's message against its current state: None (proven), a
:data:`~ledger.consensus.events.REJECT_REASONS` label (forged), or
:data:`~ledger.consensus.precheck.UNKNOWN_COMMITTEE` (cannot tell yet)."""


class SyncPurpose(enum.Enum):
    """What the pending SYNC timer is for."""

    PROVEN = "proven"  # the network is ahead by proof: fetch what we lack
    CLAIM = "claim"  # an unproven claim: ask, at the claims' pace, at most max_claim_requests times
    MORE = "more"  # the last answer was a full batch: ask for the rest


class CatchUp:
    """The sync schedule of one engine, kept across heights (see the module docstring).

    ``height`` is the engine's consensus height (``state.height + 1``); the engine reports each commit
    with :meth:`on_commit`. ``judge`` checks a claim's message against the engine's state.
    """

    def __init__(self, config: ConsensusConfig, height: int, judge: ClaimJudge) -> None:
        self.config = config
        self.height = height
        self._judge = judge
        self._proven = height  # the highest consensus height shown by proof
        self._proven_peer: str | None = None  # who showed it: the first peer to ask for blocks
        self._claim: Claim | None = None  # the highest unproven claim
        self._claim_requests = 0  # sync requests the current claim has caused
        self._claim_stalls = 0  # claim-driven requests since one brought a full batch (the claims' backoff)
        self._sync_stalls = 0  # proof-driven requests since the last commit (their backoff)
        self._timer: SyncPurpose | None = None  # what the pending SYNC timer is for
        self._next_generation = 0  # generation of the next SYNC timer
        self._timer_generation = -1  # generation of the pending one: a timer of any other is stale when it fires
        self._catching_up = False  # the last sync answer was a full batch: more blocks are waiting
        self._server: str | None = None  # the peer that sent it
        self._answers = 0  # sync answers received (BlocksSynced, solicited)
        self._more_asked = -1  # _answers when we last asked for "the rest": unchanged at the next timer = lost
        self.claims_dropped = 0  # unproven claims given up after max_claim_requests requests

    # ------------------------------------------------------------ what the engine reads

    @property
    def proven(self) -> int:
        """The highest consensus height proven to exist (may be below ``height``: nothing ahead proven)."""
        return self._proven

    @property
    def catching_up(self) -> bool:
        """The last sync answer was a full batch: we are behind by more than we have fetched so far."""
        return self._catching_up

    # ------------------------------------------------------------ inputs

    def note_proven(self, height: int, peer: str | None, out: list[Action], *, schedule: bool = True) -> None:
        """Proof that the network is at consensus height ``height``."""
        if height <= self._proven:
            return
        self._proven = height
        if peer is not None:
            self._proven_peer = peer
        if schedule and height > self.height and self._timer is not SyncPurpose.PROVEN:
            # a claim's timer may be far off (its backoff): proof does not wait for it
            self._arm(SyncPurpose.PROVEN, max(self._first_delay(height), self._backoff(self._sync_stalls)), out)

    def note_claim(self, claim: Claim, out: list[Action]) -> None:
        """An unproven claim: kept if it is the highest, and it may start the sync schedule, at the claims' pace."""
        if self._claim is not None and claim.height <= self._claim.height:
            return
        self._claim = claim
        self._claim_requests = 0
        if self._timer is None:
            self._arm(SyncPurpose.CLAIM, self._first_delay(claim.height) + self._backoff(self._claim_stalls), out)

    def on_commit(self, height: int, out: list[Action]) -> None:
        """The engine committed and is now at ``height``: progress, and perhaps a claim we can judge now."""
        self.height = height
        self._sync_stalls = 0  # progress: proof-driven requests start again from a short wait
        self._review_claim(out)

    def on_answer(self, committed: int, received: int, peer: str | None, out: list[Action]) -> None:
        """An answer to a :class:`~ledger.consensus.events.RequestSync`: ``received`` blocks from ``peer``, of
        which the engine committed ``committed``."""
        self._answers += 1
        # a full batch means the peer had more: we are further behind than we can prove yet
        self._catching_up = committed > 0 and received >= self.config.sync_batch
        self._server = peer
        if self._catching_up:
            self._claim_stalls = 0
            self._claim_requests = 0
        if committed:
            if self._proven > self.height:
                self._arm(SyncPurpose.PROVEN, 0.0, out)  # go on at once while blocks keep coming
            elif self._claim is not None and self._claim.height > self.height:
                self._arm(SyncPurpose.CLAIM, 0.0, out)
            elif self._catching_up:
                self._arm(SyncPurpose.MORE, 0.0, out)

    def on_timer(self, fired: SyncTimerFired, out: list[Action]) -> None:
        if self._timer is None or fired.generation != self._timer_generation:
            return  # superseded
        self._timer = None
        self._review_claim(out, schedule=False)  # what it proves is acted on just below
        if self._proven > self.height:
            self._sync_stalls += 1
            out.append(RequestSync(self.height, self._proven_peer, self.config.sync_batch))
            self._arm(SyncPurpose.PROVEN, self._backoff(self._sync_stalls), out)
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
            self._arm(SyncPurpose.MORE, self.config.sync_retry_max_s, out)
            return
        self._claim_requests += 1
        self._claim_stalls += 1
        out.append(RequestSync(self.height, claim.peer, self.config.sync_batch))
        self._arm(SyncPurpose.CLAIM, self._backoff(self._claim_stalls), out)

    # ------------------------------------------------------------ the schedule

    def _first_delay(self, height: int) -> float:
        """A peer just one height ahead is normal (it committed first): give our own commit a moment."""
        return self.config.sync_wait_s if height == self.height + 1 else 0.0

    def _backoff(self, stalls: int) -> float:
        if stalls <= 0:
            return 0.0
        return min(self.config.sync_retry_max_s, self.config.sync_retry_s * float(2 ** min(stalls - 1, 32)))

    def _arm(self, purpose: SyncPurpose, delay: float, out: list[Action]) -> None:
        """(Re)arm the one SYNC timer; a timer armed before is superseded (stale when it fires)."""
        self._timer = purpose
        self._timer_generation = self._next_generation
        self._next_generation += 1
        out.append(ScheduleSync(self._timer_generation, delay))

    def _review_claim(self, out: list[Action], *, schedule: bool = True) -> None:
        """Check the claim once our state knows its committee: proven it counts, forged its sender is charged."""
        claim = self._claim
        if claim is None:
            return
        problem = self._judge(claim)
        if problem == UNKNOWN_COMMITTEE:
            if claim.height <= self.height:
                self._claim = None  # we are past it (its epoch is gone): nothing left to chase or to judge
            return
        self._claim = None
        if problem is None:
            self._claim_stalls = 0  # it was true: the requests it caused were not wasted
            self.note_proven(claim.height, claim.peer, out, schedule=schedule)
        else:
            out.append(RejectMessage(claim.peer, problem, f"claim of height {claim.height} found false: {problem}"))
