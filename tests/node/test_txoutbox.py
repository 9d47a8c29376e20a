"""The roles' outbox: a refused transaction goes back to the role that sent it (a PostTask also to the client
service), and a transaction that can never execute is replaced by a filler and reported to its sender."""

from __future__ import annotations

import pytest

from ledger.devtools import DevChain, make_dev_network
from ledger.mempool import Mempool, MempoolRejected, RejectReason
from ledger.params import Params
from ledger.transactions import PostTask, TaskKind, Transfer
from p2pgpu.market import TxFailed
from p2pgpu.streams import StreamMetrics
from p2pgpu.txoutbox import TxOutbox
from p2pgpu.txsender import TxSender


@pytest.fixture
def chain() -> DevChain:
    return DevChain(make_dev_network(validators=("v0",), clients=("c0",), params=Params()))


class Outbox:
    def __init__(self, chain: DevChain) -> None:
        self.key = chain.network.key("c0")
        self.pool = Mempool(chain.state)
        self.sender = TxSender(self.key, chain.state.chain_id, self.pool.add, chain.state)
        self.failed: list[tuple[object, TxFailed]] = []
        self.posts_refused: list[tuple[PostTask, MempoolRejected]] = []
        self.claims = StreamMetrics()
        self.outbox = TxOutbox(self.sender, self.pool, failed=lambda o, e: self.failed.append((o, e)),
                               post_refused=lambda b, e: self.posts_refused.append((b, e)), claims=self.claims)


def post_task(sender: bytes, max_unit_price: int) -> PostTask:
    return PostTask(sender=sender, nonce=0, fee=1, kind=TaskKind.BATCH, spec_hash=b"\x00" * 32, requirements=b"",
                    max_unit_price=max_unit_price, units=1, bid_window=3, exec_blocks=20, audit_rate_bps=0)


def test_a_sent_transaction_is_admitted_at_the_next_nonce(chain: DevChain) -> None:
    box = Outbox(chain)
    me = box.key.address
    box.outbox.submit("role", Transfer(sender=me, nonce=0, fee=1, to=b"\x02" * 20, amount=1))
    assert [stx.body.nonce for stx in box.pool.pending(me)] == [0]
    assert box.failed == [] and box.outbox.refused == 0


def test_a_refused_post_task_goes_back_to_its_role_and_to_the_client_service(chain: DevChain) -> None:
    box = Outbox(chain)
    me = box.key.address
    too_dear = post_task(me, chain.state.get_balance(me) + 1)
    box.outbox.submit(b"task", too_dear)
    ((origin, event),) = box.failed
    assert origin == b"task" and isinstance(event, TxFailed) and event.body == too_dear
    ((body, error),) = box.posts_refused
    assert body == too_dear and error.reason is RejectReason.INSUFFICIENT_BALANCE
    assert box.outbox.refused == 1 and box.pool.pending(me) == []


def test_a_refused_transfer_is_not_reported_as_a_post_task(chain: DevChain) -> None:
    box = Outbox(chain)
    me = box.key.address
    box.outbox.submit("role", Transfer(sender=me, nonce=0, fee=1, to=b"\x02" * 20,
                                       amount=chain.state.get_balance(me) + 1))
    assert len(box.failed) == 1 and box.posts_refused == []


def test_without_a_mempool_there_is_nothing_to_repair(chain: DevChain) -> None:
    box = Outbox(chain)
    outbox = TxOutbox(box.sender, None, failed=lambda o, e: None, post_refused=lambda b, e: None, claims=box.claims)
    outbox.on_block(chain.state)  # returns at once
    assert outbox.unstuck == 0
