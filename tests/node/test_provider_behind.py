"""A provider that is behind does not bid until it has caught up (issue 13).

Its view of the ledger may be stale: a bid made on it can promise a slot it
does not have, for a task whose auction is over, and a provider that wins a
task it cannot start in time is slashed for the no-show. ``MarketRoles`` holds
the announces it hears while ``ConsensusDriver.behind`` is true and releases
them on the first block after it is not.

The market runs in the simulator (``tests/market/sim.py``: a real ledger
producing blocks, a real client task and provider role); the announces pass
through the node's real gate (``MarketRoles._announce_arrived`` and
``on_block``) before they reach the provider, with the driver's ``behind`` flag
set by the test.
"""

from __future__ import annotations

from collections import defaultdict, deque
import time
from types import SimpleNamespace

import trio

from ledger.state import TaskOutcome
from p2pgpu import consensus_driver
from p2pgpu.blocksync import SyncFailed
from p2pgpu.consensus_driver import ConsensusDriver
from p2pgpu.market import AnnounceReceived, ClientConfig, JobPhase, PublishAnnounce, PublishBid, SeenCache
from p2pgpu.market.client import ClientState
from p2pgpu.market.errors import MarketMessageError
from p2pgpu.market.messages import validate_task_message
from p2pgpu.providerservice import PROVIDER
from p2pgpu.roles import MarketRoles

from ..market.sim import MarketSim, matmul_job

WINDOW = ClientConfig(bid_window=8, exec_blocks=10, audit_rate_bps=0)


def gate(provider, driver: SimpleNamespace) -> MarketRoles:
    """The node's market shell reduced to what stands between ``/task`` and the provider role: its real methods,
    the state they touch, a driver whose ``behind`` the test sets."""
    roles = MarketRoles.__new__(MarketRoles)
    roles.node = SimpleNamespace(driver=driver)  # type: ignore[assignment]
    roles.provider_service = SimpleNamespace(role=provider)  # type: ignore[assignment]
    roles.peers = {}
    roles.counters = defaultdict(int)
    roles._held_announces = deque(maxlen=1024)
    roles.seen_task, roles.seen_bid = SeenCache(), SeenCache()
    roles.adverts = SimpleNamespace(on_block=lambda height: None)  # type: ignore[assignment]
    roles._inbox_send, roles._inbox = trio.open_memory_channel(1024)
    return roles


class GatedSim(MarketSim):
    """Announces reach p0 through ``roles`` (the node's gate), not straight from the gossip stand-in."""

    roles: MarketRoles

    def _publish_announce(self, origin, action: PublishAnnounce) -> None:
        try:
            rec = validate_task_message(self.chain_id, self.chain.state.height, action.data, self.seen_task)
        except MarketMessageError as exc:
            self.gossip_rejects.append(exc)
            return
        self.roles._announce_arrived(rec)
        self.pump()

    def step(self, blocks: int = 1) -> None:
        for _ in range(blocks):
            super().step()
            self.roles.on_block(None, self.chain.state)  # the node's commit hook
            self.pump()

    def pump(self) -> None:
        """What the roles' loop does with the provider's share of its inbox (blocks reach p0 from ``step``)."""
        while True:
            try:
                target, event = self.roles._inbox.receive_nowait()
            except trio.WouldBlock:
                break
            if target == PROVIDER:
                assert isinstance(event, AnnounceReceived)
                self.deliver("p0", event)
        self.drain()


def test_a_provider_that_is_behind_holds_announces_and_bids_once_caught_up() -> None:
    sim = GatedSim(providers=("p0",))
    provider = sim.add_provider("p0")
    driver = SimpleNamespace(behind=True)
    sim.roles = gate(provider, driver)
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=WINDOW)
    sim.step(3)  # blocks keep coming (a sync catching up commits them) and the provider stays behind
    assert not sim.logs["p0"].of(PublishBid), "a provider that is behind bid"
    assert provider.phase(task.task_id) is None  # the provider has not even seen the task
    assert len(sim.roles._held_announces) == 1
    assert task.state is ClientState.COLLECTING

    driver.behind = False  # caught up: the next commit releases what was held
    sim.step()
    bids = [b for b in sim.logs["p0"].of(PublishBid) if b.signed.bid.task_id == task.task_id]
    assert len(bids) == 1 and not sim.roles._held_announces
    assert provider.phase(task.task_id) is JobPhase.BID
    sim.run_until(lambda: task.closed)
    ledger_task = sim.task(task.task_id)
    assert ledger_task.provider == sim.address("p0") and ledger_task.outcome == TaskOutcome.PAID
    assert sim.gossip_rejects == []


def test_an_announce_heard_while_current_goes_straight_to_the_provider() -> None:
    sim = GatedSim(providers=("p0",))
    provider = sim.add_provider("p0")
    sim.roles = gate(provider, SimpleNamespace(behind=False))
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=WINDOW)
    sim.step()
    assert [b.signed.bid.task_id for b in sim.logs["p0"].of(PublishBid)] == [task.task_id]
    assert not sim.roles._held_announces


# ------------------------------------------------------------ a restarted node is behind until shown current


def _driver(height: int, peers: set[str]) -> ConsensusDriver:
    """A driver over a stored chain at ``height``, as just (re)started: the parts ``behind`` and sync read."""
    engine = SimpleNamespace(signer=None, catching_up=False, address=None, verifier=None,
                             config=SimpleNamespace(timeout_commit_s=0.3, sync_batch=64))
    chain = SimpleNamespace(height=height)
    network = SimpleNamespace(connected_peers=lambda: set(peers))
    return ConsensusDriver(engine, chain, None, network, None, None)  # type: ignore[arg-type]


def _answers(monkeypatch, by_peer: dict[str, tuple | None]) -> None:
    """Each peer's answer to a sync request: blocks (empty: none after our head), or None for a failure."""
    async def fetch_blocks(network, peer, from_height, *, max_blocks):
        await trio.lowlevel.checkpoint()
        if by_peer[peer] is None:
            raise SyncFailed(f"peer {peer} unreachable")
        return by_peer[peer]

    monkeypatch.setattr(consensus_driver, "fetch_blocks", fetch_blocks)


async def test_a_restarted_node_is_behind_until_a_peer_says_it_has_nothing_newer(monkeypatch) -> None:
    """Restarted far behind, a provider used to bid for ``stall_s`` before anything proved it behind: the
    stall watch had nothing to measure (no commit since start), and no block it hears can be checked."""
    driver = _driver(height=40, peers=set())
    assert driver.behind  # nothing heard since start
    assert await driver._fetch_from_peers(41, None, 64) == ((), None)
    assert driver.behind, "no peer to ask proves nothing"
    driver = _driver(height=40, peers={"down", "up"})
    _answers(monkeypatch, {"down": None, "up": ()})
    assert await driver._fetch_from_peers(40, None, 64) == ((), None)
    assert driver.behind, "an empty answer for a height we already have says nothing of the next one"
    _answers(monkeypatch, {"down": None, "up": None})
    await driver._fetch_from_peers(41, None, 64)
    assert driver.behind, "failures are no answer"
    _answers(monkeypatch, {"down": None, "up": ()})
    await driver._fetch_from_peers(41, None, 64)
    assert not driver.behind  # a peer that answered has nothing after our head
    driver.stats.last_commit_monotonic = time.monotonic() - driver.stall_s - 1
    assert driver.behind  # and the stall rule still applies once it has committed


async def test_a_restarted_node_is_current_after_its_first_commit() -> None:
    driver = _driver(height=40, peers=set())
    driver.chain = SimpleNamespace(  # type: ignore[assignment]
        height=40, check_commit=lambda fb, state, verifier: state, persist_block=lambda fb: None,
        adopt=lambda state: None, snapshot_due=lambda height: False)
    driver.mempool = SimpleNamespace(update=lambda state, txs: None, has_ready=lambda: False)  # type: ignore[assignment]
    block = SimpleNamespace(height=41, transactions=(), header=SimpleNamespace(proposer=b"v"),
                            block_hash=lambda: b"\x01" * 32)
    fb = SimpleNamespace(block=block, certificate=SimpleNamespace(round=0))
    assert driver.behind
    await driver._commit(SimpleNamespace(finalized=fb, state=SimpleNamespace(height=41)))
    assert driver.stats.commits == 1 and not driver.behind
