"""One lane per served model: requests in, batched into a live stream session, answers out, failover on loss.

A :class:`ModelLane` owns everything the gateway does for one model: the
queue (:class:`~p2pgpu.gateway.batcher.DynamicBatcher`), the live stream
session it sends items on, the session it opens next before the current one
runs out of units, and the failover when a provider goes away. Callers only
ever ``await lane.infer(batch)``; the lane's one owner task (:meth:`run`)
makes every decision, so its state has one writer:

- **Open.** With requests waiting and no usable session, the owner opens one
  (an auction and an assignment on the ledger: seconds). Requests queue
  meanwhile. If no provider can be had, every waiting request fails with
  :class:`~p2pgpu.gateway.errors.ModelNotReady` naming the reason the
  market gave -- the only way a request fails for want of a provider.
- **Send.** While the session has room (fewer than ``window`` items
  unanswered) the next batch goes out; each item is checked on return
  (rows, dtype, per-item shape against the registry's output signature)
  before any caller sees it, so no caller gets a wrong-shaped answer.
- **Fail over.** An item lost with its session (the provider disconnected,
  answered badly, or answered nothing for ``stall_s``) puts its requests
  back at the front of the queue; the session is retired (closed in the
  background) and the next send opens another. A request that has been on
  ``max_attempts`` lost items fails rather than loop.
- **Renew.** When the session's remaining units drop below
  ``renew_below``, the next one is opened beside it, so a long stream of
  traffic never waits for an auction.
- **Idle.** After ``idle_s`` with nothing waiting or in flight the lane
  closes its sessions (each pays its provider for what it served) and
  ends; the next request starts a new lane.

What the lane does is counted in :class:`LaneStats` (plain ints and one
latency histogram, written on the one Trio loop with no ``await`` between
a read and its write). The stats object may be handed in: the service
gives every lane of a model the same one, so a model's counters run on
across lanes that idle out and start again (Prometheus counters never go
down), and the gauges (:attr:`ModelLane.queued_rows`,
:attr:`ModelLane.in_flight`, :attr:`ModelLane.serving`) are read from the
lane running now.

The session is reached through :class:`LiveSessionLike` and an opener, so
this module imports nothing of the node: tests drive it with fake sessions,
the node with its real live stream sessions (see :mod:`p2pgpu.gateway.service`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, Protocol

import numpy as np
import trio

from p2pgpu.gateway.batcher import BatchPolicy, DynamicBatcher, QueueFull
from p2pgpu.gateway.errors import GatewayError, ModelNotReady, TooManyInferRequests
from p2pgpu.metrics_text import Histogram
from p2pgpu.net.log import log

if TYPE_CHECKING:  # trio 0.35 has trio.TaskStatus; libp2p pulls in trio-typing's older stubs, where it lives here
    from trio_typing import TaskStatus

__all__ = ["FAILURE_REASONS", "LATENCY_BUCKETS_S", "FailureReason", "LanePolicy", "LaneStats", "LaneTarget",
           "LiveSessionLike", "ModelLane", "NoSession", "SessionExhausted", "SessionLost", "SessionOpener",
           "failure_reason"]

logger = logging.getLogger("p2pgpu.gateway")


class SessionLost(Exception):
    """The session cannot answer this item or any later one (disconnect, stall, bad answer)."""


class SessionExhausted(Exception):
    """The session's unit cap is reached: the item was not sent; another session must take it."""


class NoSession(Exception):
    """No session could be opened for the model; the message is the market's reason (declines, prices, none)."""


class LiveSessionLike(Protocol):
    """What the lane needs of a live stream session (the node's is ``p2pgpu.streams.live.LiveSession``)."""

    @property
    def provider(self) -> bytes: ...

    @property
    def remaining(self) -> int: ...

    async def infer(self, item: np.ndarray) -> np.ndarray:
        """The answer to ``item``; raises :class:`SessionLost` or :class:`SessionExhausted`."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LaneTarget:
    """The model a lane serves, as the registry gives it."""

    model_id: bytes
    label: str
    """``name@version`` (for messages)."""
    output_dtype: str
    output_shape: tuple[int | None, ...]
    """One item's output shape (None: any size)."""


SessionOpener = Callable[[LaneTarget, frozenset[bytes]], Awaitable[LiveSessionLike]]
"""Opens a live session for the target with none of the providers in the set (ones that just lost a session)."""


@dataclass(frozen=True, slots=True)
class LanePolicy:
    batching: BatchPolicy = field(default_factory=BatchPolicy)
    window: int = 4
    """Items in flight on one session at most (the stream's K bounds it too)."""
    stall_s: float = 3.0
    """An item unanswered this long means the provider stalled: the session is lost, its items retried."""
    renew_below: int = 16
    """Open the next session when the current one has fewer units left than this."""
    idle_s: float = 30.0
    max_attempts: int = 3
    """Lost items a request rides on before it fails (a provider that answers badly every time)."""
    keep_warm: bool = False
    """Open a session at once and keep one open (re-opening it when lost) whether or not requests come."""
    retry_s: float = 2.0
    """A kept-warm lane whose session could not be opened tries again after this long."""
    avoid_s: float = 60.0
    """A provider that lost a session is not chosen for this model's next sessions for this long (then it may
    have been restarted or repaired; a provider that keeps failing is avoided again after each loss)."""


LATENCY_BUCKETS_S: Final[tuple[float, ...]] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                                                30.0, 60.0)
"""Upper bounds of the request latency histogram: a warm session answers in milliseconds, a request that
waits for an auction in seconds."""

FailureReason = Literal["not_ready", "overloaded", "internal"]
FAILURE_REASONS: Final[tuple[FailureReason, ...]] = ("not_ready", "overloaded", "internal")


def failure_reason(error: GatewayError) -> FailureReason:
    """The class a failed request is counted under: no provider (503), queue full (429), or a bug (500)."""
    if isinstance(error, ModelNotReady):
        return "not_ready"
    if isinstance(error, TooManyInferRequests):
        return "overloaded"
    return "internal"


@dataclass(slots=True)
class LaneStats:
    """A model's cumulative counters (see the module docstring: one object may serve many lanes in turn).

    Every request counted in ``requests`` ends in exactly one of
    ``answered``, a ``failed_*`` class or ``abandoned``, or is still
    pending. A request is counted as the lane sees it: the service splits
    one of more than ``max_batch_rows`` rows into parts, each a request here.
    """

    requests: int = 0
    answered: int = 0
    failed_not_ready: int = 0
    """No provider could serve it (no session, too many lost items, the lane stopped): 503."""
    failed_overloaded: int = 0
    """Refused on arrival: the model's queue was full (429)."""
    failed_internal: int = 0
    """The lane failed on a bug (500)."""
    abandoned: int = 0
    """The caller stopped waiting (cancelled, disconnected) before an answer."""
    items: int = 0
    """Stream items sent on a session (lost ones included; one refused for the session's unit cap was not sent)."""
    rows: int = 0
    """Rows in those items: ``rows / items`` is how well requests are batched."""
    sessions_opened: int = 0
    sessions_lost: int = 0
    failovers: int = 0
    """Requests sent again after their item was lost."""
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    """Seconds from a request's arrival at the lane to its answer (answered requests only)."""

    @property
    def failed(self) -> int:
        return self.failed_not_ready + self.failed_overloaded + self.failed_internal

    def failures(self) -> dict[FailureReason, int]:
        return {"not_ready": self.failed_not_ready, "overloaded": self.failed_overloaded,
                "internal": self.failed_internal}

    def count_failure(self, error: GatewayError) -> None:
        reason = failure_reason(error)
        if reason == "not_ready":
            self.failed_not_ready += 1
        elif reason == "overloaded":
            self.failed_overloaded += 1
        else:
            self.failed_internal += 1


@dataclass(slots=True)
class _Request:
    key: int
    batch: np.ndarray
    arrived: float
    """``trio.current_time()`` when it reached the lane (its latency runs from here)."""
    done: trio.Event = field(default_factory=trio.Event)
    output: np.ndarray | None = None
    error: GatewayError | None = None
    attempts: int = 0


def _describe(exc: BaseException) -> str:
    """``Type: message`` of the exception a nursery wrapped (its groups unwrapped while they hold one)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


class ModelLane:
    """Serves one model's requests through live stream sessions (see the module docstring)."""

    def __init__(self, target: LaneTarget, opener: SessionOpener, policy: LanePolicy, *,
                 stats: LaneStats | None = None) -> None:
        self.target = target
        self.policy = policy
        self.stats = stats if stats is not None else LaneStats()
        """Counted into, never reset: pass the model's running totals to carry them over from an earlier lane."""
        self.closed = False
        """The owner task ended: a new request needs a new lane."""
        self._open_session = opener
        self._batcher = DynamicBatcher(policy.batching)
        self._requests: dict[int, _Request] = {}
        self._keys = 0
        self._changed = trio.Event()
        self._session: LiveSessionLike | None = None
        self._next: LiveSessionLike | None = None
        self._renewing = False
        self._in_flight = 0
        self._failed_providers: dict[bytes, float] = {}
        """Providers that lost a session, and when (avoided for ``avoid_s``)."""
        self._nursery: trio.Nursery | None = None
        self._retry_at = -math.inf
        self.last_refusal: str | None = None
        """Why the last attempt to open a session failed (None once one opened)."""

    @property
    def serving(self) -> bool:
        """A session is open: a request is answered without waiting for an auction."""
        return self._session is not None or self._next is not None

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a slot on a session now."""
        return self._batcher.queued_rows

    @property
    def in_flight(self) -> int:
        """Items sent and not yet answered (or lost) now."""
        return self._in_flight

    # -- callers -----------------------------------------------------------------------

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        """The model's output for ``batch`` (rows of one request); raises a :class:`GatewayError`."""
        self.stats.requests += 1
        if self.closed:
            error: GatewayError = ModelNotReady(f"the lane for {self.target.label} has stopped")
            self.stats.count_failure(error)
            raise error
        key = self._keys
        self._keys += 1
        arrived = trio.current_time()
        try:
            self._batcher.add(key, int(batch.shape[0]), arrived)
        except QueueFull as exc:
            error = TooManyInferRequests(f"model {self.target.label} is overloaded: {exc}")
            self.stats.count_failure(error)
            raise error from None
        request = _Request(key, batch, arrived)
        self._requests[key] = request
        self._poke()
        try:
            await request.done.wait()
        finally:
            self._requests.pop(key, None)
            if not request.done.is_set():  # the caller gave up: it no longer waits in the queue
                self._batcher.drop(key)
                self.stats.abandoned += 1
                request.done.set()  # finished: an item it rides on neither answers nor fails it now
        if request.error is not None:
            raise request.error
        assert request.output is not None
        return request.output

    # -- the owner task ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The lane's owner: runs until idle for ``idle_s``, then closes its sessions.

        A bug that ends it fails every waiting request as ``internal`` (500)
        and propagates; a cancellation (the gateway stops) fails them as
        ``not_ready`` (503).
        """
        stopped: GatewayError = ModelNotReady(f"the gateway stopped serving {self.target.label}")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._serve(nursery)
                nursery.cancel_scope.cancel()
        except Exception as exc:
            bug = _describe(exc)
            stopped = GatewayError(f"the gateway's lane for {self.target.label} failed: {bug}")
            log(logger, logging.ERROR, "gateway_lane_failed", model=self.target.label, error=bug)
            raise
        finally:
            self.closed = True
            self._batcher.drain()
            for request in list(self._requests.values()):  # waiting, or on an item cancelled with the lane
                self._finish(request, stopped)
            with trio.CancelScope(shield=True):
                for session in (self._session, self._next):
                    if session is not None:
                        with trio.move_on_after(self.policy.stall_s):
                            await self._close_quietly(session)
            self._session = self._next = None

    async def _serve(self, nursery: trio.Nursery) -> None:
        idle_since = trio.current_time()
        while True:
            self._changed = trio.Event()  # pokes from here on wake the wait below
            now = trio.current_time()
            if not self._batcher and not self._in_flight:
                if self.policy.keep_warm:
                    await self._keep_warm(nursery, now)
                    continue
                if now - idle_since >= self.policy.idle_s:
                    return
                with trio.move_on_at(idle_since + self.policy.idle_s):
                    await self._changed.wait()
                continue
            idle_since = now
            session = self._usable_session()
            if session is None:
                if not self._batcher or self._renewing:
                    # only items in flight on a lost session (they come back), or the next session is on its way
                    await self._changed.wait()
                    continue
                await self._open_or_fail()
                continue
            self._maybe_renew(nursery, session)
            batch = self._batcher.take(now, room=self._in_flight < self.policy.window)
            if batch is not None:
                self._in_flight += 1
                nursery.start_soon(self._send, session, batch)
                continue
            deadline = self._batcher.next_deadline() if self._in_flight < self.policy.window else None
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._changed.wait()

    async def _keep_warm(self, nursery: trio.Nursery, now: float) -> None:
        """Nothing to send: make sure a session is open (or being renewed) for the next request."""
        session = self._usable_session()
        if session is not None:
            self._maybe_renew(nursery, session)
            await self._changed.wait()
        elif self._renewing or now < self._retry_at:
            with trio.move_on_at(self._retry_at):
                await self._changed.wait()
        elif not await self._open_or_fail():
            self._retry_at = trio.current_time() + self.policy.retry_s

    def _usable_session(self) -> LiveSessionLike | None:
        if self._session is None and self._next is not None:
            self._session, self._next = self._next, None
        return self._session

    async def _open_or_fail(self) -> bool:
        """Open a session; if none can be had, fail every waiting request with the reason (False)."""
        try:
            session = await self._open_session(self.target, self._avoid())
        except NoSession as exc:
            reason = f"no provider can serve model {self.target.label} now: {exc}"
            self.last_refusal = str(exc)
            log(logger, logging.WARNING, "gateway_no_session", model=self.target.label, reason=str(exc))
            self._fail_waiting(ModelNotReady(reason))
            return False
        self.stats.sessions_opened += 1
        log(logger, logging.INFO, "gateway_session_opened", model=self.target.label,
            provider=session.provider.hex()[:16], units=session.remaining)
        self.last_refusal = None
        if self._session is None:
            self._session = session
        else:
            self._next = session
        return True

    def _avoid(self) -> frozenset[bytes]:
        """The providers the next session must not be opened with (lost one within ``avoid_s``)."""
        now = trio.current_time()
        for provider in [p for p, at in self._failed_providers.items() if now - at >= self.policy.avoid_s]:
            del self._failed_providers[provider]
        return frozenset(self._failed_providers)

    def _maybe_renew(self, nursery: trio.Nursery, session: LiveSessionLike) -> None:
        if self._renewing or self._next is not None or session.remaining >= self.policy.renew_below:
            return
        self._renewing = True
        nursery.start_soon(self._renew)

    async def _renew(self) -> None:
        try:
            session = await self._open_session(self.target, self._avoid())
        except NoSession as exc:
            log(logger, logging.WARNING, "gateway_renew_failed", model=self.target.label, reason=str(exc))
        else:
            self.stats.sessions_opened += 1
            self._next = session
        finally:
            self._renewing = False
            self._poke()

    async def _send(self, session: LiveSessionLike, batch: list[tuple[int, int]]) -> None:
        try:
            live = [(self._requests[key], rows) for key, rows in batch if key in self._requests]
            if not live:
                return
            item = np.concatenate([request.batch for request, _ in live]) if len(live) > 1 else live[0][0].batch
            lost: str | None = None
            output: np.ndarray | None = None
            with trio.move_on_after(self.policy.stall_s) as stalled:
                try:
                    output = await session.infer(item)
                except SessionExhausted:
                    self._retire(session, None)
                    self._batcher.requeue(((r.key, rows) for r, rows in live), trio.current_time())
                    return
                except SessionLost as exc:
                    lost = str(exc)
            self.stats.items += 1  # sent, whether it comes back or not
            self.stats.rows += int(item.shape[0])
            if stalled.cancelled_caught:
                lost = f"no answer within {self.policy.stall_s:g} s"
            if lost is None:
                assert output is not None
                lost = self._check_output(item, output)
            if lost is not None:
                self._lose(session, lost, live)
                return
            assert output is not None
            offset = 0
            now = trio.current_time()
            for request, rows in live:
                if not request.done.is_set():  # its caller may have given up meanwhile
                    request.output = output[offset:offset + rows]
                    self.stats.answered += 1
                    self.stats.latency.observe(now - request.arrived)
                    request.done.set()
                offset += rows
        finally:
            self._in_flight -= 1
            self._poke()

    def _check_output(self, item: np.ndarray, output: np.ndarray) -> str | None:
        """Why ``output`` cannot be the answer to ``item`` (None: it can)."""
        want_shape = self.target.output_shape
        if output.ndim != 1 + len(want_shape) or output.shape[0] != item.shape[0]:
            return (f"answered shape {tuple(output.shape)} for {item.shape[0]} rows; "
                    f"the model's output is (n, {', '.join('?' if d is None else str(d) for d in want_shape)})")
        if any(w is not None and w != got for w, got in zip(want_shape, output.shape[1:], strict=True)):
            return f"answered per-item shape {tuple(output.shape[1:])}, the model declares {want_shape}"
        if output.dtype.name != self.target.output_dtype:
            return f"answered dtype {output.dtype.name}, the model declares {self.target.output_dtype}"
        return None

    def _lose(self, session: LiveSessionLike, reason: str, live: list[tuple[_Request, int]]) -> None:
        self._retire(session, reason)
        again: list[tuple[int, int]] = []
        for request, rows in live:
            if request.done.is_set():  # its caller gave up: nothing to send again
                continue
            request.attempts += 1
            if request.attempts >= self.policy.max_attempts:
                self._finish(request, ModelNotReady(
                    f"{request.attempts} providers of {self.target.label} failed this request; last: {reason}"))
            else:
                again.append((request.key, rows))
                self.stats.failovers += 1
        self._batcher.requeue(again, trio.current_time())

    def _retire(self, session: LiveSessionLike, lost: str | None) -> None:
        """Stop using ``session``: lost (its provider failed) or exhausted; it is closed in the background."""
        if self._session is session:
            self._session = None
        elif self._next is session:
            self._next = None
        else:
            return  # already retired by another item of the same session
        if lost is not None:
            self.stats.sessions_lost += 1
            self._failed_providers[session.provider] = trio.current_time()
            log(logger, logging.WARNING, "gateway_session_lost", model=self.target.label,
                provider=session.provider.hex()[:16], reason=lost)
        if self._nursery is not None:
            self._nursery.start_soon(self._close_quietly, session)

    async def _close_quietly(self, session: LiveSessionLike) -> None:
        with trio.move_on_after(max(self.policy.stall_s, 1.0) * 4):
            try:
                await session.aclose()
            except Exception as exc:  # a lost session may fail to close cleanly; its ledger side runs anyway
                log(logger, logging.INFO, "gateway_session_close_failed", model=self.target.label,
                    error=f"{type(exc).__name__}: {exc}")

    def _fail_waiting(self, error: GatewayError) -> None:
        for key in self._batcher.drain():
            request = self._requests.get(key)
            if request is not None:
                self._finish(request, error)

    def _finish(self, request: _Request, error: GatewayError) -> None:
        if not request.done.is_set():
            request.error = error
            self.stats.count_failure(error)
            request.done.set()

    def _poke(self) -> None:
        self._changed.set()
