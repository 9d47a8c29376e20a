"""The market roles' families for ``GET /metrics``: tasks, jobs, client recovery, streams, provider readiness.

The roles count; this module turns a snapshot of their counters into
:class:`~p2pgpu.metrics_text.MetricFamily` values at scrape time. They reach
the page the way every part of the node does: ``Node.extra_metrics`` ->
``NodeApi.metrics`` -> :class:`p2pgpu.api.metrics.NodeMetrics`, the node's own
``prometheus_client`` registry (never the process-global one).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Protocol

from p2pgpu.metrics_text import MetricFamily, counter, gauge, stream_metric_families
from p2pgpu.streams import StreamTransport

__all__ = ["role_metric_families"]


class _Settling(Protocol):
    @property
    def outcome(self) -> str | None: ...


def role_metric_families(*, clients: Iterable[_Settling], counters: Mapping[str, int], recovery_s: float | None,
                         recovered_tasks: int, streams: StreamTransport, provider_role: bool,
                         provider_ready: bool) -> list[MetricFamily]:
    """The families of one scrape: ``clients`` are this node's tasks, ``counters`` the roles' job counts."""
    records = list(clients)
    closed: dict[str, int] = defaultdict(int)
    for record in records:
        if record.outcome is not None:
            closed[record.outcome] += 1
    families = [
        gauge("p2pgpu_tasks_active", "Tasks submitted through this node and not yet settled.",
              sum(1 for r in records if r.outcome is None)),
        counter("p2pgpu_tasks_submitted_total", "Tasks submitted through this node.", len(records)),
        counter("p2pgpu_jobs_total", "Kernel jobs run and verifications done by this node's provider role.",
                {(("kind", k),): v for k, v in (("run", counters.get("jobs_run", 0)),
                                                ("verify", counters.get("verifications", 0)))}),
    ]
    if recovery_s is not None:
        families.append(gauge("p2pgpu_client_recovery_seconds",
                              "Seconds the client took at start-up to reload its journaled tasks.", recovery_s))
        families.append(gauge("p2pgpu_client_recovered_tasks",
                              "Tasks reloaded from the client's journal at start-up.", recovered_tasks))
    if closed:
        families.append(counter("p2pgpu_tasks_settled_total", "Tasks of this node settled, by outcome.",
                                {(("outcome", o),): n for o, n in closed.items()}))
    families.extend(stream_metric_families(streams.metrics, streams.active_sessions()))
    if provider_role:
        families.append(gauge("p2pgpu_provider_ready", "1 once the kernel runtime is warm and the provider bids, else 0.",
                              1 if provider_ready else 0))
    return families
