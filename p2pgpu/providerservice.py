"""The provider's start-up and its fault drills: what a node does before and around the market's ``ProviderRole``.

Start-up warms the kernel runtime (TensorFlow loads in worker processes),
probes its capabilities, builds the :class:`~p2pgpu.market.ProviderRole` from
the node's ``[provider]`` table and registers the provider on the ledger if
it is not yet. Meanwhile it prefetches the ``[provider] models`` it keeps
warm (:mod:`p2pgpu.modelwarm`), and its bids on a task by model say whether
that model is warm here. The fault drills (``[provider] fault``: ``no_delivery``,
``wrong_result``) make a provider misbehave on purpose so that the devnet and
the tests can watch the market catch it; they live here, beside the start-up
that reads the same table, and not in the roles' shell.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from kernels.bundle import ModelBundle
from ledger.codec import encode
from ledger.transactions import RegisterProvider
from p2pgpu.clientservice import block_seconds
from p2pgpu.config import MODEL_WILDCARD
from p2pgpu.config import ProviderConfig as NodeProviderConfig
from p2pgpu.market import JobPhase, PricingPolicy, ProviderConfig, ProviderRole
from p2pgpu.modelcache import ModelCache, ModelUnavailable
from p2pgpu.modelwarm import CacheWarmView, LedgerModelCatalog, ModelPrefetcher, task_model_id, wanted_models
from p2pgpu.net.log import log
from p2pgpu.ports import RolesNode
from p2pgpu.provider_warmup import provider_slots, start_provider_runtime
from p2pgpu.txoutbox import TxOutbox
from p2pgpu.warmpool import WarmPool

if TYPE_CHECKING:  # kernels.runtime pulls in the kernel registry; only its type is needed here
    from kernels.runtime import KernelRuntime

__all__ = ["PROVIDER", "ProviderService", "drill_job_outputs", "perturb", "provider_role_config"]

logger = logging.getLogger(__name__)

MODEL_USING_PHASES = frozenset({JobPhase.FETCHING, JobPhase.QUEUED, JobPhase.RUNNING, JobPhase.STREAMING})
"""A provider job in these phases uses its model (fetching it, about to run, running): the model is not evicted."""

PROVIDER = "provider"
"""The roles' inbox target (and transaction origin) of the provider role."""


def provider_role_config(cfg: NodeProviderConfig) -> ProviderConfig:
    """The market provider role's settings from the node's ``[provider]`` table (``p2pgpu.config.ProviderConfig``)."""
    return ProviderConfig(max_concurrent_jobs=provider_slots(cfg), max_queued=cfg.queue,
                          receipt_every=cfg.receipt_every, run_before_final=cfg.run_before_final)


class ProviderService:
    """The node's provider: its kernel runtime and, once that is warm, its market role."""

    def __init__(self, node: RolesNode, outbox: TxOutbox, *, model_cache: ModelCache,
                 peer_of: Callable[[bytes], str | None]) -> None:
        self.node = node
        self.outbox = outbox
        self.runtime: KernelRuntime | None = None
        self.ready_runtime: KernelRuntime | None = None
        """``runtime`` once warmed up and probed. Until then its workers are being read by the warm-up itself:
        a warm pool or stream session reading one at the same time failed the whole runtime
        (trio's ``BusyResourceError``), so both wait for this."""
        self.role: ProviderRole | None = None
        cfg = node.config.provider
        self.catalog = LedgerModelCatalog(lambda: node.chain.state, peer_of)
        """The ledger's model registry, with each model's owner's node as its holder."""
        self.model_cache = model_cache
        self.pool = WarmPool(lambda: self.ready_runtime, provider_slots(cfg), self._bundle_of)
        """The warm models loaded in workers (at most ``slots - 1``), handed to stream tasks and lent to batches."""
        self.warm = CacheWarmView(model_cache, self.catalog, lambda task_id, _spec: task_model_id(self.role, task_id),
                                  loaded=self.pool.is_loaded)
        """What our bids say about a task's model: warm when a worker has it loaded, else cold and how long."""
        self.prefetcher = ModelPrefetcher(model_cache, self.catalog, wanted_models(cfg.models, MODEL_WILDCARD),
                                          cfg.model_cache_bytes, in_use=self.models_in_use,
                                          keep_loaded=self.pool.set_wanted)
        """``[provider] models`` fetched in the background at start and when the registry grows; evicts
        what no longer fits ``model_cache_bytes``."""

    async def run(self) -> None:
        """Prefetch the configured models in the background while the runtime warms; bid once it is ready.

        The warm pool fills once the runtime is up (it loads only from spare workers) and keeps the
        prefetched models loaded until the node stops.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: self.prefetcher.run(lambda: len(self.node.chain.state.models)))
            nursery.start_soon(self.pool.run)
            await self._serve()
            nursery.cancel_scope.cancel()  # the runtime failed: no role, nothing to keep warm for

    async def _bundle_of(self, model: bytes) -> ModelBundle:
        """The decoded bundle of a registered model, from the cache (or its owner's node)."""
        info = self.catalog.lookup(model)
        if info is None:
            raise ModelUnavailable(f"model {model.hex()[:16]} is not registered on our ledger")
        return await self.model_cache.bundle(model, holders=info.holders, max_bytes=info.bundle_size)

    def models_in_use(self) -> set[bytes]:
        """Models a task of ours is fetching, queued with, running or streaming, or a warm session serves."""
        used = set(self.pool.in_use())
        role = self.role
        if role is not None:
            for task_id, job in role.jobs.items():
                if job.phase in MODEL_USING_PHASES:
                    model = task_model_id(role, task_id)
                    if model is not None:
                        used.add(model)
        return used

    async def _serve(self) -> None:
        """Warm the kernel runtime, probe it, then start bidding; holds the runtime until cancelled.

        ``Node.run`` starts the runtime before the node joins the network (``Node.kernel_runtime``), so
        TensorFlow is usually loaded or loading by now; a node without one gets it started here.
        """
        cfg = self.node.config.provider
        runtime = self.node.kernel_runtime or start_provider_runtime(self.node.config)
        if runtime is None:  # start_provider_runtime gives None only to a node without the provider role
            log(logger, logging.ERROR, "provider_runtime_failed", error="no kernel runtime for the provider role")
            return
        self.runtime = runtime
        try:
            runtime.start()
            await runtime.wait_ready()
            caps = await runtime.probe(n=512, repeats=2)
        except Exception as exc:
            log(logger, logging.ERROR, "provider_runtime_failed", error=repr(exc))
            runtime.close()
            self.runtime = None
            return
        self.ready_runtime = runtime
        pricing = PricingPolicy(cost_per_second=float(cfg.unit_cost), margin_bps=int(cfg.margin * 10_000),
                                floor=cfg.floor, block_seconds=block_seconds(self.node.config))
        self.role = ProviderRole(key=self.node.keys.account, chain_id=self.node.chain_id, capabilities=caps,
                                 pricing=pricing, config=provider_role_config(cfg), warm=self.warm)
        log(logger, logging.INFO, "provider_ready", device=caps.device_kind, gflops=round(caps.matmul_gflops, 1))
        state = self.node.chain.state
        me = self.node.keys.account.address
        if me not in state.providers:
            self.outbox.submit(PROVIDER, RegisterProvider(sender=me, nonce=0, fee=state.params.min_fee,
                                                          capabilities=encode(caps),
                                                          bond=state.params.min_provider_bond))
        try:
            await trio.sleep_forever()
        finally:
            self.ready_runtime = None
            runtime.close()

    @property
    def fault(self) -> str:
        """The ``[provider] fault`` drill this node runs (``"none"``, ``"wrong_result"`` or ``"no_delivery"``)."""
        return self.node.config.provider.fault

    def stream_runtime(self) -> Any:
        """The runtime stream sessions load models into: the warm pool, which hands over a loaded model or
        loads cold in the runtime (with the ``wrong_result`` fault drill, a lying one); None before the runtime."""
        if self.ready_runtime is None:
            return None
        if self.fault == "wrong_result":
            return WrongOutputs(self.pool)
        return self.pool

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()


def drill_job_outputs(fault: str, task_id: bytes, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """A finished job's outputs as the fault drill would deliver them: ``None`` when the job "vanishes".

    ``no_delivery``: nothing is delivered (the ledger records MISSED at the
    deadline); ``wrong_result``: every output perturbed; otherwise as computed.
    """
    if fault == "no_delivery":
        log(logger, logging.WARNING, "fault_drill", fault=fault, task=task_id.hex()[:16])
        return None
    if fault == "wrong_result":
        log(logger, logging.WARNING, "fault_drill", fault=fault, task=task_id.hex()[:16])
        return {name: perturb(arr) for name, arr in outputs.items()}
    return dict(outputs)


class WrongOutputs:
    """Fault drill ``wrong_result`` for streams: every output of the warm model is perturbed, then signed."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime

    async def open_stream(self, spec: Any, inputs: Mapping[str, np.ndarray]) -> PerturbedSession:
        log(logger, logging.WARNING, "fault_drill", fault="wrong_result", stream=True)
        return PerturbedSession(await self._runtime.open_stream(spec, inputs))


class PerturbedSession:
    """A warm stream session whose every answer is :func:`perturb`-ed."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    @property
    def model_loads(self) -> int:
        return int(self._inner.model_loads)

    async def infer(self, item: np.ndarray) -> np.ndarray:
        return perturb(await self._inner.infer(item))

    async def aclose(self) -> None:
        await self._inner.aclose()


def perturb(arr: np.ndarray) -> np.ndarray:
    """A plausible-looking wrong answer: one element off by a lot (what an audit must catch)."""
    wrong = np.array(arr, copy=True)
    if wrong.size:
        flat = wrong.reshape(-1)
        flat[0] = flat[0] + (1 if np.issubdtype(flat.dtype, np.integer) else 1000.0)
    return wrong
