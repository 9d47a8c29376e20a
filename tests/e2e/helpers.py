"""Polling helpers for tests that watch node processes through their HTTP API.

Waiting on another process has no event to wait on, so these poll, always
with a deadline, and fail with what they last saw.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import httpx
import numpy as np

from devnet.launcher import Devnet, NodeRecord, pid_alive
from kernels.spec import make_spec
from p2pgpu.api.client import ApiClient
from p2pgpu.api.types import SubmitRequest, TaskView

T = TypeVar("T")


def wait_until(probe: Callable[[], T], *, timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` s naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except (httpx.HTTPError, OSError) as exc:  # a node busy or restarting: try again
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s (last seen: {last!r})")
        time.sleep(interval)


def live(devnet: Devnet) -> list[NodeRecord]:
    return [n for n in devnet.manifest.nodes if n.pid is not None and pid_alive(n.pid, n.config) and n.api_url]


def get_json(rec: NodeRecord, path: str) -> Any:
    resp = httpx.get(rec.api_url + path, timeout=5.0)
    resp.raise_for_status()
    return resp.json()


def height(rec: NodeRecord) -> int:
    return int(get_json(rec, "/ledger/head")["height"])


def on_every_node(recs: Sequence[NodeRecord], since: int, read: Callable[[NodeRecord], T], *,
                  timeout: float = 90.0) -> dict[str, T]:
    """``read`` on each node once its head has reached height ``since``, and the block at ``since`` everywhere.

    Nodes that provide or observe can trail the validators by several blocks
    on a loaded machine, so "all at one height at one moment" may never
    happen; instead every node is read once it has committed ``since``, and
    the test checks that every node holds the same block there (hence the
    same state) and reports the same values.
    """
    out: dict[str, T] = {}
    hashes: dict[str, str] = {}
    for rec in recs:
        wait_until(lambda r=rec: height(r) >= since, timeout=timeout, what=f"{rec.name} reached height {since}")
        out[rec.name] = read(rec)
        hashes[rec.name] = get_json(rec, f"/ledger/blocks/{since}")["hash"]
    assert len(set(hashes.values())) == 1, f"nodes disagree on block {since}: {hashes}"
    return out


def account(rec: NodeRecord, address: str) -> dict[str, int]:
    body = get_json(rec, f"/ledger/accounts/{address}")
    return {"balance": int(body["balance"]), "nonce": int(body["nonce"])}


def provider_record(rec: NodeRecord, address: str) -> dict[str, int]:
    for p in get_json(rec, "/ledger/providers")["providers"]:
        if p["address"] == address:
            return {k: int(p[k]) for k in ("bond", "completed", "failed", "missed")}
    raise AssertionError(f"{rec.name} has no provider {address}")


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of one metric in Prometheus text, keyed by its sorted labels."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, labels = head.partition("{")
        if metric != name:
            continue
        pairs = []
        for part in labels.rstrip("}").split(","):
            if "=" in part:
                k, _, v = part.partition("=")
                pairs.append((k.strip(), v.strip().strip('"')))
        out[tuple(sorted(pairs))] = float(value)
    return out


def metrics(rec: NodeRecord) -> str:
    resp = httpx.get(rec.api_url + "/metrics", timeout=5.0)
    resp.raise_for_status()
    return resp.text


def matmul_job(n: int, *, seed: int, seconds: float = 10.0) -> tuple[Any, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    inputs = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    spec = make_spec("matmul", 1, {}, inputs, device="cpu", memory_bytes=64 << 20, seconds=seconds,
                     output_bytes=max(1 << 20, 8 * n * n))
    return spec, inputs


def submit(client: NodeRecord, spec: Any, inputs: Mapping[str, np.ndarray], *, max_unit_price: int,
           audit_rate_bps: int, bid_window: int = 20) -> bytes:
    with ApiClient(client.api_url, timeout=30.0) as api:
        return api.submit(SubmitRequest(spec=spec, inputs=inputs, max_unit_price=max_unit_price,
                                        bid_window=bid_window, audit_rate_bps=audit_rate_bps))


def task_view(client: NodeRecord, task_id: bytes) -> TaskView:
    with ApiClient(client.api_url, timeout=10.0) as api:
        return api.task(task_id)


def wait_settled(client: NodeRecord, task_id: bytes, *, timeout: float) -> TaskView:
    """The task's view once settled; on timeout the failure shows the stage, timings and detail it reached."""
    seen: list[TaskView] = []

    def settled() -> TaskView | None:
        view = task_view(client, task_id)
        seen[:] = [view]
        return view if view.stage == "settled" else None

    try:
        return wait_until(settled, timeout=timeout, what=f"task {task_id.hex()[:16]} settled", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last view: {seen[0] if seen else None}") from None


def task_result(client: NodeRecord, task_id: bytes) -> dict[str, np.ndarray]:
    with ApiClient(client.api_url, timeout=30.0) as api:
        return api.task_result(task_id)


def stream_claims(rec: NodeRecord, task_id: bytes, first: int, last: int) -> list[tuple[str, int]]:
    """(sender, units) of each StreamClaim for ``task_id`` in blocks ``first..last`` of ``rec``'s chain, in order.

    Read from the blocks themselves, not from a task view: the claims are
    what the ledger paid by, and their order shows the receipt cadence.
    """
    out: list[tuple[str, int]] = []
    for h in range(first, last + 1):
        for stx in get_json(rec, f"/ledger/blocks/{h}")["transactions"]:
            body = stx["body"]
            if body.get("type") == "StreamClaim" and body["receipt"]["receipt"]["task_id"] == task_id.hex():
                out.append((body["sender"], int(body["receipt"]["receipt"]["units"])))
    return out


STREAM_COUNTERS = ("p2pgpu_stream_sessions_opened_total", "p2pgpu_stream_sessions_closed_total",
                   "p2pgpu_stream_items_total", "p2pgpu_stream_receipts_total", "p2pgpu_stream_claims_total",
                   "p2pgpu_stream_rejected_total")


def stream_counters(rec: NodeRecord) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The ``/p2pgpu/stream/1`` counters on ``rec``'s /metrics page (what an operator scrapes), by (metric, labels)."""
    text = metrics(rec)
    return {(name, labels): value for name in STREAM_COUNTERS for labels, value in metric_samples(text, name).items()}


def counted(before: Mapping[tuple[str, tuple[tuple[str, str], ...]], float],
            after: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """How much one counter sample grew between two :func:`stream_counters` reads (an absent sample is 0)."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def run_cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``p2pgpu ARGS`` as a user would, in its own process, with this interpreter and environment.

    ``python -m p2pgpu.cli`` is what the devnet runs its nodes with, so the
    CLI runs the same code as the nodes it talks to.
    """
    return subprocess.run([sys.executable, "-m", "p2pgpu.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
