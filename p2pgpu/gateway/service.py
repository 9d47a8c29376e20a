"""The inference gateway of one client node: registered models in, one :class:`ModelLane` per model served.

The HTTP routes (:mod:`p2pgpu.gateway.routes`) parse a request with the
protocol's codec, then ask this service for the model (:meth:`resolve`,
from the ledger's registry: nothing here trusts a name the registry does
not hold) and for its answer (:meth:`infer`). The service keeps a lane per
model while it has traffic (and always for ``[gateway] warm_models``),
started in its own nursery, so a lane outlives the request that started it
and serves every later one. A request of more rows than one item holds
(``max_batch_rows``) is split over items, answered in parallel and joined
in order.

The sessions themselves come from the node's client role through a
:data:`~p2pgpu.gateway.lanes.SessionOpener` (see :func:`stream_opener`):
this module does not know how a stream task is posted, auctioned or paid.

What it did is kept per model (:class:`~p2pgpu.gateway.lanes.LaneStats`,
one object for all the model's lanes in turn, so counters survive a lane
that idles out) and shown by :meth:`InferenceGateway.metric_families` on
the node's ``/metrics`` and :meth:`InferenceGateway.summary` in ``GET /status``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import trio

from ledger.modelnames import parse_model_ref
from ledger.state import ModelEntry, State
from p2pgpu.config import GatewayConfig
from p2pgpu.gateway.batcher import BatchPolicy
from p2pgpu.gateway.errors import ModelNotFound, ModelNotReady
from p2pgpu.gateway.lanes import LanePolicy, LaneStats, LaneTarget, ModelLane, SessionOpener
from p2pgpu.gateway.metrics import GatewayModelView, GatewayView, ModelState, gateway_metric_families
from p2pgpu.metrics_text import MetricFamily
from p2pgpu.net.log import log

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = ["GatewayView", "InferenceGateway", "ModelState", "lane_policy"]

logger = logging.getLogger("p2pgpu.gateway")


def lane_policy(config: GatewayConfig, *, keep_warm: bool = False) -> LanePolicy:
    return LanePolicy(
        batching=BatchPolicy(max_rows=config.max_batch_rows, max_delay_s=config.max_batch_delay_ms / 1000.0,
                             max_queued_rows=max(config.max_queued_rows, config.max_batch_rows)),
        window=config.window, stall_s=config.stall_seconds,
        renew_below=max(1, min(config.session_units // 8, 64)),
        idle_s=config.idle_seconds, keep_warm=keep_warm)


@dataclass(frozen=True, slots=True)
class _Status:
    state: ModelState
    detail: str


class InferenceGateway:
    """Lanes by model id, started on demand in the gateway's nursery (:meth:`run`)."""

    def __init__(self, state: Callable[[], State], opener: SessionOpener, config: GatewayConfig, *,
                 warm_providers: Callable[[bytes], int] | None = None) -> None:
        self._state = state
        self._opener = opener
        self.config = config
        self._warm_providers = warm_providers
        self._lanes: dict[bytes, ModelLane] = {}
        self._totals: dict[bytes, LaneStats] = {}
        """Each model's counters since the gateway started, shared by its lanes in turn (never reset)."""
        self._labels: dict[bytes, str] = {}
        self._nursery: trio.Nursery | None = None

    # -- models ------------------------------------------------------------------------

    def resolve(self, name: str, version: str | None = None) -> ModelEntry:
        """The registered model ``name`` (or id) at ``version`` (None: its latest); :class:`ModelNotFound` if none."""
        try:
            ref = parse_model_ref(name if version is None else f"{name}@{version}")
        except ValueError as exc:
            raise ModelNotFound(f"no model {name!r}: {exc}") from None
        if ref.model_id is not None and version is not None:
            raise ModelNotFound(f"model {name[:16]}... is named by its id, which has no versions")
        entry = self._state().find_model(ref)
        if entry is None:
            what = f"{name} version {version}" if version is not None else name
            raise ModelNotFound(f"no registered model {what} (push it with 'p2pgpu model push', or check the name)")
        return entry

    def versions(self, entry: ModelEntry) -> list[str]:
        """Every registered version of ``entry``'s name, oldest first."""
        state = self._state()
        found = [(m.registered_height, m.version) for m in state.models.values() if m.name == entry.name]
        return [v for _, v in sorted(found)]

    def status(self, entry: ModelEntry) -> _Status:
        """Whether a request for ``entry`` is answered now (a session is open or a provider advertises it warm)."""
        return self._status_of(entry.model_id, self._lanes.get(entry.model_id))

    def _status_of(self, model_id: bytes, lane: ModelLane | None) -> _Status:
        if lane is not None and not lane.closed and lane.serving:
            return _Status("AVAILABLE", "a session with a provider is open")
        warm = self._warm_providers(model_id) if self._warm_providers is not None else 0
        if warm:
            return _Status("AVAILABLE", f"{warm} provider(s) advertise it warm")
        if lane is not None and not lane.closed:
            if lane.last_refusal is not None:
                return _Status("UNAVAILABLE", f"no provider can serve it now: {lane.last_refusal}")
            return _Status("LOADING", "opening a session with a provider")
        if self._warm_providers is None:
            return _Status("AVAILABLE", "registered; the first request opens a session")
        return _Status("UNAVAILABLE", "no provider advertises it warm; a request would start a cold auction")

    # -- requests ----------------------------------------------------------------------

    async def infer(self, entry: ModelEntry, batch: np.ndarray) -> np.ndarray:
        """The model's output rows for ``batch`` (already checked against the registry's input signature)."""
        rows = int(batch.shape[0])
        if rows > self.config.max_rows_per_request:
            raise ModelNotReady(f"{rows} rows in one request; this gateway takes at most "
                                f"{self.config.max_rows_per_request}")  # the codecs refuse it first, with 400
        lane = self._lane(entry)
        step = self.config.max_batch_rows
        if rows <= step:
            return await lane.infer(batch)
        parts: list[np.ndarray | None] = [None] * ((rows + step - 1) // step)

        async def part(i: int) -> None:
            parts[i] = await lane.infer(batch[i * step:(i + 1) * step])

        async with trio.open_nursery() as nursery:
            for i in range(len(parts)):
                nursery.start_soon(part, i)
        return np.concatenate([p for p in parts if p is not None])

    def _lane(self, entry: ModelEntry, *, keep_warm: bool = False) -> ModelLane:
        """The model's running lane, or a new one started now (in one step: no ``await`` between)."""
        lane = self._lanes.get(entry.model_id)
        if lane is not None and not lane.closed:
            return lane
        if self._nursery is None:
            raise ModelNotReady("the inference gateway is not running")
        target = LaneTarget(entry.model_id, f"{entry.name}@{entry.version}", entry.output.dtype,
                            tuple(entry.output.shape))
        stats = self._totals.get(entry.model_id)
        if stats is None:
            stats = self._totals[entry.model_id] = LaneStats()
        self._labels[entry.model_id] = target.label
        lane = ModelLane(target, self._opener, lane_policy(self.config, keep_warm=keep_warm), stats=stats)
        self._lanes[entry.model_id] = lane
        self._nursery.start_soon(self._run_lane, lane)
        return lane

    async def _run_lane(self, lane: ModelLane) -> None:
        try:
            await lane.run()
        finally:
            if self._lanes.get(lane.target.model_id) is lane:
                del self._lanes[lane.target.model_id]

    def stats(self) -> dict[str, LaneStats]:
        """Each model's counters since the gateway started, by ``name@version`` (lanes that ended included)."""
        return {self._labels[model_id]: stats for model_id, stats in self._totals.items()}

    # -- what operators see ------------------------------------------------------------

    def summary(self) -> GatewayView:
        """The ``gateway`` section of ``GET /status``: running or not, and the models with a lane now."""
        models = tuple(sorted(
            (GatewayModelView(model=lane.target.label, model_id=model_id,
                              state=self._status_of(model_id, lane).state, queued_rows=lane.queued_rows,
                              in_flight=lane.in_flight, session_open=lane.serving)
             for model_id, lane in self._lanes.items() if not lane.closed),
            key=lambda m: m.model))
        return GatewayView(enabled=self._nursery is not None, models=models)

    def metric_families(self) -> list[MetricFamily]:
        """The gateway's Prometheus families at this instant (read in one step: no ``await``)."""
        return gateway_metric_families(self.stats(), self.summary().models)

    # -- the service -------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve lanes until cancelled; the ``warm_models`` get theirs at once (once registered)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                await self._keep_warm(self.config.warm_models)
            finally:
                self._nursery = None

    async def _keep_warm(self, refs: Sequence[str]) -> None:
        """Start a kept-warm lane for each configured model as soon as the registry holds it."""
        waiting = list(refs)
        while waiting:
            for ref in list(waiting):
                try:
                    entry = self.resolve(ref)
                except ModelNotFound:
                    continue
                lane = self._lanes.get(entry.model_id)
                if lane is not None and not lane.closed:  # a request's lane: it idles out; a warm one replaces it
                    lane.policy = lane_policy(self.config, keep_warm=True)
                else:
                    self._lane(entry, keep_warm=True)
                log(logger, logging.INFO, "gateway_warm_model", model=f"{entry.name}@{entry.version}")
                waiting.remove(ref)
            if waiting:
                await trio.sleep(1.0)
        await trio.sleep_forever()
