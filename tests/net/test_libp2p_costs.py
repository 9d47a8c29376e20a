"""py-libp2p's per-message costs taken off (p2pgpu/net/libp2p_costs.py), on real hosts over TCP."""

from __future__ import annotations

import libp2p.pubsub.gossipsub as gossipsub_module
import libp2p.pubsub.pubsub as pubsub_module
import trio
from libp2p.peer import peerstore
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.stream_muxer.yamux.yamux import YamuxStream

from p2pgpu.net import FramedStream
from p2pgpu.net import libp2p_costs

from .conftest import FAST, nodes

SINK = "/p2pgpu/test/sink/1"


async def test_a_peer_s_signed_record_is_checked_once_and_anything_else_still_is(monkeypatch) -> None:
    checks = []
    original = libp2p_costs._check_signed_record

    def counting(msg, host, peer_id) -> bool:
        checks.append((host, peer_id, bytes(msg.senderRecord)))
        return original(msg, host, peer_id)

    monkeypatch.setattr(libp2p_costs, "_check_signed_record", counting)
    async with nodes([FAST, FAST], boot={1: [0]}) as (a, b):
        assert pubsub_module.maybe_consume_signed_record is libp2p_costs.consume_signed_record_once
        assert gossipsub_module.maybe_consume_signed_record is libp2p_costs.consume_signed_record_once
        record, _ = peerstore.env_to_send_in_RPC(a._host)
        rpc = rpc_pb2.RPC(senderRecord=record)
        a_id, b_id = ID.from_base58(a.peer_id), ID.from_base58(b.peer_id)

        def seen(host, peer_id, data) -> int:  # the live exchange between a and b checks records too
            return sum(1 for c in checks if c[0] is host and c[1] == peer_id and c[2] == data)

        for _ in range(5):
            assert libp2p_costs.consume_signed_record_once(rpc, b._host, a_id)
        assert seen(b._host, a_id, record) == 1  # once per (peer, record bytes) and host, whoever asked first
        # someone else presenting a's record, and a's record altered: checked, and refused
        assert not libp2p_costs.consume_signed_record_once(rpc, b._host, b_id)
        tampered = bytearray(record)
        tampered[-1] ^= 1
        assert not libp2p_costs.consume_signed_record_once(rpc_pb2.RPC(senderRecord=bytes(tampered)), b._host, a_id)
        assert seen(b._host, b_id, record) == 1 and seen(b._host, a_id, bytes(tampered)) == 1
        assert libp2p_costs.consume_signed_record_once(rpc_pb2.RPC(), b._host, a_id)  # no record: nothing to check


async def test_the_record_sent_is_always_the_current_one_without_recomputing_addresses(monkeypatch) -> None:
    async with nodes([FAST]) as (a,):
        host = a._host
        assert pubsub_module.env_to_send_in_RPC is libp2p_costs.record_to_send
        assert gossipsub_module.env_to_send_in_RPC is libp2p_costs.record_to_send
        first, _ = libp2p_costs.record_to_send(host)
        asked = []
        monkeypatch.setattr(type(host), "get_addrs", lambda self: asked.append(1) or [])
        for _ in range(10):
            assert libp2p_costs.record_to_send(host) == (first, False)
        assert asked == []  # the addresses were not recomputed
        monkeypatch.undo()
        # py-libp2p issues a newer record (identify does when the addresses change): it is sent at once
        newer = peerstore.issue_and_cache_local_record(host)
        assert newer != first
        assert libp2p_costs.record_to_send(host)[0] == newer
        # and after RECORD_RECHECK_S the addresses are compared again
        monkeypatch.setattr(libp2p_costs, "RECORD_RECHECK_S", 0.0)
        monkeypatch.setattr(type(host), "get_addrs", lambda self: asked.append(1) or [])
        libp2p_costs.record_to_send(host)
        assert asked


async def test_window_updates_wait_for_half_the_window_and_bulk_still_flows(monkeypatch) -> None:
    updates: list[int] = []
    original = YamuxStream.send_window_update

    async def counting(self, increment: int, skip_lock: bool = False) -> None:
        updates.append(increment)
        await original(self, increment, skip_lock)

    monkeypatch.setattr(YamuxStream, "send_window_update", counting)
    received: list[int] = []

    async def sink(stream: FramedStream) -> None:
        total = 0
        async for chunk in stream:
            total += len(chunk)
        received.append(total)
        await stream.send(str(total).encode())
        await stream.send_end()

    async with nodes([FAST, FAST], boot={1: [0]}) as (a, b):
        assert YamuxStream._auto_tune_and_send_window_update is libp2p_costs.window_update_when_half_consumed
        b.set_stream_handler(SINK, sink)

        async def push(frames: int, size: int) -> int:
            async with a.open_stream(b.peer_id, SINK) as stream:
                for _ in range(frames):
                    await stream.send(b"x" * size)
                await stream.send_end()
                return int(await stream.receive_exactly_one())

        # 200 small messages (~40 KiB, well under half of a 256 KiB window): not one window update
        updates.clear()
        assert await push(200, 200) == 200 * 200
        assert updates == []
        # 4 MiB on one stream: the sender needs the window back many times, and gets it
        with trio.fail_after(60):
            assert await push(64, 64 << 10) == 64 * (64 << 10)
        assert updates  # 4 MiB cannot pass a 256 KiB window without it coming back (py-libp2p grows it too)


def test_installed_functions_keep_py_libp2p_s_signatures() -> None:
    """If py-libp2p renames what we replace, fail here rather than silently stop saving the cost."""
    import inspect

    from libp2p.pubsub import utils

    ours = inspect.signature(libp2p_costs.consume_signed_record_once)
    assert list(ours.parameters) == list(inspect.signature(utils.maybe_consume_signed_record).parameters)
    ours = inspect.signature(libp2p_costs.record_to_send)
    assert list(ours.parameters) == list(inspect.signature(peerstore.env_to_send_in_RPC).parameters)
    ours = inspect.signature(libp2p_costs.window_update_when_half_consumed)
    theirs = inspect.signature(libp2p_costs._stock_window_update)
    assert list(ours.parameters) == list(theirs.parameters)
    for field in ("target_recv_window", "recv_window"):
        assert field in YamuxStream.__init__.__code__.co_names


async def test_tcp_reads_are_served_from_one_recv_and_keep_the_stream_contract() -> None:
    """Noise reads a 2-byte length, then a body: a burst of frames now costs one recv, not two per frame."""
    from libp2p.io.trio import TrioTCPStream

    libp2p_costs.install()
    left, right = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    recvs = []
    real = receiver.receive_some

    async def counting(max_bytes=None):
        data = await real(max_bytes)
        recvs.append(len(data))
        return data

    receiver.receive_some = counting  # type: ignore[method-assign]
    stream = TrioTCPStream(receiver)
    frames = [bytes([i]) * (i + 1) for i in range(50)]
    await sender.send_all(b"".join(len(f).to_bytes(2, "big") + f for f in frames))
    await trio.sleep(0.05)  # the whole burst is in the kernel's buffer
    got = []
    for _ in frames:
        length = int.from_bytes(await stream.read(2), "big")
        got.append(await stream.read(length))
    assert got == frames
    assert len(recvs) == 1
    assert await stream.read(0) == b""
    await sender.send_all(b"abcdef")
    await trio.sleep(0.05)
    assert await stream.read(2) == b"ab"
    assert await stream.read() == b"cdef"  # n=None: everything held
    await sender.aclose()
    assert await stream.read(10) == b""  # EOF
