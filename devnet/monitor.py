"""Watching a running devnet: one sample per node from its API, and the finalization rate.

Sampling is the only I/O here (two small GETs per node); what the samples
mean (rates, the status line) is computed by pure code in
:mod:`devnet.render` and :class:`RateMeter`, which tests drive directly.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from devnet.launcher import NodeRecord, is_paused, pid_alive

__all__ = ["MEMPOOL_METRIC", "TASK_METRICS", "NodeSample", "RateMeter", "parse_metric_values", "sample_node",
           "sample_nodes"]

MEMPOOL_METRIC = "p2pgpu_mempool_transactions"
TASK_METRICS = ("p2pgpu_tasks_active",)
"""Gauges counted as "tasks in flight" when a node's roles export them (shown as '-' otherwise)."""


@dataclass(frozen=True, slots=True)
class NodeSample:
    """One node at one moment. ``health`` is the API's state, or 'unreachable' / 'stopped' / 'paused'."""

    name: str
    roles: tuple[str, ...]
    pid: int | None
    alive: bool
    health: str
    height: int | None = None
    peers: int | None = None
    mempool: int | None = None
    tasks: int | None = None
    api_url: str = ""
    detail: str = ""


def parse_metric_values(text: str, names: Iterable[str]) -> dict[str, float]:
    """Sum of every sample of each wanted metric in Prometheus text (labels summed over)."""
    wanted = set(names)
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0].strip()
        if name in wanted:
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                continue
    return out


def sample_node(rec: NodeRecord, *, timeout: float = 0.5, http: Any = None) -> NodeSample:
    """One node's health and a few metrics; ``http``: an ``httpx.Client`` to reuse (a new one costs ~65 ms of CPU)."""
    import httpx

    alive = rec.pid is not None and pid_alive(rec.pid, rec.config)
    sample = functools.partial(NodeSample, name=rec.name, roles=rec.roles, pid=rec.pid if alive else None,
                               api_url=rec.api_url)
    if not alive:
        return sample(alive=False, health=rec.state if rec.state in ("killed", "stopped") else "stopped")
    if is_paused(rec.pid):  # type: ignore[arg-type]
        return sample(alive=True, health="paused")
    if not rec.api_url:
        return sample(alive=True, health="starting")
    try:
        get = http.get if http is not None else httpx.get
        resp = get(rec.api_url + "/health", timeout=timeout)
        body = resp.json()
        metrics = get(rec.api_url + "/metrics", timeout=timeout).text
    except (httpx.HTTPError, ValueError) as exc:
        return sample(alive=True, health="unreachable", detail=type(exc).__name__)
    values = parse_metric_values(metrics, (MEMPOOL_METRIC, *TASK_METRICS))
    tasks = [values[n] for n in TASK_METRICS if n in values]
    return sample(
        alive=True, health=str(body.get("state", "?")), height=_int(body.get("head_height")),
        peers=_int(body.get("peers")), mempool=_int(values.get(MEMPOOL_METRIC)),
        tasks=int(sum(tasks)) if tasks else None, detail=str(body.get("detail", "")),
    )


def sample_nodes(recs: Sequence[NodeRecord], *, timeout: float = 0.5) -> list[NodeSample]:
    import httpx

    with httpx.Client() as http:  # one client per round, not two per node
        return [sample_node(r, timeout=timeout, http=http) for r in recs]


def _int(value: object) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


class RateMeter:
    """Blocks finalized per second over a sliding window of (time, height) observations."""

    def __init__(self, window_seconds: float = 10.0) -> None:
        self.window = window_seconds
        self._points: deque[tuple[float, int]] = deque()

    def observe(self, now: float, height: int | None) -> None:
        if height is None:
            return
        self._points.append((now, height))
        while len(self._points) > 2 and now - self._points[0][0] > self.window:
            self._points.popleft()

    def rate(self) -> float | None:
        if len(self._points) < 2:
            return None
        (t0, h0), (t1, h1) = self._points[0], self._points[-1]
        return (h1 - h0) / (t1 - t0) if t1 > t0 else None
