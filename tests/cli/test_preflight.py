"""Start-up mistakes end in one line naming the problem and the fix, an exit code of 2, and no traceback."""

from __future__ import annotations

import fcntl
import os
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


@pytest.fixture(scope="module")
def node_config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("preflight") / "net"
    with socket.socket() as probe:  # a fixed port for the node (the devnet's default, 0, is never "taken")
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
    plan = plan_devnet(DevnetSpec(validators=1, providers=0, clients=0, base_port=min(base, 65000)),
                       master_seed=b"preflight", genesis_time_ms=int(time.time() * 1000))
    write_devnet(plan, root, scrypt_n=2**14)
    return root / "nodes" / "v0" / "config.toml"


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2pgpu.cli", "node", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=dict(os.environ))


def test_a_taken_p2p_port_is_one_line(node_config_path: Path) -> None:
    host, port = tcp_ports_of(load_config(node_config_path).network.listen_addrs)[0]
    with socket.socket() as held:
        held.bind((host, port))
        held.listen()
        out = _run(node_config_path)
    assert out.returncode == 2, out.stderr
    assert "p2p port" in out.stderr and "already in use" in out.stderr and "Traceback" not in out.stderr


def test_a_data_directory_held_by_another_node_is_one_line(node_config_path: Path) -> None:
    cfg = load_config(node_config_path)
    chain_dir = Path(cfg.data_dir) / "chain"
    chain_dir.mkdir(parents=True, exist_ok=True)
    with open(chain_dir / "LOCK", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = _run(node_config_path)
    assert out.returncode == 2, out.stderr
    assert "locked by another process" in out.stderr and "Traceback" not in out.stderr


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
