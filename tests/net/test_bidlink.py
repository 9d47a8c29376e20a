"""The provider-to-client bid link (p2pgpu.bidlink): framing, fallback to gossip, and real libp2p hosts."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgpack
import pytest
import trio

from ledger.codec import encode
from p2pgpu.bidlink import (BID_LINK_PROTOCOL, MAX_LINK_FRAME_BYTES, MAX_PUSH_BYTES, BidLinks, ClientLinks,
                            InputsPush, LinkKind, PushedInput, ResultPush, decode_hello, decode_inputs_push,
                            decode_link_frame, decode_result_push, encode_link_frame, serve_bid_links)
from p2pgpu.net import PeerUnreachable, ProtocolError

from .conftest import FAST, nodes, wait_until


def test_frames_round_trip_and_bad_frames_name_the_problem() -> None:
    assert decode_link_frame(encode_link_frame(LinkKind.BID, b"bid")) == (LinkKind.BID, b"bid")
    assert decode_link_frame(encode_link_frame(LinkKind.COMMITMENT, b"tx")) == (LinkKind.COMMITMENT, b"tx")
    with pytest.raises(ProtocolError, match="empty"):
        decode_link_frame(b"")
    with pytest.raises(ProtocolError, match="unknown kind 9"):
        decode_link_frame(b"\x09abc")
    with pytest.raises(ProtocolError, match="BID frame with no payload"):
        decode_link_frame(b"\x01")


class FakeStreams:
    """``open_stream`` for BidLinks with the network faked: records frames per peer, fails where told."""

    def __init__(self, *, unreachable: frozenset[str] = frozenset(), stall: frozenset[str] = frozenset(),
                 hello: bytes | None = None) -> None:
        self.hello = hello
        """What the fake clients write first (a HELLO frame), if anything."""
        self.frames: dict[str, list[bytes]] = {}
        self.writes: dict[str, int] = {}
        """Writes per peer: the frames queued while one was written go together in the next."""
        self.attempts: list[str] = []
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.unreachable = unreachable
        self.stall = stall

    @asynccontextmanager
    async def open_stream(self, peer: str, protocol: str) -> AsyncIterator[object]:
        assert protocol == BID_LINK_PROTOCOL
        self.attempts.append(peer)
        await trio.sleep(0.01)  # opening takes a while: messages queue meanwhile
        if peer in self.unreachable:
            raise PeerUnreachable(f"cannot open {protocol} stream to peer {peer}")
        self.opened.append(peer)
        fake = self

        class Stream:
            async def send(self, data: bytes) -> None:
                if peer in fake.stall:
                    await trio.sleep_forever()
                await trio.lowlevel.checkpoint()
                fake.frames.setdefault(peer, []).append(data)

            async def send_many(self, payloads: list[bytes]) -> None:  # one write, the frames in order
                if peer in fake.stall:
                    await trio.sleep_forever()
                await trio.lowlevel.checkpoint()
                fake.frames.setdefault(peer, []).extend(payloads)
                fake.writes.setdefault(peer, 0)
                fake.writes[peer] += 1

            said_hello = False

            async def receive(self) -> bytes | None:
                if fake.hello is not None and not self.said_hello:
                    self.said_hello = True
                    return fake.hello
                await trio.sleep_forever()  # nothing more from the client
                return None

        try:
            yield Stream()
        finally:
            self.closed.append(peer)


async def test_messages_to_many_clients_at_once_go_in_order_one_link_each() -> None:
    fake = FakeStreams()
    gossiped: list[bytes] = []
    links = BidLinks(fake.open_stream, gossiped.append, idle_seconds=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(links.run)

        async def sender(peer: str) -> None:
            for i in range(50):
                links.send_bid(peer, b"%s-%d" % (peer.encode(), i))
                if i % 7 == 0:
                    await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as senders:
            for p in ("a", "b", "c", "d"):
                senders.start_soon(sender, p)
        await wait_until(lambda: sum(map(len, fake.frames.values())) == 200, what="200 frames")
        for p in ("a", "b", "c", "d"):
            assert fake.frames[p] == [encode_link_frame(LinkKind.BID, b"%s-%d" % (p.encode(), i)) for i in range(50)]
        assert sorted(fake.opened) == ["a", "b", "c", "d"]  # one link per client, however many messages
        assert gossiped == []
        # what queued while a link opened (or was being written) went in one write, not one per frame
        assert all(fake.writes[p] < 50 for p in "abcd"), fake.writes
        # idle links close, and a later message opens a new one
        await wait_until(lambda: links.open_links == 0, what="idle links closed")
        assert sorted(fake.closed) == ["a", "b", "c", "d"]
        links.send_bid("a", b"again")
        await wait_until(lambda: fake.frames["a"][-1] == encode_link_frame(LinkKind.BID, b"again"), what="reopened")
        assert fake.opened.count("a") == 2
        assert links.counters["sent"] == 201
        nursery.cancel_scope.cancel()


async def test_a_link_that_cannot_open_sends_bids_by_gossip_and_drops_hints() -> None:
    fake = FakeStreams(unreachable=frozenset({"gone"}))
    gossiped: list[bytes] = []
    links = BidLinks(fake.open_stream, gossiped.append, retry_seconds=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(links.run)
        links.send_bid("gone", b"bid-1")
        links.send_commitment("gone", b"hint")
        links.send_bid("gone", b"bid-2")
        links.send_bid(None, b"no-peer")  # the client's peer is not known: gossip at once
        assert gossiped == [b"no-peer"]
        await wait_until(lambda: len(gossiped) == 3, what="fallback")
        assert gossiped == [b"no-peer", b"bid-1", b"bid-2"]  # in order; the hint is not gossip
        assert links.counters["dropped"] == 1 and links.counters["failed"] == 1
        assert links.open_links == 0
        # an older client, or one out of reach: no link is tried again for a while, its bids go by gossip at once
        links.send_bid("gone", b"bid-3")
        assert gossiped[-1] == b"bid-3" and fake.attempts == ["gone"]
        await trio.sleep(0.35)
        links.send_bid("gone", b"bid-4")  # the wait is over: a link is tried again (and fails again)
        await wait_until(lambda: gossiped[-1] == b"bid-4", what="bid-4 by gossip after a second failure")
        assert fake.attempts == ["gone", "gone"]
        nursery.cancel_scope.cancel()


async def test_a_stalled_link_and_a_full_queue_fall_back_to_gossip() -> None:
    fake = FakeStreams(stall=frozenset({"slow"}))
    gossiped: list[bytes] = []
    links = BidLinks(fake.open_stream, gossiped.append, queue_size=4, write_seconds=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(links.run)
        for i in range(10):
            links.send_bid("slow", b"%d" % i)
        # 4 fit the queue, the other 6 go by gossip at once
        assert gossiped == [b"%d" % i for i in range(4, 10)]
        # the first write stalls past write_seconds: the link closes and what it held goes by gossip too
        await wait_until(lambda: len(gossiped) == 10, what="stalled frames gossiped")
        assert sorted(gossiped) == sorted(b"%d" % i for i in range(10))
        assert links.open_links == 0 and fake.frames.get("slow") is None
        nursery.cancel_scope.cancel()


async def test_a_real_link_between_two_hosts_carries_bids_and_hints_and_charges_bad_frames() -> None:
    async with nodes([FAST, FAST], boot={1: [0]}) as (client, provider):
        bids: list[tuple[str, bytes]] = []
        hints: list[tuple[str, bytes]] = []

        def on_bid(peer: str, data: bytes) -> None:
            if data == b"forged":
                raise ProtocolError("a forged bid")
            bids.append((peer, data))

        serve_bid_links(client.set_stream_handler, on_bid, lambda peer, data: hints.append((peer, data)))
        gossiped: list[bytes] = []
        links = BidLinks(provider.open_stream, gossiped.append)
        async with trio.open_nursery() as nursery:
            await nursery.start(links.run)
            for i in range(100):
                links.send_bid(client.peer_id, b"bid-%d" % i)
            links.send_commitment(client.peer_id, b"commit")
            await wait_until(lambda: len(bids) == 100 and len(hints) == 1, what="100 bids and a hint")
            assert bids == [(provider.peer_id, b"bid-%d" % i) for i in range(100)]
            assert hints == [(provider.peer_id, b"commit")]
            assert links.counters["opened"] == 1 and gossiped == []
            # a bad frame ends the link and charges the provider; the next message opens a new link
            links.send_bid(client.peer_id, b"forged")
            await wait_until(lambda: client.metrics.request_errors[(BID_LINK_PROTOCOL, "ProtocolError")] == 1,
                             what="the forged frame refused")
            await wait_until(lambda: links.open_links == 0, what="the provider seeing its link ended")
            links.send_bid(client.peer_id, b"x" * (MAX_LINK_FRAME_BYTES + 1))  # oversized: refused the same way
            await wait_until(lambda: client.metrics.request_errors[(BID_LINK_PROTOCOL, "ProtocolError")] == 2,
                             what="the oversized frame refused")
            await wait_until(lambda: links.open_links == 0, what="the provider seeing its link ended again")
            links.send_bid(client.peer_id, b"after")
            await wait_until(lambda: bids[-1] == (provider.peer_id, b"after"), what="a bid after the refusal")
            nursery.cancel_scope.cancel()


def push_of(*names: bytes, body: bytes = b"sealed body") -> InputsPush:
    return InputsPush(b"\x07" * 32, tuple(PushedInput(n, b"header", body) for n in names))


def test_an_inputs_push_round_trips_and_a_bad_one_names_the_problem() -> None:
    push = push_of(b"\x01" * 32, b"\x02" * 32)
    assert decode_inputs_push(encode(push)) == push
    with pytest.raises(ProtocolError, match="does not decode"):
        decode_inputs_push(b"\x92garbage")
    with pytest.raises(ProtocolError, match="names one input twice"):
        decode_inputs_push(encode(push_of(b"\x01" * 32, b"\x01" * 32)))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_inputs_push(encode(push_of(b"\x01" * 32, b"\x02" * 32, body=b"x" * (MAX_PUSH_BYTES // 2 + 1))))
    with pytest.raises(ProtocolError, match="does not decode"):  # no inputs at all
        decode_inputs_push(msgpack.packb([b"\x07" * 32, []]))


async def test_a_client_pushes_inputs_back_on_a_providers_link_and_a_bad_push_ends_it() -> None:
    async with nodes([FAST, FAST], boot={1: [0]}) as (client, provider):
        client_links = ClientLinks()
        serve_bid_links(client.set_stream_handler, lambda peer, data: None, lambda peer, data: None,
                        links=client_links)
        pushes: list[tuple[str, InputsPush]] = []

        def on_inputs(peer: str, payload: bytes) -> None:
            pushes.append((peer, decode_inputs_push(payload)))

        links = BidLinks(provider.open_stream, lambda data: None, on_inputs=on_inputs)
        async with trio.open_nursery() as nursery:
            await nursery.start(links.run)
            assert not await client_links.push(provider.peer_id, push_of(b"\x01" * 32)), "no link yet"
            links.send_bid(client.peer_id, b"bid")
            await wait_until(lambda: client_links.has(provider.peer_id), what="the link at the client")
            sent = [push_of(b"\x01" * 32, b"\x02" * 32), push_of(b"\x03" * 32)]
            async with trio.open_nursery() as writers:  # concurrent pushes on one link are written whole
                for push in sent:
                    writers.start_soon(client_links.push, provider.peer_id, push)
            await wait_until(lambda: len(pushes) == 2, what="both pushes at the provider")
            assert sorted(p.inputs[0].name for _, p in pushes) == [b"\x01" * 32, b"\x03" * 32]
            assert {peer for peer, _ in pushes} == {client.peer_id}
            assert client_links.counters["pushed"] == 2
            # a frame the provider cannot take ends its link (and the client's registry forgets it)
            await client_links.push(provider.peer_id, push_of(b"\x04" * 32, b"\x04" * 32))
            await wait_until(lambda: links.open_links == 0, what="the provider ending the link")
            await wait_until(lambda: not client_links.has(provider.peer_id), what="the client forgetting the link")
            assert not await client_links.push(provider.peer_id, push_of(b"\x05" * 32))
            nursery.cancel_scope.cancel()


async def test_keys_are_traded_on_a_new_link_and_a_result_is_read_before_the_hint_behind_it() -> None:
    client_key, provider_key = b"\xc1" * 32, b"\xb2" * 32
    async with nodes([FAST, FAST, FAST], boot={1: [0], 2: [0]}) as (client, provider, old_client):
        events: list[tuple[str, bytes]] = []

        def on_result(peer: str, payload: bytes) -> None:  # starts the push's keeping; the hint's fetch waits for it
            events.append(("result", decode_result_push(payload).result.name))

        client_links = ClientLinks(own_key=client_key)
        serve_bid_links(client.set_stream_handler, lambda peer, data: None,
                        lambda peer, data: events.append(("hint", data)), links=client_links, on_result=on_result)
        # a client from before pushes: no HELLO, no RESULT handler
        serve_bid_links(old_client.set_stream_handler, lambda peer, data: None, lambda peer, data: None)
        links = BidLinks(provider.open_stream, lambda data: None, own_key=provider_key, idle_seconds=1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(links.run)
            links.send_bid(client.peer_id, b"bid")
            links.send_bid(old_client.peer_id, b"bid")
            await wait_until(lambda: links.client_key(client.peer_id) == client_key, what="the client's HELLO")
            await wait_until(lambda: client_links.provider_key(provider.peer_id) == provider_key,
                             what="the provider's HELLO in answer")
            result = ResultPush(b"\x07" * 32, PushedInput(b"\x0a" * 32, b"header", b"x" * 100_000))
            assert links.send_result(client.peer_id, result)
            links.send_commitment(client.peer_id, b"commit")
            await wait_until(lambda: len(events) == 2, what="the result and the hint")
            assert events == [("result", b"\x0a" * 32), ("hint", b"commit")]
            # the old client never said HELLO: nothing is pushed to it (its fetch gets the result)
            await trio.sleep(0.2)
            assert links.client_key(old_client.peer_id) is None
            assert not links.send_result(old_client.peer_id, result)
            assert not links.send_result(None, result)
            # an idle link closes; the next one is asked anew, and its client says HELLO again
            await wait_until(lambda: links.open_links == 0, what="the idle links closing")
            assert not links.reads_pushes(client.peer_id) and not links.send_result(client.peer_id, result)
            links.send_bid(client.peer_id, b"bid again")
            await wait_until(lambda: links.reads_pushes(client.peer_id), what="the new link's HELLO")
            assert links.send_result(client.peer_id, result)
            links.send_commitment(client.peer_id, b"commit again")
            await wait_until(lambda: len(events) == 4, what="the second result and hint")
            assert events[2:] == [("result", b"\x0a" * 32), ("hint", b"commit again")]
            nursery.cancel_scope.cancel()


async def test_a_client_waits_a_moment_for_a_new_links_hello_and_no_longer_than_the_link() -> None:
    provider_key = b"\xb2" * 32
    async with nodes([FAST, FAST, FAST], boot={1: [0], 2: [0]}) as (client, provider, old_provider):
        client_links = ClientLinks(own_key=b"\xc1" * 32)
        serve_bid_links(client.set_stream_handler, lambda peer, data: None, lambda peer, data: None,
                        links=client_links)
        assert await client_links.wait_provider_key(provider.peer_id, timeout=5) is None, "no link: no wait"
        links = BidLinks(provider.open_stream, lambda data: None, own_key=provider_key, idle_seconds=1.0)
        old_links = BidLinks(old_provider.open_stream, lambda data: None, idle_seconds=1.0)  # never answers
        async with trio.open_nursery() as nursery:
            await nursery.start(links.run)
            await nursery.start(old_links.run)
            old_links.send_bid(client.peer_id, b"bid")
            await wait_until(lambda: client_links.has(old_provider.peer_id), what="the old provider's link")
            waits: list[bytes | None] = []

            async def wait_for_key() -> None:
                waits.append(await client_links.wait_provider_key(provider.peer_id, timeout=10))

            links.send_bid(client.peer_id, b"bid")
            await wait_until(lambda: client_links.has(provider.peer_id), what="the provider's link")
            async with trio.open_nursery() as waiting:  # many pushes may wait on one link's HELLO
                for _ in range(5):
                    waiting.start_soon(wait_for_key)
            assert waits == [provider_key] * 5
            # an older provider never answers: the wait ends with the link (idle), not with the timeout
            with trio.fail_after(60):  # a guard against a hang: only the link's end can end this wait
                assert await client_links.wait_provider_key(old_provider.peer_id, timeout=math.inf) is None
            assert not client_links.has(old_provider.peer_id)
            nursery.cancel_scope.cancel()


def test_a_hello_is_one_x25519_key_and_a_result_push_decodes_or_names_the_problem() -> None:
    assert decode_hello(b"k" * 32) == b"k" * 32
    with pytest.raises(ProtocolError, match="HELLO of 31 bytes"):
        decode_hello(b"k" * 31)
    push = ResultPush(b"\x07" * 32, PushedInput(b"\x0a" * 32, b"header", b"body"))
    assert decode_result_push(encode(push)) == push
    with pytest.raises(ProtocolError, match="result push does not decode"):
        decode_result_push(b"\x92junk")


async def test_a_client_that_reads_slowly_gets_results_by_fetch_past_a_bounded_backlog() -> None:
    from p2pgpu.bidlink import MAX_QUEUED_PUSH_BYTES

    fake = FakeStreams(stall=frozenset({"slow"}), hello=encode_link_frame(LinkKind.HELLO, b"k" * 32))
    links = BidLinks(fake.open_stream, lambda data: None, own_key=b"p" * 32, write_seconds=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(links.run)
        links.send_bid("slow", b"bid")
        await wait_until(lambda: links.reads_pushes("slow"), what="the fake client's HELLO")
        big = ResultPush(b"\x07" * 32, PushedInput(b"\x0a" * 32, b"h", b"x" * (MAX_PUSH_BYTES - 64)))
        taken = 0
        while links.send_result("slow", big):
            taken += 1
        # the link writes nothing (stalled): what it may hold of results is bounded, the rest is left to fetches
        assert taken == MAX_QUEUED_PUSH_BYTES // len(encode(big)) and links.counters["push_backed_up"] == 1
        links.send_commitment("slow", b"hint")  # hints still queue behind them
        nursery.cancel_scope.cancel()


async def test_a_provider_that_reads_slowly_has_inputs_fetched_past_a_few_waiting_pushes() -> None:
    from p2pgpu.bidlink import MAX_PUSHES_WAITING

    class StalledStream:
        peer = "slow-provider"

        async def send(self, data: bytes) -> None:
            await trio.sleep_forever()

    links = ClientLinks(own_key=b"c" * 32)
    links._add(StalledStream())  # type: ignore[arg-type]
    results: list[bool] = []

    async def one() -> None:
        results.append(await links.push("slow-provider", push_of(b"\x01" * 32), timeout=0.5))

    async with trio.open_nursery() as nursery:
        for _ in range(MAX_PUSHES_WAITING + 4):
            nursery.start_soon(one)
    # one held the link, MAX_PUSHES_WAITING queued behind it (all timed out), the rest were skipped at once
    assert results.count(False) == MAX_PUSHES_WAITING + 4
    assert links.counters["push_backed_up"] == 3 and links.counters["push_failed"] == MAX_PUSHES_WAITING + 1
