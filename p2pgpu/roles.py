"""The Trio shell of the market roles: client tasks and the provider role in a node.

The roles (``p2pgpu.market``) decide; this module carries out their actions
and feeds back what happened. One task owns every role and handles one
event at a time from a single inbox, so roles need no locks:

* finalized blocks arrive from the consensus driver's commit hook;
* validated ``/task`` and ``/bid`` gossip arrives from the network;
* data-plane fetches and kernel runs happen in background tasks whose
  outcomes come back through the inbox as events.

Blobs live in the node's content-addressed blob store and are served over
``/p2pgpu/data/1`` only to the ledger addresses the roles named (the client,
the assigned provider, drawn verifiers; the requester's address comes from
its Noise-authenticated peer id). Task data is sealed when it is created:
the client seals each input, the provider its result, to its own key and
bound to the task context (:mod:`p2pgpu.sealedstore`); the holder wraps the
key for each entitled fetcher, and a fetch returns plaintext only after it
opened under the expected context and hashed to what the spec or
``CommitResult`` commits to. Specs are public and travel as they are.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import trio

from kernels.errors import KernelError
from kernels.spec import JobSpec, decode_blob, decode_spec
from kernels.tensors import canonical_array, decode_tensor, encode_tensor
from ledger.codec import DecodeError, decode, encode
from ledger.mempool import MempoolRejected, RejectReason
from ledger.state import State, Task, TaskOutcome
from ledger.transactions import PostTask, RegisterProvider, SignedBid, StreamClaim, TaskKind, compute_task_id
from ledger.transition import sign_transaction
from p2pgpu.api.types import (BidView, NotFound, NotReady, PaymentRequired, StageTime, SubmitRequest, TaskView,
                              Unavailable, Unprocessable)
from p2pgpu.blobaccess import ANY_PEER, BlobAccess
from p2pgpu.blobstore import BlobStore, BlobStoreError
from p2pgpu.dataplane import DataPlane, DataPlaneError, account_address_of_peer, peer_id_of_account_key
from p2pgpu.liveness import JOB_PROTOCOL, probe_providers, serve_job_status
from p2pgpu.nonce_keeper import NonceKeeper, filler_for
from p2pgpu.market.executor import ActionExecutor
from p2pgpu.marketgossip import pump_announces, pump_bids, validate_announce, validate_bid
from p2pgpu.market.planner import InvalidTerms, SubmissionTerms, Unaffordable, plan_submission
from p2pgpu.market.results import ResultEncodingError, decode_result
from p2pgpu.taskjournal import JournalError, ResultLocation, TaskEntry, TaskJournal
from p2pgpu.market import (
    AnnounceReceived,
    BidReceived,
    BlockFinalized,
    ClientConfig,
    ClientTask,
    DeclineNotice,
    DeclineReceived,
    DeliverResult,
    FetchFailed,
    FetchInputs,
    FetchResult,
    FetchSpec,
    FetchStreamItem,
    InputsFetched,
    InputsServed,
    JobDone,
    JobFailed,
    MarketMessageError,
    MarketUsageError,
    OpenStream,
    PricingPolicy,
    ProviderConfig,
    ProviderRole,
    PublishAnnounce,
    PublishBid,
    PublishDecline,
    Report,
    ReportProgress,
    ResultDelivered,
    ResultFetched,
    ResultReady,
    RunJob,
    RunSpotCheck,
    RunVerify,
    SeenCache,
    SendReceipt,
    ServeInputs,
    ServeResult,
    ServeSpec,
    ServeStream,
    ServeStreamItem,
    SignedAnnounce,
    SignedDecline,
    SpecFetched,
    StreamItemFetched,
    SubmitTx,
    TaskClosed,
    TxFailed,
    VerificationOutcome,
    VerifiedBid,
    VerifyDone,
    verify_bid,
)
from p2pgpu.net import NetError, Verdict
from p2pgpu.net.log import log
from p2pgpu.sealed import Purpose, SealedError, context_id, task_context
from p2pgpu.streams import MAX_ITEM_ELEMENTS, StreamTransport, stream_items

logger = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 60.0
MAX_BLOB_BYTES = 1 << 30
MAX_STREAM_ITEM_BYTES = 8 * MAX_ITEM_ELEMENTS + 64  # one tensor ext payload: header + float64 elements
PROVIDER = "provider"
_KIND = {"batch": TaskKind.BATCH, "stream": TaskKind.STREAM}
_OUTCOME_NAME = {TaskOutcome.NONE: "refused", TaskOutcome.PAID: "paid", TaskOutcome.FRAUD: "fraud", TaskOutcome.MISSED: "missed",
                 TaskOutcome.EXPIRED: "expired", TaskOutcome.CANCELLED: "cancelled",
                 TaskOutcome.INPUTS_UNAVAILABLE: "inputs_unavailable"}
_OUTCOME_OF_NAME = {name: outcome for outcome, name in _OUTCOME_NAME.items()}
_KIND_NAME = {TaskKind.BATCH: "batch", TaskKind.STREAM: "stream"}
RETENTION_SWEEP_S = 60.0
"""How often results past ``[client] result_retention_hours`` are looked for."""


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
    writing: bool = False
    """A worker thread is writing this task's record; it writes ``entry`` again if that changed meanwhile."""


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


class MarketRoles:
    """Runs the node's client tasks and provider role. Built and started by the node."""

    def __init__(self, node: Any, store: BlobStore, dataplane: DataPlane) -> None:
        if dataplane.sealed is None:
            raise ValueError("the market roles need a data plane with a sealed store (task data is sealed)")
        self.node = node
        self.store = store
        self.dataplane = dataplane
        self.sealed = dataplane.sealed
        self.chain_id: bytes = node.chain_id
        self.me: bytes = node.keys.account.address
        self.clients: dict[bytes, ClientRecord] = {}
        self.provider: ProviderRole | None = None
        self.runtime = None
        self.access = BlobAccess(lambda task_id, address: self._post(task_id, InputsServed(task_id, address)))
        self._pins: dict[bytes, list[bytes]] = defaultdict(list)  # task id -> sealed bodies it keeps in the store
        self.peers: dict[bytes, str] = {}
        self._held_announces: deque[SignedAnnounce] = deque(maxlen=1024)  # heard while we were behind
        self.seen_task = SeenCache()
        self.seen_bid = SeenCache()
        self.counters: dict[str, int] = defaultdict(int)
        self.nonce_keeper = NonceKeeper(self.me)
        self._sent: dict[int, tuple[object, int]] = {}  # nonce of our unexecuted tx -> (sending role, fee)
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[object, object]](16384)
        self._nursery: trio.Nursery | None = None
        self.streams = StreamTransport(node.network, address=self.me, ledger=lambda: node.chain.state,
                                       runtime=self._stream_runtime, route=self._route, peer_of=self._peer_of)
        self.journal = TaskJournal(Path(node.config.data_dir) / "client" / "tasks")
        self._result_pins: dict[bytes, bytes] = {}  # task id -> sealed result body kept until deleted or expired
        self._resumed_height = -1  # blocks up to this one were reconciled by recover(); not fed to recovered tasks
        self.recovery_s: float | None = None
        """Seconds :meth:`recover` took at start-up (journal read, task data opened, machines rebuilt)."""
        self.recovered_tasks = 0
        self._execute = self._action_table()

    # ------------------------------------------------------------ gossip validators

    def validate_task(self, peer: str, data: bytes) -> Verdict[SignedAnnounce]:
        """``/task`` validator (:func:`p2pgpu.marketgossip.validate_announce`)."""
        return validate_announce(self.node, self.chain_id, self.seen_task, peer, data)

    def validate_bid(self, peer: str, data: bytes) -> Verdict[VerifiedBid | SignedDecline]:
        """``/bid`` validator (:func:`p2pgpu.marketgossip.validate_bid`): accepted with the verified bid."""
        return validate_bid(self.node, self.chain_id, self.seen_bid, peer, data)

    def entitled(self, peer_id: str, address: bytes, blob_hash: bytes) -> bool:
        """Data-plane check: may ``address`` read ``blob_hash``? (:class:`~p2pgpu.blobaccess.BlobAccess`)"""
        return self.access.entitled(peer_id, address, blob_hash)

    def served(self, peer_id: str, address: bytes, blob_hash: bytes) -> None:
        """Data plane: a blob went out in full (:meth:`~p2pgpu.blobaccess.BlobAccess.served`)."""
        self.access.served(peer_id, address, blob_hash, is_ours=self.clients.__contains__)

    # ------------------------------------------------------------ lifecycle

    async def run(self, task_channel, bid_channel, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Channels are None on a node that does not follow ``/task`` and ``/bid`` (``Node.follows_market``)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if "client" in self.node.roles:
                await self.recover()  # before the API answers and before any of our transactions is sent
                nursery.start_soon(self._sweep_results_forever)
            if task_channel is not None:
                nursery.start_soon(pump_announces, task_channel, self._announce_arrived)
            if bid_channel is not None:
                nursery.start_soon(pump_bids, bid_channel, self._bid_arrived, self._decline_arrived)
            self.node.network.set_handler(JOB_PROTOCOL, serve_job_status(self._job_status), penalize_bad_requests=True)
            if "client" in self.node.roles:
                nursery.start_soon(probe_providers, self.node.network, self._probe_targets, self._peer_of, self._post)
            if "provider" in self.node.roles:
                nursery.start_soon(self._start_provider)
            task_status.started()
            async for target, event in self._inbox:
                try:
                    self._dispatch(target, event)
                except Exception as exc:  # a role bug must not take the node down
                    log(logger, logging.ERROR, "role_event_failed", event=type(event).__name__, error=repr(exc))
                    logger.debug("role event failed", exc_info=True)

    def on_block(self, fb, state: State) -> None:
        """Commit hook (runs in the consensus task): queue the block for every role."""
        self.seen_task.evict(state.height)
        self.seen_bid.evict(state.height)
        try:
            self._inbox_send.send_nowait(("block", BlockFinalized(state.height, state)))
            while self._held_announces and not self._behind():
                self._inbox_send.send_nowait((PROVIDER, AnnounceReceived(self._held_announces.popleft())))
        except trio.WouldBlock:
            log(logger, logging.ERROR, "role_inbox_full", height=state.height)

    def _behind(self) -> bool:
        """A provider does not bid on a ledger view that may be stale (``ConsensusDriver.behind``)."""
        driver = getattr(self.node, "driver", None)
        return driver is not None and driver.behind

    def _post(self, target: object, event: object) -> None:
        self._inbox_send.send_nowait((target, event))

    def _announce_arrived(self, rec: SignedAnnounce) -> None:
        """A validated announce from another node (``pump_announces``)."""
        self._learn_peer(rec.announce.client, rec.announce.data_peer.decode("ascii", "replace"))
        if self.provider is not None:
            if self._behind():
                self._held_announces.append(rec)  # assessed once we have caught up (on_block)
            else:
                self._post(PROVIDER, AnnounceReceived(rec))

    def _bid_arrived(self, bid: VerifiedBid) -> None:
        """A bid, verified by the ``/bid`` validator, for one of our tasks (``pump_bids``)."""
        task_id = bid.bid.task_id
        if task_id in self.clients:
            # the bid's key is the provider's libp2p identity: its peer, for fetches and liveness probes
            self.peers.setdefault(bid.bid.provider, peer_id_of_account_key(bid.public_key))
            self._post(task_id, BidReceived(bid))

    def _decline_arrived(self, notice: DeclineNotice) -> None:
        if notice.task_id in self.clients:
            self._post(notice.task_id, DeclineReceived(notice))

    def _job_status(self, requester: bytes, task_ids: list[bytes]) -> list[str]:
        """Answer a client's liveness probe (``p2pgpu.liveness``): our provider role's phase of each task."""
        if self.provider is None:
            return ["unknown"] * len(task_ids)  # not (yet) a provider: we run nothing for anyone
        return self.provider.job_status(requester, task_ids)

    def _probe_targets(self) -> list[tuple[bytes, bytes]]:
        """(task, provider) of our running batch tasks whose provider must show it is alive."""
        out = []
        for task_id, record in self.clients.items():
            provider = record.task.probe_target
            if provider is not None:
                out.append((task_id, provider))
        return out

    def _block_seconds(self) -> float:
        """Seconds a block lasts, for deadlines counted in blocks: the pace early blocks keep (node.PACE_WINDOW)."""
        return max(self.node.config.consensus.block_interval, 0.2)

    async def _start_provider(self) -> None:
        """Warm the kernel runtime (TensorFlow loads in worker processes), probe it, then start bidding.

        ``Node.run`` starts the runtime before the node joins the network (``Node.kernel_runtime``), so
        TensorFlow is usually loaded or loading by now; a node without one gets it started here.
        """
        from p2pgpu.provider_warmup import start_provider_runtime

        cfg = self.node.config.provider
        runtime = self.node.kernel_runtime or start_provider_runtime(self.node.config)
        self.runtime = runtime
        try:
            runtime.start()
            await runtime.wait_ready()
            caps = await runtime.probe(n=512, repeats=2)
        except Exception as exc:
            log(logger, logging.ERROR, "provider_runtime_failed", error=repr(exc))
            runtime.close()
            self.runtime = None
            return
        pricing = PricingPolicy(cost_per_second=float(cfg.unit_cost), margin_bps=int(cfg.margin * 10_000),
                                floor=cfg.floor, block_seconds=self._block_seconds())
        self.provider = ProviderRole(key=self.node.keys.account, chain_id=self.chain_id, capabilities=caps,
                                     pricing=pricing, config=provider_role_config(cfg))
        log(logger, logging.INFO, "provider_ready", device=caps.device_kind, gflops=round(caps.matmul_gflops, 1))
        state = self.node.chain.state
        if self.me not in state.providers:
            self._submit(PROVIDER, RegisterProvider(sender=self.me, nonce=0, fee=state.params.min_fee,
                                                    capabilities=encode(caps), bond=state.params.min_provider_bond))
        try:
            await trio.sleep_forever()
        finally:
            runtime.close()

    def _stream_runtime(self) -> Any:
        """The runtime stream sessions load models into (with the ``wrong_result`` fault drill, a lying one)."""
        if self.runtime is not None and self.node.config.provider.fault == "wrong_result":
            return _WrongOutputs(self.runtime)
        return self.runtime

    # ------------------------------------------------------------ client API

    async def submit(self, request: SubmitRequest) -> bytes:
        """Post a task: refuse what the balance cannot escrow, take a nonce, seal the inputs, send the PostTask.

        Safe to enter many times at once: the nonce is reserved before the
        first ``await`` (sealing runs in a thread), so concurrent submissions
        get distinct nonces, hence distinct task ids; a submission that fails
        or is cancelled after that gives its nonce back (or has it filled),
        so it strands none of the others.
        """
        node = self.node
        sender = node.tx_sender
        state = node.chain.state
        inputs = {name: canonical_array(arr) for name, arr in request.inputs.items()}
        terms = SubmissionTerms(limit_seconds=request.spec.limits.seconds, max_unit_price=request.max_unit_price,
                                units=request.units, bid_window=request.bid_window,
                                audit_rate_bps=request.audit_rate_bps)
        try:
            plan = plan_submission(terms, state.params, available=sender.available(state),
                                   block_seconds=self._block_seconds(), enough_bids=node.config.client.enough_bids,
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
                config=config, height=state.height, providers=state.providers,
            )
            context = task_context(self.chain_id, task_id, Purpose.INPUT)
            bodies: list[tuple[bytes, bytes]] = []
            for arr in inputs.values():
                sealed = await trio.to_thread.run_sync(partial(self.sealed.seal_put, arr.tobytes(), context=context))
                self.store.pin(sealed.content_hash)
                self._pins[task_id].append(sealed.content_hash)
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
        record = ClientRecord(task=task, inputs=inputs, entry=entry)
        self.clients[task_id] = record
        self.access.track_inputs(task_id, request.spec)
        self._route(task_id, actions)
        if task_id not in self.clients:
            self._unpin_task(task_id)
            await trio.to_thread.run_sync(self.journal.delete, task_id)  # refused: the caller never gets its id
            if record.refusal is not None and record.refusal.reason is RejectReason.INSUFFICIENT_BALANCE:
                raise PaymentRequired(record.detail)
            raise Unprocessable(record.detail or "the task was refused", "refused")
        self._stage(record, "posted")
        log(logger, logging.INFO, "task_submitted", task=task_id.hex()[:16], kernel=request.spec.kernel, nonce=nonce)
        return task_id

    def view(self, task_id: bytes) -> TaskView:
        record = self.clients.get(task_id)
        if record is None:
            raise NotFound(f"no task {task_id.hex()} submitted through this node", "unknown_task")
        # the ledger prunes a task Params.task_retention blocks after it settled; the client keeps its last view
        task = self.node.chain.state.tasks.get(task_id) or record.task.task
        return TaskView(
            task_id=task_id, stage=record.stage, bids=tuple(record.bids.values()),  # type: ignore[arg-type]
            provider=task.provider if task is not None else None,
            unit_price=task.unit_price if task is not None and task.provider is not None else None,
            outcome=record.outcome,  # type: ignore[arg-type]
            timings=tuple(record.timings.items()),  # type: ignore[arg-type]
            detail=record.detail,
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
                     height: int, actions: list) -> TaskEntry:
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

        Written in a worker thread; the journal drops a version older than
        the one on disk, so the order the threads finish in does not matter.
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
        if self._nursery is not None and not record.writing:
            record.writing = True
            self._nursery.start_soon(self._write_entries, record)

    def _persist_ledger_view(self, record: ClientRecord) -> None:
        """Keep the ledger's view of the task once it changes in a way recovery needs (status, result hash)."""
        task = record.task.task
        if task is None or record.entry is None:
            return
        key = (task.status, task.outcome, task.result_hash, task.provider)
        if key != record.ledger_key:
            record.ledger_key = key
            self._persist(record)

    async def _write_entries(self, record: ClientRecord) -> None:
        """Write the task's newest record until none newer is waiting.

        One writer per task: changes that come while a write is in flight are
        coalesced into the next one (a burst of stage changes costs one or two
        fsyncs, not one each, and leaves worker threads to sealing and decoding).
        """
        try:
            while True:
                entry = record.entry
                assert entry is not None
                try:
                    await trio.to_thread.run_sync(self.journal.write, entry)
                except (OSError, JournalError) as exc:  # the task goes on; the next change tries again
                    log(logger, logging.ERROR, "task_record_write_failed", task=entry.task_id.hex()[:16],
                        error=repr(exc))
                    return
                if record.entry is entry:
                    return
        finally:
            record.writing = False

    async def _keep_result(self, record: ClientRecord, data: bytes) -> None:
        """Keep the accepted result until it is deleted or expires: its sealed body pinned, its place journaled.

        The fetch left the body in the blob store under the task's result
        context (with our key wrap in the sealed index); ``seal_put`` finds
        that copy, or seals the bytes again if it was evicted meanwhile.
        """
        task_id = record.task.task_id
        context = task_context(self.chain_id, task_id, Purpose.RESULT)
        try:
            ref = await trio.to_thread.run_sync(partial(self.sealed.seal_put, data, context=context))
        except (SealedError, BlobStoreError, OSError) as exc:
            log(logger, logging.ERROR, "result_keep_failed", task=task_id.hex()[:16], error=repr(exc))
            return
        if task_id not in self.clients:
            return  # deleted meanwhile
        if task_id not in self._result_pins:
            self.store.pin(ref.content_hash)
            self._result_pins[task_id] = ref.content_hash
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
            ref = self.sealed.lookup(entry.result.result_hash, context_id(context))
            try:
                if ref is None:
                    raise BlobStoreError("its sealed body is no longer in the blob store")
                delivered = self.sealed.open_ref(ref, context=context)
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
                          providers=state.providers)
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
            self.store.pin(body)
            self._pins[e.task_id].append(body)
        actions = task.resume(BlockFinalized(state.height, state), last_seen=last_seen, delivered=loaded.delivered)
        self._route(e.task_id, actions)
        for data in e.bids:  # the auction's bids from before the crash (verified again: they come from disk)
            try:
                signed = verify_bid(self.chain_id, decode(SignedBid, data))
            except (DecodeError, MarketMessageError):
                continue
            self.peers.setdefault(signed.bid.provider, peer_id_of_account_key(signed.public_key))
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
        output = self.streams.client_output(task_id, index)
        if output is None and record.outputs is not None and index < len(record.outputs.get("outputs", ())):
            output = record.outputs["outputs"][index]
        if evidence is None or output is None or not 0 <= index < len(items):
            raise Unprocessable(f"item {index} of task {task_id.hex()[:16]} has no signed output held here "
                                f"({cs.answered} answered)", "unknown_item")
        blobs = []
        for arr, want in ((items[index], evidence.output.input_hash), (output, evidence.output.output_hash)):
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

    # ------------------------------------------------------------ event dispatch

    def _dispatch(self, target: object, event: object) -> None:
        if target == "block":
            assert isinstance(event, BlockFinalized)
            chain = getattr(self.node, "chain", None)
            if chain is not None and event.height < chain.height:
                # A newer block is already committed (and queued behind this one): each event carries the whole
                # ledger view, so the roles act on the newest only. Replaying a sync batch block by block made a
                # client that restarted mid-auction take its own Assign, sent at a replayed height, for one that
                # never landed; and under load it was work for nothing.
                self.counters["blocks_coalesced"] += 1
                return
            self._unstick_nonces(event.ledger)  # type: ignore[arg-type]
            for task_id, record in list(self.clients.items()):
                if record.task.wants_events and event.height > self._resumed_height:
                    self._route(task_id, record.task.handle(event))
                    self._persist_ledger_view(record)
            if self.provider is not None:
                self._route(PROVIDER, self.provider.handle(event))
        elif target == PROVIDER:
            if self.provider is not None:
                self._route(PROVIDER, self.provider.handle(event))
        elif isinstance(target, bytes) and target in self.clients:
            record = self.clients[target]
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
            self._route(target, record.task.handle(event))

    def _route(self, origin: object, actions: list) -> None:
        for action in actions:
            try:
                self._execute(origin, action)
            except Exception as exc:
                log(logger, logging.ERROR, "role_action_failed", action=type(action).__name__, error=repr(exc))
                logger.debug("role action failed", exc_info=True)
        record = self.clients.get(origin) if isinstance(origin, bytes) else None
        if record is not None and not record.finished.is_set() and (
                record.outputs is not None or (record.task.closed and not record.task.wants_events)):
            record.finished.set()

    def _action_table(self) -> ActionExecutor[object]:
        """What the node does for each action a role returns (``p2pgpu.market.executor``)."""
        topics = self.node.topics
        return ActionExecutor({
            SubmitTx: lambda origin, a: self._submit(origin, a.body, assign_nonce=a.assign_nonce),
            PublishAnnounce: lambda origin, a: self.node.publish(topics.task, a.data),
            (PublishBid, PublishDecline): lambda origin, a: self.node.publish(topics.bid, a.data),
            ServeSpec: self._serve_spec,
            ServeInputs: lambda origin, a: self.access.grant_inputs(a.spec, a.peers),
            (ServeResult, DeliverResult): lambda origin, a: self._serve_result(a),
            FetchSpec: self._start_fetch_spec,
            FetchInputs: lambda origin, a: self._spawn(self._fetch_inputs, origin, a),
            FetchResult: lambda origin, a: self._spawn(self._fetch_result, origin, a),
            OpenStream: self._open_stream,
            ServeStream: lambda origin, a: self._spawn(self.streams.serve_session, origin, a),
            SendReceipt: lambda origin, a: self.streams.send_receipt(a),
            ServeStreamItem: lambda origin, a: self.access.grant(a.peers, a.input_hash, a.output_hash),
            FetchStreamItem: lambda origin, a: self._spawn(self._fetch_stream_item, origin, a),
            RunJob: self._start_job,
            RunVerify: lambda origin, a: self._spawn(self._run_verify, origin, a),
            RunSpotCheck: lambda origin, a: self._spawn(self._spot_check, origin, a),
            ReportProgress: self._report_progress,
            ResultReady: self._result_ready,
            TaskClosed: self._task_closed,
            Report: self._report,
        }, unsupported=lambda origin, a: log(logger, logging.WARNING, "unsupported_action",
                                             action=type(a).__name__))

    def _serve_spec(self, origin: object, action: ServeSpec) -> None:
        self.access.grant((ANY_PEER,), self.store.put(action.data))

    def _start_fetch_spec(self, origin: object, action: FetchSpec) -> None:
        peer = action.data_peer.decode("ascii", "replace") if action.data_peer else self._peer_of(action.client)
        self._spawn(self._fetch_spec, origin, action, peer)

    def _open_stream(self, origin: object, action: OpenStream) -> None:
        record = self.clients.get(action.task_id)
        if record is not None:  # items supplied at submit time: rows of the "items" input (not in the spec)
            self._spawn(self.streams.run_client, origin, action, stream_items(record.inputs))

    def _start_job(self, origin: object, action: RunJob) -> None:
        log(logger, logging.INFO, "job_started", task=action.task_id.hex()[:16], kernel=action.spec.kernel)
        self._spawn(self._run_job, origin, action)

    def _report_progress(self, origin: object, action: ReportProgress) -> None:
        record = self.clients.get(action.task_id)
        if record is not None:
            self._stage(record, action.stage.value)
            if action.detail:
                record.detail = action.detail
        log(logger, logging.INFO, "task_progress", task=action.task_id.hex()[:16], stage=action.stage.value,
            detail=action.detail)

    def _result_ready(self, origin: object, action: ResultReady) -> None:
        record = self.clients.get(action.task_id)
        if record is not None:
            record.outputs = dict(action.outputs)
            if record.entry is not None and record.entry.result is None:
                self._spawn(self._keep_result, record, action.data)

    def _task_closed(self, origin: object, action: TaskClosed) -> None:
        record = self.clients.get(action.task_id)
        if record is not None:
            record.outcome = ("unknown" if action.outcome is None
                              else _OUTCOME_NAME.get(TaskOutcome(action.outcome), str(action.outcome)))
            record.detail = action.detail or record.detail
            self._stage(record, "settled")
            record.closed.set()
            for digest in record.pinned:  # disputed stream items
                self.store.unpin(digest)
            self._persist(record, closed_ms=int(time.time() * 1000))
        self._unpin_task(action.task_id)
        log(logger, logging.INFO, "task_closed", task=action.task_id.hex()[:16], outcome=str(action.outcome),
            detail=action.detail)

    def _report(self, origin: object, action: Report) -> None:
        if isinstance(origin, bytes) and origin in self.clients:
            self.clients[origin].detail = action.message
        log(logger, logging.INFO, "market_report", task=action.task_id.hex()[:16], message=action.message)

    def _stage(self, record: ClientRecord, stage: str) -> None:
        before = (record.stage, len(record.timings))
        if record.stage != "settled":  # a result fetched after settlement is timed, but the task stays settled
            record.stage = stage
        if stage not in record.timings:
            record.timings[stage] = StageTime(height=self.node.chain.height, time_ms=int(time.time() * 1000))
        if (record.stage, len(record.timings)) != before:
            self._persist(record)

    # ------------------------------------------------------------ transactions

    def _submit(self, origin: object, body, *, assign_nonce: bool = True) -> None:
        """Send one of our transactions (``assign_nonce``: at the next nonce; else at its own, held nonce)."""
        sender = self.node.tx_sender
        claim = isinstance(body, StreamClaim)
        try:
            stx = sender.send(body) if assign_nonce else sender.send_reserved(body)
        except MempoolRejected as exc:
            self.counters["tx_refused"] += 1
            self.streams.metrics.claims_refused += claim
            log(logger, logging.WARNING, "role_tx_refused", tx=type(body).__name__, reason=str(exc))
            self._post(origin, TxFailed(body, str(exc)))
            if isinstance(body, PostTask):
                task_id = compute_task_id(body.sender, body.nonce)
                record = self.clients.get(task_id)
                if record is not None and not record.recovered:  # a recovered one closes as refused (TxFailed)
                    del self.clients[task_id]
                    record.detail = f"PostTask refused: {exc}"
                    record.refusal = exc
            return
        self._sent[stx.body.nonce] = (origin, body.fee)  # type: ignore[attr-defined]
        self.streams.metrics.claims_submitted += claim

    def _unstick_nonces(self, state) -> None:
        """Replace with fillers our transactions that can never execute (see p2pgpu.nonce_keeper)."""
        node = self.node
        if node.mempool is None:
            return
        executed = state.get_account(self.me).nonce
        for nonce in [n for n in self._sent if n < executed]:
            del self._sent[nonce]
        sender = node.tx_sender
        in_hand = sender.nonces.reserved() | frozenset(sender.nonces.gaps())  # being built, or filled by the sender
        pending = node.mempool.pending(self.me)
        head = self.nonce_keeper.check(state, pending, skip=in_hand)
        stuck = ([head] if head is not None else []) + self.nonce_keeper.check_behind(state, pending)
        for dead in stuck:
            origin, fee = self._sent.pop(dead.nonce, (None, 0))
            self.counters["tx_unstuck"] += 1
            log(logger, logging.WARNING, "tx_cannot_execute", nonce=dead.nonce, reason=dead.reason,
                tx=type(dead.stx.body).__name__ if dead.stx is not None else "dropped",
                action="replaced by a filler so the transactions after it can run")
            filler = filler_for(self.me, dead, min_fee=state.params.min_fee, fee_to_beat=fee,
                                bump_pct=node.mempool.config.replace_fee_bump_pct)
            self._submit(None, filler, assign_nonce=False)
            if origin is not None and dead.stx is not None:
                self._post(origin, TxFailed(dead.stx.body, dead.reason))

    # ------------------------------------------------------------ peers

    def _learn_peer(self, address: bytes, peer_id: str) -> None:
        if account_address_of_peer(peer_id) == address:
            self.peers[address] = peer_id

    def _peer_of(self, address: bytes) -> str | None:
        if address in self.peers:
            return self.peers[address]
        for peer in self.node.network.connected_peers():
            if account_address_of_peer(peer) == address:
                self.peers[address] = peer
                return peer
        return None

    # ------------------------------------------------------------ background work

    def _spawn(self, fn, *args) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _fetch(self, address_or_peer: bytes | str | None, blob_hash: bytes, *,
                     max_bytes: int = MAX_BLOB_BYTES) -> bytes:
        """A plain blob: a spec, or a disputed stream item (its hash is the one the provider signed)."""
        peer = address_or_peer if isinstance(address_or_peer, str) else (
            self._peer_of(address_or_peer) if address_or_peer is not None else None)
        if peer is None:
            raise LookupError("no connected peer for that address")
        return await self.dataplane.fetch(peer, blob_hash, max_bytes=max_bytes, timeout=FETCH_TIMEOUT_S)

    async def _fetch_sealed(self, holder: bytes, name: bytes, task_id: bytes, purpose: bytes, *,
                            timeout: float | None = None) -> bytes:
        """Task data from its holder: plaintext that opened in this task's context and hashes to ``name``."""
        peer = self._peer_of(holder)
        if peer is None:
            raise LookupError(f"no connected peer for {holder.hex()}")
        context = task_context(self.chain_id, task_id, purpose)
        limit = FETCH_TIMEOUT_S if timeout is None else min(timeout, FETCH_TIMEOUT_S)
        return await self.dataplane.fetch_sealed(peer, name, context=context, max_bytes=MAX_BLOB_BYTES,
                                                 timeout=limit)

    def _serve_result(self, action: ServeResult | DeliverResult) -> None:
        """Seal the result to ourselves (once per task), then let the named peers fetch it.

        Inline, as the plain store write was: the body must be servable before
        the CommitResult that follows this action is submitted, because the
        client fetches once it sees the commitment (sealing costs ~4 ms/MiB).
        """
        context = task_context(self.chain_id, action.task_id, Purpose.RESULT)
        try:
            sealed = self.sealed.seal_put(action.data, context=context)
        except (SealedError, BlobStoreError) as exc:
            log(logger, logging.ERROR, "result_seal_failed", task=action.task_id.hex()[:16], error=repr(exc))
            return
        if sealed.name != action.result_hash:  # the role hashed the same bytes: a bug, never serve it
            log(logger, logging.ERROR, "result_hash_mismatch", task=action.task_id.hex()[:16])
            return
        if sealed.content_hash not in self._pins[action.task_id]:
            self.store.pin(sealed.content_hash)
            self._pins[action.task_id].append(sealed.content_hash)
        peers = action.peers if isinstance(action, ServeResult) else (action.client,)
        self.access.grant(peers, action.result_hash)

    def _unpin_task(self, task_id: bytes) -> None:
        """The task is over for us: its sealed bodies may be evicted."""
        for body in self._pins.pop(task_id, ()):
            self.store.unpin(body)
        self.access.forget_task(task_id)

    async def _fetch_spec(self, origin, action: FetchSpec, peer: str | None) -> None:
        try:
            data = await self._fetch(peer, action.spec_hash)
        except (DataPlaneError, NetError, LookupError, trio.TooSlowError) as exc:
            self._post(origin, FetchFailed(action.task_id, "spec", str(exc)))
            return
        self._post(origin, SpecFetched(action.spec_hash, data))

    async def _fetch_inputs(self, origin, action: FetchInputs) -> None:
        inputs: dict[str, np.ndarray] = {}
        try:
            for name, ref in action.spec.inputs:
                data = await self._fetch_sealed(action.client, ref.hash, action.task_id, Purpose.INPUT)
                inputs[name] = decode_blob(ref, data)
        except SealedError as exc:  # counted by the data plane; never used as an input
            log(logger, logging.WARNING, "sealed_input_rejected", task=action.task_id.hex()[:16],
                error=type(exc).__name__, detail=str(exc))
            self._post(origin, FetchFailed(action.task_id, "inputs", f"{type(exc).__name__}: {exc}"))
            return
        except (DataPlaneError, NetError, LookupError, trio.TooSlowError, ValueError) as exc:
            self._post(origin, FetchFailed(action.task_id, "inputs", str(exc)))
            return
        self._post(origin, InputsFetched(action.task_id, inputs))

    async def _fetch_result(self, origin, action: FetchResult) -> None:
        try:
            data = await self._fetch_sealed(action.provider, action.result_hash, action.task_id, Purpose.RESULT,
                                            timeout=action.timeout_s)
        except (SealedError, DataPlaneError, NetError, LookupError, trio.TooSlowError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, SealedError) else str(exc)
            if isinstance(exc, SealedError):  # counted by the data plane; never taken as the result
                log(logger, logging.WARNING, "sealed_result_rejected", task=action.task_id.hex()[:16],
                    error=type(exc).__name__, detail=str(exc))
            if origin != PROVIDER:
                log(logger, logging.INFO, "result_fetch_failed", task=action.task_id.hex()[:16], error=reason)
            self._post(origin, FetchFailed(action.task_id, "result", reason))
            return
        event = ResultFetched(action.task_id, data) if origin == PROVIDER else ResultDelivered(action.task_id, data)
        self._post(origin, event)

    async def _fetch_stream_item(self, origin, action: FetchStreamItem) -> None:
        """Verifier: a disputed item's input and output from the client, each checked against its item hash."""
        tensors = []
        try:
            for digest in (action.input_hash, action.output_hash):
                data = await self._fetch(action.client, digest, max_bytes=MAX_STREAM_ITEM_BYTES)
                tensors.append(decode_tensor(data, MAX_ITEM_ELEMENTS))  # the data plane checked the hash
        except (DataPlaneError, NetError, LookupError, trio.TooSlowError, ValueError) as exc:  # ValueError: bad tensor
            self._post(origin, FetchFailed(action.task_id, "stream-item", str(exc)))
            return
        self._post(origin, StreamItemFetched(action.task_id, tensors[0], tensors[1]))

    async def _run_job(self, origin, action: RunJob) -> None:
        from kernels.errors import KernelError

        if self.runtime is None:
            self._post(origin, JobFailed(action.task_id, "no kernel runtime"))
            return
        started = time.monotonic()
        try:
            result = await self.runtime.run(action.spec, action.inputs)
        except KernelError as exc:
            self._post(origin, JobFailed(action.task_id, f"{type(exc).__name__}: {exc}"))
            return
        exec_ms = int((time.monotonic() - started) * 1000)
        self.counters["jobs_run"] += 1
        fault = self.node.config.provider.fault
        if fault == "no_delivery":
            log(logger, logging.WARNING, "fault_drill", fault=fault, task=action.task_id.hex()[:16])
            return  # the job "vanishes": the ledger will record MISSED at the deadline
        outputs = dict(result.outputs)
        if fault == "wrong_result":
            log(logger, logging.WARNING, "fault_drill", fault=fault, task=action.task_id.hex()[:16])
            outputs = {name: _perturb(arr) for name, arr in outputs.items()}
        log(logger, logging.INFO, "job_done", task=action.task_id.hex()[:16], exec_ms=exec_ms)
        self._post(origin, JobDone(action.task_id, outputs, exec_ms))

    async def _run_verify(self, origin, action: RunVerify) -> None:
        from kernels.errors import KernelError

        if self.runtime is None:
            self._post(origin, VerifyDone(action.task_id, False, "no kernel runtime to verify with"))
            return
        try:
            verdict = await self.runtime.verify(action.spec, action.inputs, action.claimed)
        except KernelError as exc:
            self._post(origin, VerifyDone(action.task_id, False, f"verification failed to run: {exc}"))
            return
        self.counters["verifications"] += 1
        self._post(origin, VerifyDone(action.task_id, bool(verdict.ok), verdict.reason or ""))

    async def _spot_check(self, origin, action: RunSpotCheck) -> None:
        record = self.clients.get(action.task_id)
        if record is None:
            return
        if self.runtime is not None:
            verdict = await self.runtime.verify(action.spec, record.inputs, action.outputs)
        elif action.spec.kernel in ("matmul", "conv2d"):  # NumPy references: no TensorFlow in this process
            from kernels.registry import lookup

            kernel = lookup(action.spec.kernel, action.spec.version)
            verdict = await trio.to_thread.run_sync(kernel.verify, action.spec, record.inputs, action.outputs)
        else:
            self._post(origin, VerificationOutcome(action.task_id, True, "not checked locally (no runtime)"))
            return
        self._post(origin, VerificationOutcome(action.task_id, bool(verdict.ok), verdict.reason or ""))

    # ------------------------------------------------------------ metrics

    def metric_families(self) -> list:
        from p2pgpu.metrics_text import counter, gauge, stream_metric_families

        closed: dict[str, int] = defaultdict(int)
        for record in self.clients.values():
            if record.outcome is not None:
                closed[record.outcome] += 1
        families = [
            gauge("p2pgpu_tasks_active", "Tasks submitted through this node and not yet settled.",
                  sum(1 for r in self.clients.values() if r.outcome is None)),
            counter("p2pgpu_tasks_submitted_total", "Tasks submitted through this node.", len(self.clients)),
            counter("p2pgpu_jobs_total", "Kernel jobs run and verifications done by this node's provider role.",
                    {(("kind", k),): v for k, v in (("run", self.counters["jobs_run"]),
                                                    ("verify", self.counters["verifications"]))}),
        ]
        if self.recovery_s is not None:
            families.append(gauge("p2pgpu_client_recovery_seconds",
                                  "Seconds the client took at start-up to reload its journaled tasks.",
                                  self.recovery_s))
            families.append(gauge("p2pgpu_client_recovered_tasks",
                                  "Tasks reloaded from the client's journal at start-up.", self.recovered_tasks))
        if closed:
            families.append(counter("p2pgpu_tasks_settled_total", "Tasks of this node settled, by outcome.",
                                    {(("outcome", o),): n for o, n in closed.items()}))
        families.extend(stream_metric_families(self.streams.metrics, self.streams.active_sessions()))
        if "provider" in self.node.roles:
            families.append(gauge("p2pgpu_provider_ready",
                                  "1 once the kernel runtime is warm and the provider bids, else 0.",
                                  1 if self.provider is not None else 0))
        return families

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()


def provider_role_config(cfg: Any) -> ProviderConfig:
    """The market provider role's settings from the node's ``[provider]`` table (``p2pgpu.config.ProviderConfig``)."""
    from p2pgpu.provider_warmup import provider_slots

    return ProviderConfig(max_concurrent_jobs=provider_slots(cfg), max_queued=cfg.queue,
                          receipt_every=cfg.receipt_every)


class _WrongOutputs:
    """Fault drill ``wrong_result`` for streams: every output of the warm model is perturbed, then signed."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime

    async def open_stream(self, spec: Any, inputs: Mapping[str, np.ndarray]) -> _PerturbedSession:
        log(logger, logging.WARNING, "fault_drill", fault="wrong_result", stream=True)
        return _PerturbedSession(await self._runtime.open_stream(spec, inputs))


class _PerturbedSession:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    @property
    def model_loads(self) -> int:
        return self._inner.model_loads

    async def infer(self, item: np.ndarray) -> np.ndarray:
        return _perturb(await self._inner.infer(item))

    async def aclose(self) -> None:
        await self._inner.aclose()


def _perturb(arr: np.ndarray) -> np.ndarray:
    """A plausible-looking wrong answer: one element off by a lot (what an audit must catch)."""
    wrong = np.array(arr, copy=True)
    if wrong.size:
        flat = wrong.reshape(-1)
        flat[0] = flat[0] + (1 if np.issubdtype(flat.dtype, np.integer) else 1000.0)
    return wrong
