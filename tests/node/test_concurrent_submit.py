"""Many tasks at once through one client node's real HTTP API: all accepted, distinct nonces, all settle."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import trio

from kernels.spec import make_spec
from ledger.genesis import initial_state
from ledger.params import Params
from ledger.state import TaskOutcome
from ledger.transactions import compute_task_id
from p2pgpu.api.server import serve_api
from p2pgpu.api.types import SubmitRequest, encode_submit
from p2pgpu.config import ProviderConfig
from p2pgpu.node_api import NodeService

from .market_net import start_market_network
from .test_node_consensus import describe, wait_for

PARAMS = Params(epoch_length=64, committee_size=4, challenge_window=10, audit_window=15, verifier_count=1,
                audit_fee=10, min_provider_bond=100)
TASKS = 50


@pytest.mark.slow
async def test_fifty_concurrent_submissions_are_accepted_with_distinct_gap_free_nonces_and_all_settle(tmp_path):
    provider = ProviderConfig(max_concurrent_jobs=1, device="cpu", unit_cost=10)
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS, provider=provider)
        client = nodes["c0"]
        everyone = list(nodes.values())
        port = await nursery.start(lambda task_status: serve_api(NodeService(client), "127.0.0.1", 0,
                                                                  task_status=task_status))
        me = net.address("c0")
        before = client.state.get_balance(me)
        rng = np.random.default_rng(3)
        jobs = []
        for _ in range(TASKS):
            a = rng.standard_normal((16, 16)).astype(np.float32)
            b = rng.standard_normal((16, 16)).astype(np.float32)
            spec = make_spec("matmul", 1, {}, {"a": a, "b": b}, device="cpu", memory_bytes=64 << 20, seconds=30)
            jobs.append((a, b, encode_submit(SubmitRequest(spec=spec, inputs={"a": a, "b": b}, max_unit_price=5_000,
                                                           bid_window=20, audit_rate_bps=0))))
        answers: list[httpx.Response | None] = [None] * TASKS
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as api:

            async def post(i: int) -> None:
                answers[i] = await api.post("/tasks", content=jobs[i][2],
                                            headers={"content-type": "application/msgpack"})

            async with trio.open_nursery() as posts:
                for i in range(TASKS):
                    posts.start_soon(post, i)
        assert all(r is not None and r.status_code == 201 for r in answers), \
            [(r.status_code, r.text) for r in answers if r is not None and r.status_code != 201]
        task_ids = [bytes.fromhex(r.json()["task_id"]) for r in answers]  # type: ignore[union-attr]
        assert len(set(task_ids)) == TASKS
        roles = client.client_role
        nonces = sorted(roles.clients[t].task.post_nonce for t in task_ids)
        assert len(set(nonces)) == TASKS
        assert all(compute_task_id(me, roles.clients[t].task.post_nonce) == t for t in task_ids)

        results: dict[bytes, bytes] = {}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=90) as api:

            async def long_poll(t: bytes) -> None:  # the node holds each request until the result is in
                for _ in range(10):
                    resp = await api.get(f"/tasks/{t.hex()}/result?wait=60")
                    if resp.status_code == 200:
                        results[t] = resp.content
                        return
                    assert resp.status_code == 409, resp.text

            async with trio.open_nursery() as polls:
                for t in task_ids:
                    polls.start_soon(long_poll, t)
        assert len(results) == TASKS
        with trio.move_on_after(600):
            for t in task_ids:
                await roles.clients[t].closed.wait()
        open_tasks = [(t.hex()[:8], roles.clients[t].stage, roles.clients[t].detail) for t in task_ids
                      if not roles.clients[t].closed.is_set()]
        assert not open_tasks, f"{len(open_tasks)} task(s) never settled: {open_tasks[:5]}; {describe(everyone)}"
        outcomes = {t.hex()[:8]: (roles.clients[t].outcome, roles.clients[t].detail) for t in task_ids}
        unpaid = {t: o for t, o in outcomes.items() if o[0] != "paid"}
        assert not unpaid, unpaid
        # every result reaches the client, even one whose task settled before its fetch finished
        await wait_for(lambda: all(roles.clients[t].outputs is not None for t in task_ids), 120, nodes=everyone)
        for (a, b, _), t in zip(jobs, task_ids):
            np.testing.assert_allclose(roles.result(t)["c"], a @ b, rtol=1e-4, atol=1e-4)
        # gap-free: every nonce the client signed executed; none was stranded or skipped
        state = client.state
        await wait_for(lambda: client.mempool.pending(me) == [], 60, nodes=everyone)
        state = client.state
        assert state.get_account(me).nonce > nonces[-1]
        ledger_tasks = [roles.clients[t].task.task for t in task_ids]  # as last seen (the ledger prunes settled ones)
        assert all(task.outcome == TaskOutcome.PAID for task in ledger_tasks)
        # the node's one journal writer left every task's newest record on disk, none older
        service = roles.client
        await wait_for(lambda: not service._unwritten and not service._journal_writing, 30, nodes=everyone)
        on_disk = {t: service.journal.read(t) for t in task_ids}
        assert all(on_disk[t] == roles.clients[t].entry for t in task_ids)
        assert all(on_disk[t].outcome == "paid" and on_disk[t].result is not None for t in task_ids)
        # every task delivered: no provider is counted as holding any of ours (the bid score's load term)
        assert all(roles.client.open_tasks(net.address(name)) == 0 for name in nodes if name.startswith("p"))
        spent = before - state.get_balance(me)
        fees = sum(stx.body.fee for h in range(1, client.chain.height + 1)
                   for stx in client.chain.get_finalized(h).block.transactions if stx.body.sender == me)
        assert spent == sum(task.unit_price for task in ledger_tasks) + fees
        assert state.total_supply() == initial_state(net.genesis).total_supply()
        nursery.cancel_scope.cancel()


async def test_a_client_at_the_mempools_per_sender_limit_gets_429_with_retry_after(tmp_path, monkeypatch):
    """Every mempool holds at most ``max_per_sender`` of one sender's pending transactions; a submission past
    it is refused for now, not for good: 429 ``sender_limit`` with Retry-After (it was 422, which clients do
    not retry), and the refused nonces strand nothing: a submission once there is room lands on the ledger."""
    from ledger.mempool import MempoolRejected, RejectReason
    from ledger.transactions import PostTask
    from p2pgpu.api.types import TooManyRequests

    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS)
        client = nodes["c0"]
        service = NodeService(client)
        a = np.ones((4, 4), np.float32)
        spec = make_spec("matmul", 1, {}, {"a": a, "b": a}, device="cpu", memory_bytes=64 << 20, seconds=30)
        request = SubmitRequest(spec=spec, inputs={"a": a, "b": a}, max_unit_price=5_000, bid_window=20,
                                audit_rate_bps=0)
        real_add = client.mempool.add

        def full_for_post_tasks(stx):  # the pool at its per-sender limit, for PostTasks only
            if isinstance(stx.body, PostTask):
                raise MempoolRejected(RejectReason.SENDER_LIMIT, "sender already has 1024 pending transactions")
            return real_add(stx)

        monkeypatch.setattr(client.mempool, "add", full_for_post_tasks)
        refused: list[TooManyRequests] = []

        async def submit() -> None:
            with pytest.raises(TooManyRequests) as info:
                await service.submit_task(request)
            refused.append(info.value)

        async with trio.open_nursery() as posts:
            for _ in range(3):
                posts.start_soon(submit)
        assert len(refused) == 3
        assert all(e.code == "sender_limit" and e.status == 429 and e.retry_after == 1 for e in refused)
        assert "pending transactions; try again after the next block" in refused[0].message
        monkeypatch.setattr(client.mempool, "add", real_add)
        task_id = await service.submit_task(request)  # room again: accepted, and its nonce's gaps are filled
        await wait_for(lambda: task_id in client.state.tasks, timeout=60, nodes=list(nodes.values()))
        nursery.cancel_scope.cancel()
