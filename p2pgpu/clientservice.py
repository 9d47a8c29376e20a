"""The client service: this node's own tasks, from the API's submit to a kept (or deleted) result.

The client role (:class:`~p2pgpu.market.ClientTask`) decides; this service
is what the node's API talks to and what keeps a task's record:

* ``submit`` plans the terms (:mod:`p2pgpu.market.planner`), takes a nonce,
  seals the inputs, journals the task (durable before anything is sent) and
  hands the role's first actions to the market shell;
* ``view`` / ``result`` / ``wait_result`` / ``delete_result`` /
  ``dispute_stream_item`` answer the API, raising its error types;
* ``open_live_session`` posts a stream task without items and hands back its
  :class:`~p2pgpu.streams.live.LiveSession` once the provider is ready (an
  inference gateway feeds it one request at a time);
* every change a restart must survive is written to the task journal
  (:mod:`p2pgpu.taskjournal`) from worker threads, one writer per task;
* ``recover`` rebuilds the tasks from the journal at start-up, before the API
  answers and before the node sends a transaction of its own.

Actions the roles return are carried out by the market shell
(:mod:`p2pgpu.roles`), which owns the inbox, the action table and the data
plane; it calls back here for what concerns a task record (progress, result,
settlement) and hands this service ``route`` to run the role's actions.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from kernels.bymodel import spec_model_id
from kernels.errors import KernelError
from kernels.kernel import ItemSignature
from kernels.registry import lookup
from kernels.spec import JobSpec, decode_blob, decode_spec
from kernels.tensors import canonical_array, encode_tensor
from ledger.codec import DecodeError, decode, encode
from ledger.mempool import MempoolRejected, RejectReason
from ledger.state import ModelEntry, State, Task, TaskOutcome
from ledger.state import TaskStatus as LedgerTaskStatus  # trio_typing's TaskStatus is imported below
from ledger.transactions import PostTask, SignedBid, TaskKind, compute_task_id
from ledger.transition import sign_transaction
from p2pgpu.api.types import (BidView, NotFound, NotReady, PaymentRequired, StageTime, SubmitRequest, TaskView,
                              TooManyRequests, Unavailable, Unprocessable)
from p2pgpu.blobaccess import BlobAccess
from p2pgpu.blobstore import BlobStore, BlobStoreError
from p2pgpu.config import NodeConfig
from p2pgpu.dataplane import peer_id_of_account_key
from p2pgpu.market import (Action, BidReceived, BlockFinalized, ClientConfig, ClientTask, Event, MarketMessageError,
                           MarketUsageError, Report, ReportProgress, ResultReady, SubmitTx, TaskClosed, verify_bid)
from p2pgpu.market.planner import InvalidTerms, SubmissionTerms, Unaffordable, plan_submission
from p2pgpu.market.results import ResultEncodingError, decode_result, result_hash_of_bytes
from p2pgpu.net.log import log
from p2pgpu.ports import RolesNode
from p2pgpu.sealed import Purpose, SealedError, context_id, task_context
from p2pgpu.sealedstore import SealedStore
from p2pgpu.streams import ITEMS_INPUT, stream_items
from p2pgpu.streams.live import LiveSession, LiveStart, NoProviderError, SessionStartError
from p2pgpu.taskjournal import JournalError, ResultLocation, TaskEntry, TaskJournal

__all__ = ["ClientRecord", "ClientService", "RETENTION_SWEEP_S", "block_seconds", "registered_model_of", "royalty_paid"]


if TYPE_CHECKING:  # trio 0.35 has trio.TaskStatus; libp2p pulls in trio-typing's older stubs, where it lives here
    from trio_typing import TaskStatus

logger = logging.getLogger(__name__)

_KIND = {"batch": TaskKind.BATCH, "stream": TaskKind.STREAM}
_OUTCOME_NAME = {TaskOutcome.NONE: "refused", TaskOutcome.PAID: "paid", TaskOutcome.FRAUD: "fraud", TaskOutcome.MISSED: "missed",
                 TaskOutcome.EXPIRED: "expired", TaskOutcome.CANCELLED: "cancelled",
                 TaskOutcome.INPUTS_UNAVAILABLE: "inputs_unavailable"}
_OUTCOME_OF_NAME = {name: outcome for outcome, name in _OUTCOME_NAME.items()}
RETENTION_SWEEP_S = 60.0
"""How often results past ``[client] result_retention_hours`` are looked for."""

Route = Callable[[object, list[Any]], None]
"""The market shell's ``route(origin, actions)``: carry out a role's actions."""


def block_seconds(config: NodeConfig) -> float:
    """Seconds a block lasts, for deadlines counted in blocks: the pace early blocks keep (node.PACE_WINDOW)."""
    return max(float(config.consensus.block_interval), 0.2)




@dataclass
class ClientRecord:
    """What the API shows of one of our tasks."""

    task: ClientTask
    inputs: dict[str, np.ndarray]
    stage: str = "posted"
    timings: dict[str, StageTime] = field(default_factory=dict)
    bids: dict[bytes, BidView] = field(default_factory=dict)
    outcome: str | None = None
    detail: str = ""
    outputs: Mapping[str, np.ndarray] | None = None
    closed: trio.Event = field(default_factory=trio.Event)
    pinned: set[bytes] = field(default_factory=set)
    """Blobs kept for this task besides its inputs (disputed stream items), unpinned when it settles."""
    refusal: MempoolRejected | None = None
    """Why our mempool refused the PostTask, if it did (the API maps it to a status)."""
    finished: trio.Event = field(default_factory=trio.Event)
    """Set once the result is here, or the task ended without one coming (long polls wait on it)."""
    entry: TaskEntry | None = None
    """The task's journal record as last queued for writing (:mod:`p2pgpu.taskjournal`)."""
    recovered: bool = False
    """Rebuilt from the journal after a restart (a refused re-sent PostTask closes it, never drops it)."""
    ledger_key: tuple[Any, ...] | None = None
    """What of the ledger's view was last journaled (status, outcome, result hash, provider)."""
    result_pushed: bool = False
    """Its provider pushed the result over its bid link already: one push per task is taken."""
    live: LiveStart | None = None
    """A live stream task (:meth:`ClientService.open_live_session`): where its session is handed over."""


@dataclass(frozen=True, slots=True)
class _LoadedTask:
    """A journal record with the task data it names, read back from the sealed store (in a worker thread)."""

    entry: TaskEntry
    spec: JobSpec
    inputs: dict[str, np.ndarray]
    input_bodies: tuple[bytes, ...]
    """Sealed input bodies still in the blob store: pinned again while the task is open."""
    delivered: bytes | None
    outputs: dict[str, np.ndarray] | None
    problems: tuple[str, ...] = ()


def registered_model_of(spec: JobSpec, inputs: Mapping[str, np.ndarray], state: State) -> ModelEntry | None:
    """The registered model a by-model spec names (None for a spec that carries its model, or none).

    Refused before anything is reserved, sealed or posted: a model the
    registry does not hold is ``NotFound`` (``unknown_model``); a batch whose
    rows do not have the model's registered per-item shape is
    ``Unprocessable`` (``model_input_mismatch``), not a job that fails on the
    provider after the escrow is locked.
    """
    try:
        wanted = spec_model_id(spec)
    except KernelError as exc:
        raise Unprocessable(f"invalid job spec: {type(exc).__name__}: {exc}", "invalid_spec") from None
    if wanted is None:
        return None
    entry = state.models.get(wanted)
    if entry is None:
        raise NotFound(f"no registered model {wanted.hex()}: push it first (p2pgpu model push) or check the id",
                       "unknown_model")
    want = tuple(entry.input.shape)
    batched = spec.kernel == "stream_infer" and bool(spec.param_dict().get("rows", 0))
    for name in ("x", ITEMS_INPUT):  # a batch's rows, or a stream task's items (one per row, or a batch per row)
        rows = inputs.get(name)
        lead = 2 if name == ITEMS_INPUT and batched else 1
        if rows is not None and (rows.ndim != len(want) + lead
                                 or any(w is not None and w != d for w, d in zip(want, rows.shape[lead:]))):
            shown = "(" + ", ".join("any" if w is None else str(w) for w in want) + ")"
            raise Unprocessable(f"input {name!r}: rows of shape {tuple(rows.shape[lead:])}, but model "
                                f"{entry.name}@{entry.version} takes rows of shape {shown}", "model_input_mismatch")
    return entry


def royalty_paid(task: Task) -> int:
    """The royalty the ledger has paid the model's owner for ``task``, read from the task as the ledger keeps it.

    A stream task pays per claimed unit as each claim lands
    (``claimed_units``); a batch task pays its units' royalty once, when it
    settles PAID (every other outcome refunds it with the escrow).
    """
    if task.royalty_per_unit == 0:
        return 0
    if task.kind == TaskKind.STREAM:
        return task.royalty_per_unit * task.claimed_units
    paid = task.status == LedgerTaskStatus.SETTLED and task.outcome == TaskOutcome.PAID
    return task.royalty_per_unit * task.units if paid else 0


class ClientService:
    """This node's own tasks: the client API, their journal records and their recovery. See the module docstring."""

    def __init__(self, node: RolesNode, *, store: BlobStore, sealed: SealedStore, access: BlobAccess,
                 journal: TaskJournal, route: Route, pin: Callable[[bytes, bytes], None],
                 unpin_task: Callable[[bytes], None], learn_peer: Callable[[bytes, str], None],
                 stream_output: Callable[[bytes, int], np.ndarray | None],
                 stream_item: Callable[[bytes, int], np.ndarray | None] | None = None) -> None:
        """The shell's ports: ``route(task_id, actions)`` carries out a role's actions; ``pin(task_id, body)``
        keeps a sealed body in the store while the task is open and ``unpin_task(task_id)`` lets them go;
        ``learn_peer(address, peer_id)`` remembers a provider's peer unless one is known;
        ``stream_output(task_id, index)`` is an output our stream session holds, ``stream_item(task_id, index)``
        an item a live session of ours sent (still kept)."""
        self.node = node
        self.store = store
        self.sealed = sealed
        self.access = access
        self.journal = journal
        self.chain_id: bytes = node.chain_id
        self.me: bytes = node.keys.account.address
        self._route = route
        self._pin = pin
        self._unpin_task = unpin_task
        self._learn_peer = learn_peer
        self._stream_output = stream_output
        self._stream_item = stream_item or (lambda task_id, index: None)
        self.clients: dict[bytes, ClientRecord] = {}
        self._result_pins: dict[bytes, bytes] = {}  # task id -> sealed result body kept until deleted or expired
        self._resumed_height = -1  # blocks up to this one were reconciled by recover(); not fed to recovered tasks
        self._nursery: trio.Nursery | None = None  # journal writes and result keeping
        self._unwritten: dict[bytes, ClientRecord] = {}
        """Tasks whose newest journal record is not on disk yet, in the order they changed."""
        self._journal_writing = False
        self.recovery_s: float | None = None
        """Seconds :meth:`recover` took at start-up (journal read, task data opened, machines rebuilt)."""
        self.recovered_tasks = 0
        self._held_by: dict[bytes, bytes] = {}
        """Task id -> the provider holding it undelivered, as last counted in ``_open_at``."""
        self._open_at: Counter[bytes] = Counter()
        """Provider -> how many of our tasks it holds undelivered: the bid score's load term (``open_tasks``)."""

    def open_tasks(self, provider: bytes) -> int:
        """How many of our tasks ``provider`` holds and has not delivered (chosen, not closed, no result yet)."""
        return self._open_at.get(provider, 0)

    def count_holder(self, task_id: bytes) -> None:
        """After a task's actions ran: count it against the provider that now holds it, if any (``open_tasks``)."""
        record = self.clients.get(task_id)
        task = record.task if record is not None else None
        holder = task.chosen.bid.provider if task is not None and task.chosen is not None and not task.closed \
            and task.delivered is None else None
        before = self._held_by.get(task_id)
        if holder == before:
            return
        if before is not None:
            self._open_at[before] -= 1
            if self._open_at[before] <= 0:
                del self._open_at[before]
            del self._held_by[task_id]
        if holder is not None:
            self._held_by[task_id] = holder
            self._open_at[holder] += 1

    async def run(self, *, recover: bool, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write journal records in the background; with ``recover``, reload the journal first and sweep old results.

        Started by the market shell (whose nursery runs the actions ``recover`` routes) before it reads its inbox.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if recover:
                await self.recover()  # before the API answers and before any of our transactions is sent
                nursery.start_soon(self._sweep_results_forever)
            task_status.started()
            await trio.sleep_forever()

    async def submit(self, request: SubmitRequest, *, live: LiveStart | None = None,
                     avoid: frozenset[bytes] = frozenset()) -> bytes:
        """Post a task: refuse what the balance cannot escrow, take a nonce, seal the inputs, send the PostTask.

        Safe to enter many times at once: the nonce is reserved before the
        first ``await`` (sealing runs in a thread), so concurrent submissions
        get distinct nonces, hence distinct task ids; a submission that fails
        or is cancelled after that gives its nonce back (or has it filled),
        so it strands none of the others. ``live``: a stream task without
        items, whose session is handed over there (:meth:`open_live_session`).
        """
        node = self.node
        sender = node.tx_sender
        state = node.chain.state
        inputs = {name: canonical_array(arr) for name, arr in request.inputs.items()}
        model = registered_model_of(request.spec, inputs, state)
        terms = SubmissionTerms(limit_seconds=request.spec.limits.seconds, max_unit_price=request.max_unit_price,
                                units=request.units, bid_window=request.bid_window,
                                audit_rate_bps=request.audit_rate_bps,
                                royalty_per_unit=model.royalty_per_unit if model is not None else 0)
        try:
            plan = plan_submission(terms, state.params, available=sender.available(state),
                                   block_seconds=block_seconds(node.config), enough_bids=node.config.client.enough_bids,
                                   max_wait_blocks=node.config.client.max_wait_blocks)
        except InvalidTerms as exc:  # the chain's limits: a clear 422, not a refused tx
            raise Unprocessable(str(exc), "invalid_terms") from None
        except Unaffordable as exc:
            escrow, cost, available = exc.plan.escrow, exc.plan.cost, max(exc.available, 0)
            pending = sender.nonces.pending_cost()
            held = f" (balance {state.get_balance(self.me)}, of which {pending} is held for this node's " \
                   f"unexecuted transactions)" if pending else ""
            raise PaymentRequired(f"this task needs {cost} (escrow {escrow} incl. audit fee, fee {state.params.min_fee}) "
                                  f"but {available} is available{held}: short by {cost - available}") from None
        config, cost = plan.config, plan.cost
        nonce = sender.reserve(cost)
        task_id = compute_task_id(self.me, nonce)
        try:
            task = ClientTask(
                key=node.keys.account, chain_id=self.chain_id, spec=request.spec,
                post_nonce=nonce, max_unit_price=request.max_unit_price,
                data_peer=node.network.peer_id.encode(), kind=_KIND[request.kind], units=request.units,
                config=config, height=state.height, providers=state.providers, open_tasks=self.open_tasks,
            )
            task.refused.update(avoid)  # never chosen for this task, and not waited for
            context = task_context(self.chain_id, task_id, Purpose.INPUT)
            plaintexts = [arr.tobytes() for arr in inputs.values()]
            # one worker thread for all inputs: each hop to a thread and back waits on the loaded event loop
            refs = await trio.to_thread.run_sync(
                lambda: [self.sealed.seal_put(data, context=context) for data in plaintexts])
            bodies: list[tuple[bytes, bytes]] = []
            for sealed in refs:
                self._pin(task_id, sealed.content_hash)
                bodies.append((sealed.name, sealed.content_hash))
            actions = task.start()
            entry = self._first_entry(task, request, bodies, state.height, actions)
            # Durable before anything is sent or answered: a crash from here on finds the task in the journal.
            await trio.to_thread.run_sync(self.journal.write, entry)
        except (OSError, JournalError) as exc:
            sender.release(nonce)
            self._unpin_task(task_id)
            log(logger, logging.ERROR, "task_record_write_failed", task=task_id.hex()[:16], error=repr(exc))
            raise Unavailable(f"the task could not be recorded durably in the node's data directory ({exc}); "
                              "nothing was posted", "journal_failed") from None
        except BaseException:
            sender.release(nonce)
            self._unpin_task(task_id)
            self.journal.path_of(task_id).unlink(missing_ok=True)  # released nonce: the record must not post it
            raise
        record = ClientRecord(task=task, inputs=inputs, entry=entry, live=live)
        self.clients[task_id] = record
        self.access.track_inputs(task_id, request.spec)
        self._route(task_id, actions)
        if task_id not in self.clients:
            self._unpin_task(task_id)
            await trio.to_thread.run_sync(self.journal.delete, task_id)  # refused: the caller never gets its id
            if record.refusal is not None and record.refusal.reason is RejectReason.INSUFFICIENT_BALANCE:
                raise PaymentRequired(record.detail)
            if record.refusal is not None and record.refusal.reason is RejectReason.SENDER_LIMIT:
                # every mempool holds this many of one sender's pending transactions; the next block frees room
                raise TooManyRequests(f"{record.detail}; try again after the next block", "sender_limit",
                                      retry_after=max(1, math.ceil(block_seconds(self.node.config))))
            raise Unprocessable(record.detail or "the task was refused", "refused")
        self.stage(record, "posted")
        log(logger, logging.INFO, "task_submitted", task=task_id.hex()[:16], kernel=request.spec.kernel, nonce=nonce)
        return task_id

    async def open_live_session(self, request: SubmitRequest, *, start_timeout: float,
                                avoid: frozenset[bytes] = frozenset()) -> LiveSession:
        """Post a stream task without items and return its live session once the provider is ready.

        ``avoid``: providers not to choose for it (the gateway passes the ones
        that just lost a session of this model).

        The task goes through :meth:`submit` (its checks, nonce, escrow,
        journal) and its ``PostTask`` errors (``Unprocessable``,
        ``PaymentRequired``, ...) propagate unchanged. Then this waits, up
        to ``start_timeout`` seconds, for the assignment and the provider's
        ``StreamReady``. Raises :class:`~p2pgpu.streams.live.NoProviderError`
        when no provider took the task (it expired: its bids and prices, its
        declines and why) or none was assigned in time, and
        :class:`~p2pgpu.streams.live.SessionStartError` when the assigned
        provider refused or never answered. A task given up on stays posted
        or assigned (its escrow returns as for any unused stream task); a
        session that starts after that is closed at once.
        """
        if request.kind != "stream":
            raise Unprocessable(f"a live session is a stream task (kind 'stream'), not {request.kind!r}", "not_stream")
        if ITEMS_INPUT in request.inputs:
            raise Unprocessable(f"a live session is fed its items one at a time (LiveSession.infer), not in an "
                                f"{ITEMS_INPUT!r} input", "live_items")
        start = LiveStart(signature=self._live_signature(request))
        task_id = await self.submit(request, live=start, avoid=avoid)
        record = self.clients.get(task_id)
        handed = False
        try:
            with trio.move_on_after(start_timeout):
                await start.settled.wait()
            if start.session is not None:
                handed = True
                log(logger, logging.INFO, "live_session_open", task=task_id.hex()[:16],
                    provider=start.session.provider.hex()[:16], units=start.session.units,
                    k=start.session.receipt_every)
                return start.session
        finally:
            if not handed:  # timed out or cancelled: a session that starts now (or just did) is ended properly
                start.abandoned = True
                start.failed(f"no session within {start_timeout:g} s")
                if start.session is not None:
                    start.session.close_soon()
        reason = start.failure or "unknown"
        ledger_task = self.node.chain.state.tasks.get(task_id) or (record.task.task if record is not None else None)
        provider = ledger_task.provider if ledger_task is not None else None
        log(logger, logging.WARNING, "live_session_not_started", task=task_id.hex()[:16], reason=reason,
            provider=provider.hex()[:16] if provider is not None else "")
        if provider is None:
            raise NoProviderError(task_id, f"no provider took the task: {reason}; {self._auction_summary(record)}")
        raise SessionStartError(task_id, f"provider {provider.hex()} did not start the session: {reason}")

    def _live_signature(self, request: SubmitRequest) -> ItemSignature:
        """What each item of a live session must look like: the registered model's input, else the kernel's."""
        spec = request.spec
        inputs = {name: canonical_array(arr) for name, arr in request.inputs.items()}
        model = registered_model_of(spec, inputs, self.node.chain.state)
        try:
            kernel = lookup(spec.kernel, spec.version)
            if kernel.item_signature is None:
                raise Unprocessable(f"kernel {spec.kernel} v{spec.version} cannot serve a stream session",
                                    "not_streaming")
            signature = kernel.item_signature(spec, inputs)
        except KernelError as exc:
            raise Unprocessable(f"invalid job spec: {type(exc).__name__}: {exc}", "invalid_spec") from None
        if model is not None:
            return ItemSignature(dtypes=(model.input.dtype,), shape=tuple(model.input.shape),
                                 max_rows=signature.max_rows)
        return signature

    @staticmethod
    def _auction_summary(record: ClientRecord | None) -> str:
        """The task's auction in words: bids (with prices) and declines (with reasons), and its last report."""
        if record is None:
            return "the task is not known here"
        bids = ", ".join(f"{b.provider.hex()[:8]} at {b.unit_price}" for b in record.bids.values())
        declines = []
        for provider, (why, detail) in record.task.declines.items():
            name = why.name.lower() if hasattr(why, "name") else str(why)
            declines.append(f"{provider.hex()[:8]}: {name}" + (f" ({detail})" if detail else ""))
        parts = [f"{len(record.bids)} bid(s)" + (f" ({bids})" if bids else ""),
                 f"{len(declines)} decline(s)" + (f" ({'; '.join(declines)})" if declines else ""),
                 f"stage {record.stage}" + (f", outcome {record.outcome}" if record.outcome else "")]
        if record.detail:
            parts.append(f"last: {record.detail}")
        return "; ".join(parts)

    def live_start(self, task_id: bytes) -> LiveStart | None:
        """Where a live task's session is handed over (None: not a live task of ours, e.g. after a restart)."""
        record = self.clients.get(task_id)
        return record.live if record is not None else None

    def view(self, task_id: bytes) -> TaskView:
        record = self.clients.get(task_id)
        if record is None:
            raise NotFound(f"no task {task_id.hex()} submitted through this node", "unknown_task")
        # the ledger prunes a task Params.task_retention blocks after it settled; the client keeps its last view
        state = self.node.chain.state
        task = state.tasks.get(task_id) or record.task.task
        model = state.models.get(record.task.model_id) if record.task.model_id is not None else None
        start = record.task.starts.get(task.provider) if task is not None and task.provider is not None else None
        return TaskView(
            task_id=task_id, stage=record.stage, bids=tuple(record.bids.values()),  # type: ignore[arg-type]
            provider=task.provider if task is not None else None,
            unit_price=task.unit_price if task is not None and task.provider is not None else None,
            outcome=record.outcome,  # type: ignore[arg-type]
            timings=tuple(record.timings.items()),  # type: ignore[arg-type]
            detail=record.detail,
            model_id=record.task.model_id,
            royalty_per_unit=task.royalty_per_unit if task is not None else 0,
            model_name=model.name if model is not None else None,
            model_version=model.version if model is not None else None,
            start_warm=start.warm if start is not None else None,
            startup_seconds=start.startup_seconds if start is not None else None,
            royalty_paid=royalty_paid(task) if task is not None else 0,
        )

    def result(self, task_id: bytes) -> Mapping[str, np.ndarray]:
        record = self.clients.get(task_id)
        if record is None:
            raise NotFound(f"no task {task_id.hex()} submitted through this node", "unknown_task")
        if record.outputs is None:
            raise NotReady(f"task {task_id.hex()[:16]} has no result yet (stage {record.stage})", "not_ready")
        return record.outputs

    async def wait_result(self, task_id: bytes, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until task ``task_id``'s result is here or cannot come any more."""
        record = self.clients.get(task_id)
        if record is None:
            raise NotFound(f"no task {task_id.hex()} submitted through this node", "unknown_task")
        with trio.move_on_after(timeout):
            await record.finished.wait()

    async def delete_result(self, task_id: bytes) -> None:
        """Forget a settled task and delete its kept result (the sealed body and its journal record).

        Refused (NotReady, 409) while the task is open: its inputs must still
        be served and its result may still come.
        """
        record = self.clients.get(task_id)
        if record is None:
            raise NotFound(f"no task {task_id.hex()} submitted through this node", "unknown_task")
        if record.outcome is None:
            raise NotReady(f"task {task_id.hex()[:16]} is still open (stage {record.stage}); it can be deleted "
                           "once settled", "task_open")
        await self._forget_task(task_id, why="deleted")

    # ------------------------------------------------------------ durable client state (p2pgpu.taskjournal)

    def _first_entry(self, task: ClientTask, request: SubmitRequest, bodies: list[tuple[bytes, bytes]],
                     height: int, actions: list[Action]) -> TaskEntry:
        """The journal record of a task about to be posted: its terms and the signed PostTask it sends."""
        (post,) = [a.body for a in actions if isinstance(a, SubmitTx) and isinstance(a.body, PostTask)]
        stx = sign_transaction(self.node.keys.account, self.chain_id, post)  # deterministic: what the sender signs
        cfg = task.config
        return TaskEntry(
            task_id=task.task_id, post_nonce=task.post_nonce, post_tx=stx.encode(), spec=task.spec_bytes,
            max_unit_price=task.max_unit_price, kind=request.kind, units=task.units, bid_window=cfg.bid_window,
            exec_blocks=cfg.exec_blocks, audit_rate_bps=cfg.audit_rate_bps, fee=cfg.fee, enough_bids=cfg.enough_bids,
            max_wait_blocks=cfg.max_wait_blocks, submit_height=height, created_ms=int(time.time() * 1000),
            inputs=tuple(bodies),
        )

    def _persist(self, record: ClientRecord, **changes: Any) -> None:
        """Queue a newer version of the task's journal record if anything it keeps changed.

        Written in a worker thread (:meth:`_write_entries`); the journal drops a
        version older than the one on disk, so the order writes finish in does
        not matter.
        """
        entry = record.entry
        if entry is None:
            return
        ledger_task = record.task.task
        fields = dict(stage=record.stage, outcome=record.outcome, detail=record.detail,
                      timings=tuple((s, t.height, t.time_ms) for s, t in record.timings.items()),
                      ledger_task=encode(ledger_task) if ledger_task is not None else entry.ledger_task, **changes)
        if all(getattr(entry, k) == v for k, v in fields.items()):
            return
        record.entry = entry.bump(**fields)
        self._unwritten[entry.task_id] = record
        if self._nursery is not None and not self._journal_writing:
            self._journal_writing = True
            self._nursery.start_soon(self._write_entries)

    def _persist_ledger_view(self, record: ClientRecord) -> None:
        """Keep the ledger's view of the task once it changes in a way recovery needs (status, result hash)."""
        task = record.task.task
        if task is None or record.entry is None:
            return
        key = (task.status, task.outcome, task.result_hash, task.provider)
        if key != record.ledger_key:
            record.ledger_key = key
            self._persist(record)

    async def _write_entries(self) -> None:
        """Write the newest records of every task that changed, until none is waiting.

        One writer for the node, one worker thread per round: changes that come
        while a round is on disk are coalesced into the next, so a block that
        moves many tasks at once costs one thread hop and one directory fsync,
        not one of each per task and stage change (under load a thread hop
        waits on the busy event loop and costs more than the write itself).
        """
        try:
            while self._unwritten:
                entries = [record.entry for record in self._unwritten.values() if record.entry is not None]
                self._unwritten.clear()
                for entry, exc in await trio.to_thread.run_sync(self.journal.write_many, entries):
                    # the task goes on; its next change tries again
                    log(logger, logging.ERROR, "task_record_write_failed", task=entry.task_id.hex()[:16],
                        error=repr(exc))
        finally:
            self._journal_writing = False

    async def _keep_result(self, record: ClientRecord, data: bytes, result_hash: bytes) -> None:
        """Keep the accepted result until it is deleted or expires: its sealed body pinned, its place journaled.

        The fetch left the body in the blob store under the task's result
        context (with our key wrap in the sealed index); ``seal_put`` finds
        that copy, or seals the bytes again if it was evicted meanwhile.
        """
        task_id = record.task.task_id
        context = task_context(self.chain_id, task_id, Purpose.RESULT)
        try:
            # the copy the push or fetch left is known in memory: no worker thread (and its wait) for it
            ref = self.sealed.known(result_hash, context_id(context))
            if ref is None:
                ref = await trio.to_thread.run_sync(partial(self.sealed.seal_put, data, context=context))
        except (SealedError, BlobStoreError, OSError) as exc:
            log(logger, logging.ERROR, "result_keep_failed", task=task_id.hex()[:16], error=repr(exc))
            return
        if task_id not in self.clients:
            return  # deleted meanwhile
        if record.task.delivered != data:
            return  # replaced meanwhile by the result of the provider's final commitment (kept by its own call)
        before = self._result_pins.get(task_id)
        if before != ref.content_hash:
            self.store.pin(ref.content_hash)
            self._result_pins[task_id] = ref.content_hash
            if before is not None:  # a replaced result (see result_ready)
                self.store.unpin(before)
        self._persist(record, result=ResultLocation(result_hash=ref.name, body=ref.content_hash,
                                                    fetched_ms=int(time.time() * 1000)))

    async def _forget_task(self, task_id: bytes, *, why: str) -> None:
        """Drop a settled task: its record in memory and on disk, and its kept result's sealed body."""
        record = self.clients.pop(task_id, None)
        body = self._result_pins.pop(task_id, None)
        if body is not None:
            self.store.unpin(body)
        result = record.entry.result if record is not None and record.entry is not None else None
        context = task_context(self.chain_id, task_id, Purpose.RESULT)

        def drop() -> None:
            if result is not None:
                self.sealed.forget(result.result_hash, context_id(context))
                self.sealed.discard_body(result.body)
            self.journal.delete(task_id)

        await trio.to_thread.run_sync(drop)
        log(logger, logging.INFO, "task_forgotten", task=task_id.hex()[:16], why=why)

    async def sweep_results(self, now_ms: int | None = None) -> int:
        """Forget settled tasks whose result (or settlement) is older than ``[client] result_retention_hours``."""
        hours = self.node.config.client.result_retention_hours
        if hours <= 0:
            return 0
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now_ms - int(hours * 3_600_000)
        expired = []
        for task_id, record in self.clients.items():
            e = record.entry
            if record.outcome is None or e is None or (record.task.wants_events and e.result is None):
                continue  # open, or still fetching a paid result
            since = max(e.closed_ms or 0, e.result.fetched_ms if e.result is not None else 0)
            if since and since < cutoff:
                expired.append(task_id)
        for task_id in expired:
            await self._forget_task(task_id, why=f"retention of {hours:g} h passed")
        return len(expired)

    async def _sweep_results_forever(self) -> None:
        while True:
            await trio.sleep(RETENTION_SWEEP_S)
            await self.sweep_results()

    async def recover(self) -> float:
        """Reload every journaled task and reconcile it with the ledger; returns the seconds it took.

        Runs at start-up, before the API answers and before the node sends
        any transaction of its own. Reading the journal and opening the
        sealed inputs and results happens in worker threads; rebuilding the
        state machines happens at once against one finalized state (blocks
        already queued for the roles are not fed to them again). Open tasks
        serve their inputs again (pinned, re-allowed once the ledger names the
        provider or verifiers), results on the network but not here are
        fetched, and a PostTask the ledger never executed is sent again at its
        own nonce (nonces between are filled, as after any restart).
        """
        started = time.monotonic()
        report = await trio.to_thread.run_sync(self.journal.load_all)
        loaded = [await trio.to_thread.run_sync(self._load_task, e) for e in report.entries]
        state = self.node.chain.state
        self._resumed_height = state.height
        self._hold_post_nonces(state, [t for t in loaded if t.entry.open])
        for task in loaded:
            try:
                self._resume_loaded(task, state)
            except Exception as exc:  # one bad record must not keep the others (or the node) down
                log(logger, logging.ERROR, "task_recovery_failed", task=task.entry.task_id.hex()[:16], error=repr(exc))
                logger.debug("task recovery failed", exc_info=True)
        self.recovery_s = time.monotonic() - started
        self.recovered_tasks = len(loaded)
        log(logger, logging.INFO, "client_tasks_recovered", tasks=len(loaded),
            open=sum(1 for r in self.clients.values() if r.outcome is None),
            results=sum(1 for r in self.clients.values() if r.outputs is not None),
            quarantined=len(report.quarantined), height=state.height, seconds=round(self.recovery_s, 3))
        return self.recovery_s

    def _load_task(self, entry: TaskEntry) -> _LoadedTask:
        """(Worker thread.) The spec, the open task's inputs and the kept result, from the sealed store."""
        problems: list[str] = []
        spec = decode_spec(entry.spec)
        inputs: dict[str, np.ndarray] = {}
        bodies: list[bytes] = []
        if entry.open:
            cid = context_id(task_context(self.chain_id, entry.task_id, Purpose.INPUT))
            for name, ref in spec.inputs:
                sealed_ref = self.sealed.lookup(ref.hash, cid)
                if sealed_ref is None:
                    problems.append(f"input {name} is no longer in the blob store")
                    continue
                try:
                    data = self.sealed.open_ref(sealed_ref, context=task_context(self.chain_id, entry.task_id,
                                                                                 Purpose.INPUT))
                    inputs[name] = decode_blob(ref, data)
                except (SealedError, BlobStoreError, KernelError) as exc:
                    problems.append(f"input {name} does not open: {exc}")
                    continue
                bodies.append(sealed_ref.content_hash)
        delivered = outputs = None
        if entry.result is not None:
            context = task_context(self.chain_id, entry.task_id, Purpose.RESULT)
            result_ref = self.sealed.lookup(entry.result.result_hash, context_id(context))
            try:
                if result_ref is None:
                    raise BlobStoreError("its sealed body is no longer in the blob store")
                delivered = self.sealed.open_ref(result_ref, context=context)
                outputs = decode_result(delivered)
            except (SealedError, BlobStoreError, ResultEncodingError) as exc:
                problems.append(f"kept result is lost ({exc}); fetched again if the provider still serves it")
                delivered = outputs = None
        return _LoadedTask(entry, spec, inputs, tuple(bodies), delivered, outputs, tuple(problems))

    def _hold_post_nonces(self, state: State, open_tasks: list[_LoadedTask]) -> None:
        """Hold the nonces of journaled PostTasks the ledger has not executed, so they can be sent again.

        The allocator resumed at the ledger's nonce; nonces up to the highest
        such PostTask are reserved, and those that carried something else
        (lost with the old process) are released, which fills them.
        """
        sender = self.node.tx_sender
        account = state.get_account(self.me).nonce
        wanted = {t.entry.post_nonce for t in open_tasks
                  if t.entry.post_nonce >= account and t.entry.task_id not in state.tasks}
        if not wanted:
            return
        others = []
        while sender.nonces.top <= max(wanted):
            nonce = sender.reserve(0)
            if nonce not in wanted:
                others.append(nonce)
        for nonce in others:
            sender.release(nonce)

    def _resume_loaded(self, loaded: _LoadedTask, state: State) -> None:
        e = loaded.entry
        for problem in loaded.problems:
            log(logger, logging.ERROR, "task_data_lost", task=e.task_id.hex()[:16], problem=problem)
        node = self.node
        config = ClientConfig(fee=e.fee, bid_window=e.bid_window, exec_blocks=e.exec_blocks,
                              audit_rate_bps=e.audit_rate_bps, enough_bids=e.enough_bids,
                              max_wait_blocks=e.max_wait_blocks)
        task = ClientTask(key=node.keys.account, chain_id=self.chain_id, spec=loaded.spec, post_nonce=e.post_nonce,
                          max_unit_price=e.max_unit_price, data_peer=node.network.peer_id.encode(),
                          kind=_KIND[e.kind], units=e.units, config=config, height=state.height,
                          providers=state.providers, open_tasks=self.open_tasks)
        if task.task_id != e.task_id:
            raise JournalError(f"record for {e.task_id.hex()} rebuilds task {task.task_id.hex()}")
        try:
            last_seen = decode(Task, e.ledger_task) if e.ledger_task is not None else None
        except DecodeError:
            last_seen = None
        record = ClientRecord(task=task, inputs=loaded.inputs, stage=e.stage, outcome=e.outcome, detail=e.detail,
                              timings={s: StageTime(height=h, time_ms=ms) for s, h, ms in e.timings},
                              outputs=loaded.outputs, entry=e, recovered=True)
        self.clients[e.task_id] = record
        self.access.track_inputs(e.task_id, loaded.spec)
        if loaded.delivered is not None:
            self.store.pin(e.result.body)  # type: ignore[union-attr]
            self._result_pins[e.task_id] = e.result.body  # type: ignore[union-attr]
        if e.outcome is not None and (loaded.outputs is not None or e.outcome != "paid" or e.kind != "batch"):
            task.restore_closed(_OUTCOME_OF_NAME.get(e.outcome), last_seen=last_seen, delivered=loaded.delivered)
            record.closed.set()
            record.finished.set()
            return
        for body in loaded.input_bodies:
            self._pin(e.task_id, body)
        actions = task.resume(BlockFinalized(state.height, state), last_seen=last_seen, delivered=loaded.delivered)
        self._route(e.task_id, actions)
        for data in e.bids:  # the auction's bids from before the crash (verified again: they come from disk)
            try:
                signed = verify_bid(self.chain_id, decode(SignedBid, data))
            except (DecodeError, MarketMessageError):
                continue
            self._learn_peer(signed.bid.provider, peer_id_of_account_key(signed.public_key))
            self._route(e.task_id, task.handle(BidReceived(signed)))
        self._persist_ledger_view(record)

    async def dispute_stream_item(self, task_id: bytes, index: int, reason: str) -> None:
        """Dispute item ``index`` of our stream task: the provider signed an output we hold to be wrong.

        Keeps the item's input and the provider's output as blobs named by
        their item hashes (so drawn verifiers can fetch exactly what the
        provider signed), then sends the ``Dispute`` carrying the signed
        output. Raises NotFound / Unprocessable, naming the problem, when
        there is nothing to dispute.
        """
        record = self.clients.get(task_id)
        if record is None:
            raise NotFound(f"no task {task_id.hex()} submitted through this node", "unknown_task")
        cs = record.task.stream
        if cs is None:
            raise Unprocessable(f"task {task_id.hex()[:16]} has no stream session to dispute an item of",
                                "not_streaming")
        evidence = cs.evidence.get(index)
        items = stream_items(record.inputs)
        item = items[index] if 0 <= index < len(items) else self._stream_item(task_id, index)  # live: kept items
        output = self._stream_output(task_id, index)
        if output is None and record.outputs is not None and index < len(record.outputs.get("outputs", ())):
            output = record.outputs["outputs"][index]
        if evidence is None or output is None or item is None:
            raise Unprocessable(f"item {index} of task {task_id.hex()[:16]} has no signed output held here "
                                f"({cs.answered} answered)", "unknown_item")
        blobs = []
        for arr, want in ((item, evidence.output.input_hash), (output, evidence.output.output_hash)):
            data = encode_tensor(canonical_array(arr))
            if hashlib.sha256(data).digest() != want:  # the stream checked both; this is our own bookkeeping
                raise Unprocessable(f"item {index}: the tensors held here do not match the provider's signed "
                                    "hashes", "unknown_item")
            blobs.append(data)
        for data in blobs:  # stored before the Dispute goes out: a verifier may ask as soon as it is drawn
            digest = await trio.to_thread.run_sync(self.store.put, data)
            self.store.pin(digest)
            record.pinned.add(digest)
        try:
            actions = record.task.dispute_stream_item(evidence, reason or "output disputed by the client")
        except MarketUsageError as exc:
            raise Unprocessable(str(exc), "cannot_dispute") from None  # the pins go when the task settles
        log(logger, logging.INFO, "stream_item_disputed", task=task_id.hex()[:16], item=index, reason=reason)
        self._route(task_id, actions)

    # ------------------------------------------------------------ what the market shell hands over

    def on_block(self, event: BlockFinalized) -> None:
        """A finalized block for every open task (blocks ``recover`` reconciled already are skipped)."""
        for task_id, record in list(self.clients.items()):
            if record.task.wants_events and event.height > self._resumed_height:
                self._route(task_id, record.task.handle(event))
                self._persist_ledger_view(record)

    def handle(self, task_id: bytes, event: Event) -> None:
        """An event for our task ``task_id`` (a bid is kept in its record, for an auction interrupted by a crash)."""
        record = self.clients[task_id]
        if isinstance(event, BidReceived):
            bid = event.signed.bid
            record.bids[bid.provider] = BidView(provider=bid.provider, unit_price=bid.unit_price,
                                                est_seconds=bid.est_seconds, expiry_height=bid.expiry_height)
            if record.entry is not None and not record.task.closed:
                # kept with the task: after a crash the providers, having bid, would not bid again on the
                # same auction (and gossip drops a repeat of the same bytes), so the task would expire
                kept = {decode(SignedBid, b).bid.provider: b for b in record.entry.bids}
                kept[bid.provider] = event.signed.encode()
                self._persist(record, bids=tuple(kept[p] for p in sorted(kept)))
        self._route(task_id, record.task.handle(event))

    def wake_waiters(self, task_id: object) -> None:
        """After a role's actions ran: wake long polls once the result is here or can no longer come."""
        record = self.clients.get(task_id) if isinstance(task_id, bytes) else None
        if record is not None and not record.finished.is_set() and (
                record.outputs is not None or (record.task.closed and not record.task.wants_events)):
            record.finished.set()

    def post_refused(self, body: PostTask, error: MempoolRejected) -> None:
        """Our mempool refused a PostTask: ``submit`` answers with the refusal (a recovered task closes on TxFailed)."""
        task_id = compute_task_id(body.sender, body.nonce)
        record = self.clients.get(task_id)
        if record is not None and not record.recovered:
            del self.clients[task_id]
            record.detail = f"PostTask refused: {error}"
            record.refusal = error

    def inputs_of(self, task_id: bytes) -> dict[str, np.ndarray] | None:
        """The inputs of our task (stream items, spot checks), or None if it is not ours."""
        record = self.clients.get(task_id)
        return record.inputs if record is not None else None

    def probe_targets(self) -> list[tuple[bytes, bytes]]:
        """(task, provider) of our running batch tasks whose provider must show it is alive."""
        out = []
        for task_id, record in self.clients.items():
            provider = record.task.probe_target
            if provider is not None:
                out.append((task_id, provider))
        return out

    def report_progress(self, action: ReportProgress) -> None:
        record = self.clients.get(action.task_id)
        if record is not None:
            self.stage(record, action.stage.value)
            if action.detail:
                record.detail = action.detail

    def result_ready(self, action: ResultReady) -> None:
        record = self.clients.get(action.task_id)
        if record is not None:
            record.outputs = dict(action.outputs)
            kept = record.entry.result if record.entry is not None else None
            result_hash = result_hash_of_bytes(action.data)
            # a result handed out on a commitment the provider then replaced is replaced by the final one's
            if record.entry is not None and self._nursery is not None and (
                    kept is None or kept.result_hash != result_hash):
                self._nursery.start_soon(self._keep_result, record, action.data, result_hash)

    def task_closed(self, action: TaskClosed) -> None:
        """Our task settled: its outcome, its disputed stream items unpinned, its record journaled."""
        record = self.clients.get(action.task_id)
        if record is not None:
            record.outcome = ("unknown" if action.outcome is None
                              else _OUTCOME_NAME.get(TaskOutcome(action.outcome), str(action.outcome)))
            record.detail = action.detail or record.detail
            self.stage(record, "settled")
            record.closed.set()
            if record.live is not None:  # an opener still waiting learns why
                record.live.failed(f"the task closed ({record.outcome}): {record.detail}")
            for digest in record.pinned:  # disputed stream items
                self.store.unpin(digest)
            self._persist(record, closed_ms=int(time.time() * 1000))

    def report(self, task_id: object, action: Report) -> None:
        if isinstance(task_id, bytes) and task_id in self.clients:
            self.clients[task_id].detail = action.message

    def stage(self, record: ClientRecord, stage: str) -> None:
        before = (record.stage, len(record.timings))
        if record.stage != "settled":  # a result fetched after settlement is timed, but the task stays settled
            record.stage = stage
        if stage not in record.timings:
            record.timings[stage] = StageTime(height=self.node.chain.height, time_ms=int(time.time() * 1000))
        if (record.stage, len(record.timings)) != before:
            self._persist(record)
