"""Metric snapshots: the families the node's parts report at scrape time, and the checks they must pass.

The node's components keep their own counters (no global registry, so
several nodes in one process stay apart); at scrape time they are turned
into :class:`MetricFamily` values. :func:`check_families` refuses what no
exposition may show (a bad name or label name, a name twice, a histogram
whose buckets are not cumulative). The node's ``/metrics`` page renders
the checked families through ``prometheus_client``, one registry per API
server (:mod:`p2pgpu.api.metrics`); :func:`render_metrics` is a plain text
renderer of the same format for tools and tests that hold families only.

Format reference: https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

__all__ = [
    "CONTENT_TYPE",
    "Histogram",
    "HistogramSample",
    "MetricFamily",
    "MetricsError",
    "Sample",
    "check_families",
    "counter",
    "format_value",
    "gauge",
    "histogram_buckets",
    "net_metric_families",
    "render_metrics",
    "stream_metric_families",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
MetricKind = Literal["counter", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class MetricsError(ValueError):
    """A metric that cannot be rendered in the text format (bad name, label, or histogram)."""


@dataclass(frozen=True, slots=True)
class Sample:
    labels: Labels
    value: float


@dataclass(frozen=True, slots=True)
class HistogramSample:
    """One labelled histogram: cumulative counts per upper bound (``+Inf`` implied by ``count``)."""

    labels: Labels
    buckets: tuple[tuple[float, int], ...]
    count: int
    sum: float


@dataclass(frozen=True, slots=True)
class MetricFamily:
    name: str
    kind: MetricKind
    help: str
    samples: tuple[Sample, ...] | tuple[HistogramSample, ...] = ()


def _labels(labels: Mapping[str, Any] | None) -> Labels:
    return tuple(sorted((str(k), str(v)) for k, v in (labels or {}).items()))


def counter(name: str, help: str, values: Mapping[Labels, float] | float) -> MetricFamily:
    """A counter family from one value or a map of label tuples to values."""
    return MetricFamily(name, "counter", help, _samples(values))


def gauge(name: str, help: str, values: Mapping[Labels, float] | float) -> MetricFamily:
    return MetricFamily(name, "gauge", help, _samples(values))


def _samples(values: Mapping[Labels, float] | float) -> tuple[Sample, ...]:
    if isinstance(values, Mapping):
        return tuple(Sample(tuple(sorted(k)), float(v)) for k, v in sorted(values.items()))
    return (Sample((), float(values)),)


@dataclass(slots=True)
class Histogram:
    """A small accumulator for one histogram series (latency of task stages, for instance)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: int = 0
    sum: float = 0.0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(set(self.bounds)) or any(not math.isfinite(b) for b in self.bounds):
            raise MetricsError(f"histogram bounds must be finite and strictly increasing, got {self.bounds}")
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += 1
        self.sum += value

    def sample(self, labels: Mapping[str, Any] | None = None) -> HistogramSample:
        cumulative, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            cumulative.append((bound, running))
        return HistogramSample(_labels(labels), tuple(cumulative), self.total, self.sum)


# ----------------------------------------------------------------- rendering


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _check_labels(labels: Labels, family: str) -> None:
    seen = set()
    for key, _ in labels:
        if not _LABEL.fullmatch(key) or key.startswith("__"):
            raise MetricsError(f"{family}: label name {key!r} is not valid")
        if key in seen:
            raise MetricsError(f"{family}: label {key!r} appears twice")
        seen.add(key)


def _check_histogram(name: str, s: HistogramSample) -> None:
    if any(k == "le" for k, _ in s.labels):
        raise MetricsError(f"{name}: a histogram may not carry its own 'le' label")
    previous_bound, previous_count = -math.inf, 0
    for bound, count in s.buckets:
        if not bound > previous_bound or count < previous_count:
            raise MetricsError(f"{name}: buckets must have increasing bounds and cumulative counts")
        previous_bound, previous_count = bound, count
    if s.count < previous_count:
        raise MetricsError(f"{name}: count {s.count} is below the last bucket's {previous_count}")


def check_families(families: Iterable[MetricFamily]) -> None:
    """Refuse, with :class:`MetricsError` naming the family, what no exposition may show.

    Names and label names must match the format's grammar (the UTF-8 names
    that newer Prometheus accepts are not used here), no name twice, and a
    histogram's buckets cumulative. Every renderer calls this first, so a
    scraper never sees a malformed page.
    """
    names: set[str] = set()
    for fam in families:
        if not _NAME.fullmatch(fam.name):
            raise MetricsError(f"metric name {fam.name!r} is not valid")
        if fam.name in names:
            raise MetricsError(f"metric {fam.name!r} appears twice")
        if fam.kind not in ("counter", "gauge", "histogram"):
            raise MetricsError(f"{fam.name}: unknown metric type {fam.kind!r}")
        names.add(fam.name)
        for s in fam.samples:
            if fam.kind == "histogram":
                if not isinstance(s, HistogramSample):
                    raise MetricsError(f"{fam.name}: histogram family holds a {type(s).__name__}")
                _check_labels(s.labels, fam.name)
                _check_histogram(fam.name, s)
            else:
                if not isinstance(s, Sample):
                    raise MetricsError(f"{fam.name}: {fam.kind} family holds a {type(s).__name__}")
                _check_labels(s.labels, fam.name)


def histogram_buckets(s: HistogramSample) -> list[tuple[str, int]]:
    """A histogram's ``(le, cumulative count)`` pairs as exposed, ``+Inf`` (= ``count``) last."""
    finite = [(b, c) for b, c in s.buckets if not math.isinf(b)]
    return [(format_value(b), c) for b, c in finite] + [("+Inf", s.count)]


def _render_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels) + "}"


def render_metrics(families: Iterable[MetricFamily]) -> str:
    """The exposition text of ``families``; raises :class:`MetricsError` naming a bad family.

    A plain renderer for tools and tests that want the snapshot as text
    without a registry; the node's ``/metrics`` page is rendered by
    ``prometheus_client`` (:mod:`p2pgpu.api.metrics`).
    """
    families = list(families)
    check_families(families)
    out: list[str] = []
    for fam in families:
        out.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        out.append(f"# TYPE {fam.name} {fam.kind}")
        for s in fam.samples:
            if isinstance(s, HistogramSample):
                for le, count in histogram_buckets(s):
                    out.append(f"{fam.name}_bucket{_render_labels(s.labels + (('le', le),))} {count}")
                out.append(f"{fam.name}_sum{_render_labels(s.labels)} {format_value(s.sum)}")
                out.append(f"{fam.name}_count{_render_labels(s.labels)} {s.count}")
            else:
                out.append(f"{fam.name}{_render_labels(s.labels)} {format_value(s.value)}")
    return "\n".join(out) + "\n" if out else ""


def net_metric_families(snapshot: Any, prefix: str = "p2pgpu_net") -> list[MetricFamily]:
    """Families for a :class:`p2pgpu.net.metrics.NetMetrics` (its attributes, not its JSON snapshot)."""

    def by(label: str, counts: Mapping[str, int]) -> dict[Labels, float]:
        return {((label, k),): v for k, v in counts.items()}

    def by2(a: str, b: str, counts: Mapping[tuple[str, str], int]) -> dict[Labels, float]:
        return {((a, x), (b, y)): v for (x, y), v in counts.items()}

    m = snapshot
    return [
        counter(f"{prefix}_published_total", "Gossip messages this node published, per topic.", by("topic", m.published)),
        counter(f"{prefix}_delivered_total", "Validated gossip messages delivered to the node, per topic.",
                by("topic", m.delivered)),
        counter(f"{prefix}_dropped_total", "Validated gossip messages lost to a full application queue, per topic.",
                by("topic", m.dropped)),
        counter(f"{prefix}_duplicates_total", "Gossip messages received again after a first valid copy, per topic.",
                by("topic", m.duplicates_by_topic)),
        counter(f"{prefix}_rejected_total", "Gossip messages rejected by a topic validator.",
                by2("topic", "reason", m.rejected)),
        counter(f"{prefix}_ignored_total", "Gossip messages ignored by a topic validator.",
                by2("topic", "reason", m.ignored)),
        counter(f"{prefix}_publish_waits_total", "Publishes that waited for a peer's queue to drain.", m.publish_waits),
        gauge(f"{prefix}_peers", "Connected peers.", m.peers_connected),
        counter(f"{prefix}_bans_total", "Peers banned for a low score.", m.bans),
        counter(f"{prefix}_requests_served_total", "Inbound request/response streams handled, per protocol.",
                by("protocol", m.requests_served)),
        counter(f"{prefix}_request_errors_total", "Failed request/response exchanges.",
                by2("protocol", "kind", m.request_errors)),
        counter(f"{prefix}_inbound_refused_total",
                "Inbound streams refused by the quotas (banned, peer_quota, protocol_budget, node_limit) or reset "
                "for sending no request in time (idle), per protocol and reason.",
                by2("protocol", "reason", m.inbound_refused)),
        gauge(f"{prefix}_inbound_streams", "Inbound request/response streams being served now, per protocol.",
              by("protocol", m.inbound_active)),
        counter(f"{prefix}_charges_total", "Score charges against peers, per topic or protocol and reason.",
                by2("where", "reason", m.charges)),
    ]


def stream_metric_families(m: Any, active: tuple[int, int] = (0, 0),
                           prefix: str = "p2pgpu_stream") -> list[MetricFamily]:
    """Families for a :class:`p2pgpu.streams.StreamMetrics` (both halves of ``/p2pgpu/stream/1``).

    ``active`` is (provider sessions with a loaded model, client sessions
    streaming). Label ``role`` tells the provider's figures from the
    client's, so a node holding both roles shows each side of its sessions.
    """
    def role(provider: float, client: float) -> dict[Labels, float]:
        return {(("role", "provider"),): provider, (("role", "client"),): client}

    closed: dict[Labels, float] = {(("role", "provider"), ("reason", r)): n for r, n in m.sessions_closed.items()}
    closed[(("role", "client"), ("reason", "completed"))] = m.sessions_streamed
    closed[(("role", "client"), ("reason", "failed"))] = m.client_failures
    return [
        counter(f"{prefix}_sessions_opened_total",
                "Stream sessions opened: provider, model loaded for the task; client, accepted by its provider.",
                role(m.sessions_served, m.sessions_started)),
        counter(f"{prefix}_sessions_closed_total", "Stream sessions ended, by side and reason.", closed),
        gauge(f"{prefix}_sessions_active", "Stream sessions open now, by side.", role(*active)),
        counter(f"{prefix}_connections_total", "Client connections admitted to a provider session.", m.connections),
        counter(f"{prefix}_items_total",
                "Stream items: served by the provider; sent and answered (signed output checked) at the client.",
                {(("role", "provider"), ("event", "served")): m.items_served,
                 (("role", "client"), ("event", "sent")): m.items_streamed,
                 (("role", "client"), ("event", "answered")): m.items_answered}),
        counter(f"{prefix}_receipts_total", "Signed cumulative receipts: sent by the client, taken by the provider.",
                {(("role", "client"), ("event", "sent")): m.receipts_sent,
                 (("role", "provider"), ("event", "received")): m.receipts_received}),
        counter(f"{prefix}_claims_total", "StreamClaim transactions: submitted, or refused by the mempool.",
                {(("result", "submitted"),): m.claims_submitted, (("result", "refused"),): m.claims_refused}),
        counter(f"{prefix}_rejected_total", "Stream connections refused or cut off by the provider, by code.",
                {(("code", c),): n for c, n in m.rejected.items()}),
        counter(f"{prefix}_penalties_total", "Stream refusals that charged the peer a score penalty.", m.penalties),
    ]
