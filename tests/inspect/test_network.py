"""The inspector as a real passive peer: real p2pgpu.net nodes on 127.0.0.1 publish, it records.

Node A accepts anything (so it can publish garbage, as a misbehaving peer
would), node B validates like a node; the inspector bootstraps from both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import trio
from libp2p.peer.id import ID

from ledger.codec import DecodeError, decode
from ledger.consensus import CONSENSUS_MESSAGES
from ledger.transactions import SignedTransaction
from p2pgpu.inspect import EventType, InspectorState, TraceEvent
from p2pgpu.inspect.shell import InspectorConfig, run_inspector
from p2pgpu.net import NetConfig, Network, Verdict, accept, ignore, open_network, reject
from p2pgpu.topics import Topics

from .helpers import dev_network, transfer, vote_bytes

FAST = NetConfig(discovery_interval=0.2, bootstrap_backoff_initial=0.05, bootstrap_backoff_max=0.3, dial_timeout=3.0)


class Recorder:
    """Event sink whose waiters wake on every new event (no polling)."""

    def __init__(self) -> None:
        self.events: list[TraceEvent] = []
        self.state = InspectorState()
        self._changed = trio.Event()

    def __call__(self, ev: TraceEvent) -> None:
        self.events.append(ev)
        self.state.apply(ev)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[TraceEvent], bool]) -> TraceEvent:
        while True:
            for ev in self.events:
                if predicate(ev):
                    return ev
            await self._changed.wait()


def accept_all(peer: str, data: bytes) -> Verdict:
    return accept()


def validate_tx(peer: str, data: bytes) -> Verdict:
    try:
        decode(SignedTransaction, data)
    except DecodeError:
        return reject("malformed")
    return accept()


def validate_consensus(peer: str, data: bytes) -> Verdict:
    try:
        CONSENSUS_MESSAGES.decode(data)
    except DecodeError:
        return reject("malformed")
    return accept()


async def subscribe_all(net: Network, topics: Topics, validators: dict[str, Callable[[str, bytes], Verdict]]) -> None:
    for name in ("tx", "task", "bid", "consensus", "block"):
        await net.subscribe(getattr(topics, name), validators.get(name, accept_all))


@pytest.mark.slow
async def test_inspector_delivers_valid_messages_rejects_garbage_and_never_publishes():
    dev = dev_network()
    topics = Topics.for_chain(dev.chain_id)
    stx = transfer(dev)
    vote = vote_bytes(dev, height=1)
    recorder = Recorder()
    with trio.fail_after(60):
        async with open_network(FAST, bytes([1]) * 32) as a, \
                open_network(replace(FAST, bootstrap_peers=(a.addrs[0],)), bytes([2]) * 32) as b:
            await subscribe_all(a, topics, {})
            await subscribe_all(b, topics, {"tx": validate_tx, "consensus": validate_consensus})
            async with trio.open_nursery() as nursery:
                config = InspectorConfig(genesis=dev.genesis, bootstrap=(a.addrs[0], b.addrs[0]),
                                         snapshot_interval=0.1, catch_up=False)
                inspector, _ = await nursery.start(run_inspector, config, recorder)
                me = ID.from_base58(inspector.peer_id)
                for topic in (topics.tx, topics.consensus):
                    await a.gossip.router.wait_for_mesh(me, topic, timeout=20)
                await recorder.wait_for(lambda e: e.event is EventType.ADD_PEER and e.peer == a.peer_id)

                await a.publish(topics.tx, stx.encode())
                await a.publish(topics.tx, b"this is not a transaction")
                await a.publish(topics.consensus, vote)

                tx_ev = await recorder.wait_for(lambda e: e.event is EventType.DELIVER and e.topic == "tx")
                bad = await recorder.wait_for(lambda e: e.event is EventType.REJECT)
                vote_ev = await recorder.wait_for(lambda e: e.event is EventType.DELIVER and e.topic == "consensus")

                assert tx_ev.kind == "Transfer"
                assert tx_ev.msg_id == stx.tx_hash().hex()  # content id = SHA-256 of the payload
                assert tx_ev.fields["sender"] == dev.address("c0").hex()
                assert tx_ev.fields["origin"] == a.peer_id
                assert (bad.topic, bad.reason, bad.peer) == ("tx", "malformed", a.peer_id)
                assert bad.fields["blame"] is True and bad.size == len(b"this is not a transaction")
                assert vote_ev.kind == "VoteMessage"
                assert (vote_ev.fields["height"], vote_ev.fields["verified"]) == (1, True)

                # A third node that ignored A's copy publishes the same bytes: a DUPLICATE from it
                async with open_network(replace(FAST, bootstrap_peers=(inspector.addrs[0],)), bytes([3]) * 32) as c:
                    def only_own(peer: str, data: bytes) -> Verdict:
                        return accept() if peer == c.peer_id else ignore("not-mine")

                    await subscribe_all(c, topics, {"tx": only_own})
                    await c.gossip.router.wait_for_mesh(me, topics.tx, timeout=20)
                    await c.publish(topics.tx, stx.encode())
                    dup = await recorder.wait_for(lambda e: e.event is EventType.DUPLICATE and e.peer == c.peer_id)
                assert (dup.topic, dup.msg_id, dup.size) == ("tx", tx_ev.msg_id, len(stx.encode()))

                # passive: nothing published, nobody penalised, the garbage only ignored
                assert sum(inspector.metrics.published.values()) == 0
                assert not inspector.metrics.rejected
                assert inspector.metrics.ignored[(topics.tx, "malformed")] >= 1
                summary = recorder.state.summary()
                assert summary.topic("tx").rejected["malformed"] >= 1
                assert summary.topic("tx").duplicates >= 1
                assert summary.topic("tx").delivered == 1 and summary.topic("consensus").delivered == 1
                assert summary.peers >= 1
                nursery.cancel_scope.cancel()
