"""``/p2pgpu/stream/1`` records and admission rules, without a network."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from ledger.codec import DecodeError
from ledger.keys import AccountKey
from ledger.state import Task, TaskStatus
from ledger.transactions import StreamOutput, StreamReceipt, TaskKind
from p2pgpu.market import StreamError, sign_receipt, sign_stream_output
from p2pgpu.streams import (
    ADMIT,
    REJECTION_CODES,
    WAIT,
    Refusal,
    SessionPhase,
    StreamAck,
    StreamHello,
    StreamInput,
    StreamReady,
    StreamResult,
    check_admission,
    decode_message,
    encode_message,
    refusal_code,
    stream_items,
)

CHAIN = b"\x07" * 32
TASK = b"\x11" * 32
CLIENT, PROVIDER, OTHER = (AccountKey.from_seed(bytes([i]) * 32) for i in (0x61, 0x62, 0x63))


def task(status: TaskStatus = TaskStatus.ASSIGNED, kind: TaskKind = TaskKind.STREAM,
         provider: bytes | None = PROVIDER.address) -> Task:
    return Task(task_id=TASK, client=CLIENT.address, kind=kind, spec_hash=b"\0" * 32, requirements=b"",
                max_unit_price=10, units=8, audit_rate_bps=0, exec_blocks=50, status=status, outcome=0, escrow=0,
                audit_fee=0, post_height=1, bid_deadline=5, provider=provider, unit_price=5)


def every_message():
    item = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = sign_stream_output(PROVIDER, CHAIN, StreamOutput(TASK, 3, b"\1" * 32, b"\2" * 32))
    receipt = sign_receipt(CLIENT, CHAIN, StreamReceipt(task_id=TASK, units=4))
    return [StreamHello(TASK), StreamReady(TASK, 4, 12, 0), StreamInput(3, item), StreamResult(item[0], out),
            StreamAck(receipt)]


@pytest.mark.parametrize("msg", every_message(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg) -> None:
    back = decode_message(encode_message(msg))
    assert type(back) is type(msg)
    for name in msg.__dataclass_fields__:
        a, b = getattr(msg, name), getattr(back, name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        else:
            assert a == b


def raw(*fields) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


@pytest.mark.parametrize("data, where", [
    (b"\xc1garbage", "malformed MessagePack"),
    (raw(9, TASK), "unknown StreamMessage type 9"),
    (raw(1), "missing field 'task_id'"),
    (raw(1, TASK, 5), "1 extra field"),
    (raw(1, b"\x11" * 31), "StreamHello.task_id: expected exactly 32 bytes"),
    (raw(3, -1, msgpack.ExtType(1, b"\x0a\x01\x01\x00\x00\x00" + b"\0" * 4)), "StreamInput.index"),
    (raw(3, 0, b"not a tensor"), "StreamInput.item: expected extension type 1"),
    (raw(3, 0, msgpack.ExtType(1, b"\x63\x00")), "StreamInput.item: unknown tensor dtype code 99"),
    (raw(3, 0, msgpack.ExtType(1, b"\x0a\x01\x04\x00\x00\x00" + b"\0" * 8)), "truncated tensor data"),
    (raw(2, TASK, 2**32, 1, 0), "StreamReady.receipt_every"),
    (b"\x92\xcc\x01\xc4\x20" + TASK, "non-canonical"),  # the tag 1 spelled as a uint8
])
def test_bad_frames_are_refused_naming_the_problem(data: bytes, where: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_message(data)
    assert where in str(info.value)


def test_refusal_code_is_read_back_from_the_error_frame_text() -> None:
    text = "peer 12D3 on /p2pgpu/stream/1 failed: bad request: not_entitled: 00ab is not the client of task 11"
    assert refusal_code(text) == "not_entitled"
    assert refusal_code("peer x failed: timeout") is None
    assert refusal_code("bad request: made_up: x") is None


@pytest.mark.parametrize("peer, t, phase, expected", [
    (None, task(), SessionPhase.READY, "not_entitled"),
    (CLIENT.address, None, None, WAIT),                                  # our ledger lags the client's
    (OTHER.address, task(), SessionPhase.READY, "not_entitled"),
    (CLIENT.address, task(kind=TaskKind.BATCH), SessionPhase.READY, "not_stream"),
    (CLIENT.address, task(TaskStatus.POSTED, provider=None), None, WAIT),
    (CLIENT.address, task(provider=OTHER.address), None, "not_assigned"),
    (CLIENT.address, task(TaskStatus.SETTLED), SessionPhase.READY, "task_closed"),
    (CLIENT.address, task(), None, WAIT),                                 # our role has not handed it over yet
    (CLIENT.address, task(), SessionPhase.LOADING, WAIT),
    (CLIENT.address, task(), SessionPhase.FAILED, "model_failed"),
    (CLIENT.address, task(), SessionPhase.CONNECTED, "busy"),
    (CLIENT.address, task(), SessionPhase.CLOSED, "closed"),
    (CLIENT.address, task(), SessionPhase.READY, ADMIT),
])
def test_admission(peer, t, phase, expected) -> None:
    verdict = check_admission(peer, PROVIDER.address, TASK, t, phase, "ModelError: no")
    if isinstance(verdict, Refusal):
        assert verdict.code == expected, verdict
    else:
        assert verdict == expected


def test_a_failed_session_is_refused_with_its_failure_code() -> None:
    verdict = check_admission(CLIENT.address, PROVIDER.address, TASK, task(), SessionPhase.FAILED,
                              "ModelUnavailable: no holder", "model_unavailable")
    assert isinstance(verdict, Refusal) and verdict.code == "model_unavailable"
    assert "model_unavailable" in REJECTION_CODES


def test_items_are_the_rows_of_the_items_input() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    rows = stream_items({"model": np.zeros(2, np.uint8), "items": x})
    assert len(rows) == 3 and all(np.array_equal(r, x[i]) for i, r in enumerate(rows))
    assert stream_items({"model": np.zeros(2, np.uint8)}) == []
    with pytest.raises(StreamError, match="one item per row"):
        stream_items({"items": np.float32(1.0)})
