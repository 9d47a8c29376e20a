"""Bids say warm or cold; the client prefers a warm provider and says so in the task's timeline."""

from __future__ import annotations

from dataclasses import dataclass

from ledger.state import TaskOutcome
from p2pgpu.market import BidMessage, ClientConfig, PricingPolicy, Report, decode_market_message, PublishBid
from p2pgpu.market.warmset import StartupEstimate

from .sim import MarketSim, matmul_job

CONFIG = ClientConfig(bid_window=4, exec_blocks=20, audit_rate_bps=0)


@dataclass
class FixedStart:
    """A model cache that answers the same for every task (the seam the real cache fills)."""

    estimate: StartupEstimate

    def startup(self, task_id: bytes, spec_hash: bytes) -> StartupEstimate | None:
        return self.estimate


def test_a_warm_bid_wins_over_a_cheaper_cold_one_and_the_timeline_says_why() -> None:
    sim = MarketSim(providers=("p0", "p1"))
    sim.add_provider("p0", warm=FixedStart(StartupEstimate(False, 8.0)))  # cheaper, but cold
    sim.add_provider("p1", pricing=PricingPolicy(margin_bps=4_000), warm=FixedStart(StartupEstimate(True, 0.0)))
    sim.step()
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=CONFIG)
    sim.run_until(lambda: task.closed)
    bids = {a.signed.bid.provider: a for a in sim.logs["p0"].of(PublishBid) + sim.logs["p1"].of(PublishBid)}
    starts = {p: decode_market_message(b.data).start for p, b in bids.items()}
    cold, warm = starts[sim.address("p0")], starts[sim.address("p1")]
    assert isinstance(decode_market_message(bids[sim.address("p0")].data), BidMessage)
    assert cold is not None and not cold.start.warm and cold.start.startup_seconds == 8.0
    assert warm is not None and warm.start.warm
    assert bids[sim.address("p0")].signed.bid.unit_price < bids[sim.address("p1")].signed.bid.unit_price
    assert task.chosen is not None and task.chosen.bid.provider == sim.address("p1")
    chose = [r.message for r in sim.logs["c0"].of(Report) if r.message.startswith("chose")]
    assert chose and chose[0].endswith(" of 2 eligible bid(s), over 1 cheaper cold bid(s) (a cold start weighs 0.3 "
                                       "in the score): warm")
    assert sim.chain.state.tasks[task.task_id].outcome == TaskOutcome.PAID


def test_a_cold_bid_counts_its_start_up_in_the_eta_it_signs() -> None:
    sim = MarketSim(providers=("p0",))
    sim.add_provider("p0", warm=FixedStart(StartupEstimate(False, 4.0)))
    sim.step()
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=CONFIG)
    sim.run_until(lambda: task.chosen is not None)
    (bid,) = sim.logs["p0"].of(PublishBid)
    assert bid.signed.bid.est_seconds >= 4


def test_without_a_cache_bids_say_nothing_and_the_choice_says_so() -> None:
    sim = MarketSim(providers=("p0",))
    sim.add_provider("p0")
    sim.step()
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=CONFIG)
    sim.run_until(lambda: task.chosen is not None)
    (bid,) = sim.logs["p0"].of(PublishBid)
    assert decode_market_message(bid.data).start is None
    assert any(r.message.endswith(": start not said") for r in sim.logs["c0"].of(Report))
