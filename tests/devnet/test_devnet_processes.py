"""A real devnet: four validator processes on 127.0.0.1 finalize, survive a crash drill, and stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devnet.launcher import Manifest, pid_alive
from p2pgpu.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """The real entry point in a child process, so detached nodes outlive it as they would for a user."""
    env = dict(os.environ, COLUMNS="250")  # long tmp paths on one line
    return subprocess.run([sys.executable, "-m", "p2pgpu.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


@pytest.fixture
def devnet_dir(tmp_path: Path) -> Iterator[Path]:
    """The devnet directory; afterwards every node process it ever recorded is gone, whatever the test did."""
    root = tmp_path / "net"
    seen: set[int] = set()

    def remember() -> None:
        with contextlib.suppress(Exception):
            seen.update(n.pid for n in Manifest.load(root).nodes if n.pid is not None)

    yield root
    remember()
    with contextlib.suppress(Exception):
        main(["devnet", "down", "--dir", str(root), "--grace", "5"])
    for pid in seen:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def heights(m: Manifest) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for n in m.nodes:
        try:
            out[n.name] = httpx.get(n.api_url + "/ledger/head", timeout=2.0).json()["height"]
        except (httpx.HTTPError, ValueError, KeyError):
            out[n.name] = None
    return out


def wait_heights(m: Manifest, target: int, timeout: float = 60.0, names: tuple[str, ...] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        hs = heights(m)
        if all((hs[n] or 0) >= target for n in (names or hs)):
            return
        assert time.monotonic() < deadline, f"nodes did not reach height {target}: {hs}"
        time.sleep(0.2)


def block_hash(url: str, height: int) -> str:
    resp = httpx.get(f"{url}/ledger/blocks/{height}", timeout=5.0)
    assert resp.status_code == 200, resp.text
    return resp.json()["hash"]


def test_devnet_up_crash_restart_down(devnet_dir, capsys):
    up = cli("devnet", "up", "--detach", "--dir", str(devnet_dir), "--validators", "4", "--providers", "0",
             "--clients", "0", "--block-interval", "0.2", "--timeout", "90")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "4 nodes up" in up.stdout and str(devnet_dir / "devnet.json") in up.stdout

    m = Manifest.load(devnet_dir)
    assert [n.name for n in m.nodes] == ["v0", "v1", "v2", "v3"]
    pids = {n.name: n.pid for n in m.nodes}
    assert all(pid is not None and pid_alive(pid, n.config) for n, pid in zip(m.nodes, pids.values(), strict=True))
    assert all(n.api_url.startswith("http://127.0.0.1:") for n in m.nodes)
    assert all("/ip4/127.0.0.1/tcp/" in n.addrs[0] for n in m.nodes)

    wait_heights(m, 3)
    assert len({block_hash(n.api_url, 3) for n in m.nodes}) == 1

    again = cli("devnet", "up", "--detach", "--dir", str(devnet_dir))
    assert again.returncode == 2 and "already running" in again.stderr

    assert main(["devnet", "status", "--dir", str(devnet_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["alive"], s["pid"]) for s in status["nodes"]] == [(k, True, v) for k, v in pids.items()]
    assert all(s["health"] in ("ready", "syncing") and s["height"] >= 3 for s in status["nodes"])

    v1 = m.node("v1")
    assert main(["devnet", "kill", "v1", "--dir", str(devnet_dir)]) == 0
    assert not pid_alive(pids["v1"])
    assert Manifest.load(devnet_dir).node("v1").state == "killed"

    others = ("v0", "v2", "v3")
    before = max(h for n, h in heights(m).items() if n in others and h is not None)
    wait_heights(m, before + 2, names=others)  # three of four validators keep finalizing

    assert main(["devnet", "restart", "v1", "--dir", str(devnet_dir), "--timeout", "60"]) == 0
    assert "caught up" in capsys.readouterr().out
    m2 = Manifest.load(devnet_dir)
    new_v1 = m2.node("v1")
    assert new_v1.pid != pids["v1"] and pid_alive(new_v1.pid, new_v1.config)
    assert new_v1.api_url == v1.api_url  # pinned ports: it came back where its peers expect it
    target = max(h for h in heights(m2).values() if h is not None)
    wait_heights(m2, target)
    assert len({block_hash(n.api_url, target) for n in m2.nodes}) == 1

    live = [n.pid for n in m2.nodes]
    assert main(["devnet", "down", "--dir", str(devnet_dir)]) == 0
    assert all(not pid_alive(pid) for pid in live)
    assert all(n.pid is None for n in Manifest.load(devnet_dir).nodes)
    assert not any((n.data_dir / "node.json").exists() for n in m2.nodes)  # clean stops remove their run info
