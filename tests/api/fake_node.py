"""A scripted :class:`NodeAPI` for API and CLI tests: real records, no chain behind them.

The fake drives a task one stage per ``task()`` call, so a polling client
moves through the lifecycle deterministically without timers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import trio

from kernels.spec import make_spec
from ledger.blocks import Block, BlockHeader
from ledger.transactions import SignedTransaction, Transfer
from ledger.modelnames import ModelRef
from p2pgpu.api.types import (
    STAGES,
    AccountView,
    BidView,
    HeadView,
    Health,
    ModelPushView,
    ModelProvidersView,
    ModelView,
    WarmProviderView,
    NotFound,
    NotReady,
    PaymentRequired,
    PushModelRequest,
    SignatureView,
    ProviderView,
    StageTime,
    Status,
    SubmitRequest,
    SupplyView,
    TaskView,
    Unavailable,
    Unprocessable,
    ValidatorView,
)
from p2pgpu.metrics_text import Histogram, MetricFamily, counter, gauge

ALICE = bytes(range(20))
PROVIDER = bytes([0xAB]) * 20
AUDIT_FEE = 2
FEE = 1
DISPUTE_BOND = 50
MODEL_FEE = 100


def matmul_job() -> tuple[Any, dict[str, np.ndarray]]:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(12, dtype=np.float32).reshape(3, 4)
    return make_spec("matmul", 1, {}, {"a": a, "b": b}), {"a": a, "b": b}


def stream_job(items: int = 3) -> tuple[Any, dict[str, np.ndarray], np.ndarray]:
    """A stream_infer spec (a tiny Dense model, hand-written Keras JSON), its inputs, and ``items`` items of 8."""
    from tests.kernels.helpers import dense_model

    inputs, _ = dense_model(8, [(2, "relu")], seed=0)
    rows = np.random.default_rng(1).standard_normal((items, 8)).astype(np.float32)
    return make_spec("stream_infer", 1, {}, inputs), inputs, rows


@dataclass
class FakeTask:
    request: SubmitRequest
    stage_index: int = 0
    final_stage: str = "settled"
    outcome: str = "paid"


@dataclass
class FakeNode:
    """Implements NodeAPI. ``fail`` names a method that raises RuntimeError (a node bug)."""

    state: str = "ready"
    height: int = 7
    balances: dict[bytes, int] = field(default_factory=lambda: {ALICE: 1000})
    tasks: dict[bytes, FakeTask] = field(default_factory=dict)
    submitted: list[SubmitRequest] = field(default_factory=list)
    result_waits: list[float] = field(default_factory=list)
    disputes: list[tuple[bytes, int, str]] = field(default_factory=list)
    fail: str | None = None
    next_outcome: str = "paid"
    """Outcome of the next submitted task: paid, expired (no bids), missed, fraud."""
    hold_submissions: int = 0
    """When above 1, each accepted submission waits until this many are in flight at once: a caller that
    submits one at a time never finishes, so a test under ``fail_after`` proves the caller is concurrent."""
    in_flight: int = 0
    models_registered: dict[bytes, ModelView] = field(default_factory=dict)
    model_pushes: list[PushModelRequest] = field(default_factory=list)
    warm: dict[bytes, list[WarmProviderView]] = field(default_factory=dict)
    """Model id -> the providers whose adverts say it is warm (``GET /ledger/models/{ref}/providers``)."""
    follows_market: bool = True
    _all_in: trio.Event | None = field(default=None, repr=False)

    def _maybe_fail(self, name: str) -> None:
        if self.fail == name:
            raise RuntimeError(f"simulated bug in {name}")

    async def health(self) -> Health:
        self._maybe_fail("health")
        return Health(self.state, self.height, 3, "" if self.state == "ready" else f"node is {self.state}")

    async def status(self) -> Status:
        self._maybe_fail("status")
        return Status(peer_id="12D3KooWfake", address=ALICE, chain_id=b"\x01" * 32,
                      roles=("client", "provider"), head_height=self.height, head_hash=b"\x02" * 32, peers=3,
                      listen_addrs=("/ip4/127.0.0.1/tcp/4001",), syncing=self.state == "syncing", version="0.1.0")

    async def submit_task(self, request: SubmitRequest) -> bytes:
        self._maybe_fail("submit_task")
        if request.max_unit_price * request.units > self.balances.get(ALICE, 0):
            raise PaymentRequired("not enough funds to lock the escrow")
        if self.hold_submissions > 1:
            self.in_flight += 1
            if self._all_in is None:
                self._all_in = trio.Event()
            if self.in_flight >= self.hold_submissions:
                self._all_in.set()
            await self._all_in.wait()
        task_id = bytes([len(self.tasks) + 1]) * 32
        self.submitted.append(request)
        final = {"expired": "bids", "missed": "running", "fraud": "delivered"}.get(self.next_outcome, "settled")
        self.tasks[task_id] = FakeTask(request, final_stage=final, outcome=self.next_outcome)
        return task_id

    def _view(self, task_id: bytes, t: FakeTask) -> TaskView:
        stage = STAGES[t.stage_index]
        reached = STAGES[: t.stage_index + 1]
        bids = () if t.outcome == "expired" or t.stage_index < 1 else (BidView(PROVIDER, 5, 2, 20),)
        assigned = t.stage_index >= 2 and t.outcome != "expired"
        return TaskView(
            task_id=task_id,
            stage=stage,
            bids=bids,
            provider=PROVIDER if assigned else None,
            unit_price=5 if assigned else None,
            outcome=t.outcome if stage == "settled" else None,
            timings=tuple((s, StageTime(self.height + i, 1000 * i)) for i, s in enumerate(reached)),
            detail="",
            **self._model_fields(t, assigned, paid=stage == "settled" and t.outcome == "paid"),
        )

    def _model_fields(self, t: FakeTask, assigned: bool, paid: bool) -> dict[str, Any]:
        """A task by model: its registered name, a warm start once assigned, the royalty once paid."""
        ref = t.request.spec.param_dict().get("model_id")
        model = self.models_registered.get(bytes.fromhex(ref)) if ref else None
        if model is None:
            return {}
        return {"model_id": model.model_id, "royalty_per_unit": model.royalty_per_unit, "model_name": model.name,
                "model_version": model.version, "start_warm": True if assigned else None,
                "startup_seconds": 0.0 if assigned else None,
                "royalty_paid": model.royalty_per_unit * t.request.units if paid else 0}

    async def task(self, task_id: bytes) -> TaskView:
        self._maybe_fail("task")
        t = self.tasks.get(task_id)
        if t is None:
            raise NotFound(f"no task {task_id.hex()}", "unknown_task")
        view = self._view(task_id, t)
        # Advance one stage per look; a failing task jumps from its last stage to settled.
        if STAGES[t.stage_index] == t.final_stage:
            t.stage_index = len(STAGES) - 1
        elif t.stage_index < len(STAGES) - 1:
            t.stage_index += 1
        return view

    async def task_result(self, task_id: bytes, wait: float = 0.0) -> Mapping[str, np.ndarray]:
        self._maybe_fail("task_result")
        self.result_waits.append(wait)
        t = self.tasks.get(task_id)
        if t is None:
            raise NotFound(f"no task {task_id.hex()}", "unknown_task")
        if t.stage_index < STAGES.index("delivered") or t.outcome != "paid":
            raise NotReady(f"task {task_id.hex()[:16]} has no delivered result (stage {STAGES[t.stage_index]})",
                           "task_not_ready")
        inputs = t.request.inputs
        if t.request.kind == "stream":  # one (fake) output row per streamed item
            return {"outputs": inputs["items"].sum(axis=1, keepdims=True)}
        if "x" in inputs:  # a keras_infer task (by model): a fake output row per input row
            return {"y": inputs["x"].sum(axis=1, keepdims=True)}
        return {"c": (inputs["a"].astype(np.float64) @ inputs["b"].astype(np.float64)).astype(np.float32)}

    async def task_cost(self, request: SubmitRequest) -> int:
        return request.max_unit_price * request.units + AUDIT_FEE + FEE

    async def dispute_cost(self) -> int:
        return DISPUTE_BOND + FEE

    async def delete_result(self, task_id: bytes) -> None:
        self._maybe_fail("delete_result")
        t = self.tasks.get(task_id)
        if t is None:
            raise NotFound(f"no task {task_id.hex()}", "unknown_task")
        if STAGES[t.stage_index] != "settled":
            raise NotReady(f"task {task_id.hex()[:16]} is still open", "task_open")
        del self.tasks[task_id]

    async def dispute_stream_item(self, task_id: bytes, item: int, reason: str) -> None:
        self._maybe_fail("dispute_stream_item")
        t = self.tasks.get(task_id)
        if t is None:
            raise NotFound(f"no task {task_id.hex()}", "unknown_task")
        if t.request.kind != "stream":
            raise Unprocessable(f"task {task_id.hex()[:16]} has no stream session to dispute an item of",
                                "not_streaming")
        if item >= len(t.request.inputs["items"]):
            raise Unprocessable(f"item {item} of task {task_id.hex()[:16]} has no signed output held here",
                                "unknown_item")
        self.disputes.append((task_id, item, reason))

    async def balance(self, address: bytes) -> int:
        self._maybe_fail("balance")
        return self.balances.get(address, 0)

    async def account(self, address: bytes) -> AccountView:
        if address not in self.balances:
            raise NotFound(f"no account {address.hex()}", "unknown_account")
        return AccountView(address, self.balances[address], 4)

    async def validators(self) -> Sequence[ValidatorView]:
        return [ValidatorView(ALICE, b"\x09" * 48, 5000, "active", 0, True)]

    async def providers(self) -> Sequence[ProviderView]:
        return [ProviderView(PROVIDER, 700, 3, 0, 1, b'{"device":"cpu"}')]

    async def block(self, height: int) -> Block:
        if height > self.height:
            raise NotFound(f"no block at height {height} (head is {self.height})", "unknown_block")
        header = BlockHeader(height=height, round=0, prev_hash=b"\x03" * 32, proposer=ALICE, timestamp_ms=1234,
                             tx_root=b"\x04" * 32, state_root=b"\x05" * 32, last_commit=None, next_committee=None)
        tx = SignedTransaction(body=Transfer(sender=ALICE, nonce=1, fee=1, to=PROVIDER, amount=10),
                               public_key=b"\x06" * 32, signature=b"\x07" * 64)
        return Block(header=header, transactions=(tx,))

    async def head(self) -> HeadView:
        return HeadView(self.height, b"\x02" * 32, b"\x05" * 32, 1234)

    async def supply(self) -> SupplyView:
        self._maybe_fail("supply")
        # Books that add up: 52_684 in the buckets = 52_663 at genesis + 7 blocks x 3 minted.
        return SupplyView(height=self.height, balances=9_000, escrow=110, collateral=20, dispute_bonds=50,
                          stake=40_000, unbonding=500, provider_bonds=3_000, fee_pool=0, burned=4, minted=21,
                          genesis_supply=52_663, total=52_684, conserved=True)

    async def metrics(self) -> Sequence[MetricFamily]:
        self._maybe_fail("metrics")
        h = Histogram((0.1, 1.0, 10.0))
        for v in (0.05, 0.5, 3.0):
            h.observe(v)
        return [
            gauge("p2pgpu_head_height", "Height of the last finalized block.", self.height),
            counter("p2pgpu_tasks_total", "Tasks seen, by stage.",
                    {(("stage", "posted"),): len(self.tasks), (("stage", 'we"ird\\\n'),): 1}),
            MetricFamily("p2pgpu_stage_seconds", "histogram", "Seconds from post to each stage.",
                         (h.sample({"stage": "assigned"}),)),
        ]


    # ------------------------------------------------------------ models: a push registers at once

    async def models(self) -> Sequence[ModelView]:
        return sorted(self.models_registered.values(), key=lambda m: (m.name, m.registered_height))

    async def model(self, ref: ModelRef) -> ModelView:
        for m in self.models_registered.values():
            if ref.model_id == m.model_id or (ref.name == m.name and (ref.version or m.version) == m.version
                                               and (ref.version is not None or m.latest)):
                return m
        raise NotFound("no registered model", "unknown_model")

    async def model_providers(self, ref: ModelRef) -> ModelProvidersView:
        entry = await self.model(ref)
        if not self.follows_market:
            raise Unavailable("this node does not follow the market's gossip", "no_market")
        return ModelProvidersView(entry.model_id, self.height, tuple(self.warm.get(entry.model_id, [])))

    def resolve_model(self, ref: ModelRef) -> bytes:
        for m in self.models_registered.values():
            if ref.model_id == m.model_id or (ref.name == m.name and (ref.version or m.version) == m.version
                                               and (ref.version is not None or m.latest)):
                return m.model_id
        raise NotFound(f"no registered model {ref.name}", "unknown_model")

    async def push_model(self, request: PushModelRequest) -> ModelPushView:
        import hashlib

        self._maybe_fail("push_model")
        if request.bundle[:1] != b"\x95":  # a bundle is a 5-field msgpack array
            raise Unprocessable("not an acceptable model bundle: not a model bundle", "bad_bundle")
        if any(m.name == request.name and m.owner != ALICE for m in self.models_registered.values()):
            raise NotReady(f"model name {request.name!r} belongs to someone else", "name_taken")
        if self.balances.get(ALICE, 0) < MODEL_FEE + FEE:
            raise PaymentRequired("registering a model costs 101", "insufficient_funds")
        model_id = hashlib.sha256(request.bundle).digest()
        self.model_pushes.append(request)
        for m in list(self.models_registered.values()):
            if m.name == request.name:
                self.models_registered[m.model_id] = replace(m, latest=False)
        sig = SignatureView("float32", (None, 4))
        self.models_registered[model_id] = ModelView(model_id, ALICE, request.name, request.version,
                                                     request.royalty_per_unit, sig, sig, len(request.bundle),
                                                     self.height, True)
        return ModelPushView(model_id, request.name, request.version, request.royalty_per_unit, "pending")

    async def model_push(self, model_id: bytes) -> ModelPushView:
        m = self.models_registered.get(model_id)
        if m is None:
            raise NotFound(f"this node pushed no model {model_id.hex()}", "unknown_model")
        return ModelPushView(model_id, m.name, m.version, m.royalty_per_unit, "registered", self.height)

    async def model_registration_cost(self) -> int:
        return MODEL_FEE + FEE


def with_state(node: FakeNode, state: str) -> FakeNode:
    return replace(node, state=state)
