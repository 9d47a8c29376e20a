"""The gateway's HTTP routes: Open Inference Protocol v2 (KServe, Triton) and TF Serving REST, on the node's API.

Each handler is the same three steps: the protocol's codec turns the body
into a checked batch (:mod:`p2pgpu.gateway.oip`, :mod:`p2pgpu.gateway.tfserving`:
every bad input is refused there, before anything is queued or paid), the
:class:`~p2pgpu.gateway.service.InferenceGateway` answers it, the codec
encodes the answer. Errors leave in the protocols' own shape,
``{"error": "<message>"}`` with the status code the protocol gives
(:func:`p2pgpu.gateway.errors.error_body`); the API's token errors on these
paths are rendered the same way by ``ApiApp``.

Access: the health routes are public (load balancers probe them); every
other route needs the ``infer`` scope when tokens are configured, and an
inference request holds ``items x [gateway] max_unit_price`` of the token's
hourly spending allowance -- the most it can cost (a batched item is shared,
so it usually costs less) -- given back if the request is refused.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from ledger.state import ModelEntry
from p2pgpu.config import GatewayConfig
from p2pgpu.gateway import oip, tensorjson, tfserving
from p2pgpu.gateway.errors import GatewayError, ModelNotFound, ModelNotReady, error_body
from p2pgpu.gateway.metrics import GatewayView
from p2pgpu.gateway.signature import ModelSignature, signature_from_registry
from p2pgpu.metrics_text import MetricFamily

__all__ = ["GatewayPort", "GatewayRoutes", "ROUTE_PREFIXES"]

ROUTE_PREFIXES = ("/v2", "/v1/models")
"""Paths the gateway answers: errors on them, the API's own included, take the protocols' shape."""

JSON = "application/json"


def _server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("p2pgpu")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


class _Status(Protocol):
    @property
    def state(self) -> Literal["AVAILABLE", "LOADING", "UNAVAILABLE"]: ...

    @property
    def detail(self) -> str: ...


class GatewayPort(Protocol):
    """What the routes need of the gateway (:class:`~p2pgpu.gateway.service.InferenceGateway`)."""

    config: GatewayConfig

    def resolve(self, name: str, version: str | None = None) -> ModelEntry: ...

    def versions(self, entry: ModelEntry) -> list[str]: ...

    def status(self, entry: ModelEntry) -> _Status: ...

    async def infer(self, entry: ModelEntry, batch: np.ndarray) -> np.ndarray: ...

    def summary(self) -> GatewayView:
        """The ``gateway`` section of ``GET /status``."""
        ...

    def metric_families(self) -> list[MetricFamily]:
        """The gateway's families on the node's ``/metrics``."""
        ...


ReadBody = Callable[[Request], Awaitable[bytes]]
Spending = Callable[[Request, int, str], AbstractContextManager[None]]


def signature_of(entry: ModelEntry) -> ModelSignature:
    return signature_from_registry(entry.name, entry.version, entry.input.dtype, tuple(entry.input.shape),
                                   entry.output.dtype, tuple(entry.output.shape))


def _json(body: Any, status: int = 200) -> Response:
    return Response(tensorjson.dumps(body), status, media_type=JSON)


def gateway_error_response(exc: GatewayError) -> Response:
    headers = {"retry-after": str(exc.retry_after)} if getattr(exc, "retry_after", None) else None
    return Response(error_body(exc), exc.status, headers=headers, media_type=JSON)


class GatewayRoutes:
    """The handlers, bound to one gateway; ``table`` lists (method, pattern, handler, public) for ``ApiApp``."""

    def __init__(self, gateway: GatewayPort, *, read_body: ReadBody, spending: Spending,
                 ready: Callable[[], Awaitable[bool]]) -> None:
        self.gateway = gateway
        self._read_body = read_body
        self._spending = spending
        self._node_ready = ready

    def table(self) -> list[tuple[str, str, Callable[[Request], Awaitable[Response]], bool]]:
        return [
            ("GET", "/v2/health/live", self.live, True),
            ("GET", "/v2/health/ready", self.ready, True),
            ("GET", "/v2", self.server_metadata, False),
            ("GET", "/v2/models/{name}", self.v2_model_metadata, False),
            ("GET", "/v2/models/{name}/versions/{version}", self.v2_model_metadata, False),
            ("GET", "/v2/models/{name}/ready", self.v2_model_ready, False),
            ("GET", "/v2/models/{name}/versions/{version}/ready", self.v2_model_ready, False),
            ("POST", "/v2/models/{name}/infer", self.v2_infer, False),
            ("POST", "/v2/models/{name}/versions/{version}/infer", self.v2_infer, False),
            ("GET", "/v1/models/{name}", self.v1_status, False),
            ("GET", "/v1/models/{name}/versions/{version}", self.v1_status, False),
            ("GET", "/v1/models/{name}/metadata", self.v1_metadata, False),
            ("GET", "/v1/models/{name}/versions/{version}/metadata", self.v1_metadata, False),
            ("POST", "/v1/models/{name}:predict", self.v1_predict, False),
            ("POST", "/v1/models/{name}/versions/{version}:predict", self.v1_predict, False),
        ]

    # -- helpers -----------------------------------------------------------------------

    def _entry(self, request: Request) -> ModelEntry:
        params = request.path_params
        return self.gateway.resolve(str(params["name"]), params.get("version"))

    async def _answer(self, request: Request, entry: ModelEntry, batch: np.ndarray) -> np.ndarray:
        config = self.gateway.config
        items = math.ceil(int(batch.shape[0]) / config.max_batch_rows)
        with self._spending(request, items * config.max_unit_price, "this inference request"):
            return await self.gateway.infer(entry, batch)

    # -- Open Inference Protocol v2 ----------------------------------------------------

    async def live(self, request: Request) -> Response:
        return _json({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = await self._node_ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return _json(oip.server_metadata("p2pgpu", _server_version(), ["binary_tensor_data"]))

    async def v2_model_metadata(self, request: Request) -> Response:
        try:
            entry = self._entry(request)
            return _json(oip.model_metadata(signature_of(entry), self.gateway.versions(entry)))
        except GatewayError as exc:
            return gateway_error_response(exc)

    async def v2_model_ready(self, request: Request) -> Response:
        try:
            entry = self._entry(request)
        except GatewayError as exc:
            return gateway_error_response(exc)
        status = self.gateway.status(entry)
        if status.state == "AVAILABLE":
            return _json({"name": entry.name, "ready": True})
        return gateway_error_response(ModelNotReady(f"model {entry.name}@{entry.version} is not ready: "
                                                    f"{status.detail}", status=400))

    async def v2_infer(self, request: Request) -> Response:
        try:
            entry = self._entry(request)
            sig = signature_of(entry)
            body = await self._read_body(request)
            header_length = request.headers.get(oip.HEADER_LENGTH)
            parsed = oip.parse_infer_request(body, content_type=request.headers.get("content-type"),
                                             header_length=header_length, sig=sig,
                                             max_batch=self.gateway.config.max_rows_per_request)
            output = await self._answer(request, entry, parsed.batch)
            payload, headers = oip.encode_infer_response(sig, parsed, {sig.outputs[0].name: output})
            return Response(payload, 200, headers=headers)
        except GatewayError as exc:
            return gateway_error_response(exc)

    # -- TF Serving REST ---------------------------------------------------------------

    async def v1_status(self, request: Request) -> Response:
        try:
            entry = self._entry(request)
        except ModelNotFound as exc:
            return gateway_error_response(exc)
        status = self.gateway.status(entry)
        return _json(tfserving.model_status(entry.name, entry.version, status.state, status.detail))

    async def v1_metadata(self, request: Request) -> Response:
        try:
            entry = self._entry(request)
            return _json(tfserving.model_metadata(signature_of(entry)))
        except GatewayError as exc:
            return gateway_error_response(exc)

    async def v1_predict(self, request: Request) -> Response:
        try:
            entry = self._entry(request)
            sig = signature_of(entry)
            body = await self._read_body(request)
            parsed = tfserving.parse_predict_request(body, sig, max_batch=self.gateway.config.max_rows_per_request)
            output = await self._answer(request, entry, parsed.batch)
            return Response(tfserving.encode_predict_response(parsed, {sig.outputs[0].name: output}), 200,
                            media_type=JSON)
        except GatewayError as exc:
            return gateway_error_response(exc)
