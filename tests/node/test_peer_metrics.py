"""Peer charges, refusals, scores and bans on a real node's ``/metrics`` page (issue 13).

An operator under attack needs to see it: who is charged for what, which
streams are refused and why, how low scores are, how many peers are kept out.
One validator serves its API over real HTTP; a stock py-libp2p peer sends it
garbage on ``/consensus`` (charged), holds more idle streams than its quota
(refused, charged, reset for idling) and ends banned. Every step must show on
the page, in families without a label per peer (peer ids grow without bound).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.peer.id import ID
from prometheus_client.parser import text_string_to_metric_families

from ledger.devtools import make_dev_network
from p2pgpu.config import ApiConfig
from p2pgpu.net import STATUS_PROTOCOL
from p2pgpu.node import Node, NodeKeys
from p2pgpu.node_service import serve_node

from .test_bad_input import BLOCK_INTERVAL, PARAMS, Lab, gossip_peer
from .test_node_consensus import node_config, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@asynccontextmanager
async def api_node(tmp_path) -> AsyncIterator[tuple[Lab, httpx.AsyncClient]]:
    """One validator finalizing alone, with its HTTP API; waits for its first block."""
    dev = make_dev_network(validators=("v0",), providers=(), clients=("c0",), params=PARAMS)
    cfg = dataclasses.replace(node_config(tmp_path, "v0", {"validator"}, block_interval=BLOCK_INTERVAL),
                              api=ApiConfig(port=0))
    node = Node(cfg, NodeKeys(dev.key("v0"), dev.identities["v0"].bls), dev.genesis)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve_node, node)
        await wait_for(lambda: node.chain.height >= 1, 60, nodes=[node])
        try:
            async with httpx.AsyncClient(base_url=info["api_url"], timeout=10) as api:
                yield Lab(dev, node), api
        finally:
            nursery.cancel_scope.cancel()


async def scrape(api: httpx.AsyncClient) -> Samples:
    page = await api.get("/metrics")
    assert page.status_code == 200, page.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(page.text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def reasons(samples: Samples, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, ls), v in samples.items():
        if n == name:
            reason = dict(ls)["reason"]
            out[reason] = out.get(reason, 0) + v
    return out


async def test_charges_refusals_scores_and_bans_show_on_the_metrics_page(tmp_path) -> None:
    async with api_node(tmp_path) as (lab, api):
        topic = lab.topics.consensus
        m = lab.network.metrics
        before = await scrape(api)
        for name in ("p2pgpu_peers_banned", "p2pgpu_peers_scored_below_zero", "p2pgpu_peer_score_min",
                     "p2pgpu_peer_bans_total"):
            assert (name, frozenset()) in before and before[(name, frozenset())] == 0, name
        assert not reasons(before, "p2pgpu_peer_charges_total")

        async with gossip_peer(lab, b"\x21" * 32, (topic,)) as attacker:
            peer = attacker.network.peer_id
            # 1. garbage on /consensus: rejected, charged by reason, a negative score
            for data in (b"\xc1 not msgpack", b"\xc1 nor this"):
                await attacker.publish(topic, data)
            await wait_for(lambda: sum(m.charges.values()) >= 2, 30, nodes=[lab.node])
            page = await scrape(api)
            charged = reasons(page, "p2pgpu_peer_charges_total")
            assert sum(charged.values()) == 2 and all(r.startswith("decode:") for r in charged), charged
            assert total(page, "p2pgpu_peer_charges_total", where="consensus") == 2
            assert page[("p2pgpu_peers_scored_below_zero", frozenset())] == 1
            assert -20 <= page[("p2pgpu_peer_score_min", frozenset())] < -10  # two charges of 10, a little recovered
            assert page[("p2pgpu_peers_banned", frozenset())] == 0
            assert page[("p2pgpu_peer_bans_total", frozenset())] == 0

            # 2. more idle streams than its quota (16): one refused at the quota, the rest reset when they idle
            # out (5 s), every one charged, until the peer is banned
            limits = lab.network.reqresp.quota.limits
            opened = 0
            with trio.fail_after(30):
                for _ in range(limits.per_peer + 1):
                    try:
                        await attacker.network._host.new_stream(ID.from_base58(lab.network.peer_id),
                                                                [TProtocol(STATUS_PROTOCOL)])
                    except StreamFailure:
                        assert lab.network.is_banned(peer)  # banned meanwhile: only on a slow, loaded host
                        break
                    opened += 1
            idled_early = m.inbound_refused[(STATUS_PROTOCOL, "idle")] > 0
            if opened > limits.per_peer and not idled_early:  # every slot was held when the last stream came
                await wait_for(lambda: m.inbound_refused[(STATUS_PROTOCOL, "peer_quota")] >= 1, 30,
                               nodes=[lab.node])
            await wait_for(lambda: lab.network.is_banned(peer), 60, nodes=[lab.node])
            await wait_for(lambda: peer not in lab.network.connected_peers(), 30, nodes=[lab.node])
            page = await scrape(api)
            refused = {dict(ls)["reason"]: v for (n, ls), v in page.items()
                       if n == "p2pgpu_inbound_streams_refused_total" and dict(ls)["protocol"] == STATUS_PROTOCOL}
            assert refused == {r: n for (p, r), n in m.inbound_refused.items() if p == STATUS_PROTOCOL and n}
            assert set(refused) <= {"peer_quota", "idle", "banned"} and refused.get("idle", 0) >= 1, refused
            if opened > limits.per_peer and not idled_early:
                assert refused["peer_quota"] >= 1, refused
            charged = reasons(page, "p2pgpu_peer_charges_total")
            assert charged == {r: n for (_, r), n in m.charges.items() if n}
            assert charged.get("idle", 0) >= 1
            # a ban takes 5 charges of 10 (the score recovers 0.5 a second meanwhile)
            assert sum(charged.values()) >= 5
            assert page[("p2pgpu_peer_bans_total", frozenset())] == 1
            assert page[("p2pgpu_peers_banned", frozenset())] == 1
            assert page[("p2pgpu_peers_scored_below_zero", frozenset())] == 1
            # no peer is connected any more: nobody connected has a negative score
            assert page[("p2pgpu_peer_score_min", frozenset())] == 0
            # no label names a peer, on any family
            assert not any(peer in value for (_, ls) in page for _, value in ls)
