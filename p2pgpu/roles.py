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

Beside this shell: the client service (:mod:`p2pgpu.clientservice`: the
API's submit/view/result, the task journal, recovery), the roles'
transactions (:mod:`p2pgpu.txoutbox`), the blob access list
(:mod:`p2pgpu.blobaccess`), the market gossip validators and pumps
(:mod:`p2pgpu.marketgossip`), and the node's ports (:mod:`p2pgpu.ports`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import trio

from kernels.errors import KernelError
from kernels.spec import decode_blob
from kernels.tensors import decode_tensor
from ledger.codec import encode
from ledger.state import State
from ledger.transactions import RegisterProvider
from p2pgpu.api.types import SubmitRequest, TaskView
from p2pgpu.blobaccess import ANY_PEER, BlobAccess
from p2pgpu.blobstore import BlobStore, BlobStoreError
from p2pgpu.clientservice import ClientRecord, ClientService, block_seconds
from p2pgpu.dataplane import DataPlane, DataPlaneError, account_address_of_peer, peer_id_of_account_key
from p2pgpu.liveness import JOB_PROTOCOL, probe_providers, serve_job_status
from p2pgpu.market.executor import ActionExecutor
from p2pgpu.marketgossip import pump_announces, pump_bids, validate_announce, validate_bid
from p2pgpu.modelpublish import MODELS_ORIGIN, ModelPublisher
from p2pgpu.ports import RolesNode
from p2pgpu.taskjournal import TaskJournal
from p2pgpu.txoutbox import TxOutbox
from p2pgpu.market import (
    AnnounceReceived,
    BidReceived,
    BlockFinalized,
    DeclineNotice,
    DeclineReceived,
    DeliverResult,
    Event,
    FetchFailed,
    FetchInputs,
    FetchResult,
    FetchSpec,
    FetchStreamItem,
    InputsFetched,
    InputsServed,
    JobDone,
    JobFailed,
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
)
from p2pgpu.net import NetError, Verdict
from p2pgpu.net.log import log
from p2pgpu.sealed import Purpose, SealedError, task_context
from p2pgpu.streams import MAX_ITEM_ELEMENTS, StreamTransport, stream_items

if TYPE_CHECKING:  # kernels.runtime pulls in the kernel registry; only its type is needed here
    from kernels.runtime import KernelRuntime

logger = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 60.0
MAX_BLOB_BYTES = 1 << 30
MAX_STREAM_ITEM_BYTES = 8 * MAX_ITEM_ELEMENTS + 64  # one tensor ext payload: header + float64 elements
PROVIDER = "provider"


class MarketRoles:
    """Runs the node's client tasks and provider role. Built and started by the node."""

    def __init__(self, node: RolesNode, store: BlobStore, dataplane: DataPlane) -> None:
        if dataplane.sealed is None:
            raise ValueError("the market roles need a data plane with a sealed store (task data is sealed)")
        self.node = node
        self.store = store
        self.dataplane = dataplane
        self.sealed = dataplane.sealed
        self.chain_id: bytes = node.chain_id
        self.me: bytes = node.keys.account.address
        self.provider: ProviderRole | None = None
        self.runtime: KernelRuntime | None = None
        self.access = BlobAccess(lambda task_id, address: self._post(task_id, InputsServed(task_id, address)))
        self._pins: dict[bytes, list[bytes]] = defaultdict(list)  # task id -> sealed bodies it keeps in the store
        self.peers: dict[bytes, str] = {}
        self._held_announces: deque[SignedAnnounce] = deque(maxlen=1024)  # heard while we were behind
        self.seen_task = SeenCache()
        self.seen_bid = SeenCache()
        self.counters: dict[str, int] = defaultdict(int)
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[object, Event]](16384)
        self._nursery: trio.Nursery | None = None
        # cast: streams' _NetworkLike declares peer_id settable; Network's is read-only (a property there fixes it)
        self.streams = StreamTransport(cast(Any, node.network), address=self.me, ledger=lambda: node.chain.state,
                                       runtime=self._stream_runtime, route=self._route, peer_of=self._peer_of)
        self.client = ClientService(
            node, store=store, sealed=self.sealed, access=self.access,
            journal=TaskJournal(Path(node.config.data_dir) / "client" / "tasks"), route=self._route,
            pin=self._pin_for_task, unpin_task=self._unpin_task, learn_peer=self._learn_bidder,
            stream_output=self.streams.client_output)
        self.outbox = TxOutbox(node.tx_sender, node.mempool, failed=self._post, post_refused=self.client.post_refused,
                               claims=self.streams.metrics)
        self.models = ModelPublisher(store=store, access=self.access, outbox=self.outbox, me=self.me,
                                     state=lambda: node.chain.state, available=node.tx_sender.available)
        """Models this node pushes (``POST /models``): stored, served to any peer, registered."""
        self._execute = self._action_table()

    # ------------------------------------------------------------ the client service (p2pgpu.clientservice)

    @property
    def clients(self) -> dict[bytes, ClientRecord]:
        """Our tasks by id (:attr:`ClientService.clients`)."""
        return self.client.clients

    @property
    def journal(self) -> TaskJournal:
        return self.client.journal

    @property
    def recovery_s(self) -> float | None:
        return self.client.recovery_s

    @property
    def recovered_tasks(self) -> int:
        return self.client.recovered_tasks

    async def submit(self, request: SubmitRequest) -> bytes:
        """:meth:`ClientService.submit`."""
        return await self.client.submit(request)

    def view(self, task_id: bytes) -> TaskView:
        return self.client.view(task_id)

    def result(self, task_id: bytes) -> Mapping[str, np.ndarray]:
        return self.client.result(task_id)

    async def wait_result(self, task_id: bytes, timeout: float) -> None:
        await self.client.wait_result(task_id, timeout)

    async def delete_result(self, task_id: bytes) -> None:
        await self.client.delete_result(task_id)

    async def dispute_stream_item(self, task_id: bytes, index: int, reason: str) -> None:
        await self.client.dispute_stream_item(task_id, index, reason)

    async def sweep_results(self, now_ms: int | None = None) -> int:
        return await self.client.sweep_results(now_ms)

    async def recover(self) -> float:
        return await self.client.recover()

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
            # with the client role: the journal reloaded before the API answers and before we send any transaction
            await nursery.start(partial(self.client.run, recover="client" in self.node.roles))
            self.models.serve_registered(self.node.chain.state)
            if task_channel is not None:
                nursery.start_soon(pump_announces, task_channel, self._announce_arrived)
            if bid_channel is not None:
                nursery.start_soon(pump_bids, bid_channel, self._bid_arrived, self._decline_arrived)
            self.node.network.set_handler(JOB_PROTOCOL, serve_job_status(self._job_status), penalize_bad_requests=True)
            if "client" in self.node.roles:
                nursery.start_soon(probe_providers, self.node.network, self.client.probe_targets, self._peer_of, self._post)
            if "provider" in self.node.roles:
                nursery.start_soon(self._start_provider)
            task_status.started()
            async for target, event in self._inbox:
                try:
                    self._dispatch(target, event)
                except Exception as exc:  # a role bug must not take the node down
                    log(logger, logging.ERROR, "role_event_failed", event_type=type(event).__name__, error=repr(exc))
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
        return self.node.driver.behind

    def _post(self, target: object, event: Event) -> None:
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
            self._learn_bidder(bid.bid.provider, peer_id_of_account_key(bid.public_key))
            self._post(task_id, BidReceived(bid))

    def _decline_arrived(self, notice: DeclineNotice) -> None:
        if notice.task_id in self.clients:
            self._post(notice.task_id, DeclineReceived(notice))

    def _job_status(self, requester: bytes, task_ids: list[bytes]) -> list[str]:
        """Answer a client's liveness probe (``p2pgpu.liveness``): our provider role's phase of each task."""
        if self.provider is None:
            return ["unknown"] * len(task_ids)  # not (yet) a provider: we run nothing for anyone
        return self.provider.job_status(requester, task_ids)

    async def _start_provider(self) -> None:
        """Warm the kernel runtime (TensorFlow loads in worker processes), probe it, then start bidding.

        ``Node.run`` starts the runtime before the node joins the network (``Node.kernel_runtime``), so
        TensorFlow is usually loaded or loading by now; a node without one gets it started here.
        """
        from p2pgpu.provider_warmup import start_provider_runtime

        cfg = self.node.config.provider
        runtime = self.node.kernel_runtime or start_provider_runtime(self.node.config)
        if runtime is None:  # start_provider_runtime gives None only to a node without the provider role
            log(logger, logging.ERROR, "provider_runtime_failed", error="no kernel runtime for the provider role")
            return
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
                                floor=cfg.floor, block_seconds=block_seconds(self.node.config))
        self.provider = ProviderRole(key=self.node.keys.account, chain_id=self.chain_id, capabilities=caps,
                                     pricing=pricing, config=provider_role_config(cfg))
        log(logger, logging.INFO, "provider_ready", device=caps.device_kind, gflops=round(caps.matmul_gflops, 1))
        state = self.node.chain.state
        if self.me not in state.providers:
            self.outbox.submit(PROVIDER, RegisterProvider(sender=self.me, nonce=0, fee=state.params.min_fee,
                                                          capabilities=encode(caps),
                                                          bond=state.params.min_provider_bond))
        try:
            await trio.sleep_forever()
        finally:
            runtime.close()

    def _stream_runtime(self) -> Any:
        """The runtime stream sessions load models into (with the ``wrong_result`` fault drill, a lying one)."""
        if self.runtime is not None and self.node.config.provider.fault == "wrong_result":
            return _WrongOutputs(self.runtime)
        return self.runtime

    def _dispatch(self, target: object, event: Event) -> None:
        if target == "block":
            assert isinstance(event, BlockFinalized)
            if event.height < self.node.chain.height:
                # A newer block is already committed (and queued behind this one): each event carries the whole
                # ledger view, so the roles act on the newest only. Replaying a sync batch block by block made a
                # client that restarted mid-auction take its own Assign, sent at a replayed height, for one that
                # never landed; and under load it was work for nothing.
                self.counters["blocks_coalesced"] += 1
                return
            self.outbox.on_block(event.ledger)  # type: ignore[arg-type]
            self.client.on_block(event)
            if self.provider is not None:
                self._route(PROVIDER, self.provider.handle(event))
        elif target == MODELS_ORIGIN:
            if isinstance(event, TxFailed):
                self.models.tx_failed(event)
        elif target == PROVIDER:
            if self.provider is not None:
                self._route(PROVIDER, self.provider.handle(event))
        elif isinstance(target, bytes) and target in self.clients:
            self.client.handle(target, event)

    def _route(self, origin: object, actions: list) -> None:
        for action in actions:
            try:
                self._execute(origin, action)
            except Exception as exc:
                log(logger, logging.ERROR, "role_action_failed", action=type(action).__name__, error=repr(exc))
                logger.debug("role action failed", exc_info=True)
        self.client.wake_waiters(origin)

    def _action_table(self) -> ActionExecutor[object]:
        """What the node does for each action a role returns (``p2pgpu.market.executor``)."""
        topics = self.node.topics
        return ActionExecutor({
            SubmitTx: lambda origin, a: self.outbox.submit(origin, a.body, assign_nonce=a.assign_nonce),
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
        inputs = self.client.inputs_of(action.task_id)
        if inputs is not None:  # items supplied at submit time: rows of the "items" input (not in the spec)
            self._spawn(self.streams.run_client, origin, action, stream_items(inputs))

    def _start_job(self, origin: object, action: RunJob) -> None:
        log(logger, logging.INFO, "job_started", task=action.task_id.hex()[:16], kernel=action.spec.kernel)
        self._spawn(self._run_job, origin, action)

    def _report_progress(self, origin: object, action: ReportProgress) -> None:
        self.client.report_progress(action)
        log(logger, logging.INFO, "task_progress", task=action.task_id.hex()[:16], stage=action.stage.value,
            detail=action.detail)

    def _result_ready(self, origin: object, action: ResultReady) -> None:
        self.client.result_ready(action)

    def _task_closed(self, origin: object, action: TaskClosed) -> None:
        self.client.task_closed(action)
        self._unpin_task(action.task_id)
        log(logger, logging.INFO, "task_closed", task=action.task_id.hex()[:16], outcome=str(action.outcome),
            detail=action.detail)

    def _report(self, origin: object, action: Report) -> None:
        self.client.report(origin, action)
        log(logger, logging.INFO, "market_report", task=action.task_id.hex()[:16], message=action.message)

    # ------------------------------------------------------------ peers

    def _learn_peer(self, address: bytes, peer_id: str) -> None:
        if account_address_of_peer(peer_id) == address:
            self.peers[address] = peer_id

    def _learn_bidder(self, address: bytes, peer_id: str) -> None:
        """A provider's peer from its signed bid's key, unless one is known already."""
        self.peers.setdefault(address, peer_id)

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
            self._pin_for_task(action.task_id, sealed.content_hash)
        peers = action.peers if isinstance(action, ServeResult) else (action.client,)
        self.access.grant(peers, action.result_hash)

    def _pin_for_task(self, task_id: bytes, body: bytes) -> None:
        """Keep a sealed body of ``task_id`` in the store until the task is over for us."""
        self.store.pin(body)
        self._pins[task_id].append(body)

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
        inputs = self.client.inputs_of(action.task_id)
        if inputs is None:
            return
        if self.runtime is not None:
            verdict = await self.runtime.verify(action.spec, inputs, action.outputs)
        elif action.spec.kernel in ("matmul", "conv2d"):  # NumPy references: no TensorFlow in this process
            from kernels.registry import lookup

            kernel = lookup(action.spec.kernel, action.spec.version)
            verdict = await trio.to_thread.run_sync(kernel.verify, action.spec, inputs, action.outputs)
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
