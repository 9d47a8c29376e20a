"""``/tx`` batches: the wire format (byte-identical to the codec's), size limits, and the pacer's timing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from ledger.codec import DecodeError, encode
from ledger.keys import AccountKey
from ledger.transactions import SignedTransaction, Transfer
from ledger.transition import sign_transaction
from p2pgpu.txgossip import MAX_BATCH_TXS, OwnTxWatch, TxBatch, TxPacer, decode_tx_gossip, encode_tx_batches

CHAIN = b"c" * 32


def _txs(n: int, key: AccountKey | None = None) -> list[SignedTransaction]:
    key = key or AccountKey.generate()
    return [sign_transaction(key, CHAIN, Transfer(sender=key.address, nonce=i, fee=1, to=key.address, amount=1))
            for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, MAX_BATCH_TXS])
def test_batches_are_the_codecs_own_encoding_and_decode_back_in_order(n: int) -> None:
    txs = _txs(n)
    (message,) = encode_tx_batches([t.encode() for t in txs])
    assert decode_tx_gossip(message) == tuple(txs)
    assert message == (txs[0].encode() if n == 1 else encode(TxBatch(tuple(txs))))


def test_a_lone_transaction_travels_as_before() -> None:
    (tx,) = _txs(1)
    assert encode_tx_batches([tx.encode()]) == [tx.encode()]
    assert decode_tx_gossip(tx.encode()) == (tx,)


def test_batches_are_cut_at_the_count_and_the_topics_size_limit_keeping_order() -> None:
    txs = _txs(MAX_BATCH_TXS + 3)
    messages = encode_tx_batches([t.encode() for t in txs])
    assert [len(decode_tx_gossip(m)) for m in messages] == [MAX_BATCH_TXS, 3]
    small = encode_tx_batches([t.encode() for t in txs[:40]], max_bytes=1024)
    assert all(len(m) <= 1024 for m in small)
    assert [t for m in small for t in decode_tx_gossip(m)] == txs[:40]


@pytest.mark.parametrize("data, path", [
    (b"\x91\x90", "TxBatch.txs"),  # an empty batch
    (b"\x91\x91\x01", "TxBatch.txs"),  # not a transaction inside
    (b"\x92\x90\x90", "SignedTransaction"),  # neither shape
    (b"", ""),  # nothing at all: malformed MessagePack
])
def test_malformed_tx_messages_are_refused_naming_the_field(data: bytes, path: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode_tx_gossip(data)
    assert err.value.path.startswith(path)


def test_a_batch_that_is_not_canonical_is_refused() -> None:
    txs = _txs(2)
    body = b"".join(t.encode() for t in txs)
    with pytest.raises(DecodeError):
        decode_tx_gossip(b"\x91\xdc\x00\x02" + body)  # array16 header for 2 items: a second encoding


def test_the_pacer_sends_a_lone_transaction_at_once_and_then_one_message_per_linger() -> None:
    pacer = TxPacer(linger=0.1)
    assert pacer.due_at() is None and pacer.take(0.0) == []
    a, b, c, d = (t.encode() for t in _txs(4))
    pacer.add(a)
    due = pacer.due_at()
    assert due is not None and due <= 10.0  # nothing sent lately: now
    assert pacer.take(10.0) == [a]
    pacer.add(b)
    pacer.add(c)
    assert pacer.due_at() == pytest.approx(10.1)  # waits out the linger after the last send, both together
    (batch,) = pacer.take(10.1)
    assert [t.encode() for t in decode_tx_gossip(batch)] == [b, c]
    pacer.add(d)
    assert pacer.due_at() == pytest.approx(10.2)


def test_a_zero_linger_sends_at_once() -> None:
    pacer = TxPacer(linger=0.0)
    for tx in _txs(3):
        pacer.add(tx.encode())
        due = pacer.due_at()
        assert due is not None and due <= 5.0
        assert len(pacer.take(5.0)) == 1


def test_own_transactions_still_pending_go_out_again_every_few_blocks_until_they_leave_the_mempool() -> None:
    watch = OwnTxWatch(resend_blocks=3)
    pending = {b"a", b"b"}
    watch.sent(b"a", b"tx-a", 10)
    watch.sent(b"b", b"tx-b", 11)
    assert watch.due(12, pending.__contains__) == []
    assert watch.due(13, pending.__contains__) == [b"tx-a"]  # 3 blocks after it went out
    pending.discard(b"b")  # included (or dropped by the mempool): forgotten, never sent again
    assert watch.due(14, pending.__contains__) == [] and len(watch) == 1
    assert watch.due(16, pending.__contains__) == [b"tx-a"]  # 3 blocks after it went out again
    pending.clear()
    assert watch.due(30, pending.__contains__) == [] and len(watch) == 0


# ----------------------------------------------------------------- real nodes


@asynccontextmanager
async def a_validator_and_a_client(tmp_path) -> AsyncIterator[tuple[Any, Any, Any]]:
    """A one-validator chain and a client node bootstrapped from it, once the client knows v0 follows /tx."""
    from ledger.devtools import make_dev_network
    from p2pgpu.node import Node, NodeKeys

    from .test_node_consensus import node_config, wait_for

    net = make_dev_network(validators=("v0",), providers=(), clients=("c0",))
    async with trio.open_nursery() as nursery:
        v0 = Node(node_config(tmp_path, "v0", {"validator"}, block_interval=0.2),
                  NodeKeys(net.key("v0"), net.identities["v0"].bls), net.genesis)
        await nursery.start(v0.run)
        c0 = Node(node_config(tmp_path, "c0", {"client"}, [v0.network.addrs[0]]), NodeKeys(net.key("c0")),
                  net.genesis)
        await nursery.start(c0.run)
        # a client does not follow /tx (Node.follows_txs): it publishes to the peers it knows do
        assert not c0.follows_txs and c0.tx_sender is not None
        await wait_for(lambda: v0.network.peer_id in c0.network.gossip.topic_peers(c0.topics.tx), 30, nodes=[v0, c0])
        yield net, v0, c0
        nursery.cancel_scope.cancel()


async def test_a_burst_of_a_nodes_transactions_goes_out_in_a_few_messages_and_all_execute(tmp_path) -> None:
    from .test_node_consensus import wait_for

    burst = 40
    async with a_validator_and_a_client(tmp_path) as (net, v0, c0):
        me = net.address("c0")
        c0.tx_sender.send(Transfer(sender=me, nonce=0, fee=1, to=me, amount=1))  # alone: goes at once
        await wait_for(lambda: c0.network.metrics.published[c0.topics.tx] == 1, 10, nodes=[v0, c0])
        for _ in range(burst - 1):  # signed while the first is within its linger: they wait and go together
            c0.tx_sender.send(Transfer(sender=me, nonce=0, fee=1, to=me, amount=1))
        await wait_for(lambda: v0.chain.state.get_account(me).nonce == burst, 30, nodes=[v0, c0])
        assert c0.network.metrics.published[c0.topics.tx] <= 3
        assert v0.network.metrics.delivered[v0.topics.tx] == c0.network.metrics.published[c0.topics.tx]


async def test_a_clients_transaction_whose_gossip_was_lost_goes_out_again_and_executes(tmp_path) -> None:
    """A client does not follow /tx: a transaction lost on its way to the validators is not repaired by the
    mesh, so the client gossips it again while it stays pending (OwnTxWatch)."""
    from .test_node_consensus import wait_for

    async with a_validator_and_a_client(tmp_path) as (net, v0, c0):
        real_publish = c0.driver.publish_nowait
        lost: list[bytes] = []

        def lose_the_first_tx_message(topic: str, data: bytes) -> None:
            if topic == c0.topics.tx and not lost:
                lost.append(data)
                return
            real_publish(topic, data)

        c0.driver.publish_nowait = lose_the_first_tx_message
        me = net.address("c0")
        c0.tx_sender.send(Transfer(sender=me, nonce=0, fee=1, to=me, amount=1))
        await wait_for(lambda: v0.chain.state.get_account(me).nonce == 1, 30, nodes=[v0, c0])
        assert len(lost) == 1 and c0.counters.tx_resent >= 1
        await wait_for(lambda: len(c0._own_txs) == 0, 10, nodes=[v0, c0])  # included: no longer watched


async def test_a_node_that_does_not_follow_tx_or_task_says_so_when_no_peer_does(tmp_path, caplog) -> None:
    import logging
    from types import SimpleNamespace

    from ledger.devtools import make_dev_network
    from p2pgpu.node import Node, NodeKeys

    from .test_node_consensus import node_config

    net = make_dev_network(validators=("v0",), providers=(), clients=("c0",))
    c0 = Node(node_config(tmp_path, "c0", {"client"}), NodeKeys(net.key("c0")), net.genesis)
    assert not c0.follows_txs and not c0.follows_announces and c0.follows_market and c0.follows_bids
    followers: dict[str, set[str]] = {c0.topics.tx: set(), c0.topics.task: set()}
    gossip = SimpleNamespace(topic_peers=lambda topic: followers[topic])
    c0.network = SimpleNamespace(gossip=gossip, connected_peers=lambda: {"a-client"})  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="p2pgpu.node"):
        for _ in range(2):  # counted each time, but warned once a minute at most, per topic
            c0._note_if_unfollowed(c0.topics.tx)
            c0._note_if_unfollowed(c0.topics.task)
        c0._note_if_unfollowed(c0.topics.block)  # a topic it follows: nothing to count
        followers[c0.topics.tx].add("a-validator")
        followers[c0.topics.task].add("a-provider")
        c0._note_if_unfollowed(c0.topics.tx)  # a follower: nothing to say
        c0._note_if_unfollowed(c0.topics.task)
    assert c0.counters.published_without_followers == {"tx": 2, "task": 2}
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "tx_no_followers" in m and "relay_txs" in m] != []
    assert len([m for m in messages if "tx_no_followers" in m]) == 1
    assert len([m for m in messages if "task_no_followers" in m and "relay_announces" in m]) == 1


def test_who_follows_the_market_topics_by_role_and_setting(tmp_path) -> None:
    import dataclasses

    from ledger.devtools import make_dev_network
    from p2pgpu.node import Node, NodeKeys

    from .test_node_consensus import node_config

    net = make_dev_network(validators=("v0",), providers=("p0",), clients=("c0", "c1"))

    def make(name: str, roles: set[str], **client: object) -> Node:
        cfg = node_config(tmp_path / name, name, roles)
        if client:
            cfg = dataclasses.replace(cfg, client=dataclasses.replace(cfg.client, **client))
        return Node(cfg, NodeKeys(net.key(name)), net.genesis)

    provider, client, validator = make("p0", {"provider"}), make("c0", {"client"}), make("v0", {"validator"})
    relaying = make("c1", {"client"}, relay_announces=True)
    assert provider.follows_announces and not provider.follows_bids
    assert not client.follows_announces and client.follows_bids and client.follows_market
    assert relaying.follows_announces
    assert not validator.follows_market and not validator.follows_announces
