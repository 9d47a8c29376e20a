"""Every answer other than success, and every failure to get one, as the SDK's typed errors (sync and async)."""

from __future__ import annotations

import email.utils
import socket

import httpx
import numpy as np
import pytest

from p2pgpu.client import (
    AsyncClient,
    AuthError,
    Client,
    Forbidden,
    InsufficientFunds,
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    NodeUnreachable,
    NotFound,
    NotReady,
    P2PGPUError,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServerError,
    TaskNotFound,
    Unauthorized,
    Unavailable,
    Unprocessable,
)
from p2pgpu.client.errors import error_for, parse_retry_after
from tests.client.fake_v2 import FakeV2
from tests.client.test_infer import URL, async_client, sync_client

X = np.zeros((1, 4), dtype=np.float32)

V2_REFUSALS: list[tuple[str, dict[str, str], type[P2PGPUError], int, str]] = [
    ("nope", {}, ModelNotFound, 404, "model 'nope' not found"),
    ("loading", {}, ModelUnavailable, 503, "is loading"),
    ("busy", {}, RateLimited, 429, "too many inferences"),
    ("broken", {}, ServerError, 500, "the model crashed"),
    ("teapot", {}, P2PGPUError, 418, "i am a teapot"),
    ("echo", {"input_name": "a"}, InvalidInput, 400, "unexpected input 'a'"),
]


@pytest.mark.parametrize(("model", "kwargs", "cls", "status", "words"), V2_REFUSALS,
                         ids=[c[0] + "-" + str(c[3]) for c in V2_REFUSALS])
def test_v2_refusals_sync(model: str, kwargs: dict[str, str], cls: type[P2PGPUError], status: int,
                          words: str) -> None:
    with sync_client(FakeV2()) as client, pytest.raises(cls, match=words) as info:
        client.infer(model, X, **kwargs)  # type: ignore[arg-type]
    assert type(info.value) is cls and info.value.status == status
    if cls is RateLimited:
        assert info.value.retry_after == 7.0  # type: ignore[attr-defined]
    if cls is P2PGPUError:
        assert "HTTP 418" in info.value.message and "POST /v2/models/teapot/infer" in info.value.message


@pytest.mark.parametrize(("model", "kwargs", "cls", "status", "words"), V2_REFUSALS,
                         ids=[c[0] + "-" + str(c[3]) for c in V2_REFUSALS])
async def test_v2_refusals_async(model: str, kwargs: dict[str, str], cls: type[P2PGPUError], status: int,
                                 words: str) -> None:
    async with async_client(FakeV2()) as client:
        with pytest.raises(cls, match=words) as info:
            await client.infer(model, X, **kwargs)  # type: ignore[arg-type]
    assert type(info.value) is cls and info.value.status == status


def test_auth_errors_and_the_token_going_out() -> None:
    fake = FakeV2(token="s3cret")
    with sync_client(fake) as client, pytest.raises(Unauthorized, match="bearer token is required"):
        client.infer("echo", X)
    with sync_client(fake, token="READONLY") as client, pytest.raises(Forbidden, match="may not run inference"):
        client.infer("echo", X)
    with sync_client(fake, token="s3cret\n") as client:
        np.testing.assert_array_equal(client.infer("echo", X), X)
        assert "s3cret" not in repr(client)
    assert fake.seen[-1].headers["authorization"] == "Bearer s3cret"
    assert issubclass(Unauthorized, AuthError) and issubclass(Forbidden, AuthError)
    with pytest.raises(InvalidInput, match="spaces or control characters"):
        Client(URL, token="two words")
    with pytest.raises(InvalidInput, match="spaces or control characters"):
        AsyncClient(URL, token="")


async def test_auth_errors_async_and_live_still_raises_them() -> None:
    async with async_client(FakeV2(token="s3cret")) as client:
        with pytest.raises(Unauthorized):
            await client.model_ready("echo")
        with pytest.raises(Unauthorized):
            await client.server_live()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_nothing_listening_is_node_unreachable_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, timeout=5.0) as client:
        for call in (lambda: client.infer("m", X), lambda: client.task("11" * 32), client.models):
            with pytest.raises(NodeUnreachable, match=f"cannot reach the node at {url}") as info:
                call()
            assert info.value.url == url and info.value.status is None


async def test_nothing_listening_is_node_unreachable_async() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with AsyncClient(url, timeout=5.0) as client:
        with pytest.raises(NodeUnreachable, match=url):
            await client.infer("m", X)
        assert await client.server_live() is False


def test_slow_answer_is_request_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out", request=request)

    with Client(URL, transport=httpx.MockTransport(handler)) as client, \
            pytest.raises(RequestTimeout, match="did not answer POST /v2/models/m/infer in time") as info:
        client.infer("m", X)
    assert isinstance(info.value, TimeoutError)


def err(status: int, body: bytes, *, route: str = "api", headers: dict[str, str] | None = None) -> P2PGPUError:
    return error_for(status, headers or {}, body, route=route, what="GET /x")  # type: ignore[arg-type]


@pytest.mark.parametrize(("status", "code", "cls"), [
    (400, "bad_task_id", InvalidInput), (401, "unauthorized", Unauthorized), (402, "insufficient_funds",
                                                                             InsufficientFunds),
    (403, "insufficient_scope", Forbidden), (404, "unknown_task", TaskNotFound), (404, "unknown_model", ModelNotFound),
    (404, "no_route", NotFound), (409, "task_not_ready", NotReady), (413, "body_too_large", PayloadTooLarge),
    (415, "wrong_content_type", P2PGPUError), (422, "invalid_spec", Unprocessable), (429, "spend_limit", RateLimited),
    (500, "internal_error", ServerError), (503, "syncing", Unavailable),
])
def test_task_api_error_shape_maps_by_status_and_code(status: int, code: str, cls: type[P2PGPUError]) -> None:
    error = err(status, b'{"error": "%s", "message": "the words"}' % code.encode())
    assert type(error) is cls and error.code == code and error.status == status
    assert error.message == "the words" or (cls is P2PGPUError and error.message.endswith("the words"))


def test_v2_error_shape_and_unreadable_bodies() -> None:
    assert type(err(404, b'{"error": "no such model"}', route="v2")) is ModelNotFound
    assert type(err(503, b'{"error": "warming"}', route="v2")) is ModelUnavailable
    assert type(err(503, b'{"error": "warming"}')) is Unavailable
    proxy = err(502, b"<html>Bad Gateway</html>")
    assert type(proxy) is ServerError and "Bad Gateway" in proxy.message
    assert err(400, b"").message  # never an empty message
    assert issubclass(Unprocessable, InvalidInput) and issubclass(InvalidInput, ValueError)


def test_retry_after_seconds_and_dates() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = 1_800_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    limited = err(429, b'{"error": "spend_limit", "message": "later"}', headers={"retry-after": "1200"})
    assert isinstance(limited, RateLimited) and limited.retry_after == 1200.0
    assert err(429, b'{"error": "x"}', route="v2").retry_after is None  # type: ignore[attr-defined]
