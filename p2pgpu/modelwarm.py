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
    """The provider role's :class:`~p2pgpu.market.warmset.WarmView` over the model cache."""

    def __init__(self, cache: ModelCache, catalog: ModelCatalog, model_of_task: ModelOfTask) -> None:
        self._cache = cache
        self._catalog = catalog
        self._model_of_task = model_of_task

    def startup(self, task_id: bytes, spec_hash: bytes) -> StartupEstimate | None:
        model = self._model_of_task(task_id, spec_hash)
        if model is None:
            return None  # not a task by model: the bid says nothing about a start
        if self._cache.is_warm(model):
            return estimate_startup_seconds(0, warm=True, on_disk=True)
        info = self._catalog.lookup(model)
        if info is None:
            return None  # not registered here (yet): the role declines or the job fails; no start to promise
        return estimate_startup_seconds(info.bundle_size, warm=False, on_disk=self._cache.on_disk(model))


def wanted_models(configured: Sequence[str], wildcard: str) -> list[bytes] | None:
    """``[provider] models`` as ids in order; None for the wildcard (every registered model that fits)."""
    if list(configured) == [wildcard]:
        return None
    return [bytes.fromhex(m) for m in configured]


class ModelPrefetcher:
    """Fetches the models a provider keeps warm, in the background: see the module docstring."""

    def __init__(self, cache: ModelCache, catalog: ModelCatalog, wanted: Sequence[bytes] | None,
                 budget_bytes: int, *, retry_seconds: float = 60.0) -> None:
        self.cache = cache
        self.catalog = catalog
        self.wanted = None if wanted is None else list(wanted)
        self.budget_bytes = budget_bytes
        self.retry_seconds = retry_seconds
        self.failed: set[bytes] = set()
        """Models whose last fetch failed (no holder connected, or it did not decode): tried again later."""

    @property
    def enabled(self) -> bool:
        return self.wanted is None or bool(self.wanted)

    async def prefetch_once(self) -> WarmPlan:
        """Plan against the registry and fetch what the plan says, one model at a time; logs each outcome."""
        plan = plan_warm_set(self.wanted, self.catalog, self.budget_bytes, self.cache.warm_sizes())
        for model, reason in plan.cold:
            log(logger, logging.INFO, "model_cold", model=model.hex()[:16], reason=reason.value)
        for info in plan.fetch:
            try:
                await self.cache.bundle(info.model_id, holders=info.holders, max_bytes=info.bundle_size)
            except ModelUnavailable as exc:
                self.failed.add(info.model_id)
                log(logger, logging.WARNING, "model_prefetch_failed", model=info.model_id.hex()[:16], error=str(exc))
                continue
            self.failed.discard(info.model_id)
            log(logger, logging.INFO, "model_prefetched", model=info.model_id.hex()[:16], bytes=info.bundle_size)
        return plan

    async def run(self, registry_size: Callable[[], int], *, poll_seconds: float = 2.0) -> None:
        """Prefetch now, then again when the registry grows or, after a failure, every ``retry_seconds``."""
        if not self.enabled:
            return
        seen = -1
        last = trio.current_time()
        while True:
            size = registry_size()
            now = trio.current_time()
            if size != seen or (self.failed and now - last >= self.retry_seconds):
                seen, last = size, now
                await self.prefetch_once()
            await trio.sleep(poll_seconds)
