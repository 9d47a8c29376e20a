"""The inspector's Trio shell: join the gossip as a passive peer and turn what happens into events.

Passive means: a fresh ephemeral identity, a subscription to every topic of
the chain, and no publication ever (``network.metrics.published`` stays
empty). Valid messages are accepted -- so they are delivered to us and the
router relays them as any mesh member does -- and invalid ones are
*ignored*, not rejected: the inspector records a REJECT with the reason but
neither relays the message nor lowers the sender's score, so observing
changes nothing about the network it observes.

Where each event comes from, in py-libp2p 0.8.1:

* DELIVER / REJECT -- our topic validator sees ``(forwarder, bytes)``; it
  decodes (:class:`~p2pgpu.inspect.decode.MessageDecoder`), emits REJECT at
  once, and parks accepted results until the router hands the message to
  our subscription, where DELIVER is emitted.
* DUPLICATE -- libp2p checks its seen-cache before any validator and has no
  hook; :func:`trace_duplicates` wraps the pubsub instance's ``push_msg``
  (called through ``self.push_msg``) to see the forwarder and message of
  each copy. Without it only the global ``metrics.duplicates`` count exists.
* GRAFT / PRUNE, JOIN / LEAVE, ADD_PEER / REMOVE_PEER -- the router changes
  ``mesh[topic]`` in eight places (heartbeat, handle_graft/prune, join,
  opportunistic grafting, ...) without any callback, so these are derived by
  diffing snapshots of the mesh, the topic peers and the connections every
  ``snapshot_interval`` seconds. A peer grafted and pruned between two
  snapshots is never seen; that is the price of not patching the router.

The catch-up task: a message from an epoch whose committee the decoder has
not learned yet (the inspector joined a long-running chain) cannot be
verified; the shell then fetches finalized blocks over ``/p2pgpu/sync/1``
and lets the decoder verify the committee chain from genesis. Requests are
not gossip: the inspector still publishes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ledger.genesis import Genesis
from p2pgpu.blocksync import SyncFailed, fetch_blocks
from p2pgpu.inspect.decode import Decoded, MessageDecoder, TopicKind
from p2pgpu.inspect.events import EventType, FieldValue, TraceEvent
from p2pgpu.net import GossipConfig, GossipMessage, NetConfig, Network, Verdict, accept, ignore, open_network
from p2pgpu.net.config import MAX_GOSSIP_MESSAGE
from p2pgpu.net.gossip import content_message_id
from p2pgpu.net.log import log
from p2pgpu.topics import Topics

if TYPE_CHECKING:  # trio 0.35 has trio.TaskStatus; libp2p pulls in trio-typing's older stubs, where it lives here
    from trio_typing import TaskStatus

logger = logging.getLogger(__name__)

__all__ = ["InspectorConfig", "Observer", "run_inspector", "trace_duplicates"]

MAX_PENDING = 8192
"""Accepted-but-not-yet-delivered decodes kept (a dropped delivery must not leak memory)."""

EventSink = Callable[[TraceEvent], None]


@dataclass(frozen=True, slots=True)
class InspectorConfig:
    genesis: Genesis
    bootstrap: tuple[str, ...]
    listen_addrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    snapshot_interval: float = 0.5
    catch_up: bool = True
    seed: bytes | None = None
    """Identity seed; None = a fresh random one per run (the default: an observer has no standing)."""
    gossip: GossipConfig = field(default_factory=lambda: GossipConfig(max_message_size=MAX_GOSSIP_MESSAGE))


class Observer:
    """Turns validator calls, deliveries and snapshots of one network into trace events."""

    def __init__(self, decoder: MessageDecoder, topics: Topics, sink: EventSink,
                 clock: Callable[[], float] = time.time) -> None:
        self.decoder = decoder
        self.topics = topics
        self.sink = sink
        self.clock = clock
        self._pending: OrderedDict[bytes, tuple[str, Decoded]] = OrderedDict()
        self._names = {getattr(topics, kind.value): kind for kind in TopicKind}
        self._connected: set[str] = set()
        self._topic_peers: dict[str, set[str]] = {kind.value: set() for kind in TopicKind}
        self._mesh: dict[str, set[str]] = {kind.value: set() for kind in TopicKind}
        self.needs_catch_up = trio.Event()

    def kind_of(self, topic: str) -> TopicKind | None:
        return self._names.get(topic)

    def emit(self, event: EventType, **kw: object) -> None:
        self.sink(TraceEvent(ts=self.clock(), event=event, **kw))  # type: ignore[arg-type]

    # ------------------------------------------------------------ gossip

    def validator(self, kind: TopicKind) -> Callable[[str, bytes], Verdict]:
        def validate(peer: str, data: bytes) -> Verdict:
            result = self.decoder.decode(kind, data)
            msg_id = hashlib.sha256(data).digest()
            if isinstance(result, Decoded):
                if not result.verified:
                    self.needs_catch_up.set()
                self._pending[msg_id] = (peer, result)
                while len(self._pending) > MAX_PENDING:
                    self._pending.popitem(last=False)
                return accept()
            self.emit(EventType.REJECT, topic=kind.value, peer=peer, msg_id=msg_id.hex(), size=len(data),
                       reason=result.reason, fields={"detail": result.detail, "blame": result.blame})
            return ignore(result.reason)

        return validate

    def deliver(self, kind: TopicKind, msg: GossipMessage) -> None:
        pending = self._pending.pop(msg.msg_id, None)
        if pending is None:
            # Accepted, then evicted from the parking lot: decode again rather than lose it.
            result = self.decoder.decode(kind, msg.data)
            if not isinstance(result, Decoded):
                return
            pending = (msg.origin, result)
        peer, decoded = pending
        fields: dict[str, FieldValue] = {**decoded.fields, "origin": msg.origin}
        self.emit(EventType.DELIVER, topic=kind.value, peer=peer, msg_id=msg.msg_id.hex(), size=len(msg.data),
                   kind=decoded.kind, fields=fields)

    async def consume(self, kind: TopicKind, channel: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        async for msg in channel:
            self.deliver(kind, msg)

    def duplicate(self, topic: str, peer: str, msg_id: bytes, size: int) -> None:
        kind = self.kind_of(topic)
        if kind is not None:
            self.emit(EventType.DUPLICATE, topic=kind.value, peer=peer, msg_id=msg_id.hex(), size=size)

    # ------------------------------------------------------------ snapshots

    def snapshot(self, connected: set[str], topic_peers: dict[str, set[str]], mesh: dict[str, set[str]]) -> None:
        """Emit the differences to the previous snapshot (keys of the dicts are short topic names)."""
        for peer in sorted(connected - self._connected):
            self.emit(EventType.ADD_PEER, peer=peer)
        for name in self._topic_peers:
            now_peers, now_mesh = topic_peers.get(name, set()), mesh.get(name, set())
            for peer in sorted(self._mesh[name] - now_mesh):
                self.emit(EventType.PRUNE, topic=name, peer=peer)
            for peer in sorted(self._topic_peers[name] - now_peers):
                self.emit(EventType.LEAVE, topic=name, peer=peer)
            for peer in sorted(now_peers - self._topic_peers[name]):
                self.emit(EventType.JOIN, topic=name, peer=peer)
            for peer in sorted(now_mesh - self._mesh[name]):
                self.emit(EventType.GRAFT, topic=name, peer=peer)
            self._topic_peers[name], self._mesh[name] = set(now_peers), set(now_mesh)
        for peer in sorted(self._connected - connected):
            self.emit(EventType.REMOVE_PEER, peer=peer)
        self._connected = set(connected)

    async def watch(self, network: Network, interval: float) -> None:
        while True:
            topic_peers = {k.value: network.gossip.topic_peers(getattr(self.topics, k.value)) for k in TopicKind}
            mesh = {k.value: network.gossip.mesh_peers(getattr(self.topics, k.value)) for k in TopicKind}
            self.snapshot(network.connected_peers(), topic_peers, mesh)
            await trio.sleep(interval)

    async def catch_up_forever(self, network: Network) -> None:
        """Whenever an unverifiable message shows up, fetch blocks so the decoder learns the committees."""
        while True:
            await self.needs_catch_up.wait()
            learned = 0
            for peer in sorted(network.connected_peers()):
                while True:
                    start = self.decoder.certified_height + 1
                    try:
                        blocks = await fetch_blocks(network, peer, start)
                    except SyncFailed as exc:
                        log(logger, logging.INFO, "inspect_catch_up_failed", peer=peer, error=str(exc))
                        break
                    got = self.decoder.learn_blocks(blocks)
                    learned += got
                    if got == 0 or got < len(blocks):
                        break
                if learned:
                    break
            log(logger, logging.INFO, "inspect_catch_up", blocks=learned, height=self.decoder.certified_height)
            self.needs_catch_up = trio.Event()
            await trio.sleep(1.0)  # at most one catch-up round per second, however many messages ask


def trace_duplicates(network: Network, on_duplicate: Callable[[str, str, bytes, int], None]) -> None:
    """Report ``(topic, forwarder, msg id, size)`` for every copy of an already-seen message.

    Wraps ``push_msg`` on this one pubsub instance (see the module
    docstring): it checks the seen-cache exactly as ``push_msg`` is about
    to, without counting, then hands over unchanged.
    """
    pubsub = network.gossip.pubsub
    original = pubsub.push_msg
    self_id = pubsub.host.get_id()

    async def push_msg(msg_forwarder, msg) -> None:  # type: ignore[no-untyped-def]
        if msg_forwarder != self_id:
            msg_id = content_message_id(msg)
            if pubsub.seen_messages.has(msg_id):
                for topic in msg.topicIDs:
                    on_duplicate(topic, msg_forwarder.to_base58(), msg_id, len(msg.data))
        await original(msg_forwarder, msg)

    pubsub.push_msg = push_msg  # type: ignore[method-assign]


async def run_inspector(
    config: InspectorConfig,
    sink: EventSink,
    *,
    clock: Callable[[], float] = time.time,
    task_status: TaskStatus[tuple[Network, Observer]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Join, subscribe to every topic and emit events into ``sink`` until cancelled.

    ``task_status.started((network, observer))`` once all subscriptions are
    in place (tests use it to wait; the CLI to print the peer id).
    """
    decoder = MessageDecoder(config.genesis)
    topics = Topics.for_chain(decoder.chain_id)
    net_config = NetConfig(listen_addrs=config.listen_addrs, bootstrap_peers=config.bootstrap, gossip=config.gossip)
    seed = config.seed if config.seed is not None else os.urandom(32)
    observer = Observer(decoder, topics, sink, clock)
    async with open_network(net_config, seed) as network:
        trace_duplicates(network, observer.duplicate)
        async with trio.open_nursery() as nursery:
            for kind in TopicKind:
                name = getattr(topics, kind.value)
                channel = await network.subscribe(name, observer.validator(kind), max_message_size=MAX_GOSSIP_MESSAGE)
                observer.emit(EventType.JOIN, topic=kind.value)
                nursery.start_soon(observer.consume, kind, channel)
            nursery.start_soon(observer.watch, network, config.snapshot_interval)
            if config.catch_up:
                nursery.start_soon(observer.catch_up_forever, network)
            log(logger, logging.INFO, "inspect_started", peer=network.peer_id, chain=decoder.chain_id.hex()[:16])
            task_status.started((network, observer))
            try:
                await trio.sleep_forever()
            finally:
                # Our own LEAVEs close the recording, so a replay ends where the session ended.
                for kind in TopicKind:
                    observer.emit(EventType.LEAVE, topic=kind.value)
