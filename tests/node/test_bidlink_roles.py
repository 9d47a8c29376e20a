"""What the market roles take from a bid link: a commitment hint only as its provider's own CommitResult."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from types import SimpleNamespace

import pytest

from ledger.devtools import dev_account_key
from ledger.transactions import CommitResult, Transfer
from ledger.transition import sign_transaction
from p2pgpu.dataplane import peer_id_of_account_key
from p2pgpu.net import ProtocolError
from p2pgpu.linkdata import LinkData
from p2pgpu.sealed import context_id
from p2pgpu.roles import MarketRoles

CHAIN = bytes(32)


def roles_with_hints() -> tuple[SimpleNamespace, list]:
    hints: list = []
    fake = SimpleNamespace(counters=defaultdict(int), on_pending_tx=hints.append)
    return fake, hints


def commit(key, task_id: bytes = b"\x07" * 32):
    body = CommitResult(sender=key.address, nonce=3, fee=1, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=5)
    return sign_transaction(key, CHAIN, body)


def test_a_providers_own_commitment_from_its_own_peer_is_taken_as_a_hint() -> None:
    provider = dev_account_key("p0")
    fake, hints = roles_with_hints()
    stx = commit(provider)
    MarketRoles._commitment_from_link(fake, peer_id_of_account_key(provider.public_key), stx.encode())  # type: ignore[arg-type]
    assert hints == [stx] and fake.counters["bid_link_commitments"] == 1


@pytest.mark.parametrize("case", ["garbage", "someone_elses", "not_a_commitment"])
def test_anything_else_on_a_link_ends_it_naming_the_problem(case: str) -> None:
    provider, other = dev_account_key("p0"), dev_account_key("p1")
    peer = peer_id_of_account_key(provider.public_key)
    data = {
        "garbage": b"\x93not a transaction",
        # another provider's CommitResult relayed by p0: a link speaks only for its own provider
        "someone_elses": commit(other).encode(),
        "not_a_commitment": sign_transaction(provider, CHAIN, Transfer(sender=provider.address, nonce=0, fee=1,
                                                                        to=other.address, amount=5)).encode(),
    }[case]
    fake, hints = roles_with_hints()
    with pytest.raises(ProtocolError, match="no signed transaction|own CommitResult"):
        MarketRoles._commitment_from_link(fake, peer, data)  # type: ignore[arg-type]
    assert hints == [] and fake.counters["bid_link_commitments"] == 0


def test_a_bid_on_a_link_is_judged_as_gossip_is_and_a_bad_one_costs_its_peer() -> None:
    from p2pgpu.net import accept, ignore, reject

    penalties: list = []
    bids: list = []
    verdicts = {b"good": accept(SimpleNamespace(signed="signed-bid", start=None)),
                b"forged": reject("bad_signature"), b"late": ignore("expired")}
    fake = SimpleNamespace(
        counters=defaultdict(int), validate_bid=lambda peer, data: verdicts[data],
        node=SimpleNamespace(network=SimpleNamespace(penalize=lambda *a: penalties.append(a))),
        _bid_arrived=lambda signed, start: bids.append(signed), _decline_arrived=lambda notice: None)
    for data in (b"good", b"forged", b"late"):
        MarketRoles._bid_from_link(fake, "peer-p0", data)  # type: ignore[arg-type]
    assert bids == ["signed-bid"]
    assert penalties == [("peer-p0", "/p2pgpu/bidlink/1", "bad_signature")]
    assert dict(fake.counters) == {"bid_link_accepted": 1, "bid_link_rejected": 1, "bid_link_ignored": 1}


def link_data(**parts: object) -> LinkData:
    """A :class:`LinkData` whose ports are fakes (only what a test names does anything)."""
    ports: dict = dict(chain_id=CHAIN, sealed=None, store=None, dataplane=None, bid_links=None, client_links=None,
                       provider=lambda: None, clients=lambda: {}, peer_of=lambda address: None,
                       post=lambda target, event: None, spawn=lambda fn, *args: None, counters=defaultdict(int))
    ports.update(parts)
    return LinkData(**ports)


def test_an_inputs_push_is_taken_only_for_a_task_we_bid_on_for_that_client_and_only_its_inputs() -> None:
    from ledger.codec import encode
    from p2pgpu.bidlink import InputsPush, PushedInput

    client, other = dev_account_key("c0"), dev_account_key("c1")
    task, name = b"\x07" * 32, b"\x01" * 32
    spawned: list = []

    class Provider:
        def pushable_inputs(self, task_id: bytes, who: bytes) -> frozenset[bytes] | None:
            return frozenset({name}) if (task_id, who) == (task, client.address) else None

    fake = link_data(provider=lambda: Provider(), spawn=lambda fn, *args: spawned.append(args))

    def push(task_id: bytes, *names: bytes) -> bytes:
        return encode(InputsPush(task_id, tuple(PushedInput(n, b"h", b"b") for n in names)))

    peer = peer_id_of_account_key(client.public_key)
    fake.inputs_from_link(peer, push(task, name))
    assert len(spawned) == 1 and spawned[0][0] == peer
    # another client's peer, or a task we take no push for (not ours, or already fetched): dropped, counted
    fake.inputs_from_link(peer_id_of_account_key(other.public_key), push(task, name))
    fake.inputs_from_link(peer, push(b"\x08" * 32, name))
    assert len(spawned) == 1 and fake.counters["inputs_push_unexpected"] == 2
    # an input the task's spec does not name, or bytes that are no push: the link ends, naming why
    with pytest.raises(ProtocolError, match="names an input its spec does not"):
        fake.inputs_from_link(peer, push(task, name, b"\x02" * 32))
    with pytest.raises(ProtocolError, match="does not decode"):
        fake.inputs_from_link(peer, b"\x93junk")
    assert len(spawned) == 1


async def test_a_result_push_is_kept_only_from_the_tasks_provider_once_and_a_bad_one_is_refused() -> None:
    from ledger.codec import encode
    from p2pgpu.bidlink import PushedInput, ResultPush
    from p2pgpu.dataplane import IntegrityError
    from p2pgpu.sealed import SealedHeader

    provider, other = dev_account_key("p0"), dev_account_key("p1")
    task_id = b"\x07" * 32
    kept: list = []

    expected: list = []
    settled: list = []

    class Plane:
        def expect_push(self, name, context) -> None:
            expected.append(name)

        def push_settled(self, name, context) -> None:
            settled.append(name)

        async def accept_pushed_sealed(self, peer, name, *, context, header, body) -> bool:
            if body == b"tampered":
                raise IntegrityError("does not hash to its header's content hash")
            kept.append((peer, name, header, body))
            return True

    header = SealedHeader(version=1, content_hash=b"\x02" * 32, recipients=()).to_bytes()
    task = SimpleNamespace(chosen=SimpleNamespace(bid=SimpleNamespace(provider=provider.address)), task=None)
    record = SimpleNamespace(task=task, result_pushed=False, outputs=None)
    spawned: list = []
    fake = link_data(clients=lambda: {task_id: record}, dataplane=Plane(), spawn=lambda fn, *a: spawned.append((fn, a)))

    async def result_from_link(peer: str, payload: bytes) -> None:
        """The link reader's call, then the keeping it started (the node's nursery runs it)."""
        fake.result_from_link(peer, payload)
        while spawned:
            fn, args = spawned.pop(0)
            await fn(*args)

    def push(body: bytes = b"sealed", task: bytes = task_id) -> bytes:
        return encode(ResultPush(task, PushedInput(b"\x0a" * 32, header, body)))

    peer, other_peer = peer_id_of_account_key(provider.public_key), peer_id_of_account_key(other.public_key)
    await result_from_link(other_peer, push())  # not its provider
    await result_from_link(peer, push(task=b"\x08" * 32))  # not ours
    assert kept == [] and fake.counters["result_push_unexpected"] == 2
    await result_from_link(peer, push())
    assert len(kept) == 1 and kept[0][0] == peer and fake.counters["result_push_accepted"] == 1
    await result_from_link(peer, push())  # one push per task
    assert len(kept) == 1 and fake.counters["result_push_unexpected"] == 3
    # a push that does not check out is refused (the data plane counts and charges it); the fetch does the rest
    record.result_pushed = False
    await result_from_link(peer, push(b"tampered"))
    assert fake.counters["result_push_refused"] == 1 and len(kept) == 1
    with pytest.raises(ProtocolError, match="result push does not decode"):
        await result_from_link(peer, b"\x93junk")
    assert expected == [b"\x0a" * 32] * 2, "each push taken is announced before it is kept (the hint's fetch waits)"
    # a push whose header does not parse never reaches the data plane: the fetch waiting for it is let go
    record.result_pushed = False
    await result_from_link(peer, encode(ResultPush(task_id, PushedInput(b"\x0a" * 32, b"\x93bad", b"sealed"))))
    assert len(expected) == 3 and settled == [b"\x0a" * 32] * 2 and fake.counters["result_push_refused"] == 2


async def test_a_result_prepared_ahead_goes_out_with_its_hint_at_once_and_only_for_that_commitment(tmp_path) -> None:
    """An early run's result is sealed and wrapped for the client before the assignment is final
    (``PrepareResult``), so ``commit_sent`` sends it with the hint without a worker-thread hop; a prepared push
    that does not match the commitment (another result, another client key) is never sent."""
    from p2pgpu.blobstore import BlobStore
    from p2pgpu.sealed import EncryptionKey, Purpose, SealedBlob, SealedHeader, open_sealed, task_context
    from p2pgpu.sealedstore import SealedStore

    provider, client = dev_account_key("p0"), dev_account_key("c0")
    client_key = EncryptionKey.from_account_key(client)
    store = BlobStore(tmp_path / "blobs")
    sealed = SealedStore(store, EncryptionKey.from_account_key(provider))
    sent: list = []
    spawned: list = []
    links = SimpleNamespace(client_key=lambda peer: client_key.public_key,
                            send_result=lambda peer, push: sent.append(("result", push)) or True,
                            send_commitment=lambda peer, tx: sent.append(("hint", tx)))
    fake = link_data(sealed=sealed, store=store, bid_links=links, peer_of=lambda address: "client-peer",
                     spawn=lambda fn, *args: spawned.append(args))
    task_id, data = b"\x07" * 32, b"the result bytes"
    result_hash = hashlib.sha256(data).digest()
    await fake.prepare_result(task_id, client.address, result_hash, data)
    assert sealed.known(result_hash, context_id(task_context(CHAIN, task_id, Purpose.RESULT))) is not None

    other = CommitResult(sender=provider.address, nonce=1, fee=1, task_id=task_id, result_hash=b"\x09" * 32, exec_ms=1)
    fake.commit_sent("client-peer", other, b"signed-other")  # not the prepared result: built the usual way
    assert sent == [] and len(spawned) == 1
    await fake.prepare_result(task_id, client.address, result_hash, data)
    body = CommitResult(sender=provider.address, nonce=1, fee=1, task_id=task_id, result_hash=result_hash, exec_ms=1)
    fake.commit_sent("client-peer", body, b"signed")
    assert [kind for kind, _ in sent] == ["result", "hint"] and len(spawned) == 1
    push = sent[0][1]
    header = SealedHeader.from_bytes(push.result.header)
    opened = open_sealed(SealedBlob(header.content_hash, header, push.result.body), client_key,
                         context=task_context(CHAIN, task_id, Purpose.RESULT))
    assert opened == data and fake.counters["result_push_prepared"] == 1
    fake.commit_sent("client-peer", body, b"signed")  # taken once: a second commit of it builds anew
    assert len(spawned) == 2
