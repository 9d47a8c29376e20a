"""The ``/advert`` validator in a node: refusals scored as the other market validators', and a flood of bad adverts
over real libp2p hosts that gets its sender banned while an honest provider's advert still arrives."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import trio

from ledger.devtools import DevChain, make_dev_network
from ledger.keys import AccountKey
from p2pgpu.advertiser import AdvertFollower
from p2pgpu.market import ModelAdvert, WarmModel, decode_market_message, encode_market_message, sign_advert
from p2pgpu.net import Outcome, ScoreConfig, accept, gossip
from p2pgpu.node import Node, NodeKeys

from ..net.conftest import FAST, mesh_ready, nodes, wait_until
from .test_node_consensus import node_config

MODEL = bytes([9]) * 32


def _node(tmp_path):
    net = make_dev_network(validators=("v0",), providers=("p0",), clients=("c0",))
    chain = DevChain(net)
    node = Node(node_config(tmp_path, "c0", {"client"}), NodeKeys(net.key("c0"), net.identities["c0"].bls),
                net.genesis)
    node.chain = SimpleNamespace(state=chain.state, height=chain.state.height)  # the head the validators read
    return net, chain, node


def advert_bytes(key: AccountKey, chain_id: bytes, height: int, *, sequence: int = 1, slots: int = 1) -> bytes:
    advert = ModelAdvert(chain_id=chain_id, provider=key.address, sequence=sequence, expiry_height=height + 50,
                         free_slots=slots, models=(WarmModel(MODEL, 12),))
    return encode_market_message(sign_advert(key, advert))


def test_a_registered_providers_advert_is_kept_and_listed(tmp_path) -> None:
    net, chain, node = _node(tmp_path)
    clock = [100.0]
    follower = AdvertFollower(node, chain.chain_id, clock=lambda: clock[0])
    verdict = follower.validate("peer", advert_bytes(net.key("p0"), chain.chain_id, chain.state.height))
    assert verdict.outcome is Outcome.ACCEPT
    clock[0] = 104.0
    ((found, peer),) = follower.warm_providers(MODEL)
    assert (found.provider, found.free_slots, found.unit_price, found.age_s) == (net.address("p0"), 1, 12, 4.0)
    from p2pgpu.net import peer_id_from_seed

    assert peer == peer_id_from_seed(net.key("p0").seed)


def test_refusals_are_scored_like_the_other_market_validators(tmp_path) -> None:
    net, chain, node = _node(tmp_path)
    clock = [0.0]
    follower = AdvertFollower(node, chain.chain_id, clock=lambda: clock[0])
    h, cid, p0 = chain.state.height, chain.chain_id, net.key("p0")
    good = advert_bytes(p0, cid, h, sequence=10)
    raw = decode_market_message(good)
    forged = encode_market_message(replace(raw, advert=replace(raw.advert, free_slots=7)))  # type: ignore[type-var]
    for data, reason in ((b"\x93junk", "malformed"), (advert_bytes(p0, bytes(32), h), "wrong-chain"),
                         (forged, "bad-signature"), (advert_bytes(AccountKey.generate(), cid, h)[:-1], "malformed")):
        verdict = follower.validate("peer", data)
        assert (verdict.outcome, verdict.reason) == (Outcome.REJECT, reason)
    assert follower.validate("peer", good).outcome is Outcome.ACCEPT
    for data, reason in ((good, "replayed"), (advert_bytes(p0, cid, h, sequence=9), "replayed"),
                         (advert_bytes(p0, cid, h, sequence=11), "too-frequent")):
        verdict = follower.validate("peer", data)
        assert (verdict.outcome, verdict.reason) == (Outcome.IGNORE, reason)
    clock[0] = 5.0
    assert follower.validate("peer", advert_bytes(p0, cid, h, sequence=11)).outcome is Outcome.ACCEPT


def test_an_unregistered_providers_advert_is_charged_to_its_publisher_only(tmp_path) -> None:
    """A relay's head may differ from ours (ignored); the peer that published it is charged, unless we are behind."""
    net, chain, node = _node(tmp_path)
    follower = AdvertFollower(node, chain.chain_id)
    stranger = advert_bytes(AccountKey.generate(), chain.chain_id, chain.state.height)
    token = gossip._origin.set("publisher")
    try:
        verdict = follower.validate("relay", stranger)
        assert (verdict.outcome, verdict.reason) == (Outcome.IGNORE, "unregistered_provider")
        verdict = follower.validate("publisher", stranger)
        assert (verdict.outcome, verdict.reason) == (Outcome.REJECT, "unregistered_provider_published")
        node.driver = SimpleNamespace(behind=True)
        assert follower.validate("publisher", stranger).outcome is Outcome.IGNORE
    finally:
        gossip._origin.reset(token)
    assert len(follower.directory) == 0


async def test_a_flood_of_bad_adverts_bans_its_sender_and_loses_the_honest_advert_not(tmp_path) -> None:
    """Real hosts: S floods V with 40 malformed or forged adverts; V charges S for each and bans it, relays none,
    and the advert P publishes meanwhile still reaches V's directory."""
    net, chain, node = _node(tmp_path)
    follower = AdvertFollower(node, chain.chain_id)
    h, cid, p0 = chain.state.height, chain.chain_id, net.key("p0")
    topic = node.topics.advert
    strict = replace(FAST, target_peers=2, score=ScoreConfig(rejection_penalty=10, ban_threshold=-100,
                                                             ban_seconds=600))
    async with nodes([strict, strict, strict], boot={1: [0], 2: [0]}) as (v, s, p):
        node.network = v  # whose own publications the validator would let through
        v_in = await v.subscribe(topic, follower.validate)
        await s.subscribe(topic, lambda peer, data: accept())
        await p.subscribe(topic, lambda peer, data: accept())
        await mesh_ready(v, s, topic)
        await mesh_ready(v, p, topic)
        good = advert_bytes(p0, cid, h)
        raw = decode_market_message(good)
        for i in range(40):
            if i % 2:
                bad = encode_market_message(replace(raw, advert=replace(  # type: ignore[type-var]
                    raw.advert, free_slots=i)))
            else:
                bad = b"\x94not an advert %d" % i
            await s.publish(topic, bad)
            if i == 5:
                await p.publish(topic, good)
        await wait_until(lambda: v.scores.is_banned(s.peer_id, trio.current_time()), timeout=30,
                         what="the flooder to be banned")
        await wait_until(lambda: bool(follower.warm_providers(MODEL)), timeout=30, what="the honest advert")
        rejected = sum(n for (t, _), n in v.metrics.rejected.items() if t == topic)
        assert rejected >= 10 and v.metrics.delivered[topic] == 1
        assert (await v_in.receive()).record.advert == raw.advert  # type: ignore[union-attr]
        assert [w.provider for w, _ in follower.warm_providers(MODEL)] == [p0.address]


def test_the_provider_advertises_only_once_registered_for_a_few_blocks_and_signs_what_validates(tmp_path) -> None:
    from p2pgpu.advertiser import ProviderAdvertiser
    from p2pgpu.market.advertise import AdvertContent

    net, chain, node = _node(tmp_path)
    clock = [0.0]
    sent: list[tuple[str, bytes]] = []
    stranger = AccountKey.generate()
    for key, registered in ((stranger, False), (net.key("p0"), True)):
        advertiser = ProviderAdvertiser(key=key, chain_id=chain.chain_id, topic="/advert", block_seconds=1.0,
                                        content=lambda: AdvertContent.of(1, {MODEL: 12}), state=lambda: chain.state,
                                        publish=lambda topic, data: sent.append((topic, data)),
                                        clock=lambda: clock[0])
        for _ in range(2):
            clock[0] += 5.0
            assert not advertiser.step() and advertiser.core.current is None  # fewer than settle_blocks blocks
            chain.produce([])
        clock[0] += 5.0
        assert not advertiser.step()  # ready (if registered): the change waits its debounce
        assert (advertiser.core.current is not None) is registered
        clock[0] += 5.0
        assert advertiser.step() is registered
    ((topic, data),) = sent
    node.chain = SimpleNamespace(state=chain.state, height=chain.state.height)
    follower = AdvertFollower(node, chain.chain_id)
    assert topic == "/advert" and follower.validate("peer", data).outcome is Outcome.ACCEPT
