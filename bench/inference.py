"""Inference gateway benchmark: a Keras classifier served through a client node's KServe v2 endpoint.

Starts a devnet of real processes (1 validator, 2 providers with 2 slots each
keeping every registered model warm, 1 client), pushes a stock Keras MLP
784-128-10 with the Python SDK, waits until both providers advertise it
warm, then measures through real HTTP on the client node (the SDK's
``infer``: v2 with the binary tensor extension), beside ``model.predict``
on the same inputs in this process:

  first_request_s        the first request for the model: no session is open, so it waits for the
                         auction, the assignment and the warm provider's start (goal <= 2)
  infer_latency_ms_p50   single one-row requests, one at a time (and _p99)
  local_predict_ms_p50   ``model.predict`` of the same one-row input in this process
  local_call_ms_p50      ``model(x)`` (no predict loop): the floor under both
  overhead_ms_p50        infer p50 - local predict p50 (goal <= 10)
  overhead_vs_call_ms_p50  infer p50 - local call p50: what the network adds over the bare forward pass
  infer_requests_per_s   one-row requests with 32 concurrent callers
  rows_per_item          how the gateway batched them (requests / stream items it sent)
  local_requests_per_s   ``model.predict`` on batches of rows_per_item rows, one after another: the same
                         batching, in process
  throughput_ratio_vs_local  their ratio (goal >= 0.5)
  local_call_requests_per_s, throughput_ratio_vs_call  the same with ``model(x)`` in place of predict
  failover_s             the provider serving the session killed (kill -9) under load, until a request
                         sent after the kill is answered (goal <= 5)
  requests_lost          requests that failed or were answered wrongly during the run (goal 0)

The last line is one JSON object. ``--quick`` keeps it within ~120 s.
Every process it starts is stopped on the way out (also on Ctrl-C or SIGTERM).

Usage: python bench/inference.py [--quick] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # keep bench/ from shadowing packages
sys.path.insert(0, os.path.dirname(_HERE))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import trio  # noqa: E402

from bench.common import metric_value, say, serving_provider, wait_for  # noqa: E402
from bench.load import Terminated, goals_met, on_sigterm  # noqa: E402
from devnet.launcher import Devnet, DevnetSpec, plan_devnet, write_devnet  # noqa: E402
from ledger.params import Params  # noqa: E402
from p2pgpu.client import AsyncClient, Client  # noqa: E402
from p2pgpu.config import ClientConfig, GatewayConfig, ProviderConfig  # noqa: E402

GOALS: dict[str, tuple[str, float | bool]] = {
    "first_request_s": ("<=", 2.0),
    "overhead_ms_p50": ("<=", 10.0),
    "throughput_ratio_vs_local": (">=", 0.5),
    "failover_s": ("<=", 5.0),
    "requests_lost": ("<=", 0),
}
NAME = "mnist-mlp"
PARAMS = Params(epoch_length=64, committee_size=4, challenge_window=10, audit_window=60, verifier_count=1,
                audit_fee=10, min_provider_bond=100)
WARM = ProviderConfig(device="cpu", unit_cost=10, slots=2, models=("*",))
RTOL, ATOL = 1e-4, 1e-5


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def build_model(path: Path) -> Any:
    import keras

    keras.utils.set_random_seed(16)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(10)])
    model.save(path)
    return model


def local_figures(model: Any, x1: np.ndarray, repeats: int) -> dict[str, float]:
    import tensorflow as tf

    for _ in range(5):
        model.predict(x1, verbose=0)
        model(tf.constant(x1))
    predict_ms, call_ms = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        model.predict(x1, verbose=0)
        predict_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        np.asarray(model(tf.constant(x1)))
        call_ms.append((time.perf_counter() - t) * 1000)
    return {"local_predict_ms_p50": round(statistics.median(predict_ms), 2),
            "local_call_ms_p50": round(statistics.median(call_ms), 2)}


def local_requests_per_s(model: Any, rows: int, seconds: float, *, call: bool = False) -> float:
    """``model.predict`` (or ``model(x)``) on batches of ``rows`` one-row requests, back to back: requests per second."""
    import tensorflow as tf

    x = np.random.default_rng(3).standard_normal((max(rows, 1), 784)).astype(np.float32)

    def once() -> None:
        if call:
            np.asarray(model(tf.constant(x)))
        else:
            model.predict(x, verbose=0)

    once()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        once()
        done += x.shape[0]
    return done / (time.perf_counter() - start)


async def concurrent_load(url: str, model: Any, callers: int, seconds: float, *,
                          kill_after: float | None = None, kill: Any = None) -> dict[str, Any]:
    """``callers`` tasks sending one-row requests back to back for ``seconds``; optionally a kill midway."""
    inputs = np.random.default_rng(7).standard_normal((256, 784)).astype(np.float32)
    expected = model.predict(inputs, verbose=0)
    answered: list[tuple[float, float]] = []  # (sent, done) of each correct answer
    failures: list[str] = []
    killed_at: list[float] = []
    start = trio.current_time()
    stop = start + seconds

    async def caller(c: int, sdk: AsyncClient) -> None:
        i = c
        while trio.current_time() < stop:
            row = i % len(inputs)
            sent = trio.current_time()
            try:
                y = await sdk.infer(NAME, inputs[row:row + 1])
            except Exception as exc:  # noqa: BLE001 -- every failure is counted
                failures.append(f"{type(exc).__name__}: {exc}")
            else:
                if np.allclose(y, expected[row:row + 1], rtol=RTOL, atol=ATOL):
                    answered.append((sent, trio.current_time()))
                else:
                    failures.append(f"wrong answer to row {row}")
            i += callers

    async def killer() -> None:
        assert kill_after is not None and kill is not None
        await trio.sleep(kill_after)
        killed_at.append(trio.current_time())
        await trio.to_thread.run_sync(kill)

    async with AsyncClient(url, timeout=60.0) as sdk, trio.open_nursery() as nursery:
        for c in range(callers):
            nursery.start_soon(caller, c, sdk)
        if kill_after is not None:
            nursery.start_soon(killer)
    wall = trio.current_time() - start
    out: dict[str, Any] = {"answered": len(answered), "failures": failures, "wall_s": wall}
    if killed_at:
        after = [done for sent, done in answered if sent > killed_at[0]]
        out["failover_s"] = round(min(after) - killed_at[0], 2) if after else None
    return out


def run(root: Path, quick: bool) -> dict[str, Any]:
    t_begin = time.monotonic()
    figures: dict[str, Any] = {}
    model = build_model(root / "mlp.keras")
    x1 = np.random.default_rng(1).standard_normal((1, 784)).astype(np.float32)
    figures.update(local_figures(model, x1, 50 if quick else 200))

    spec = DevnetSpec(validators=1, providers=2, clients=1, block_interval=0.5, params=PARAMS,
                      provider_configs={"p0": WARM, "p1": WARM}, client_config=ClientConfig(enough_bids=1),
                      gateway_config=GatewayConfig(stall_seconds=3.0, session_units=100_000, max_unit_price=50),
                      log_level=os.environ.get("BENCH_LOG_LEVEL", "warning"))
    plan = plan_devnet(spec, master_seed=os.urandom(32), genesis_time_ms=int(time.time() * 1000))
    devnet = Devnet(write_devnet(plan, root / "devnet", scrypt_n=2**14))
    seen: set[int] = set()
    try:
        devnet.start_all(timeout=180)
        devnet.wait_finalized(2, timeout=120)
        client = devnet.manifest.node("c0")
        say("inference", f"devnet up in {time.monotonic() - t_begin:.0f} s")
        with Client(client.api_url, timeout=120.0) as sdk:
            sdk.push_model(root / "mlp.keras", name=NAME, wait=True, timeout=240)
            providers_url = f"{client.api_url}/ledger/models/{NAME}/providers"
            wait_for("both providers advertising the model warm",
                  lambda: len(httpx.get(providers_url, timeout=5).json().get("providers", [])) >= 2, 240)
            say("inference", f"model pushed and warm on both providers at {time.monotonic() - t_begin:.0f} s")

            t = time.perf_counter()
            y = sdk.infer(NAME, x1)
            figures["first_request_s"] = round(time.perf_counter() - t, 3)
            lost = 0 if np.allclose(y, model.predict(x1, verbose=0), rtol=RTOL, atol=ATOL) else 1

            latencies = []
            for i in range(100 if quick else 400):
                xi = np.random.default_rng(100 + i).standard_normal((1, 784)).astype(np.float32)
                t = time.perf_counter()
                sdk.infer(NAME, xi)
                latencies.append((time.perf_counter() - t) * 1000)
        figures["infer_latency_ms_p50"] = round(statistics.median(latencies), 2)
        figures["infer_latency_ms_p99"] = round(_pct(latencies, 0.99), 2)
        figures["overhead_ms_p50"] = round(figures["infer_latency_ms_p50"] - figures["local_predict_ms_p50"], 2)
        figures["overhead_vs_call_ms_p50"] = round(figures["infer_latency_ms_p50"] - figures["local_call_ms_p50"], 2)
        say("inference", f"latency p50 {figures['infer_latency_ms_p50']} ms, first request {figures['first_request_s']} s")

        items_before_sent = metric_value(client.api_url, "p2pgpu_stream_items_total", 'event="sent"')
        load = trio.run(concurrent_load, client.api_url, model, 32, 8.0 if quick else 20.0)
        items_sent = metric_value(client.api_url, "p2pgpu_stream_items_total", 'event="sent"') - items_before_sent
        figures["infer_requests_per_s"] = round(load["answered"] / load["wall_s"], 1)
        figures["rows_per_item"] = round(load["answered"] / items_sent, 2) if items_sent else None
        rows = max(1, int(round(figures["rows_per_item"] or 1)))
        figures["local_requests_per_s"] = round(local_requests_per_s(model, rows, 3.0), 1)
        figures["throughput_ratio_vs_local"] = round(figures["infer_requests_per_s"] / figures["local_requests_per_s"],
                                                     3)
        figures["local_call_requests_per_s"] = round(local_requests_per_s(model, rows, 3.0, call=True), 1)
        figures["throughput_ratio_vs_call"] = round(figures["infer_requests_per_s"]
                                                    / figures["local_call_requests_per_s"], 3)
        lost += len(load["failures"])
        say("inference", f"32 callers: {figures['infer_requests_per_s']} requests/s, {figures['rows_per_item']} rows per item")

        victim = serving_provider((n, devnet.manifest.node(n).api_url) for n in ("p0", "p1"))
        if victim is None:
            raise RuntimeError("no provider reports an open stream session: cannot measure failover")
        seen |= {p.pid for p in devnet.procs.values()}
        failover = trio.run(lambda: concurrent_load(client.api_url, model, 32, 10.0 if quick else 20.0,
                                                    kill_after=3.0, kill=lambda: devnet.kill(victim)))
        figures["failover_s"] = failover.get("failover_s")
        figures["failover_killed"] = victim
        lost += len(failover["failures"])
        figures["requests_lost"] = lost
        if load["failures"] or failover["failures"]:
            figures["failures"] = (load["failures"] + failover["failures"])[:5]
        say("inference", f"failover after kill -9 {victim}: {figures['failover_s']} s; lost {lost}")
    finally:
        seen |= {p.pid for p in devnet.procs.values()}
        devnet.stop_all(grace=8.0)
        for pid in seen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    figures["wall_s"] = round(time.monotonic() - t_begin, 1)
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and shorter load (~120 s)")
    ap.add_argument("--keep", type=Path, default=None, help="run in DIR and keep it (default: a temp dir)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            figures = run(args.keep, args.quick)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
                figures = run(Path(tmp), args.quick)
    except (KeyboardInterrupt, Terminated):
        print(json.dumps({"error": "interrupted"}))
        return 130
    figures["goals_met"] = goals_met(figures, GOALS)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
