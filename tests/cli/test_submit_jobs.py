"""``p2pgpu submit --jobs``: the job layout, its errors, the progress views, and whole runs against a FakeNode.

Whole runs use the real API server in this process, as ``test_submit_cli``
does (the fake node advances a task one stage per look, so polling walks
the lifecycle without timers); the views are printed into a
``Console(file=StringIO(), width=...)``; the polling loop is driven with a
fake clock.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import p2pgpu.submit_batch
from p2pgpu.api.types import BidView, NotFound, PaymentRequired, StageTime, TaskView
from p2pgpu.cli import CLIError, main
from p2pgpu.jobs import JobTerms, load_jobs
from p2pgpu.submit_batch import (
    BatchBoard,
    follow_jobs,
    progress_line,
    render_batch_progress,
    render_batch_summary,
)
from tests.api.fake_node import PROVIDER, FakeNode, matmul_job, stream_job
from tests.cli.test_submit_cli import api, cli, one_line  # noqa: F401 - the api fixture

TERMS = JobTerms(max_price=9, bid_window=10, audit_rate=0.1)
MATMUL_SPEC = {"kernel": "matmul", "version": 1, "params": {}, "limits": {"seconds": 30}}


def write_job(folder: Path, job: dict | None = None, *, scale: float = 1.0) -> Path:
    """A matmul job folder: spec.json, a.npy, b.npy and (if given) job.json."""
    folder.mkdir(parents=True)
    _, inputs = matmul_job()
    for name, arr in inputs.items():
        np.save(folder / f"{name}.npy", arr * np.float32(scale))
    (folder / "spec.json").write_text(json.dumps(MATMUL_SPEC))
    if job is not None:
        (folder / "job.json").write_text(json.dumps(job))
    return folder


def expected_c(scale: float = 1.0) -> np.ndarray:
    _, inputs = matmul_job()
    return (inputs["a"] * np.float32(scale)) @ (inputs["b"] * np.float32(scale))


# ----------------------------------------------------------------- the layout


def test_a_jobs_directory(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs / "second", scale=2.0)  # no job.json: its .npy files are its inputs, terms from the flags
    write_job(jobs / "first", {"inputs": {"a": "a.npy", "b": "b.npy"}, "max_price": 7, "bid_window": 3,
                               "audit_rate": 0.5})
    (jobs / "second" / "notes.txt").write_text("ignored")
    (jobs / "README").write_text("a stray file beside the job folders is ignored")
    (jobs / ".hidden").mkdir()
    first, second = load_jobs(jobs, TERMS)
    assert (first.name, second.name) == ("first", "second")  # folder names, sorted
    assert first.where == str(jobs / "first" / "job.json") and second.where == str(jobs / "second")
    r1, r2 = first.request, second.request
    assert (r1.max_unit_price, r1.bid_window, r1.audit_rate_bps, r1.kind) == (7, 3, 5000, "batch")
    assert (r2.max_unit_price, r2.bid_window, r2.audit_rate_bps) == (9, 10, 1000)
    assert sorted(r2.inputs) == ["a", "b"] and r2.spec.kernel == "matmul" and r2.spec.limits.seconds == 30.0
    np.testing.assert_array_equal(r2.inputs["a"], matmul_job()[1]["a"] * 2)


def test_a_json_list_of_jobs(tmp_path: Path) -> None:
    write_job(tmp_path / "m")
    _, model, items = stream_job(3)
    (tmp_path / "s").mkdir()
    for name, arr in model.items():
        np.save(tmp_path / "s" / f"{name}.npy", arr)
    np.save(tmp_path / "s" / "items.npy", items)
    (tmp_path / "s" / "spec.json").write_text(json.dumps({"kernel": "stream_infer", "version": 1}))
    listing = tmp_path / "jobs.json"
    listing.write_text(json.dumps([
        {"name": "mm", "spec": "m/spec.json", "inputs": {"a": "m/a.npy", "b": "m/b.npy"}, "max_price": 4},
        {"spec": "m/spec.json", "inputs": {"a": "m/a.npy", "b": "m/b.npy"}},
        {"name": "st", "spec": "s/spec.json", "inputs": {n: f"s/{n}.npy" for n in model}, "stream": "s/items.npy"},
    ]))
    mm, unnamed, st = load_jobs(listing, TERMS)
    assert [j.name for j in (mm, unnamed, st)] == ["mm", "job-1", "st"]
    assert mm.where == f"{listing} entry 0 (mm)"
    assert (mm.request.max_unit_price, unnamed.request.max_unit_price) == (4, 9)
    assert (st.request.kind, st.request.units) == ("stream", 3) and "items" not in st.request.spec.input_dict()
    np.testing.assert_array_equal(st.request.inputs["items"], items)


def _problem(tmp_path: Path, case: str) -> tuple[Path, str]:
    """Set up one bad job set; return --jobs PATH and what the error must say."""
    jobs = tmp_path / "jobs"
    listing = tmp_path / "jobs.json"
    entry = {"spec": "j/spec.json", "inputs": {"a": "j/a.npy", "b": "j/b.npy"}}
    if case == "unknown key":
        write_job(jobs / "ok")
        write_job(jobs / "typo", {"maxprice": 5})
        return jobs, f"{jobs / 'typo' / 'job.json'}: unknown key(s) maxprice"
    if case == "missing input file":
        write_job(jobs / "j", {"inputs": {"a": "a.npy", "b": "nope.npy"}})
        return jobs, f"{jobs / 'j' / 'job.json'}: inputs.b: {jobs / 'j' / 'nope.npy'} does not exist"
    if case == "no price":
        write_job(jobs / "j")
        return jobs, f"{jobs / 'j'}: no max_price; set it in the job or give --max-price"
    if case == "bad price":
        write_job(jobs / "j", {"max_price": 0})
        return jobs, "job.json: max_price must be a whole number of at least 1, got 0"
    if case == "bad json":
        write_job(jobs / "j")
        (jobs / "j" / "job.json").write_text('{"max_price": 5,}')
        return jobs, f"{jobs / 'j' / 'job.json'}: not valid JSON"
    if case == "bad spec":
        write_job(jobs / "j", {})
        (jobs / "j" / "spec.json").write_text('{"kernel": "nosuch", "version": 1}')
        return jobs, f"{jobs / 'j' / 'job.json'}: spec file {jobs / 'j' / 'spec.json'}: UnknownKernel"
    if case == "one job, not a set":
        write_job(jobs)
        return jobs, "is one job folder itself"
    if case == "empty directory":
        jobs.mkdir()
        return jobs, "holds no job folders"
    if case == "bad folder name":
        write_job(jobs / "-x")
        return jobs, "job name '-x' is not usable as a folder name"
    write_job(tmp_path / "j")
    if case == "not a list":
        listing.write_text(json.dumps(entry))
        return listing, f"{listing}: expected a JSON list of jobs, got dict"
    if case == "twice the same name":
        listing.write_text(json.dumps([{**entry, "name": "x"}, {**entry, "name": "x"}]))
        return listing, f"{listing} entry 1: job name 'x' is taken by {listing} entry 0"
    if case == "entry without inputs":
        listing.write_text(json.dumps([entry, {"spec": "j/spec.json"}]))
        return listing, f"{listing} entry 1 (job-1): missing 'inputs'"
    if case == "name that escapes --out":
        listing.write_text(json.dumps([{**entry, "name": "../up"}]))
        return listing, "job name '../up' is not usable as a folder name"
    assert case == "no such path"
    return tmp_path / "nothere", "does not exist"


@pytest.mark.parametrize("case", ["unknown key", "missing input file", "no price", "bad price", "bad json",
                                  "bad spec", "one job, not a set", "empty directory", "bad folder name",
                                  "not a list", "twice the same name", "entry without inputs",
                                  "name that escapes --out", "no such path"])
def test_a_bad_job_is_named_and_nothing_is_posted(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  case: str) -> None:
    path, mentions = _problem(tmp_path, case)
    terms = JobTerms(None, 10, 0.1) if case == "no price" else TERMS
    with pytest.raises(CLIError) as caught:
        load_jobs(path, terms)
    assert mentions in str(caught.value)
    # Through the command line: exit 2 and one line, before any API is asked (this one does not exist).
    argv = ["submit", "--api", "http://127.0.0.1:9", "--jobs", str(path), "--out", str(tmp_path / "out")]
    code = main(argv if case == "no price" else [*argv, "--max-price", "9"])
    assert code == 2 and mentions in one_line(capsys.readouterr().err)


def test_flags_of_one_job_are_refused_with_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_job(tmp_path / "jobs" / "j")
    base = ["submit", "--jobs", str(tmp_path / "jobs"), "--max-price", "9", "--out", str(tmp_path / "out")]
    assert main([*base, "--input", "a=a.npy", "--units", "2"]) == 2
    assert "--input, --units describe one job" in one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exited:  # argparse: --spec and --jobs exclude each other
        main([*base, "--spec", "spec.json"])
    assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# ----------------------------------------------------------------- the views


def view(stage: str, outcome: str | None = None, price: int | None = None) -> TaskView:
    return TaskView(task_id=b"\x01" * 32, stage=stage, bids=(BidView(PROVIDER, 5, 2, 20),), provider=PROVIDER,
                    unit_price=price, outcome=outcome, timings=(("posted", StageTime(3, 0)),))


def board_of(tmp_path: Path, n: int) -> BatchBoard:
    jobs = tmp_path / "jobs"
    for i in range(n):
        write_job(jobs / f"job{i}")
    loaded = load_jobs(jobs, TERMS)
    answers: list = [bytes([i + 1]) * 32 for i in range(n - 1)]
    answers.append(PaymentRequired("balance 3 cannot cover escrow and fee 12"))
    return BatchBoard.posted(loaded, answers, started=100.0)


def test_progress_views_count_stages_and_outcomes(tmp_path: Path) -> None:
    board = board_of(tmp_path, 6)  # five posted, the sixth refused for funds
    board.jobs[0].view = view("settled", "paid", 5)
    board.jobs[0].written = (tmp_path / "out" / "job0" / "c.npy",)
    board.jobs[1].view = view("running")
    board.jobs[2].view = view("bids")
    board.jobs[3].view = view("settled", "expired")
    # jobs[4] not looked at yet: counted as posted
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(render_batch_progress(board, now=130.0))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    first, second = text.splitlines()
    assert first.startswith("settled 2/5 ") and "━" in first
    assert first.endswith(" 40%  elapsed 0:00:30  ETA 0:00:45")  # 15 s per settled task, 3 to go
    assert second.split() == ["posted", "1", "bids", "1", "assigned", "0", "running", "1", "delivered", "0",
                              "settled", "2", "|", "paid", "1", "expired", "1", "refused", "1"]
    assert progress_line(board, now=130.0) == ("[0:00:30] settled 2/5  posted 1  bids 1  assigned 0  running 1  "
                                                "delivered 0  settled 2  | paid 1  expired 1  refused 1  "
                                                "ETA 0:00:45")
    # Before anything settles there is no pace to extrapolate from.
    fresh = board_of(tmp_path / "fresh", 2)
    assert progress_line(fresh, now=101.0).endswith("settled 0/1  posted 1  bids 0  assigned 0  running 0  "
                                                    "delivered 0  settled 0  | refused 1  ETA -:--:--")


def test_summary_table_says_what_happened_to_each_job(tmp_path: Path) -> None:
    board = board_of(tmp_path, 5)
    out = tmp_path / "out"
    board.jobs[0].view = view("settled", "paid", 5)
    board.jobs[0].written = (out / "job0" / "c.npy",)
    board.jobs[1].view = view("settled", "missed")
    board.jobs[2].view = view("running")
    board.jobs[3].view = view("delivered")
    board.jobs[3].problem = "the node no longer answers for this task: no task 04 (unknown_task)"
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(render_batch_summary(board, out))
    rows = {line.split()[1]: line for line in console.file.getvalue().splitlines()  # type: ignore[attr-defined]
            if line.startswith("│ job")}
    assert "5 jobs: 1 paid with a result" in console.file.getvalue()  # type: ignore[attr-defined]
    assert "paid" in rows["job0"] and f"{out / 'job0'}/ (c.npy)" in rows["job0"] and " 5 " in rows["job0"]
    assert "missed" in rows["job1"] and "missed the execution deadline" in rows["job1"]
    assert "open: running" in rows["job2"] and "still open" in rows["job2"]
    assert "lost at delivered" in rows["job3"] and "unknown_task" in rows["job3"]
    assert "refused" in rows["job4"] and "cannot cover escrow and fee 12 (insufficient_funds)" in rows["job4"]
    assert "-" in rows["job4"].split("│")[2]  # no task


class CountingClient:
    """Answers GET /tasks/{id} from scripted stage lists; each look takes 2 s of the fake clock."""

    def __init__(self, clock: list[float], script: dict[bytes, list[str]]) -> None:
        self.clock = clock
        self.script = script
        self.looks: list[bytes] = []

    def task(self, task_id: bytes) -> TaskView:
        self.looks.append(task_id)
        self.clock[0] += 2.0
        stages = self.script[task_id]
        stage = stages.pop(0) if len(stages) > 1 else stages[0]
        if stage == "gone":
            raise NotFound(f"no task {task_id.hex()}", "unknown_task")
        return view(stage, "expired" if stage == "settled" else None)

    def task_result(self, task_id: bytes) -> dict:
        raise AssertionError("no result is fetched for a task that was not paid")


def test_one_pass_per_interval_and_settled_tasks_leave_it(tmp_path: Path) -> None:
    board = board_of(tmp_path, 4)  # three posted: ids 01.., 02.., 03..
    a, b, c = (bytes([i]) * 32 for i in (1, 2, 3))
    clock = [100.0]
    client = CountingClient(clock, {a: ["bids", "settled"], b: ["gone"], c: ["posted", "running", "settled"]})
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock[0] += s

    shown: list[str] = []
    follow_jobs(client, board, tmp_path / "out", poll_s=1.0, timeout_s=600.0, show=lambda: shown.append("x"),
                clock=lambda: clock[0], sleep=sleep)
    # Pass 1 looks at all three (6 s); b is lost. Pass 2: a settles, c runs (4 s). Pass 3: c settles (2 s).
    assert client.looks == [a, b, c, a, c, c]
    assert sleeps == [6.0, 4.0]  # each wait is as long as the pass before it (more than the 1 s interval)
    assert len(shown) == 3
    assert board.settled == 2 and board.lost == 1 and not board.open_jobs()
    assert "unknown_task" in board.jobs[1].problem


def test_following_stops_at_the_deadline(tmp_path: Path) -> None:
    board = board_of(tmp_path, 2)
    clock = [100.0]
    only = bytes([1]) * 32
    client = CountingClient(clock, {only: ["running"]})
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock[0] += s

    follow_jobs(client, board, tmp_path / "out", poll_s=5.0, timeout_s=12.0, clock=lambda: clock[0], sleep=sleep)
    # Passes end at 102 and 109; the second wait is cut to the deadline (112); the pass after it is the last.
    assert sleeps == [5.0, 3.0] and len(client.looks) == 3 and len(board.open_jobs()) == 1


# ----------------------------------------------------------------- whole runs


async def run_jobs_cli(capsys: pytest.CaptureFixture[str], url: str, jobs: Path, out: Path,
                       *extra: str) -> tuple[int, str, str]:
    return await cli(capsys, "submit", "--api", url, "--jobs", str(jobs), "--max-price", "9", "--out", str(out),
                     "--poll-interval", "0", *extra)


async def test_every_job_paid_writes_every_result_and_exits_0(api: tuple[FakeNode, str], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    jobs = tmp_path / "jobs"
    for i, scale in enumerate((1.0, 2.0, 3.0)):
        write_job(jobs / f"j{i}", scale=scale)
    out = tmp_path / "out"
    code, stdout, err = await run_jobs_cli(capsys, url, jobs, out)
    assert code == 0, err
    assert len(node.submitted) == 3
    for i, scale in enumerate((1.0, 2.0, 3.0)):
        np.testing.assert_allclose(np.load(out / f"j{i}" / "c.npy"), expected_c(scale))
    assert sorted(p.name for p in out.iterdir()) == ["j0", "j1", "j2"]
    lines = stdout.splitlines()
    assert lines[0].startswith("posting 3 tasks via http://127.0.0.1:") and lines[1] == "posted 3 of 3 tasks"
    progress = [line for line in lines if line.startswith("[")]
    assert "settled 0/3  posted 3" in progress[0] and "settled 3/3" in progress[-1] and "paid 3" in progress[-1]
    assert len(progress) == len(set(progress))  # a line only when the counts change
    assert "3 jobs: 3 paid with a result" in stdout and stdout.rstrip().endswith(f"results under {out}/<job name>/")


async def test_a_refused_job_does_not_hold_back_the_others(api: tuple[FakeNode, str], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    jobs = tmp_path / "jobs"
    write_job(jobs / "cheap")
    write_job(jobs / "dear", {"max_price": 100_000})
    write_job(jobs / "fine", scale=2.0)
    out = tmp_path / "out"
    code, stdout, err = await run_jobs_cli(capsys, url, jobs, out)
    assert code == 1
    assert "1 of 3 jobs did not end paid with a result" in one_line(err)
    assert "posted 2 of 3 tasks; 1 refused" in stdout and "not enough funds" in stdout
    assert "insufficient_funds" in stdout and "refused 1" in stdout
    np.testing.assert_allclose(np.load(out / "cheap" / "c.npy"), expected_c())
    np.testing.assert_allclose(np.load(out / "fine" / "c.npy"), expected_c(2.0))
    assert not (out / "dear").exists() and len(node.submitted) == 2


async def test_tasks_that_settle_unpaid_exit_1(api: tuple[FakeNode, str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the summary's cells whole on one line each
    node, url = api
    node.next_outcome = "expired"
    write_job(tmp_path / "jobs" / "a")
    write_job(tmp_path / "jobs" / "b")
    code, stdout, err = await run_jobs_cli(capsys, url, tmp_path / "jobs", tmp_path / "out")
    assert code == 1 and "2 of 2 jobs did not end paid" in one_line(err)
    assert stdout.count("no provider bid within the bid window") == 2 and "expired 2" in stdout
    assert not (tmp_path / "out").exists()


async def test_every_job_refused_exits_2(api: tuple[FakeNode, str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    write_job(tmp_path / "jobs" / "a", {"max_price": 100_000})
    code, stdout, err = await run_jobs_cli(capsys, url, tmp_path / "jobs", tmp_path / "out")
    assert code == 2 and "the node refused every job; a: not enough funds" in one_line(err)
    assert node.submitted == []


async def test_giving_up_prints_the_open_tasks_in_full(api: tuple[FakeNode, str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    node, url = api
    write_job(tmp_path / "jobs" / "a")
    code, stdout, err = await run_jobs_cli(capsys, url, tmp_path / "jobs", tmp_path / "out", "--timeout", "0")
    assert code == 1 and "gave up after 0 s with 1 task(s) still open" in one_line(err)
    (task_id,) = node.tasks
    assert f"a: task {task_id.hex()} at posted" in stdout


async def test_on_a_terminal_one_live_display(api: tuple[FakeNode, str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _, url = api
    screen = io.StringIO()
    monkeypatch.setattr(p2pgpu.submit_batch, "make_console",
                        lambda: Console(file=screen, force_terminal=True, width=100, color_system=None))
    write_job(tmp_path / "jobs" / "a")
    write_job(tmp_path / "jobs" / "b")
    code, _, err = await run_jobs_cli(capsys, url, tmp_path / "jobs", tmp_path / "out")
    assert code == 0, err
    text = screen.getvalue()
    assert "settled 2/2" in text and "100%" in text and "paid 2" in text
    assert "[0:00:" not in text  # no plain progress lines on a terminal
    assert "2 jobs: 2 paid with a result" in text
