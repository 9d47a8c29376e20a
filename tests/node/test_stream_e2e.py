"""A streaming task through real nodes: gossip, consensus, data plane, /p2pgpu/stream/1, a warm TF model, claims."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from kernels.spec import make_spec
from ledger.params import BPS, Params
from ledger.state import TaskOutcome, TaskStatus
from ledger.transactions import AuditVerdict, StreamClaim
from p2pgpu.api.types import SubmitRequest
from p2pgpu.config import ProviderConfig
from p2pgpu.metrics_text import render_metrics
from p2pgpu.node import Node
from p2pgpu.streams import ITEMS_INPUT
from tests.kernels.helpers import dense_forward, dense_model

from .market_net import start_market_network
from .test_node_consensus import describe, wait_for

# Windows sized for loaded CI machines: a block every ~0.3-1 s, a gossip hop ~0.2 s, fetches of a few seconds.
PARAMS = Params(epoch_length=64, committee_size=4, challenge_window=15, audit_window=15, verifier_count=1,
                audit_fee=10, min_provider_bond=100)
K = 4
ITEMS = 12
LAYERS = [(16, "relu"), (3, "softmax")]


def claims_of(node: Node, task_id: bytes, first: int, last: int) -> list[int]:
    """Units covered by the StreamClaims for ``task_id`` in finalized blocks ``first..last``, in order."""
    units = []
    for h in range(first, last + 1):
        for stx in node.chain.get_finalized(h).block.transactions:
            body = stx.body
            if isinstance(body, StreamClaim) and body.receipt.receipt.task_id == task_id:
                units.append(body.receipt.receipt.units)
    return units


@pytest.mark.slow
async def test_stream_task_serves_every_item_from_one_model_load_and_settles_paid(tmp_path):
    async with trio.open_nursery() as nursery:
        # K from the provider node's [provider] receipt_every; the client's own interval (8) follows it down.
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS, provider=ProviderConfig(
            max_concurrent_jobs=1, device="cpu", unit_cost=10, receipt_every=K))
        provider, client = nodes["p0"], nodes["c0"]
        everyone = list(nodes.values())
        assert provider.roles_driver.provider.config.receipt_every == K

        model_inputs, weights = dense_model(8, LAYERS, seed=3)
        items = np.random.default_rng(5).standard_normal((ITEMS, 8)).astype(np.float32)
        spec = make_spec("stream_infer", 1, {}, model_inputs, device="cpu", memory_bytes=256 << 20, seconds=30)
        c0, p0 = net.address("c0"), net.address("p0")
        c0_before, p0_before = client.state.get_balance(c0), provider.state.get_balance(p0)
        c0_nonce, p0_nonce = client.state.get_account(c0).nonce, client.state.get_account(p0).nonce
        task_id = await client.client_role.submit(SubmitRequest(
            spec=spec, inputs={**model_inputs, ITEMS_INPUT: items}, max_unit_price=5_000, units=ITEMS,
            bid_window=6, audit_rate_bps=0, kind="stream"))
        record = client.client_role.clients[task_id]
        with trio.move_on_after(400):
            await record.closed.wait()
        assert record.closed.is_set(), f"task stuck at {record.stage} ({record.detail}); nodes: {describe(everyone)}"
        assert record.outcome == "paid", (record.outcome, record.detail)

        # Every output is the model's, in order, and came back signed.
        outputs = client.client_role.result(task_id)["outputs"]
        np.testing.assert_allclose(outputs, dense_forward(items, LAYERS, weights), rtol=1e-4, atol=1e-5)
        assert [s for s, _ in client.client_role.view(task_id).timings][:4] == ["posted", "bids", "assigned",
                                                                                "running"]
        cm = client.client_role.streams.metrics
        assert (cm.sessions_streamed, cm.items_streamed, cm.receipts_sent, cm.client_failures) == (1, ITEMS, 3, 0)

        # One model load served all items; every receipt was taken; nothing was refused.
        stats = provider.roles_driver.streams.stats[task_id]
        assert (stats.items, stats.model_loads, stats.receipts, stats.connections) == (ITEMS, 1, ITEMS // K, 1)
        pm = provider.roles_driver.streams.metrics
        assert not pm.rejected and pm.items_served == ITEMS
        # The same figures on the provider node's /metrics page (what an operator scrapes).
        page = {(x.name, tuple(sorted(x.labels.items()))): x.value
                for f in text_string_to_metric_families(render_metrics(provider.extra_metrics())) for x in f.samples}
        assert page[("p2pgpu_stream_items_total", (("event", "served"), ("role", "provider")))] == ITEMS
        assert page[("p2pgpu_stream_receipts_total", (("event", "received"), ("role", "provider")))] == ITEMS // K
        assert page[("p2pgpu_stream_claims_total", (("result", "submitted"),))] == 3

        # The cap was claimed in K-unit steps, and the last claim settled the task at once.
        task = client.state.tasks[task_id]
        assert (task.status, task.outcome, task.claimed_units) == (TaskStatus.SETTLED, TaskOutcome.PAID, ITEMS)
        assert task.settled_height < task.deadline_height
        claims = claims_of(client, task_id, task.assign_height, task.settled_height)
        assert claims == [4, 8, 12]

        # Balances: the client paid units x price; the provider got it less the protocol's cut per claim.
        await wait_for(lambda: provider.chain.height >= client.chain.height, 120, nodes=everyone)
        price = task.unit_price
        steps = [b - a for a, b in zip([0, *claims], claims)]
        cut = sum(n * price * PARAMS.protocol_fee_bps // BPS for n in steps)
        state = client.state
        fees_c0 = (state.get_account(c0).nonce - c0_nonce) * PARAMS.min_fee
        fees_p0 = (state.get_account(p0).nonce - p0_nonce) * PARAMS.min_fee
        assert fees_p0 == 3 * PARAMS.min_fee
        assert state.get_balance(c0) == c0_before - ITEMS * price - fees_c0
        assert state.get_balance(p0) == p0_before + ITEMS * price - cut - fees_p0
        assert provider.state.get_balance(p0) == state.get_balance(p0)
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_a_disputed_stream_item_is_recomputed_by_a_drawn_verifier_and_the_provider_slashed(tmp_path):
    # p0 signs wrong outputs (fault drill); p1 prices itself out of the auction, so it can only be drawn to verify.
    params = replace(PARAMS, audit_window=40)  # the verifier fetches, loads the model and attests within this
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(
            nursery, tmp_path, params,
            provider=ProviderConfig(max_concurrent_jobs=1, device="cpu", unit_cost=10, receipt_every=K,
                                    fault="wrong_result"),
            verifiers={"p1": ProviderConfig(max_concurrent_jobs=1, device="cpu", unit_cost=10**12)})
        provider, verifier, client = nodes["p0"], nodes["p1"], nodes["c0"]
        everyone = list(nodes.values())
        model_inputs, weights = dense_model(8, LAYERS, seed=3)
        items = np.random.default_rng(6).standard_normal((K, 8)).astype(np.float32)
        spec = make_spec("stream_infer", 1, {}, model_inputs, device="cpu", memory_bytes=256 << 20, seconds=30)
        # More units than items: the task stays ASSIGNED (disputable) after the session.
        task_id = await client.client_role.submit(SubmitRequest(
            spec=spec, inputs={**model_inputs, ITEMS_INPUT: items}, max_unit_price=5_000, units=3 * K,
            bid_window=6, audit_rate_bps=0, kind="stream"))
        record = client.client_role.clients[task_id]
        await wait_for(lambda: record.outputs is not None or record.closed.is_set(), 400, nodes=everyone)
        assert record.outputs is not None, f"stream failed: {record.stage} ({record.detail})"
        assert client.state.tasks[task_id].provider == net.address("p0")

        # The client finds output 1 is not the model's and disputes that one item.
        wrong = record.outputs["outputs"][1]
        assert not np.allclose(wrong, dense_forward(items[1:2], LAYERS, weights)[0], rtol=1e-3)
        await client.client_role.dispute_stream_item(task_id, 1, "output 1 is not the model's")
        with trio.move_on_after(400):
            await record.closed.wait()
        assert record.closed.is_set(), f"task stuck at {record.stage} ({record.detail}); nodes: {describe(everyone)}"
        assert record.outcome == "fraud", (record.outcome, record.detail)

        task = client.state.tasks[task_id]
        assert (task.status, task.outcome) == (TaskStatus.SETTLED, TaskOutcome.FRAUD)
        assert [(a.verifier, a.verdict) for a in task.attestations] == [(net.address("p1"), AuditVerdict.FAIL)]
        assert task.disputed_item is not None and task.disputed_item.index == 1
        assert verifier.roles_driver.counters["verifications"] == 1  # p1 recomputed the item on its own runtime
        assert client.state.providers[net.address("p0")].failed == 1
        assert provider.roles_driver.streams.metrics.items_served == K
        nursery.cancel_scope.cancel()
