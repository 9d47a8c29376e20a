"""``ApiClient.submit_many``: one answer per request, in order, however the batch route answers.

Against a real server (FakeNode behind it) for the happy path; against an
``httpx.MockTransport`` for chunking and for the ways a chunk can fail.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import numpy as np
import pytest
import trio

from kernels.spec import make_spec
from p2pgpu.api import client as client_module
from p2pgpu.api.client import ApiClient, ApiUnreachable
from p2pgpu.api.types import (
    MSGPACK,
    ApiError,
    BadRequest,
    PayloadTooLarge,
    PaymentRequired,
    SubmitRequest,
    Unavailable,
    Unprocessable,
    decode_submit,
    decode_submit_batch,
)
from tests.api.conftest import Served
from tests.api.fake_node import matmul_job


def request(price: int = 10, **terms: object) -> SubmitRequest:
    spec, inputs = matmul_job()
    return SubmitRequest(spec=spec, inputs=inputs, max_unit_price=price, **terms)  # type: ignore[arg-type]


async def test_submit_many_through_the_api(served: Served) -> None:
    def run() -> list[bytes | ApiError]:
        with ApiClient(served.url) as client:
            return client.submit_many([request(11), request(10_000), request(12)])

    with trio.fail_after(10):
        first, refused, last = await trio.to_thread.run_sync(run)
    assert isinstance(refused, PaymentRequired) and refused.code == "insufficient_funds"
    assert isinstance(first, bytes) and isinstance(last, bytes)
    assert served.node.tasks[first].request.max_unit_price == 11
    assert served.node.tasks[last].request.max_unit_price == 12


Handler = Callable[[httpx.Request], httpx.Response]


def fake_batch_route(calls: list[int], *, body_limit: int | None = None) -> Handler:
    """Answers POST /tasks/batch like the node: a task id per good task (its price in the first byte)."""

    def handle(req: httpx.Request) -> httpx.Response:
        assert req.url.path == "/tasks/batch" and req.headers["content-type"] == MSGPACK
        if body_limit is not None and len(req.content) > body_limit:
            return httpx.Response(413, json={"error": "body_too_large", "message": "too big"})
        slots = decode_submit_batch(req.content)
        calls.append(len(slots))
        results = []
        for i, slot in enumerate(slots):
            assert isinstance(slot, bytes)
            price = decode_submit(slot).max_unit_price
            results.append({"index": i, "task_id": (bytes([price]) * 32).hex()})
        return httpx.Response(200, json={"results": results})

    return handle


def client_for(handler: Handler) -> ApiClient:
    return ApiClient("http://node.test", transport=httpx.MockTransport(handler))


def test_submit_many_chunks_by_count_and_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MAX_BATCH_TASKS", 3)
    calls: list[int] = []
    progress: list[tuple[int, int]] = []
    with client_for(fake_batch_route(calls)) as client:
        ids = client.submit_many([request(p) for p in range(1, 8)], progress=lambda *a: progress.append(a))
    assert ids == [bytes([p]) * 32 for p in range(1, 8)]
    assert calls == [3, 3, 1] and progress == [(3, 7), (6, 7), (7, 7)]
    calls.clear()
    with client_for(fake_batch_route(calls)) as client:  # a budget smaller than any task: one task per request
        assert len(client.submit_many([request(1), request(2)], max_batch_bytes=1)) == 2
    assert calls == [1, 1]
    with client_for(fake_batch_route(calls)) as client:
        assert client.submit_many([]) == []


def test_a_chunk_over_the_body_limit_is_retried_in_halves() -> None:
    calls: list[int] = []
    small = len(client_module.encode_submit(request(1)))
    big_a = np.zeros((1, 600), np.float32)
    big = SubmitRequest(spec=make_spec("matmul", 1, {}, {"a": big_a, "b": big_a.T.copy()}),
                        inputs={"a": big_a, "b": big_a.T.copy()}, max_unit_price=9)
    with client_for(fake_batch_route(calls, body_limit=2 * small + 64)) as client:
        answers = client.submit_many([request(1), request(2), big, request(3), request(4)])
    assert answers[:2] == [bytes([1]) * 32, bytes([2]) * 32] and answers[3:] == [bytes([3]) * 32, bytes([4]) * 32]
    assert isinstance(answers[2], PayloadTooLarge) and "this task alone" in answers[2].message


def test_a_task_that_cannot_be_encoded_is_its_own_answer() -> None:
    calls: list[int] = []
    with client_for(fake_batch_route(calls)) as client:
        answers = client.submit_many([request(1), request(2, kind="neither")])
    assert answers[0] == bytes([1]) * 32
    assert isinstance(answers[1], Unprocessable) and answers[1].code == "bad_submission"
    assert calls == [1]


def test_chunk_refused_whole_or_unreadable_answers_each_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MAX_BATCH_TASKS", 2)
    answers_by_call = iter([
        httpx.Response(503, json={"error": "starting", "message": "the node is starting"}),
        httpx.Response(200, json={"results": [{"index": 0, "task_id": "ab" * 32}]}),  # one answer for two tasks
    ])
    with client_for(lambda req: next(answers_by_call)) as client:
        answers = client.submit_many([request(p) for p in range(1, 5)])
    refused, _, unreadable, _ = answers
    assert [type(a) for a in answers] == [Unavailable, Unavailable, BadRequest, BadRequest]
    assert isinstance(refused, ApiError) and refused.code == "starting"
    assert isinstance(unreadable, ApiError) and unreadable.code == "bad_response"
    assert "may have been posted" in unreadable.message


def test_unreachable_api(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=req)

    with client_for(refuse) as client, pytest.raises(ApiUnreachable, match="cannot reach the API"):
        client.submit_many([request(1)])

    # Once some tasks are posted, their ids are kept and the rest say they may or may not have been.
    monkeypatch.setattr(client_module, "MAX_BATCH_TASKS", 1)
    calls: list[int] = []
    posted = fake_batch_route(calls)

    def then_gone(req: httpx.Request) -> httpx.Response:
        if calls:
            raise httpx.ReadTimeout("timed out", request=req)
        return posted(req)

    with client_for(then_gone) as client:
        answers = client.submit_many([request(1), request(2), request(3)])
    assert answers[0] == bytes([1]) * 32
    assert all(isinstance(a, Unavailable) and a.code == "unreachable" for a in answers[1:])
    assert "not known whether the node posted" in answers[1].message  # type: ignore[union-attr]
    assert "not sent" in answers[2].message and calls == [1]  # type: ignore[union-attr]


def test_the_token_goes_with_every_request_as_a_bearer_header_and_nowhere_else() -> None:
    seen: list[httpx.Request] = []

    def handle(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        if req.url.path == "/tasks/batch":
            return httpx.Response(200, json={"results": [{"index": 0, "task_id": "ab" * 32}]})
        return httpx.Response(200, json={"height": 1})

    secret = "p2pgpu_client-secret"
    with ApiClient("http://node.test", token=f"  {secret}\n", transport=httpx.MockTransport(handle)) as client:
        client.head()
        client.submit_many([request()])
        assert secret not in repr(client)
    assert [r.headers["authorization"] for r in seen] == [f"Bearer {secret}"] * 2
    assert all(secret not in str(r.url) for r in seen)
    with ApiClient("http://node.test", transport=httpx.MockTransport(handle)) as client:
        client.head()
    assert "authorization" not in seen[-1].headers


@pytest.mark.parametrize("bad", ["", " ", "a b", "a\nb", "p2pgpu_\u00e9"])
def test_a_token_that_cannot_be_a_header_is_refused_up_front(bad: str) -> None:
    from p2pgpu.api.client import InvalidToken

    with pytest.raises(InvalidToken, match="paste it exactly"):
        ApiClient("http://node.test", token=bad)


def test_auth_refusals_come_back_as_their_own_errors() -> None:
    from p2pgpu.api.types import Forbidden, TooManyRequests, Unauthorized

    answers = {"/status": (401, "missing_token"), "/ledger/head": (403, "insufficient_scope"),
               "/ledger/supply": (429, "spend_limit")}

    def handle(req: httpx.Request) -> httpx.Response:
        status, code = answers[req.url.path]
        return httpx.Response(status, json={"error": code, "message": f"refused: {code}"})

    with ApiClient("http://node.test", transport=httpx.MockTransport(handle)) as client:
        for call, cls in ((client.status, Unauthorized), (client.head, Forbidden), (client.supply, TooManyRequests)):
            with pytest.raises(cls) as info:
                call()
            assert info.value.message.startswith("refused: ")


def test_tasks_refused_for_a_full_sender_chain_are_sent_again_until_they_fit() -> None:
    """A big batch outruns the blocks: the node answers 429 ``sender_limit`` for tasks past its chain of pending
    transactions. ``submit_many`` sends those again a second later (the others keep their ids) until they fit."""
    rounds: list[list[int]] = []
    room = [2, 1, 5]  # tasks the node has room for, per request

    def handle(req: httpx.Request) -> httpx.Response:
        slots = decode_submit_batch(req.content)
        prices = [decode_submit(s).max_unit_price for s in slots]
        rounds.append(prices)
        fits = room.pop(0)
        results = [{"index": i, "task_id": (bytes([p]) * 32).hex()} if i < fits else
                   {"index": i, "status": 429, "error": "sender_limit",
                    "message": "PostTask refused: sender_limit: sender already has 1024 pending transactions"}
                   for i, p in enumerate(prices)]
        return httpx.Response(200, json={"results": results})

    slept: list[float] = []
    with client_for(handle) as client:
        ids = client.submit_many([request(p) for p in range(1, 6)], sleep=slept.append)
    assert ids == [bytes([p]) * 32 for p in range(1, 6)]
    assert rounds == [[1, 2, 3, 4, 5], [3, 4, 5], [4, 5]] and slept == [1.0, 1.0]


def test_a_sender_limit_that_never_clears_keeps_its_429_after_the_retry_budget() -> None:
    def handle(req: httpx.Request) -> httpx.Response:
        slots = decode_submit_batch(req.content)
        return httpx.Response(200, json={"results": [
            {"index": i, "status": 429, "error": "sender_limit", "message": "full"} for i in range(len(slots))]})

    slept: list[float] = []
    with client_for(handle) as client:
        answers = client.submit_many([request(1)], sleep=slept.append)
    assert isinstance(answers[0], client_module.TooManyRequests) and answers[0].code == "sender_limit"
    assert sum(slept) == client_module.SENDER_LIMIT_RETRY_S
