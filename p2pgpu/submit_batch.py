"""``p2pgpu submit --jobs PATH``: post many jobs in one go, follow them all in one display, write every result.

The jobs (layout in :mod:`p2pgpu.jobs`) go out through ``POST /tasks/batch``
(:meth:`ApiClient.submit_many` chunks them); a job the node refuses is
reported, the others go on. Following is one pass over the open tasks per
interval, one ``GET /tasks/{id}`` each over the kept connection, and the
next pass waits at least as long as the last one took, so a thousand open
tasks cost the node at most half its API time, never a busy loop. A task
leaves the pass when it settles; a paid one's outputs are fetched and
written to ``--out DIR/<job name>/`` then (so results already in survive a
timeout or Ctrl-C).

The display is built from :class:`BatchBoard`, plain values, by the
``render_*`` functions (tested by printing into a ``Console`` of a fixed
width): on a terminal one live panel (settled out of posted with a bar,
elapsed and ETA; counts per stage and per outcome); elsewhere (pipes, logs,
tests) one plain line each time those counts change.

Exit codes: 0 when every job was paid and its result written; 1 when any
was not (refused, expired, missed, fraud, lost track, timed out); 2 when
nothing could be posted at all (every job refused, API unreachable) or the
jobs themselves are bad.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from p2pgpu.api.client import ApiUnreachable
from p2pgpu.api.types import OUTCOMES, STAGES, ApiError, TaskView, Unavailable
from p2pgpu.cli import CLIError
from p2pgpu.jobs import Job, JobTerms, load_jobs
from p2pgpu.submit_io import OUTCOME_MESSAGES, api_client, call_api, check_out_dir, make_console, write_outputs

__all__ = ["BatchBoard", "JobProgress", "follow_jobs", "progress_line", "render_batch_progress",
           "render_batch_summary", "run_jobs"]


@dataclass(slots=True)
class JobProgress:
    """One job from submission to its written result: what the display and the summary read."""

    job: Job
    task_id: bytes | None = None
    refusal: ApiError | None = None
    view: TaskView | None = None
    problem: str = ""
    """Why we stopped following a posted task, or why its result was not written."""
    written: tuple[Path, ...] = ()

    @property
    def stage(self) -> str:
        return self.view.stage if self.view is not None else "posted"

    @property
    def is_open(self) -> bool:
        return self.task_id is not None and not self.problem and self.stage != "settled"

    @property
    def is_done(self) -> bool:
        """Paid, and its result on disk."""
        return self.view is not None and self.view.outcome == "paid" and bool(self.written) and not self.problem


@dataclass(slots=True)
class BatchBoard:
    """Every job's progress, in job order; the counts the display shows are computed from it."""

    jobs: list[JobProgress]
    started: float
    """``time.monotonic()`` when the tasks were posted: elapsed and ETA count from here."""

    @classmethod
    def posted(cls, jobs: Sequence[Job], answers: Sequence[bytes | ApiError], started: float) -> BatchBoard:
        board = cls([JobProgress(job) for job in jobs], started)
        for progress, answer in zip(board.jobs, answers, strict=True):
            if isinstance(answer, ApiError):
                progress.refusal = answer
            else:
                progress.task_id = answer
        return board

    def open_jobs(self) -> list[JobProgress]:
        return [j for j in self.jobs if j.is_open]

    @property
    def accepted(self) -> int:
        return sum(j.task_id is not None for j in self.jobs)

    @property
    def refused(self) -> int:
        return sum(j.refusal is not None for j in self.jobs)

    @property
    def settled(self) -> int:
        return sum(j.task_id is not None and j.stage == "settled" for j in self.jobs)

    @property
    def lost(self) -> int:
        """Posted tasks we stopped following (the node forgot them) before they settled."""
        return sum(j.task_id is not None and bool(j.problem) and j.stage != "settled" for j in self.jobs)

    def stage_counts(self) -> dict[str, int]:
        """Posted tasks by the stage they are at now (lost ones at their last known stage)."""
        counts = Counter(j.stage for j in self.jobs if j.task_id is not None)
        return {stage: counts.get(stage, 0) for stage in STAGES}

    def outcome_counts(self) -> dict[str, int]:
        counts = Counter(j.view.outcome for j in self.jobs if j.view is not None and j.view.outcome)
        return {outcome: counts[outcome] for outcome in OUTCOMES if counts.get(outcome)}

    def eta_s(self, now: float) -> float | None:
        """Seconds left at the average pace so far (elapsed per settled task); None before the first settles."""
        settled = self.settled
        remaining = self.accepted - settled - self.lost
        if not settled or remaining <= 0:
            return None if remaining > 0 else 0.0
        return (now - self.started) / settled * remaining

    def signature(self) -> tuple[Any, ...]:
        """What the plain progress lines report; a line is printed only when it changes."""
        return (tuple(self.stage_counts().values()), tuple(self.outcome_counts().items()), self.lost)


# ----------------------------------------------------------------- rendering


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _counts_text(board: BatchBoard) -> Text:
    line = Text()
    for i, (stage, n) in enumerate(board.stage_counts().items()):
        if i:
            line.append("  ")
        line.append(f"{stage} ", style="dim").append(str(n), style="bold" if n else "dim")
    outcomes = board.outcome_counts()
    extra = [(name, n, "green" if name == "paid" else "red") for name, n in outcomes.items()]
    if board.refused:
        extra.append(("refused", board.refused, "red"))
    if board.lost:
        extra.append(("lost", board.lost, "red"))
    if extra:
        line.append("   |  ", style="dim")
        for i, (name, n, style) in enumerate(extra):
            if i:
                line.append("  ")
            line.append(f"{name} ", style=style).append(str(n), style=f"bold {style}")
    return line


def render_batch_progress(board: BatchBoard, now: float) -> Group:
    """The live view: settled out of posted as a bar, elapsed and ETA; then tasks per stage and per outcome."""
    total = board.accepted
    settled = board.settled
    head = Table.grid(padding=(0, 1))
    head.add_column(no_wrap=True)
    head.add_column(ratio=1)
    head.add_column(no_wrap=True, justify="right")
    percent = 100.0 * settled / total if total else 100.0
    head.add_row(Text(f"settled {settled}/{total}", style="bold"),
                 ProgressBar(total=max(total, 1), completed=settled if total else 1),
                 Text(f"{percent:3.0f}%  elapsed {_clock(now - board.started)}  ETA {_clock(board.eta_s(now))}"))
    return Group(head, _counts_text(board))


def progress_line(board: BatchBoard, now: float) -> str:
    """One plain line of the same facts, for output that is not a terminal."""
    counts = "  ".join(f"{stage} {n}" for stage, n in board.stage_counts().items())
    tail = [f"{name} {n}" for name, n in board.outcome_counts().items()]
    if board.refused:
        tail.append(f"refused {board.refused}")
    if board.lost:
        tail.append(f"lost {board.lost}")
    return (f"[{_clock(now - board.started)}] settled {board.settled}/{board.accepted}  {counts}"
            + (f"  | {'  '.join(tail)}" if tail else "") + f"  ETA {_clock(board.eta_s(now))}")


def _short(data: bytes | None) -> str:
    return "-" if data is None else data.hex()[:12] + "…"


def _what_happened(j: JobProgress, out: Path) -> tuple[Text, Text]:
    """(outcome cell, result cell) of one summary row."""
    if j.refusal is not None:
        return Text("refused", style="red"), Text(f"{j.refusal.message} ({j.refusal.code})")
    view = j.view
    if j.is_done:
        return Text("paid", style="green"), Text(f"{out / j.job.name}/ ({', '.join(p.name for p in j.written)})")
    if view is not None and view.outcome == "paid":  # paid, but the result did not reach the disk
        return Text("paid", style="yellow"), Text(j.problem or "no result written", style="red")
    if view is not None and view.outcome:
        template = OUTCOME_MESSAGES.get(view.outcome, "task {tid} settled with outcome {outcome}")
        text = template.format(tid="", provider=_short(view.provider), outcome=view.outcome)
        return Text(view.outcome, style="red"), Text(text.removeprefix("task  "))  # the id has its own column
    if j.problem:
        return Text(f"lost at {j.stage}", style="red"), Text(j.problem)
    return Text(f"open: {j.stage}", style="yellow"), Text("still open when we stopped waiting; it goes on")


def render_batch_summary(board: BatchBoard, out: Path) -> Table:
    """One row per job: its task, what happened, the price paid, and where its result is (or why not)."""
    table = Table(title=f"{len(board.jobs)} jobs: {sum(j.is_done for j in board.jobs)} paid with a result",
                  title_justify="left", header_style="bold")
    table.add_column("job", overflow="fold")
    table.add_column("task", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("price", justify="right", no_wrap=True)
    table.add_column("result", overflow="fold")
    for j in board.jobs:
        outcome, result = _what_happened(j, out)
        price = j.view.unit_price if j.view is not None and j.view.unit_price is not None else None
        table.add_row(j.job.name, _short(j.task_id), outcome, "-" if price is None else str(price), result)
    return table


# ----------------------------------------------------------------- following


def _fetch_and_write(client: Any, j: JobProgress, task_id: bytes, out: Path) -> None:
    try:
        outputs = client.task_result(task_id)
        j.written = tuple(write_outputs(out / j.job.name, outputs))
    except ApiError as exc:
        j.problem = f"paid, but fetching the result failed: {exc.message} ({exc.code})"
    except CLIError as exc:  # the writer's own words: cannot create or write a file
        j.problem = str(exc)


def follow_jobs(client: Any, board: BatchBoard, out: Path, *, poll_s: float, timeout_s: float,
                show: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], None] = time.sleep) -> None:
    """Poll every open task once per pass until none is open or ``timeout_s`` has passed; ``show`` after each pass.

    Raises :class:`p2pgpu.api.client.ApiUnreachable` when the API stops
    answering (the caller prints what is known, then exits 2).
    """
    deadline = board.started + timeout_s
    while True:
        began = clock()
        for j in board.open_jobs():
            task_id = j.task_id or b""  # open jobs are posted ones
            try:
                j.view = client.task(task_id)
            except Unavailable:
                continue  # the node is starting or catching up: ask again next pass
            except ApiError as exc:
                j.problem = f"the node no longer answers for this task: {exc.message} ({exc.code})"
                continue
            if j.view.stage == "settled" and j.view.outcome == "paid":
                _fetch_and_write(client, j, task_id, out)
        show()
        if not board.open_jobs() or clock() >= deadline:
            return
        # At least the interval, and at least as long as the pass took: the node answers other callers too.
        sleep(min(max(poll_s, clock() - began), max(deadline - clock(), 0.0)))


# ----------------------------------------------------------------- the command


def run_jobs(args: argparse.Namespace) -> int:
    given = [flag for flag, value in (("--input", args.input), ("--stream", args.stream), ("--units", args.units))
             if value not in (None, [])]
    if given:
        raise CLIError(f"{', '.join(given)} describe one job; with --jobs each job's entry gives its own "
                       "(see 'p2pgpu submit --help')")
    if args.max_price is not None and args.max_price < 1:
        raise CLIError("--max-price must be at least 1")
    if args.bid_window < 1:
        raise CLIError("--bid-window must be at least 1")
    if not 0.0 <= args.audit_rate <= 1.0:
        raise CLIError(f"--audit-rate {args.audit_rate} is not in [0, 1]")
    out: Path = args.out
    check_out_dir(out, args.force)
    jobs = load_jobs(args.jobs, JobTerms(args.max_price, args.bid_window, args.audit_rate))
    console: Console = make_console()
    live = console.is_terminal
    with api_client(args) as client:
        console.print(f"posting {len(jobs)} tasks via {client.base_url}", soft_wrap=True)

        def posted(answered: int, total: int) -> None:
            if answered < total and not live:
                console.print(f"  answered {answered}/{total}")

        answers = call_api(lambda: client.submit_many([job.request for job in jobs], progress=posted))
        board = BatchBoard.posted(jobs, answers, time.monotonic())
        if not board.accepted:
            console.print(render_batch_summary(board, out))
            first = board.jobs[0]
            reason = f"{first.refusal.message} ({first.refusal.code})" if first.refusal else "no answer"
            raise CLIError(f"the node refused every job; {first.job.name}: {reason}")
        console.print(f"posted {board.accepted} of {len(jobs)} tasks"
                      + (f"; {board.refused} refused (see the summary)" if board.refused else ""), soft_wrap=True)
        try:
            _follow_with_display(client, board, out, console, args)
        except ApiUnreachable as exc:
            console.print(render_batch_summary(board, out))
            _print_open(console, board)
            raise CLIError(f"{exc}; the posted tasks go on: follow them with 'p2pgpu task show ID'") from None
    console.print(render_batch_summary(board, out))
    _print_open(console, board)
    failed = len(board.jobs) - sum(j.is_done for j in board.jobs)
    still_open = len(board.open_jobs())
    if still_open:
        raise CLIError(f"gave up after {args.timeout:g} s with {still_open} task(s) still open; they go on: "
                       "follow them with 'p2pgpu task show ID'", exit_code=1)
    if failed:
        raise CLIError(f"{failed} of {len(board.jobs)} jobs did not end paid with a result (see the summary)",
                       exit_code=1)
    console.print(f"every job paid; results under {out}/<job name>/", soft_wrap=True)
    return 0


def _follow_with_display(client: Any, board: BatchBoard, out: Path, console: Console,
                         args: argparse.Namespace) -> None:
    if console.is_terminal:
        from rich.live import Live

        with Live(get_renderable=lambda: render_batch_progress(board, time.monotonic()), console=console,
                  refresh_per_second=4):
            follow_jobs(client, board, out, poll_s=args.poll_interval, timeout_s=args.timeout)
        return
    shown: list[tuple[Any, ...]] = []

    def show() -> None:
        if not shown or shown[-1] != board.signature():
            shown.append(board.signature())
            console.print(progress_line(board, time.monotonic()), soft_wrap=True, markup=False)

    show()
    follow_jobs(client, board, out, poll_s=args.poll_interval, timeout_s=args.timeout, show=show)


def _print_open(console: Console, board: BatchBoard) -> None:
    """Full ids of the tasks that still need following (the summary shows short ones)."""
    for j in board.jobs:
        if j.task_id is not None and j.stage != "settled":
            console.print(f"{j.job.name}: task {j.task_id.hex()} at {j.stage}", soft_wrap=True)
