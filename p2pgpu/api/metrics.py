"""``GET /metrics`` through ``prometheus_client``: one registry per API server, so per node, never the global one.

The node's parts keep their own counters and report them at scrape time as
:class:`~p2pgpu.metrics_text.MetricFamily` snapshots (several nodes in one
process, as in the tests and the devnet, must not share a registry, and
``prometheus_client``'s default ``REGISTRY`` is process-global). A
:class:`NodeMetrics` holds one ``CollectorRegistry`` with one collector that
yields the current scrape's families; ``prometheus_client`` writes the page
(escaping, value formatting, the ``_total`` and histogram conventions).

The families are checked first (:func:`~p2pgpu.metrics_text.check_families`):
``prometheus_client`` would accept UTF-8 names and then rewrite them on the
page, where a bad name from a component must fail the scrape loudly (500)
instead of showing up under another name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric

from p2pgpu.metrics_text import HistogramSample, MetricFamily, MetricsError, check_families, histogram_buckets

__all__ = ["CONTENT_TYPE", "NodeMetrics", "to_prometheus"]

CONTENT_TYPE: Final[str] = CONTENT_TYPE_PLAIN_0_0_4
"""``text/plain; version=0.0.4; charset=utf-8``: the format ``generate_latest`` writes and scrapers ask for."""

_TOTAL: Final = "_total"


def to_prometheus(family: MetricFamily) -> Metric:
    """One checked family as a ``prometheus_client`` metric, its sample names and labels as they are exposed.

    A counter's name must end in ``_total``: ``prometheus_client`` names a
    counter without the suffix and adds it back on the page. Histogram
    bounds keep their short form (``le="1"``, not ``le="1.0"``), as the
    node always exposed them.
    """
    if family.kind == "counter":
        if not family.name.endswith(_TOTAL):
            raise MetricsError(f"counter {family.name!r} must end in {_TOTAL}")
        metric = Metric(family.name[: -len(_TOTAL)], family.help, "counter")
    else:
        metric = Metric(family.name, family.help, family.kind)
    for s in family.samples:
        labels = dict(s.labels)
        if isinstance(s, HistogramSample):
            for le, count in histogram_buckets(s):
                metric.add_sample(f"{family.name}_bucket", {**labels, "le": le}, count)
            metric.add_sample(f"{family.name}_count", labels, s.count)
            metric.add_sample(f"{family.name}_sum", labels, s.sum)
        else:
            metric.add_sample(family.name, labels, s.value)
    return metric


class _ScrapeCollector:
    """The registry's one collector: yields the families of the scrape being rendered, none between scrapes."""

    def __init__(self) -> None:
        self.families: tuple[MetricFamily, ...] = ()

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield to_prometheus(family)


class NodeMetrics:
    """One node's metrics registry and the page it renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._scrape = _ScrapeCollector()
        self.registry.register(self._scrape)

    def render(self, families: Sequence[MetricFamily]) -> bytes:
        """The exposition page of ``families``; :class:`MetricsError` naming a bad family.

        Synchronous from loading the families to clearing them, so two
        scrapes on the node's one event loop never see each other's.
        """
        check_families(families)
        self._scrape.families = tuple(families)
        try:
            return generate_latest(self.registry)
        finally:
            self._scrape.families = ()
