"""Provider decisions: pricing, declines with reasons (published and delivered), capacity."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kernels.spec import make_spec
from ledger.transactions import TaskKind
from p2pgpu.market import (
    ClientConfig,
    Decline,
    DeclineReason,
    JobPhase,
    PricingPolicy,
    ProviderConfig,
    PublishBid,
    PublishDecline,
    Quote,
    Report,
    assess_task,
    estimate_flops,
)

from .sim import CPU, MarketSim, matmul_job

WINDOW = ClientConfig(bid_window=4, exec_blocks=10, audit_rate_bps=0)


def test_flop_estimates_follow_the_kernels_arithmetic() -> None:
    spec, _ = matmul_job(n=8)
    assert estimate_flops(spec) == 2 * 8 * 8 * 8
    x = np.zeros((2, 10, 10, 3), np.float32)
    w = np.zeros((3, 3, 3, 4), np.float32)
    conv = make_spec("conv2d", 1, {}, {"x": x, "w": w})
    assert estimate_flops(conv) == 2 * 2 * 8 * 8 * 4 * 3 * 3 * 3


def test_a_batched_stream_task_is_priced_per_unit_as_a_full_batch_of_rows() -> None:
    from kernels.bymodel import make_model_spec

    one = make_model_spec(b"\x01" * 32, {}, None, kernel="stream_infer")
    batched = make_model_spec(b"\x01" * 32, {"rows": 16}, None, kernel="stream_infer")
    assert estimate_flops(one, 10, weight_elements=100) == 2 * 100 * 10
    assert estimate_flops(batched, 10, weight_elements=100) == 2 * 100 * 10 * 16


def test_price_is_cost_plus_margin_with_a_floor() -> None:
    spec, _ = matmul_job(n=1000)
    caps = replace(CPU, matmul_gflops=100.0)
    quote = assess_task(spec, kind=TaskKind.BATCH, units=1, max_unit_price=10_000, exec_blocks=100,
                        capabilities=caps, policy=PricingPolicy(cost_per_second=100, margin_bps=5_000,
                                                                overhead_seconds=0.0))
    assert isinstance(quote, Quote)
    assert quote.est_seconds == pytest.approx(2e9 / 100e9)
    assert quote.unit_price == 3  # 0.02 s x 100/s x 1.5 = 3
    cheap = assess_task(spec, kind=TaskKind.BATCH, units=1, max_unit_price=10_000, exec_blocks=100,
                        capabilities=caps, policy=PricingPolicy(cost_per_second=1, overhead_seconds=0.0, floor=7))
    assert isinstance(cheap, Quote) and cheap.unit_price == 7


@pytest.mark.parametrize(
    ("changes", "kw", "reason"),
    [
        ({"seconds": 0.5}, {}, DeclineReason.EXCEEDS_TIME_LIMIT),  # 1 s overhead alone exceeds it
        ({}, {"exec_blocks": 1}, DeclineReason.DEADLINE_TOO_SHORT),
        ({"device": "gpu"}, {}, DeclineReason.REQUIRES_GPU),
        ({"memory_bytes": 64 << 30}, {}, DeclineReason.INSUFFICIENT_MEMORY),
        ({}, {"max_unit_price": 1}, DeclineReason.PRICE_BELOW_COST),
    ],
)
def test_assess_declines_with_the_first_reason(changes, kw, reason) -> None:
    spec, _ = matmul_job(**changes)
    args = {"kind": TaskKind.BATCH, "units": 1, "max_unit_price": 1_000, "exec_blocks": 10, **kw}
    result = assess_task(spec, capabilities=CPU, policy=PricingPolicy(), **args)
    assert isinstance(result, Decline) and result.reason == reason, result


def _declined(sim: MarketSim, provider: str, task) -> DeclineReason:
    published = [d for d in sim.logs[provider].of(PublishDecline) if d.notice.task_id == task.task_id]
    assert len(published) == 1
    assert sim.gossip_rejects == []  # the notice passed the bid topic's validator
    reason, detail = task.declines[sim.address(provider)]  # ... and reached the client
    assert published[0].notice.reason == reason and detail
    assert any("declined" in r.message for r in sim.logs[provider].of(Report))
    assert not [b for b in sim.logs[provider].of(PublishBid) if b.signed.bid.task_id == task.task_id]
    return reason


def test_decline_unsupported_kernel() -> None:
    sim = MarketSim(providers=("p0", "p1"))
    sim.add_provider("p0")
    sim.add_provider("p1", config=ProviderConfig(supported_kernels=frozenset({"conv2d"})))
    spec, inputs = matmul_job()
    unknown = replace(spec, kernel="fft")  # a kernel no provider's registry has
    t1 = sim.submit("c0", unknown, inputs, max_unit_price=1_000, config=WINDOW)
    sim.step()
    assert _declined(sim, "p0", t1) == DeclineReason.UNSUPPORTED_KERNEL
    t2 = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=WINDOW)
    sim.step()
    assert t2.declines[sim.address("p1")][0] == DeclineReason.UNSUPPORTED_KERNEL
    assert sim.address("p0") in t2.bids


def test_decline_memory_and_price() -> None:
    sim = MarketSim(providers=("p0",))
    sim.add_provider("p0")
    spec, inputs = matmul_job(memory_bytes=64 << 30)
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=WINDOW)
    sim.step()
    assert _declined(sim, "p0", task) == DeclineReason.INSUFFICIENT_MEMORY

    sim = MarketSim(providers=("p0",))
    sim.add_provider("p0")
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=5, config=WINDOW)
    sim.step()
    assert _declined(sim, "p0", task) == DeclineReason.PRICE_BELOW_COST
    sim.run_until(lambda: task.closed)
    assert "declined" in sim.logs["task:" + task.task_id.hex()].actions[-1].detail


def test_decline_busy_when_bids_and_jobs_fill_capacity() -> None:
    sim = MarketSim(providers=("p0",))
    role = sim.add_provider("p0", config=ProviderConfig(max_concurrent_jobs=1))
    spec, inputs = matmul_job()
    first = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=WINDOW)
    second = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=WINDOW)
    sim.step()
    assert role.phase(first.task_id) is JobPhase.BID
    assert role.active_jobs == 1
    assert _declined(sim, "p0", second) == DeclineReason.BUSY
    sim.run_until(lambda: first.closed and second.closed)
    assert role.active_jobs == 0


def test_provider_skips_announces_the_ledger_contradicts() -> None:
    sim = MarketSim(providers=("p0",))
    role = sim.add_provider("p0", config=ProviderConfig(bid_before_final=False))
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=WINDOW)
    sim.step()
    # a second announce for the same task id but a different price, signed by the real client
    from p2pgpu.market import AnnounceReceived, make_announce, sign_announce

    lie = make_announce(chain_id=sim.chain_id, task_id=bytes(32), client=sim.address("c0"), kind=TaskKind.BATCH,
                        spec=spec, max_unit_price=1_000, units=1, exec_blocks=10, bid_deadline_height=99,
                        data_peer=b"x")
    actions = role.handle(AnnounceReceived(sign_announce(sim.network.key("c0"), lie)))
    assert actions == []  # not on the ledger (yet): nothing is promised
    from p2pgpu.market import BlockFinalized

    # the unknown task id never appears on the ledger; the announce is dropped after its deadline
    assert role.phase(bytes(32)) is JobPhase.AWAITING_LEDGER
    wrong = replace(lie, task_id=task.task_id, max_unit_price=2_000)
    role.jobs.pop(task.task_id)
    out = role.handle(AnnounceReceived(sign_announce(sim.network.key("c0"), wrong)))
    assert any("disagrees with the ledger" in a.message for a in out if isinstance(a, Report))
    assert role.phase(task.task_id) is JobPhase.DROPPED
    role.handle(BlockFinalized(100, sim.chain.state))
    assert role.phase(bytes(32)) is None


def test_a_job_on_more_gpus_than_the_provider_has_is_declined_before_any_work() -> None:
    from tests.kernels.helpers import dense_model

    model, _ = dense_model(3, [(2, "linear")])
    data = {**model, "x": np.zeros((8, 3), np.float32), "y": np.zeros((8, 2), np.float32)}
    spec = make_spec("keras_train", 1, {"steps": 2, "batch_size": 4, "replicas": 2}, data)
    cpu = assess_task(spec, kind=TaskKind.BATCH, units=1, max_unit_price=10_000, exec_blocks=100,
                      capabilities=CPU, policy=PricingPolicy())
    assert isinstance(cpu, Decline) and cpu.reason == DeclineReason.REQUIRES_GPU and "2 GPUs" in cpu.detail
    gpu = replace(CPU, device_kind="gpu")
    one = assess_task(spec, kind=TaskKind.BATCH, units=1, max_unit_price=10_000, exec_blocks=100,
                      capabilities=gpu, policy=PricingPolicy(), max_devices=1)
    assert isinstance(one, Decline) and "1 GPU(s)" in one.detail
    two = assess_task(spec, kind=TaskKind.BATCH, units=1, max_unit_price=10_000, exec_blocks=100,
                      capabilities=gpu, policy=PricingPolicy(), max_devices=2)
    assert isinstance(two, Quote)


def test_a_push_of_inputs_is_expected_only_for_a_task_we_bid_on_for_its_client_until_we_have_them() -> None:
    from p2pgpu.market import ClientState

    sim = MarketSim()
    sim.add_provider("p0")
    spec, inputs = matmul_job()
    task = sim.submit("c0", spec, inputs, max_unit_price=1_000, config=WINDOW)
    provider = sim.providers["p0"]
    names = frozenset(ref.hash for _, ref in spec.inputs)
    sim.run_until(lambda: task.state is ClientState.ASSIGNING)
    assert provider.pushable_inputs(task.task_id, sim.address("c0")) == names
    assert provider.pushable_inputs(task.task_id, sim.address("p0")) is None  # not that task's client
    assert provider.pushable_inputs(b"\x09" * 32, sim.address("c0")) is None  # not a task we know
    sim.run_until(lambda: task.closed)
    assert provider.pushable_inputs(task.task_id, sim.address("c0")) is None  # long past fetching
