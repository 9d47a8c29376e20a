"""A batch task through real nodes: gossip, ledger consensus, data plane, TensorFlow kernel, settlement."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from kernels.spec import make_spec
from ledger.params import Params
from ledger.state import TaskOutcome
from p2pgpu.api.types import SubmitRequest

from .market_net import start_market_network
from .test_node_consensus import describe, wait_for

# Windows sized for loaded CI machines: a block every ~0.3-1 s, a gossip hop ~0.2 s, fetches of a few seconds.
PARAMS = Params(epoch_length=64, committee_size=4, challenge_window=15, audit_window=15, verifier_count=1,
                audit_fee=10, min_provider_bond=100)


@pytest.mark.slow
async def test_batch_matmul_task_settles_with_right_balances(tmp_path):
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS)
        provider, client = nodes["p0"], nodes["c0"]
        everyone = list(nodes.values())
        rng = np.random.default_rng(7)
        a = rng.standard_normal((64, 64)).astype(np.float32)
        b = rng.standard_normal((64, 64)).astype(np.float32)
        spec = make_spec("matmul", 1, {}, {"a": a, "b": b}, device="cpu", memory_bytes=256 << 20, seconds=30)
        c0_before = client.state.get_balance(net.address("c0"))
        p0_before = provider.state.get_balance(net.address("p0"))
        task_id = await client.client_role.submit(
            SubmitRequest(spec=spec, inputs={"a": a, "b": b}, max_unit_price=5_000, bid_window=6, audit_rate_bps=0))
        record = client.client_role.clients[task_id]
        with trio.move_on_after(400):
            await record.closed.wait()
        assert record.closed.is_set(), f"task stuck at {record.stage} ({record.detail}); nodes: {describe(everyone)}"
        assert record.outcome == "paid", (record.outcome, record.detail)
        outputs = client.client_role.result(task_id)
        np.testing.assert_allclose(outputs["c"], a @ b, rtol=1e-4, atol=1e-4)
        view = client.client_role.view(task_id)
        assert [s for s, _ in view.timings][:3] == ["posted", "bids", "assigned"]
        # the bid and the CommitResult hint went over the provider's bid link to the client's node, not by
        # gossip; the provider follows neither /bid nor /tx, the client not /tx (p2pgpu.bidlink, Node.follows_txs)
        links = provider.roles_driver.bid_links.counters
        assert links["sent"] >= 2 and links["gossiped"] == 0, links
        assert client.client_role.counters["bid_link_accepted"] >= 1
        assert client.client_role.counters["bid_link_commitments"] == 1  # the CommitResult hint, fetched early
        assert not provider.follows_bids and not provider.follows_txs and client.follows_bids
        assert not client.follows_txs and all(n.follows_txs for n in everyone if "validator" in n.roles)
        # every node agrees on the settlement
        await wait_for(lambda: all(n.chain.height >= client.chain.height for n in nodes.values()), 120, nodes=everyone)
        h = client.chain.height
        tasks = {n.chain.get_finalized(h).block.header.state_root for n in nodes.values()
                 if n.chain.height == h}
        assert len(tasks) == 1
        task = client.state.tasks[task_id]
        assert task.outcome == TaskOutcome.PAID
        price = task.unit_price
        cut = price * PARAMS.protocol_fee_bps // 10_000
        fees_c0 = client.state.get_account(net.address("c0")).nonce * PARAMS.min_fee
        assert client.state.get_balance(net.address("c0")) == c0_before - price - fees_c0
        fees_p0 = (client.state.get_account(net.address("p0")).nonce) * PARAMS.min_fee
        assert client.state.get_balance(net.address("p0")) == p0_before + price - cut - fees_p0
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_a_client_that_does_not_speak_bid_links_still_gets_its_bids_by_gossip(tmp_path):
    """An older client (no /p2pgpu/bidlink/1 handler): the provider's link cannot open, so its bid goes by /bid
    gossip, which clients still follow, and the task is paid as before."""
    from libp2p.custom_types import TProtocol

    from p2pgpu.bidlink import BID_LINK_PROTOCOL

    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS)
        provider, client = nodes["p0"], nodes["c0"]
        client.network._host.remove_stream_handler(TProtocol(BID_LINK_PROTOCOL))
        a = np.arange(16, dtype=np.float32).reshape(4, 4)
        spec = make_spec("matmul", 1, {}, {"a": a, "b": a}, device="cpu", memory_bytes=64 << 20, seconds=30)
        task_id = await client.client_role.submit(
            SubmitRequest(spec=spec, inputs={"a": a, "b": a}, max_unit_price=5_000, bid_window=6, audit_rate_bps=0))
        record = client.client_role.clients[task_id]
        with trio.move_on_after(400):
            await record.closed.wait()
        assert record.outcome == "paid", (record.outcome, record.detail, describe(list(nodes.values())))
        np.testing.assert_allclose(client.client_role.result(task_id)["c"], a @ a)
        links = provider.roles_driver.bid_links.counters
        assert links["failed"] >= 1 and links["gossiped"] >= 1 and links["sent"] == 0, links
        assert client.client_role.counters["bid_link_accepted"] == 0
        assert client.network.metrics.delivered[client.topics.bid] >= 1  # the bid came by gossip
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_task_data_travels_on_the_bid_link_inputs_with_the_assign_and_the_result_before_its_hint(tmp_path):
    """Client and provider trade X25519 keys on the bid link (HELLO): the second task's inputs go to the
    provider with the Assign (the first's may be fetched: the client can choose before the provider's HELLO is
    in), and each result comes to the client before its commitment hint, so the provider opens no data stream
    for the second task's inputs and the client none for any result (p2pgpu.bidlink INPUTS, RESULT). The pushed
    inputs let the provider run the job before its assignment is final (ProviderConfig.run_before_final)."""
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS)
        provider, client = nodes["p0"], nodes["c0"]
        rng = np.random.default_rng(11)
        for round_ in range(2):
            a = rng.standard_normal((32, 32)).astype(np.float32)
            b = rng.standard_normal((32, 32)).astype(np.float32)
            spec = make_spec("matmul", 1, {}, {"a": a, "b": b}, device="cpu", memory_bytes=64 << 20, seconds=30)
            fetched_before = provider.roles_driver.dataplane.metrics.fetched
            task_id = await client.client_role.submit(
                SubmitRequest(spec=spec, inputs={"a": a, "b": b}, max_unit_price=5_000, bid_window=6,
                              audit_rate_bps=0))
            record = client.client_role.clients[task_id]
            with trio.move_on_after(400):
                await record.closed.wait()
            assert record.outcome == "paid", (record.outcome, record.detail, describe(list(nodes.values())))
            np.testing.assert_allclose(client.client_role.result(task_id)["c"], a @ b, rtol=1e-4, atol=1e-4)
            stages = [s for s, _ in client.client_role.view(task_id).timings]
            assert "running" in stages, stages
        fetched = provider.roles_driver.dataplane.metrics.fetched - fetched_before
        counters, provider_counters = client.client_role.counters, provider.roles_driver.counters
        assert counters["inputs_push_sent"] >= 1 and provider_counters["inputs_push_accepted"] >= 1, dict(counters)
        assert fetched == 0, f"the provider fetched {fetched} inputs of the second task"
        # the pushed inputs let the provider run the second job while its Assign was on the way into a block
        assert provider.roles_driver.provider.early_runs["used"] >= 1, provider.roles_driver.provider.early_runs
        assert provider_counters["result_push_sent"] == 2 and counters["result_push_accepted"] == 2
        assert provider.roles_driver.dataplane.metrics.served == 0, "the client fetched a result it was pushed"
        assert client.client_role.dataplane.metrics.pushed == {"stored": 2}
        nursery.cancel_scope.cancel()
