"""``Client``: the SDK over a blocking :class:`httpx.Client`. Each method runs one operation of
:mod:`p2pgpu.client._ops`; this module only sends, sleeps and calls back.

Safe to share between threads (httpx's client is; the only state of ours
is the locked result cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from os import PathLike
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import numpy as np

from p2pgpu.api.types import TaskView
from p2pgpu.client import _ops
from p2pgpu.client._ops import LONG_POLL_S, Call, Compute, Notify, Op, ResultCache, Sleep, Step, Until
from p2pgpu.client._transport import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    auth_headers,
    base_url,
    map_transport_error,
    reply_of,
    timeout_for,
)
from p2pgpu.client.errors import P2PGPUError

if TYPE_CHECKING:
    from kernels.jobspec import JobSpec

__all__ = ["Client"]

T = TypeVar("T")


class Client:
    """A node's API from blocking code: inference (Open Inference Protocol v2), tasks, models.

    ``url``: the node's API (default ``http://127.0.0.1:8645``, the
    config's default port); ``token``: the bearer token of a node with
    ``[[api.tokens]]`` (never logged or shown in ``repr``); ``timeout``:
    seconds any one request may take (a long poll adds its own wait).
    ``transport`` replaces the network (tests: :class:`httpx.MockTransport`).
    """

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = base_url(url)
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.url, headers=auth_headers(token), timeout=timeout,
                                  transport=transport)
        self._results = ResultCache()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------- the driver

    def _run(self, op: Op[T]) -> T:
        """Run an operation: perform each step, send back its value, or throw its SDK error into it."""
        value: Any = None
        error: P2PGPUError | None = None
        try:
            while True:
                try:
                    step = op.throw(error) if error is not None else op.send(value)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                value, error = None, None
                try:
                    value = self._perform(step)
                except P2PGPUError as exc:
                    error = exc
        finally:
            op.close()

    def _perform(self, step: Step) -> Any:
        if isinstance(step, Call):
            return self._send(step)
        if isinstance(step, Compute):
            return step.fn()
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        if isinstance(step, Notify):
            step.callback(step.view)
            return None
        raise TypeError(f"unknown step {step!r}")

    def _send(self, call: Call) -> Any:
        content: bytes | Iterator[bytes] | None = (iter(call.content) if isinstance(call.content, tuple)
                                                   else call.content)
        try:
            resp = self._http.request(call.method, call.path, params=call.params, headers=call.headers,
                                      content=content, timeout=timeout_for(call, self.timeout))
        except httpx.TransportError as exc:
            raise map_transport_error(exc, call, self.url) from None
        return reply_of(call, resp)

    # ------------------------------------------------------------- inference (v2)

    def infer(self, model: str, array: np.ndarray, *, version: str | None = None, input_name: str = "x",
              output: str = "y") -> np.ndarray:
        """Run ``model`` on ``array`` (``POST /v2/models/{model}[/versions/{v}]/infer``, tensors in binary)."""
        return self._run(_ops.infer(model, array, version, input_name, output))

    def model_ready(self, model: str, version: str | None = None) -> bool:
        return self._run(_ops.model_ready(model, version))

    def model_metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        return self._run(_ops.model_metadata(model, version))

    def server_live(self) -> bool:
        """False when nothing answers; raises :class:`AuthError` for a node that wants a token."""
        return self._run(_ops.server_live())

    # ------------------------------------------------------------- tasks

    def submit(self, spec: JobSpec, inputs: Mapping[str, np.ndarray], *, max_unit_price: int,
               units: int | None = None, items: np.ndarray | None = None, bid_window: int = 10,
               audit_rate: float = 0.1) -> str:
        """Post a task (``POST /tasks``); its id in hex. With ``items`` (one per row) a stream task."""
        return self._run(_ops.submit(spec, inputs, items, max_unit_price=max_unit_price, units=units,
                                     bid_window=bid_window, audit_rate=audit_rate))

    def submit_model(self, model_ref: str, x: np.ndarray | None = None, *, max_unit_price: int,
                     items: np.ndarray | None = None, units: int | None = None, bid_window: int = 10,
                     audit_rate: float = 0.1, limits: Mapping[str, Any] | None = None) -> str:
        """Inference with a registered model (id, NAME or NAME@VERSION) on batch ``x``, or as a stream of
        ``items``; the node's registry resolves the reference and no weights are sent."""
        return self._run(_ops.submit_model(model_ref, x, items, max_unit_price=max_unit_price, units=units,
                                           bid_window=bid_window, audit_rate=audit_rate, limits=limits))

    def task(self, task_id: str | bytes) -> TaskView:
        return self._run(_ops.task(task_id))

    def wait(self, task_id: str | bytes, *, timeout: float | None = None,
             on_progress: Callable[[TaskView], object] | None = None, until: Until = "settled",
             poll: float = LONG_POLL_S) -> TaskView:
        """Block until the task reaches ``until`` (``"settled"``, or ``"delivered"``: its result is in);
        ``on_progress(view)`` on each stage change. :class:`WaitTimeout` after ``timeout`` seconds."""
        return self._run(_ops.wait(task_id, self._results, timeout=timeout, poll=poll, until=until,
                                   on_progress=on_progress))

    def result(self, task_id: str | bytes) -> dict[str, np.ndarray]:
        """The task's output tensors; :class:`NotReady` before delivery."""
        return self._run(_ops.result(task_id, self._results))

    # ------------------------------------------------------------- models

    def push_model(self, path: str | PathLike[str], *, name: str, version: str | None = None, royalty: int = 0,
                   wait: bool = False, timeout: float | None = None, poll: float = 0.5) -> dict[str, Any]:
        """Validate a model file here (no TensorFlow), send its canonical bundle (``POST /models``); the push's
        status. ``wait``: until the registration is final (:class:`ModelPushFailed` if it failed)."""
        return self._run(_ops.push_model(path, name=name, version=version, royalty=royalty, wait=wait,
                                         timeout=timeout, poll=poll))

    def model_push(self, model_id: str | bytes) -> dict[str, Any]:
        """Where this node's push of ``model_id`` stands (``pending``, ``registered``, ``failed``)."""
        return self._run(_ops.model_push(model_id))

    def models(self) -> list[dict[str, Any]]:
        return self._run(_ops.models())

    def model(self, ref: str) -> dict[str, Any]:
        """A registered model by id, NAME (its latest version) or NAME@VERSION; :class:`ModelNotFound` if none."""
        return self._run(_ops.model(ref))
