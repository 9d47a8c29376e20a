"""The ASGI application: a small router from HTTP requests to :class:`NodeAPI` calls.

Hand-written rather than a framework: a dozen fixed routes, one body type
(msgpack) and JSON answers need ~200 lines, while a framework would add an
import cost to every node start and a second async library layer between
Trio and the handlers. Every request ends in exactly one response; an
``ApiError`` becomes its status and ``{"error": code, "message": text}``,
anything else is logged and answered with 500, and the server goes on.

Every route declares the :class:`~p2pgpu.api.auth.Access` it needs, next to
its handler (a route without one is refused when the app is built); the
``Authorization`` header is checked before the body is read and taken out
of the request, so no handler can log it. The routes that commit the
node's funds (submit, batch, dispute) hold their cost against the token's
hourly allowance around the node call (see :mod:`p2pgpu.api.auth`).

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
from urllib.parse import parse_qsl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from p2pgpu.api.auth import Access, Authenticator, Caller
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
    Unauthorized,
    UnsupportedMediaType,
    decode_submit,
    decode_submit_batch,
    encode_result,
    parse_address,
    parse_dispute,
    parse_height,
    parse_task_id,
    parse_wait,
    task_view_json,
    to_jsonable,
)
from p2pgpu.metrics_text import CONTENT_TYPE as METRICS_CONTENT_TYPE
from p2pgpu.metrics_text import render_metrics

__all__ = ["BATCH_CONCURRENCY", "DEFAULT_MAX_BODY_BYTES", "ApiApp", "Response", "Route"]

DEFAULT_MAX_BODY_BYTES = 256 << 20
BATCH_CONCURRENCY = 64
"""Tasks of one batch being decoded or submitted at once. Enough to keep the node's sealing threads
busy; few enough that a request cancelled midway leaves at most this many submissions half done."""
HEALTH_STATUS = {"ready": 200, "syncing": 206, "down": 503}
_MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")
        return cls(status, data, "application/json")

    @classmethod
    def error(cls, exc: ApiError) -> Response:
        resp = cls.json({"error": exc.code, "message": exc.message}, exc.status)
        resp.headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers)
        return resp


@dataclass(slots=True)
class Request:
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    receive: Receive
    max_body_bytes: int
    query: dict[str, str] = field(default_factory=dict)
    caller: Caller | None = None
    """The token the request came with (None: tokens are off, or a public route)."""

    async def body(self) -> bytes:
        """The whole body, refused with 413 as soon as it is known to exceed the limit."""
        declared = self.headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                raise BadRequest(f"Content-Length {declared!r} is not a number", "bad_header")
            if int(declared) > self.max_body_bytes:
                raise PayloadTooLarge(
                    f"body of {int(declared)} bytes exceeds the limit of {self.max_body_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise BadRequest("client disconnected mid-body", "disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(f"body exceeds the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str
    """As declared, e.g. ``/tasks/{task_id}``."""
    regex: re.Pattern[str]
    handler: Handler
    access: Access


def _limited(caller: Caller | None) -> bool:
    return caller is not None and caller.allowance is not None


class ApiApp:
    """An ASGI 3 application serving one node's :class:`NodeAPI`.

    ``auth`` holds the configured tokens; without it (or with none) every
    route is open, as the loopback-only API always was.
    """

    def __init__(self, node: NodeAPI, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 logger: logging.Logger | None = None, auth: Authenticator | None = None) -> None:
        self.node = node
        self.max_body_bytes = max_body_bytes
        self.log = logger or logging.getLogger("p2pgpu.api")
        self.auth = auth or Authenticator(logger=self.log)
        self.routes: list[Route] = []
        for method, pattern, handler, access in (
            ("GET", "/health", self.health, Access.PUBLIC),  # probes and load balancers hold no secrets
            ("GET", "/status", self.status, Access.READ),
            ("POST", "/tasks", self.submit, Access.SUBMIT),
            ("POST", "/tasks/batch", self.submit_batch, Access.SUBMIT),
            ("GET", "/tasks/{task_id}", self.task, Access.READ),
            ("GET", "/tasks/{task_id}/result", self.task_result, Access.READ),
            ("DELETE", "/tasks/{task_id}/result", self.delete_result, Access.SUBMIT),  # forgets the node's data
            ("POST", "/tasks/{task_id}/disputes", self.dispute, Access.DISPUTE),  # signs a Dispute, locks a bond
            ("GET", "/ledger/balance/{address}", self.balance, Access.READ),
            ("GET", "/ledger/accounts/{address}", self.account, Access.READ),
            ("GET", "/ledger/validators", self.validators, Access.READ),
            ("GET", "/ledger/providers", self.providers, Access.READ),
            ("GET", "/ledger/blocks/{height}", self.block, Access.READ),
            ("GET", "/ledger/head", self.head, Access.READ),
            ("GET", "/ledger/supply", self.supply, Access.READ),
            ("GET", "/metrics", self.metrics, Access.READ),
        ):
            if not isinstance(access, Access):  # every route says who may call it; no default to forget
                raise TypeError(f"route {method} {pattern} declares no Access")
            regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
            self.routes.append(Route(method, pattern, regex, handler, access))

    # ------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets here; the server closes the connection
        try:
            response = await self._dispatch(scope, receive)
        except ApiError as exc:
            response = Response.error(exc)
            if isinstance(exc, PayloadTooLarge) or (isinstance(exc, (Unauthorized, Forbidden))
                                                    and scope.get("method") not in ("GET", "HEAD")):
                # The rest of the body is never read, so this connection cannot carry another request.
                response.headers.append((b"connection", b"close"))
        except Exception as exc:  # a bug in a handler or the node: answer, log, keep serving
            self.log.exception("API %s %s failed", scope.get("method"), scope.get("path"))
            response = Response.error(InternalError(f"{type(exc).__name__}: {exc}"))
        headers = [(b"content-type", response.content_type.encode("latin-1")),
                   (b"content-length", str(len(response.body)).encode("ascii")), *response.headers]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _dispatch(self, scope: Scope, receive: Receive) -> Response:
        path: str = scope["path"]
        method: str = scope["method"]
        allowed: list[str] = []
        for route in self.routes:
            match = route.regex.match(path)
            if match is None:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
            authorization = headers.pop("authorization", None)  # out of reach of handlers and their logging
            caller = None
            if route.access is not Access.PUBLIC:  # before the body is read: no token, no upload
                caller = self.auth.authenticate(authorization, client=_client_of(scope))
                self.auth.authorize(caller, route.access, path=route.pattern)
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
            request = Request(method, path, match.groupdict(), headers, receive, self.max_body_bytes, query, caller)
            return await route.handler(request)
        if allowed:
            raise MethodNotAllowed(f"{method} is not allowed on {path}; use {', '.join(sorted(set(allowed)))}")
        raise NotFound(f"no endpoint at {path}", "no_route")

    # ------------------------------------------------------------- handlers

    async def health(self, req: Request) -> Response:
        h = await self.node.health()
        return Response.json(to_jsonable(h), HEALTH_STATUS.get(h.state, 503))

    async def status(self, req: Request) -> Response:
        return Response.json(to_jsonable(await self.node.status()))

    async def submit(self, req: Request) -> Response:
        ctype = req.content_type()
        if ctype not in _MSGPACK_TYPES:
            raise UnsupportedMediaType(
                f"POST /tasks takes {MSGPACK} (a msgpack SubmitTaskWire), got {ctype or 'no content type'}")
        body = await req.body()
        request = await trio.to_thread.run_sync(decode_submit, body)  # hashing inputs: off the node's loop
        cost = await self.node.task_cost(request) if _limited(req.caller) else 0
        with self.auth.spending(req.caller, cost, "this task"):
            task_id = await self.node.submit_task(request)
        resp = Response.json({"task_id": task_id.hex()}, 201)
        resp.headers.append((b"location", f"/tasks/{task_id.hex()}".encode("ascii")))
        return resp

    async def submit_batch(self, req: Request) -> Response:
        """Post many tasks at once; one task's refusal or bad bytes never holds back the others.

        Answers 200 with ``{"results": [...]}`` in request order, each
        ``{"index": i, "task_id": hex}`` or ``{"index": i, "status": s,
        "error": code, "message": text}`` (the answer ``POST /tasks`` would
        have given that task). Not 207 Multi-Status: that is WebDAV's, defined
        with an XML body, and HTTP clients treat it as plain success anyway;
        a caller has to read every entry either way. Only a bad envelope
        (content type, size, shape, count) fails the request as a whole.
        """
        ctype = req.content_type()
        if ctype not in _MSGPACK_TYPES:
            raise UnsupportedMediaType(f"POST /tasks/batch takes {MSGPACK} (a msgpack map {{\"tasks\": [...]}}), "
                                       f"got {ctype or 'no content type'}")
        slots = decode_submit_batch(await req.body())
        results: list[dict[str, Any]] = [{} for _ in slots]
        limiter = trio.CapacityLimiter(BATCH_CONCURRENCY)
        async with trio.open_nursery() as nursery:
            for index, slot in enumerate(slots):
                nursery.start_soon(self._submit_one, index, slot, results, limiter, req.caller)
        return Response.json({"results": results})

    async def _submit_one(self, index: int, slot: bytes | ApiError, results: list[dict[str, Any]],
                          limiter: trio.CapacityLimiter, caller: Caller | None) -> None:
        """Decode (in a worker thread: hashing inputs would stall the node's loop) and submit one task.

        Each task holds its own cost against the token's allowance, so a
        batch that would go over it gets ``spend_limit`` for the tasks that
        do not fit and the others go through.
        """
        try:
            if isinstance(slot, ApiError):
                raise slot
            async with limiter:
                request = await trio.to_thread.run_sync(decode_submit, slot)
                cost = await self.node.task_cost(request) if _limited(caller) else 0
                with self.auth.spending(caller, cost, f"task {index} of this batch"):
                    task_id = await self.node.submit_task(request)
        except ApiError as exc:
            results[index] = {"index": index, "status": exc.status, "error": exc.code, "message": exc.message}
        except Exception as exc:  # a bug: answer this task with 500, log, let the others finish
            self.log.exception("API POST /tasks/batch: task %d failed", index)
            err = InternalError(f"{type(exc).__name__}: {exc}")
            results[index] = {"index": index, "status": err.status, "error": err.code, "message": err.message}
        else:
            results[index] = {"index": index, "task_id": task_id.hex()}

    async def task(self, req: Request) -> Response:
        view = await self.node.task(parse_task_id(req.params["task_id"]))
        return Response.json(task_view_json(view))

    async def task_result(self, req: Request) -> Response:
        task_id = parse_task_id(req.params["task_id"])
        wait = parse_wait(req.query)
        outputs = await self.node.task_result(task_id, wait)
        return Response(200, encode_result(task_id, outputs), MSGPACK)

    async def delete_result(self, req: Request) -> Response:
        """Delete a settled task's kept result (and the task's record) from the node; 409 while it is open."""
        task_id = parse_task_id(req.params["task_id"])
        await self.node.delete_result(task_id)
        return Response.json({"task_id": task_id.hex(), "deleted": True})

    async def dispute(self, req: Request) -> Response:
        task_id = parse_task_id(req.params["task_id"])
        ctype = req.content_type()
        if ctype != "application/json":
            raise UnsupportedMediaType(f"POST /tasks/{{id}}/disputes takes application/json, got "
                                       f"{ctype or 'no content type'}")
        dispute = parse_dispute(await req.body())
        cost = await self.node.dispute_cost() if _limited(req.caller) else 0
        with self.auth.spending(req.caller, cost, "this dispute (its bond and fee)"):
            await self.node.dispute_stream_item(task_id, dispute.item, dispute.reason)
        return Response.json({"task_id": task_id.hex(), "item": dispute.item, "status": "submitted"}, 202)

    async def balance(self, req: Request) -> Response:
        address = parse_address(req.params["address"])
        return Response.json({"address": address.hex(), "balance": await self.node.balance(address)})

    async def account(self, req: Request) -> Response:
        return Response.json(to_jsonable(await self.node.account(parse_address(req.params["address"]))))

    async def validators(self, req: Request) -> Response:
        return Response.json({"validators": to_jsonable(list(await self.node.validators()))})

    async def providers(self, req: Request) -> Response:
        return Response.json({"providers": to_jsonable(list(await self.node.providers()))})

    async def block(self, req: Request) -> Response:
        height = parse_height(req.params["height"])
        block = await self.node.block(height)
        return Response.json({
            "height": block.header.height,
            "hash": block.header.block_hash().hex(),
            "header": to_jsonable(block.header),
            "transactions": to_jsonable(block.transactions),
        })

    async def head(self, req: Request) -> Response:
        return Response.json(to_jsonable(await self.node.head()))

    async def supply(self, req: Request) -> Response:
        return Response.json(to_jsonable(await self.node.supply()))

    async def metrics(self, req: Request) -> Response:
        text = render_metrics(await self.node.metrics())
        return Response(200, text.encode("utf-8"), METRICS_CONTENT_TYPE)


def _client_of(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"
