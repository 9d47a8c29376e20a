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
from types import SimpleNamespace

import trio

from ledger.state import TaskOutcome
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
