"""Validator nodes over real libp2p on 127.0.0.1 finalize blocks together."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from ledger.devtools import make_dev_network
from ledger.params import Params
from ledger.transactions import Transfer
from p2pgpu.config import ConsensusConfig, NetworkSettings, NodeConfig
from p2pgpu.node import Node, NodeKeys

FAST = ConsensusConfig(timeout_propose=0.5, timeout_propose_delta=0.25, timeout_prevote=0.3,
                       timeout_prevote_delta=0.1, timeout_precommit=0.3, timeout_precommit_delta=0.1,
                       block_interval=0.05)


def node_config(tmp_path, name, roles, bootstrap=(), block_interval=None):
    consensus = FAST if block_interval is None else dataclasses.replace(FAST, block_interval=block_interval)
    return NodeConfig(
        data_dir=tmp_path / name,
        roles=frozenset(roles),
        network=NetworkSettings(listen_addrs=("/ip4/127.0.0.1/tcp/0",), bootstrap=tuple(bootstrap)),
        consensus=consensus,
    )


def describe(nodes) -> str:
    """Heights, rounds and peer counts: what a timed-out wait reports."""
    parts = []
    for n in nodes:
        if n.chain is None or n.driver is None:
            parts.append("starting")
            continue
        parts.append(f"h={n.chain.height} r={n.driver.engine.round} peers={len(n.network.connected_peers())}")
    return "; ".join(parts)


async def wait_for(predicate, timeout: float, poll: float = 0.05, nodes=()):
    """Poll ``predicate``; on timeout fail with the nodes' heights and rounds (slow or stuck?)."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(poll)
        return
    raise AssertionError(f"condition not reached within {timeout} s: {describe(nodes)}")


@pytest.mark.slow
async def test_four_validators_finalize_and_a_late_node_syncs(tmp_path):
    net = make_dev_network(validators=("v0", "v1", "v2", "v3"), providers=(), clients=("c0",),
                           params=Params(epoch_length=16, committee_size=4))
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:
        first = Node(node_config(tmp_path, "v0", {"validator"}), NodeKeys(net.key("v0"), net.identities["v0"].bls),
                     net.genesis)
        await nursery.start(first.run)
        nodes.append(first)
        boot = first.network.addrs[0]
        for name in ("v1", "v2", "v3"):
            node = Node(node_config(tmp_path, name, {"validator"}, [boot]),
                        NodeKeys(net.key(name), net.identities[name].bls), net.genesis)
            await nursery.start(node.run)
            nodes.append(node)
        await wait_for(lambda: all(n.chain.height >= 4 for n in nodes), 180, nodes=nodes)
        heads = {n.chain.get_finalized(4).block.block_hash() for n in nodes}
        assert len(heads) == 1
        late = Node(node_config(tmp_path, "late", {"observer"}, [boot]), NodeKeys(net.key("c0")), net.genesis)
        await nursery.start(late.run)
        target = max(n.chain.height for n in nodes)
        await wait_for(lambda: late.chain.height >= target, 180, nodes=[*nodes, late])
        assert late.chain.get_finalized(target).block.block_hash() == nodes[0].chain.get_finalized(target).block.block_hash()
        nursery.cancel_scope.cancel()


async def test_a_non_validator_follows_blocks_and_relays_votes_and_txs_only_when_asked(tmp_path):
    net = make_dev_network(validators=("v0",), providers=(), clients=("c0", "c1"),
                           params=Params(epoch_length=16, committee_size=1))
    async with trio.open_nursery() as nursery:
        v0 = Node(node_config(tmp_path, "v0", {"validator"}, block_interval=0.2),
                  NodeKeys(net.key("v0"), net.identities["v0"].bls), net.genesis)
        await nursery.start(v0.run)
        boot = v0.network.addrs[0]
        follower = Node(node_config(tmp_path, "c0", {"client"}, [boot]), NodeKeys(net.key("c0")), net.genesis)
        relay_cfg = node_config(tmp_path, "c1", {"client"}, [boot])
        relay_cfg = dataclasses.replace(relay_cfg, consensus=dataclasses.replace(relay_cfg.consensus, relay_votes=True,
                                                                                 relay_txs=True))
        relay = Node(relay_cfg, NodeKeys(net.key("c1")), net.genesis)
        for node in (follower, relay):
            await nursery.start(node.run)
        nodes = [v0, follower, relay]
        assert v0.follows_votes and relay.follows_votes and not follower.follows_votes
        topic = v0.topics.consensus
        await wait_for(lambda: relay.network.peer_id in v0.network.gossip.topic_peers(topic), 30, nodes=nodes)
        start = v0.chain.height
        await wait_for(lambda: min(follower.chain.height, relay.chain.height) >= start + 5, 60, nodes=nodes)
        assert follower.network.peer_id not in v0.network.gossip.topic_peers(topic)
        # the validator-only node leaves announces and bids to the nodes that trade; a client follows /bid and
        # /advert, and publishes its announces on /task without receiving others' (providers follow it)
        assert not v0.follows_market and follower.follows_market and not follower.follows_announces
        market = (v0.topics.task, v0.topics.bid, v0.topics.advert)
        assert all(v0.network.peer_id not in follower.network.gossip.topic_peers(t) for t in market)
        assert follower.network.peer_id in v0.network.gossip.topic_peers(v0.topics.bid)
        assert follower.network.peer_id in v0.network.gossip.topic_peers(v0.topics.advert)
        assert follower.network.peer_id not in v0.network.gossip.topic_peers(v0.topics.task)
        assert follower.network.metrics.delivered[topic] == 0 and relay.network.metrics.delivered[topic] > 0
        assert follower.network.metrics.delivered[v0.topics.block] > 0  # it followed the announced blocks
        h = start + 5
        assert follower.chain.get_finalized(h).block.block_hash() == v0.chain.get_finalized(h).block.block_hash()
        # /tx: the validator and the relay_txs node follow it; the plain client publishes to them (fanout) and
        # receives nobody else's transactions
        assert v0.follows_txs and relay.follows_txs and not follower.follows_txs
        await wait_for(lambda: relay.network.peer_id in v0.network.gossip.topic_peers(v0.topics.tx), 30, nodes=nodes)
        assert follower.network.peer_id not in v0.network.gossip.topic_peers(v0.topics.tx)
        me, other = net.address("c0"), net.address("c1")
        follower.tx_sender.send(Transfer(sender=me, nonce=0, fee=1, to=me, amount=1))
        relay.tx_sender.send(Transfer(sender=other, nonce=0, fee=1, to=other, amount=1))
        await wait_for(lambda: follower.chain.state.get_account(me).nonce == 1
                       and follower.chain.state.get_account(other).nonce == 1, 30, nodes=nodes)
        assert relay.network.metrics.delivered[v0.topics.tx] >= 2  # its own and the follower's, relayed by v0
        assert follower.network.metrics.delivered[v0.topics.tx] == 0
        nursery.cancel_scope.cancel()


async def test_validators_linked_only_through_a_relaying_node_still_finalize(tmp_path):
    net = make_dev_network(validators=("v0", "v1"), providers=(), clients=("c0",),
                           params=Params(epoch_length=16, committee_size=2))
    async with trio.open_nursery() as nursery:
        relay_cfg = node_config(tmp_path, "c0", {"client"})
        relay_cfg = dataclasses.replace(relay_cfg, consensus=dataclasses.replace(relay_cfg.consensus, relay_votes=True))
        relay = Node(relay_cfg, NodeKeys(net.key("c0")), net.genesis)
        await nursery.start(relay.run)
        boot = relay.network.addrs[0]
        validators = []
        for name in ("v0", "v1"):
            cfg = node_config(tmp_path, name, {"validator"}, [boot], block_interval=0.2)
            cfg = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, target_peers=1))
            node = Node(cfg, NodeKeys(net.key(name), net.identities[name].bls), net.genesis)
            await nursery.start(node.run)
            validators.append(node)
        nodes = [*validators, relay]
        await wait_for(lambda: min(v.chain.height for v in validators) >= 3, 60, nodes=nodes)
        v0, v1 = validators
        assert v1.network.peer_id not in v0.network.connected_peers()  # every vote went through the relay
        nursery.cancel_scope.cancel()


async def test_a_follower_that_hears_no_blocks_asks_its_peers_for_them(tmp_path):
    """A client whose /block mesh peers died (or that was paused past an epoch) hears nothing that starts a
    sync; it stayed behind for ever. With no commit for a while it now asks its peers, as a fresh node does."""
    net = make_dev_network(validators=("v0",), providers=(), clients=("c0",),
                           params=Params(epoch_length=4, committee_size=1))
    async with trio.open_nursery() as nursery:
        v0 = Node(node_config(tmp_path, "v0", {"validator"}, block_interval=0.2),
                  NodeKeys(net.key("v0"), net.identities["v0"].bls), net.genesis)
        await nursery.start(v0.run)
        follower = Node(node_config(tmp_path, "c0", {"client"}, [v0.network.addrs[0]], block_interval=0.2),
                        NodeKeys(net.key("c0")), net.genesis)
        await nursery.start(follower.run)
        nodes = [v0, follower]
        await wait_for(lambda: follower.chain.height >= 2, 60, nodes=nodes)
        await follower.network.gossip.pubsub.unsubscribe(follower.topics.block)  # it hears no block any more
        delivered = follower.network.metrics.delivered[follower.topics.block]
        start = v0.chain.height
        await wait_for(lambda: follower.chain.height >= start + 12, 90, nodes=nodes)  # three epochs on
        assert follower.driver.stats.stall_syncs >= 1
        assert follower.network.metrics.delivered[follower.topics.block] == delivered
        h = start + 12
        assert follower.chain.get_finalized(h).block.block_hash() == v0.chain.get_finalized(h).block.block_hash()
        nursery.cancel_scope.cancel()


async def test_a_peer_of_another_chain_is_refused_and_a_node_alone_with_it_is_not_ready(tmp_path):
    """A node started with another genesis.json connects (TCP, Noise, yamux all work) but is refused at the
    handshake by chain, and says it is down -- not ready -- with the reason, while same-chain peers stay."""
    from p2pgpu.node_api import NodeService

    ours = make_dev_network(validators=("v0",), providers=(), clients=("c0",), chain_name="ours")
    theirs = make_dev_network(validators=("v0",), providers=(), clients=(), chain_name="theirs")
    async with trio.open_nursery() as nursery:
        v0 = Node(node_config(tmp_path, "v0", {"validator"}, block_interval=0.2),
                  NodeKeys(ours.key("v0"), ours.identities["v0"].bls), ours.genesis)
        await nursery.start(v0.run)
        boot = v0.network.addrs[0]
        friend = Node(node_config(tmp_path, "c0", {"client"}, [boot]), NodeKeys(ours.key("c0")), ours.genesis)
        stranger = Node(node_config(tmp_path, "x0", {"validator"}, [boot], block_interval=0.2),
                        NodeKeys(theirs.key("v0"), theirs.identities["v0"].bls), theirs.genesis)
        await nursery.start(friend.run)
        await nursery.start(stranger.run)
        seen: list[str] = []
        nursery.start_soon(watch_health, stranger, seen)  # from the moment it is up: before any peer is classified
        nodes = [v0, friend, stranger]
        await wait_for(lambda: stranger.network.peer_id in v0.chain_guard.other
                       and v0.network.peer_id in stranger.chain_guard.other, 30, nodes=nodes)
        await wait_for(lambda: friend.network.peer_id in v0.chain_guard.same, 30, nodes=nodes)
        health = await NodeService(stranger).health()
        assert health.state == "down" and "another chain" in health.detail and "genesis" in health.detail
        assert (await NodeService(v0).health()).state == "ready"
        await trio.sleep(2.0)  # bootstrap retries and peer exchange do not get it back in
        assert stranger.network.peer_id not in v0.network.connected_peers()
        assert friend.network.peer_id in v0.network.connected_peers()
        assert v0.chain_guard.refused >= 1
        assert seen and "ready" not in seen, seen
        # the rule costs an honest node nothing: the friend (bootstrapped, like the stranger) is ready on proof
        friend_health = NodeService(friend)
        await wait_for_async(lambda: friend_health.health(), lambda h: h.state == "ready", 30)
        nursery.cancel_scope.cancel()


async def watch_health(node, seen: list[str], poll: float = 0.02) -> None:
    """Every state ``node``'s health passes through, appended to ``seen`` (run until cancelled)."""
    from p2pgpu.node_api import NodeService

    service = NodeService(node)
    while True:
        seen.append((await service.health()).state)
        await trio.sleep(poll)


async def wait_for_async(fetch, predicate, timeout: float, poll: float = 0.05):
    """Poll ``await fetch()`` until ``predicate`` holds on it; on timeout fail with the last value."""
    last = None
    with trio.move_on_after(timeout):
        while True:
            last = await fetch()
            if predicate(last):
                return last
            await trio.sleep(poll)
    raise AssertionError(f"condition not reached within {timeout} s: last {last!r}")


async def test_a_node_of_another_chain_is_not_ready_after_its_refusal_is_forgotten(tmp_path, monkeypatch):
    """A refusal is forgotten after FORGET_AFTER_S; the wrong-genesis node then had no peer of another chain
    and said ``ready`` until the handshake refused it again. Being ready needs a peer that confirmed our chain."""
    from p2pgpu import chainguard

    monkeypatch.setattr(chainguard, "FORGET_AFTER_S", 1.5)
    ours = make_dev_network(validators=("v0",), providers=(), clients=(), chain_name="ours")
    theirs = make_dev_network(validators=("v0",), providers=(), clients=(), chain_name="theirs")
    async with trio.open_nursery() as nursery:
        v0 = Node(node_config(tmp_path, "v0", {"validator"}, block_interval=0.2),
                  NodeKeys(ours.key("v0"), ours.identities["v0"].bls), ours.genesis)
        await nursery.start(v0.run)
        stranger = Node(node_config(tmp_path, "x0", {"validator"}, [v0.network.addrs[0]], block_interval=0.2),
                        NodeKeys(theirs.key("v0"), theirs.identities["v0"].bls), theirs.genesis)
        await nursery.start(stranger.run)
        seen: list[str] = []
        nursery.start_soon(watch_health, stranger, seen)
        guard = stranger.chain_guard
        await wait_for(lambda: v0.network.peer_id in guard.other, 30, nodes=[v0, stranger])
        refused_at = len(seen)  # from here on: the start is the other test's case
        await wait_for(lambda: not guard.other, 30, nodes=[v0, stranger])  # forgotten
        await trio.sleep(1.0)  # the gap until it dials again and is refused again
        assert "ready" not in seen[refused_at:], seen[refused_at:]
        nursery.cancel_scope.cancel()
