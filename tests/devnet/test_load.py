"""``p2pgpu devnet load``'s pure parts: arguments, pacing, figures, rendering; and its refusals (exit 2)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from devnet.launcher import DevnetSpec, Manifest, plan_devnet, write_devnet
from devnet.load import (
    LATE_POLL_S,
    LoadArgumentError,
    LoadConfig,
    LoadSummary,
    RunFacts,
    SupplyCheck,
    TaskRecord,
    cpu_used,
    failure_reason,
    load_progress_line,
    make_load_job,
    next_due_at,
    percentile,
    poll_interval,
    progress_of,
    render_load_line,
    render_load_summary,
    submissions_due,
    summarise,
    supply_check,
)
from p2pgpu.api.types import StageTime, TaskView
from p2pgpu.cli import main

SLEEPER = "import time\nwhile True: time.sleep(0.1)"


def text_of(renderable, width: int = 160) -> str:
    console = Console(file=StringIO(), width=width, color_system=None, highlight=False)
    console.print(renderable)
    return console.file.getvalue()


# ----------------------------------------------------------------- arguments


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tasks": 5}, "neither was given"),
    ({"tasks": 5, "rate": 1.0, "concurrency": 2}, "both were given"),
    ({"tasks": 5, "rate": 0.0}, "--rate 0: must be a positive"),
    ({"tasks": 5, "rate": -2.0}, "--rate -2: must be a positive"),
    ({"tasks": 5, "rate": math.nan}, "--rate nan"),
    ({"tasks": 5, "concurrency": 0}, "--concurrency 0: must be at least 1"),
    ({"tasks": 0, "concurrency": 1}, "--tasks 0: must be at least 1"),
    ({"tasks": 5, "concurrency": 1, "size": 0}, "--size 0"),
    ({"tasks": 5, "concurrency": 1, "timeout": 0.0}, "--timeout 0: must be a positive"),
])
def test_bad_configs_are_refused_naming_the_option(kwargs, message):
    with pytest.raises(LoadArgumentError, match=message.replace("(", r"\(")):
        LoadConfig(**kwargs)


def test_config_modes():
    assert LoadConfig(tasks=3, rate=2.0).mode == "open"
    assert LoadConfig(tasks=3, concurrency=2).mode == "closed"
    assert LoadConfig(tasks=3, concurrency=2).describe() == "3 x matmul 64x64 float32 at 2 in flight (closed loop)"


@pytest.fixture
def devnet_dir(tmp_path: Path) -> Path:
    plan = plan_devnet(DevnetSpec(validators=1, providers=1, clients=2), master_seed=b"\x02" * 32,
                       genesis_time_ms=0)
    root = tmp_path / "net"
    write_devnet(plan, root, scrypt_n=2**4)
    return root


@pytest.fixture
def running(devnet_dir: Path) -> Iterator[Path]:
    """Stand-in processes whose command lines name each node's config, recorded as the nodes' pids."""
    m = Manifest.load(devnet_dir)
    procs = []
    for rec in m.nodes:
        p = subprocess.Popen([sys.executable, "-c", SLEEPER, str(rec.config)])
        procs.append(p)
        rec.pid, rec.state, rec.api_url = p.pid, "running", "http://127.0.0.1:9"
    m.save()
    yield devnet_dir
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def load(dir_: Path, *extra: str) -> list[str]:
    return ["devnet", "load", "--dir", str(dir_), *extra]


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "4"], "neither was given"),
    (["--tasks", "4", "--rate", "2", "--concurrency", "2"], "both were given"),
    (["--tasks", "0", "--concurrency", "2"], "--tasks 0: must be at least 1"),
    (["--tasks", "4", "--concurrency", "-1"], "--concurrency -1: must be at least 1"),
    (["--tasks", "4", "--rate", "0"], "--rate 0: must be a positive"),
    (["--tasks", "4", "--rate", "1", "--audit-rate", "2"], "--audit-rate 2: must be between 0 and 1"),
])
def test_bad_arguments_exit_2_naming_the_problem(devnet_dir, capsys, args, message):
    assert main(load(devnet_dir, *args)) == 2
    assert message in capsys.readouterr().err


def test_no_devnet_in_dir(tmp_path, capsys):
    assert main(load(tmp_path / "none", "--tasks", "4", "--concurrency", "2")) == 2
    assert "no devnet in" in capsys.readouterr().err


def test_devnet_not_running(devnet_dir, capsys):
    assert main(load(devnet_dir, "--tasks", "4", "--concurrency", "2")) == 2
    err = capsys.readouterr().err
    assert "is not running" in err and "devnet up --dir" in err


def test_clients_must_be_client_nodes(running, capsys):
    assert main(load(running, "--tasks", "4", "--concurrency", "2", "--clients", "c0,nosuch")) == 2
    assert "no node named 'nosuch'" in capsys.readouterr().err
    assert main(load(running, "--tasks", "4", "--concurrency", "2", "--clients", "v0")) == 2
    assert "node v0 does not run the client role; client nodes: c0, c1" in capsys.readouterr().err


# ----------------------------------------------------------------- jobs and pacing


def test_jobs_are_seeded_per_task():
    a, b = make_load_job(3, 8, 7), make_load_job(3, 8, 7)
    assert a.spec == b.spec and np.array_equal(a.inputs["a"], b.inputs["a"])
    assert a.inputs["a"].shape == (8, 8) and a.inputs["a"].dtype == np.float32
    assert make_load_job(4, 8, 7).spec != a.spec and make_load_job(3, 8, 8).spec != a.spec


def test_open_loop_sends_task_i_at_i_over_rate_whatever_is_in_flight():
    c = LoadConfig(tasks=5, rate=2.0)
    assert submissions_due(c, elapsed=0.0, submitted=0, in_flight=0) == 1
    assert submissions_due(c, elapsed=0.49, submitted=1, in_flight=1) == 0
    assert submissions_due(c, elapsed=0.5, submitted=1, in_flight=1) == 1
    assert submissions_due(c, elapsed=1.6, submitted=2, in_flight=100) == 2  # late: catches up at once
    assert submissions_due(c, elapsed=60.0, submitted=4, in_flight=0) == 1  # never beyond the total
    assert submissions_due(c, elapsed=60.0, submitted=5, in_flight=0) == 0
    assert next_due_at(c, 3) == 1.5
    assert next_due_at(c, 5) is None


def test_closed_loop_refills_to_the_concurrency():
    c = LoadConfig(tasks=10, concurrency=4)
    assert submissions_due(c, elapsed=0.0, submitted=0, in_flight=0) == 4
    assert submissions_due(c, elapsed=9.0, submitted=4, in_flight=4) == 0
    assert submissions_due(c, elapsed=9.0, submitted=4, in_flight=1) == 3
    assert submissions_due(c, elapsed=9.0, submitted=8, in_flight=0) == 2
    assert next_due_at(c, 4) is None  # the next goes when one finishes


def test_poll_interval_by_stage():
    c = LoadConfig(tasks=1, concurrency=1, poll=0.2)
    assert poll_interval(c, "bids") == pytest.approx(0.5)
    assert poll_interval(c, None) == pytest.approx(0.5)
    assert poll_interval(c, "running") == 0.2
    assert poll_interval(c, "settled", paid_without_result=True) == LATE_POLL_S


# ----------------------------------------------------------------- figures


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([3, 1, 2], 50) == 2
    assert percentile([], 50) is None


def test_failure_reasons_group_across_tasks():
    a = failure_reason("expired", "task d33fe67f34698573aa is   COMMITTED")
    b = failure_reason("expired", "task 0123456789abcdef01 is COMMITTED")
    assert a == b == "expired: task … is COMMITTED"
    assert failure_reason("fraud") == "fraud"


def supply(**over):
    answer = {"height": 9, "balances": 90, "escrow": 5, "collateral": 1, "dispute_bonds": 0, "stake": 4,
              "unbonding": 0, "provider_bonds": 0, "fee_pool": 0, "burned": 0, "genesis_supply": 95, "minted": 5,
              "total": 100, "conserved": True}
    return {**answer, **over}


def test_supply_is_recomputed_not_taken_on_trust():
    assert supply_check(supply()) == SupplyCheck(9, 100, True)
    lying = supply_check(supply(escrow=6))
    assert not lying.conserved and "buckets add up to 101, total is 100" in lying.problem
    minted = supply_check(supply(minted=6))
    assert not minted.conserved and "!= genesis 95 + minted 6" in minted.problem
    assert not supply_check(supply(conserved=False)).conserved
    assert "not a supply answer" in supply_check({"height": 1}).problem


def test_cpu_used_skips_restarted_nodes():
    before = {"v0": (10, 5.0), "p0": (11, 2.0), "c0": (12, 1.0)}
    after = {"v0": (10, 7.5), "p0": (99, 0.5)}
    assert cpu_used(before, after) == {"v0": 2.5, "p0": None, "c0": None}


def view(tid: int, stage: str, outcome: str | None = None, detail: str = "", **times: int) -> TaskView:
    return TaskView(task_id=bytes([tid]) * 32, stage=stage, outcome=outcome, detail=detail,
                    timings=tuple((s, StageTime(height=1, time_ms=t)) for s, t in times.items()))


def records() -> list[TaskRecord]:
    """Three delivered (1, 2 and 3 s), one expired, one lost, one never sent."""
    out = []
    for i, (sent, got) in enumerate([(0.0, 1.0), (0.5, 2.5), (1.0, 4.0)]):
        out.append(TaskRecord(i, f"c{i % 2}", submitted_at=sent, task_id=bytes([i]) * 32, result_at=got,
                              view=view(i, "delivered", posted=1000, bids=1100, assigned=1000 + 400 * (i + 1),
                                        running=2000, delivered=2500)))
    out.append(TaskRecord(3, "c1", submitted_at=1.5, task_id=b"\x03" * 32,
                          view=view(3, "settled", "expired", "2 bid(s) but none assigned in time", posted=0, bids=50),
                          failure=failure_reason("expired", "2 bid(s) but none assigned in time")))
    out.append(TaskRecord(4, "c0", submitted_at=2.0, task_id=b"\x04" * 32, view=view(4, "bids", posted=0),
                          lost="no result nor final outcome by the timeout (last stage bids)"))
    out.append(TaskRecord(5, "c1"))
    return out


def facts() -> RunFacts:
    return RunFacts(started=0.0, ended=10.0, cpu_before={"v0": (1, 1.0)}, cpu_after={"v0": (1, 3.25)},
                    load_generator_cpu_s=0.5, supply={"v0": SupplyCheck(9, 100, True)},
                    drops_before=2, drops_after=5, gossip_before={"v0": 100.0, "c0": 50.0, "p0": 9.0},
                    gossip_after={"v0": 1100.0, "c0": 80.0}, height_before=10, height_after=30, poll_errors=1,
                    requests=120, health_ms=[3.0, 5.0, 40.0, 4.0])


def summary() -> LoadSummary:
    return summarise(LoadConfig(tasks=6, concurrency=2), ["c0", "c1"], records(), facts())


def test_summary_figures():
    s = summary()
    assert (s.submitted, s.accepted, s.delivered, s.failed, s.lost, s.not_submitted) == (5, 5, 3, 1, 1, 1)
    assert s.delivery_span_s == 4.0 and s.tasks_delivered_per_s == 0.75
    assert (s.time_to_result_ms_p50, s.time_to_result_ms_p99) == (2000.0, 3000.0)
    assert (s.time_to_assignment_ms_p50, s.time_to_assignment_ms_p99) == (800.0, 1200.0)
    assert s.stage_ms_p50["posted_to_bids"] == 100.0 and s.stage_ms_p50["running_to_delivered"] == 500.0
    assert s.failed_by_reason == {"expired: 2 bid(s) but none assigned in time": 1}
    assert s.lost_by_reason == {"no result nor final outcome by the timeout (last stage bids)": 1}
    assert s.lost_task_ids == ("04" * 32,)
    assert s.failed_examples == {"expired: 2 bid(s) but none assigned in time": ("03" * 8,)}
    assert s.cpu_seconds_by_node == {"v0": 2.25}
    assert s.supply_conserved is True and s.gossip_drops == 5 and s.gossip_drops_during_run == 3 and s.blocks == 20
    # messages handled during the run; a node that did not answer at the end counts as unknown, not zero
    assert s.gossip_messages_by_node == {"v0": 1000, "c0": 30, "p0": None}
    assert s.health_ms_max == 40.0 and s.health_ms_p99 is not None and 5.0 < s.health_ms_p99 <= 40.0
    assert not s.ok


def test_summary_json_has_the_bench_keys():
    doc = json.loads(json.dumps(summary().to_json()))
    for key in ("tasks_delivered_per_s", "time_to_result_ms_p50", "time_to_result_ms_p99",
                "time_to_assignment_ms_p50", "time_to_assignment_ms_p99", "tasks_lost", "supply_conserved",
                "failed_by_reason", "cpu_seconds_by_node", "gossip_drops", "gossip_messages_by_node"):
        assert key in doc
    assert doc["tasks_lost"] == 1 and doc["delivered"] == 3 and doc["ok"] is False and doc["http_requests"] == 120
    assert doc["mode"] == "closed" and doc["concurrency"] == 2 and doc["rate"] is None


def test_all_delivered_is_ok():
    recs = records()[:3]
    s = summarise(LoadConfig(tasks=3, rate=1.0), ["c0"], recs, facts())
    assert s.ok and s.failed_by_reason == {} and s.lost == 0


def test_a_paid_task_awaiting_its_late_result_is_not_in_flight():
    rec = TaskRecord(0, "c0", submitted_at=0.0, task_id=b"\x00" * 32)
    assert rec.in_flight and not rec.awaiting_late_result
    rec.paid_at = 3.0
    assert not rec.in_flight and rec.awaiting_late_result
    rec.result_at = 5.0
    assert rec.delivered and not rec.awaiting_late_result and rec.time_to_result_ms() == 5000.0


# ----------------------------------------------------------------- rendering


def test_live_line():
    p = progress_of(records(), 6, 4.0)
    assert (p.submitted, p.in_flight, p.delivered, p.failed, p.lost) == (5, 0, 3, 1, 1)
    line = text_of(render_load_line(p))
    assert "submitted 5/6" in line and "in flight 0" in line and "delivered 3" in line and "failed 1" in line
    assert "lost 1" in line and "0.8 delivered/s" in line and "p50 to result 2.00 s" in line
    assert load_progress_line(p) == ("[0:04] submitted 5/6  in flight 0  delivered 3  failed 1  lost 1  "
                                     "0.8 delivered/s  p50 to result 2.00 s")


def test_live_line_before_anything_is_delivered():
    p = progress_of([TaskRecord(0, "c0", submitted_at=0.0)], 3, 0.0)
    assert "p50 to result -" in load_progress_line(p) and "in flight 1" in load_progress_line(p)


def test_summary_panel():
    out = text_of(render_load_summary(summary()))
    assert "6 x matmul 64x64 float32 at 2 in flight (closed loop) via c0, c1" in out
    assert "3/6  at 0.75 tasks/s over 4.0 s" in out
    assert "time to assignment  p50 0.80 s  p99 1.20 s" in out
    assert "time to result      p50 2.00 s  p99 3.00 s" in out
    assert "failed by reason" in out and "expired: 2 bid(s) but none assigned in time  " + "03" * 8 in out
    assert "lost by reason" in out and "(last stage bids)  " + "04" * 8 in out
    assert "conserved" in out
    assert "20 blocks, 3 gossip drops, 120 API requests from this load generator, 1 poll errors" in out
    assert "2.2" in out  # v0's CPU seconds
    assert "3 of 6 task(s) not delivered, 1 lost" in out


def test_summary_panel_when_the_supply_is_broken():
    s = summarise(LoadConfig(tasks=3, rate=1.0), ["c0"], records()[:3],
                  RunFacts(started=0.0, ended=5.0, supply={"v0": supply_check(supply(escrow=6))}))
    out = text_of(render_load_summary(s), width=200)
    assert "NOT conserved" in out and "buckets add up to 101" in out
    assert "every task delivered with a result matching NumPy" in out


def test_a_node_without_an_answer_counts_neither_way():
    s = summarise(LoadConfig(tasks=3, rate=1.0), ["c0"], records()[:3],
                  RunFacts(started=0.0, ended=5.0, supply={"v0": supply_check(supply())},
                           supply_unanswered={"p0": "HTTP 503: starting: the node is starting"}))
    assert s.supply_conserved is True and s.to_json()["supply_unanswered"] == {"p0": "HTTP 503: starting: the "
                                                                                     "node is starting"}
    assert "p0 did not answer (HTTP 503" in text_of(render_load_summary(s), width=200)
