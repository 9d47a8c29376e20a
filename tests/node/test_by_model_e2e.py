"""A batch inference task by model through real nodes: the client's node pushes a stock Keras model (stored as a
public blob, RegisterModel final), submits a task naming it by id with only ``x``; the provider fetches the bundle
from the client's node over the data plane, runs it, and the task settles PAID with the royalty escrowed and paid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from kernels.bundle import encode_bundle, load_model_file, model_id
from kernels.bymodel import make_model_spec
from ledger.state import TaskOutcome
from p2pgpu.api.types import PushModelRequest, SubmitRequest

from .market_net import start_market_network
from .test_market_e2e import PARAMS
from .test_node_consensus import describe, wait_for

ROYALTY = 11


@pytest.mark.slow
async def test_a_task_by_model_fetches_the_bundle_runs_it_and_pays_the_royalty(tmp_path: Path) -> None:
    keras: Any = pytest.importorskip("keras")
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(2)])
    model.save(tmp_path / "dense.keras")
    bundle = load_model_file(tmp_path / "dense.keras")
    ident = model_id(bundle)
    x = np.linspace(-1, 1, 20, dtype=np.float32).reshape(5, 4)
    async with trio.open_nursery() as nursery:
        net, nodes = await start_market_network(nursery, tmp_path, PARAMS)
        provider, client = nodes["p0"], nodes["c0"]
        everyone = list(nodes.values())
        roles = client.client_role
        assert roles is not None
        await roles.models.push(PushModelRequest(bundle=encode_bundle(bundle), name="dense", royalty_per_unit=ROYALTY))
        await wait_for(lambda: ident in client.state.models and ident in provider.state.models, 120, nodes=everyone)
        c0_before = client.state.get_balance(net.address("c0"))
        c0_nonce = client.state.get_account(net.address("c0")).nonce
        spec = make_model_spec(ident, {}, x, device="cpu", memory_bytes=256 << 20, seconds=30)
        task_id = await roles.submit(
            SubmitRequest(spec=spec, inputs={"x": x}, max_unit_price=5_000, bid_window=6, audit_rate_bps=0))
        record = roles.clients[task_id]
        with trio.move_on_after(400):
            await record.closed.wait()
        assert record.closed.is_set(), f"task stuck at {record.stage} ({record.detail}); nodes: {describe(everyone)}"
        assert record.outcome == "paid", (record.outcome, record.detail)
        np.testing.assert_allclose(roles.result(task_id)["y"], model.predict(x, verbose=0),
                                   rtol=1e-4, atol=1e-5)
        task = client.state.tasks[task_id]
        assert task.outcome == TaskOutcome.PAID and task.model_id == ident and task.royalty_per_unit == ROYALTY
        view = roles.view(task_id)
        assert view.model_id == ident and view.royalty_per_unit == ROYALTY
        assert provider.roles_driver is not None and provider.roles_driver.model_cache.fetches == 1
        # c0 owns the model: the royalty it escrowed came back to it, so it paid the price and its fees only
        fees = (client.state.get_account(net.address("c0")).nonce - c0_nonce) * PARAMS.min_fee
        assert client.state.get_balance(net.address("c0")) == c0_before - task.unit_price - fees
        nursery.cancel_scope.cancel()
