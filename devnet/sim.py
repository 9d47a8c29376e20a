"""A deterministic network simulator: many consensus engines, their ledgers and stores, on virtual time.

Everything that varies comes from one ``random.Random(seed)``, and events
run from a heap keyed by ``(time, seq)``, so the same seed gives the same run
(the same blocks, at the same virtual times). Virtual time costs nothing:
timeouts of hundreds of milliseconds pass instantly.

What is real: the engines (:mod:`ledger.consensus`), BLS signatures, block
building and execution, mempools, the crash-safe :class:`ChainStore` and the
slashing-protection file (in a temporary directory per node). A crash drops
a node's in-memory state and in-flight events; a restart reopens its store,
replays its chain from the last snapshot and reloads its guard file, exactly
as a node process would.

What is modelled: gossip (flooding over a mesh with a seen-cache, as
gossipsub does, so a message reaches everyone a path reaches), links with
seeded latency, jitter (reordering), loss and duplication, partitions that
heal, the ``/p2pgpu/sync/1`` request/response, and byzantine validators:

* ``SILENT``: never sends anything;
* ``EQUIVOCATE``: signs a second, conflicting vote for every vote and sends
  each half of its peers a different one;
* ``SPLIT_PROPOSAL``: as proposer, signs two different blocks and sends each
  half of its peers a different one.

Speed (a hundred validators on two cores) without changing a single
outcome, which ``SimConfig(shared_execution=False, elide_duplicates=False)``
lets a test confirm event for event:

* Engines share one :class:`~devnet.shared_exec.SharedComputations`, so
  each block is executed (signatures, state root) and hashed, and each
  proposer drawn, once per process, not once per node; and they share one
  :class:`~ledger.consensus.SignatureVerifier`.
* A gossip copy that is sure to arrive as a duplicate is not put on the
  event heap: one whose receiver has already seen the message, or that
  arrives after another copy already on its way. Flooding over a mesh of
  degree d sends each message d times to each node, and all but the first
  arrival would be popped only to be dropped. The random draws of the send
  still happen, so the run is the same. A duplicate is sure only while the
  receiver keeps its seen-cache: a restart clears it, so the copies set
  aside for that node and still in the future are put back on the heap with
  their original (time, sequence) keys, exactly as if never taken off.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from devnet.shared_exec import SharedComputations
from ledger.blocks import FinalizedBlock
from ledger.codec import Record, decode
from ledger.consensus import (
    CONSENSUS_MESSAGES,
    BlocksSynced,
    BlockComputations,
    Broadcast,
    Commit,
    ConsensusConfig,
    ConsensusEngine,
    MessageReceived,
    Proposal,
    RejectMessage,
    ReportEvidence,
    RequestSync,
    ScheduleSync,
    ScheduleTimeout,
    SignatureVerifier,
    SignedProposal,
    TxsAvailable,
    ValidatorSigner,
    VoteMessage,
    make_evidence_tx,
    proposal_signing_bytes,
)
from ledger.devtools import DevNetwork, dev_validator_key, sign_vote
from ledger.genesis import initial_state
from ledger.keys import AccountKey, ValidatorKey
from ledger.mempool import Mempool, MempoolRejected
from ledger.signer_guard import SignedPosition, SignerGuard, SignStep
from ledger.state import State
from ledger.store import ChainStore
from ledger.transactions import SignedTransaction
from ledger.transition import apply_block, build_block
from ledger.votes import NIL_BLOCK, Vote

__all__ = ["Behaviour", "LinkConfig", "SimConfig", "SimNode", "SimulatedCrash", "Simulation", "percentile"]


_SEEN = -math.inf  # one shared object: arrival rows hold it for every node that has seen a message


class Behaviour(enum.Enum):
    HONEST = "honest"
    SILENT = "silent"
    EQUIVOCATE = "equivocate"
    SPLIT_PROPOSAL = "split_proposal"


class SimulatedCrash(Exception):
    """Raised from a hook inside a node to kill it at that exact instant."""


@dataclass(frozen=True, slots=True)
class LinkConfig:
    latency_s: float = 0.010
    jitter_s: float = 0.002
    loss: float = 0.0
    duplicate: float = 0.0


@dataclass(frozen=True, slots=True)
class SimConfig:
    seed: int = 0
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    mesh_degree: int | None = None  # None: everyone is everyone's gossip peer
    fsync: bool = True
    snapshot_every: int = 8
    sync_batch: int = 64
    evidence_fee: int = 1
    # speed-ups that change no outcome (see the module docstring); off only to check exactly that
    shared_execution: bool = True
    elide_duplicates: bool = True


class _PermissiveGuard(SignerGuard):
    """A byzantine validator's guard: signs anything (what slashing protection exists to prevent)."""

    def approve(self, height: int, round_: int, step: SignStep, block_hash: bytes) -> None:
        self._last = SignedPosition(chain_id=self.chain_id, height=height, round=round_, step=int(step),
                                    block_hash=block_hash)


@dataclass
class SimNode:
    name: str
    address: bytes
    account: AccountKey
    bls: ValidatorKey | None
    data_dir: Path
    behaviour: Behaviour = Behaviour.HONEST
    alive: bool = False
    incarnation: int = 0
    engine: ConsensusEngine | None = None
    mempool: Mempool | None = None
    store: ChainStore | None = None
    guard: SignerGuard | None = None
    peers: list[str] = field(default_factory=list)
    seen: set[bytes] = field(default_factory=set)
    committed: dict[int, bytes] = field(default_factory=dict)
    commit_time: dict[int, float] = field(default_factory=dict)
    crash_on_persist: Callable[[SignedPosition], bool] | None = None
    rejected: int = 0
    sent_votes: dict[tuple[int, int, int], set[bytes]] = field(default_factory=dict)  # what it ever signed and sent
    index: int = 0  # position in the simulation's per-message arrival rows
    # gossip copies set aside as sure duplicates by the general send path (with loss, duplication or
    # partitions), kept until their time passes for a restart to put back, flat in strides of
    # ELIDED_STRIDE: arrival time, sequence number, sender, message id, message. Flat, because a tuple per
    # copy would be a long-lived container per copy, and those are what the cyclic GC walks.
    elided: list[Any] = field(default_factory=list)
    elided_limit: int = 4096

    ELIDED_STRIDE = 5

    def elide(self, at: float, seq: int, src: str, msg_id: bytes, message: Record, now: float) -> None:
        el = self.elided
        el += (at, seq, src, msg_id, message)
        if len(el) > self.elided_limit:
            self.prune_elided(now)

    def prune_elided(self, now: float) -> None:
        """Forget set-aside copies whose time has passed (a restart could no longer bring them back).

        Copies are appended in the order they were sent, so the past ones are mostly a prefix; dropping
        the prefix up to the first one still ahead is enough (any past ones after it go next time).
        """
        el, k = self.elided, self.ELIDED_STRIDE
        n, i = len(el), 0
        while i < n and el[i] < now:
            i += k
        del el[:i]
        self.elided_limit = max(4096, 2 * len(el))

    def elided_copies(self) -> Iterable[tuple[float, int, str, tuple[Any, ...]]]:
        """The set-aside copies as heap entries."""
        el, k = self.elided, self.ELIDED_STRIDE
        for i in range(0, len(el), k):
            yield el[i], el[i + 1], "msg", (self.name, el[i + 2], el[i + 3], el[i + 4])

    @property
    def height(self) -> int:
        return self.engine.state.height if self.engine is not None else max(self.committed, default=0)

    @property
    def state(self) -> State:
        assert self.engine is not None
        return self.engine.state


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


class Simulation:
    """Run ``names`` (identities of ``network``) as nodes; ``behaviours`` marks the byzantine ones."""

    def __init__(
        self,
        network: DevNetwork,
        base_dir: str | Path,
        config: SimConfig = SimConfig(),
        *,
        names: Sequence[str] | None = None,
        behaviours: dict[str, Behaviour] | None = None,
        verifier: SignatureVerifier | None = None,
    ) -> None:
        self.network = network
        self.config = config
        self.rng = random.Random(config.seed)
        self.base_dir = Path(base_dir)
        self.genesis_state = initial_state(network.genesis)
        self.verifier = verifier if verifier is not None else SignatureVerifier()
        self.computations = SharedComputations() if config.shared_execution else BlockComputations()
        self.now = 0.0
        self._heap: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._seq = 0
        # gossip floods with copies set aside (see ``_flood``), while any of their copies is in the future
        self._floods: deque[tuple[float, str, str | None, tuple[str, ...], bytes, Record, int, list[float], list[int]]] = deque()
        self._done: tuple[float, float] = (0.0, 0)  # key of the last event run ((t, inf): all up to t)
        self.partitions: list[tuple[float, float, list[frozenset[str]]]] = []
        self.proposal_time: dict[int, float] = {}
        self.delivered = 0
        self.dropped = 0
        self.elided = 0  # gossip copies set aside as sure duplicates (SimConfig.elide_duplicates)
        self.restored = 0  # of those, put back on the heap because their receiver restarted
        self.commits = 0  # a change counter, so ``run`` re-checks heights only when one moved
        behaviours = behaviours or {}
        if names is None:
            names = [n for n, i in network.identities.items() if i.bls is not None]
        self.nodes: dict[str, SimNode] = {}
        for name in names:
            ident = network.identities[name]
            bls = ident.bls if ident.bls is not None else dev_validator_key(name)
            self.nodes[name] = SimNode(
                name=name, address=ident.address, account=ident.account, bls=bls,
                data_dir=self.base_dir / name, behaviour=behaviours.get(name, Behaviour.HONEST),
            )
        self._build_mesh()
        self._names = list(self.nodes)
        self._index = {name: i for i, name in enumerate(self._names)}
        # per (peer list, peer to skip): the flood's targets, as names and as indices
        self._targets: dict[tuple[tuple[str, ...], str | None], tuple[tuple[str, ...], tuple[int, ...]]] = {}
        for name, i in self._index.items():
            self.nodes[name].index = i
        # per gossip message id, per node (by index): when the earliest copy on its way arrives, -inf once the
        # node has seen it, inf otherwise; so "would a copy arriving at t be a duplicate?" is one list read
        self._arrivals: dict[bytes, list[float]] = {}

    # ------------------------------------------------------------ topology

    def _build_mesh(self) -> None:
        names = list(self.nodes)
        d = self.config.mesh_degree
        if d is None or d >= len(names) - 1:
            for n in names:
                self.nodes[n].peers = [m for m in names if m != n]
            return
        # a ring (connectivity) plus random chords up to degree d
        links: dict[str, list[str]] = {n: [] for n in names}

        def connect(a: str, b: str) -> None:
            if a != b and b not in links[a]:
                links[a].append(b)
                links[b].append(a)

        for i, n in enumerate(names):
            connect(n, names[(i + 1) % len(names)])
        for n in names:
            while len(links[n]) < d:
                connect(n, self.rng.choice(names))
        for n in names:
            self.nodes[n].peers = links[n]

    def honest(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.behaviour == Behaviour.HONEST]

    # ------------------------------------------------------------ scheduling

    def _push(self, at: float, kind: str, *data: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, data))

    def at(self, t: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at virtual time ``t`` (fault injection, transaction submission)."""
        self._push(t, "call", fn)

    def partition(self, groups: Iterable[Iterable[str]], start: float, end: float) -> None:
        self.partitions.append((start, end, [frozenset(g) for g in groups]))

    def crash_at(self, name: str, t: float) -> None:
        self.at(t, lambda: self.crash(name))

    def restart_at(self, name: str, t: float) -> None:
        self.at(t, lambda: self.restart(name))

    def _separated(self, a: str, b: str, t: float) -> bool:
        for start, end, groups in self.partitions:
            if start <= t < end:
                ga = next((g for g in groups if a in g), None)
                if ga is None or b not in ga:
                    return True
        return False

    def _send(self, src: str, dst: str, kind: str, *data: Any, reliable: bool = False) -> None:
        link = self.config.link
        if self.partitions and self._separated(src, dst, self.now):
            self.dropped += 1
            return
        if not reliable and link.loss and self.rng.random() < link.loss:
            self.dropped += 1
            return
        delay = link.latency_s + self.rng.random() * link.jitter_s
        self._deliver(self.now + delay, kind, dst, src, data)
        if not reliable and link.duplicate and self.rng.random() < link.duplicate:
            self._deliver(self.now + delay + self.rng.random() * link.latency_s, kind, dst, src, data)

    def _deliver(self, at: float, kind: str, dst: str, src: str, data: tuple[Any, ...]) -> None:
        """Schedule an arrival, or set it aside if it is a gossip copy sure to arrive as a duplicate."""
        self._seq += 1
        item = (at, self._seq, kind, (dst, src, *data))
        if kind == "msg" and self.config.elide_duplicates:
            node = self.nodes[dst]
            msg_id = data[0]
            row = self._arrival_row(msg_id)
            if row[node.index] <= at:  # seen (-inf), or an earlier copy (lower sequence) on its way
                node.elide(at, self._seq, src, msg_id, data[1], self.now)
                self.elided += 1
                return
            row[node.index] = at
        heapq.heappush(self._heap, item)

    def _arrival_row(self, msg_id: bytes) -> list[float]:
        row = self._arrivals.get(msg_id)
        if row is None:
            row = self._arrivals[msg_id] = [math.inf] * len(self._index)
        return row

    def _restore_elided(self, node: SimNode) -> None:
        """The node forgot what it had seen (a restart): copies set aside for it may now be first arrivals.

        Each goes back on the heap under its original key if that key is still ahead of the last event
        run; earlier ones were, as far as the run is concerned, already delivered (and dropped).
        """
        done = self._done
        for item in node.elided_copies():
            if (item[0], item[1]) > done:
                heapq.heappush(self._heap, item)
                self.restored += 1
        node.elided = []
        for row in self._arrivals.values():
            row[node.index] = math.inf
        for last_at, src, skip, peers, msg_id, message, seq, ats, queued in self._floods:
            if last_at < done[0]:
                continue
            j = 0
            for peer in peers:
                if peer == skip:
                    continue
                seq += 1
                at = ats[j]
                j += 1
                if peer == node.name and seq not in queued and (at, seq) > done:
                    heapq.heappush(self._heap, (at, seq, "msg", (peer, src, msg_id, message)))
                    queued.append(seq)
                    self.restored += 1

    def _elided_keys(self) -> Iterable[tuple[float, int]]:
        """(time, sequence) of every copy set aside and not put back."""
        for n in self.nodes.values():
            for e in n.elided_copies():
                yield e[0], e[1]
        for _last_at, _src, skip, peers, _msg_id, _message, seq, ats, queued in self._floods:
            j = 0
            for peer in peers:
                if peer == skip:
                    continue
                seq += 1
                if seq not in queued:
                    yield ats[j], seq
                j += 1

    def _run_out_elided(self, until: float | None) -> None:
        """The heap ran dry: advance the clock over the set-aside copies, as if they had been run (and dropped)."""
        ahead = [k for k in self._elided_keys() if k > self._done]
        past = [k for k in ahead if until is None or k[0] <= until]
        if past:
            self._done = max(past)
            self.now = self._done[0]
        if until is not None and len(past) < len(ahead):
            self._done = max(self._done, (until, math.inf))
            self.now = until

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for name in self.nodes:
            self.restart(name)

    def _make_guard(self, node: SimNode) -> SignerGuard:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        chain_id = self.genesis_state.chain_id
        if node.behaviour != Behaviour.HONEST:
            return _PermissiveGuard(chain_id)
        incarnation = node.incarnation

        def hook(pos: SignedPosition) -> None:
            if node.incarnation == incarnation and node.crash_on_persist is not None and node.crash_on_persist(pos):
                node.crash_on_persist = None
                raise SimulatedCrash(f"{node.name} killed after persisting {pos.position}")

        return SignerGuard(chain_id, node.data_dir / "signer_guard", fsync=self.config.fsync, on_persisted=hook)

    def restart(self, name: str) -> None:
        """(Re)start a node from its data dir: store, snapshot + block replay, guard file, fresh engine."""
        node = self.nodes[name]
        if node.alive:
            return
        node.incarnation += 1
        node.seen = set()
        self._restore_elided(node)
        node.alive = True
        self.commits += 1
        if node.behaviour == Behaviour.SILENT:
            return
        node.data_dir.mkdir(parents=True, exist_ok=True)
        store = ChainStore.open(node.data_dir / "chain")
        state, last_cert = self._load_chain(store)
        node.store = store
        node.guard = self._make_guard(node)
        node.mempool = Mempool(state)
        signer = ValidatorSigner(node.address, node.bls, node.guard) if node.bls is not None else None
        node.engine = ConsensusEngine(
            self.config.consensus, state, last_cert, signer=signer, txs=node.mempool, verifier=self.verifier,
            computations=self.computations,
        )
        self._run_node(node, lambda: node.engine.start(now_ms=self._now_ms()))  # type: ignore[union-attr]

    def _load_chain(self, store: ChainStore) -> tuple[State, Any]:
        loaded = store.load()
        state = State.decode(loaded.snapshot.data) if loaded.snapshot is not None else self.genesis_state
        last_cert = None
        if store.head_height is not None:
            last_cert = decode(FinalizedBlock, store.get_block(store.head_height)).certificate
        for _height, raw in loaded.blocks:
            fb = decode(FinalizedBlock, raw)
            # our own finalized blocks: checked when they were committed
            state = apply_block(state, fb.block, check_signatures=False, check_last_commit=False)
        return state, last_cert

    def crash(self, name: str) -> None:
        node = self.nodes[name]
        if not node.alive:
            return
        node.alive = False
        self.commits += 1
        node.incarnation += 1
        node.engine = None
        node.mempool = None
        node.guard = None
        if node.store is not None:
            node.store.close()
            node.store = None

    def close(self) -> None:
        for node in self.nodes.values():
            if node.store is not None:
                node.store.close()
                node.store = None

    # ------------------------------------------------------------ running

    def _now_ms(self) -> int:
        return int(self.now * 1000)

    def run(self, *, until: float | None = None, until_height: int | None = None, max_events: int = 10_000_000) -> None:
        """Process events until virtual time ``until`` or every honest live node reaches ``until_height``."""
        checked = -1
        heap = self._heap
        pop = heapq.heappop
        for _ in range(max_events):
            if until_height is not None and checked != self.commits:
                checked = self.commits
                if self.min_honest_height() >= until_height:
                    return
            if not heap:
                self._run_out_elided(until)
                return
            if until is not None and heap[0][0] > until:
                self.now = until
                self._done = max(self._done, (until, math.inf))
                return
            t, seq, kind, data = pop(heap)
            self.now = t
            self._done = (t, seq)
            if kind == "msg":
                self._on_gossip(data)
            else:
                self._dispatch(kind, data)
        raise RuntimeError("simulation did not finish within max_events")

    def _on_gossip(self, data: tuple[Any, ...]) -> None:
        dst, src, msg_id, message = data
        node = self.nodes[dst]
        if msg_id in node.seen:
            return
        row = self._arrival_row(msg_id)
        row[node.index] = math.inf  # this copy has arrived
        if not node.alive or node.engine is None:
            return
        node.seen.add(msg_id)
        row[node.index] = _SEEN
        self.delivered += 1
        actions = self._handle(node, MessageReceived(message, src))
        # withheld only if found bad itself: handling it may also report an earlier sender's forged vote
        if actions is not None and not any(isinstance(a, RejectMessage) and a.peer == src for a in actions):
            self._flood(dst, node.peers, src, msg_id, message)

    def _flood(self, src: str, peers: Iterable[str], skip: str | None, msg_id: bytes, message: Record) -> None:
        """``_send(src, peer, "msg", msg_id, message)`` to each peer but ``skip``: the same draws, inlined.

        This loop runs once per gossip copy (a hundred nodes times the mesh degree per message), so the
        common case (no partition, loss or duplication; a copy sure to be a duplicate) costs no calls.
        """
        link = self.config.link
        if self.partitions or link.loss or link.duplicate or not self.config.elide_duplicates:
            for peer in peers:
                if peer != skip:
                    self._send(src, peer, "msg", msg_id, message)
            return
        rand = self.rng.random
        now, latency, jitter = self.now, link.latency_s, link.jitter_s
        key = (tuple(peers), skip)
        targets = self._targets.get(key)
        if targets is None:
            names = tuple(p for p in key[0] if p != skip)
            targets = self._targets[key] = (names, tuple(self._index[p] for p in names))
        names, indices = targets
        # the draws _send would make, in the same order: one per copy
        ats = [now + (latency + rand() * jitter) for _ in indices]
        heap, push, row = self._heap, heapq.heappush, self._arrival_row(msg_id)
        queued: list[int] = []
        seq0 = seq = self._seq
        for i, at in zip(indices, ats):
            seq += 1
            if row[i] > at:  # not seen (-inf), and no copy on its way arrives earlier
                row[i] = at
                push(heap, (at, seq, "msg", (self._names[i], src, msg_id, message)))
                queued.append(seq)
        self._seq = seq
        if len(queued) < len(ats):
            self.elided += len(ats) - len(queued)
            # one record per flood, not per copy set aside: enough for a restart to rebuild the copies
            floods = self._floods
            floods.append((max(ats), src, None, names, msg_id, message, seq0, ats, queued))
            while floods[0][0] < now:
                floods.popleft()

    def _handle(self, node: SimNode, event: Any) -> list[Any] | None:
        """Feed ``event`` to the node's engine and perform its actions (None: the node crashed)."""
        try:
            actions = node.engine.handle(event, now_ms=int(self.now * 1000))  # type: ignore[union-attr]
        except SimulatedCrash:
            self.crash(node.name)
            return None
        for action in actions:
            self._perform(node, action)
        return actions

    def min_honest_height(self) -> int:
        hs = [n.height for n in self.honest() if n.alive]
        return min(hs) if hs else 0

    def max_height(self) -> int:
        return max((n.height for n in self.honest() if n.alive), default=0)

    def _dispatch(self, kind: str, data: tuple[Any, ...]) -> None:
        if kind == "call":
            data[0]()
            return
        if kind == "timeout":
            name, incarnation, event = data
            node = self.nodes[name]
            if node.alive and node.incarnation == incarnation and node.engine is not None:
                self._handle(node, event)
            return
        dst, src = data[0], data[1]
        node = self.nodes[dst]
        if not node.alive or node.engine is None:
            return
        if kind == "tx":
            stx = data[2]
            try:
                node.mempool.add(stx)  # type: ignore[union-attr]
            except MempoolRejected:
                return
            self._txs_available(node)
            for peer in node.peers:
                if peer != src:
                    self._send(dst, peer, "tx", stx)
        elif kind == "sync_req":
            from_height, max_blocks = data[2], min(data[3], self.config.sync_batch)
            blocks = []
            store = node.store
            if store is not None and store.head_height is not None and from_height <= store.head_height:
                for _h, raw in store.blocks_from(from_height):
                    blocks.append(decode(FinalizedBlock, raw))
                    if len(blocks) >= max_blocks:
                        break
            # an empty answer too, as /p2pgpu/sync/1 gives: the engine paces its retries by what comes back
            self._send(dst, src, "sync_resp", tuple(blocks), reliable=True)
        elif kind == "sync_resp":
            blocks = data[2]
            self._handle(node, BlocksSynced(blocks, src))

    def _run_node(self, node: SimNode, step: Callable[[], list[Any]]) -> list[Any] | None:
        try:
            actions = step()
        except SimulatedCrash:
            self.crash(node.name)
            return None
        for action in actions:
            self._perform(node, action)
        return actions

    def _perform(self, node: SimNode, action: Any) -> None:
        if isinstance(action, Broadcast):
            self._broadcast(node, action.message)
        elif isinstance(action, (ScheduleTimeout, ScheduleSync)):
            self._push(self.now + action.delay_s, "timeout", node.name, node.incarnation, action.fired())
        elif isinstance(action, Commit):
            self._on_commit(node, action)
        elif isinstance(action, ReportEvidence):
            self._on_evidence(node, action)
        elif isinstance(action, RequestSync):
            self._request_sync(node, action)
        elif isinstance(action, RejectMessage):
            node.rejected += 1

    def _on_commit(self, node: SimNode, action: Commit) -> None:
        fb = action.finalized
        h = fb.block.height
        assert node.store is not None and node.mempool is not None
        node.store.append_block(h, fb.encode(), sync=self.config.fsync)
        if self.config.snapshot_every and h % self.config.snapshot_every == 0:
            node.store.snapshot(h, action.state.encode())
        node.mempool.update(action.state, fb.block.transactions)
        if node.mempool.has_ready():
            self._txs_available(node)
        node.committed[h] = self.computations.block_hash(fb.block)
        self.commits += 1
        node.commit_time[h] = self.now

    def _on_evidence(self, node: SimNode, action: ReportEvidence) -> None:
        assert node.mempool is not None
        stx = make_evidence_tx(
            node.account, self.genesis_state.chain_id, node.mempool.next_nonce(node.address),
            self.config.evidence_fee, action.vote_a, action.vote_b,
        )
        self.submit(node.name, stx)

    def submit(self, name: str, stx: SignedTransaction) -> None:
        """Submit a transaction at ``name`` now: into its mempool, then gossiped to everyone."""
        node = self.nodes[name]
        if not node.alive or node.mempool is None:
            return
        try:
            node.mempool.add(stx)
        except MempoolRejected:
            return
        self._txs_available(node)
        for peer in node.peers:
            self._send(name, peer, "tx", stx)

    def _txs_available(self, node: SimNode) -> None:
        """Tell the node's engine, as the Trio driver does, when early blocks are on (else the event
        sequence stays exactly what it was without them)."""
        if self.config.consensus.early_blocks:
            self._push(self.now, "timeout", node.name, node.incarnation, TxsAvailable())

    def _request_sync(self, node: SimNode, action: RequestSync) -> None:
        candidates = [p for p in node.peers if self.nodes[p].alive and self.nodes[p].behaviour == Behaviour.HONEST]
        if action.peer in candidates and self.rng.random() < 0.5:
            target = action.peer
        elif candidates:
            target = self.rng.choice(candidates)
        else:
            return
        self._send(node.name, target, "sync_req", action.from_height, action.max_blocks, reliable=True)  # type: ignore[arg-type]

    # ------------------------------------------------------------ gossip and byzantine senders

    def _broadcast(self, node: SimNode, message: Record) -> None:
        if isinstance(message, SignedProposal):
            h = message.proposal.height
            self.proposal_time.setdefault(h, self.now)
        if isinstance(message, VoteMessage):
            v = message.signed.vote
            node.sent_votes.setdefault((v.height, v.round, v.step), set()).add(v.block_hash)
        if node.behaviour == Behaviour.EQUIVOCATE and isinstance(message, VoteMessage):
            self._split_send(node, message, self._conflicting_vote(node, message))
            return
        if node.behaviour == Behaviour.SPLIT_PROPOSAL and isinstance(message, SignedProposal):
            other = self._conflicting_proposal(node, message)
            if other is not None:
                self._split_send(node, message, other)
                return
        self._gossip_from(node, message, node.peers)

    def _gossip_from(self, node: SimNode, message: Record, peers: Iterable[str]) -> None:
        msg_id = hashlib.sha256(CONSENSUS_MESSAGES.encode(message)).digest()
        node.seen.add(msg_id)
        self._arrival_row(msg_id)[node.index] = _SEEN
        self._flood(node.name, peers, None, msg_id, message)

    def inject(self, src: str, dst: str, message: Record) -> bytes:
        """A gossip copy of ``message`` from ``src`` reaches ``dst`` after the link's latency; returns its id.

        For tests that play a byzantine ``src``: the message may be anything, and ``dst`` handles and
        relays it as it would any other copy.
        """
        msg_id = hashlib.sha256(CONSENSUS_MESSAGES.encode(message)).digest()
        self._send(src, dst, "msg", msg_id, message, reliable=True)
        return msg_id

    def _split_send(self, node: SimNode, a: Record, b: Record) -> None:
        half = len(node.peers) // 2
        self._gossip_from(node, a, node.peers[:half])
        self._gossip_from(node, b, node.peers[half:])

    def _conflicting_vote(self, node: SimNode, message: VoteMessage) -> VoteMessage:
        assert node.bls is not None and node.engine is not None
        vote = message.signed.vote
        other = NIL_BLOCK if vote.block_hash != NIL_BLOCK else hashlib.sha256(b"equivocation" + vote.encode()).digest()
        forged = Vote(height=vote.height, round=vote.round, step=vote.step, block_hash=other)

        return VoteMessage(sign_vote(node.bls, node.address, self.genesis_state.chain_id, forged))

    def _conflicting_proposal(self, node: SimNode, message: SignedProposal) -> SignedProposal | None:
        assert node.bls is not None and node.engine is not None
        p = message.proposal
        if p.pol_round != -1:
            return None
        engine = node.engine
        block, _post, _rej = build_block(
            engine.state, [], proposer=node.address, round_=p.round,
            timestamp_ms=message.block.header.timestamp_ms + 1, last_commit=engine.last_certificate,
        )
        alt = replace(p, block_hash=block.block_hash())

        sig = node.bls.sign(proposal_signing_bytes(self.genesis_state.chain_id, alt))
        return SignedProposal(proposal=alt, block=block, proposer=node.address, signature=sig)

    # ------------------------------------------------------------ checks and figures

    def safety_violations(self) -> list[str]:
        """Heights where two honest nodes finalized different blocks."""
        seen: dict[int, tuple[str, bytes]] = {}
        problems = []
        for node in self.honest():
            for h, bh in node.committed.items():
                if h in seen and seen[h][1] != bh:
                    problems.append(f"height {h}: {seen[h][0]} finalized {seen[h][1].hex()[:12]}, "
                                    f"{node.name} finalized {bh.hex()[:12]}")
                seen.setdefault(h, (node.name, bh))
        return problems

    def double_signers(self) -> list[str]:
        """Honest nodes that ever sent two different votes for one (height, round, step)."""
        return [n.name for n in self.honest() if any(len(hs) > 1 for hs in n.sent_votes.values())]

    def finality_ms(self, heights: Iterable[int] | None = None) -> list[float]:
        """Per honest node and height: commit time minus the first proposal broadcast, in ms."""
        out = []
        for node in self.honest():
            for h, t in node.commit_time.items():
                if heights is not None and h not in heights:
                    continue
                if h in self.proposal_time:
                    out.append((t - self.proposal_time[h]) * 1000)
        return out

    def finality_summary(self) -> dict[str, float]:
        values = self.finality_ms()
        return {
            "p50": percentile(values, 50),
            "p99": percentile(values, 99),
            "mean": statistics.fmean(values) if values else float("nan"),
        }
