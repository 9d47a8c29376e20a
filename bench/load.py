"""Load benchmark: the market under concurrent load, on a fresh devnet of real node processes.

Starts 4 validators, 2 providers and 2 clients (``p2pgpu devnet up
--clients 2``'s shape and defaults), waits until the providers can bid and
every node has caught up, then runs the load generator (:mod:`devnet.load`,
called in-process) with 200 float32 matmuls of 64x64 (``--quick``: 100),
closed-loop with 32 in flight, spread over both clients. The last line of
output is one JSON object:

  tasks_delivered_per_s -- checked results in hand per second, from the
      first submission to the last result (goal >= 20).
  time_to_result_ms_p50 / _p99 -- from sending ``POST /tasks`` to the result
      in hand and checked against NumPy (goals <= 1500 / <= 5000 ms).
  time_to_assignment_ms_p50 / _p99 -- the client node's own ``posted ->
      assigned`` timings (a finalized block holds the Assign).
  tasks_lost -- accepted, but neither a final outcome nor a result by the
      timeout (goal 0); failed_by_reason -- the others not delivered.
  supply_conserved -- every node's ``GET /ledger/supply`` at the end,
      recomputed from its buckets (goal true).
  gossip_drops -- ``p2pgpu_gossip_dropped_total`` summed over all nodes at
      the end (as bench/market.py reports it; goal 0).
  health_ms_p99 / health_ms_max -- ``GET /health`` answered by every node,
      probed every second during the run (a node under load keeps answering
      within a second).
  cpu_seconds_by_node -- CPU each node (with a provider's kernel workers)
      used during the load run.
  overhead_ratio_vs_local -- the load run's delivery span divided by the
      time of the same matmuls run one after another on a warm local
      :class:`kernels.runtime.KernelRuntime` in this process (warmed while
      the devnet starts, timed after it is stopped, so the two never share
      the CPU); when not every task was delivered, the local time is scaled
      to the delivered ones (seconds per delivered task over local seconds
      per task).

Start-up (node processes, TensorFlow in each provider's worker) is
excluded from the figures and reported as ``devnet_start_s``,
``providers_ready_s`` and ``catch_up_s``; ``wall_s`` is the whole bench.
Every process it starts is stopped on the way out, also on Ctrl-C, SIGTERM
or an error (the nodes' process groups are killed, so kernel workers go too).

Usage: python bench/load.py [--quick] [--concurrency C] [--tasks N] [--block-interval S] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # keep bench/ from shadowing packages
sys.path.insert(0, os.path.dirname(_HERE))

import httpx  # noqa: E402

from bench.market import LocalBaseline, wait_caught_up  # noqa: E402
from devnet.demo import wait_providers_ready  # noqa: E402
from devnet.launcher import Devnet, DevnetSpec, plan_devnet, write_devnet  # noqa: E402
from devnet.load import LoadConfig, LoadProgress, load_progress_line, make_load_job, run_load  # noqa: E402

GOALS: dict[str, tuple[str, float | bool]] = {
    "tasks_delivered_per_s": (">=", 20.0),
    "time_to_result_ms_p50": ("<=", 1500.0),
    "time_to_result_ms_p99": ("<=", 5000.0),
    "tasks_lost": ("<=", 0),
    "supply_conserved": ("==", True),
    "gossip_drops": ("<=", 0),
}


def goals_met(figures: dict[str, Any],
              goals: dict[str, tuple[str, float | bool]] = GOALS) -> dict[str, bool | None]:
    """Each goal: met, missed, or None when the figure is missing (nothing delivered, no node answered)."""
    out: dict[str, bool | None] = {}
    for key, (op, goal) in goals.items():
        value = figures.get(key)
        if value is None:
            out[key] = None
        elif op == ">=":
            out[key] = value >= goal
        elif op == "<=":
            out[key] = value <= goal
        else:
            out[key] = value == goal
    return out


class Terminated(Exception):
    """SIGTERM: unwind through the ``finally`` blocks that stop the devnet, as Ctrl-C does."""


def on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _stderr_progress() -> Any:
    last = [0.0]

    def show(p: LoadProgress) -> None:
        if time.monotonic() - last[0] >= 5.0:
            last[0] = time.monotonic()
            print(load_progress_line(p), file=sys.stderr, flush=True)

    return show


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 tasks instead of 200")
    ap.add_argument("--tasks", type=int, help="tasks (default 200, --quick 100)")
    ap.add_argument("--concurrency", type=int, default=32, help="tasks kept in flight (default 32)")
    ap.add_argument("--size", type=int, default=64, help="matrix size (default 64)")
    ap.add_argument("--block-interval", type=float, default=0.5,
                    help="seconds between blocks (default 0.5, as 'p2pgpu devnet up')")
    ap.add_argument("--timeout", type=float, default=300.0, help="load run timeout in seconds (default 300)")
    ap.add_argument("--keep", type=Path, help="run the devnet in this (empty) directory and keep it afterwards")
    args = ap.parse_args()
    t_begin = time.monotonic()
    count = args.tasks or (100 if args.quick else 200)
    config = LoadConfig(tasks=count, concurrency=args.concurrency, size=args.size, timeout=args.timeout)
    shape = {"validators": 4, "providers": 2, "clients": 2, "block_interval": args.block_interval}
    spec = DevnetSpec(**shape, log_level=os.environ.get("BENCH_LOG_LEVEL", "warning"))
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    jobs = [make_load_job(i, config.size, config.seed) for i in range(count)]
    local = LocalBaseline([(job.spec, job.inputs) for job in jobs])  # warms up while the devnet starts
    tmp = None
    try:
        tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="p2pgpu-bench-load-")
        root = args.keep if args.keep else Path(tmp.name) / "devnet"  # type: ignore[union-attr]
        plan = plan_devnet(spec, master_seed=os.urandom(32), genesis_time_ms=int(time.time() * 1000))
        devnet = Devnet(write_devnet(plan, root, scrypt_n=2**14))
        t_start = time.monotonic()
        try:
            devnet.start_all(timeout=180)
            devnet.wait_finalized(2, timeout=120)
            t_up = time.monotonic()
            wait_providers_ready(devnet.manifest, timeout=300)
            t_ready = time.monotonic()
            with httpx.Client(timeout=5) as http:  # one client: a new one per request costs ~65 ms of CPU
                lag = wait_caught_up(devnet, http, timeout=120)
            t_caught_up = time.monotonic()
            summary = run_load(devnet.manifest, config, on_progress=_stderr_progress(), wait_ready=False)
            t_loaded = time.monotonic()
        finally:
            seen = {p.pid for p in devnet.procs.values()}  # every node spawned, even if start-up failed midway
            devnet.stop_all(grace=8.0)
            for pid in seen:  # kernel workers live in their node's process group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        t_stopped = time.monotonic()
        local_s = local.measure()
    finally:
        local.close()
        if tmp is not None:
            tmp.cleanup()
        signal.signal(signal.SIGTERM, previous)
    figures = summary.to_json()
    span = summary.delivery_span_s
    out = {
        "bench": "load",
        "quick": args.quick,
        "devnet": {**shape, "client_enough_bids": 3, "provider_slots": "default (kernels.probe.default_slots)"},
        "workload": config.describe(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "devnet_start_s": round(t_up - t_start, 1),
        "providers_ready_s": round(t_ready - t_up, 1),
        "catch_up_s": round(t_caught_up - t_ready, 1),
        "max_lag_blocks_before_load": lag,
        "load_run_s": round(t_loaded - t_caught_up, 1),
        "stop_s": round(t_stopped - t_loaded, 1),
        **figures,
        "local_runtime_s": round(local_s, 3),
        "overhead_ratio_vs_local": (round(span / (local_s * summary.delivered / count), 1)
                                    if span and summary.delivered else None),
        "wall_s": round(time.monotonic() - t_begin, 1),
    }
    out["goals_met"] = goals_met(out)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, Terminated):
        print("interrupted: every process this bench started was stopped", file=sys.stderr)
        sys.exit(130)
