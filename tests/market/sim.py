"""A single-process market driver: real ledger (DevChain), real validators, fake data plane and kernels.

It plays the node's part for every role: routes gossip through the real
topic validators, numbers and signs transactions, produces a block per
step and feeds ``BlockFinalized`` back, serves blobs between roles, and
runs jobs with an injected function (the kernel runtime's I/O boundary).
Verification uses the kernels' real ``verify`` (NumPy for matmul), so a
wrong result is caught by the same code a verifier node runs.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from kernels.probe import Capabilities
from kernels.registry import lookup
from kernels.spec import JobSpec, encode_spec
from ledger.devtools import DevChain, make_dev_network
from ledger.params import Params
from ledger.transactions import Assign, CancelTask, Dispute, PostTask, ReopenTask, TaskKind, compute_task_id
from p2pgpu.market import (
    Action,
    AnnounceReceived,
    BidMessage,
    BidReceived,
    BlockFinalized,
    ClientConfig,
    ClientTask,
    DeclineReceived,
    DeliverResult,
    Event,
    FetchFailed,
    FetchInputs,
    FetchResult,
    FetchSpec,
    FetchStreamItem,
    InputsFetched,
    InputsServed,
    JobDone,
    MarketMessageError,
    PricingPolicy,
    ProviderConfig,
    ProviderProbed,
    ProviderRole,
    PublishAnnounce,
    PublishBid,
    PublishDecline,
    ResultDelivered,
    ResultFetched,
    RunJob,
    RunSpotCheck,
    RunVerify,
    SeenCache,
    ServeInputs,
    ServeResult,
    ServeSpec,
    ServeStreamItem,
    SignedDecline,
    SpecFetched,
    StreamItemFetched,
    SubmitTx,
    TxFailed,
    VerificationOutcome,
    VerifyDone,
    validate_bid_message,
    validate_task_message,
)

TEST_PARAMS = Params(
    epoch_length=8, committee_size=4, min_validator_stake=1_000, unbonding_period=3, jail_period=4,
    challenge_window=2, audit_window=3, verifier_count=2, audit_fee=10, dispute_bond=50, min_provider_bond=100,
)

CPU = Capabilities(device_kind="cpu", device_name="test cpu", memory_bytes=8 << 30, tf_version="2.21",
                   matmul_gflops=50.0)

Runner = Callable[[JobSpec, Mapping[str, np.ndarray]], "Mapping[str, np.ndarray] | None"]


def honest_matmul(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"c": (inputs["a"] @ inputs["b"]).astype(inputs["a"].dtype)}


def cheating_matmul(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"c": (inputs["a"] @ inputs["b"] + 1).astype(inputs["a"].dtype)}


def silent(spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> None:
    return None  # the job never finishes (a hung worker, a vanished provider)


@dataclass
class Log:
    actions: list[Action] = field(default_factory=list)

    def of(self, kind: type) -> list:
        return [a for a in self.actions if isinstance(a, kind)]


class MarketSim:
    def __init__(self, providers: tuple[str, ...] = ("p0", "p1", "p2"), clients: tuple[str, ...] = ("c0",),
                 extra: tuple[str, ...] = (), params: Params = TEST_PARAMS) -> None:
        self.network = make_dev_network(providers=providers, clients=(*clients, *extra), params=params)
        self.chain = DevChain(self.network)
        self.chain_id = self.chain.chain_id
        self.providers: dict[str, ProviderRole] = {}
        self.runners: dict[str, Runner] = {}
        self.clients: dict[bytes, tuple[str, ClientTask]] = {}
        self.inputs: dict[bytes, dict[str, np.ndarray]] = {}
        self.specs: dict[bytes, bytes] = {}
        self.allowed: dict[bytes, set[bytes]] = defaultdict(set)
        self.results: dict[bytes, bytes] = {}
        self.pending: list[tuple[str, SubmitTx]] = []
        self.logs: dict[str, Log] = defaultdict(Log)
        self.gossip_rejects: list[Exception] = []
        self.tx_rejects: list[tuple[str, object, str]] = []
        self.seen_task = SeenCache()
        self.seen_bid = SeenCache()
        self.push_results = True
        self.withhold: set[str] = set()  # providers whose results nobody can fetch
        self.providers_first = False
        self.failing_result_fetches = 0  # the client's next N result fetches fail (a provider briefly unreachable)
        self.failing_verifier_fetches: dict[str, int] = defaultdict(int)  # a verifier's next N result fetches fail
        self.cut_off: set[str] = set()  # nodes whose every fetch fails (their own network is down)
        self.tamper: set[str] = set()  # providers that serve verifiers bytes other than the committed result
        self.fetch_heights: dict[str, list[int]] = defaultdict(list)  # heights of each node's FetchResult actions
        self.queue: deque[tuple[str, Event]] = deque()
        self.items: dict[bytes, np.ndarray] = {}  # stream item tensors the client holds, by item hash
        self.verifiers: dict[str, Callable] = {}  # kernel name -> verify stand-in (e.g. NumPy for stream_infer)
        self.hold_jobs = False  # RunJob waits in self.running until finish() (jobs that take time)
        self.running: dict[str, list[RunJob]] = defaultdict(list)
        self.dead: set[str] = set()  # providers that stopped: nothing reaches them, probes go unanswered
        self.offline: set[str] = set()  # clients whose data plane cannot be reached (inputs cannot be fetched)

    # ------------------------------------------------------------ setup

    def address(self, name: str) -> bytes:
        return self.network.address(name)

    def add_provider(self, name: str, *, runner: Runner = honest_matmul, caps: Capabilities = CPU,
                     pricing: PricingPolicy = PricingPolicy(), config: ProviderConfig = ProviderConfig()) -> ProviderRole:
        role = ProviderRole(key=self.network.key(name), chain_id=self.chain_id, capabilities=caps, pricing=pricing,
                            config=config)
        self.providers[name] = role
        self.runners[name] = runner
        return role

    def reserve_nonce(self, name: str) -> int:
        return self.chain.nonce(name) + sum(1 for n, _ in self.pending if n == name)

    def submit(self, name: str, spec: JobSpec, inputs: dict[str, np.ndarray], *, max_unit_price: int,
               kind: TaskKind = TaskKind.BATCH, units: int = 1, config: ClientConfig = ClientConfig()) -> ClientTask:
        task = ClientTask(key=self.network.key(name), chain_id=self.chain_id, spec=spec,
                          post_nonce=self.reserve_nonce(name), max_unit_price=max_unit_price,
                          data_peer=b"peer-" + name.encode(), kind=kind, units=units, config=config,
                          height=self.chain.state.height, providers=self.chain.state.providers)
        self.clients[task.task_id] = (name, task)
        self.inputs[task.task_id] = inputs
        self.specs[task.task_id] = encode_spec(spec)
        self.route(name, task.start())
        self.drain()
        return task

    # ------------------------------------------------------------ driving

    def role_of(self, name: str, task_id: bytes | None):
        if name in self.providers:
            return self.providers[name]
        if task_id is not None and task_id in self.clients:
            return self.clients[task_id][1]
        return None

    def deliver(self, name: str, event: Event) -> None:
        if name not in self.dead:
            self.queue.append((name, event))

    def deliver_client(self, task_id: bytes, event: Event) -> None:
        if task_id in self.clients:
            self.queue.append(("client:" + task_id.hex(), event))

    def drain(self) -> None:
        while self.queue:
            target, event = self.queue.popleft()
            if target.startswith("client:"):
                name, task = self.clients[bytes.fromhex(target[7:])]
                self.route(name, task.handle(event), task)
            else:
                self.route(target, self.providers[target].handle(event))

    def step(self, blocks: int = 1) -> None:
        for _ in range(blocks):
            self._produce()
            state = self.chain.state
            # Clients first by default, so a ServeInputs opens access before the provider's first fetch;
            # ``providers_first`` exercises the other order (the provider's fetch retries cover it).
            clients = [("client:" + t.hex(), BlockFinalized(state.height, state)) for t in self.clients]
            providers = [(n, BlockFinalized(state.height, state)) for n in self.providers if n not in self.dead]
            self.queue.extend(providers + clients if self.providers_first else clients + providers)
            self.drain()

    def run_until(self, done: Callable[[], bool], max_blocks: int = 60) -> None:
        for _ in range(max_blocks):
            if done():
                return
            self.step()
        assert done(), f"condition not reached within {max_blocks} blocks (height {self.chain.state.height})"

    def _produce(self) -> None:
        counters: dict[str, int] = {}
        txs, origin = [], {}
        for name, action in self.pending:
            counter = counters.get(name, self.chain.nonce(name))
            body = action.body
            if action.assign_nonce:
                body = type(body)(**{**{f: getattr(body, f) for f in body.__dataclass_fields__}, "nonce": counter})
            counters[name] = body.nonce + 1
            stx = self.chain.sign(name, body)
            txs.append(stx)
            origin[stx.tx_hash()] = (name, action.body)
        self.pending = []
        _, rejected = self.chain.produce(txs)
        for stx, exc in rejected:
            name, body = origin[stx.tx_hash()]
            self.tx_rejects.append((name, body, str(exc)))
            self._to_origin(name, body, TxFailed(body, str(exc)))

    def _to_origin(self, name: str, body, event: Event) -> None:
        if isinstance(body, PostTask):
            self.deliver_client(compute_task_id(body.sender, body.nonce), event)
        elif isinstance(body, (Assign, Dispute, CancelTask, ReopenTask)) and name not in self.providers:
            self.deliver_client(body.task_id, event)
        else:
            self.deliver(name, event)

    # ------------------------------------------------------------ the node's part

    def route(self, name: str, actions: list[Action], client: ClientTask | None = None) -> None:
        me = self.address(name)
        for action in actions:
            self.logs[name].actions.append(action)
            if client is not None:
                self.logs["task:" + client.task_id.hex()].actions.append(action)
            if isinstance(action, SubmitTx):
                self.pending.append((name, action))
            elif isinstance(action, PublishAnnounce):
                try:
                    rec = validate_task_message(self.chain_id, self.chain.state.height, action.data, self.seen_task)
                except MarketMessageError as exc:  # recorded for the test to inspect
                    self.gossip_rejects.append(exc)
                    continue
                for pname in self.providers:
                    self.deliver(pname, AnnounceReceived(rec))
            elif isinstance(action, (PublishBid, PublishDecline)):
                try:
                    rec = validate_bid_message(self.chain_id, self.chain.state.height, action.data, self.seen_bid)
                except MarketMessageError as exc:
                    self.gossip_rejects.append(exc)
                    continue
                if isinstance(rec, BidMessage):
                    self.deliver_client(rec.signed.bid.task_id, BidReceived(rec.signed))
                else:
                    assert isinstance(rec, SignedDecline)
                    self.deliver_client(rec.notice.task_id, DeclineReceived(rec.notice))
            elif isinstance(action, ServeSpec):
                pass  # specs are served from self.specs below
            elif isinstance(action, ServeInputs):
                self.allowed[action.task_id].update(action.peers)
            elif isinstance(action, ServeStreamItem):
                for h in (action.input_hash, action.output_hash):
                    self.allowed[h].update(action.peers)
            elif isinstance(action, (FetchStreamItem, FetchSpec, FetchInputs, FetchResult)) and name in self.cut_off:
                what = {FetchStreamItem: "stream-item", FetchSpec: "spec", FetchInputs: "inputs",
                        FetchResult: "result"}[type(action)]
                if what == "result":
                    self.fetch_heights[name].append(self.chain.state.height)
                failed = FetchFailed(action.task_id, what, "our own network is down")
                if client is not None:
                    self.deliver_client(action.task_id, failed)
                else:
                    self.deliver(name, failed)
            elif isinstance(action, FetchStreamItem):
                hashes = (action.input_hash, action.output_hash)
                if all(me in self.allowed[h] and h in self.items for h in hashes):
                    self.deliver(name, StreamItemFetched(action.task_id, *(self.items[h] for h in hashes)))
                else:
                    self.deliver(name, FetchFailed(action.task_id, "stream-item", "client does not serve it"))
            elif isinstance(action, FetchSpec):
                data = self.specs.get(action.task_id)
                if data is None:
                    self.deliver(name, FetchFailed(action.task_id, "spec", "client does not serve it"))
                else:
                    self.deliver(name, SpecFetched(action.spec_hash, data))
            elif isinstance(action, FetchInputs):
                if self.clients.get(action.task_id, ("",))[0] in self.offline:
                    self.deliver(name, FetchFailed(action.task_id, "inputs", "peer unreachable"))
                elif me in self.allowed[action.task_id]:
                    self.deliver(name, InputsFetched(action.task_id, self.inputs[action.task_id]))
                    self.deliver_client(action.task_id, InputsServed(action.task_id, me))
                else:
                    self.deliver(name, FetchFailed(action.task_id, "inputs", "not allowed"))
            elif isinstance(action, RunJob) and self.hold_jobs:
                self.running[name].append(action)
            elif isinstance(action, RunJob):
                outputs = self.runners[name](action.spec, action.inputs)
                if outputs is not None:
                    self.deliver(name, JobDone(action.task_id, outputs, 5))
            elif isinstance(action, DeliverResult):
                if name in self.withhold:
                    continue
                self.results[action.task_id] = action.data
                if self.push_results:
                    self.deliver_client(action.task_id, ResultDelivered(action.task_id, action.data))
            elif isinstance(action, ServeResult):
                if name not in self.withhold:
                    self.results[action.task_id] = action.data + (b"\x00" if name in self.tamper else b"")
            elif isinstance(action, FetchResult):
                data = self.results.get(action.task_id)
                if client is None:
                    self.fetch_heights[name].append(self.chain.state.height)
                if client is None and self.failing_verifier_fetches[name] > 0:
                    self.failing_verifier_fetches[name] -= 1
                    self.deliver(name, FetchFailed(action.task_id, "result", "peer busy"))
                    continue
                if client is not None:
                    if self.failing_result_fetches > 0:
                        self.failing_result_fetches -= 1
                        self.deliver_client(action.task_id, FetchFailed(action.task_id, "result", "peer unreachable"))
                    elif data is not None:
                        self.deliver_client(action.task_id, ResultDelivered(action.task_id, data))
                elif data is None:
                    self.deliver(name, FetchFailed(action.task_id, "result", "provider does not serve it"))
                else:
                    self.deliver(name, ResultFetched(action.task_id, data))
            elif isinstance(action, RunVerify):
                verify = self.verifiers.get(action.spec.kernel) or lookup(action.spec.kernel,
                                                                          action.spec.version).verify
                verdict = verify(action.spec, action.inputs, action.claimed)
                self.deliver(name, VerifyDone(action.task_id, verdict.ok, verdict.reason))
            elif isinstance(action, RunSpotCheck):
                verdict = lookup(action.spec.kernel, action.spec.version).verify(
                    action.spec, self.inputs[action.task_id], action.outputs)
                self.deliver_client(action.task_id, VerificationOutcome(action.task_id, verdict.ok, verdict.reason))

    def probe(self) -> None:
        """One round of the node's liveness probes (``p2pgpu.liveness``) for every client task that wants one."""
        for task_id, (_, task) in list(self.clients.items()):
            provider = task.probe_target
            if provider is None:
                continue
            name = self.network.by_address(provider).name
            if name in self.dead:
                self.deliver_client(task_id, ProviderProbed(task_id, provider, error="connection refused"))
            else:
                (phase,) = self.providers[name].job_status(task.key.address, [task_id])
                self.deliver_client(task_id, ProviderProbed(task_id, provider, phase=phase))
        self.drain()

    def finish(self, name: str, task_id: bytes) -> None:
        """A held job of provider ``name`` completes now."""
        (action,) = [a for a in self.running[name] if a.task_id == task_id]
        self.running[name].remove(action)
        outputs = self.runners[name](action.spec, action.inputs)
        if outputs is not None:
            self.deliver(name, JobDone(action.task_id, outputs, 5))
        self.drain()

    def task(self, task_id: bytes):
        return self.chain.state.tasks.get(task_id)

    def balance(self, name: str) -> int:
        return self.chain.state.get_balance(self.address(name))


def matmul_job(n: int = 8, seed: int = 0, **kw) -> tuple[JobSpec, dict[str, np.ndarray]]:
    from kernels.spec import make_spec

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    return make_spec("matmul", 1, {}, {"a": a, "b": b}, **kw), {"a": a, "b": b}
