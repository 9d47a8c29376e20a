"""Live stream sessions between two real libp2p hosts: items fed by many concurrent callers, answers matched to
their callers, the cap, a proper close, and every way a session is lost (a bad output, a stall, a disconnect).

The provider is the real ``StreamTransport`` over the NumPy stand-in runtime of ``test_transport`` (TensorFlow
runs in the node tests); hostile providers are raw stream handlers.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import trio

from kernels.kernel import ItemSignature
from ledger.transactions import StreamClaim, StreamOutput
from p2pgpu.market import OpenStream, Report, SubmitTx, sign_stream_output
from p2pgpu.market.results import item_hash
from p2pgpu.net import FramedStream
from p2pgpu.streams import (
    STREAM_PROTOCOL,
    InvalidItem,
    StreamConfig,
    LiveSession,
    SessionClosed,
    SessionExhausted,
    SessionLost,
    StreamInput,
    StreamReady,
    StreamResult,
    decode_message,
    encode_message,
)
from p2pgpu.streams.live import KeptItems, LiveStart

from .test_transport import CHAIN, CLIENT, K, PROVIDER, TASK, Pair, forward, items, ledger_task, pair

SIGNATURE = ItemSignature(dtypes=("float32",), shape=(4,))


def with_units(p: Pair, units: int) -> None:
    """The ledger's task (and so both sessions) with ``units`` as its cap."""
    p.provider.ledger().tasks[TASK] = replace(ledger_task(), units=units)


async def open_live(p: Pair, nursery: trio.Nursery, units: int,
                    start: LiveStart | None = None) -> tuple[LiveSession, trio.Event]:
    """Run the client's live session on its own task; its handle once the provider is ready, and its end."""
    start = start or LiveStart(signature=SIGNATURE)
    cs = replace_units(p.client_stream(), units)
    done = trio.Event()

    async def run() -> None:
        await p.client.run_live_client("client", OpenStream(TASK, PROVIDER.address, cs), start)
        done.set()

    nursery.start_soon(run)
    with trio.fail_after(20):
        await start.settled.wait()
    assert start.session is not None, start.failure
    return start.session, done


def replace_units(cs, units: int):
    cs.units = units
    return cs


async def test_many_concurrent_callers_each_get_the_answer_to_their_own_item_and_aclose_pays_the_provider() -> None:
    async with pair() as p, trio.open_nursery() as nursery:
        with_units(p, 50)
        ps = await p.start_session(nursery)
        ps.units = 50
        live, done = await open_live(p, nursery, 50)
        assert (live.units, live.remaining, live.receipt_every, live.provider) == (50, 50, K, PROVIDER.address)
        xs = items(40, seed=3)
        got: dict[int, np.ndarray] = {}
        index_of: dict[int, int] = {}

        async def call(i: int) -> None:
            if i % 2:
                got[i] = await live.infer(xs[i])
            else:
                index_of[i], got[i] = await live.infer_indexed(xs[i])

        with trio.fail_after(30):
            async with trio.open_nursery() as callers:
                for i in range(40):
                    callers.start_soon(call, i)
                    if i % 7 == 0:
                        await trio.sleep(0)  # some arrive while others are in flight
            assert live.remaining == 10 and live.ended is None
            await live.aclose()
            await done.wait()
        for i in range(40):
            np.testing.assert_allclose(got[i], forward(xs[i]), rtol=1e-6)
        assert live.ended == "closed" and not live.lost
        with pytest.raises(SessionClosed):
            await live.infer(xs[0])
        claims = [a.body.receipt.receipt.units for a in p.routed["provider"]
                  if isinstance(a, SubmitTx) and isinstance(a.body, StreamClaim)]
        assert claims[-1] == 40 and claims == sorted(claims) and ps.closed  # the last receipt covers every answer
        assert p.client.metrics.sessions_streamed == 1 and p.client.metrics.client_failures == 0
        # every item and output is kept for disputes while the task is open, then forgotten
        assert sorted(index_of.values()) == sorted(set(index_of.values())) and len(index_of) == 20
        for i, index in index_of.items():
            np.testing.assert_array_equal(p.client.client_item(TASK, index), xs[i])
            np.testing.assert_allclose(p.client.client_output(TASK, index), forward(xs[i]), rtol=1e-6)
        p.client.forget_client(TASK)
        assert p.client.client_item(TASK, 0) is None


async def test_the_cap_ends_the_session_and_a_call_past_it_raises_exhausted_without_sending() -> None:
    async with pair() as p, trio.open_nursery() as nursery:
        ps = await p.start_session(nursery)  # UNITS = 10
        live, done = await open_live(p, nursery, 10)
        xs = items(10, seed=4)
        outs: list[np.ndarray] = [np.zeros(0)] * 10

        async def call(i: int) -> None:
            outs[i] = await live.infer(xs[i])

        with trio.fail_after(30):
            async with trio.open_nursery() as callers:
                for i in range(10):
                    callers.start_soon(call, i)
            with pytest.raises(SessionExhausted, match="cap of 10 units is used up"):
                await live.infer(xs[0])
            await done.wait()  # the session ended by itself: every unit answered
        assert live.ended == "exhausted" and live.remaining == 0
        np.testing.assert_allclose(np.stack(outs), np.stack([forward(x) for x in xs]), rtol=1e-6)
        assert ps.served == 10 and ps.closed and ps.receipted == 10


async def test_a_bad_item_is_refused_before_it_is_sent_and_the_session_goes_on() -> None:
    async with pair() as p, trio.open_nursery() as nursery:
        await p.start_session(nursery)
        live, _ = await open_live(p, nursery, 10)
        with trio.fail_after(20):
            for bad, words in ((np.zeros(5, np.float32), "shape \\(5,\\)"), (np.zeros(4, np.int32), "dtype int32"),
                               (np.full(4, np.nan, np.float32), "NaN")):
                with pytest.raises(InvalidItem, match=words):
                    await live.infer(bad)
            x = items(1)[0]
            np.testing.assert_allclose(await live.infer(x), forward(x), rtol=1e-6)
            assert live.remaining == 9  # refused items used no unit
            await live.aclose()


async def test_a_connection_the_provider_drops_as_idle_is_opened_again_with_the_next_item() -> None:
    async with pair(StreamConfig(idle_timeout=0.5)) as p, trio.open_nursery() as nursery:
        ps = await p.start_session(nursery)
        live, done = await open_live(p, nursery, 10)
        xs = items(6, seed=6)
        with trio.fail_after(30):
            outs = [await live.infer(x) for x in xs[:3]]
            while p.provider.metrics.rejected.get("idle", 0) == 0:  # a gateway between requests
                await trio.sleep(0.05)
            outs += [await live.infer(x) for x in xs[3:]]
            while p.provider.metrics.rejected.get("idle", 0) < 2:  # dropped again: aclose connects to END it
                await trio.sleep(0.05)
            await live.aclose()
            await done.wait()
        np.testing.assert_allclose(np.stack(outs), np.stack([forward(x) for x in xs]), rtol=1e-6)
        assert live.ended == "closed" and not live.lost
        assert p.provider.stats[TASK].connections == 3 and ps.closed and ps.receipted == 6
        claims = [a.body.receipt.receipt.units for a in p.routed["provider"]
                  if isinstance(a, SubmitTx) and isinstance(a.body, StreamClaim)]
        assert claims[-1] == 6


async def run_against(handler, units: int = 10, answer_timeout: float = 60.0, calls: int = 6
                      ) -> tuple[list[BaseException | np.ndarray], LiveSession, list]:
    """Feed ``calls`` concurrent items to a live session whose provider is ``handler``; what each call got."""
    async with pair() as p, trio.open_nursery() as nursery:
        p.client.config = replace(p.client.config, answer_timeout=answer_timeout)
        p.provider_net.set_stream_handler(STREAM_PROTOCOL, handler)
        live, done = await open_live(p, nursery, units)
        xs = items(calls, seed=5)
        results: list[BaseException | np.ndarray] = [np.zeros(0)] * calls

        async def call(i: int) -> None:
            try:
                results[i] = await live.infer(xs[i])
            except SessionLost as exc:
                results[i] = exc

        with trio.fail_after(30):
            async with trio.open_nursery() as callers:
                for i in range(calls):
                    callers.start_soon(call, i)
            await done.wait()
            await live.aclose()  # a lost session closes without error
        for i, r in enumerate(results):  # nobody got a wrong answer
            if isinstance(r, np.ndarray):
                np.testing.assert_allclose(r, forward(xs[i]), rtol=1e-6)
        return results, live, p.routed["client"]


def answer(index: int, x: np.ndarray, output: np.ndarray | None = None) -> bytes:
    y = forward(x)
    signed = sign_stream_output(PROVIDER, CHAIN, StreamOutput(TASK, index, item_hash(x), item_hash(y)))
    return encode_message(StreamResult(y if output is None else output, signed))


async def ready(stream: FramedStream, units: int = 10) -> None:
    decode_message(await stream.receive())
    await stream.send(encode_message(StreamReady(TASK, K, units, 0)))


async def test_a_bad_output_loses_the_session_and_every_waiting_call_raises_session_lost() -> None:
    async def lying(stream: FramedStream) -> None:
        await ready(stream)
        first = decode_message(await stream.receive())
        assert isinstance(first, StreamInput)
        await stream.send(answer(0, first.item))  # one honest answer
        second = decode_message(await stream.receive())
        await stream.send(answer(1, second.item, output=forward(second.item) + 1))  # signed one output, sent another
        await trio.sleep(30)

    results, live, routed = await run_against(lying)
    lost = [r for r in results if not isinstance(r, np.ndarray)]
    assert len(lost) == 5  # the one honest answer reached its caller (checked in run_against)
    assert all(isinstance(r, SessionLost) and "does not hash to what the provider signed" in r.reason for r in lost)
    assert sorted(r.index for r in lost) == [1, 2, 3, 4, 5]  # type: ignore[union-attr]
    assert live.lost and "does not hash" in (live.ended or "")
    assert any(isinstance(a, Report) and "live session lost after 1 answers" in a.message for a in routed)
    with pytest.raises(SessionLost, match="does not hash"):
        await live.infer(items(1)[0])


async def test_a_provider_that_stops_answering_loses_the_session_after_the_answer_timeout() -> None:
    async def stalling(stream: FramedStream) -> None:
        await ready(stream)
        item = decode_message(await stream.receive())
        await stream.send(answer(0, item.item))  # type: ignore[attr-defined]
        await trio.sleep(60)

    results, live, _ = await run_against(stalling, answer_timeout=1.0)
    lost = [r for r in results if not isinstance(r, np.ndarray)]
    assert len(lost) == 5
    assert all(isinstance(r, SessionLost) and "answered nothing for 1.0 s with" in r.reason for r in lost)


async def test_a_provider_that_disconnects_loses_the_session_for_every_call_in_flight() -> None:
    async def leaving(stream: FramedStream) -> None:
        await ready(stream)
        for i in range(2):
            item = decode_message(await stream.receive())
            await stream.send(answer(i, item.item))  # type: ignore[attr-defined]
        await stream.reset()

    results, live, _ = await run_against(leaving)
    lost = [r for r in results if not isinstance(r, np.ndarray)]
    assert len(lost) == 4 and all(isinstance(r, SessionLost) for r in lost) and live.lost


async def test_a_session_whose_opener_gave_up_is_ended_properly_at_once() -> None:
    async with pair() as p, trio.open_nursery() as nursery:
        ps = await p.start_session(nursery)
        start = LiveStart(signature=SIGNATURE)
        start.abandoned = True
        start.failed("no session within 1 s")
        cs = p.client_stream()
        with trio.fail_after(20):
            await p.client.run_live_client("client", OpenStream(TASK, PROVIDER.address, cs), start)
        assert start.session is None and ps.closed and ps.served == 0


async def test_a_provider_that_refuses_the_session_settles_the_start_with_its_reason() -> None:
    from kernels.errors import DisallowedLayer

    async with pair() as p, trio.open_nursery() as nursery:
        async def refuse(spec, inputs):
            raise DisallowedLayer("layer 'Lambda' is not on the allowlist")

        p.runtime.open_stream = refuse  # type: ignore[method-assign]
        await p.start_session(nursery)
        start = LiveStart(signature=SIGNATURE)
        with trio.fail_after(20):
            await p.client.run_live_client("client", OpenStream(TASK, PROVIDER.address, p.client_stream()), start)
        assert start.session is None and start.failure is not None
        assert "model_failed" in start.failure and "Lambda" in start.failure
        assert any(isinstance(a, Report) and "live session lost after 0 answers" in a.message
                   for a in p.routed["client"])


async def test_close_soon_ends_a_session_properly_without_waiting() -> None:
    async with pair() as p, trio.open_nursery() as nursery:
        ps = await p.start_session(nursery)
        live, done = await open_live(p, nursery, 10)
        x = items(1)[0]
        with trio.fail_after(20):
            await live.infer(x)
            live.close_soon()
            live.close_soon()  # twice is once
            await done.wait()
        assert live.ended == "closed" and ps.closed and ps.receipted == 1


def test_kept_items_hold_the_newest_within_their_byte_budget() -> None:
    kept = KeptItems(max_bytes=100, max_items=1000)
    for i in range(10):
        kept.add(i, np.full(4, i, np.float32))  # 16 bytes each
        kept.answer(i, np.full(1, i, np.float32))  # 4 bytes each
    assert len(kept) == 5 and kept.bytes == 100
    assert kept.item(4) is None and kept.item(5) is not None and float(kept.output(9)[0]) == 9  # type: ignore[index]
    capped = KeptItems(max_bytes=1 << 20, max_items=3)
    for i in range(5):
        capped.add(i, np.zeros(1, np.float32))
    assert [capped.item(i) is not None for i in range(5)] == [False, False, True, True, True]
