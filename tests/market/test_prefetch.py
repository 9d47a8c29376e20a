"""A client fetches its result as soon as the provider's CommitResult is pending, and accepts it once it is final."""

from __future__ import annotations

import numpy as np

from ledger.state import TaskOutcome, TaskStatus
from ledger.transactions import CommitResult, Dispute
from p2pgpu.market import ClientConfig, CommitmentPending, FetchResult, ResultReady, SubmitTx, decode_result
from p2pgpu.market.client import ClientState

from .sim import MarketSim, matmul_job

CONFIG = ClientConfig(bid_window=4, exec_blocks=30, audit_rate_bps=0)


def _committing(sim: MarketSim):
    """A task whose provider just finished: its CommitResult waits for the next block."""
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=CONFIG)
    sim.run_until(lambda: sim.running["p0"] != [])
    sim.finish("p0", task.task_id)
    (commit,) = [a.body for _, a in sim.pending if isinstance(a.body, CommitResult)]
    assert task.state is ClientState.RUNNING and sim.task(task.task_id).status == TaskStatus.ASSIGNED
    return task, inputs, commit


def _sim() -> MarketSim:
    sim = MarketSim(providers=("p0",))
    sim.add_provider("p0")
    sim.hold_jobs = True
    sim.push_results = False  # as on a real node: the client fetches
    return sim


def _fetches(sim: MarketSim, task) -> list[FetchResult]:
    return sim.logs["task:" + task.task_id.hex()].of(FetchResult)


def test_the_result_is_fetched_while_the_commitment_is_pending_and_accepted_with_its_block() -> None:
    sim = _sim()
    task, inputs, commit = _committing(sim)
    sim.deliver_client(task.task_id, CommitmentPending(task.task_id, commit.sender, commit.result_hash))
    sim.drain()
    assert len(_fetches(sim, task)) == 1 and task.delivered is not None
    assert not sim.logs["task:" + task.task_id.hex()].of(ResultReady)  # not before the commitment is final
    sim.step()  # the block with the CommitResult: the result is accepted in it, with no second fetch
    (ready,) = sim.logs["task:" + task.task_id.hex()].of(ResultReady)
    np.testing.assert_allclose(decode_result(ready.data)["c"], inputs["a"] @ inputs["b"], rtol=1e-5)
    assert len(_fetches(sim, task)) == 1
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID


def test_a_pending_commitment_that_is_not_the_final_one_is_fetched_again_and_disputes_nothing() -> None:
    sim = _sim()
    task, _, commit = _committing(sim)
    replaced = bytes(32 * [7])  # the provider's pending CommitResult we saw was replaced by another one
    sim.deliver_client(task.task_id, CommitmentPending(task.task_id, commit.sender, replaced))
    sim.drain()
    sim.step()
    assert [f.result_hash for f in _fetches(sim, task)] == [replaced, commit.result_hash]
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID
    assert not [a for a in sim.logs["task:" + task.task_id.hex()].of(SubmitTx) if isinstance(a.body, Dispute)]


def test_a_commitment_from_anyone_but_the_assigned_provider_is_no_reason_to_fetch() -> None:
    sim = _sim()
    task, _, commit = _committing(sim)
    sim.deliver_client(task.task_id, CommitmentPending(task.task_id, b"\x01" * 20, commit.result_hash))
    sim.drain()
    assert not _fetches(sim, task)
    sim.step()
    assert len(_fetches(sim, task)) == 1  # the usual fetch, once the commitment is final
