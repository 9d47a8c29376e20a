"""Request/response and streaming over real libp2p hosts; bootstrap retries."""

from __future__ import annotations

import logging
from dataclasses import replace

import multiaddr
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.utils.address_validation import find_free_port

from p2pgpu.net import (
    FramedStream,
    PeerUnreachable,
    ProtocolError,
    RemoteError,
    RequestContext,
    RequestTimeout,
    STATUS_PROTOCOL,
    open_network,
    peer_id_from_seed,
)

from .conftest import FAST, nodes, seed, wait_until

ECHO = "/p2pgpu/test/echo/1"
STALL = "/p2pgpu/test/stall/1"
CRASH = "/p2pgpu/test/crash/1"
COUNT = "/p2pgpu/test/count/1"
HALF = "/p2pgpu/test/half/1"


async def echo(ctx: RequestContext, data: bytes) -> bytes:
    await trio.lowlevel.checkpoint()
    return ctx.peer.encode() + b"|" + data


async def stall(ctx: RequestContext, data: bytes) -> bytes:
    await trio.sleep_forever()
    return b""


async def crash(ctx: RequestContext, data: bytes) -> bytes:
    await trio.lowlevel.checkpoint()
    raise KeyError("internal detail that must not leak")


async def count(stream: FramedStream) -> None:
    """Streaming: the request is a number n; answer n frames, then END."""
    n = int(await stream.receive_exactly_one())
    for i in range(n):
        await stream.send(b"item-%d" % i)
    await stream.send_end()


async def test_round_trip_timeout_and_crash_do_not_hurt_the_server() -> None:
    async with nodes([FAST, FAST], boot={1: [0]}) as (server, client):
        for protocol, handler in ((ECHO, echo), (STALL, stall), (CRASH, crash)):
            server.set_handler(protocol, handler)
        with trio.fail_after(10):
            assert await client.request(server.peer_id, ECHO, b"ping") == client.peer_id.encode() + b"|ping"
            with pytest.raises(RequestTimeout, match=f"{server.peer_id}.*{STALL}"):
                await client.request(server.peer_id, STALL, b"", timeout=0.5)
            with pytest.raises(ProtocolError, match=f"peer {server.peer_id} on {CRASH} failed: handler error: KeyError") as info:
                await client.request(server.peer_id, CRASH, b"x")
            assert isinstance(info.value, RemoteError) and "internal detail" not in str(info.value)
            assert await client.request(server.peer_id, ECHO, b"again") == client.peer_id.encode() + b"|again"
        assert server.metrics.request_errors[(CRASH, "handler_error")] == 1
        assert client.metrics.request_errors[(STALL, "timeout")] == 1
        assert server.metrics.requests_served[ECHO] == 2


async def test_streaming_many_frames_on_one_stream() -> None:
    async with nodes([FAST, FAST], boot={1: [0]}) as (server, client):
        server.set_stream_handler(COUNT, count)
        with trio.fail_after(10):
            async with client.open_stream(server.peer_id, COUNT) as stream:
                await stream.send(b"50")
                await stream.send_end()
                items = [item async for item in stream]
        assert items == [b"item-%d" % i for i in range(50)]


async def test_frames_sent_in_one_write_arrive_one_by_one_in_order() -> None:
    async def count_many(stream: FramedStream) -> None:
        n = int(await stream.receive_exactly_one())
        await stream.send_many([b"item-%d" % i for i in range(n)] + [b"x" * 200_000])
        await stream.send_end()

    async with nodes([FAST, FAST], boot={1: [0]}) as (server, client):
        server.set_stream_handler(COUNT, count_many)
        with trio.fail_after(10):
            async with client.open_stream(server.peer_id, COUNT) as stream:
                await stream.send(b"50")
                await stream.send_end()
                items = [item async for item in stream]
        assert items == [b"item-%d" % i for i in range(50)] + [b"x" * 200_000]


async def test_peer_disconnecting_mid_transfer_is_a_clean_error() -> None:
    async with nodes([FAST, FAST], boot={1: [0]}) as (server, client):

        async def half_then_hang_up(stream: FramedStream) -> None:
            await stream.receive_exactly_one()
            await stream.send(b"first half")
            await server.disconnect(stream.peer)

        server.set_stream_handler(HALF, half_then_hang_up)
        with trio.fail_after(10):
            async with client.open_stream(server.peer_id, HALF) as stream:
                await stream.send(b"go")
                await stream.send_end()
                assert await stream.receive() == b"first half"
                with pytest.raises(PeerUnreachable, match=f"{server.peer_id} on {HALF}"):
                    await stream.receive()
            # and the unary helper reports the same cleanly
            server.set_handler(ECHO, echo)
            await wait_until(lambda: server.peer_id not in client.connected_peers(), what="disconnect")
            assert await client.request(server.peer_id, ECHO, b"redial") == client.peer_id.encode() + b"|redial"


async def test_garbage_on_a_stream_gets_an_error_and_the_node_keeps_serving() -> None:
    async with nodes([FAST, FAST], boot={1: [0]}) as (server, client):
        raw = await client._host.new_stream(ID.from_base58(server.peer_id), [TProtocol(STATUS_PROTOCOL)])
        await raw.write(b"\xff\xff\xff\xff" + b"junk")
        with trio.fail_after(10):
            reply = await raw.read(4096)
        assert b"bad request" in reply and b"exceeds the limit" in reply
        await raw.reset()
        # Garbage on the gossip protocol too: libp2p drops that stream, nothing else.
        gossip = await client._host.new_stream(ID.from_base58(server.peer_id), [TProtocol("/meshsub/1.2.0")])
        await gossip.write(b"\x05\xff\xff\xff\xff\xff")
        with trio.fail_after(10):
            assert await client.request_status(server.peer_id) == {}
        assert server.metrics.request_errors[(STATUS_PROTOCOL, "FrameTooLarge")] == 1


async def test_unknown_peer_and_protocol_are_peer_unreachable() -> None:
    async with nodes([FAST, FAST], boot={1: [0]}) as (server, client):
        with trio.fail_after(15):
            with pytest.raises(PeerUnreachable, match="/p2pgpu/none/1"):
                await client.request(server.peer_id, "/p2pgpu/none/1", b"")
            with pytest.raises(PeerUnreachable, match="invalid peer id"):
                await client.request("not-a-peer", ECHO, b"")


async def test_bootstrap_peer_down_at_start_then_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="p2pgpu.net.discovery")
    port = find_free_port()
    late_seed = seed(42)
    late_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_from_seed(late_seed)}"
    config = replace(FAST, bootstrap_peers=(late_addr,))
    async with open_network(config, seed(1)) as early:
        await wait_until(lambda: "event=bootstrap_dial_failed" in caplog.text, what="a logged failed dial")
        assert early.connected_peers() == set()
        late_config = replace(FAST, listen_addrs=(f"/ip4/127.0.0.1/tcp/{port}",))
        async with open_network(late_config, late_seed) as late:
            await wait_until(lambda: late.peer_id in early.connected_peers(), what="bootstrap retry to connect")
            assert await early.request_status(late.peer_id) == {}
    # everything stopped: the port is free again
    with trio.fail_after(5):
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
    assert multiaddr.Multiaddr(late_addr).get_peer_id() == late.peer_id


async def test_a_peer_that_was_down_is_dialled_again_at_once_when_asked() -> None:
    """A request to a peer whose addresses all failed once is not refused for a minute by the swarm's
    negative dial cache: a provider fetching inputs from a client that restarted must reach it again."""
    port = find_free_port()
    server_seed = seed(43)
    server_config = replace(FAST, listen_addrs=(f"/ip4/127.0.0.1/tcp/{port}",))
    async with open_network(FAST, seed(2)) as client:
        async with open_network(server_config, server_seed) as server:
            server.set_handler(ECHO, echo)
            await client.connect(server.addrs[0])
            assert await client.request(server.peer_id, ECHO, b"1") == client.peer_id.encode() + b"|1"
        # the server is gone: the next request fails, and the swarm caches the failure
        with trio.fail_after(30):
            with pytest.raises(PeerUnreachable):
                await client.request(server.peer_id, ECHO, b"2")
        async with open_network(server_config, server_seed) as server:
            server.set_handler(ECHO, echo)
            with trio.fail_after(15):  # well inside the swarm's 60 s negative cache
                assert await client.request(server.peer_id, ECHO, b"3") == client.peer_id.encode() + b"|3"
