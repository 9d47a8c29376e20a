"""Prometheus text rendering: what scrapers parse, and what is refused before it reaches them."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from p2pgpu.metrics_text import (
    Histogram,
    HistogramSample,
    MetricFamily,
    MetricsError,
    Sample,
    counter,
    gauge,
    net_metric_families,
    render_metrics,
    stream_metric_families,
)
from p2pgpu.net.metrics import NetMetrics
from p2pgpu.streams import StreamMetrics


def parse(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_exact_text_of_a_counter_and_a_gauge() -> None:
    text = render_metrics([
        counter("jobs_total", "Jobs run.\nBy kernel \\ device.", {(("kernel", "matmul"),): 3, (("kernel", 'a"b'),): 1}),
        gauge("temp", "Temperature.", -1.5),
    ])
    assert text == (
        "# HELP jobs_total Jobs run.\\nBy kernel \\\\ device.\n"
        "# TYPE jobs_total counter\n"
        'jobs_total{kernel="a\\"b"} 1\n'
        'jobs_total{kernel="matmul"} 3\n'
        "# HELP temp Temperature.\n"
        "# TYPE temp gauge\n"
        "temp -1.5\n"
    )
    fams = parse(text)
    assert [s.labels["kernel"] for s in fams["jobs"].samples] == ['a"b', "matmul"]


def test_special_values() -> None:
    text = render_metrics([gauge("g", "x", {(("k", "inf"),): math.inf, (("k", "nan"),): math.nan,
                                              (("k", "big"),): 2.0**70})])
    assert 'g{k="inf"} +Inf' in text and 'g{k="nan"} NaN' in text
    values = {s.labels["k"]: s.value for s in parse(text)["g"].samples}
    assert values["inf"] == math.inf and math.isnan(values["nan"]) and values["big"] == 2.0**70


def test_histogram_accumulates_and_parses() -> None:
    h = Histogram((0.5, 2.0))
    for v in (0.1, 0.5, 1.0, 9.0):
        h.observe(v)
    text = render_metrics([MetricFamily("lat_seconds", "histogram", "Latency.", (h.sample({"stage": "run"}),))])
    fam = parse(text)["lat_seconds"]
    by_name = {(s.name, s.labels.get("le")): s.value for s in fam.samples}
    assert by_name[("lat_seconds_bucket", "0.5")] == 2  # bounds are inclusive (le)
    assert by_name[("lat_seconds_bucket", "2")] == 3
    assert by_name[("lat_seconds_bucket", "+Inf")] == 4
    assert by_name[("lat_seconds_count", None)] == 4 and by_name[("lat_seconds_sum", None)] == 10.6


@pytest.mark.parametrize(
    ("family", "problem"),
    [
        (MetricFamily("bad-name", "gauge", "x", (Sample((), 1),)), "metric name 'bad-name'"),
        (MetricFamily("g", "gauge", "x", (Sample((("__x", "v"),), 1),)), "label name '__x'"),
        (MetricFamily("g", "gauge", "x", (Sample((("1x", "v"),), 1),)), "label name '1x'"),
        (MetricFamily("g", "gauge", "x", (Sample((("a", "1"), ("a", "2")), 1),)), "appears twice"),
        (MetricFamily("g", "summary", "x"), "unknown metric type"),  # type: ignore[arg-type]
        (MetricFamily("h", "histogram", "x", (HistogramSample((), ((1.0, 5), (2.0, 3)), 5, 1.0),)), "cumulative"),
        (MetricFamily("h", "histogram", "x", (HistogramSample((), ((2.0, 1), (1.0, 3)), 5, 1.0),)), "increasing"),
        (MetricFamily("h", "histogram", "x", (HistogramSample((), ((1.0, 5),), 4, 1.0),)), "below the last"),
        (MetricFamily("h", "histogram", "x", (HistogramSample((("le", "1"),), (), 0, 0.0),)), "'le'"),
        (MetricFamily("h", "histogram", "x", (Sample((), 1),)), "holds a Sample"),
        (MetricFamily("g", "gauge", "x", (HistogramSample((), (), 0, 0.0),)), "holds a HistogramSample"),
    ],
)
def test_refusals(family: MetricFamily, problem: str) -> None:
    with pytest.raises(MetricsError, match=problem.replace("(", r"\(")):
        render_metrics([family])


def test_duplicate_family_refused() -> None:
    with pytest.raises(MetricsError, match="appears twice"):
        render_metrics([gauge("g", "x", 1), gauge("g", "y", 2)])


def test_histogram_bounds_checked() -> None:
    with pytest.raises(MetricsError, match="strictly increasing"):
        Histogram((1.0, 1.0))
    with pytest.raises(MetricsError, match="finite"):
        Histogram((1.0, math.inf))


def test_network_counters_render() -> None:
    m = NetMetrics()
    m.published["/p2pgpu/c/tx"] += 2
    m.rejected[("/p2pgpu/c/bid", "bad signature")] += 3
    m.peers_connected = 4
    fams = parse(render_metrics(net_metric_families(m)))
    (rej,) = fams["p2pgpu_net_rejected"].samples
    assert rej.labels == {"topic": "/p2pgpu/c/bid", "reason": "bad signature"} and rej.value == 3
    assert fams["p2pgpu_net_peers"].samples[0].value == 4
    assert fams["p2pgpu_net_published"].samples[0].value == 2


def test_stream_refusals_and_charges_render_by_reason() -> None:
    m = NetMetrics()
    m.inbound_refused[("/p2pgpu/data/1", "peer_quota")] += 48
    m.inbound_refused[("/p2pgpu/data/1", "idle")] += 16
    m.inbound_active["/p2pgpu/data/1"] = 3
    m.charges[("/p2pgpu/data/1", "idle")] += 16
    m.charges[("/p2pgpu/c/bid", "bad_signature")] += 1
    fams = parse(render_metrics(net_metric_families(m)))

    def samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(s.labels.items())): s.value for s in fams[name].samples}

    assert samples("p2pgpu_net_inbound_refused") == {
        (("protocol", "/p2pgpu/data/1"), ("reason", "idle")): 16,
        (("protocol", "/p2pgpu/data/1"), ("reason", "peer_quota")): 48,
    }
    assert samples("p2pgpu_net_inbound_streams") == {(("protocol", "/p2pgpu/data/1"),): 3}
    assert samples("p2pgpu_net_charges") == {
        (("reason", "idle"), ("where", "/p2pgpu/data/1")): 16,
        (("reason", "bad_signature"), ("where", "/p2pgpu/c/bid")): 1,
    }


def test_stream_counters_render_by_side() -> None:
    m = StreamMetrics(sessions_served=2, connections=3, items_served=40, receipts_received=5, claims_submitted=4,
                      sessions_started=1, items_streamed=9, items_answered=8, receipts_sent=2, client_failures=1)
    m.sessions_closed["client_ended"] += 1
    m.rejected["no_receipt"] += 2
    fams = parse(render_metrics(stream_metric_families(m, active=(1, 0))))

    def samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(s.labels.items())): s.value for s in fams[name].samples}

    assert samples("p2pgpu_stream_sessions_opened") == {(("role", "provider"),): 2, (("role", "client"),): 1}
    assert samples("p2pgpu_stream_sessions_closed") == {
        (("reason", "client_ended"), ("role", "provider")): 1, (("reason", "completed"), ("role", "client")): 0,
        (("reason", "failed"), ("role", "client")): 1}
    assert samples("p2pgpu_stream_sessions_active") == {(("role", "provider"),): 1, (("role", "client"),): 0}
    assert samples("p2pgpu_stream_items") == {(("event", "served"), ("role", "provider")): 40,
                                              (("event", "sent"), ("role", "client")): 9,
                                              (("event", "answered"), ("role", "client")): 8}
    assert samples("p2pgpu_stream_receipts") == {(("event", "sent"), ("role", "client")): 2,
                                                 (("event", "received"), ("role", "provider")): 5}
    assert samples("p2pgpu_stream_claims") == {(("result", "submitted"),): 4, (("result", "refused"),): 0}
    assert samples("p2pgpu_stream_rejected") == {(("code", "no_receipt"),): 2}
    assert fams["p2pgpu_stream_connections"].type == "counter"


def test_empty() -> None:
    assert render_metrics([]) == ""
