"""A client node that dies mid-task and restarts from its data directory still has its task and its result.

Issue 13: task records lived in memory only, so after a restart ``GET
/tasks/{id}`` answered 404 for a task the client had paid for, and a client
that died while its provider fetched the inputs got that provider slashed.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import trio

from kernels.spec import make_spec
from ledger.params import Params
from ledger.state import TaskStatus
from p2pgpu.api.server import serve_api
from p2pgpu.market.provider import JobPhase
from p2pgpu.api.types import SubmitRequest, TaskView, decode_result
from p2pgpu.node import Node
from p2pgpu.node_api import NodeService

from .market_net import run_in_own_scope, start_market_network
from .test_node_consensus import describe, wait_for

PARAMS = Params(epoch_length=64, committee_size=4, challenge_window=8, audit_window=15, verifier_count=1,
                audit_fee=10, min_provider_bond=100)


async def wait_recovered(api: httpx.AsyncClient, task_ids: list[bytes], timeout: float) -> dict[bytes, bytes]:
    """Poll the restarted client's API until every task answers with its result; the result bodies by task."""
    results: dict[bytes, bytes] = {}
    with trio.move_on_after(timeout):
        while len(results) < len(task_ids):
            for t in task_ids:
                if t in results:
                    continue
                resp = await api.get(f"/tasks/{t.hex()}/result")
                if resp.status_code == 200:
                    results[t] = resp.content
                else:
                    assert resp.status_code in (409, 503), resp.text  # not 404: the task is known
            await trio.sleep(0.1)
    return results


@pytest.mark.slow
async def test_a_client_killed_mid_task_and_restarted_from_its_data_dir_returns_the_task_and_its_result(tmp_path):
    scopes: dict[str, trio.CancelScope] = {}
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS, scopes=scopes)
        client, provider = nodes["c0"], nodes["p0"]
        everyone = list(nodes.values())
        rng = np.random.default_rng(5)
        jobs = []
        for _ in range(2):
            a = rng.standard_normal((32, 32)).astype(np.float32)
            b = rng.standard_normal((32, 32)).astype(np.float32)
            jobs.append((a, b))
        task_ids = []
        for a, b in jobs:
            spec = make_spec("matmul", 1, {}, {"a": a, "b": b}, device="cpu", memory_bytes=64 << 20, seconds=30)
            task_id = await client.client_role.submit(SubmitRequest(spec=spec, inputs={"a": a, "b": b},
                                                                    max_unit_price=5_000, bid_window=20,
                                                                    audit_rate_bps=0))
            # durable before the API could answer 201
            assert client.client_role.journal.path_of(task_id).exists()
            task_ids.append(task_id)
        # Crash once the provider holds the inputs of both: it gives up on inputs it cannot fetch after a few
        # blocks (p2pgpu.market.provider fetch_retries), fewer than a restart takes.
        jobs_of = provider.roles_driver.provider.jobs
        fetched = {JobPhase.QUEUED, JobPhase.RUNNING, JobPhase.COMMITTING, JobPhase.COMMITTED, JobPhase.DONE}
        await wait_for(lambda: all(t in jobs_of and jobs_of[t].phase in fetched for t in task_ids), 120,
                       nodes=everyone)

        # the crash: the client's whole task tree is cancelled; nothing is written on the way out
        scopes["c0"].cancel()
        await trio.sleep(0.5)  # let it unwind
        # the network goes on without it: the tasks run, are committed, and settle as paid while it is down
        await wait_for(lambda: all(t in provider.state.tasks and provider.state.tasks[t].status == TaskStatus.SETTLED
                                   for t in task_ids), 180, nodes=everyone[:-1])

        restarted_at = time.monotonic()
        again = Node(client.config, client.keys, net.genesis)
        await nursery.start(run_in_own_scope, again)
        port = await nursery.start(lambda task_status: serve_api(NodeService(again), "127.0.0.1", 0,
                                                                  task_status=task_status))
        roles = again.client_role
        assert roles.recovered_tasks == 2 and roles.recovery_s is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
            for t in task_ids:  # the tasks are back at once, before any result is
                resp = await api.get(f"/tasks/{t.hex()}")
                assert resp.status_code == 200, resp.text
            results = await wait_recovered(api, task_ids, 240)
            client_recovery_s = time.monotonic() - restarted_at
            assert len(results) == 2, (
                f"results of {len(results)}/2 tasks back; views: "
                f"{[(await api.get(f'/tasks/{t.hex()}')).json() for t in task_ids]}; {describe(everyone)}")
            for (a, b), t in zip(jobs, task_ids):
                wire = decode_result(results[t])
                np.testing.assert_allclose(dict(wire.outputs)["c"], a @ b, rtol=1e-4, atol=1e-4)
            view = TaskView.from_json((await api.get(f"/tasks/{task_ids[0].hex()}")).json())
            assert [s for s, _ in view.timings][:3] == ["posted", "bids", "assigned"]  # kept across the crash
        print(f"\nclient_recovery_s={client_recovery_s:.2f} (journal reload {roles.recovery_s * 1000:.1f} ms)")
        # the provider was paid for both, not slashed: the client served its inputs again once back
        await wait_for(lambda: all(again.state.tasks.get(t) is None
                                   or again.state.tasks[t].status == TaskStatus.SETTLED for t in task_ids),
                       120, nodes=everyone)
        assert all(roles.clients[t].outcome == "paid" for t in task_ids), \
            [(roles.clients[t].outcome, roles.clients[t].detail) for t in task_ids]
        assert again.state.providers[net.address("p0")].missed == 0

        # kept until deleted: the body leaves the blob store and the record the journal, the task the API
        kept, expiring = task_ids
        body = roles.clients[kept].entry.result.body
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
            assert (await api.delete(f"/tasks/{kept.hex()}/result")).status_code == 200
            assert (await api.get(f"/tasks/{kept.hex()}")).status_code == 404
        assert not roles.journal.path_of(kept).exists() and not again.roles_driver.store.has(body)
        # ... or until the retention passes
        assert await roles.sweep_results() == 0
        later = int(time.time() * 1000) + int(again.config.client.result_retention_hours * 3_600_000) + 1
        assert await roles.sweep_results(later) == 1
        assert expiring not in roles.clients and not roles.journal.path_of(expiring).exists()
        nursery.cancel_scope.cancel()

