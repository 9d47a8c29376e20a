"""The royalty a task's view reports as paid, read from the ledger's task: a stream's per claimed unit, a batch's
only once it settled PAID."""

from __future__ import annotations

from dataclasses import replace

from ledger.state import Task, TaskOutcome, TaskStatus
from ledger.transactions import TaskKind
from p2pgpu.clientservice import royalty_paid

BASE = Task(task_id=b"\x01" * 32, client=b"\x02" * 20, kind=TaskKind.BATCH, spec_hash=b"\x03" * 32, requirements=b"",
            max_unit_price=10, units=1, audit_rate_bps=0, exec_blocks=5, status=TaskStatus.ASSIGNED,
            outcome=TaskOutcome.NONE, escrow=20, audit_fee=0, post_height=1, bid_deadline=3,
            model_id=b"\x04" * 32, royalty_per_unit=7)


def test_a_batch_pays_its_royalty_only_when_settled_paid() -> None:
    assert royalty_paid(BASE) == 0
    assert royalty_paid(replace(BASE, status=TaskStatus.SETTLED, outcome=TaskOutcome.PAID)) == 7
    for outcome in (TaskOutcome.FRAUD, TaskOutcome.MISSED, TaskOutcome.EXPIRED, TaskOutcome.CANCELLED):
        assert royalty_paid(replace(BASE, status=TaskStatus.SETTLED, outcome=outcome)) == 0


def test_a_stream_pays_per_claimed_unit_and_a_task_without_a_model_pays_none() -> None:
    stream = replace(BASE, kind=TaskKind.STREAM, units=10, claimed_units=4)
    assert royalty_paid(stream) == 28
    assert royalty_paid(replace(stream, status=TaskStatus.SETTLED, outcome=TaskOutcome.PAID, claimed_units=10)) == 70
    assert royalty_paid(replace(stream, model_id=None, royalty_per_unit=0)) == 0
