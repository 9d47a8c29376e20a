"""A provider that keeps every registered model warm (``[provider] models = ["*"]``), through real nodes: once the
client's node pushes a model, the provider prefetches its bundle from the pusher without a task asking and loads it
into a spare kernel worker; its bid on a task by that model says warm, a batch job runs through the loaded model
without a second fetch or a load, and a stream task takes over the loaded session (no model load in its worker)
while ``GET /tasks/{id}`` shows the model's name, the warm start and the royalty paid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from kernels.bundle import encode_bundle, load_model_file, model_id
from kernels.bymodel import make_model_spec
from p2pgpu.api.types import PushModelRequest, SubmitRequest
from p2pgpu.config import MODEL_WILDCARD, ProviderConfig
from p2pgpu.streams import ITEMS_INPUT

from .market_net import start_market_network
from .test_market_e2e import PARAMS
from .test_node_consensus import describe, wait_for

ROYALTY = 3
ITEMS = 8


@pytest.mark.slow
async def test_a_provider_prefetches_a_pushed_model_and_bids_warm(tmp_path: Path) -> None:
    keras: Any = pytest.importorskip("keras")
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"), keras.layers.Dense(2)])
    model.save(tmp_path / "dense.keras")
    bundle = load_model_file(tmp_path / "dense.keras")
    ident = model_id(bundle)
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    # Two slots: the warm pool holds at most slots - 1 workers, so one stays free for other jobs.
    settings = ProviderConfig(max_concurrent_jobs=2, device="cpu", unit_cost=10, models=(MODEL_WILDCARD,))
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS, provider=settings)
        provider, client = nodes["p0"], nodes["c0"]
        everyone = list(nodes.values())
        roles, driver = client.client_role, provider.roles_driver
        assert roles is not None and driver is not None
        await roles.models.push(PushModelRequest(bundle=encode_bundle(bundle), name="dense", royalty_per_unit=1))
        pool = driver.provider_service.pool
        await wait_for(lambda: pool.is_loaded(ident), 120, nodes=everyone)  # fetched and loaded in a worker
        assert driver.model_cache.fetches == 1 and pool.loads == 1
        spec = make_model_spec(ident, {}, x, device="cpu", memory_bytes=256 << 20, seconds=30)
        task_id = await roles.submit(
            SubmitRequest(spec=spec, inputs={"x": x}, max_unit_price=5_000, bid_window=6, audit_rate_bps=0))
        record = roles.clients[task_id]
        with trio.move_on_after(400):
            await record.closed.wait()
        assert record.closed.is_set(), f"task stuck at {record.stage} ({record.detail}); nodes: {describe(everyone)}"
        assert record.outcome == "paid", (record.outcome, record.detail)
        start = record.task.starts.get(net.address("p0"))
        assert start is not None and start.warm
        assert driver.model_cache.fetches == 1  # the job ran from the cache
        assert driver.counters["jobs_run_warm"] == 1 and pool.loads == 1  # ... through the loaded model: no load
        view = roles.view(task_id)
        assert (view.model_name, view.model_version, view.start_warm, view.startup_seconds) == ("dense", "1", True,
                                                                                                0.0)
        await wait_for(lambda: roles.view(task_id).royalty_paid == 1, 60, nodes=everyone)
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_a_stream_task_takes_over_the_loaded_model_and_its_view_shows_warm_and_the_royalty(
        tmp_path: Path) -> None:
    keras: Any = pytest.importorskip("keras")
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(2)])
    model.save(tmp_path / "dense.keras")
    bundle = load_model_file(tmp_path / "dense.keras")
    ident = model_id(bundle)
    items = np.random.default_rng(3).standard_normal((ITEMS, 4)).astype(np.float32)
    settings = ProviderConfig(max_concurrent_jobs=2, device="cpu", unit_cost=10, models=(MODEL_WILDCARD,),
                              receipt_every=4)
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS, provider=settings)
        provider, client = nodes["p0"], nodes["c0"]
        everyone = list(nodes.values())
        roles, driver = client.client_role, provider.roles_driver
        assert roles is not None and driver is not None
        await roles.models.push(PushModelRequest(bundle=encode_bundle(bundle), name="dense", royalty_per_unit=ROYALTY))
        pool = driver.provider_service.pool
        await wait_for(lambda: pool.is_loaded(ident), 120, nodes=everyone)
        spec = make_model_spec(ident, {}, None, kernel="stream_infer", device="cpu", memory_bytes=256 << 20,
                               seconds=30)
        task_id = await roles.submit(SubmitRequest(
            spec=spec, inputs={ITEMS_INPUT: items}, max_unit_price=5_000, units=ITEMS, bid_window=6,
            audit_rate_bps=0, kind="stream"))
        record = roles.clients[task_id]
        with trio.move_on_after(400):
            await record.closed.wait()
        assert record.closed.is_set(), f"task stuck at {record.stage} ({record.detail}); nodes: {describe(everyone)}"
        assert record.outcome == "paid", (record.outcome, record.detail)
        outputs = roles.result(task_id)["outputs"]
        expected = np.stack([model.predict(items[i:i + 1], verbose=0)[0] for i in range(ITEMS)])
        np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)
        # The session was the pool's: handed over, so the task's worker loaded no model (loads counts this task's).
        stats = driver.streams.stats[task_id]
        assert (stats.items, stats.model_loads) == (ITEMS, 0) and pool.handovers == 1
        assert driver.model_cache.fetches == 1
        view = roles.view(task_id)
        assert view.model_id == ident and (view.model_name, view.model_version) == ("dense", "1")
        assert view.start_warm is True and view.startup_seconds == 0.0
        assert view.royalty_paid == ITEMS * ROYALTY  # paid per claimed unit, read from the ledger
        await wait_for(lambda: pool.is_loaded(ident), 120, nodes=everyone)  # a replacement is loaded in the background
        assert pool.loads == 2
        nursery.cancel_scope.cancel()
