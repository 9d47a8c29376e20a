"""Validly signed gossip that can never take effect is not forwarded (spam must not cost every node)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from kernels.spec import make_spec
from ledger.devtools import DevChain, make_dev_network, sign_transaction
from ledger.keys import AccountKey
from ledger.transactions import TaskKind, Transfer, compute_task_id
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
