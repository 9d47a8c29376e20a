"""Which registered models a provider keeps warm, within its byte budget: decided here, done by the shell.

The provider's ``[provider] models`` names model ids (or ``"*"``: every
registered model), and ``model_cache_bytes`` bounds what it keeps. This
module is the pure part of the model cache (``p2pgpu.modelcache`` is the
Trio shell that fetches, pins and loads): :func:`plan_warm_set` says which
models to fetch and load, which held ones to evict, and why any wanted model
is left cold; :func:`estimate_startup_seconds` is what a bid says about the
time before a task's model is ready.

What the registry knows about a model reaches this module through the
:class:`ModelCatalog` seam (``lookup``, ``model_ids``): the ledger's model
registry (``State.models``) once it is merged, a fake in tests. Nothing here
does I/O, so "what fits" is tested over plain tables.

Budget rule: a bundle counts its full size once (on disk it is the pinned
blob; loaded, a worker holds about as much). Explicitly listed models are
taken in the order the file lists them, each if it still fits; ``"*"``
takes models already held first (no fetch), then the smallest first (the
most models per byte), ties by id, so every provider with the same registry
and budget picks the same set.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "ColdReason",
    "ModelCatalog",
    "ModelInfo",
    "StartupEstimate",
    "WarmPlan",
    "WarmView",
    "estimate_startup_seconds",
    "plan_warm_set",
]



@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the registry says about one model, as much as the cache and the bids need."""

    model_id: bytes
    bundle_size: int
    """Bytes of the bundle blob (its SHA-256 is ``model_id``)."""
    royalty_per_unit: int = 0
    input_signature: tuple[str, tuple[int | None, ...]] = ("float32", ())
    output_signature: tuple[str, tuple[int | None, ...]] = ("float32", ())
    holders: tuple[str, ...] = ()
    """Peer ids that hold the bundle, best first (the pusher's node): where the data plane fetches it."""


class ModelCatalog(Protocol):
    """The registry, read-only: the seam the ledger's ``State.models`` fills after the registry merge."""

    def lookup(self, model_id: bytes) -> ModelInfo | None: ...

    def model_ids(self) -> Iterable[bytes]: ...


class ColdReason(enum.Enum):
    """Why a wanted model is not kept warm."""

    UNREGISTERED = "not in the model registry"
    OVER_BUDGET = "does not fit model_cache_bytes"


@dataclass(frozen=True, slots=True)
class WarmPlan:
    """What the shell does next: fetch and load ``fetch`` in order, drop ``evict``; ``cold`` says why not."""

    keep: tuple[ModelInfo, ...]
    """Every model to hold warm once the plan is done (held ones and fetched ones), in priority order."""
    fetch: tuple[ModelInfo, ...]
    evict: tuple[bytes, ...]
    cold: tuple[tuple[bytes, ColdReason], ...]
    used_bytes: int


def plan_warm_set(wanted: Sequence[bytes] | None, catalog: ModelCatalog, budget_bytes: int,
                  held: Mapping[bytes, int]) -> WarmPlan:
    """The models to keep warm: ``wanted`` ids in order (None: every registered model), within the budget.

    ``held`` maps the ids already fetched (pinned, or warm) to their sizes:
    they are kept when still wanted and evicted otherwise.
    """
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    cold: list[tuple[bytes, ColdReason]] = []
    candidates: list[ModelInfo] = []
    if wanted is None:
        infos = [info for info in (catalog.lookup(m) for m in catalog.model_ids()) if info is not None]
        infos.sort(key=lambda i: (i.model_id not in held, i.bundle_size, i.model_id))
        candidates = infos
    else:
        seen: set[bytes] = set()
        for model in wanted:
            if model in seen:
                continue
            seen.add(model)
            info = catalog.lookup(model)
            if info is None:
                cold.append((model, ColdReason.UNREGISTERED))
            else:
                candidates.append(info)
    keep: list[ModelInfo] = []
    used = 0
    for info in candidates:
        if used + info.bundle_size <= budget_bytes:
            keep.append(info)
            used += info.bundle_size
        else:
            cold.append((info.model_id, ColdReason.OVER_BUDGET))
    kept = {info.model_id for info in keep}
    return WarmPlan(
        keep=tuple(keep),
        fetch=tuple(info for info in keep if info.model_id not in held),
        evict=tuple(sorted(m for m in held if m not in kept)),
        cold=tuple(cold),
        used_bytes=used,
    )


@dataclass(frozen=True, slots=True)
class StartupEstimate:
    """What a bid says about starting a task's model: warm (loaded) or cold, and the seconds until ready."""

    warm: bool
    seconds: float


def estimate_startup_seconds(bundle_size: int, *, warm: bool, on_disk: bool,
                             fetch_bytes_per_second: float = 20e6, load_seconds: float = 2.0,
                             load_bytes_per_second: float = 200e6) -> StartupEstimate:
    """Seconds before a task's model can run here: 0 when warm, else fetch (unless on disk) plus load.

    The defaults are conservative figures for this machine's data plane and a
    TensorFlow worker building a small Keras model; the shell may pass measured ones.
    """
    if warm:
        return StartupEstimate(True, 0.0)
    if bundle_size < 0 or fetch_bytes_per_second <= 0 or load_bytes_per_second <= 0:
        raise ValueError("sizes must be >= 0 and rates positive")
    fetch = 0.0 if on_disk else bundle_size / fetch_bytes_per_second
    seconds = fetch + load_seconds + bundle_size / load_bytes_per_second
    return StartupEstimate(False, math.ceil(seconds * 10) / 10)


class WarmView(Protocol):
    """What the provider role asks the model cache when it bids: this task's model warm or cold, and how long.

    ``model_of_task`` is the seam for "which model does this task name":
    ``PostTask.model_id`` (in the announce or the ledger task) after the
    registry merge. None means the task names no registered model, and the
    bid says nothing about a start.
    """

    def startup(self, task_id: bytes, spec_hash: bytes) -> StartupEstimate | None: ...
