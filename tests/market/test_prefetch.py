"""A client fetches its result as soon as the provider's CommitResult is pending, and hands it out then: the
signed commitment is the same evidence the final one is. A commitment replaced before it was final has the
final one's result fetched in its place."""

from __future__ import annotations

import dataclasses

import numpy as np

from ledger.state import TaskOutcome, TaskStatus
from ledger.transactions import CommitResult, Dispute
from p2pgpu.market import ClientConfig, CommitmentPending, FetchResult, ResultReady, SubmitTx, decode_result
from p2pgpu.market.results import encode_result, result_hash
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


def test_the_result_is_fetched_and_handed_out_while_the_commitment_is_pending() -> None:
    sim = _sim()
    task, inputs, commit = _committing(sim)
    sim.deliver_client(task.task_id, CommitmentPending(task.task_id, commit.sender, commit.result_hash))
    sim.drain()
    assert len(_fetches(sim, task)) == 1 and task.delivered is not None
    (ready,) = sim.logs["task:" + task.task_id.hex()].of(ResultReady)  # before the commitment is final
    np.testing.assert_allclose(decode_result(ready.data)["c"], inputs["a"] @ inputs["b"], rtol=1e-5)
    assert sim.task(task.task_id).status == TaskStatus.ASSIGNED
    sim.step()  # the block with the CommitResult: nothing more to fetch or hand out
    assert len(sim.logs["task:" + task.task_id.hex()].of(ResultReady)) == 1
    assert len(_fetches(sim, task)) == 1
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID


def test_a_result_is_not_handed_out_early_when_a_local_spot_check_must_pass_first() -> None:
    sim = _sim()
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000,
                      config=ClientConfig(bid_window=4, exec_blocks=30, audit_rate_bps=0, spot_check=True))
    sim.run_until(lambda: sim.running["p0"] != [])
    sim.finish("p0", task.task_id)
    (commit,) = [a.body for _, a in sim.pending if isinstance(a.body, CommitResult)]
    sim.deliver_client(task.task_id, CommitmentPending(task.task_id, commit.sender, commit.result_hash))
    sim.drain()
    assert task.delivered is not None and not sim.logs["task:" + task.task_id.hex()].of(ResultReady)
    sim.run_until(lambda: task.closed)
    assert len(sim.logs["task:" + task.task_id.hex()].of(ResultReady)) == 1  # once checked, with its block


def test_a_result_handed_out_on_a_commitment_replaced_before_it_was_final_gives_way_to_the_final_one() -> None:
    sim = _sim()
    task, inputs, commit = _committing(sim)
    sim.deliver_client(task.task_id, CommitmentPending(task.task_id, commit.sender, commit.result_hash))
    sim.drain()
    (early,) = sim.logs["task:" + task.task_id.hex()].of(ResultReady)
    # the provider replaces its pending CommitResult with another result before the block
    final = {"c": (inputs["a"] @ inputs["b"] + 1).astype(np.float32)}
    final_bytes = encode_result(final)
    sim.results[task.task_id] = final_bytes
    sim.pending = [(name, dataclasses.replace(a, body=dataclasses.replace(a.body, result_hash=result_hash(final))))
                   if isinstance(a.body, CommitResult) else (name, a) for name, a in sim.pending]
    sim.step()
    readies = sim.logs["task:" + task.task_id.hex()].of(ResultReady)
    assert [r.data for r in readies] == [early.data, final_bytes]  # the final commitment's result took its place
    assert [f.result_hash for f in _fetches(sim, task)] == [commit.result_hash, result_hash(final)]
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID
    assert not [a for a in sim.logs["task:" + task.task_id.hex()].of(SubmitTx) if isinstance(a.body, Dispute)]


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
