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
import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import trio

from kernels.spec import decode_blob
from kernels.tensors import canonical_array, decode_tensor, encode_tensor
from ledger.codec import encode
from ledger.mempool import MempoolRejected, RejectReason
from ledger.state import State, TaskOutcome
from ledger.transactions import PostTask, RegisterProvider, StreamClaim, TaskKind, compute_task_id
from p2pgpu.api.types import (BidView, NotFound, NotReady, PaymentRequired, StageTime, SubmitRequest, TaskView,
                              Unprocessable)
from p2pgpu.blobstore import BlobStore, BlobStoreError
from p2pgpu.dataplane import DataPlane, DataPlaneError, account_address_of_peer
from p2pgpu.nonce_keeper import NonceKeeper, filler_for
from p2pgpu.market import (
    AnnounceReceived,
    BidMessage,
    BidReceived,
    BlockFinalized,
    ClientConfig,
    ClientTask,
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
    VerifyDone,
    validate_bid_message,
    validate_task_message,
)
from p2pgpu.net import NetError, Verdict, accept, ignore, reject
from p2pgpu.net.log import log
from p2pgpu.sealed import Purpose, SealedError, task_context
from p2pgpu.streams import MAX_ITEM_ELEMENTS, StreamTransport, stream_items

logger = logging.getLogger(__name__)

ANY_PEER = b"*"
FETCH_TIMEOUT_S = 60.0
MAX_BLOB_BYTES = 1 << 30
MAX_STREAM_ITEM_BYTES = 8 * MAX_ITEM_ELEMENTS + 64  # one tensor ext payload: header + float64 elements
PROVIDER = "provider"
_KIND = {"batch": TaskKind.BATCH, "stream": TaskKind.STREAM}
_OUTCOME_NAME = {TaskOutcome.NONE: "refused", TaskOutcome.PAID: "paid", TaskOutcome.FRAUD: "fraud", TaskOutcome.MISSED: "missed",
                 TaskOutcome.EXPIRED: "expired", TaskOutcome.CANCELLED: "cancelled"}


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
        self.allowed: dict[bytes, set[bytes]] = defaultdict(set)
        self.input_blobs: dict[bytes, bytes] = {}  # input blob hash -> our task that uses it
        self._served: set[tuple[bytes, bytes]] = set()
        self._pins: dict[bytes, list[bytes]] = defaultdict(list)  # task id -> sealed bodies it keeps in the store
        self.peers: dict[bytes, str] = {}
        self.seen_task = SeenCache()
        self.seen_bid = SeenCache()
        self.counters: dict[str, int] = defaultdict(int)
        self.nonce_keeper = NonceKeeper(self.me)
        self._sent: dict[int, tuple[object, int]] = {}  # nonce of our unexecuted tx -> (sending role, fee)
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[object, object]](16384)
        self._nursery: trio.Nursery | None = None
        self.streams = StreamTransport(node.network, address=self.me, ledger=lambda: node.chain.state,
                                       runtime=self._stream_runtime, route=self._route, peer_of=self._peer_of)

    # ------------------------------------------------------------ gossip validators

    def validate_task(self, peer: str, data: bytes) -> Verdict:
        try:
            rec = validate_task_message(self.chain_id, self.node.chain.height, data, self.seen_task)
        except MarketMessageError as exc:
            return reject(exc.reason) if exc.penalize else ignore(exc.reason)
        if isinstance(rec, SignedAnnounce) and not self.node._from_self(peer):
            a = rec.announce
            # An announce whose client cannot fund its escrow on our head is never posted: not forwarded, so a
            # key with no funds cannot make every provider fetch specs from a peer of its choosing. Ignored,
            # not charged: the client's balance may differ on the relaying peer's head.
            if self.node.chain.state.get_balance(a.client) < a.max_unit_price * a.units:
                return ignore("unfunded_client")
        return accept()

    def validate_bid(self, peer: str, data: bytes) -> Verdict:
        try:
            validate_bid_message(self.chain_id, self.node.chain.height, data, self.seen_bid)
        except MarketMessageError as exc:
            return reject(exc.reason) if exc.penalize else ignore(exc.reason)
        return accept()

    def entitled(self, peer_id: str, address: bytes, blob_hash: bytes) -> bool:
        """Data-plane check: may ``address`` read ``blob_hash``? Serving a task's input tells its client role."""
        allowed = self.allowed.get(blob_hash)
        ok = bool(allowed) and (ANY_PEER in allowed or address in allowed)  # type: ignore[operator]
        task_id = self.input_blobs.get(blob_hash)
        if ok and task_id is not None and (task_id, address) not in self._served:
            self._served.add((task_id, address))
            self._post(task_id, InputsServed(task_id, address))
        return ok

    # ------------------------------------------------------------ lifecycle

    async def run(self, task_channel, bid_channel, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._pump_tasks, task_channel)
            nursery.start_soon(self._pump_bids, bid_channel)
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
        except trio.WouldBlock:
            log(logger, logging.ERROR, "role_inbox_full", height=state.height)

    def _post(self, target: object, event: object) -> None:
        self._inbox_send.send_nowait((target, event))

    async def _pump_tasks(self, channel) -> None:
        async for msg in channel:
            if msg.local:
                continue
            try:
                rec = validate_task_message(self.chain_id, self.node.chain.height, msg.data, None)
            except MarketMessageError:
                continue
            assert isinstance(rec, SignedAnnounce)
            self._learn_peer(rec.announce.client, rec.announce.data_peer.decode("ascii", "replace"))
            if self.provider is not None:
                self._post(PROVIDER, AnnounceReceived(rec))

    async def _pump_bids(self, channel) -> None:
        async for msg in channel:
            if msg.local:
                continue
            try:
                rec = validate_bid_message(self.chain_id, self.node.chain.height, msg.data, None)
            except MarketMessageError:
                continue
            if isinstance(rec, BidMessage):
                bid = rec.signed.bid
                if bid.task_id in self.clients:
                    self._post(bid.task_id, BidReceived(rec.signed))
            elif isinstance(rec, SignedDecline) and rec.notice.task_id in self.clients:
                self._post(rec.notice.task_id, DeclineReceived(rec.notice))

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
        exec_blocks = max(20, math.ceil(3 * (request.spec.limits.seconds + 5) / self._block_seconds()))
        config = ClientConfig(
            fee=state.params.min_fee,
            bid_window=request.bid_window,
            exec_blocks=min(exec_blocks, state.params.max_exec_blocks),
            audit_rate_bps=request.audit_rate_bps,
            enough_bids=node.config.client.enough_bids,
            max_wait_blocks=node.config.client.max_wait_blocks,
        )
        p = state.params
        if not 1 <= request.bid_window <= p.max_bid_window:  # the chain's limits: a clear 422, not a refused tx
            raise Unprocessable(f"bid_window {request.bid_window}: this chain allows 1..{p.max_bid_window} blocks",
                                "invalid_terms")
        if not 1 <= request.units <= p.max_stream_units:
            raise Unprocessable(f"units {request.units}: this chain allows 1..{p.max_stream_units}", "invalid_terms")
        escrow = request.max_unit_price * request.units + state.params.audit_fee
        cost = escrow + state.params.min_fee
        available = sender.available(state)
        if available < cost:
            pending = sender.nonces.pending_cost()
            held = f" (balance {state.get_balance(self.me)}, of which {pending} is held for this node's " \
                   f"unexecuted transactions)" if pending else ""
            raise PaymentRequired(f"this task needs {cost} (escrow {escrow} incl. audit fee, fee {state.params.min_fee}) "
                                  f"but {max(available, 0)} is available{held}: short by {cost - max(available, 0)}")
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
            for arr in inputs.values():
                sealed = await trio.to_thread.run_sync(partial(self.sealed.seal_put, arr.tobytes(), context=context))
                self.store.pin(sealed.content_hash)
                self._pins[task_id].append(sealed.content_hash)
        except BaseException:
            sender.release(nonce)
            self._unpin_task(task_id)
            raise
        record = ClientRecord(task=task, inputs=inputs)
        self.clients[task_id] = record
        for _, ref in request.spec.inputs:
            self.input_blobs[ref.hash] = task_id
        self._route(task_id, task.start())
        if task_id not in self.clients:
            self._unpin_task(task_id)
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
            self._unstick_nonces(event.ledger)  # type: ignore[arg-type]
            for task_id, record in list(self.clients.items()):
                if record.task.wants_events:
                    self._route(task_id, record.task.handle(event))
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
            self._route(target, record.task.handle(event))

    def _route(self, origin: object, actions: list) -> None:
        for action in actions:
            try:
                self._act(origin, action)
            except Exception as exc:
                log(logger, logging.ERROR, "role_action_failed", action=type(action).__name__, error=repr(exc))
                logger.debug("role action failed", exc_info=True)
        record = self.clients.get(origin) if isinstance(origin, bytes) else None
        if record is not None and not record.finished.is_set() and (
                record.outputs is not None or (record.task.closed and not record.task.wants_events)):
            record.finished.set()

    def _act(self, origin: object, action: object) -> None:
        topics = self.node.topics
        if isinstance(action, SubmitTx):
            self._submit(origin, action.body, assign_nonce=action.assign_nonce)
        elif isinstance(action, PublishAnnounce):
            self.node.publish(topics.task, action.data)
        elif isinstance(action, (PublishBid, PublishDecline)):
            self.node.publish(topics.bid, action.data)
        elif isinstance(action, ServeSpec):
            digest = self.store.put(action.data)
            self.allowed[digest].add(ANY_PEER)
        elif isinstance(action, ServeInputs):
            for _, ref in action.spec.inputs:
                self.allowed[ref.hash].update(action.peers)
        elif isinstance(action, (ServeResult, DeliverResult)):
            self._serve_result(action)
        elif isinstance(action, FetchSpec):
            peer = action.data_peer.decode("ascii", "replace") if action.data_peer else self._peer_of(action.client)
            self._spawn(self._fetch_spec, origin, action, peer)
        elif isinstance(action, FetchInputs):
            self._spawn(self._fetch_inputs, origin, action)
        elif isinstance(action, FetchResult):
            self._spawn(self._fetch_result, origin, action)
        elif isinstance(action, OpenStream):
            record = self.clients.get(action.task_id)
            if record is not None:  # items supplied at submit time: rows of the "items" input (not in the spec)
                self._spawn(self.streams.run_client, origin, action, stream_items(record.inputs))
        elif isinstance(action, ServeStream):
            self._spawn(self.streams.serve_session, origin, action)
        elif isinstance(action, SendReceipt):
            self.streams.send_receipt(action)
        elif isinstance(action, ServeStreamItem):
            for digest in (action.input_hash, action.output_hash):
                self.allowed[digest].update(action.peers)
        elif isinstance(action, FetchStreamItem):
            self._spawn(self._fetch_stream_item, origin, action)
        elif isinstance(action, RunJob):
            log(logger, logging.INFO, "job_started", task=action.task_id.hex()[:16], kernel=action.spec.kernel)
            self._spawn(self._run_job, origin, action)
        elif isinstance(action, RunVerify):
            self._spawn(self._run_verify, origin, action)
        elif isinstance(action, RunSpotCheck):
            self._spawn(self._spot_check, origin, action)
        elif isinstance(action, ReportProgress):
            record = self.clients.get(action.task_id)
            if record is not None:
                self._stage(record, action.stage.value)
                if action.detail:
                    record.detail = action.detail
            log(logger, logging.INFO, "task_progress", task=action.task_id.hex()[:16], stage=action.stage.value,
                detail=action.detail)
        elif isinstance(action, ResultReady):
            record = self.clients.get(action.task_id)
            if record is not None:
                record.outputs = dict(action.outputs)
        elif isinstance(action, TaskClosed):
            record = self.clients.get(action.task_id)
            if record is not None:
                record.outcome = _OUTCOME_NAME.get(TaskOutcome(action.outcome), str(action.outcome))
                record.detail = action.detail or record.detail
                self._stage(record, "settled")
                record.closed.set()
                for digest in record.pinned:  # disputed stream items
                    self.store.unpin(digest)
            self._unpin_task(action.task_id)
            log(logger, logging.INFO, "task_closed", task=action.task_id.hex()[:16], outcome=str(action.outcome),
                detail=action.detail)
        elif isinstance(action, Report):
            if isinstance(origin, bytes) and origin in self.clients:
                self.clients[origin].detail = action.message
            log(logger, logging.INFO, "market_report", task=action.task_id.hex()[:16], message=action.message)
        else:
            log(logger, logging.WARNING, "unsupported_action", action=type(action).__name__)

    def _stage(self, record: ClientRecord, stage: str) -> None:
        if record.stage != "settled":  # a result fetched after settlement is timed, but the task stays settled
            record.stage = stage
        if stage not in record.timings:
            record.timings[stage] = StageTime(height=self.node.chain.height, time_ms=int(time.time() * 1000))

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
                record = self.clients.pop(compute_task_id(body.sender, body.nonce), None)
                if record is not None:
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
        self.allowed[action.result_hash].update(peers)

    def _unpin_task(self, task_id: bytes) -> None:
        """The task is over for us: its sealed bodies may be evicted."""
        for body in self._pins.pop(task_id, ()):
            self.store.unpin(body)

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
