"""A transaction that can never execute must not strand the ones queued behind it."""

from __future__ import annotations

from ledger.devtools import DevChain, make_dev_network, sign_bid
from ledger.mempool import Mempool
from ledger.state import TaskStatus
from ledger.transactions import Assign, Bid, PostTask, TaskKind, Transfer, compute_task_id
from ledger.transition import terms_hash_of_task
from p2pgpu.nonce_keeper import NonceKeeper, filler_for


def _post(chain: DevChain, nonce: int):
    return chain.sign("c0", PostTask(sender=chain.network.address("c0"), nonce=nonce, fee=1, kind=TaskKind.BATCH,
                                     spec_hash=b"\x01" * 32, requirements=b"", max_unit_price=100, units=1,
                                     bid_window=5, exec_blocks=5, audit_rate_bps=0))


def _assign(chain: DevChain, nonce: int, task_id: bytes, provider: str):
    task = chain.state.tasks[task_id]
    bid = Bid(task_id=task_id, provider=chain.network.address(provider), unit_price=50, est_seconds=1,
              expiry_height=chain.state.height + 10, terms_hash=terms_hash_of_task(task))
    return chain.sign("c0", Assign(sender=chain.network.address("c0"), nonce=nonce, fee=1, task_id=task_id,
                                   bid=sign_bid(chain.network.key(provider), chain.chain_id, bid)))


def test_a_failing_head_is_replaced_and_the_chain_behind_it_runs() -> None:
    chain = DevChain(make_dev_network(providers=("p0", "p1")))
    me = chain.network.address("c0")
    chain.produce([_post(chain, 0)])
    task_id = compute_task_id(me, 0)
    first, retry = _assign(chain, 1, task_id, "p0"), _assign(chain, 2, task_id, "p1")
    chain.produce([first])  # the first Assign lands; the retry can now never execute
    pool = Mempool(chain.state)
    pool.add(retry)
    behind = _post(chain, 3)  # e.g. the client's next task, queued behind the retry
    pool.add(behind)
    keeper = NonceKeeper(me, patience_blocks=2)

    for _ in range(2):  # waiting for a proposer is not being stuck: no verdict before the patience runs out
        assert keeper.check(chain.state, pool.pending(me)) is None
        chain.produce(pool.reap(100, 1 << 20))  # another node proposes: it refuses the retry, ours keeps it
        pool.update(chain.state)
        assert chain.state.get_account(me).nonce == 2  # stranded
    stuck = keeper.check(chain.state, pool.pending(me))
    assert stuck is not None and stuck.stx.tx_hash() == retry.tx_hash() and "ASSIGNED" in stuck.reason

    filler = filler_for(me, stuck, min_fee=1, bump_pct=pool.config.replace_fee_bump_pct)
    assert isinstance(filler, Transfer) and filler.nonce == 2 and filler.to == me and filler.fee > retry.body.fee
    pool.add(chain.sign("c0", filler))  # replaces the retry at its nonce
    assert retry.tx_hash() not in pool
    _, rejected = chain.produce(pool.reap(100, 1 << 20))
    assert not rejected
    assert chain.state.get_account(me).nonce == 4
    assert chain.state.tasks[compute_task_id(me, 3)].status == TaskStatus.POSTED


def test_a_head_that_can_execute_is_left_alone() -> None:
    chain = DevChain(make_dev_network(providers=("p0",)))
    me = chain.network.address("c0")
    keeper = NonceKeeper(me, patience_blocks=1)
    head = _post(chain, 0)
    for _ in range(4):  # e.g. no proposer has picked it up yet
        assert keeper.check(chain.state, [head]) is None
        chain.produce([])
    assert keeper.check(chain.state, []) is None


def test_a_gap_left_by_a_dropped_head_is_filled() -> None:
    """When we proposed the block that refused our head, our pool dropped it; other nodes still hold it."""
    chain = DevChain(make_dev_network(providers=("p0", "p1")))
    me = chain.network.address("c0")
    chain.produce([_post(chain, 0)])
    task_id = compute_task_id(me, 0)
    chain.produce([_assign(chain, 1, task_id, "p0")])
    ours, theirs = Mempool(chain.state), Mempool(chain.state)
    retry, behind = _assign(chain, 2, task_id, "p1"), _post(chain, 3)
    for pool in (ours, theirs):
        pool.add(retry)
        pool.add(behind)
    _, rejected = chain.produce(ours.reap(100, 1 << 20))
    ours.discard_rejected(rejected)
    assert retry.tx_hash() not in ours and retry.tx_hash() in theirs
    keeper = NonceKeeper(me, patience_blocks=1)
    assert keeper.check(chain.state, ours.pending(me)) is None
    chain.produce([])
    stuck = keeper.check(chain.state, ours.pending(me))
    assert stuck is not None and stuck.stx is None and stuck.nonce == 2 and "gap" in stuck.reason
    filler = chain.sign("c0", filler_for(me, stuck, min_fee=1, fee_to_beat=retry.body.fee,
                                         bump_pct=theirs.config.replace_fee_bump_pct))
    theirs.add(filler)  # the other node's pool takes it in place of the retry
    assert retry.tx_hash() not in theirs
    _, rejected = chain.produce(theirs.reap(100, 1 << 20))
    assert not rejected and chain.state.get_account(me).nonce == 4


def test_dead_transactions_behind_the_head_are_all_found_at_once() -> None:
    """Under load several queued transactions die while they wait; replaced one head at a time, each cost two
    blocks while the Assigns behind them expired in turn."""
    chain = DevChain(make_dev_network(providers=("p0", "p1")))
    me = chain.network.address("c0")
    chain.produce([_post(chain, 0), _post(chain, 1)])
    t0, t1 = compute_task_id(me, 0), compute_task_id(me, 1)
    chain.produce([_assign(chain, 2, t0, "p0"), _assign(chain, 3, t1, "p0")])
    pool = Mempool(chain.state)
    ok_head = _post(chain, 4)
    dead = [_assign(chain, 5, t0, "p1"), _assign(chain, 6, t1, "p1")]  # both tasks are assigned already
    fine = _post(chain, 7)
    for stx in (ok_head, *dead, fine):
        pool.add(stx)
    keeper = NonceKeeper(me)
    assert keeper.check_behind(chain.state, pool.pending(me)) == []  # first failure: wait one block
    chain.produce([])
    stuck = keeper.check_behind(chain.state, pool.pending(me))
    assert [s.nonce for s in stuck] == [5, 6] and all("ASSIGNED" in s.reason for s in stuck)
    for s in stuck:
        pool.add(chain.sign("c0", filler_for(me, s, min_fee=1, bump_pct=pool.config.replace_fee_bump_pct)))
    _, rejected = chain.produce(pool.reap(100, 1 << 20))
    assert not rejected and chain.state.get_account(me).nonce == 8
    assert chain.state.tasks[compute_task_id(me, 7)].status == TaskStatus.POSTED


def test_a_gap_stops_the_dry_run() -> None:
    chain = DevChain(make_dev_network(providers=("p0",)))
    me = chain.network.address("c0")
    keeper = NonceKeeper(me, behind_patience_blocks=0)
    chain.produce([_post(chain, 0)])
    dead_after_gap = _assign(chain, 3, compute_task_id(me, 0), "p0")  # nonce 1..2 still being built
    assert keeper.check_behind(chain.state, [dead_after_gap]) == []
