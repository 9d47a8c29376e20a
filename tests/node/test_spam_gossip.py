"""Validly signed gossip that can never take effect is not forwarded (spam must not cost every node)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np

from kernels.spec import make_spec
from ledger.devtools import DevChain, make_dev_network, sign_transaction
from ledger.keys import AccountKey
from ledger.transactions import TaskKind, Transfer, compute_task_id
from p2pgpu.config import RateLimitSettings
from p2pgpu.market import SeenCache, encode_market_message, make_announce, sign_announce
from p2pgpu.net import Outcome, peer_id_from_seed
from p2pgpu.node import Node, NodeKeys
from p2pgpu.roles import MarketRoles

from .test_node_consensus import node_config


def _node(tmp_path):
    net = make_dev_network(validators=("v0",), providers=(), clients=("c0",))
    chain = DevChain(net)
    node = Node(node_config(tmp_path, "v0", {"validator"}), NodeKeys(net.key("v0"), net.identities["v0"].bls),
                net.genesis)
    node.chain = SimpleNamespace(state=chain.state, height=chain.state.height)  # the head the validators read
    return net, chain, node


def test_transactions_that_cannot_execute_on_our_head_are_not_forwarded(tmp_path) -> None:
    net, chain, node = _node(tmp_path)
    pauper = AccountKey.generate()
    unfunded = sign_transaction(pauper, chain.chain_id,
                                Transfer(sender=pauper.address, nonce=0, fee=1, to=pauper.address, amount=1))
    verdict = node._validate_tx("peer", unfunded.encode())
    assert verdict.outcome is Outcome.IGNORE and verdict.reason == "unfunded"
    me = net.address("c0")
    ok = chain.sign("c0", Transfer(sender=me, nonce=0, fee=1, to=me, amount=1))
    assert node._validate_tx("peer", ok.encode()).outcome is Outcome.ACCEPT
    chain.produce([ok])
    node.chain = SimpleNamespace(state=chain.state, height=chain.state.height)
    stale = chain.sign("c0", Transfer(sender=me, nonce=0, fee=2, to=me, amount=1))
    verdict = node._validate_tx("peer", stale.encode())
    assert verdict.outcome is Outcome.IGNORE and verdict.reason == "stale_nonce"


def test_an_announce_its_client_cannot_fund_is_not_forwarded(tmp_path) -> None:
    net, chain, node = _node(tmp_path)
    a = np.ones((2, 2), np.float32)
    spec = make_spec("matmul", 1, {}, {"a": a, "b": a})

    def announce(key: AccountKey, price: int, data_peer: bytes | None = None) -> bytes:
        own = peer_id_from_seed(key.seed).encode()  # the signer's node: its libp2p identity is its account key
        rec = make_announce(chain_id=chain.chain_id, task_id=compute_task_id(key.address, 0), client=key.address,
                            kind=TaskKind.BATCH, spec=spec, max_unit_price=price, units=1, exec_blocks=10,
                            bid_deadline_height=chain.state.height + 5, data_peer=data_peer or own)
        return encode_market_message(sign_announce(key, rec))

    roles = SimpleNamespace(chain_id=chain.chain_id, node=node, seen_task=SeenCache())
    verdict = MarketRoles.validate_task(roles, "peer", announce(AccountKey.generate(), 10))
    assert verdict.outcome is Outcome.IGNORE and verdict.reason == "unfunded_client"
    funded = MarketRoles.validate_task(roles, "peer", announce(net.key("c0"), 10))
    assert funded.outcome is Outcome.ACCEPT
    too_dear = MarketRoles.validate_task(roles, "peer", announce(net.key("c0"), chain.state.get_balance(
        net.address("c0")) + 1))
    assert too_dear.outcome is Outcome.IGNORE


def test_an_announce_naming_another_peer_as_its_data_holder_is_refused_and_charged(tmp_path) -> None:
    """Its spec and inputs would be fetched from that peer: every provider sent to a node of the signer's
    choosing (an honest client's, which then refused its own provider as busy)."""
    net, chain, node = _node(tmp_path)
    a = np.ones((2, 2), np.float32)
    spec = make_spec("matmul", 1, {}, {"a": a, "b": a})
    key, victim = net.key("c0"), AccountKey.generate()
    rec = make_announce(chain_id=chain.chain_id, task_id=compute_task_id(key.address, 0), client=key.address,
                        kind=TaskKind.BATCH, spec=spec, max_unit_price=10, units=1, exec_blocks=10,
                        bid_deadline_height=chain.state.height + 5,
                        data_peer=peer_id_from_seed(victim.seed).encode())
    roles = SimpleNamespace(chain_id=chain.chain_id, node=node, seen_task=SeenCache())
    verdict = MarketRoles.validate_task(roles, "peer", encode_market_message(sign_announce(key, rec)))
    assert verdict.outcome is Outcome.REJECT and verdict.reason == "data_peer_not_signer"



def test_an_unfunded_transaction_is_charged_to_the_peer_that_published_it_but_not_to_a_relay(tmp_path) -> None:
    """A relay's head may differ from ours (ignored, not charged); the peer that published the message signed it
    as its own (charged) -- unless our node is the one behind."""
    from types import SimpleNamespace as NS

    from p2pgpu.net import gossip

    net, chain, node = _node(tmp_path)
    pauper = AccountKey.generate()
    unfunded = sign_transaction(pauper, chain.chain_id,
                                Transfer(sender=pauper.address, nonce=0, fee=1, to=pauper.address, amount=1)).encode()
    token = gossip._origin.set("publisher")
    try:
        assert node._validate_tx("relay", unfunded).outcome is Outcome.IGNORE
        verdict = node._validate_tx("publisher", unfunded)
        assert verdict.outcome is Outcome.REJECT and verdict.reason == "unfunded_published"
        node.driver = NS(behind=True)  # we are behind: our head is no ground to charge anyone
        assert node._validate_tx("publisher", unfunded).outcome is Outcome.IGNORE
    finally:
        gossip._origin.reset(token)


# ----------------------------------------------------------------- far-future nonces and per-sender limits


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


TIGHT = RateLimitSettings(tx_per_sender_burst=2048, tx_per_sender_rate=256.0, announces_per_client_burst=1024,
                          announces_per_client_rate=64.0)
"""Limits a test can flood past within the mempool's nonce window (the defaults are set at the chain's capacity)."""


def _clocked_node(tmp_path, limits: RateLimitSettings = TIGHT):
    net = make_dev_network(validators=("v0",), providers=(), clients=("c0",))
    chain = DevChain(net)
    clock = _Clock()
    config = node_config(tmp_path, "v0", {"validator"})
    config = replace(config, network=replace(config.network, rate_limits=limits))
    node = Node(config, NodeKeys(net.key("v0"), net.identities["v0"].bls), net.genesis, clock=clock)
    node.chain = SimpleNamespace(state=chain.state, height=chain.state.height)
    return net, chain, node, clock


def _as_published_by(publisher: str):
    """Run validators as if ``publisher`` signed the libp2p envelope (``message_origin()``)."""
    from contextlib import contextmanager

    from p2pgpu.net import gossip

    @contextmanager
    def scope():
        token = gossip._origin.set(publisher)
        try:
            yield
        finally:
            gossip._origin.reset(token)

    return scope()


def test_a_far_future_nonce_is_not_forwarded_and_is_charged_to_its_publisher(tmp_path) -> None:
    """Nonces no mempool would hold (5,000, 10^6, 2^40 from a key that can pay one fee) passed the /tx validator
    and were relayed by every node, and nobody was charged."""
    net, chain, node, _ = _clocked_node(tmp_path)
    me = net.address("c0")
    with _as_published_by("publisher"):
        for nonce in (5_000, 10**6, 2**40):
            data = chain.sign("c0", Transfer(sender=me, nonce=nonce, fee=1, to=me, amount=1)).encode()
            relayed = node._validate_tx("relay", data)
            assert relayed.outcome is Outcome.IGNORE and relayed.reason == "nonce_too_far", nonce
            published = node._validate_tx("publisher", data)
            assert published.outcome is Outcome.REJECT and published.reason == "nonce_too_far_published", nonce
        # Just past the window: a publisher a block ahead of us may still hold it in its window. Not relayed,
        # not charged.
        gap = node.mempool.config.max_future_gap if node.mempool is not None else 1024
        edge = chain.sign("c0", Transfer(sender=me, nonce=gap + 1, fee=1, to=me, amount=1)).encode()
        verdict = node._validate_tx("publisher", edge)
        assert verdict.outcome is Outcome.IGNORE and verdict.reason == "nonce_too_far"
        inside = chain.sign("c0", Transfer(sender=me, nonce=gap, fee=1, to=me, amount=1)).encode()
        assert node._validate_tx("publisher", inside).outcome is Outcome.ACCEPT
        # A node that is behind has no ground to charge anyone.
        node.driver = SimpleNamespace(behind=True)
        far = chain.sign("c0", Transfer(sender=me, nonce=10**6, fee=1, to=me, amount=1)).encode()
        assert node._validate_tx("publisher", far).outcome is Outcome.IGNORE


def _publish_in_blocks(net, chain, node, clock, *, blocks: int, per_block: int) -> None:
    """c0 publishes ``per_block`` transfers, all accepted by ``node``; a block executes them; 0.5 s pass; again."""
    me = net.address("c0")
    for _ in range(blocks):
        base = chain.state.get_account(me).nonce
        txs = [chain.sign("c0", Transfer(sender=me, nonce=base + i, fee=1, to=me, amount=1)) for i in range(per_block)]
        verdicts = [node._validate_tx("client", stx.encode()) for stx in txs]
        assert all(v.outcome is Outcome.ACCEPT for v in verdicts), {v.reason for v in verdicts}
        chain.produce(txs, check_signatures=False)
        node.chain = SimpleNamespace(state=chain.state, height=chain.state.height)
        clock.now += 0.5


def test_an_honest_burst_of_1500_transactions_is_never_refused_but_a_flood_is_charged(tmp_path) -> None:
    """Issue 12's load: a client submits hundreds of tasks at once, ~3 transactions each. 1,500 transactions in
    1.5 s pass; a sender flooding far beyond that has the excess dropped and its publisher charged."""
    net, chain, node, clock = _clocked_node(tmp_path)
    me = net.address("c0")
    with _as_published_by("client"):
        _publish_in_blocks(net, chain, node, clock, blocks=3, per_block=500)  # a block executes each 500, 0.5 s apart
        assert node.tx_limiter.refused == 0
        # The flood: the same sender keeps going with no pause, far past its burst.
        base = chain.state.get_account(me).nonce
        outcomes = []
        for i in range(1000):
            stx = chain.sign("c0", Transfer(sender=me, nonce=base + i, fee=1, to=me, amount=1))
            outcomes.append(node._validate_tx("client", stx.encode()))
        refused = [v for v in outcomes if v.outcome is not Outcome.ACCEPT]
        assert refused and all(v.outcome is Outcome.REJECT and v.reason == "sender_rate_published" for v in refused)
        # ... and from a relay, the same excess is dropped without a charge
        stx = chain.sign("c0", Transfer(sender=me, nonce=base + 1000, fee=1, to=me, amount=1))
        verdict = node._validate_tx("relay", stx.encode())
        assert verdict.outcome is Outcome.IGNORE and verdict.reason == "sender_rate"
        # Another sender is not held back by this one.
        other = net.address("v0")
        ok = chain.sign("v0", Transfer(sender=other, nonce=chain.state.get_account(other).nonce, fee=1, to=other,
                                       amount=1))
        assert node._validate_tx("relay", ok.encode()).outcome is Outcome.ACCEPT


def test_the_default_limits_let_a_sender_through_at_the_chains_capacity(tmp_path) -> None:
    """A client sending a batch of thousands of tasks fills blocks: 1,000 transactions a block, a block every
    0.5 s, for 10 s. None of it is refused by the defaults (it would be charged, and the client banned)."""
    net, chain, node, clock = _clocked_node(tmp_path, RateLimitSettings())
    with _as_published_by("client"):
        _publish_in_blocks(net, chain, node, clock, blocks=20, per_block=1000)
    assert node.tx_limiter.refused == 0


def test_forged_or_stale_copies_in_a_senders_name_do_not_use_up_its_allowance(tmp_path) -> None:
    """Only a message the node would relay takes a token: nobody can exhaust an honest sender's limit."""
    net, chain, node, _ = _clocked_node(tmp_path)
    me = net.address("c0")
    impostor = AccountKey.generate()
    for i in range(3000):
        forged = sign_transaction(impostor, chain.chain_id, Transfer(sender=me, nonce=i, fee=1, to=me, amount=1))
        assert node._validate_tx("relay", forged.encode()).outcome is Outcome.REJECT
    assert node.tx_limiter.tokens(me) == node.tx_limiter.limit.burst


def _announce_maker(chain):
    a = np.ones((2, 2), np.float32)
    spec = make_spec("matmul", 1, {}, {"a": a, "b": a})

    def announce(key: AccountKey, n: int) -> bytes:
        rec = make_announce(chain_id=chain.chain_id, task_id=compute_task_id(key.address, n), client=key.address,
                            kind=TaskKind.BATCH, spec=spec, max_unit_price=1, units=1, exec_blocks=10,
                            bid_deadline_height=chain.state.height + 5,
                            data_peer=peer_id_from_seed(key.seed).encode())
        return encode_market_message(sign_announce(key, rec))

    return announce


def test_an_honest_burst_of_500_announces_passes_but_a_flood_is_dropped_and_its_publisher_charged(tmp_path) -> None:
    """An announce costs its client nothing, yet every provider decodes it: a funded key could flood them
    without limit. 500 announces in a second (a big batch) pass; past the client's burst the rest are not
    relayed, and the peer that published them is charged (a relay is not)."""
    net, chain, node, clock = _clocked_node(tmp_path)
    announce = _announce_maker(chain)
    key = net.key("c0")
    roles = SimpleNamespace(chain_id=chain.chain_id, node=node, seen_task=SeenCache())
    with _as_published_by("client"):
        honest = [MarketRoles.validate_task(roles, "client", announce(key, n)) for n in range(500)]
        assert all(v.outcome is Outcome.ACCEPT for v in honest), {v.reason for v in honest}
        clock.now += 1.0
        flood = [MarketRoles.validate_task(roles, "client", announce(key, n)) for n in range(500, 2500)]
        refused = [v for v in flood if v.outcome is not Outcome.ACCEPT]
        assert len(refused) >= 2000 - node.announce_limiter.limit.burst
        assert all(v.outcome is Outcome.REJECT and v.reason == "client_rate_published" for v in refused)
        relayed = MarketRoles.validate_task(roles, "relay", announce(key, 2500))
        assert relayed.outcome is Outcome.IGNORE and relayed.reason == "client_rate"
        # after a quiet spell the client may announce again
        clock.now += node.announce_limiter.limit.refill_seconds
        assert MarketRoles.validate_task(roles, "client", announce(key, 2501)).outcome is Outcome.ACCEPT


# ----------------------------------------------------------------- batches (p2pgpu.txgossip)


def test_a_batch_is_judged_per_transaction_and_one_bad_signature_rejects_it(tmp_path) -> None:
    from p2pgpu.txgossip import encode_tx_batches

    net, chain, node = _node(tmp_path)
    me = net.address("c0")
    good = [chain.sign("c0", Transfer(sender=me, nonce=i, fee=1, to=me, amount=1)) for i in range(3)]
    verdict = node._validate_tx("peer", encode_tx_batches([t.encode() for t in good])[0])
    assert verdict.outcome is Outcome.ACCEPT and [v.encode() for v in verdict.record] == [t.encode() for t in good]
    forged = replace(good[1], signature=bytes(64))
    (batch,) = encode_tx_batches([good[0].encode(), forged.encode(), good[2].encode()])
    verdict = node._validate_tx("peer", batch)
    assert verdict.outcome is Outcome.REJECT and verdict.reason == "bad_signature"
    chain.produce(good)
    node.chain = SimpleNamespace(state=chain.state, height=chain.state.height)
    verdict = node._validate_tx("peer", encode_tx_batches([t.encode() for t in good])[0])
    assert verdict.outcome is Outcome.IGNORE and verdict.reason == "stale_nonce"  # all executed: nothing new


def test_a_transaction_that_cannot_execute_is_charged_without_losing_the_rest_of_its_batch(tmp_path) -> None:
    """Whether a transaction can execute depends on the head: the batch's others still go through, and its
    publisher is charged once for the one that cannot."""
    from p2pgpu.net import gossip
    from p2pgpu.txgossip import encode_tx_batches

    net, chain, node = _node(tmp_path)
    charged: list[tuple[str, str, str]] = []
    node.network = SimpleNamespace(peer_id="me", report_rejection=lambda topic, peer, reason: charged.append(
        (topic, peer, reason)))
    me, pauper = net.address("c0"), AccountKey.generate()
    ok = chain.sign("c0", Transfer(sender=me, nonce=0, fee=1, to=me, amount=1))
    unfunded = sign_transaction(pauper, chain.chain_id,
                                Transfer(sender=pauper.address, nonce=0, fee=1, to=pauper.address, amount=1))
    (batch,) = encode_tx_batches([unfunded.encode(), ok.encode()])
    token = gossip._origin.set("publisher")
    try:
        verdict = node._validate_tx("publisher", batch)
        assert verdict.outcome is Outcome.ACCEPT and [v.encode() for v in verdict.record] == [ok.encode()]
        assert charged == [(node.topics.tx, "publisher", "unfunded_published")]
        charged.clear()
        assert node._validate_tx("relay", batch).outcome is Outcome.ACCEPT and charged == []  # a relay: not charged
        (alone,) = encode_tx_batches([unfunded.encode(), unfunded.encode()])
        verdict = node._validate_tx("publisher", alone)  # nothing else in it: the message itself is refused
        assert verdict.outcome is Outcome.REJECT and verdict.reason == "unfunded_published" and charged == []
    finally:
        gossip._origin.reset(token)
