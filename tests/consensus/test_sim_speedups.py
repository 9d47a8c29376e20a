"""The simulator's speed-ups change no outcome; the shared computations give each engine what it would compute."""

from __future__ import annotations

from dataclasses import replace

import pytest

from devnet.shared_exec import SharedComputations
from devnet.sim import Behaviour, LinkConfig, SimConfig, Simulation
from ledger import exceptions as ex
from ledger.committee import compute_proposer
from ledger.consensus import BlockComputations
from ledger.devtools import make_dev_network, sign_transaction
from ledger.genesis import initial_state
from ledger.params import Params
from ledger.transactions import Transfer
from ledger.transition import apply_block, build_block, committee_for_height

PARAMS = Params(epoch_length=4, committee_size=16, jail_period=1000, min_validator_stake=1_000)


def outcome(sim: Simulation) -> list[object]:
    """Everything a run shows: per node what it finalized and when, what it signed, rejected, and where it is."""
    rows: list[object] = []
    for node in sim.nodes.values():
        rows.append((
            node.name, node.committed, node.commit_time, node.rejected, node.sent_votes, node.alive, node.height,
            node.engine.round if node.engine is not None else None,
        ))
    rows.append((sim.delivered, sim.dropped, sim.now, sim.min_honest_height()))
    return rows


def run(tmp_path, name: str, *, fast: bool, seed: int, link: LinkConfig, scenario) -> Simulation:
    net = make_dev_network(validators=[f"v{i}" for i in range(8)], providers=(), clients=(), params=PARAMS)
    config = SimConfig(seed=seed, link=link, mesh_degree=4, fsync=False, shared_execution=fast, elide_duplicates=fast)
    sim = Simulation(net, tmp_path / name, config, behaviours=scenario.get("behaviours"))
    try:
        for start, end, groups in scenario.get("partitions", []):
            sim.partition(groups, start=start, end=end)
        for who, crash, restart in scenario.get("restarts", []):
            sim.crash_at(who, crash)
            sim.restart_at(who, restart)
        sim.start()
        sim.run(until=scenario["until"])
        sim.run(until_height=sim.max_height() + 2, until=scenario["until"] + 30)
    finally:
        sim.close()
    return sim


# Restarts 4-6 ms after a crash, while gossip copies (10-12 ms links) set aside for the node are in flight.
QUICK_RESTARTS = {"restarts": [("v1", 0.2011, 0.2062), ("v5", 0.4507, 0.4551), ("v1", 0.731, 0.736)], "until": 1.0}
FAULTY = {
    "restarts": [("v2", 0.3, 0.9), ("v6", 0.62, 0.625)],
    "partitions": [(0.4, 0.8, [[f"v{i}" for i in range(4)], [f"v{i}" for i in range(4, 8)]])],
    "behaviours": {"v7": Behaviour.EQUIVOCATE},
    "until": 1.5,
}


@pytest.mark.parametrize(
    ("scenario", "link", "seed"),
    [
        (QUICK_RESTARTS, LinkConfig(latency_s=0.010, jitter_s=0.002), 3),
        (QUICK_RESTARTS, LinkConfig(latency_s=0.010, jitter_s=0.0), 4),  # equal arrival times: order by sequence
        (FAULTY, LinkConfig(latency_s=0.010, jitter_s=0.005, loss=0.05, duplicate=0.1), 5),
    ],
    ids=["restarts-in-flight", "restarts-no-jitter", "loss-duplication-partition-equivocator"],
)
def test_speedups_give_the_same_run_event_for_event(tmp_path, scenario, link, seed: int) -> None:
    fast = run(tmp_path, "fast", fast=True, seed=seed, link=link, scenario=scenario)
    slow = run(tmp_path, "slow", fast=False, seed=seed, link=link, scenario=scenario)
    assert outcome(fast) == outcome(slow)
    assert fast.min_honest_height() >= 3
    assert fast.elided > 0 and slow.elided == 0
    if scenario is QUICK_RESTARTS:
        assert fast.restored > 0, "the scenario must put set-aside copies back, or it tests nothing"
    assert fast.safety_violations() == [] and fast.double_signers() == []


@pytest.fixture(scope="module")
def chain():
    net = make_dev_network(validators=[f"v{i}" for i in range(4)], providers=(), clients=("c0",), params=PARAMS)
    state = initial_state(net.genesis)
    proposer = compute_proposer(committee_for_height(state, 1), 1, 0)
    block, _post, _ = build_block(state, [], proposer=proposer, round_=0)
    return net, state, block


def test_one_execution_serves_every_engine_with_the_same_state(chain) -> None:
    _net, state, block = chain
    shared = SharedComputations()
    first = shared.execute(state, block)
    assert shared.execute(state, block) is first
    assert shared.execute(state.copy(), block) is first  # equal, not identical (a restarted node's replay)
    assert (shared.executions, shared.execution_hits) == (1, 2)
    assert first.state_root() == apply_block(state, block, check_last_commit=False).state_root()


def test_a_different_state_or_block_under_the_same_key_is_executed_afresh(chain) -> None:
    net, state, block = chain
    shared = SharedComputations()
    shared.execute(state, block)
    richer = state.copy()
    c0 = net.address("c0")
    richer.accounts[c0] = replace(richer.accounts[c0], balance=richer.accounts[c0].balance + 1)
    with pytest.raises(ex.InvalidBlock, match="state root"):
        shared.execute(richer, block)  # same height and head hash, other state: the root no longer matches
    assert shared.executions == 2
    # the honest header with other transactions: same block hash, and not the same block
    tx = sign_transaction(net.key("c0"), state.chain_id, Transfer(sender=c0, nonce=0, fee=1, to=c0, amount=1))
    shared.execute(state, block)
    with pytest.raises(ex.InvalidBlock, match="tx_root"):
        shared.execute(state, replace(block, transactions=(tx,)))
    assert (shared.executions, shared.execution_hits) == (4, 0)
    equal = replace(block, transactions=tuple(block.transactions))  # an equal block object (decoded anew) hits
    assert shared.execute(state, equal).state_root() == shared.execute(state, block).state_root()
    assert shared.executions == 5 and shared.execution_hits == 1


def test_an_invalid_block_fails_the_same_way_for_every_engine(chain) -> None:
    _net, state, block = chain
    bad = replace(block, header=replace(block.header, state_root=b"\x07" * 32))
    shared = SharedComputations()
    messages = []
    for _ in range(3):
        with pytest.raises(ex.InvalidBlock) as info:
            shared.execute(state, bad)
        messages.append(str(info.value))
    assert shared.executions == 1 and len(set(messages)) == 1 and "state root" in messages[0]


def test_hashes_and_proposers_match_the_ledger_functions(chain) -> None:
    _net, state, block = chain
    shared, plain = SharedComputations(), BlockComputations()
    committee = committee_for_height(state, 1)
    assert shared.block_hash(block) == shared.block_hash(block) == plain.block_hash(block) == block.block_hash()
    for round_ in range(5):
        assert shared.proposer(committee, 1, round_) == compute_proposer(committee, 1, round_)
