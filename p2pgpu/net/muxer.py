"""Yamux whose read loop never waits for the connection's writer.

The defect (py-libp2p 0.8.1, ``stream_muxer/yamux/yamux.py``): one task per
connection, ``Yamux.handle_incoming``, reads every frame, and it answers some
frames itself -- the ACK of a peer's new stream (SYN), the RST of a duplicate
SYN, the answer to a ping -- with ``await self._write_frame(...)``. That write
queues on the connection's write lock behind stream writers, and a stream
writer blocks while the TCP send buffer is full. When both ends push bulk
data at once (data plane transfers both ways) each send buffer fills while
the other side's read loop waits on its own write lock for an ACK, and
neither read loop reads again: every stream on the connection stalls for
good, and new streams open on the server (its handler runs) but the client
never reads the multistream answer, so ``host.new_stream`` times out
("timed out opening /p2pgpu/data/1 stream"). Gossip keeps flowing through
other peers, so the node looks alive. ``tests/net/test_muxer.py`` reproduces
it on two hosts; the lock dump showed every read loop parked in
``_write_frame`` and every write lock held by a writer in ``wait_writable``.

The fix: frames written *from the read loop task* go into a bounded queue
that a companion task writes out (through the same write lock, so Noise
frames stay whole and in nonce order), and the read loop goes straight back
to reading. A read loop that always reads means each side's send buffer
always drains, so no cycle can form. An ACK may now reach the wire after the
first data of its stream; py-libp2p's reader accepts DATA on a stream it
opened whether or not the ACK came first (as go-yamux does).

If a peer sends more than :data:`MAX_PENDING_CONTROL` frames that need an
answer while not reading our answers, it is stuck or hostile: the connection
is closed (discovery redials) rather than letting the read loop block.

A second defect broke connections under CPU load: a frame write is not
cancel-safe once it holds the write lock. Noise encrypts the frame with the
connection's next nonce and only then awaits the socket (a lock, then the
send, each a checkpoint). A caller whose deadline passed while it queued for
the write lock -- a close bounded by ``CLEANUP_SECONDS``, a request timeout --
is handed the lock by trio without a cancellation check, and is cancelled at
the socket write's first checkpoint: the nonce is spent and no byte sent (or
half a frame is), the peer fails to decrypt the next frame ("Failed
authentication of message") and closes the connection with every stream on
it. On two loaded cores the 100-request quota test lost a connection this way
in about one run of ten. So once a writer holds the lock, its frame is written
whole, shielded from the caller's cancellation; the caller's cancellation
takes effect right after. Waiting for the lock stays cancellable (nothing is
encrypted yet). A frame that cannot be written within
:data:`FRAME_WRITE_SECONDS` means the peer has not read for that long (its
read loop always reads, see above): that connection is closed, since a half
written frame would break it anyway.

py-libp2p's ``MuxerMultistream.new_conn`` builds ``Yamux`` by name for
``/yamux/1.0.0`` whatever class the muxer options give, so
:class:`MuxerSelect` (installed per host by :func:`install`) builds the
class from the options instead.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.abc import IHost, IMuxedConn, ISecureConn
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedConnUnavailable
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

from .log import log

logger = logging.getLogger(__name__)

MAX_PENDING_CONTROL = 4096
"""Frames the read loop may queue for the writer (12 bytes each) before the
connection is judged stuck and closed."""

FRAME_WRITE_SECONDS = 30.0
"""Longest one frame may take to reach the socket once it holds the write lock (shielded from the caller's
cancellation); past it the peer is not reading and the connection is closed. A live peer reads all the time, so a
frame (at most 64 KiB of payload) leaves in far less even on a starved host."""


class ReadLoopSafeYamux(Yamux):
    """``Yamux`` whose read loop hands its own writes to a companion task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_loop: trio.lowlevel.Task | None = None
        self._control_send, self._control_receive = trio.open_memory_channel[bytes](MAX_PENDING_CONTROL)

    async def handle_incoming(self) -> None:
        self._read_loop = trio.lowlevel.current_task()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_control_frames)
            try:
                await super().handle_incoming()
            finally:
                nursery.cancel_scope.cancel()

    async def _write_frame(self, data: bytes) -> None:
        if trio.lowlevel.current_task() is not self._read_loop:
            await self._write_whole_frame(data)
            return
        try:
            self._control_send.send_nowait(data)
        except trio.WouldBlock:
            log(logger, logging.WARNING, "yamux_control_backlog", peer=self.peer_id, pending=MAX_PENDING_CONTROL)
            # handle_incoming closes the connection on any error once this is set.
            self.event_shutting_down.set()
            raise MuxedConnUnavailable(
                f"peer {self.peer_id} sent {MAX_PENDING_CONTROL} frames needing an answer without reading ours"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the writer stopped: the connection is going down, nothing more gets out
        await trio.lowlevel.checkpoint()

    async def _write_control_frames(self) -> None:
        async with self._control_receive:
            async for frame in self._control_receive:
                try:
                    await self._write_whole_frame(frame)
                except Exception as exc:  # connection lost; the read loop sees it and cleans up
                    log(logger, logging.DEBUG, "yamux_control_write_failed", peer=self.peer_id, error=repr(exc))
                    return

    async def _write_whole_frame(self, data: bytes) -> None:
        """Write one frame whole, or close the connection: never leave the Noise nonce or a half frame behind.

        Replaces ``Yamux._write_frame`` (the same write lock, so frames stay
        whole and in nonce order), whose write a caller's cancellation could
        interrupt after Noise had encrypted the frame (see the module
        docstring). The caller's cancellation is delivered at the checkpoint
        after the write.
        """
        async with self._write_lock:  # waiting here is cancellable: nothing is encrypted yet
            with trio.CancelScope(shield=True):
                with trio.move_on_after(FRAME_WRITE_SECONDS) as stalled:
                    await self.secured_conn.write(data)
                if stalled.cancelled_caught:
                    await self._close_stalled()
        if stalled.cancelled_caught:
            raise MuxedConnUnavailable(
                f"a frame to peer {self.peer_id} did not reach the socket within {FRAME_WRITE_SECONDS} s: "
                "connection closed"
            )
        await trio.lowlevel.checkpoint()

    async def _close_stalled(self) -> None:
        """Close the socket under a connection whose frame write stalled (partly written, maybe).

        The read loop then fails its read and runs Yamux's own cleanup (streams
        reset, the swarm told), as for a connection the peer dropped. Called
        with the write lock held, so no other frame goes out meanwhile.
        """
        log(logger, logging.WARNING, "yamux_write_stalled", peer=self.peer_id, seconds=FRAME_WRITE_SECONDS)
        # not event_shutting_down: the read loop would leave without its cleanup; its failed read runs it
        with trio.move_on_after(1.0):
            try:
                await self.secured_conn.close()
            except Exception as exc:
                log(logger, logging.DEBUG, "yamux_close_failed", peer=self.peer_id, error=repr(exc))


def release_stream_slot(raw: Any) -> bool:
    """Give back the outbound-stream slot of a stream whose close or reset was cut short.

    py-libp2p's Yamux lets a connection hold at most 256 outbound streams
    (``stream_backlog_semaphore``) and returns a stream's slot at the end of
    ``close()``/``reset()``, after writing the FIN or RST. That write waits for
    the connection's write lock, which a bulk transfer can hold for seconds on
    a loaded machine; a close bounded by a timeout (as ours are, so cleanup
    never hangs a caller) is then cancelled before the slot is returned, and
    the slot is lost. After 256 such losses every new stream to that peer
    waits for a slot for ever: "timed out opening ... stream", while gossip
    on the old streams flows on, and the peer never sees a request. Returns
    whether a slot was given back.
    """
    stream = getattr(raw, "muxed_stream", raw)
    if not isinstance(stream, YamuxStream) or stream._backlog_slot_released:
        return False
    stream._backlog_slot_released = True
    if not stream._owns_backlog_slot:
        return False
    stream.conn.stream_backlog_semaphore.release()
    return True


class MuxerSelect(MuxerMultistream):
    """``MuxerMultistream`` that builds the negotiated muxer class from its options."""

    async def new_conn(self, conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        protocol, transport_class = await self._selector.select(conn, conn.is_initiator, self.negotiate_timeout)
        return self._annotate_connection(transport_class(conn, peer_id), conn, protocol)


def install(host: IHost) -> None:
    """Make ``host``'s swarm use the muxer classes it was configured with (ours)."""
    upgrader = host.get_network().upgrader  # type: ignore[attr-defined]
    current = upgrader.muxer_multistream
    upgrader.muxer_multistream = MuxerSelect(dict(current.transports), current.negotiate_timeout)
