"""The Trio shell of the market roles: client tasks and the provider role in a node.

The roles (``p2pgpu.market``) decide; this module carries out their actions
and feeds back what happened. One task owns every role and handles one
event at a time from a single inbox, so roles need no locks:

* finalized blocks arrive from the consensus driver's commit hook;
* validated ``/task`` and ``/bid`` gossip arrives from the network (``/advert`` gossip is kept by its validator,
  :mod:`p2pgpu.advertiser`, which also publishes a provider's own adverts);
* data-plane fetches and kernel runs happen in background tasks whose
  outcomes come back through the inbox as events;
* stream sessions' actions (claims, progress, results) come back the same way.

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
(:mod:`p2pgpu.marketgossip`), the provider's start-up and fault drills
(:mod:`p2pgpu.providerservice`), the data-plane fetch workers
(:mod:`p2pgpu.fetchworkers`), the roles' ``/metrics`` families
(:mod:`p2pgpu.rolemetrics`), and the node's ports (:mod:`p2pgpu.ports`).

Stream sessions (:mod:`p2pgpu.streams`) run on their own tasks: what they
return comes back into the inbox as :class:`RouteActions`, and the provider
role's changes to a served session go out as ``CommandStream``, applied by
the session's own task.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import trio

from kernels.bymodel import expand_model_spec, spec_model_id
from kernels.errors import KernelError
from kernels.spec import JobSpec
from ledger.codec import DecodeError, decode
from ledger.state import State
from ledger.transactions import Assign, CommitResult, SignedTransaction
from p2pgpu.api.types import SubmitRequest, TaskView
from p2pgpu.bidlink import BID_LINK_PROTOCOL, BidLinks, ClientLinks, serve_bid_links
from p2pgpu.blobaccess import ANY_PEER, BlobAccess
from p2pgpu.blobstore import BlobStore, BlobStoreError
from p2pgpu.clientservice import ClientRecord, ClientService, block_seconds
from p2pgpu.dataplane import DataPlane, account_address_of_peer, peer_id_of_account_key
from p2pgpu.linkdata import LinkData
from p2pgpu.liveness import JOB_PROTOCOL, probe_providers, serve_job_status
from p2pgpu.advertiser import AdvertFollower, ProviderAdvertiser, advert_content, pump_adverts
from p2pgpu.market.advertise import WarmProvider
from p2pgpu.market.executor import ActionExecutor
from p2pgpu.fetchworkers import FetchWorkers
from p2pgpu.marketgossip import deliver_bid_record, pump_announces, pump_bids, validate_announce, validate_bid
from p2pgpu.metrics_text import MetricFamily, counter, gauge
from p2pgpu.modelcache import MODEL_FETCH_TIMEOUT_S, ModelCache, ModelUnavailable, model_holders
from p2pgpu.modelpublish import MODELS_ORIGIN, ModelPublisher
from p2pgpu.ports import RolesNode
from p2pgpu.providerservice import PROVIDER, ProviderService, drill_job_outputs, provider_role_config
from p2pgpu.rolemetrics import role_metric_families
from p2pgpu.taskjournal import TaskJournal
from p2pgpu.txoutbox import TxOutbox
from p2pgpu.market import (
    Action,
    AnnounceReceived,
    BidOffer,
    BidReceived,
    BidStart,
    BlockFinalized,
    CommandStream,
    CommitmentPending,
    DeclineNotice,
    DeclineReceived,
    DeliverResult,
    Event,
    FetchInputs,
    FetchResult,
    FetchSpec,
    FetchStreamItem,
    InputsServed,
    JobDone,
    JobFailed,
    OpenStream,
    ProviderRole,
    PrepareResult,
    PublishAnnounce,
    PublishBid,
    PublishDecline,
    Report,
    ReportProgress,
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
    SubmitTx,
    TaskClosed,
    TxFailed,
    VerificationOutcome,
    VerifiedBid,
    VerifyDone,
)
from p2pgpu.net import Outcome, ProtocolError, Verdict
from p2pgpu.net.log import log
from p2pgpu.sealed import Purpose, SealedError, task_context
from p2pgpu.streams import StreamTransport, stream_items
from p2pgpu.streams.live import LiveSession

if TYPE_CHECKING:  # kernels.runtime pulls in the kernel registry; only its type is needed here
    from kernels.runtime import KernelRuntime

logger = logging.getLogger(__name__)

__all__ = ["PROVIDER", "MarketRoles", "RouteActions", "provider_role_config"]


@dataclass(frozen=True, slots=True)
class RouteActions(Event):
    """Actions a stream session returned on its own task, for the roles' loop to carry out (never to a role)."""

    actions: tuple[Action, ...]


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
        self.access = BlobAccess(lambda task_id, address: self._post(task_id, InputsServed(task_id, address)))
        self._pins: dict[bytes, list[bytes]] = defaultdict(list)  # task id -> sealed bodies it keeps in the store
        self.peers: dict[bytes, str] = {}
        self._held_announces: deque[SignedAnnounce] = deque(maxlen=1024)  # heard while we were behind
        self.seen_task = SeenCache()
        self.seen_bid = SeenCache()
        self.counters: dict[str, int] = defaultdict(int)
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[object, Event]](16384)
        self._nursery: trio.Nursery | None = None
        self.streams = StreamTransport(node.network, address=self.me, ledger=lambda: node.chain.state,
                                       runtime=lambda: self.provider_service.stream_runtime(),
                                       route=self._route_from_stream, peer_of=self._peer_of,
                                       with_model=self._with_model)
        self.client = ClientService(
            node, store=store, sealed=self.sealed, access=self.access,
            journal=TaskJournal(Path(node.config.data_dir) / "client" / "tasks"), route=self._route,
            pin=self._pin_for_task, unpin_task=self._unpin_task, learn_peer=self._learn_bidder,
            stream_output=self.streams.client_output, stream_item=self.streams.client_item)
        self.outbox = TxOutbox(node.tx_sender, node.mempool, failed=self._post, post_refused=self.client.post_refused,
                               claims=self.streams.metrics)
        self.fetchers = FetchWorkers(dataplane, chain_id=self.chain_id, peer_of=self._peer_of, post=self._post)
        self.models = ModelPublisher(store=store, access=self.access, outbox=self.outbox, me=self.me,
                                     state=lambda: node.chain.state, available=node.tx_sender.available)
        """Models this node pushes (``POST /models``): stored, served to any peer, registered."""
        self.model_cache = ModelCache(store, self.access, lambda peer, blob_hash, max_bytes: dataplane.fetch(
            peer, blob_hash, max_bytes=max_bytes, timeout=MODEL_FETCH_TIMEOUT_S))
        """Bundles of the models our tasks by model run (provider and verifier), fetched from a holder once."""
        self.provider_service = ProviderService(node, self.outbox, model_cache=self.model_cache, peer_of=self._peer_of)
        self.adverts = AdvertFollower(node, self.chain_id)
        """Providers' adverts as this node heard them (``/advert``, when it follows the market)."""
        self.advertiser = ProviderAdvertiser(
            key=node.keys.account, chain_id=self.chain_id, topic=node.topics.advert,
            block_seconds=block_seconds(node.config), state=lambda: node.chain.state, publish=node.publish,
            content=lambda: advert_content(self.provider, node.chain.state, self.model_cache.warm_sizes()))
        """A provider's adverts of the models it holds warm (run only with the provider role)."""
        self.bid_links = BidLinks(node.network.open_stream, lambda data: node.publish(node.topics.bid, data),
                                  on_inputs=lambda peer, payload: self.link_data.inputs_from_link(peer, payload),
                                  own_key=self.sealed.public_key)
        """A provider's links to the clients it bids to (:mod:`p2pgpu.bidlink`); ``/bid`` gossip is the fallback."""
        self.client_links = ClientLinks(own_key=self.sealed.public_key)
        """A client's inbound links from providers, the way its inputs go to the one it assigns a task to."""
        self.link_data = LinkData(
            chain_id=self.chain_id, sealed=self.sealed, store=store, dataplane=dataplane, bid_links=self.bid_links,
            client_links=self.client_links, provider=lambda: self.provider, clients=lambda: self.clients,
            peer_of=self._peer_of, post=self._post, spawn=self._spawn, counters=self.counters)
        """Task data on the bid links: inputs with the Assign, the result before its hint (:mod:`p2pgpu.linkdata`)."""
        self._execute = self._action_table()

    @property
    def provider(self) -> ProviderRole | None:
        """The market provider role, once the kernel runtime is warm (:class:`~p2pgpu.providerservice.ProviderService`)."""
        return self.provider_service.role

    @property
    def runtime(self) -> KernelRuntime | None:
        return self.provider_service.runtime

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

    async def open_live_session(self, request: SubmitRequest, *, start_timeout: float,
                                avoid: frozenset[bytes] = frozenset()) -> LiveSession:
        """:meth:`ClientService.open_live_session`: a stream task fed one item at a time."""
        return await self.client.open_live_session(request, start_timeout=start_timeout, avoid=avoid)

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

    def validate_bid(self, peer: str, data: bytes) -> Verdict[BidOffer | SignedDecline]:
        """``/bid`` validator (:func:`p2pgpu.marketgossip.validate_bid`): accepted with the verified bid and start."""
        return validate_bid(self.node, self.chain_id, self.seen_bid, peer, data)

    def validate_advert(self, peer: str, data: bytes) -> Verdict[object]:
        """``/advert`` validator (:func:`p2pgpu.marketgossip.validate_advert`): a kept advert is accepted."""
        return self.adverts.validate(peer, data)

    def warm_providers(self, model_id: bytes) -> list[tuple[WarmProvider, str]]:
        """Providers whose live advert says ``model_id`` is warm there, best first, each with its peer id."""
        return self.adverts.warm_providers(model_id)

    def entitled(self, peer_id: str, address: bytes, blob_hash: bytes) -> bool:
        """Data-plane check: may ``address`` read ``blob_hash``? (:class:`~p2pgpu.blobaccess.BlobAccess`)"""
        return self.access.entitled(peer_id, address, blob_hash)

    def served(self, peer_id: str, address: bytes, blob_hash: bytes) -> None:
        """Data plane: a blob went out in full (:meth:`~p2pgpu.blobaccess.BlobAccess.served`)."""
        self.access.served(peer_id, address, blob_hash, is_ours=self.clients.__contains__)

    # ------------------------------------------------------------ lifecycle

    async def run(self, task_channel, bid_channel, advert_channel=None, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Channels are None on a node that does not follow the market (``Node.follows_market``)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # with the client role: the journal reloaded before the API answers and before we send any transaction
            await nursery.start(partial(self.client.run, recover="client" in self.node.roles))
            self.models.serve_registered(self.node.chain.state)
            if task_channel is not None:
                nursery.start_soon(pump_announces, task_channel, self._announce_arrived)
            if bid_channel is not None:
                nursery.start_soon(pump_bids, bid_channel, self._bid_arrived, self._decline_arrived)
            if advert_channel is not None:
                nursery.start_soon(pump_adverts, advert_channel)
            self.node.network.set_handler(JOB_PROTOCOL, serve_job_status(self._job_status), penalize_bad_requests=True)
            if "client" in self.node.roles:
                serve_bid_links(self.node.network.set_stream_handler, self._bid_from_link, self._commitment_from_link,
                                links=self.client_links, on_result=self.link_data.result_from_link)
                nursery.start_soon(probe_providers, self.node.network, self.client.probe_targets, self._peer_of, self._post)
            if "provider" in self.node.roles:
                await nursery.start(self.bid_links.run)
                nursery.start_soon(self.provider_service.run)
                nursery.start_soon(self.advertiser.run)
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
        self.adverts.on_block(state.height)
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

    def _bid_arrived(self, bid: VerifiedBid, start: BidStart | None = None) -> None:
        """A bid, verified by the ``/bid`` validator (its warm/cold start too), for one of our tasks (``pump_bids``)."""
        task_id = bid.bid.task_id
        if task_id in self.clients:
            # the bid's key is the provider's libp2p identity: its peer, for fetches and liveness probes
            self._learn_bidder(bid.bid.provider, peer_id_of_account_key(bid.public_key))
            self._post(task_id, BidReceived(bid, start))

    def _bid_from_link(self, peer: str, data: bytes) -> None:
        """A bid or decline over a provider's bid link, judged as ``/bid`` gossip is (and counted once with it)."""
        verdict = self.validate_bid(peer, data)
        rec = verdict.record
        if verdict.accepted and rec is not None:
            self.counters["bid_link_accepted"] += 1
            deliver_bid_record(rec, self._bid_arrived, self._decline_arrived)
        elif verdict.outcome is Outcome.REJECT:
            self.counters["bid_link_rejected"] += 1
            self.node.network.penalize(peer, BID_LINK_PROTOCOL, verdict.reason)
        else:
            self.counters["bid_link_ignored"] += 1

    def _commitment_from_link(self, peer: str, data: bytes) -> None:
        """A provider's hint that it committed a result of ours: its signed CommitResult, from its own peer."""
        try:
            stx = decode(SignedTransaction, data)
        except DecodeError as exc:
            raise ProtocolError(f"bid-link commitment is no signed transaction: {exc}") from exc
        body = stx.body
        if not isinstance(body, CommitResult) or account_address_of_peer(peer) != body.sender:
            raise ProtocolError("bid-link commitment must be the sending provider's own CommitResult")
        self.counters["bid_link_commitments"] += 1
        self.on_pending_tx(stx)

    def on_sent_tx(self, stx: SignedTransaction) -> None:
        """A transaction this node sent: a provider's CommitResult is also a hint for its client (``bid_links``);
        a client's Assign takes the task's inputs to the chosen provider (``client_links``)."""
        body = stx.body
        if isinstance(body, CommitResult) and self.provider is not None:
            client = self.provider.client_of(body.task_id)
            if client is not None:
                self.link_data.commit_sent(self._peer_of(client), body, stx.encode())
        elif isinstance(body, Assign) and body.task_id in self.clients and self._nursery is not None:
            self._spawn(self.link_data.push_inputs, body.task_id, body.bid.bid.provider)

    def _send_bid(self, origin: object, action: PublishBid | PublishDecline) -> None:
        """A bid or decline to its one reader, the task's client: over a bid link to its node, else by gossip."""
        self.bid_links.send_bid(self._peer_of(action.client), action.data)

    def on_pending_tx(self, stx: SignedTransaction) -> None:
        """A transaction from gossip entered our mempool: a provider's CommitResult for one of our tasks lets
        the client fetch the result before the block that makes the commitment final (CommitmentPending)."""
        body = stx.body
        if isinstance(body, CommitResult) and body.task_id in self.clients:
            self._post(body.task_id, CommitmentPending(body.task_id, body.sender, body.result_hash))

    def _decline_arrived(self, notice: DeclineNotice) -> None:
        if notice.task_id in self.clients:
            self._post(notice.task_id, DeclineReceived(notice))

    def _job_status(self, requester: bytes, task_ids: list[bytes]) -> list[str]:
        """Answer a client's liveness probe (``p2pgpu.liveness``): our provider role's phase of each task."""
        if self.provider is None:
            return ["unknown"] * len(task_ids)  # not (yet) a provider: we run nothing for anyone
        return self.provider.job_status(requester, task_ids)

    def _route_from_stream(self, origin: object, actions: list[Action]) -> None:
        """A stream session's actions (claims, progress, the result, reports): into the inbox, carried out in turn.

        The stream shell runs on its own tasks; the roles' state (the client
        service, the outbox, the provider role) changes only in :meth:`run`'s
        loop, so its actions are queued there as one :class:`RouteActions`.
        """
        self._post(origin, RouteActions(tuple(actions)))

    def _dispatch(self, target: object, event: Event) -> None:
        if isinstance(event, RouteActions):
            self._route(target, list(event.actions))
            return
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

    def _route(self, origin: object, actions: list[Action]) -> None:
        for action in actions:
            try:
                self._execute(origin, action)
            except Exception as exc:
                log(logger, logging.ERROR, "role_action_failed", action=type(action).__name__, error=repr(exc))
                logger.debug("role action failed", exc_info=True)
        if isinstance(origin, bytes):
            self.client.count_holder(origin)
        self.client.wake_waiters(origin)

    def _action_table(self) -> ActionExecutor[object]:
        """What the node does for each action a role returns (``p2pgpu.market.executor``)."""
        topics = self.node.topics
        return ActionExecutor({
            SubmitTx: lambda origin, a: self.outbox.submit(origin, a.body, assign_nonce=a.assign_nonce),
            PublishAnnounce: lambda origin, a: self.node.publish(topics.task, a.data),
            (PublishBid, PublishDecline): self._send_bid,
            ServeSpec: self._serve_spec,
            ServeInputs: lambda origin, a: self.access.grant_inputs(a.spec, a.peers),
            (ServeResult, DeliverResult): lambda origin, a: self._serve_result(a),
            PrepareResult: lambda origin, a: self._spawn(self.link_data.prepare_result, a.task_id, a.client,
                                                         a.result_hash, a.data),
            FetchSpec: self._start_fetch_spec,
            FetchInputs: lambda origin, a: self._spawn(self.fetchers.fetch_inputs, origin, a),
            FetchResult: lambda origin, a: self._spawn(self.fetchers.fetch_result, origin, a),
            OpenStream: self._open_stream,
            ServeStream: lambda origin, a: self._spawn(self.streams.serve_session, origin, a),
            SendReceipt: lambda origin, a: None,  # already queued and sent by its session's connection (ClientProtocol)
            CommandStream: lambda origin, a: self.streams.command(a.task_id, a.command),
            ServeStreamItem: lambda origin, a: self.access.grant(a.peers, a.input_hash, a.output_hash),
            FetchStreamItem: lambda origin, a: self._spawn(self.fetchers.fetch_stream_item, origin, a),
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
        self._spawn(self.fetchers.fetch_spec, origin, action, peer)

    def _open_stream(self, origin: object, action: OpenStream) -> None:
        live = self.client.live_start(action.task_id)
        if live is not None:  # posted without items: a live session, fed by its opener (open_live_session)
            self._spawn(self.streams.run_live_client, origin, action, live)
            return
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
        self.streams.forget_client(action.task_id)  # its items and outputs can no longer be disputed
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

    async def _run_job(self, origin, action: RunJob) -> None:
        if self.runtime is None:
            self._post(origin, JobFailed(action.task_id, "no kernel runtime"))
            return
        started = time.monotonic()
        try:
            # A by-model batch whose model a warm session holds runs through it (no load); else load it cold.
            warm = await self.provider_service.pool.run_job(action.spec, action.inputs)
            if warm is None:
                spec, inputs = await self._with_model(action.task_id, action.spec, action.inputs)
                computed = (await self.runtime.run(spec, inputs)).outputs
            else:
                computed = warm
                self.counters["jobs_run_warm"] += 1
        except (KernelError, ModelUnavailable) as exc:
            self._post(origin, JobFailed(action.task_id, f"{type(exc).__name__}: {exc}"))
            return
        exec_ms = int((time.monotonic() - started) * 1000)
        self.counters["jobs_run"] += 1
        outputs = drill_job_outputs(self.provider_service.fault, action.task_id, computed)
        if outputs is None:
            return  # the job "vanishes" (fault drill no_delivery): the ledger will record MISSED at the deadline
        log(logger, logging.INFO, "job_done", task=action.task_id.hex()[:16], exec_ms=exec_ms)
        self._post(origin, JobDone(action.task_id, outputs, exec_ms))

    async def _run_verify(self, origin, action: RunVerify) -> None:
        if self.runtime is None:
            self._post(origin, VerifyDone(action.task_id, False, "no kernel runtime to verify with"))
            return
        try:
            spec, inputs = await self._with_model(action.task_id, action.spec, action.inputs)
            verdict = await self.runtime.verify(spec, inputs, action.claimed)
        except (KernelError, ModelUnavailable) as exc:
            self._post(origin, VerifyDone(action.task_id, False, f"verification failed to run: {exc}"))
            return
        self.counters["verifications"] += 1
        self._post(origin, VerifyDone(action.task_id, bool(verdict.ok), verdict.reason or ""))

    async def _with_model(self, task_id: bytes, spec: JobSpec,
                          inputs: Mapping[str, np.ndarray]) -> tuple[JobSpec, Mapping[str, np.ndarray]]:
        """The spec and inputs to run: a task by model gets its model's bundle (:mod:`p2pgpu.modelcache`)."""
        wanted = spec_model_id(spec)
        if wanted is None:
            return spec, inputs
        state = self.node.chain.state
        entry = state.models.get(wanted)
        task = state.tasks.get(task_id)
        if entry is None or task is None:
            raise ModelUnavailable(f"model {wanted.hex()[:16]} or task {task_id.hex()[:16]} not on our ledger")
        provider = task.provider if task.provider != self.me else None  # a verifier may ask the provider too
        holders = model_holders(task.client, entry.owner, self._peer_of, provider=provider)
        bundle = await self.model_cache.bundle(wanted, holders=holders, max_bytes=entry.bundle_size)
        return expand_model_spec(spec, bundle, inputs)

    async def _spot_check(self, origin, action: RunSpotCheck) -> None:
        inputs = self.client.inputs_of(action.task_id)
        if inputs is None:
            return
        if self.runtime is not None:
            try:
                spec, full = await self._with_model(action.task_id, action.spec, inputs)
            except (KernelError, ModelUnavailable) as exc:
                self._post(origin, VerificationOutcome(action.task_id, True, f"not checked locally ({exc})"))
                return
            verdict = await self.runtime.verify(spec, full, action.outputs)
        elif action.spec.kernel in ("matmul", "conv2d"):  # NumPy references: no TensorFlow in this process
            from kernels.registry import lookup

            kernel = lookup(action.spec.kernel, action.spec.version)
            verdict = await trio.to_thread.run_sync(kernel.verify, action.spec, inputs, action.outputs)
        else:
            self._post(origin, VerificationOutcome(action.task_id, True, "not checked locally (no runtime)"))
            return
        self._post(origin, VerificationOutcome(action.task_id, bool(verdict.ok), verdict.reason or ""))

    # ------------------------------------------------------------ metrics

    def metric_families(self) -> list[MetricFamily]:
        """The roles' families at scrape time (:func:`p2pgpu.rolemetrics.role_metric_families`)."""
        def counted(label: str, prefix: str, *names: str, **renamed: str) -> dict[tuple[tuple[str, str], ...], float]:
            """A labelled family from ``self.counters[f"{prefix}_{name}"]``; ``renamed``: label value -> name."""
            pairs = [(n, n) for n in names] + list(renamed.items())
            return {((label, value),): self.counters.get(f"{prefix}_{name}", 0) for value, name in pairs}

        return role_metric_families(clients=self.clients.values(), counters=self.counters,
                                    recovery_s=self.recovery_s, recovered_tasks=self.recovered_tasks,
                                    streams=self.streams, provider_role="provider" in self.node.roles,
                                    provider_ready=self.provider is not None) + [
            gauge("p2pgpu_adverts_known", "Providers whose live model advert this node keeps (/advert gossip).",
                  len(self.adverts.directory)),
            counter("p2pgpu_adverts_published_total", "Model adverts this node's provider published.",
                    self.advertiser.core.published),
            counter("p2pgpu_bid_link_frames_total",
                    "Bid-link frames (p2pgpu.bidlink) this node's provider sent, and messages that went by /bid "
                    "gossip instead or were dropped (hints).",
                    {(("outcome", k),): self.bid_links.counters.get(k, 0) for k in ("sent", "gossiped", "dropped")}),
            gauge("p2pgpu_bid_links_open", "Bid links this node's provider holds open.", self.bid_links.open_links),
            counter("p2pgpu_bid_link_received_total", "Bids and declines this node's client took over bid links, "
                    "by the /bid validator's verdict.",
                    counted("verdict", "bid_link", "accepted", "rejected", "ignored")),
            counter("p2pgpu_inputs_pushed_total",
                    "Tasks whose inputs this node's client pushed to the assigned provider over its bid link, and "
                    "why not (no link, the provider's key not known yet, too big, failed): it then fetches them.",
                    counted("outcome", "inputs_push", "sent", "no_link", "no_key", "too_big", "failed")),
            counter("p2pgpu_result_pushes_total",
                    "Results this node's provider pushed to the client over its bid link before the commitment "
                    "hint, and why not (the link reads no pushes, or the result was not at hand or too big).",
                    counted("outcome", "result_push", "sent", "no_link", "not_built")),
            counter("p2pgpu_result_push_received_total",
                    "Result pushes this node's client took (accepted), refused (did not open: fetched instead) "
                    "or dropped (unexpected: not its task's provider, or one came already).",
                    counted("verdict", "result_push", "accepted", "refused", dropped="unexpected")),
            counter("p2pgpu_early_runs_total",
                    "Jobs this node's provider ran on inputs its client pushed with the Assign, before the assignment "
                    "was final (started), whose result it then committed (used) or threw away (discarded: the "
                    "task went to another provider, or the bid expired).",
                    {(("outcome", k),): (self.provider.early_runs.get(k, 0) if self.provider is not None else 0)
                     for k in ("started", "used", "discarded")}),
            counter("p2pgpu_inputs_push_received_total",
                    "Input pushes this node's provider took (accepted), refused (did not open: fetched instead) "
                    "or dropped (unexpected: not a task it takes a push for).",
                    counted("verdict", "inputs_push", "accepted", "refused", dropped="unexpected")),
        ]

    def close(self) -> None:
        self.provider_service.close()
