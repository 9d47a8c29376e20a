"""Two-way bulk transfers plus new streams on one connection must not deadlock it.

Regression test for the stream-open timeouts ("timed out opening
/p2pgpu/data/1 stream to peer ..."): with py-libp2p's stock Yamux, whose read
loop writes the ACK of each new inbound stream itself, two hosts pushing bulk
data at each other fill both TCP send buffers while both read loops wait to
write an ACK; neither reads again and the connection is dead for good (see
p2pgpu/net/muxer.py). Here both sides pull data from each other over several
streams while both keep opening short request streams; every transfer and
request must finish. With the stock muxer this stalls within the first
couple of MiB on every run; with ours it takes a few seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import trio

from p2pgpu.net import FramedStream, NetError, Network, RequestContext
from p2pgpu.net.muxer import ReadLoopSafeYamux

from .conftest import FAST, nodes

BULK = "/p2pgpu/test/bulk/1"
ECHO = "/p2pgpu/test/echo/1"
FRAME = 64 << 10
FRAMES_PER_PULL = 96
PULLS_PER_SIDE = 4
REQUESTERS_PER_SIDE = 4
STALL_SECONDS = 20.0
"""No byte and no request moved for this long means the connection is
deadlocked: a starved but live process still moves something every second."""
PATIENT = replace(FAST, request_timeout=60.0)
"""Slow is not what this test is about: only a stall may fail it."""


async def serve_bulk(stream: FramedStream) -> None:
    frames = int(await stream.receive_exactly_one())
    payload = os.urandom(FRAME)
    for _ in range(frames):
        await stream.send(payload)
    await stream.send_end()


async def echo(ctx: RequestContext, data: bytes) -> bytes:
    await trio.lowlevel.checkpoint()
    return data


@dataclass
class Progress:
    received: int = 0
    requests: int = 0
    stalled: bool = False
    last_change: float = field(default_factory=trio.current_time)

    def moved(self) -> None:
        self.last_change = trio.current_time()


async def pull(net: Network, peer: str, progress: Progress) -> None:
    async with net.open_stream(peer, BULK) as stream:
        await stream.send(str(FRAMES_PER_PULL).encode())
        await stream.send_end()
        got = 0
        async for chunk in stream:
            got += len(chunk)
            progress.received += len(chunk)
            progress.moved()
    assert got == FRAMES_PER_PULL * FRAME


async def keep_requesting(net: Network, peer: str, progress: Progress, done: trio.Event) -> None:
    while not done.is_set():
        assert await net.request(peer, ECHO, b"ping") == b"ping"
        progress.requests += 1
        progress.moved()


def _abort_connections(net: Network) -> None:
    """Close every TCP socket under ``net``'s connections.

    A deadlocked connection cannot be closed politely: the tasks holding its
    write lock wait for buffer space for ever, and libp2p's shielded cleanups
    (the reset in ``host.new_stream``, the GO_AWAY in ``Yamux.close``) queue
    behind them. Closing the socket wakes them all with an error, so a stall
    fails this test instead of hanging it.
    """
    for conns in net._host.get_network().connections.values():
        for conn in conns:
            layer: object = conn.muxed_conn
            for _ in range(10):  # Yamux > SecureSession > Noise > packets > RawConnection > TrioTCPStream > socket
                if isinstance(layer, trio.SocketStream):
                    layer.socket.close()  # trio's close wakes the tasks waiting on the socket
                    break
                names = ("secured_conn", "conn", "read_writer", "read_write_closer", "stream")
                layer = next((getattr(layer, name) for name in names if hasattr(layer, name)), None)


async def watch(progress: Progress, nets: tuple[Network, ...], cancel: trio.CancelScope) -> None:
    while trio.current_time() - progress.last_change <= STALL_SECONDS:
        await trio.sleep(1.0)
    progress.stalled = True
    cancel.cancel()
    for net in nets:
        _abort_connections(net)


async def test_two_way_bulk_with_new_streams_does_not_deadlock_the_connection() -> None:
    progress = Progress()
    async with nodes([PATIENT, PATIENT], boot={1: [0]}) as (a, b):
        for net in (a, b):
            net.set_stream_handler(BULK, serve_bulk)
            net.set_handler(ECHO, echo)
        muxers = [conn.muxed_conn for conns in a._host.get_network().connections.values() for conn in conns]
        assert muxers and all(isinstance(m, ReadLoopSafeYamux) for m in muxers)
        progress.moved()
        done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, progress, (a, b), nursery.cancel_scope)
                async with trio.open_nursery() as requests:
                    for me, other in ((a, b), (b, a)):
                        for _ in range(REQUESTERS_PER_SIDE):
                            requests.start_soon(keep_requesting, me, other.peer_id, progress, done)
                    async with trio.open_nursery() as pulls:
                        for me, other in ((a, b), (b, a)):
                            for _ in range(PULLS_PER_SIDE):
                                pulls.start_soon(pull, me, other.peer_id, progress)
                    done.set()
                nursery.cancel_scope.cancel()
        except* NetError:
            if not progress.stalled:
                raise  # a real failure, not the aftermath of aborting a stalled connection
    # (asserted outside the nodes' nurseries, so a failure reads plainly)
    total = 2 * PULLS_PER_SIDE * FRAMES_PER_PULL * FRAME
    assert not progress.stalled, (
        f"connection stalled for {STALL_SECONDS} s after {progress.received} of {total} bytes "
        f"and {progress.requests} requests"
    )
    assert progress.received == total
