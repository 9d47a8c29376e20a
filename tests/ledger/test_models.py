"""The model registry: RegisterModel (each refusal, state unchanged), names and versions, and royalties.

Royalties: a task naming a model escrows ``royalty_per_unit * units`` on top
of its price; its owner receives it when the work settles paid (a batch
task) or per claimed unit (a stream); every other ending refunds it.
"""

from __future__ import annotations

import dataclasses

import pytest

from ledger import exceptions as ex
from ledger.codec import EncodeError
from ledger.mempool import tx_cost
from ledger.modelnames import ModelRef, is_valid_model_name, parse_model_ref
from ledger.state import State, TaskOutcome, TaskStatus
from ledger.transactions import (
    Assign,
    CancelTask,
    CommitResult,
    PostTask,
    RegisterModel,
    TaskKind,
    TensorSignature,
    Transfer,
    compute_task_id,
)
from tests.ledger.test_transition import FEE, SPEC, bal, claim, idle, make_bid, rejects, step, tx

MODEL = b"\x4d" * 32
OTHER_MODEL = b"\x4e" * 32
ROYALTY = 7
IN = TensorSignature(dtype="float32", shape=(None, 4))
OUT = TensorSignature(dtype="float32", shape=(3,))


def register(chain, owner="c1", *, model_id=MODEL, name="mnist", version="1", royalty=ROYALTY, size=1234):
    body = RegisterModel(sender=chain.network.address(owner), nonce=chain.nonce(owner), fee=FEE, model_id=model_id,
                         name=name, version=version, royalty_per_unit=royalty, input=IN, output=OUT, bundle_size=size)
    return chain.sign(owner, body)


def post(chain, *, model_id=MODEL, price=100, units=1, kind=TaskKind.BATCH, exec_blocks=5, window=5):
    t = tx(chain, "c0", PostTask, kind=kind, spec_hash=SPEC, requirements=b"", max_unit_price=price, units=units,
           bid_window=window, exec_blocks=exec_blocks, audit_rate_bps=0, model_id=model_id)
    return t, compute_task_id(chain.network.address("c0"), t.body.nonce)


def settle(chain, task_id, limit=40):
    for _ in range(limit):
        if chain.state.tasks[task_id].status == TaskStatus.SETTLED:
            return chain.state.tasks[task_id]
        step(chain)
    raise AssertionError("task did not settle")


# ---------------------------------------------------------------- RegisterModel


def test_register_model_records_entry_burns_fee_and_owns_the_name(chain):
    p = chain.state.params
    c1, burned = bal(chain, "c1"), chain.state.burned
    step(chain, register(chain))
    entry = chain.state.models[MODEL]
    assert (entry.owner, entry.name, entry.version, entry.royalty_per_unit) == (
        chain.network.address("c1"), "mnist", "1", ROYALTY)
    assert (entry.input, entry.output, entry.bundle_size) == (IN, OUT, 1234)
    assert entry.registered_height == chain.state.height
    assert bal(chain, "c1") == c1 - FEE - p.model_registration_fee
    assert chain.state.burned == burned + p.model_registration_fee
    assert chain.state.get_model("mnist") == entry == chain.state.get_model("mnist", "1")
    assert chain.state.model_names["mnist"].owner == chain.network.address("c1")


def test_the_latest_version_is_the_last_registered_and_old_versions_stay(chain):
    step(chain, register(chain, version="2"))
    step(chain, register(chain, model_id=OTHER_MODEL, version="1"))
    assert chain.state.model_names["mnist"].latest_version == "1"
    assert chain.state.get_model("mnist").model_id == OTHER_MODEL
    assert chain.state.get_model("mnist", "2").model_id == MODEL
    assert chain.state.get_model("mnist", "3") is None and chain.state.get_model("other") is None


def test_registry_survives_encoding_and_is_in_the_state_root(chain):
    root = chain.state.state_root()
    step(chain, register(chain))
    decoded = State.decode(chain.state.encode())
    assert decoded.models == chain.state.models
    assert decoded.model_names == chain.state.model_names
    assert decoded.model_versions == chain.state.model_versions == {("mnist", "1"): MODEL}
    assert decoded.state_root() == chain.state.state_root() != root
    copy = chain.state.copy()
    copy.models.clear()
    copy.model_names.clear()
    assert MODEL in chain.state.models and "mnist" in chain.state.model_names


def test_a_model_id_is_registered_once(chain):
    step(chain, register(chain))
    rejects(chain, register(chain, "c0", name="other"), ex.ModelAlreadyRegistered, "registered as mnist@1")


def test_the_first_owner_of_a_name_owns_all_its_versions(chain):
    step(chain, register(chain))
    rejects(chain, register(chain, "c0", model_id=OTHER_MODEL, version="2"), ex.ModelNameTaken, "belongs to")


def test_a_version_never_changes(chain):
    step(chain, register(chain))
    rejects(chain, register(chain, model_id=OTHER_MODEL), ex.ModelVersionTaken, "mnist@1 is registered already")


@pytest.mark.parametrize("name", ["", "MNIST", "-x", ".x", "a@b", "a b", "a/b", "é", "a" * 65, "ab" * 32])
def test_bad_model_names_are_refused(chain, name):
    if not 1 <= len(name) <= 64:  # the codec refuses these before the ledger sees them
        with pytest.raises(EncodeError, match="characters"):
            register(chain, name=name)
        return
    rejects(chain, register(chain, name=name), ex.InvalidModelName, "model name")
    rejects(chain, register(chain, version=name), ex.InvalidModelName, "model version")


def test_royalty_over_the_maximum_is_refused_and_the_maximum_is_accepted(chain):
    cap = chain.state.params.max_royalty_per_unit
    rejects(chain, register(chain, royalty=cap + 1), ex.RoyaltyTooHigh, "over the maximum")
    step(chain, register(chain, royalty=cap))


def test_empty_bundle_is_refused(chain):
    rejects(chain, register(chain, size=0), ex.InvalidAmount, "not empty")


def test_registration_needs_the_fee(chain):
    p = chain.state.params
    keep = FEE + p.model_registration_fee - 1
    step(chain, tx(chain, "c1", Transfer, to=chain.network.address("c0"), amount=bal(chain, "c1") - FEE - keep))
    assert bal(chain, "c1") == keep
    rejects(chain, register(chain), ex.InsufficientBalance, "needs")


def test_model_names_and_refs():
    assert is_valid_model_name("resnet-50.v2_b") and is_valid_model_name("z" * 64)
    assert not is_valid_model_name("0a" * 32)  # would read as a model id
    assert parse_model_ref("ab" * 32) == ModelRef(model_id=bytes.fromhex("ab" * 32))
    assert parse_model_ref("mnist") == ModelRef(name="mnist")
    assert parse_model_ref("mnist@1.0") == ModelRef(name="mnist", version="1.0")
    for bad in ("Mnist", "mnist@", "mnist@V1", "@1"):
        with pytest.raises(ValueError):
            parse_model_ref(bad)


# ---------------------------------------------------------------- tasks naming a model


def test_a_task_naming_an_unknown_model_is_refused(chain):
    t, _ = post(chain, model_id=OTHER_MODEL)
    rejects(chain, t, ex.UnknownModel, "no registered model")


def test_escrow_includes_the_royalty_and_the_mempool_counts_it(chain):
    step(chain, register(chain))
    c0 = bal(chain, "c0")
    t, task_id = post(chain, price=100, units=1)
    p = chain.state.params
    assert tx_cost(t.body, p, chain.state.models) == FEE + 100 + ROYALTY + p.audit_fee
    assert tx_cost(t.body, p) == FEE + 100 + p.audit_fee  # without the registry: a lower bound
    step(chain, t)
    task = chain.state.tasks[task_id]
    assert (task.model_id, task.royalty_per_unit) == (MODEL, ROYALTY)
    assert task.escrow == 100 + ROYALTY + p.audit_fee
    assert bal(chain, "c0") == c0 - FEE - task.escrow
    reg = register(chain, model_id=OTHER_MODEL, version="2")
    assert tx_cost(reg.body, p) == FEE + p.model_registration_fee


def test_batch_task_paid_pays_the_owner_its_royalty(chain):
    step(chain, register(chain))
    p = chain.state.params
    c0, c1 = bal(chain, "c0"), bal(chain, "c1")
    t, task_id = post(chain, price=100)
    step(chain, t)
    step(chain, tx(chain, "c0", Assign, task_id=task_id, bid=make_bid(chain, task_id, price=60)))
    assert chain.state.tasks[task_id].escrow == 60 + ROYALTY + p.audit_fee  # price difference refunded, royalty kept
    step(chain, tx(chain, "p0", CommitResult, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=1))
    task = settle(chain, task_id)
    assert task.outcome == TaskOutcome.PAID
    assert bal(chain, "c1") == c1 + ROYALTY
    assert bal(chain, "c0") == c0 - 2 * FEE - 60 - ROYALTY  # audit fee back (no audit)


@pytest.mark.parametrize("ending", ["cancel", "expire", "missed"])
def test_every_refund_returns_the_royalty(chain, ending):
    step(chain, register(chain))
    c0, c1 = bal(chain, "c0"), bal(chain, "c1")
    t, task_id = post(chain, price=100, window=2, exec_blocks=2)
    step(chain, t)
    fees = FEE
    if ending == "cancel":
        step(chain, tx(chain, "c0", CancelTask, task_id=task_id))
        fees += FEE
    elif ending == "missed":
        step(chain, tx(chain, "c0", Assign, task_id=task_id, bid=make_bid(chain, task_id, price=100)))
        fees += FEE
    task = settle(chain, task_id)
    assert task.outcome == {"cancel": TaskOutcome.CANCELLED, "expire": TaskOutcome.EXPIRED,
                            "missed": TaskOutcome.MISSED}[ending]
    assert bal(chain, "c0") == c0 - fees and bal(chain, "c1") == c1


def test_stream_pays_the_royalty_per_claimed_unit_and_refunds_the_rest(chain):
    step(chain, register(chain))
    c0, c1 = bal(chain, "c0"), bal(chain, "c1")
    t, task_id = post(chain, kind=TaskKind.STREAM, price=20, units=10, exec_blocks=3)
    step(chain, t)
    step(chain, tx(chain, "c0", Assign, task_id=task_id, bid=make_bid(chain, task_id, price=20)))
    step(chain, claim(chain, task_id, 4))
    assert bal(chain, "c1") == c1 + 4 * ROYALTY
    step(chain, claim(chain, task_id, 6))
    assert bal(chain, "c1") == c1 + 6 * ROYALTY
    task = settle(chain, task_id)
    assert task.outcome == TaskOutcome.PAID and task.escrow == 0
    assert bal(chain, "c1") == c1 + 6 * ROYALTY
    assert bal(chain, "c0") == c0 - 2 * FEE - 6 * (20 + ROYALTY)


def test_royalty_fixed_when_posted_and_owner_may_be_the_client(chain):
    step(chain, register(chain, "c0", royalty=5))
    c0 = bal(chain, "c0")
    t, task_id = post(chain, price=100)
    step(chain, t)
    step(chain, tx(chain, "c0", Assign, task_id=task_id, bid=make_bid(chain, task_id, price=100)))
    step(chain, tx(chain, "p0", CommitResult, task_id=task_id, result_hash=b"\x01" * 32, exec_ms=1))
    settle(chain, task_id)
    assert bal(chain, "c0") == c0 - 2 * FEE - 100  # paid its own royalty back to itself
    assert dataclasses.replace(chain.state.tasks[task_id]).royalty_per_unit == 5
    idle(chain, 1)
