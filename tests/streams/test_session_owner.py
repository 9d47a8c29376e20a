"""One writer per stream session: the provider role's commands are applied by the session's own task.

The role (the roles' loop) never changes a served ``ProviderStream``: it sends
``CommandStream``, and the transport's session task applies it between frames,
the same task that admits items, signs outputs and takes receipts.
"""

from __future__ import annotations

import trio

from ledger.transactions import StreamClaim, StreamReceipt
from p2pgpu.market import (Action, ClaimRefused, CloseSession, ProviderStream, Report, ServeStream, SubmitTx,
                           sign_receipt)
from p2pgpu.streams import StreamAck, StreamInput, StreamResult, decode_message, encode_message

from .test_transport import (CHAIN, CLIENT, K, MODEL_INPUTS, PROVIDER, SPEC, TASK, UNITS, exchange_hello,
                             expect_refusal, items, pair)


class RecordingStream(ProviderStream):
    """A ``ProviderStream`` that notes which Trio task makes each change to it."""

    def __init__(self) -> None:
        super().__init__(key=PROVIDER, chain_id=CHAIN, task_id=TASK, client=CLIENT.address, units=UNITS,
                         receipt_every=K)
        self.writers: set[trio.lowlevel.Task] = set()

    def _note(self) -> None:
        self.writers.add(trio.lowlevel.current_task())

    def accept_item(self, item):  # type: ignore[no-untyped-def]
        self._note()
        return super().accept_item(item)

    def sign_output(self, index, output):  # type: ignore[no-untyped-def]
        self._note()
        return super().sign_output(index, output)

    def on_receipt(self, signed):  # type: ignore[no-untyped-def]
        self._note()
        return super().on_receipt(signed)

    def apply(self, command):  # type: ignore[no-untyped-def]
        self._note()
        return super().apply(command)


def claims(actions: list[Action]) -> list[int]:
    return [a.body.receipt.receipt.units for a in actions if isinstance(a, SubmitTx) and isinstance(a.body, StreamClaim)]


async def test_a_close_near_the_deadline_is_applied_by_the_session_task_while_items_are_in_flight() -> None:
    async with pair() as p, trio.open_nursery() as nursery:
        ps = RecordingStream()
        nursery.start_soon(p.provider.serve_session, "provider", ServeStream(TASK, CLIENT.address, SPEC, MODEL_INPUTS, ps))
        xs = items(2 * K + 1)
        with trio.fail_after(20):
            async with await p.raw_stream() as stream:
                await exchange_hello(stream)
                for i in range(K):
                    await stream.send(encode_message(StreamInput(i, xs[i])))
                for _ in range(K):
                    assert isinstance(decode_message(await stream.receive()), StreamResult)
                await stream.send(encode_message(StreamAck(sign_receipt(CLIENT, CHAIN, StreamReceipt(TASK, K)))))
                for i in range(K, 2 * K + 1):  # K more are answered, the last waits for the next receipt
                    await stream.send(encode_message(StreamInput(i, xs[i])))
                for _ in range(K):
                    assert isinstance(decode_message(await stream.receive()), StreamResult)
                assert ps.served == 2 * K and ps.receipted == K and claims(p.routed["provider"]) == [K]

                p.provider.command(TASK, CloseSession())  # what the role's CommandStream does, from another task
                assert not ps.closed  # queued for the session's owner, not applied by the caller
                while not ps.closed:
                    await trio.sleep(0.01)
                assert claims(p.routed["provider"]) == [K]  # everything receipted was claimed already

                # The receipt for the K served since still counts and is claimed; the waiting item never runs.
                await stream.send(encode_message(StreamAck(sign_receipt(CLIENT, CHAIN, StreamReceipt(TASK, 2 * K)))))
                await expect_refusal(stream, "closed")
        assert ps.served == 2 * K and ps.receipted == 2 * K and claims(p.routed["provider"]) == [K, 2 * K]
        assert len(ps.writers) == 1 and trio.lowlevel.current_task() not in ps.writers  # the session task only
        (writer,) = ps.writers
        assert writer.name.endswith("serve_session")
        nursery.cancel_scope.cancel()


async def test_a_claim_refused_after_the_session_ended_is_applied_where_it_arrives() -> None:
    async with pair() as p, trio.open_nursery() as nursery:
        ps = RecordingStream()
        nursery.start_soon(p.provider.serve_session, "provider", ServeStream(TASK, CLIENT.address, SPEC, MODEL_INPUTS, ps))
        with trio.fail_after(20):
            async with await p.raw_stream() as stream:
                await exchange_hello(stream)
                await stream.send(encode_message(StreamInput(0, items(1)[0])))
                assert isinstance(decode_message(await stream.receive()), StreamResult)
                await stream.send(encode_message(StreamAck(sign_receipt(CLIENT, CHAIN, StreamReceipt(TASK, 1)))))
                await stream.send_end()
                assert await stream.receive() is None
            while TASK in p.provider._sessions:  # the session task is gone
                await trio.sleep(0.01)
        assert ps.closed and ps.claimed == 1 and claims(p.routed["provider"]) == [1]
        p.provider.command(TASK, ClaimRefused(0, "nonce too low"))  # nobody else writes to it any more
        assert ps.claimed == 0
        assert any(isinstance(a, Report) and "StreamClaim refused (nonce too low)" in a.message
                   for a in p.routed["provider"])
        nursery.cancel_scope.cancel()
