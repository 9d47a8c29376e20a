"""``p2pgpu devnet`` on bad input, and process stopping, with stand-in processes instead of nodes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devnet.launcher import Devnet, DevnetSpec, Manifest, pid_alive, plan_devnet, stop_pids, write_devnet
from p2pgpu.cli import main

SLEEPER = "import time\nwhile True: time.sleep(0.1)"
STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n" \
           "while True: time.sleep(0.1)"


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def spawn(procs: list, code: str, *extra: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", code, *extra], stdout=subprocess.PIPE)
    procs.append(p)
    return p


@pytest.fixture
def devnet_dir(tmp_path: Path) -> Path:
    plan = plan_devnet(DevnetSpec(validators=2, providers=0, clients=0), master_seed=b"\x01" * 32,
                       genesis_time_ms=0)
    root = tmp_path / "net"
    write_devnet(plan, root, scrypt_n=2**4)
    return root


def pretend_running(root: Path, procs: list) -> list[subprocess.Popen[bytes]]:
    """Record stand-in processes whose command lines name each node's config, as a node's would."""
    m = Manifest.load(root)
    stand_ins = []
    for rec in m.nodes:
        p = spawn(procs, SLEEPER, str(rec.config))
        rec.pid, rec.state = p.pid, "running"
        stand_ins.append(p)
    m.save()
    return stand_ins


def test_up_on_a_running_devnet_is_refused_and_touches_nothing(devnet_dir, procs, capsys):
    stand_ins = pretend_running(devnet_dir, procs)
    before = (devnet_dir / "devnet.json").read_text()
    assert main(["devnet", "up", "--dir", str(devnet_dir), "--detach"]) == 2
    err = capsys.readouterr().err
    assert "already running" in err and f"devnet down --dir {devnet_dir}" in err and "--dir" in err
    assert all(p.poll() is None for p in stand_ins)
    assert (devnet_dir / "devnet.json").read_text() == before


def test_up_into_a_foreign_directory_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["devnet", "up", "--dir", str(tmp_path), "--detach"]) == 2
    assert "not a devnet directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_up_with_a_bad_spec_is_refused_before_writing(tmp_path, capsys):
    target = tmp_path / "net"
    assert main(["devnet", "up", "--dir", str(target), "--validators", "0"]) == 2
    assert "at least one validator" in capsys.readouterr().err
    assert not target.exists()


def test_up_with_bad_provider_slots_is_refused_before_writing(tmp_path, capsys):
    target = tmp_path / "net"
    assert main(["devnet", "up", "--dir", str(target), "--provider-slots", "0"]) == 2
    assert "--provider-slots 0: must be between 1 and 1024" in capsys.readouterr().err
    assert not target.exists()


def with_api_urls(root: Path) -> None:
    m = Manifest.load(root)
    for i, rec in enumerate(m.nodes):
        rec.api_url = f"http://127.0.0.1:{5000 + i}"
    m.save()


def test_url_prints_only_the_running_nodes_api(tmp_path, procs, capsys):
    root = tmp_path / "net"
    write_devnet(plan_devnet(DevnetSpec(validators=1, providers=1, clients=2), master_seed=b"\x02" * 32,
                             genesis_time_ms=0), root, scrypt_n=2**4)
    pretend_running(root, procs)
    with_api_urls(root)
    assert main(["devnet", "url", "--dir", str(root)]) == 0  # the first client: the gateway's node
    assert capsys.readouterr().out == "http://127.0.0.1:5002\n"
    assert main(["devnet", "url", "c1", "--dir", str(root)]) == 0
    assert capsys.readouterr().out == "http://127.0.0.1:5003\n"
    assert main(["devnet", "url", "v0", "--dir", str(root)]) == 0
    assert capsys.readouterr().out == "http://127.0.0.1:5000\n"


def test_url_without_a_client_or_of_a_stopped_node_says_what_to_do(devnet_dir, procs, capsys):
    with_api_urls(devnet_dir)
    assert main(["devnet", "url", "v0", "--dir", str(devnet_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "node v0 is not running" in err and f"devnet up --detach --dir {devnet_dir}" in err
    pretend_running(devnet_dir, procs)
    assert main(["devnet", "url", "--dir", str(devnet_dir)]) == 2
    assert "no client node; name a node: v0, v1" in capsys.readouterr().err
    assert main(["devnet", "url", "x9", "--dir", str(devnet_dir)]) == 2
    assert "nodes: v0, v1" in capsys.readouterr().err


def test_drill_on_an_unknown_node_lists_the_names(devnet_dir, capsys):
    for drill in ("kill", "restart", "pause", "resume"):
        assert main(["devnet", drill, "nosuchnode", "--dir", str(devnet_dir)]) == 2
        err = capsys.readouterr().err
        assert "no node named 'nosuchnode'" in err and "nodes: v0, v1" in err
    assert main(["devnet", "logs", "nosuchnode", "--dir", str(devnet_dir)]) == 2
    assert "nodes: v0, v1" in capsys.readouterr().err


def test_drill_on_a_stopped_node_says_how_to_start_it(devnet_dir, capsys):
    assert main(["devnet", "kill", "v1", "--dir", str(devnet_dir)]) == 2
    assert "not running" in capsys.readouterr().err


def test_commands_on_a_missing_devnet(tmp_path, capsys):
    for cmd in (["status"], ["down"], ["demo"], ["kill", "v0"]):
        assert main(["devnet", *cmd, "--dir", str(tmp_path / "none")]) == 2
        assert "no devnet in" in capsys.readouterr().err


def test_down_stops_recorded_processes_and_is_idempotent(devnet_dir, procs, capsys):
    stand_ins = pretend_running(devnet_dir, procs)
    assert main(["devnet", "down", "--dir", str(devnet_dir), "--grace", "5"]) == 0
    out = capsys.readouterr().out
    assert "v0: stopped" in out and "v1: stopped" in out
    for p in stand_ins:
        p.wait(timeout=5)  # the exit status may already have been reaped by down's liveness check
        assert not pid_alive(p.pid)
    m = Manifest.load(devnet_dir)
    assert all(n.pid is None and n.state == "stopped" for n in m.nodes)
    assert main(["devnet", "down", "--dir", str(devnet_dir)]) == 0
    assert "nothing was running" in capsys.readouterr().out


def test_status_json_for_stopped_nodes(devnet_dir, capsys):
    assert main(["devnet", "status", "--dir", str(devnet_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in doc["nodes"]] == ["v0", "v1"]
    assert all(not n["alive"] and n["pid"] is None for n in doc["nodes"])


def test_logs_prints_the_tail(devnet_dir, capsys):
    log = Manifest.load(devnet_dir).node("v0").log
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert main(["devnet", "logs", "v0", "-n", "3", "--dir", str(devnet_dir)]) == 0
    assert capsys.readouterr().out == "line 97\nline 98\nline 99\n"


def test_stop_pids_kills_what_ignores_sigterm(procs):
    polite = spawn(procs, SLEEPER)
    stubborn = spawn(procs, STUBBORN)
    assert stubborn.stdout.readline() == b"ready\n"  # its SIGTERM handler is installed
    how = stop_pids({"polite": polite.pid, "stubborn": stubborn.pid}, grace=1.0,
                    procs={"polite": polite, "stubborn": stubborn})
    assert how["polite"] == "stopped"
    assert how["stubborn"].startswith("killed")
    assert stubborn.wait(timeout=5) == -signal.SIGKILL


def test_pid_alive_checks_the_command_line(procs, tmp_path):
    config = tmp_path / "config.toml"
    p = spawn(procs, "print('ready', flush=True)\n" + SLEEPER, str(config))
    # Popen can return (vfork released) before the kernel has set the new program's argv: until then
    # /proc/PID/cmdline reads empty. A node pid_alive looks at has long been running; wait for ours to be.
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    assert pid_alive(p.pid) and pid_alive(p.pid, config)
    assert not pid_alive(p.pid, tmp_path / "other.toml")  # a reused pid is not our node
    p.kill()
    p.wait()
    assert not pid_alive(p.pid)


def test_stop_all_is_idempotent_without_processes(devnet_dir):
    devnet = Devnet.open(devnet_dir)
    assert devnet.stop_all() == {}
    assert devnet.stop_all() == {}
