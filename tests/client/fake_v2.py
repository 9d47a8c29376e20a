"""A small Open Inference Protocol v2 server for the SDK's tests, with the binary tensor data extension.

The node's v2 routes are built elsewhere; this fake stands in for them at
the SDK's boundary and follows the protocol strictly: it refuses a request
without ``Inference-Header-Content-Length``, with binary sizes that do not
add up, or with a datatype or shape that does not fit, and answers each
output in binary when the request asked for it (``binary_data`` on the
output, or ``binary_data_output`` on the request), else in JSON. Errors are
``{"error": "..."}`` with the status the protocol gives them.

One pure function, :meth:`FakeV2.handle`, serves two adapters: an ASGI app
(for :class:`httpx.ASGITransport`) and a handler for
:class:`httpx.MockTransport` (the sync client).

Models: ``double`` (versions 1 and 2: times 2 and times 3; BOOL is
negated), ``echo`` (returns its input), ``json-only`` (ignores the binary
request and answers in JSON), ``loading`` (503), ``busy`` (429,
Retry-After 7), ``broken`` (500), ``teapot`` (418).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import numpy as np

HEADER = "inference-header-content-length"
DTYPES = {
    "BOOL": "|b1", "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "UINT8": "|u1", "UINT16": "<u2",
    "UINT32": "<u4", "UINT64": "<u8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
MODELS = {"double": ("1", "2"), "echo": ("1",), "json-only": ("1",), "loading": ("1",), "busy": ("1",),
          "broken": ("1",), "teapot": ("1",)}


class Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class Seen:
    """One request the fake received, as sent."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Answer = tuple[int, dict[str, str], bytes]


@dataclass
class FakeV2:
    """``token``: when set, every route wants ``Bearer <token>``; ``READONLY`` is a token without the scope."""

    token: str | None = None
    seen: list[Seen] = field(default_factory=list)

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        self.seen.append(Seen(method, path, headers, body))
        try:
            self._auth(headers)
            return self._route(method, path, headers, body)
        except Refused as exc:
            return exc.status, {"content-type": "application/json", **exc.headers}, \
                json.dumps({"error": str(exc)}).encode()

    def _auth(self, headers: dict[str, str]) -> None:
        if self.token is None:
            return
        got = headers.get("authorization")
        if got == "Bearer READONLY":
            raise Refused(403, "this token may not run inference")
        if got != f"Bearer {self.token}":
            raise Refused(401, "a bearer token is required", {"www-authenticate": 'Bearer realm="p2pgpu"'})

    def _route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts == ["v2", "health", "live"] and method == "GET":
            return 200, {}, b""
        if len(parts) < 3 or parts[:2] != ["v2", "models"]:
            raise Refused(404, f"no route {path}")
        model, rest = parts[2], parts[3:]
        version = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2:
                raise Refused(404, f"no route {path}")
            version, rest = rest[1], rest[2:]
        if model not in MODELS or (version is not None and version not in MODELS[model]):
            raise Refused(404, f"model {model!r}{'' if version is None else ' version ' + version} not found")
        if model == "loading":
            raise Refused(503, f"model {model!r} is loading")
        if model == "busy":
            raise Refused(429, "too many inferences in flight", {"retry-after": "7"})
        if model == "broken":
            raise Refused(500, "the model crashed")
        if model == "teapot":
            raise Refused(418, "i am a teapot")
        if rest == [] and method == "GET":
            doc = {"name": model, "versions": list(MODELS[model]), "platform": "p2pgpu",
                   "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                   "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}
            return 200, {"content-type": "application/json"}, json.dumps(doc).encode()
        if rest == ["ready"] and method == "GET":
            return 200, {}, b""
        if rest == ["infer"] and method == "POST":
            return self._infer(model, version or MODELS[model][-1], headers, body)
        raise Refused(404, f"no route {method} {path}")

    def _infer(self, model: str, version: str, headers: dict[str, str], body: bytes) -> Answer:
        raw = headers.get(HEADER)
        if raw is None:
            head_size = len(body)  # all JSON
        elif not raw.isdigit() or int(raw) > len(body):
            raise Refused(400, f"bad {HEADER} {raw!r}")
        else:
            head_size = int(raw)
        try:
            doc = json.loads(body[:head_size])
        except ValueError:
            raise Refused(400, "the request header is not JSON") from None
        inputs = doc.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1:
            raise Refused(400, "expected exactly one input")
        (inp,) = inputs
        if inp.get("name") != "x":
            raise Refused(400, f"unexpected input {inp.get('name')!r}; the model takes 'x'")
        datatype = inp.get("datatype")
        if datatype not in DTYPES:
            raise Refused(400, f"unsupported datatype {datatype!r}")
        shape = inp.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise Refused(400, f"bad shape {shape!r}")
        dtype = np.dtype(DTYPES[datatype])
        count = math.prod(shape)
        size = (inp.get("parameters") or {}).get("binary_data_size")
        if size is None:
            x = np.array(inp.get("data"), dtype=dtype).reshape(shape)
        else:
            if size != count * dtype.itemsize or head_size + size != len(body):
                raise Refused(400, f"binary_data_size {size} does not fit shape {shape} of {datatype} and the "
                                   f"{len(body) - head_size} bytes after the header")
            x = np.frombuffer(body, dtype=dtype, count=count, offset=head_size).reshape(shape)
        y = self._compute(model, version, x)
        wanted = doc.get("outputs") or [{"name": "y"}]
        for out in wanted:
            if out.get("name") != "y":
                raise Refused(400, f"unknown output {out.get('name')!r}; the model has 'y'")
        binary = (bool((doc.get("parameters") or {}).get("binary_data_output"))
                  or any((o.get("parameters") or {}).get("binary_data") for o in wanted)) and model != "json-only"
        meta: dict[str, Any] = {"name": "y", "datatype": datatype, "shape": list(y.shape)}
        answer: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": [meta]}
        if not binary:
            meta["data"] = y.ravel().tolist()
            return 200, {"content-type": "application/json"}, json.dumps(answer).encode()
        data = np.ascontiguousarray(y, dtype=dtype).tobytes()
        meta["parameters"] = {"binary_data_size": len(data)}
        head = json.dumps(answer).encode()
        return 200, {"content-type": "application/octet-stream", HEADER: str(len(head))}, head + data

    @staticmethod
    def _compute(model: str, version: str, x: np.ndarray) -> np.ndarray:
        if model in ("echo", "json-only"):
            return x.copy()
        if x.dtype == np.bool_:
            return ~x
        return (x * (2 if version == "1" else 3)).astype(x.dtype)

    # ------------------------------------------------------------- adapters

    def mock_transport(self) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            body = request.read()
            status, headers, content = self.handle(request.method, request.url.raw_path.decode().split("?")[0],
                                                   {k.lower(): v for k, v in request.headers.items()}, body)
            return httpx.Response(status, headers=headers, content=content)

        return httpx.MockTransport(handler)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """ASGI 3."""
        assert scope["type"] == "http"
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope.get("raw_path", scope["path"].encode()).decode().split("?")[0]
        status, out_headers, content = self.handle(scope["method"], path, headers, b"".join(chunks))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in out_headers.items()]})
        await send({"type": "http.response.body", "body": content})
