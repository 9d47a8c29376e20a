"""``infer``, ``model_ready``, ``model_metadata`` and ``server_live`` against a faithful fake v2 server.

The sync client talks to it through :class:`httpx.MockTransport`, the async
one through :class:`httpx.ASGITransport` (under Trio here, under asyncio in
:func:`test_async_client_under_asyncio`). The wire form is checked on what
the fake received: a JSON header, then the raw little-endian bytes.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import trio

from p2pgpu.client import DATATYPES, AsyncClient, BadResponse, Client, InvalidInput
from p2pgpu.client.v2 import decode_infer_response, encode_infer_request
from tests.client.fake_v2 import HEADER, FakeV2

URL = "http://node.test:8645"

ALL_DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
              np.float16, np.float32, np.float64]


def sample(dtype: type, shape: tuple[int, ...] = (3, 4)) -> np.ndarray:
    rng = np.random.default_rng(7)
    if dtype is np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 40, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def expected_double(x: np.ndarray, factor: int = 2) -> np.ndarray:
    return ~x if x.dtype == np.bool_ else (x * factor).astype(x.dtype)


def sync_client(fake: FakeV2, **kwargs: object) -> Client:
    return Client(URL, transport=fake.mock_transport(), **kwargs)  # type: ignore[arg-type]


def async_client(fake: FakeV2, **kwargs: object) -> AsyncClient:
    return AsyncClient(URL, transport=httpx.ASGITransport(app=fake), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_datatype_round_trips_in_binary(dtype: type) -> None:
    fake = FakeV2()
    x = sample(dtype)
    with sync_client(fake) as client:
        y = client.infer("double", x, version="1")
    assert y.dtype == x.dtype and y.shape == x.shape and y.flags.writeable
    np.testing.assert_array_equal(y, expected_double(x))
    (seen,) = fake.seen
    head_size = int(seen.headers[HEADER])
    head = json.loads(seen.body[:head_size])
    assert seen.headers["content-type"] == "application/octet-stream"
    assert head["inputs"][0]["datatype"] == next(k for k, v in DATATYPES.items() if v.kind == x.dtype.kind
                                                 and v.itemsize == x.dtype.itemsize)
    assert head["parameters"] == {"binary_data_output": True}
    assert head["outputs"] == [{"name": "y", "parameters": {"binary_data": True}}]
    assert "data" not in head["inputs"][0]  # the tensor is not JSON-encoded
    assert seen.body[head_size:] == np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()


def test_big_endian_and_non_contiguous_inputs_go_as_little_endian_rows() -> None:
    fake = FakeV2()
    base = np.arange(24, dtype=">i4").reshape(4, 6)
    x = base[:, ::2]  # big-endian, strided
    with sync_client(fake) as client:
        y = client.infer("echo", x)
    np.testing.assert_array_equal(y, x)
    assert y.dtype == np.dtype("int32") and y.dtype.isnative


def test_versions_scalars_empty_and_json_answers() -> None:
    fake = FakeV2()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with sync_client(fake) as client:
        np.testing.assert_array_equal(client.infer("double", x, version="1"), x * 2)
        np.testing.assert_array_equal(client.infer("double", x, version="2"), x * 3)
        np.testing.assert_array_equal(client.infer("double", x), x * 3)  # the model's latest
        assert client.infer("echo", np.float64(2.5).reshape(())).shape == ()
        empty = client.infer("echo", np.zeros((0, 4), dtype=np.int16))
        assert empty.shape == (0, 4) and empty.dtype == np.int16
        fp16 = client.infer("json-only", x.astype(np.float16))  # answered in plain JSON
        assert fp16.dtype == np.float16
        np.testing.assert_array_equal(fp16, x.astype(np.float16))
    assert [s.path for s in fake.seen[:3]] == ["/v2/models/double/versions/1/infer",
                                               "/v2/models/double/versions/2/infer", "/v2/models/double/infer"]


def test_names_are_percent_encoded_into_one_segment() -> None:
    fake = FakeV2()
    with sync_client(fake) as client, pytest.raises(Exception):
        client.infer("../ledger/head", np.zeros(2, np.float32))
    assert fake.seen[0].path == "/v2/models/..%2Fledger%2Fhead/infer"


def test_input_that_has_no_v2_datatype_is_refused_before_sending() -> None:
    fake = FakeV2()
    with sync_client(fake) as client:
        for bad in (np.array(["a", "b"]), np.zeros(2, dtype=np.complex64), np.array([object()])):
            with pytest.raises(InvalidInput, match="no v2 datatype"):
                client.infer("echo", bad)
        with pytest.raises(InvalidInput, match="numpy array"):
            client.infer("echo", [1.0, 2.0])  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="empty"):
            client.infer("", np.zeros(1, np.float32))
    assert fake.seen == []


def test_wrong_output_name_and_input_name() -> None:
    fake = FakeV2()
    with sync_client(fake) as client:
        with pytest.raises(InvalidInput, match="unknown output 'z'"):
            client.infer("echo", np.zeros(2, np.float32), output="z")
        with pytest.raises(InvalidInput, match="unexpected input 'a'"):
            client.infer("echo", np.zeros(2, np.float32), input_name="a")


def answer(outputs: list[dict[str, object]], data: bytes = b"", *, header: bool = True) -> tuple[dict[str, str],
                                                                                                  bytes]:
    head = json.dumps({"outputs": outputs}).encode()
    return ({HEADER: str(len(head))} if header else {}), head + data


@pytest.mark.parametrize(("outputs", "data", "header", "problem"), [
    ([{"name": "y", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}], b"\0" * 4, True,
     "4 bytes for shape"),
    ([{"name": "y", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}], b"\0" * 12, True,
     "add up to 8 bytes but 12"),
    ([{"name": "y", "datatype": "BYTES", "shape": [1], "data": ["a"]}], b"", False, "datatype 'BYTES'"),
    ([{"name": "y", "datatype": "FP32", "shape": [-1], "data": []}], b"", False, "non-negative"),
    ([{"name": "y", "datatype": "FP32", "shape": [3], "data": [1, 2]}], b"", False, "2 values for shape"),
    ([{"name": "z", "datatype": "FP32", "shape": [1], "data": [1]}], b"", False, "no output 'y'"),
    ([{"name": "y", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}], b"", False,
     "no Inference-Header-Content-Length"),
    ([{"name": "y", "datatype": "INT8", "shape": [1], "data": [300]}], b"", False, "does not fit INT8"),
])
def test_answers_that_do_not_add_up_are_bad_responses(outputs: list[dict[str, object]], data: bytes, header: bool,
                                                      problem: str) -> None:
    headers, body = answer(outputs, data, header=header)
    with pytest.raises(BadResponse, match=problem):
        decode_infer_response(headers, body, output="y")


def test_second_binary_output_is_read_at_its_offset() -> None:
    a, b = np.arange(3, dtype=np.int16), np.arange(4, dtype=np.float64) / 2
    headers, body = answer([
        {"name": "a", "datatype": "INT16", "shape": [3], "parameters": {"binary_data_size": 6}},
        {"name": "j", "datatype": "INT8", "shape": [1], "data": [5]},
        {"name": "b", "datatype": "FP64", "shape": [2, 2], "parameters": {"binary_data_size": 32}},
    ], a.tobytes() + b.tobytes())
    np.testing.assert_array_equal(decode_infer_response(headers, body, output="b"), b.reshape(2, 2))
    np.testing.assert_array_equal(decode_infer_response(headers, body, output="a"), a)
    np.testing.assert_array_equal(decode_infer_response(headers, body, output="j"), [5])


def test_request_bytes_are_header_then_tensor() -> None:
    x = np.arange(6, dtype=np.uint16).reshape(2, 3)
    req = encode_infer_request(x, input_name="x", output="y")
    head, data = req.chunks
    assert req.headers[HEADER] == str(len(head)) and req.headers["content-length"] == str(len(head) + len(data))
    assert json.loads(head)["inputs"] == [{"name": "x", "shape": [2, 3], "datatype": "UINT16",
                                           "parameters": {"binary_data_size": 12}}]
    assert data == x.astype("<u2").tobytes()


def test_ready_metadata_live() -> None:
    fake = FakeV2()
    with sync_client(fake) as client:
        assert client.model_ready("double") and client.model_ready("double", "1")
        assert not client.model_ready("nope") and not client.model_ready("double", "9")
        assert not client.model_ready("loading")
        meta = client.model_metadata("double")
        assert meta["name"] == "double" and meta["versions"] == ["1", "2"]
        assert client.server_live()
    assert fake.seen[0].path == "/v2/models/double/ready"
    assert fake.seen[1].path == "/v2/models/double/versions/1/ready"
    with Client("http://127.0.0.1:9", timeout=2.0) as client:  # nothing listens on the discard port
        assert client.server_live() is False


async def test_async_client_under_trio_with_many_concurrent_callers() -> None:
    fake = FakeV2()
    results: dict[int, np.ndarray] = {}
    async with async_client(fake) as client:
        assert await client.server_live() and await client.model_ready("echo")
        assert (await client.model_metadata("echo"))["name"] == "echo"
        big = np.arange(1 << 19, dtype=np.float32).reshape(-1, 4)  # 2 MiB: decoded in a worker thread
        np.testing.assert_array_equal(await client.infer("echo", big), big)

        async def one(i: int) -> None:
            results[i] = await client.infer("double", np.full((i + 1, 4), i, dtype=np.int32), version="1")

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(one, i)
    for i in range(40):
        np.testing.assert_array_equal(results[i], np.full((i + 1, 4), 2 * i, dtype=np.int32))


def test_async_client_under_asyncio() -> None:
    fake = FakeV2()

    async def scenario() -> list[np.ndarray]:
        async with async_client(fake) as client:
            assert await client.model_ready("double")
            big = np.arange(1 << 19, dtype=np.int64)  # 4 MiB: decoded in a worker thread
            np.testing.assert_array_equal(await client.infer("echo", big), big)
            xs = [np.arange(4, dtype=np.float16) + i for i in range(10)]
            return list(await asyncio.gather(*(client.infer("double", x, version="1") for x in xs)))

    ys = asyncio.run(scenario())
    for i, y in enumerate(ys):
        np.testing.assert_array_equal(y, (np.arange(4, dtype=np.float16) + i) * 2)


async def test_infer_over_real_loopback_http(nursery: trio.Nursery) -> None:
    """The two-chunk body goes out with its Content-Length (not chunked) through a real HTTP server, both clients."""
    from functools import partial

    from hypercorn.config import Config
    from hypercorn.trio import serve

    fake = FakeV2()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    binds = await nursery.start(partial(serve, fake, config, mode="asgi"))  # type: ignore[arg-type]
    url = binds[0]
    x = np.arange(3 * 1024, dtype=np.float32).reshape(-1, 4)

    def run_sync() -> np.ndarray:
        with Client(url) as client:
            return client.infer("double", x, version="1")

    with trio.fail_after(30):
        np.testing.assert_array_equal(await trio.to_thread.run_sync(run_sync), x * 2)
        async with AsyncClient(url) as client:
            np.testing.assert_array_equal(await client.infer("double", x, version="1"), x * 2)
    for seen in fake.seen:
        assert "transfer-encoding" not in seen.headers
        assert int(seen.headers["content-length"]) == len(seen.body) == int(seen.headers[HEADER]) + x.nbytes
