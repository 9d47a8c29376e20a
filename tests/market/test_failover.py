"""Failover on a real ledger: a provider that stops is replaced from a fresh auction, and the client pays once."""

from __future__ import annotations

import numpy as np

from ledger.params import BPS
from ledger.state import TaskOutcome, TaskStatus
from ledger.transactions import ReopenTask
from p2pgpu.market import (
    AnnounceReceived,
    BlockFinalized,
    ClientConfig,
    FetchSpec,
    PublishBid,
    SpecFetched,
    PricingPolicy,
    ProviderRole,
    PublishAnnounce,
    Report,
    ResultReady,
    SubmitTx,
    TaskClosed,
    decode_result,
)

from p2pgpu.market.provider import JobPhase

from .sim import CPU, TEST_PARAMS, MarketSim, matmul_job

CONFIG = ClientConfig(bid_window=4, exec_blocks=30, audit_rate_bps=0, reopen_after_blocks=TEST_PARAMS.reopen_after_blocks)


def _sim() -> MarketSim:
    sim = MarketSim(providers=("p0", "p1"))
    sim.add_provider("p0", pricing=PricingPolicy(margin_bps=0))  # the cheaper: it wins the first auction
    sim.add_provider("p1", pricing=PricingPolicy(margin_bps=5_000))
    sim.hold_jobs = True  # jobs take time: "mid-job" is a state the test can hold
    return sim


def _started(sim: MarketSim, config: ClientConfig = CONFIG):
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=config)
    sim.run_until(lambda: sim.running["p0"] != [])
    assert sim.task(task.task_id).provider == sim.address("p0")
    return task, inputs


def _reopens(sim: MarketSim, task) -> list[ReopenTask]:
    return [a.body for a in sim.logs["task:" + task.task_id.hex()].of(SubmitTx) if isinstance(a.body, ReopenTask)]


def test_a_provider_killed_mid_job_is_replaced_and_the_client_pays_once() -> None:
    sim = _sim()
    c0, p0, p1 = sim.balance("c0"), sim.balance("p0"), sim.balance("p1")
    task, inputs = _started(sim)
    collateral = sim.task(task.task_id).collateral
    sim.dead.add("p0")  # kill -9
    for _ in range(CONFIG.probe_misses - 1):
        sim.probe()
        sim.step()
    assert not _reopens(sim, task)  # a missed probe or two is not a stopped provider
    sim.probe()
    assert len(_reopens(sim, task)) == 1
    sim.step()
    ledger_task = sim.task(task.task_id)
    assert ledger_task.status == TaskStatus.POSTED and ledger_task.reopens == 1
    announces = sim.logs["c0"].of(PublishAnnounce)  # start()'s, then the fresh auction's
    assert len(announces) == 2 and announces[1].signed.announce.bid_deadline_height == ledger_task.bid_deadline
    sim.run_until(lambda: sim.running["p1"] != [])
    assert sim.task(task.task_id).provider == sim.address("p1")
    sim.finish("p1", task.task_id)
    sim.run_until(lambda: task.closed)
    final = sim.task(task.task_id)
    assert final.outcome == TaskOutcome.PAID and final.provider == sim.address("p1")
    (ready,) = sim.logs["task:" + task.task_id.hex()].of(ResultReady)
    np.testing.assert_allclose(decode_result(ready.data)["c"], inputs["a"] @ inputs["b"], rtol=1e-5)
    fees = 4 * CONFIG.fee  # PostTask, Assign, ReopenTask, Assign
    assert sim.balance("c0") == c0 - final.unit_price - fees
    slash = collateral * TEST_PARAMS.reopen_slash_bps // BPS
    assert sim.balance("p0") == p0 - slash
    assert sim.chain.state.providers[sim.address("p0")].missed == 1
    cut = final.unit_price * TEST_PARAMS.protocol_fee_bps // BPS
    assert sim.balance("p1") == p1 + final.unit_price - cut - CONFIG.fee


def test_a_provider_that_restarted_without_the_job_is_replaced_at_once() -> None:
    sim = _sim()
    task, _ = _started(sim)
    sim.running["p0"].clear()
    old = sim.providers["p0"]  # a restart: the same key, none of the jobs
    sim.providers["p0"] = ProviderRole(key=old.key, chain_id=old.chain_id, capabilities=CPU, pricing=old.pricing,
                                       config=old.config)
    sim.step(TEST_PARAMS.reopen_after_blocks)
    sim.probe()  # one answer is enough: "unknown"
    assert len(_reopens(sim, task)) == 1
    sim.run_until(lambda: sim.running["p1"] != [])
    sim.finish("p1", task.task_id)
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID


def test_a_slow_provider_that_answers_keeps_its_task() -> None:
    sim = _sim()
    task, _ = _started(sim)
    for _ in range(3 * CONFIG.probe_misses):
        sim.probe()
        sim.step()
    assert not _reopens(sim, task)
    assert sim.task(task.task_id).provider == sim.address("p0")
    sim.finish("p0", task.task_id)
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID


def test_a_result_committed_first_keeps_the_task_with_its_provider() -> None:
    """The reopen races the provider's CommitResult and loses: the ledger refuses it, nothing is taken away."""
    sim = _sim()
    task, _ = _started(sim)
    sim.step(TEST_PARAMS.reopen_after_blocks)
    sim.finish("p0", task.task_id)  # CommitResult queued for the next block...
    sim.dead.add("p0")  # ...and the provider then falls silent
    for _ in range(CONFIG.probe_misses):
        sim.probe()
    assert len(_reopens(sim, task)) == 1  # sent in the same block as the commit, which lands first
    sim.dead.discard("p0")
    sim.run_until(lambda: task.closed)
    final = sim.task(task.task_id)
    assert final.outcome == TaskOutcome.PAID and final.provider == sim.address("p0") and final.reopens == 0
    assert any("ReopenTask refused" in r.message for r in sim.logs["task:" + task.task_id.hex()].of(Report))
    assert sim.chain.state.providers[sim.address("p0")].missed == 0


def test_failover_off_waits_for_the_deadline() -> None:
    sim = _sim()
    config = ClientConfig(bid_window=4, exec_blocks=12, audit_rate_bps=0, failover=False)
    task, _ = _started(sim, config)
    sim.dead.add("p0")
    for _ in range(2 * config.probe_misses):
        sim.probe()
        sim.step()
    assert not _reopens(sim, task)
    sim.run_until(lambda: task.closed)
    (done,) = sim.logs["task:" + task.task_id.hex()].of(TaskClosed)
    assert done.outcome == TaskOutcome.MISSED


def test_a_client_back_within_the_window_gets_its_task_done() -> None:
    """The provider retries the input fetch with backoff while the job can still finish: no slash, paid."""
    sim = MarketSim(providers=("p0",))
    sim.add_provider("p0")
    sim.offline.add("c0")  # e.g. restarting
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=CONFIG)
    sim.run_until(lambda: sim.task(task.task_id) is not None and sim.task(task.task_id).provider is not None)
    sim.step(8)  # several failed fetches, backing off
    assert sim.providers["p0"].jobs[task.task_id].fetch_failures >= 3
    sim.offline.clear()
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID
    assert sim.chain.state.providers[sim.address("p0")].missed == 0


def test_inputs_that_never_come_end_inputs_unavailable_with_no_slash() -> None:
    sim = MarketSim(providers=("p0",))
    sim.add_provider("p0")
    sim.offline.add("c0")
    c0, p0 = sim.balance("c0"), sim.balance("p0")
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=CONFIG)
    sim.run_until(lambda: task.closed, max_blocks=80)
    final = sim.task(task.task_id)
    assert final.outcome == TaskOutcome.INPUTS_UNAVAILABLE
    assert final.settled_height < final.assign_height + CONFIG.exec_blocks  # before the deadline, not at it
    reservation = final.unit_price * TEST_PARAMS.reservation_fee_bps // BPS
    assert reservation > 0
    assert sim.balance("p0") == p0 + reservation - CONFIG.fee  # collateral back, the reservation fee paid
    assert sim.balance("c0") == c0 - reservation - 2 * CONFIG.fee
    record = sim.chain.state.providers[sim.address("p0")]
    assert (record.unavailable, record.missed, record.failed) == (1, 0, 0)
    (done,) = sim.logs["task:" + task.task_id.hex()].of(TaskClosed)
    assert "could not fetch the inputs" in done.detail


def test_a_reopen_refused_for_a_passing_reason_is_tried_again() -> None:
    """The client's view can be a block behind (the ledger refuses "too early"): not a reason to give up."""
    sim = _sim()
    eager = ClientConfig(bid_window=4, exec_blocks=30, audit_rate_bps=0, reopen_after_blocks=0)
    task, _ = _started(sim, eager)
    sim.dead.add("p0")
    for _ in range(eager.probe_misses):
        sim.probe()
    sim.step()  # the ReopenTask lands in the block after the Assign's: refused, too early
    assert any("ReopenTask refused" in r.message and "trying again" in r.message
               for r in sim.logs["task:" + task.task_id.hex()].of(Report))
    for _ in range(2 * eager.probe_misses):
        sim.probe()
        sim.step()
    assert sim.task(task.task_id).reopens == 1
    sim.run_until(lambda: sim.running["p1"] != [])
    sim.finish("p1", task.task_id)
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID


def test_a_provider_whose_ledger_view_lags_still_bids_on_the_reopened_task() -> None:
    """The reopened task's announce can reach a provider before the block with the ReopenTask does (it was
    syncing, or its block gossip was slow): on its stale view the task is still assigned to the old provider.
    It must wait for its ledger to catch up, not drop the announce: in a chaos run the only provider left did,
    and the task ended with no bids."""
    sim = MarketSim(providers=("p0", "p1", "p2"))
    sim.add_provider("p0", pricing=PricingPolicy(margin_bps=0))
    sim.add_provider("p1", pricing=PricingPolicy(margin_bps=5_000))
    sim.hold_jobs = True
    task, _ = _started(sim)
    laggard = ProviderRole(key=sim.network.key("p2"), chain_id=sim.chain_id, capabilities=CPU,
                           pricing=PricingPolicy(margin_bps=0))
    stale = sim.chain.state
    laggard.handle(BlockFinalized(stale.height, stale))
    sim.dead.add("p0")
    for _ in range(CONFIG.probe_misses - 1):
        sim.probe()
        sim.step()
    sim.probe()
    sim.step()
    assert sim.task(task.task_id).status == TaskStatus.POSTED and sim.task(task.task_id).reopens == 1
    reopened = sim.logs["c0"].of(PublishAnnounce)[-1].signed
    actions = laggard.handle(AnnounceReceived(reopened))
    fetch = [a for a in actions if isinstance(a, FetchSpec)]
    if fetch:
        actions = laggard.handle(SpecFetched(task.task_id, fetch[0].spec_hash, sim.specs[task.task_id]))
    assert not [a for a in actions if isinstance(a, PublishBid)]  # its view still has the task assigned to p0
    assert laggard.jobs[task.task_id].phase is JobPhase.AWAITING_LEDGER
    fresh = sim.chain.state
    bids = [a for a in laggard.handle(BlockFinalized(fresh.height, fresh)) if isinstance(a, PublishBid)]
    assert len(bids) == 1 and bids[0].signed.bid.expiry_height == sim.task(task.task_id).bid_deadline


def test_a_provider_whose_assign_lost_a_race_is_still_chosen_after_a_reopen() -> None:
    """The chaos run's failover task: our Assign to p0 timed out (a validator was down), we chose p1 instead,
    then p0's Assign landed after all and p1's, refused, was charged to p1. When p0 then died and the task was
    reopened, p1's fresh bid was the only one -- and was ignored as "refused" until the task expired."""
    from p2pgpu.market.client import ClientState
    from ledger.transactions import Assign

    config = ClientConfig(bid_window=12, exec_blocks=30, audit_rate_bps=0, assign_timeout_blocks=2,
                          reopen_after_blocks=TEST_PARAMS.reopen_after_blocks)
    sim = _sim()
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=config)
    sim.run_until(lambda: task.state is ClientState.ASSIGNING)
    (held,) = [p for p in sim.pending if isinstance(p[1].body, Assign)]
    assert held[1].body.bid.bid.provider == sim.address("p0")
    sim.pending.remove(held)  # p0's Assign is late: it reaches a block only after we gave up on it
    sim.run_until(lambda: task.chosen is not None and task.chosen.bid.provider == sim.address("p1"))
    (second,) = [p for p in sim.pending if isinstance(p[1].body, Assign)]
    sim.pending = [held, second]  # p0's lands first; p1's is refused before we see the block
    sim.step()
    assert sim.task(task.task_id).provider == sim.address("p0")
    assert any("ASSIGNED" in reason for _, body, reason in sim.tx_rejects if isinstance(body, Assign))
    sim.run_until(lambda: sim.running["p0"] != [])
    sim.dead.add("p0")  # and now p0 dies mid-job
    for _ in range(config.probe_misses):
        sim.probe()
        sim.step()
    sim.step(TEST_PARAMS.reopen_after_blocks)
    for _ in range(config.probe_misses):
        sim.probe()
        sim.step()
    assert sim.task(task.task_id).reopens == 1
    sim.run_until(lambda: sim.running["p1"] != [])  # p1's fresh bid wins the fresh auction
    sim.finish("p1", task.task_id)
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID and sim.task(task.task_id).provider == sim.address("p1")


def test_no_reopen_so_close_to_the_deadline_that_it_would_land_after_it() -> None:
    """A provider that stops (here: restarts without the job) two blocks before the execution deadline: a
    ReopenTask could not land before the ledger settles the task MISSED, so none is sent (it would only cost a fee
    and a filler for its nonce; the client is refunded and the provider slashed either way)."""
    sim = _sim()
    task, _ = _started(sim)
    deadline = sim.task(task.task_id).deadline_height
    sim.running["p0"].clear()
    old = sim.providers["p0"]
    sim.providers["p0"] = ProviderRole(key=old.key, chain_id=old.chain_id, capabilities=CPU, pricing=old.pricing,
                                       config=old.config)
    sim.run_until(lambda: sim.chain.state.height + 2 >= deadline)
    sim.probe()  # "unknown": it holds no job for the task
    assert not _reopens(sim, task)
    sim.run_until(lambda: task.closed)
    (done,) = sim.logs["task:" + task.task_id.hex()].of(TaskClosed)
    assert done.outcome == TaskOutcome.MISSED
