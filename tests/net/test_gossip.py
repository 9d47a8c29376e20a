"""Gossip over real libp2p hosts on 127.0.0.1: discovery, bursts, validation, bans."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import pytest
import trio

from p2pgpu.net import open_network
from p2pgpu.net import GossipMessage, MessageTooLarge, PeerUnreachable, PublishRejected, ScoreConfig, Verdict, accept, reject

from .conftest import FAST, mesh_ready, nodes, seed, wait_until

TOPIC = "/p2pgpu/test/tx"


def accept_all(peer: str, data: bytes) -> Verdict:
    return accept()


async def drain(channel: trio.MemoryReceiveChannel[GossipMessage], count: int, timeout: float = 20.0) -> list[bytes]:
    out: list[bytes] = []
    with trio.fail_after(timeout):
        while len(out) < count:
            out.append((await channel.receive()).data)
    return out


def remote_only(channel: trio.MemoryReceiveChannel[GossipMessage]) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(channel.receive_nowait().data)
        except trio.WouldBlock:
            return out


async def test_line_bootstrap_peer_exchange_and_gossip_across() -> None:
    # C bootstraps from B, B from A: C must learn A through /p2pgpu/peers/1.
    async with nodes([FAST, FAST, FAST], boot={1: [0], 2: [1]}) as (a, b, c):
        await wait_until(lambda: a.peer_id in c.connected_peers(), what="C to discover A via peer exchange")
        channels = [await n.subscribe(TOPIC, accept_all) for n in (a, b, c)]
        await mesh_ready(a, c, TOPIC)
        await a.publish(TOPIC, b"hello from A")
        assert await drain(channels[2], 1) == [b"hello from A"]
        assert (await channels[0].receive()).local, "own publications are delivered, marked local"
        assert await c.request_status(a.peer_id) == {}
        assert a.metrics.peers_connected == 2


async def test_burst_of_300_reaches_every_subscriber_without_drops() -> None:
    async with nodes([FAST] * 4, boot={1: [0], 2: [0], 3: [1]}) as nets:
        channels = [await n.subscribe(TOPIC, accept_all) for n in nets]
        await wait_until(lambda: all(len(n.connected_peers()) >= 2 for n in nets), what="peer exchange")
        for other in nets[1:]:
            await wait_until(lambda o=other: bool(o.gossip.mesh_peers(TOPIC)), what="meshes")
            await wait_until(lambda o=other: o.peer_id in nets[0].gossip.topic_peers(TOPIC) or
                             any(o.peer_id in n.gossip.topic_peers(TOPIC) for n in nets), what="subscriptions")
        await wait_until(lambda: len(nets[0].gossip.topic_peers(TOPIC)) >= 2, what="publisher to see subscribers")
        payloads = [b"%05d" % i + b"x" * 200 for i in range(300)]
        for p in payloads:
            await nets[0].publish(TOPIC, p)
        for net, channel in zip(nets[1:], channels[1:]):
            got = await drain(channel, 300, timeout=60)
            assert sorted(got) == payloads, f"{net.peer_id} missed messages"
        assert sum(n.metrics.dropped[TOPIC] for n in nets) == 0
        assert nets[0].metrics.published[TOPIC] == 300
        assert all(n.metrics.delivered[TOPIC] == 300 for n in nets)


async def test_validator_rejections_are_not_delivered_nor_forwarded() -> None:
    def no_bad(peer: str, data: bytes) -> Verdict:
        if data.startswith(b"boom"):
            raise RuntimeError("validator bug")
        return reject("bad_prefix") if data.startswith(b"bad") else accept()

    solo = replace(FAST, target_peers=1)  # no peer exchange: S and T only meet through V
    async with nodes([solo, solo, solo], boot={1: [0], 2: [0]}) as (v, s, t):
        v_in = await v.subscribe(TOPIC, no_bad)
        s_in = await s.subscribe(TOPIC, accept_all)
        t_in = await t.subscribe(TOPIC, accept_all)
        await mesh_ready(v, s, TOPIC)
        await mesh_ready(v, t, TOPIC)
        assert t.peer_id not in s.connected_peers()

        bad = [b"bad-%d" % i for i in range(3)] + [b"boom"]
        good = [b"good-%d" % i for i in range(5)]
        for data in bad + good:
            await s.publish(TOPIC, data)
        assert sorted(await drain(t_in, len(good))) == good
        await wait_until(lambda: sum(v.metrics.rejected.values()) == len(bad), what="rejections at V")
        assert v.metrics.rejected[(TOPIC, "bad_prefix")] == 3
        assert v.metrics.rejected[(TOPIC, "validator_error")] == 1
        assert sorted(await drain(v_in, len(good))) == good
        assert remote_only(v_in) == [] and remote_only(t_in) == []
        assert v.scores.score(s.peer_id, trio.current_time()) < 0
        assert v.scores.score(t.peer_id, trio.current_time()) == 0
        assert len(remote_only(s_in)) == len(bad) + len(good)  # S delivers its own

        # V keeps working: a fresh message from T still reaches S through V.
        await t.publish(TOPIC, b"after")
        assert await drain(s_in, 1) == [b"after"]


async def test_repeat_offender_is_banned_and_disconnected() -> None:
    strict = replace(FAST, target_peers=1, score=ScoreConfig(rejection_penalty=10, ban_threshold=-25, ban_seconds=600))
    async with nodes([strict, strict], boot={1: [0]}) as (v, s):
        await v.subscribe(TOPIC, lambda p, d: reject("always"))
        await s.subscribe(TOPIC, accept_all)
        await mesh_ready(v, s, TOPIC)
        for i in range(3):
            await s.publish(TOPIC, b"spam-%d" % i)
        await wait_until(lambda: v.scores.is_banned(s.peer_id, trio.current_time()), what="ban")
        assert v.metrics.bans == 1
        await wait_until(lambda: s.peer_id not in v.connected_peers(), what="banned peer disconnected")
        with pytest.raises(PeerUnreachable, match="banned"):
            await v.connect(s.addrs[0])
        with pytest.raises(PublishRejected, match="always"):
            await v.publish(TOPIC, b"own message its own validator refuses")
        assert v.metrics.published[TOPIC] == 0


async def test_oversized_messages_rejected_before_validation() -> None:
    seen: list[bytes] = []

    def record(peer: str, data: bytes) -> Verdict:
        seen.append(data)
        return accept()

    async with nodes([FAST, FAST], boot={1: [0]}) as (v, s):
        v_in = await v.subscribe(TOPIC, record, max_message_size=100)
        await s.subscribe(TOPIC, accept_all)  # S allows the default, larger size
        await mesh_ready(v, s, TOPIC)
        await s.publish(TOPIC, b"x" * 101)
        await s.publish(TOPIC, b"small")
        assert await drain(v_in, 1) == [b"small"]
        await wait_until(lambda: v.metrics.rejected[(TOPIC, "oversized")] == 1, what="oversized rejection")
        assert seen == [b"small"], "the validator never saw the oversized message"
        with pytest.raises(MessageTooLarge, match="101 bytes"):
            await v.publish(TOPIC, b"x" * 101)


async def test_a_restarted_peer_is_relayed_again() -> None:
    """A peer that restarts with the same identity is heard beyond its first hop at once.

    libp2p's relay dropped (and penalised) messages reusing a (sender, seqno)
    pair as "equivocation"; a restart reused seqnos. A -> B -> C, no A-C link.
    """
    line = replace(FAST, target_peers=1)
    async with nodes([line, line], boot={1: [0]}) as (b, c):
        await b.subscribe(TOPIC, accept_all)
        channel = await c.subscribe(TOPIC, accept_all)
        await mesh_ready(b, c, TOPIC)
        for life in range(2):
            async with open_network(replace(line, bootstrap_peers=(b.addrs[0],)), seed(9)) as a:
                await a.subscribe(TOPIC, accept_all)
                await mesh_ready(a, b, TOPIC)
                assert a.peer_id not in c.connected_peers()
                for k in range(5):
                    await a.publish(TOPIC, f"life {life} message {k}".encode())
                got = await drain(channel, 5)
                # gossip promises delivery, not order: a burst queued for one peer goes out as one RPC,
                # whose messages the receiver handles concurrently
                assert sorted(got) == [f"life {life} message {k}".encode() for k in range(5)]


async def test_a_peer_whose_queue_never_drains_cannot_silence_publishing() -> None:
    """Backpressure waits for a full peer queue only so long; then the node publishes anyway."""
    async with nodes([FAST, FAST], boot={1: [0]}) as (a, b):
        channel = await b.subscribe(TOPIC, accept_all)
        await a.subscribe(TOPIC, accept_all)
        await mesh_ready(a, b, TOPIC)
        stuck = next(iter(a.gossip.pubsub.peer_queues.values()))
        real_len = type(stuck).__len__
        try:
            type(stuck).__len__ = lambda self: 10**6 if self is stuck else real_len(self)  # never drains
            with trio.fail_after(10):
                await a.publish(TOPIC, b"still heard")
        finally:
            type(stuck).__len__ = real_len
        assert a.metrics.publish_wait_timeouts == 1
        assert await drain(channel, 1) == [b"still heard"]


async def test_a_message_published_before_anyone_listened_reaches_them_when_published_again() -> None:
    # Consensus rebroadcasts the same bytes for peers that missed them; content-addressed message ids
    # once made the publisher's own seen cache swallow every repeat for seen_ttl (120 s).
    # A 0.2 s heartbeat: the message leaves the gossip cache (5 heartbeats), so IHAVE/IWANT cannot recover it.
    quick = replace(FAST, gossip=replace(FAST.gossip, heartbeat_interval=0.2))
    async with nodes([quick, quick], boot={1: [0]}) as (a, b):
        a_channel = await a.subscribe(TOPIC, accept_all)
        await a.publish(TOPIC, b"vote h=1 r=0")  # b is connected but not subscribed: nobody gets it
        assert (await a_channel.receive()).local
        await trio.sleep(2.0)
        b_channel = await b.subscribe(TOPIC, accept_all)
        await mesh_ready(a, b, TOPIC)
        assert remote_only(b_channel) == []
        await a.publish(TOPIC, b"vote h=1 r=0")  # the rebroadcast
        assert await drain(b_channel, 1) == [b"vote h=1 r=0"]
        await a.publish(TOPIC, b"vote h=1 r=0")  # b has it now: dropped as a duplicate, not delivered twice
        await a.publish(TOPIC, b"next")
        assert await drain(b_channel, 1) == [b"next"]
        assert remote_only(a_channel) == [b"next"], "a repeat of our own is not delivered to us again"


async def test_a_subscription_made_while_a_peer_is_being_added_reaches_that_peer() -> None:
    # py-libp2p builds the hello (our topics) before writing it and registers the peer only after;
    # a subscription in between went to neither, and the two never exchanged gossip on it.
    async with nodes([FAST, FAST]) as (a, b), trio.open_nursery() as nursery:
        b_channel = await b.subscribe(TOPIC, accept_all)
        pubsub = a.gossip.pubsub
        build_hello = pubsub.get_hello_packet

        def hello_then_subscribe() -> Any:
            hello = build_hello()
            pubsub.get_hello_packet = build_hello  # once
            assert TOPIC not in {sub.topicid for sub in hello.subscriptions}
            nursery.start_soon(a.subscribe, TOPIC, accept_all)  # runs while the hello is being written
            return hello

        pubsub.get_hello_packet = hello_then_subscribe
        await a.connect(b.addrs[0])
        await mesh_ready(a, b, TOPIC)
        await a.publish(TOPIC, b"after the race")
        assert await drain(b_channel, 1) == [b"after the race"]


async def test_nothing_is_queued_for_ever_for_a_peer_that_does_not_follow_the_topic(monkeypatch) -> None:
    # py-libp2p queues each publish for connected peers not (yet) subscribed, in case their subscription is
    # still on its way, and never flushes it for a peer that simply does not follow the topic: the queue
    # filled to 100 and every publish pruned it and logged a warning.
    import p2pgpu.net.gossip as gossip

    monkeypatch.setattr(gossip, "PENDING_GRACE_S", 0.2)
    async with nodes([FAST, FAST], boot={1: [0]}) as (a, b):
        a_channel = await a.subscribe(TOPIC, accept_all)
        await wait_until(lambda: b.peer_id in {p.to_base58() for p in a.gossip.pubsub.peer_added_at},
                         what="b registered at a")
        await trio.sleep(0.3)
        for i in range(150):
            await a.publish(TOPIC, b"m%d" % i)
        await drain(a_channel, 150)
        router = a.gossip.pubsub.router
        assert not router._pending_messages, "messages queued for a peer whose topics are known"


async def test_idontwant_is_sent_for_large_messages_only(monkeypatch) -> None:
    from p2pgpu.net.gossip import IDONTWANT_MIN_BYTES, TunedGossipSub

    notices: list[bytes] = []
    original = TunedGossipSub.emit_idontwant

    async def counting(self, msg_ids: list[bytes], to_peer) -> None:
        notices.extend(msg_ids)
        await original(self, msg_ids, to_peer)

    monkeypatch.setattr(TunedGossipSub, "emit_idontwant", counting)
    async with nodes([FAST, FAST], boot={1: [0]}) as (a, b):
        await a.subscribe(TOPIC, accept_all)
        b_channel = await b.subscribe(TOPIC, accept_all)
        await mesh_ready(a, b, TOPIC)
        await wait_until(lambda: a.peer_id in b.gossip.mesh_peers(TOPIC) and b.peer_id in a.gossip.mesh_peers(TOPIC),
                         what="mesh")
        await a.publish(TOPIC, b"v" * 300)  # a vote-sized message: no notices
        assert await drain(b_channel, 1) == [b"v" * 300]
        await a.publish(TOPIC, b"B" * IDONTWANT_MIN_BYTES)  # a block-sized one: each tells its mesh (the other)
        assert await drain(b_channel, 1) == [b"B" * IDONTWANT_MIN_BYTES]
        await wait_until(lambda: len(notices) >= 2, what="IDONTWANT from both")
        await trio.sleep(0.2)
        assert len(notices) == 2 and len(set(notices)) == 1


def test_the_py_libp2p_internals_we_override_still_exist() -> None:
    """If py-libp2p renames what TunedPubsub/TunedGossipSub override or call, fail here, not silently."""
    import inspect

    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.pubsub.pubsub import Pubsub

    def params(fn: Any) -> list[str]:
        return list(inspect.signature(fn).parameters)

    assert params(Pubsub._handle_new_peer) == ["self", "peer_id"]
    assert params(Pubsub._build_announce_rpc) == ["self", "topic_id", "subscribe"]
    assert params(Pubsub._enqueue_or_retry_announce) == ["self", "peer_id", "queue", "rpc_msg", "announce"]
    assert params(Pubsub.get_hello_packet) == ["self"]
    assert params(GossipSub._emit_idontwant_for_message) == ["self", "msg_id", "topic_ids"]
    assert params(GossipSub.publish) == ["self", "msg_forwarder", "pubsub_msg"]
    assert params(Pubsub._handle_dead_peer) == ["self", "peer_id"]
    assert params(GossipSub._prune_pending_messages) == ["self", "peer_id"]  # _pending_messages: its queues


async def test_a_message_whose_envelope_signature_fails_is_charged_to_the_peer_that_sent_it() -> None:
    """libp2p drops it silently; the sender was never charged (issue 13). A good one costs nothing."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX

    async with nodes([FAST, FAST], boot={1: [0]}) as (a, b):
        await b.subscribe(TOPIC, accept_all)
        pubsub_a = a.gossip.pubsub
        sender = ID.from_base58(a.peer_id)

        def signed(data: bytes, *, flip: bool) -> rpc_pb2.Message:
            msg = rpc_pb2.Message(data=data, topicIDs=[TOPIC], from_id=sender.to_bytes(), seqno=pubsub_a._next_seqno())
            signature = pubsub_a.sign_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
            msg.key = a._host.get_public_key().serialize()
            msg.signature = bytes([signature[0] ^ 1]) + signature[1:] if flip else signature
            return msg

        now = trio.current_time()
        await b.gossip.pubsub.push_msg(sender, signed(b"fine", flip=False))
        assert b.scores.score(a.peer_id, now) == 0 and not b.metrics.rejected
        await b.gossip.pubsub.push_msg(sender, signed(b"forged", flip=True))
        assert b.metrics.rejected[("envelope", "bad_envelope_signature")] == 1
        assert b.scores.score(a.peer_id, trio.current_time()) < 0


async def test_garbage_and_oversized_pubsub_rpcs_are_charged_to_the_peer_that_sent_them() -> None:
    """libp2p dropped them (a parse error ended the read loop; an RPC over 1 MiB reset the stream) and charged
    no one (issue 13)."""
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID
    from libp2p.utils.varint import encode_uvarint

    from p2pgpu.net.gossip import GOSSIP_PROTOCOLS

    async with nodes([FAST, FAST], boot={1: [0]}) as (a, b):
        await b.subscribe(TOPIC, accept_all)
        b_id = ID.from_base58(b.peer_id)

        async def send_raw(frame: bytes) -> None:
            stream = await a._host.new_stream(b_id, [TProtocol(p) for p in GOSSIP_PROTOCOLS])
            with trio.move_on_after(2):
                await stream.write(frame)
                await trio.sleep(0.5)
            with contextlib.suppress(Exception):
                await stream.reset()

        garbage = b"\xff\xff\xff\xff not protobuf"
        await send_raw(encode_uvarint(len(garbage)) + garbage)
        await wait_until(lambda: b.metrics.rejected[("rpc", "garbage_rpc")] == 1, what="garbage RPC charged")
        await send_raw(encode_uvarint(4 << 20) + b"\x00" * 1024)  # announces 4 MiB: over libp2p's 1 MiB
        await wait_until(lambda: b.metrics.rejected[("rpc", "oversized_rpc")] == 1, what="oversized RPC charged")
        assert b.scores.score(a.peer_id, trio.current_time()) < 0


async def test_a_subscriber_receives_the_record_its_validator_accepted_the_message_with() -> None:
    """Decode once: what the validator decoded travels with the message, for remote and own publications."""
    def decode_upper(peer: str, data: bytes) -> Verdict:
        return accept(data.upper())

    async with nodes([FAST, FAST], boot={1: [0]}) as (a, b):
        channels = [await n.subscribe(TOPIC, decode_upper) for n in (a, b)]
        await mesh_ready(a, b, TOPIC)
        await a.publish(TOPIC, b"hello")
        with trio.fail_after(20):
            got = await channels[1].receive()
            own = await channels[0].receive()
        assert (got.data, got.record, got.local) == (b"hello", b"HELLO", False)
        assert (own.record, own.local) == (b"HELLO", True)


async def test_a_peer_over_its_message_rate_is_dropped_and_charged_once_a_second() -> None:
    """libp2p's own per-peer limit drops silently and charges nobody; ours counts what our validators accepted
    from each peer on each topic, and past ``peer_rate`` (after ``peer_burst``) drops the excess -- not
    forwarded -- and charges the peer, at most once a second (a ban takes several seconds of flooding)."""
    from p2pgpu.net.gossip import PEER_RATE_REASON
    from p2pgpu.net.config import GossipConfig

    solo = replace(FAST, target_peers=1)
    strict = replace(solo, gossip=GossipConfig(peer_rate=0.5, peer_burst=5))
    async with nodes([strict, solo, solo], boot={1: [0], 2: [0]}) as (v, s, t):
        await v.subscribe(TOPIC, accept_all)
        await s.subscribe(TOPIC, accept_all)
        t_in = await t.subscribe(TOPIC, accept_all)
        await mesh_ready(v, s, TOPIC)
        await mesh_ready(v, t, TOPIC)
        flood = [b"flood-%03d" % i for i in range(40)]
        started = trio.current_time()
        for data in flood:
            await s.publish(TOPIC, data)
        refused = lambda: v.metrics.ignored[(TOPIC, PEER_RATE_REASON)] + v.metrics.rejected[(TOPIC, PEER_RATE_REASON)]
        await wait_until(lambda: refused() + v.metrics.delivered[TOPIC] >= len(flood), what="V to judge the flood")
        took = trio.current_time() - started  # bounds below follow from the limits, whatever the machine's speed
        charged = v.metrics.charges[(TOPIC, PEER_RATE_REASON)]
        assert 1 <= charged <= 1 + took, (charged, took)  # once a second while the flood lasts, not once a message
        assert v.scores.score(s.peer_id, trio.current_time()) < 0
        assert v.metrics.delivered[TOPIC] <= 5 + 0.5 * took + 1, (v.metrics.delivered[TOPIC], took)
        assert refused() + v.metrics.delivered[TOPIC] == len(flood)
        await trio.sleep(0.5)
        got = remote_only(t_in)
        assert len(got) == v.metrics.delivered[TOPIC] and set(got) < set(flood)  # only what V let through
        assert v.scores.score(t.peer_id, trio.current_time()) == 0


async def test_the_default_peer_rate_lets_a_relays_burst_through() -> None:
    """An honest relay forwards every message of every client: a burst of 1,500 passes the default limit."""
    from p2pgpu.net.gossip import PEER_RATE_REASON

    solo = replace(FAST, target_peers=1)
    async with nodes([solo, solo], boot={1: [0]}) as (v, s):
        v_in = await v.subscribe(TOPIC, accept_all)
        await s.subscribe(TOPIC, accept_all)
        await mesh_ready(v, s, TOPIC)
        payloads = [b"%05d" % i for i in range(1500)]
        for p in payloads:
            await s.publish(TOPIC, p)
        assert sorted(await drain(v_in, len(payloads), timeout=60)) == payloads
        assert v.metrics.ignored[(TOPIC, PEER_RATE_REASON)] == 0 and v.metrics.charges[(TOPIC, PEER_RATE_REASON)] == 0


@pytest.mark.parametrize("fanout", [2, 1])
async def test_a_topic_published_without_following_it_goes_to_fanout_degree_peers(fanout: int) -> None:
    # A client publishes /tx without following it, to four followers in one full mesh. Each follower relays a
    # new message once to its mesh peers but the one it came from (and its author): the ``fanout_degree``
    # peers the publisher sent it to relay to the other three, the rest to two. py-libp2p's fanout was the
    # mesh degree (4): 16 copies a message, 4 at every follower; with 2, 12.
    config = replace(FAST, gossip=replace(FAST.gossip, fanout_degree=fanout))
    async with nodes([config] * 5, boot={1: [0], 2: [0, 1], 3: [0, 1, 2], 4: [0, 1, 2, 3]}) as nets:
        followers, publisher = nets[:4], nets[4]
        channels = [await n.subscribe(TOPIC, accept_all) for n in followers]
        for a in followers:
            for b in followers:
                if a is not b:
                    await mesh_ready(a, b, TOPIC)
        await wait_until(lambda: len(publisher.gossip.topic_peers(TOPIC)) == 4, what="publisher sees 4 followers")
        payloads = [b"%03d" % i + b"y" * 100 for i in range(40)]
        for p in payloads:
            await publisher.publish(TOPIC, p)
        for channel in channels:
            assert sorted(await drain(channel, 40)) == payloads
        # let the relays' last copies land, and three heartbeats of IHAVE gossip go by: the publisher tells the
        # followers outside its fanout which messages it has, and none may ask for one it has already
        await trio.sleep(3.5 * config.gossip.heartbeat_interval)
        router = publisher.gossip.pubsub.router
        assert len(router.fanout[TOPIC]) == fanout
        copies = sum(n.metrics.delivered[TOPIC] + n.metrics.duplicates_by_topic[TOPIC] for n in followers)
        per_message = fanout + 3 * fanout + 2 * (4 - fanout)
        assert copies <= per_message * len(payloads), f"{copies / len(payloads):.1f} copies a message"
