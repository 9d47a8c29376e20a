"""Market benchmark: a batch of matmul tasks through a local devnet of real node processes.

Figures (the last line of output is one JSON object):
  time_to_assignment_ms_p50 / _p99 -- from the client's ``posted`` stage
      (the API accepted the task) to ``assigned`` (a finalized block holds
      the Assign), read from each task's ``GET /tasks/{id}`` timings.
      Goal: p50 <= 1000 ms, p99 <= 3000 ms.
  finality_ms_p50 -- median interval between consecutive finalized blocks,
      from the headers' timestamps over the run (``finality_ms_p50_observed``:
      the same seen by polling ``/ledger/head``, which adds the poll period).
  gossip_drops -- sum of ``p2pgpu_gossip_dropped_total`` over all nodes (goal 0).
  tasks_settled_per_s -- tasks over the time from the first submission to the last settlement.
  overhead_ratio_vs_local -- wall time until the client holds every
      (hash-checked) result, divided by the wall time of the same kernels run
      one after another on a warm local :class:`kernels.runtime.KernelRuntime`
      in this process (measured after the devnet is stopped, so the two do not
      share the CPU).

Scheduling: the benchmark measures one task at a time through the market
(single-task latency): it keeps one auction open at a time and no more tasks
running than there are providers (``provider_max_concurrent_jobs`` 1).
Concurrent load is ``bench/load.py``'s.

Start-up (node processes, TensorFlow in each provider's worker, the local
runtime's own TensorFlow) is excluded from every figure and reported as
``devnet_start_s`` and ``providers_ready_s``. It is most of a ``--quick``
run (4 tasks instead of 16), so it overlaps as much as it can: providers
spawn their kernel workers before joining the network, this process warms
the local runtime while the devnet starts, kernel workers exit without
TensorFlow's slow teardown, and every poll reuses one HTTP client (a new
``httpx`` client costs ~65 ms of CPU). On an otherwise idle 2-core machine
``--quick`` is meant to finish within 60 s; on a loaded one start-up
stretches with the load (the JSON says how long each phase took).

Usage: python bench/market.py [--quick] [--block-interval S] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # keep bench/ from shadowing packages
sys.path.insert(0, os.path.dirname(_HERE))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from devnet.demo import wait_providers_ready  # noqa: E402
from devnet.launcher import Devnet, DevnetSpec, plan_devnet, write_devnet  # noqa: E402
from devnet.monitor import parse_metric_values  # noqa: E402
from kernels.spec import make_spec  # noqa: E402
from ledger.params import Params  # noqa: E402
from p2pgpu.api.client import ApiClient  # noqa: E402
from p2pgpu.api.types import NotReady, SubmitRequest, TaskView  # noqa: E402
from p2pgpu.config import ClientConfig, ProviderConfig  # noqa: E402

RUNNING = frozenset({"assigned", "running"})
AUCTION = frozenset({"posted", "bids"})
DONE = frozenset({"delivered", "settled"})


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def make_jobs(count: int, n: int) -> list[tuple[Any, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    jobs = []
    for _ in range(count):
        inputs = {"a": rng.standard_normal((n, n), dtype=np.float32),
                  "b": rng.standard_normal((n, n), dtype=np.float32)}
        jobs.append((make_spec("matmul", 1, {}, inputs, device="cpu", memory_bytes=256 << 20, seconds=30.0,
                               output_bytes=8 * n * n), inputs))
    return jobs


def stage_ms(view: TaskView, a: str, b: str) -> float | None:
    t = {stage: st.time_ms for stage, st in view.timings}
    return float(t[b] - t[a]) if a in t and b in t else None


def stage_breakdown(views: list[TaskView]) -> dict[str, Any]:
    """Median milliseconds and blocks between consecutive stages: where the time to assignment goes."""
    order = ("posted", "bids", "assigned", "running", "delivered", "settled")
    out: dict[str, Any] = {}
    for a, b in zip(order, order[1:]):
        ms, blocks = [], []
        for view in views:
            t = dict(view.timings)
            if a in t and b in t:
                ms.append(t[b].time_ms - t[a].time_ms)
                blocks.append(t[b].height - t[a].height)
        if ms:
            out[f"{a}_to_{b}"] = {"ms_p50": statistics.median(ms), "blocks_p50": statistics.median(blocks)}
    return out


def run_batch(devnet: Devnet, http: httpx.Client, jobs: list, providers: int, timeout: float) -> dict[str, Any]:
    client = next(n for n in devnet.manifest.nodes if "client" in n.roles)
    v0 = devnet.manifest.nodes[0]
    ids: list[bytes] = []
    views: dict[bytes, TaskView] = {}
    done_at: dict[bytes, float] = {}
    settled_at: dict[bytes, float] = {}
    head_changes: list[float] = []
    last_height = None
    start_height = int(http.get(v0.api_url + "/ledger/head").json()["height"])
    with ApiClient(client.api_url, timeout=30.0) as api:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while len(settled_at) < len(jobs) and time.monotonic() < deadline:
            for tid in ids:
                if tid not in settled_at:
                    views[tid] = api.task(tid)
                    stage = views[tid].stage
                    if stage in DONE and tid not in done_at:
                        done_at[tid] = time.monotonic()
                    if stage == "settled":
                        settled_at[tid] = time.monotonic()
            open_auction = any(views[t].stage in AUCTION for t in ids)
            running = sum(1 for t in ids if views[t].stage in RUNNING)
            if len(ids) < len(jobs) and not open_auction and running < providers:
                spec, inputs = jobs[len(ids)]
                tid = api.submit(SubmitRequest(spec=spec, inputs=inputs, max_unit_price=1_000, bid_window=20,
                                               audit_rate_bps=0))
                ids.append(tid)
                views[tid] = api.task(tid)
            h = int(http.get(v0.api_url + "/ledger/head").json()["height"])
            if h != last_height:
                head_changes.append(time.monotonic())
                last_height = h
            time.sleep(0.05)
        end_height = int(http.get(v0.api_url + "/ledger/head").json()["height"])
        results_ok = 0
        for (spec, inputs), tid in zip(jobs, ids, strict=False):
            if views[tid].outcome == "paid":
                try:
                    out = api.task_result(tid)["c"]
                except NotReady:  # paid, but the client does not hold the result: not a matching result
                    continue
                ref = inputs["a"].astype(np.float64) @ inputs["b"].astype(np.float64)
                results_ok += bool(np.allclose(out, ref, rtol=1e-3, atol=1e-3))
    stamps = []
    for h in range(max(1, start_height), end_height + 1):
        stamps.append(int(http.get(f"{v0.api_url}/ledger/blocks/{h}").json()["header"]["timestamp_ms"]))
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    observed = [1000 * (b - a) for a, b in zip(head_changes, head_changes[1:])]
    assign = [x for x in (stage_ms(views[t], "posted", "assigned") for t in ids) if x is not None]
    drops = 0.0
    for rec in devnet.manifest.nodes:
        text = http.get(rec.api_url + "/metrics").text
        drops += parse_metric_values(text, ("p2pgpu_gossip_dropped_total",)).get("p2pgpu_gossip_dropped_total", 0.0)
    outcomes: dict[str, int] = {}
    for t in ids:
        key = views[t].outcome or views[t].stage
        outcomes[key] = outcomes.get(key, 0) + 1
    return {
        "tasks": len(jobs), "submitted": len(ids), "outcomes": outcomes, "results_match_numpy": results_ok,
        "time_to_assignment_ms_p50": percentile(assign, 50), "time_to_assignment_ms_p99": percentile(assign, 99),
        "time_to_assignment_ms_each": sorted(assign),
        "finality_ms_p50": statistics.median(intervals) if intervals else None,
        "finality_ms_p50_observed": round(statistics.median(observed), 1) if observed else None,
        "blocks": end_height - start_height,
        "gossip_drops": int(drops),
        "stages": stage_breakdown([views[t] for t in ids]),
        "network_results_s": round(max(done_at.values()) - t0, 3) if len(done_at) == len(jobs) else None,
        "network_settled_s": round(max(settled_at.values()) - t0, 3) if len(settled_at) == len(jobs) else None,
    }


def heights(devnet: Devnet, http: httpx.Client) -> dict[str, int]:
    return {rec.name: int(http.get(rec.api_url + "/ledger/head").json()["height"])
            for rec in devnet.manifest.nodes}


def wait_caught_up(devnet: Devnet, http: httpx.Client, timeout: float) -> int:
    """Wait until no node trails the highest by more than one block; returns the largest lag seen at first.

    Providers starved of CPU while TensorFlow loads fall behind the
    validators and catch up over the following minute; a batch started
    before that measures the backlog, not the market.
    """
    first = heights(devnet, http)
    worst = max(first.values()) - min(first.values())
    deadline = time.monotonic() + timeout
    while True:
        hs = heights(devnet, http)
        if max(hs.values()) - min(hs.values()) <= 1 or time.monotonic() > deadline:
            return worst
        time.sleep(0.5)


class LocalBaseline:
    """The same kernels, one after another, on a warm runtime in this process (TensorFlow in one worker).

    The worker is spawned and warmed (TensorFlow imported, the kernel traced,
    the arena sized by one untimed run) in a thread while the devnet starts,
    so that start-up is not paid again after the network run; :meth:`measure`
    times the batch only once the devnet is stopped, so the two never share
    the CPU while either is measured.
    """

    def __init__(self, jobs: list) -> None:
        from kernels.runtime import KernelRuntime, RuntimeConfig

        self.jobs = jobs
        self.runtime = KernelRuntime(RuntimeConfig(workers=1, device="cpu"))
        self.runtime.start()  # the worker process begins importing TensorFlow now
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._warm, name="local-baseline-warmup", daemon=True)
        self._thread.start()

    def _warm(self) -> None:
        import trio

        async def warm() -> None:
            spec, inputs = self.jobs[0]
            await self.runtime.run(spec, inputs)

        try:
            trio.run(warm)
        except BaseException as exc:  # re-raised in the main thread by measure()
            self._error = exc

    def measure(self) -> float:
        """Seconds for every job on the warm runtime (waits for the warm-up if it is still going)."""
        import trio

        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"local baseline runtime failed to warm up: {self._error!r}") from self._error

        async def timed() -> float:
            t0 = time.perf_counter()
            for spec, inputs in self.jobs:
                await self.runtime.run(spec, inputs)
            return time.perf_counter() - t0

        return trio.run(timed)

    def close(self) -> None:
        self._thread.join()
        self.runtime.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 tasks instead of 16")
    ap.add_argument("--keep", type=Path, help="run the devnet in this (empty) directory and keep it afterwards")
    ap.add_argument("--block-interval", type=float, default=1.0,
                    help="seconds between blocks (default 1.0: on a loaded 2-core machine shorter intervals leave "
                         "providers trailing the chain)")
    args = ap.parse_args()
    count, n = (4, 512) if args.quick else (16, 512)
    shape = {"validators": 4, "providers": 2, "clients": 1, "block_interval": args.block_interval}
    # A 10-block challenge window: the client must fetch and check the result before it closes, or it disputes.
    params = Params(epoch_length=64, committee_size=4, challenge_window=10, audit_window=30, verifier_count=1)
    spec = DevnetSpec(**shape, params=params, log_level=os.environ.get("BENCH_LOG_LEVEL", "warning"),
                      provider_configs={f"p{i}": ProviderConfig(device="cpu") for i in range(shape["providers"])},
                      client_config=ClientConfig(enough_bids=1))
    jobs = make_jobs(count, n)
    local = LocalBaseline(jobs)  # warms up while the devnet starts; measured after it stops
    try:
        tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="p2pgpu-bench-market-")
        root = args.keep if args.keep else Path(tmp.name) / "devnet"  # type: ignore[union-attr]
        plan = plan_devnet(spec, master_seed=os.urandom(32), genesis_time_ms=int(time.time() * 1000))
        devnet = Devnet(write_devnet(plan, root, scrypt_n=2**14))
        seen: set[int] = set()
        t_start = time.monotonic()
        try:
            devnet.start_all(timeout=180)
            seen.update(p.pid for p in devnet.procs.values())
            devnet.wait_finalized(2, timeout=120)
            t_up = time.monotonic()
            wait_providers_ready(devnet.manifest, timeout=300)
            t_ready = time.monotonic()
            with httpx.Client(timeout=5) as http:  # one client: a new one per request costs ~65 ms of CPU
                lag = wait_caught_up(devnet, http, timeout=120)
                t_caught_up = time.monotonic()
                figures = run_batch(devnet, http, jobs, shape["providers"], timeout=600)
        finally:
            devnet.stop_all(grace=8.0)
            for pid in seen:  # kernel workers live in their node's process group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            if tmp is not None:
                tmp.cleanup()
        local_s = local.measure()
    finally:
        local.close()
    net_s = figures["network_results_s"]
    settled_s = figures["network_settled_s"]
    out = {
        "bench": "market",
        "quick": args.quick,
        "devnet": {**shape, "provider_max_concurrent_jobs": 1, "client_enough_bids": 1},
        "params": {"challenge_window": params.challenge_window, "audit_window": params.audit_window,
                   "verifier_count": params.verifier_count, "audit_rate_bps": 0, "bid_window": 20},
        "workload": f"{count} x matmul {n}x{n} float32",
        "devnet_start_s": round(t_up - t_start, 1),
        "providers_ready_s": round(t_ready - t_up, 1),
        "catch_up_s": round(t_caught_up - t_ready, 1),
        "max_lag_blocks_before_batch": lag,
        **figures,
        "tasks_settled_per_s": round(count / settled_s, 3) if settled_s else None,
        "local_runtime_s": round(local_s, 3),
        "overhead_ratio_vs_local": round(net_s / local_s, 1) if net_s else None,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
