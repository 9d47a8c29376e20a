"""``p2pgpu devnet load``: many small matmul tasks through a running devnet's client nodes, measured.

The load generator submits ``tasks`` float32 matmuls (``size`` x ``size``)
over the devnet's client nodes in turn, either **open-loop** (task *i* is
sent at ``i / rate`` seconds, whatever happened to the others) or
**closed-loop** (``concurrency`` tasks in flight at all times: a new one as
soon as one finishes). A task is in flight from its ``POST /tasks`` until
its result is in hand (``GET /tasks/{id}/result`` answered and the result
checked against NumPy with the kernel's own ``verify``) or it reached a
final outcome (settled other than paid, refused, or wrong). Each task is a
separate ``POST /tasks``, as independent users would send them, so the
node's concurrent submission path is what is loaded (``POST /tasks/batch``
would measure one request's fan-out instead).

Layout, from the outside in:

* :func:`run_load` (sync) checks the devnet and runs :class:`LoadRun` under
  Trio: one ``httpx.AsyncClient`` per node (sharing one TLS context, so a
  client costs ~0 instead of ~65 ms of CPU), one Trio task per load task
  (submit, then a long poll of ``GET /tasks/{id}/result?wait=...`` until
  the result or a final outcome; the views of delivered tasks, for their
  stage timings, are read after the run),
  a pacing loop that asks :func:`submissions_due` how many to start.
* Pure parts, tested without processes: :class:`LoadConfig` (the refusals
  of bad arguments), the scheduling decisions (:func:`submissions_due`,
  :func:`next_due_at`), :class:`TaskRecord` (where one task got to),
  :func:`percentile`, :func:`summarise` into :class:`LoadSummary`,
  :func:`supply_check`, :func:`cpu_used`, and the rendering of the live
  line and the summary (:func:`render_load_line`, :func:`render_load_summary`).

Figures: *time to result* runs from sending ``POST /tasks`` to the checked
result in hand (the long poll answers as soon as the node holds the
result); *time to assignment* is the node's own ``posted -> assigned``
from the task's ``timings`` (a finalized block holds the ``Assign``);
*delivered per second* counts results in hand over the span from the first
submission to the last result. A task accepted by a node but with neither a
final outcome nor a result by the timeout (or forgotten by the node) is
**lost**. Per-node CPU seconds are read from ``/proc`` (through psutil) for
each node and its descendants (a provider's kernel workers) at the start and
the end of the run.
"""

from __future__ import annotations

import math
import re
import resource
import ssl
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from devnet.demo import wait_providers_ready
from devnet.launcher import DevnetError, Manifest, NodeRecord, pid_alive
from devnet.monitor import parse_metric_values
from kernels.registry import lookup
from kernels.spec import make_spec
from ledger.books import BUCKETS
from p2pgpu.api.types import MSGPACK, ApiError, BadRequest, SubmitRequest, TaskView, decode_result, encode_submit

__all__ = [
    "LoadArgumentError",
    "LoadConfig",
    "LoadJob",
    "LoadProgress",
    "LoadRun",
    "LoadSummary",
    "RunFacts",
    "SupplyCheck",
    "TaskRecord",
    "cpu_used",
    "failure_reason",
    "load_progress_line",
    "make_load_job",
    "next_due_at",
    "percentile",
    "poll_interval",
    "progress_of",
    "render_load_line",
    "render_load_summary",
    "run_load",
    "sample_cpu",
    "select_clients",
    "submissions_due",
    "summarise",
    "supply_check",
]

GOSSIP_DROPS_METRIC: Final = "p2pgpu_gossip_dropped_total"
GOSSIP_HANDLED_METRICS: Final = ("p2pgpu_gossip_delivered_total", "p2pgpu_gossip_duplicates_total")
"""What a node's gossip costs it, message by message: each one delivered and each duplicate dropped."""
STAGE_ORDER: Final = ("posted", "bids", "assigned", "running", "delivered", "settled")
DEFAULT_TIMEOUT_S: Final = 600.0
DEFAULT_POLL_S: Final = 0.2
RESULT_STAGES: Final = frozenset({"delivered", "settled"})
EARLY_STAGES: Final = frozenset({"posted", "bids"})
EARLY_POLL_FACTOR: Final = 2.5
"""Tasks still in their auction are polled this many times less often: no result can come before the
``Assign`` is final, and each poll costs ~1-2 ms of CPU here and about as much in the node."""
LATE_POLL_S: Final = 2.0
CONNECTIONS_PER_NODE: Final = 8
"""Connections per node beyond the long polls (one per task in flight): httpcore's pool looks at every
pooled connection (a poll(2) each) for every request, so the pool is kept no larger than that (256
connections cost ~2.6 ms of CPU per request, 8 cost ~1.4 ms). With a pool of 8 and 16 long polls per node,
new submissions queued behind held polls for seconds (p99 time to result 17 s against 7.6 s seen by the node)."""
OPEN_LOOP_IN_FLIGHT: Final = 64
"""Long polls an open-loop run (``--rate``) keeps a connection for, per node."""
LATE_RESULT_GRACE_S: Final = 30.0
"""A task settled as paid before its result reached the client node is watched for the late result
(the node keeps fetching it for a while) until this long after every other task finished."""


class LoadArgumentError(DevnetError):
    """A bad load argument (the CLI exits 2 with this message)."""


# ----------------------------------------------------------------- configuration (pure)


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """What to send and how fast. Exactly one of ``rate`` (open loop) and ``concurrency`` (closed loop)."""

    tasks: int
    rate: float | None = None
    """Open loop: tasks per second, task *i* sent at ``i / rate`` s."""
    concurrency: int | None = None
    """Closed loop: tasks kept in flight."""
    size: int = 64
    seed: int = 0
    timeout: float = DEFAULT_TIMEOUT_S
    """Seconds from the first submission after which open tasks are given up (and counted lost)."""
    poll: float = DEFAULT_POLL_S
    """Seconds between two ``GET /tasks/{id}`` of one task."""
    max_unit_price: int = 1_000
    bid_window: int = 10
    audit_rate_bps: int = 1_000

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            which = "both were" if self.rate is not None else "neither was"
            raise LoadArgumentError(f"give exactly one of --rate R (open loop: R tasks/s) and --concurrency C "
                                    f"(closed loop: C tasks in flight); {which} given")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise LoadArgumentError(f"--rate {self.rate:g}: must be a positive number of tasks per second")
        if self.concurrency is not None and self.concurrency < 1:
            raise LoadArgumentError(f"--concurrency {self.concurrency}: must be at least 1")
        if self.tasks < 1:
            raise LoadArgumentError(f"--tasks {self.tasks}: must be at least 1")
        if not 1 <= self.size <= 4096:
            raise LoadArgumentError(f"--size {self.size}: must be between 1 and 4096")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise LoadArgumentError(f"--timeout {self.timeout:g}: must be a positive number of seconds")
        if not (math.isfinite(self.poll) and self.poll > 0):
            raise LoadArgumentError(f"poll interval {self.poll:g}: must be a positive number of seconds")
        if self.max_unit_price < 1:
            raise LoadArgumentError(f"--max-price {self.max_unit_price}: must be at least 1")
        if self.bid_window < 1:
            raise LoadArgumentError(f"--bid-window {self.bid_window}: must be at least 1 block")
        if not 0 <= self.audit_rate_bps <= 10_000:
            raise LoadArgumentError(f"audit rate {self.audit_rate_bps} bps: must be between 0 and 10000")

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"

    def describe(self) -> str:
        pace = f"{self.rate:g} tasks/s (open loop)" if self.rate is not None else \
            f"{self.concurrency} in flight (closed loop)"
        return f"{self.tasks} x matmul {self.size}x{self.size} float32 at {pace}"


def select_clients(manifest: Manifest, which: str = "all") -> list[NodeRecord]:
    """The client nodes to submit through: ``all`` or a comma-separated list of names, each running.

    Raises :class:`LoadArgumentError` for a name that is not a client node,
    and :class:`DevnetError` when the devnet (or a chosen client) is not running.
    """
    clients = [n for n in manifest.nodes if "client" in n.roles]
    if not any(n.pid is not None and pid_alive(n.pid, n.config) for n in manifest.nodes):
        raise DevnetError(f"the devnet in {manifest.root} is not running; start it with "
                          f"'p2pgpu devnet up --dir {manifest.root}'")
    if not clients:
        raise LoadArgumentError(f"the devnet in {manifest.root} has no client node to submit through; "
                                "start one with 'p2pgpu devnet up --clients 1' (on a fresh --dir)")
    if which.strip() == "all":
        chosen = clients
    else:
        names = [s.strip() for s in which.split(",") if s.strip()]
        if not names:
            raise LoadArgumentError("--clients: give node names separated by commas (e.g. c0,c1) or 'all'")
        chosen = []
        for name in dict.fromkeys(names):  # in order, once each
            rec = manifest.node(name)  # UnknownNode names the nodes there are
            if "client" not in rec.roles:
                raise LoadArgumentError(f"--clients: node {name} does not run the client role; client nodes: "
                                        f"{', '.join(n.name for n in clients)}")
            chosen.append(rec)
    down = [n.name for n in chosen if n.pid is None or not pid_alive(n.pid, n.config) or not n.api_url]
    if down:
        raise DevnetError(f"client node(s) {', '.join(down)} not running; try "
                          f"'p2pgpu devnet restart {down[0]} --dir {manifest.root}'")
    return chosen


# ----------------------------------------------------------------- the work (pure)


@dataclass(frozen=True, slots=True)
class LoadJob:
    index: int
    spec: Any  # kernels.spec.JobSpec
    inputs: Mapping[str, np.ndarray]


def make_load_job(index: int, size: int, seed: int) -> LoadJob:
    """Task ``index``: a seeded ``size`` x ``size`` float32 matmul (the same seed and index, the same job)."""
    rng = np.random.default_rng([seed, index])
    inputs = {"a": rng.standard_normal((size, size), dtype=np.float32),
              "b": rng.standard_normal((size, size), dtype=np.float32)}
    spec = make_spec("matmul", 1, {}, inputs, memory_bytes=64 << 20, seconds=30.0,
                     output_bytes=max(1 << 20, 8 * size * size))
    return LoadJob(index, spec, inputs)


# ----------------------------------------------------------------- scheduling decisions (pure)


def submissions_due(config: LoadConfig, *, elapsed: float, submitted: int, in_flight: int) -> int:
    """How many tasks to send now, ``elapsed`` seconds after the first.

    Open loop: every task whose send time ``i / rate`` has come, whatever is
    in flight (an overloaded network gets more and more open tasks, as it
    would from independent users). Closed loop: enough to bring the tasks in
    flight back to ``concurrency``.
    """
    remaining = config.tasks - submitted
    if remaining <= 0:
        return 0
    if config.rate is not None:
        scheduled = math.floor(max(0.0, elapsed) * config.rate + 1e-9) + 1  # task i is due at i / rate
        return max(0, min(config.tasks, scheduled) - submitted)
    assert config.concurrency is not None  # LoadConfig allows exactly one of the two
    return max(0, min(remaining, config.concurrency - in_flight))


HEALTH_PROBE_S = 1.0
HEALTH_TIMEOUT_S = 5.0
LONG_POLL_S = 30.0
"""How long the node may hold one ``GET /tasks/{id}/result?wait=...`` (it answers as soon as the result is in)."""


def poll_interval(config: LoadConfig, stage: str | None, *, paid_without_result: bool = False) -> float:
    """Seconds until the next ``GET /tasks/{id}`` of a task at ``stage``.

    The configured interval once a task is assigned (its result may come any
    moment, and time to result is only as fine as this); longer while it is in
    its auction, and once it is paid and only a late result is awaited.
    """
    if paid_without_result:
        return max(config.poll, LATE_POLL_S)
    if stage is None or stage in EARLY_STAGES:
        return config.poll * EARLY_POLL_FACTOR
    return config.poll


def next_due_at(config: LoadConfig, submitted: int) -> float | None:
    """Seconds after the first submission when the next open-loop task is due.

    None when every task is sent, or in closed loop (the next one goes when
    a task in flight finishes).
    """
    if submitted >= config.tasks or config.rate is None:
        return None
    return submitted / config.rate


# ----------------------------------------------------------------- one task's record (pure)

_HEX_RUN = re.compile(r"\b[0-9a-f]{12,}\b")


def failure_reason(kind: str, detail: str = "") -> str:
    """A grouping key for a failure: ``kind`` (an outcome, 'refused', 'wrong result', ...) and its detail.

    Long hex runs (task ids, hashes, addresses) become ``…`` so the same
    failure of different tasks falls in one group.
    """
    detail = _HEX_RUN.sub("…", " ".join(detail.split()))[:160]
    return f"{kind}: {detail}" if detail else kind


@dataclass(slots=True)
class TaskRecord:
    """Where one load task got to. Times are seconds on the run's clock."""

    index: int
    node: str
    submitted_at: float | None = None
    """When ``POST /tasks`` was sent."""
    task_id: bytes | None = None
    view: Any = None  # the last p2pgpu.api.types.TaskView seen
    result_at: float | None = None
    """When the checked result was in hand."""
    failure: str | None = None
    """Why the task ended without a result (a :func:`failure_reason` key)."""
    lost: str | None = None
    """Why an accepted task was given up: no final outcome nor result by the timeout, or forgotten by the node."""
    max_error: float | None = None
    paid_at: float | None = None
    """When the task was seen settled as paid with no result at the client node yet (then only a late
    result is awaited: the task reached its final outcome, so it is no longer in flight)."""
    job: LoadJob | None = None
    """The task's inputs, kept only while it is followed (to check its result)."""

    @property
    def accepted(self) -> bool:
        return self.task_id is not None

    @property
    def delivered(self) -> bool:
        return self.result_at is not None and self.failure is None

    @property
    def finished(self) -> bool:
        return self.result_at is not None or self.failure is not None or self.lost is not None

    @property
    def in_flight(self) -> bool:
        return self.submitted_at is not None and not self.finished and self.paid_at is None

    @property
    def awaiting_late_result(self) -> bool:
        return self.paid_at is not None and not self.finished

    @property
    def stage(self) -> str | None:
        return None if self.view is None else self.view.stage

    def time_to_result_ms(self) -> float | None:
        if self.result_at is None or self.submitted_at is None or self.failure is not None:
            return None
        return 1000.0 * (self.result_at - self.submitted_at)

    def stage_ms(self, a: str, b: str) -> float | None:
        """Milliseconds between two stages by the node's own timings (``posted -> assigned``: time to assignment)."""
        if self.view is None:
            return None
        t = dict(self.view.timings)
        return float(t[b].time_ms - t[a].time_ms) if a in t and b in t else None


# ----------------------------------------------------------------- figures (pure)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile: the smallest value with at least q % of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True, slots=True)
class SupplyCheck:
    """One node's ``GET /ledger/supply``, recomputed here rather than taken on trust."""

    height: int
    total: int
    conserved: bool
    problem: str = ""


def supply_check(answer: Mapping[str, Any]) -> SupplyCheck:
    """Conserved when the node says so, its buckets add up to ``total`` and ``total == genesis_supply + minted``."""
    try:
        buckets = sum(int(answer[k]) for k in BUCKETS)
        total, genesis, minted = int(answer["total"]), int(answer["genesis_supply"]), int(answer["minted"])
        height, claimed = int(answer["height"]), answer["conserved"]
    except (KeyError, TypeError, ValueError) as exc:
        return SupplyCheck(-1, 0, False, f"not a supply answer ({exc!r})")
    problems = []
    if claimed is not True:
        problems.append("the node reports the supply not conserved")
    if buckets != total:
        problems.append(f"buckets add up to {buckets}, total is {total}")
    if total != genesis + minted:
        problems.append(f"total {total} != genesis {genesis} + minted {minted}")
    return SupplyCheck(height, total, not problems, "; ".join(problems))


CpuSample = Mapping[str, tuple[int, float]]
"""Node name -> (pid, CPU seconds of it and its descendants so far)."""


def cpu_used(before: CpuSample, after: CpuSample) -> dict[str, float | None]:
    """CPU seconds each node used between two samples; None for a node restarted (new pid) or gone meanwhile."""
    out: dict[str, float | None] = {}
    for name, (pid, start) in before.items():
        end = after.get(name)
        out[name] = None if end is None or end[0] != pid else round(max(0.0, end[1] - start), 2)
    return out


@dataclass(frozen=True, slots=True)
class LoadSummary:
    """A finished run's figures; :meth:`to_json` is what ``--json`` prints and the bench reports."""

    config: LoadConfig
    clients: tuple[str, ...]
    submitted: int
    accepted: int
    delivered: int
    failed: int
    lost: int
    not_submitted: int
    run_s: float
    """From the first submission until the last task finished or was given up."""
    delivery_span_s: float | None
    """From the first submission to the last result in hand."""
    tasks_delivered_per_s: float
    time_to_result_ms_p50: float | None
    time_to_result_ms_p99: float | None
    time_to_assignment_ms_p50: float | None
    time_to_assignment_ms_p99: float | None
    stage_ms_p50: Mapping[str, float]
    failed_by_reason: Mapping[str, int]
    lost_by_reason: Mapping[str, int]
    cpu_seconds_by_node: Mapping[str, float | None]
    load_generator_cpu_s: float | None
    supply_conserved: bool | None
    """None when no node answered ``GET /ledger/supply``."""
    supply_by_node: Mapping[str, SupplyCheck]
    supply_unanswered: Mapping[str, str]
    """Nodes whose ``GET /ledger/supply`` gave no usable answer, and why (they count neither way)."""
    gossip_drops: int | None
    """``p2pgpu_gossip_dropped_total`` summed over the nodes at the end (as bench/market.py reports it)."""
    gossip_drops_during_run: int | None
    gossip_messages_by_node: Mapping[str, int | None]
    """Gossip messages each node handled during the run (delivered plus duplicates): unlike CPU seconds, the
    same for the same code however busy the machine is, so a change to what is gossiped shows in one run."""
    blocks: int | None
    """Blocks finalized during the run (highest head at the end minus at the start)."""
    poll_errors: int = 0
    """Follow-up requests that got no usable answer (timeouts, 5xx); the task was polled again."""
    lost_task_ids: tuple[str, ...] = ()
    delivered_after_settlement: int = 0
    """Delivered tasks whose result reached the client node only after the task settled as paid."""
    failed_examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Up to three task ids (16 hex digits, as node logs print them) per failure reason: grep the logs for them."""
    lost_examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    http_requests: int = 0
    """Requests the load generator sent (submissions, polls, result fetches, samples): its own load on the nodes."""
    health_ms_p99: float | None = None
    health_ms_max: float | None = None
    """``GET /health`` latency on the nodes during the run, probed every :data:`HEALTH_PROBE_S`: a node under
    load keeps answering within a second."""

    @property
    def ok(self) -> bool:
        """Every task delivered with a checked result, none lost."""
        return self.lost == 0 and self.delivered == self.config.tasks

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "mode": c.mode, "rate": c.rate, "concurrency": c.concurrency, "tasks": c.tasks, "size": c.size,
            "seed": c.seed, "timeout_s": c.timeout, "poll_s": c.poll, "max_unit_price": c.max_unit_price,
            "bid_window": c.bid_window, "audit_rate_bps": c.audit_rate_bps, "clients": list(self.clients),
            "submitted": self.submitted, "accepted": self.accepted, "delivered": self.delivered,
            "failed": self.failed, "tasks_lost": self.lost, "not_submitted": self.not_submitted,
            "run_s": round(self.run_s, 3),
            "delivery_span_s": None if self.delivery_span_s is None else round(self.delivery_span_s, 3),
            "tasks_delivered_per_s": round(self.tasks_delivered_per_s, 3),
            "time_to_result_ms_p50": _ms(self.time_to_result_ms_p50),
            "time_to_result_ms_p99": _ms(self.time_to_result_ms_p99),
            "time_to_assignment_ms_p50": _ms(self.time_to_assignment_ms_p50),
            "time_to_assignment_ms_p99": _ms(self.time_to_assignment_ms_p99),
            "stage_ms_p50": {k: _ms(v) for k, v in self.stage_ms_p50.items()},
            "failed_by_reason": dict(self.failed_by_reason), "lost_by_reason": dict(self.lost_by_reason),
            "lost_task_ids": list(self.lost_task_ids),
            "failed_examples": {k: list(v) for k, v in self.failed_examples.items()},
            "cpu_seconds_by_node": dict(self.cpu_seconds_by_node),
            "load_generator_cpu_s": self.load_generator_cpu_s,
            "supply_conserved": self.supply_conserved,
            "supply_by_node": {name: {"height": s.height, "total": s.total, "conserved": s.conserved,
                                      **({"problem": s.problem} if s.problem else {})}
                               for name, s in self.supply_by_node.items()},
            "supply_unanswered": dict(self.supply_unanswered),
            "gossip_drops": self.gossip_drops, "gossip_drops_during_run": self.gossip_drops_during_run,
            "gossip_messages_by_node": dict(self.gossip_messages_by_node),
            "blocks": self.blocks, "poll_errors": self.poll_errors,
            "delivered_after_settlement": self.delivered_after_settlement, "http_requests": self.http_requests,
            "health_ms_p99": self.health_ms_p99, "health_ms_max": self.health_ms_max,
            "ok": self.ok,
        }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What the I/O shell measured around the tasks, for :func:`summarise`."""

    started: float
    ended: float
    cpu_before: CpuSample = field(default_factory=dict)
    cpu_after: CpuSample = field(default_factory=dict)
    load_generator_cpu_s: float | None = None
    supply: Mapping[str, SupplyCheck] = field(default_factory=dict)
    supply_unanswered: Mapping[str, str] = field(default_factory=dict)
    drops_before: int | None = None
    drops_after: int | None = None
    gossip_before: Mapping[str, float] = field(default_factory=dict)
    gossip_after: Mapping[str, float] = field(default_factory=dict)
    height_before: int | None = None
    height_after: int | None = None
    poll_errors: int = 0
    requests: int = 0
    health_ms: Sequence[float] = ()
    """Latency of every ``GET /health`` probe sent to every node during the run (a probe with no answer counts
    as its timeout)."""


def summarise(config: LoadConfig, clients: Sequence[str], records: Sequence[TaskRecord],
              facts: RunFacts) -> LoadSummary:
    """The run's figures from its task records and what was measured around them."""
    submitted = [r for r in records if r.submitted_at is not None]
    delivered = [r for r in records if r.delivered]
    results = [ms for ms in (r.time_to_result_ms() for r in delivered) if ms is not None]
    assign = [ms for ms in (r.stage_ms("posted", "assigned") for r in records) if ms is not None]
    first = min((r.submitted_at for r in submitted), default=None)  # type: ignore[type-var]
    last = max((r.result_at for r in delivered), default=None)  # type: ignore[type-var]
    span = None if first is None or last is None else max(last - first, 1e-9)
    stages: dict[str, float] = {}
    for a, b in zip(STAGE_ORDER, STAGE_ORDER[1:]):
        ms = [x for x in (r.stage_ms(a, b) for r in records) if x is not None]
        if ms:
            stages[f"{a}_to_{b}"] = statistics.median(ms)
    supply = dict(facts.supply)
    return LoadSummary(
        config=config, clients=tuple(clients), submitted=len(submitted),
        accepted=sum(r.accepted for r in records), delivered=len(delivered),
        failed=sum(r.failure is not None for r in records), lost=sum(r.lost is not None for r in records),
        not_submitted=config.tasks - len(submitted),
        run_s=max(0.0, facts.ended - facts.started), delivery_span_s=span,
        tasks_delivered_per_s=len(delivered) / span if span else 0.0,
        time_to_result_ms_p50=percentile(results, 50), time_to_result_ms_p99=percentile(results, 99),
        time_to_assignment_ms_p50=percentile(assign, 50), time_to_assignment_ms_p99=percentile(assign, 99),
        stage_ms_p50=stages,
        failed_by_reason=dict(Counter(r.failure for r in records if r.failure is not None).most_common()),
        lost_by_reason=dict(Counter(r.lost for r in records if r.lost is not None).most_common()),
        cpu_seconds_by_node=cpu_used(facts.cpu_before, facts.cpu_after),
        load_generator_cpu_s=facts.load_generator_cpu_s,
        supply_conserved=all(s.conserved for s in supply.values()) if supply else None,
        supply_by_node=supply, supply_unanswered=dict(facts.supply_unanswered), gossip_drops=facts.drops_after,
        gossip_drops_during_run=(None if facts.drops_before is None or facts.drops_after is None
                                 else facts.drops_after - facts.drops_before),
        gossip_messages_by_node={name: (int(facts.gossip_after[name] - before) if name in facts.gossip_after
                                        and facts.gossip_after[name] >= before else None)
                                 for name, before in facts.gossip_before.items()},
        blocks=(None if facts.height_before is None or facts.height_after is None
                else facts.height_after - facts.height_before),
        poll_errors=facts.poll_errors, http_requests=facts.requests,
        health_ms_p99=percentile(list(facts.health_ms), 99), health_ms_max=max(facts.health_ms, default=None),
        lost_task_ids=tuple(r.task_id.hex() for r in records if r.lost is not None and r.task_id is not None),
        delivered_after_settlement=sum(r.delivered and r.paid_at is not None for r in records),
        failed_examples=_examples(records), lost_examples=_examples(records, lost=True),
    )


def _examples(records: Sequence[TaskRecord], *, lost: bool = False, per_reason: int = 3) -> dict[str, tuple[str, ...]]:
    """Up to ``per_reason`` task ids (as node logs print them) per failure (or loss) reason."""
    out: dict[str, list[str]] = {}
    for r in records:
        reason = r.lost if lost else r.failure
        if reason is not None and r.task_id is not None and len(out.setdefault(reason, [])) < per_reason:
            out[reason].append(r.task_id.hex()[:16])
    return {k: tuple(v) for k, v in out.items() if v}


# ----------------------------------------------------------------- live progress (pure)


@dataclass(frozen=True, slots=True)
class LoadProgress:
    """The live line's facts at one moment."""

    elapsed_s: float
    tasks: int
    submitted: int
    in_flight: int
    delivered: int
    failed: int
    lost: int
    delivered_per_s: float
    time_to_result_ms_p50: float | None
    late: int = 0
    """Tasks settled as paid whose result has not reached the client node yet."""


def progress_of(records: Sequence[TaskRecord], tasks: int, elapsed_s: float) -> LoadProgress:
    delivered = [r for r in records if r.delivered]
    results = [ms for ms in (r.time_to_result_ms() for r in delivered) if ms is not None]
    return LoadProgress(
        elapsed_s=elapsed_s, tasks=tasks, submitted=sum(r.submitted_at is not None for r in records),
        in_flight=sum(r.in_flight for r in records), delivered=len(delivered),
        failed=sum(r.failure is not None for r in records), lost=sum(r.lost is not None for r in records),
        delivered_per_s=len(delivered) / elapsed_s if elapsed_s > 0 else 0.0,
        time_to_result_ms_p50=percentile(results, 50), late=sum(r.awaiting_late_result for r in records),
    )


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}"


def _secs_of_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.2f} s"


def render_load_line(p: LoadProgress) -> Any:
    """The one live line (as solana-test-validator's): submitted / in flight / delivered / failed, rate, p50."""
    from rich.text import Text

    line = Text()
    line.append("submitted ", style="dim").append(f"{p.submitted}/{p.tasks}", style="bold")
    line.append("  in flight ", style="dim").append(str(p.in_flight), style="bold")
    line.append("  delivered ", style="dim").append(str(p.delivered), style="bold green" if p.delivered else "bold")
    line.append("  failed ", style="dim").append(str(p.failed), style="bold red" if p.failed else "dim")
    if p.lost:
        line.append("  lost ", style="dim").append(str(p.lost), style="bold red")
    if p.late:
        line.append("  paid, result awaited ", style="dim").append(str(p.late), style="bold yellow")
    line.append("  |  ", style="dim").append(f"{p.delivered_per_s:.1f}", style="bold").append(" delivered/s",
                                                                                         style="dim")
    line.append("  p50 to result ", style="dim").append(_secs_of_ms(p.time_to_result_ms_p50))
    line.append(f"  [{_clock(p.elapsed_s)}]", style="dim")
    return line


def load_progress_line(p: LoadProgress) -> str:
    """The same facts as one plain line, for output that is not a terminal."""
    lost = (f"  lost {p.lost}" if p.lost else "") + (f"  paid, result awaited {p.late}" if p.late else "")
    return (f"[{_clock(p.elapsed_s)}] submitted {p.submitted}/{p.tasks}  in flight {p.in_flight}  "
            f"delivered {p.delivered}  failed {p.failed}{lost}  {p.delivered_per_s:.1f} delivered/s  "
            f"p50 to result {_secs_of_ms(p.time_to_result_ms_p50)}")


def render_load_summary(s: LoadSummary) -> Any:
    """The end-of-run panel: throughput and latencies, failures by reason, lost tasks, supply, CPU per node."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    figures = Table.grid(padding=(0, 2))
    figures.add_column(style="bold", no_wrap=True)
    figures.add_column()
    figures.add_row("workload", f"{s.config.describe()} via {', '.join(s.clients)}")
    figures.add_row("delivered", Text(f"{s.delivered}/{s.config.tasks}  at {s.tasks_delivered_per_s:.2f} tasks/s"
                                      + (f" over {s.delivery_span_s:.1f} s" if s.delivery_span_s else ""),
                                      style="green" if s.delivered == s.config.tasks else "red"))
    figures.add_row("time to assignment", f"p50 {_secs_of_ms(s.time_to_assignment_ms_p50)}  "
                                          f"p99 {_secs_of_ms(s.time_to_assignment_ms_p99)}")
    figures.add_row("time to result", f"p50 {_secs_of_ms(s.time_to_result_ms_p50)}  "
                                      f"p99 {_secs_of_ms(s.time_to_result_ms_p99)}")
    if s.stage_ms_p50:
        figures.add_row("stages (p50)", "  ".join(f"{k.replace('_to_', '→')} {_secs_of_ms(v)}"
                                                  for k, v in s.stage_ms_p50.items()))
    figures.add_row("failed", Text(str(s.failed), style="red" if s.failed else "green"))
    figures.add_row("lost", Text(str(s.lost), style="bold red" if s.lost else "green"))
    if s.not_submitted:
        figures.add_row("not submitted", Text(f"{s.not_submitted} (the timeout came first)", style="red"))
    supply = {None: Text("unknown (no node answered)", style="yellow"), True: Text("conserved", style="green"),
              False: Text("NOT conserved", style="bold red")}[s.supply_conserved]
    problems = [f"{n}: {c.problem}" for n, c in s.supply_by_node.items() if c.problem]
    problems += [f"{n} did not answer ({why})" for n, why in s.supply_unanswered.items()]
    if problems:
        supply.append("  (" + "; ".join(problems) + ")", style="red")
    figures.add_row("ledger supply", supply)
    extra = []
    if s.blocks is not None:
        extra.append(f"{s.blocks} blocks")
    if s.gossip_drops_during_run is not None:
        extra.append(f"{s.gossip_drops_during_run} gossip drops")
    if s.http_requests:
        extra.append(f"{s.http_requests} API requests from this load generator")
    if s.poll_errors:
        extra.append(f"{s.poll_errors} poll errors")
    if s.delivered_after_settlement:
        extra.append(f"{s.delivered_after_settlement} result(s) reached the client only after settling")
    if extra:
        figures.add_row("during the run", ", ".join(extra))
    parts: list[Any] = [figures]
    lost_example = {reason: ids[0] for reason, ids in s.lost_examples.items() if ids}
    failed_example = {reason: ids[0] for reason, ids in s.failed_examples.items() if ids}
    for title, groups, examples in (("failed by reason", s.failed_by_reason, failed_example),
                                    ("lost by reason", s.lost_by_reason, lost_example)):
        if groups:
            table = Table(box=None, header_style="bold", pad_edge=False, title=title, title_justify="left",
                          title_style="bold red")
            table.add_column("tasks", justify="right", no_wrap=True)
            table.add_column("reason", overflow="fold")
            table.add_column("e.g. task", no_wrap=True, style="dim")
            for reason, n in groups.items():
                table.add_row(str(n), reason, examples.get(reason, ""))
            parts += [Text(""), table]
    cpu = Table(box=None, header_style="bold", pad_edge=False)
    names = list(s.cpu_seconds_by_node)
    for name in names:
        cpu.add_column(name, justify="right", no_wrap=True)
    cpu.add_column("load generator", justify="right", no_wrap=True)
    cpu.add_row(*("-" if v is None else f"{v:.1f}" for v in s.cpu_seconds_by_node.values()),
                "-" if s.load_generator_cpu_s is None else f"{s.load_generator_cpu_s:.1f}")
    if s.gossip_messages_by_node:
        cpu.add_row(*("-" if s.gossip_messages_by_node.get(n) is None else str(s.gossip_messages_by_node[n])
                      for n in names), "", style="dim")
    title = "CPU seconds during the run (a provider's with its kernel workers)"
    if s.gossip_messages_by_node:
        title += "; below, gossip messages handled"
    parts += [Text(""), Text(title, style="bold"), cpu]
    verdict = Text("every task delivered with a result matching NumPy" if s.ok else
                   f"{s.config.tasks - s.delivered} of {s.config.tasks} task(s) not delivered"
                   + (f", {s.lost} lost" if s.lost else ""), style="bold green" if s.ok else "bold red")
    parts += [Text(""), verdict]
    return Panel(Group(*parts), title="load summary", title_align="left", border_style="green" if s.ok else "red")


# ----------------------------------------------------------------- the I/O shell

ProgressFn = Callable[[LoadProgress], None]


def sample_cpu(nodes: Sequence[NodeRecord]) -> dict[str, tuple[int, float]]:
    """Each running node's CPU seconds so far, with its descendants (a provider's kernel workers).

    For every process of the tree: user + system, plus the children's
    times it has reaped (a worker that exited during the run still counts);
    a live descendant is counted only through itself, never twice.
    """
    import psutil

    out: dict[str, tuple[int, float]] = {}
    for rec in nodes:
        if rec.pid is None or not pid_alive(rec.pid, rec.config):
            continue
        try:
            root = psutil.Process(rec.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        total = 0.0
        for proc in tree:
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:  # exited between listing and reading: its parent reaps its time
                continue
            total += t.user + t.system + t.children_user + t.children_system
        out[rec.name] = (rec.pid, total)
    return out


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LoadRun:
    """One run of the load generator against running nodes (Trio; see the module docstring)."""

    def __init__(self, manifest: Manifest, config: LoadConfig, clients: Sequence[NodeRecord], *,
                 on_progress: ProgressFn | None = None, progress_every: float = 0.25) -> None:
        self.manifest = manifest
        self.config = config
        self.clients = list(clients)
        self.on_progress = on_progress
        self.progress_every = progress_every
        self.records = [TaskRecord(i, self.clients[i % len(self.clients)].name) for i in range(config.tasks)]
        self.poll_errors = 0
        self.requests = 0
        self.health_ms: list[float] = []
        self.http: dict[str, Any] = {}
        self._changed: Any = None  # trio.Event: a task finished (closed loop sends the next)
        self._t0 = 0.0
        self._late_deadline = math.inf
        """When tasks awaiting only a late result are given up: set once nothing else is in flight."""

    # -- helpers

    def _now(self) -> float:
        import trio

        return trio.current_time() - self._t0

    async def _get(self, node: str, path: str, *, timeout: float = 10.0) -> Any:
        """A GET whose transport errors are counted and answered with None (the caller polls again)."""
        import httpx

        try:
            self.requests += 1
            return await self.http[node].get(path, timeout=timeout)
        except httpx.HTTPError:
            self.poll_errors += 1
            return None

    # -- one task

    async def _run_task(self, rec: TaskRecord) -> None:
        try:
            await self._submit(rec)
            if rec.accepted and not rec.finished:
                await self._follow(rec)
        finally:
            self._changed.set()  # the pacing loop may send the next task

    async def _submit(self, rec: TaskRecord) -> None:
        import httpx

        job = rec.job = make_load_job(rec.index, self.config.size, self.config.seed)
        try:
            body = encode_submit(SubmitRequest(spec=job.spec, inputs=job.inputs,
                                               max_unit_price=self.config.max_unit_price,
                                               bid_window=self.config.bid_window,
                                               audit_rate_bps=self.config.audit_rate_bps))
        except ApiError as exc:
            rec.submitted_at = self._now()
            rec.failure = failure_reason("not sent", exc.message)
            return
        rec.submitted_at = self._now()
        try:
            self.requests += 1
            resp = await self.http[rec.node].post("/tasks", content=body, headers={"content-type": MSGPACK},
                                                  timeout=60.0)
        except httpx.HTTPError as exc:
            rec.failure = failure_reason("submit: no answer", f"{type(exc).__name__} {exc}")
            return
        if resp.status_code != 201:
            rec.failure = failure_reason(f"refused ({resp.status_code})", _error_text(resp))
            return
        try:
            rec.task_id = bytes.fromhex(resp.json()["task_id"])
        except (ValueError, KeyError, TypeError) as exc:  # accepted, but we cannot tell which task it is
            rec.failure = failure_reason("submit: unreadable answer", repr(exc))

    async def _follow(self, rec: TaskRecord) -> None:
        """Wait for the result with long polls (``GET /tasks/{id}/result?wait=...``): one request per task while
        it runs, instead of polling its view. The view of a task with its result in hand (its timings) is read
        after the run (:meth:`_read_views_of_delivered`), outside the measured span: a user awaiting results
        would not ask for it, and it was one of three requests per task on the client node's API."""
        import trio

        result_path = f"/tasks/{rec.task_id.hex()}/result?wait={LONG_POLL_S:g}"  # type: ignore[union-attr]
        while True:
            if rec.paid_at is not None and self._now() >= self._late_deadline:
                rec.failure = failure_reason("paid, but no result at the client node",
                                             rec.view.detail if rec.view is not None else "")
                return
            resp = await self._get(rec.node, result_path, timeout=LONG_POLL_S + 15.0)
            if resp is None or resp.status_code >= 500:
                self.poll_errors += resp is not None
                await trio.sleep(self.config.poll)
                continue
            if resp.status_code == 404:
                rec.lost = failure_reason("forgotten by the node (404)", _error_text(resp))
                return
            if resp.status_code == 200:
                self._check_result(rec, resp.content, self._now())
                return
            if resp.status_code != 409:
                rec.failure = failure_reason(f"GET {result_path} answered {resp.status_code}", _error_text(resp))
                return
            # not there: the poll ran out, or the task ended without a result -- its view says which
            if not await self._read_view(rec) or rec.view is None:
                continue
            view = rec.view
            if view.stage == "settled" and view.outcome not in (None, "paid"):
                rec.failure = failure_reason(view.outcome, view.detail)
                return
            if view.stage == "settled" and rec.paid_at is None:  # paid, the result late: free its place in flight
                rec.paid_at = self._now()
                self._changed.set()
                await trio.sleep(max(self.config.poll, LATE_POLL_S))

    async def _read_views_of_delivered(self) -> None:
        """After the run: the views (timings, final stage) of the tasks whose result came with no view read."""
        import trio

        limiter = trio.CapacityLimiter(CONNECTIONS_PER_NODE)

        async def one(rec: TaskRecord) -> None:
            async with limiter:
                await self._read_view(rec)

        async with trio.open_nursery() as nursery:
            for rec in self.records:
                if rec.delivered and rec.view is None:
                    nursery.start_soon(one, rec)

    async def _read_view(self, rec: TaskRecord) -> bool:
        """Read the task's view (timings, stage, outcome) into ``rec``; False if no usable answer came."""
        resp = await self._get(rec.node, f"/tasks/{rec.task_id.hex()}")  # type: ignore[union-attr]
        if resp is None or resp.status_code != 200:
            self.poll_errors += 1
            return False
        try:
            rec.view = TaskView.from_json(resp.json())
        except (BadRequest, ValueError):
            self.poll_errors += 1
            return False
        return True

    async def _check_done(self, rec: TaskRecord) -> bool:
        """After a fresh view: fetch and check the result once there is one; True when the task is finished."""
        view = rec.view
        if view.stage not in RESULT_STAGES:
            return False
        if view.outcome not in (None, "paid"):
            rec.failure = failure_reason(view.outcome, view.detail)
            return True
        resp = await self._get(rec.node, f"/tasks/{view.task_id.hex()}/result", timeout=30.0)
        if resp is None:
            return False
        if resp.status_code >= 500:
            self.poll_errors += 1
            return False
        if resp.status_code == 200:
            at = self._now()
            self._check_result(rec, resp.content, at)
            return True
        if view.stage == "settled" and rec.paid_at is None:  # final outcome reached: free its place in flight
            rec.paid_at = self._now()
            self._changed.set()
        return False  # not held yet: poll again

    def _check_result(self, rec: TaskRecord, body: bytes, at: float) -> None:
        job = rec.job
        assert job is not None  # set by _submit before the task was sent
        try:
            wire = decode_result(body)
        except BadRequest as exc:
            rec.failure = failure_reason("undecodable result", exc.message)
            return
        if wire.task_id != rec.task_id:
            rec.failure = failure_reason("result of another task", wire.task_id.hex())
            return
        verdict = lookup("matmul", 1).verify(job.spec, job.inputs, dict(wire.outputs))
        if not verdict.ok:
            rec.failure = failure_reason("wrong result", verdict.reason)
            return
        rec.result_at, rec.max_error, rec.job = at, verdict.max_error, None

    async def _final_check(self, rec: TaskRecord) -> None:
        """At the timeout: one last look at a task still open; lost unless it has a result or an outcome now."""
        resp = await self._get(rec.node, f"/tasks/{rec.task_id.hex()}", timeout=5.0)  # type: ignore[union-attr]
        if resp is not None and resp.status_code == 200:
            try:
                rec.view = TaskView.from_json(resp.json())
            except (BadRequest, ValueError):
                self.poll_errors += 1  # judged on the last view we had
            else:
                if await self._check_done(rec):
                    return
        if rec.paid_at is not None:
            rec.failure = failure_reason("paid, but no result at the client node",
                                         rec.view.detail if rec.view is not None else "")
            return
        stage = rec.stage or "posted"
        rec.lost = f"no result nor final outcome by the timeout (last stage {stage})"

    # -- the whole run

    async def _pace(self, nursery: Any) -> None:
        import trio

        submitted = 0
        while submitted < self.config.tasks:
            in_flight = sum(r.in_flight for r in self.records)
            due = submissions_due(self.config, elapsed=self._now(), submitted=submitted, in_flight=in_flight)
            for _ in range(due):
                rec = self.records[submitted]
                rec.submitted_at = self._now()  # in flight from now; _submit sets the exact send time
                nursery.start_soon(self._run_task, rec)
                submitted += 1
            if submitted >= self.config.tasks:
                break
            self._changed = trio.Event()
            wake = next_due_at(self.config, submitted)
            with trio.move_on_at(self._t0 + wake if wake is not None else math.inf):
                await self._changed.wait()
        while any(r.in_flight for r in self.records):
            self._changed = trio.Event()
            await self._changed.wait()
        self._late_deadline = self._now() + LATE_RESULT_GRACE_S

    async def _report(self) -> None:
        import trio

        while True:
            self._report_now()
            await trio.sleep(self.progress_every)

    def _report_now(self) -> None:
        if self.on_progress is not None:
            self.on_progress(progress_of(self.records, self.config.tasks, self._now()))

    async def _probe_health(self) -> None:
        """``GET /health`` on every node every HEALTH_PROBE_S, timing each answer (the node must stay responsive)."""
        import trio

        async def one(rec: NodeRecord) -> None:
            start = trio.current_time()
            await self._get(rec.name, "/health", timeout=HEALTH_TIMEOUT_S)  # None (no answer) counts its timeout
            self.health_ms.append(round((trio.current_time() - start) * 1000, 1))

        while True:
            async with trio.open_nursery() as nursery:
                for rec in self._running_nodes():
                    nursery.start_soon(one, rec)
            await trio.sleep(HEALTH_PROBE_S)

    async def _sample_network(self) -> tuple[int | None, int | None, dict[str, float]]:
        """(gossip drops summed over the nodes, highest head, gossip messages handled by node) now; None for
        what no node answered (a node that did not answer is missing from the last)."""
        import trio

        drops: list[float] = []
        heights: list[int] = []
        handled: dict[str, float] = {}

        async def one(rec: NodeRecord) -> None:
            resp = await self._get(rec.name, "/metrics", timeout=5.0)
            if resp is not None and resp.status_code == 200:
                values = parse_metric_values(resp.text, (GOSSIP_DROPS_METRIC, "p2pgpu_chain_height",
                                                         *GOSSIP_HANDLED_METRICS))
                drops.append(values.get(GOSSIP_DROPS_METRIC, 0.0))
                handled[rec.name] = sum(values.get(m, 0.0) for m in GOSSIP_HANDLED_METRICS)
                if "p2pgpu_chain_height" in values:
                    heights.append(int(values["p2pgpu_chain_height"]))

        async with trio.open_nursery() as nursery:
            for rec in self._running_nodes():
                nursery.start_soon(one, rec)
        order = [n.name for n in self.manifest.nodes]
        return ((int(sum(drops)) if drops else None), (max(heights) if heights else None),
                {n: handled[n] for n in order if n in handled})

    async def _supply(self) -> tuple[dict[str, SupplyCheck], dict[str, str]]:
        """Each node's books, checked; and the nodes that gave no usable answer (why), which count neither way."""
        import trio

        out: dict[str, SupplyCheck] = {}
        unanswered: dict[str, str] = {}

        async def one(rec: NodeRecord) -> None:
            resp = await self._get(rec.name, "/ledger/supply", timeout=5.0)
            if resp is None or resp.status_code != 200:
                unanswered[rec.name] = "no answer" if resp is None else f"HTTP {resp.status_code}: {_error_text(resp)}"
                return
            try:
                out[rec.name] = supply_check(resp.json())
            except ValueError:
                unanswered[rec.name] = "an answer other than JSON"

        async with trio.open_nursery() as nursery:
            for rec in self._running_nodes():
                nursery.start_soon(one, rec)
        order = [n.name for n in self.manifest.nodes]
        return ({n: out[n] for n in order if n in out}, {n: unanswered[n] for n in order if n in unanswered})

    def _running_nodes(self) -> list[NodeRecord]:
        return [n for n in self.manifest.nodes if n.name in self.http]

    async def run(self) -> LoadSummary:
        import httpx
        import trio

        tls = ssl.create_default_context()  # loaded once and shared: each client would load the CA bundle again
        # every task in flight holds one connection with its long poll; the rest carry POSTs and views
        pool = CONNECTIONS_PER_NODE + (self.config.concurrency or OPEN_LOOP_IN_FLIGHT)
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool, keepalive_expiry=30.0)
        live = [n for n in self.manifest.nodes if n.api_url and n.pid is not None and pid_alive(n.pid, n.config)]
        for rec in live:
            self.http[rec.name] = httpx.AsyncClient(base_url=rec.api_url, verify=tls, limits=limits,
                                                    trust_env=False, timeout=10.0)
        try:
            drops_before, height_before, gossip_before = await self._sample_network()
            cpu_before, own_before = sample_cpu(live), _own_cpu_s()
            self._t0 = trio.current_time()
            deadline = self._t0 + self.config.timeout
            self._changed = trio.Event()
            async with trio.open_nursery() as outer:
                outer.start_soon(self._report)
                outer.start_soon(self._probe_health)
                with trio.move_on_at(deadline):
                    async with trio.open_nursery() as tasks:
                        await self._pace(tasks)
                open_tasks = [r for r in self.records if r.accepted and not r.finished]
                async with trio.open_nursery() as last:
                    for task in open_tasks:
                        last.start_soon(self._final_check, task)
                for task in self.records:  # POST /tasks still unanswered at the timeout: not known to be accepted
                    if task.submitted_at is not None and not task.accepted and task.failure is None:
                        task.failure = "submit: no answer by the timeout"
                ended = self._now()
                self._report_now()
                outer.cancel_scope.cancel()
            cpu_after, own_after = sample_cpu(live), _own_cpu_s()
            drops_after, height_after, gossip_after = await self._sample_network()
            supply, supply_unanswered = await self._supply()
            await self._read_views_of_delivered()
        finally:
            for client in self.http.values():
                await client.aclose()
        facts = RunFacts(started=0.0, ended=ended, cpu_before=cpu_before, cpu_after=cpu_after,
                         load_generator_cpu_s=round(own_after - own_before, 2), supply=supply,
                         supply_unanswered=supply_unanswered,
                         drops_before=drops_before, drops_after=drops_after, gossip_before=gossip_before,
                         gossip_after=gossip_after, height_before=height_before,
                         height_after=height_after, poll_errors=self.poll_errors, requests=self.requests,
                         health_ms=self.health_ms)
        return summarise(self.config, [c.name for c in self.clients], self.records, facts)


def _error_text(resp: Any) -> str:
    """``code: message`` of an API error answer, or the start of the body."""
    try:
        body = resp.json()
        return f"{body['error']}: {body['message']}"
    except (ValueError, KeyError, TypeError):
        return resp.text[:200].strip() or f"HTTP {resp.status_code}"


def run_load(manifest: Manifest, config: LoadConfig, *, clients: str | Sequence[NodeRecord] = "all",
             on_progress: ProgressFn | None = None, wait_ready: bool = True,
             progress: Callable[[str], None] | None = None, ready_timeout: float = 300.0) -> LoadSummary:
    """Check the devnet, wait for its providers (``wait_ready``), run the load and summarise it.

    Raises :class:`LoadArgumentError` / :class:`DevnetError` for what the
    user can fix (no such client, devnet not running, no provider ready).
    """
    import trio

    chosen = select_clients(manifest, clients) if isinstance(clients, str) else list(clients)
    if not chosen:
        raise LoadArgumentError("no client node to submit through")
    if wait_ready:
        wait_providers_ready(manifest, timeout=ready_timeout, progress=progress)
    run = LoadRun(manifest, config, chosen, on_progress=on_progress)
    return trio.run(run.run)
