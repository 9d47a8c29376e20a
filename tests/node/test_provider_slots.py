"""A provider with 4 slots runs 4 jobs at once on 4 real kernel workers (TensorFlow in each)."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from kernels.spec import make_spec
from ledger.params import Params
from p2pgpu.api.types import SubmitRequest
from p2pgpu.config import ProviderConfig

from tests.kernels.helpers import dense_model

from .market_net import start_market_network
from .test_node_consensus import describe, wait_for

PARAMS = Params(epoch_length=64, committee_size=4, challenge_window=10, audit_window=15, verifier_count=1,
                audit_fee=10, min_provider_bond=100)


@pytest.mark.slow
async def test_four_slots_run_four_jobs_at_once_on_four_workers(tmp_path):
    provider = ProviderConfig(slots=4, device="cpu", unit_cost=10)
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS, provider=provider)
        p0, client = nodes["p0"], nodes["c0"]
        roles = p0.roles_driver
        assert roles.provider.config.max_concurrent_jobs == 4
        peak = {"running": 0, "workers": 0}

        async def watch() -> None:
            while True:
                peak["running"] = max(peak["running"], roles.provider.running_jobs)
                peak["workers"] = max(peak["workers"], len(set(roles.runtime.busy_pids())))
                await trio.sleep(0.005)

        nursery.start_soon(watch)
        rng = np.random.default_rng(5)
        jobs = []
        for i in range(4):  # a few seconds of training each, small inputs: the four overlap once assigned together
            model, _ = dense_model(16, [(64, "relu"), (4, "linear")], seed=i)
            data = {**model, "x": rng.standard_normal((256, 16)).astype(np.float32),
                    "y": rng.standard_normal((256, 4)).astype(np.float32)}
            spec = make_spec("keras_train", 1, {"steps": 600, "batch_size": 32}, data, device="cpu",
                             memory_bytes=256 << 20, seconds=120)
            jobs.append(SubmitRequest(spec=spec, inputs=data, max_unit_price=100_000, bid_window=30,
                                      audit_rate_bps=0))
        ids = []

        async def submit(req: SubmitRequest) -> None:
            ids.append(await client.client_role.submit(req))

        async with trio.open_nursery() as submissions:
            for req in jobs:
                submissions.start_soon(submit, req)
        with trio.move_on_after(300):
            for t in ids:
                await client.client_role.clients[t].closed.wait()
        records = [client.client_role.clients[t] for t in ids]
        assert all(r.outcome == "paid" for r in records), [(r.stage, r.outcome, r.detail) for r in records]
        await wait_for(lambda: all(r.outputs is not None for r in records), 120, nodes=list(nodes.values()))
        assert all(np.isfinite(r.outputs["loss"]).all() for r in records)
        assert peak == {"running": 4, "workers": 4}, (peak, describe(list(nodes.values())))
        nursery.cancel_scope.cancel()
