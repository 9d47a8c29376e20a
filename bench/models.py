"""Models on the network: push a ~10 MB Keras model, then the first (cold) and a second (warm) task by its id.

Runs six in-process nodes over real libp2p on loopback (4 validators, provider p0, client c0; the network of
``tests/node/market_net.py``), the provider's kernels in a TensorFlow worker as on a real node.

Figures (issue 15), the last line one JSON object:

  push_s        validate the ``.keras`` file (no TensorFlow), bundle it, ``POST /models``'s work on the client
                node (store, pin, RegisterModel) and wait until the registration is final on the provider's node
  cold_start_s  submit -> result in the client's hands, of the first task by model id on a provider that does not hold the model:
                the bundle is fetched over the data plane, checked, decoded, and the job runs
  warm_task_s   the same task again on a warm provider: the model loaded in one of its kernel workers
                (``p2pgpu/warmpool.py``), its rows run through the loaded model (``warm_jobs_run`` counts it)
  warm_load_s   how long the provider took to load it there (in the background; no task waits for it)
  cold_over_warm  their ratio (goal: cold_start_s <= 10 s on this machine)
  local_predict_s  the same batch through ``model.predict`` in this process: the floor under both

Both tasks pay the market's own time (posting, an auction of a few blocks, the assignment, the result's
commitment); what "warm" saves is the fetch and the model build in the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import trio  # noqa: E402

from bench.common import say  # noqa: E402
from kernels.bundle import encode_bundle, load_model_file, model_id  # noqa: E402
from kernels.bymodel import make_model_spec  # noqa: E402
from p2pgpu.api.types import PushModelRequest, SubmitRequest  # noqa: E402
from p2pgpu.config import ProviderConfig  # noqa: E402
from tests.node.market_net import start_market_network  # noqa: E402
from tests.node.test_market_e2e import PARAMS  # noqa: E402
from tests.node.test_node_consensus import wait_for  # noqa: E402

GOALS = {"cold_start_s": ("<=", 10.0)}


def build_model(path: Path, width: int) -> Any:
    """A stock Keras MLP of about ``2 * width**2 * 4`` bytes of float32 weights, saved as ``.keras``."""
    import keras

    keras.utils.set_random_seed(15)
    model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(width, activation="relu"), keras.layers.Dense(8)])
    model.save(path)
    return model


async def run(root: Path, width: int, batch: int) -> dict[str, Any]:
    model = build_model(root / "mlp.keras", width)
    x = np.random.default_rng(15).standard_normal((batch, width)).astype(np.float32)
    started = time.perf_counter()
    expected = model.predict(x, verbose=0)
    local_predict_s = time.perf_counter() - started
    figures: dict[str, Any] = {"model_bytes": (root / "mlp.keras").stat().st_size, "batch": batch,
                               "local_predict_s": round(local_predict_s, 3)}
    async with trio.open_nursery() as nursery:
        t0 = time.perf_counter()
        # two slots: the warm pool may keep a model loaded in one worker and leaves the other to jobs
        net, nodes = await start_market_network(nursery, root / "net", PARAMS,
                                                provider=ProviderConfig(slots=2, device="cpu", unit_cost=10))
        say("models", f"six nodes up, the provider's kernels warm, in {time.perf_counter() - t0:.1f} s")
        provider, client = nodes["p0"], nodes["c0"]
        roles = client.client_role
        assert roles is not None and provider.roles_driver is not None
        everyone = list(nodes.values())

        t0 = time.perf_counter()
        bundle = load_model_file(root / "mlp.keras")
        ident = model_id(bundle)
        await roles.models.push(PushModelRequest(bundle=encode_bundle(bundle), name="mlp", royalty_per_unit=3))
        await wait_for(lambda: ident in provider.state.models, 120, nodes=everyone)
        figures["push_s"] = round(time.perf_counter() - t0, 3)
        figures["bundle_bytes"] = len(encode_bundle(bundle))
        say("models", f"pushed {figures['bundle_bytes'] / 1e6:.1f} MB bundle {ident.hex()[:16]} in {figures['push_s']} s")

        async def task_s(label: str) -> float:
            spec = make_model_spec(ident, {}, x, device="cpu", memory_bytes=512 << 20, seconds=60)
            t = time.perf_counter()
            task_id = await roles.submit(SubmitRequest(spec=spec, inputs={"x": x}, max_unit_price=50_000,
                                                       bid_window=6, audit_rate_bps=0))
            record = roles.clients[task_id]
            with trio.fail_after(300):
                await record.finished.wait()  # the result in the client's hands (settlement comes later)
            took = time.perf_counter() - t
            np.testing.assert_allclose(roles.result(task_id)["y"], expected, rtol=1e-3, atol=1e-4)
            with trio.fail_after(300):
                await record.closed.wait()
            if record.outcome != "paid":
                raise RuntimeError(f"{label} task ended {record.outcome}: {record.detail}")
            say("models", f"{label} task: result in {took:.2f} s, matches model.predict; settled paid")
            return took

        cache = provider.roles_driver.model_cache
        fetches_before = cache.fetches
        figures["cold_start_s"] = round(await task_s("cold"), 3)
        # the provider now keeps the model warm, as `[provider] models` would: loaded in a kernel worker
        pool = provider.roles_driver.provider_service.pool
        t0 = time.perf_counter()
        pool.set_wanted([ident])
        await wait_for(lambda: pool.is_loaded(ident), 120, nodes=everyone)
        figures["warm_load_s"] = round(time.perf_counter() - t0, 3)
        figures["warm_task_s"] = round(await task_s("warm"), 3)
        figures["warm_jobs_run"] = provider.roles_driver.counters.get("jobs_run_warm", 0)
        figures["provider_bundle_fetches"] = cache.fetches - fetches_before  # 1: the cold task fetched it, once
        figures["cold_over_warm"] = round(figures["cold_start_s"] / figures["warm_task_s"], 2)
        nursery.cancel_scope.cancel()
    return figures


def goals_met(figures: dict[str, Any]) -> dict[str, bool]:
    out = {}
    for key, (op, bound) in GOALS.items():
        value = figures.get(key)
        out[key] = value is not None and (value <= bound if op == "<=" else value >= bound)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the same model and one batch of 64 (well under 120 s)")
    args = ap.parse_args()
    width = 1120  # two 1120x1120 float32 layers: ~10 MB of weights
    batch = 64 if args.quick else 512
    with tempfile.TemporaryDirectory(prefix="p2pgpu-bench-models-") as tmp:
        figures = trio.run(run, Path(tmp), width, batch)
    out = {"bench": "models", "quick": args.quick, "cpu_count": os.cpu_count(), **figures}
    out["goals_met"] = goals_met(out)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
