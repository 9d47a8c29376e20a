"""A client task rebuilt after a crash (``ClientTask.resume``): the ledger drives it back to where it was.

"Crash" here: the old state machine is dropped with everything it held in
memory (bids, which inputs it served, fetches in flight) and a new one is
built from the task's terms, as the node does from its task journal.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ledger.state import TaskOutcome, TaskStatus
from p2pgpu.market import BlockFinalized, ClientConfig, ClientTask, FetchResult, ResultReady, ServeInputs, SubmitTx
from p2pgpu.market.events import TaskClosed

from .sim import TEST_PARAMS, MarketSim, matmul_job

CONFIG = ClientConfig(bid_window=4, exec_blocks=10, audit_rate_bps=0)


def rebuilt(sim: MarketSim, name: str, task: ClientTask) -> ClientTask:
    """The task as a restarted client builds it from its journal: same terms, nothing of the old memory."""
    return ClientTask(key=sim.network.key(name), chain_id=sim.chain_id, spec=task.spec, post_nonce=task.post_nonce,
                      max_unit_price=task.max_unit_price, data_peer=task.data_peer, kind=task.kind, units=task.units,
                      config=task.config, height=sim.chain.state.height, providers=sim.chain.state.providers)


def crash(sim: MarketSim, task: ClientTask) -> str:
    """The client process dies: its task gets no more events and serves nothing."""
    name, _ = sim.clients.pop(task.task_id)
    sim.allowed.pop(task.task_id, None)
    return name


def restart(sim: MarketSim, name: str, task: ClientTask, **kw) -> tuple[ClientTask, list]:
    new = rebuilt(sim, name, task)
    sim.clients[new.task_id] = (name, new)
    state = sim.chain.state
    actions = new.resume(BlockFinalized(state.height, state), **kw)
    sim.route(name, actions, new)
    sim.drain()
    return new, actions


def test_a_client_down_when_its_provider_is_assigned_serves_the_inputs_after_restart_and_the_provider_is_paid():
    sim = MarketSim()
    sim.add_provider("p0")
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=CONFIG)
    sim.run_until(lambda: task.state.value == "assigning")  # the Assign is sent; nothing served yet
    name = crash(sim, task)
    sim.step(2)  # the Assign lands while the client is down: the provider's input fetches fail
    assert sim.task(task.task_id).status == TaskStatus.ASSIGNED and not sim.allowed.get(task.task_id)
    new, actions = restart(sim, name, task)
    assert [a.peers for a in actions if isinstance(a, ServeInputs)] == [(sim.address("p0"),)]
    sim.run_until(lambda: new.closed)
    assert sim.task(task.task_id).outcome == TaskOutcome.PAID and new.accepted
    assert sim.chain.state.providers[sim.address("p0")].missed == 0


def test_a_task_paid_while_its_client_was_down_has_its_result_fetched_after_restart():
    sim = MarketSim()
    sim.add_provider("p0")
    sim.push_results = False  # the client must fetch it
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=CONFIG)
    sim.run_until(lambda: task.state.value == "running")
    name = crash(sim, task)
    sim.run_until(lambda: sim.task(task.task_id).status == TaskStatus.SETTLED)
    new, _ = restart(sim, name, task)
    sim.run_until(lambda: new.accepted, max_blocks=3)
    ready = [a for a in sim.logs["task:" + task.task_id.hex()].actions if isinstance(a, ResultReady)]
    assert np.allclose(ready[-1].outputs["c"], inputs["a"] @ inputs["b"], atol=1e-4)
    assert new.outcome == TaskOutcome.PAID


def test_a_result_already_in_hand_is_not_fetched_again():
    sim = MarketSim()
    sim.add_provider("p0")
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=CONFIG)
    sim.run_until(lambda: task.accepted)
    name = crash(sim, task)
    new, actions = restart(sim, name, task, delivered=task.delivered)
    sim.run_until(lambda: new.closed)
    log = sim.logs["task:" + task.task_id.hex()].actions
    assert not [a for a in actions if isinstance(a, FetchResult)]
    assert new.accepted and new.outcome == TaskOutcome.PAID and not new.dispute_reason
    assert sum(isinstance(a, ResultReady) for a in log) == 1  # the one before the crash


def test_a_posttask_that_never_reached_the_ledger_is_sent_again_at_its_nonce():
    sim = MarketSim()
    sim.add_provider("p0")
    spec, inputs = matmul_job()
    nonce = sim.reserve_nonce("c0")
    lost = ClientTask(key=sim.network.key("c0"), chain_id=sim.chain_id, spec=spec, post_nonce=nonce,
                      max_unit_price=1_000, data_peer=b"peer-c0", config=CONFIG, height=sim.chain.state.height,
                      providers=sim.chain.state.providers)
    # journaled, then the process died before sending anything
    sim.inputs[lost.task_id] = inputs
    sim.specs[lost.task_id] = lost.spec_bytes
    sim.step()
    new, actions = restart(sim, "c0", lost)
    (post,) = [a for a in actions if isinstance(a, SubmitTx)]
    assert post.body.nonce == nonce and not post.assign_nonce
    sim.run_until(lambda: new.closed)
    assert sim.task(lost.task_id).outcome == TaskOutcome.PAID and new.accepted


def test_a_posttask_whose_nonce_went_elsewhere_closes_as_refused_with_the_reason():
    sim = MarketSim()
    spec, _ = matmul_job()
    task = ClientTask(key=sim.network.key("c0"), chain_id=sim.chain_id, spec=spec, post_nonce=sim.reserve_nonce("c0"),
                      max_unit_price=1_000, data_peer=b"peer-c0", config=CONFIG)
    other = sim.submit("c0", *matmul_job(seed=1), max_unit_price=1_000, config=CONFIG)  # takes the same nonce
    sim.step()
    assert other.task_id == task.task_id  # a task id is (client, nonce): the ledger's task is the other one
    _, actions = restart(sim, "c0", task)
    (closed,) = [a for a in actions if isinstance(a, TaskClosed)]
    assert closed.outcome == TaskOutcome.NONE and "never reached the ledger" in closed.detail
    assert not [a for a in actions if isinstance(a, (SubmitTx, ServeInputs, FetchResult))]


def test_a_task_pruned_while_the_client_was_down_still_has_its_committed_result_fetched():
    sim = MarketSim(params=replace(TEST_PARAMS, task_retention=2))
    sim.add_provider("p0")
    sim.push_results = False
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=CONFIG)
    sim.run_until(lambda: sim.task(task.task_id) is not None and sim.task(task.task_id).result_hash is not None)
    seen = sim.task(task.task_id)  # what the journal recorded last
    name = crash(sim, task)
    sim.run_until(lambda: sim.task(task.task_id) is None)  # settled, then pruned
    new, actions = restart(sim, name, task, last_seen=seen)
    (closed,) = [a for a in actions if isinstance(a, TaskClosed)]
    assert closed.outcome is None and "not known" in closed.detail
    assert [a for a in actions if isinstance(a, FetchResult)]
    sim.run_until(lambda: new.accepted, max_blocks=3)
