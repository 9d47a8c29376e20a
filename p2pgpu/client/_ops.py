"""What each SDK call does, written once as a generator of steps; the sync and the async client only run them.

An operation yields :class:`Call` (send this request, give me the answer),
:class:`Sleep`, :class:`Compute` (run this CPU-heavy function; the async
client moves it to a worker thread so the event loop keeps serving) and
:class:`Notify` (call the user's progress callback), and receives each
step's value back. A failed :class:`Call` is thrown into the operation as the
SDK error it maps to (:func:`p2pgpu.client.errors.error_for`), so an
operation can catch one (``model_ready`` turns a 404 into False). No I/O,
no clock but :func:`time.monotonic`, no shared state but the
:class:`ResultCache` handed in: the protocol logic is tested here once and
both clients behave the same by construction.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, TypeVar
from urllib.parse import quote

import numpy as np

from p2pgpu.api.types import (
    MSGPACK,
    STAGES,
    STREAM_ITEMS_INPUT,
    ApiError,
    SubmitRequest,
    TaskView,
    decode_result,
    encode_submit,
)
from p2pgpu.client.errors import (
    BadResponse,
    InvalidInput,
    InvalidModelFile,
    ModelPushFailed,
    NodeUnreachable,
    Route,
    Unavailable,
    WaitTimeout,
)
from p2pgpu.client import v2

if TYPE_CHECKING:
    from kernels.jobspec import JobSpec

__all__ = [
    "LONG_POLL_S",
    "Call",
    "Compute",
    "Notify",
    "Op",
    "Reply",
    "ResultCache",
    "Sleep",
    "Step",
]

T = TypeVar("T")

LONG_POLL_S: Final = 5.0
"""Default seconds one ``GET /tasks/{id}/result?wait=`` holds: stage changes are reported at least this often."""
PUSH_TIMEOUT_S: Final = 300.0
"""``POST /models`` is answered once the node has decoded, checked and stored the bundle."""
RESULT_CACHE: Final = 16
THREAD_BYTES: Final = 1 << 20
"""Answers at least this large are decoded in a :class:`Compute` step (a worker thread under the async client):
a copy of a big tensor would stall the event loop, a thread hop would cost a small one more than its decoding."""


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request. ``ok``: the statuses that are answers (others raise); ``extra_timeout``: seconds on top of
    the client's timeout (a long poll's own wait)."""

    method: str
    path: str
    route: Route = "api"
    params: Mapping[str, str] | None = None
    headers: Mapping[str, str] | None = None
    content: bytes | tuple[bytes, ...] | None = None
    ok: tuple[int, ...] = (200,)
    extra_timeout: float = 0.0
    timeout: float | None = None
    """Replaces the client's timeout for this call (a model push can take minutes)."""

    @property
    def what(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    """Lower-case names."""
    content: bytes

    def json(self, what: str) -> Any:
        try:
            return json.loads(self.content.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise BadResponse(f"{what}: the node answered with something other than JSON") from None


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Compute:
    fn: Callable[[], Any]


@dataclass(frozen=True, slots=True)
class Notify:
    callback: Callable[[TaskView], object]
    view: TaskView


Step: TypeAlias = Call | Sleep | Compute | Notify
Op: TypeAlias = Generator[Step, Any, T]


@dataclass
class ResultCache:
    """Results ``wait`` received through the long poll, kept so ``result`` need not download them again.

    Bounded (the oldest go first) and popped on read; a lock because a sync
    :class:`~p2pgpu.client.Client` may be shared by threads (never held
    across an ``await``).
    """

    size: int = RESULT_CACHE
    _items: OrderedDict[str, dict[str, np.ndarray]] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, task_id: str, outputs: dict[str, np.ndarray]) -> None:
        with self._lock:
            self._items[task_id] = outputs
            self._items.move_to_end(task_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def pop(self, task_id: str) -> dict[str, np.ndarray] | None:
        with self._lock:
            return self._items.pop(task_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# ------------------------------------------------------------------ inference (v2)


def infer(model: str, array: np.ndarray, version: str | None, input_name: str, output: str) -> Op[np.ndarray]:
    path = v2.model_path(model, version) + "/infer"
    request = v2.encode_infer_request(array, input_name=input_name, output=output)
    reply = yield Call("POST", path, route="v2", headers=request.headers, content=request.chunks)
    result: np.ndarray = yield from _decode(lambda: v2.decode_infer_response(reply.headers, reply.content,
                                                                             output=output), len(reply.content))
    return result


def _decode(fn: Callable[[], T], size: int) -> Op[T]:
    """``fn()`` here for a small answer, in a :class:`Compute` step for a large one."""
    if size < THREAD_BYTES:
        return fn()
    value: T = yield Compute(fn)
    return value


def model_ready(model: str, version: str | None) -> Op[bool]:
    """200 is ready; per the protocol any 4xx means not (404 unknown, 400/409 not loaded), and so does a 503."""
    path = v2.model_path(model, version) + "/ready"
    reply = yield Call("GET", path, route="v2", ok=(200, 400, 404, 409, 503))
    return bool(reply.status == 200)


def model_metadata(model: str, version: str | None) -> Op[dict[str, Any]]:
    path = v2.model_path(model, version)
    reply = yield Call("GET", path, route="v2")
    doc = reply.json(f"GET {path}")
    if not isinstance(doc, dict):
        raise BadResponse(f"GET {path}: model metadata is not a JSON object")
    return doc


def server_live() -> Op[bool]:
    """A node that does not answer is not live (False); one that wants a token still raises :class:`AuthError`."""
    try:
        reply = yield Call("GET", "/v2/health/live", route="v2", ok=(200, 400, 404, 409, 500, 502, 503, 504))
    except (NodeUnreachable, Unavailable):
        return False
    return bool(reply.status == 200)


# ------------------------------------------------------------------ tasks


def task_hex(task_id: str | bytes) -> str:
    """A task id as the API's 64 lower-case hex digits; InvalidInput for anything else."""
    if isinstance(task_id, bytes):
        if len(task_id) != 32:
            raise InvalidInput(f"a task id is 32 bytes, got {len(task_id)}")
        return task_id.hex()
    text = task_id.lower().removeprefix("0x")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise InvalidInput(f"task id {task_id!r} is not 64 hex digits")
    return text


def _submit_request(spec: JobSpec, inputs: Mapping[str, np.ndarray], items: np.ndarray | None, *,
                    max_unit_price: int, units: int | None, bid_window: int, audit_rate: float) -> SubmitRequest:
    """The :class:`SubmitRequest` ``p2pgpu submit`` would build, its terms checked here (nothing sent yet)."""
    if isinstance(max_unit_price, bool) or not isinstance(max_unit_price, int) or max_unit_price < 1:
        raise InvalidInput(f"max_unit_price {max_unit_price!r}: the most paid per unit, a whole number >= 1")
    if items is not None and STREAM_ITEMS_INPUT in inputs:
        raise InvalidInput(f"give a stream's items as items=..., not as an input named {STREAM_ITEMS_INPUT!r}")
    if units is None:
        units = 1 if items is None else len(items)
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise InvalidInput(f"units {units!r}: at least 1 (a batch task is 1 unit; a stream, the items paid for)")
    if items is None and units != 1:
        raise InvalidInput(f"units {units}: a batch task has exactly 1 unit (units count a stream's items)")
    if isinstance(bid_window, bool) or not isinstance(bid_window, int) or bid_window < 1:
        raise InvalidInput(f"bid_window {bid_window!r}: blocks to wait for bids, at least 1")
    if not (isinstance(audit_rate, (int, float)) and 0.0 <= audit_rate <= 1.0):
        raise InvalidInput(f"audit_rate {audit_rate!r}: a chance in [0, 1]")
    all_inputs = dict(inputs) if items is None else {**inputs, STREAM_ITEMS_INPUT: items}
    return SubmitRequest(spec=spec, inputs=all_inputs, max_unit_price=max_unit_price, units=units,
                         bid_window=bid_window, audit_rate_bps=round(audit_rate * 10_000),
                         kind="batch" if items is None else "stream")


def _encode(request: SubmitRequest) -> bytes:
    try:
        return encode_submit(request)
    except ApiError as exc:  # Unprocessable: a value that cannot go on the wire
        raise InvalidInput(exc.message, code=exc.code) from None


def submit(spec: JobSpec, inputs: Mapping[str, np.ndarray], items: np.ndarray | None, *, max_unit_price: int,
           units: int | None, bid_window: int, audit_rate: float) -> Op[str]:
    request = _submit_request(spec, inputs, items, max_unit_price=max_unit_price, units=units,
                              bid_window=bid_window, audit_rate=audit_rate)
    body: bytes = yield Compute(lambda: _encode(request))
    reply = yield Call("POST", "/tasks", headers={"content-type": MSGPACK}, content=body, ok=(201,))
    doc = reply.json("POST /tasks")
    try:
        return task_hex(str(doc["task_id"]))
    except (KeyError, TypeError, InvalidInput):
        raise BadResponse(f"POST /tasks: the answer has no task id: {str(doc)[:200]}") from None


def submit_model(model_ref: str, x: np.ndarray | None, items: np.ndarray | None, *, max_unit_price: int,
                 units: int | None, bid_window: int, audit_rate: float,
                 limits: Mapping[str, Any] | None) -> Op[str]:
    """A task by registered model: resolved by the node's registry, no weights sent (``p2pgpu submit --model``)."""
    from kernels.bymodel import make_model_spec
    from kernels.errors import KernelError

    if (x is None) == (items is None):
        raise InvalidInput("submit_model takes either x (a batch, one item per row) or items= (a stream task)")
    view = yield from model(model_ref)
    try:
        model_id = bytes.fromhex(str(view["model_id"]))
        kernel = "keras_infer" if items is None else "stream_infer"
        spec = make_model_spec(model_id, {}, x, kernel=kernel, **dict(limits or {}))
    except KernelError as exc:
        raise InvalidInput(f"{type(exc).__name__}: {exc}", code="invalid_spec") from None
    except (KeyError, ValueError) as exc:
        raise BadResponse(f"the registry's answer for {model_ref!r} has no model id ({exc})") from None
    except TypeError as exc:  # an unknown limit name
        raise InvalidInput(f"limits: {exc} (known: device, memory_bytes, seconds, output_bytes)") from None
    inputs = {} if x is None else {"x": x}
    task_id: str = yield from submit(spec, inputs, items, max_unit_price=max_unit_price, units=units,
                                     bid_window=bid_window, audit_rate=audit_rate)
    return task_id


def task(task_id: str | bytes) -> Op[TaskView]:
    path = f"/tasks/{task_hex(task_id)}"
    reply = yield Call("GET", path)
    try:
        return TaskView.from_json(reply.json(f"GET {path}"))
    except ApiError as exc:
        raise BadResponse(f"GET {path}: {exc.message}") from None


def _decode_outputs(task_id: str, body: bytes) -> dict[str, np.ndarray]:
    try:
        wire = decode_result(body)
    except ApiError as exc:
        raise BadResponse(exc.message) from None
    if wire.task_id.hex() != task_id:
        raise BadResponse(f"the node returned the result of task {wire.task_id.hex()}, not {task_id}")
    return dict(wire.outputs)


def result(task_id: str | bytes, cache: ResultCache) -> Op[dict[str, np.ndarray]]:
    tid = task_hex(task_id)
    kept = cache.pop(tid)
    if kept is not None:
        return kept
    reply = yield Call("GET", f"/tasks/{tid}/result")
    outputs: dict[str, np.ndarray] = yield from _decode(lambda: _decode_outputs(tid, reply.content),
                                                        len(reply.content))
    return outputs


Until = Literal["delivered", "settled"]


def wait(task_id: str | bytes, cache: ResultCache, *, timeout: float | None, poll: float, until: Until,
         on_progress: Callable[[TaskView], object] | None) -> Op[TaskView]:
    """Follow a task until its stage is ``until`` or later (a task that ends without a result settles).

    Before delivery each round is one ``GET /tasks/{id}/result?wait=S``
    (the node answers as soon as the result is in, which is then kept in
    ``cache`` for :func:`result`), then the task view; after it, the view
    every ``poll`` seconds. ``on_progress`` sees the first view and every
    view whose stage differs from the last one reported.
    """
    if not (isinstance(poll, (int, float)) and 0.0 < poll <= 60.0):
        raise InvalidInput(f"poll {poll!r}: seconds between looks, in (0, 60]")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout >= 0 and math.isfinite(timeout)):
        raise InvalidInput(f"timeout {timeout!r}: seconds, 0 or more (None to wait as long as it takes)")
    tid = task_hex(task_id)
    target = STAGES.index(until)
    deadline = None if timeout is None else time.monotonic() + timeout
    reported: str | None = None
    have_result = False
    while True:
        view: TaskView = yield from task(tid)
        if on_progress is not None and view.stage != reported:
            reported = view.stage
            yield Notify(on_progress, view)
        index = STAGES.index(view.stage)
        if index >= target or view.stage == "settled":
            return view
        left = math.inf if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"task {tid} is still {view.stage} after {timeout:g} s; it goes on (wait again, "
                              "or look with task())", view=view)
        pause = min(poll, left)
        if have_result or index >= STAGES.index("delivered"):
            yield Sleep(pause)
            continue
        started = time.monotonic()
        reply = yield Call("GET", f"/tasks/{tid}/result", params={"wait": f"{pause:.3f}"}, ok=(200, 409),
                           extra_timeout=pause)
        if reply.status == 200:
            outputs = yield from _decode(lambda: _decode_outputs(tid, reply.content), len(reply.content))
            cache.put(tid, outputs)
            have_result = True
        else:
            spent = time.monotonic() - started
            if spent < pause / 2:  # answered at once (the task ended without a result): do not spin
                yield Sleep(pause - spent)


# ------------------------------------------------------------------ models


def models() -> Op[list[dict[str, Any]]]:
    reply = yield Call("GET", "/ledger/models")
    doc = reply.json("GET /ledger/models")
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise BadResponse("GET /ledger/models: no 'models' list in the answer")
    return list(doc["models"])


def model(ref: str) -> Op[dict[str, Any]]:
    if not isinstance(ref, str) or not ref:
        raise InvalidInput(f"model reference {ref!r}: give an id, NAME or NAME@VERSION")
    path = f"/ledger/models/{quote(ref, safe='@')}"
    reply = yield Call("GET", path)
    doc = reply.json(f"GET {path}")
    if not isinstance(doc, dict):
        raise BadResponse(f"GET {path}: not a JSON object")
    return doc


def _check_push(name: str, version: str, royalty: int) -> None:
    from ledger.modelnames import is_valid_model_name

    for what, text in (("name", name), ("version", version)):
        if not isinstance(text, str) or not is_valid_model_name(text):
            raise InvalidInput(f"{what} {text!r}: use lowercase letters, digits and . _ - (first a letter or "
                               "digit), at most 64 characters, not a 64-digit hex id", code="bad_model_name")
    if isinstance(royalty, bool) or not isinstance(royalty, int) or royalty < 0:
        raise InvalidInput(f"royalty {royalty!r}: a whole number of units per unit of work, 0 or more",
                           code="bad_royalty")


def _bundle_bytes(path: str | PathLike[str]) -> bytes:
    """The canonical bundle of a model file, read as data (no TensorFlow, nothing of the file runs)."""
    from kernels.bundle import encode_bundle, load_model_file
    from kernels.errors import KernelError

    try:
        return encode_bundle(load_model_file(Path(path)))
    except KernelError as exc:
        raise InvalidModelFile(f"{path}: {type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise InvalidModelFile(f"{path}: {exc.strerror or exc}") from None


def model_push(model_id: str | bytes) -> Op[dict[str, Any]]:
    mid = model_id.hex() if isinstance(model_id, bytes) else model_id
    path = f"/models/{quote(mid, safe='')}"
    reply = yield Call("GET", path)
    doc = reply.json(f"GET {path}")
    if not isinstance(doc, dict) or "status" not in doc:
        raise BadResponse(f"GET {path}: not a push status")
    return doc


def push_model(path: str | PathLike[str], *, name: str, version: str | None, royalty: int, wait: bool,
               timeout: float | None, poll: float) -> Op[dict[str, Any]]:
    """``p2pgpu model push``: validate and bundle here, ``POST /models``; with ``wait``, follow it until final."""
    version = "1" if version is None else version
    _check_push(name, version, royalty)
    bundle: bytes = yield Compute(lambda: _bundle_bytes(path))
    reply = yield Call("POST", "/models", params={"name": name, "version": version, "royalty": str(royalty)},
                       headers={"content-type": "application/octet-stream"}, content=bundle, ok=(202,),
                       timeout=PUSH_TIMEOUT_S)
    status = reply.json("POST /models")
    if not isinstance(status, dict) or "model_id" not in status or "status" not in status:
        raise BadResponse("POST /models: the answer is not a push status")
    if not wait:
        return status
    deadline = None if timeout is None else time.monotonic() + timeout
    while status["status"] == "pending":
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeout(f"{name}@{version} not registered after {timeout:g} s (still pending: "
                              f"{status.get('detail', '')}); the push goes on", view=status)
        yield Sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        status = yield from model_push(str(status["model_id"]))
    if status["status"] != "registered":
        raise ModelPushFailed(f"registration of {name}@{version} failed: {status.get('detail', '')}")
    return status
