from __future__ import annotations

from dataclasses import replace

import pytest

from ledger.devtools import DevChain, make_dev_network, sign_transaction, sign_vote
from ledger.mempool import Mempool, MempoolConfig, MempoolRejected, RejectReason
from ledger.params import Params
from ledger.transactions import Evidence, Transfer
from ledger.votes import NIL_BLOCK, Vote, VoteStep


@pytest.fixture
def chain() -> DevChain:
    net = make_dev_network(validators=("v0", "v1", "v2", "v3"), providers=(), clients=("a", "b", "c"),
                           balance=1_000, params=Params(epoch_length=4, committee_size=8, min_fee=2))
    return DevChain(net)


def transfer(chain: DevChain, name: str, nonce: int, fee: int = 2, amount: int = 1, to: str = "c"):
    body = Transfer(sender=chain.network.address(name), nonce=nonce, fee=fee, to=chain.network.address(to), amount=amount)
    return sign_transaction(chain.network.key(name), chain.chain_id, body)


def reason(pool: Mempool, stx) -> RejectReason:
    with pytest.raises(MempoolRejected) as info:
        pool.add(stx)
    return info.value.reason


def test_admission_reasons(chain: DevChain) -> None:
    pool = Mempool(chain.state, MempoolConfig(max_future_gap=3))
    ok = transfer(chain, "a", 0)
    pool.add(ok)
    assert reason(pool, ok) is RejectReason.DUPLICATE
    assert reason(pool, transfer(chain, "a", 0, fee=1)) is RejectReason.FEE_TOO_LOW
    assert reason(pool, transfer(chain, "a", 9)) is RejectReason.NONCE_TOO_FAR
    assert reason(pool, transfer(chain, "a", 0, fee=2, amount=2)) is RejectReason.NONCE_TAKEN
    assert reason(pool, transfer(chain, "b", 0, amount=999)) is RejectReason.INSUFFICIENT_BALANCE
    forged = replace(transfer(chain, "b", 0), public_key=chain.network.key("a").public_key)
    assert reason(pool, forged) is RejectReason.BAD_SIGNATURE
    tampered = replace(transfer(chain, "b", 0), body=replace(transfer(chain, "b", 0).body, amount=5))
    assert reason(pool, tampered) is RejectReason.BAD_SIGNATURE
    # cumulative cost: a's second transfer on top of the first exceeds the balance
    assert reason(pool, transfer(chain, "a", 1, amount=996)) is RejectReason.INSUFFICIENT_BALANCE
    pool.add(transfer(chain, "a", 1, amount=995))
    # a replacement with a big enough fee bump is admitted in place
    pool.add(transfer(chain, "b", 0, fee=2))
    pool.add(transfer(chain, "b", 0, fee=3))
    assert len(pool.pending(chain.network.address("b"))) == 1
    chain.produce([ok])
    pool.update(chain.state, [ok])
    assert reason(pool, ok) is RejectReason.NONCE_TOO_LOW


def test_nonce_order_gaps_and_fee_priority(chain: DevChain) -> None:
    pool = Mempool(chain.state)
    a2, a0, a1 = transfer(chain, "a", 2, fee=50), transfer(chain, "a", 0, fee=2), transfer(chain, "a", 1, fee=2)
    b0 = transfer(chain, "b", 0, fee=10)
    pool.add(a2)
    assert pool.reap(100, 1 << 20) == []  # nonce 2 waits for 0 and 1
    pool.add(b0)
    pool.add(a0)
    assert pool.reap(100, 1 << 20) == [b0, a0]  # a1 missing: a2 is held
    pool.add(a1)
    assert pool.reap(100, 1 << 20) == [b0, a0, a1, a2]
    assert pool.reap(2, 1 << 20) == [b0, a0]
    assert pool.next_nonce(chain.network.address("a")) == 3
    # what a block includes is exactly a prefix the ledger accepts
    _, rejected = chain.produce(pool.reap(100, 1 << 20))
    assert rejected == []


def test_eviction_lowest_fee_first_and_never_opens_a_gap(chain: DevChain) -> None:
    pool = Mempool(chain.state, MempoolConfig(max_txs=3))
    a0, a1 = transfer(chain, "a", 0, fee=5), transfer(chain, "a", 1, fee=2)
    b0 = transfer(chain, "b", 0, fee=3)
    for stx in (a0, a1, b0):
        pool.add(stx)
    assert reason(pool, transfer(chain, "c", 0, fee=2)) is RejectReason.POOL_FULL  # nothing cheaper than 2
    c0 = transfer(chain, "c", 0, fee=4, to="a")
    pool.add(c0)  # evicts a1, the cheapest chain tail (a0 stays: evicting it would strand a1)
    assert a1.tx_hash() not in pool and a0.tx_hash() in pool and len(pool) == 3
    # a held future nonce goes first, even before cheaper ready tails
    pool2 = Mempool(chain.state, MempoolConfig(max_txs=2))
    future = transfer(chain, "b", 5, fee=3)
    pool2.add(transfer(chain, "a", 0, fee=2))
    pool2.add(future)
    pool2.add(transfer(chain, "c", 0, fee=4, to="a"))
    assert future.tx_hash() not in pool2


def test_recheck_after_block_drops_invalid_keeps_future(chain: DevChain) -> None:
    pool = Mempool(chain.state)
    a0, a1, a3 = transfer(chain, "a", 0), transfer(chain, "a", 1), transfer(chain, "a", 3)
    b0 = transfer(chain, "b", 0, amount=900)
    for stx in (a0, a1, a3, b0):
        pool.add(stx)
    # a block elsewhere includes a0 and a competing b transfer that drains b
    b_other = transfer(chain, "b", 0, amount=990, fee=3)
    chain.produce([a0, b_other])
    dropped = pool.update(chain.state, [a0, b_other])
    assert a0.tx_hash() not in pool
    assert (b0.tx_hash(), RejectReason.NONCE_TOO_LOW) in dropped
    assert a1.tx_hash() in pool and a3.tx_hash() in pool  # a3 still waits for nonce 2
    assert pool.ready(chain.network.address("a")) == [a1]


def test_evidence_already_punished_is_refused_and_dropped(chain: DevChain) -> None:
    net = chain.network
    v = net.identities["v1"]
    votes = [
        sign_vote(v.bls, v.address, chain.chain_id, Vote(height=1, round=0, step=VoteStep.PREVOTE, block_hash=h))
        for h in (b"\x01" * 32, NIL_BLOCK)
    ]
    ev = [
        sign_transaction(net.key(n), chain.chain_id,
                         Evidence(sender=net.address(n), nonce=0, fee=2, vote_a=votes[0], vote_b=votes[1]))
        for n in ("a", "b")
    ]
    pool = Mempool(chain.state)
    pool.add(ev[0])
    pool.add(ev[1])
    chain.produce([ev[0]])
    dropped = pool.update(chain.state, [ev[0]])
    assert dropped == [(ev[1].tx_hash(), RejectReason.ALREADY_PUNISHED)]
    assert reason(pool, ev[1]) is RejectReason.ALREADY_PUNISHED


def test_has_ready_only_with_an_executable_nonce(chain: DevChain) -> None:
    """What wakes a waiting proposer (early blocks): a gap-blocked transaction must not."""
    pool = Mempool(chain.state, MempoolConfig(max_future_gap=3))
    assert not pool.has_ready()
    pool.add(transfer(chain, "a", 1))  # nonce 0 missing: cannot execute yet
    assert not pool.has_ready()
    pool.add(transfer(chain, "a", 0))
    assert pool.has_ready()
    assert pool.has_ready() == bool(pool.reap(100, 1 << 20))


def test_a_busy_senders_thousand_transactions_arrive_out_of_order_and_land_in_blocks_of_hundreds() -> None:
    """A client with hundreds of tasks in flight signs its nonces in parallel, so peers see them out of order;
    the pool holds a chain of 1,000 for one sender and blocks carry hundreds at a time, in nonce order."""
    net = make_dev_network(validators=("v0",), providers=(), clients=("a", "c"), balance=10_000_000,
                           params=Params(epoch_length=64))
    chain = DevChain(net)
    pool = Mempool(chain.state)
    txs = [transfer(chain, "a", n, fee=1) for n in range(1_000)]
    order = list(range(1_000))
    order[0:500] = reversed(order[0:500])  # the first half arrives last-first
    for n in order:
        pool.add(txs[n])
    sender = chain.network.address("a")
    assert len(pool.pending(sender)) == 1_000 and len(pool.ready(sender)) == 1_000
    applied = 0
    while applied < 1_000:
        block = pool.reap(400, 4 << 20)
        assert [stx.body.nonce for stx in block] == list(range(applied, applied + len(block)))
        assert 0 < len(block) <= 400
        _, rejected = chain.produce(block)
        assert rejected == []
        pool.update(chain.state, block)
        applied += len(block)
    assert chain.state.get_account(sender).nonce == 1_000 and len(pool) == 0


def test_at_the_per_sender_limit_a_gap_filler_is_still_admitted_so_the_sender_is_never_stuck(chain: DevChain) -> None:
    """Concurrent submissions reach the pool out of order: at the limit, the pending transactions may all sit
    above a gap. Refusing the one that fills it would leave nothing executable and no block to free room."""
    pool = Mempool(chain.state, MempoolConfig(max_per_sender=2))
    a = chain.network.address("a")
    pool.add(transfer(chain, "a", 1))
    pool.add(transfer(chain, "a", 2))
    assert not pool.has_ready()
    assert reason(pool, transfer(chain, "a", 3)) is RejectReason.SENDER_LIMIT  # beyond the highest: still refused
    pool.add(transfer(chain, "a", 0))  # fills the gap below
    assert pool.has_ready() and [stx.body.nonce for stx in pool.pending(a)] == [0, 1, 2]
    assert reason(pool, transfer(chain, "a", 3)) is RejectReason.SENDER_LIMIT
