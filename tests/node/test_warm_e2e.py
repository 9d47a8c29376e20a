"""A provider that keeps every registered model warm (``[provider] models = ["*"]``), through real nodes: once the
client's node pushes a model, the provider prefetches its bundle from the pusher without a task asking, its bid
on a task by that model says warm, and the job runs from the cache without a second fetch."""

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

from .market_net import start_market_network
from .test_market_e2e import PARAMS
from .test_node_consensus import describe, wait_for


@pytest.mark.slow
async def test_a_provider_prefetches_a_pushed_model_and_bids_warm(tmp_path: Path) -> None:
    keras: Any = pytest.importorskip("keras")
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"), keras.layers.Dense(2)])
    model.save(tmp_path / "dense.keras")
    bundle = load_model_file(tmp_path / "dense.keras")
    ident = model_id(bundle)
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    settings = ProviderConfig(max_concurrent_jobs=1, device="cpu", unit_cost=10, models=(MODEL_WILDCARD,))
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS, provider=settings)
        provider, client = nodes["p0"], nodes["c0"]
        everyone = list(nodes.values())
        roles, driver = client.client_role, provider.roles_driver
        assert roles is not None and driver is not None
        await roles.models.push(PushModelRequest(bundle=encode_bundle(bundle), name="dense", royalty_per_unit=1))
        await wait_for(lambda: driver.model_cache.is_warm(ident), 120, nodes=everyone)
        assert driver.model_cache.fetches == 1
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
        nursery.cancel_scope.cancel()
