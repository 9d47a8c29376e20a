"""``AsyncClient``: the SDK over :class:`httpx.AsyncClient`, under Trio or asyncio alike.

httpx runs on AnyIO, so does this driver: sleeps are :func:`anyio.sleep`,
CPU-heavy steps (reading a model file, encoding a submission, decoding a
result) go to :func:`anyio.to_thread.run_sync` so the event loop keeps
serving. Every method is a coroutine of the same name and arguments as
:class:`~p2pgpu.client.Client`'s; the work itself is the same operation of
:mod:`p2pgpu.client._ops`. One instance may be used by many tasks at once:
no state of ours is read before an ``await`` and written after it (the
result cache is touched only between awaits).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from os import PathLike
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
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

__all__ = ["AsyncClient"]

T = TypeVar("T")


async def _chunks(parts: tuple[bytes, ...]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


class AsyncClient:
    """:class:`~p2pgpu.client.Client` for async code: the same methods, each a coroutine.

    Use ``async with AsyncClient(...) as client:`` or ``await client.aclose()``.
    ``on_progress`` of :meth:`wait` may be a plain function or a coroutine
    function.
    """

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = base_url(url)
        self.timeout = timeout
        self._http = httpx.AsyncClient(base_url=self.url, headers=auth_headers(token), timeout=timeout,
                                       transport=transport)
        self._results = ResultCache()

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    close = aclose
    """``await client.close()`` works too (the brief's name; httpx's is ``aclose``)."""

    # ------------------------------------------------------------- the driver

    async def _run(self, op: Op[T]) -> T:
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
                    value = await self._perform(step)
                except P2PGPUError as exc:
                    error = exc
        finally:
            op.close()

    async def _perform(self, step: Step) -> Any:
        if isinstance(step, Call):
            return await self._send(step)
        if isinstance(step, Compute):
            return await anyio.to_thread.run_sync(step.fn)
        if isinstance(step, Sleep):
            await anyio.sleep(step.seconds)
            return None
        if isinstance(step, Notify):
            outcome = step.callback(step.view)
            if inspect.isawaitable(outcome):
                await outcome
            return None
        raise TypeError(f"unknown step {step!r}")

    async def _send(self, call: Call) -> Any:
        content: bytes | AsyncIterator[bytes] | None = (_chunks(call.content) if isinstance(call.content, tuple)
                                                        else call.content)
        try:
            resp = await self._http.request(call.method, call.path, params=call.params, headers=call.headers,
                                            content=content, timeout=timeout_for(call, self.timeout))
        except httpx.TransportError as exc:
            raise map_transport_error(exc, call, self.url) from None
        return reply_of(call, resp)

    # ------------------------------------------------------------- inference (v2)

    async def infer(self, model: str, array: np.ndarray, *, version: str | None = None, input_name: str = "x",
                    output: str = "y") -> np.ndarray:
        return await self._run(_ops.infer(model, array, version, input_name, output))

    async def model_ready(self, model: str, version: str | None = None) -> bool:
        return await self._run(_ops.model_ready(model, version))

    async def model_metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        return await self._run(_ops.model_metadata(model, version))

    async def server_live(self) -> bool:
        return await self._run(_ops.server_live())

    # ------------------------------------------------------------- tasks

    async def submit(self, spec: JobSpec, inputs: Mapping[str, np.ndarray], *, max_unit_price: int,
                     units: int | None = None, items: np.ndarray | None = None, bid_window: int = 10,
                     audit_rate: float = 0.1) -> str:
        return await self._run(_ops.submit(spec, inputs, items, max_unit_price=max_unit_price, units=units,
                                           bid_window=bid_window, audit_rate=audit_rate))

    async def submit_model(self, model_ref: str, x: np.ndarray | None = None, *, max_unit_price: int,
                           items: np.ndarray | None = None, units: int | None = None, bid_window: int = 10,
                           audit_rate: float = 0.1, limits: Mapping[str, Any] | None = None) -> str:
        return await self._run(_ops.submit_model(model_ref, x, items, max_unit_price=max_unit_price, units=units,
                                                 bid_window=bid_window, audit_rate=audit_rate, limits=limits))

    async def task(self, task_id: str | bytes) -> TaskView:
        return await self._run(_ops.task(task_id))

    async def wait(self, task_id: str | bytes, *, timeout: float | None = None,
                   on_progress: Callable[[TaskView], object] | None = None, until: Until = "settled",
                   poll: float = LONG_POLL_S) -> TaskView:
        return await self._run(_ops.wait(task_id, self._results, timeout=timeout, poll=poll, until=until,
                                         on_progress=on_progress))

    async def result(self, task_id: str | bytes) -> dict[str, np.ndarray]:
        return await self._run(_ops.result(task_id, self._results))

    # ------------------------------------------------------------- models

    async def push_model(self, path: str | PathLike[str], *, name: str, version: str | None = None,
                         royalty: int = 0, wait: bool = False, timeout: float | None = None,
                         poll: float = 0.5) -> dict[str, Any]:
        return await self._run(_ops.push_model(path, name=name, version=version, royalty=royalty, wait=wait,
                                               timeout=timeout, poll=poll))

    async def model_push(self, model_id: str | bytes) -> dict[str, Any]:
        return await self._run(_ops.model_push(model_id))

    async def models(self) -> list[dict[str, Any]]:
        return await self._run(_ops.models())

    async def model(self, ref: str) -> dict[str, Any]:
        return await self._run(_ops.model(ref))
