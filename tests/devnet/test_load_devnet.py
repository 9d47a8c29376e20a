"""``p2pgpu devnet load`` against a real devnet: every task delivered and checked, none lost, supply conserved."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devnet.launcher import Devnet, DevnetSpec, plan_devnet, write_devnet
from p2pgpu.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture
def devnet(tmp_path: Path) -> Iterator[Devnet]:
    """The smallest devnet that runs the market (one node of each role); stopped, kernel workers too, whatever
    the test did."""
    spec = DevnetSpec(validators=1, providers=1, clients=1, block_interval=0.3, log_level="warning")
    plan = plan_devnet(spec, master_seed=os.urandom(32), genesis_time_ms=int(time.time() * 1000))
    net = Devnet(write_devnet(plan, tmp_path / "net", scrypt_n=2**4))
    try:
        net.start_all(timeout=150)
        yield net
    finally:
        pids = [p.pid for p in net.procs.values()]
        with contextlib.suppress(Exception):
            net.stop_all(grace=5.0)
        for pid in pids:  # a provider's kernel workers live in its process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def test_load_closed_loop_json(devnet, capsys):
    code = main(["devnet", "load", "--dir", str(devnet.root), "--concurrency", "4", "--tasks", "8", "--json",
                 "--timeout", "240"])
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # stdout is the one JSON object; progress went to stderr
    assert doc["delivered"] == 8, (doc["failed_by_reason"], doc["lost_by_reason"], captured.err[-2000:])
    assert doc["tasks_lost"] == 0 and doc["failed"] == 0 and doc["ok"] is True
    assert doc["supply_conserved"] is True
    assert doc["clients"] == ["c0"] and doc["concurrency"] == 4
    assert doc["time_to_result_ms_p50"] > 0 and doc["time_to_assignment_ms_p50"] is not None
    assert set(doc["cpu_seconds_by_node"]) == {"v0", "p0", "c0"}
    assert code == 0
