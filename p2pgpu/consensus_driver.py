"""Drives the sans-I/O consensus engine with Trio and the network.

The engine decides; this module only moves bytes and time. One task owns the
engine and feeds it events one at a time from a single inbox (gossip
messages, fired timeouts, synced blocks), then carries out the actions it
returns, in order:

* ``Broadcast``       -> queued for the publisher task (the engine never waits on the network), once
  the slashing-protection record covering what it signed is durable (see below)
* ``ScheduleTimeout``, ``ScheduleSync`` -> a sleeping task that posts ``action.fired()`` back to the inbox
* ``Commit``          -> the block checked, stored (fsync, in a worker thread), adopted; then the commit hook
* ``ReportEvidence``  -> an ``Evidence`` transaction into the mempool and onto ``/tx``
* ``RequestSync``     -> a fetch task that posts ``BlocksSynced`` back (empty if no peer had a block)
* ``RejectMessage``   -> counted by reason; the sender's peer score drops (a ban, past the threshold)

Because only the engine task touches the engine, no locks are needed, and
because every input passes through the inbox, a run is the ordered sequence
of its events, just like the simulator's.

Storing a block blocks (fsync, and every ``snapshot_interval`` blocks a
snapshot), so it runs in a worker thread while the loop goes on gossiping.
The engine task awaits it, though, before it carries out the next action or
takes the next event: a block is durable before the node acts on it or votes
past it (persist before adopt), and commits never overlap (one writer, the
engine task, through a one-slot limiter). Whether the node is behind, and
when to ask peers for blocks, is the engine's call (on proof only, with
backoff: see :mod:`ledger.consensus`); blocks announced on ``/block`` go to
it too.

Signing blocks too: the validator's slashing-protection guard fsyncs the
highest position it signed. The driver defers those writes
(:meth:`~ledger.signer_guard.SignerGuard.defer_writes`): inside
``engine.handle`` the guard only raises its mark in memory (so the engine
still refuses a second, conflicting signature at once), and before the
driver carries out the actions of an event it writes the mark in a worker
thread (one writer at a time; one write covers every signature of the event)
and waits for it. Nothing the engine signed -- a Broadcast, or our precommit
inside a Commit's certificate -- leaves the node before the record covering
it is durable; a signature whose record a crash lost was never sent, so the
restarted node, which may sign that position anew, contradicts nothing. If
the record cannot be written, none of that event's actions are carried out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ledger.blocks import FinalizedBlock
from ledger.chain import Chain
from ledger.codec import DecodeError
from ledger.consensus import (
    CONSENSUS_MESSAGES,
    BlocksSynced,
    Broadcast,
    Commit,
    ConsensusEngine,
    Event,
    MessageReceived,
    RejectMessage,
    ReportEvidence,
    RequestSync,
    ScheduleSync,
    ScheduleTimeout,
    SignatureVerifier,
    Timer,
    TxsAvailable,
    message_height,
    precheck_message,
)
from ledger.keys import AccountKey
from ledger.mempool import Mempool, MempoolRejected
from ledger.signer_guard import GuardFileError, SignerGuard
from ledger.state import State
from ledger.transactions import Evidence
from p2pgpu.blocksync import SyncFailed, fetch_blocks
from p2pgpu.net import GossipMessage, Network, Verdict, accept, ignore, reject
from p2pgpu.net.log import log
from p2pgpu.topics import Topics

logger = logging.getLogger(__name__)

INBOX_SIZE = 8192

OLD_HEIGHT = "old_height"
"""Why ``/consensus`` gossip for a height below our head's is ignored (not relayed, not charged)."""


def validate_consensus_message(
    peer: str, data: bytes, *, state: State | None = None, verifier: SignatureVerifier | None = None
) -> Verdict[Any]:
    """Gossip validator for ``/consensus``: the schema, then (given our head) who signed.

    With ``state`` and ``verifier`` it also runs
    :func:`~ledger.consensus.precheck_message`: votes by non-members and
    proposals not signed by their proposer are rejected here, so they are not
    forwarded. Vote signatures are BLS and checked by the engine, lazily and in
    aggregate, when a vote can matter; the engine reports bad ones with
    RejectMessage, and the driver charges the sender then. An accepted
    message carries its decoded form (``GossipMessage.record``): the pump
    does not decode it again.
    """
    try:
        message = CONSENSUS_MESSAGES.decode(data)
    except DecodeError as exc:
        return reject(f"decode:{exc.path.split('.')[0] or 'message'}")
    if state is not None:
        height = message_height(message)
        if height is not None and height < state.height:
            # Settled on our head, and on the head of every peer that could still use it: a peer finishing
            # height ``state.height`` needs that height's votes (kept), one further behind syncs blocks.
            # Relaying old proposals and votes let anyone make every node forward them, unchecked (their
            # committee may be long gone) and uncharged. Not charged here either: late copies are innocent.
            # A node that is behind checks against its own head, so what it still needs is never "old" to it.
            return ignore(OLD_HEIGHT)
    if state is not None and verifier is not None:
        problem = precheck_message(state, message, verifier)
        if problem is not None:
            return reject(problem)
    return accept(message)


STALL_BLOCKS = 4
STALL_MIN_S = 3.0


@dataclass
class DriverStats:
    commits: int = 0
    last_commit_monotonic: float = 0.0
    sync_requests: int = 0
    sync_failures: int = 0
    rejected_messages: int = 0
    evidence_reported: int = 0
    highest_seen_height: int = 0
    """The highest height proven committed by the network (see ``ConsensusEngine.highest_seen_height``)."""
    sync_claims_dropped: int = 0
    """Unproven claims of a far height the engine gave up on after a few fruitless sync requests."""
    stall_syncs: int = 0
    """Sync requests made because no block was committed for a while (see ``ConsensusDriver._watch_for_stall``)."""


class ConsensusDriver:
    def __init__(
        self,
        engine: ConsensusEngine,
        chain: Chain,
        mempool: Mempool,
        network: Network,
        topics: Topics,
        account: AccountKey,
        *,
        on_commit: Callable[[FinalizedBlock, State], None] | None = None,
        send_tx: Callable[[Evidence], object] | None = None,
    ) -> None:
        """``send_tx``: the node's :meth:`p2pgpu.txsender.TxSender.send` (our own transactions take their
        nonces from one allocator); evidence is only logged without it."""
        self.engine = engine
        self.chain = chain
        self.mempool = mempool
        self.network = network
        self.topics = topics
        self.account = account
        self.on_commit = on_commit
        self.send_tx = send_tx
        self.stats = DriverStats()
        self._inbox_send, self._inbox = trio.open_memory_channel[Event](INBOX_SIZE)
        self._outbox_send, self._outbox = trio.open_memory_channel[tuple[str, bytes]](INBOX_SIZE)
        self._nursery: trio.Nursery | None = None
        self._sync_running = False
        self._txs_signalled = False  # a TxsAvailable is in the inbox: one is enough
        self._store_writer = trio.CapacityLimiter(1)  # blocking chain writes: one at a time, off the loop
        self._guard_writer = trio.CapacityLimiter(1)  # slashing-protection writes: one at a time, off the loop
        self._current_since_start = False
        """Whether, since this process started, the node committed a block or a peer's sync answer had nothing
        after our head. Until then our head is only what we stored before: a node restarted after an outage
        may be far behind with nothing yet to prove it (the stall watch asks only after ``stall_s``)."""
        self._guard: SignerGuard | None = engine.signer.guard if engine.signer is not None else None
        if self._guard is not None:
            self._guard.defer_writes()  # this driver writes the record before it publishes (_execute)
        self.started = trio.Event()

    @property
    def syncing(self) -> bool:
        """Behind by proof (the network committed at least two blocks we lack), or fetching the rest after a
        full sync batch. An unproven claim of a far height never makes a node say so, nor does a sync
        request made only to check one."""
        return self.engine.catching_up or self.stats.highest_seen_height > self.chain.height + 1

    @property
    def behind(self) -> bool:
        """Syncing, not yet shown current since start, or no block for ``stall_s``: our view of the ledger may be
        stale (a node just woken from a pause, or restarted, is behind before it has heard anything that proves
        it). Roles that act on the ledger's present -- a provider bidding -- wait while this is true.

        Shown current: a commit, or a peer answering our sync request with no block after our head. A node
        with no peer at all stays behind: it has nothing to bid with anyway."""
        if self.syncing or not self._current_since_start:
            return True
        last = self.stats.last_commit_monotonic
        return last > 0 and time.monotonic() - last >= self.stall_s

    async def run(self, consensus_channel, block_channel) -> None:
        """``consensus_channel`` is None on a node that follows finalized blocks only (``Node.follows_votes``)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._publisher)
            if consensus_channel is not None:
                nursery.start_soon(self._pump_gossip, consensus_channel)
            nursery.start_soon(self._pump_blocks, block_channel)
            nursery.start_soon(self._watch_for_stall)
            await self._execute(self.engine.start(now_ms=_now_ms()))
            self.started.set()
            async for event in self._inbox:
                if isinstance(event, TxsAvailable):
                    self._txs_signalled = False
                try:
                    actions = self.engine.handle(event, now_ms=_now_ms())
                except Exception as exc:  # the engine must never take the node down
                    log(logger, logging.ERROR, "consensus_event_failed", event_type=type(event).__name__, error=repr(exc))
                    logger.debug("consensus event failed", exc_info=True)
                    continue
                await self._execute(actions)
                # proof of consensus height H means the network has committed H - 1
                seen = self.engine.highest_seen_height - 1
                if seen > self.stats.highest_seen_height:
                    self.stats.highest_seen_height = seen
                if self.engine.claims_dropped > self.stats.sync_claims_dropped:
                    self.stats.sync_claims_dropped = self.engine.claims_dropped
                    log(logger, logging.INFO, "sync_claim_dropped", height=self.chain.height,
                        dropped=self.engine.claims_dropped)

    # ------------------------------------------------------------ inputs

    async def _pump_gossip(self, channel: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        async for msg in channel:
            if msg.local:
                continue  # the engine already handled what it broadcast itself
            message = msg.record  # decoded (and prechecked) by validate_consensus_message
            if message is None:
                continue
            await self._inbox_send.send(MessageReceived(message=message, peer=msg.origin))

    async def _pump_blocks(self, channel) -> None:
        """Finalized blocks announced on ``/block``, to the engine: the next one it applies, a later one
        (certificate checked) proves the network is ahead."""
        async for msg in channel:
            if msg.local:
                continue
            fb = msg.record  # decoded (and its certificate checked) by the node's block validator
            if not isinstance(fb, FinalizedBlock):
                continue
            if fb.block.height > self.chain.height:
                await self._inbox_send.send(BlocksSynced(blocks=(fb,), peer=msg.origin, solicited=False))

    async def _publisher(self) -> None:
        async for topic, data in self._outbox:
            try:
                await self.network.publish(topic, data)
            except Exception as exc:
                log(logger, logging.WARNING, "publish_failed", topic=self.topics.name_of(topic), error=repr(exc))

    # ------------------------------------------------------------ actions

    async def _execute(self, actions) -> None:
        """Carry out ``actions`` in order, once what the engine signed for them is durable; only that write
        and a commit (its block being stored) wait."""
        try:
            await self._make_signatures_durable()
        except GuardFileError as exc:
            # nothing signed may leave; the mark stays pending and the next event's actions try again
            log(logger, logging.ERROR, "signer_guard_write_failed", error=str(exc), actions_dropped=len(actions))
            return
        for action in actions:
            if isinstance(action, Broadcast):
                self.publish_nowait(self.topics.consensus, CONSENSUS_MESSAGES.encode(action.message))
            elif isinstance(action, (ScheduleTimeout, ScheduleSync)):
                assert self._nursery is not None
                self._nursery.start_soon(self._timer, action)
            elif isinstance(action, Commit):
                await self._commit(action)
            elif isinstance(action, ReportEvidence):
                self._report_evidence(action)
            elif isinstance(action, RequestSync):
                self._start_sync(action.from_height, action.peer, action.max_blocks)
            elif isinstance(action, RejectMessage):
                self.stats.rejected_messages += 1
                if action.peer is not None:
                    # counted, scored and (past the threshold) banned like a validator's rejection
                    self.network.report_rejection(self.topics.consensus, action.peer, action.reason, action.detail)
                else:
                    self.network.metrics.rejected[(self.topics.consensus, action.reason)] += 1
                    log(logger, logging.INFO, "consensus_message_rejected", reason=action.reason, detail=action.detail)

    async def _make_signatures_durable(self) -> None:
        """Write the guard's pending mark in a worker thread and wait for it (coalesced: one write covers
        every position the engine approved since the last). The engine task waits, so the engine signs
        nothing meanwhile; the rest of the loop goes on."""
        guard = self._guard
        if guard is None:
            return
        pending = guard.pending
        if pending is None:
            return
        await trio.to_thread.run_sync(guard.write, pending, limiter=self._guard_writer)
        guard.mark_durable(pending)

    def notify_txs_available(self) -> None:
        """A transaction was admitted to the mempool: a proposer waiting out its pause may propose early."""
        if self._txs_signalled:
            return
        try:
            self._inbox_send.send_nowait(TxsAvailable())
        except trio.WouldBlock:
            return  # a full inbox: the regular pause still ends the wait
        self._txs_signalled = True

    def publish_nowait(self, topic: str, data: bytes) -> None:
        """Queue a gossip publication (never blocks the caller; a full queue is logged)."""
        try:
            self._outbox_send.send_nowait((topic, data))
        except trio.WouldBlock:
            log(logger, logging.WARNING, "publish_queue_full", topic=self.topics.name_of(topic))

    async def _timer(self, action: Timer) -> None:
        await trio.sleep(action.delay_s)
        await self._inbox_send.send(action.fired())

    async def _commit(self, action: Commit) -> None:
        """``Chain.commit``, its blocking steps in a worker thread: check (here: the verifier's cache is not
        thread-safe, and the gossip validators use it), publish it if we proposed it, store (fsync), adopt,
        snapshot if due.

        Only this task writes the chain, and it does not take the next action or event until the block is
        stored and adopted; meanwhile other tasks may read the chain, which still shows the previous head.
        """
        fb = action.finalized
        if fb.block.height <= self.chain.height:
            return  # already stored (a synced block we had)
        new_state = self.chain.check_commit(fb, action.state, verifier=self.engine.verifier)
        if self.engine.address is not None and fb.block.header.proposer == self.engine.address:
            # Final by its certificate, not by our copy on disk: the nodes that follow /block get it now, not
            # after our fsync (a crash before it loses only our copy, which we sync back like anyone's).
            self.publish_nowait(self.topics.block, fb.encode())
        await trio.to_thread.run_sync(self.chain.persist_block, fb, limiter=self._store_writer)
        self.chain.adopt(new_state)  # no checkpoint since the block became durable
        if self.chain.snapshot_due(new_state.height):
            await trio.to_thread.run_sync(self.chain.write_snapshot_if_due, new_state, limiter=self._store_writer)
        self.stats.commits += 1
        self.stats.last_commit_monotonic = time.monotonic()
        self._current_since_start = True
        self.stats.highest_seen_height = max(self.stats.highest_seen_height, fb.block.height)
        self.mempool.update(action.state, fb.block.transactions)
        if self.mempool.has_ready():
            self.notify_txs_available()
        log(logger, logging.INFO, "block_committed", height=fb.block.height, txs=len(fb.block.transactions),
            round=fb.certificate.round, hash=fb.block.block_hash().hex()[:16])
        if self.on_commit is not None:
            try:
                self.on_commit(fb, action.state)
            except Exception as exc:
                log(logger, logging.ERROR, "commit_hook_failed", height=fb.block.height, error=repr(exc))
                logger.debug("commit hook failed", exc_info=True)

    def _report_evidence(self, action: ReportEvidence) -> None:
        log(logger, logging.WARNING, "double_vote_detected", validator=action.vote_a.validator.hex(),
            height=action.vote_a.vote.height)
        if self.send_tx is None:
            return
        body = Evidence(sender=self.account.address, nonce=0, fee=self.chain.state.params.min_fee,
                        vote_a=action.vote_a, vote_b=action.vote_b)
        try:
            self.send_tx(body)
        except MempoolRejected as exc:
            log(logger, logging.WARNING, "evidence_not_admitted", reason=str(exc))
            return
        self.stats.evidence_reported += 1

    @property
    def stall_s(self) -> float:
        """Seconds without a commit after which the node asks its peers for blocks (4 block intervals, >= 3 s)."""
        return max(STALL_MIN_S, STALL_BLOCKS * self.engine.config.timeout_commit_s)

    async def _watch_for_stall(self) -> None:
        """A node that hears no blocks asks its peers for the ones after its head, as a fresh node does.

        Sync otherwise starts from what the node hears: a ``/block``
        announcement, a vote for a later height. A follower whose gossip
        mesh peers died (a client meshed with two providers that were
        stopped, pruned by the validators and in their backoff) or that was
        paused past an epoch hears nothing it can use, and stayed behind for
        ever (its tasks timed out, a provider was slashed for no-shows). An
        answer is verified like any synced block (certificate against the
        committee each block's predecessor set), so asking costs one request
        per ``stall_s`` while a network is really idle or stalled, never trust.
        """
        started = time.monotonic()
        while True:
            await trio.sleep(self.stall_s)
            last = self.stats.last_commit_monotonic or started
            if time.monotonic() - last >= self.stall_s and not self._sync_running:
                self.stats.stall_syncs += 1
                log(logger, logging.INFO, "no_block_lately", height=self.chain.height,
                    seconds=round(time.monotonic() - last, 1), action="asking peers for the blocks after our head")
                self._start_sync(self.chain.height + 1, None, self.engine.config.sync_batch)

    def _start_sync(self, from_height: int, peer: str | None, max_blocks: int) -> None:
        if self._sync_running or self._nursery is None:
            return
        self._sync_running = True
        self.stats.sync_requests += 1
        self._nursery.start_soon(self._sync, from_height, peer, max_blocks)

    async def _sync(self, from_height: int, hint: str | None, max_blocks: int) -> None:
        """Ask the hinted peer (if connected: a claim names whoever it likes), then every other, until one has
        blocks; answer the engine either way. The slot is free before the answer goes in, so a request the
        engine makes on reading it is not dropped as overlapping."""
        try:
            blocks, source = await self._fetch_from_peers(from_height, hint, max_blocks)
        finally:
            self._sync_running = False
        await self._inbox_send.send(BlocksSynced(blocks=blocks, peer=source))

    async def _fetch_from_peers(
        self, from_height: int, hint: str | None, max_blocks: int
    ) -> tuple[tuple[FinalizedBlock, ...], str | None]:
        connected = self.network.connected_peers()
        peers = [hint] if hint in connected else []
        peers += sorted(connected - set(peers))
        answered = 0  # peers that answered with no block
        for peer in peers:
            try:
                blocks = await fetch_blocks(self.network, peer, from_height, max_blocks=max_blocks)
            except SyncFailed as exc:
                self.stats.sync_failures += 1
                log(logger, logging.INFO, "sync_failed", peer=peer, error=str(exc))
                continue
            if blocks:
                log(logger, logging.INFO, "sync_received", peer=peer, first=from_height, blocks=len(blocks))
                return blocks, peer
            answered += 1
        if answered and from_height == self.chain.height + 1 and not self._current_since_start:
            # every peer that answered has nothing after our head: as current as the network we can reach
            self._current_since_start = True
            log(logger, logging.INFO, "sync_current", height=self.chain.height, peers_answered=answered)
        log(logger, logging.DEBUG, "sync_found_nothing", first=from_height, peers=len(peers))
        return (), None

    async def submit_event(self, event: Event) -> None:
        await self._inbox_send.send(event)


def _now_ms() -> int:
    return int(time.time() * 1000)
