"""A client keeps the result it handed out, and the final commitment's result in its place if the provider
replaced its commitment (ClientService.result_ready / _keep_result): journal, pins, real store and journal."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import trio

from ledger.keys import AccountKey
from p2pgpu.blobstore import BlobStore
from p2pgpu.clientservice import ClientRecord, ClientService
from p2pgpu.market import ResultReady
from p2pgpu.market.results import encode_result
from p2pgpu.sealed import EncryptionKey, Purpose, context_id, task_context
from p2pgpu.sealedstore import SealedStore
from p2pgpu.taskjournal import TaskEntry, TaskJournal

CHAIN = b"\x05" * 32
TASK = b"\x07" * 32


def _service(tmp_path: Path) -> ClientService:
    account = AccountKey.from_seed(b"\x42" * 32)
    node = SimpleNamespace(chain_id=CHAIN, keys=SimpleNamespace(account=account))
    store = BlobStore(tmp_path / "blobs")
    sealed = SealedStore(store, EncryptionKey.from_account_key(account))
    nothing = lambda *args: None  # noqa: E731 - ports this test does not reach
    return ClientService(node, store=store, sealed=sealed, access=SimpleNamespace(),  # type: ignore[arg-type]
                         journal=TaskJournal(tmp_path / "tasks"), route=nothing, pin=nothing, unpin_task=nothing,
                         learn_peer=nothing, stream_output=nothing)


def _record(service: ClientService) -> ClientRecord:
    entry = TaskEntry(
        task_id=TASK, post_nonce=1, post_tx=b"tx", spec=b"spec", max_unit_price=100, kind="batch", units=1,
        bid_window=10, exec_blocks=20, audit_rate_bps=0, fee=1, enough_bids=3, max_wait_blocks=5,
        submit_height=1, created_ms=1, inputs=())
    task = SimpleNamespace(task_id=TASK, task=None, delivered=None)
    record = ClientRecord(task=task, inputs={}, entry=entry)  # type: ignore[arg-type]
    service.clients[TASK] = record
    return record


async def _kept(service: ClientService, record: ClientRecord, data: bytes) -> None:
    """Until the journal writer is idle with ``data`` as the task's kept result."""
    with trio.fail_after(10):
        while service._unwritten or service._journal_writing or record.entry is None \
                or record.entry.result is None or record.entry.result.result_hash != hashlib.sha256(data).digest():
            await trio.sleep(0.01)


def _result(value: float) -> tuple[bytes, dict[str, np.ndarray]]:
    outputs = {"c": np.full((4, 4), value, dtype=np.float32)}
    return encode_result(outputs), outputs


async def test_a_result_replaced_by_the_final_commitments_is_kept_in_its_place(tmp_path: Path) -> None:
    service = _service(tmp_path)
    record = _record(service)
    first, first_outputs = _result(1.0)
    final, final_outputs = _result(2.0)
    async with trio.open_nursery() as nursery:
        service._nursery = nursery
        record.task.delivered = first  # type: ignore[attr-defined]
        service.result_ready(ResultReady(TASK, first, first_outputs))
        await _kept(service, record, first)
        first_body = service._result_pins[TASK]
        assert service.store.is_pinned(first_body)
        # the provider's final commitment named another result: the client hands that out instead
        record.task.delivered = final  # type: ignore[attr-defined]
        service.result_ready(ResultReady(TASK, final, final_outputs))
        await _kept(service, record, final)
        nursery.cancel_scope.cancel()
    final_body = service._result_pins[TASK]
    assert final_body != first_body
    assert service.store.is_pinned(final_body) and not service.store.is_pinned(first_body)
    np.testing.assert_array_equal(record.outputs["c"], final_outputs["c"])  # type: ignore[index]
    on_disk = service.journal.read(TASK)
    assert on_disk.result is not None and on_disk.result.result_hash == hashlib.sha256(final).digest()
    context = task_context(CHAIN, TASK, Purpose.RESULT)
    assert service.sealed.open_ref(service.sealed.lookup(on_disk.result.result_hash, context_id(context)),
                                   context=context) == final  # type: ignore[arg-type]


async def test_a_keep_that_finishes_after_its_result_was_replaced_changes_nothing(tmp_path: Path) -> None:
    service = _service(tmp_path)
    record = _record(service)
    first, first_outputs = _result(1.0)
    final, final_outputs = _result(2.0)
    async with trio.open_nursery() as nursery:
        service._nursery = nursery
        record.task.delivered = final  # type: ignore[attr-defined]  # replaced before the first keep ran
        service.result_ready(ResultReady(TASK, first, first_outputs))
        service.result_ready(ResultReady(TASK, final, final_outputs))
        await _kept(service, record, final)
        await trio.sleep(0.2)  # the first keep is done too
        nursery.cancel_scope.cancel()
    assert record.entry.result.result_hash == hashlib.sha256(final).digest()  # type: ignore[union-attr]
    assert service.store.is_pinned(service._result_pins[TASK])
    assert len([h for h in service.store.hashes() if service.store.is_pinned(h)]) == 1
