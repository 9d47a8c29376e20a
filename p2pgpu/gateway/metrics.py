"""What the gateway shows operators: its Prometheus families and the ``gateway`` section of ``GET /status``.

Pure functions over the service's state at scrape time (no I/O, no clock):
:func:`gateway_metric_families` turns each model's cumulative
:class:`~p2pgpu.gateway.lanes.LaneStats` and its running lane's gauges into
:class:`~p2pgpu.metrics_text.MetricFamily` snapshots, the form every part of
the node reports in (``api/metrics.py`` renders them through the node's one
``prometheus_client`` registry). Every series is labelled ``model`` with the
registry's ``name@version``.

Counters come from the per-model totals the service keeps across lanes (a
lane that idles out and the next one for the same model count into the same
object), so they never go down; the gauges (rows queued, items in flight,
whether a session is open) are the running lane's, 0 once it has ended.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from p2pgpu.gateway.lanes import FAILURE_REASONS, LaneStats
from p2pgpu.metrics_text import Labels, MetricFamily, counter, gauge

__all__ = ["GatewayModelView", "GatewayView", "ModelState", "gateway_metric_families"]

ModelState = Literal["AVAILABLE", "LOADING", "UNAVAILABLE"]


@dataclass(frozen=True, slots=True)
class GatewayModelView:
    """One model the gateway serves now (it has a running lane)."""

    model: str
    """``name@version``."""
    model_id: bytes
    state: ModelState
    """As ``GET /v1/models/{name}`` reports it: AVAILABLE, LOADING (opening a session), UNAVAILABLE (refused)."""
    queued_rows: int
    in_flight: int
    """Items sent and not yet answered."""
    session_open: bool


@dataclass(frozen=True, slots=True)
class GatewayView:
    """The ``gateway`` section of ``GET /status``."""

    enabled: bool
    """The gateway is running and takes requests."""
    models: tuple[GatewayModelView, ...] = ()


def gateway_metric_families(totals: Mapping[str, LaneStats], live: Sequence[GatewayModelView],
                            prefix: str = "p2pgpu_gateway") -> list[MetricFamily]:
    """The gateway's families: ``totals`` by ``name@version``; ``live``, the models with a running lane.

    A model in ``totals`` without a running lane shows its gauges at 0, so
    its series stay on the page after the lane idles out.
    """
    now = {m.model: m for m in live}
    models = sorted(set(totals) | set(now))

    def per_model(value: Callable[[LaneStats], int]) -> dict[Labels, float]:
        return {(("model", m),): value(totals[m]) for m in models if m in totals}

    def live_gauge(value: Callable[[GatewayModelView], int | bool]) -> dict[Labels, float]:
        return {(("model", m),): float(value(now[m])) if m in now else 0.0 for m in models}

    failed: dict[Labels, float] = {}
    for m in models:
        if m in totals:
            counts = totals[m].failures()
            for reason in FAILURE_REASONS:
                failed[(("model", m), ("reason", reason))] = counts[reason]
    latency = tuple(totals[m].latency.sample({"model": m}) for m in models if m in totals)
    return [
        counter(f"{prefix}_requests_total",
                "Inference requests that reached the model's lane (a request over max_batch_rows counts per part).",
                per_model(lambda s: s.requests)),
        counter(f"{prefix}_requests_answered_total", "Requests answered with the model's checked output.",
                per_model(lambda s: s.answered)),
        counter(f"{prefix}_requests_failed_total",
                "Requests failed, by reason: not_ready (no provider could serve it, 503), overloaded (the queue "
                "was full, 429), internal (a gateway bug, 500).", failed),
        counter(f"{prefix}_requests_abandoned_total", "Requests whose caller stopped waiting before the answer.",
                per_model(lambda s: s.abandoned)),
        counter(f"{prefix}_items_total", "Stream items sent to providers (lost ones included).",
                per_model(lambda s: s.items)),
        counter(f"{prefix}_rows_total", "Rows in the items sent: rows per item is how well requests are batched.",
                per_model(lambda s: s.rows)),
        counter(f"{prefix}_sessions_opened_total", "Live stream sessions opened with a provider.",
                per_model(lambda s: s.sessions_opened)),
        counter(f"{prefix}_sessions_lost_total",
                "Sessions given up because their provider disconnected, stalled or answered badly.",
                per_model(lambda s: s.sessions_lost)),
        counter(f"{prefix}_failovers_total", "Requests sent again on another session after their item was lost.",
                per_model(lambda s: s.failovers)),
        gauge(f"{prefix}_queued_rows", "Rows waiting for a slot on a session now.",
              live_gauge(lambda v: v.queued_rows)),
        gauge(f"{prefix}_items_in_flight", "Items sent and not yet answered now.", live_gauge(lambda v: v.in_flight)),
        gauge(f"{prefix}_session_open", "1 while a session with a provider is open for the model.",
              live_gauge(lambda v: v.session_open)),
        MetricFamily(f"{prefix}_request_duration_seconds", "histogram",
                     "Seconds from a request's arrival at the model's lane to its answer (answered requests).",
                     latency),
    ]
