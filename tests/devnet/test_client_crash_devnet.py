"""A real devnet whose client process is killed with SIGKILL mid-task: after restart it has its tasks and results.

Measures ``client_recovery_s``: from ``devnet restart c0`` until every task
the client had submitted answers ``GET /tasks/{id}/result`` with its
result again (:func:`measure_client_recovery`, reusable by a bench script).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest

from devnet.demo import wait_providers_ready
from devnet.launcher import Manifest
from p2pgpu.api.client import ApiClient
from p2pgpu.api.types import SubmitRequest, decode_result
from p2pgpu.cli import main
from tests.e2e.helpers import matmul_job, metric_samples, wait_until

from .test_devnet_processes import REPO, cli

pytestmark = pytest.mark.slow


def measure_client_recovery(api_url: str, task_ids: Sequence[bytes], *, started: float, timeout: float = 180.0,
                            ) -> tuple[float, dict[bytes, dict[str, np.ndarray]]]:
    """Seconds from ``started`` (a ``time.monotonic()`` taken when the client was restarted) until every task
    in ``task_ids`` answers with its result, and the results. Fails naming the tasks still missing."""
    results: dict[bytes, dict[str, np.ndarray]] = {}

    def all_back() -> bool:
        for t in task_ids:
            if t in results:
                continue
            resp = httpx.get(f"{api_url}/tasks/{t.hex()}/result", timeout=5.0)
            if resp.status_code == 200:
                results[t] = dict(decode_result(resp.content).outputs)
            else:
                assert resp.status_code in (409, 503), f"task {t.hex()[:16]}: {resp.status_code} {resp.text}"
        return len(results) == len(task_ids)

    wait_until(all_back, timeout=timeout, what=f"results of {len(task_ids)} task(s) back after the restart",
               interval=0.05)
    return time.monotonic() - started, results


@pytest.fixture
def devnet_dir(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "net"
    seen: set[int] = set()
    yield root
    with contextlib.suppress(Exception):
        seen.update(n.pid for n in Manifest.load(root).nodes if n.pid is not None)
    with contextlib.suppress(Exception):
        main(["devnet", "down", "--dir", str(root), "--grace", "5"])
    for pid in seen:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def test_a_client_killed_mid_task_returns_its_tasks_and_results_after_restart(devnet_dir, capsys, monkeypatch):
    # node processes run in the devnet directory: without this they would import the installed p2pgpu,
    # not the code under test
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
    up = cli("devnet", "up", "--detach", "--dir", str(devnet_dir), "--validators", "4", "--providers", "1",
             "--clients", "1", "--block-interval", "0.3", "--timeout", "150", timeout=240)
    assert up.returncode == 0, up.stdout + up.stderr
    m = Manifest.load(devnet_dir)
    wait_providers_ready(m, timeout=240)
    c0 = m.node("c0")
    jobs = [matmul_job(32, seed=s) for s in (1, 2)]
    with ApiClient(c0.api_url, timeout=30.0) as api:
        task_ids = [api.submit(SubmitRequest(spec=spec, inputs=inputs, max_unit_price=100_000, bid_window=20,
                                             audit_rate_bps=0)) for spec, inputs in jobs]

        def provider_asked_for_inputs() -> bool:
            return all(api.task(t).stage in ("running", "delivered", "settled") for t in task_ids)

        wait_until(provider_asked_for_inputs, timeout=120, what="the provider fetching both tasks' inputs",
                   interval=0.05)
    time.sleep(0.3)  # the fetch itself (a few KiB) finishes: the provider gives up on inputs after a few blocks

    assert main(["devnet", "kill", "c0", "--dir", str(devnet_dir)]) == 0  # SIGKILL: no shutdown of any kind
    capsys.readouterr()
    time.sleep(3.0)  # the tasks run, are committed and (challenge window: 10 blocks) may settle meanwhile

    restarted = time.monotonic()
    assert main(["devnet", "restart", "c0", "--dir", str(devnet_dir), "--no-wait"]) == 0
    c0 = Manifest.load(devnet_dir).node("c0")
    client_recovery_s, results = measure_client_recovery(c0.api_url, task_ids, started=restarted)
    for (spec, inputs), t in zip(jobs, task_ids):
        np.testing.assert_allclose(results[t]["c"], inputs["a"] @ inputs["b"], rtol=1e-4, atol=1e-4)
    samples = metric_samples(httpx.get(c0.api_url + "/metrics", timeout=5.0).text, "p2pgpu_client_recovery_seconds")
    journal_s = next(iter(samples.values()))
    with capsys.disabled():
        print(f"\nclient_recovery_s={client_recovery_s:.2f} (process restart to every result back; "
              f"journal reload {journal_s * 1000:.1f} ms)")
    with ApiClient(c0.api_url, timeout=30.0) as api:
        views = {t: wait_until(lambda t=t: (v := api.task(t)).stage == "settled" and v, timeout=120,
                               what=f"task {t.hex()[:16]} settled") for t in task_ids}
    assert all(v.outcome == "paid" for v in views.values()), views
