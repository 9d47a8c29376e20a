"""The node's nonce allocator and transaction sender: distinct, gap-free nonces under refusals and restarts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.devtools import make_dev_network
from ledger.mempool import Mempool, MempoolRejected, RejectReason
from ledger.params import Params
from ledger.transactions import Transfer
from p2pgpu.nonces import NonceAllocator, NonceState, NonceUsageError
from p2pgpu.txsender import TxSender

ME = b"\x01" * 20

# ----------------------------------------------------------------- the pure allocator


def test_reservations_are_distinct_and_a_refusal_at_the_top_is_taken_back() -> None:
    alloc = NonceAllocator(ME, base=5, top=5)
    a, b, c = alloc.reserve(10), alloc.reserve(20), alloc.reserve(30)
    assert (a, b, c) == (5, 6, 7)
    assert alloc.pending_cost() == 60
    assert alloc.refused(c) is False  # the top: taken back
    assert alloc.reserve() == 7


def test_a_refusal_below_the_top_is_a_gap_until_filled() -> None:
    alloc = NonceAllocator(ME)
    a, b = alloc.reserve(), alloc.reserve()
    alloc.sent(b)
    assert alloc.refused(a) is True
    assert alloc.gaps() == [a]
    alloc.sent(a)  # the filler
    assert alloc.gaps() == []
    assert alloc.reserve() == 2


def test_taking_back_the_top_also_takes_back_unfilled_gaps_right_below_it() -> None:
    alloc = NonceAllocator(ME)
    a, b, c = alloc.reserve(), alloc.reserve(), alloc.reserve()
    alloc.sent(a)
    assert alloc.refused(b) is True  # c was out: b is a gap
    assert alloc.refused(c) is False  # now c is the top: taken back, and gap b with it
    assert alloc.gaps() == []
    assert alloc.reserve() == 1


def test_blocks_forget_executed_nonces_and_their_costs() -> None:
    alloc = NonceAllocator(ME)
    for cost in (5, 6, 7):
        alloc.sent(alloc.reserve(cost))
    alloc.on_block(2)
    assert alloc.base == 2 and alloc.pending_cost() == 7
    assert alloc.reserve() == 3


def test_the_ledger_moving_past_a_reservation_makes_its_outcome_moot() -> None:
    alloc = NonceAllocator(ME)
    n = alloc.reserve()
    alloc.on_block(4)  # someone else signed with our key
    assert alloc.refused(n) is False
    assert alloc.reserve() == 4


def test_misuse_names_the_nonce() -> None:
    alloc = NonceAllocator(ME)
    with pytest.raises(NonceUsageError, match="nonce 3 is not held"):
        alloc.sent(3)
    n = alloc.reserve()
    alloc.sent(n)
    with pytest.raises(NonceUsageError, match="already sent"):
        alloc.refused(n)


def test_resume_after_a_restart_fills_holes_between_pending_nonces() -> None:
    alloc = NonceAllocator.resume(ME, account_nonce=3, pending=[3, 5, 6])
    assert alloc.gaps() == [4]
    assert alloc.state_of(5) is NonceState.SENT
    assert alloc.reserve() == 7


# A random schedule of reservations, sends, refusals, filler outcomes, blocks and restarts.
OPS = st.lists(st.tuples(st.sampled_from(["reserve", "send", "refuse", "fill", "fill_fails", "block", "restart"]),
                         st.integers(0, 1_000)), max_size=120)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_property_nonces_are_never_reused_and_end_gap_free(ops) -> None:
    base = 0
    alloc = NonceAllocator(ME)
    mempool: dict[int, str] = {}  # what the network holds of ours: nonce -> what fills it
    in_flight: list[int] = []  # reservations being built
    for op, arg in ops:
        if op == "reserve":
            n = alloc.reserve(arg)
            assert n >= base and n not in mempool and n not in in_flight, "a held or executed nonce handed out again"
            in_flight.append(n)
        elif op == "send" and in_flight:
            n = in_flight.pop(arg % len(in_flight))
            alloc.sent(n, arg)
            mempool[n] = "tx"
        elif op == "refuse" and in_flight:
            n = in_flight.pop(arg % len(in_flight))
            if alloc.refused(n):
                assert alloc.state_of(n) is NonceState.GAP
        elif op == "fill" and alloc.gaps():
            n = alloc.gaps()[arg % len(alloc.gaps())]
            alloc.sent(n)
            mempool[n] = "filler"
        elif op == "block":
            executed = base
            while executed in mempool and executed - base < arg % 8:
                del mempool[executed]
                executed += 1
            base = executed
            alloc.on_block(base)
        elif op == "restart":  # reservations in flight die with the process; the network keeps the rest
            in_flight.clear()
            alloc = NonceAllocator.resume(ME, base, mempool)
        assert all(n >= base for n in alloc.held)
        assert alloc.pending_cost() == sum(h.cost for h in alloc.held.values())
    # let every reservation end (refused ones get fillers), then nothing is missing between base and top
    for n in sorted(in_flight, reverse=True):
        alloc.refused(n)
    for n in alloc.gaps():
        alloc.sent(n)
        mempool[n] = "filler"
    assert set(range(base, alloc.top)) == {n for n in mempool if n >= base}, "a gap strands later nonces"


# ----------------------------------------------------------------- the sender against a real mempool


@pytest.fixture
def chain():
    from ledger.devtools import DevChain

    return DevChain(make_dev_network(validators=("v0",), clients=("c0",), params=Params()))


def test_sender_refusal_below_the_top_is_filled_so_later_transactions_execute(chain) -> None:
    key = chain.network.key("c0")
    pool = Mempool(chain.state)
    sender = TxSender(key, chain.state.chain_id, pool.add, chain.state)
    me = key.address
    first = sender.reserve(sender.cost_of(Transfer(sender=me, nonce=0, fee=1, to=me, amount=1)))
    later = sender.send(Transfer(sender=me, nonce=0, fee=1, to=b"\x02" * 20, amount=5))
    assert later.body.nonce == first + 1
    sender.release(first)  # e.g. sealing the inputs of the PostTask at `first` failed
    assert [stx.body.nonce for stx in pool.pending(me)] == [first, first + 1]
    assert pool.pending(me)[0].body.to == me and sender.fillers_sent == 1  # the filler
    assert len(pool.ready(me)) == 2


def test_sender_refused_transaction_at_the_top_gives_its_nonce_back(chain) -> None:
    key = chain.network.key("c0")
    pool = Mempool(chain.state)
    sender = TxSender(key, chain.state.chain_id, pool.add, chain.state)
    me = key.address
    too_much = Transfer(sender=me, nonce=0, fee=1, to=b"\x02" * 20, amount=chain.state.get_balance(me) + 1)
    with pytest.raises(MempoolRejected) as info:
        sender.send(too_much)
    assert info.value.reason is RejectReason.INSUFFICIENT_BALANCE
    ok = sender.send(Transfer(sender=me, nonce=0, fee=1, to=b"\x02" * 20, amount=1))
    assert ok.body.nonce == 0 and sender.nonces.gaps() == []


def test_sender_replacement_keeps_the_nonce(chain) -> None:
    key = chain.network.key("c0")
    pool = Mempool(chain.state)
    sender = TxSender(key, chain.state.chain_id, pool.add, chain.state)
    me = key.address
    sent = sender.send(Transfer(sender=me, nonce=0, fee=1, to=b"\x02" * 20, amount=1))
    sender.send_reserved(Transfer(sender=me, nonce=sent.body.nonce, fee=5, to=me, amount=1))
    assert [stx.body.fee for stx in pool.pending(me)] == [5]
    with pytest.raises(MempoolRejected, match="not handed out"):
        sender.send_reserved(Transfer(sender=me, nonce=9, fee=5, to=me, amount=1))
