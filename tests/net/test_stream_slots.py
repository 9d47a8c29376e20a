"""A close cut short must not keep the connection's outbound-stream slot (p2pgpu/net/muxer.py).

py-libp2p's Yamux gives a connection 256 outbound stream slots and returns a
slot at the end of ``close()``, after writing the FIN. On a loaded node that
write waits behind a bulk transfer for longer than our bounded cleanup
(``CLEANUP_SECONDS``); the close is cancelled and, before the fix, the slot
was lost. After 256 losses every new stream to that peer "timed out opening"
while gossip flowed on. Here the connection has 2 slots and its write lock is
held while streams close, so each close is cut short: the third stream must
still open.
"""

from __future__ import annotations

from dataclasses import replace

import trio

from p2pgpu.net import FramedStream
from p2pgpu.net.reqresp import CLEANUP_SECONDS

from .conftest import FAST, nodes

ECHO = "/p2pgpu/test/slots/1"
QUICK = replace(FAST, request_timeout=5.0)


async def test_streams_whose_close_was_cut_short_do_not_use_up_the_connection() -> None:
    async def echo(stream: FramedStream) -> None:
        await stream.send(await stream.receive_exactly_one())
        await stream.send_end()

    async with nodes([QUICK, QUICK], boot={1: [0]}) as (a, b):
        b.set_stream_handler(ECHO, echo)
        (conn,) = [c.muxed_conn for cs in a._host.get_network().connections.values() for c in cs]
        conn.stream_backlog_semaphore = trio.Semaphore(2)  # as if 254 slots were already lost
        for i in range(3):
            release, holding = trio.Event(), trio.Event()

            async def hold_writes() -> None:  # a bulk writer holding the connection
                async with conn._write_lock:
                    holding.set()
                    await release.wait()

            async with trio.open_nursery() as nursery:
                async with a.open_stream(b.peer_id, ECHO) as stream:
                    await stream.send(b"%d" % i)
                    await stream.send_end()
                    assert await stream.receive_exactly_one() == b"%d" % i
                    nursery.start_soon(hold_writes)
                    await holding.wait()
                    started = trio.current_time()
                # leaving the block closed the stream; its FIN waited on the writer and the close was cut short
                assert trio.current_time() - started >= CLEANUP_SECONDS * 0.9
                release.set()
            assert stream._stream.muxed_stream._backlog_slot_released  # its slot came back
