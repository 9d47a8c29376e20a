"""The provider-to-client link: a bid, a decline or a result hint goes to the one node that reads it.

A bid has one reader, the client that posted the task, yet on ``/bid``
gossip every bid reached every node of the market mesh, about three copies
each, and each copy cost its receiver a Yamux frame, a Noise decryption, a
protobuf parse, a message id and a seen check (and its sender the same on
the way out). Under the load bench bids were a third of the messages a
market node handled. Here a provider keeps one stream open to each client
it bids to (``/p2pgpu/bidlink/1``) and writes each message as one frame.

The link asks for no reach that bidding did not already need: a provider
fetches a task's spec and inputs from the announce's ``data_peer``, the
client's own node, and the link goes to that same peer. ``/bid`` gossip
stays the fallback: a message whose link cannot be opened, breaks, or is
backed up goes there, and clients still follow the topic.

Frames are one kind byte and a payload:

* ``BID``: a ``/bid`` message as gossip carries it (a bid with its start,
  or a decline), judged by the same validator (schema, chain, window,
  signature, replay), so a bid that came both ways counts once.
* ``COMMITMENT``: the provider's signed ``CommitResult`` transaction, a
  hint that the result can be fetched before the block that makes the
  commitment final (a client does not follow ``/tx``). Only the committing
  provider's own peer may send it (the stream's peer is authenticated by
  Noise); the client accepts the result bytes only once the commitment is
  final, so a hint can cost at most one early fetch.

Task data travels on the link too, both ways, sealed as the data plane
would have sealed it (a body and a header wrapping its key for the
reader's X25519 key), so the reader checks and keeps it exactly as a
fetched body (:meth:`p2pgpu.dataplane.DataPlane.accept_pushed_sealed`) and
its fetch then finds it in the store, with no stream opened and no round
trip:

* ``HELLO``: a node's X25519 public key (nobody publishes these keys,
  :mod:`p2pgpu.sealed`; each names its own, over a connection Noise
  authenticates). A client writes its own first on every link it accepts;
  a provider that reads it answers with its own, and from then on knows the
  link's client reads the frames below. A provider built before this drops
  what a client writes, so it never answers, and a client built before
  this never says it, so it is never sent what it could not read.
* ``INPUTS`` (client to provider): an :class:`InputsPush`, the task's
  sealed inputs for the provider the client has just chosen, sent with its
  ``Assign``: in hand when the ``Assign`` is final. Taken only for a task
  that client posted and the provider bid on.
* ``RESULT`` (provider to client, before its ``COMMITMENT``): a
  :class:`ResultPush`, the result the provider commits to, which the
  client's early fetch then finds. Taken only for a task of the client's
  that this provider runs, and only if it checks out.

A push that is missing (no key yet, the link is not open, over
:data:`MAX_PUSH_BYTES`, which is not a transfer made of round trips) or
that does not check out leaves the fetch to do what it always did.

The pure parts (framing) are functions; :class:`BidLinks` (outbound) and
:func:`serve_bid_links` (inbound) are the Trio shell.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import trio

from ledger.codec import Bytes, DecodeError, Hash32, ListOf, Nested, Record, decode, encode, record
from p2pgpu.dataplane.identity import PeerKeys
from p2pgpu.net import ProtocolError
from p2pgpu.net.errors import NetError
from p2pgpu.net.log import log
from p2pgpu.net.reqresp import FramedStream

if TYPE_CHECKING:  # trio 0.35 has trio.TaskStatus; libp2p pulls in trio-typing's older stubs, where it lives here
    from trio_typing import TaskStatus

logger = logging.getLogger(__name__)

__all__ = ["BID_LINK_PROTOCOL", "BidLinks", "ClientLinks", "InputsPush", "LinkKind", "PushedInput", "ResultPush",
           "decode_hello", "decode_inputs_push", "decode_link_frame", "decode_result_push", "encode_link_frame",
           "serve_bid_links"]

BID_LINK_PROTOCOL = "/p2pgpu/bidlink/1"

LINK_IDLE_SECONDS = 20.0
"""A provider closes a link nothing was written to for this long (it holds one of its outbound stream slots)."""
LINK_SERVE_IDLE_SECONDS = 2 * LINK_IDLE_SECONDS
"""A client ends an inbound link silent for this long: its provider should have closed it already."""
LINK_WRITE_SECONDS = 5.0
"""A frame that cannot be written within this goes by gossip, and the link is closed."""
LINK_QUEUE = 256
"""Frames waiting for one link; past this a message goes by gossip instead."""
MAX_LINKS = 256
"""Links a provider keeps open at once; a message for one more client goes by gossip."""
LINK_WRITE_BATCH_BYTES = 1 << 20
"""Frames queued for one link go out together in one write up to about this many bytes."""
LINK_RETRY_SECONDS = 30.0
"""After a link to a client failed (it cannot be reached, or does not speak the protocol: an older node), its
messages go by gossip for this long before a link is tried again."""
MAX_LINK_FRAME_BYTES = 64 << 10
"""The largest frame a client reads on a link: a bid, a decline or a signed CommitResult is well under 2 KiB,
and the stream's own limit (4 MiB) is the data plane's."""


MAX_PUSH_BYTES = 256 << 10
"""A task's sealed inputs are pushed with its ``Assign`` only up to this many bytes in all; bigger ones are fetched
(the data plane streams them with resume, and one round trip more is nothing next to the transfer)."""
MAX_PUSH_INPUTS = 64
"""Inputs one push may carry (a spec with more is fetched)."""
MAX_PUSH_HEADER_BYTES = 4096
"""A one-wrap sealed header is ~150 bytes."""
MAX_PUSH_FRAME_BYTES = MAX_PUSH_BYTES + MAX_PUSH_INPUTS * (MAX_PUSH_HEADER_BYTES + 64) + 64
"""The largest frame a provider reads from a client on a link."""
PUSH_WRITE_SECONDS = 2.0
"""A push that cannot be written within this is given up (the provider fetches the inputs)."""
MAX_QUEUED_PUSH_BYTES = 8 << 20
"""Result pushes one link may hold unwritten; past it a result is not pushed (its client fetches it), so a client
that reads slowly cannot make a provider hold its results in memory (256 frames of 256 KiB each otherwise)."""
PROVIDER_KEY_WAIT_SECONDS = 1.0
"""How long a client waits for a new link's ``HELLO`` answer before pushing a task's inputs: a provider's first
bid on a new link often comes before its answer, and the push is only needed by the time the ``Assign`` is final."""
MAX_PUSHES_WAITING = 8
"""Input pushes that may wait for one link at once; past it a push is skipped (the provider fetches the inputs),
so a provider that reads slowly cannot make a client hold every assigned task's inputs in memory."""


class LinkKind(enum.IntEnum):
    BID = 1
    COMMITMENT = 2
    INPUTS = 3
    """Client to provider: an :class:`InputsPush`."""
    HELLO = 4
    """Either way: the writer's X25519 public key (32 bytes)."""
    RESULT = 5
    """Provider to client: a :class:`ResultPush`."""


X25519_KEY_BYTES = 32


@record
class PushedInput(Record):
    name: Hash32
    """SHA-256 of the plaintext: the input's name in the spec."""
    header: Annotated[bytes, Bytes(MAX_PUSH_HEADER_BYTES, 1)]
    """A :class:`~p2pgpu.sealed.SealedHeader` with one wrap, for the provider."""
    body: Annotated[bytes, Bytes(MAX_PUSH_BYTES, 1)]


@record
class InputsPush(Record):
    """A task's sealed inputs, from its client to the provider it assigned the task to (``INPUTS`` frame)."""

    task_id: Hash32
    inputs: Annotated[tuple[PushedInput, ...], ListOf(Nested(PushedInput), MAX_PUSH_INPUTS, 1)]

    @property
    def body_bytes(self) -> int:
        return sum(len(i.body) for i in self.inputs)


@record
class ResultPush(Record):
    """The sealed result a provider commits to, for its client (``RESULT`` frame, sent before the ``COMMITMENT``)."""

    task_id: Hash32
    result: PushedInput


def encode_result_push(push: ResultPush) -> bytes:
    return encode_link_frame(LinkKind.RESULT, encode(push))


def decode_result_push(payload: bytes) -> ResultPush:
    """The push a ``RESULT`` frame carries; :class:`ProtocolError` naming what is wrong with anything else."""
    try:
        return decode(ResultPush, payload)
    except DecodeError as exc:
        raise ProtocolError(f"bid-link result push does not decode: {exc}") from None


def decode_hello(payload: bytes) -> bytes:
    """The X25519 key a ``HELLO`` frame names; :class:`ProtocolError` for anything but 32 bytes."""
    if len(payload) != X25519_KEY_BYTES:
        raise ProtocolError(f"bid-link HELLO of {len(payload)} bytes: an X25519 key is {X25519_KEY_BYTES}")
    return payload


def encode_inputs_push(push: InputsPush) -> bytes:
    return encode_link_frame(LinkKind.INPUTS, encode(push))


def decode_inputs_push(payload: bytes) -> InputsPush:
    """The push an ``INPUTS`` frame carries; :class:`ProtocolError` naming what is wrong with anything else."""
    try:
        push = decode(InputsPush, payload)
    except DecodeError as exc:
        raise ProtocolError(f"bid-link inputs push does not decode: {exc}") from None
    if push.body_bytes > MAX_PUSH_BYTES:
        raise ProtocolError(f"bid-link inputs push of {push.body_bytes} bytes exceeds {MAX_PUSH_BYTES}")
    if len({i.name for i in push.inputs}) != len(push.inputs):
        raise ProtocolError("bid-link inputs push names one input twice")
    return push


def encode_link_frame(kind: LinkKind, payload: bytes) -> bytes:
    return bytes((kind,)) + payload


def decode_link_frame(frame: bytes) -> tuple[LinkKind, bytes]:
    """The frame's kind and payload; :class:`ProtocolError` naming the problem for anything else."""
    if not frame:
        raise ProtocolError("empty bid-link frame")
    try:
        kind = LinkKind(frame[0])
    except ValueError:
        raise ProtocolError(f"bid-link frame of unknown kind {frame[0]}") from None
    if len(frame) == 1:
        raise ProtocolError(f"bid-link {kind.name} frame with no payload")
    return kind, frame[1:]


@dataclass(slots=True)
class _Queued:
    frame: bytes
    gossip: bytes | None
    """The same message as ``/bid`` gossip carries it, sent there if the link cannot take the frame."""
    push_bytes: int = 0
    """The frame's size if it is a result push (counted in :attr:`_Link.push_bytes` until written)."""


@dataclass(slots=True)
class _Link:
    send: trio.MemorySendChannel[_Queued]
    in_hand: list[_Queued] = field(default_factory=list)
    """Taken from the queue and not yet written: given to gossip if the link ends now."""
    reads_pushes: bool = False
    """The client said ``HELLO`` on this link: it reads ``HELLO`` and ``RESULT`` frames."""
    push_bytes: int = 0
    """Result pushes queued on this link and not yet written (bounded by :data:`MAX_QUEUED_PUSH_BYTES`)."""


class BidLinks:
    """Outbound links, one per client peer, each fed by a bounded queue and written by its own task.

    ``send`` never waits: the market roles call it while they handle an
    event. A link opens on its first message and closes after
    :data:`LINK_IDLE_SECONDS` without one; what a failed link still held is
    published on ``/bid`` through ``fallback`` (hints are dropped: the client
    then fetches once the block lands, as it would have anyway).
    """

    def __init__(self, open_stream: Callable[[str, str], AbstractAsyncContextManager[FramedStream]],
                 fallback: Callable[[bytes], None], *, on_inputs: Callable[[str, bytes], None] | None = None,
                 own_key: bytes | None = None,
                 idle_seconds: float = LINK_IDLE_SECONDS, write_seconds: float = LINK_WRITE_SECONDS,
                 queue_size: int = LINK_QUEUE, max_links: int = MAX_LINKS,
                 retry_seconds: float = LINK_RETRY_SECONDS) -> None:
        self._open_stream = open_stream
        self._on_inputs = on_inputs
        """Called with (client peer, payload) for each ``INPUTS`` frame a client writes on a link; it may raise
        :class:`ProtocolError`, which ends the link."""
        self._own_key = own_key
        """Our X25519 public key, the ``HELLO`` we answer a client's with (None: we never answer)."""
        self._client_keys = PeerKeys(4 * max_links)
        """Client peer -> the X25519 key its last ``HELLO`` named (bounded)."""
        self._retry = retry_seconds
        self._failed_until: dict[str, float] = {}
        """Peers whose last link failed -> when a link may be tried again (until then: gossip)."""
        self._fallback = fallback
        self._idle = idle_seconds
        self._write = write_seconds
        self._queue_size = queue_size
        self._max_links = max_links
        self._links: dict[str, _Link] = {}
        self._nursery: trio.Nursery | None = None
        self.counters: Counter[str] = Counter()
        """``sent`` frames, ``gossiped`` messages that fell back to gossip, ``dropped`` hints, ``opened``/``failed`` links."""

    @property
    def open_links(self) -> int:
        return len(self._links)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the links' tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def send_bid(self, peer: str | None, data: bytes) -> None:
        """A ``/bid`` message for the client at ``peer`` (None: its peer is not known, so gossip)."""
        self._send(peer, encode_link_frame(LinkKind.BID, data), data)

    def send_commitment(self, peer: str | None, signed_tx: bytes) -> None:
        """The provider's signed ``CommitResult`` for the client at ``peer``: a hint, dropped if it cannot go."""
        self._send(peer, encode_link_frame(LinkKind.COMMITMENT, signed_tx), None)

    def client_key(self, peer: str) -> bytes | None:
        """The X25519 key the client at ``peer`` named in its last ``HELLO``, if one came."""
        return self._client_keys.get(peer)

    def reads_pushes(self, peer: str) -> bool:
        """Whether our open link to the client at ``peer`` reads pushes (its client said ``HELLO`` on it)."""
        link = self._links.get(peer)
        return link is not None and link.reads_pushes

    def send_result(self, peer: str | None, push: ResultPush) -> bool:
        """``push`` to the client at ``peer`` if its link is open and reads pushes; False (nothing sent) if not."""
        if peer is None or not self.reads_pushes(peer):
            return False
        link = self._links[peer]
        frame = encode_result_push(push)
        if link.push_bytes + len(frame) > MAX_QUEUED_PUSH_BYTES:
            self.counters["push_backed_up"] += 1
            return False
        try:
            link.send.send_nowait(_Queued(frame, None, len(frame)))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.counters["push_backed_up"] += 1
            return False
        link.push_bytes += len(frame)
        return True

    def _send(self, peer: str | None, frame: bytes, gossip: bytes | None) -> None:
        item = _Queued(frame, gossip)
        link = self._links.get(peer) if peer is not None else None
        if link is None and peer is not None and self._nursery is not None and len(self._links) < self._max_links \
                and not self._failed_recently(peer):
            send, receive = trio.open_memory_channel[_Queued](self._queue_size)
            link = self._links[peer] = _Link(send)
            self._nursery.start_soon(self._serve_link, peer, link, receive)
        if link is None:
            self._give_up([item])
            return
        try:
            link.send.send_nowait(item)
        except trio.WouldBlock:
            self._give_up([item])

    def _give_up(self, items: list[_Queued]) -> None:
        for item in items:
            if item.gossip is not None:
                self.counters["gossiped"] += 1
                self._fallback(item.gossip)
            else:
                self.counters["dropped"] += 1

    def _retire(self, peer: str, link: _Link, receive: trio.MemoryReceiveChannel[_Queued]) -> list[_Queued]:
        """Take the link out of service (new messages open a new one) and return what it still held."""
        if self._links.get(peer) is link:
            del self._links[peer]
        left: list[_Queued] = []
        while True:
            try:
                left.append(receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return left

    async def _serve_link(self, peer: str, link: _Link, receive: trio.MemoryReceiveChannel[_Queued]) -> None:
        try:
            async with self._open_stream(peer, BID_LINK_PROTOCOL) as stream:
                self.counters["opened"] += 1
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch, peer, link, stream, nursery.cancel_scope)
                    try:
                        await self._pump(peer, link, receive, stream)
                    except (NetError, trio.TooSlowError) as exc:
                        self._failed(peer, exc)
                    nursery.cancel_scope.cancel()
        except NetError as exc:  # opening it
            self._failed(peer, exc)
        finally:
            left, link.in_hand = link.in_hand, []
            self._give_up(left + self._retire(peer, link, receive))

    def _failed_recently(self, peer: str) -> bool:
        until = self._failed_until.get(peer)
        if until is None:
            return False
        if trio.current_time() < until:
            return True
        del self._failed_until[peer]
        return False

    def _failed(self, peer: str, exc: Exception) -> None:
        now = trio.current_time()
        if len(self._failed_until) >= 4 * self._max_links:  # bounded: forget the expired, else the oldest
            for p in [p for p, t in self._failed_until.items() if t <= now] or list(self._failed_until)[:1]:
                del self._failed_until[p]
        self._failed_until[peer] = now + self._retry
        self.counters["failed"] += 1
        log(logger, logging.INFO, "bid_link_failed", peer=peer, error=type(exc).__name__, detail=str(exc))

    async def _pump(self, peer: str, link: _Link, receive: trio.MemoryReceiveChannel[_Queued],
                    stream: FramedStream) -> None:
        """Write what is queued, in order, until the link has been idle for ``idle_seconds``: whatever is
        waiting goes in one write (up to :data:`LINK_WRITE_BATCH_BYTES`), since a block that assigns a burst of
        tasks queues a burst of results and hints, and each write is a muxer frame and an encryption."""
        while True:
            with trio.move_on_after(self._idle):
                link.in_hand = [await receive.receive()]
            idle = not link.in_hand
            if idle:
                # out of service first (no await in between), then write what came meanwhile (normally none)
                link.in_hand = self._retire(peer, link, receive)
            else:
                size = len(link.in_hand[0].frame)
                while size < LINK_WRITE_BATCH_BYTES:
                    try:
                        item = receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    link.in_hand.append(item)
                    size += len(item.frame)
            if link.in_hand:
                with trio.fail_after(self._write):
                    await stream.send_many([item.frame for item in link.in_hand])
                self.counters["sent"] += len(link.in_hand)
                link.push_bytes -= sum(item.push_bytes for item in link.in_hand)
                link.in_hand = []
            if idle:
                return

    async def _watch(self, peer: str, link: _Link, stream: FramedStream, link_scope: trio.CancelScope) -> None:
        """Read what the client writes: its ``HELLO`` (answered with ours), ``INPUTS`` frames, and its END or
        ERROR (it refused a frame, or shuts down), which ends our side.

        Without this a provider would go on writing frames that nobody reads
        into a stream the client closed; now they go by gossip.
        """
        try:
            while (frame := await stream.receive()) is not None:
                if len(frame) > MAX_PUSH_FRAME_BYTES:
                    raise ProtocolError(f"bid-link frame of {len(frame)} bytes from the client exceeds "
                                        f"{MAX_PUSH_FRAME_BYTES}")
                kind, payload = decode_link_frame(frame)
                if kind is LinkKind.HELLO:
                    self._hello_from(peer, link, decode_hello(payload))
                elif kind is LinkKind.INPUTS:
                    self.counters["inputs_received"] += 1
                    if self._on_inputs is not None:
                        self._on_inputs(peer, payload)
                else:
                    raise ProtocolError(f"a client sent a {kind.name} frame on a bid link")
        except NetError as exc:
            log(logger, logging.INFO, "bid_link_ended_by_client", peer=peer, error=type(exc).__name__,
                detail=str(exc))
        link_scope.cancel()

    def _hello_from(self, peer: str, link: _Link, key: bytes) -> None:
        """The client on ``link`` said HELLO: it reads pushes (this link only: a new link is asked anew)."""
        self._client_keys.note(peer, key)
        if not link.reads_pushes:
            link.reads_pushes = True
            if self._own_key is not None:
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    link.send.send_nowait(_Queued(encode_link_frame(LinkKind.HELLO, self._own_key), None))


class ClientLinks:
    """A client's open inbound links, by provider peer: the way back to a provider for :meth:`push`.

    A provider holds at most one link to us at a time (a new one replaces
    the old here; both end on their own). Writes to one link are serialized.
    """

    def __init__(self, own_key: bytes | None = None) -> None:
        self._links: dict[str, tuple[FramedStream, trio.Lock]] = {}
        self._own_key = own_key
        """Our X25519 public key: the ``HELLO`` written first on every link (None: none, as before pushes)."""
        self._provider_keys = PeerKeys(4 * MAX_LINKS)
        """Provider peer -> the X25519 key its last ``HELLO`` named (bounded)."""
        self._key_waits: dict[str, trio.Event] = {}
        """Provider peer (an open link's) -> set when its ``HELLO`` comes or the link ends."""
        self.counters: Counter[str] = Counter()
        """``pushed`` inputs pushes written, ``push_failed`` ones that could not be."""

    def has(self, peer: str) -> bool:
        return peer in self._links

    def provider_key(self, peer: str) -> bytes | None:
        """The X25519 key the provider at ``peer`` named in its last ``HELLO``, if one came."""
        return self._provider_keys.get(peer)

    async def wait_provider_key(self, peer: str, timeout: float = PROVIDER_KEY_WAIT_SECONDS) -> bytes | None:
        """The provider's key, waiting up to ``timeout`` for the ``HELLO`` of its open link; None if none came
        (no link, an older provider that never answers, or the link ended)."""
        key = self._provider_keys.get(peer)
        if key is not None or peer not in self._links:
            return key
        event = self._key_waits.setdefault(peer, trio.Event())
        with trio.move_on_after(timeout):
            await event.wait()
        return self._provider_keys.get(peer)

    def _note_key(self, peer: str, key: bytes) -> None:
        self._provider_keys.note(peer, key)
        self._wake_key_waiters(peer)

    def _wake_key_waiters(self, peer: str) -> None:
        event = self._key_waits.pop(peer, None)
        if event is not None:
            event.set()

    async def _say_hello(self, stream: FramedStream) -> None:
        """Our ``HELLO``, first on a new link; a link that cannot take it within the write limit is left to
        carry bids only (a provider that never hears it sends no pushes, and it takes none from us)."""
        held = self._links.get(stream.peer)
        if self._own_key is None or held is None or held[0] is not stream:
            return
        with trio.move_on_after(PUSH_WRITE_SECONDS):
            async with held[1]:
                await stream.send(encode_link_frame(LinkKind.HELLO, self._own_key))

    def _add(self, stream: FramedStream) -> None:
        self._links[stream.peer] = (stream, trio.Lock())

    def _remove(self, stream: FramedStream) -> None:
        held = self._links.get(stream.peer)
        if held is not None and held[0] is stream:
            del self._links[stream.peer]
            self._wake_key_waiters(stream.peer)

    async def push(self, peer: str, push: InputsPush, *, timeout: float = PUSH_WRITE_SECONDS) -> bool:
        """Write ``push`` on the link from ``peer``; False if there is none or the write fails (the provider
        then fetches the inputs as it always could)."""
        held = self._links.get(peer)
        if held is None:
            return False
        stream, lock = held
        if lock.statistics().tasks_waiting >= MAX_PUSHES_WAITING:
            self.counters["push_backed_up"] += 1
            return False
        try:
            with trio.fail_after(timeout):
                async with lock:
                    await stream.send(encode_inputs_push(push))
        except (NetError, trio.TooSlowError) as exc:
            self.counters["push_failed"] += 1
            log(logger, logging.INFO, "inputs_push_failed", peer=peer, task=push.task_id.hex()[:16],
                error=type(exc).__name__, detail=str(exc))
            return False
        self.counters["pushed"] += 1
        return True


def serve_bid_links(
    set_stream_handler: Callable[..., None],
    on_bid: Callable[[str, bytes], None],
    on_commitment: Callable[[str, bytes], None],
    *,
    links: ClientLinks | None = None,
    on_result: Callable[[str, bytes], None] | None = None,
    idle_seconds: float = LINK_SERVE_IDLE_SECONDS,
) -> None:
    """Serve inbound links: each ``BID`` frame to ``on_bid(peer, data)``, each hint to ``on_commitment``,
    each ``RESULT`` to ``on_result`` (which must not block: it starts the push's check and store, and a fetch
    of that result, such as the one the hint behind it starts, waits for them: ``DataPlane.expect_push``; a
    link's reader never waits on a worker thread, so a burst of results does not hold up the bids behind it);
    each open link in ``links`` while it lasts (our ``HELLO`` first), for pushes the other way.

    The callbacks judge what they get (and charge the peer for what is
    bad); a frame that is no frame of this protocol ends the link with the
    reason and costs the peer score (``penalize_bad_requests``).
    """

    async def handle(stream: FramedStream) -> None:
        if links is not None:
            links._add(stream)
        try:
            if links is not None:
                await links._say_hello(stream)
            while True:
                frame = None
                with trio.move_on_after(idle_seconds):
                    frame = await stream.receive()
                if frame is None:  # the provider ended the link, or it was silent for too long
                    return
                limit = MAX_PUSH_FRAME_BYTES if frame[:1] == bytes((LinkKind.RESULT,)) else MAX_LINK_FRAME_BYTES
                if len(frame) > limit:
                    raise ProtocolError(f"bid-link frame of {len(frame)} bytes exceeds the limit of {limit}")
                kind, payload = decode_link_frame(frame)
                if kind is LinkKind.BID:
                    on_bid(stream.peer, payload)
                elif kind is LinkKind.COMMITMENT:
                    on_commitment(stream.peer, payload)
                elif kind is LinkKind.HELLO and links is not None:
                    links._note_key(stream.peer, decode_hello(payload))
                elif kind is LinkKind.RESULT and on_result is not None:
                    on_result(stream.peer, payload)
                else:
                    raise ProtocolError(f"a provider sent a {kind.name} frame on a bid link")
        finally:
            if links is not None:
                links._remove(stream)

    set_stream_handler(BID_LINK_PROTOCOL, handle, penalize_bad_requests=True)
