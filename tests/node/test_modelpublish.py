"""The pusher's side of the registry (``POST /models`` on a node): each refusal comes before anything is signed,
stored or paid; a good push stores the bundle as a public pinned blob and sends RegisterModel; its status is
read off the ledger (pending, registered at a height, failed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from kernels.bundle import decode_bundle, encode_bundle, load_model_file, model_id
from ledger.devtools import DevChain, make_dev_network
from ledger.mempool import MempoolRejected, RejectReason
from ledger.params import Params
from ledger.transactions import RegisterModel, TensorSignature
from p2pgpu.api.types import BadRequest, NotFound, NotReady, PaymentRequired, PushModelRequest, Unprocessable
from p2pgpu.blobaccess import ANY_PEER, BlobAccess
from p2pgpu.blobstore import BlobStore
from p2pgpu.market import TxFailed
from p2pgpu.modelpublish import ModelPublisher, registration_cost
from tests.kernels.test_bundle import keras_file

NETWORK = make_dev_network(clients=("c0", "c1"), params=Params(epoch_length=8, committee_size=4))


@dataclass
class FakeOutbox:
    """Signs with the dev key of ``name``; ``refuse`` makes the mempool refuse."""

    chain: DevChain
    name: str = "c0"
    refuse: RejectReason | None = None
    sent: list[RegisterModel] = field(default_factory=list)

    def send(self, origin: object, body: RegisterModel):
        if self.refuse is not None:
            raise MempoolRejected(self.refuse, "refused")
        from dataclasses import replace

        body = replace(body, nonce=self.chain.nonce(self.name) + len(self.sent))
        self.sent.append(body)
        return self.chain.sign(self.name, body)


@dataclass
class Pusher:
    chain: DevChain
    store: BlobStore
    access: BlobAccess
    outbox: FakeOutbox
    publisher: ModelPublisher
    bundle: bytes


@pytest.fixture
def pusher(tmp_path: Path) -> Pusher:
    chain = DevChain(NETWORK)
    store = BlobStore(tmp_path / "blobs")
    access = BlobAccess(lambda task_id, address: None)
    outbox = FakeOutbox(chain)
    me = NETWORK.address("c0")
    publisher = ModelPublisher(store=store, access=access, outbox=outbox, me=me,  # type: ignore[arg-type]
                               state=lambda: chain.state, available=lambda s: s.get_balance(me))
    bundle = encode_bundle(load_model_file(keras_file(tmp_path)))
    return Pusher(chain, store, access, outbox, publisher, bundle)


def push(p: Pusher, **kw) -> object:
    fields = dict(bundle=p.bundle, name="mnist", version="1", royalty_per_unit=3)
    fields.update(kw)
    return trio.run(p.publisher.push, PushModelRequest(**fields))  # type: ignore[arg-type]


def nothing_done(p: Pusher) -> None:
    assert p.outbox.sent == [] and p.store.hashes() == [] and not p.access.allowed


def test_a_push_stores_a_public_pinned_blob_sends_register_model_and_becomes_registered(pusher: Pusher) -> None:
    view = push(pusher)
    bundle = decode_bundle(pusher.bundle)
    mid = model_id(bundle)
    assert view.model_id == mid and view.status == "pending"
    assert pusher.store.get(mid) == pusher.bundle and pusher.store.is_pinned(mid)
    assert pusher.access.entitled("peer", b"\x09" * 20, mid)  # any peer may fetch it
    (body,) = pusher.outbox.sent
    assert (body.model_id, body.name, body.version, body.royalty_per_unit, body.bundle_size) == (
        mid, "mnist", "1", 3, len(pusher.bundle))
    assert body.input == TensorSignature(bundle.input.dtype, tuple(bundle.input.shape))
    assert body.output == TensorSignature(bundle.output.dtype, tuple(bundle.output.shape))
    pusher.chain.produce([pusher.chain.sign("c0", body)])
    done = pusher.publisher.status(mid)
    assert done.status == "registered" and done.height == pusher.chain.state.height


def test_bad_bundle_refused_before_anything(pusher: Pusher) -> None:
    with pytest.raises(Unprocessable, match="not an acceptable model bundle") as err:
        push(pusher, bundle=pusher.bundle[:-5])
    assert err.value.code == "bad_bundle"
    nothing_done(pusher)


@pytest.mark.parametrize("field_name", ["name", "version"])
def test_bad_name_or_version_refused(pusher: Pusher, field_name: str) -> None:
    with pytest.raises(BadRequest) as err:
        push(pusher, **{field_name: "Bad Name"})
    assert err.value.code == "bad_model_name"
    nothing_done(pusher)


def test_name_taken_by_another_owner_refused(pusher: Pusher) -> None:
    sig = TensorSignature("float32", (4,))
    other = RegisterModel(sender=NETWORK.address("c1"), nonce=0, fee=1, model_id=b"\x01" * 32, name="mnist",
                          version="0", royalty_per_unit=0, input=sig, output=sig, bundle_size=1)
    pusher.chain.produce([pusher.chain.sign("c1", other)])
    with pytest.raises(NotReady, match="belongs to") as err:
        push(pusher)
    assert err.value.code == "name_taken"
    nothing_done(pusher)


def test_same_model_twice_refused_the_second_time(pusher: Pusher) -> None:
    push(pusher)
    pusher.chain.produce([pusher.chain.sign("c0", pusher.outbox.sent[0])])
    with pytest.raises(NotReady) as err:
        push(pusher, name="other")
    assert err.value.code == "model_registered"
    assert len(pusher.outbox.sent) == 1


def test_royalty_over_the_chain_maximum_refused(pusher: Pusher) -> None:
    with pytest.raises(Unprocessable) as err:
        push(pusher, royalty_per_unit=pusher.chain.state.params.max_royalty_per_unit + 1)
    assert err.value.code == "royalty_too_high"
    nothing_done(pusher)


def test_no_funds_for_the_fee_is_402(pusher: Pusher) -> None:
    pusher.publisher._available = lambda s: registration_cost(s) - 1
    with pytest.raises(PaymentRequired, match="costs"):
        push(pusher)
    nothing_done(pusher)


def test_a_mempool_refusal_unpins_and_a_later_failure_is_reported(pusher: Pusher) -> None:
    pusher.outbox.refuse = RejectReason.INSUFFICIENT_BALANCE
    with pytest.raises(PaymentRequired):
        push(pusher)
    assert pusher.outbox.sent == [] and not any(pusher.store.is_pinned(h) for h in pusher.store.hashes())
    pusher.outbox.refuse = None
    view = push(pusher)
    pusher.publisher.tx_failed(TxFailed(pusher.outbox.sent[0], "cannot execute: name taken"))
    failed = pusher.publisher.status(view.model_id)
    assert failed.status == "failed" and "name taken" in failed.detail


def test_status_of_an_unknown_model_is_404(pusher: Pusher) -> None:
    with pytest.raises(NotFound):
        pusher.publisher.status(b"\x07" * 32)


def test_registered_models_held_are_served_again_at_start(pusher: Pusher) -> None:
    view = push(pusher)
    pusher.chain.produce([pusher.chain.sign("c0", pusher.outbox.sent[0])])
    fresh_access = BlobAccess(lambda task_id, address: None)
    again = ModelPublisher(store=pusher.store, access=fresh_access, outbox=pusher.outbox,  # type: ignore[arg-type]
                           me=NETWORK.address("c0"), state=lambda: pusher.chain.state, available=lambda s: 0)
    assert again.serve_registered(pusher.chain.state) == 1
    assert ANY_PEER in fresh_access.allowed[view.model_id]


def test_many_concurrent_pushes_of_one_name_and_version_send_one_registration(pusher: Pusher) -> None:
    """Each push awaits its decode and its store write: a check made before those awaits alone would let every
    concurrent push of one name@version through, each signing a RegisterModel the ledger then refuses."""
    outcomes: list[str] = []

    async def one() -> None:
        try:
            await pusher.publisher.push(PushModelRequest(bundle=pusher.bundle, name="mnist", version="1",
                                                         royalty_per_unit=3))
            outcomes.append("sent")
        except NotReady as exc:
            outcomes.append(exc.code)

    async def many() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)

    trio.run(many)
    assert sorted(outcomes) == ["sent"] + ["version_taken"] * 19
    assert len(pusher.outbox.sent) == 1
