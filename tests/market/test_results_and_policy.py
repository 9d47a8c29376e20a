"""Result hashing agreement, bid scoring policy, and the client's recovery paths."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from ledger.state import Provider, TaskOutcome
from ledger.transactions import Assign, Bid
from p2pgpu.market import (
    BidPolicy,
    ClientConfig,
    ClientTask,
    PricingPolicy,
    Report,
    ResultDelivered,
    SubmitTx,
    TxFailed,
    decode_result,
    encode_result,
    is_eligible_provider,
    item_hash,
    result_hash,
    score_bid,
    sign_bid,
)
from p2pgpu.market.provider import ProviderConfig
from p2pgpu.market.results import ResultEncodingError
from ledger.devtools import dev_account_key

from .sim import TEST_PARAMS, MarketSim, matmul_job


def test_result_hash_is_canonical_and_binds_every_output() -> None:
    c = np.arange(6, dtype=np.float32).reshape(2, 3)
    a = {"c": c, "aux": np.zeros(2, np.int32)}
    b = {"aux": np.zeros(2, np.int32), "c": np.asfortranarray(c)}  # other key order, other memory layout
    assert encode_result(a) == encode_result(b) and result_hash(a) == result_hash(b)
    assert result_hash(a) != result_hash({**a, "c": c.astype(np.float64)})
    assert result_hash(a) != result_hash({**a, "c": c.reshape(3, 2)})
    assert result_hash(a) != result_hash({"c": c})
    back = decode_result(encode_result(a))
    assert set(back) == {"aux", "c"} and np.array_equal(back["c"], c)
    with pytest.raises(ResultEncodingError, match="not a canonical result"):
        decode_result(encode_result(a) + b"\x00")
    with pytest.raises(ResultEncodingError):
        encode_result({"c": np.array(["x"], dtype=object)})


def test_item_hash_binds_dtype_and_shape() -> None:
    x = np.zeros(4, np.float32)
    assert item_hash(x) != item_hash(x.reshape(2, 2)) != item_hash(x.view(np.int32))


def _bid(price: int, eta: int = 10) -> object:
    key = dev_account_key("x")
    return sign_bid(key, bytes(32), Bid(task_id=bytes(32), provider=key.address, unit_price=price,
                                        est_seconds=eta, expiry_height=10, terms_hash=bytes(32)))


def test_score_weighs_price_eta_and_reputation() -> None:
    fresh = Provider(capabilities=b"", bond=100, completed=0, failed=0, missed=0)
    proven = replace(fresh, completed=20)
    policy = BidPolicy()
    kw = {"max_unit_price": 100, "limit_seconds": 60.0, "policy": policy}
    assert score_bid(_bid(50), fresh, **kw) < score_bid(_bid(60), fresh, **kw)
    assert score_bid(_bid(50, eta=5), fresh, **kw) < score_bid(_bid(50, eta=50), fresh, **kw)
    # a slightly pricier provider with a long clean record beats a new one
    assert score_bid(_bid(55), proven, **kw) < score_bid(_bid(50), fresh, **kw)
    price_only = BidPolicy(price_weight=1.0, eta_weight=0.0, reputation_weight=0.0)
    assert score_bid(_bid(50), fresh, max_unit_price=100, limit_seconds=60.0, policy=price_only) == 0.5


def test_eligibility_excludes_unregistered_and_failing_providers() -> None:
    policy = BidPolicy(max_failure_ratio=1.0, failure_allowance=2)
    p = Provider(capabilities=b"", bond=100, completed=3, failed=0, missed=0)
    assert not is_eligible_provider(None, policy)
    assert is_eligible_provider(replace(p, failed=5), policy)  # 5 <= 2 + 3
    assert not is_eligible_provider(replace(p, failed=4, missed=2), policy)


def test_refused_assign_falls_back_to_the_next_bid() -> None:
    sim = MarketSim()
    sim.add_provider("p0", pricing=PricingPolicy(cost_per_second=50))
    sim.add_provider("p1", pricing=PricingPolicy(cost_per_second=100))
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000,
                      config=ClientConfig(bid_window=6, exec_blocks=10, audit_rate_bps=0))
    sim.run_until(lambda: any(isinstance(a.body, Assign) for _, a in sim.pending))
    (_, first), = [(n, a) for n, a in sim.pending if isinstance(a.body, Assign)]
    assert first.body.bid.bid.provider == sim.address("p0")
    sim.pending.clear()  # as if the mempool refused it
    actions = task.handle(TxFailed(first.body, "provider lacks collateral"))
    (retry,) = [a for a in actions if isinstance(a, SubmitTx)]
    assert retry.body.bid.bid.provider == sim.address("p1")
    sim.route("c0", actions, task)
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).provider == sim.address("p1")
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID


def test_delivery_that_differs_from_the_commitment_is_disputed() -> None:
    sim = MarketSim()
    sim.add_provider("p0", pricing=PricingPolicy(cost_per_second=50))
    sim.add_provider("p1")
    sim.add_provider("p2")
    sim.push_results = False
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000,
                      config=ClientConfig(bid_window=4, exec_blocks=10, audit_rate_bps=0, dispute_undelivered=False))
    sim.run_until(lambda: task.state.value == "running")
    wrong = encode_result({"c": np.zeros((8, 8), np.float32)})
    sim.route("c0", task.handle(ResultDelivered(task.task_id, wrong)), task)
    sim.run_until(lambda: task.closed)
    assert "hashes to" in task.dispute_reason
    # the committed result was honest: the audit passes and the provider is paid (the client loses its bond)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID


def test_a_failed_result_fetch_is_retried_not_disputed() -> None:
    sim = MarketSim(params=replace(TEST_PARAMS, challenge_window=6))
    sim.add_provider("p0")
    sim.push_results = False  # the client must fetch the result itself
    sim.failing_result_fetches = 2
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000,
                      config=ClientConfig(bid_window=4, exec_blocks=10, audit_rate_bps=0))
    sim.run_until(lambda: task.closed)
    log = sim.logs["task:" + task.task_id.hex()]
    assert sum("retrying next block" in r.message for r in log.of(Report)) == 2
    assert sim.failing_result_fetches == 0 and task.accepted and not task.dispute_reason
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID


def test_market_never_imports_tensorflow() -> None:
    code = "import sys, p2pgpu.market; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))


def test_a_result_never_fetched_is_disputed_with_blocks_to_spare() -> None:
    """The Dispute goes out ``dispute_margin_blocks`` before the window's last block, so it can land on a
    loaded network (it used to go out in the last block and miss: the provider was paid for nothing)."""
    sim = MarketSim(params=replace(TEST_PARAMS, challenge_window=10))
    sim.add_provider("p0")
    sim.push_results = False
    sim.failing_result_fetches = 10**6  # the result never arrives
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000,
                      config=ClientConfig(bid_window=4, exec_blocks=10, audit_rate_bps=0))
    sim.run_until(lambda: task.state.value == "disputed")
    ledger_task = sim.task(task.task_id)
    assert "no acceptable result" in task.dispute_reason
    assert task.height == ledger_task.challenge_end - 1 - ClientConfig().dispute_margin_blocks



def test_a_task_paid_before_its_result_arrived_keeps_fetching_it() -> None:
    """A short challenge window on a slow network settles the task as paid before the client has the result;
    it paid for that result and the provider still serves it, so the client keeps fetching."""
    sim = MarketSim()
    sim.add_provider("p0")
    sim.push_results = False
    sim.failing_result_fetches = 10**6  # unreachable until the task has settled
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000,
                      config=ClientConfig(bid_window=4, exec_blocks=10, audit_rate_bps=0, dispute_undelivered=False))
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID and not task.accepted
    assert task.wants_events
    sim.failing_result_fetches = 0
    sim.run_until(lambda: task.accepted, max_blocks=5)
    ready = [a for a in sim.logs["task:" + task.task_id.hex()].actions if type(a).__name__ == "ResultReady"]
    assert len(ready) == 1 and np.allclose(ready[0].outputs["c"], inputs["a"] @ inputs["b"], atol=1e-4)
    assert not task.wants_events


def _paid_without_its_result(**config) -> tuple[MarketSim, ClientTask]:
    """A task settled as paid while every fetch of its result fails (the provider unreachable)."""
    sim = MarketSim()
    sim.add_provider("p0")
    sim.push_results = False
    sim.failing_result_fetches = 10**6
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000,
                      config=ClientConfig(bid_window=4, exec_blocks=10, audit_rate_bps=0, dispute_undelivered=False,
                                          **config))
    sim.run_until(lambda: task.closed)
    return sim, task


def test_a_late_fetch_gives_up_after_its_window() -> None:
    sim, task = _paid_without_its_result(late_fetch_blocks=3)
    sim.run_until(lambda: not task.wants_events, max_blocks=6)
    assert any("gave up" in r.message for r in sim.logs["task:" + task.task_id.hex()].of(Report))


def test_a_random_audit_does_not_stop_the_client_fetching_and_keeping_the_result() -> None:
    """The audit is drawn one block after the CommitResult; the client's fetch often completes during it.
    That result used to be dropped (the client was 'disputed'), and the task ended paid with no result."""
    sim = MarketSim()
    for name in ("p0", "p1", "p2"):
        sim.add_provider(name)
    sim.push_results = False
    sim.failing_result_fetches = 1  # the fetch at COMMITTED fails: the result must come during the audit
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000,
                      config=ClientConfig(bid_window=4, exec_blocks=10, audit_rate_bps=10_000))
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID
    assert task.accepted and not task.wants_events


def test_a_late_fetch_backs_off_and_still_gets_a_result_that_comes_back_much_later() -> None:
    """A provider paused for a minute or two (120 blocks) still delivers the paid result; the client tried
    fewer times than blocks passed (1, 2, 4, ... blocks apart), and not once per block."""
    sim, task = _paid_without_its_result()
    paid_at = task.height
    sim.run_until(lambda: task.height >= paid_at + 120, max_blocks=130)
    assert task.wants_events and not task.accepted
    assert 5 <= task.late_fetch_failures <= 12  # backing off to 32 blocks apart, not 120 tries
    sim.failing_result_fetches = 0
    sim.run_until(lambda: task.accepted, max_blocks=40)
    assert not task.wants_events


def test_the_load_term_lets_a_new_provider_win_once_the_proven_one_holds_a_few_of_our_tasks() -> None:
    fresh = Provider(capabilities=b"", bond=100, completed=0, failed=0, missed=0)
    proven = replace(fresh, completed=20)
    kw = {"max_unit_price": 100, "limit_seconds": 60.0, "policy": BidPolicy()}
    assert score_bid(_bid(50), proven, open_tasks=1, **kw) < score_bid(_bid(50), fresh, **kw)
    assert score_bid(_bid(50), proven, open_tasks=6, **kw) > score_bid(_bid(50), fresh, **kw)
    # the term grows with the open tasks and stays below its weight
    terms = [score_bid(_bid(50), fresh, open_tasks=n, **kw) - score_bid(_bid(50), fresh, **kw) for n in range(40)]
    assert terms == sorted(terms) and terms[0] == 0 and terms[-1] < BidPolicy().load_weight


def _spread(count_open: bool) -> dict[bytes, int]:
    sim = MarketSim(providers=("p0", "p1"))
    roomy = ProviderConfig(max_concurrent_jobs=2, max_queued=8)  # room for every task: no busy declines
    sim.add_provider("p0", config=roomy)
    sim.add_provider("p1", config=roomy)
    spec, inputs = matmul_job()
    tasks: list = []

    def open_tasks(provider: bytes) -> int:  # what ClientService.count_holder keeps: chosen, open, undelivered
        return sum(1 for t in tasks if t.chosen is not None and not t.closed and t.delivered is None
                   and t.chosen.bid.provider == provider)

    config = ClientConfig(bid_window=4, exec_blocks=20, audit_rate_bps=0, enough_bids=2)
    for _ in range(8):
        tasks.append(sim.submit("c0", spec, inputs, max_unit_price=1_000, config=config,
                                open_tasks=open_tasks if count_open else None))
    sim.run_until(lambda: all(t.closed for t in tasks), max_blocks=120)
    assert all(sim.task(t.task_id).outcome == TaskOutcome.PAID for t in tasks)
    won: dict[bytes, int] = {}
    for t in tasks:
        provider = sim.task(t.task_id).provider
        won[provider] = won.get(provider, 0) + 1
    return won


def test_a_client_spreads_equal_offers_over_the_providers_by_its_open_tasks() -> None:
    assert sorted(_spread(count_open=False).values()) == [8]  # without the load term: one provider takes all
    assert sorted(_spread(count_open=True).values()) == [4, 4]
