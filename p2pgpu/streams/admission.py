"""Who may stream a task with us, and when: the provider's admission rule as one pure function."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from ledger.state import Task, TaskStatus
from ledger.transactions import TaskKind

__all__ = ["ADMIT", "WAIT", "Refusal", "SessionPhase", "check_admission"]


class SessionPhase(enum.Enum):
    """Where a provider session (one warm model for one task) stands."""

    LOADING = "loading"
    READY = "ready"
    CONNECTED = "connected"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str
    message: str


WAIT: Final = "wait"
ADMIT: Final = "admit"


def check_admission(peer_address: bytes | None, me: bytes, task_id: bytes, task: Task | None,
                    phase: SessionPhase | None, failure: str = "",
                    failure_code: str = "model_failed") -> Refusal | str:
    """May the peer at ``peer_address`` stream task ``task_id`` with us now: ADMIT, WAIT, or a Refusal.

    WAIT covers our ledger or role lagging the client's (the task unknown or
    still POSTED here, the session not handed over or the model loading):
    the caller waits for the next block or session change. A FAILED
    session is refused with ``failure_code`` (``model_failed``, or
    ``model_unavailable`` for a registered model no holder gave us).
    """
    tid = task_id.hex()[:16]
    if peer_address is None:
        return Refusal("not_entitled", "the peer id does not embed an Ed25519 account key")
    if task is None:
        return WAIT
    if task.client != peer_address:
        return Refusal("not_entitled", f"{peer_address.hex()} is not the client of task {tid}")
    if task.kind != TaskKind.STREAM:
        return Refusal("not_stream", f"task {tid} is a batch task")
    if task.status == TaskStatus.POSTED:
        return WAIT
    if task.provider != me:
        return Refusal("not_assigned", f"task {tid} is not assigned to us")
    if task.status not in (TaskStatus.ASSIGNED, TaskStatus.AUDITING):
        return Refusal("task_closed", f"task {tid} is {TaskStatus(task.status).name.lower()}")
    if phase is None or phase is SessionPhase.LOADING:
        return WAIT
    if phase is SessionPhase.FAILED:
        return Refusal(failure_code, f"task {tid}: {failure}")
    if phase is SessionPhase.CONNECTED:
        return Refusal("busy", f"another connection streams task {tid}")
    if phase is SessionPhase.CLOSED:
        return Refusal("closed", f"the session of task {tid} is closed")
    return ADMIT
