"""The peer node: composes the ledger chain, consensus, mempool, network and roles.

A node is one Trio task tree::

    Node.run
    ├── open_network (libp2p host, gossip, request/response, discovery)
    ├── ConsensusDriver.run      (engine + timers + sync + publisher)
    ├── tx gossip consumer       (mempool admission)
    └── roles                    (client / provider, when configured)

Everything that decides is pure and lives elsewhere (``ledger``, the
market state machines); this module wires channels and lifetimes. Every
validated gossip message and every API call ends in one of: a state change
through the engine, a mempool admission, or a counted rejection.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import trio

from ledger.blocks import FinalizedBlock
from ledger.chain import Chain
from ledger.codec import DecodeError
from ledger.consensus import ConsensusConfig as EngineConfig
from ledger.consensus import UNKNOWN_COMMITTEE, ConsensusEngine, SignatureVerifier, ValidatorSigner, certificate_problem
from ledger.genesis import Genesis
from ledger.keys import AccountKey, ValidatorKey
from ledger.mempool import Mempool, MempoolConfig, MempoolRejected
from ledger.signer_guard import SignerGuard
from ledger.state import State
from ledger.transactions import SignedTransaction
from ledger.transition import VerifiedTransaction, verify_transaction
from ledger import exceptions as ex
from p2pgpu.blocksync import make_sync_handler
from p2pgpu.chainguard import ChainGuard
from p2pgpu.config import NodeConfig
from p2pgpu.consensus_driver import ConsensusDriver, validate_consensus_message
from p2pgpu.net import GossipConfig, NetConfig, Network, Verdict, accept, ignore, open_network, reject
from p2pgpu.net.gossip import GossipMessage, message_origin
from p2pgpu.net.verdict import Outcome
from p2pgpu.net.log import log
from p2pgpu.net.ratelimit import KeyedRateLimiter, RateLimit
from p2pgpu.provider_warmup import start_provider_runtime
from p2pgpu.topics import SYNC_PROTOCOL, Topics
from p2pgpu.txgossip import OwnTxWatch, TxPacer, decode_tx_gossip
from p2pgpu.txsender import TxSender

if TYPE_CHECKING:
    from kernels.runtime import KernelRuntime
    from p2pgpu.roles import MarketRoles

logger = logging.getLogger(__name__)

# Gossip caps a message near 1 MiB; a proposal carries its whole block.
MAX_GOSSIP_BYTES = (1 << 20) - (16 << 10)
MAX_BLOCK_BYTES = MAX_GOSSIP_BYTES - (8 << 10)


@dataclass(frozen=True)
class NodeKeys:
    account: AccountKey
    validator: ValidatorKey | None = None


@dataclass
class NodeCounters:
    tx_admitted: int = 0
    tx_rejected: Counter[str] = field(default_factory=Counter)
    tx_resent: int = 0
    """Our own transactions gossiped again because they stayed pending (:class:`~p2pgpu.txgossip.OwnTxWatch`)."""
    published_without_followers: Counter[str] = field(default_factory=Counter)
    """Topic name (``tx``, ``task``) -> our messages published there while no connected peer followed it
    (a node that does not follow the topic itself)."""


def net_config_from(cfg: NodeConfig) -> NetConfig:
    g = cfg.network.gossip
    return NetConfig(
        listen_addrs=tuple(cfg.network.listen_addrs),
        bootstrap_peers=tuple(cfg.network.bootstrap),
        target_peers=cfg.network.target_peers,
        dial_timeout=cfg.network.dial_timeout,
        request_timeout=cfg.network.request_timeout,
        max_frame_size=max(4 << 20, MAX_GOSSIP_BYTES),
        gossip=GossipConfig(
            degree=g.degree,
            degree_low=g.degree_low,
            degree_high=g.degree_high,
            heartbeat_interval=g.heartbeat_interval,
            max_messages_per_topic_per_second=g.max_messages_per_topic_per_second,
            peer_rate=g.peer_rate,
            peer_burst=g.peer_burst,
            seen_ttl=g.seen_ttl,
            max_message_size=max(g.max_message_size, MAX_GOSSIP_BYTES),
        ),
    )


NONCE_LAG_SLACK = 2 * MempoolConfig().max_per_sender
"""A transaction's nonce beyond the mempool's future window by more than this is charged to its publisher (see
``Node._nonce_too_far``); within it, only ignored: two blocks' worth of a sender's pending transactions."""

PACE_WINDOW = 8
"""Early blocks may not make the last this-many blocks average less than ``block_interval`` apart."""


BAD_SIGNATURE = "bad_signature"
"""The ``/tx`` rejection of a transaction whose signature does not verify: rejects the whole message it came in."""


def engine_config_from(cfg: NodeConfig) -> EngineConfig:
    c = cfg.consensus
    return EngineConfig(
        timeout_propose_s=c.timeout_propose,
        timeout_propose_delta_s=c.timeout_propose_delta,
        timeout_prevote_s=c.timeout_prevote,
        timeout_prevote_delta_s=c.timeout_prevote_delta,
        timeout_precommit_s=c.timeout_precommit,
        timeout_precommit_delta_s=c.timeout_precommit_delta,
        max_block_bytes=MAX_BLOCK_BYTES,
        timeout_commit_s=c.block_interval,
        min_commit_pause_s=c.min_block_pause,
        tx_batch_s=c.tx_batch,
        pace_window=PACE_WINDOW,
    )


class Node:
    """One running peer. Build with the loaded config, keys and genesis; then ``await node.run()``."""

    def __init__(self, config: NodeConfig, keys: NodeKeys, genesis: Genesis, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``clock``: seconds on a monotonic clock, for the per-sender gossip rate limits (tests pass their own)."""
        self.config = config
        limits = config.network.rate_limits
        self.tx_limiter: KeyedRateLimiter[bytes] = KeyedRateLimiter(
            RateLimit(limits.tx_per_sender_rate, limits.tx_per_sender_burst), max_keys=limits.tracked_keys, clock=clock)
        """``/tx`` messages per sender address that passed every other check (``_validate_tx``)."""
        self.announce_limiter: KeyedRateLimiter[bytes] = KeyedRateLimiter(
            RateLimit(limits.announces_per_client_rate, limits.announces_per_client_burst),
            max_keys=limits.tracked_keys, clock=clock)
        """``/task`` announces per client address that passed every other check (``marketgossip.validate_announce``)."""
        self.kernel_runtime: KernelRuntime | None = None
        """A provider's kernel runtime, started by :meth:`run` before the node joins (the provider role takes it)."""
        self.keys = keys
        self.genesis = genesis
        self.chain_id = genesis.chain_id()
        self.topics = Topics.for_chain(self.chain_id)
        self.counters = NodeCounters()
        self.started_monotonic = time.monotonic()
        # one BLS verdict cache for the gossip validators and the engine: what one checked, the other need not
        self.verifier = SignatureVerifier()
        self.chain: Chain | None = None
        self.mempool: Mempool | None = None
        self.tx_sender: TxSender | None = None
        """Signs and sends every transaction of this node, with nonces from one allocator (set by ``run``)."""
        self.network: Network | None = None
        self.driver: ConsensusDriver | None = None
        self.ready = trio.Event()
        self._commit_hooks: list = []
        self._tx_hooks: list[Callable[[SignedTransaction], None]] = []
        self._sent_tx_hooks: list[Callable[[SignedTransaction], None]] = []
        self.roles_driver: MarketRoles | None = None
        self.chain_guard: ChainGuard | None = None  # refuses peers of another chain (chainguard.py)
        self.client_role: MarketRoles | None = None
        self.extra_metrics: Callable[[], list[Any]] | None = None
        self._tx_pacer = TxPacer(linger=config.network.tx_linger, max_bytes=config.network.gossip.max_message_size)
        """Our own transactions waiting for their ``/tx`` message (:mod:`p2pgpu.txgossip`)."""
        self._own_txs = OwnTxWatch()
        """Our own transactions still pending, gossiped again while they wait (:class:`OwnTxWatch`)."""
        self._next_no_followers_warning: dict[str, float] = {}
        """Topic name -> when a ``<name>_no_followers`` warning may be logged again."""
        self._tx_pending = trio.Event()

    # ------------------------------------------------------------ views

    @property
    def roles(self) -> frozenset[str]:
        return self.config.roles

    @property
    def state(self) -> State:
        assert self.chain is not None, "node not running"
        return self.chain.state

    def add_commit_hook(self, hook) -> None:
        """``hook(finalized_block, state)`` after every committed block (roles, API watchers)."""
        self._commit_hooks.append(hook)

    def add_tx_hook(self, hook: Callable[[SignedTransaction], None]) -> None:
        """``hook(tx)`` for every transaction from ``/tx`` gossip our mempool admitted (not final: pending)."""
        self._tx_hooks.append(hook)

    def add_sent_tx_hook(self, hook: Callable[[SignedTransaction], None]) -> None:
        """``hook(tx)`` for every transaction of our own our mempool admitted (and that goes out on ``/tx``)."""
        self._sent_tx_hooks.append(hook)

    def status(self) -> dict[str, int | float | bool | str]:
        chain = self.chain
        return {
            "chain": self.chain_id.hex()[:16],
            "height": chain.height if chain is not None else 0,
            "address": self.keys.account.address.hex(),
            "roles": ",".join(sorted(self.roles)),
            "syncing": bool(self.driver and self.driver.syncing),
        }

    # ------------------------------------------------------------ transactions

    def submit_transaction(self, stx: SignedTransaction) -> bytes:
        """Admit ``stx`` to our mempool and gossip it; raises MempoolRejected with the reason."""
        assert self.mempool is not None and self.driver is not None, "node not running"
        tx_hash = self._admit(stx)
        encoded = stx.encode()
        self._tx_pacer.add(encoded)
        self._tx_pending.set()
        self._own_txs.sent(tx_hash, encoded, self.chain.height if self.chain is not None else 0)
        for hook in self._sent_tx_hooks:
            hook(stx)
        return tx_hash

    async def _send_tx_gossip(self) -> None:
        """Our transactions out on ``/tx``, batched and paced (:mod:`p2pgpu.txgossip`)."""
        assert self.driver is not None
        pacer = self._tx_pacer
        while True:
            await self._tx_pending.wait()
            self._tx_pending = trio.Event()
            due = pacer.due_at()
            if due is None:
                continue
            await trio.sleep_until(max(due, trio.current_time()))  # always a checkpoint: same-tick txs join
            messages = pacer.take(trio.current_time())
            if messages:
                self._note_if_unfollowed(self.topics.tx)
            for message in messages:
                self.driver.publish_nowait(self.topics.tx, message)

    def _note_if_unfollowed(self, topic: str) -> None:
        """A node that does not follow a topic it publishes on (a client's ``/tx`` and ``/task``) reaches the
        nodes that act on it only through peers that follow it: count it when there are none, and say so at
        most once a minute per topic, instead of letting what it sends go unseen (``OwnTxWatch`` sends
        transactions again meanwhile; an announce no provider sees draws no bids, and its task expires)."""
        if topic == self.topics.tx:
            follows, name, hint = self.follows_txs, "tx", "connect to a validator, or to a node with " \
                                                            "[consensus] relay_txs = true"
        elif topic == self.topics.task:
            follows, name, hint = self.follows_announces, "task", "connect to a provider, or to a client with " \
                                                                  "[client] relay_announces = true"
        else:
            return
        if follows or self.network is None or self.network.gossip.topic_peers(topic):
            return
        self.counters.published_without_followers[name] += 1
        now = trio.current_time()
        if now >= self._next_no_followers_warning.get(name, -math.inf):
            self._next_no_followers_warning[name] = now + 60.0
            log(logger, logging.WARNING, f"{name}_no_followers", peers=len(self.network.connected_peers()),
                hint=f"no connected peer follows /{name}: {hint}")

    def _admit(self, stx: SignedTransaction, verified: VerifiedTransaction | None = None) -> bytes:
        """Add ``stx`` to the mempool (raises MempoolRejected), count it, and wake a waiting proposer.

        ``verified``: the same transaction with its signature checked already (by the ``/tx`` validator).
        """
        assert self.mempool is not None
        tx_hash = self.mempool.add(stx) if verified is None else self.mempool.add_verified(verified)
        self.counters.tx_admitted += 1
        if self.driver is not None:
            self.driver.notify_txs_available()
        return tx_hash

    def publish(self, topic: str, data: bytes) -> None:
        """Gossip ``data`` on one of our topics (queued; the publisher task sends it)."""
        assert self.driver is not None, "node not running"
        self._note_if_unfollowed(topic)
        self.driver.publish_nowait(topic, data)

    @property
    def follows_votes(self) -> bool:
        """Whether this node takes part in ``/consensus`` gossip; otherwise it follows ``/block`` only.

        Proposals and votes are most of the gossip, and every subscriber
        decodes, checks and forwards each one. A client or provider needs
        only the finalized blocks: leaving the votes to the validators cut the
        proposal-to-commit time of a 7-process devnet on 2 cores from ~300
        to ~140 ms (median), and the non-validators still see each block
        within one gossip hop of its proposer's commit.
        """
        return "validator" in self.roles or self.config.consensus.relay_votes

    @property
    def follows_txs(self) -> bool:
        """Whether this node receives ``/tx`` gossip; otherwise it only publishes its own transactions there.

        Every follower of ``/tx`` decodes, checks and relays every
        transaction of the network, while only proposers build blocks from
        them: a client or provider learns what it needs of others'
        transactions from the finalized blocks, and of its own from its own
        mempool. Publishing to a topic it does not follow goes to ``degree``
        peers that do (gossipsub's fanout). Under the load bench the four
        market nodes each received ~170 ``/tx`` messages per 100 tasks, about
        four copies of each.
        """
        return bool(self.roles & {"validator", "observer"}) or self.config.consensus.relay_txs

    @property
    def follows_market(self) -> bool:
        """Whether this node takes part in the market's gossip: ``/advert``, and ``/task`` and ``/bid`` as
        :attr:`follows_announces` and :attr:`follows_bids` say.

        Announces and adverts are consumed by providers (announces), clients
        (adverts) and observers; a validator-only node has no use for them, yet
        decoded, checked and forwarded every one -- several messages per task,
        on the nodes that also run consensus.
        """
        return bool(self.roles & {"provider", "client", "observer"})

    @property
    def follows_announces(self) -> bool:
        """Whether this node receives ``/task`` gossip: providers (who bid on announces), observers, and clients
        with ``[client] relay_announces``; a client otherwise publishes its own announces to peers that follow
        the topic (gossipsub's fanout), as it does its transactions on ``/tx``.

        Only providers act on an announce; a client followed ``/task`` to keep
        its mesh connected, and so received and relayed every other client's
        announces: under the load bench about two copies of every announce
        per client, a third of a client's gossip.
        """
        return bool(self.roles & {"provider", "observer"}) or (
            "client" in self.roles and self.config.client.relay_announces)

    @property
    def follows_bids(self) -> bool:
        """Whether this node receives ``/bid`` gossip: clients (whose bids come there when a bid link cannot
        take them, :mod:`p2pgpu.bidlink`) and observers. A provider has no use for its competitors' bids."""
        return bool(self.roles & {"client", "observer"})

    def _from_self(self, peer: str) -> bool:
        """Our own publications pass our validators too, and must never be held back by them."""
        return self.network is not None and peer == self.network.peer_id

    def _validate_tx(self, peer: str, data: bytes) -> Verdict[tuple[VerifiedTransaction, ...]]:
        """A ``/tx`` message: one transaction or a batch (:mod:`p2pgpu.txgossip`), each checked by :meth:`_check_tx`.

        A transaction that does not decode or is not validly signed is its
        publisher's making (no relay could have changed it): the message is
        rejected. One that our head says can never execute, or over its
        sender's rate, is charged to the peer that published it and left out,
        but it does not take the batch's other transactions down with it --
        whether it can execute depends on the head, and an honest node's batch
        must not be lost for one transaction a lagging peer judges wrongly.
        Accepted with the transactions worth admitting; ignored if there are none.
        """
        try:
            stxs = decode_tx_gossip(data)
        except DecodeError as exc:
            return reject(f"decode:{exc.path.split('.')[0] or 'tx'}")
        fresh: list[VerifiedTransaction] = []
        charged: str | None = None
        ignored: str | None = None
        for stx in stxs:
            verdict = self._check_tx(peer, stx)
            if verdict.accepted:
                assert verdict.record is not None
                fresh.append(verdict.record)
            elif verdict.outcome is Outcome.IGNORE:
                ignored = ignored or verdict.reason
            elif verdict.reason == BAD_SIGNATURE:
                return verdict
            else:
                charged = charged or verdict.reason
        if not fresh:
            return reject(charged) if charged is not None else ignore(ignored or "empty")
        if charged is not None and self.network is not None:
            self.network.report_rejection(self.topics.tx, peer, charged)
        return accept(tuple(fresh))

    def _check_tx(self, peer: str, stx: SignedTransaction) -> Verdict[Any]:
        """Signature, whether our head could execute it, and its sender's rate; accepted verified."""
        try:
            verified = verify_transaction(self.chain_id, stx)
        except ex.InvalidSignature:
            return reject(BAD_SIGNATURE)
        if self._from_self(peer):
            return accept(verified)  # our own publications are in our mempool already, and must still go out
        if self.chain is not None:
            # Validly signed but unable to execute on our head: a sender that cannot pay the fee, or a nonce
            # already used, or one so far ahead that no mempool holds it. Every mempool would refuse it;
            # forwarding it cost every node for nothing (a flood of them stalled the chain).
            body = stx.body
            account = self.chain.state.get_account(body.sender)  # type: ignore[attr-defined]
            if account.balance < body.fee:  # type: ignore[attr-defined]
                return self._own_doing(peer, "unfunded")
            if body.nonce < account.nonce:  # type: ignore[attr-defined]
                return ignore("stale_nonce")  # a late copy of a transaction that executed: nobody's fault
            gap = self.mempool.config.max_future_gap if self.mempool is not None else MempoolConfig().max_future_gap
            ahead = body.nonce - account.nonce  # type: ignore[attr-defined]
            if ahead > gap:
                return self._nonce_too_far(peer, ahead, gap)
        if self.mempool is not None and stx.tx_hash() in self.mempool:
            return ignore("known")
        # Counted last, so only a message we would otherwise relay takes a token: a forged or stale copy in
        # someone's name cannot use up that sender's allowance.
        over = self._over_rate(self.tx_limiter, stx.body.sender, peer, "sender_rate")  # type: ignore[attr-defined]
        return over if over is not None else accept(verified)

    def _nonce_too_far(self, peer: str, ahead: int, gap: int) -> Verdict[VerifiedTransaction]:
        """A nonce ``ahead`` of its account's next one on our head, beyond every mempool's ``gap``: never relayed.

        Charged to its publisher (``_own_doing``) only beyond ``gap`` plus :data:`NONCE_LAG_SLACK`: an
        honest publisher's head may be a block or two ahead of ours, its account's nonce advanced by as
        many transactions as it had pending (at most the mempool's per-sender limit per block), so a nonce
        just past the window on our head may be inside it on the publisher's.
        """
        if ahead > gap + NONCE_LAG_SLACK:
            return self._own_doing(peer, "nonce_too_far")
        return ignore("nonce_too_far")

    def _own_doing(self, peer: str, reason: str) -> Verdict:
        """A message our head says can never be used: ignored when relayed (the relay's head may differ from
        ours), charged when the peer that sent it also published it -- unless we are the one behind."""
        behind = self.driver is not None and self.driver.behind
        if not behind and message_origin() == peer:
            return reject(f"{reason}_published")
        return ignore(reason)

    def _over_rate(self, limiter: KeyedRateLimiter[bytes], key: bytes, peer: str, reason: str) -> Verdict[Any] | None:
        """None if ``key`` (a sender, a client) is within ``limiter``'s rate; else the verdict for its message.

        Over the limit, a message is not relayed; it is charged to the peer that sent it when that peer also
        published it (``message_origin()``): a validly signed message is its signer's doing, and an honest
        node publishes its own at a rate the limits are set far above. A relay is not charged: it may have
        counted the same messages over a different window.
        """
        if limiter.allow(key):
            return None
        if message_origin() == peer:
            return reject(f"{reason}_published")
        return ignore(reason)

    def _validate_consensus(self, peer: str, data: bytes) -> Verdict[Any]:
        """Schema, and who signed as far as our head can tell (see ``validate_consensus_message``)."""
        if self._from_self(peer) or self.chain is None:
            return validate_consensus_message(peer, data)
        return validate_consensus_message(peer, data, state=self.chain.state, verifier=self.verifier)

    def _validate_block(self, peer: str, data: bytes) -> Verdict[FinalizedBlock]:
        """A finalized block is relayed only if its certificate proves it, or it is our own.

        The certificate is checked against the committee of the block's height
        (one aggregate BLS check, cached for the engine); a block too far ahead
        for us to know that committee is ignored: consensus messages tell a
        node it is behind, and sync fetches the blocks.
        """
        try:
            fb = FinalizedBlock.from_bytes(data)
        except DecodeError as exc:
            return reject(f"decode:{exc.path.split('.')[0] or 'block'}")
        if self._from_self(peer) or self.chain is None:
            return accept(fb)
        state = self.chain.state
        height = fb.block.height
        if height <= state.height:
            return ignore("old")
        problem = certificate_problem(state, fb, self.verifier)
        if problem == UNKNOWN_COMMITTEE:
            return ignore("unknown_committee")
        if problem is not None:
            return reject(problem)
        return accept(fb)

    async def _consume_txs(
            self, channel: trio.MemoryReceiveChannel[GossipMessage[tuple[VerifiedTransaction, ...]]]) -> None:
        """``/tx`` gossip into the mempool, as the validator decoded and verified it (no second signature check)."""
        async for msg in channel:
            if msg.local or msg.record is None:
                continue
            for verified in msg.record:
                try:
                    self._admit(verified, verified)
                except MempoolRejected as exc:
                    self.counters.tx_rejected[exc.reason.value] += 1
                    continue
                for hook in self._tx_hooks:
                    hook(verified)

    # ------------------------------------------------------------ lifecycle

    def _on_commit(self, fb: FinalizedBlock, state: State) -> None:
        if self.tx_sender is not None:
            self.tx_sender.on_block(state)
        if self.mempool is not None and len(self._own_txs):
            again = self._own_txs.due(state.height, self.mempool.__contains__)
            for encoded in again:
                self._tx_pacer.add(encoded)
            if again:
                self.counters.tx_resent += len(again)
                self._tx_pending.set()
        for hook in list(self._commit_hooks):
            hook(fb, state)

    def _make_engine(self, chain: Chain, mempool: Mempool) -> ConsensusEngine:
        last_cert = chain.get_finalized(chain.height).certificate if chain.height > 0 else None
        signer = None
        if "validator" in self.roles and self.keys.validator is not None:
            guard = SignerGuard(self.chain_id, Path(self.config.data_dir) / "signer-guard.bin")
            signer = ValidatorSigner(address=self.keys.account.address, key=self.keys.validator, guard=guard)
        return ConsensusEngine(
            engine_config_from(self.config), chain.state, last_cert, signer=signer, txs=mempool,
            verifier=self.verifier,
        )

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        data_dir = Path(self.config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        # A provider's kernel workers start first: their TensorFlow import (seconds of CPU) overlaps opening
        # the chain, joining the network and the first blocks, instead of starting once the node is up.
        # (Not earlier, at process start: a worker shares its node's CPU share -- one session, one
        # scheduler autogroup -- and would slow the node's own start-up while its peers are already voting.)
        self.kernel_runtime = start_provider_runtime(self.config)
        try:
            chain = await trio.to_thread.run_sync(lambda: Chain.open(data_dir / "chain", self.genesis))
        except BaseException:
            self._close_kernel_runtime()
            raise
        self.chain = chain
        try:
            self.mempool = Mempool(chain.state)
            self.tx_sender = TxSender(self.keys.account, self.chain_id, self.submit_transaction, chain.state)
            log(logger, logging.INFO, "node_starting", chain=self.chain_id.hex()[:16], height=chain.height,
                roles=",".join(sorted(self.roles)), address=self.keys.account.address.hex())
            async with open_network(net_config_from(self.config), self.keys.account.seed, status=self.status) as net:
                self.network = net
                tx_ch = await net.subscribe(self.topics.tx, self._validate_tx) if self.follows_txs else None
                consensus_ch = None
                if self.follows_votes:
                    consensus_ch = await net.subscribe(self.topics.consensus, self._validate_consensus,
                                                       max_message_size=MAX_GOSSIP_BYTES)
                block_ch = await net.subscribe(self.topics.block, self._validate_block,
                                               max_message_size=MAX_GOSSIP_BYTES)
                sync_handler = make_sync_handler(chain, timeout=self.config.network.request_timeout)
                net.set_stream_handler(SYNC_PROTOCOL, sync_handler, penalize_bad_requests=True)
                engine = self._make_engine(chain, self.mempool)
                self.driver = ConsensusDriver(
                    engine, chain, self.mempool, net, self.topics, self.keys.account, on_commit=self._on_commit,
                    send_tx=self.tx_sender.send,
                )
                self.chain_guard = ChainGuard(net, self.chain_id.hex()[:16])
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.chain_guard.run)
                    nursery.start_soon(self.driver.run, consensus_ch, block_ch)
                    if tx_ch is not None:
                        nursery.start_soon(self._consume_txs, tx_ch)
                    nursery.start_soon(self._send_tx_gossip)
                    await self.driver.started.wait()
                    await self._start_roles(nursery)
                    self.ready.set()
                    log(logger, logging.INFO, "node_started", peer=net.peer_id, addrs=",".join(net.addrs))
                    task_status.started(self)
        finally:
            chain.close()
            self._close_kernel_runtime()
            log(logger, logging.INFO, "node_stopped")

    def _close_kernel_runtime(self) -> None:
        """Stop the kernel workers (the provider role normally has already; closing twice does nothing)."""
        if self.kernel_runtime is not None:
            self.kernel_runtime.close()

    async def _start_roles(self, nursery: trio.Nursery) -> None:
        """Blob store, data plane and the market roles (client, provider, verifier duty)."""
        from p2pgpu.blobstore import BlobStore
        from p2pgpu.dataplane import DataPlane
        from p2pgpu.market.messages import MAX_ADVERT_MESSAGE_BYTES
        from p2pgpu.ports import RolesNode
        from p2pgpu.roles import MarketRoles
        from p2pgpu.sealed import EncryptionKey
        from p2pgpu.sealedstore import SealedStore

        net = self.network
        assert net is not None
        store = await trio.to_thread.run_sync(lambda: BlobStore(Path(self.config.data_dir) / "blobs"))
        key = EncryptionKey.from_account_key(self.keys.account)
        sealed = await trio.to_thread.run_sync(lambda: SealedStore(store, key))
        dataplane = DataPlane(net, store, sealed=sealed)
        roles = MarketRoles(cast(RolesNode, self), store, dataplane)  # run() has set every Optional port it uses
        dataplane.serve(roles.entitled, roles.served)
        roles.streams.serve()
        self.add_commit_hook(roles.streams.on_block)
        task_ch = bid_ch = advert_ch = None
        if self.follows_market:
            if self.follows_announces:
                task_ch = await net.subscribe(self.topics.task, roles.validate_task)
            if self.follows_bids:
                bid_ch = await net.subscribe(self.topics.bid, roles.validate_bid)
            advert_ch = await net.subscribe(self.topics.advert, roles.validate_advert,
                                            max_message_size=MAX_ADVERT_MESSAGE_BYTES)
        self.add_commit_hook(roles.on_block)
        self.add_tx_hook(roles.on_pending_tx)
        self.add_sent_tx_hook(roles.on_sent_tx)
        await nursery.start(roles.run, task_ch, bid_ch, advert_ch)
        self.roles_driver = roles
        self.extra_metrics = roles.metric_families
        if "client" in self.roles:
            self.client_role = roles
