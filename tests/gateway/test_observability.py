"""What the gateway shows operators: per-model counters, gauges and latency over fake sessions, across lanes.

Each outcome of a request moves exactly one counter (answered, a failure
class, abandoned); items and rows count what was sent; the model's totals
live in the service, so a lane that idles out and the next one add up and a
counter never goes down; the families render on the node's page
(prometheus_client's parser reads them back) and ``/status`` carries the
gateway's section.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from p2pgpu.api.app import ApiApp
from p2pgpu.api.metrics import NodeMetrics
from p2pgpu.config import GatewayConfig
from p2pgpu.gateway.batcher import BatchPolicy
from p2pgpu.gateway.errors import GatewayError, ModelNotReady, TooManyInferRequests
from p2pgpu.gateway.lanes import LanePolicy, LaneStats, LaneTarget, ModelLane
from p2pgpu.gateway.metrics import GatewayModelView, gateway_metric_families
from p2pgpu.gateway.service import InferenceGateway
from p2pgpu.metrics_text import check_families
from tests.api.fake_node import FakeNode
from tests.gateway.test_lanes import TARGET, FakeSession, Opener, call_many, model, rows
from tests.gateway.test_service import CountingOpener, FakeRegistry, entry


def settled(s: LaneStats) -> int:
    """Requests that reached an end: with nothing pending, this is every request."""
    return s.answered + s.failed + s.abandoned


def scrape(families: list[Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The page as prometheus_client renders and parses it: (sample name, labels) -> value."""
    page = NodeMetrics().render(families).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(page) for s in fam.samples}


def m(label: str = "mnist@1", **more: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"model": label, **more}.items()))


# ----------------------------------------------------------------- one lane


async def test_answers_items_rows_and_latency_are_counted_under_concurrency(autojump_clock: trio.abc.Clock) -> None:
    session = FakeSession(1, latency=0.02)
    lane = ModelLane(TARGET, Opener(session), LanePolicy(batching=BatchPolicy(max_rows=16), window=2))
    inputs = [rows(1 + i % 3, i) for i in range(64)]
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        out = await call_many(lane, inputs)
        nursery.cancel_scope.cancel()
    assert all(isinstance(y, np.ndarray) for y in out)
    s = lane.stats
    assert (s.requests, s.answered, s.failed, s.abandoned) == (64, 64, 0, 0)
    assert s.items == len(session.items) < 64  # batched
    assert s.rows == sum(session.items) == sum(len(x) for x in inputs)
    assert s.sessions_opened == 1 and s.sessions_lost == 0 and s.failovers == 0
    assert s.latency.total == 64
    assert s.latency.counts[0] == 0  # nobody is answered faster than the session's 0.02 s
    assert s.latency.sum >= 64 * 0.02 and s.latency.sum >= 0.5  # the first callers waited for the auction
    assert lane.queued_rows == 0 and lane.in_flight == 0


async def test_each_failure_is_counted_under_its_reason(autojump_clock: trio.abc.Clock) -> None:
    lane = ModelLane(TARGET, Opener("3 providers declined"), LanePolicy())
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        out = await call_many(lane, [rows(1, i) for i in range(5)])
        nursery.cancel_scope.cancel()
    assert all(isinstance(y, ModelNotReady) for y in out)
    assert lane.stats.failures() == {"not_ready": 5, "overloaded": 0, "internal": 0}
    assert lane.stats.requests == 5 and lane.stats.latency.total == 0

    full = ModelLane(TARGET, Opener(FakeSession(1, latency=5.0)),
                     LanePolicy(batching=BatchPolicy(max_rows=2, max_queued_rows=4), window=1))
    async with trio.open_nursery() as callers:
        async with trio.open_nursery() as gateway:
            await gateway.start(full.run)
            for i in range(4):
                callers.start_soon(call_many, full, [rows(1, i)])
            await trio.testing.wait_all_tasks_blocked()
            assert full.queued_rows == 4  # the auction is still running: everything waits
            with pytest.raises(TooManyInferRequests):
                await full.infer(rows(1, 9))
            assert full.stats.failures() == {"not_ready": 0, "overloaded": 1, "internal": 0}
            assert full.stats.requests == 5  # the refused one was a request too
            gateway.cancel_scope.cancel()
    # the gateway stopping under the four waiting callers fails them as not_ready, not as a bug
    assert full.stats.failures() == {"not_ready": 4, "overloaded": 1, "internal": 0}
    assert full.stats.abandoned == 0 and settled(full.stats) == full.stats.requests


async def test_a_bug_in_the_lane_counts_internal_and_answers_500(autojump_clock: trio.abc.Clock) -> None:
    async def broken(target: LaneTarget, avoid: frozenset[bytes]) -> FakeSession:
        await trio.sleep(0.1)
        raise KeyError("a bug in the opener")

    lane = ModelLane(TARGET, broken, LanePolicy())
    errors: list[GatewayError] = []

    async def caller() -> None:
        try:
            await lane.infer(rows(1, 0))
        except GatewayError as exc:
            errors.append(exc)

    with pytest.RaisesGroup(pytest.RaisesGroup(KeyError)):  # the bug still propagates to the gateway's nursery
        async with trio.open_nursery() as nursery:
            await nursery.start(lane.run)
            nursery.start_soon(caller)
            await trio.sleep(1.0)
    assert [e.status for e in errors] == [500] and "KeyError" in errors[0].message
    assert lane.stats.failures() == {"not_ready": 0, "overloaded": 0, "internal": 1}


async def test_lost_items_count_as_sent_and_failovers_and_abandoned_callers_are_neither_answered_nor_failed(
        autojump_clock: trio.abc.Clock) -> None:
    first, second = FakeSession(1, lose_after=2, latency=0.5), FakeSession(2, latency=0.5)
    lane = ModelLane(TARGET, Opener(first, second), LanePolicy(batching=BatchPolicy(max_rows=1), window=1))
    gave_up = 0

    async def impatient(i: int) -> None:
        nonlocal gave_up
        with trio.move_on_after(0.7 + 0.3 * i) as scope:
            await lane.infer(rows(1, 100 + i))
        gave_up += scope.cancelled_caught

    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        for i in range(6):
            nursery.start_soon(impatient, i)
        out = await call_many(lane, [rows(1, i) for i in range(10)])
        nursery.cancel_scope.cancel()
    assert all(isinstance(y, np.ndarray) for y in out)
    s = lane.stats
    # A caller whose deadline fell in the very tick its answer was set sees the cancellation, yet its
    # request was answered: it counts as answered, not abandoned. Which callers those are, and whether the
    # lost item's callers had all given up already (then nothing is sent again), is up to trio's scheduling.
    assert gave_up >= 1 and 1 <= s.abandoned <= gave_up
    assert s.requests == 16 and settled(s) == 16 and s.failed == 0
    assert s.answered + s.abandoned == 16 and s.answered == s.latency.total
    assert s.sessions_opened == 2 and s.sessions_lost == 1
    assert s.items == len(first.items) + len(second.items)  # the lost item was sent too
    assert s.rows == s.items  # one row per item here


async def test_a_caller_that_gives_up_while_its_item_is_out_is_abandoned_not_answered(
        autojump_clock: trio.abc.Clock) -> None:
    session = FakeSession(1, latency=1.0)
    lane = ModelLane(TARGET, Opener(session), LanePolicy())
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        with trio.move_on_after(1.0):  # the auction takes 0.5 s, the item 1 s: given up mid-flight
            await lane.infer(rows(2, 0))
        assert lane.in_flight == 1
        await trio.sleep(1.0)  # the answer came back to nobody
        assert lane.in_flight == 0
        nursery.cancel_scope.cancel()
    s = lane.stats
    assert (s.requests, s.answered, s.abandoned, s.failed, s.items, s.rows) == (1, 0, 1, 0, 1, 2)
    assert s.latency.total == 0


async def test_gauges_show_the_queue_the_window_and_the_session(autojump_clock: trio.abc.Clock) -> None:
    lane = ModelLane(TARGET, Opener(FakeSession(1, latency=10.0)),
                     LanePolicy(batching=BatchPolicy(max_rows=2), window=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(lane.run)
        for i in range(5):
            nursery.start_soon(lane.infer, rows(1, i))
        await trio.sleep(1.0)  # the auction is over, one item of 2 rows is out
        assert (lane.in_flight, lane.queued_rows, lane.serving) == (1, 3, True)
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------- the service, across lanes


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.add(entry("mnist", "1", 5, 1))
    reg.add(entry("mnist", "2", 9, 2))
    return reg


async def test_counters_survive_a_lane_that_idles_out_and_go_on_in_the_next(registry: FakeRegistry,
                                                                             autojump_clock: trio.abc.Clock) -> None:
    opener = CountingOpener()
    config = GatewayConfig(idle_seconds=10.0, max_batch_rows=4)
    gw = InferenceGateway(lambda: registry, opener, config)  # type: ignore[arg-type,return-value]
    e = gw.resolve("mnist")
    assert gw.summary().enabled is False  # not running yet
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        assert gw.summary().enabled and gw.summary().models == ()
        assert all(not f.samples for f in gw.metric_families())  # the families are there before any model

        x = rows(3, 0)
        np.testing.assert_array_equal(await gw.infer(e, x), model(x))
        (view,) = gw.summary().models
        assert (view.model, view.model_id, view.state, view.session_open) == ("mnist@2", e.model_id, "AVAILABLE",
                                                                             True)
        before = scrape(gw.metric_families())

        await trio.sleep(11.0)  # past idle_seconds: the lane closed its session and ended
        assert gw.summary().models == () and opener.sessions[0].closed
        idle = scrape(gw.metric_families())
        for name in ("p2pgpu_gateway_requests_total", "p2pgpu_gateway_requests_answered_total",
                     "p2pgpu_gateway_items_total", "p2pgpu_gateway_rows_total",
                     "p2pgpu_gateway_sessions_opened_total", "p2pgpu_gateway_request_duration_seconds_count"):
            assert idle[(name, m("mnist@2"))] == before[(name, m("mnist@2"))] == (3 if "rows" in name else 1), name
        assert idle[("p2pgpu_gateway_session_open", m("mnist@2"))] == 0
        assert before[("p2pgpu_gateway_session_open", m("mnist@2"))] == 1

        xs = [rows(1 + i % 6, i) for i in range(20)]  # a new lane, many callers, some split over two items
        async with trio.open_nursery() as callers:
            for xi in xs:
                callers.start_soon(gw.infer, e, xi)
        after = scrape(gw.metric_families())
        nursery.cancel_scope.cancel()
    parts = sum(2 if len(xi) > 4 else 1 for xi in xs)
    assert len(opener.opened) == 2
    assert after[("p2pgpu_gateway_requests_total", m("mnist@2"))] == 1 + parts
    assert after[("p2pgpu_gateway_requests_answered_total", m("mnist@2"))] == 1 + parts
    assert after[("p2pgpu_gateway_rows_total", m("mnist@2"))] == 3 + sum(len(xi) for xi in xs)
    assert after[("p2pgpu_gateway_sessions_opened_total", m("mnist@2"))] == 2
    assert after[("p2pgpu_gateway_request_duration_seconds_count", m("mnist@2"))] == 1 + parts
    assert after[("p2pgpu_gateway_requests_failed_total", m("mnist@2", reason="not_ready"))] == 0
    for key, value in before.items():  # no counter went down
        if key[0].endswith(("_total", "_count", "_sum", "_bucket")):
            assert after[key] >= value, key
    stats = gw.stats()["mnist@2"]
    assert settled(stats) == stats.requests


async def test_two_models_are_labelled_apart(registry: FakeRegistry, autojump_clock: trio.abc.Clock) -> None:
    gw = InferenceGateway(lambda: registry, CountingOpener(), GatewayConfig())  # type: ignore[arg-type,return-value]
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        async with trio.open_nursery() as callers:
            for version, n in (("1", 2), ("2", 3)):
                for i in range(n):
                    callers.start_soon(gw.infer, gw.resolve("mnist", version), rows(1, i))
        page = scrape(gw.metric_families())
        assert [v.model for v in gw.summary().models] == ["mnist@1", "mnist@2"]
        nursery.cancel_scope.cancel()
    assert page[("p2pgpu_gateway_requests_answered_total", m("mnist@1"))] == 2
    assert page[("p2pgpu_gateway_requests_answered_total", m("mnist@2"))] == 3


def test_the_families_pass_the_checks_and_a_model_without_a_lane_shows_zero_gauges() -> None:
    done, busy = LaneStats(requests=4, answered=3, failed_overloaded=1, items=2, rows=3), LaneStats(requests=1)
    done.latency.observe(0.02)
    live = [GatewayModelView("b@1", b"\x02" * 32, "LOADING", queued_rows=5, in_flight=0, session_open=False)]
    families = gateway_metric_families({"a@1": done, "b@1": busy}, live)
    check_families(families)
    page = scrape(families)
    assert page[("p2pgpu_gateway_requests_failed_total", m("a@1", reason="overloaded"))] == 1
    assert page[("p2pgpu_gateway_queued_rows", m("a@1"))] == 0
    assert page[("p2pgpu_gateway_queued_rows", m("b@1"))] == 5
    assert page[("p2pgpu_gateway_request_duration_seconds_bucket", m("a@1", le="0.025"))] == 1
    assert page[("p2pgpu_gateway_request_duration_seconds_bucket", m("a@1", le="0.01"))] == 0


# ----------------------------------------------------------------- over HTTP


@pytest.fixture
async def served(registry: FakeRegistry) -> AsyncIterator[tuple[httpx.AsyncClient, InferenceGateway]]:
    gw = InferenceGateway(lambda: registry, CountingOpener(), GatewayConfig())  # type: ignore[arg-type,return-value]
    app = ApiApp(FakeNode(), gateway=gw)
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as client:
            yield client, gw
        nursery.cancel_scope.cancel()


async def test_metrics_page_and_status_show_the_gateway(served: tuple[httpx.AsyncClient, InferenceGateway],
                                                        autojump_clock: trio.abc.Clock) -> None:
    client, _ = served
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": x.ravel().tolist()}]}
    assert (await client.post("/v2/models/mnist/infer", json=body)).status_code == 200
    assert (await client.post("/v2/models/mnist/versions/1/infer", json=body)).status_code == 200
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    page = {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(resp.text) for s in fam.samples}
    assert page[("p2pgpu_head_height", ())] == 7  # the node's own families are still there
    for label in ("mnist@1", "mnist@2"):
        assert page[("p2pgpu_gateway_requests_total", m(label))] == 1
        assert page[("p2pgpu_gateway_rows_total", m(label))] == 2
        assert page[("p2pgpu_gateway_request_duration_seconds_count", m(label))] == 1
        assert page[("p2pgpu_gateway_session_open", m(label))] == 1
        for reason in ("not_ready", "overloaded", "internal"):
            assert page[("p2pgpu_gateway_requests_failed_total", m(label, reason=reason))] == 0
    status = await client.get("/status")
    assert status.status_code == 200, status.text
    section = status.json()["gateway"]
    assert section["enabled"] is True
    assert [(s["model"], s["state"], s["queued_rows"], s["in_flight"], s["session_open"])
            for s in section["models"]] == [("mnist@1", "AVAILABLE", 0, 0, True), ("mnist@2", "AVAILABLE", 0, 0, True)]
    assert section["models"][0]["model_id"] == "01" * 32


async def test_without_a_gateway_status_says_null_and_metrics_has_no_gateway_family() -> None:
    app = ApiApp(FakeNode())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as client:
        assert (await client.get("/status")).json()["gateway"] is None
        assert "p2pgpu_gateway" not in (await client.get("/metrics")).text
