"""``/p2pgpu/data/1`` between real libp2p hosts on 127.0.0.1: public blobs and sealed task data."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from ledger.codec import decode, encode
from ledger.keys import AccountKey
from p2pgpu import sealed as sealing
from p2pgpu.blobstore import BlobStore
from p2pgpu.dataplane import (
    DATA_PROTOCOL,
    DataPlane,
    DataPlaneError,
    DataProtocolError,
    DataReply,
    DataRequest,
    IntegrityError,
    NotEntitled,
    NotFound,
    Oversized,
    SealedAsk,
    Status,
    Truncated,
    account_address_of_peer,
)
from p2pgpu.net import FramedStream, NetConfig, open_network, peer_id_from_seed
from p2pgpu.sealed import (
    PREAMBLE_SIZE,
    EncryptionKey,
    NotARecipient,
    Purpose,
    SealedHeader,
    Tampered,
    WrongContext,
    context_id,
    iter_open,
    task_context,
)
from p2pgpu.sealedstore import PlaintextMismatch, SealedStore

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
            store = BlobStore(tmp_path / f"node{i}")
            key = EncryptionKey.from_account_key(AccountKey.from_seed(s))
            out.append(DataPlane(net, store, sealed=SealedStore(store, key)))
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


# -- sealed task data ------------------------------------------------------------------

CHAIN = b"\xc0" * 32
TASK = b"\x7a" * 32
INPUTS = task_context(CHAIN, TASK, Purpose.INPUT)
OTHER_TASK_INPUTS = task_context(CHAIN, b"\x7b" * 32, Purpose.INPUT)


def name_of(plaintext: bytes) -> bytes:
    return hashlib.sha256(plaintext).digest()


def tampered_copy(holder: DataPlane, plaintext: bytes, context: bytes) -> bytes:
    """What a lying holder can make: a body with one flipped ciphertext byte, a hash and key wrap that fit it.

    Every check a fetcher can make before decrypting passes (content hash,
    context, key wrap, key commitment); only chunk authentication catches it.
    Returns the body's content hash (the holder's index serves it as ``plaintext``'s name).
    """
    assert holder.sealed is not None
    ref = holder.sealed.seal_put(plaintext, context=context)
    body = bytearray(holder.store.get(ref.content_hash))
    body[PREAMBLE_SIZE + 5] ^= 0x01
    bad_hash = holder.store.put(bytes(body))
    content_key = sealing._unwrap(ref.header, holder.sealed.key)
    wrap = sealing._wrap_for(content_key, bad_hash, holder.sealed.public_key)
    holder.sealed.record(ref.name, ref.context_id, SealedHeader(version=1, content_hash=bad_hash, recipients=(wrap,)))
    holder.store.delete(ref.content_hash)
    return bad_hash


async def test_sealed_input_reaches_the_entitled_fetcher_only_and_opens_only_for_it(tmp_path: Path) -> None:
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED, STRANGER_SEED) as (server, client, stranger):
        assert server.sealed is not None and client.sealed is not None and stranger.sealed is not None
        server.serve(only_client)
        plaintext = os.urandom(3 * MB)  # three 1 MiB chunks, a dozen data frames
        ref = server.sealed.seal_put(plaintext, context=INPUTS)
        progress: list[int] = []
        with trio.fail_after(30):
            got = await client.fetch_sealed(server.network.peer_id, ref.name, context=INPUTS, max_bytes=10 * MB,
                                            timeout=25, progress=lambda n, total: progress.append(n))
        assert got == plaintext
        assert progress[-1] == server.store.size(ref.content_hash) and len(progress) > 5
        assert server.metrics.wraps == 1 and client.metrics.opened == 1
        # both stores hold the sealed body only; the fetcher kept the header it was given: its own wrap, nothing else
        assert client.store.hashes() == [ref.content_hash] and not client.store.has(ref.name)
        kept = client.sealed.lookup(ref.name, context_id(INPUTS))
        assert kept is not None and kept.header.recipient_keys() == [client.sealed.public_key]
        body_on_disk = b"".join(p.read_bytes() for p in (tmp_path / "node1").rglob("*") if p.is_file())
        assert plaintext[:64] not in body_on_disk
        # whoever else gets the body and that header cannot open it
        with client.store.open_read(ref.content_hash) as reader, pytest.raises(NotARecipient):
            list(iter_open(kept.header, reader, stranger.sealed.key, context=INPUTS))  # type: ignore[arg-type]
        # a second fetch opens the local copy: no transfer
        with trio.fail_after(10):
            assert await client.fetch_sealed(server.network.peer_id, ref.name, context=INPUTS, max_bytes=10 * MB,
                                             timeout=8) == plaintext
        assert server.metrics.served == 1 and client.metrics.opened == 2

        with trio.fail_after(20):
            with pytest.raises(NotEntitled):
                await stranger.fetch_sealed(server.network.peer_id, ref.name, context=INPUTS, max_bytes=10 * MB,
                                            timeout=8)
            # the entitled client asking for the same name in another task finds nothing: bodies are per context
            with pytest.raises(NotFound):
                await client.fetch_sealed(server.network.peer_id, ref.name, context=OTHER_TASK_INPUTS,
                                          max_bytes=10 * MB, timeout=8)
            # nor can it have the plaintext by asking for the name as a public blob
            with pytest.raises(NotFound):
                await client.fetch(server.network.peer_id, ref.name, max_bytes=10 * MB, timeout=8)
        assert server.metrics.denied == {"not_entitled": 1, "not_found": 2}
        assert stranger.store.hashes() == []


async def test_tampered_body_is_rejected_counted_deleted_and_the_node_keeps_fetching(tmp_path: Path) -> None:
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED) as (server, client):
        assert client.sealed is not None and server.sealed is not None
        server.serve(only_client)
        plaintext = os.urandom(200_000)
        bad_hash = tampered_copy(server, plaintext, INPUTS)
        peer = server.network.peer_id
        with trio.fail_after(20):
            with pytest.raises(Tampered, match="chunk 0 of 1") as info:
                await client.fetch_sealed(peer, name_of(plaintext), context=INPUTS, max_bytes=MB, timeout=8)
        assert info.value.chunk == 0
        assert client.metrics.sealed_rejected == {"tampered": 1} and client.metrics.opened == 0
        assert client.metrics.penalties == 1 and client.network.scores.score(peer, trio.current_time()) < 0
        assert not client.store.has(bad_hash), "a body that does not open is not kept"
        assert client.sealed.lookup(name_of(plaintext), context_id(INPUTS)) is None
        # the same peer's honest blob still comes through
        good = server.sealed.seal_put(b"honest rows", context=INPUTS)
        with trio.fail_after(20):
            assert await client.fetch_sealed(peer, good.name, context=INPUTS, max_bytes=MB, timeout=8) == b"honest rows"


async def test_wrong_context_and_wrong_plaintext_are_rejected_by_name(tmp_path: Path) -> None:
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED) as (server, client):
        assert server.sealed is not None
        server.serve(only_client)
        peer = server.network.peer_id
        # the holder answers a request for task B's input with the body it sealed for task A
        replayed = server.sealed.seal_put(b"task A's input", context=INPUTS)
        server.sealed.record(replayed.name, context_id(OTHER_TASK_INPUTS), replayed.header)
        # and a request for one result name with another plaintext, sealed in the right context
        other = server.sealed.seal_put(b"a different answer", context=INPUTS)
        claimed = name_of(b"the committed answer")
        server.sealed.record(claimed, context_id(INPUTS), other.header)
        with trio.fail_after(30):
            with pytest.raises(WrongContext):
                await client.fetch_sealed(peer, replayed.name, context=OTHER_TASK_INPUTS, max_bytes=MB, timeout=8)
            with pytest.raises(PlaintextMismatch, match=claimed.hex()):
                await client.fetch_sealed(peer, claimed, context=INPUTS, max_bytes=MB, timeout=8)
        assert client.metrics.sealed_rejected == {"wrong_context": 1, "plaintext_mismatch": 1}
        assert client.store.hashes() == [] and client.metrics.opened == 0


async def test_a_holder_wrapping_for_someone_else_or_not_at_all_is_refused(tmp_path: Path) -> None:
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED) as (server, client):
        assert server.sealed is not None
        ref = server.sealed.seal_put(b"inputs", context=INPUTS)
        outsider = EncryptionKey.generate()
        with_header = [True]

        async def misdirected(stream: FramedStream) -> None:
            assert server.sealed is not None
            request = decode(DataRequest, await stream.receive_exactly_one())
            header = server.sealed.wrap_for(ref, outsider.public_key) if with_header[0] else None
            body = server.store.get(ref.content_hash)
            await stream.send(encode(DataReply(Status.OK, len(body), request.offset, header)))
            await stream.send(body)
            await stream.send_end()

        server.network.set_stream_handler(DATA_PROTOCOL, misdirected)
        with trio.fail_after(20):
            with pytest.raises(NotARecipient):
                await client.fetch_sealed(server.network.peer_id, ref.name, context=INPUTS, max_bytes=MB, timeout=8)
            with_header[0] = False
            with pytest.raises(DataProtocolError, match="without a key wrap"):
                await client.fetch_sealed(server.network.peer_id, ref.name, context=INPUTS, max_bytes=MB, timeout=8)
        assert client.metrics.sealed_rejected == {"not_a_recipient": 1} and client.metrics.penalties == 2


async def test_an_unusable_recipient_key_gets_its_own_status(tmp_path: Path) -> None:
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED) as (server, client):
        assert server.sealed is not None
        server.serve(only_client)
        ref = server.sealed.seal_put(b"inputs", context=INPUTS)
        with trio.fail_after(20):
            async with client.network.open_stream(server.network.peer_id, DATA_PROTOCOL) as stream:
                ask = SealedAsk(context_id(INPUTS), bytes(32))  # the all-zero point: no key agreement possible
                await stream.send(encode(DataRequest(ref.name, 0, MB, CLIENT.address, ask)))
                await stream.send_end()
                reply = decode(DataReply, await stream.receive_exactly_one())
        assert reply.status == Status.BAD_KEY and reply.header is None
        assert server.metrics.denied == {"bad_key": 1} and server.metrics.served_bytes == 0


async def test_sealed_fetch_resumes_after_a_drop_and_restarts_when_the_body_changed(tmp_path: Path) -> None:
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED) as (server, client):
        assert server.sealed is not None
        plaintext = os.urandom(3 * MB)
        ref = server.sealed.seal_put(plaintext, context=INPUTS)
        size = server.store.size(ref.content_hash)

        async def hang_up_halfway(stream: FramedStream) -> None:
            assert server.sealed is not None
            request = decode(DataRequest, await stream.receive_exactly_one())
            assert request.sealed is not None
            header = server.sealed.wrap_for(ref, request.sealed.recipient)
            await stream.send(encode(DataReply(Status.OK, size, request.offset, header)))
            body = server.store.get(ref.content_hash)
            for i in range(0, 1_200_000, 200_000):
                await stream.send(body[i : i + 200_000])
            if hang_up[0]:
                await server.network.disconnect(stream.peer)
            else:
                await stream.send_end()  # ends the stream early: truncated just the same, the connection stays

        hang_up = [True]

        async def wait_disconnected() -> None:
            while server.network.peer_id in client.network.connected_peers():
                await trio.sleep(0.02)  # the swarm notices the drop; new_stream then redials

        peer = server.network.peer_id
        server.network.set_stream_handler(DATA_PROTOCOL, hang_up_halfway)
        with trio.fail_after(60):
            with pytest.raises(Truncated, match="kept for a resume") as info:
                await client.fetch_sealed(peer, ref.name, context=INPUTS, max_bytes=10 * MB, timeout=20)
            received = info.value.received
            assert 0 < received <= 1_200_000 and info.value.size == size
            server.serve(only_client)
            await wait_disconnected()
            assert await client.fetch_sealed(peer, ref.name, context=INPUTS, max_bytes=10 * MB,
                                             timeout=20) == plaintext
        assert client.metrics.resumed == 1 and client.metrics.truncated == 1
        assert server.metrics.served_bytes == size - received, "only the missing tail was sent again"

        # a holder that re-sealed meanwhile answers the resume with another body: the partial bytes are dropped
        again = server.sealed.seal_put(b"second input " * 100_000, context=INPUTS)
        size = server.store.size(again.content_hash)
        ref, hang_up[0] = again, False
        server.network.set_stream_handler(DATA_PROTOCOL, hang_up_halfway)
        with trio.fail_after(60):
            with pytest.raises(Truncated):
                await client.fetch_sealed(peer, again.name, context=INPUTS, max_bytes=10 * MB, timeout=20)
            first_body = again.content_hash
            server.sealed.forget(again.name, again.context_id)
            server.store.delete(first_body)
            resealed = server.sealed.seal_put(b"second input " * 100_000, context=INPUTS)
            assert resealed.content_hash != first_body
            server.serve(only_client)
            with pytest.raises(DataProtocolError, match="another body"):
                await client.fetch_sealed(peer, again.name, context=INPUTS, max_bytes=10 * MB, timeout=20)
            assert client.store.partial(first_body).offset == 0
            assert await client.fetch_sealed(peer, again.name, context=INPUTS, max_bytes=10 * MB,
                                             timeout=20) == b"second input " * 100_000


async def test_without_a_sealed_store_sealed_fetches_fail_plainly(tmp_path: Path) -> None:
    async with open_network(FAST, CLIENT_SEED) as net:
        plane = DataPlane(net, BlobStore(tmp_path))
        with pytest.raises(DataPlaneError, match="no sealed store"):
            await plane.fetch_sealed("peer", b"\x00" * 32, context=INPUTS, max_bytes=MB, timeout=1)


async def test_on_served_fires_once_the_last_byte_went_out_and_not_for_refusals_or_drops(tmp_path: Path) -> None:
    """What tells a client "the provider has your inputs": the whole blob sent, not the access check passed."""
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED, STRANGER_SEED) as (server, client, stranger):
        served: list[tuple[str, bytes, bytes]] = []
        server.serve(only_client, lambda peer, address, blob: served.append((peer, address, blob)))
        data = os.urandom(4 * MB)
        h = server.store.put(data)
        with trio.fail_after(10), pytest.raises(NotEntitled):
            await stranger.fetch(server.network.peer_id, h, max_bytes=10 * MB, timeout=8)
        assert served == []
        with trio.fail_after(30):
            with trio.CancelScope() as scope:  # the fetcher goes away after the first bytes
                await client.fetch(server.network.peer_id, h, max_bytes=10 * MB, timeout=25,
                                   progress=lambda n, total: scope.cancel())
            await trio.sleep(0.5)
            assert served == [], "a transfer that did not finish was reported served"
            assert await client.fetch(server.network.peer_id, h, max_bytes=10 * MB, timeout=25) == data
            while not served:
                await trio.sleep(0.01)
        assert served == [(client.network.peer_id, CLIENT.address, h)]


async def test_a_peer_holding_64_idle_data_streams_does_not_stop_the_client_and_a_verifier_fetching(
    tmp_path: Path,
) -> None:
    """Issue 13: a stock py-libp2p peer opened 64 /p2pgpu/data/1 streams and sent nothing; the client's and the
    verifiers' result fetches were refused ``busy``, and the verifiers attested fraud against an honest provider."""
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    verifier_seed = b"\x54" * 32
    verifier = AccountKey.from_seed(verifier_seed)
    async with planes(tmp_path, SERVER_SEED, STRANGER_SEED, CLIENT_SEED, verifier_seed) as (
        provider, attacker, client, auditor,
    ):
        assert provider.sealed is not None
        provider.serve(lambda peer, address, blob: address in (CLIENT.address, verifier.address))
        result_context = task_context(CHAIN, TASK, Purpose.RESULT)
        result = provider.sealed.seal_put(os.urandom(MB), context=result_context)
        with trio.fail_after(30):
            idle = [await attacker.network._host.new_stream(ID.from_base58(provider.network.peer_id),
                                                            [TProtocol(DATA_PROTOCOL)]) for _ in range(64)]
            await trio.sleep(0.5)  # the provider has taken every one of them in
            for fetcher in (client, auditor):
                got = await fetcher.fetch_sealed(provider.network.peer_id, result.name, context=result_context,
                                                 max_bytes=2 * MB, timeout=20)
                assert hashlib.sha256(got).digest() == result.name
        assert provider.metrics.served == 2
        for stream in idle:
            await stream.reset()


async def test_a_pushed_sealed_blob_is_checked_like_a_fetched_one_and_then_opens_without_a_fetch(
        tmp_path: Path) -> None:
    # The client learns the fetcher's X25519 key from its own sealed request, then pushes the next input wrapped
    # for it (p2pgpu.bidlink); the fetcher keeps what opens, refuses and charges what does not.
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED) as (holder, fetcher):
        assert holder.sealed is not None and fetcher.sealed is not None
        holder.serve(only_client)
        holder_peer, fetcher_peer = holder.network.peer_id, fetcher.network.peer_id
        assert holder.recipient_key_of(fetcher_peer) is None
        first = holder.sealed.seal_put(b"first input", context=INPUTS)
        with trio.fail_after(20):
            await fetcher.fetch_sealed(holder_peer, first.name, context=INPUTS, max_bytes=MB, timeout=8)
        key = holder.recipient_key_of(fetcher_peer)
        assert key == fetcher.sealed.public_key

        def push_of(plaintext: bytes, context: bytes = INPUTS) -> tuple[bytes, SealedHeader, bytes]:
            ref = holder.sealed.seal_put(plaintext, context=context)  # type: ignore[union-attr]
            header = holder.sealed.wrap_for(ref, key)  # type: ignore[union-attr]
            return ref.name, header, holder.store.get(ref.content_hash)

        name, header, body = push_of(b"second input")
        with trio.fail_after(10):
            assert await fetcher.accept_pushed_sealed(holder_peer, name, context=INPUTS, header=header, body=body)
            assert not await fetcher.accept_pushed_sealed(holder_peer, name, context=INPUTS, header=header,
                                                          body=body), "a copy is here: nothing replaced"
            served = holder.metrics.served
            assert await fetcher.fetch_sealed(holder_peer, name, context=INPUTS, max_bytes=MB,
                                              timeout=8) == b"second input"
        assert holder.metrics.served == served, "the pushed copy opened without a fetch"
        assert fetcher.metrics.pushed == {"stored": 1, "had": 1}

        # refused, by name: bytes that are not the header's body, another task's input, a wrong plaintext
        name, header, body = push_of(b"third input")
        flipped = bytearray(body)
        flipped[-1] ^= 1
        replayed_name, replayed_header, replayed_body = push_of(b"task B's input", OTHER_TASK_INPUTS)
        with trio.fail_after(10):
            with pytest.raises(IntegrityError, match="content hash"):
                await fetcher.accept_pushed_sealed(holder_peer, name, context=INPUTS, header=header,
                                                   body=bytes(flipped))
            with pytest.raises(WrongContext):
                await fetcher.accept_pushed_sealed(holder_peer, replayed_name, context=INPUTS,
                                                   header=replayed_header, body=replayed_body)
            with pytest.raises(PlaintextMismatch):
                await fetcher.accept_pushed_sealed(holder_peer, name_of(b"what the spec names"), context=INPUTS,
                                                   header=header, body=body)
        assert fetcher.metrics.pushed == {"stored": 1, "had": 1, "refused": 3}
        assert fetcher.metrics.penalties == 3 and fetcher.network.scores.score(holder_peer, trio.current_time()) < 0
        assert fetcher.sealed.lookup(name, context_id(INPUTS)) is None
        assert not fetcher.store.has(header.content_hash), "a refused body is not kept"
        # the real input still comes by fetch
        with trio.fail_after(20):
            assert await fetcher.fetch_sealed(holder_peer, name, context=INPUTS, max_bytes=MB,
                                              timeout=8) == b"third input"


async def test_a_pushes_plaintext_is_held_for_its_one_fetch_within_bounds(tmp_path: Path, monkeypatch) -> None:
    # The fetch that follows a push (the client's hint, the provider's assignment) takes the plaintext the
    # push was checked with instead of opening the stored copy again; held for one fetch, and only so many.
    from p2pgpu.dataplane import service

    monkeypatch.setattr(service, "PUSHED_PLAINTEXTS_KEPT", 2)
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED) as (holder, fetcher):
        assert holder.sealed is not None and fetcher.sealed is not None
        key = fetcher.sealed.public_key
        holder_peer = holder.network.peer_id
        pushed = []
        for n in range(3):
            ref = holder.sealed.seal_put(b"input %d" % n, context=INPUTS)
            header = holder.sealed.wrap_for(ref, key)
            with trio.fail_after(10):
                assert await fetcher.accept_pushed_sealed(holder_peer, ref.name, context=INPUTS, header=header,
                                                          body=holder.store.get(ref.content_hash))
            pushed.append(ref)
        opens = []
        real_open_ref = fetcher.sealed.open_ref
        monkeypatch.setattr(fetcher.sealed, "open_ref", lambda *a, **k: (opens.append(a), real_open_ref(*a, **k))[1])
        with trio.fail_after(10):
            for n, ref in enumerate(pushed):  # no holder serving: a fetch could only open what is here
                got = await fetcher.fetch_sealed(holder_peer, ref.name, context=INPUTS, max_bytes=MB, timeout=8)
                assert got == b"input %d" % n
            assert len(opens) == 1, "the two newest were held; the oldest opened from the store"
            again = await fetcher.fetch_sealed(holder_peer, pushed[2].name, context=INPUTS, max_bytes=MB, timeout=8)
            assert again == b"input 2" and len(opens) == 2, "held for one fetch: the next opens the stored copy"
            with pytest.raises(Oversized):  # a held plaintext obeys the fetch's limit as the stored copy would
                ref = holder.sealed.seal_put(b"x" * 4096, context=INPUTS)
                await fetcher.accept_pushed_sealed(holder_peer, ref.name, context=INPUTS,
                                                   header=holder.sealed.wrap_for(ref, key),
                                                   body=holder.store.get(ref.content_hash))
                await fetcher.fetch_sealed(holder_peer, ref.name, context=INPUTS, max_bytes=1024, timeout=8)


async def test_a_fetch_started_while_a_push_of_it_is_being_kept_waits_for_it_instead_of_fetching(
        tmp_path: Path, monkeypatch) -> None:
    # A client's link reader announces a result push (expect_push) and keeps it in a task of its own, reading
    # on; the hint behind it starts a fetch of that result at once. The fetch must take the pushed copy, not
    # race it to the network (the holder here serves nobody: a network fetch would fail).
    async with planes(tmp_path, SERVER_SEED, CLIENT_SEED) as (holder, fetcher):
        assert holder.sealed is not None and fetcher.sealed is not None
        ref = holder.sealed.seal_put(b"the result", context=INPUTS)
        header = holder.sealed.wrap_for(ref, fetcher.sealed.public_key)
        body = holder.store.get(ref.content_hash)
        holder_peer = holder.network.peer_id
        real_put = fetcher.store.put_stream

        def slow_put(*args, **kwargs):  # a loaded machine: the worker thread's store write takes a while
            time.sleep(0.3)
            return real_put(*args, **kwargs)

        monkeypatch.setattr(fetcher.store, "put_stream", slow_put)
        got: list[bytes] = []

        async def fetch() -> None:
            got.append(await fetcher.fetch_sealed(holder_peer, ref.name, context=INPUTS, max_bytes=MB, timeout=8))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                fetcher.expect_push(ref.name, INPUTS)
                nursery.start_soon(fetch)  # the hint's fetch starts before the push's keeping does
                await trio.sleep(0.1)
                nursery.start_soon(partial(fetcher.accept_pushed_sealed, holder_peer, ref.name, context=INPUTS,
                                           header=header, body=body))
        assert got == [b"the result"] and fetcher.metrics.pushed == {"stored": 1}
        assert holder.metrics.served == 0 and fetcher._pushes_in_flight == {}
