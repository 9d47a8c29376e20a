"""Keeping registered models warm on a provider: the registry as a catalog, the cache as a bid's warm view, prefetch.

:mod:`p2pgpu.market.warmset` decides (what to fetch within the budget, what
a cold start costs) and :mod:`p2pgpu.modelcache` fetches, pins and decodes.
This module joins the two to the node:

- :class:`LedgerModelCatalog` reads the ledger's model registry
  (``State.models``) as a :class:`~p2pgpu.market.warmset.ModelCatalog`; a
  model's holder is its owner's node (the pusher stored the bundle as a
  public blob), when we know its peer.
- :class:`CacheWarmView` answers the provider role's "is this task's model
  warm here" when it bids: warm when the cache holds the decoded bundle,
  else cold with :func:`~p2pgpu.market.warmset.estimate_startup_seconds`.
- :class:`ModelPrefetcher` fetches the ``[provider] models`` (or ``"*"``)
  that fit ``model_cache_bytes`` at start and again when the registry grows,
  logging each model fetched, failed or left cold as a structured event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import trio

from kernels.bymodel import spec_model_id
from ledger.state import ModelEntry, State
from p2pgpu.market import ProviderRole
from p2pgpu.market.warmset import (ModelCatalog, ModelInfo, StartupEstimate, WarmPlan, estimate_startup_seconds,
                                   plan_warm_set)
from p2pgpu.modelcache import ModelCache, ModelUnavailable
from p2pgpu.net.log import log

__all__ = ["CacheWarmView", "LedgerModelCatalog", "ModelPrefetcher", "model_info", "task_model_id", "wanted_models"]

logger = logging.getLogger(__name__)

PeerOf = Callable[[bytes], "str | None"]
ModelOfTask = Callable[[bytes, bytes], "bytes | None"]
"""``model_of_task(task_id, spec_hash)``: the registered model a task names, None when it names none."""


def model_info(entry: ModelEntry, holders: Sequence[str] = ()) -> ModelInfo:
    """What the cache and the bids need of one registry entry."""
    return ModelInfo(model_id=entry.model_id, bundle_size=entry.bundle_size,
                     royalty_per_unit=entry.royalty_per_unit,
                     input_signature=(entry.input.dtype, tuple(entry.input.shape)),
                     output_signature=(entry.output.dtype, tuple(entry.output.shape)),
                     holders=tuple(holders))


class LedgerModelCatalog:
    """The ledger's model registry as a :class:`ModelCatalog`, read at each call (the state moves on)."""

    def __init__(self, state: Callable[[], State], peer_of: PeerOf) -> None:
        self._state = state
        self._peer_of = peer_of

    def lookup(self, model_id: bytes) -> ModelInfo | None:
        entry = self._state().models.get(model_id)
        if entry is None:
            return None
        owner = self._peer_of(entry.owner)
        return model_info(entry, () if owner is None else (owner,))

    def model_ids(self) -> Iterable[bytes]:
        return list(self._state().models)


def task_model_id(role: ProviderRole | None, task_id: bytes) -> bytes | None:
    """The model a task the provider role is bidding on names (from the spec it holds), None if none or unknown."""
    job = role.jobs.get(task_id) if role is not None else None
    return spec_model_id(job.spec) if job is not None and job.spec is not None else None


class CacheWarmView:
    """The provider role's :class:`~p2pgpu.market.warmset.WarmView` over the warm pool and the model cache.

    Three answers: *loaded* (a warm session holds the model in a worker:
    warm, 0 s), *on disk* (the bundle is in the store or decoded in memory:
    cold, the load only) and *absent* (cold, the fetch and the load).
    """

    def __init__(self, cache: ModelCache, catalog: ModelCatalog, model_of_task: ModelOfTask,
                 loaded: Callable[[bytes], bool] = lambda _model: False) -> None:
        self._cache = cache
        self._catalog = catalog
        self._model_of_task = model_of_task
        self._loaded = loaded

    def startup(self, task_id: bytes, spec_hash: bytes) -> StartupEstimate | None:
        model = self._model_of_task(task_id, spec_hash)
        if model is None:
            return None  # not a task by model: the bid says nothing about a start
        if self._loaded(model):
            return estimate_startup_seconds(0, warm=True, on_disk=True)
        info = self._catalog.lookup(model)
        if info is None:
            return None  # not registered here (yet): the role declines or the job fails; no start to promise
        on_disk = self._cache.is_warm(model) or self._cache.on_disk(model)
        return estimate_startup_seconds(info.bundle_size, warm=False, on_disk=on_disk)


def wanted_models(configured: Sequence[str], wildcard: str) -> list[bytes] | None:
    """``[provider] models`` as ids in order; None for the wildcard (every registered model that fits)."""
    if list(configured) == [wildcard]:
        return None
    return [bytes.fromhex(m) for m in configured]


class ModelPrefetcher:
    """Fetches the models a provider keeps warm, in the background: see the module docstring."""

    def __init__(self, cache: ModelCache, catalog: ModelCatalog, wanted: Sequence[bytes] | None,
                 budget_bytes: int, *, retry_seconds: float = 60.0, in_use: Callable[[], set[bytes]] = set,
                 keep_loaded: Callable[[Sequence[bytes]], None] | None = None) -> None:
        self.cache = cache
        self.catalog = catalog
        self.wanted = None if wanted is None else list(wanted)
        self.budget_bytes = budget_bytes
        self.retry_seconds = retry_seconds
        self.in_use = in_use
        """Models a running task or session uses right now: never evicted (tried again at the next plan)."""
        self.keep_loaded = keep_loaded
        """Told the models to hold loaded in workers (the warm pool), in priority order, after each plan."""
        self.failed: set[bytes] = set()
        """Models whose last fetch failed (no holder connected, or it did not decode): tried again later."""
        self.deferred: set[bytes] = set()
        """Models the plan evicts but a task still uses (and the fetches that wait for their room): done at a
        later plan, tried every ``retry_seconds``. The disk never holds more than ``budget_bytes`` of bundles
        this way (a model fetched for a task is the exception: it is over the plan until the next one)."""

    @property
    def enabled(self) -> bool:
        return self.wanted is None or bool(self.wanted)

    async def prefetch_once(self) -> WarmPlan:
        """Plan against the registry and fetch what the plan says, one model at a time; logs each outcome."""
        plan = plan_warm_set(self.wanted, self.catalog, self.budget_bytes, self.cache.held_sizes())
        for model, reason in plan.cold:
            log(logger, logging.INFO, "model_cold", model=model.hex()[:16], reason=reason.value)
        self.evict(plan)
        for info in plan.fetch:
            held_bytes = sum(self.cache.held_sizes().values())
            if held_bytes + info.bundle_size > self.budget_bytes:  # an eviction waits for a task: fetch after it
                self.deferred.add(info.model_id)
                log(logger, logging.INFO, "model_fetch_deferred", model=info.model_id.hex()[:16],
                    reason="model_cache_bytes is full until a model in use can be evicted")
                continue
            self.deferred.discard(info.model_id)
            try:
                await self.cache.bundle(info.model_id, holders=info.holders, max_bytes=info.bundle_size)
            except ModelUnavailable as exc:
                self.failed.add(info.model_id)
                log(logger, logging.WARNING, "model_prefetch_failed", model=info.model_id.hex()[:16], error=str(exc))
                continue
            self.failed.discard(info.model_id)
            log(logger, logging.INFO, "model_prefetched", model=info.model_id.hex()[:16], bytes=info.bundle_size)
        if self.keep_loaded is not None:
            held = self.cache.held_sizes()
            self.keep_loaded([info.model_id for info in plan.keep if info.model_id in held])
        return plan

    def evict(self, plan: WarmPlan) -> list[bytes]:
        """Carry out ``plan.evict`` before any fetch (to make room): stop holding each model loaded, then
        unpin and delete its bundle -- except a model a running task or session uses, which waits for the next
        plan, as does one a task is fetching right now (the cache refuses to evict it). Synchronous from the in-use
        check to the deletion, so no task can start using it in between."""
        if plan.evict and self.keep_loaded is not None:
            self.keep_loaded([info.model_id for info in plan.keep if info.model_id in self.cache.held_sizes()])
        busy = self.in_use()
        done: list[bytes] = []
        for model in plan.evict:
            if model in busy:
                self.deferred.add(model)
                log(logger, logging.INFO, "model_evict_deferred", model=model.hex()[:16], reason="in use")
                continue
            if self.cache.evict(model):
                self.deferred.discard(model)
                done.append(model)
            elif self.cache.fetching(model):  # a task's fetch of it is under way: it is in use once that returns
                self.deferred.add(model)
                log(logger, logging.INFO, "model_evict_deferred", model=model.hex()[:16], reason="being fetched")
            else:
                self.deferred.discard(model)  # not held any more: nothing to evict
        return done

    async def run(self, registry_size: Callable[[], int], *, poll_seconds: float = 2.0) -> None:
        """Prefetch now, then again when the registry grows or, after a failure, every ``retry_seconds``."""
        if not self.enabled:
            return
        seen = -1
        last = trio.current_time()
        while True:
            size = registry_size()
            now = trio.current_time()
            if size != seen or ((self.failed or self.deferred) and now - last >= self.retry_seconds):
                seen, last = size, now
                await self.prefetch_once()
            await trio.sleep(poll_seconds)
