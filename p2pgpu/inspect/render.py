"""Ways to show a :class:`~p2pgpu.inspect.state.Summary`: rich renderables, one plain line, JSON.

Pure functions of the summary, so tests print them into
``Console(file=StringIO())`` and compare text.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from p2pgpu.inspect.state import Summary

__all__ = ["render_plain_line", "render_summary", "summary_json"]

DELAY_TITLES = {
    "vote_spread": "vote spread (after first vote of same height/round/step)",
    "finality": "finality (first proposal -> block on /block)",
    "block_delay": "block delay (arrival - header timestamp)",
    "duplicate_lag": "duplicate lag (copy - first delivery)",
}


def _rejects(rejected: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in rejected.items()) or "-"


def _clock(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%H:%M:%S.%f")[:-3]


def render_summary(summary: Summary, *, title: str = "gossip") -> RenderableType:
    """Header line, per-topic table, delay CDFs and (with a followed task) its timeline."""
    head = summary.head
    header = Text.assemble(
        (f"{title}  ", "bold"),
        f"{summary.duration_s:.1f} s, {summary.events} events  |  peers {summary.peers}  |  ",
        ("head ", "bold"), f"finalized {head.finalized}, consensus at {head.consensus_height}/{head.consensus_round}",
        f"  |  graft {summary.grafts} prune {summary.prunes}",
    )
    topics = Table(title=None, expand=False, show_edge=False, pad_edge=False)
    for name, justify in (("topic", "left"), (f"msg/s ({summary.window_s:g}s)", "right"), ("avg/s", "right"),
                          ("delivered", "right"), ("duplicates", "right"), ("rejected", "left"),
                          ("peers", "right"), ("mesh", "right"), ("kinds", "left")):
        topics.add_column(name, justify=justify)  # type: ignore[arg-type]
    for t in summary.topics:
        kinds = ", ".join(f"{k} {n}" for k, n in t.kinds.items()) or "-"
        topics.add_row(t.name, f"{t.rate_window:.2f}", f"{t.rate_avg:.2f}", str(t.delivered), str(t.duplicates),
                       _rejects(t.rejected), str(t.peers), str(t.mesh), kinds)
    parts: list[RenderableType] = [header, topics]
    if summary.delays:
        delays = Table(title="delays (ms)", show_edge=False, pad_edge=False)
        for name in ("measure", "n", "p50", "p90", "p99", "max", "CDF <=10ms", "<=100ms", "<=1s"):
            delays.add_column(name, justify="left" if name == "measure" else "right")
        for name, d in summary.delays.items():
            cdf = dict(d.cdf)
            delays.add_row(DELAY_TITLES.get(name, name), str(d.count), f"{d.p50_ms:.1f}", f"{d.p90_ms:.1f}",
                           f"{d.p99_ms:.1f}", f"{d.max_ms:.1f}", f"{cdf[10]:.0%}", f"{cdf[100]:.0%}",
                           f"{cdf[1000]:.0%}")
        parts.append(delays)
    if summary.follow_task is not None:
        timeline = Table(title=f"task {summary.follow_task}", show_edge=False, pad_edge=False)
        for name in ("time (UTC)", "+s", "Δs", "topic", "what", "from peer"):
            timeline.add_column(name, justify="right" if name in ("+s", "Δs") else "left")
        for e in summary.timeline:
            timeline.add_row(_clock(e.ts), f"{e.offset_s:.3f}", f"{e.delta_s:.3f}", e.topic, e.what, e.peer[-12:])
        if not summary.timeline:
            timeline.add_row("-", "", "", "", "not seen yet", "")
        parts.append(timeline)
    return Group(*parts)


def render_plain_line(summary: Summary) -> str:
    """One status line for logs and non-terminals."""
    topics = " ".join(
        f"{t.name}={t.rate_window:.1f}/s(d{t.delivered},r{sum(t.rejected.values())},x{t.duplicates},m{t.mesh})"
        for t in summary.topics
    )
    head = summary.head
    return (f"t={summary.duration_s:.0f}s peers={summary.peers} head={head.finalized} "
            f"consensus={head.consensus_height}/{head.consensus_round} {topics}")


def summary_json(summary: Summary) -> str:
    return json.dumps(summary.to_dict(), sort_keys=True)
