"""Inbound stream quotas over real libp2p hosts on 127.0.0.1 (issue 13).

A stock py-libp2p peer opened 64 streams and sent nothing on them: the
node-wide limit of 64 was full, every other peer's requests were refused
``busy`` (the verifiers' result fetches among them, so an honest provider was
slashed for fraud), and the peer holding the streams was never charged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.peer.id import ID

from p2pgpu.net import FramedStream, NetConfig, Network, PeerUnreachable, RequestContext
from p2pgpu.net.discovery import PEERS_PROTOCOL
from p2pgpu.net.quota import StreamLimits

from .conftest import FAST, nodes, wait_until

ECHO = "/p2pgpu/test/echo/1"
SLOW = "/p2pgpu/test/slow/1"
STALL = "/p2pgpu/test/stall/1"


async def echo(ctx: RequestContext, data: bytes) -> bytes:
    await trio.lowlevel.checkpoint()
    return b"echo:" + data


def ban(server: Network, peer: str, where: str) -> None:
    """Charge ``peer`` until it is banned (the score recovers a little between two charges)."""
    for _ in range(10):
        server.penalize(peer, where, "test_offence")
        if server.is_banned(peer):
            return
    raise AssertionError("ten charges did not ban the peer")


async def open_idle(attacker: Network, server: Network, protocol: str, n: int) -> list:
    """What the attack did: ``n`` streams opened with stock py-libp2p, nothing ever written on them."""
    streams = []
    for _ in range(n):
        streams.append(await attacker._host.new_stream(ID.from_base58(server.peer_id), [TProtocol(protocol)]))
    return streams


async def open_idle_until_banned(attacker: Network, server: Network, protocol: str, n: int) -> list:
    """Like :func:`open_idle`, but stop at the open that fails because ``server`` banned ``attacker`` meanwhile.

    The first streams can idle out, and their charges ban the attacker, before the last one is open (a
    loaded host opens them slowly): its next open then fails, which is the ban working, not an error.
    """
    streams = []
    for _ in range(n):
        try:
            streams.append(await attacker._host.new_stream(ID.from_base58(server.peer_id), [TProtocol(protocol)]))
        except StreamFailure:
            if not server.is_banned(attacker.peer_id):
                raise
            break
    return streams


def holding_streams(limits: StreamLimits) -> tuple[NetConfig, NetConfig]:
    """Configs of a server with ``limits``, and of a peer that opens no streams of its own to it.

    The holder plays a stock libp2p peer: with ``target_peers=1`` it runs no peer exchange, whose
    background /p2pgpu/peers/1 streams would take a slot of its quota (or the quota charge) at random.
    """
    server = replace(FAST, streams=limits)
    return server, replace(server, target_peers=1)


async def test_one_peer_holding_64_idle_streams_does_not_stop_another_peers_request() -> None:
    # default quotas; the held streams neither idle out nor cost a second quota charge (either could ban the
    # holder before its 64 streams are open, however long a loaded host takes to open them)
    limits = StreamLimits(idle_timeout=60.0, charge_interval=60.0)
    server_config, holder = holding_streams(limits)
    async with nodes([server_config, holder, FAST], boot={1: [0], 2: [0]}) as (server, attacker, client):
        server.set_handler(ECHO, echo)
        with trio.fail_after(30):
            held = await open_idle(attacker, server, ECHO, 64)
            await wait_until(lambda: server.metrics.inbound_refused[(ECHO, "peer_quota")] == 64 - limits.per_peer,
                             what="every held stream admitted or refused")
            assert await client.request(server.peer_id, ECHO, b"mine", timeout=5) == b"echo:mine"
        assert server.metrics.requests_served[ECHO] == 1
        for raw in held:
            await raw.reset()


async def test_the_stream_holder_is_refused_at_its_quota_and_charged_once() -> None:
    # nothing idles out and no second charge falls due during the test, so every count below is exact
    limits = StreamLimits(idle_timeout=60.0, charge_interval=60.0)
    server_config, holder = holding_streams(limits)
    async with nodes([server_config, holder, server_config], boot={1: [0], 2: [0]}) as (server, attacker, client):
        server.set_handler(ECHO, echo)
        quota, refused = server.reqresp.quota, server.metrics.inbound_refused
        with trio.fail_after(30):
            held = await open_idle(attacker, server, ECHO, 64)
            await wait_until(lambda: refused[(ECHO, "peer_quota")] == 64 - limits.per_peer,
                             what="the streams over the quota to be refused")
            assert quota.of_peer(attacker.peer_id) == limits.per_peer
            # refusals at the quota are charged once per charge_interval, not once per stream
            assert server.metrics.charges == {(ECHO, "peer_quota"): 1}
            assert dict(refused) == {(ECHO, "peer_quota"): 64 - limits.per_peer}
            # meanwhile another peer is served at once
            assert await client.request(server.peer_id, ECHO, b"x", timeout=5) == b"echo:x"
            assert not server.is_banned(attacker.peer_id)
            for raw in held:
                await raw.reset()
            await wait_until(lambda: quota.of_protocol(ECHO) == 0 and quota.of_peer(attacker.peer_id) == 0,
                             what="the held streams' slots back")
        # the honest peer was never charged
        assert server.scores.score(client.peer_id, trio.current_time()) == 0.0


async def test_the_stream_holder_is_charged_for_idling_and_banned() -> None:
    limits = StreamLimits(idle_timeout=0.5)
    server_config, holder = holding_streams(limits)
    async with nodes([server_config, holder, server_config], boot={1: [0], 2: [0]}) as (server, attacker, client):
        server.set_handler(ECHO, echo)
        quota, refused, charges = server.reqresp.quota, server.metrics.inbound_refused, server.metrics.charges
        with trio.fail_after(30):
            # the streams say nothing: each is reset as idle and charged, and the holder is banned (maybe before
            # its last stream is open)
            await open_idle_until_banned(attacker, server, ECHO, limits.per_peer)
            await wait_until(lambda: server.is_banned(attacker.peer_id), what="the stream holder to be banned")
            await wait_until(lambda: attacker.peer_id not in server.connected_peers(), what="the ban's disconnect")
            # each stream ended idle (reset, charged) or at the ban, which ended the rest at once
            await wait_until(lambda: quota.of_protocol(ECHO) == 0 and server.metrics.inbound_active.get(ECHO, 0) == 0,
                             what="every held stream ended")
            assert set(refused) <= {(ECHO, "idle"), (ECHO, "banned")}
            # a ban takes 5 charges at least (-10 each, ban at -50); a stream ended by the ban is not charged
            assert refused[(ECHO, "idle")] >= 5 and charges[(ECHO, "idle")] == refused[(ECHO, "idle")]
            assert server.metrics.requests_served[ECHO] == 0
            assert server.metrics.bans == 1 and server.is_banned(attacker.peer_id)
            # the honest peer is still served, and was never charged
            assert await client.request(server.peer_id, ECHO, b"x", timeout=5) == b"echo:x"
        assert server.scores.score(client.peer_id, trio.current_time()) == 0.0


async def test_a_banned_peer_that_is_still_connected_is_not_answered() -> None:
    async with nodes([FAST, FAST], boot={1: [0]}) as (server, peer):
        server.set_handler(ECHO, echo)

        async def disconnect_fails(who: str) -> None:  # a disconnect that failed, or has not happened yet
            await trio.lowlevel.checkpoint()

        server.disconnect = disconnect_fails  # type: ignore[method-assign]
        with trio.fail_after(20):
            assert await peer.request(server.peer_id, ECHO, b"before", timeout=5) == b"echo:before"
            ban(server, peer.peer_id, ECHO)
            assert server.is_banned(peer.peer_id) and peer.peer_id in server.connected_peers()
            with pytest.raises(PeerUnreachable):
                await peer.request(server.peer_id, ECHO, b"after", timeout=5)
        assert server.metrics.requests_served[ECHO] == 1
        assert server.metrics.inbound_refused[(ECHO, "banned")] == 1


async def test_a_ban_ends_the_handlers_already_serving_that_peer() -> None:
    async with nodes([FAST, FAST], boot={1: [0]}) as (server, peer):
        started = trio.Event()

        async def stall(ctx: RequestContext, data: bytes) -> bytes:
            started.set()
            await trio.sleep_forever()
            return b""

        server.set_handler(STALL, stall)

        async def no_disconnect(who: str) -> None:
            await trio.lowlevel.checkpoint()

        server.disconnect = no_disconnect  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                with pytest.raises(PeerUnreachable):
                    await peer.request(server.peer_id, STALL, b"", timeout=8)

            nursery.start_soon(ask)
            with trio.fail_after(10):
                await started.wait()
                assert server.reqresp.quota.of_protocol(STALL) == 1
                ban(server, peer.peer_id, STALL)
                await wait_until(lambda: server.reqresp.quota.of_protocol(STALL) == 0, what="the banned peer's handler to end")
        assert server.metrics.inbound_refused[(STALL, "banned")] == 1


async def test_100_concurrent_requests_from_5_peers_all_served_and_every_slot_returned() -> None:
    async with nodes([FAST] * 6, boot={i: [0] for i in range(1, 6)}) as (server, *clients):
        limits = server.config.streams
        in_flight: Counter[str] = Counter()
        peak: Counter[str] = Counter()

        async def slow(stream: FramedStream) -> None:
            in_flight[stream.peer] += 1
            peak[stream.peer] = max(peak[stream.peer], in_flight[stream.peer])
            try:
                data = await stream.receive_exactly_one()
                await trio.sleep(0.2)
                await stream.send(data)
                await stream.send_end()
            finally:
                in_flight[stream.peer] -= 1

        server.set_stream_handler(SLOW, slow)
        answers: list[bytes] = []

        async def call(client: Network, i: int) -> None:
            async with client.open_stream(server.peer_id, SLOW) as stream:
                await stream.send(b"%d" % i)
                await stream.send_end()
                answers.append(await stream.receive_exactly_one())

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for client in clients:
                    for i in range(20):
                        nursery.start_soon(call, client, i)
        assert sorted(answers) == sorted(b"%d" % i for i in range(20) for _ in clients)
        # our own limit kept each caller below the server's quota: nobody was refused or charged
        assert max(peak.values()) <= limits.outbound_per_peer
        assert not server.metrics.inbound_refused and not server.metrics.charges
        assert server.metrics.requests_served[SLOW] == 100
        # no leaked slot on either side (background peer exchange may still hold one for a moment)
        assert server.reqresp.quota.of_protocol(SLOW) == 0 and server.metrics.inbound_active[SLOW] == 0
        await wait_until(lambda: server.reqresp.quota.total == 0 and not server.reqresp._serving
                         and all(c.reqresp.outbound_open(server.peer_id) == 0 for c in clients),
                         what="every slot back")


async def test_raw_floods_from_5_peers_are_refused_exactly_past_each_quota_and_leave_no_slot() -> None:
    """Peers that ignore our outbound limit: 30 streams each at once; some callers give up while being served."""
    # every flood stream writes as soon as it is open, so none may idle out: with 150 opens at once a loaded host
    # took over 2 s between an open and its write, and the idle charges banned the flooders mid-test
    limits = StreamLimits(per_peer=8, per_protocol=48, total=64, outbound_per_peer=8, idle_timeout=30.0)
    config = replace(FAST, streams=limits)
    # these peers ignore politeness: up to 64 streams to one peer at once
    rude = replace(FAST, streams=StreamLimits(per_peer=64, per_protocol=64, total=64, outbound_per_peer=64))
    async with nodes([config] + [rude] * 5, boot={i: [0] for i in range(1, 6)}) as (server, *peers):
        release = trio.Event()

        async def held(stream: FramedStream) -> None:
            data = await stream.receive_exactly_one()
            await release.wait()
            await stream.send(data)
            await stream.send_end()

        server.set_stream_handler(SLOW, held)
        outcomes: Counter[str] = Counter()
        waiting: list[trio.CancelScope] = []  # callers not finished yet

        async def flood(peer: Network) -> None:
            with trio.CancelScope() as scope:
                waiting.append(scope)
                try:
                    async with peer.open_stream(server.peer_id, SLOW) as stream:
                        await stream.send(b"x")
                        await stream.send_end()
                        await stream.receive_exactly_one()
                        outcomes["served"] += 1
                except PeerUnreachable:
                    outcomes["refused"] += 1
                finally:
                    waiting.remove(scope)
            if scope.cancelled_caught:
                outcomes["gave_up"] += 1

        over = 30 - limits.per_peer
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    for _ in range(30):
                        nursery.start_soon(flood, peer)
                quota = server.reqresp.quota
                await wait_until(lambda: outcomes["refused"] + quota.of_protocol(SLOW) == 150,
                                 what="every stream admitted or refused")
                # (a peer's own background streams -- peer exchange -- count against its quota too)
                assert all(limits.per_peer - 1 <= quota.of_peer(p.peer_id) <= limits.per_peer for p in peers)
                assert 5 * over <= outcomes["refused"] <= 5 * (over + 1)
                # a flooding peer's background peer exchange (/p2pgpu/peers/1) can be refused at its full quota
                # too; the flood's own streams are each counted once, under its protocol
                refused_of_flood = {k: v for k, v in server.metrics.inbound_refused.items() if k[0] == SLOW}
                assert refused_of_flood == {(SLOW, "peer_quota"): outcomes["refused"]}
                assert {k[0] for k in server.metrics.inbound_refused} <= {SLOW, PEERS_PROTOCOL}
                # refusals at the quota are charged once per peer per charge interval, not once each
                assert 5 <= server.metrics.charges[(SLOW, "peer_quota")] < outcomes["refused"] // 2
                # a few callers give up (their streams are reset) while the server still holds them
                served = quota.of_protocol(SLOW)
                assert len(waiting) == served  # the refused callers are done, the admitted ones wait
                give_up = waiting[::4]
                for scope in give_up:
                    scope.cancel()
                release.set()
        assert outcomes["gave_up"] == len(give_up) and outcomes["served"] == served - len(give_up)
        assert server.metrics.requests_served[SLOW] + server.metrics.request_errors[(SLOW, "PeerUnreachable")] == served
        assert server.reqresp.quota.of_protocol(SLOW) == 0 and server.metrics.inbound_active[SLOW] == 0
        await wait_until(lambda: server.reqresp.quota.total == 0 and not server.reqresp._serving,
                         what="every slot back")
        server.reqresp.quota.expire(trio.current_time() + limits.charge_interval)
        assert server.reqresp.quota.peers_tracked() == 0
