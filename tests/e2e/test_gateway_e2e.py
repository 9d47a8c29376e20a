"""The inference gateway on real node processes: KServe v2 and TF Serving REST answer a pushed Keras model.

A devnet of 1 validator, 2 providers (2 slots each, every registered model
kept warm) and 1 client. The client's owner pushes a stock Keras MLP with
the Python SDK; both providers fetch and load it and advertise it warm;
the client's ``/v2/models/NAME/ready`` turns true. Then, through real HTTP
on the client node: v2 JSON, v2 binary (the SDK) and TF Serving row and
columnar requests all equal ``model.predict`` within tolerance; bad input
gets the protocols' errors; 32 concurrent callers all get their own
answers; and the provider serving the gateway's session is killed with
``kill -9`` under load without a single request lost or wrong.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from devnet.launcher import DevnetSpec
from ledger.params import Params
from p2pgpu.client import Client
from p2pgpu.config import ClientConfig, GatewayConfig, ProviderConfig

from .conftest import TrackedDevnet, devnet_processes
from .helpers import get_json, wait_until

pytestmark = pytest.mark.slow

NAME = "mlp-gw"
PARAMS = Params(epoch_length=64, committee_size=4, challenge_window=10, audit_window=60, verifier_count=1,
                audit_fee=10, min_provider_bond=100)
WARM = ProviderConfig(device="cpu", unit_cost=10, slots=2, models=("*",))
SPEC = DevnetSpec(
    validators=1, providers=2, clients=1, block_interval=0.5, params=PARAMS,
    provider_configs={"p0": WARM, "p1": WARM},
    client_config=ClientConfig(enough_bids=1),
    gateway_config=GatewayConfig(stall_seconds=3.0, session_units=5000, max_unit_price=50),
)
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackedDevnet]:
    with devnet_processes(tmp_path_factory.mktemp("gateway") / "devnet", SPEC) as devnet:
        devnet.wait_finalized(2, timeout=120)
        yield devnet


@pytest.fixture(scope="module")
def model(net: TrackedDevnet, tmp_path_factory: pytest.TempPathFactory) -> Any:
    keras: Any = pytest.importorskip("keras")
    keras.utils.set_random_seed(16)
    m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
    path = tmp_path_factory.mktemp("model") / "mlp.keras"
    m.save(path)
    client = net.manifest.node("c0")
    with Client(client.api_url, timeout=60.0) as sdk:
        pushed = sdk.push_model(path, name=NAME, wait=True, timeout=240)
        assert pushed["status"] == "registered", pushed
    # both providers fetch it, load it, and say so in their adverts
    wait_until(lambda: len(get_json(client, f"/ledger/models/{NAME}/providers")["providers"]) == 2, timeout=240,
               what="both providers advertising the model warm")
    return m


def _x(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


def test_both_protocols_answer_a_pushed_model_like_keras(net: TrackedDevnet, model: Any) -> None:
    url = net.manifest.node("c0").api_url
    http = httpx.Client(base_url=url, timeout=120.0)
    assert http.get(f"/v2/models/{NAME}/ready").status_code == 200
    meta = http.get(f"/v2/models/{NAME}").json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}], meta

    x = _x(5, 1)
    started = time.monotonic()
    body = {"id": "first", "inputs": [{"name": "x", "datatype": "FP32", "shape": [5, 8], "data": x.ravel().tolist()}]}
    resp = http.post(f"/v2/models/{NAME}/infer", json=body)
    first_s = time.monotonic() - started
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["id"] == "first" and out["outputs"][0]["shape"] == [5, 3]
    want = model.predict(x, verbose=0)
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"], np.float32).reshape(5, 3), want, rtol=RTOL,
                               atol=ATOL)
    print(f"first request (auction, assignment, warm start, answer): {first_s:.2f} s")

    with Client(url, timeout=60.0) as sdk:  # the binary tensor extension, both ways
        np.testing.assert_allclose(sdk.infer(NAME, x), want, rtol=RTOL, atol=ATOL)

    rows = http.post(f"/v1/models/{NAME}:predict", json={"instances": x.tolist()})
    assert rows.status_code == 200, rows.text
    np.testing.assert_allclose(np.array(rows.json()["predictions"], np.float32), want, rtol=RTOL, atol=ATOL)
    cols = http.post(f"/v1/models/{NAME}/versions/1:predict", json={"inputs": {"x": x.tolist()}})
    assert cols.status_code == 200, cols.text
    np.testing.assert_allclose(np.array(cols.json()["outputs"], np.float32), want, rtol=RTOL, atol=ATOL)
    assert http.get(f"/v1/models/{NAME}").json()["model_version_status"][0]["state"] == "AVAILABLE"

    # bad input: the protocols' errors, nothing run
    bad = http.post(f"/v2/models/{NAME}/infer", json={"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 7], "data": [0.0] * 7}]})
    assert bad.status_code == 400 and "error" in bad.json()
    unknown = http.post("/v2/models/nope/infer", json=body)
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
    ragged = http.post(f"/v1/models/{NAME}:predict", json={"instances": [[0.0] * 8, [0.0] * 7]})
    assert ragged.status_code == 400


def _provider_serving(net: TrackedDevnet) -> str | None:
    """The provider with an open stream session (the gateway's), by its /metrics."""
    for name in ("p0", "p1"):
        rec = net.manifest.node(name)
        try:
            text = httpx.get(rec.api_url + "/metrics", timeout=5.0).text
        except httpx.HTTPError:
            continue
        for line in text.splitlines():
            if line.startswith('p2pgpu_stream_sessions_active{role="provider"}') and float(line.split()[-1]) > 0:
                return name
    return None


def test_32_callers_and_a_provider_killed_under_load_lose_nothing(net: TrackedDevnet, model: Any) -> None:
    url = net.manifest.node("c0").api_url
    callers, per_caller = 32, 12
    answers: dict[tuple[int, int], np.ndarray] = {}
    errors: list[str] = []
    inputs = {(c, i): _x(1 + (c + i) % 3, 1000 * c + i) for c in range(callers) for i in range(per_caller)}
    done_calls = [0]
    lock = threading.Lock()

    def caller(c: int) -> None:
        with Client(url, timeout=120.0) as sdk:
            for i in range(per_caller):
                try:
                    y = sdk.infer(NAME, inputs[(c, i)])
                except Exception as exc:  # noqa: BLE001 -- the test counts every failure
                    with lock:
                        errors.append(f"{c}/{i}: {type(exc).__name__}: {exc}")
                    continue
                with lock:
                    answers[(c, i)] = y
                    done_calls[0] += 1

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(callers)]
    for t in threads:
        t.start()
    wait_until(lambda: done_calls[0] >= callers * per_caller // 4, timeout=300, what="a quarter of the requests")
    victim = wait_until(lambda: _provider_serving(net), timeout=30, what="the provider serving the session")
    net.kill(victim)
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads)
    assert errors == [], errors[:5]
    assert len(answers) == callers * per_caller
    for key, y in answers.items():
        np.testing.assert_allclose(y, model.predict(inputs[key], verbose=0), rtol=RTOL, atol=ATOL)
