"""The devnet's printed views, rendered into a StringIO console and read back as text."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from devnet.demo import DemoSummary, TaskReport, make_demo_jobs, summarise, task_report
from devnet.launcher import DevnetError, Manifest, NodeRecord
from devnet.monitor import NodeSample, RateMeter, parse_metric_values
from devnet.render import (
    render_demo_progress,
    render_demo_summary,
    render_start_card,
    render_status_line,
    render_status_table,
)
from kernels.ops.matmul import verify
from p2pgpu.api.types import BidView, StageTime, TaskView


def text_of(renderable, width: int = 200) -> str:
    console = Console(file=StringIO(), width=width, color_system=None, highlight=False)
    console.print(renderable)
    return console.file.getvalue()


def manifest(root: Path = Path("/tmp/dn")) -> Manifest:
    nodes = []
    for i, (name, roles) in enumerate([("v0", ("validator",)), ("p0", ("provider",)), ("c0", ("client",))]):
        nodes.append(NodeRecord(
            name=name, roles=roles, address=f"{i:02x}" * 20, config=root / "nodes" / name / "config.toml",
            data_dir=root / "nodes" / name / "data", log=root / "logs" / f"{name}.log",
            peer_id=f"12D3KooWPeer{name}XXXXXXXXXXXX", addrs=(f"/ip4/127.0.0.1/tcp/{4000 + i}/p2p/12D3KooWPeer{name}",),
            api_url=f"http://127.0.0.1:{5000 + i}", pid=100 + i, state="running"))
    return Manifest(root=root, chain_id="ab" * 32, chain_name="devnet", genesis=root / "genesis.json",
                    passphrase_file=root / "passphrase", block_interval=0.5, nodes=nodes)


def test_start_card_lists_nodes_endpoints_and_commands():
    text = text_of(render_start_card(manifest(), detached=True, elapsed_s=12.34))
    assert "3 nodes up in 12.3 s" in text
    for name, port, api in (("v0", 4000, 5000), ("p0", 4001, 5001), ("c0", 4002, 5002)):
        assert name in text
        assert f"127.0.0.1/tcp/{port}" in text
        assert f"http://127.0.0.1:{api}" in text
    assert "ab" * 32 in text
    assert "/tmp/dn/devnet.json" in text
    assert "/tmp/dn/passphrase" in text and "DEVNET ONLY" in text
    assert "p2pgpu devnet status --dir /tmp/dn" in text
    assert "p2pgpu devnet logs v0 -f --dir /tmp/dn" in text
    assert "p2pgpu devnet down --dir /tmp/dn" in text
    assert "p2pgpu submit --api http://127.0.0.1:5002" in text  # the client node's API
    assert "p2pgpu model push model.keras --name NAME --api http://127.0.0.1:5002" in text  # its gateway
    assert "http://127.0.0.1:5002/v2/models/NAME/infer" in text
    assert "Ctrl-C" not in text


def test_start_card_in_the_foreground_says_ctrl_c_stops_and_quotes_odd_paths():
    text = text_of(render_start_card(manifest(Path("/tmp/my net")), detached=False))
    assert "Ctrl-C here" in text
    assert "--dir '/tmp/my net'" in text


def sample(name, health="ready", height=10, peers=3, mempool=0, tasks=None, alive=True):
    return NodeSample(name=name, roles=("validator",), pid=1 if alive else None, alive=alive, health=health,
                      height=height, peers=peers, mempool=mempool, tasks=tasks)


def test_status_line_all_ready():
    line = render_status_line([sample("v0"), sample("v1"), sample("v2")], 2.0)
    assert line.plain == "height 10  finalized 2.00 blk/s  peers 3  mempool 0  tasks -  nodes 3/3 ready"


def test_status_line_shows_lag_spread_and_troubled_nodes():
    samples = [sample("v0", height=12, peers=3, mempool=4, tasks=2), sample("v1", height=10, peers=2, tasks=1),
               sample("v2", health="killed", height=None, peers=None, mempool=None, alive=False),
               sample("v3", health="paused", height=None, peers=None, mempool=None)]
    line = render_status_line(samples, None)
    assert line.plain == ("height 12 (min 10)  finalized -  peers 2-3  mempool 4  tasks 3  nodes 2/4 ready"
                          "  (v2 killed, v3 paused)")


def test_status_line_with_nothing_answering():
    line = render_status_line([sample("v0", health="unreachable", height=None, peers=None, mempool=None)], None)
    assert line.plain.startswith("height -  finalized -  peers -  mempool -")
    assert text_of(line).strip() == line.plain


def test_status_table_has_a_row_per_node():
    m = manifest()
    text = text_of(render_status_table(m, [sample("v0"), sample("p0", health="syncing"),
                                           sample("c0", health="stopped", alive=False, height=None)]))
    assert "v0" in text and "p0" in text and "c0" in text
    assert "syncing" in text and "stopped" in text
    rows = [line for line in text.splitlines() if line.startswith(("│ c0", "| c0")) or " c0 " in line]
    assert rows and " no " in rows[0]


def test_rate_meter_uses_a_sliding_window():
    meter = RateMeter(window_seconds=10.0)
    assert meter.rate() is None
    meter.observe(0.0, 0)
    meter.observe(None or 1.0, None)  # an unanswered sample changes nothing
    assert meter.rate() is None
    meter.observe(2.0, 4)
    assert meter.rate() == pytest.approx(2.0)
    for t in range(3, 30):
        meter.observe(float(t), 4 + (t - 2))  # one block per second from now on
    assert meter.rate() == pytest.approx(1.0)


def test_parse_metric_values_sums_labels_and_skips_comments():
    text = ("# HELP p2pgpu_mempool_transactions Pending.\n# TYPE p2pgpu_mempool_transactions gauge\n"
            "p2pgpu_mempool_transactions 7\n"
            'p2pgpu_tasks_active{stage="running"} 2\np2pgpu_tasks_active{stage="posted"} 1\n'
            "p2pgpu_other 99\nbroken_line notanumber\n")
    assert parse_metric_values(text, ("p2pgpu_mempool_transactions", "p2pgpu_tasks_active", "broken_line")) == {
        "p2pgpu_mempool_transactions": 7.0, "p2pgpu_tasks_active": 3.0}


# ----------------------------------------------------------------- demo


def test_demo_jobs_are_seeded_valid_matmuls():
    jobs = make_demo_jobs(5, seed=3)
    again = make_demo_jobs(5, seed=3)
    assert [j.spec for j in jobs] == [j.spec for j in again]
    assert make_demo_jobs(1, seed=4)[0].spec != jobs[0].spec
    assert all(j.spec.kernel == "matmul" for j in jobs)
    assert jobs[0].label == "matmul 64x32 @ 32x48"
    assert jobs[4].inputs["a"].shape == (64, 32)  # shapes cycle
    with pytest.raises(DevnetError, match="at least one task"):
        make_demo_jobs(0)


def _view(task_id: bytes, stage: str, *, outcome=None, provider=None, price=None, times=()):
    return TaskView(task_id=task_id, stage=stage, bids=(BidView(b"\x01" * 20, 120, 2, 50),), provider=provider,
                    unit_price=price, outcome=outcome,
                    timings=tuple((s, StageTime(h, ms)) for s, h, ms in times))


def test_task_report_and_summary_catch_a_wrong_result():
    job, job2 = make_demo_jobs(2)
    good = {"c": (job.inputs["a"] @ job.inputs["b"]).astype(np.float32)}
    bad = {"c": good["c"] * 1.01}
    provider = b"\x01" * 20
    names = {provider.hex(): "p0"}
    times = (("posted", 3, 1_000), ("assigned", 6, 2_500), ("settled", 12, 7_000))
    v1 = _view(b"\xaa" * 32, "settled", outcome="paid", provider=provider, price=120, times=times)
    r1 = task_report(job, v1, names, verify(job.spec, job.inputs, good))
    assert (r1.provider, r1.verified, r1.time_to_assign_s, r1.total_s, r1.bids) == ("p0", True, 1.5, 6.0, 1)
    r2 = task_report(job, _view(b"\xbb" * 32, "settled", outcome="paid", provider=provider, price=130),
                     names, verify(job.spec, job.inputs, bad))
    assert r2.verified is False and r2.detail
    r3 = task_report(job2, _view(b"\xcc" * 32, "bids"), names)
    assert r3.verified is None and r3.outcome is None

    ok = summarise([r1], {"c0": 1000, "p0": 50}, {"c0": 870, "p0": 168}, 9.0)
    assert ok.all_verified and ok.total_paid == 120 and ok.settled == 1
    text = text_of(render_demo_summary(ok))
    assert "1/1 tasks settled" in text and "total paid 120" in text and "every result matches NumPy" in text
    assert "-130" in text and "+118" in text and "1.5 s" in text

    mixed = summarise([r1, r2, r3], {}, {}, 30.0)
    assert not mixed.all_verified and mixed.total_paid == 250 and mixed.outcomes == {"paid": 2, "bids": 1}
    text = text_of(render_demo_summary(mixed))
    assert "2/3 tasks settled" in text and "MISMATCH" in text and "bids (unsettled)" in text
    assert "not every task was paid" in text


def test_empty_summary_is_not_a_success():
    assert not DemoSummary(tasks=()).all_verified


def test_demo_progress_shows_the_stage_track():
    jobs = make_demo_jobs(2)
    provider = b"\x01" * 20
    views = [_view(b"\xaa" * 32, "running", provider=provider, price=120), _view(b"\xbb" * 32, "posted")]
    text = text_of(render_demo_progress(jobs, views, {provider.hex(): "p0"}))
    assert "posted → bids → assigned → running → delivered → settled" in text
    assert "p0" in text and "120" in text and "matmul 128x64 @ 64x32" in text


def test_report_is_frozen():
    r = TaskReport(label="x", task_id="00", stage="posted")
    with pytest.raises(AttributeError):
        r.stage = "bids"  # type: ignore[misc]


def test_provider_readiness_counts_only_since_the_last_start(tmp_path):
    from devnet.demo import provider_ready_in_log

    log = tmp_path / "p0.log"
    assert not provider_ready_in_log(log)  # no log yet
    log.write_bytes(b"--- p2pgpu devnet: starting p0 at t0\nINFO p2pgpu.roles event=provider_ready device=cpu\n")
    assert provider_ready_in_log(log)
    with open(log, "ab") as f:
        f.write(b"--- p2pgpu devnet: starting p0 at t1\nINFO p2pgpu.node event=node_started\n")
    assert not provider_ready_in_log(log)  # restarted: TensorFlow is loading again
