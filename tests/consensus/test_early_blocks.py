"""Early blocks: a proposer with transactions waiting ends its post-commit pause early, without
speeding up the pace of blocks that deadlines count (ConsensusConfig.min_commit_pause_s / pace_window).

Virtual time in the deterministic simulator, so the figures compared here are exact, not wall-clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from devnet.sim import LinkConfig, SimConfig, Simulation
from ledger.blocks import FinalizedBlock
from ledger.codec import decode
from ledger.consensus import ConsensusConfig, TimeoutStep, TxsAvailable
from ledger.devtools import make_dev_network, sign_transaction
from ledger.params import Params
from ledger.transactions import Transfer

PARAMS = Params(epoch_length=64, committee_size=16, jail_period=1000, min_validator_stake=1_000)
PACED = ConsensusConfig(timeout_commit_s=1.0, min_commit_pause_s=0.1, pace_window=4)
REGULAR = replace(PACED, min_commit_pause_s=1.0)  # early blocks off


@pytest.fixture(scope="module")
def net():
    return make_dev_network(validators=("v0", "v1", "v2", "v3"), providers=(), clients=("c0", "c1"),
                            params=PARAMS)


def simulation(net, tmp_path, consensus: ConsensusConfig, name: str) -> Simulation:
    # 100 ms links: consensus takes about a third of a second, as between the processes of a loaded devnet,
    # so the last blocks leave slack to borrow (on faster links blocks are already about timeout_commit apart)
    config = SimConfig(seed=3, consensus=consensus, link=LinkConfig(latency_s=0.1, jitter_s=0.01), fsync=False)
    return Simulation(net, tmp_path / name, config)


def transfer(net, sim: Simulation, nonce: int):
    body = Transfer(sender=net.address("c0"), nonce=nonce, fee=1, to=net.address("c1"), amount=1)
    return sign_transaction(net.key("c0"), sim.genesis_state.chain_id, body)


def inclusion_height(sim: Simulation, tx_hash: bytes, node: str = "v0") -> int | None:
    n = sim.nodes[node]
    for h in range(1, n.height + 1):
        fb = decode(FinalizedBlock, n.store.get_block(h))
        if any(stx.tx_hash() == tx_hash for stx in fb.block.transactions):
            return h
    return None


def latency_of_one_transfer(net, tmp_path, consensus: ConsensusConfig, name: str, after: int = 8) -> float:
    """From submission (mid-pause, on a non-proposer) to the commit of the block holding it, at v0."""
    sim = simulation(net, tmp_path, consensus, name)
    try:
        sim.start()
        sim.run(until_height=after, until=60)
        stx = transfer(net, sim, 0)
        submitted = sim.nodes["v0"].commit_time[after] + 0.3  # well inside the 1 s pause after that block
        sim.at(submitted, lambda: sim.submit("v1", stx))
        sim.run(until_height=after + 4, until=120)
        h = inclusion_height(sim, stx.tx_hash())
        assert h is not None, "the transfer was never included"
        assert sim.safety_violations() == []
        return sim.nodes["v0"].commit_time[h] - submitted
    finally:
        sim.close()


def test_a_waiting_transaction_is_final_sooner_than_the_pause(net, tmp_path) -> None:
    early = latency_of_one_transfer(net, tmp_path, PACED, "paced")
    regular = latency_of_one_transfer(net, tmp_path, REGULAR, "regular")
    # Regular: the rest of the pause (0.7 s) plus consensus (three or four 100 ms hops). Early: the hops only.
    assert regular > 0.9
    assert early < 0.5
    assert early < regular / 2


def test_under_steady_load_blocks_keep_their_pace(net, tmp_path) -> None:
    sim = simulation(net, tmp_path, PACED, "load")
    try:
        sim.start()
        sim.run(until_height=6, until=60)
        start = sim.now
        txs = [transfer(net, sim, i) for i in range(75)]
        # one transfer every 200 ms for 15 s: there is always something to propose (and never more than the
        # mempool's max_future_gap nonces ahead of the chain)
        for i, stx in enumerate(txs):
            sim.at(start + 0.2 * i, lambda stx=stx: sim.submit("v1", stx))
        sim.run(until=start + 20)
        assert sim.safety_violations() == []
        early = sum(n.engine.early_proposals for n in sim.nodes.values() if n.engine is not None)
        assert early > 0, "no proposal ended its pause early"
        times = sim.nodes["v0"].commit_time
        heights = sorted(h for h in times if h > 6)
        window = PACED.pace_window
        # any `window` consecutive blocks span at least window x timeout_commit (less the proposer's
        # head start on v0's clock, a link's latency or two)
        for a, b in zip(heights, heights[window:]):
            assert times[b] - times[a] >= window * PACED.timeout_commit_s - 0.05, (a, b, times[b] - times[a])
        # and with early blocks off the same load gives no more blocks than they allow
        assert len(heights) <= 20 / PACED.timeout_commit_s + window + 1
        assert inclusion_height(sim, txs[-1].tx_hash()) is not None
    finally:
        sim.close()


def test_txs_available_is_ignored_unless_waiting_to_propose(net, tmp_path) -> None:
    """Only the proposer of round 0, in its pause, with executable transactions, ends the pause early,
    and it schedules that once per height."""
    sim = simulation(net, tmp_path, PACED, "idle")
    try:
        sim.start()
        sim.run(until_height=8, until=60)
        for node in sim.nodes.values():
            assert node.engine is not None
            assert node.engine.handle(TxsAvailable(), now_ms=int(sim.now * 1000)) == []  # empty mempools
        stx = transfer(net, sim, 0)
        for node in sim.nodes.values():
            node.mempool.add(stx)
        scheduled = {}
        for name, node in sim.nodes.items():
            first = node.engine.handle(TxsAvailable(), now_ms=int(sim.now * 1000))
            second = node.engine.handle(TxsAvailable(), now_ms=int(sim.now * 1000))
            assert second == []
            scheduled[name] = [a for a in first if getattr(a, "step", None) == TimeoutStep.COMMIT]
        proposer = [n for n, acts in scheduled.items() if acts]
        assert len(proposer) == 1  # run() returned at a commit: the next proposer is in its 1 s pause
    finally:
        sim.close()


def blocks_of_two_transfers(net, tmp_path, consensus: ConsensusConfig, name: str) -> tuple[int, int]:
    """Heights holding two transfers submitted 80 ms apart in the middle of the pause."""
    sim = simulation(net, tmp_path, consensus, name)
    try:
        sim.start()
        sim.run(until_height=8, until=60)
        first, second = transfer(net, sim, 0), transfer(net, sim, 1)
        at = sim.nodes["v0"].commit_time[8] + 0.3
        sim.at(at, lambda: sim.submit("v1", first))
        sim.at(at + 0.08, lambda: sim.submit("v1", second))
        sim.run(until_height=12, until=120)
        a, b = inclusion_height(sim, first.tx_hash()), inclusion_height(sim, second.tx_hash())
        assert a is not None and b is not None
        return a, b
    finally:
        sim.close()


def test_a_burst_of_transactions_shares_a_block_with_tx_batch(net, tmp_path) -> None:
    """A PostTask and the Assign sent once bids are in (~0.1 s later): one block with tx_batch_s, not two."""
    a, b = blocks_of_two_transfers(net, tmp_path, replace(PACED, tx_batch_s=0.15), "batched")
    assert a == b
    a, b = blocks_of_two_transfers(net, tmp_path, PACED, "unbatched")
    assert b == a + 1


def test_early_blocks_work_soon_after_start(net, tmp_path) -> None:
    """Before pace_window commits are known the rule applies to those seen (a devnet serves tasks at once)."""
    early = latency_of_one_transfer(net, tmp_path, PACED, "young", after=3)
    assert early < 0.5
