"""The market's explicit state machines, tested over every (state, trigger) pair, as h2 tests its own.

``ClientTask`` (``ClientState`` x ``ClientTrigger``), a provider's job
(``JobPhase`` x ``JobTrigger``) and a verifier duty: a pair in the machine's
table moves the real machine to the table's state; every other pair raises
``IllegalTransition`` and leaves the machine where it was. Then the shape of
each table (what is reachable, what is final), checks that no handler
changes state except through the one method and that every trigger is fired
somewhere, and the rare rows only a reopen or a restart reaches, driven on a
real ledger.
"""

from __future__ import annotations

import ast
import enum
import inspect
import itertools
from collections.abc import Iterable
from types import ModuleType

import pytest

from ledger.keys import AccountKey
from ledger.state import TaskOutcome
from ledger.transactions import CommitResult
from p2pgpu.market import BlockFinalized, ClientConfig, PricingPolicy, Report, SubmitTx
from p2pgpu.market import client as client_module
from p2pgpu.market import provider as provider_module
from p2pgpu.market.client import CLIENT_TRANSITIONS, ClientState, ClientTask, ClientTrigger
from p2pgpu.market.provider import DUTY_TRANSITIONS, JOB_TRANSITIONS, JobPhase, JobTrigger, _Duty, _DutyPhase, \
    _DutyTrigger, _Job
from p2pgpu.market.transitions import IllegalTransition, TransitionTable

from .sim import TEST_PARAMS, MarketSim, matmul_job

CHAIN_ID = bytes(32)


def client_task() -> ClientTask:
    spec, _ = matmul_job()
    return ClientTask(key=AccountKey.from_seed(bytes([1]) * 32), chain_id=CHAIN_ID, spec=spec, post_nonce=0,
                      max_unit_price=1_000, data_peer=b"peer")


def job_in(phase: JobPhase) -> _Job:
    announce = client_task()._announce().signed.announce
    return _Job(announce=announce, phase=phase)


# ---------------------------------------------------------------------- every pair on the real machine


@pytest.mark.parametrize("trigger", list(ClientTrigger), ids=lambda t: t.name)
@pytest.mark.parametrize("state", list(ClientState), ids=lambda s: s.name)
def test_client_task_moves_on_exactly_the_pairs_in_its_table(state: ClientState, trigger: ClientTrigger) -> None:
    task = client_task()
    task._state = state  # as h2's test sets its machine's state: every state, whether or not a path leads there
    if CLIENT_TRANSITIONS.allows(state, trigger):
        assert task._move(trigger) is CLIENT_TRANSITIONS.rows[(state, trigger)]
        assert task.state is CLIENT_TRANSITIONS.rows[(state, trigger)]
    else:
        with pytest.raises(IllegalTransition) as caught:
            task._move(trigger)
        assert (caught.value.machine, caught.value.state, caught.value.trigger) == ("ClientTask", state, trigger)
        assert task.state is state


@pytest.mark.parametrize("trigger", list(JobTrigger), ids=lambda t: t.name)
@pytest.mark.parametrize("phase", list(JobPhase), ids=lambda p: p.name)
def test_provider_job_moves_on_exactly_the_pairs_in_its_table(phase: JobPhase, trigger: JobTrigger) -> None:
    job = job_in(phase)
    if JOB_TRANSITIONS.allows(phase, trigger):
        assert job.move(trigger) is JOB_TRANSITIONS.rows[(phase, trigger)]
        assert job.phase is JOB_TRANSITIONS.rows[(phase, trigger)]
    else:
        with pytest.raises(IllegalTransition) as caught:
            job.move(trigger)
        assert (caught.value.state, caught.value.trigger) == (phase, trigger)
        assert job.phase is phase


@pytest.mark.parametrize("trigger", list(_DutyTrigger), ids=lambda t: t.name)
@pytest.mark.parametrize("phase", list(_DutyPhase), ids=lambda p: p.name)
def test_verifier_duty_moves_on_exactly_the_pairs_in_its_table(phase: _DutyPhase, trigger: _DutyTrigger) -> None:
    duty = _Duty(task=None, phase=phase)  # type: ignore[arg-type]  # move reads the phase alone
    if DUTY_TRANSITIONS.allows(phase, trigger):
        assert duty.move(trigger) is DUTY_TRANSITIONS.rows[(phase, trigger)]
        assert duty.phase is DUTY_TRANSITIONS.rows[(phase, trigger)]
    else:
        with pytest.raises(IllegalTransition):
            duty.move(trigger)
        assert duty.phase is phase


def test_an_illegal_transition_names_the_machine_the_state_and_the_trigger() -> None:
    task = client_task()
    with pytest.raises(IllegalTransition, match=r"ClientTask: no transition on LEDGER_COMMITTED from NEW"):
        task._move(ClientTrigger.LEDGER_COMMITTED)


def test_client_task_state_is_read_only() -> None:
    task = client_task()
    with pytest.raises(AttributeError):
        task.state = ClientState.CLOSED  # type: ignore[misc]


# ---------------------------------------------------------------------- the tables' shape


def reachable(table: TransitionTable, start: enum.Enum) -> set[enum.Enum]:
    seen = {start}
    frontier = [start]
    while frontier:
        for _, target in table.exits(frontier.pop()):
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    return seen


def triggers_out_of(table: TransitionTable, state: enum.Enum) -> set[enum.Enum]:
    return {trigger for trigger, _ in table.exits(state)}


def test_every_client_state_is_reachable_from_new_and_every_one_can_close() -> None:
    assert reachable(CLIENT_TRANSITIONS, ClientState.NEW) == set(ClientState)
    for state in ClientState:
        assert ClientState.CLOSED in reachable(CLIENT_TRANSITIONS, state), state


def test_a_client_task_starts_only_by_start_resume_or_restore_and_a_closed_one_never_moves() -> None:
    assert triggers_out_of(CLIENT_TRANSITIONS, ClientState.NEW) == {
        ClientTrigger.START, ClientTrigger.RESUME, ClientTrigger.RESTORE_CLOSED}
    assert triggers_out_of(CLIENT_TRANSITIONS, ClientState.CLOSED) == set()
    # the first block that holds the task moves POSTING to COLLECTING before any status is read
    assert CLIENT_TRANSITIONS.sources(ClientTrigger.LEDGER_SETTLED) == set(ClientState) - {
        ClientState.NEW, ClientState.POSTING, ClientState.CLOSED}


def test_every_job_phase_is_reachable_from_an_announce_and_every_one_can_end() -> None:
    assert reachable(JOB_TRANSITIONS, JobPhase.AWAITING_LEDGER) == set(JobPhase)
    for phase in JobPhase:
        assert reachable(JOB_TRANSITIONS, phase) & {JobPhase.DONE, JobPhase.DROPPED}, phase


def test_a_verifier_duty_ends_attested_or_abstained() -> None:
    assert reachable(DUTY_TRANSITIONS, _DutyPhase.AWAITING_SPEC) == set(_DutyPhase)
    assert triggers_out_of(DUTY_TRANSITIONS, _DutyPhase.ATTESTED) == set()
    assert triggers_out_of(DUTY_TRANSITIONS, _DutyPhase.ABSTAINED) == set()


def test_a_finished_job_moves_only_when_a_bid_it_withdrew_still_wins() -> None:
    assert triggers_out_of(JOB_TRANSITIONS, JobPhase.DONE) == set()
    assert triggers_out_of(JOB_TRANSITIONS, JobPhase.DROPPED) == {JobTrigger.ASSIGNED, JobTrigger.ASSIGNED_TOO_LATE}
    assert triggers_out_of(JOB_TRANSITIONS, JobPhase.DECLINED) == {JobTrigger.CAPACITY_FREED}


@pytest.mark.parametrize("table, triggers", [(CLIENT_TRANSITIONS, ClientTrigger), (JOB_TRANSITIONS, JobTrigger),
                                             (DUTY_TRANSITIONS, _DutyTrigger)], ids=["client", "job", "duty"])
def test_every_trigger_has_a_row(table: TransitionTable, triggers: Iterable[enum.Enum]) -> None:
    assert [t for t in triggers if not table.sources(t)] == []


# ---------------------------------------------------------------------- one way to change state


def state_writes(module: ModuleType, attributes: set[str]) -> list[tuple[str, int, str]]:
    """(function, line, attribute) of every assignment to ``<x>.<attribute>`` in ``module``'s source."""
    tree = ast.parse(inspect.getsource(module))
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            else:
                continue
            for target in itertools.chain.from_iterable(
                    t.elts if isinstance(t, ast.Tuple) else [t] for t in targets):
                if isinstance(target, ast.Attribute) and target.attr in attributes:
                    found.append((function.name, node.lineno, target.attr))
    return found


def test_client_task_state_changes_only_in_move() -> None:
    writes = state_writes(client_module, {"state", "_state"})
    assert {name for name, _, _ in writes} == {"__init__", "_move"}, writes


def test_a_job_or_duty_phase_changes_only_in_move() -> None:
    writes = state_writes(provider_module, {"phase"})
    assert {name for name, _, _ in writes} == {"move"}, writes


def triggers_fired(module: ModuleType, enum_name: str) -> set[str]:
    """Names of ``<enum_name>.X`` referenced inside the functions of ``module`` (not in its tables)."""
    tree = ast.parse(inspect.getsource(module))
    return {node.attr for function in ast.walk(tree) if isinstance(function, ast.FunctionDef)
            for node in ast.walk(function)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == enum_name}


@pytest.mark.parametrize("module, enum_type", [(client_module, ClientTrigger), (provider_module, JobTrigger),
                                               (provider_module, _DutyTrigger)], ids=["client", "job", "duty"])
def test_every_trigger_is_fired_by_some_handler(module: ModuleType, enum_type: type[enum.Enum]) -> None:
    assert {t.name for t in enum_type} - triggers_fired(module, enum_type.__name__) == set()


# ---------------------------------------------------------------------- rare rows, reached on a real ledger

FAILOVER = ClientConfig(bid_window=4, exec_blocks=30, audit_rate_bps=0,
                        reopen_after_blocks=TEST_PARAMS.reopen_after_blocks)


def failover_sim() -> tuple[MarketSim, ClientTask]:
    """p0 (the cheaper) runs the task and holds it; p1 stands by."""
    sim = MarketSim(providers=("p0", "p1"))
    sim.add_provider("p0", pricing=PricingPolicy(margin_bps=0))
    sim.add_provider("p1", pricing=PricingPolicy(margin_bps=5_000))
    sim.hold_jobs = True
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=FAILOVER)
    sim.run_until(lambda: sim.running["p0"] != [])
    return sim, task


def reopen_sent(sim: MarketSim, task: ClientTask) -> None:
    """p0 stops answering until the client sends ``ReopenTask``."""
    sim.dead.add("p0")
    for _ in range(FAILOVER.probe_misses):
        sim.probe()
        sim.step()
    assert task.reopening or sim.task(task.task_id).reopens == 1


def test_a_provider_back_after_its_task_was_reopened_drops_the_job_taken_back() -> None:
    """(RUNNING, TAKEN_BACK): the job's result, finished late, is never committed."""
    sim, task = failover_sim()
    reopen_sent(sim, task)
    sim.run_until(lambda: sim.task(task.task_id).reopens == 1)
    assert sim.providers["p0"].phase(task.task_id) is JobPhase.RUNNING  # it saw none of this
    sim.dead.discard("p0")  # it was only paused
    sim.step()
    assert any("taken back" in r.message for r in sim.logs["p0"].of(Report))
    assert sim.providers["p0"].phase(task.task_id) in (JobPhase.DROPPED, None)  # None: dropped and forgotten
    sim.finish("p0", task.task_id)
    sim.run_until(lambda: sim.running["p1"] != [])
    sim.finish("p1", task.task_id)
    sim.run_until(lambda: task.closed)
    final = sim.task(task.task_id)
    assert final.outcome == TaskOutcome.PAID and final.provider == sim.address("p1")
    assert not [a for a in sim.logs["p0"].of(SubmitTx) if isinstance(a.body, CommitResult)]


def test_a_client_restarted_after_its_reopen_landed_runs_the_fresh_auction() -> None:
    """(COLLECTING, REOPENED): the first block a resumed task sees shows it reopened."""
    sim, task = failover_sim()
    reopen_sent(sim, task)
    name, _ = sim.clients.pop(task.task_id)  # the client dies with its ReopenTask on the way
    sim.run_until(lambda: sim.task(task.task_id).reopens == 1)
    new = ClientTask(key=sim.network.key(name), chain_id=sim.chain_id, spec=task.spec, post_nonce=task.post_nonce,
                     max_unit_price=task.max_unit_price, data_peer=task.data_peer, config=task.config,
                     height=sim.chain.state.height, providers=sim.chain.state.providers)
    sim.clients[new.task_id] = (name, new)
    state = sim.chain.state
    sim.route(name, new.resume(BlockFinalized(state.height, state)), new)
    sim.drain()
    assert new.reopens_seen == 1 and new.state in (ClientState.COLLECTING, ClientState.ASSIGNING)
    sim.run_until(lambda: sim.running["p1"] != [])
    sim.finish("p1", task.task_id)
    sim.run_until(lambda: new.closed)
    final = sim.task(task.task_id)
    assert final.outcome == TaskOutcome.PAID and final.provider == sim.address("p1") and new.accepted
