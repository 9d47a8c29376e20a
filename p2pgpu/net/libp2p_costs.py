"""Per-message costs py-libp2p 0.8.1 pays for nothing on our traffic, taken off.

Profiling a validator of an idle 4-node devnet (py-spy) put about a third of
its CPU in places that do no work for us; on a 2-core machine running 7 node
processes, CPU is what consensus latency is made of.

1. **Checking the sender's signed peer record on every pubsub RPC.** Each
   RPC carries the sender's signed peer record (``senderRecord``) and the
   receiver checks it on every RPC, twice (``Pubsub.continuously_read_stream``
   and ``GossipSub.handle_rpc`` both call ``maybe_consume_signed_record``): a
   protobuf parse, an Ed25519 verification and a peerstore update per
   message. A peer sends the same record bytes until its addresses change,
   so :func:`consume_signed_record_once` accepts bytes already accepted from
   that peer, by that host, without checking them again; anything new goes
   through py-libp2p's own check. (~10% of the profile.)
2. **A Yamux WINDOW_UPDATE frame per read.** py-libp2p returns the receive
   window after almost every read, so each gossip message received costs a
   frame written back (Noise encryption and a ``send``).
   :func:`window_update_when_half_consumed` defers to py-libp2p's update
   (with its window auto-tuning) only once half the window has been
   consumed, as go-yamux does. A sender never waits for window it is owed: a
   sender at zero window means the reader's window is spent, so once the
   reader drains its buffer all of it counts as consumed and the update goes
   out. (~9%.) It was taken out once because two gossip tests then lost a
   subscription exchange about 1 run in 12; the cause was a py-libp2p race
   the changed timing exposed (a subscription made while a peer is being
   added, fixed in :class:`p2pgpu.net.gossip.TunedPubsub`), not the window.

3. **Recomputing our addresses for every RPC sent.** ``env_to_send_in_RPC``
   compares the host's current addresses (``get_addrs``: multiaddr
   parsing, ~5% of the profile) with the cached local record's on every
   RPC. :func:`record_to_send` sends the host's current local record as
   long as it is the same record object and younger than
   :data:`RECORD_RECHECK_S`, and asks py-libp2p otherwise. It never sends
   anything but the peerstore's current record: a first attempt reused the
   bytes it had sent for a fixed time, and when py-libp2p issued a newer
   record meanwhile (identify does, when the addresses change) receivers
   dropped whole RPCs carrying the older one.

4. **Two ``recv`` calls per Noise frame, at least.** ``TrioTCPStream.read(n)``
   is ``receive_some(n)``: Noise reads each frame's 2-byte length, then its
   body, each a system call and a scheduler checkpoint, however many frames
   the kernel already holds. :func:`buffered_tcp_read` receives up to
   :data:`TCP_READ_CHUNK` bytes at a time and serves reads from what it
   holds, so a burst of frames costs one ``recv``. Socket and TCP streams
   are read only through ``read`` (one reader at a time, under py-libp2p's
   read lock), so nothing else could miss the bytes it holds.

:func:`install` applies all four; it is idempotent and applies to every
host in the process (caches are kept per host).
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from typing import Any

import libp2p.pubsub.gossipsub as _gossipsub_module
import libp2p.pubsub.pubsub as _pubsub_module
import trio
from libp2p.abc import IHost
from libp2p.io.trio import TrioTCPStream
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.peer import peerstore as _peerstore_module
from libp2p.peer.id import ID
from libp2p.pubsub import utils as _pubsub_utils
from libp2p.stream_muxer.yamux.yamux import YamuxStream

MAX_REMEMBERED_RECORDS = 4096
"""Accepted (peer, record) pairs remembered per host; beyond it the oldest is checked again when seen."""
RECORD_RECHECK_S = 5.0
"""How long the host's current local record is sent before its addresses are compared again."""
TCP_READ_CHUNK = 64 << 10
"""Bytes asked of the socket per ``recv`` by :func:`buffered_tcp_read`."""

_check_signed_record = _pubsub_utils.maybe_consume_signed_record
_stock_window_update = YamuxStream._auto_tune_and_send_window_update
_stock_record_to_send = _peerstore_module.env_to_send_in_RPC
_sending: weakref.WeakKeyDictionary[IHost, tuple[Any, bytes, float]] = weakref.WeakKeyDictionary()
_accepted: weakref.WeakKeyDictionary[IHost, OrderedDict[tuple[ID, bytes], None]] = weakref.WeakKeyDictionary()


def consume_signed_record_once(msg: Any, host: IHost, peer_id: ID) -> bool:
    """``maybe_consume_signed_record``, checking a given peer's record bytes once per host."""
    if not msg.HasField("senderRecord"):
        return True
    accepted = _accepted.get(host)
    if accepted is None:
        accepted = _accepted[host] = OrderedDict()
    key = (peer_id, bytes(msg.senderRecord))
    if key in accepted:
        accepted.move_to_end(key)
        return True
    if not _check_signed_record(msg, host, peer_id):
        return False
    accepted[key] = None
    if len(accepted) > MAX_REMEMBERED_RECORDS:
        accepted.popitem(last=False)
    return True


def record_to_send(host: IHost) -> tuple[bytes, bool]:
    """``env_to_send_in_RPC``, comparing addresses at most every :data:`RECORD_RECHECK_S` per host."""
    now = time.monotonic()
    current = host.get_peerstore().get_local_record()
    cached = _sending.get(host)
    if current is not None and cached is not None and cached[0] is current and now - cached[2] < RECORD_RECHECK_S:
        return cached[1], False
    envelope, created = _stock_record_to_send(host)
    _sending[host] = (host.get_peerstore().get_local_record(), envelope, now)
    return envelope, created


async def window_update_when_half_consumed(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """Return receive window only once half of it is consumed (go-yamux), through py-libp2p's own update."""
    buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
    consumed = self.target_recv_window - (self.recv_window + buffered)
    if consumed < self.target_recv_window // 2:
        return
    await _stock_window_update(self, bytes_read=bytes_read)


async def buffered_tcp_read(self: TrioTCPStream, n: int | None = None) -> bytes:
    """``TrioTCPStream.read``: up to ``n`` bytes (all it holds for None), one ``recv`` for many small reads.

    Same contract as py-libp2p's: at most ``n`` bytes, ``b""`` at EOF or
    once the stream was closed locally, ``ConnectionClosedError`` when the
    peer reset it. What it holds is served before the socket is read again.
    """
    async with self.read_lock:
        if n == 0:
            return b""
        held: bytes = getattr(self, "_p2pgpu_held", b"")
        start: int = getattr(self, "_p2pgpu_start", 0)
        if start >= len(held):
            try:
                held = await self.stream.receive_some(max(n or 0, TCP_READ_CHUNK))
            except trio.BrokenResourceError as error:
                raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}",
                                            transport="tcp") from error
            except trio.ClosedResourceError:
                return b""
            start = 0
        end = len(held) if n is None else min(len(held), start + n)
        self._p2pgpu_held, self._p2pgpu_start = held, end  # type: ignore[attr-defined]
        return held if start == 0 and end == len(held) else held[start:end]


def install() -> None:
    """Take the four costs off for every host of this process (see the module docstring)."""
    _pubsub_module.maybe_consume_signed_record = consume_signed_record_once  # type: ignore[attr-defined]
    _gossipsub_module.maybe_consume_signed_record = consume_signed_record_once  # type: ignore[attr-defined]
    YamuxStream._auto_tune_and_send_window_update = window_update_when_half_consumed  # type: ignore[method-assign]
    _pubsub_module.env_to_send_in_RPC = record_to_send  # type: ignore[attr-defined]
    _gossipsub_module.env_to_send_in_RPC = record_to_send  # type: ignore[attr-defined]
    TrioTCPStream.read = buffered_tcp_read  # type: ignore[method-assign]
