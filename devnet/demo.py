"""The devnet demo: a few small matmul jobs through the client node's API, checked against NumPy.

Each job goes posted -> bids -> assigned -> running -> delivered -> settled
on the real network; the demo only watches (``GET /tasks/{id}``), fetches
paid results and verifies them locally with the kernel's own ``verify``
(float64 NumPy, no TensorFlow), so a wrong answer from a provider shows up
here even when no verifier was drawn. Building jobs and summarising a run
are pure functions; :func:`run_demo` is the loop around them.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devnet.launcher import DevnetError, Manifest, NodeRecord, pid_alive
from devnet.monitor import parse_metric_values
from kernels.ops.matmul import verify
from kernels.spec import make_spec
from p2pgpu.api.client import ApiClient, ApiUnreachable
from p2pgpu.api.types import ApiError, NotReady, SubmitRequest

__all__ = ["DemoJob", "DemoSummary", "TaskReport", "make_demo_jobs", "provider_ready_in_log", "run_demo", "summarise",
           "task_report", "wait_providers_ready"]

DEMO_SHAPES: tuple[tuple[int, int, int], ...] = ((64, 32, 48), (128, 64, 32), (96, 96, 96), (32, 128, 16))
DEFAULT_MAX_UNIT_PRICE = 1_000


@dataclass(frozen=True, slots=True)
class DemoJob:
    index: int
    label: str
    spec: Any  # kernels.spec.JobSpec
    inputs: Mapping[str, np.ndarray]


def make_demo_jobs(count: int, *, seed: int = 0) -> list[DemoJob]:
    """``count`` small float32 matmul jobs with seeded random inputs (the same seed, the same jobs)."""
    if count < 1:
        raise DevnetError(f"--tasks {count}: the demo needs at least one task")
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(count):
        m, k, n = DEMO_SHAPES[i % len(DEMO_SHAPES)]
        inputs = {"a": rng.standard_normal((m, k), dtype=np.float32),
                  "b": rng.standard_normal((k, n), dtype=np.float32)}
        spec = make_spec("matmul", 1, {}, inputs, memory_bytes=64 << 20, seconds=60.0, output_bytes=1 << 20)
        jobs.append(DemoJob(i, f"matmul {m}x{k} @ {k}x{n}", spec, inputs))
    return jobs


@dataclass(frozen=True, slots=True)
class TaskReport:
    """Where one demo task got to, and what the local check said about its result."""

    label: str
    task_id: str
    stage: str
    outcome: str | None = None
    provider: str | None = None
    """Node name when the provider is one of the devnet's nodes, else its address."""
    unit_price: int | None = None
    bids: int = 0
    time_to_assign_s: float | None = None
    total_s: float | None = None
    verified: bool | None = None
    """True/False once a paid result was checked against NumPy; None if there was nothing to check."""
    max_error: float | None = None
    detail: str = ""


def task_report(job: DemoJob, view: Any, names: Mapping[str, str], verdict: Any = None) -> TaskReport:
    """A report from a :class:`~p2pgpu.api.types.TaskView` (and the local verdict, if any)."""
    timings = {stage: t for stage, t in view.timings}

    def span(a: str, b: str) -> float | None:
        if a in timings and b in timings:
            return max(0.0, (timings[b].time_ms - timings[a].time_ms) / 1000)
        return None

    provider = None
    if view.provider is not None:
        provider = names.get(view.provider.hex(), view.provider.hex()[:12] + "…")
    return TaskReport(
        label=job.label, task_id=view.task_id.hex(), stage=view.stage, outcome=view.outcome, provider=provider,
        unit_price=view.unit_price, bids=len(view.bids), time_to_assign_s=span("posted", "assigned"),
        total_s=span("posted", "settled"), verified=None if verdict is None else bool(verdict.ok),
        max_error=None if verdict is None else verdict.max_error,
        detail=(verdict.reason if verdict is not None and not verdict.ok else view.detail),
    )


@dataclass(frozen=True, slots=True)
class DemoSummary:
    tasks: tuple[TaskReport, ...]
    balances_before: Mapping[str, int] = field(default_factory=dict)
    balances_after: Mapping[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def settled(self) -> int:
        return sum(1 for t in self.tasks if t.stage == "settled")

    @property
    def outcomes(self) -> Counter[str]:
        return Counter(t.outcome or t.stage for t in self.tasks)

    @property
    def total_paid(self) -> int:
        return sum(t.unit_price or 0 for t in self.tasks if t.outcome == "paid")

    @property
    def mean_time_to_assign_s(self) -> float | None:
        times = [t.time_to_assign_s for t in self.tasks if t.time_to_assign_s is not None]
        return sum(times) / len(times) if times else None

    @property
    def all_verified(self) -> bool:
        """Every task was paid and its result matched NumPy."""
        return bool(self.tasks) and all(t.outcome == "paid" and t.verified for t in self.tasks)


def summarise(reports: Sequence[TaskReport], before: Mapping[str, int], after: Mapping[str, int],
              elapsed_s: float) -> DemoSummary:
    return DemoSummary(tuple(reports), dict(before), dict(after), elapsed_s)


def _client_node(manifest: Manifest) -> NodeRecord:
    clients = [n for n in manifest.nodes if "client" in n.roles]
    if not clients:
        raise DevnetError("this devnet has no client node to submit through; start one with 'devnet up --clients 1'")
    for n in clients:
        if n.pid is not None and pid_alive(n.pid, n.config) and n.api_url:
            return n
    raise DevnetError(f"no client node is running ({', '.join(n.name for n in clients)}); "
                      f"try 'p2pgpu devnet restart {clients[0].name}'")


def _balances(api: Any, manifest: Manifest) -> dict[str, int]:
    out = {}
    for n in manifest.nodes:
        if "client" in n.roles or "provider" in n.roles:
            out[n.name] = int(api.balance(n.address)["balance"])
    return out


UpdateFn = Callable[[Sequence[DemoJob], Sequence[Any]], None]

PROVIDER_READY_METRIC = "p2pgpu_provider_ready"
PROVIDER_READY_EVENT = b"event=provider_ready"
START_MARKER = b"--- p2pgpu devnet: starting "


def provider_ready_in_log(log: Path) -> bool:
    """Whether the provider logged that it is ready since the launcher last started it.

    Fallback for nodes that do not export :data:`PROVIDER_READY_METRIC`: a
    provider loads TensorFlow and measures its device before it bids, which
    takes tens of seconds on a small machine, and tasks posted before that
    expire unbid.
    """
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - (1 << 20)))
            data = f.read()
    except OSError:
        return False
    return PROVIDER_READY_EVENT in data[data.rfind(START_MARKER) + 1:]


def _provider_ready(rec: NodeRecord, http: Any) -> bool:
    import httpx

    try:
        values = parse_metric_values(http.get(rec.api_url + "/metrics", timeout=2.0).text, (PROVIDER_READY_METRIC,))
    except httpx.HTTPError:
        values = {}
    if PROVIDER_READY_METRIC in values:
        return values[PROVIDER_READY_METRIC] >= 1
    return provider_ready_in_log(rec.log)


def wait_providers_ready(manifest: Manifest, *, timeout: float = 300.0,
                         progress: Callable[[str], None] | None = None) -> list[str]:
    """Wait until every running provider node can bid; returns the ready providers' names."""
    providers = [n for n in manifest.nodes if "provider" in n.roles and n.pid is not None
                 and pid_alive(n.pid, n.config)]
    if not providers:
        raise DevnetError("no provider node is running, so no task can be assigned; "
                          "start one with 'devnet up --providers 1' or 'devnet restart p0'")
    import httpx

    deadline = time.monotonic() + timeout
    # One client for every poll: a new one per request costs ~65 ms of CPU, taken from the providers warming up.
    with httpx.Client() as http:
        while True:
            waiting = [n.name for n in providers if not _provider_ready(n, http)]
            if not waiting:
                return [n.name for n in providers]
            if time.monotonic() > deadline:
                raise DevnetError(f"providers {', '.join(waiting)} not ready to bid after {timeout:g} s "
                                  f"(see their logs in {manifest.root / 'logs'})")
            if progress is not None:
                progress(f"waiting for providers to load TensorFlow and measure their device: {', '.join(waiting)}")
            time.sleep(0.2)


def run_demo(manifest: Manifest, *, tasks: int = 3, seed: int = 0, timeout: float = 300.0, poll: float = 0.5,
             max_unit_price: int = DEFAULT_MAX_UNIT_PRICE, bid_window: int = 60, audit_rate_bps: int = 2_500,
             on_update: UpdateFn | None = None, progress: Callable[[str], None] | None = None) -> DemoSummary:
    """Wait for the providers, submit ``tasks`` jobs through the client node, follow them, verify results, summarise.

    ``on_update(jobs, views)`` is called after each poll with the latest task views (for live progress).
    Raises :class:`DevnetError` when the client node cannot take tasks; a task still unsettled at the
    timeout is reported at the stage it reached.
    """
    client_node = _client_node(manifest)
    names = {n.address: n.name for n in manifest.nodes}
    jobs = make_demo_jobs(tasks, seed=seed)
    wait_providers_ready(manifest, timeout=timeout, progress=progress)
    started = time.monotonic()
    try:
        with ApiClient(client_node.api_url, timeout=30.0) as api:
            before = _balances(api, manifest)
            # All at once, in one request: the tasks are posted, auctioned and run concurrently.
            answers = api.submit_many([SubmitRequest(spec=job.spec, inputs=job.inputs, max_unit_price=max_unit_price,
                                                     bid_window=bid_window, audit_rate_bps=audit_rate_bps)
                                       for job in jobs])
            refused = [(job, a) for job, a in zip(jobs, answers, strict=True) if isinstance(a, ApiError)]
            if refused:
                first = refused[0][1]
                raise ApiError(f"{len(refused)} of {len(jobs)} task(s) refused; task {refused[0][0].index}: "
                               f"{first.message}", first.code)
            ids = [a for a in answers if isinstance(a, bytes)]
            deadline = time.monotonic() + timeout
            results: dict[bytes, Any] = {}
            while True:
                views = [api.task(tid) for tid in ids]
                if on_update is not None:
                    on_update(jobs, views)
                for view in views:  # a paid task's result can reach the client node just after it settled
                    if view.outcome == "paid" and view.task_id not in results:
                        try:
                            results[view.task_id] = api.task_result(view.task_id)
                        except NotReady:
                            pass
                done = all(v.stage == "settled" and (v.outcome != "paid" or v.task_id in results) for v in views)
                if done or time.monotonic() > deadline:
                    break
                time.sleep(poll)
            reports = []
            for job, view in zip(jobs, views, strict=True):
                verdict = None
                if view.task_id in results:
                    verdict = verify(job.spec, job.inputs, results[view.task_id])
                reports.append(task_report(job, view, names, verdict))
            after = _balances(api, manifest)
    except ApiUnreachable as exc:
        raise DevnetError(f"client node {client_node.name}: {exc}") from None
    except ApiError as exc:
        raise DevnetError(f"client node {client_node.name} refused: {exc.message} ({exc.code})") from None
    return summarise(reports, before, after, time.monotonic() - started)
