"""The client role: one sans-I/O state machine per task, from PostTask to settlement.

States (``ClientState``) and what moves them::

    NEW --start()--> POSTING --task on ledger--> COLLECTING --choose--> ASSIGNING
    POSTING --enough bids before the PostTask is final--> ASSIGNING
    ASSIGNING --ledger ASSIGNED--> RUNNING --ledger COMMITTED--> COMMITTED
    ASSIGNING --Assign refused / bid expired--> COLLECTING (next best bid)
    COMMITTED --bad or missing result--> DISPUTED
    RUNNING --provider stopped (ProviderProbed)--> ReopenTask --ledger POSTED again--> COLLECTING (fresh auction)
    any --ledger SETTLED (PAID, FRAUD, MISSED, EXPIRED, CANCELLED)--> CLOSED

The full set of moves, restarts included, is one table,
:data:`CLIENT_TRANSITIONS` (``(state, ClientTrigger) -> state``); every
state change goes through :meth:`ClientTask._move`, which refuses a pair the
table does not hold with :class:`~p2pgpu.market.transitions.IllegalTransition`.

Failover: while a batch task runs, the node probes its provider (about once
a second, :attr:`ClientTask.probe_target`). ``probe_misses`` unanswered
probes in a row, or one answer that the provider holds no job for the task
(it restarted, or dropped it), and the client sends ``ReopenTask``: the
ledger marks the provider missed and posts the task again, and the client
announces it afresh, never choosing the stopped provider again. A
``CommitResult`` that lands first keeps the task with its provider (the
ledger refuses the reopen), so a result that is in is never taken away.
No reopen is sent within ``reopen_margin_blocks`` of the execution
deadline: it would land after it, when the ledger settles the task MISSED
anyway (the same refund, a bigger slash).

Results: a batch result is handed out (``ResultReady``) once it matches
the provider's commitment -- its signed ``CommitResult`` while that is
still pending (the hint its provider sends with the pushed result), else
the final one; with ``spot_check`` only after the block and the local
check. A pending commitment the provider replaces before it is final has
the final one's result fetched and handed out in its place.

The announce goes out with the PostTask, not after it is final, so
providers bid while it is being included; with ``enough_bids`` in, the
``Assign`` is sent at once and can be final in the PostTask's own block
(each bid commits to the task's terms, see
:func:`~ledger.transactions.task_terms_hash`). The announce names the
earliest bid deadline the task can get (the PostTask lands one block after
``height`` at the soonest); the ledger's is that or later.

The ledger is the only authority on status: every transition after
``start`` is driven by a ``BlockFinalized`` view of the task, so a lost
gossip message or a rejected transaction cannot leave the role believing
something the chain does not.

Bid choice (:func:`score_bid`, lower is better)::

    score = w_price · unit_price / max_unit_price
          + w_eta   · min(est_seconds / limit_seconds, 1)
          + w_rep   · (1 − reputation)
          + w_load  · open / (open + load_half)
    reputation = (completed + 1) / (completed + failed + missed + 2)

with default weights 0.5 / 0.2 / 0.3 / 0.3 (:class:`BidPolicy`). The reputation is
Laplace-smoothed so a new provider starts at 0.5, neither trusted nor
shunned. ``open`` is how many of this client's other tasks the provider
holds and has not delivered yet: without it, equal offers all went to the
provider that happened to finish one task first (its reputation was then
higher), and under load one provider queued every task while the other
idled. With it, a client spreads its tasks as a least-outstanding-requests
balancer does, and a proven provider still wins until it holds a few more
of them than a new one. Bids from providers not registered on the ledger, or whose
``failed + missed`` exceed ``failure_allowance + max_failure_ratio ·
completed``, are not considered at all. Ties go to the lower price, then the
lower address, so every run picks the same bid.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kernels.bymodel import spec_model_id
from kernels.spec import JobSpec, encode_spec, spec_hash
from ledger.keys import AccountKey
from ledger.state import Provider, Task, TaskOutcome, TaskStatus
from ledger.transactions import (
    Assign,
    AuditVerdict,
    CancelTask,
    Dispute,
    PostTask,
    ReopenTask,
    SignedBid,
    SignedStreamOutput,
    TaskKind,
    compute_task_id,
    task_terms_hash,
)

from .errors import MarketUsageError
from .events import (
    Action,
    BidReceived,
    BlockFinalized,
    CommitmentPending,
    DeclineReceived,
    Event,
    FetchFailed,
    FetchResult,
    InputsPushed,
    InputsServed,
    OpenStream,
    ProviderProbed,
    PublishAnnounce,
    Report,
    ReportProgress,
    ResultDelivered,
    ResultReady,
    RunSpotCheck,
    ServeInputs,
    ServeSpec,
    ServeStreamItem,
    Stage,
    SubmitTx,
    TaskClosed,
    TxFailed,
    VerificationOutcome,
)
from .messages import (BidStart, DeclineReason, VerifiedBid, encode_market_message, encode_requirements, make_announce,
                       sign_announce)
from .results import ResultEncodingError, decode_result, result_hash_of_bytes
from .streaming import ClientStream
from .transitions import TransitionTable

__all__ = ["CLIENT_TRANSITIONS", "BidPolicy", "ClientConfig", "ClientState", "ClientTask", "ClientTrigger",
           "is_eligible_provider", "score_bid"]


@dataclass(frozen=True, slots=True)
class BidPolicy:
    price_weight: float = 0.5
    eta_weight: float = 0.2
    reputation_weight: float = 0.3
    load_weight: float = 0.3
    """Weight of the provider's share of this client's open tasks (see the module docstring)."""
    load_half: int = 4
    """Open tasks at which a provider's load term is half its weight."""
    cold_weight: float = 0.3
    """Added to the score of a bid whose provider says its model is cold (must fetch and load it first): a warm
    provider starts at once (Livepeer's warm/cold flag). A cold
    provider's start-up seconds also count in its bid's ``est_seconds`` (the ETA term)."""
    max_failure_ratio: float = 1.0
    failure_allowance: int = 2


@dataclass(frozen=True, slots=True)
class ClientConfig:
    fee: int = 1
    bid_window: int = 10
    exec_blocks: int = 50
    audit_rate_bps: int = 1_000
    enough_bids: int = 0
    """Choose as soon as this many acceptable bids are in (0: wait for the bid window)."""
    max_wait_blocks: int = 0
    """Choose this many blocks after the PostTask at the latest (0: near the end of the bid window)."""
    assign_margin_blocks: int = 1
    """Choose this many blocks before the last height an Assign can still be included."""
    assign_timeout_blocks: int = 8
    """Give up on a submitted Assign not on the ledger after this many blocks; try the next bid. An Assign that
    can never execute comes back sooner, as TxFailed from the nonce keeper; this only covers one that vanished.
    (At 2 blocks, a loaded network's Assigns that took 3 blocks were retried with a second provider, and the
    loser was replaced by a fee-bumped filler: fees for nothing.)"""
    dispute_margin_blocks: int = 2
    """Dispute an undelivered result this many blocks before the challenge window's last chance: a
    transaction can take a block or two to land on a loaded network, and a Dispute that misses the window
    leaves the provider paid for a result the client never got."""
    spot_check: bool = False
    dispute_undelivered: bool = True
    late_fetch_blocks: int = 2400
    """A task settled as paid before its result reached us (the challenge window is short, the network was
    slow, the provider was paused or restarting) keeps fetching the committed result for this many blocks
    (20 min at 0.5 s blocks): we paid for it, and the provider still serves it once it is back. At 100 blocks a
    provider paused for a minute came back just after its client had given up."""
    late_fetch_backoff_max_blocks: int = 32
    """Failed late fetches are tried again 1, 2, 4, ... blocks apart, never more than this."""
    receipt_every: int = 8
    """Streams: sign a cumulative receipt every this many answered items (the provider's K must not be smaller)."""
    failover: bool = True
    """Take a batch task back from a provider that stopped (``ReopenTask``) and run a fresh auction for it,
    instead of waiting out its deadline."""
    probe_misses: int = 3
    """Liveness probes in a row the provider must fail to answer before it counts as stopped (one answer that
    it holds no job for the task is enough)."""
    reopen_after_blocks: int = 2
    """The chain's ``Params.reopen_after_blocks``: no ReopenTask is sent before it could land."""
    reopen_margin_blocks: int = 2
    """No ReopenTask within this many blocks of the task's execution deadline: it would land after the deadline,
    when the ledger settles the task MISSED (the client refunded, the provider slashed) either way, and cost a
    fee and a filler for its nonce. A provider that finishes its run quickly and delivers nothing says "done"
    just before its deadline often enough."""
    policy: BidPolicy = field(default_factory=BidPolicy)


class ClientState(enum.Enum):
    NEW = "new"
    POSTING = "posting"
    COLLECTING = "collecting"
    ASSIGNING = "assigning"
    RUNNING = "running"
    COMMITTED = "committed"
    DISPUTED = "disputed"
    CLOSED = "closed"


class ClientTrigger(enum.Enum):
    """Why a :class:`ClientTask` changes state: each handler that moves the task names one of these."""

    START = "start"
    """``start()``: the PostTask and the announce go out."""
    RESUME = "resume"
    """``resume()`` after a restart, for a task the ledger holds (or our nonce passed)."""
    RESTORE_CLOSED = "restore-closed"
    """``restore_closed()``: the journal recorded the task as over."""
    PRUNED = "pruned"
    """``resume()`` found the task gone from the ledger (pruned after settling, or its nonce used otherwise)."""
    LEDGER_POSTED = "ledger-posted"
    """The PostTask is final: the auction runs on the ledger's bid deadline."""
    POST_REFUSED = "post-refused"
    """The PostTask can never execute (``TxFailed``)."""
    BID_CHOSEN = "bid-chosen"
    """We chose a bid and sent its ``Assign``."""
    ASSIGN_REFUSED = "assign-refused"
    """Our ``Assign`` failed (``TxFailed``) with the task on the ledger: back to the auction."""
    ASSIGN_REFUSED_BEFORE_POSTED = "assign-refused-before-posted"
    """Our early ``Assign`` (sent before the PostTask was final) failed: back to waiting for the PostTask."""
    ASSIGN_TIMED_OUT = "assign-timed-out"
    """The ledger still shows POSTED after ``assign_timeout_blocks`` or past the chosen bid's expiry."""
    LEDGER_ASSIGNED = "ledger-assigned"
    """The ledger shows the task assigned (first seen)."""
    LEDGER_COMMITTED = "ledger-committed"
    """The ledger shows the provider's ``CommitResult`` (first seen)."""
    DISPUTE_SENT = "dispute-sent"
    """We dispute the committed result (bad, missing, or failing our spot check)."""
    STREAM_ITEM_DISPUTED = "stream-item-disputed"
    """``dispute_stream_item()``: we dispute one signed stream output."""
    AUDIT_DRAWN = "audit-drawn"
    """The ledger shows the task AUDITING (our dispute, or a random audit)."""
    REOPENED = "reopened"
    """The ledger took the task back from a stopped provider (our ``ReopenTask``): a fresh auction."""
    LEDGER_SETTLED = "ledger-settled"
    """The ledger settled the task (paid, fraud, missed, expired, cancelled, inputs unavailable)."""


#: States in which the ledger has shown the task to us: the first block that holds it moves POSTING to COLLECTING
#: before anything else is read from it (``_on_block``), so a ledger status never finds a task POSTING.
_ON_LEDGER_STATES = (ClientState.COLLECTING, ClientState.ASSIGNING, ClientState.RUNNING, ClientState.COMMITTED,
                     ClientState.DISPUTED)
#: States after the ledger showed the task assigned: a later ASSIGNED (or COMMITTED, AUDITING) view is old news.
_ASSIGNED_SEEN = frozenset({ClientState.RUNNING, ClientState.COMMITTED, ClientState.DISPUTED})

#: Every state change of a :class:`ClientTask`: ``{trigger: (states it may fire in, state it leads to)}``.
#: :meth:`ClientTask._move` refuses any other pair with
#: :class:`~p2pgpu.market.transitions.IllegalTransition`.
CLIENT_TRANSITIONS: TransitionTable[ClientState, ClientTrigger] = TransitionTable.by_trigger("ClientTask", {
    ClientTrigger.START: ((ClientState.NEW,), ClientState.POSTING),
    ClientTrigger.RESUME: ((ClientState.NEW,), ClientState.POSTING),
    ClientTrigger.RESTORE_CLOSED: ((ClientState.NEW,), ClientState.CLOSED),
    ClientTrigger.PRUNED: ((ClientState.POSTING,), ClientState.CLOSED),
    ClientTrigger.LEDGER_POSTED: ((ClientState.POSTING,), ClientState.COLLECTING),
    # the PostTask of an early Assign (sent before the PostTask was final) can fail too
    ClientTrigger.POST_REFUSED: ((ClientState.POSTING, ClientState.ASSIGNING), ClientState.CLOSED),
    # with enough bids in, the Assign goes out before the PostTask is final
    ClientTrigger.BID_CHOSEN: ((ClientState.POSTING, ClientState.COLLECTING), ClientState.ASSIGNING),
    ClientTrigger.ASSIGN_REFUSED: ((ClientState.ASSIGNING,), ClientState.COLLECTING),
    ClientTrigger.ASSIGN_REFUSED_BEFORE_POSTED: ((ClientState.ASSIGNING,), ClientState.POSTING),
    ClientTrigger.ASSIGN_TIMED_OUT: ((ClientState.ASSIGNING,), ClientState.COLLECTING),
    # COLLECTING: resumed after a restart, or an Assign we gave up on (timed out) landed after all
    ClientTrigger.LEDGER_ASSIGNED: ((ClientState.COLLECTING, ClientState.ASSIGNING), ClientState.RUNNING),
    ClientTrigger.LEDGER_COMMITTED: ((ClientState.RUNNING,), ClientState.COMMITTED),
    ClientTrigger.DISPUTE_SENT: ((ClientState.COMMITTED,), ClientState.DISPUTED),
    ClientTrigger.STREAM_ITEM_DISPUTED: ((ClientState.RUNNING, ClientState.DISPUTED), ClientState.DISPUTED),
    # RUNNING: the COMMITTED block was not seen (a restart, or blocks dropped from a full inbox); DISPUTED: our own
    # dispute drawn
    ClientTrigger.AUDIT_DRAWN: ((ClientState.RUNNING, ClientState.COMMITTED, ClientState.DISPUTED),
                                ClientState.DISPUTED),
    # RUNNING: our ReopenTask landed; COLLECTING: resumed after a restart, the reopen seen with the first block
    ClientTrigger.REOPENED: ((ClientState.COLLECTING, ClientState.RUNNING), ClientState.COLLECTING),
    ClientTrigger.LEDGER_SETTLED: (_ON_LEDGER_STATES, ClientState.CLOSED),
})


_PUSHED = "inputs pushed to the provider with the assignment"


def is_eligible_provider(provider: Provider | None, policy: BidPolicy) -> bool:
    if provider is None:
        return False
    bad = provider.failed + provider.missed
    return bad <= policy.failure_allowance + policy.max_failure_ratio * provider.completed


def reputation(provider: Provider) -> float:
    return (provider.completed + 1) / (provider.completed + provider.failed + provider.missed + 2)


def score_bid(signed: SignedBid, provider: Provider, *, max_unit_price: int, limit_seconds: float,
              policy: BidPolicy, start: BidStart | None = None, open_tasks: int = 0) -> float:
    """Lower is better; see the module docstring for the formula.

    ``start`` (the provider's signed warm/cold claim) adds ``cold_weight``
    when cold; a warm bid, or one for a task that names no model (None),
    adds nothing. A cold provider's start-up seconds are already in its bid's
    ``est_seconds`` (the ETA term). ``open_tasks``: this client's tasks the
    provider holds, not yet delivered (the load term).
    """
    bid = signed.bid
    price_term = bid.unit_price / max_unit_price
    eta_term = min(bid.est_seconds / limit_seconds, 1.0) if limit_seconds > 0 else 1.0
    cold_term = 1.0 if start is not None and not start.warm else 0.0
    load_term = open_tasks / (open_tasks + policy.load_half) if open_tasks > 0 else 0.0
    return (policy.price_weight * price_term + policy.eta_weight * eta_term
            + policy.reputation_weight * (1.0 - reputation(provider)) + policy.cold_weight * cold_term
            + policy.load_weight * load_term)


def describe_start(start: BidStart | None) -> str:
    """How a task's timeline names a bid's start: ``warm``, ``cold (~N s to load)``, or ``start not said``."""
    if start is None:
        return "start not said"
    return "warm" if start.warm else f"cold (~{start.startup_seconds:.3g} s to load)"


class ClientTask:
    """One task's client side. ``start()`` once, then ``handle(event)`` for every event; both return actions."""

    def __init__(
        self,
        *,
        key: AccountKey,
        chain_id: bytes,
        spec: JobSpec,
        post_nonce: int,
        max_unit_price: int,
        data_peer: bytes,
        kind: TaskKind = TaskKind.BATCH,
        units: int = 1,
        config: ClientConfig = ClientConfig(),
        height: int = 0,
        providers: Mapping[bytes, Provider] | None = None,
        open_tasks: Callable[[bytes], int] | None = None,
    ) -> None:
        """``height`` and ``providers``: the node's finalized ledger now (the announce's deadline and the
        providers whose bids count are read from them until the first ``BlockFinalized``).
        ``open_tasks(provider)``: how many of this client's other tasks the provider holds undelivered
        (the bid score's load term; None: none anywhere)."""
        if kind == TaskKind.BATCH and units != 1:
            raise MarketUsageError("a batch task has exactly one unit")
        self.key = key
        self.chain_id = chain_id
        self._open_tasks = open_tasks
        self.spec = spec
        self.spec_bytes = encode_spec(spec)
        self.spec_hash = spec_hash(spec)
        self.post_nonce = post_nonce
        self.max_unit_price = max_unit_price
        self.data_peer = data_peer
        self.kind = TaskKind(kind)
        self.units = units
        self.config = config
        self.task_id = compute_task_id(key.address, post_nonce)
        self.model_id = spec_model_id(spec)  # the registered model the spec names: posted, and in the terms
        self.terms_hash = task_terms_hash(kind=int(self.kind), spec_hash=self.spec_hash,
                                          requirements=encode_requirements(spec.requirements), units=units,
                                          exec_blocks=config.exec_blocks, model_id=self.model_id)
        self._state = ClientState.NEW  # changed only by _move, along CLIENT_TRANSITIONS
        self.height = height
        self.announce_deadline = height + config.bid_window
        self.task: Task | None = None
        self.bids: dict[bytes, SignedBid] = {}  # provider address -> bid
        self.starts: dict[bytes, BidStart] = {}  # provider address -> its bid's signed warm/cold start, if said
        self.declines: dict[bytes, tuple[DeclineReason | int, str]] = {}
        self.prefetched_hash: bytes | None = None
        """The result hash of a pending CommitResult we fetched early (CommitmentPending)."""
        self.stale_prefetch: bytes | None = None
        """An early fetch's hash that the final commitment did not match: its bytes, if they come, are dropped."""
        self.refused: set[bytes] = set()
        """Providers whose Assign failed or timed out in this auction; a reopen starts a fresh auction with fresh
        bids, so it forgets them (a timed-out Assign says nothing against its provider's next bid)."""
        self.stopped: set[bytes] = set()
        """Providers we took this task back from (ReopenTask): never chosen again for it."""
        self.chosen: SignedBid | None = None
        self.assign_sent_height = 0
        self.delivered: bytes | None = None
        self.accepted = False
        self.dispute_reason = ""
        self.fetch_requested = False
        self.inputs_pushed_to: bytes | None = None
        """The provider our inputs were pushed to with our Assign (``InputsPushed``): RUNNING once it is assigned."""
        self.committed_seen: int | None = None  # the first height we saw the result committed
        self.audit_served = False
        self.outcome = TaskOutcome.NONE
        self.late_fetch_until: int | None = None  # settled PAID without our result: keep fetching until this height
        self.late_fetch_failures = 0
        self.late_fetch_next = 0  # the height of the next late fetch (backoff after failures)
        self.stream: ClientStream | None = None  # once a stream task is assigned
        self.probe_failures = 0  # liveness probes of the current provider in a row that got no answer
        self.reopening = False  # a ReopenTask is on its way
        self.reopens_seen = 0  # the ledger's Task.reopens we have acted on
        self.failover_stopped = ""  # why the ledger refused a ReopenTask (no further attempts for this assignment)
        self.reopen_refusals = 0  # ReopenTasks refused for the current assignment
        self._providers: Mapping[bytes, Provider] = providers if providers is not None else {}

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> ClientState:
        return self._state

    def _move(self, trigger: ClientTrigger) -> ClientState:
        """Change state for ``trigger``, to where :data:`CLIENT_TRANSITIONS` says; the only place state changes.

        Raises :class:`~p2pgpu.market.transitions.IllegalTransition` (and
        stays put) if the table has no row for the current state and
        ``trigger``: a handler moved from a state it was not written for.
        """
        self._state = CLIENT_TRANSITIONS.next_state(self._state, trigger)
        return self._state

    # ------------------------------------------------------------------ entry points

    def start(self) -> list[Action]:
        if self.state is not ClientState.NEW:
            raise MarketUsageError("ClientTask.start() called twice")
        self._move(ClientTrigger.START)
        body = PostTask(
            sender=self.key.address, nonce=self.post_nonce, fee=self.config.fee, kind=int(self.kind),
            spec_hash=self.spec_hash, requirements=encode_requirements(self.spec.requirements),
            max_unit_price=self.max_unit_price, units=self.units, bid_window=self.config.bid_window,
            exec_blocks=self.config.exec_blocks, audit_rate_bps=self.config.audit_rate_bps, model_id=self.model_id,
        )
        publish = self._announce()
        out: list[Action] = [SubmitTx(body, assign_nonce=False), publish]
        if publish.signed.announce.spec is None:
            out.append(ServeSpec(self.spec_hash, self.spec_bytes))
        return out

    def _announce(self) -> PublishAnnounce:
        """The task's announce, signed, for the auction that closes at ``announce_deadline``."""
        announce = make_announce(
            chain_id=self.chain_id, task_id=self.task_id, client=self.key.address, kind=self.kind, spec=self.spec,
            max_unit_price=self.max_unit_price, units=self.units, exec_blocks=self.config.exec_blocks,
            bid_deadline_height=self.announce_deadline, data_peer=self.data_peer,
        )
        signed = sign_announce(self.key, announce)
        return PublishAnnounce(encode_market_message(signed), signed)

    def resume(self, event: BlockFinalized, *, last_seen: Task | None = None,
               delivered: bytes | None = None) -> list[Action]:
        """Rebuild this task after the client restarted, instead of :meth:`start`; returns what to do now.

        The journal (:mod:`p2pgpu.taskjournal`) kept the task's terms, so the
        machine is constructed as it was; ``event`` is the node's finalized
        ledger now, ``last_seen`` the ledger's task as the journal last
        recorded it, ``delivered`` the result bytes already in hand. The
        ledger stays the authority: a task it holds is fed ``event`` as if
        every block had been seen, so the usual transitions serve the inputs
        to an assigned provider (or drawn verifiers) again, fetch a committed
        result, or late-fetch a paid one. A ``PostTask`` the ledger never
        executed (our nonce has not passed it) is sent again, the same
        transaction at the same nonce. A task the ledger no longer holds was
        pruned after settling (``task_retention``), or its nonce went to
        another transaction: it closes with what the journal knows, and a
        committed result it never fetched is still fetched.
        """
        if self.state is not ClientState.NEW:
            raise MarketUsageError("ClientTask.resume() on a task already started")
        if delivered is not None:
            self.delivered = delivered
            self.accepted = True
        task = event.ledger.tasks.get(self.task_id)
        if task is None and event.ledger.get_account(self.key.address).nonce <= self.post_nonce:
            return self.start()
        self._move(ClientTrigger.RESUME)
        if task is not None and (task.spec_hash, task.max_unit_price, task.units, task.kind) != (
                self.spec_hash, self.max_unit_price, self.units, int(self.kind)):
            # a task id is (client, nonce): another PostTask signed with our key took the nonce
            self.height = event.height
            return self._resume_pruned(None)
        if task is None:
            self.height = event.height
            self._providers = event.ledger.providers
            return self._resume_pruned(last_seen)
        out = self.handle(event)
        if not self.closed:
            out.append(ServeSpec(self.spec_hash, self.spec_bytes))  # providers and verifiers may fetch it
        state: ClientState = self.state  # handle() moved it on (mypy keeps the narrowing from above)
        if state is ClientState.COLLECTING and task.bid_deadline > event.height:
            # bids that arrived before the crash are gone with it: ask again until the ledger's deadline
            self.announce_deadline = task.bid_deadline
            out.append(self._announce())
        return out

    def restore_closed(self, outcome: TaskOutcome | None, *, last_seen: Task | None = None,
                       delivered: bytes | None = None) -> None:
        """Rebuild a task the journal recorded as over (settled, refused, given up on): closed, wanting no events.

        Used instead of :meth:`resume` when nothing is left to do for the task
        (a paid one whose result is still missing goes through ``resume``, to
        be fetched late).
        """
        if self.state is not ClientState.NEW:
            raise MarketUsageError("ClientTask.restore_closed() on a task already started")
        self._move(ClientTrigger.RESTORE_CLOSED)
        self.task = last_seen
        self.outcome = outcome if outcome is not None else TaskOutcome.NONE
        if delivered is not None:
            self.delivered = delivered
            self.accepted = True

    def _resume_pruned(self, last_seen: Task | None) -> list[Action]:
        """:meth:`resume` for a task the ledger does not hold although our nonce passed its PostTask."""
        self._move(ClientTrigger.PRUNED)
        if last_seen is None:
            detail = (f"PostTask never reached the ledger, and nonce {self.post_nonce} was used by another "
                      "transaction: nothing was escrowed")
            return [ReportProgress(self.task_id, Stage.SETTLED, detail),
                    TaskClosed(self.task_id, TaskOutcome.NONE, detail)]
        self.task = last_seen
        settled = TaskStatus(last_seen.status) == TaskStatus.SETTLED
        self.outcome = TaskOutcome(last_seen.outcome) if settled else TaskOutcome.NONE
        out: list[Action] = []
        if not self.accepted and self.kind == TaskKind.BATCH and last_seen.provider is not None \
                and last_seen.result_hash is not None and (not settled or self.outcome == TaskOutcome.PAID) \
                and self.config.late_fetch_blocks > 0:
            self.late_fetch_until = self.height + self.config.late_fetch_blocks
            self.fetch_requested = True
            out.append(FetchResult(self.task_id, last_seen.provider, last_seen.result_hash))
        if settled:
            detail = f"settled ({self.outcome.name.lower()}) and pruned from the ledger while this client was down"
        else:
            detail = "settled and pruned from the ledger while this client was down; its outcome is not known here"
        if self.late_fetch_until is not None:
            detail += "; fetching the committed result"
        return out + [ReportProgress(self.task_id, Stage.SETTLED, detail),
                      TaskClosed(self.task_id, self.outcome if settled else None, detail)]

    def cancel(self) -> list[Action]:
        """Ask the ledger to cancel (only possible while the task collects bids)."""
        if self.state not in (ClientState.POSTING, ClientState.COLLECTING):
            raise MarketUsageError(f"cannot cancel a task in state {self.state.value}")
        return [SubmitTx(CancelTask(sender=self.key.address, nonce=0, fee=self.config.fee, task_id=self.task_id))]

    @property
    def closed(self) -> bool:
        return self.state is ClientState.CLOSED

    @property
    def wants_events(self) -> bool:
        """Open, or settled as paid while we still fetch the result we paid for."""
        return self.state is not ClientState.CLOSED or self.late_fetch_until is not None

    def handle(self, event: Event) -> list[Action]:
        if self.state is ClientState.NEW:
            raise MarketUsageError("ClientTask.handle() before start()")
        if self.state is ClientState.CLOSED:
            return self._late_fetch(event) if self.late_fetch_until is not None else []
        if isinstance(event, BlockFinalized):
            return self._on_block(event)
        if isinstance(event, BidReceived):
            return self._on_bid(event.signed, event.start)
        if isinstance(event, DeclineReceived):
            return self._on_decline(event)
        if isinstance(event, TxFailed):
            return self._on_tx_failed(event)
        if isinstance(event, InputsServed):
            if event.task_id == self.task_id and self.state is ClientState.RUNNING and self.task is not None \
                    and event.peer == self.task.provider:
                return [ReportProgress(self.task_id, Stage.RUNNING, "provider fetched the inputs")]
            return []
        if isinstance(event, InputsPushed):
            if event.task_id != self.task_id:
                return []
            if self.state is ClientState.RUNNING and self.task is not None and event.peer == self.task.provider:
                return [ReportProgress(self.task_id, Stage.RUNNING, _PUSHED)]
            if self.state is ClientState.ASSIGNING:
                self.inputs_pushed_to = event.peer
            return []
        if isinstance(event, ResultDelivered):
            return self._on_result(event) if event.task_id == self.task_id else []
        if isinstance(event, CommitmentPending):
            return self._on_commitment_pending(event) if event.task_id == self.task_id else []
        if isinstance(event, FetchFailed):
            if event.task_id == self.task_id and event.what == "result" and self.delivered is None:
                self.fetch_requested = False  # the next block asks again, until the dispute's last chance
                return [Report(self.task_id, f"result fetch failed ({event.reason}); retrying next block")]
            return []
        if isinstance(event, VerificationOutcome):
            return self._on_spot_check(event) if event.task_id == self.task_id else []
        if isinstance(event, ProviderProbed):
            return self._on_probe(event) if event.task_id == self.task_id else []
        return []

    # ------------------------------------------------------------------ failover

    #: ReopenTask refusals for one assignment before the client leaves the task to its deadline
    MAX_REOPEN_TRIES = 3

    #: phases in which a provider says it is not (or no longer) working on the task
    STOPPED_PHASES = frozenset({"unknown", "dropped", "declined", "done"})

    @property
    def probe_target(self) -> bytes | None:
        """The provider whose liveness the node should probe now: assigned, result not committed yet."""
        if not self.config.failover or self.kind != TaskKind.BATCH or self.state is not ClientState.RUNNING \
                or self.reopening or self.failover_stopped or self.task is None \
                or self.task.status != TaskStatus.ASSIGNED:
            return None
        return self.task.provider

    def _on_probe(self, event: ProviderProbed) -> list[Action]:
        provider = self.probe_target
        if provider is None or event.provider != provider:
            return []
        if not event.error and event.phase not in self.STOPPED_PHASES:
            self.probe_failures = 0
            return []
        if event.error:
            self.probe_failures += 1
            if self.probe_failures < self.config.probe_misses:
                return []
            why = f"{self.probe_failures} liveness probes unanswered ({event.error})"
        else:
            why = f"it reports the job {event.phase}"
        assert self.task is not None
        if self.height < self.task.assign_height + self.config.reopen_after_blocks:
            return []  # too early for the ledger; the next probe asks again
        if self.height + self.config.reopen_margin_blocks >= self.task.deadline_height:
            return []  # too late: the deadline settles it (MISSED) before a reopen could land
        self.reopening = True
        self.stopped.add(provider)  # not chosen again for this task
        body = ReopenTask(sender=self.key.address, nonce=0, fee=self.config.fee, task_id=self.task_id)
        return [Report(self.task_id, f"provider {provider.hex()} stopped: {why}; reopening the task"), SubmitTx(body)]

    def _on_reopened(self, task: Task) -> list[Action]:
        """The ledger took the task back from its provider: a fresh auction, announced again."""
        self.reopens_seen = task.reopens
        self.reopening = False
        self.probe_failures = 0
        self.bids.clear()
        self.starts.clear()
        self.declines.clear()
        self.refused.clear()  # the stopped provider stays out (self.stopped); the others bid afresh
        self.chosen = None
        self.delivered = None
        self.fetch_requested = False
        self.announce_deadline = task.bid_deadline
        self._move(ClientTrigger.REOPENED)
        publish = self._announce()
        out: list[Action] = [
            ReportProgress(self.task_id, Stage.POSTED, f"reopened ({task.reopens}): bids until height "
                                                       f"{task.bid_deadline}"),
            publish,
        ]
        if publish.signed.announce.spec is None:
            out.append(ServeSpec(self.spec_hash, self.spec_bytes))
        return out

    # ------------------------------------------------------------------ bids

    def _bid_problem(self, signed: VerifiedBid) -> str | None:
        bid = signed.bid
        if bid.task_id != self.task_id:
            return "bid is for another task"
        if not 0 < bid.unit_price <= self.max_unit_price:
            return f"price {bid.unit_price} outside 1..{self.max_unit_price}"
        if bid.provider == self.key.address:
            return "bid from ourselves"
        if bid.terms_hash != self.terms_hash:
            return "bid was made for other terms than this task's"
        return None  # its key and signature: checked once, before it became a VerifiedBid

    def _on_bid(self, signed: VerifiedBid, start: BidStart | None = None) -> list[Action]:
        if signed.bid.task_id != self.task_id:
            return []
        if self.state not in (ClientState.POSTING, ClientState.COLLECTING, ClientState.ASSIGNING):
            return []
        problem = self._bid_problem(signed)
        if problem is not None:
            return [Report(self.task_id, f"bid from {signed.bid.provider.hex()} ignored: {problem}")]
        known = self.bids.get(signed.bid.provider)
        if known is not None and known.bid.unit_price <= signed.bid.unit_price:
            return []
        self.bids[signed.bid.provider] = signed
        if start is not None:
            self.starts[signed.bid.provider] = start
        else:
            self.starts.pop(signed.bid.provider, None)
        out: list[Action] = [ReportProgress(self.task_id, Stage.BIDS, f"{len(self.bids)} bid(s)")]
        if self.state in (ClientState.POSTING, ClientState.COLLECTING):
            out += self._maybe_choose(self.height)
        return out

    def _on_decline(self, event: DeclineReceived) -> list[Action]:
        n = event.notice
        if n.task_id != self.task_id:
            return []
        try:
            reason: DeclineReason | int = DeclineReason(n.reason)
        except ValueError:
            reason = n.reason
        self.declines[n.provider] = (reason, n.detail)
        name = reason.name.lower() if isinstance(reason, DeclineReason) else str(reason)
        out: list[Action] = [Report(self.task_id, f"provider {n.provider.hex()} declined: {name}: {n.detail}")]
        if self.state in (ClientState.POSTING, ClientState.COLLECTING):
            out += self._maybe_choose(self.height)  # the decline may have been the last answer outstanding
        return out

    def _acceptable(self, height: int) -> list[tuple[float, int, bytes, SignedBid]]:
        """Eligible live bids with their scores, best first."""
        ranked = []
        last_inclusion = self._bid_deadline
        for addr, signed in self.bids.items():
            if addr in self.refused or addr in self.stopped:
                continue
            # The Assign lands at height + 1 at the earliest and must find the bid unexpired.
            if signed.bid.expiry_height < min(height + 1, last_inclusion):
                continue
            prov = self._providers.get(addr)
            if prov is None or not is_eligible_provider(prov, self.config.policy):
                continue
            score = score_bid(signed, prov, max_unit_price=self.max_unit_price,
                              limit_seconds=self.spec.limits.seconds, policy=self.config.policy,
                              start=self.starts.get(addr),
                              open_tasks=self._open_tasks(addr) if self._open_tasks is not None else 0)
            ranked.append((score, signed.bid.unit_price, addr, signed))
        ranked.sort(key=lambda r: (r[0], r[1], r[2]))
        return ranked

    @property
    def _bid_deadline(self) -> int:
        """The last height an Assign can land: the ledger's once the task is final, else the announce's."""
        return self.task.bid_deadline if self.task is not None else self.announce_deadline

    def _everyone_answered(self) -> bool:
        """Every other eligible registered provider has bid or declined: waiting longer cannot bring a bid."""
        others = [a for a, p in self._providers.items()
                  if a != self.key.address and a not in self.refused and a not in self.stopped
                  and is_eligible_provider(p, self.config.policy)]
        return bool(others) and all(a in self.bids or a in self.declines for a in others)

    def _maybe_choose(self, height: int) -> list[Action]:
        deadline = self._bid_deadline
        choose_at = deadline - 1 - self.config.assign_margin_blocks
        if self.task is not None and self.config.max_wait_blocks > 0:
            choose_at = min(choose_at, self.task.post_height + self.config.max_wait_blocks)
        ranked = self._acceptable(height)
        if not ranked:
            return []
        enough = (self.config.enough_bids > 0 and len(ranked) >= self.config.enough_bids) or self._everyone_answered()
        if not enough and (height < choose_at or self.task is None):
            return []
        if height >= deadline:
            return []
        _, _, addr, signed = ranked[0]
        self.chosen = signed
        self._move(ClientTrigger.BID_CHOSEN)
        self.assign_sent_height = height
        body = Assign(sender=self.key.address, nonce=0, fee=self.config.fee, task_id=self.task_id, bid=signed)
        detail = (f"chose {addr.hex()} at {signed.bid.unit_price} of {len(ranked)} eligible bid(s)"
                  f"{self._why_warm(addr, signed, ranked)}: {describe_start(self.starts.get(addr))}")
        return [Report(self.task_id, detail), SubmitTx(body)]

    def _why_warm(self, addr: bytes, signed: SignedBid, ranked: list[tuple[float, int, bytes, SignedBid]]) -> str:
        """When a warm bid won over cheaper cold ones, the timeline says so: the warm start is why it was chosen."""
        start = self.starts.get(addr)
        if start is None or not start.warm:
            return ""
        cheaper_cold = [a for _, price, a, _ in ranked if price < signed.bid.unit_price
                        and (s := self.starts.get(a)) is not None and not s.warm]
        if not cheaper_cold:
            return ""
        return (f", over {len(cheaper_cold)} cheaper cold bid(s) (a cold start weighs "
                f"{self.config.policy.cold_weight:g} in the score)")

    def _on_tx_failed(self, event: TxFailed) -> list[Action]:
        body = event.body
        if isinstance(body, PostTask) and self.task is None and self.state in (ClientState.POSTING,
                                                                                ClientState.ASSIGNING):
            self._move(ClientTrigger.POST_REFUSED)
            return [TaskClosed(self.task_id, TaskOutcome.NONE, f"PostTask refused: {event.reason}")]
        if isinstance(body, Assign) and body.task_id == self.task_id and self.state is ClientState.ASSIGNING \
                and self.chosen is not None and body.bid == self.chosen:
            # (an older Assign of ours failing -- one that timed out, then lost to the ledger's own view of the
            # task -- says nothing about the bid we are waiting on now)
            self.refused.add(body.bid.bid.provider)
            self._move(ClientTrigger.ASSIGN_REFUSED if self.task is not None
                       else ClientTrigger.ASSIGN_REFUSED_BEFORE_POSTED)
            self.chosen = None
            out: list[Action] = [Report(self.task_id, f"Assign refused ({event.reason}); trying the next bid")]
            return out + self._maybe_choose(self.height)
        if isinstance(body, Dispute) and body.task_id == self.task_id:
            return [Report(self.task_id, f"Dispute refused: {event.reason}")]
        if isinstance(body, ReopenTask) and body.task_id == self.task_id and self.reopening:
            # The result was committed first, the deadline passed, the task was reopened too often -- or only
            # our view was a block behind, or a nonce clash lost the transaction: a few tries, then the
            # provider keeps the task and the deadline rules settle it.
            self.reopening = False
            self.probe_failures = 0
            self.reopen_refusals += 1
            if self.reopen_refusals >= self.MAX_REOPEN_TRIES:
                self.failover_stopped = event.reason
                return [Report(self.task_id, f"ReopenTask refused ({event.reason}); the provider keeps the task")]
            return [Report(self.task_id, f"ReopenTask refused ({event.reason}); trying again if the provider "
                                         "still does not answer")]
        return []

    # ------------------------------------------------------------------ ledger

    def _on_block(self, event: BlockFinalized) -> list[Action]:
        self.height = event.height
        self._providers = event.ledger.providers
        task = event.ledger.tasks.get(self.task_id)
        if task is None:
            return []
        first = self.task is None
        self.task = task
        out: list[Action] = []
        if first:
            out += self._on_posted(task)
            if self.state is ClientState.ASSIGNING:
                # an Assign sent before the PostTask was final: its time to land starts now
                self.assign_sent_height = max(self.assign_sent_height, event.height)
        status = TaskStatus(task.status)
        if status == TaskStatus.POSTED and task.reopens > self.reopens_seen:
            out += self._on_reopened(task)
        if status == TaskStatus.POSTED:
            if self.state is ClientState.ASSIGNING:
                assert self.chosen is not None
                stale = event.height >= self.assign_sent_height + self.config.assign_timeout_blocks
                if stale or self.chosen.bid.expiry_height <= event.height:
                    self.refused.add(self.chosen.bid.provider)
                    self.chosen = None
                    self._move(ClientTrigger.ASSIGN_TIMED_OUT)
                    out.append(Report(self.task_id, "Assign not on the ledger in time; trying the next bid"))
            if self.state is ClientState.COLLECTING:
                out += self._maybe_choose(event.height)
        elif status == TaskStatus.ASSIGNED:
            out += self._on_assigned(task)
        elif status == TaskStatus.COMMITTED:
            out += self._on_assigned(task)
            out += self._on_committed(task, event.height)
        elif status == TaskStatus.AUDITING:
            out += self._on_assigned(task)
            if not self.audit_served:
                self.audit_served = True
                self._move(ClientTrigger.AUDIT_DRAWN)
                out.append(ServeInputs(self.task_id, self.spec, tuple(task.verifiers)))
                item = task.disputed_item
                if item is not None:  # a stream dispute: the verifiers recompute that one item
                    out.append(ServeStreamItem(self.task_id, item.input_hash, item.output_hash,
                                               tuple(task.verifiers)))
                out.append(Report(self.task_id, f"audit by {len(task.verifiers)} verifier(s) until height "
                                                f"{task.audit_deadline}"))
            # A random audit is no reason to stop fetching the result we will pay for if it passes.
            if self.kind == TaskKind.BATCH and self.delivered is None and not self.fetch_requested \
                    and task.provider is not None and task.result_hash is not None:
                self.fetch_requested = True
                out.append(FetchResult(self.task_id, task.provider, task.result_hash))
        elif status == TaskStatus.SETTLED:
            out += self._on_settled(task)
        return out

    def _on_posted(self, task: Task) -> list[Action]:
        if self.state is ClientState.POSTING:
            self._move(ClientTrigger.LEDGER_POSTED)
        return [ReportProgress(self.task_id, Stage.POSTED, f"bids until height {task.bid_deadline}")]

    def _on_assigned(self, task: Task) -> list[Action]:
        if self.state in _ASSIGNED_SEEN:
            return []
        self._move(ClientTrigger.LEDGER_ASSIGNED)
        self.probe_failures = 0
        self.failover_stopped = ""
        self.reopen_refusals = 0
        assert task.provider is not None
        out: list[Action] = [
            ReportProgress(self.task_id, Stage.ASSIGNED,
                           f"provider {task.provider.hex()} at {task.unit_price}, deadline {task.deadline_height}"),
            ServeInputs(self.task_id, self.spec, (task.provider,)),
        ]
        if self.inputs_pushed_to is not None and self.inputs_pushed_to == task.provider:
            out.append(ReportProgress(self.task_id, Stage.RUNNING, _PUSHED))
        if self.kind == TaskKind.STREAM:
            self.stream = ClientStream(key=self.key, chain_id=self.chain_id, task_id=self.task_id,
                                       provider=task.provider, units=task.units,
                                       receipt_every=self.config.receipt_every)
            out.append(OpenStream(self.task_id, task.provider, self.stream))
        return out

    def _on_commitment_pending(self, event: CommitmentPending) -> list[Action]:
        """Fetch the result the provider is committing to now, so it is here when the commitment is final."""
        if self.state is not ClientState.RUNNING or self.kind != TaskKind.BATCH or self.task is None \
                or self.task.provider != event.provider or self.delivered is not None or self.fetch_requested:
            return []
        self.fetch_requested = True
        self.prefetched_hash = event.result_hash
        return [FetchResult(self.task_id, event.provider, event.result_hash)]

    def _on_committed(self, task: Task, height: int) -> list[Action]:
        out: list[Action] = []
        if self.state is ClientState.RUNNING:
            self._move(ClientTrigger.LEDGER_COMMITTED)
        if self.state is not ClientState.COMMITTED:
            return out
        held = self.prefetched_hash if self.prefetched_hash is not None else (
            result_hash_of_bytes(self.delivered) if self.accepted and self.delivered is not None else None)
        if held is not None and held != task.result_hash:
            # fetched early for a CommitResult that is not the one that became final (the provider replaced
            # it): those bytes are no evidence against anyone; fetch what it committed to, and if we had
            # handed them out already, the final result takes their place
            if self.accepted:
                out.append(Report(self.task_id, "the provider replaced the commitment of the result handed out "
                                                "before it was final; fetching the final one in its place"))
            self.stale_prefetch = held
            self.prefetched_hash = None
            self.delivered = None
            self.accepted = False
            self.fetch_requested = False
        if self.delivered is not None and not self.accepted and not self.dispute_reason:
            out += self._check_delivered()
        elif self.delivered is None and not self.fetch_requested:
            self.fetch_requested = True
            assert task.provider is not None and task.result_hash is not None
            out.append(FetchResult(self.task_id, task.provider, task.result_hash))
        if self.committed_seen is None:
            self.committed_seen = height
        # the margin never takes more than half the window we saw: a short window still leaves time to fetch
        margin = min(self.config.dispute_margin_blocks, max(0, task.challenge_end - self.committed_seen - 1) // 2)
        last_chance = task.challenge_end - 1 - margin
        if self.state is ClientState.COMMITTED and not self.accepted and height >= last_chance \
                and self.config.dispute_undelivered and not self.dispute_reason:
            out += self._dispute("no acceptable result delivered before the challenge window closes")
        return out

    def _late_fetch(self, event: Event) -> list[Action]:
        """After a paid settlement without our result: fetch the committed result until it arrives or we give up."""
        assert self.task is not None and self.late_fetch_until is not None
        if isinstance(event, ResultDelivered) and event.task_id == self.task_id:
            if result_hash_of_bytes(event.data) != self.task.result_hash:
                self.fetch_requested = False
                return [Report(self.task_id, "late result does not hash to the commitment; fetching again")]
            try:
                outputs = decode_result(event.data)
            except ResultEncodingError as exc:
                self.late_fetch_until = None
                return [Report(self.task_id, f"committed result does not decode: {exc}")]
            self.late_fetch_until = None
            self.delivered = event.data
            return self._accept(outputs)
        if isinstance(event, FetchFailed) and event.task_id == self.task_id and event.what == "result":
            self.fetch_requested = False
            self.late_fetch_failures += 1
            wait = min(2 ** (self.late_fetch_failures - 1), self.config.late_fetch_backoff_max_blocks)
            self.late_fetch_next = self.height + wait
            return []
        if isinstance(event, BlockFinalized):
            self.height = event.height
            if event.height > self.late_fetch_until:
                self.late_fetch_until = None
                return [Report(self.task_id, f"gave up fetching the paid result after "
                                             f"{self.late_fetch_failures} failed fetch(es)")]
            if not self.fetch_requested and event.height >= self.late_fetch_next:
                self.fetch_requested = True
                assert self.task.provider is not None and self.task.result_hash is not None
                return [FetchResult(self.task_id, self.task.provider, self.task.result_hash)]
        return []

    def _on_settled(self, task: Task) -> list[Action]:
        self._move(ClientTrigger.LEDGER_SETTLED)
        self.outcome = TaskOutcome(task.outcome)
        out: list[Action] = []
        if self.outcome == TaskOutcome.PAID and not self.accepted and task.result_hash is not None \
                and task.provider is not None and self.kind == TaskKind.BATCH:
            outputs = self._committed_outputs(self.delivered) if self.delivered is not None else None
            if outputs is not None:
                out += self._accept(outputs)  # held through an audit that passed
            if not self.accepted and self.config.late_fetch_blocks > 0:
                self.late_fetch_until = self.height + self.config.late_fetch_blocks
                self.fetch_requested = False  # ask again at the next block, whatever became of earlier fetches
        details = {
            TaskOutcome.PAID: "provider paid" + ("" if self.accepted else
                                                 " (result not here yet; still fetching it)" if self.late_fetch_until
                                                 else " (no result accepted locally)"),
            TaskOutcome.FRAUD: "audit failed: provider slashed, escrow refunded",
            TaskOutcome.MISSED: "provider did not serve its committed result to the audit: escrow refunded"
            if any(a.verdict == AuditVerdict.UNAVAILABLE for a in task.attestations)
            else "provider missed its deadline: escrow refunded",
            TaskOutcome.EXPIRED: self._expiry_detail(),
            TaskOutcome.CANCELLED: "cancelled: escrow refunded",
            TaskOutcome.INPUTS_UNAVAILABLE: "the provider could not fetch the inputs from this node: escrow refunded "
                                            "less a reservation fee",
        }
        detail = details.get(self.outcome, self.outcome.name.lower())
        return out + [ReportProgress(self.task_id, Stage.SETTLED, detail), TaskClosed(self.task_id, self.outcome, detail)]

    def _expiry_detail(self) -> str:
        if not self.bids:
            why = f"; {len(self.declines)} provider(s) declined" if self.declines else ""
            return f"no bids before the bid window closed{why}: escrow refunded"
        return f"{len(self.bids)} bid(s) but none assigned in time: escrow refunded"

    # ------------------------------------------------------------------ results

    def _on_result(self, event: ResultDelivered) -> list[Action]:
        if self.accepted:
            return []
        if self.state is ClientState.DISPUTED:
            self.delivered = event.data
            outputs = self._committed_outputs(event.data) if not self.dispute_reason else None
            if outputs is not None:
                # a random audit, not our dispute: the result matches the commitment, so it is ours as it
                # would have been a block earlier (the audit still decides who is paid)
                return self._accept(outputs)
            # our own dispute (or a result that does not match): the audit decides; a paid settlement checks
            # and accepts it (_on_settled)
            return [Report(self.task_id, "result delivered during the audit; kept until it settles")]
        if self.state not in (ClientState.RUNNING, ClientState.COMMITTED):
            return []
        if self.stale_prefetch is not None and result_hash_of_bytes(event.data) == self.stale_prefetch:
            return [Report(self.task_id, "an early fetch of a replaced commitment came back; dropped")]
        self.delivered = event.data
        if self.state is ClientState.COMMITTED:
            return self._check_delivered()
        outputs = self._signed_outputs(event.data)
        if outputs is not None:
            return self._accept(outputs, "the provider's signed commitment (not final yet)")
        return [Report(self.task_id, "result delivered; waiting for the provider's CommitResult")]

    def _signed_outputs(self, data: bytes) -> Mapping[str, Any] | None:
        """The outputs of ``data`` if it is the result of the provider's signed, pending ``CommitResult`` (the
        hint that started our fetch) and decodes; None otherwise, or when a local spot check must pass first.

        Such a result is handed out before the commitment is final, as a signed stream output is: the
        signature is the same evidence a final commitment is, and waiting for the block cost a block
        interval on every result. A provider that replaces its commitment before it is final gets the final
        one's result fetched in its place (:meth:`_on_committed`).
        """
        if self.config.spot_check or self.prefetched_hash is None or result_hash_of_bytes(data) != self.prefetched_hash:
            return None
        try:
            return decode_result(data)
        except ResultEncodingError:
            return None  # judged against the final commitment, as before (a dispute)

    def _check_delivered(self) -> list[Action]:
        assert self.task is not None and self.delivered is not None
        got = result_hash_of_bytes(self.delivered)
        assert self.task.result_hash is not None  # COMMITTED: the ledger holds the provider's commitment
        if got != self.task.result_hash:
            return self._dispute(f"delivered result hashes to {got.hex()[:16]}..., "
                                 f"the provider committed {self.task.result_hash.hex()[:16]}...")
        try:
            outputs = decode_result(self.delivered)
        except ResultEncodingError as exc:
            return self._dispute(f"committed result is not a valid result encoding: {exc}")
        if self.config.spot_check:
            return [RunSpotCheck(self.task_id, self.spec, outputs)]
        return self._accept(outputs)

    def _committed_outputs(self, data: bytes) -> Mapping[str, Any] | None:
        """The outputs of ``data`` if it is the result the provider committed to (and decodes), else None."""
        assert self.task is not None
        if result_hash_of_bytes(data) != self.task.result_hash:
            return None
        try:
            return decode_result(data)
        except ResultEncodingError:
            return None

    def _accept(self, outputs: Mapping[str, Any], commitment: str = "commitment") -> list[Action]:
        self.accepted = True
        assert self.delivered is not None
        detail = f"{len(self.delivered)} bytes, hash matches {commitment}"
        return [ReportProgress(self.task_id, Stage.DELIVERED, detail), ResultReady(self.task_id, self.delivered, outputs)]

    def _on_spot_check(self, event: VerificationOutcome) -> list[Action]:
        if self.state is not ClientState.COMMITTED or self.accepted or self.delivered is None:
            return []
        if event.ok:
            return self._accept(decode_result(self.delivered))
        return self._dispute(f"local spot check failed: {event.detail}")

    def _dispute(self, reason: str) -> list[Action]:
        assert self.task is not None
        self.dispute_reason = reason
        if self.height > self.task.challenge_end - 1:
            return [Report(self.task_id, f"cannot dispute any more (challenge window over): {reason}")]
        self._move(ClientTrigger.DISPUTE_SENT)
        body = Dispute(sender=self.key.address, nonce=0, fee=self.config.fee, task_id=self.task_id, item=None)
        return [Report(self.task_id, f"disputing: {reason}"), SubmitTx(body)]

    def dispute_stream_item(self, evidence: SignedStreamOutput, reason: str) -> list[Action]:
        """Dispute one provider-signed stream output (kept by :class:`ClientStream` as evidence).

        The caller must hold the item's input and output tensors as blobs
        (content address = item hash): once the ledger draws verifiers this
        task emits ``ServeStreamItem`` for them, and a client that cannot
        produce the item loses its dispute bond.
        """
        if self.kind != TaskKind.STREAM or self.state not in (ClientState.RUNNING, ClientState.DISPUTED):
            raise MarketUsageError(f"no stream item can be disputed in state {self.state.value}")
        if evidence.output.task_id != self.task_id:
            raise MarketUsageError("the evidence is for another task")
        self._move(ClientTrigger.STREAM_ITEM_DISPUTED)
        self.audit_served = False
        body = Dispute(sender=self.key.address, nonce=0, fee=self.config.fee, task_id=self.task_id, item=evidence)
        return [Report(self.task_id, f"disputing stream item {evidence.output.index}: {reason}"), SubmitTx(body)]
