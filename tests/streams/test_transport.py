"""``/p2pgpu/stream/1`` between two real libp2p hosts: a whole session, backpressure, and every refusal.

The provider's kernel runtime is a NumPy stand-in with the ``StreamSession``
interface (TensorFlow runs only in the node test); the ledger is a table of
real ``Task`` records; the accounting is the market's real
``ClientStream`` / ``ProviderStream``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from kernels.errors import ShapeMismatch
from kernels.spec import make_spec
from ledger.keys import AccountKey
from ledger.state import Task, TaskStatus
from ledger.transactions import StreamClaim, StreamOutput, StreamReceipt, TaskKind
from p2pgpu.market import (
    ClientStream,
    OpenStream,
    ProviderStream,
    Report,
    ResultReady,
    SendReceipt,
    ServeStream,
    SubmitTx,
    sign_receipt,
    sign_stream_output,
)
from p2pgpu.market.results import item_hash
from p2pgpu.metrics_text import render_metrics, stream_metric_families
from p2pgpu.net import FramedStream, NetConfig, Network, RemoteError, open_network
from p2pgpu.streams import (
    STREAM_PROTOCOL,
    StreamAck,
    StreamConfig,
    StreamHello,
    StreamInput,
    StreamReady,
    StreamResult,
    StreamTransport,
    decode_message,
    encode_message,
)
from tests.kernels.helpers import dense_model

FAST = NetConfig(discovery_interval=0.2, dial_timeout=3.0, target_peers=1)
CHAIN = b"\x07" * 32
TASK, BATCH_TASK, FOREIGN_TASK = b"\x11" * 32, b"\x12" * 32, b"\x13" * 32
PROVIDER_SEED, CLIENT_SEED, STRANGER_SEED = b"\x71" * 32, b"\x72" * 32, b"\x73" * 32
PROVIDER, CLIENT, STRANGER = (AccountKey.from_seed(s) for s in (PROVIDER_SEED, CLIENT_SEED, STRANGER_SEED))
UNITS, K = 10, 3
MODEL_INPUTS, WEIGHTS = dense_model(4, [(2, "relu")], seed=1)
SPEC = make_spec("stream_infer", 1, {}, MODEL_INPUTS)


def forward(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ WEIGHTS[0] + WEIGHTS[1], 0).astype(np.float32)


class NumpySession:
    """The runtime's StreamSession interface over the same one-layer model, in NumPy."""

    def __init__(self) -> None:
        self.model_loads = 1
        self.items = 0
        self.closed = False

    async def infer(self, item: np.ndarray) -> np.ndarray:
        await trio.lowlevel.checkpoint()
        if item.shape != (4,):
            raise ShapeMismatch(f"item has shape {tuple(item.shape)}, the model takes (4,)")
        self.items += 1
        return forward(item)

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class NumpyRuntime:
    sessions: list[NumpySession] = field(default_factory=list)

    async def open_stream(self, spec, inputs) -> NumpySession:
        assert set(inputs) == set(MODEL_INPUTS)
        self.sessions.append(NumpySession())
        return self.sessions[-1]


def ledger_task(task_id: bytes = TASK, kind: TaskKind = TaskKind.STREAM, provider: bytes = PROVIDER.address) -> Task:
    return Task(task_id=task_id, client=CLIENT.address, kind=kind, spec_hash=b"\0" * 32, requirements=b"",
                max_unit_price=10, units=UNITS, audit_rate_bps=0, exec_blocks=50, status=TaskStatus.ASSIGNED,
                outcome=0, escrow=0, audit_fee=0, post_height=1, bid_deadline=5, provider=provider, unit_price=5)


@dataclass
class Pair:
    provider: StreamTransport
    client: StreamTransport
    provider_net: Network
    client_net: Network
    stranger_net: Network
    runtime: NumpyRuntime
    routed: dict[str, list] = field(default_factory=lambda: {"provider": [], "client": []})
    ps: ProviderStream | None = None

    async def raw_stream(self, net: Network | None = None) -> AsyncIterator[FramedStream]:
        return (net or self.client_net).open_stream(self.provider_net.peer_id, STREAM_PROTOCOL)

    def client_stream(self, receipt_every: int = 8) -> ClientStream:
        return ClientStream(key=CLIENT, chain_id=CHAIN, task_id=TASK, provider=PROVIDER.address, units=UNITS,
                            receipt_every=receipt_every)

    async def start_session(self, nursery: trio.Nursery) -> ProviderStream:
        self.ps = ProviderStream(key=PROVIDER, chain_id=CHAIN, task_id=TASK, client=CLIENT.address, units=UNITS,
                                 receipt_every=K)
        nursery.start_soon(self.provider.serve_session, "provider",
                           ServeStream(TASK, CLIENT.address, SPEC, MODEL_INPUTS, self.ps))
        return self.ps


@asynccontextmanager
async def pair(provider_config: StreamConfig | None = None) -> AsyncIterator[Pair]:
    async with AsyncExitStack() as stack:
        nets = []
        for seed in (PROVIDER_SEED, CLIENT_SEED, STRANGER_SEED):
            net = await stack.enter_async_context(open_network(FAST, seed))
            if nets:
                with trio.fail_after(10):
                    await net.connect(nets[0].addrs[0])
            nets.append(net)
        provider_net, client_net, stranger_net = nets
        tasks = {TASK: ledger_task(), BATCH_TASK: ledger_task(BATCH_TASK, kind=TaskKind.BATCH),
                 FOREIGN_TASK: ledger_task(FOREIGN_TASK, provider=STRANGER.address)}
        ledger = SimpleNamespace(tasks=tasks)
        runtime = NumpyRuntime()
        holder: dict[str, Pair] = {}

        def route_provider(origin, actions) -> None:
            holder["pair"].routed["provider"].extend(actions)

        def route_client(origin, actions) -> None:
            holder["pair"].routed["client"].extend(actions)
            for action in actions:  # what MarketRoles._act does with a SendReceipt
                if isinstance(action, SendReceipt):
                    holder["pair"].client.send_receipt(action)

        provider = StreamTransport(provider_net, address=PROVIDER.address, ledger=lambda: ledger,
                                   runtime=lambda: runtime, route=route_provider, peer_of=lambda a: None,
                                   config=provider_config)
        client = StreamTransport(client_net, address=CLIENT.address, ledger=lambda: ledger, runtime=lambda: None,
                                 route=route_client,
                                 peer_of=lambda a: provider_net.peer_id if a == PROVIDER.address else None,
                                 config=StreamConfig(retry_interval=0.05))
        provider.serve()
        holder["pair"] = Pair(provider, client, provider_net, client_net, stranger_net, runtime)
        yield holder["pair"]


def items(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(4).astype(np.float32) for _ in range(n)]


async def test_a_whole_session_answers_every_item_from_one_model_and_claims_every_receipt() -> None:
    async with pair() as p, trio.open_nursery() as nursery:
        ps = await p.start_session(nursery)
        cs = p.client_stream(receipt_every=8)  # follows the provider's K=3 down
        xs = items(UNITS)
        with trio.fail_after(30):
            await p.client.run_client("client", OpenStream(TASK, PROVIDER.address, cs), xs)
        (ready,) = [a for a in p.routed["client"] if isinstance(a, ResultReady)]
        np.testing.assert_allclose(ready.outputs["outputs"], np.stack([forward(x) for x in xs]), rtol=1e-6)
        assert cs.receipt_every == K and cs.answered == UNITS and len(cs.evidence) == UNITS
        receipts = [a.receipt.receipt.units for a in p.routed["client"] if isinstance(a, SendReceipt)]
        assert receipts == [3, 6, 9, 10]  # every K answers, and the rest when the client closes
        claims = [a.body.receipt.receipt.units for a in p.routed["provider"]
                  if isinstance(a, SubmitTx) and isinstance(a.body, StreamClaim)]
        assert claims == [3, 6, 9, 10] and ps.closed
        with trio.fail_after(10):
            while not p.runtime.sessions[0].closed:  # the warm model is released once the client ends
                await trio.sleep(0.01)
        stats = p.provider.stats[TASK]
        assert (stats.items, stats.model_loads, stats.receipts, stats.connections) == (UNITS, 1, 4, 1)
        assert len(p.runtime.sessions) == 1 and not p.provider.metrics.rejected
        assert p.client.metrics.receipts_sent == 4 and p.client.metrics.items_streamed == UNITS

        # What /metrics shows of it: each side's counters moved by the session, and nothing is left open.
        def scrape(t: StreamTransport) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            text = render_metrics(stream_metric_families(t.metrics, t.active_sessions()))
            return {(x.name, tuple(sorted(x.labels.items()))): x.value
                    for f in text_string_to_metric_families(text) for x in f.samples}

        prov, cli = scrape(p.provider), scrape(p.client)
        assert prov[("p2pgpu_stream_sessions_opened_total", (("role", "provider"),))] == 1
        assert prov[("p2pgpu_stream_sessions_closed_total", (("reason", "client_ended"), ("role", "provider")))] == 1
        assert prov[("p2pgpu_stream_sessions_active", (("role", "provider"),))] == 0
        assert prov[("p2pgpu_stream_items_total", (("event", "served"), ("role", "provider")))] == UNITS
        assert prov[("p2pgpu_stream_receipts_total", (("event", "received"), ("role", "provider")))] == 4
        assert prov[("p2pgpu_stream_connections_total", ())] == 1
        assert cli[("p2pgpu_stream_sessions_opened_total", (("role", "client"),))] == 1
        assert cli[("p2pgpu_stream_sessions_closed_total", (("reason", "completed"), ("role", "client")))] == 1
        assert cli[("p2pgpu_stream_items_total", (("event", "answered"), ("role", "client")))] == UNITS
        assert cli[("p2pgpu_stream_receipts_total", (("event", "sent"), ("role", "client")))] == 4


async def test_a_hello_before_the_session_is_handed_over_waits_for_it() -> None:
    async with pair() as p, trio.open_nursery() as nursery:
        cs = p.client_stream()
        xs = items(4)
        done = trio.Event()

        async def client() -> None:
            await p.client.run_client("client", OpenStream(TASK, PROVIDER.address, cs), xs)
            done.set()

        nursery.start_soon(client)
        with trio.fail_after(10):
            while p.provider_net.reqresp.quota.of_protocol(STREAM_PROTOCOL) == 0:  # the hello is waiting on our side
                await trio.sleep(0.01)
        await p.start_session(nursery)
        with trio.fail_after(30):
            await done.wait()
        assert cs.answered == 4 and any(isinstance(a, ResultReady) for a in p.routed["client"])


async def exchange_hello(stream: FramedStream, task_id: bytes = TASK) -> StreamReady:
    await stream.send(encode_message(StreamHello(task_id)))
    ready = decode_message(await stream.receive())
    assert isinstance(ready, StreamReady)
    return ready


async def expect_refusal(stream: FramedStream, code: str) -> str:
    with pytest.raises(RemoteError) as info:
        while True:
            if await stream.receive() is None:
                raise AssertionError("the provider ended the stream instead of refusing")
    assert f": {code}: " in str(info.value), str(info.value)
    return str(info.value)


async def test_backpressure_holds_items_beyond_k_until_a_receipt_arrives() -> None:
    async with pair() as p, trio.open_nursery() as nursery:
        ps = await p.start_session(nursery)
        with trio.fail_after(20):
            async with await p.raw_stream() as stream:
                ready = await exchange_hello(stream)
                assert (ready.receipt_every, ready.units, ready.next_index) == (K, UNITS, 0)
                xs = items(K + 1)
                for i, x in enumerate(xs):
                    await stream.send(encode_message(StreamInput(i, x)))
                outs = [decode_message(await stream.receive()) for _ in range(K)]
                assert [o.signed.output.index for o in outs] == list(range(K))
                # Item K waits: a receipt for K + 1 units must be refused as covering more than was served.
                bad = sign_receipt(CLIENT, CHAIN, StreamReceipt(task_id=TASK, units=K + 1))
                await stream.send(encode_message(StreamAck(bad)))
                text = await expect_refusal(stream, "bad_receipt")
        assert f"only {K} were served" in text and ps.served == K
        async with await p.raw_stream() as stream:  # the session survives: reconnect, receipt, go on
            with trio.fail_after(20):
                assert (await exchange_hello(stream)).next_index == K
                good = sign_receipt(CLIENT, CHAIN, StreamReceipt(task_id=TASK, units=K))
                await stream.send(encode_message(StreamAck(good)))
                await stream.send(encode_message(StreamInput(K, xs[K])))
                out = decode_message(await stream.receive())
                assert isinstance(out, StreamResult) and out.signed.output.index == K
                np.testing.assert_allclose(out.output, forward(xs[K]), rtol=1e-6)
                await stream.send_end()
                assert await stream.receive() is None
        assert ps.closed and ps.receipted == K


async def test_a_client_that_ignores_k_is_cut_off_with_the_reason_instead_of_stalling() -> None:
    async with pair(StreamConfig(receipt_timeout=0.5)) as p, trio.open_nursery() as nursery:
        ps = await p.start_session(nursery)
        with trio.fail_after(20):
            async with await p.raw_stream() as stream:
                ready = await exchange_hello(stream)
                for i, x in enumerate(items(ready.receipt_every + 1)):  # a client that receipts only every K + 1
                    await stream.send(encode_message(StreamInput(i, x)))
                outs = [decode_message(await stream.receive()) for _ in range(K)]
                assert [o.signed.output.index for o in outs] == list(range(K))
                text = await expect_refusal(stream, "no_receipt")
        assert f"K={K} (announced in StreamReady)" in text and f"receipt at least every {K} answers" in text
        assert p.provider.metrics.rejected == {"no_receipt": 1} and p.provider.metrics.penalties == 0
        assert ps.served == K and not ps.closed  # nothing beyond K went unpaid; the session waits for a retry
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("case, code", [
    ("garbage", "malformed"),
    ("item_first", "unexpected"),
    ("stranger", "not_entitled"),
    ("batch_task", "not_stream"),
    ("foreign_task", "not_assigned"),
    ("bad_index", "bad_index"),
    ("oversized", "oversized_item"),
    ("wrong_shape", "bad_item"),
    ("flooding", "flooding"),
    ("receipt_for_other_task", "bad_receipt"),
    ("cap", "cap_reached"),
    ("not_ready", "not_ready"),
])
async def test_every_bad_session_gets_an_error_frame_and_a_counted_rejection(case: str, code: str) -> None:
    config = StreamConfig(max_item_bytes=64, ready_timeout=0.3 if case == "not_ready" else 60.0)
    async with pair(config) as p, trio.open_nursery() as nursery:
        if case != "not_ready":
            ps = await p.start_session(nursery)
        with trio.fail_after(20):
            async with await p.raw_stream(p.stranger_net if case == "stranger" else None) as stream:
                if case == "garbage":
                    await stream.send(b"\xc1 not msgpack")
                elif case == "item_first":
                    await stream.send(encode_message(StreamInput(0, items(1)[0])))
                elif case in ("stranger", "not_ready"):
                    await stream.send(encode_message(StreamHello(TASK)))
                elif case == "batch_task":
                    await stream.send(encode_message(StreamHello(BATCH_TASK)))
                elif case == "foreign_task":
                    await stream.send(encode_message(StreamHello(FOREIGN_TASK)))
                else:
                    await exchange_hello(stream)
                    if case == "bad_index":
                        await stream.send(encode_message(StreamInput(1, items(1)[0])))
                    elif case == "oversized":
                        await stream.send(encode_message(StreamInput(0, np.zeros(17, np.float32))))
                    elif case == "wrong_shape":
                        await stream.send(encode_message(StreamInput(0, np.zeros(3, np.float32))))
                    elif case == "flooding":  # K + 1 unanswered on top of the K served: the queue is over K
                        for i, x in enumerate(items(2 * K + 1)):
                            await stream.send(encode_message(StreamInput(i, x)))
                    elif case == "receipt_for_other_task":
                        r = sign_receipt(CLIENT, CHAIN, StreamReceipt(task_id=BATCH_TASK, units=1))
                        await stream.send(encode_message(StreamAck(r)))
                    elif case == "cap":
                        ps.served = ps.receipted = UNITS  # as if every unit had been served and receipted
                        await stream.send(encode_message(StreamInput(UNITS, items(1)[0])))
                await expect_refusal(stream, code)
        assert p.provider.metrics.rejected == {code: 1}
        if case != "not_ready":
            assert not ps.closed  # a refused connection leaves the session (and its warm model) for a retry
        nursery.cancel_scope.cancel()


async def test_a_client_refuses_an_output_its_provider_did_not_sign_for_that_input() -> None:
    async with pair() as p:
        async def lying_provider(stream: FramedStream) -> None:
            hello = decode_message(await stream.receive())
            await stream.send(encode_message(StreamReady(hello.task_id, K, UNITS, 0)))
            item = decode_message(await stream.receive())
            y = forward(item.item)
            wrong = y + 1  # sign the true output's hash but send another tensor
            signed = sign_stream_output(PROVIDER, CHAIN, StreamOutput(TASK, 0, item_hash(item.item), item_hash(y)))
            await stream.send(encode_message(StreamResult(wrong, signed)))
            await stream.receive()

        p.provider_net.set_stream_handler(STREAM_PROTOCOL, lying_provider)
        cs = p.client_stream()
        with trio.fail_after(20):
            await p.client.run_client("client", OpenStream(TASK, PROVIDER.address, cs), items(2))
        (report,) = [a for a in p.routed["client"] if isinstance(a, Report)]
        assert "does not hash to what the provider signed" in report.message
        assert cs.stopped and cs.answered == 0 and p.client.metrics.client_failures == 1
        assert not any(isinstance(a, (ResultReady, SendReceipt)) for a in p.routed["client"])


async def test_a_model_that_does_not_load_is_reported_and_its_hello_refused_with_the_reason() -> None:
    from kernels.errors import DisallowedLayer

    async with pair() as p, trio.open_nursery() as nursery:
        async def refuse(spec, inputs):
            raise DisallowedLayer("layer 'Lambda' is not on the allowlist")

        p.runtime.open_stream = refuse  # type: ignore[method-assign]
        await p.start_session(nursery)
        with trio.fail_after(20):
            while not p.routed["provider"]:
                await trio.sleep(0.01)
            async with await p.raw_stream() as stream:
                await stream.send(encode_message(StreamHello(TASK)))
                text = await expect_refusal(stream, "model_failed")
        assert "Lambda" in text and p.provider.metrics.rejected == {"model_failed": 1}
        (report,) = p.routed["provider"]
        assert isinstance(report, Report) and "could not be loaded: DisallowedLayer" in report.message
        p.provider.on_block(None, SimpleNamespace(tasks={}))  # the task is gone: the failed session is dropped
        assert TASK not in p.provider._sessions


async def test_a_by_model_session_opens_on_the_expanded_spec_or_is_refused_model_unavailable() -> None:
    from p2pgpu.modelcache import ModelUnavailable

    async with pair() as p, trio.open_nursery() as nursery:
        opened: list[tuple[object, object]] = []
        real_open = p.runtime.open_stream

        async def expand(task_id, spec, inputs):
            assert task_id == TASK
            return "expanded spec", {**inputs, "weight_000": np.zeros(1, np.float32)}

        async def open_stream(spec, inputs):
            opened.append((spec, set(inputs)))
            return await real_open(spec, inputs)

        p.runtime.open_stream = open_stream  # type: ignore[method-assign]
        p.provider.with_model = expand
        await p.start_session(nursery)
        with trio.fail_after(20):
            while not opened:
                await trio.sleep(0.01)
        assert opened == [("expanded spec", {*MODEL_INPUTS, "weight_000"})]
        nursery.cancel_scope.cancel()

    async with pair() as p, trio.open_nursery() as nursery:
        async def unavailable(task_id, spec, inputs):
            raise ModelUnavailable("no holder gave model 00ab")

        p.provider.with_model = unavailable
        await p.start_session(nursery)
        with trio.fail_after(20):
            while not p.routed["provider"]:
                await trio.sleep(0.01)
            async with await p.raw_stream() as stream:
                await stream.send(encode_message(StreamHello(TASK)))
                text = await expect_refusal(stream, "model_unavailable")
        assert "no holder gave model" in text and p.provider.metrics.rejected == {"model_unavailable": 1}
        (report,) = p.routed["provider"]
        assert isinstance(report, Report) and "ModelUnavailable" in report.message
        nursery.cancel_scope.cancel()
