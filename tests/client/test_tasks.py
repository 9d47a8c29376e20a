"""Tasks and models through the SDK against the real API server (FakeNode behind it, real HTTP on loopback).

The sync client runs in a worker thread (the server is on this test's Trio
loop); the async client runs here, under Trio, and once under asyncio
against a server on its own Trio loop in a thread. FakeNode moves a task one
stage per look, so ``wait`` sees every stage without timers.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import trio

from kernels.bundle import load_model_file, model_id
from kernels.spec import make_spec
from p2pgpu.api.server import serve_api
from p2pgpu.api.types import STAGES
from p2pgpu.client import (
    AsyncClient,
    Client,
    Forbidden,
    InsufficientFunds,
    InvalidInput,
    InvalidModelFile,
    ModelNotFound,
    NotReady,
    RateLimited,
    TaskNotFound,
    TaskView,
    Unauthorized,
    WaitTimeout,
)
from tests.api.conftest import Served
from tests.api.fake_node import ALICE, FakeNode, matmul_job, stream_job
from tests.api.test_auth import READER, SUBMITTER, TOKENS
from tests.kernels.helpers import dense_model

T = TypeVar("T")
POLL = 0.01


async def in_thread(fn: Callable[[], T]) -> T:
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(fn)


def expected_c() -> np.ndarray:
    _, inputs = matmul_job()
    return (inputs["a"].astype(np.float64) @ inputs["b"].astype(np.float64)).astype(np.float32)


def npz_model(tmp_path: Path) -> Path:
    inputs, _ = dense_model(4, [(3, "relu"), (2, "softmax")])
    np.savez(tmp_path / "m.npz", **inputs)
    return tmp_path / "m.npz"


# ------------------------------------------------------------------ tasks


async def test_sync_submit_wait_result(served: Served) -> None:
    spec, inputs = matmul_job()
    stages: list[str] = []

    def run() -> tuple[str, TaskView, TaskView, dict[str, np.ndarray], int]:
        with Client(served.url) as client:
            tid = client.submit(spec, inputs, max_unit_price=11)
            first = client.task(tid)
            final = client.wait(tid, on_progress=lambda v: stages.append(v.stage), poll=POLL)
            waits = len(served.node.result_waits)
            return tid, first, final, client.result(tid), waits

    tid, first, final, outputs, waits = await in_thread(run)
    assert first.task_id.hex() == tid and first.stage == "posted"
    assert final.stage == "settled" and final.outcome == "paid"
    assert stages == list(STAGES[1:])  # the first look was task(); each later stage reported once
    np.testing.assert_array_equal(outputs["c"], expected_c())
    assert len(served.node.result_waits) == waits  # result() used what wait's long poll brought
    assert any(w > 0 for w in served.node.result_waits)  # the long poll was used
    assert served.node.tasks[bytes.fromhex(tid)].request.max_unit_price == 11


async def test_async_wait_until_delivered_then_result_and_async_progress(served: Served) -> None:
    spec, inputs = matmul_job()
    seen: list[str] = []

    async def progress(view: TaskView) -> None:
        await trio.sleep(0)
        seen.append(view.stage)

    async with AsyncClient(served.url) as client:
        tid = await client.submit(spec, inputs, max_unit_price=5)
        view = await client.wait(tid, until="delivered", on_progress=progress, poll=POLL)
        assert view.stage in ("delivered", "settled")
        assert seen == list(STAGES[: STAGES.index(view.stage) + 1])
        np.testing.assert_array_equal((await client.result(tid))["c"], expected_c())
        np.testing.assert_array_equal((await client.result(bytes.fromhex(tid)))["c"], expected_c())  # downloaded


async def test_task_that_ends_without_result(served: Served) -> None:
    served.node.next_outcome = "expired"
    spec, inputs = matmul_job()
    async with AsyncClient(served.url) as client:
        tid = await client.submit(spec, inputs, max_unit_price=5)
        view = await client.wait(tid, poll=POLL)
        assert view.stage == "settled" and view.outcome == "expired"
        with pytest.raises(NotReady, match="no delivered result") as info:
            await client.result(tid)
        assert info.value.code == "task_not_ready"


async def test_wait_timeout_keeps_the_last_view(served: Served) -> None:
    spec, inputs = matmul_job()
    async with AsyncClient(served.url) as client:
        tid = await client.submit(spec, inputs, max_unit_price=5)
        with pytest.raises(WaitTimeout, match="still posted") as info:
            await client.wait(tid, timeout=0, poll=POLL)
        assert info.value.view.stage == "posted"
        with pytest.raises(InvalidInput, match="poll"):
            await client.wait(tid, poll=0)


async def test_task_refusals(served: Served) -> None:
    spec, inputs = matmul_job()
    async with AsyncClient(served.url) as client:
        with pytest.raises(TaskNotFound, match="no task") as info:
            await client.task("22" * 32)
        assert info.value.status == 404 and info.value.code == "unknown_task"
        with pytest.raises(InvalidInput, match="not 64 hex digits"):
            await client.task("xyz")
        with pytest.raises(InsufficientFunds):
            await client.submit(spec, inputs, max_unit_price=10_000)
        for terms, words in (({"max_unit_price": 0}, "max_unit_price"),
                             ({"max_unit_price": 5, "units": 2}, "exactly 1 unit"),
                             ({"max_unit_price": 5, "audit_rate": 2.0}, "audit_rate"),
                             ({"max_unit_price": 5, "bid_window": 0}, "bid_window")):
            with pytest.raises(InvalidInput, match=words):
                await client.submit(spec, inputs, **terms)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="invalid job spec"):  # the node's 422, a subclass of InvalidInput
            await client.submit(spec, {"a": inputs["a"]}, max_unit_price=5)
    assert len(served.node.submitted) == 0


async def test_stream_task(served: Served) -> None:
    spec, inputs, rows = stream_job(items=3)
    async with AsyncClient(served.url) as client:
        tid = await client.submit(spec, inputs, items=rows, max_unit_price=5)
        request = served.node.tasks[bytes.fromhex(tid)].request
        assert request.kind == "stream" and request.units == 3
        await client.wait(tid, poll=POLL)
        np.testing.assert_allclose((await client.result(tid))["outputs"], rows.sum(axis=1, keepdims=True))


async def test_many_concurrent_submit_and_wait_on_one_client(served: Served) -> None:
    served.node.balances[ALICE] = 10**9
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    outputs: dict[int, np.ndarray] = {}
    progress: dict[int, list[str]] = {}

    async with AsyncClient(served.url) as client:
        async def one(i: int) -> None:
            b = np.full((3, 4), i, dtype=np.float32)
            tid = await client.submit(make_spec("matmul", 1, {}, {"a": a, "b": b}), {"a": a, "b": b},
                                      max_unit_price=5)
            progress[i] = []
            await client.wait(tid, on_progress=lambda v: progress[i].append(v.stage), poll=POLL)
            outputs[i] = (await client.result(tid))["c"]

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(one, i)
    assert len(served.node.tasks) == 20
    for i in range(20):
        np.testing.assert_array_equal(outputs[i], a @ np.full((3, 4), i, dtype=np.float32))
        assert progress[i] == list(STAGES)


# ------------------------------------------------------------------ models


async def test_push_list_look_up_and_submit_by_model(served: Served, tmp_path: Path) -> None:
    path = npz_model(tmp_path)
    mid = model_id(load_model_file(path)).hex()

    def run() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], str]:
        with Client(served.url) as client:
            pushed = client.push_model(path, name="mnist", royalty=2, wait=True, poll=POLL)
            listed = client.models()
            by_version = client.model("mnist@1")
            tid = client.submit_model("mnist", np.ones((5, 4), np.float32), max_unit_price=5)
            return pushed, listed, by_version, tid

    pushed, listed, by_version, tid = await in_thread(run)
    assert pushed["status"] == "registered" and pushed["model_id"] == mid
    (request,) = served.node.model_pushes
    assert (request.name, request.version, request.royalty_per_unit) == ("mnist", "1", 2)
    assert [m["model_id"] for m in listed] == [mid] and by_version["model_id"] == mid
    task_request = served.node.tasks[bytes.fromhex(tid)].request
    assert task_request.spec.kernel == "keras_infer" and task_request.spec.param_dict()["model_id"] == mid
    assert set(task_request.inputs) == {"x"}  # no weights sent
    async with AsyncClient(served.url) as client:
        assert (await client.model(mid))["name"] == "mnist"
        await client.wait(tid, poll=POLL)
        np.testing.assert_array_equal((await client.result(tid))["y"], np.full((5, 1), 4, np.float32))
        pending = await client.push_model(path, name="mnist", version="2")
        assert pending["status"] == "pending"
        assert (await client.model_push(pending["model_id"]))["status"] == "registered"
        assert (await client.model("mnist"))["version"] == "2"  # the latest (FakeNode keys models by id)


async def test_model_refusals_before_and_at_the_node(served: Served, tmp_path: Path) -> None:
    good = npz_model(tmp_path)
    (tmp_path / "bad.keras").write_bytes(b"PK\x03\x04truncated")
    async with AsyncClient(served.url) as client:
        with pytest.raises(ModelNotFound, match="no registered model") as info:
            await client.model("nothing")
        assert info.value.code == "unknown_model"
        with pytest.raises(ModelNotFound):
            await client.submit_model("nothing", np.ones((1, 4), np.float32), max_unit_price=5)
        for kwargs, words in (({"name": "Bad Name"}, "name 'Bad Name'"),
                              ({"name": "ok", "version": "v 2"}, "version 'v 2'"),
                              ({"name": "ok", "royalty": -1}, "royalty -1")):
            with pytest.raises(InvalidInput, match=words):
                await client.push_model(good, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(InvalidModelFile, match="TruncatedArchive"):
            await client.push_model(tmp_path / "bad.keras", name="ok")
        with pytest.raises(InvalidModelFile, match="missing.npz"):
            await client.push_model(tmp_path / "missing.npz", name="ok")
        served.node.balances[ALICE] = 0
        with pytest.raises(InsufficientFunds):
            await client.push_model(good, name="ok")
    assert served.node.model_pushes == []


# ------------------------------------------------------------------ tokens


async def test_tokens_unauthorized_forbidden_rate_limited(nursery: trio.Nursery) -> None:
    node = FakeNode(balances={ALICE: 10**9})
    port = await nursery.start(lambda task_status: serve_api(node, "127.0.0.1", 0, tokens=TOKENS,
                                                             task_status=task_status))
    url = f"http://127.0.0.1:{port}"
    spec, inputs = matmul_job()
    async with AsyncClient(url) as anonymous:
        with pytest.raises(Unauthorized):
            await anonymous.models()
    async with AsyncClient(url, token=READER) as reader:
        assert await reader.models() == []
        with pytest.raises(Forbidden, match="scope"):
            await reader.submit(spec, inputs, max_unit_price=5)
    async with AsyncClient(url, token=SUBMITTER) as submitter:
        await submitter.submit(spec, inputs, max_unit_price=50)  # commits 53 of the token's 100 per hour
        with pytest.raises(RateLimited, match="left") as info:
            await submitter.submit(spec, inputs, max_unit_price=50)
        assert info.value.code == "spend_limit" and info.value.retry_after is not None
        assert info.value.retry_after > 0


# ------------------------------------------------------------------ asyncio


@pytest.fixture
def threaded_server() -> Iterator[tuple[str, FakeNode]]:
    """The real API server on its own Trio loop in a thread, for a test that runs asyncio in the main thread."""
    node = FakeNode()
    ready: queue.Queue[tuple[int, trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue()

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(lambda task_status: serve_api(node, "127.0.0.1", 0,
                                                                         task_status=task_status))
                ready.put((port, trio.lowlevel.current_trio_token(), scope))

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    port, token, scope = ready.get(timeout=30)
    try:
        yield f"http://127.0.0.1:{port}", node
    finally:
        token.run_sync_soon(scope.cancel)
        thread.join(timeout=30)


def test_async_client_under_asyncio_against_the_real_api(threaded_server: tuple[str, FakeNode],
                                                         tmp_path: Path) -> None:
    url, node = threaded_server
    spec, inputs = matmul_job()
    path = npz_model(tmp_path)

    async def scenario() -> list[dict[str, np.ndarray]]:
        async with AsyncClient(url) as client:
            await client.push_model(path, name="tiny", wait=True, poll=POLL)  # the bundle is read in a thread
            tids = await asyncio.gather(*(client.submit(spec, inputs, max_unit_price=5) for _ in range(5)))
            await asyncio.gather(*(client.wait(t, poll=POLL) for t in tids))
            return list(await asyncio.gather(*(client.result(t) for t in tids)))

    results = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert len(node.tasks) == 5 and len(node.model_pushes) == 1
    for outputs in results:
        np.testing.assert_array_equal(outputs["c"], expected_c())
