"""``/p2pgpu/data/1`` between real libp2p hosts on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from ledger.codec import decode, encode
from ledger.keys import AccountKey
from p2pgpu.blobstore import BlobStore
from p2pgpu.dataplane import (
    DATA_PROTOCOL,
    DataPlane,
    DataProtocolError,
    DataReply,
    DataRequest,
    IntegrityError,
    NotEntitled,
    NotFound,
    Oversized,
    Status,
    Truncated,
    account_address_of_peer,
)
from p2pgpu.net import FramedStream, NetConfig, Network, open_network, peer_id_from_seed

FAST = NetConfig(discovery_interval=0.2, dial_timeout=3.0, target_peers=1)
MB = 1_000_000
SERVER_SEED, CLIENT_SEED, STRANGER_SEED = b"\x51" * 32, b"\x52" * 32, b"\x53" * 32
CLIENT = AccountKey.from_seed(CLIENT_SEED)


@asynccontextmanager
async def planes(tmp_path: Path, *seeds: bytes) -> AsyncIterator[list[DataPlane]]:
    """One network + store + data plane per seed; every later node dials the first."""
    async with AsyncExitStack() as stack:
        out: list[DataPlane] = []
        for i, s in enumerate(seeds):
            # (open_network's nurseries must not nest inside a shorter-lived cancel scope)
            net = await stack.enter_async_context(open_network(FAST, s))
            if out:
                with trio.fail_after(10):
                    await net.connect(out[0].network.addrs[0])
            out.append(DataPlane(net, BlobStore(tmp_path / f"node{i}")))
        yield out


def only_client(peer: str, address: bytes, blob_hash: bytes) -> bool:
    return address == CLIENT.address


def test_peer_id_maps_to_the_account_address() -> None:
    assert account_address_of_peer(peer_id_from_seed(CLIENT_SEED)) == CLIENT.address
    assert account_address_of_peer("not a peer id") is None


async def test_entitled_peer_fetches_5mb_intact_and_others_are_refused_and_counted(tmp_path: Path) -> None:
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED, STRANGER_SEED) as (server, client, stranger):
        seen: list[tuple[str, bytes]] = []

        def entitled(peer: str, address: bytes, blob_hash: bytes) -> bool:
            seen.append((peer, address))
            return only_client(peer, address, blob_hash)

        server.serve(entitled)
        data = os.urandom(5 * MB)
        h = server.store.put(data)
        progress: list[int] = []
        with trio.fail_after(30):
            got = await client.fetch(
                server.network.peer_id, h, max_bytes=10 * MB, timeout=25, progress=lambda n, total: progress.append(n)
            )
        assert got == data and client.store.get(h) == data
        assert progress[-1] == 5 * MB and progress == sorted(progress) and len(progress) > 5
        assert seen[0] == (client.network.peer_id, CLIENT.address)
        assert server.metrics.served == 1 and server.metrics.served_bytes == 5 * MB
        assert client.metrics.fetched == 1
        with pytest.raises(Oversized, match="already stored"):
            await client.fetch(server.network.peer_id, h, max_bytes=MB, timeout=1)

        with trio.fail_after(10), pytest.raises(NotEntitled, match="not entitled"):
            await stranger.fetch(server.network.peer_id, h, max_bytes=10 * MB, timeout=8)
        assert server.metrics.denied["not_entitled"] == 1 and not stranger.store.has(h)
        # the refusal does not reveal whether the server holds a blob
        with trio.fail_after(10), pytest.raises(NotEntitled):
            await stranger.fetch(server.network.peer_id, hashlib.sha256(b"nothing").digest(), max_bytes=MB, timeout=8)


async def test_unknown_hash_oversized_and_identity_mismatch(tmp_path: Path) -> None:
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED) as (server, client):
        server.serve(only_client)
        big = server.store.put(os.urandom(2 * MB))
        with trio.fail_after(20):
            with pytest.raises(NotFound, match="no usable copy"):
                await client.fetch(server.network.peer_id, hashlib.sha256(b"?").digest(), max_bytes=MB, timeout=8)
            with pytest.raises(Oversized, match="2000000 bytes"):
                await client.fetch(server.network.peer_id, big, max_bytes=MB, timeout=8)
            # a request naming someone else's account is refused on its own status
            async with client.network.open_stream(server.network.peer_id, DATA_PROTOCOL) as stream:
                await stream.send(encode(DataRequest(big, 0, 10 * MB, b"\x00" * 20)))
                await stream.send_end()
                reply = decode(DataReply, await stream.receive_exactly_one())
        assert reply.status == Status.IDENTITY_MISMATCH
        assert dict(server.metrics.denied) == {"not_found": 1, "too_large": 1, "identity_mismatch": 1}
        assert not client.store.has(big) and server.metrics.served_bytes == 0


async def test_corrupt_bytes_raise_integrity_error_and_penalize_the_peer(tmp_path: Path) -> None:
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED) as (server, client):
        data = os.urandom(300_000)
        h = hashlib.sha256(data).digest()
        liar_sends = [data[:100_000], bytes(100_000), data[200_000:]]
        announced = [len(data)]

        async def liar(stream: FramedStream) -> None:
            request = decode(DataRequest, await stream.receive_exactly_one())
            await stream.send(encode(DataReply(Status.OK, announced[0], request.offset)))
            for chunk in liar_sends:
                await stream.send(chunk)
            await stream.send_end()

        server.network.set_stream_handler(DATA_PROTOCOL, liar)
        peer = server.network.peer_id
        with trio.fail_after(20):
            with pytest.raises(IntegrityError, match="do not hash"):
                await client.fetch(peer, h, max_bytes=MB, timeout=8)
            assert client.network.scores.score(peer, trio.current_time()) < 0
            assert not client.store.has(h) and client.store.partial(h).offset == 0, "bad bytes are not kept"
            liar_sends.append(b"one byte too many")
            liar_sends[1] = data[100_000:200_000]
            with pytest.raises(IntegrityError, match="more than the 300000 bytes"):
                await client.fetch(peer, h, max_bytes=MB, timeout=8)
            announced[0] = 2 * MB  # more than the client asked for: refused before any body byte is kept
            with pytest.raises(DataProtocolError, match="over the requested max"):
                await client.fetch(peer, h, max_bytes=MB, timeout=8)
            assert client.store.partial(h).offset == 0
        assert client.metrics.integrity_failures == 2 and client.metrics.penalties == 3


async def test_disconnect_mid_transfer_is_truncated_and_the_retry_resumes(tmp_path: Path) -> None:
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED) as (server, client):
        data = os.urandom(3 * MB)
        h = server.store.put(data)

        async def hang_up_halfway(stream: FramedStream) -> None:
            request = decode(DataRequest, await stream.receive_exactly_one())
            await stream.send(encode(DataReply(Status.OK, len(data), request.offset)))
            for i in range(0, 1_200_000, 200_000):
                await stream.send(data[i : i + 200_000])
            await server.network.disconnect(stream.peer)

        server.network.set_stream_handler(DATA_PROTOCOL, hang_up_halfway)
        with trio.fail_after(30):
            with pytest.raises(Truncated, match="kept for a resume") as info:
                await client.fetch(server.network.peer_id, h, max_bytes=10 * MB, timeout=20)
            received = info.value.received
            assert 0 < received <= 1_200_000 and info.value.size == len(data)
            score = client.network.scores.score(server.network.peer_id, trio.current_time())
            assert score == 0, "no penalty for a drop"
            server.serve(only_client)
            while server.network.peer_id in client.network.connected_peers():
                await trio.sleep(0.02)  # the swarm notices the drop; new_stream then redials
            progress: list[tuple[int, int]] = []
            got = await client.fetch(
                server.network.peer_id, h, max_bytes=10 * MB, timeout=20, progress=lambda n, t: progress.append((n, t))
            )
        assert got == data
        assert client.metrics.resumed == 1 and client.metrics.truncated == 1
        assert server.metrics.served_bytes == len(data) - received, "only the missing tail was sent again"
        assert progress[0][0] > received and progress[-1] == (len(data), len(data))
