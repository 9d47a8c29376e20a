"""The FastAPI layer's seams: the schema it publishes, the mapping of its validation errors, per-node metrics."""

from __future__ import annotations

import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from p2pgpu.api.app import ApiApp
from p2pgpu.api.auth import Access
from p2pgpu.api.metrics import NodeMetrics, to_prometheus
from p2pgpu.api.models import DisputeIn, ErrorOut, HealthOut, TaskIdParam, validation_error
from p2pgpu.api.types import BadRequest
from p2pgpu.metrics_text import MetricsError, counter, gauge
from tests.api.conftest import Served
from tests.api.fake_node import FakeNode


async def test_openapi_schema_lists_every_declared_route_with_its_method(served: Served) -> None:
    resp = await served.client.get("/openapi.json")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    schema = resp.json()
    published = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    declared = {(route.method, route.pattern) for route in ApiApp(FakeNode()).routes}
    assert published == declared - {("GET", "/openapi.json")}


async def test_openapi_describes_bodies_answers_and_the_error_shape(served: Served) -> None:
    schema = (await served.client.get("/openapi.json")).json()
    submit = schema["paths"]["/tasks"]["post"]
    assert "application/msgpack" in submit["requestBody"]["content"]
    dispute = schema["paths"]["/tasks/{task_id}/disputes"]["post"]
    assert set(dispute["requestBody"]["content"]["application/json"]["schema"]["properties"]) == {"item", "reason"}
    task = schema["paths"]["/tasks/{task_id}"]["get"]
    (param,) = task["parameters"]
    assert param["name"] == "task_id" and param["in"] == "path" and "pattern" in param["schema"]
    error_ref = task["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
    assert error_ref.endswith("/ErrorOut")
    assert set(schema["components"]["schemas"]["ErrorOut"]["properties"]) == {"error", "message"}


async def test_no_interactive_docs_pages(served: Served) -> None:
    for path in ("/docs", "/redoc"):
        resp = await served.client.get(path)
        assert resp.status_code == 404 and resp.json()["error"] == "no_route"


def test_route_access_is_declared_once_and_public_routes_are_only_health() -> None:
    app = ApiApp(FakeNode())
    assert [r.pattern for r in app.routes if r.access is Access.PUBLIC] == ["/health"]
    framework_routes = {getattr(r, "path", None) for r in app.fastapi.routes} - {r.pattern for r in app.routes}
    assert framework_routes == set()  # nothing is served without a declared Access, the schema included


def test_validation_error_keeps_a_parsers_code_and_words() -> None:
    from pydantic import TypeAdapter

    with pytest.raises(ValidationError) as caught:
        TypeAdapter(TaskIdParam).validate_python("zz")
    err = validation_error(caught.value)
    assert isinstance(err, BadRequest) and err.code == "bad_task_id" and err.message == "task id 'zz' is not hex"
    with pytest.raises(ValidationError) as caught:
        DisputeIn.model_validate({"reason": "x"})
    err = validation_error(caught.value)
    assert err.status == 400 and err.code == "bad_request" and err.message.startswith("item: ")


def test_models_refuse_what_the_api_never_sends() -> None:
    with pytest.raises(ValidationError):
        HealthOut.model_validate({"state": "ready", "head_height": 1, "peers": 0, "detail": "", "extra": 1})
    with pytest.raises(ValidationError):
        HealthOut.model_validate({"state": "sleeping", "head_height": 1, "peers": 0})
    assert ErrorOut(error="x", message="y").model_dump() == {"error": "x", "message": "y"}


def test_each_node_has_its_own_registry_and_the_global_one_is_untouched() -> None:
    before = {m.name for m in prometheus_client.REGISTRY.collect()}
    a, b = NodeMetrics(), NodeMetrics()
    page_a = a.render([gauge("p2pgpu_chain_height", "Height.", 5)]).decode()
    page_b = b.render([gauge("p2pgpu_chain_height", "Height.", 9)]).decode()
    assert a.registry is not b.registry
    assert {f.name: f.samples[0].value for f in text_string_to_metric_families(page_a)} == {"p2pgpu_chain_height": 5}
    assert {f.name: f.samples[0].value for f in text_string_to_metric_families(page_b)} == {"p2pgpu_chain_height": 9}
    assert a.render([]) == b""  # a scrape's families are gone once it is rendered
    assert {m.name for m in prometheus_client.REGISTRY.collect()} == before


def test_counter_names_keep_their_total_suffix_on_the_page() -> None:
    page = NodeMetrics().render([counter("p2pgpu_jobs_total", "Jobs.", {(("kernel", "matmul"),): 3})]).decode()
    assert "# TYPE p2pgpu_jobs_total counter" in page and 'p2pgpu_jobs_total{kernel="matmul"} 3.0' in page
    with pytest.raises(MetricsError, match="must end in _total"):
        to_prometheus(counter("p2pgpu_jobs", "Jobs.", 1))


async def test_the_app_runs_in_process_without_a_server() -> None:
    # A plain ASGI callable: it answers through httpx's ASGI transport too, with no server in front.
    transport = httpx.ASGITransport(app=ApiApp(FakeNode()))
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
        assert (await client.get("/health")).json()["state"] == "ready"
        assert (await client.get("/tasks/zz")).json() == {"error": "bad_task_id", "message": "task id 'zz' is not hex"}
