"""The gateway's HTTP routes through real HTTP semantics (httpx over ASGI) against a fake gateway.

The codecs and the lanes have their own tests; here: the routes answer both
protocols, errors leave in the protocols' ``{"error": ...}`` shape with the
right status (the API's own token errors included), the ``infer`` scope and
spending limit hold, and a refused request spends nothing.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import trio

from ledger.state import ModelEntry
from p2pgpu.api.app import ApiApp
from p2pgpu.api.auth import Access
from p2pgpu.config import ApiToken, GatewayConfig
from p2pgpu.gateway.errors import ModelNotReady
from p2pgpu.gateway.metrics import GatewayView
from p2pgpu.metrics_text import MetricFamily
from tests.api.fake_node import FakeNode
from tests.gateway.test_lanes import model
from tests.gateway.test_service import FakeRegistry, entry


@dataclass
class Status:
    state: str
    detail: str


@dataclass
class FakeGateway:
    registry: FakeRegistry
    config: GatewayConfig = field(default_factory=lambda: GatewayConfig(max_batch_rows=4, max_unit_price=5))
    state: str = "AVAILABLE"
    fail: str | None = None
    calls: int = 0

    def resolve(self, name: str, version: str | None = None) -> ModelEntry:
        from p2pgpu.gateway.service import InferenceGateway

        return InferenceGateway(lambda: self.registry, None, self.config).resolve(name, version)  # type: ignore[arg-type,return-value]

    def versions(self, e: ModelEntry) -> list[str]:
        return ["1", "2"]

    def status(self, e: ModelEntry) -> Status:
        return Status(self.state, "opening a session" if self.state != "AVAILABLE" else "")

    def summary(self) -> GatewayView:
        return GatewayView(enabled=True)

    def metric_families(self) -> list[MetricFamily]:
        return []

    async def infer(self, e: ModelEntry, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        await trio.sleep(0.01)
        if self.fail:
            raise ModelNotReady(self.fail)
        return model(batch)


@pytest.fixture
def gateway() -> FakeGateway:
    reg = FakeRegistry()
    reg.add(entry("mnist", "1", 5, 1))
    reg.add(entry("mnist", "2", 9, 2))
    return FakeGateway(reg)


@pytest.fixture(params=["asgi", "tcp"])
async def client(request: pytest.FixtureRequest, gateway: FakeGateway) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process (ASGI), and served by Hypercorn on a loopback port (real HTTP, as on a node)."""
    if request.param == "asgi":
        app = ApiApp(FakeNode(), gateway=gateway, max_body_bytes=64 << 10)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as c:
            yield c
        return
    from p2pgpu.api.server import serve_api

    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve_api(FakeNode(), "127.0.0.1", 0, gateway=gateway,
                                                                 max_body_bytes=64 << 10, task_status=task_status))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as c:
            yield c
        nursery.cancel_scope.cancel()


X = np.arange(6, dtype=np.float32).reshape(2, 3)


def v2_json(x: np.ndarray = X, **extra: object) -> dict[str, object]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            **extra}


async def test_v2_health_server_and_model_metadata(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).status_code == 200
    server = (await client.get("/v2")).json()
    assert server["name"] == "p2pgpu" and "binary_tensor_data" in server["extensions"]
    meta = (await client.get("/v2/models/mnist")).json()
    assert meta["name"] == "mnist" and meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]
    assert (await client.get("/v2/models/mnist/versions/1")).status_code == 200
    assert (await client.get("/v2/models/mnist/ready")).json() == {"name": "mnist", "ready": True}


async def test_v2_infer_json_echoes_the_id_and_answers_the_model(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v2/models/mnist/versions/1/infer", json=v2_json(id="req-7"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == "req-7" and body["model_name"] == "mnist" and body["model_version"] == "1"
    (out,) = body["outputs"]
    assert out["name"] == "y" and out["datatype"] == "FP32" and out["shape"] == [2, 2]
    np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(2, 2), model(X))


async def test_v2_infer_binary_both_ways(client: httpx.AsyncClient) -> None:
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                                     "parameters": {"binary_data_size": X.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    resp = await client.post("/v2/models/mnist/infer", content=header + X.tobytes(),
                             headers={"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(header))})
    assert resp.status_code == 200, resp.text
    n = int(resp.headers["inference-header-content-length"])
    head = json.loads(resp.content[:n])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 16
    np.testing.assert_array_equal(np.frombuffer(resp.content[n:], np.float32).reshape(2, 2), model(X))


async def test_tf_serving_row_and_columnar_predict_status_and_metadata(client: httpx.AsyncClient) -> None:
    rows = await client.post("/v1/models/mnist:predict", json={"instances": X.tolist()})
    assert rows.status_code == 200, rows.text
    np.testing.assert_allclose(np.array(rows.json()["predictions"], np.float32), model(X))
    cols = await client.post("/v1/models/mnist/versions/1:predict", json={"inputs": {"x": X.tolist()}})
    assert cols.status_code == 200, cols.text
    np.testing.assert_allclose(np.array(cols.json()["outputs"], np.float32), model(X))
    status = (await client.get("/v1/models/mnist")).json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    meta = (await client.get("/v1/models/mnist/metadata")).json()
    assert "serving_default" in json.dumps(meta)


@pytest.mark.parametrize("method,path,body,status,words", [
    ("POST", "/v2/models/resnet/infer", v2_json(), 404, "no registered model resnet"),
    ("GET", "/v2/models/mnist/versions/7", None, 404, "mnist version 7"),
    ("POST", "/v2/models/mnist/infer",
     {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}]}, 400, "INT32"),
    ("POST", "/v2/models/mnist/infer",
     {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [0.0] * 8}]}, 400, "shape"),
    ("POST", "/v2/models/mnist/infer",
     {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0.0] * 5}]}, 400, "5"),
    ("POST", "/v1/models/mnist:predict", {"instances": [[1.0, 2.0, 3.0], [1.0]]}, 400, "ragged"),
    ("POST", "/v1/models/resnet:predict", {"instances": [[1.0, 2.0, 3.0]]}, 404, "resnet"),
])
async def test_bad_requests_get_the_protocols_error_shape_and_nothing_runs(
        client: httpx.AsyncClient, gateway: FakeGateway, method: str, path: str, body: object, status: int,
        words: str) -> None:
    resp = await client.request(method, path, json=body)
    assert resp.status_code == status, resp.text
    assert set(resp.json()) == {"error"} and words.lower() in resp.json()["error"].lower(), resp.json()
    assert gateway.calls == 0


async def test_a_lying_binary_header_length_and_an_oversized_body_are_refused(client: httpx.AsyncClient) -> None:
    lie = await client.post("/v2/models/mnist/infer", content=b'{"inputs": []}',
                            headers={"inference-header-content-length": "999"})
    assert lie.status_code == 400 and "error" in lie.json()
    big = await client.post("/v2/models/mnist/infer", content=b"x" * (65 << 10))
    assert big.status_code == 413 and set(big.json()) == {"error"}


async def test_model_not_ready_is_503_and_v2_ready_is_a_4xx(client: httpx.AsyncClient,
                                                            gateway: FakeGateway) -> None:
    gateway.state, gateway.fail = "LOADING", "no provider can serve model mnist@2 now: 2 declined (price)"
    ready = await client.get("/v2/models/mnist/ready")
    assert ready.status_code == 400 and "not ready" in ready.json()["error"]
    resp = await client.post("/v2/models/mnist/infer", json=v2_json())
    assert resp.status_code == 503 and "declined (price)" in resp.json()["error"]
    status = (await client.get("/v1/models/mnist")).json()
    assert status["model_version_status"][0]["state"] == "LOADING"


async def test_32_concurrent_callers_each_get_their_own_answer(client: httpx.AsyncClient) -> None:
    xs = [np.random.default_rng(i).standard_normal((1 + i % 4, 3)).astype(np.float32) for i in range(32)]
    out: list[np.ndarray | None] = [None] * 32

    async def one(i: int) -> None:
        resp = await client.post("/v2/models/mnist/infer", json=v2_json(xs[i], id=str(i)))
        assert resp.status_code == 200 and resp.json()["id"] == str(i)
        data = resp.json()["outputs"][0]
        out[i] = np.array(data["data"], np.float32).reshape(data["shape"])

    async with trio.open_nursery() as nursery:
        for i in range(32):
            nursery.start_soon(one, i)
    for x, y in zip(xs, out, strict=True):
        np.testing.assert_array_equal(y, model(x))


def _token(name: str, secret: str, scopes: set[str], spend: int | None = None) -> ApiToken:
    return ApiToken(name, hashlib.sha256(secret.encode()).hexdigest(), frozenset(scopes), spend)


def test_the_gateway_routes_are_public_health_and_infer_scope() -> None:
    app = ApiApp(FakeNode(), gateway=FakeGateway(FakeRegistry()))
    assert {r.access for r in app.routes if r.pattern.startswith(("/v2", "/v1"))} == {Access.PUBLIC, Access.INFER}


async def test_tokens_infer_scope_and_spend_limit_over_real_http(gateway: FakeGateway) -> None:
    from p2pgpu.api.server import serve_api

    tokens = [_token("app", "s3cret-app", {"infer"}, spend=15), _token("reader", "s3cret-reader", {"read"}, spend=1)]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve_api(FakeNode(), "127.0.0.1", 0, gateway=gateway,
                                                                 tokens=tokens, task_status=task_status))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as c:
            await _tokens_round(c, gateway)
        nursery.cancel_scope.cancel()


async def _tokens_round(c: httpx.AsyncClient, gateway: FakeGateway) -> None:
    """Public health; no token 401; a token without ``infer`` 403; a bad request spends nothing; then 429."""
    assert (await c.get("/v2/health/live")).status_code == 200  # public
    missing = await c.post("/v2/models/mnist/infer", json=v2_json())
    assert missing.status_code == 401 and set(missing.json()) == {"error"}
    reader = await c.post("/v2/models/mnist/infer", json=v2_json(), headers={"authorization": "Bearer s3cret-reader"})
    assert reader.status_code == 403 and "infer scope" in reader.json()["error"]
    app_auth = {"authorization": "Bearer s3cret-app"}
    bad = await c.post("/v2/models/mnist/infer", json={"inputs": []}, headers=app_auth)
    assert bad.status_code == 400  # refused before anything ran: spends nothing
    for _ in range(3):  # 2 rows = 1 item of max_unit_price 5: 3 requests spend the 15
        assert (await c.post("/v2/models/mnist/infer", json=v2_json(), headers=app_auth)).status_code == 200
    spent = await c.post("/v2/models/mnist/infer", json=v2_json(), headers=app_auth)
    assert spent.status_code == 429 and int(spent.headers["retry-after"]) > 0
    assert "per hour" in spent.json()["error"]
    assert gateway.calls == 3


async def test_the_python_sdk_speaks_to_these_routes(gateway: FakeGateway) -> None:
    from p2pgpu.client import AsyncClient, ModelNotFound as SdkModelNotFound, ModelUnavailable

    app = ApiApp(FakeNode(), gateway=gateway)
    async with AsyncClient("http://node", transport=httpx.ASGITransport(app=app)) as sdk:
        assert await sdk.server_live()
        assert await sdk.model_ready("mnist")
        assert (await sdk.model_metadata("mnist", version="1"))["inputs"][0]["shape"] == [-1, 3]
        np.testing.assert_array_equal(await sdk.infer("mnist", X), model(X))  # the binary extension both ways
        np.testing.assert_array_equal(await sdk.infer("mnist", X, version="1"), model(X))
        with pytest.raises(SdkModelNotFound):
            await sdk.infer("resnet", X)
        gateway.fail = "no provider can serve it"
        with pytest.raises(ModelUnavailable, match="no provider"):
            await sdk.infer("mnist", X)
