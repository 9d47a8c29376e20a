"""``p2pgpu submit``, ``task show`` and ``ledger`` against a real API server (FakeNode behind it) in this process.

The CLI is synchronous, so it runs in a worker thread while the test's Trio
loop serves the API; the fake node advances a task one stage per look, so
the CLI's polling walks the lifecycle without timers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import trio

from p2pgpu.api.server import serve_api
from p2pgpu.api.types import SupplyView
from p2pgpu.cli import main
from tests.api.fake_node import ALICE, PROVIDER, FakeNode, matmul_job, stream_job


@pytest.fixture
async def api(nursery: trio.Nursery) -> AsyncIterator[tuple[FakeNode, str]]:
    node = FakeNode()
    port = await nursery.start(lambda task_status: serve_api(node, "127.0.0.1", 0, task_status=task_status))
    yield node, f"http://127.0.0.1:{port}"


@pytest.fixture
def job(tmp_path: Path) -> list[str]:
    _, inputs = matmul_job()
    for name, arr in inputs.items():
        np.save(tmp_path / f"{name}.npy", arr)
    (tmp_path / "spec.json").write_text(json.dumps({"kernel": "matmul", "version": 1, "params": {},
                                                    "limits": {"seconds": 30}}))
    return ["--spec", str(tmp_path / "spec.json"), "--input", f"a={tmp_path / 'a.npy'}",
            "--input", f"b={tmp_path / 'b.npy'}"]


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with trio.fail_after(30):
        code = await trio.to_thread.run_sync(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pgpu: error: "), err
    return lines[0]


async def test_submit_to_settled_writes_outputs(api: tuple[FakeNode, str], job: list[str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    out = tmp_path / "out"
    code, stdout, err = await cli(capsys, "submit", "--api", url, *job, "--max-price", "9", "--bid-window", "4",
                                  "--audit-rate", "0.25", "--out", str(out), "--poll-interval", "0")
    assert code == 0, err
    (req,) = node.submitted
    assert (req.max_unit_price, req.bid_window, req.audit_rate_bps, req.units) == (9, 4, 2500, 1)
    assert req.spec.kernel == "matmul" and req.spec.limits.seconds == 30.0
    stages = [line.split()[0] for line in stdout.splitlines() if line and line.split()[0] in
              ("posted", "bids", "assigned", "running", "delivered", "settled")]
    assert stages == ["posted", "bids", "assigned", "running", "delivered", "settled"]
    assert "outcome paid" in stdout and "wrote" in stdout
    _, inputs = matmul_job()
    np.testing.assert_allclose(np.load(out / "c.npy"), inputs["a"] @ inputs["b"])
    assert sorted(p.name for p in out.iterdir()) == ["c.npy"]


@pytest.mark.parametrize(
    ("outcome", "last_stage", "mentions"),
    [
        ("expired", "bids", "no provider bid within the bid window"),
        ("missed", "running", "missed the execution deadline"),
        ("fraud", "delivered", "fraud"),
    ],
)
async def test_submit_failure_outcomes_exit_1(api: tuple[FakeNode, str], job: list[str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str], outcome: str, last_stage: str,
                                              mentions: str) -> None:
    node, url = api
    node.next_outcome = outcome
    out = tmp_path / "out"
    code, stdout, err = await cli(capsys, "submit", "--api", url, *job, "--max-price", "9", "--out", str(out),
                                  "--poll-interval", "0")
    assert code == 1
    assert mentions in one_line(err) and "refunded" in err
    assert f"outcome {outcome}" in stdout
    seen = [line.split()[0] for line in stdout.splitlines()[1:]]
    assert seen[-2:] == [last_stage, "settled"]
    assert not out.exists() or not any(out.iterdir())


async def test_submit_api_unreachable(job: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A port that was just free: bind, read it, close.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    code, _, err = await cli(capsys, "submit", "--api", f"http://127.0.0.1:{port}", *job, "--max-price", "9",
                             "--out", str(tmp_path / "out"))
    assert code == 2 and "cannot reach the API" in one_line(err)


async def test_submit_refusals(api: tuple[FakeNode, str], job: list[str], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    out = str(tmp_path / "out")
    # The node refuses: more than the balance.
    code, _, err = await cli(capsys, "submit", "--api", url, *job, "--max-price", "100000", "--out", out)
    assert code == 2 and "not enough funds" in one_line(err)
    # Bad local inputs never reach the API.
    code, _, err = await cli(capsys, "submit", "--api", url, *job[:2], "--input", f"a={tmp_path / 'a.npy'}",
                             "--max-price", "9", "--out", out)
    assert code == 2 and "spec file" in one_line(err) and "missing input(s) ['b']" in err
    code, _, err = await cli(capsys, "submit", "--api", url, *job[:2], "--input", "a", "--max-price", "9", "--out", out)
    assert code == 2 and "NAME=FILE.npy" in one_line(err)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    code, _, err = await cli(capsys, "submit", "--api", url, *job, "--input", f"c={tmp_path / 'junk.npy'}",
                             "--max-price", "9", "--out", out)
    assert code == 2 and "not a readable .npy" in one_line(err)
    code, _, err = await cli(capsys, "submit", "--api", url, *job, "--max-price", "9", "--audit-rate", "2",
                             "--out", out)
    assert code == 2 and "--audit-rate" in one_line(err)
    (tmp_path / "spec.json").write_text('{"kernel": "matmul", "version": 1, "oops": 1}')
    code, _, err = await cli(capsys, "submit", "--api", url, *job, "--max-price", "9", "--out", out)
    assert code == 2 and "unknown key(s) oops" in one_line(err)
    (tmp_path / "spec.json").write_text('{"kernel": "nosuch", "version": 1}')
    code, _, err = await cli(capsys, "submit", "--api", url, *job, "--max-price", "9", "--out", out)
    assert code == 2 and "UnknownKernel" in one_line(err)
    assert node.submitted == []


async def test_submit_stream_sends_items_beside_the_model_and_writes_stacked_outputs(
        api: tuple[FakeNode, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    _, inputs, items = stream_job(4)
    args = []
    for name, arr in inputs.items():
        np.save(tmp_path / f"{name}.npy", arr)
        args += ["--input", f"{name}={tmp_path / f'{name}.npy'}"]
    np.save(tmp_path / "items.npy", items)
    (tmp_path / "spec.json").write_text(json.dumps({"kernel": "stream_infer", "version": 1}))
    out = tmp_path / "out"
    code, stdout, err = await cli(capsys, "submit", "--api", url, "--spec", str(tmp_path / "spec.json"), *args,
                                  "--stream", str(tmp_path / "items.npy"), "--max-price", "9", "--out", str(out),
                                  "--poll-interval", "0")
    assert code == 0, err
    (req,) = node.submitted
    assert (req.kind, req.units) == ("stream", 4) and "items" not in req.spec.input_dict()
    np.testing.assert_array_equal(req.inputs["items"], items)
    np.testing.assert_allclose(np.load(out / "outputs.npy"), items.sum(axis=1, keepdims=True))

    # Items that do not fit the model are refused by the node, naming the item; nothing is posted.
    items[2, 0] = np.inf
    np.save(tmp_path / "items.npy", items)
    code, _, err = await cli(capsys, "submit", "--api", url, "--spec", str(tmp_path / "spec.json"), *args,
                             "--stream", str(tmp_path / "items.npy"), "--max-price", "9",
                             "--out", str(tmp_path / "out2"))
    assert code == 2 and "item 2 holds NaN or infinite values" in one_line(err) and "invalid_items" in err
    code, _, err = await cli(capsys, "submit", "--api", url, "--spec", str(tmp_path / "spec.json"), *args,
                             "--stream", str(tmp_path / "nope.npy"), "--max-price", "9", "--out", str(tmp_path / "o3"))
    assert code == 2 and "--stream items:" in one_line(err) and "does not exist" in err
    assert len(node.submitted) == 1

    # One output looked wrong: dispute that item through the node.
    tid = next(iter(node.tasks)).hex()
    code, stdout, err = await cli(capsys, "task", "dispute", "--api", url, tid, "--item", "2", "--reason", "bad")
    assert code == 0, err
    assert "disputed item 2" in stdout and node.disputes == [(bytes.fromhex(tid), 2, "bad")]
    code, _, err = await cli(capsys, "task", "dispute", "--api", url, tid, "--item", "7")
    assert code == 2 and "item 7" in one_line(err) and "unknown_item" in err


async def test_task_show(api: tuple[FakeNode, str], capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    spec, inputs = matmul_job()
    from p2pgpu.api.types import SubmitRequest

    task_id = await node.submit_task(SubmitRequest(spec=spec, inputs=inputs, max_unit_price=9))
    for _ in range(3):
        await node.task(task_id)  # to 'running'
    code, out, _ = await cli(capsys, "task", "show", "--api", url, task_id.hex(), "--json")
    assert code == 0 and json.loads(out)["stage"] == "running"
    code, out, _ = await cli(capsys, "task", "show", "--api", url, task_id.hex())
    assert code == 0
    assert "delivered" in out and PROVIDER.hex() in out and "bids" in out and "timings" in out
    code, _, err = await cli(capsys, "task", "show", "--api", url, "00" * 32)
    assert code == 2 and "no task" in one_line(err) and "unknown_task" in err
    code, _, err = await cli(capsys, "task", "show", "--api", url, "xyz")
    assert code == 2 and "not hex" in one_line(err)


async def test_ledger_commands(api: tuple[FakeNode, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, url = api
    code, out, _ = await cli(capsys, "ledger", "balance", ALICE.hex(), "--api", url, "--json")
    assert code == 0 and json.loads(out) == {"address": ALICE.hex(), "balance": 1000}
    code, out, _ = await cli(capsys, "ledger", "balance", ALICE.hex(), "--api", url)
    assert code == 0 and "1000" in out
    code, out, _ = await cli(capsys, "ledger", "validators", "--api", url)
    assert code == 0 and "5000" in out and "active" in out and ALICE.hex() in out
    code, out, _ = await cli(capsys, "ledger", "providers", "--api", url)
    assert code == 0 and "700" in out
    code, out, _ = await cli(capsys, "ledger", "head", "--api", url, "--json")
    assert code == 0 and json.loads(out)["height"] == 7
    code, _, err = await cli(capsys, "ledger", "balance", "12", "--api", url)
    assert code == 2 and "expected 20" in one_line(err)


async def test_ledger_supply(api: tuple[FakeNode, str], capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    code, out, _ = await cli(capsys, "ledger", "supply", "--api", url, "--json")
    assert code == 0 and json.loads(out)["total"] == 52_684 and json.loads(out)["conserved"] is True
    code, out, _ = await cli(capsys, "ledger", "supply", "--api", url)
    assert code == 0 and "supply at height 7" in out
    for name, value in (("provider bonds", "3000"), ("dispute bonds", "50"), ("total", "52684"),
                        ("genesis supply", "52663"), ("minted", "21"), ("conserved", "yes")):
        assert re.search(rf"{name}\W+{value}\b", out), (name, out)

    books = await node.supply()

    async def leaky() -> SupplyView:
        return dataclasses.replace(books, balances=books.balances - 5, total=books.total - 5, conserved=False)

    node.supply = leaky  # type: ignore[method-assign]
    code, out, _ = await cli(capsys, "ledger", "supply", "--api", url)
    assert code == 0 and "NO: total - (genesis supply + minted) = -5" in out


async def test_task_delete(api: tuple[FakeNode, str], capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    spec, inputs = matmul_job()
    from p2pgpu.api.types import SubmitRequest

    task_id = await node.submit_task(SubmitRequest(spec=spec, inputs=inputs, max_unit_price=9))
    code, _, err = await cli(capsys, "task", "delete", "--api", url, task_id.hex())
    assert code == 2 and "task_open" in err and task_id in node.tasks
    for _ in range(6):
        await node.task(task_id)  # to 'settled'
    code, out, _ = await cli(capsys, "task", "delete", "--api", url, task_id.hex())
    assert code == 0 and "deleted task" in out and task_id not in node.tasks


async def test_task_show_names_the_model_its_start_and_the_royalty(api: tuple[FakeNode, str],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from kernels.bymodel import make_model_spec
    from p2pgpu.api.types import PushModelRequest, SubmitRequest

    node, url = api
    pushed = await node.push_model(PushModelRequest(bundle=b"\x95" + b"bundle" * 8, name="dense", version="1",
                                                    royalty_per_unit=3))
    x = np.ones((2, 4), np.float32)
    task_id = await node.submit_task(SubmitRequest(spec=make_model_spec(pushed.model_id, {}, x), inputs={"x": x},
                                                   max_unit_price=9))
    for _ in range(6):
        await node.task(task_id)  # to 'settled', paid
    code, out, _ = await cli(capsys, "task", "show", "--api", url, task_id.hex())
    assert code == 0
    assert "dense@1" in out
    assert "warm" in out and "3 paid (3 per unit)" in out
    code, out, _ = await cli(capsys, "task", "show", "--api", url, task_id.hex(), "--json")
    shown = json.loads(out)
    assert (shown["model_name"], shown["start_warm"], shown["royalty_paid"]) == ("dense", True, 3)
