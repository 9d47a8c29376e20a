"""The operations as step sequences, driven by hand: no HTTP, no clock but the one the steps ask for."""

from __future__ import annotations

import json
from typing import Any

import pytest

from p2pgpu.api.types import TaskView, encode_result, task_view_json
from p2pgpu.client import _ops
from p2pgpu.client._ops import Call, Notify, Reply, ResultCache, Sleep
from p2pgpu.client.errors import NodeUnreachable, TaskNotFound

TID = "ab" * 32


def view_reply(stage: str) -> Reply:
    body = task_view_json(TaskView(task_id=bytes.fromhex(TID), stage=stage))  # type: ignore[arg-type]
    return Reply(200, {}, json.dumps(body).encode())


def test_wait_long_polls_before_delivery_and_keeps_the_result() -> None:
    cache = ResultCache()
    seen: list[str] = []
    op = _ops.wait(TID, cache, timeout=None, poll=2.0, until="settled", on_progress=lambda v: seen.append(v.stage))
    step: Any = op.send(None)
    assert step == Call("GET", f"/tasks/{TID}")
    step = op.send(view_reply("assigned"))
    assert isinstance(step, Notify)
    step.callback(step.view)
    step = op.send(None)
    assert step.path == f"/tasks/{TID}/result" and step.params == {"wait": "2.000"} and step.ok == (200, 409)
    assert step.extra_timeout == 2.0  # the request may take the client's timeout plus the wait
    step = op.send(Reply(200, {}, encode_result(bytes.fromhex(TID), {})))
    assert step == Call("GET", f"/tasks/{TID}")  # result in: look again at once
    step = op.send(view_reply("delivered"))
    step.callback(step.view)
    assert op.send(None) == Sleep(2.0)  # after delivery: the view every poll, no more long polls
    assert op.send(None) == Call("GET", f"/tasks/{TID}")
    step = op.send(view_reply("settled"))
    step.callback(step.view)
    with pytest.raises(StopIteration) as stop:
        op.send(None)
    assert stop.value.value.stage == "settled" and seen == ["assigned", "delivered", "settled"]
    assert cache.pop(TID) == {} and cache.pop(TID) is None


def test_wait_does_not_spin_when_the_long_poll_answers_at_once() -> None:
    op = _ops.wait(TID, ResultCache(), timeout=None, poll=5.0, until="settled", on_progress=None)
    op.send(None)
    step = op.send(view_reply("posted"))
    assert isinstance(step, Call) and step.params is not None
    step = op.send(Reply(409, {}, b""))  # at once, not after 5 s
    assert isinstance(step, Sleep) and 2.5 < step.seconds <= 5.0


def test_errors_thrown_into_operations() -> None:
    op = _ops.server_live()
    op.send(None)
    with pytest.raises(StopIteration) as stop:
        op.throw(NodeUnreachable("nothing there", url="http://x"))
    assert stop.value.value is False
    op2 = _ops.wait(TID, ResultCache(), timeout=None, poll=1.0, until="settled", on_progress=None)
    op2.send(None)
    with pytest.raises(TaskNotFound):
        op2.throw(TaskNotFound("no task", status=404))


def test_result_cache_is_bounded() -> None:
    cache = ResultCache(size=3)
    for i in range(5):
        cache.put(str(i), {})
    assert len(cache) == 3 and cache.pop("0") is None and cache.pop("4") == {}

