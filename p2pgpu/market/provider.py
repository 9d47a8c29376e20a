"""The provider role: bid or decline, run assigned jobs, deliver and commit, verify others' work.

One :class:`ProviderRole` per node holds the device's capability record, a
pricing policy and every task it is involved in. Per task (``JobPhase``)::

    announce --(spec inline or SpecFetched)--> AWAITING_LEDGER
    AWAITING_LEDGER --task final on ledger, announce matches--> BID | DECLINED
    AWAITING_LEDGER --not on the ledger yet, client can pay--> BID (unposted) | DECLINED
    BID (unposted) --PostTask not final in unposted_wait_blocks--> DROPPED
    BID --ledger: ASSIGNED to us--> FETCHING --InputsFetched--> QUEUED --a slot frees--> RUNNING
        --JobDone--> COMMITTING --ledger COMMITTED--> COMMITTED --SETTLED--> DONE
    BID --InputsReceived (the client pushed its inputs with its Assign)--> EARLY_FETCHING --InputsFetched-->
        EARLY_QUEUED --a slot frees--> EARLY_RUNNING --JobDone--> EARLY_DONE (result held)
    EARLY_* --ledger: ASSIGNED to us--> FETCHING | QUEUED | RUNNING | COMMITTING (the same step, now final)
    EARLY_* --ledger: assigned elsewhere / expired--> DROPPED (the early work is thrown away)
    BID --ledger: assigned elsewhere / expired--> DROPPED
    BID --ledger: ASSIGNED to us, stream task--> FETCHING --InputsFetched--> QUEUED --a slot frees--> STREAMING
        --SETTLED--> DONE
    DECLINED (busy) --capacity frees, bid window open--> AWAITING_LEDGER (assessed again)

Every move, the rarer ones included (a withdrawn bid that still wins, a job
taken back by a reopen, a deadline that passes), is a row of one table,
:data:`JOB_TRANSITIONS` (``(JobPhase, JobTrigger) -> JobPhase``), and goes
through ``_Job.move``, which refuses a pair the table does not hold with
:class:`~p2pgpu.market.transitions.IllegalTransition`.

Bidding before the PostTask is final: a client announces when it submits,
and a provider bids at once rather than a block later. That is safe for the
provider because its bid carries the hash of the terms it priced
(:func:`~ledger.transactions.task_terms_hash`) and the ledger refuses an
``Assign`` for a task posted with other terms; it is cheap for the client
because the ``Assign`` can then be final in the same block as the
``PostTask``. To keep announces that are never posted from holding its
capacity, a provider bids that way only while the client's balance covers
the announced prices of all its unposted announces we bid on (a client
with funds for fifty tasks gets early bids on fifty, one without funds on
none), and withdraws the bid if the PostTask is not final within
``unposted_wait_blocks``.

Running before the assignment is final: a client pushes a task's inputs
(:mod:`p2pgpu.bidlink`) only to the provider whose bid its ``Assign``
carries, at the moment it sends that ``Assign``. With ``run_before_final``
the provider takes the push (``InputsReceived``) as the word that it won
and runs the job in the slot its bid reserved, while the ``Assign`` is on
its way into a block (half a block interval and a consensus round on
average), instead of after; a slot goes to a job the ledger has assigned
first. Nothing leaves before the ledger agrees: the result is held, neither
served nor committed, until a finalized block shows the task ASSIGNED to
us; then it is delivered and committed at once. If the block shows it
assigned to another provider, or our bid expires, the early work is
thrown away -- the only cost, a job's compute, and only when the client's
``Assign`` fails after its push (a client that pushes without assigning
gains nothing: it never sees a result). Under load this took the slot wait
a block's burst of assignments used to queue for, and the job itself, off
the time to a result.

The provider does not deliver or commit anything before a finalized block
shows the task ASSIGNED to it, and does not start (or, run early, commit) a
job its estimate says cannot finish before ``deadline_height``.

Capacity: ``max_concurrent_jobs`` slots run jobs at once (one warm kernel
worker each; a stream session keeps its slot until it ends), and up to
``max_queued`` more won jobs wait for a slot, earliest deadline first, with
their inputs fetched while they wait. A won bid obliges the provider to run
it, so capacity is reserved when bidding: live bids count together with
queued and running jobs, and a provider at ``max_concurrent_jobs +
max_queued`` declines with ``BUSY`` and its load. Each bid's
``est_seconds`` is the queue's wait plus the job's own estimate
(:meth:`ProviderRole.queue_seconds`: the work promised spread over the
slots), and a job whose wait plus estimate does not fit its execution
window (with the pricing's safety factor) is declined ``BUSY`` rather than
promised. An announce declined ``BUSY`` is assessed again when capacity
frees, while its bid window is open: a busy provider bids again when a slot
frees.

Verifier duty: whenever a finalized block shows a task AUDITING with this
provider among its verifiers, the role fetches the spec, the inputs and
the committed result (or, for a stream dispute, the disputed item), checks
the result bytes against the committed hash, asks the node to run the
kernel's ``verify`` and attests the verdict (``PASS`` or ``FAIL``). A
client that cannot produce the item it disputes loses it.

A result that cannot be fetched is never a ``FAIL``: a verdict of fraud needs
a result fetched and checked, and a fetch can fail for reasons that are not
the provider's (issue 13: a third peer holding the provider's inbound streams
had honest providers slashed). The verifier tries again 1, 2, 4, ... blocks
apart (:func:`next_result_attempt`), each attempt bounded by the time left,
for as long as an ``Attest`` sent after the last one still lands before the
audit closes, and then attests ``UNAVAILABLE`` -- but only once it has
fetched the task's inputs: a verifier that can fetch nothing at all cannot
tell a withholding provider from its own broken network, and abstains. The
ledger settles a result a majority of the drawn verifiers found unavailable
(and nobody fetched) by the no-show rule (:func:`ledger.transition.audit_outcome`).
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from kernels.bymodel import spec_model_id
from kernels.errors import KernelError
from kernels.ops.stream_infer import disputed_item_batch
from kernels.probe import Capabilities
from kernels.spec import JobSpec, Requirements, blob_ref, decode_spec
from ledger.keys import AccountKey
from ledger.state import Task, TaskOutcome, TaskStatus
from ledger.transactions import (
    Attest,
    AuditVerdict,
    Bid,
    CommitResult,
    InputsUnavailable,
    SignedBid,
    StreamClaim,
    TaskKind,
    sign_bid,
    task_terms_hash,
)
from ledger.transition import terms_hash_of_task

from .errors import AnnounceMismatch, MarketUsageError
from .events import (
    Action,
    AnnounceReceived,
    BlockFinalized,
    CommandStream,
    DeliverResult,
    Event,
    FetchFailed,
    FetchInputs,
    FetchResult,
    FetchSpec,
    FetchStreamItem,
    InputsFetched,
    InputsReceived,
    JobDone,
    JobFailed,
    LedgerView,
    PrepareResult,
    PublishBid,
    PublishDecline,
    Report,
    ResultFetched,
    RunJob,
    RunVerify,
    ServeResult,
    ServeStream,
    SpecFetched,
    StreamItemFetched,
    SubmitTx,
    TaskClosed,
    TxFailed,
    VerifyDone,
)
from .messages import (
    BidMessage,
    DeclineNotice,
    DeclineReason,
    TaskAnnounce,
    check_announce_matches_task,
    encode_market_message,
    encode_requirements,
    sign_bid_start,
    sign_decline,
)
from .pricing import Decline, PricingPolicy, Quote, assess_task, bundle_weight_elements
from .results import ResultEncodingError, decode_result, encode_result, item_hash, result_hash_of_bytes
from .streaming import (DEFAULT_RECEIPT_EVERY, AbandonSession, ClaimRefused, CloseSession, ProviderStream,
                        RetryClaim)
from .transitions import TransitionTable
from .warmset import WarmView

__all__ = ["JOB_TRANSITIONS", "JobPhase", "JobTrigger", "ProviderConfig", "ProviderRole", "next_result_attempt",
           "sign_bid"]


def next_result_attempt(height: int, failures: int, audit_deadline: int, *, margin: int, max_wait: int) -> int | None:
    """Height of a verifier's next fetch of a committed result after ``failures`` failed ones, or None.

    Attempts are 1, 2, 4, ... blocks apart (at most ``max_wait``); the last
    one starts at ``audit_deadline - margin``, so that an ``Attest`` sent
    after it fails still lands before the audit closes. None: no later
    attempt fits -- report the result unavailable now.
    """
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    wait = min(1 << min(failures - 1, 30), max_wait)
    at = min(height + wait, audit_deadline - margin)
    return at if at > height else None


def _found_unavailable(task: Task) -> bool:
    """Whether the audit of ``task`` reported its committed result unavailable (a MISSED after a commit)."""
    return any(a.verdict == AuditVerdict.UNAVAILABLE for a in task.attestations)


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    fee: int = 1
    max_concurrent_jobs: int = 1
    """Jobs run at once (the node's ``[provider] slots``): one warm kernel worker each; a stream session holds one."""
    max_queued: int = 0
    """Won jobs that may wait for a free slot beyond those running (the node's ``[provider] queue``). Live bids,
    queued and running jobs together never exceed ``max_concurrent_jobs + max_queued``, and every bid prices in
    the wait its queue implies (module docstring)."""
    publish_declines: bool = True
    supported_kernels: frozenset[str] | None = None
    """Kernels offered (None: every kernel in the registry)."""
    max_output_bytes: int | None = None
    commit_margin_blocks: int = 1
    """Blocks needed after a job finishes to get CommitResult included."""
    commit_retries: int = 2
    fetch_retries: int = 3
    """Fetches a verifier retries (one per block), and a stream job its inputs. A batch job retries its inputs
    with backoff for as long as it could still finish, then reports them unavailable (``_inputs_failed``)."""
    attest_margin_blocks: int = 2
    """A verifier's last fetch of a committed result starts this many blocks before the audit closes, so the
    Attest sent after it (``UNAVAILABLE`` if it failed too) still lands in time."""
    result_retry_max_blocks: int = 4
    """A verifier fetches a committed result again 1, 2, 4, ... blocks after a failure, never more apart than this."""
    receipt_every: int = DEFAULT_RECEIPT_EVERY
    claim_every: int | None = None
    stream_close_margin_blocks: int = 2
    """Close a stream and make the final claim this many blocks before its deadline."""
    bid_before_final: bool = True
    """Bid on an announce before its PostTask is final (see the module docstring)."""
    unposted_wait_blocks: int = 3
    """Withdraw a bid whose task's PostTask is not final after this many blocks."""
    max_unposted_bids_per_client: int | None = None
    """A count limit on early bids per client on top of the balance bound (None: the balance bound alone)."""
    run_before_final: bool = True
    """Run a batch job once its client pushes the inputs with its ``Assign``, holding the result until the
    assignment is final (see the module docstring); False: start only once a finalized block shows it."""


class JobPhase(enum.Enum):
    AWAITING_SPEC = "awaiting-spec"
    AWAITING_LEDGER = "awaiting-ledger"
    BID = "bid"
    DECLINED = "declined"
    FETCHING = "fetching"
    QUEUED = "queued"
    RUNNING = "running"
    COMMITTING = "committing"
    COMMITTED = "committed"
    STREAMING = "streaming"
    DONE = "done"
    DROPPED = "dropped"
    EARLY_FETCHING = "early-fetching"
    """The client pushed the inputs with its Assign (not final yet): loading them."""
    EARLY_QUEUED = "early-queued"
    """Inputs in hand, waiting for a slot no assigned job wants."""
    EARLY_RUNNING = "early-running"
    """Running in a slot before the assignment is final."""
    EARLY_DONE = "early-done"
    """Computed before the assignment is final: the result is held (not served, not committed) until it is."""


class JobTrigger(enum.Enum):
    """Why a job changes phase: each handler that moves a job names one of these."""

    SPEC_MISSING = "spec-missing"
    """The announce has no spec inline and we do not know it: fetch it."""
    SPEC_INVALID = "spec-invalid"
    """The spec (inline or fetched) does not hash to the announce's or does not decode."""
    SPEC_FETCHED = "spec-fetched"
    """The fetched spec checks out: assess the task."""
    BIDDING_CLOSED = "bidding-closed"
    """The ledger's task is past its bid deadline or no longer POSTED before we bid."""
    ANNOUNCE_MISMATCH = "announce-mismatch"
    """The announce disagrees with the ledger's task (or with its own spec)."""
    BID_SENT = "bid-sent"
    """We priced the task and published a bid."""
    DECLINED = "declined"
    """We cannot or will not do the task (unsupported, too big, busy, ...)."""
    CAPACITY_FREED = "capacity-freed"
    """A BUSY decline's bid window is still open and capacity freed: assess it again."""
    NOT_ON_LEDGER = "not-on-ledger"
    """The ledger does not hold the task past the announce's bid deadline (never posted, or pruned)."""
    BID_WITHDRAWN = "bid-withdrawn"
    """An early bid's PostTask was not final within ``unposted_wait_blocks``."""
    BID_LOST = "bid-lost"
    """The task was assigned elsewhere, or our bid expired."""
    ASSIGNED = "assigned"
    """The ledger assigned the task to us (on a live bid, or on one we had withdrawn): fetch the inputs."""
    ASSIGNED_TOO_LATE = "assigned-too-late"
    """Assigned to us, but too few blocks are left to run the job."""
    TAKEN_BACK = "taken-back"
    """The client reopened the task (it took us for stopped)."""
    DEADLINE_PASSED = "deadline-passed"
    """The task's deadline came before the job finished."""
    INPUTS_FETCHED = "inputs-fetched"
    """The inputs are in: wait for a slot."""
    INPUTS_UNAVAILABLE = "inputs-unavailable"
    """A batch job's input fetches kept failing until it could no longer finish: give the task back."""
    FETCH_FAILED = "fetch-failed"
    """The spec, or a stream job's inputs, could not be fetched (retries spent)."""
    RUN_STARTED = "run-started"
    """A slot freed: the batch job runs."""
    STREAM_STARTED = "stream-started"
    """A slot freed: the stream session opens (and keeps the slot until it ends)."""
    JOB_DONE = "job-done"
    """The job finished in time: deliver the result and commit it."""
    JOB_FAILED = "job-failed"
    """The job failed, or its outputs cannot be encoded as a result."""
    COMMIT_LANDED = "commit-landed"
    """The ledger shows our ``CommitResult``."""
    COMMIT_REFUSED = "commit-refused"
    """``CommitResult`` refused and no retry left."""
    LEDGER_SETTLED = "ledger-settled"
    """The ledger settled the task."""
    INPUTS_PUSHED = "inputs-pushed"
    """The client pushed us the inputs with its Assign: load them and run before the Assign is final."""
    EARLY_INPUTS_FETCHED = "early-inputs-fetched"
    """The pushed inputs are loaded: wait for a slot."""
    EARLY_RUN_STARTED = "early-run-started"
    """A slot no assigned job wants: the job runs early."""
    EARLY_JOB_DONE = "early-job-done"
    """The early run finished: hold the result until the assignment is final."""
    EARLY_ABANDONED = "early-abandoned"
    """The early load or run failed: back to a plain bid (the job runs, if assigned, the usual way)."""
    ASSIGNED_WHILE_QUEUED = "assigned-while-queued"
    """Assigned to us with the pushed inputs in hand: wait for a slot like any assigned job."""
    ASSIGNED_WHILE_RUNNING = "assigned-while-running"
    """Assigned to us while the early run is going: it is now the job's run."""
    ASSIGNED_WHEN_DONE = "assigned-when-done"
    """Assigned to us after the early run finished: deliver and commit the held result."""


_BEFORE_BID = (JobPhase.AWAITING_SPEC, JobPhase.AWAITING_LEDGER)
_EARLY = (JobPhase.EARLY_FETCHING, JobPhase.EARLY_QUEUED, JobPhase.EARLY_RUNNING, JobPhase.EARLY_DONE)
_BID_LIVE = (JobPhase.BID, *_EARLY)
"""A live bid, its job run early or not: what the ledger's view of the auction decides."""
_WON = (JobPhase.FETCHING, JobPhase.QUEUED, JobPhase.RUNNING, JobPhase.COMMITTING, JobPhase.COMMITTED,
        JobPhase.STREAMING)

#: Every phase change of a provider's job: ``{trigger: (phases it may fire in, phase it leads to)}``.
#: :meth:`_Job.move` refuses any other pair with :class:`~p2pgpu.market.transitions.IllegalTransition`.
#: A new job starts in AWAITING_LEDGER (an announce with its spec known).
JOB_TRANSITIONS: TransitionTable[JobPhase, JobTrigger] = TransitionTable.by_trigger("provider job", {
    JobTrigger.SPEC_MISSING: ((JobPhase.AWAITING_LEDGER,), JobPhase.AWAITING_SPEC),
    JobTrigger.SPEC_INVALID: ((JobPhase.AWAITING_LEDGER, JobPhase.AWAITING_SPEC), JobPhase.DROPPED),
    JobTrigger.SPEC_FETCHED: ((JobPhase.AWAITING_SPEC,), JobPhase.AWAITING_LEDGER),
    JobTrigger.BIDDING_CLOSED: (_BEFORE_BID, JobPhase.DROPPED),
    JobTrigger.ANNOUNCE_MISMATCH: ((JobPhase.AWAITING_LEDGER, *_BID_LIVE), JobPhase.DROPPED),
    JobTrigger.BID_SENT: ((JobPhase.AWAITING_LEDGER,), JobPhase.BID),
    JobTrigger.DECLINED: ((JobPhase.AWAITING_LEDGER,), JobPhase.DECLINED),
    JobTrigger.CAPACITY_FREED: ((JobPhase.DECLINED,), JobPhase.AWAITING_LEDGER),
    JobTrigger.NOT_ON_LEDGER: ((*_BEFORE_BID, *_BID_LIVE, *_WON), JobPhase.DROPPED),
    JobTrigger.BID_WITHDRAWN: (_BID_LIVE, JobPhase.DROPPED),
    JobTrigger.BID_LOST: (_BID_LIVE, JobPhase.DROPPED),
    # DROPPED: a bid we withdrew still won (the client's Assign carries it); the ledger holds us to it.
    # EARLY_FETCHING: the inputs are on their way already.
    JobTrigger.ASSIGNED: ((JobPhase.BID, JobPhase.DROPPED, JobPhase.EARLY_FETCHING), JobPhase.FETCHING),
    JobTrigger.ASSIGNED_TOO_LATE: ((*_BID_LIVE, JobPhase.DROPPED), JobPhase.DROPPED),
    JobTrigger.ASSIGNED_WHILE_QUEUED: ((JobPhase.EARLY_QUEUED,), JobPhase.QUEUED),
    JobTrigger.ASSIGNED_WHILE_RUNNING: ((JobPhase.EARLY_RUNNING,), JobPhase.RUNNING),
    JobTrigger.ASSIGNED_WHEN_DONE: ((JobPhase.EARLY_DONE,), JobPhase.COMMITTING),
    JobTrigger.INPUTS_PUSHED: ((JobPhase.BID,), JobPhase.EARLY_FETCHING),
    JobTrigger.EARLY_INPUTS_FETCHED: ((JobPhase.EARLY_FETCHING,), JobPhase.EARLY_QUEUED),
    JobTrigger.EARLY_RUN_STARTED: ((JobPhase.EARLY_QUEUED,), JobPhase.EARLY_RUNNING),
    JobTrigger.EARLY_JOB_DONE: ((JobPhase.EARLY_RUNNING,), JobPhase.EARLY_DONE),
    JobTrigger.EARLY_ABANDONED: ((JobPhase.EARLY_FETCHING, JobPhase.EARLY_RUNNING), JobPhase.BID),
    JobTrigger.TAKEN_BACK: ((JobPhase.FETCHING, JobPhase.QUEUED, JobPhase.RUNNING, JobPhase.COMMITTING),
                            JobPhase.DROPPED),
    JobTrigger.DEADLINE_PASSED: ((JobPhase.FETCHING, JobPhase.QUEUED, JobPhase.RUNNING), JobPhase.DROPPED),
    JobTrigger.INPUTS_FETCHED: ((JobPhase.FETCHING,), JobPhase.QUEUED),
    JobTrigger.INPUTS_UNAVAILABLE: ((JobPhase.FETCHING,), JobPhase.DROPPED),
    JobTrigger.FETCH_FAILED: ((JobPhase.AWAITING_SPEC, JobPhase.FETCHING), JobPhase.DROPPED),
    JobTrigger.RUN_STARTED: ((JobPhase.QUEUED,), JobPhase.RUNNING),
    JobTrigger.STREAM_STARTED: ((JobPhase.QUEUED,), JobPhase.STREAMING),
    JobTrigger.JOB_DONE: ((JobPhase.RUNNING,), JobPhase.COMMITTING),
    JobTrigger.JOB_FAILED: ((JobPhase.RUNNING,), JobPhase.DROPPED),
    JobTrigger.COMMIT_LANDED: ((JobPhase.COMMITTING,), JobPhase.COMMITTED),
    JobTrigger.COMMIT_REFUSED: ((JobPhase.COMMITTING,), JobPhase.DROPPED),
    JobTrigger.LEDGER_SETTLED: (_WON, JobPhase.DONE),
})

_ACTIVE = frozenset({JobPhase.BID, JobPhase.FETCHING, JobPhase.QUEUED, JobPhase.RUNNING, JobPhase.STREAMING,
                     JobPhase.EARLY_FETCHING, JobPhase.EARLY_QUEUED, JobPhase.EARLY_RUNNING})
_IN_SLOT = frozenset({JobPhase.RUNNING, JobPhase.STREAMING, JobPhase.EARLY_RUNNING})
_TERMINAL = frozenset({JobPhase.DONE, JobPhase.DROPPED, JobPhase.DECLINED})
_EARLY_AS = {JobPhase.EARLY_FETCHING: JobPhase.FETCHING, JobPhase.EARLY_QUEUED: JobPhase.QUEUED,
             JobPhase.EARLY_RUNNING: JobPhase.RUNNING}
"""How an early job counts in the load a decline reports."""


@dataclass(slots=True)
class _Job:
    announce: TaskAnnounce
    phase: JobPhase
    """Changed only by :meth:`move`, along :data:`JOB_TRANSITIONS`."""
    spec: JobSpec | None = None
    quote: Quote | None = None
    bid: SignedBid | None = None
    task: Task | None = None
    result_data: bytes | None = None
    result_hash: bytes | None = None
    commit_tries: int = 0
    fetch_failures: int = 0
    refetch: bool = False
    refetch_height: int = 0
    """With ``refetch``: the height from which the input fetch is tried again (backoff)."""
    served_audit: bool = False
    stream: ProviderStream | None = None
    decline: Decline | None = None
    inputs: Mapping[str, np.ndarray] | None = None
    """Fetched inputs of a job queued for a slot."""
    withdrawn: bool = False
    """We dropped our early bid locally (its PostTask was late); the signed bid can still win the task."""
    seen_height: int = 0
    """The height at which the announce arrived."""
    exec_ms: int = 0
    """How long the run took (a result held from an early run keeps it for its CommitResult)."""

    @property
    def task_id(self) -> bytes:
        return self.announce.task_id

    def move(self, trigger: JobTrigger) -> JobPhase:
        """Change phase for ``trigger``, to where :data:`JOB_TRANSITIONS` says; the only place a phase changes.

        Raises :class:`~p2pgpu.market.transitions.IllegalTransition` (and
        stays put) if the table has no row for the current phase and ``trigger``.
        """
        self.phase = JOB_TRANSITIONS.next_state(self.phase, trigger)
        return self.phase

    @property
    def unposted(self) -> bool:
        """A live bid made from the announce alone, its task not yet seen on the ledger."""
        return self.phase in _BID_LIVE and self.task is None


class _DutyPhase(enum.Enum):
    AWAITING_SPEC = "awaiting-spec"
    FETCHING = "fetching"
    VERIFYING = "verifying"
    ATTESTED = "attested"
    ABSTAINED = "abstained"


class _DutyTrigger(enum.Enum):
    """Why a verifier duty changes phase."""

    FETCH_STARTED = "fetch-started"
    """The spec is known: fetch the inputs and the committed result (or the disputed item)."""
    SPEC_INVALID = "spec-invalid"
    """The fetched spec does not match the task: abstain."""
    FETCH_FAILED = "fetch-failed"
    """The client's data (spec, inputs, disputed item) could not be fetched, retries spent: abstain."""
    VERIFY_STARTED = "verify-started"
    """Everything is in: the kernel's ``verify`` runs."""
    ATTESTED = "attested"
    """We sent our verdict (PASS, FAIL or UNAVAILABLE)."""


#: Every phase change of a verifier duty (a new one starts in AWAITING_SPEC); :meth:`_Duty.move` refuses any other.
DUTY_TRANSITIONS: TransitionTable[_DutyPhase, _DutyTrigger] = TransitionTable.by_trigger("verifier duty", {
    _DutyTrigger.FETCH_STARTED: ((_DutyPhase.AWAITING_SPEC,), _DutyPhase.FETCHING),
    _DutyTrigger.SPEC_INVALID: ((_DutyPhase.AWAITING_SPEC,), _DutyPhase.ABSTAINED),
    _DutyTrigger.FETCH_FAILED: ((_DutyPhase.AWAITING_SPEC, _DutyPhase.FETCHING), _DutyPhase.ABSTAINED),
    _DutyTrigger.VERIFY_STARTED: ((_DutyPhase.FETCHING,), _DutyPhase.VERIFYING),
    # FETCHING: a result that does not decode, a disputed item the client cannot produce, a result unavailable
    _DutyTrigger.ATTESTED: ((_DutyPhase.FETCHING, _DutyPhase.VERIFYING), _DutyPhase.ATTESTED),
})


@dataclass(slots=True)
class _Duty:
    task: Task
    phase: _DutyPhase
    spec: JobSpec | None = None
    inputs: Mapping[str, np.ndarray] | None = None
    claimed: Mapping[str, np.ndarray] | None = None
    item: tuple[np.ndarray, np.ndarray] | None = None
    fetch_failures: int = 0
    refetch: tuple[tuple[int, str], ...] = ()
    """(height, what) of fetches to try again: ``what`` as in ``FetchFailed``."""
    result_failures: int = 0
    unavailable: str | None = None
    """Why the committed result could not be fetched, once every attempt the audit window allowed failed."""

    def move(self, trigger: _DutyTrigger) -> _DutyPhase:
        """Change phase for ``trigger``, to where :data:`DUTY_TRANSITIONS` says; the only place a phase changes."""
        self.phase = DUTY_TRANSITIONS.next_state(self.phase, trigger)
        return self.phase


class ProviderRole:
    """A node's provider side. ``handle(event)`` returns the actions to carry out."""

    def __init__(self, *, key: AccountKey, chain_id: bytes, capabilities: Capabilities,
                 pricing: PricingPolicy = PricingPolicy(), config: ProviderConfig = ProviderConfig(),
                 warm: WarmView | None = None) -> None:
        if capabilities.matmul_gflops <= 0:
            raise MarketUsageError("capabilities.matmul_gflops must be measured (> 0) to price work")
        if config.max_concurrent_jobs < 1:
            raise MarketUsageError("max_concurrent_jobs must be at least 1")
        self.key = key
        self.address = key.address
        self.chain_id = chain_id
        self.capabilities = capabilities
        self.pricing = pricing
        self.config = config
        self.warm = warm
        """The model cache's answer to "is this task's model warm here" (None: no cache, bids say nothing)."""
        self.height = 0
        self.ledger: LedgerView | None = None
        self.jobs: dict[bytes, _Job] = {}
        self.duties: dict[bytes, _Duty] = {}
        self._specs: dict[bytes, JobSpec] = {}  # spec_hash -> spec, from announces and fetches
        self.early_runs: Counter[str] = Counter()
        """Jobs run before their assignment was final: ``started``, ``used`` (the ledger assigned us the task),
        ``discarded`` (it did not: the compute that cost)."""

    # ------------------------------------------------------------------ queries

    @property
    def active_jobs(self) -> int:
        """Live bids plus won jobs not yet computed (fetching, queued, running, streaming): capacity promised."""
        return sum(1 for j in self.jobs.values() if j.phase in _ACTIVE)

    @property
    def capacity(self) -> int:
        return self.config.max_concurrent_jobs + self.config.max_queued

    @property
    def running_jobs(self) -> int:
        """Jobs holding a slot (a kernel worker) right now."""
        return sum(1 for j in self.jobs.values() if j.phase in _IN_SLOT)

    def client_of(self, task_id: bytes) -> bytes | None:
        """The client of a task we bid on or run (its address), if we know the task."""
        job = self.jobs.get(task_id)
        return job.announce.client if job is not None else None

    def pushable_inputs(self, task_id: bytes, client: bytes) -> frozenset[bytes] | None:
        """The input names a push from ``client`` for ``task_id`` may carry, or None if we take no push for it.

        Only for a task ``client`` posted that we bid on and have not fetched
        the inputs of yet (bid, or fetching): a push is the inputs our fetch
        would get, sent ahead with the client's ``Assign``.
        """
        job = self.jobs.get(task_id)
        if job is None or job.announce.client != client or job.spec is None \
                or job.phase not in (JobPhase.BID, JobPhase.FETCHING):
            return None
        return frozenset(ref.hash for _, ref in job.spec.inputs)

    def queue_seconds(self) -> float:
        """How long a job bid for now would wait for a slot: the slot time promised, spread over the slots.

        Every promise counts in full (a live bid may still be won, a running
        job's remaining time is not known here), so the figure errs long: a
        provider never bids a wait shorter than its queue can deliver. Only
        slot time counts (:attr:`Quote.slot_seconds`): inputs are fetched and
        results delivered outside the slot, while other jobs compute.
        """
        work = sum(j.quote.slot_seconds for j in self.jobs.values() if j.phase in _ACTIVE and j.quote is not None)
        return work / self.config.max_concurrent_jobs

    def _load(self) -> str:
        counts = {p: 0 for p in (JobPhase.BID, JobPhase.FETCHING, JobPhase.QUEUED, JobPhase.RUNNING,
                                 JobPhase.STREAMING)}
        for j in self.jobs.values():
            phase = _EARLY_AS.get(j.phase, j.phase)
            if phase in counts:
                counts[phase] += 1
        running = counts[JobPhase.RUNNING] + counts[JobPhase.STREAMING]
        return (f"{running} running, {counts[JobPhase.QUEUED] + counts[JobPhase.FETCHING]} queued, "
                f"{counts[JobPhase.BID]} bid(s) open; limit {self.capacity}")

    def phase(self, task_id: bytes) -> JobPhase | None:
        job = self.jobs.get(task_id)
        return job.phase if job is not None else None

    def job_status(self, requester: bytes, task_ids: list[bytes]) -> list[str]:
        """Our phase of each task, for its client's liveness probe (``"unknown"`` for anyone else's task).

        A client that gets no answer, or ``"unknown"``/``"dropped"``, takes
        the task back (``ReopenTask``); any other phase says we are on it.
        """
        out = []
        for task_id in task_ids:
            job = self.jobs.get(task_id)
            out.append(job.phase.value if job is not None and job.announce.client == requester else "unknown")
        return out

    def stream(self, task_id: bytes) -> ProviderStream | None:
        job = self.jobs.get(task_id)
        return job.stream if job is not None else None

    # ------------------------------------------------------------------ dispatch

    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, BlockFinalized):
            return self._on_block(event)
        if isinstance(event, AnnounceReceived):
            return self._on_announce(event.signed.announce)
        if isinstance(event, SpecFetched):
            return self._on_spec(event)
        if isinstance(event, InputsReceived):
            return self._on_inputs_received(event)
        if isinstance(event, InputsFetched):
            return self._on_inputs(event) + self._fill_slots()
        if isinstance(event, JobDone):
            return self._on_job_done(event) + self._fill_slots() + self._rebid_when_free()
        if isinstance(event, JobFailed):
            return self._on_job_failed(event) + self._fill_slots() + self._rebid_when_free()
        if isinstance(event, ResultFetched):
            return self._on_result_fetched(event)
        if isinstance(event, StreamItemFetched):
            return self._on_stream_item(event)
        if isinstance(event, VerifyDone):
            return self._on_verify_done(event)
        if isinstance(event, FetchFailed):
            return self._on_fetch_failed(event)
        if isinstance(event, TxFailed):
            return self._on_tx_failed(event)
        return []

    # ------------------------------------------------------------------ announces and bidding

    def _on_announce(self, a: TaskAnnounce) -> list[Action]:
        if a.chain_id != self.chain_id or a.client == self.address:
            return []
        if a.bid_deadline_height < self.height:
            return []
        known = self.jobs.get(a.task_id)
        if known is not None:
            # A task reopened by its client (failover) is announced again with a later bid deadline: a fresh
            # auction, assessed afresh, once whatever we had of it is over. Anything else is a duplicate.
            if known.phase not in _TERMINAL or a.bid_deadline_height <= known.announce.bid_deadline_height:
                return []
        job = _Job(announce=a, phase=JobPhase.AWAITING_LEDGER, seen_height=self.height)
        self.jobs[a.task_id] = job
        spec = self._specs.get(a.spec_hash)
        if spec is None and a.spec is not None:
            spec = self._learn_spec(a.spec_hash, a.spec)
            if spec is None:
                job.move(JobTrigger.SPEC_INVALID)
                return [Report(a.task_id, "announce carries a spec that does not decode; ignored")]
        if spec is None:
            job.move(JobTrigger.SPEC_MISSING)
            return [FetchSpec(a.task_id, a.spec_hash, a.client, a.data_peer)]
        job.spec = spec
        return self._try_assess(job)

    def _learn_spec(self, spec_hash: bytes, data: bytes) -> JobSpec | None:
        if hashlib.sha256(data).digest() != spec_hash:
            return None
        try:
            spec = decode_spec(data)
        except KernelError:
            return None
        self._specs[spec_hash] = spec
        return spec

    def _on_spec(self, event: SpecFetched) -> list[Action]:
        spec = self._learn_spec(event.spec_hash, event.data)
        out: list[Action] = []
        for job in list(self.jobs.values()):
            if job.phase is JobPhase.AWAITING_SPEC and job.announce.spec_hash == event.spec_hash:
                if spec is None:
                    job.move(JobTrigger.SPEC_INVALID)
                    out.append(Report(job.task_id, "fetched spec does not match its hash or does not decode"))
                else:
                    job.spec = spec
                    job.move(JobTrigger.SPEC_FETCHED)
                    out += self._try_assess(job)
        for task_id, duty in list(self.duties.items()):
            if duty.phase is _DutyPhase.AWAITING_SPEC and duty.task.spec_hash == event.spec_hash:
                if spec is None:
                    duty.move(_DutyTrigger.SPEC_INVALID)
                    out.append(Report(task_id, "verifier: fetched spec does not match the task; abstaining"))
                else:
                    duty.spec = spec
                    out += self._duty_fetch(duty)
        return out

    def _try_assess(self, job: _Job) -> list[Action]:
        """Bid or decline once the spec is known: on the ledger's task if final, else on the announce."""
        if self.ledger is None or job.spec is None or job.phase is not JobPhase.AWAITING_LEDGER:
            return []
        task = self.ledger.tasks.get(job.task_id)
        if task is None:
            return self._try_assess_unposted(job)
        job.task = task
        if task.status != TaskStatus.POSTED or self.height >= task.bid_deadline:
            if self._reopen_not_seen_yet(job, task):
                return []  # assessed again on the next block
            job.move(JobTrigger.BIDDING_CLOSED)
            return []
        try:
            check_announce_matches_task(job.announce, task)
        except AnnounceMismatch as exc:
            job.move(JobTrigger.ANNOUNCE_MISMATCH)
            return [Report(job.task_id, f"announce disagrees with the ledger ({exc}); not bidding")]
        assert job.spec is not None
        if task.model_id != spec_model_id(job.spec):  # the royalty would go to another model's owner
            job.move(JobTrigger.ANNOUNCE_MISMATCH)
            return [Report(job.task_id, "the task's model on the ledger is not the one its spec names; not bidding")]
        return self._assess(job, expiry_height=task.bid_deadline, terms_hash=terms_hash_of_task(task))

    def _reopen_not_seen_yet(self, job: _Job, task: Task) -> bool:
        """The announce is of a reopened task (its client's, with a later bid deadline than our ledger's) whose
        ReopenTask our view has not reached: our node is syncing, or its block gossip is slower than the
        announce's. Such a job waits for the ledger while the announced bid window is open, instead of being
        dropped: in a chaos run the only provider left did, and the fresh auction ended with no bids. Only the
        task's own client can announce it, and each reopen is a paid transaction, so the wait is not free."""
        a = job.announce
        return a.client == task.client and a.bid_deadline_height > task.bid_deadline \
            and self.height < a.bid_deadline_height

    def _try_assess_unposted(self, job: _Job) -> list[Action]:
        """Bid on an announce whose PostTask is not final yet, if that is safe and cheap (module docstring)."""
        a, spec = job.announce, job.spec
        assert self.ledger is not None and spec is not None
        if not self.config.bid_before_final or a.bid_deadline_height <= self.height:
            return []
        # Early bids per client are bounded by what the client's balance can escrow: announces that are never
        # posted cannot hold more of our capacity than the client could really pay for.
        early = [j for j in self.jobs.values() if j.unposted and j.announce.client == a.client]
        limit = self.config.max_unposted_bids_per_client
        if limit is not None and len(early) >= limit:
            return []
        promised = sum(j.announce.max_unit_price * j.announce.units for j in early)
        if self.ledger.get_balance(a.client) < promised + a.max_unit_price * a.units:
            return []  # cannot be posted as announced (on top of its other announces) yet; bid once (if) it is
        requirements = encode_requirements(spec.requirements)
        if requirements != encode_requirements(Requirements(device=a.device, memory_bytes=a.memory_bytes)):
            job.move(JobTrigger.ANNOUNCE_MISMATCH)
            return [Report(job.task_id, "announce's requirements disagree with its spec; not bidding")]
        terms = task_terms_hash(kind=a.kind, spec_hash=a.spec_hash, requirements=requirements, units=a.units,
                                exec_blocks=a.exec_blocks, model_id=spec_model_id(spec))
        return self._assess(job, expiry_height=a.bid_deadline_height, terms_hash=terms)

    def _assess(self, job: _Job, *, expiry_height: int, terms_hash: bytes) -> list[Action]:
        a = job.announce
        assert job.spec is not None
        model = spec_model_id(job.spec)
        entry = self.ledger.models.get(model) if model is not None and self.ledger is not None else None
        result = assess_task(
            job.spec, kind=a.kind, units=a.units, max_unit_price=a.max_unit_price,
            exec_blocks=a.exec_blocks, capabilities=self.capabilities, policy=self.pricing,
            supported_kernels=self.config.supported_kernels, max_output_bytes=self.config.max_output_bytes,
            max_devices=self.config.max_concurrent_jobs,  # one slot per GPU: a multi-GPU job borrows several
            model_weight_elements=bundle_weight_elements(entry.bundle_size) if entry is not None else None,
        )
        wait = 0.0
        estimate = self.warm.startup(a.task_id, a.spec_hash) if self.warm is not None else None
        if isinstance(result, Quote):
            # A cold model is fetched and loaded before the job can run: that wait is the bid's too.
            wait = self.queue_seconds() + (estimate.seconds if estimate is not None else 0.0)
            window = a.exec_blocks * self.pricing.block_seconds
            if self.active_jobs >= self.capacity:
                result = Decline(DeclineReason.BUSY, self._load())
            elif (wait + result.est_seconds) * self.pricing.deadline_safety > window:
                result = Decline(DeclineReason.BUSY, f"queue wait ~{wait:.3g} s + ~{result.est_seconds:.3g} s "
                                                     f"(x{self.pricing.deadline_safety} safety) does not fit "
                                                     f"{a.exec_blocks} blocks (~{window:.3g} s); {self._load()}")
        if isinstance(result, Decline):
            return self._decline(job, result, expiry_height)
        job.quote = result
        bid = Bid(task_id=a.task_id, provider=self.address, unit_price=result.unit_price,
                  est_seconds=min(math.ceil(wait + result.est_seconds), 2**32 - 1), expiry_height=expiry_height,
                  terms_hash=terms_hash)
        job.bid = sign_bid(self.key, self.chain_id, bid)
        job.move(JobTrigger.BID_SENT)
        start = None if estimate is None else sign_bid_start(self.key, self.chain_id, bid, warm=estimate.warm,
                                                             startup_seconds=estimate.seconds)
        data = encode_market_message(BidMessage(chain_id=self.chain_id, signed=job.bid, start=start))
        return [PublishBid(data, job.bid, a.client)]

    def _decline(self, job: _Job, decline: Decline, expiry_height: int) -> list[Action]:
        again = job.decline is not None and job.decline.reason == decline.reason  # a re-assessment: said it already
        job.move(JobTrigger.DECLINED)
        job.decline = decline
        out: list[Action] = [Report(job.task_id, f"declined: {decline.reason.name.lower()}: {decline.detail}")]
        if self.config.publish_declines and not again:
            notice = DeclineNotice(chain_id=self.chain_id, task_id=job.task_id, provider=self.address,
                                   reason=int(decline.reason), detail=decline.detail[:200],
                                   expiry_height=expiry_height)
            out.append(PublishDecline(encode_market_message(sign_decline(self.key, notice)), notice,
                                      job.announce.client))
        return out

    # ------------------------------------------------------------------ ledger

    def _on_block(self, event: BlockFinalized) -> list[Action]:
        self.height = event.height
        self.ledger = event.ledger
        out: list[Action] = []
        for job in list(self.jobs.values()):
            out += self._advance(job, event.ledger.tasks.get(job.task_id))
        out += self._scan_duties(event.ledger)
        # Forget finished jobs once their announce has expired (a replay of it is refused by height).
        for task_id in [t for t, j in self.jobs.items()
                        if j.phase in _TERMINAL and self.height > j.announce.bid_deadline_height]:
            del self.jobs[task_id]
        return out + self._fill_slots() + self._rebid_when_free()

    def _fill_slots(self) -> list[Action]:
        """Start queued jobs while slots are free, the earliest deadline first; then jobs to run early, in the
        order their inputs came (a slot goes to a job the ledger assigned us before one it has not yet)."""
        out: list[Action] = []
        free = self.config.max_concurrent_jobs - self.running_jobs
        if free <= 0:
            return out
        queued = sorted((j for j in self.jobs.values() if j.phase is JobPhase.QUEUED),
                        key=lambda j: (j.task.deadline_height if j.task is not None else 0, j.task_id))
        early = [j for j in self.jobs.values() if j.phase is JobPhase.EARLY_QUEUED]
        for job in queued + early:
            if free <= 0:
                break
            out += self._run(job) if job.phase is JobPhase.QUEUED else self._run_early(job)
            if job.phase in _IN_SLOT:
                free -= 1
        return out

    def _rebid_when_free(self) -> list[Action]:
        """Announces declined as BUSY are assessed again once capacity frees, while their bid window is open."""
        out: list[Action] = []
        active = self.active_jobs  # counted once, then kept: counting per job made each call quadratic in the jobs
        for job in list(self.jobs.values()):
            if active >= self.capacity:
                break
            if job.phase is JobPhase.DECLINED and job.decline is not None \
                    and job.decline.reason == DeclineReason.BUSY and self.height < job.announce.bid_deadline_height:
                job.move(JobTrigger.CAPACITY_FREED)
                out += self._try_assess(job)
                if job.phase in _ACTIVE:
                    active += 1
        return out

    def _advance(self, job: _Job, task: Task | None) -> list[Action]:
        phase = job.phase
        if phase in _TERMINAL:
            if job.withdrawn and task is not None and task.provider == self.address \
                    and task.status == TaskStatus.ASSIGNED:
                # A withdrawal is only ours: the client's Assign carries our signed bid, and the ledger now
                # holds us to it. Not running it would be a missed deadline (slashed) for a job we can do.
                job.withdrawn = False
                job.task = task
                return [Report(job.task_id, "assigned on a bid we had withdrawn; running it")] + self._start(job, task)
            return []
        if task is None:
            if self.height > job.announce.bid_deadline_height:
                self._lose(job, JobTrigger.NOT_ON_LEDGER)
            elif job.unposted and self.height > job.seen_height + self.config.unposted_wait_blocks:
                self._lose(job, JobTrigger.BID_WITHDRAWN)
                job.withdrawn = True
                return [Report(job.task_id, f"PostTask not final {self.config.unposted_wait_blocks} block(s) after "
                                            "its announce; bid withdrawn")]
            elif phase is JobPhase.AWAITING_LEDGER:
                return self._try_assess(job)  # e.g. the client's balance now covers it
            return []
        if job.unposted:
            job.task = task
            if not (task.status == TaskStatus.ASSIGNED and task.provider == self.address):
                try:
                    check_announce_matches_task(job.announce, task)
                except AnnounceMismatch as exc:
                    self._lose(job, JobTrigger.ANNOUNCE_MISMATCH)
                    return [Report(job.task_id, f"announce disagrees with the ledger ({exc}); bid withdrawn")]
        job.task = task
        status = TaskStatus(task.status)
        if phase is JobPhase.AWAITING_LEDGER:
            return self._try_assess(job)
        if phase is JobPhase.AWAITING_SPEC:
            if (self.height >= task.bid_deadline or status != TaskStatus.POSTED) \
                    and not self._reopen_not_seen_yet(job, task):
                job.move(JobTrigger.BIDDING_CLOSED)
            return []
        if phase in _BID_LIVE:
            if status != TaskStatus.POSTED and task.provider == self.address:
                return self._start(job, task)
            assert job.bid is not None
            if status != TaskStatus.POSTED or self.height >= job.bid.bid.expiry_height:
                self._lose(job, JobTrigger.BID_LOST)
                won = f"assigned to {task.provider.hex()}" if task.provider else TaskStatus(task.status).name.lower()
                return [Report(job.task_id, f"bid not taken: task {won}")]
            return []
        if phase in (JobPhase.FETCHING, JobPhase.QUEUED, JobPhase.RUNNING, JobPhase.COMMITTING) \
                and task.provider != self.address:
            # the client reopened the task (ReopenTask: it took us for stopped) and it may be someone else's now
            job.move(JobTrigger.TAKEN_BACK)
            return [Report(job.task_id, "task taken back by its client (reopened); job abandoned")]
        if status == TaskStatus.SETTLED:
            return self._settled(job, task)
        if phase in (JobPhase.FETCHING, JobPhase.QUEUED, JobPhase.RUNNING) and self.height >= task.deadline_height:
            job.move(JobTrigger.DEADLINE_PASSED)
            return [Report(job.task_id, f"deadline {task.deadline_height} reached before the job finished")]
        if phase is JobPhase.FETCHING and job.refetch and self.height >= job.refetch_height:
            assert job.spec is not None
            job.refetch = False
            return [FetchInputs(job.task_id, task.client, job.spec)]
        if phase is JobPhase.COMMITTING and status in (TaskStatus.COMMITTED, TaskStatus.AUDITING):
            phase = job.move(JobTrigger.COMMIT_LANDED)
        if phase is JobPhase.COMMITTED and status == TaskStatus.AUDITING and not job.served_audit:
            job.served_audit = True
            assert job.result_hash is not None and job.result_data is not None
            return [ServeResult(job.task_id, job.result_hash, job.result_data, tuple(task.verifiers))]
        if phase is JobPhase.STREAMING and job.stream is not None:
            # read only: the session's owner changes it (CommandStream); the role only asks
            if self.height >= task.deadline_height - self.config.stream_close_margin_blocks and not job.stream.closed:
                return [CommandStream(job.task_id, CloseSession())]
            if job.stream.claim_due(task):
                return [CommandStream(job.task_id, RetryClaim(task))]
        return []

    def _lose(self, job: _Job, trigger: JobTrigger) -> None:
        """The bid is over without a job for us to run (``trigger`` says why): an early run's work is discarded."""
        if job.phase in (JobPhase.EARLY_RUNNING, JobPhase.EARLY_DONE):
            self.early_runs["discarded"] += 1
            job.result_data = job.result_hash = None
        job.move(trigger)

    def _start(self, job: _Job, task: Task) -> list[Action]:
        assert job.spec is not None and job.quote is not None
        if task.kind == TaskKind.STREAM:
            job.move(JobTrigger.ASSIGNED)
            return [FetchInputs(job.task_id, task.client, job.spec)]
        early = job.phase
        if early in (JobPhase.EARLY_RUNNING, JobPhase.EARLY_DONE):
            self.early_runs["used"] += 1
        # a result in hand only needs its CommitResult included; anything else needs the job's time too
        need = self.config.commit_margin_blocks if early is JobPhase.EARLY_DONE else self._blocks_needed(job)
        remaining = task.deadline_height - self.height
        if remaining < need:
            self._lose(job, JobTrigger.ASSIGNED_TOO_LATE)
            return [Report(job.task_id, f"assigned, but {remaining} block(s) to the deadline and the job needs "
                                        f"~{need}: not starting")]
        if early is JobPhase.EARLY_DONE:
            job.move(JobTrigger.ASSIGNED_WHEN_DONE)
            return [Report(job.task_id, f"assignment final; result computed ahead, committing (deadline "
                                        f"{task.deadline_height})"), *self._commit(job, task)]
        if early is JobPhase.EARLY_RUNNING:
            job.move(JobTrigger.ASSIGNED_WHILE_RUNNING)
            return [Report(job.task_id, f"assignment final; running since the inputs came (deadline "
                                        f"{task.deadline_height})")]
        if early is JobPhase.EARLY_QUEUED:
            job.move(JobTrigger.ASSIGNED_WHILE_QUEUED)  # _on_block fills the slots after this
            return [Report(job.task_id, f"assignment final; inputs in hand (deadline {task.deadline_height})")]
        job.move(JobTrigger.ASSIGNED)
        if early is JobPhase.EARLY_FETCHING:
            return [Report(job.task_id, f"assignment final; loading the pushed inputs (deadline "
                                        f"{task.deadline_height})")]
        return [Report(job.task_id, f"assignment final; fetching inputs (deadline {task.deadline_height})"),
                FetchInputs(job.task_id, task.client, job.spec)]

    def _settled(self, job: _Job, task: Task) -> list[Action]:
        job.move(JobTrigger.LEDGER_SETTLED)
        outcome = TaskOutcome(task.outcome)
        out: list[Action] = []
        if job.stream is not None and not job.stream.closed:
            out.append(CommandStream(job.task_id, AbandonSession()))
        detail = {
            TaskOutcome.PAID: f"paid {task.unit_price} x {task.units if task.kind == TaskKind.BATCH else task.claimed_units}",
            TaskOutcome.FRAUD: "audit failed: collateral slashed",
            TaskOutcome.MISSED: "result not served to the audit: part of the collateral slashed (as a no-show)"
            if _found_unavailable(task) else "deadline missed: part of the collateral slashed",
        }.get(outcome, outcome.name.lower())
        out.append(TaskClosed(job.task_id, outcome, detail))
        return out

    # ------------------------------------------------------------------ running

    def _on_inputs_received(self, event: InputsReceived) -> list[Action]:
        """The client pushed a task's inputs with its Assign: load them to run before the Assign is final."""
        job = self.jobs.get(event.task_id)
        if not self.config.run_before_final or job is None or job.phase is not JobPhase.BID \
                or job.spec is None or job.announce.client != event.client \
                or job.announce.kind != TaskKind.BATCH:
            return []
        job.move(JobTrigger.INPUTS_PUSHED)
        return [FetchInputs(job.task_id, job.announce.client, job.spec)]

    def _on_inputs(self, event: InputsFetched) -> list[Action]:
        job = self.jobs.get(event.task_id)
        if job is not None and job.phase is JobPhase.FETCHING and job.task is not None:
            job.move(JobTrigger.INPUTS_FETCHED)
            job.inputs = event.inputs
            return []
        if job is not None and job.phase is JobPhase.EARLY_FETCHING:
            job.move(JobTrigger.EARLY_INPUTS_FETCHED)
            job.inputs = event.inputs
            return []
        duty = self.duties.get(event.task_id)
        if duty is not None and duty.phase is _DutyPhase.FETCHING:
            duty.inputs = event.inputs
            if duty.unavailable is not None:
                return self._report_unavailable(duty)
            return self._duty_maybe_verify(event.task_id, duty)
        return []

    def _run(self, job: _Job) -> list[Action]:
        """Give a queued job its slot: a kernel run, or a stream session (which keeps the slot until it ends)."""
        assert job.spec is not None and job.task is not None and job.inputs is not None
        inputs, job.inputs = job.inputs, None
        if job.task.kind == TaskKind.STREAM:
            job.move(JobTrigger.STREAM_STARTED)
            job.stream = ProviderStream(
                key=self.key, chain_id=self.chain_id, task_id=job.task_id, client=job.task.client,
                units=job.task.units, receipt_every=self.config.receipt_every,
                claim_every=self.config.claim_every, fee=self.config.fee,
            )
            return [ServeStream(job.task_id, job.task.client, job.spec, inputs, job.stream)]
        if self.height >= job.task.deadline_height:
            job.move(JobTrigger.DEADLINE_PASSED)
            return [Report(job.task_id, "inputs arrived after the deadline; not running")]
        job.move(JobTrigger.RUN_STARTED)
        return [RunJob(job.task_id, job.spec, inputs)]

    def _run_early(self, job: _Job) -> list[Action]:
        """Give a job not yet assigned on the ledger a free slot: its kernel runs, the result is held."""
        assert job.spec is not None and job.inputs is not None
        inputs, job.inputs = job.inputs, None
        job.move(JobTrigger.EARLY_RUN_STARTED)
        self.early_runs["started"] += 1
        return [RunJob(job.task_id, job.spec, inputs)]

    def _on_job_done(self, event: JobDone) -> list[Action]:
        job = self.jobs.get(event.task_id)
        if job is not None and job.phase is JobPhase.EARLY_RUNNING:
            return self._early_done(job, event)
        if job is None or job.phase is not JobPhase.RUNNING or job.task is None:
            return []
        if self.height >= job.task.deadline_height:
            job.move(JobTrigger.DEADLINE_PASSED)
            return [Report(job.task_id, f"job finished after the deadline {job.task.deadline_height}; not committing")]
        problem = self._hold_result(job, event)
        if problem is not None:
            job.move(JobTrigger.JOB_FAILED)
            return [Report(job.task_id, f"job outputs cannot be encoded: {problem}")]
        job.move(JobTrigger.JOB_DONE)
        return self._commit(job, job.task)

    def _early_done(self, job: _Job, event: JobDone) -> list[Action]:
        """An early run finished: keep the result, unserved, until the ledger shows the task assigned to us."""
        problem = self._hold_result(job, event)
        if problem is not None:
            job.move(JobTrigger.EARLY_ABANDONED)
            return [Report(job.task_id, f"early run's outputs cannot be encoded ({problem}); running it again if "
                                        "assigned")]
        job.move(JobTrigger.EARLY_JOB_DONE)
        assert job.result_hash is not None and job.result_data is not None
        return [PrepareResult(job.task_id, job.announce.client, job.result_hash, job.result_data)]

    @staticmethod
    def _hold_result(job: _Job, event: JobDone) -> ResultEncodingError | None:
        """Encode a finished run's outputs into the job's result (bytes, hash, run time); the error if they
        cannot be encoded (the job is left as it was)."""
        try:
            data = encode_result(event.outputs)
        except ResultEncodingError as exc:
            return exc
        job.result_data = data
        job.result_hash = result_hash_of_bytes(data)
        job.exec_ms = event.exec_ms
        return None

    def _commit(self, job: _Job, task: Task) -> list[Action]:
        """Deliver the result in hand to the task's client and commit to it (a job now COMMITTING)."""
        assert job.result_hash is not None and job.result_data is not None
        job.commit_tries = 1
        return [
            DeliverResult(job.task_id, task.client, job.result_hash, job.result_data),
            SubmitTx(CommitResult(sender=self.address, nonce=0, fee=self.config.fee, task_id=job.task_id,
                                  result_hash=job.result_hash, exec_ms=max(0, min(int(job.exec_ms), 2**64 - 1)))),
        ]

    def _on_job_failed(self, event: JobFailed) -> list[Action]:
        job = self.jobs.get(event.task_id)
        if job is not None and job.phase is JobPhase.EARLY_RUNNING:
            job.move(JobTrigger.EARLY_ABANDONED)
            return [Report(job.task_id, f"early run failed ({event.reason}); running it again if assigned")]
        if job is None or job.phase is not JobPhase.RUNNING:
            return []
        job.move(JobTrigger.JOB_FAILED)
        return [Report(job.task_id, f"job failed: {event.reason}")]

    def _on_tx_failed(self, event: TxFailed) -> list[Action]:
        body = event.body
        if isinstance(body, CommitResult):
            job = self.jobs.get(body.task_id)
            if job is None or job.phase is not JobPhase.COMMITTING:
                return []
            if job.commit_tries <= self.config.commit_retries and job.task is not None \
                    and self.height < job.task.deadline_height:
                job.commit_tries += 1
                return [Report(job.task_id, f"CommitResult refused ({event.reason}); retrying"), SubmitTx(body)]
            job.move(JobTrigger.COMMIT_REFUSED)
            return [Report(job.task_id, f"CommitResult refused ({event.reason}); giving up")]
        if isinstance(body, StreamClaim):
            job = self.jobs.get(body.receipt.receipt.task_id)
            if job is not None and job.stream is not None:
                on_ledger = job.task.claimed_units if job.task is not None else 0
                return [CommandStream(job.task_id, ClaimRefused(on_ledger, event.reason))]
        if isinstance(body, Attest):
            return [Report(body.task_id, f"Attest refused: {event.reason}")]
        return []

    # ------------------------------------------------------------------ verifier duty

    def _scan_duties(self, ledger: LedgerView) -> list[Action]:
        out: list[Action] = []
        for task_id, duty in list(self.duties.items()):
            task = ledger.tasks.get(task_id)
            if task is None or task.status != TaskStatus.AUDITING or self.height >= task.audit_deadline:
                if duty.phase not in (_DutyPhase.ATTESTED, _DutyPhase.ABSTAINED):
                    out.append(Report(task_id, "verifier: audit closed before we attested"))
                del self.duties[task_id]
            elif duty.refetch and duty.phase in (_DutyPhase.AWAITING_SPEC, _DutyPhase.FETCHING):
                due = [what for at, what in duty.refetch if at <= self.height]
                duty.refetch = tuple((at, what) for at, what in duty.refetch if at > self.height)
                out += [self._refetch_action(duty, what) for what in due]
        for task_id, task in ledger.tasks.items():
            if task.status != TaskStatus.AUDITING or self.address not in task.verifiers or task_id in self.duties:
                continue
            if any(a.verifier == self.address for a in task.attestations):
                continue
            duty = _Duty(task=task, phase=_DutyPhase.AWAITING_SPEC)
            self.duties[task_id] = duty
            spec = self._specs.get(task.spec_hash)
            if spec is None:
                announce = self.jobs[task_id].announce if task_id in self.jobs else None
                out.append(FetchSpec(task_id, task.spec_hash, task.client,
                                     announce.data_peer if announce is not None else None))
            else:
                duty.spec = spec
                out += self._duty_fetch(duty)
        return out

    def _duty_fetch(self, duty: _Duty) -> list[Action]:
        task = duty.task
        assert duty.spec is not None
        duty.move(_DutyTrigger.FETCH_STARTED)
        out: list[Action] = [FetchInputs(task.task_id, task.client, duty.spec)]
        if task.kind == TaskKind.STREAM and task.disputed_item is not None:
            item = task.disputed_item
            out.append(FetchStreamItem(task.task_id, task.client, item.input_hash, item.output_hash))
        else:
            out.append(self._fetch_result(duty))
        return out

    def _fetch_result(self, duty: _Duty) -> FetchResult:
        """A fetch of the committed result, bounded so that it ends by the last height we may still retry at."""
        task = duty.task
        assert task.provider is not None and task.result_hash is not None
        blocks = max(1, task.audit_deadline - self.config.attest_margin_blocks - self.height)
        return FetchResult(task.task_id, task.provider, task.result_hash,
                           timeout_s=blocks * self.pricing.block_seconds)

    def _attest(self, task_id: bytes, duty: _Duty, verdict: AuditVerdict, detail: str) -> list[Action]:
        duty.move(_DutyTrigger.ATTESTED)
        body = Attest(sender=self.address, nonce=0, fee=self.config.fee, task_id=task_id, verdict=verdict,
                      detail=detail[:200])
        return [Report(task_id, f"verifier: attesting {verdict.name.lower()}: {detail}"), SubmitTx(body)]

    def _on_result_fetched(self, event: ResultFetched) -> list[Action]:
        duty = self.duties.get(event.task_id)
        if duty is None or duty.phase is not _DutyPhase.FETCHING:
            return []
        got = result_hash_of_bytes(event.data)
        if got != duty.task.result_hash:  # not the committed result: it was not served (yet), nothing to check
            return self._result_not_served(duty, "the bytes served do not hash to the committed result")
        try:
            duty.claimed = decode_result(event.data)
        except ResultEncodingError as exc:  # the committed result itself, fetched and checked: it is no result
            return self._attest(event.task_id, duty, AuditVerdict.FAIL, f"committed result does not decode: {exc}")
        return self._duty_maybe_verify(event.task_id, duty)

    def _result_not_served(self, duty: _Duty, reason: str) -> list[Action]:
        """Try the committed result again later, or -- the audit window spent -- report it unavailable."""
        task_id = duty.task.task_id
        duty.result_failures += 1
        at = next_result_attempt(self.height, duty.result_failures, duty.task.audit_deadline,
                                 margin=self.config.attest_margin_blocks,
                                 max_wait=self.config.result_retry_max_blocks)
        if at is not None:
            duty.refetch = (*duty.refetch, (at, "result"))
            return [Report(task_id, f"verifier: cannot fetch the committed result ({reason}); "
                                    f"trying again at height {at}")]
        duty.unavailable = f"provider did not serve the committed result ({duty.result_failures} attempts): {reason}"
        return self._report_unavailable(duty)

    def _report_unavailable(self, duty: _Duty) -> list[Action]:
        """Attest UNAVAILABLE once we hold the inputs (proof our own fetches work); until then, wait for them."""
        assert duty.unavailable is not None
        if duty.inputs is None:
            return [Report(duty.task.task_id, "verifier: the committed result stayed unavailable; reporting it "
                                              "once the inputs are in (if we can fetch nothing, we cannot tell)")]
        return self._attest(duty.task.task_id, duty, AuditVerdict.UNAVAILABLE, duty.unavailable)

    def _on_stream_item(self, event: StreamItemFetched) -> list[Action]:
        duty = self.duties.get(event.task_id)
        if duty is None or duty.phase is not _DutyPhase.FETCHING or duty.task.disputed_item is None:
            return []
        item = duty.task.disputed_item
        try:
            ok = item_hash(event.input) == item.input_hash and item_hash(event.output) == item.output_hash
        except ResultEncodingError:
            ok = False
        if not ok:
            return self._attest(event.task_id, duty, AuditVerdict.PASS,
                                "client could not produce the disputed item's tensors")
        duty.item = (event.input, event.output)
        return self._duty_maybe_verify(event.task_id, duty)

    def _duty_maybe_verify(self, task_id: bytes, duty: _Duty) -> list[Action]:
        if duty.inputs is None or duty.spec is None:
            return []
        if duty.item is not None:
            # one sample re-run as a batch of one, or (``rows > 0``) the batch the item was
            x, y = disputed_item_batch(duty.spec, duty.item[0], duty.item[1])
            spec = replace(duty.spec, inputs=tuple(sorted((*duty.spec.inputs, ("x", blob_ref(x))))))
            duty.move(_DutyTrigger.VERIFY_STARTED)
            return [RunVerify(task_id, spec, {**duty.inputs, "x": x}, {"y": y})]
        if duty.claimed is None:
            return []
        duty.move(_DutyTrigger.VERIFY_STARTED)
        return [RunVerify(task_id, duty.spec, duty.inputs, duty.claimed)]

    def _on_verify_done(self, event: VerifyDone) -> list[Action]:
        duty = self.duties.get(event.task_id)
        if duty is None or duty.phase is not _DutyPhase.VERIFYING:
            return []
        verdict = AuditVerdict.PASS if event.ok else AuditVerdict.FAIL
        return self._attest(event.task_id, duty, verdict, event.detail or ("ok" if event.ok else "verification failed"))

    def _refetch_action(self, duty: _Duty, what: str) -> Action:
        task = duty.task
        if what == "spec" or duty.spec is None:
            return FetchSpec(task.task_id, task.spec_hash, task.client, None)
        if what == "inputs":
            return FetchInputs(task.task_id, task.client, duty.spec)
        if what == "stream-item" and task.disputed_item is not None:
            item = task.disputed_item
            return FetchStreamItem(task.task_id, task.client, item.input_hash, item.output_hash)
        return self._fetch_result(duty)

    def _blocks_needed(self, job: _Job) -> int:
        """Blocks from the inputs being in hand to a CommitResult on the ledger (the estimate, the margin)."""
        assert job.quote is not None
        return math.ceil(job.quote.est_seconds / self.pricing.block_seconds) + self.config.commit_margin_blocks

    def _inputs_failed(self, job: _Job, event: FetchFailed) -> list[Action]:
        """A batch job's input fetch failed: retry, with backoff, while the job can still finish in time.

        The client may be restarting, or briefly unreachable: giving up
        after a few tries in seconds (as we once did) got us slashed with
        most of the execution window left. Once only the job's own time and
        one block for the report are left, we tell the ledger the inputs
        were unavailable (``InputsUnavailable``): the task settles without a
        slash, rather than as our missed deadline.
        """
        assert job.task is not None
        job.fetch_failures += 1
        last_start = job.task.deadline_height - self._blocks_needed(job) - 1
        wait = min(2 ** (job.fetch_failures - 1), 8)  # blocks: 1, 2, 4, 8, 8, ...
        if self.height + wait < last_start:
            job.refetch = True
            job.refetch_height = self.height + wait
            return [Report(job.task_id, f"cannot fetch {event.what} ({event.reason}); retry {job.fetch_failures} "
                                        f"in {wait} block(s), until height {last_start}")]
        job.move(JobTrigger.INPUTS_UNAVAILABLE)
        detail = f"{job.fetch_failures} fetches of the inputs failed; last: {event.reason}"[:200]
        return [Report(job.task_id, f"inputs unavailable: {detail}; giving the task back"),
                SubmitTx(InputsUnavailable(sender=self.address, nonce=0, fee=self.config.fee, task_id=job.task_id,
                                           detail=detail))]

    def _on_fetch_failed(self, event: FetchFailed) -> list[Action]:
        duty = self.duties.get(event.task_id)
        if duty is not None and duty.phase is _DutyPhase.FETCHING and event.what == "result":
            return self._result_not_served(duty, event.reason)
        if duty is not None and duty.phase in (_DutyPhase.FETCHING, _DutyPhase.AWAITING_SPEC):
            # The spec, the inputs or a disputed item: the client's data, never held against the provider.
            # Retry next block while an Attest sent after the retry still lands before the audit closes.
            time_left = self.height + self.config.attest_margin_blocks < duty.task.audit_deadline
            if duty.fetch_failures < self.config.fetch_retries and time_left:
                duty.fetch_failures += 1
                duty.refetch = (*duty.refetch, (self.height + 1, event.what))
                return [Report(event.task_id, f"verifier: cannot fetch {event.what} ({event.reason}); retrying")]
            duty.move(_DutyTrigger.FETCH_FAILED)
            return [Report(event.task_id, f"verifier: cannot fetch {event.what} ({event.reason}); abstaining")]
        job = self.jobs.get(event.task_id)
        if job is not None and job.phase is JobPhase.EARLY_FETCHING:
            job.move(JobTrigger.EARLY_ABANDONED)  # quietly: the usual fetch follows the assignment, if it comes
            return []
        if job is not None and job.phase is JobPhase.FETCHING and job.task is not None \
                and job.task.kind == TaskKind.BATCH:
            return self._inputs_failed(job, event)
        if job is not None and job.phase is JobPhase.FETCHING and job.fetch_failures < self.config.fetch_retries:
            job.fetch_failures += 1
            job.refetch = True  # the client may not have opened access yet: retry at the next block
            job.refetch_height = self.height + 1
            return [Report(event.task_id, f"cannot fetch {event.what} ({event.reason}); retrying next block")]
        if job is not None and job.phase in (JobPhase.AWAITING_SPEC, JobPhase.FETCHING):
            job.move(JobTrigger.FETCH_FAILED)
            return [Report(event.task_id, f"cannot fetch {event.what}: {event.reason}")]
        return []
