"""The ASGI application: the node's routes on FastAPI, each a thin call into :class:`NodeAPI`.

FastAPI (Starlette underneath, run on the node's Trio loop through AnyIO)
routes requests, validates every path part, query parameter and JSON body
against :mod:`p2pgpu.api.models` before a handler runs, checks every JSON
answer against its response model, and publishes the schema at
``/openapi.json``, behind the ``read`` scope like the other views (the schema
names the gateway's models and the node's roles; the interactive ``/docs``
pages are off: they load their scripts from a CDN). What the framework would answer on its own is mapped
to the API's one error shape: every refusal is ``ApiError``'s status and
``{"error": code, "message": text}`` (a validation failure is 400, an
unknown path 404 ``no_route``, a wrong method 405); anything else is
logged and answered with 500, and the server goes on.

Every route declares the :class:`~p2pgpu.api.auth.Access` it needs, next to
its handler (a route without one is refused when the app is built); the
token is checked by a dependency that runs before any body is read (no
route lets FastAPI read its body: no token, no upload; and the body is read
through :func:`read_body`, which stops at the size limit). The
``Authorization`` header is taken out of the request before FastAPI sees
it, so no handler can log it. The routes that commit the node's funds
(submit, batch, dispute) hold their cost against the token's hourly
allowance around the node call (see :mod:`p2pgpu.api.auth`).

``POST /tasks/batch`` fans out here, over :meth:`NodeAPI.submit_task`, rather
than in a node method of its own: the per-task answer is exactly the mapping
above (an error's status, code and message, or a logged 500), which lives
in this module, and every ``NodeAPI`` gets batches for free. The node's
single-task submit is what must be safe to call concurrently.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError, ResponseValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from p2pgpu.api.auth import Access, Authenticator, Caller
from p2pgpu.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from p2pgpu.api.metrics import NodeMetrics
from p2pgpu.api.models import (
    AccountOut,
    AddressParam,
    BalanceOut,
    BatchOut,
    BlockOut,
    DeletedOut,
    DisputeAcceptedOut,
    DisputeIn,
    ErrorOut,
    HeadOut,
    HealthOut,
    HeightParam,
    ModelIdParam,
    ModelProvidersOut,
    ModelPushOut,
    ModelsOut,
    ModelOut,
    ProvidersOut,
    StatusOut,
    SubmittedOut,
    SupplyOut,
    TaskIdParam,
    TaskViewOut,
    ValidatorsOut,
    WaitParam,
    parse_dispute_body,
    validation_error,
)
from p2pgpu.api.types import (
    MSGPACK,
    ApiError,
    BadRequest,
    Forbidden,
    InternalError,
    MethodNotAllowed,
    NodeAPI,
    NotFound,
    PayloadTooLarge,
    PushModelRequest,
    SubmitRequest,
    Unauthorized,
    UnsupportedMediaType,
    decode_submit,
    decode_submit_batch,
    encode_result,
    error_from_status,
    parse_model_reference,
    task_view_json,
    to_jsonable,
)

if TYPE_CHECKING:
    from p2pgpu.gateway.routes import GatewayPort

__all__ = ["BATCH_CONCURRENCY", "DEFAULT_MAX_BODY_BYTES", "ApiApp", "Route", "read_body"]

DEFAULT_MAX_BODY_BYTES = 256 << 20
BATCH_CONCURRENCY = 64
"""Tasks of one batch being decoded or submitted at once. Enough to keep the node's sealing threads
busy; few enough that a request cancelled midway leaves at most this many submissions half done."""
INLINE_DECODE_BYTES = 256 << 10
"""Task bodies up to this size are decoded on the node's loop (see ``ApiApp._decode_submit``)."""
HEALTH_STATUS = {"ready": 200, "syncing": 206, "down": 503}
_MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
_GATEWAY_PREFIXES: Final = ("/v2", "/v1/models")
"""The inference gateway's paths (``p2pgpu.gateway.routes.ROUTE_PREFIXES``): errors there take the protocols' shape."""
AUTHORIZATION_SCOPE_KEY: Final = "p2pgpu.authorization"
"""Where the ``Authorization`` header waits for the auth dependency, out of the request's headers."""
_AUTHORIZATION: Final = b"authorization"
_LOGGED: Final = "_p2pgpu_api_logged"
"""Set on an exception :meth:`ApiApp._on_bug` has logged, so the re-raise that follows is not logged twice."""

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": what}
    for status, what in ((400, "a path part, query parameter or body that does not fit"),
                         (401, "tokens are configured and none, or a wrong one, was sent"),
                         (403, "the token lacks the route's scope"),
                         (422, "well-formed but refused"),
                         (500, "a handler failed; logged, the server keeps serving"),
                         (503, "the node cannot answer now"))
}
_MSGPACK_BODY: Final = {"requestBody": {"required": True, "content": {
    MSGPACK: {"schema": {"type": "string", "format": "binary"}}}}}
_BUNDLE_BODY: Final = {"requestBody": {"required": True, "content": {
    ctype: {"schema": {"type": "string", "format": "binary",
                       "description": "a canonical model bundle (kernels.bundle.encode_bundle)"}}
    for ctype in (MSGPACK, "application/octet-stream")}}}
_BUNDLE_TYPES = _MSGPACK_TYPES | {"application/octet-stream"}


@dataclass(frozen=True, slots=True)
class Route:
    """One declared route: what the app serves and who may call it."""

    method: str
    pattern: str
    """As declared, e.g. ``/tasks/{task_id}``."""
    regex: re.Pattern[str]
    handler: Callable[..., Awaitable[Any]]
    access: Access


def _limited(caller: Caller | None) -> bool:
    return caller is not None and caller.allowance is not None


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise BadRequest(f"Content-Length {declared!r} is not a number", "bad_header")
        if int(declared) > max_body_bytes:
            raise PayloadTooLarge(f"body of {int(declared)} bytes exceeds the limit of {max_body_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise PayloadTooLarge(f"body exceeds the limit of {max_body_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("client disconnected mid-body", "disconnected") from None
    return b"".join(chunks)


def _error_response(exc: ApiError, method: str) -> JSONResponse:
    headers = dict(exc.headers)
    refused_before_body = isinstance(exc, (Unauthorized, Forbidden)) and method not in ("GET", "HEAD")
    if isinstance(exc, PayloadTooLarge) or refused_before_body:
        # The rest of the body is never read, so this connection cannot carry another request.
        headers["connection"] = "close"
    return JSONResponse({"error": exc.code, "message": exc.message}, exc.status, headers=headers)


class ApiApp:
    """An ASGI 3 application serving one node's :class:`NodeAPI`.

    ``auth`` holds the configured tokens; without it (or with none) every
    route is open, as the loopback-only API always was. ``routes`` is the
    declared table (method, pattern, access); ``fastapi`` is the app built
    from it.
    """

    def __init__(self, node: NodeAPI, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 logger: logging.Logger | None = None, auth: Authenticator | None = None,
                 gateway: GatewayPort | None = None) -> None:
        self.node = node
        self.max_body_bytes = max_body_bytes
        self.log = logger or logging.getLogger("p2pgpu.api")
        self.auth = auth or Authenticator(logger=self.log)
        self.metrics_page = NodeMetrics()
        self.fastapi = FastAPI(title="p2pgpu node API", version="1", docs_url=None, redoc_url=None,
                               openapi_url=None, redirect_slashes=False, responses=_ERRORS)
        self.fastapi.add_exception_handler(ApiError, self._on_api_error)
        self.fastapi.add_exception_handler(RequestValidationError, self._on_invalid_request)
        self.fastapi.add_exception_handler(StarletteHTTPException, self._on_http_exception)
        self.fastapi.add_exception_handler(ResponseValidationError, self._on_bug)
        self.fastapi.add_exception_handler(Exception, self._on_bug)  # answered by Starlette's outermost layer
        self.routes: list[Route] = []
        self.gateway = gateway
        """Also shown on ``/metrics`` and in ``/status`` (its own families and section), beside the node's."""
        for method, pattern, handler, access, options in (
            # probes and load balancers hold no secrets
            ("GET", "/health", self.health, Access.PUBLIC,
             {"response_model": HealthOut, "responses": {206: {"model": HealthOut}, 503: {"model": HealthOut}}}),
            ("GET", "/status", self.status, Access.READ, {"response_model": StatusOut}),
            ("POST", "/tasks", self.submit, Access.SUBMIT,
             {"response_model": SubmittedOut, "status_code": 201, "openapi_extra": _MSGPACK_BODY}),
            ("POST", "/tasks/batch", self.submit_batch, Access.SUBMIT,
             {"response_model": BatchOut, "openapi_extra": _MSGPACK_BODY}),
            ("GET", "/tasks/{task_id}", self.task, Access.READ, {"response_model": TaskViewOut}),
            ("GET", "/tasks/{task_id}/result", self.task_result, Access.READ,
             {"responses": {200: {"content": {MSGPACK: {}}, "description": "a msgpack TaskResultWire"}}}),
            # forgets the node's data
            ("DELETE", "/tasks/{task_id}/result", self.delete_result, Access.SUBMIT, {"response_model": DeletedOut}),
            # signs a Dispute, locks a bond
            ("POST", "/tasks/{task_id}/disputes", self.dispute, Access.DISPUTE,
             {"response_model": DisputeAcceptedOut, "status_code": 202, "openapi_extra": {"requestBody": {
                 "required": True, "content": {"application/json": {"schema": DisputeIn.model_json_schema()}}}}}),
            ("GET", "/ledger/balance/{address}", self.balance, Access.READ, {"response_model": BalanceOut}),
            ("GET", "/ledger/accounts/{address}", self.account, Access.READ, {"response_model": AccountOut}),
            ("GET", "/ledger/validators", self.validators, Access.READ, {"response_model": ValidatorsOut}),
            ("GET", "/ledger/providers", self.providers, Access.READ, {"response_model": ProvidersOut}),
            ("GET", "/ledger/blocks/{height}", self.block, Access.READ, {"response_model": BlockOut}),
            ("GET", "/ledger/head", self.head, Access.READ, {"response_model": HeadOut}),
            ("GET", "/ledger/supply", self.supply, Access.READ, {"response_model": SupplyOut}),
            ("GET", "/ledger/models", self.models, Access.READ, {"response_model": ModelsOut}),
            ("GET", "/ledger/models/{ref}", self.model, Access.READ, {"response_model": ModelOut}),
            ("GET", "/ledger/models/{ref}/providers", self.model_providers, Access.READ,
             {"response_model": ModelProvidersOut}),
            # signs a RegisterModel, burns the registration fee
            ("POST", "/models", self.push_model, Access.SUBMIT,
             {"response_model": ModelPushOut, "status_code": 202, "openapi_extra": _BUNDLE_BODY}),
            ("GET", "/models/{model_id}", self.model_push, Access.READ, {"response_model": ModelPushOut}),
            ("GET", "/metrics", self.metrics, Access.READ,
             {"responses": {200: {"content": {METRICS_CONTENT_TYPE: {}}, "description": "Prometheus text 0.0.4"}}}),
            # FastAPI's own /openapi.json would be public whatever the tokens say
            ("GET", "/openapi.json", self.openapi, Access.READ, {"include_in_schema": False}),
        ):
            if not isinstance(access, Access):  # every route says who may call it; no default to forget
                raise TypeError(f"route {method} {pattern} declares no Access")
            self.fastapi.add_api_route(pattern, handler, methods=[method],
                                       dependencies=[Depends(self._guard(access, pattern))], **options)
            regex = self.fastapi.router.routes[-1].path_regex  # type: ignore[attr-defined]
            self.routes.append(Route(method, pattern, regex, handler, access))
        if gateway is not None:
            self._add_gateway(gateway)

    def _add_gateway(self, gateway: GatewayPort) -> None:
        """The inference gateway's routes (KServe v2, TF Serving REST): public health, the rest ``infer``."""
        from p2pgpu.gateway.errors import GatewayError
        from p2pgpu.gateway.routes import GatewayRoutes, gateway_error_response

        async def node_ready() -> bool:
            return (await self.node.health()).state == "ready"

        def spending(request: Request, amount: int, what: str) -> AbstractContextManager[None]:
            return self.auth.spending(request.state.caller, amount, what)

        async def body(request: Request) -> bytes:
            return await read_body(request, self.max_body_bytes)

        async def on_gateway_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, GatewayError)  # noqa: S101 - registered for it only
            return gateway_error_response(exc)

        self.fastapi.add_exception_handler(GatewayError, on_gateway_error)
        routes = GatewayRoutes(gateway, read_body=body, spending=spending, ready=node_ready)
        for method, pattern, handler, public in routes.table():
            access = Access.PUBLIC if public else Access.INFER
            self.fastapi.add_api_route(pattern, handler, methods=[method],
                                       dependencies=[Depends(self._guard(access, pattern))])
            regex = self.fastapi.router.routes[-1].path_regex  # type: ignore[attr-defined]
            self.routes.append(Route(method, pattern, regex, handler, access))

    # ------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Out of the headers before the framework parses them: no handler, log line or error page sees it.
            authorization = [v for k, v in scope.get("headers", ()) if k.lower() == _AUTHORIZATION]
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", ()) if k.lower() != _AUTHORIZATION],
                     AUTHORIZATION_SCOPE_KEY: authorization[0].decode("latin-1") if authorization else None}
        elif scope["type"] == "lifespan":  # nothing to start or stop; answered here, so cancellation stays quiet
            await _lifespan(receive, send)
            return
        else:
            return  # no websockets here; the server closes the connection
        try:
            await self.fastapi(scope, receive, send)
        except Exception as exc:  # a bug in a handler or the node, answered with 500 (and logged) by _on_bug
            if not getattr(exc, _LOGGED, False):  # raised after the answer had started: not answered, not logged
                self.log.exception("API %s %s failed", scope.get("method"), scope.get("path"))

    def _guard(self, access: Access, pattern: str) -> Callable[[Request], Awaitable[Caller | None]]:
        """The dependency checking a route's token: runs before the body is read (no token, no upload).

        ``async`` though it never awaits: FastAPI runs a plain function dependency in a worker thread.
        """

        async def guard(request: Request) -> Caller | None:
            caller = None
            if access is not Access.PUBLIC:
                authorization = request.scope.get(AUTHORIZATION_SCOPE_KEY)
                caller = self.auth.authenticate(authorization, client=_client_of(request))
                self.auth.authorize(caller, access, path=pattern)
            request.state.caller = caller
            return caller

        return guard

    # ------------------------------------------------------------- errors

    async def _on_api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)  # noqa: S101 - registered for ApiError only
        response = _error_response(exc, request.method)
        if request.url.path.startswith(_GATEWAY_PREFIXES):  # the serving protocols' shape: {"error": "<message>"}
            response.body = json.dumps({"error": exc.message}).encode("utf-8")
            response.headers["content-length"] = str(len(response.body))
        return response

    async def _on_invalid_request(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)  # noqa: S101 - registered for it only
        return _error_response(validation_error(exc), request.method)

    async def _on_http_exception(self, request: Request, exc: Exception) -> Response:
        """What Starlette's router answers on its own (404, 405), in the API's words."""
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101 - registered for it only
        path, method = request.url.path, request.method
        if exc.status_code == 404:
            return _error_response(NotFound(f"no endpoint at {path}", "no_route"), method)
        if exc.status_code == 405:
            allowed = sorted({r.method for r in self.routes if r.regex.match(path)})
            return _error_response(MethodNotAllowed(f"{method} is not allowed on {path}; use {', '.join(allowed)}"),
                                   method)
        return _error_response(error_from_status(exc.status_code, "http_error", str(exc.detail)), method)

    async def _on_bug(self, request: Request, exc: Exception) -> Response:
        """Any other exception: logged before the 500 goes out (Starlette re-raises it after, see ``__call__``)."""
        if isinstance(exc, ResponseValidationError):
            self.log.error("API %s %s answered outside its response model: %s", request.method, request.url.path,
                           exc.errors())
        else:
            self.log.error("API %s %s failed", request.method, request.url.path, exc_info=exc)
        setattr(exc, _LOGGED, True)
        return _error_response(InternalError(f"{type(exc).__name__}: {exc}"), request.method)

    # ------------------------------------------------------------- handlers

    async def health(self) -> Response:
        h = await self.node.health()
        body = HealthOut.model_validate(to_jsonable(h)).model_dump_json().encode("utf-8")
        return Response(body, HEALTH_STATUS.get(h.state, 503), media_type="application/json")

    async def status(self) -> Any:
        body = to_jsonable(await self.node.status())
        body["gateway"] = to_jsonable(self.gateway.summary()) if self.gateway is not None else None
        return body

    async def submit(self, request: Request) -> Response:
        ctype = _content_type(request)
        if ctype not in _MSGPACK_TYPES:
            raise UnsupportedMediaType(
                f"POST /tasks takes {MSGPACK} (a msgpack SubmitTaskWire), got {ctype or 'no content type'}")
        submission = await self._decode_submit(await read_body(request, self.max_body_bytes))
        caller: Caller | None = request.state.caller
        cost = await self.node.task_cost(submission) if _limited(caller) else 0
        with self.auth.spending(caller, cost, "this task"):
            task_id = await self.node.submit_task(submission)
        answer = SubmittedOut(task_id=task_id.hex()).model_dump_json().encode("utf-8")
        return Response(answer, 201, headers={"location": f"/tasks/{task_id.hex()}"}, media_type="application/json")

    async def _decode_submit(self, body: bytes) -> SubmitRequest:
        """A task's wire form decoded (a model named NAME[@VERSION] resolved to its id), its inputs hashed.

        A large body is decoded in a worker thread, where hashing its inputs does not stall the node's loop;
        a small one on the loop, where that takes less than the hop to a thread and back under load.
        """
        if len(body) <= INLINE_DECODE_BYTES:
            return decode_submit(body, self.node.resolve_model)
        return await trio.to_thread.run_sync(decode_submit, body, self.node.resolve_model)

    async def submit_batch(self, request: Request) -> Any:
        """Post many tasks at once; one task's refusal or bad bytes never holds back the others.

        Answers 200 with ``{"results": [...]}`` in request order, each
        ``{"index": i, "task_id": hex}`` or ``{"index": i, "status": s,
        "error": code, "message": text}`` (the answer ``POST /tasks`` would
        have given that task). Not 207 Multi-Status: that is WebDAV's, defined
        with an XML body, and HTTP clients treat it as plain success anyway;
        a caller has to read every entry either way. Only a bad envelope
        (content type, size, shape, count) fails the request as a whole.
        """
        ctype = _content_type(request)
        if ctype not in _MSGPACK_TYPES:
            raise UnsupportedMediaType(f"POST /tasks/batch takes {MSGPACK} (a msgpack map {{\"tasks\": [...]}}), "
                                       f"got {ctype or 'no content type'}")
        slots = decode_submit_batch(await read_body(request, self.max_body_bytes))
        results: list[dict[str, Any]] = [{} for _ in slots]
        limiter = trio.CapacityLimiter(BATCH_CONCURRENCY)
        caller: Caller | None = request.state.caller
        async with trio.open_nursery() as nursery:
            for index, slot in enumerate(slots):
                nursery.start_soon(self._submit_one, index, slot, results, limiter, caller)
        return {"results": results}

    async def _submit_one(self, index: int, slot: bytes | ApiError, results: list[dict[str, Any]],
                          limiter: trio.CapacityLimiter, caller: Caller | None) -> None:
        """Decode (:meth:`_decode_submit`) and submit one task.

        Each task holds its own cost against the token's allowance, so a
        batch that would go over it gets ``spend_limit`` for the tasks that
        do not fit and the others go through.
        """
        try:
            if isinstance(slot, ApiError):
                raise slot
            async with limiter:
                submission = await self._decode_submit(slot)
                cost = await self.node.task_cost(submission) if _limited(caller) else 0
                with self.auth.spending(caller, cost, f"task {index} of this batch"):
                    task_id = await self.node.submit_task(submission)
        except ApiError as exc:
            results[index] = {"index": index, "status": exc.status, "error": exc.code, "message": exc.message}
        except Exception as exc:  # a bug: answer this task with 500, log, let the others finish
            self.log.exception("API POST /tasks/batch: task %d failed", index)
            err = InternalError(f"{type(exc).__name__}: {exc}")
            results[index] = {"index": index, "status": err.status, "error": err.code, "message": err.message}
        else:
            results[index] = {"index": index, "task_id": task_id.hex()}

    async def task(self, task_id: TaskIdParam) -> Any:
        return task_view_json(await self.node.task(task_id))

    async def task_result(self, task_id: TaskIdParam, wait: WaitParam = 0.0) -> Response:
        outputs = await self.node.task_result(task_id, wait)
        return Response(encode_result(task_id, outputs), 200, media_type=MSGPACK)

    async def delete_result(self, task_id: TaskIdParam) -> Any:
        """Delete a settled task's kept result (and the task's record) from the node; 409 while it is open."""
        await self.node.delete_result(task_id)
        return {"task_id": task_id.hex(), "deleted": True}

    async def dispute(self, request: Request, task_id: TaskIdParam) -> Any:
        ctype = _content_type(request)
        if ctype != "application/json":
            raise UnsupportedMediaType(f"POST /tasks/{{id}}/disputes takes application/json, got "
                                       f"{ctype or 'no content type'}")
        dispute = parse_dispute_body(await read_body(request, self.max_body_bytes))
        caller: Caller | None = request.state.caller
        cost = await self.node.dispute_cost() if _limited(caller) else 0
        with self.auth.spending(caller, cost, "this dispute (its bond and fee)"):
            await self.node.dispute_stream_item(task_id, dispute.item, dispute.reason)
        return {"task_id": task_id.hex(), "item": dispute.item, "status": "submitted"}

    async def balance(self, address: AddressParam) -> Any:
        return {"address": address.hex(), "balance": await self.node.balance(address)}

    async def account(self, address: AddressParam) -> Any:
        return to_jsonable(await self.node.account(address))

    async def validators(self) -> Any:
        return {"validators": to_jsonable(list(await self.node.validators()))}

    async def providers(self) -> Any:
        return {"providers": to_jsonable(list(await self.node.providers()))}

    async def block(self, height: HeightParam) -> Any:
        block = await self.node.block(height)
        return {
            "height": block.header.height,
            "hash": block.header.block_hash().hex(),
            "header": to_jsonable(block.header),
            "transactions": to_jsonable(block.transactions),
        }

    async def head(self) -> Any:
        return to_jsonable(await self.node.head())

    async def supply(self) -> Any:
        return to_jsonable(await self.node.supply())

    async def models(self) -> Any:
        return {"models": to_jsonable(list(await self.node.models()))}

    async def model(self, ref: str) -> Any:
        """``ref``: a model id, ``NAME`` (its latest version) or ``NAME@VERSION``; parsed here (FastAPI takes only
        scalar path parameters), with the API's ``bad_model_ref``."""
        return to_jsonable(await self.node.model(parse_model_reference(ref)))

    async def model_providers(self, ref: str) -> Any:
        """Who says the model is warm (signed ``/advert`` gossip this node kept), best first; ``ref`` as above."""
        return to_jsonable(await self.node.model_providers(parse_model_reference(ref)))

    async def push_model(self, request: Request, name: str = "", version: str = "1", royalty: str = "0") -> Any:
        """Register a model: the body is its canonical bundle; ``?name=&version=&royalty=`` say how.

        Answers 202 with the push's status (``pending`` until the block with
        its ``RegisterModel`` is final; ``GET /models/{id}`` follows it).
        """
        ctype = _content_type(request)
        if ctype not in _BUNDLE_TYPES:
            raise UnsupportedMediaType(f"POST /models takes a model bundle as {MSGPACK} or application/octet-stream, "
                                       f"got {ctype or 'no content type'}")
        if not name:
            raise BadRequest("POST /models needs ?name=NAME", "bad_model_name")
        if not (royalty.isascii() and royalty.isdigit() and len(royalty) <= 20):
            raise BadRequest(f"royalty={royalty!r}: expected a whole number of units per unit of work",
                             "bad_royalty")
        bundle = await read_body(request, self.max_body_bytes)
        push = PushModelRequest(bundle=bundle, name=name, version=version, royalty_per_unit=int(royalty))
        caller: Caller | None = request.state.caller
        cost = await self.node.model_registration_cost() if _limited(caller) else 0
        with self.auth.spending(caller, cost, "this model's registration fee"):
            view = await self.node.push_model(push)
        return Response(ModelPushOut.model_validate(to_jsonable(view)).model_dump_json().encode("utf-8"), 202,
                        headers={"location": f"/models/{view.model_id.hex()}"}, media_type="application/json")

    async def model_push(self, model_id: ModelIdParam) -> Any:
        return to_jsonable(await self.node.model_push(model_id))

    async def openapi(self) -> Response:
        return JSONResponse(self.fastapi.openapi())

    async def metrics(self) -> Response:
        families = list(await self.node.metrics())
        if self.gateway is not None:  # read after the node's await, in the same step as the render
            families.extend(self.gateway.metric_families())
        page = self.metrics_page.render(families)
        return Response(page, 200, media_type=METRICS_CONTENT_TYPE)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _client_of(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "-"
