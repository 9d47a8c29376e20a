"""The ledger's books: each bucket holds what the transitions put there, and the total is conserved.

Each test follows funds through real blocks (DevChain) and checks which
buckets moved and by how much, so a bucket that is counted twice, missed, or
filled from nowhere shows up as a wrong delta rather than only as a wrong total.
"""

from __future__ import annotations

import dataclasses

from ledger.books import Books, get_books
from ledger.devtools import DevChain, make_dev_network
from ledger.params import Params
from ledger.state import Account
from ledger.transactions import Assign, CommitResult, Dispute, Unbond
from tests.ledger.test_transition import make_bid, post_task, step, tx

BUCKETS = ("balances", "escrow", "collateral", "dispute_bonds", "stake", "unbonding", "provider_bonds", "fee_pool",
           "burned", "minted")


def moved(before: Books, after: Books) -> dict[str, int]:
    """The buckets that changed from ``before`` to ``after``, with their change."""
    deltas = {name: getattr(after, name) - getattr(before, name) for name in BUCKETS}
    return {name: d for name, d in deltas.items() if d}


def test_genesis_books_hold_exactly_what_genesis_created(chain: DevChain) -> None:
    genesis = chain.network.genesis
    books = get_books(chain.state)
    assert books == Books(
        height=0,
        balances=sum(a.balance for a in genesis.accounts),
        escrow=0, collateral=0, dispute_bonds=0,
        stake=sum(v.stake for v in genesis.validators),
        unbonding=0,
        provider_bonds=sum(p.bond for p in genesis.providers),
        fee_pool=0, burned=0,
        genesis_supply=chain.state.genesis_supply,
        minted=0,
    )
    assert books.total == books.genesis_supply == chain.state.total_supply()
    assert books.conserved


def test_funds_move_between_buckets_and_the_total_stays(chain: DevChain) -> None:
    p = chain.state.params
    books = get_books(chain.state)

    def after(*txs) -> dict[str, int]:
        nonlocal books
        step(chain, *txs)
        new = get_books(chain.state)
        assert new.conserved and new.total == books.total  # block_reward is 0 here: nothing minted
        assert new.height == books.height + 1
        changes, books = moved(books, new), new
        return changes

    t, task_id = post_task(chain, price=1000)
    # Fees go to the fee pool and out to the proposer within the block: they never show between blocks.
    assert after(t) == {"balances": -(1000 + p.audit_fee), "escrow": 1000 + p.audit_fee}
    collateral = 800 * p.collateral_bps // 10_000
    assert after(tx(chain, "c0", Assign, task_id=task_id, bid=make_bid(chain, task_id, price=800))) == {
        "balances": 200 - collateral, "escrow": -200, "collateral": collateral}  # overbid refunded, collateral locked
    assert after(tx(chain, "p0", CommitResult, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=1)) == {}
    assert after(tx(chain, "c0", Dispute, task_id=task_id, item=None)) == {
        "balances": -p.dispute_bond, "dispute_bonds": p.dispute_bond}
    assert after(tx(chain, "v0", Unbond, amount=500)) == {"stake": -500, "unbonding": 500}
    assert books.unbonding == 500 and books.escrow == 800 + p.audit_fee


def test_block_rewards_show_as_minted_not_as_a_leak() -> None:
    net = make_dev_network(validators=("v0",), providers=(), clients=(), params=Params(block_reward=7))
    chain = DevChain(net)
    before = get_books(chain.state)
    for _ in range(3):
        chain.produce()
    books = get_books(chain.state)
    assert moved(before, books) == {"balances": 21, "minted": 21}
    assert books.minted == books.height * 7 and books.total == books.genesis_supply + 21
    assert books.conserved


def test_funds_from_nowhere_or_lost_are_not_conserved(chain: DevChain) -> None:
    address = chain.network.address("c0")
    forged = chain.state.copy()
    forged.accounts[address] = Account(balance=forged.get_balance(address) + 5, nonce=0)
    books = get_books(forged)
    assert not books.conserved and books.total - (books.genesis_supply + books.minted) == 5
    lost = chain.state.copy()
    v0 = chain.network.address("v0")
    lost.validators[v0] = dataclasses.replace(lost.validators[v0], stake=lost.validators[v0].stake - 1)
    books = get_books(lost)  # e.g. a slash that took stake without counting it as burned
    assert not books.conserved and books.total - (books.genesis_supply + books.minted) == -1
