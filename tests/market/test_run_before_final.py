"""A provider runs a batch job once its client pushes the inputs with its Assign, and holds the result until the
ledger shows the task assigned to it (``ProviderConfig.run_before_final``)."""

from __future__ import annotations

import numpy as np

from ledger.state import TaskOutcome, TaskStatus
from ledger.transactions import CommitResult, TaskKind
from p2pgpu.market import (
    ClientConfig,
    DeliverResult,
    FetchInputs,
    InputsReceived,
    JobDone,
    JobFailed,
    JobPhase,
    PrepareResult,
    ProviderConfig,
    ResultReady,
    RunJob,
    SubmitTx,
    TaskClosed,
)

from .sim import MarketSim, matmul_job

ONE_BID = ClientConfig(bid_window=6, exec_blocks=20, audit_rate_bps=0, enough_bids=1)


def _pushing_sim(providers: tuple[str, ...] = ("p0",)) -> MarketSim:
    sim = MarketSim(providers=providers)
    sim.push_inputs = True
    return sim


def _commits(sim: MarketSim, name: str) -> list[CommitResult]:
    return [a.body for a in sim.logs[name].of(SubmitTx) if isinstance(a.body, CommitResult)]


def test_the_job_runs_on_the_pushed_inputs_and_nothing_leaves_until_the_assignment_is_final() -> None:
    sim = _pushing_sim()
    role = sim.add_provider("p0")
    sim.step()
    spec, inputs = matmul_job(seed=3)
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=ONE_BID)

    # the bid, the client's Assign (with the push) and the early run all happened before any block
    assert role.phase(task.task_id) is JobPhase.EARLY_DONE
    assert len(sim.logs["p0"].of(RunJob)) == 1
    assert sim.logs["p0"].of(DeliverResult) == [] and _commits(sim, "p0") == [], "the result left before the block"
    (prepared,) = sim.logs["p0"].of(PrepareResult)  # sealed and wrapped ahead, granted to nobody
    assert prepared.result_hash == role.jobs[task.task_id].result_hash and prepared.client == sim.address("c0")

    sim.step()  # PostTask and Assign final in one block: deliver and commit at once, without running again
    assert sim.task(task.task_id).status == TaskStatus.ASSIGNED
    assert role.phase(task.task_id) is JobPhase.COMMITTING
    assert len(sim.logs["p0"].of(RunJob)) == 1 and len(sim.logs["p0"].of(DeliverResult)) == 1
    (commit,) = _commits(sim, "p0")
    assert commit.result_hash == role.jobs[task.task_id].result_hash and commit.exec_ms == 5

    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID
    assert role.early_runs == {"started": 1, "used": 1}
    (ready,) = sim.logs["task:" + task.task_id.hex()].of(ResultReady)
    np.testing.assert_allclose(ready.outputs["c"], inputs["a"] @ inputs["b"], rtol=1e-5)
    assert sim.tx_rejects == []


def test_a_task_assigned_to_another_provider_throws_the_early_result_away() -> None:
    sim = _pushing_sim(providers=("p0", "p1"))
    role = sim.add_provider("p0")
    sim.add_provider("p1")
    sim.step()
    spec, inputs = matmul_job(seed=4)
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=ONE_BID)
    winner = task.chosen.bid.provider
    loser = "p1" if winner == sim.address("p0") else "p0"
    # the loser is told of a push it would never get (a client that pushed, then assigned someone else)
    sim.deliver(loser, InputsReceived(task.task_id, sim.address("c0")))
    sim.pushed.add((task.task_id, loser))
    sim.drain()
    lost = sim.providers[loser]
    assert lost.phase(task.task_id) is JobPhase.EARLY_DONE

    sim.step()
    assert lost.phase(task.task_id) is JobPhase.DROPPED
    assert lost.early_runs == {"started": 1, "discarded": 1} and lost.jobs[task.task_id].result_data is None
    assert sim.logs[loser].of(DeliverResult) == [] and _commits(sim, loser) == []
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID
    assert role is sim.providers["p0"]


def test_assigned_while_the_early_run_is_going_it_is_the_jobs_run() -> None:
    sim = _pushing_sim()
    sim.hold_jobs = True
    role = sim.add_provider("p0")
    sim.step()
    task = sim.submit("c0", *matmul_job(seed=5), max_unit_price=1_000, config=ONE_BID)
    assert role.phase(task.task_id) is JobPhase.EARLY_RUNNING and role.running_jobs == 1
    sim.step()
    assert role.phase(task.task_id) is JobPhase.RUNNING and _commits(sim, "p0") == []
    sim.finish("p0", task.task_id)
    assert role.phase(task.task_id) is JobPhase.COMMITTING and len(_commits(sim, "p0")) == 1
    assert len(sim.logs["p0"].of(RunJob)) == 1
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID


def test_a_slot_goes_to_an_assigned_job_before_one_to_run_early() -> None:
    sim = MarketSim(providers=("p0",))
    sim.hold_jobs = True
    role = sim.add_provider("p0", config=ProviderConfig(max_concurrent_jobs=1, max_queued=4))
    sim.step()
    first = sim.submit("c0", *matmul_job(seed=6), max_unit_price=1_000, config=ONE_BID)
    sim.run_until(lambda: role.phase(first.task_id) is JobPhase.RUNNING)
    second = sim.submit("c0", *matmul_job(seed=7), max_unit_price=1_000, config=ONE_BID)
    sim.run_until(lambda: role.phase(second.task_id) is JobPhase.QUEUED)  # assigned, waiting for the slot
    sim.push_inputs = True
    third = sim.submit("c0", *matmul_job(seed=8), max_unit_price=1_000, config=ONE_BID)
    assert role.phase(third.task_id) is JobPhase.EARLY_QUEUED  # pushed, but the only slot is taken
    assert role.early_runs == {}
    sim.finish("p0", first.task_id)
    assert role.phase(second.task_id) is JobPhase.RUNNING and role.phase(third.task_id) is JobPhase.EARLY_QUEUED
    sim.finish("p0", second.task_id)
    assert role.phase(third.task_id) in (JobPhase.EARLY_RUNNING, JobPhase.RUNNING)
    sim.finish("p0", third.task_id)
    sim.run_until(lambda: first.closed and second.closed and third.closed)
    assert all(sim.task(t.task_id).outcome == TaskOutcome.PAID for t in (first, second, third))
    assert role.early_runs["used"] == role.early_runs["started"] <= 1, role.early_runs  # a queued one never ran early


def test_off_the_provider_waits_for_the_final_assignment() -> None:
    sim = _pushing_sim()
    role = sim.add_provider("p0", config=ProviderConfig(run_before_final=False))
    sim.step()
    task = sim.submit("c0", *matmul_job(seed=9), max_unit_price=1_000, config=ONE_BID)
    assert role.phase(task.task_id) is JobPhase.BID and sim.logs["p0"].of(RunJob) == []
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID


def test_an_early_run_that_fails_runs_again_once_assigned() -> None:
    sim = _pushing_sim()
    sim.hold_jobs = True
    role = sim.add_provider("p0")
    sim.step()
    task = sim.submit("c0", *matmul_job(seed=10), max_unit_price=1_000, config=ONE_BID)
    assert role.phase(task.task_id) is JobPhase.EARLY_RUNNING
    sim.running["p0"].clear()
    sim.deliver("p0", JobFailed(task.task_id, "worker crashed"))
    sim.drain()
    assert role.phase(task.task_id) is JobPhase.BID and role.running_jobs == 0
    sim.step()  # assigned: the usual fetch and run
    assert role.phase(task.task_id) is JobPhase.RUNNING
    sim.finish("p0", task.task_id)
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID


def test_pushed_inputs_that_cannot_be_loaded_leave_the_usual_fetch_to_it() -> None:
    sim = _pushing_sim()
    role = sim.add_provider("p0")
    sim.step()
    sim.hold_jobs = True
    spec, inputs = matmul_job(seed=11)
    sim.push_inputs = False  # nothing is kept locally: the early load fails (the client serves nobody yet)
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=ONE_BID)
    sim.deliver("p0", InputsReceived(task.task_id, sim.address("c0")))
    sim.drain()
    assert role.phase(task.task_id) is JobPhase.BID
    assert sum(isinstance(a, FetchInputs) for a in sim.logs["p0"].actions) == 1
    sim.run_until(lambda: role.phase(task.task_id) is JobPhase.RUNNING)
    sim.finish("p0", task.task_id)
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID


def test_a_push_from_someone_else_or_for_a_stream_task_starts_nothing() -> None:
    sim = MarketSim(providers=("p0",), clients=("c0", "c1"))
    role = sim.add_provider("p0")
    sim.step()
    task = sim.submit("c0", *matmul_job(seed=12), max_unit_price=1_000,
                      config=ClientConfig(bid_window=6, exec_blocks=20, audit_rate_bps=0))
    assert role.phase(task.task_id) is JobPhase.BID
    assert role.handle(InputsReceived(task.task_id, sim.address("c1"))) == []
    assert role.handle(InputsReceived(b"\x07" * 32, sim.address("c0"))) == []
    job = role.jobs[task.task_id]
    job.announce = type(job.announce)(**{**{f: getattr(job.announce, f) for f in job.announce.__dataclass_fields__},
                                         "kind": int(TaskKind.STREAM)})
    assert role.handle(InputsReceived(task.task_id, sim.address("c0"))) == []
    assert role.phase(task.task_id) is JobPhase.BID


def test_an_early_result_is_closed_out_with_the_task_when_another_provider_is_paid() -> None:
    """The client's Assign to us failed (another Assign of its nonce won): the held result never leaves."""
    sim = _pushing_sim(providers=("p0", "p1"))
    sim.add_provider("p0")
    sim.add_provider("p1")
    sim.step()
    task = sim.submit("c0", *matmul_job(seed=13), max_unit_price=1_000, config=ONE_BID)
    sim.run_until(lambda: task.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID
    winner = sim.network.by_address(sim.task(task.task_id).provider).name
    other = "p1" if winner == "p0" else "p0"
    assert sim.logs[other].of(DeliverResult) == [] and _commits(sim, other) == []
    assert sim.logs[other].of(JobDone) == [] and sim.logs[other].of(TaskClosed) == []
