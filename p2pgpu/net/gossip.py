"""GossipSub on py-libp2p 0.8.1, tuned so that normal traffic loses nothing.

What py-libp2p 0.8.1 does by default, read from its source, and what we do:

* ``Pubsub.notify_subscriptions`` puts each validated message into a
  32-slot channel per subscription (``SUBSCRIPTION_CHANNEL_SIZE``, a module
  constant read at subscribe time) and logs-and-drops when it is full. We
  override that one method in :class:`TunedPubsub` so validated messages go
  straight into the node's own bounded queue per topic, where a full queue
  drops *and counts* (``NetMetrics.dropped``). There is no intermediate
  channel and no drain task that could fall behind; patching the module
  constant instead would change every Pubsub in the process.
* Each peer gets an outbound ``RpcQueue`` of 32 RPCs that rejects pushes when
  full (``rpc_queue.drop_rpc`` only logs at debug). A burst of publishes, or
  a relay forwarding a burst plus one IDONTWANT per message per mesh peer,
  overflows it. ``TunedPubsub.peer_queues`` is a dict that raises each new
  queue's capacity to ``GossipConfig.outbound_queue_size``, and
  :meth:`GossipRouter.wait_for_outbound_room` lets publishers wait (back
  pressure) instead of overflowing.
* ``GossipSub`` rate-limits every forwarder to 10 messages per second per
  topic, including ourselves when publishing; the heartbeat is 120 s; the
  "adaptive" mode may stretch the heartbeat to 30-60 s; eclipse protection
  wants 3 distinct IPs in a mesh (never true on loopback). We raise the rate
  limit, use a 1 s heartbeat and turn the adaptive and IP-diversity logic
  off (scoring and bans are ours, see :mod:`p2pgpu.net.scoring`).
  Our own per-peer limit counts what our validators accepted, per (peer,
  topic), and charges a peer over ``GossipConfig.peer_rate`` once a second
  (libp2p's counts duplicates too and charges nobody).
* Message ids: ``SHA-256(data)`` (content addressed), passed as
  ``msg_id_constructor``.
* Validators: libp2p's sync topic validators answer a bool. Ours wrap a
  :data:`~p2pgpu.net.verdict.Validator` returning a reasoned verdict, check
  the size first, count and score. libp2p's validation cache would answer a
  repeated invalid message from cache without calling us (so the second
  sender would go unpunished); we set its TTL to 0.
* Decode once: an accepting validator returns the record it decoded and
  verified (``accept(record)``). libp2p validates and then delivers the same
  message within one ``push_msg`` call (one task, one context), so the
  record is handed from the validator to :meth:`GossipRouter._deliver`
  through a context variable set per ``push_msg`` (and per ``publish``, for
  our own messages, which libp2p does not validate again) and arrives as
  ``GossipMessage.record``: no subscriber decodes or verifies it again.
* A subscription made while a peer is being added reached neither the
  peer's hello (already built) nor the peer (not yet in ``Pubsub.peers``,
  the list ``subscribe`` announces to), so that peer never learned of it and
  the two never exchanged gossip on that topic. :class:`TunedPubsub` notes
  which topics changed while each peer was being added and announces their
  current state to the peer once it is registered.
* libp2p's per-peer sending loop writes each queued RPC on its own: one
  protobuf frame, one Noise encryption, one Yamux frame and one ``send``
  per message and peer, and the receiver pays the same again to read it.
  Our sending loop writes what has queued up for a peer as one RPC
  (:func:`coalesce_queued`, up to ``GossipConfig.coalesce_bytes``), so a
  burst costs a few writes instead of one per message; a lone message still
  goes out at once ("batch when busy").
* libp2p starts a managed task per message received, and finding each new
  task's parent walks every live task; :meth:`TunedPubsub._read_rpcs`
  handles a peer's messages in its read loop instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio
from libp2p.abc import IHost, INetStream, ISubscriptionAPI
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.mcache import CacheEntry, MessageCache
from libp2p.pubsub.pb import rpc_pb2
import libp2p.pubsub.pubsub as libp2p_pubsub_module
from google.protobuf.message import DecodeError as ProtobufDecodeError
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import RpcQueue

from .config import GossipConfig
from .errors import MessageTooLarge, PublishRejected
from .log import log
from .metrics import NetMetrics
from .ratelimit import KeyedRateLimiter, RateLimit
from .scoring import PeerScores
from .verdict import Outcome, Validator, Verdict, ignore, reject

logger = logging.getLogger(__name__)

PEER_RATE_REASON = "peer_rate"
"""Reason (ignored, and charged at most once a second) for a message over its peer's ``GossipConfig.peer_rate``."""
PEER_RATE_TRACKED = 4096
"""(peer, topic) pairs whose message rate is tracked at once; far above the peers a node is connected to."""

GOSSIP_PROTOCOLS = (TProtocol(PROTOCOL_ID_V12), TProtocol(PROTOCOL_ID_V11))


def content_message_id(msg: rpc_pb2.Message) -> bytes:
    """Message id = SHA-256 of the payload, so identical content is one message."""
    return hashlib.sha256(msg.data).digest()


R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class GossipMessage(Generic[R]):
    """A validated message handed to the application."""

    topic: str
    data: bytes
    origin: str
    """Base58 peer id of the author as claimed (and signed) in the libp2p envelope."""
    msg_id: bytes
    local: bool
    """True for our own publications, which libp2p also delivers to local subscribers."""
    record: R | None = None
    """What the topic's validator decoded and verified (its ``accept(record)``); None if it returned none."""


class _SizedQueues(dict[ID, RpcQueue]):
    """``Pubsub.peer_queues`` replacement giving each new peer queue our capacity.

    ``Pubsub._handle_new_peer`` builds ``RpcQueue()`` with the 32-RPC default
    and stores it here; intercepting the store is the one place to change
    the size without copying that method.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __setitem__(self, key: ID, queue: RpcQueue) -> None:
        queue._queue.max_size = self.size  # RpcQueue exposes no setter in 0.8.1
        super().__setitem__(key, queue)


_origin: contextvars.ContextVar[str | None] = contextvars.ContextVar("p2pgpu_gossip_origin", default=None)


def message_origin() -> str | None:
    """Inside a topic validator: the peer that published the message being validated (its signed ``from``).

    A validator gets the peer that *forwarded* the message; when that peer is
    also its origin, what the message says is that peer's own doing (a
    transaction it signed or had signed, an announce it made), and a
    validator may charge it where it would only ignore a relay.
    """
    return _origin.get()


_envelope_refused: contextvars.ContextVar[bool] = contextvars.ContextVar("p2pgpu_envelope_refused", default=False)


def _signature_check_that_tells(msg: rpc_pb2.Message) -> bool:
    """libp2p's check of a message's envelope signature, noting a failure for :meth:`TunedPubsub.push_msg`.

    ``Pubsub.push_msg`` drops a message whose envelope signature does not
    verify and says nothing, so the peer that sent it was never charged.
    """
    ok = _libp2p_signature_validator(msg)
    if not ok:
        _envelope_refused.set(True)
    return bool(ok)


_libp2p_signature_validator = libp2p_pubsub_module.signature_validator
libp2p_pubsub_module.signature_validator = _signature_check_that_tells

_validated_records: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "p2pgpu_validated_records", default=None)
"""Inside one ``push_msg``: topic -> the record its validator accepted, for :meth:`GossipRouter._deliver`."""


_rpc_refused: contextvars.ContextVar[str] = contextvars.ContextVar("p2pgpu_rpc_refused", default="")


async def _rpc_read_that_tells(reader: Any, max_length: int) -> bytes:
    """libp2p's read of one pubsub RPC frame, noting a frame over the size limit for ``continuously_read_stream``.

    libp2p resets the stream of a peer that sends an oversized RPC and drops
    the peer, and says nothing; the peer was never charged.
    """
    try:
        return await _libp2p_read_rpc(reader, max_length)
    except libp2p_pubsub_module.MessageTooLarge:
        _rpc_refused.set("oversized_rpc")
        raise


_libp2p_read_rpc = libp2p_pubsub_module.read_varint_prefixed_bytes_limited
libp2p_pubsub_module.read_varint_prefixed_bytes_limited = _rpc_read_that_tells


def coalesce_queued(first: rpc_pb2.RPC, queue: RpcQueue, limit: int) -> rpc_pb2.RPC:
    """``first`` merged with the RPCs queued behind it, as long as the whole stays within ``limit`` bytes.

    Nothing waits for company: only what is already queued is merged, in the
    queue's own order (control before data), so a quiet link sends each
    message as soon as it is popped. Protobuf's ``MergeFrom`` concatenates
    the repeated fields (messages, subscriptions, control entries), which is
    exactly one RPC carrying all of them; the receiver handles its parts as
    it would the separate RPCs. An RPC that does not fit stays queued, first
    in line for the next write.
    """
    pending = queue._queue  # RpcQueue has no peek in 0.8.1; its two deques are the queue
    size = first.ByteSize()
    merged: rpc_pb2.RPC | None = None
    while True:
        lane = pending._priority or pending._non_priority
        if not lane:
            break
        extra = lane[0].ByteSize()
        if size + extra > limit:
            break
        nxt = lane.popleft()
        if merged is None:
            merged = rpc_pb2.RPC()
            merged.CopyFrom(first)
        merged.MergeFrom(nxt)
        size += extra
    return first if merged is None else merged


class TunedPubsub(Pubsub):
    """``Pubsub`` that delivers into caller-owned queues and counts duplicates."""

    def __init__(
        self,
        host: IHost,
        router: GossipSub,
        config: GossipConfig,
        deliver: Callable[[rpc_pb2.Message], None],
        on_duplicate: Callable[[str], None],
        on_bad_envelope: Callable[[ID], None] | None = None,
        on_bad_rpc: Callable[[ID, str], None] | None = None,
    ) -> None:
        super().__init__(
            host,
            router,
            seen_ttl=config.seen_ttl,
            strict_signing=True,
            msg_id_constructor=content_message_id,
            validation_cache_ttl=0,
            validation_cache_size=16,
        )
        self.peer_queues = _SizedQueues(config.outbound_queue_size)
        # libp2p seeds the sequence counter with the time in seconds; a node publishing several
        # messages a second runs ahead of that clock, so a restart would reuse seqnos. Nanoseconds don't.
        self.counter = time.time_ns()
        self._deliver = deliver
        self._on_duplicate = on_duplicate
        self._on_bad_envelope = on_bad_envelope
        self._on_bad_rpc = on_bad_rpc
        self._topic_changes = 0  # subscribe/unsubscribe calls so far
        self._topic_changed_at: dict[str, int] = {}  # topic -> _topic_changes after its last change
        self.peer_added_at: dict[ID, float] = {}
        """When each peer was registered (monotonic): its hello, hence its topics, is known soon after."""
        self.coalesce_bytes = config.coalesce_bytes
        self.rpcs_queued = 0
        """RPCs taken from the peers' outbound queues (one per message, control batch or announce)."""
        self.rpcs_written = 0
        """RPC writes to peers: fewer than :attr:`rpcs_queued` by what coalescing merged."""

    def _note_topic_change(self, topic: str) -> None:
        self._topic_changes += 1
        self._topic_changed_at[topic] = self._topic_changes

    async def subscribe(self, topic_id: str) -> ISubscriptionAPI:
        self._note_topic_change(topic_id)
        return await super().subscribe(topic_id)

    async def unsubscribe(self, topic_id: str) -> None:
        self._note_topic_change(topic_id)
        await super().unsubscribe(topic_id)

    async def _handle_new_peer(self, peer_id: ID) -> None:
        """Like ``Pubsub._handle_new_peer``, but no subscription made meanwhile is lost.

        ``_handle_new_peer`` builds the hello (our subscriptions) and only
        after writing it, which yields, puts the peer in ``self.peers``; a
        ``subscribe`` in between announces to ``self.peers`` and so misses
        the peer for good. Topics changed since we started are announced to
        it again, as they stand now (a duplicate announce is harmless).
        """
        started_at = self._topic_changes
        already_added = peer_id in self.peers
        await super()._handle_new_peer(peer_id)
        if not already_added and peer_id in self.peers:
            self.peer_added_at[peer_id] = time.monotonic()
        if already_added or peer_id not in self.peers or self._topic_changes == started_at:
            return
        queue = self.peer_queues.get(peer_id)
        if queue is None:
            return
        for topic, changed_at in tuple(self._topic_changed_at.items()):
            if changed_at > started_at:
                rpc, subopt = self._build_announce_rpc(topic, subscribe=topic in self.topic_ids)
                self._enqueue_or_retry_announce(peer_id, queue, rpc, subopt)

    async def stream_handler(self, stream: INetStream) -> None:
        """Like ``Pubsub.stream_handler``, but garbage cannot crash the node.

        In 0.8.1 the inbound pubsub reader catches stream errors but not
        protobuf's ``DecodeError``, so one malformed RPC from any peer
        propagates through the swarm and tears the whole host down. Here any
        failure only costs that peer its pubsub stream.
        """
        try:
            await super().stream_handler(stream)
        except Exception as exc:
            peer_id = stream.muxed_conn.peer_id
            log(logger, logging.WARNING, "gossip_stream_garbage", peer=peer_id.to_base58(), error=repr(exc))
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    await stream.reset()
                except Exception:
                    pass  # the stream is already unusable; dropping the peer below is what matters
            self._handle_dead_peer(peer_id)

    async def handle_sending_messages(self, peer_id: ID, stream: INetStream, queue: RpcQueue) -> None:
        """libp2p's per-peer sending loop, writing everything queued for the peer as one RPC (:func:`coalesce_queued`)."""
        try:
            while True:
                rpc = await queue.pop()
                if rpc is None:
                    return  # the queue was closed: the peer is gone
                before = len(queue)
                rpc = coalesce_queued(rpc, queue, self.coalesce_bytes)
                self.rpcs_queued += 1 + before - len(queue)
                self.rpcs_written += 1
                if not await self.write_msg(stream, rpc):
                    return
        except Exception as exc:
            log(logger, logging.DEBUG, "gossip_send_loop_ended", peer=peer_id.to_base58(), error=repr(exc))
            self._handle_dead_peer(peer_id)

    def _handle_dead_peer(self, peer_id: ID) -> None:
        self.peer_added_at.pop(peer_id, None)
        super()._handle_dead_peer(peer_id)

    def notify_subscriptions(self, publish_message: rpc_pb2.Message) -> None:
        self._deliver(publish_message)

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        """Like ``Pubsub.push_msg``, but our own re-publication of a message is sent again.

        Message ids are content hashes, so publishing the same bytes twice
        (consensus rebroadcasts its proposal and votes every 0.5 s exactly for
        peers that missed them) hit libp2p's seen check in ``push_msg`` and
        was dropped silently; its ``LastSeenCache`` renews an entry's
        ``seen_ttl`` on every lookup, so a repeat every 0.5 s kept it "seen"
        for good. A vote published while the mesh was still forming, or lost
        on a dropped connection, never reached anyone again, and consensus
        sat at one height with every node connected. A repeat of our own is
        routed again (receivers that have it drop it as a duplicate); it is
        not delivered to us again nor re-validated (``GossipRouter.publish``
        validated it).
        """
        if msg_forwarder == self.my_id and ID(msg.from_id) == self.my_id and super()._is_msg_seen(msg):
            await self.router.publish(msg_forwarder, msg)
            return
        token = _envelope_refused.set(False)
        # A fresh record slot for a message from the network; our own publication keeps the one
        # GossipRouter.publish filled (libp2p skips validating what we forward as ours).
        records = _validated_records.set({}) if msg_forwarder != self.my_id else None
        try:
            await super().push_msg(msg_forwarder, msg)
            refused = _envelope_refused.get()
        finally:
            _envelope_refused.reset(token)
            if records is not None:
                _validated_records.reset(records)
        if refused and self._on_bad_envelope is not None:
            self._on_bad_envelope(msg_forwarder)  # forged or corrupted in transit by the peer that sent it

    async def continuously_read_stream(self, stream: INetStream) -> None:
        """libp2p's read loop, with a peer that sends an RPC over the size limit or one that does not parse
        charged (libp2p reset the stream, or let the parse error end the loop, and charged nobody)."""
        peer_id = stream.muxed_conn.peer_id
        token = _rpc_refused.set("")
        try:
            try:
                await self._read_rpcs(stream)
            except ProtobufDecodeError:
                _rpc_refused.set("garbage_rpc")
                with contextlib.suppress(Exception):
                    await stream.reset()
            reason = _rpc_refused.get()
        finally:
            _rpc_refused.reset(token)
        if reason and self._on_bad_rpc is not None:
            self._on_bad_rpc(peer_id, reason)

    async def _read_rpcs(self, stream: INetStream) -> None:
        """``Pubsub.continuously_read_stream`` of py-libp2p 0.8.1, with each message handled in the read loop.

        libp2p starts a managed task per received message
        (``manager.run_task(self.push_msg, ...)``), and ``run_task`` finds the
        new task's parent by walking every live task of the service: a cost
        per message that grows with the messages in flight, plus a task, a
        uuid and a cancel scope each. ``push_msg`` never waits on the network
        (validators are synchronous; forwarding only queues RPCs), so
        handling a peer's messages in its own read loop costs none of that,
        keeps them in the order the peer sent them, and lets a peer that
        sends faster than we handle wait on its own stream (Yamux's window)
        instead of piling up tasks. Everything else is libp2p's loop as it is.
        """
        lib = libp2p_pubsub_module
        peer_id = stream.muxed_conn.peer_id
        try:
            while self.manager.is_running:
                incoming: bytes = await lib.read_varint_prefixed_bytes_limited(stream, self.max_inbound_rpc_size)
                rpc_incoming = rpc_pb2.RPC()
                rpc_incoming.ParseFromString(incoming)
                if not lib.maybe_consume_signed_record(rpc_incoming, self.host, peer_id):
                    logger.error("Received an invalid-signed-record, ignoring the incoming msg")
                    continue
                event = lib.GossipsubEvent()
                event.peer_id = peer_id.pretty()
                event.message_size = len(incoming)
                if rpc_incoming.publish:
                    event.publish = True
                    for msg in rpc_incoming.publish:
                        if self._is_subscribed_to_msg(msg) and self.manager.is_running:
                            await self.push_msg(peer_id, msg)
                if rpc_incoming.subscriptions:
                    event.subopts = True
                    if len(rpc_incoming.subscriptions) > self.max_subscriptions_per_rpc:
                        logger.warning("Peer %s sent %d subscriptions exceeding limit %d, rejecting subscriptions",
                                       peer_id, len(rpc_incoming.subscriptions), self.max_subscriptions_per_rpc)
                    else:
                        for message in rpc_incoming.subscriptions:
                            self.handle_subscription(peer_id, message)
                if rpc_incoming.HasField("control"):
                    event.control = True
                    await self.router.handle_rpc(rpc_incoming, peer_id)
                if stream.metric_send_channel is not None:
                    await stream.metric_send_channel.send(event)
        except lib.MessageTooLarge as error:
            logger.warning("Inbound pubsub RPC from peer %s exceeded size limit: %s", peer_id, error)
            with contextlib.suppress(Exception):
                await stream.reset()
            self._handle_dead_peer(peer_id)
        except (lib.StreamEOF, lib.StreamError, lib.IOException, lib.RawConnError):
            pass  # the peer closed its stream or the connection went: libp2p's loop ends here quietly too

    def _is_msg_seen(self, msg: rpc_pb2.Message) -> bool:
        seen = super()._is_msg_seen(msg)
        if seen:
            self._on_duplicate(msg.topicIDs[0] if msg.topicIDs else "")
        return seen


PENDING_GRACE_S = 2.0
"""A peer registered this long ago has sent its hello: its subscriptions are known (see TunedGossipSub)."""

IDONTWANT_MIN_BYTES = 1024
"""Messages smaller than this are not announced with IDONTWANT (go-libp2p's ``IDontWantMessageThreshold``)."""

_forwarding_size: contextvars.ContextVar[int] = contextvars.ContextVar("forwarding_size", default=IDONTWANT_MIN_BYTES)


class ContentIdMessageCache(MessageCache):
    """libp2p's message cache keyed by our message id (the content hash), not ``from + seqno``.

    py-libp2p 0.8.1's ``MessageCache.put`` keys every message by
    ``default_msg_id_fn`` whatever ``msg_id_constructor`` the pubsub uses, so
    the IHAVE gossip built from it names messages by ``from + seqno`` while
    every receiver's seen-cache holds content hashes. No IHAVE ever matched:
    a peer asked (IWANT) for every message it was told of, and received each
    again in full, up to once per heartbeat of the gossip window, from every
    peer outside its mesh or fanout that had it. A validator received a
    client's ``/tx`` message five times where three copies reach it through
    the mesh. Keyed by the content hash, an IHAVE names what the receiver
    already has and it asks for nothing; an IWANT names the same key.
    """

    def put(self, msg: rpc_pb2.Message) -> None:
        mid = content_message_id(msg)
        if mid in self.msgs:
            return
        self.msgs[mid] = msg
        self.history[0].append(CacheEntry(mid, msg.topicIDs))


class TunedGossipSub(GossipSub):
    """``GossipSub`` without its per-sequence-number "equivocation" check, and IDONTWANT for large messages only.

    py-libp2p 0.8.1 keeps every message it ever received in
    ``equivocation_detection`` (unbounded memory in a long-running node) and
    drops, then penalises, any later message reusing a (sender, seqno) pair.
    A restarted peer reuses seqnos (the counter restarts from the clock in
    seconds and runs ahead of it at several messages per second), so its
    gossip was dropped as "equivocation" after every restart. Our message ids
    are content hashes and real equivocation (two signed votes) is judged by
    the consensus engine, so the check is switched off here.

    IDONTWANT (gossipsub v1.2) tells mesh peers not to send a message we
    already have; it saves bandwidth for large messages. py-libp2p sends one
    per message received to every v1.2 mesh peer, whatever its size: for a
    ~300-byte vote, the notice costs as much as the duplicate it prevents,
    and it was ~6% of a validator's CPU. As go-libp2p does, it is sent only
    for messages of :data:`IDONTWANT_MIN_BYTES` or more.
    """

    fanout_degree: int = 2
    """Set by :func:`make_router` from ``GossipConfig.fanout_degree``."""

    def _check_equivocation(self, msg: rpc_pb2.Message) -> bool:
        return True

    @contextlib.contextmanager
    def _fanout_sized(self) -> Iterator[None]:
        """``degree`` reads as ``fanout_degree`` inside: py-libp2p sizes the fanout with the mesh degree.

        libp2p (0.8.1) has no separate fanout degree; it reads ``self.degree``
        where it tops a fanout set up (``_get_peers_to_send`` on publish, the
        heartbeat's ``fanout_heartbeat``). Both run without a checkpoint, so
        nothing else reads ``degree`` meanwhile.
        """
        degree = self.degree
        self.degree = min(degree, self.fanout_degree)
        try:
            yield
        finally:
            self.degree = degree

    def _get_peers_to_send(self, topic_ids: Iterable[str], msg_forwarder: ID, origin: ID,
                           msg_id: bytes | None = None) -> Iterable[ID]:
        topics = list(topic_ids)
        if any(topic in self.mesh for topic in topics):  # a topic we follow: its mesh, libp2p's way
            return super()._get_peers_to_send(topics, msg_forwarder, origin, msg_id)
        with self._fanout_sized():  # libp2p's is a generator: run it to the end while the degree is swapped
            return list(super()._get_peers_to_send(topics, msg_forwarder, origin, msg_id))

    def fanout_heartbeat(self) -> None:
        with self._fanout_sized():
            super().fanout_heartbeat()

    async def publish(self, msg_forwarder: ID, pubsub_msg: rpc_pb2.Message) -> None:
        token = _forwarding_size.set(pubsub_msg.ByteSize())
        try:
            await super().publish(msg_forwarder, pubsub_msg)
        finally:
            _forwarding_size.reset(token)
        self._forget_pending_for_settled_peers()

    def _forget_pending_for_settled_peers(self) -> None:
        """Drop the "identify pending" queues of peers registered long enough for their topics to be known.

        py-libp2p 0.8.1 queues every message it publishes for each connected
        peer not subscribed to the message's topic, in case the peer's
        subscription is still on its way, and flushes the queue only when a
        peer is added. A peer that simply does not follow the topic (a client
        or provider does not follow ``/consensus``) is never added again, so
        its queue fills to 100 messages and every later publish prunes it
        (a list rebuilt per message and peer) and logs "pending message queue
        ... exceeded limit": 95 % of all log lines under load. A peer whose
        hello arrived :data:`PENDING_GRACE_S` ago has told us its topics, so
        nothing queued for it would ever be sent.
        """
        pending = self._pending_messages
        pubsub = self.pubsub
        if not pending or pubsub is None:
            return
        added = getattr(pubsub, "peer_added_at", None)
        if not added:
            return
        now = time.monotonic()
        for peer in [p for p in pending if now - added.get(p, now) > PENDING_GRACE_S]:
            del pending[peer]

    async def flush_pending_messages(self, peer_id: ID) -> None:
        """Send what was queued for a peer only if its subscription really was on its way.

        py-libp2p flushes a peer's queue (30 s of messages) whenever the peer
        subscribes to a topic, so a peer that joins a topic long after it
        connected received messages published before it followed the topic
        -- published, as far as it should know, to nobody. What was queued
        more than :data:`PENDING_GRACE_S` before the flush was not waiting
        for a subscription in flight, and is dropped.
        """
        queue = self._pending_messages.get(peer_id)
        if queue:
            cutoff = time.time() - PENDING_GRACE_S
            queue[:] = [(ts, msg) for ts, msg in queue if ts >= cutoff]
        await super().flush_pending_messages(peer_id)

    async def _emit_idontwant_for_message(self, msg_id: bytes, topic_ids: Any) -> None:
        if _forwarding_size.get() < IDONTWANT_MIN_BYTES:
            return
        await super()._emit_idontwant_for_message(msg_id, topic_ids)


def make_router(config: GossipConfig) -> GossipSub:
    router = TunedGossipSub(
        protocols=list(GOSSIP_PROTOCOLS),
        degree=config.degree,
        degree_low=config.degree_low,
        degree_high=config.degree_high,
        heartbeat_interval=config.heartbeat_interval,  # type: ignore[arg-type]  # typed int, used as trio.sleep()
        heartbeat_initial_delay=config.heartbeat_initial_delay,
        max_messages_per_topic_per_second=config.max_messages_per_topic_per_second,
        adaptive_gossip_enabled=False,
        eclipse_protection_enabled=False,
    )
    router.fanout_degree = config.fanout_degree
    router.mcache = ContentIdMessageCache(router.mcache.window_size, router.mcache.history_size)
    return router


@dataclass(slots=True)
class _Topic:
    name: str
    validator: Validator
    max_size: int
    send: trio.MemorySendChannel[GossipMessage[Any]]
    receive: trio.MemoryReceiveChannel[GossipMessage[Any]]


class GossipRouter:
    """Topics, validation, delivery and counting around one :class:`TunedPubsub`.

    ``penalize(peer, where, reason, detail)`` is called (synchronously, from
    inside libp2p's validation) for every rejected message: the shell's one
    path that scores a peer and bans it past the threshold.
    """

    def __init__(
        self,
        host: IHost,
        config: GossipConfig,
        metrics: NetMetrics,
        scores: PeerScores,
        penalize: Callable[[str, str, str, str], None],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.scores = scores
        self._penalize = penalize
        self._topics: dict[str, _Topic] = {}
        self.router = make_router(config)
        self.pubsub = TunedPubsub(host, self.router, config, self._deliver, self._count_duplicate,
                                  self._bad_envelope, self._bad_rpc)
        self._self_id = host.get_id()
        self._self_b58 = self._self_id.to_base58()
        # Messages our validators accepted, per (forwarder, topic): a peer over ``peer_rate`` has its messages
        # dropped and is charged, at most once a second (``_peer_charges``), so a burst past the limit costs
        # one offence a second rather than a ban in five messages.
        self._peer_rates: KeyedRateLimiter[tuple[str, str]] = KeyedRateLimiter(
            RateLimit(config.peer_rate, config.peer_burst), max_keys=PEER_RATE_TRACKED, clock=trio.current_time)
        self._peer_charges: KeyedRateLimiter[str] = KeyedRateLimiter(
            RateLimit(1.0, 1), max_keys=PEER_RATE_TRACKED, clock=trio.current_time)

    # -- subscribe / publish -------------------------------------------------

    async def subscribe(
        self, topic: str, validator: Callable[[str, bytes], Verdict[R]], *, max_message_size: int | None = None
    ) -> trio.MemoryReceiveChannel[GossipMessage[R]]:
        """Join ``topic``; validated messages arrive on the returned channel, each with its validator's record.

        The channel holds ``delivery_queue_size`` messages; when the
        application lags beyond that, new messages are dropped and counted in
        ``metrics.dropped[topic]``.
        """
        if topic in self._topics:
            raise ValueError(f"already subscribed to topic {topic!r}")
        max_size = self.config.max_message_size if max_message_size is None else max_message_size
        if not 0 < max_size <= self.config.max_message_size:
            raise ValueError(
                f"max_message_size for topic {topic!r} must be in 1..{self.config.max_message_size}, got {max_size}"
            )
        send, receive = trio.open_memory_channel[GossipMessage[Any]](self.config.delivery_queue_size)
        self._topics[topic] = _Topic(topic, validator, max_size, send, receive)
        self.pubsub.set_topic_validator(topic, self._libp2p_validator(topic), False)
        await self.pubsub.subscribe(topic)
        log(logger, logging.DEBUG, "gossip_subscribed", topic=topic, max_size=max_size)
        return receive

    async def publish(self, topic: str, data: bytes) -> None:
        """Validate locally, wait for outbound room, then publish.

        Raises :class:`MessageTooLarge` or :class:`PublishRejected` instead of
        sending something every peer would reject.
        """
        entry = self._topics.get(topic)
        limit = entry.max_size if entry is not None else self.config.max_message_size
        if len(data) > limit:
            raise MessageTooLarge(f"message of {len(data)} bytes for topic {topic!r} exceeds the limit of {limit}")
        if entry is not None:
            verdict = self._run_validator(entry, self._self_b58, data)
            if not verdict.accepted:
                raise PublishRejected(
                    f"own message on topic {topic!r} {verdict.outcome.value}ed by its validator: {verdict.reason}"
                )
        await self.wait_for_outbound_room()
        token = _validated_records.set({topic: verdict.record} if entry is not None else {})
        try:
            await self.pubsub.publish(topic, data)
        finally:
            _validated_records.reset(token)
        self.metrics.published[topic] += 1
        # pubsub.publish may complete without a checkpoint; let senders run.
        await trio.lowlevel.checkpoint()

    async def wait_for_outbound_room(self) -> None:
        """Block while any peer's outbound RPC queue is at the high-water mark.

        RpcQueue offers no "popped" event, so this polls every millisecond,
        only while a queue is that full.
        """
        high = self.config.publish_high_water
        if all(len(q) < high for q in self.pubsub.peer_queues.values()):
            return
        self.metrics.publish_waits += 1
        # Bounded: a peer whose queue never drains (a stuck stream, a dead connection not yet noticed)
        # must cost that peer its messages, not silence the node; an unbounded wait stalled consensus.
        with trio.move_on_after(self.config.publish_max_wait):
            while any(len(q) >= high for q in self.pubsub.peer_queues.values()):
                await trio.sleep(0.005)
            return
        self.metrics.publish_wait_timeouts += 1

    def topic_peers(self, topic: str) -> set[str]:
        return {p.to_base58() for p in self.pubsub.peer_topics.get(topic, set())}

    def mesh_peers(self, topic: str) -> set[str]:
        return {p.to_base58() for p in self.router.mesh.get(topic, set())}

    async def aclose(self) -> None:
        for entry in self._topics.values():
            await entry.send.aclose()

    # -- libp2p callbacks (sync, called from inside Pubsub.push_msg) ---------

    def _libp2p_validator(self, topic: str) -> Callable[[ID, rpc_pb2.Message], bool]:
        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            if forwarder == self._self_id:
                return True  # our own publication, validated in publish()
            entry = self._topics.get(topic)
            if entry is None:
                return False
            peer = forwarder.to_base58()
            token = _origin.set(ID(msg.from_id).to_base58() if msg.from_id else None)
            try:
                verdict = self._run_validator(entry, peer, msg.data)
            finally:
                _origin.reset(token)
            if verdict.accepted and not self._peer_rates.allow((peer, topic)):
                verdict = self._over_peer_rate(topic, peer)
            self._account(topic, peer, verdict)
            records = _validated_records.get()
            if verdict.accepted and records is not None:
                records[topic] = verdict.record
            return verdict.accepted

        return validate

    def _over_peer_rate(self, topic: str, peer: str) -> Verdict[Any]:
        """A message ``peer`` sent over its ``peer_rate`` on ``topic``: dropped, and the peer charged once a second."""
        if self._peer_charges.allow(peer):
            return reject(PEER_RATE_REASON)
        return ignore(PEER_RATE_REASON)

    def _run_validator(self, entry: _Topic, peer: str, data: bytes) -> Verdict[Any]:
        if len(data) > entry.max_size:
            return reject("oversized")
        try:
            verdict = entry.validator(peer, data)
        except Exception as exc:  # a validator bug must not take the node down
            log(logger, logging.ERROR, "validator_crashed", topic=entry.name, peer=peer, error=repr(exc))
            return reject("validator_error")
        if not isinstance(verdict, Verdict):
            log(logger, logging.ERROR, "validator_bad_return", topic=entry.name, returned=type(verdict).__name__)
            return reject("validator_error")
        return verdict

    def report_rejection(self, topic: str, peer: str, reason: str, detail: str = "") -> None:
        """Account a message the application found invalid after delivery, like a validator rejection.

        Some checks cannot run in a validator (consensus checks vote signatures
        lazily, in aggregate); their verdicts must still count, score and ban
        the sender the same way.
        """
        self._account(topic, peer, reject(reason), detail)

    def _account(self, topic: str, peer: str, verdict: Verdict, detail: str = "") -> None:
        if verdict.outcome is Outcome.REJECT:
            self.metrics.rejected[(topic, verdict.reason)] += 1
            log(logger, logging.INFO, "gossip_rejected", topic=topic, peer=peer, reason=verdict.reason,
                **({"detail": detail} if detail else {}))
            self._penalize(peer, topic, verdict.reason, detail)
        elif verdict.outcome is Outcome.IGNORE:
            self.metrics.ignored[(topic, verdict.reason)] += 1

    def _deliver(self, msg: rpc_pb2.Message) -> None:
        origin = ID(msg.from_id)
        records = _validated_records.get() or {}
        for topic in msg.topicIDs:
            entry = self._topics.get(topic)
            if entry is None:
                continue
            item = GossipMessage(
                topic=topic,
                data=msg.data,
                origin=origin.to_base58(),
                msg_id=content_message_id(msg),
                local=origin == self._self_id,
                record=records.get(topic),
            )
            try:
                entry.send.send_nowait(item)
            except trio.WouldBlock:
                self.metrics.dropped[topic] += 1
                log(logger, logging.WARNING, "gossip_dropped", topic=topic, reason="queue_full")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.metrics.dropped[topic] += 1
                log(logger, logging.DEBUG, "gossip_dropped", topic=topic, reason="reader_closed")
            else:
                self.metrics.delivered[topic] += 1

    def _bad_envelope(self, forwarder: ID) -> None:
        """A message whose libp2p envelope signature does not verify: charged to the peer that sent it."""
        self._account("envelope", forwarder.to_base58(), reject("bad_envelope_signature"))

    def _bad_rpc(self, peer: ID, reason: str) -> None:
        """A pubsub RPC over the size limit or that does not parse: charged to the peer that sent it."""
        self._account("rpc", peer.to_base58(), reject(reason))

    def _count_duplicate(self, topic: str) -> None:
        self.metrics.duplicates += 1
        self.metrics.duplicates_by_topic[topic] += 1


def stats(router: GossipRouter) -> dict[str, Any]:
    """Mesh view for status pages: peers per topic and in-mesh peers."""
    return {
        topic: {"peers": len(router.topic_peers(topic)), "mesh": len(router.mesh_peers(topic))}
        for topic in router._topics
    }
