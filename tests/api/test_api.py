"""The local HTTP API over real sockets: every endpoint, every refusal, and that it keeps serving."""

from __future__ import annotations

import json
import logging

import msgpack
import numpy as np
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ledger.codec import decode
from p2pgpu.api.app import ApiApp
from p2pgpu.api.server import RemoteBindRefused, serve_api
from p2pgpu.api.types import (
    MAX_BATCH_TASKS,
    MSGPACK,
    SubmitRequest,
    TaskResultWire,
    encode_submit,
    encode_submit_batch,
)
from tests.api.conftest import MAX_BODY, Served
from tests.api.fake_node import ALICE, PROVIDER, FakeNode, matmul_job, stream_job


def submission(**terms: object) -> bytes:
    spec, inputs = matmul_job()
    fields = {"max_unit_price": 10, "units": 1, "bid_window": 5, "audit_rate_bps": 500}
    fields.update(terms)
    return encode_submit(SubmitRequest(spec=spec, inputs=inputs, **fields))  # type: ignore[arg-type]


def assert_error(resp, status: int, code: str, mentions: str = "") -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error", "message"}
    assert body["error"] == code
    assert mentions.lower() in body["message"].lower()


async def assert_still_serving(s: Served) -> None:
    resp = await s.client.get("/ledger/head")
    assert resp.status_code == 200 and resp.json()["height"] == s.node.height


# ----------------------------------------------------------------- happy paths


@pytest.mark.parametrize(("state", "code"), [("ready", 200), ("syncing", 206), ("down", 503)])
async def test_health_status_code_tells_ready_from_syncing(served: Served, state: str, code: int) -> None:
    served.node.state = state
    resp = await served.client.get("/health")
    assert resp.status_code == code
    assert resp.json() == {"state": state, "head_height": 7, "peers": 3,
                           "detail": "" if state == "ready" else f"node is {state}"}


async def test_status(served: Served) -> None:
    body = (await served.client.get("/status")).json()
    assert body["peer_id"] == "12D3KooWfake"
    assert body["address"] == ALICE.hex()
    assert body["chain_id"] == "01" * 32
    assert body["roles"] == ["client", "provider"]
    assert body["head_height"] == 7


async def test_submit_then_follow_task_then_fetch_result(served: Served) -> None:
    resp = await served.client.post("/tasks", content=submission(), headers={"content-type": MSGPACK})
    assert resp.status_code == 201, resp.text
    task_id = resp.json()["task_id"]
    assert resp.headers["location"] == f"/tasks/{task_id}"
    (req,) = served.node.submitted
    assert req.max_unit_price == 10 and req.bid_window == 5 and req.audit_rate_bps == 500 and req.kind == "batch"
    np.testing.assert_array_equal(req.inputs["a"], matmul_job()[1]["a"])

    early = await served.client.get(f"/tasks/{task_id}/result")
    assert_error(early, 409, "task_not_ready", "no delivered result")

    stages = []
    for _ in range(6):
        view = (await served.client.get(f"/tasks/{task_id}")).json()
        stages.append(view["stage"])
    assert stages == ["posted", "bids", "assigned", "running", "delivered", "settled"]
    assert view["outcome"] == "paid"
    assert view["provider"] == PROVIDER.hex()
    assert view["bids"] == [{"provider": PROVIDER.hex(), "unit_price": 5, "est_seconds": 2, "expiry_height": 20}]
    assert list(view["timings"]) == stages and view["timings"]["settled"] == {"height": 12, "time_ms": 5000}

    result = await served.client.get(f"/tasks/{task_id}/result")
    assert result.status_code == 200 and result.headers["content-type"] == MSGPACK
    wire = decode(TaskResultWire, result.content)
    assert wire.task_id.hex() == task_id
    a, b = matmul_job()[1]["a"], matmul_job()[1]["b"]
    np.testing.assert_allclose(dict(wire.outputs)["c"], a @ b)


async def test_delete_result_is_refused_while_open_then_forgets_the_settled_task(served: Served) -> None:
    resp = await served.client.post("/tasks", content=submission(), headers={"content-type": MSGPACK})
    task_id = resp.json()["task_id"]
    assert_error(await served.client.delete(f"/tasks/{task_id}/result"), 409, "task_open", "still open")
    for _ in range(6):
        await served.client.get(f"/tasks/{task_id}")
    gone = await served.client.delete(f"/tasks/{task_id}/result")
    assert gone.status_code == 200 and gone.json() == {"task_id": task_id, "deleted": True}
    assert_error(await served.client.get(f"/tasks/{task_id}"), 404, "unknown_task", "no task")
    assert_error(await served.client.delete(f"/tasks/{task_id}/result"), 404, "unknown_task", "no task")


async def test_ledger_queries(served: Served) -> None:
    c = served.client
    assert (await c.get(f"/ledger/balance/{ALICE.hex()}")).json() == {"address": ALICE.hex(), "balance": 1000}
    assert (await c.get(f"/ledger/balance/0x{PROVIDER.hex().upper()}")).json()["balance"] == 0
    assert (await c.get(f"/ledger/accounts/{ALICE.hex()}")).json() == {"address": ALICE.hex(), "balance": 1000,
                                                                       "nonce": 4}
    (v,) = (await c.get("/ledger/validators")).json()["validators"]
    assert v == {"address": ALICE.hex(), "bls_pubkey": "09" * 48, "stake": 5000, "status": "active",
                 "jailed_until": 0, "in_committee": True}
    (p,) = (await c.get("/ledger/providers")).json()["providers"]
    assert p["address"] == PROVIDER.hex() and p["bond"] == 700 and bytes.fromhex(p["capabilities"]) == b'{"device":"cpu"}'
    head = (await c.get("/ledger/head")).json()
    assert head == {"height": 7, "block_hash": "02" * 32, "state_root": "05" * 32, "timestamp_ms": 1234}
    block = (await c.get("/ledger/blocks/3")).json()
    block_obj = await served.node.block(3)
    assert block["height"] == 3 and block["hash"] == block_obj.header.block_hash().hex()
    assert block["header"]["proposer"] == ALICE.hex() and block["header"]["last_commit"] is None
    (tx,) = block["transactions"]
    assert tx["body"] == {"type": "Transfer", "sender": ALICE.hex(), "nonce": 1, "fee": 1, "to": PROVIDER.hex(),
                          "amount": 10}


async def test_ledger_supply_gives_every_bucket_and_whether_they_add_up(served: Served) -> None:
    books = (await served.client.get("/ledger/supply")).json()
    assert books == {"height": 7, "balances": 9_000, "escrow": 110, "collateral": 20, "dispute_bonds": 50,
                     "stake": 40_000, "unbonding": 500, "provider_bonds": 3_000, "fee_pool": 0, "burned": 4,
                     "minted": 21, "genesis_supply": 52_663, "total": 52_684, "conserved": True}
    # What a reader outside the node can check for themselves:
    buckets = ("balances", "escrow", "collateral", "dispute_bonds", "stake", "unbonding", "provider_bonds",
               "fee_pool", "burned")
    assert sum(books[b] for b in buckets) == books["total"] == books["genesis_supply"] + books["minted"]


async def test_client_reads_the_supply(served: Served) -> None:
    from p2pgpu.api.client import ApiClient

    def read() -> dict:
        with ApiClient(served.url, timeout=10.0) as client:
            return client.supply()

    with trio.fail_after(30):
        books = await trio.to_thread.run_sync(read)
    assert books["total"] == 52_684 and books["conserved"] is True and books["height"] == 7


async def test_metrics_parse_as_prometheus_text(served: Served) -> None:
    resp = await served.client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    assert families["p2pgpu_head_height"].type == "gauge"
    assert families["p2pgpu_head_height"].samples[0].value == 7
    weird = [s for s in families["p2pgpu_tasks"].samples if s.labels["stage"] != "posted"]
    assert weird[0].labels["stage"] == 'we"ird\\\n'  # escaped on the wire, intact after parsing
    hist = families["p2pgpu_stage_seconds"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.1": 1, "1": 2, "10": 3, "+Inf": 3}
    assert "# HELP p2pgpu_head_height Height of the last finalized block." in resp.text


# ----------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("path", "status", "code", "mentions"),
    [
        ("/ledger/balance/xyz", 400, "bad_address", "not hex"),
        ("/ledger/balance/abcd", 400, "bad_address", "expected 20"),
        ("/ledger/balance/" + "a" * 39, 400, "bad_address", "not hex"),
        ("/ledger/accounts/" + "ff" * 20, 404, "unknown_account", "no account"),
        ("/tasks/" + "0" * 64, 404, "unknown_task", "no task"),
        ("/tasks/nothex", 400, "bad_task_id", "task id"),
        ("/tasks/" + "0" * 64 + "/result", 404, "unknown_task", "no task"),
        ("/ledger/blocks/99", 404, "unknown_block", "head is 7"),
        ("/ledger/blocks/-1", 400, "bad_height", "height"),
        ("/ledger/blocks/" + "9" * 21, 400, "bad_height", "height"),
        ("/nowhere", 404, "no_route", "/nowhere"),
    ],
)
async def test_bad_paths_get_json_errors(served: Served, path: str, status: int, code: str, mentions: str) -> None:
    assert_error(await served.client.get(path), status, code, mentions)
    await assert_still_serving(served)


async def test_wrong_method(served: Served) -> None:
    assert_error(await served.client.get("/tasks"), 405, "method_not_allowed", "POST")
    assert_error(await served.client.delete("/ledger/head"), 405, "method_not_allowed", "GET")
    await assert_still_serving(served)


async def test_stream_submission_carries_its_items_beside_the_spec(served: Served) -> None:
    spec, inputs, items = stream_job(5)
    body = encode_submit(SubmitRequest(spec=spec, inputs={**inputs, "items": items}, max_unit_price=2, units=5,
                                       kind="stream"))
    resp = await served.client.post("/tasks", content=body, headers={"content-type": MSGPACK})
    assert resp.status_code == 201, resp.text
    (req,) = served.node.submitted
    assert req.kind == "stream" and req.units == 5 and "items" not in req.spec.input_dict()
    np.testing.assert_array_equal(req.inputs["items"], items)


async def test_stream_items_that_do_not_fit_the_model_are_refused_naming_the_item(served: Served) -> None:
    spec, inputs, items = stream_job(5)
    items[3, 2] = np.nan
    for rows, mentions in ((items, "item 3 holds NaN"), (items[:, :6], "item 0 (and every item): shape (6,)")):
        body = encode_submit(SubmitRequest(spec=spec, inputs={**inputs, "items": rows}, max_unit_price=2, units=5,
                                           kind="stream"))
        resp = await served.client.post("/tasks", content=body, headers={"content-type": MSGPACK})
        assert_error(resp, 422, "invalid_items", mentions)
    assert served.node.submitted == []
    await assert_still_serving(served)


async def test_dispute_one_stream_item(served: Served) -> None:
    spec, inputs, items = stream_job(5)
    body = encode_submit(SubmitRequest(spec=spec, inputs={**inputs, "items": items}, max_unit_price=2, units=5,
                                       kind="stream"))
    task_id = (await served.client.post("/tasks", content=body, headers={"content-type": MSGPACK})).json()["task_id"]
    resp = await served.client.post(f"/tasks/{task_id}/disputes", json={"item": 3, "reason": "looks wrong"})
    assert resp.status_code == 202 and resp.json() == {"task_id": task_id, "item": 3, "status": "submitted"}
    assert served.node.disputes == [(bytes.fromhex(task_id), 3, "looks wrong")]
    batch = (await served.client.post("/tasks", content=submission(),
                                      headers={"content-type": MSGPACK})).json()["task_id"]
    for path, body, ctype, status, code, mentions in (
        (f"/tasks/{task_id}/disputes", b'{"item": 9}', "application/json", 422, "unknown_item", "item 9"),
        (f"/tasks/{batch}/disputes", b'{"item": 0}', "application/json", 422, "not_streaming", "no stream"),
        (f"/tasks/{'ab' * 32}/disputes", b'{"item": 0}', "application/json", 404, "unknown_task", "no task"),
        (f"/tasks/{task_id}/disputes", b'{"item": -1}', "application/json", 400, "bad_dispute", "dispute.item"),
        (f"/tasks/{task_id}/disputes", b'{"item": "3"}', "application/json", 400, "bad_dispute", "dispute.item"),
        (f"/tasks/{task_id}/disputes", b'{"item": 1, "why": "x"}', "application/json", 400, "bad_dispute", "why"),
        (f"/tasks/{task_id}/disputes", b'{"item": 1, "reason": 7}', "application/json", 400, "bad_dispute",
         "dispute.reason"),
        (f"/tasks/{task_id}/disputes", b"[1]", "application/json", 400, "bad_dispute", "JSON object"),
        (f"/tasks/{task_id}/disputes", b"\xff", "application/json", 400, "bad_dispute", "not JSON"),
        (f"/tasks/{task_id}/disputes", b'{"item": 1}', "text/plain", 415, "wrong_content_type", "application/json"),
        ("/tasks/zz/disputes", b'{"item": 1}', "application/json", 400, "bad_task_id", "not hex"),
    ):
        assert_error(await served.client.post(path, content=body, headers={"content-type": ctype}),
                     status, code, mentions)
    assert len(served.node.disputes) == 1
    await assert_still_serving(served)


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code", "mentions"),
    [
        (b"{}", "application/json", 415, "wrong_content_type", "application/msgpack"),
        (b"\x93\x01", None, 415, "wrong_content_type", "no content type"),
        (b"\xc1garbage", MSGPACK, 400, "malformed_body", "malformed"),
        (msgpack.packb([1, 2, 3]), MSGPACK, 400, "malformed_body", "SubmitTaskWire"),
        (submission() + b"\x00", MSGPACK, 400, "malformed_body", "trailing"),
        (submission(audit_rate_bps=20_000), MSGPACK, 422, "invalid_terms", "audit_rate_bps"),
        (submission(bid_window=0), MSGPACK, 422, "invalid_terms", "bid_window"),
        (submission(max_unit_price=10_000), MSGPACK, 402, "insufficient_funds", "escrow"),
    ],
)
async def test_bad_submissions(served: Served, body: bytes, ctype: str | None, status: int, code: str,
                               mentions: str) -> None:
    headers = {"content-type": ctype} if ctype else {}
    assert_error(await served.client.post("/tasks", content=body, headers=headers), status, code, mentions)
    assert served.node.submitted == []
    await assert_still_serving(served)


async def test_invalid_spec_is_refused_with_the_kernels_reason(served: Served) -> None:
    spec, inputs = matmul_job()
    # Inputs that do not hash to the spec's blob refs.
    tampered = {"a": inputs["a"] + 1, "b": inputs["b"]}
    body = encode_submit(SubmitRequest(spec=spec, inputs=tampered, max_unit_price=10))
    resp = await served.client.post("/tasks", content=body, headers={"content-type": MSGPACK})
    assert_error(resp, 422, "invalid_spec", "BlobHashMismatch")
    # Inner dimensions that cannot multiply: the kernel's own validation speaks.
    a = np.zeros((2, 3), np.float32)
    from kernels.spec import blob_ref, make_spec
    bad = make_spec("matmul", 1, {}, {"a": a, "b": np.zeros((3, 2), np.float32)})
    bad = type(bad)(bad.kernel, bad.version, bad.params, (("a", blob_ref(a)), ("b", blob_ref(a))),
                    bad.requirements, bad.limits)
    body = encode_submit(SubmitRequest(spec=bad, inputs={"a": a, "b": a}, max_unit_price=10))
    resp = await served.client.post("/tasks", content=body, headers={"content-type": MSGPACK})
    assert_error(resp, 422, "invalid_spec", "inner dimensions")
    assert served.node.submitted == []
    await assert_still_serving(served)


# ----------------------------------------------------------------- batches


def tampered_submission() -> bytes:
    """A well-formed submission whose inputs do not hash to its spec's blob refs."""
    spec, inputs = matmul_job()
    return encode_submit(SubmitRequest(spec=spec, inputs={"a": inputs["a"] + 1, "b": inputs["b"]},
                                       max_unit_price=10))


async def post_batch(s: Served, body: bytes, ctype: str | None = MSGPACK):
    with trio.fail_after(10):
        return await s.client.post("/tasks/batch", content=body, headers={"content-type": ctype} if ctype else {})


async def test_batch_answers_every_task_in_request_order(served: Served) -> None:
    bodies = [
        submission(max_unit_price=11),
        b"\xc1 not a submission",              # garbled bytes inside one slot
        tampered_submission(),                 # a spec the kernels refuse
        submission(max_unit_price=10_000),     # more than the balance can escrow
        submission(max_unit_price=12, bid_window=0),
        submission(max_unit_price=13),
    ]
    resp = await post_batch(served, encode_submit_batch(bodies))
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["index"] for r in results] == list(range(len(bodies)))
    errors = {r["index"]: (r["status"], r["error"]) for r in results if "error" in r}
    assert errors == {1: (400, "malformed_body"), 2: (422, "invalid_spec"), 3: (402, "insufficient_funds"),
                      4: (422, "invalid_terms")}
    assert "BlobHashMismatch" in results[2]["message"] and "escrow" in results[3]["message"]
    assert set(results[0]) == {"index", "task_id"}
    # Each accepted index names the task made from that index's submission, and it is a real task.
    for index, price in ((0, 11), (5, 13)):
        task_id = bytes.fromhex(results[index]["task_id"])
        assert served.node.tasks[task_id].request.max_unit_price == price
        view = (await served.client.get(f"/tasks/{task_id.hex()}")).json()
        assert view["stage"] == "posted"
    assert len(served.node.submitted) == 2
    await assert_still_serving(served)


async def test_batch_submits_concurrently(served: Served) -> None:
    # The fake holds each submission until all three are in flight: a one-at-a-time fan-out would time out.
    served.node.hold_submissions = 3
    resp = await post_batch(served, encode_submit_batch([submission(max_unit_price=p) for p in (7, 8, 9)]))
    assert resp.status_code == 200, resp.text
    assert all("task_id" in r for r in resp.json()["results"])
    assert sorted(r.max_unit_price for r in served.node.submitted) == [7, 8, 9]


async def test_batch_node_bug_fails_only_that_task(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    real = served.node.submit_task

    async def buggy(request: SubmitRequest) -> bytes:
        if request.max_unit_price == 13:
            raise RuntimeError("simulated bug for one task")
        return await real(request)

    served.node.submit_task = buggy  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="p2pgpu.api"):
        resp = await post_batch(served, encode_submit_batch([submission(max_unit_price=p) for p in (12, 13, 14)]))
    results = resp.json()["results"]
    assert resp.status_code == 200 and "task_id" in results[0] and "task_id" in results[2]
    assert results[1] == {"index": 1, "status": 500, "error": "internal_error",
                          "message": "RuntimeError: simulated bug for one task"}
    assert any("simulated bug for one task" in (r.exc_text or "") for r in caplog.records)
    await assert_still_serving(served)


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code", "mentions"),
    [
        (msgpack.packb({"tasks": []}), MSGPACK, 400, "empty_batch", "no tasks"),
        (msgpack.packb({"tasks": [b""] * (MAX_BATCH_TASKS + 1)}), MSGPACK, 400, "too_many_tasks",
         f"{MAX_BATCH_TASKS + 1} tasks in one batch; at most {MAX_BATCH_TASKS}"),
        (encode_submit_batch([b"x"]), "application/json", 415, "wrong_content_type", "POST /tasks/batch takes"),
        (encode_submit_batch([b"x"]), None, 415, "wrong_content_type", "no content type"),
        (submission(), MSGPACK, 400, "malformed_body", '{"tasks": [bin, ...]}'),
        (msgpack.packb({"tasks": [b"x"], "more": 1}), MSGPACK, 400, "malformed_body", "malformed batch"),
        (msgpack.packb({"tasks": 3}), MSGPACK, 400, "malformed_body", "malformed batch"),
        (encode_submit_batch([submission()])[:-5], MSGPACK, 400, "malformed_body", "ends inside the tasks list"),
        (encode_submit_batch([submission()]) + b"\x00", MSGPACK, 400, "malformed_body", "trailing bytes"),
    ],
)
async def test_bad_batches_are_refused_whole(served: Served, body: bytes, ctype: str | None, status: int, code: str,
                                             mentions: str) -> None:
    assert_error(await post_batch(served, body, ctype), status, code, mentions)
    assert served.node.submitted == []
    await assert_still_serving(served)


async def test_batch_slot_that_is_not_bytes_fails_alone(served: Served) -> None:
    body = msgpack.packb({"tasks": [submission(), {"spec": "inline"}, 7]}, use_bin_type=True)
    results = (await post_batch(served, body)).json()["results"]
    assert "task_id" in results[0]
    assert [(r["status"], r["error"]) for r in results[1:]] == [(400, "malformed_body")] * 2
    assert "tasks[1]: expected the bytes of one POST /tasks body" in results[1]["message"]


async def test_batch_over_the_body_limit_is_413(served: Served) -> None:
    body = encode_submit_batch([submission()] * (MAX_BODY // len(submission()) + 1))
    assert len(body) > MAX_BODY
    assert_error(await post_batch(served, body), 413, "body_too_large", str(MAX_BODY))
    assert served.node.submitted == []
    await assert_still_serving(served)


async def test_oversized_body_refused_by_declared_length(served: Served) -> None:
    big = np.zeros((MAX_BODY // 4 + 16,), np.float32)
    from kernels.spec import make_spec
    spec = make_spec("matmul", 1, {}, {"a": big.reshape(1, -1), "b": big.reshape(-1, 1)})
    body = encode_submit(SubmitRequest(spec=spec, inputs={"a": big.reshape(1, -1), "b": big.reshape(-1, 1)},
                                       max_unit_price=10))
    assert len(body) > MAX_BODY
    resp = await served.client.post("/tasks", content=body, headers={"content-type": MSGPACK})
    assert_error(resp, 413, "body_too_large", str(MAX_BODY))
    await assert_still_serving(served)


async def test_oversized_body_refused_while_streaming(served: Served) -> None:
    async def chunks():
        for _ in range(MAX_BODY // 4096 + 8):
            yield b"\x00" * 4096

    try:
        resp = await served.client.post("/tasks", content=chunks(), headers={"content-type": MSGPACK})
    except Exception as exc:  # the server may close before the client finishes sending; that is a refusal too
        import httpx
        assert isinstance(exc, httpx.TransportError)
    else:
        assert_error(resp, 413, "body_too_large", "limit")
    await assert_still_serving(served)


@pytest.mark.parametrize("method", ["health", "status", "task", "balance", "supply", "metrics", "submit_task"])
async def test_handler_bug_is_500_and_server_keeps_serving(served: Served, method: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    served.node.fail = method
    paths = {"health": ("GET", "/health"), "status": ("GET", "/status"), "task": ("GET", "/tasks/" + "1" * 64),
             "balance": ("GET", f"/ledger/balance/{ALICE.hex()}"), "supply": ("GET", "/ledger/supply"),
             "metrics": ("GET", "/metrics"),
             "submit_task": ("POST", "/tasks")}
    verb, path = paths[method]
    with caplog.at_level(logging.ERROR, logger="p2pgpu.api"):
        if verb == "POST":
            resp = await served.client.post(path, content=submission(), headers={"content-type": MSGPACK})
        else:
            resp = await served.client.get(path)
    assert_error(resp, 500, "internal_error", f"simulated bug in {method}")
    assert any(f"simulated bug in {method}" in (r.exc_text or "") for r in caplog.records)
    served.node.fail = None
    await assert_still_serving(served)


async def test_bad_metric_from_node_is_500_not_a_broken_page(served: Served) -> None:
    from p2pgpu.metrics_text import gauge

    async def bad_metrics():
        return [gauge("bad name", "x", 1)]

    served.node.metrics = bad_metrics  # type: ignore[method-assign]
    assert_error(await served.client.get("/metrics"), 500, "internal_error", "bad name")
    await assert_still_serving(served)


async def test_refuses_non_loopback_bind_without_allow_remote() -> None:
    with pytest.raises(RemoteBindRefused, match="0.0.0.0"):
        await serve_api(FakeNode(), "0.0.0.0", 0)


async def test_stops_cleanly_on_cancellation() -> None:
    import httpx

    node = FakeNode()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(lambda task_status: serve_api(node, "127.0.0.1", 0, task_status=task_status))
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200
            nursery.cancel_scope.cancel()
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{port}/health")


def test_app_answers_json_for_every_route() -> None:
    # Routes are declared once; each has a handler and compiles to an anchored pattern.
    app = ApiApp(FakeNode())
    paths = sorted({route.regex.pattern for route in app.routes})
    assert all(p.startswith("^/") and p.endswith("$") for p in paths)
    assert len(app.routes) == 22  # 16 + the model registry: GET /ledger/models, /ledger/models/{ref}, its
    # /providers, POST /models, GET /models/{model_id}; + /openapi.json (under the read scope)
    json.dumps(paths)


async def test_a_result_long_poll_takes_a_wait_in_seconds(served: Served) -> None:
    task_id = (await served.client.post("/tasks", content=submission(), headers={"content-type": MSGPACK})).json()[
        "task_id"]
    early = await served.client.get(f"/tasks/{task_id}/result?wait=0.5")
    assert_error(early, 409, "task_not_ready", "no delivered result")
    assert served.node.result_waits == [0.5]
    for bad in ("abc", "-1", "1e3", "61", "", "１"):
        resp = await served.client.get(f"/tasks/{task_id}/result?wait={bad}")
        assert_error(resp, 400, "bad_wait", "wait=")
    assert served.node.result_waits == [0.5]  # refused before the node was asked


async def test_terms_out_of_range_are_refused_with_the_allowed_range(served: Served) -> None:
    batch_units = await served.client.post("/tasks", content=submission(units=5),
                                           headers={"content-type": MSGPACK})
    assert_error(batch_units, 422, "invalid_terms", "exactly 1 unit")
    wide = await served.client.get("/ledger/blocks/\uff11\uff12")  # full-width digits are not a height
    assert wide.status_code == 400
