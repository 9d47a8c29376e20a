"""Start-up mistakes end in one line naming the problem and the fix, an exit code of 2, and no traceback."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devnet.launcher import DevnetSpec, plan_devnet, write_devnet
from p2pgpu.config import load_config
from p2pgpu.preflight import PreflightError, check_ports, tcp_ports_of

REPO = Path(__file__).resolve().parents[2]


def test_listen_addresses_with_fixed_ports_are_checked() -> None:
    assert tcp_ports_of(["/ip4/127.0.0.1/tcp/4001", "/ip4/0.0.0.0/tcp/0", "/ip6/::1/tcp/5"]) == [
        ("127.0.0.1", 4001), ("::1", 5)]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(PreflightError, match=rf"p2p port 127.0.0.1:{port} is already in use.*listen_addrs"):
            check_ports([f"/ip4/127.0.0.1/tcp/{port}"], None, None)
        with pytest.raises(PreflightError, match=rf"API port 127.0.0.1:{port} is already in use.*api.port"):
            check_ports([], "127.0.0.1", port)
    check_ports([f"/ip4/127.0.0.1/tcp/{port}"], "127.0.0.1", port)  # free again


def test_a_port_left_in_time_wait_by_a_killed_node_is_free() -> None:
    """A restart right after kill -9 must not be refused: the dead node's connections linger in TIME_WAIT."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        dialer = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the listening side closes first: its end of the connection enters TIME_WAIT
        dialer.recv(1)
        dialer.close()
    time.sleep(0.1)
    check_ports([f"/ip4/127.0.0.1/tcp/{port}"], "127.0.0.1", port)


def _ports_outside_the_ephemeral_range() -> int:
    """A base port whose pair (p2p, API) is free now and below the kernel's ephemeral range.

    A port the kernel picked (bind to 0) lies inside that range, so its neighbour, the API port, could be taken
    by any outgoing connection on this busy machine before the node starts (CI saw exactly that).
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, max(20002, min(low, 65000)) - 2, 2)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
        except OSError:
            continue
        return base
    raise RuntimeError("no free pair of ports below the ephemeral range")


@pytest.fixture
def node_config_path(tmp_path: Path) -> Path:
    """A fresh one-validator devnet with fixed ports per test (the devnet's default, 0, is never "taken")."""
    root = tmp_path / "net"
    plan = plan_devnet(DevnetSpec(validators=1, providers=0, clients=0, base_port=_ports_outside_the_ephemeral_range()),
                       master_seed=b"preflight", genesis_time_ms=int(time.time() * 1000))
    write_devnet(plan, root, scrypt_n=2**14)
    return root / "nodes" / "v0" / "config.toml"


def _run(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2pgpu.cli", "node", "run", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=dict(os.environ))


def _one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, no traceback, and the last stderr line is the error (log lines may come before it)."""
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("p2pgpu: error: "), out.stderr
    return last


def test_a_taken_p2p_port_is_one_line(node_config_path: Path) -> None:
    host, port = tcp_ports_of(load_config(node_config_path).network.listen_addrs)[0]
    with socket.socket() as held:
        held.bind((host, port))
        held.listen()
        out = _run(node_config_path)
    assert out.returncode == 2, out.stderr
    assert "p2p port" in out.stderr and "already in use" in out.stderr and "Traceback" not in out.stderr


def test_a_taken_api_port_is_one_line(node_config_path: Path) -> None:
    cfg = load_config(node_config_path)
    assert cfg.api.enabled and cfg.api.port
    with socket.socket() as held:
        held.bind((cfg.api.host, cfg.api.port))
        held.listen()
        out = _run(node_config_path)
    line = _one_error_line(out)
    assert f"API port {cfg.api.host}:{cfg.api.port} is already in use" in line and "api.port" in line


def test_debug_shows_the_traceback_of_a_preflight_failure(node_config_path: Path) -> None:
    """``--debug`` was ignored on this path: the traceback it promises, then the same one-line error."""
    host, port = tcp_ports_of(load_config(node_config_path).network.listen_addrs)[0]
    with socket.socket() as held:
        held.bind((host, port))
        held.listen()
        out = _run(node_config_path, "--debug")
    assert out.returncode == 2, out.stderr
    assert "Traceback" in out.stderr and "PreflightError" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"p2pgpu: error: p2p port {host}:{port} is already in use")


def test_a_data_directory_held_by_another_node_is_one_line(node_config_path: Path) -> None:
    cfg = load_config(node_config_path)
    chain_dir = Path(cfg.data_dir) / "chain"
    chain_dir.mkdir(parents=True, exist_ok=True)
    with open(chain_dir / "LOCK", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = _run(node_config_path)
        debug = _run(node_config_path, "--debug")
    assert "locked by another process" in _one_error_line(out)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "StoreLocked" in debug.stderr, debug.stderr
    assert "locked by another process" in debug.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_data_directory_of_another_chain_is_one_line(tmp_path: Path) -> None:
    """A node run once (its data directory now records its chain), then started with another genesis.json."""
    from ledger.genesis import save_genesis

    root = tmp_path / "net"
    spec = DevnetSpec(validators=1, providers=0, clients=0)  # ports 0: nothing here can collide
    plan = plan_devnet(spec, master_seed=b"preflight-chain", genesis_time_ms=1_700_000_000_000)
    write_devnet(plan, root, scrypt_n=2**14)
    config = root / "nodes" / "v0" / "config.toml"
    data_dir = Path(load_config(config).data_dir)
    proc = subprocess.Popen([sys.executable, "-m", "p2pgpu.cli", "node", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ))
    try:
        deadline = time.monotonic() + 120
        while not (data_dir / "node.json").exists():  # written once the node is up
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the node did not come up"
            time.sleep(0.1)
        json.loads((data_dir / "node.json").read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    other = plan_devnet(spec, master_seed=b"preflight-chain", genesis_time_ms=1_700_000_000_001).genesis
    assert other.chain_id() != plan.genesis.chain_id()
    save_genesis(root / "genesis.json", other)
    line = _one_error_line(_run(config))
    assert f"data directory {data_dir}" in line and "holds chain" in line, line
    assert "use another data dir or the matching genesis" in line, line


def test_a_remote_api_without_tokens_refuses_to_start_in_one_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Checked when the config loads, before keys are unlocked or anything binds (so 0.0.0.0 is never bound)."""
    from p2pgpu.cli import main

    for name in ("node.json", "genesis.json"):
        (tmp_path / name).write_text("{}")
    config = tmp_path / "node.toml"
    config.write_text('keystore = "node.json"\ngenesis = "genesis.json"\nroles = ["client"]\n\n'
                      '[api]\nhost = "0.0.0.0"\nallow_remote = true\n')
    assert main(["node", "run", "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"p2pgpu: error: {config}: api.tokens: the API on '0.0.0.0' would answer anyone")
    assert "p2pgpu api token new --name NAME --scopes read,submit --spend-per-hour N" in line
