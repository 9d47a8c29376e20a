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
    CommandStream,
    Action,
    AnnounceReceived,
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
    InputsPushed,
    InputsReceived,
    InputsServed,
    JobDone,
    MarketMessageError,
    OpenStream,
    PricingPolicy,
    ProviderConfig,
    ProviderProbed,
    ProviderRole,
    PrepareResult,
    PublishAnnounce,
    PublishBid,
    PublishDecline,
    Report,
    ReportProgress,
    ResultDelivered,
    ResultFetched,
    ResultReady,
    RunJob,
    RunSpotCheck,
    RunVerify,
    SeenCache,
    SendReceipt,
    ServeInputs,
    ServeResult,
    ServeSpec,
    ServeStream,
    ServeStreamItem,
    SignedDecline,
    SpecFetched,
    StreamItemFetched,
    SubmitTx,
    TaskClosed,
    TxFailed,
    VerificationOutcome,
    VerifyDone,
    validate_bid_offer,
    validate_task_message,
)
from p2pgpu.market.executor import ActionExecutor
from p2pgpu.market.warmset import WarmView

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


@dataclass(frozen=True)
class _Origin:
    """Whose actions these are: a node by name, and the client task when it is one of ours."""

    name: str
    client: ClientTask | None


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
        self.push_inputs = False  # True: a client's Assign takes the inputs to its provider (InputsReceived)
        self.pushed: set[tuple[bytes, str]] = set()  # (task id, provider): inputs pushed there, fetched locally
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
        self._execute = self._action_table()

    # ------------------------------------------------------------ setup

    def address(self, name: str) -> bytes:
        return self.network.address(name)

    def add_provider(self, name: str, *, runner: Runner = honest_matmul, caps: Capabilities = CPU,
                     pricing: PricingPolicy = PricingPolicy(), config: ProviderConfig = ProviderConfig(),
                     warm: WarmView | None = None) -> ProviderRole:
        role = ProviderRole(key=self.network.key(name), chain_id=self.chain_id, capabilities=caps, pricing=pricing,
                            config=config, warm=warm)
        self.providers[name] = role
        self.runners[name] = runner
        return role

    def reserve_nonce(self, name: str) -> int:
        return self.chain.nonce(name) + sum(1 for n, _ in self.pending if n == name)

    def submit(self, name: str, spec: JobSpec, inputs: dict[str, np.ndarray], *, max_unit_price: int,
               kind: TaskKind = TaskKind.BATCH, units: int = 1, config: ClientConfig = ClientConfig(),
               open_tasks: Callable[[bytes], int] | None = None) -> ClientTask:
        task = ClientTask(key=self.network.key(name), chain_id=self.chain_id, spec=spec,
                          post_nonce=self.reserve_nonce(name), max_unit_price=max_unit_price,
                          data_peer=b"peer-" + name.encode(), kind=kind, units=units, config=config,
                          height=self.chain.state.height, providers=self.chain.state.providers,
                          open_tasks=open_tasks)
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
        origin = _Origin(name, client)
        for action in actions:
            self.logs[name].actions.append(action)
            if client is not None:
                self.logs["task:" + client.task_id.hex()].actions.append(action)
            self._execute(origin, action)

    def _action_table(self) -> ActionExecutor[_Origin]:
        """The simulator's part of each action: the same table the node's shell builds, with in-memory handlers."""
        def recorded_only(origin: _Origin, action: Action) -> None:
            pass  # progress, results and streams: the test reads them from self.logs

        def unsupported(origin: _Origin, action: Action) -> None:
            raise AssertionError(f"the simulator has no handler for {type(action).__name__}")

        return ActionExecutor({
            SubmitTx: self._submit_tx,
            PublishAnnounce: self._publish_announce,
            (PublishBid, PublishDecline): self._publish_bid,
            ServeSpec: recorded_only,  # specs are served from self.specs
            ServeInputs: lambda o, a: self.allowed[a.task_id].update(a.peers),
            ServeStreamItem: self._serve_stream_item,
            FetchStreamItem: self._fetch_stream_item,
            FetchSpec: self._fetch_spec,
            FetchInputs: self._fetch_inputs,
            RunJob: self._run_job,
            DeliverResult: self._deliver_result,
            ServeResult: self._serve_result,
            FetchResult: self._fetch_result,
            RunVerify: self._run_verify,
            RunSpotCheck: self._spot_check,
            CommandStream: self._command_stream,
            (OpenStream, ServeStream, SendReceipt, ReportProgress, ResultReady, TaskClosed, Report,
             PrepareResult): recorded_only,
        }, unsupported=unsupported)

    def _submit_tx(self, origin: _Origin, action: SubmitTx) -> None:
        self.pending.append((origin.name, action))
        body = action.body
        if self.push_inputs and isinstance(body, Assign) and origin.client is not None:
            # the node pushes the inputs over the bid link as it sends the Assign (p2pgpu.linkdata)
            provider = self.network.by_address(body.bid.bid.provider).name
            if provider not in self.dead and self.clients[body.task_id][0] not in self.offline:
                self.pushed.add((body.task_id, provider))
                self.deliver(provider, InputsReceived(body.task_id, self.address(origin.name)))
                self.deliver_client(body.task_id, InputsPushed(body.task_id, body.bid.bid.provider))

    def _command_stream(self, origin: _Origin, action: CommandStream) -> None:
        """What the stream shell's session owner does: apply the role's command, hand the actions back."""
        session = self.providers[origin.name].stream(action.task_id)
        if session is not None:
            self.route(origin.name, session.apply(action.command))

    def _publish_announce(self, origin: _Origin, action: PublishAnnounce) -> None:
        try:
            rec = validate_task_message(self.chain_id, self.chain.state.height, action.data, self.seen_task)
        except MarketMessageError as exc:  # recorded for the test to inspect
            self.gossip_rejects.append(exc)
            return
        for pname in self.providers:
            self.deliver(pname, AnnounceReceived(rec))

    def _publish_bid(self, origin: _Origin, action: PublishBid | PublishDecline) -> None:
        try:
            rec = validate_bid_offer(self.chain_id, self.chain.state.height, action.data, self.seen_bid)
        except MarketMessageError as exc:
            self.gossip_rejects.append(exc)
            return
        if isinstance(rec, SignedDecline):
            self.deliver_client(rec.notice.task_id, DeclineReceived(rec.notice))
        else:
            self.deliver_client(rec.signed.bid.task_id, BidReceived(rec.signed, rec.start))

    def _serve_stream_item(self, origin: _Origin, action: ServeStreamItem) -> None:
        for h in (action.input_hash, action.output_hash):
            self.allowed[h].update(action.peers)

    def _cut_off(self, origin: _Origin, action: FetchStreamItem | FetchSpec | FetchInputs | FetchResult) -> bool:
        """A fetch by a node whose own network is down: it fails (True), whatever it asked for."""
        name = origin.name
        if name not in self.cut_off:
            return False
        what = {FetchStreamItem: "stream-item", FetchSpec: "spec", FetchInputs: "inputs",
                FetchResult: "result"}[type(action)]
        if what == "result":
            self.fetch_heights[name].append(self.chain.state.height)
        failed = FetchFailed(action.task_id, what, "our own network is down")
        if origin.client is not None:
            self.deliver_client(action.task_id, failed)
        else:
            self.deliver(name, failed)
        return True

    def _fetch_stream_item(self, origin: _Origin, action: FetchStreamItem) -> None:
        if self._cut_off(origin, action):
            return
        name, me = origin.name, self.address(origin.name)
        hashes = (action.input_hash, action.output_hash)
        if all(me in self.allowed[h] and h in self.items for h in hashes):
            self.deliver(name, StreamItemFetched(action.task_id, *(self.items[h] for h in hashes)))
        else:
            self.deliver(name, FetchFailed(action.task_id, "stream-item", "client does not serve it"))

    def _fetch_spec(self, origin: _Origin, action: FetchSpec) -> None:
        if self._cut_off(origin, action):
            return
        data = self.specs.get(action.task_id)
        if data is None:
            self.deliver(origin.name, FetchFailed(action.task_id, "spec", "client does not serve it"))
        else:
            self.deliver(origin.name, SpecFetched(action.spec_hash, data))

    def _fetch_inputs(self, origin: _Origin, action: FetchInputs) -> None:
        if self._cut_off(origin, action):
            return
        name, me = origin.name, self.address(origin.name)
        if (action.task_id, name) in self.pushed:  # kept from the push: no fetch
            self.deliver(name, InputsFetched(action.task_id, self.inputs[action.task_id]))
        elif self.clients.get(action.task_id, ("",))[0] in self.offline:
            self.deliver(name, FetchFailed(action.task_id, "inputs", "peer unreachable"))
        elif me in self.allowed[action.task_id]:
            self.deliver(name, InputsFetched(action.task_id, self.inputs[action.task_id]))
            self.deliver_client(action.task_id, InputsServed(action.task_id, me))
        else:
            self.deliver(name, FetchFailed(action.task_id, "inputs", "not allowed"))

    def _run_job(self, origin: _Origin, action: RunJob) -> None:
        if self.hold_jobs:
            self.running[origin.name].append(action)
            return
        outputs = self.runners[origin.name](action.spec, action.inputs)
        if outputs is not None:
            self.deliver(origin.name, JobDone(action.task_id, outputs, 5))

    def _deliver_result(self, origin: _Origin, action: DeliverResult) -> None:
        if origin.name in self.withhold:
            return
        self.results[action.task_id] = action.data
        if self.push_results:
            self.deliver_client(action.task_id, ResultDelivered(action.task_id, action.data))

    def _serve_result(self, origin: _Origin, action: ServeResult) -> None:
        if origin.name not in self.withhold:
            self.results[action.task_id] = action.data + (b"\x00" if origin.name in self.tamper else b"")

    def _fetch_result(self, origin: _Origin, action: FetchResult) -> None:
        if self._cut_off(origin, action):
            return
        name, client = origin.name, origin.client
        data = self.results.get(action.task_id)
        if client is None:
            self.fetch_heights[name].append(self.chain.state.height)
        if client is None and self.failing_verifier_fetches[name] > 0:
            self.failing_verifier_fetches[name] -= 1
            self.deliver(name, FetchFailed(action.task_id, "result", "peer busy"))
            return
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

    def _run_verify(self, origin: _Origin, action: RunVerify) -> None:
        verify = self.verifiers.get(action.spec.kernel) or lookup(action.spec.kernel, action.spec.version).verify
        verdict = verify(action.spec, action.inputs, action.claimed)
        self.deliver(origin.name, VerifyDone(action.task_id, verdict.ok, verdict.reason))

    def _spot_check(self, origin: _Origin, action: RunSpotCheck) -> None:
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
