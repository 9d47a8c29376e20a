"""Warm means loaded: a provider's ``[provider] models`` held in kernel workers, each in an open stream session.

The model cache (:mod:`p2pgpu.modelcache`) puts a bundle on disk and in
memory; a task still paid the model load in a TensorFlow worker (seconds for
a real model). :class:`WarmPool` keeps one pre-opened ``stream_infer``
session per warm model (the spec :func:`kernels.bymodel.expand_model_spec`
makes of the bundle), and:

- **hands it over** to the first stream task for that model
  (:meth:`WarmPool.open_stream`, the runtime the stream transport calls):
  the session is rebound to the task's own spec (its limits), so the task
  starts at once with its load already paid; a second stream task for the
  same model at the same time finds no session and loads cold, as before;
- **lends it** to a by-model ``keras_infer`` batch task
  (:meth:`WarmPool.run_job`): the rows go through the loaded model with
  ``keras_infer``'s own ``predict``, so the outputs are the cold run's;
- **refills** in the background after a hand-over, from spare workers only.

The slot rule: the pool holds at most ``slots - 1`` sessions
(:func:`warm_session_limit`), and opens one only when another worker stays
idle after it (``KernelRuntime.open_stream(wait=False)`` plus
``idle_workers() >= 2``), so at least one worker is always left for batch
jobs and cold loads. An idle session is not a job: the provider role still
runs ``slots`` jobs at once, and when a job's checkout finds no idle worker
the runtime calls :meth:`WarmPool.yield_worker` (``KernelRuntime.on_starved``),
which closes the least wanted idle session and gives its worker back, so a
job never waits behind a model nobody is using. Each worker holds at most
one model (a session owns its worker), so a warm model costs no TensorFlow
process beyond the ``slots`` the runtime starts anyway.

Every state change here is synchronous (no ``await`` between reading the
pool and writing it): one filler task opens sessions, everything else takes
or returns them in one step, so many concurrent callers cannot both get one
session.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from kernels.bundle import ModelBundle
from kernels.bymodel import expand_model_spec, make_model_spec, spec_model_id
from kernels.errors import KernelError
from kernels.jobspec import JobSpec
from kernels.spec import validate_inputs
from p2pgpu.modelcache import ModelUnavailable
from p2pgpu.net.log import log

if TYPE_CHECKING:  # kernels.runtime pulls in the kernel registry; only its types are needed here
    from kernels.runtime import KernelRuntime, StreamSession

__all__ = ["HandedSession", "WarmPool", "model_key", "warm_session_limit"]

logger = logging.getLogger(__name__)

BundleOf = Callable[[bytes], Awaitable[ModelBundle]]
"""``bundle_of(model_id)``: the decoded bundle (from the model cache; raises ``ModelUnavailable``)."""

ModelKey = tuple[tuple[str, bytes], ...]


def warm_session_limit(slots: int) -> int:
    """Sessions the pool may hold for ``slots`` workers: all but one (a one-slot provider keeps none loaded)."""
    return max(0, slots - 1)


def model_key(spec: JobSpec) -> ModelKey:
    """What a ``stream_infer`` spec loads: its inputs by name and hash (the model config and weights)."""
    return tuple(sorted((name, ref.hash) for name, ref in spec.inputs))


@dataclass(slots=True)
class _Warm:
    model: bytes
    session: StreamSession
    lent: bool = False
    """Running a batch task's rows right now (:meth:`WarmPool.run_job`): neither handed over nor yielded."""


class HandedSession:
    """A warm session handed over to one stream task: ``model_loads`` counts the loads *this task* paid (0)."""

    def __init__(self, pool: WarmPool, model: bytes, inner: StreamSession) -> None:
        self._pool = pool
        self.model = model
        self._inner = inner
        self._loads_before = inner.model_loads
        self.warm_start = True
        self._closed = False

    @property
    def model_loads(self) -> int:
        return int(self._inner.model_loads) - self._loads_before

    @property
    def items(self) -> int:
        return int(self._inner.items)

    async def infer(self, item: np.ndarray) -> np.ndarray:
        return await self._inner.infer(item)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool._returned(self.model)
        await self._inner.aclose()


class WarmPool:
    """Loaded models for a provider's workers: see the module docstring."""

    def __init__(self, runtime: Callable[[], KernelRuntime | None], slots: int, bundle_of: BundleOf, *,
                 poll_seconds: float = 1.0) -> None:
        self._runtime = runtime
        self.limit = warm_session_limit(slots)
        self._bundle_of = bundle_of
        self.poll_seconds = poll_seconds
        self.wanted: list[bytes] = []
        """Models to hold loaded, most wanted first (the warm plan's keep list); at most ``limit`` are."""
        self._warm: dict[bytes, _Warm] = {}
        self._keys: dict[ModelKey, bytes] = {}
        self._opening: bytes | None = None
        self.handed: Counter[bytes] = Counter()
        """Warm sessions handed to stream tasks and still open, per model."""
        self.handovers = 0
        self.yielded = 0
        self.loads = 0
        """Sessions the pool opened (each one model load in a worker)."""
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None

    # -- what the provider asks ------------------------------------------------------

    def is_loaded(self, model: bytes) -> bool:
        """Whether ``model`` is loaded in a pool session (idle or running a lent batch): a task starts warm."""
        return model in self._warm

    def in_use(self) -> set[bytes]:
        """Models a session of ours serves right now (handed to a stream, or lent to a batch): not to evict."""
        return {m for m, n in self.handed.items() if n > 0} | {m for m, w in self._warm.items() if w.lent}

    def set_wanted(self, models: Sequence[bytes]) -> None:
        """The models to keep loaded, in priority order; idle sessions of others are closed (evicted)."""
        self.wanted = list(dict.fromkeys(models))
        keep = set(self.wanted[:self.limit])
        for model in [m for m, w in self._warm.items() if m not in keep and not w.lent]:
            self._drop(model, "evicted")
        self._notify()

    # -- the runtime facade the stream transport calls ---------------------------------

    async def open_stream(self, spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> Any:
        """A session for ``spec``: the warm one for its model if idle (handed over, no load), else a cold load."""
        handed = self.take(spec)
        if handed is not None:
            return handed
        runtime = self._runtime()
        if runtime is None:
            raise ModelUnavailable("no kernel runtime on this node")
        return await runtime.open_stream(spec, inputs)

    def take(self, spec: JobSpec) -> HandedSession | None:
        """The idle warm session that loads ``spec``'s model, rebound to ``spec``; None when there is none.

        Synchronous: of many tasks asking at once exactly one gets it.
        """
        model = self._keys.get(model_key(spec)) if spec.kernel == "stream_infer" else None
        warm = self._warm.get(model) if model is not None else None
        if model is None or warm is None or warm.lent or not warm.session.open:
            return None
        try:
            warm.session.rebind(spec)
        except KernelError as exc:  # another device or memory need than the worker offers: load cold
            log(logger, logging.INFO, "warm_session_unsuitable", model=model.hex()[:16], error=str(exc))
            return None
        del self._warm[model]
        self.handed[model] += 1
        self.handovers += 1
        log(logger, logging.INFO, "warm_session_handed_over", model=model.hex()[:16])
        self._notify()  # the filler loads a replacement when a worker is spare
        return HandedSession(self, model, warm.session)

    async def run_job(self, spec: JobSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """A by-model ``keras_infer`` batch task through its loaded model; None when no idle session holds it.

        The spec and ``x`` are checked as ``KernelRuntime.run`` checks them
        (the spec's rules, ``x`` against its hash); the outputs are
        ``keras_infer.run``'s (the same ``predict`` on the same model).
        """
        model = spec_model_id(spec) if spec.kernel == "keras_infer" else None
        warm = self._warm.get(model) if model is not None else None
        if model is None or warm is None or warm.lent or not warm.session.open:
            return None
        try:
            warm.session.check_requirements(spec)
        except KernelError:
            return None  # the cold path refuses it with the reason
        runtime = self._runtime()
        check = runtime.config.check_hashes if runtime is not None else True
        x = validate_inputs(spec, inputs, check_hashes=check)["x"]
        warm.lent = True  # no await since the pool was read: nobody else can take or lend this session now
        try:
            return await warm.session.run_batch(
                x, batch_size=int(spec.param_dict().get("batch_size", 256)), seconds=spec.limits.seconds,
                memory_bytes=spec.requirements.memory_bytes, output_bytes=spec.limits.output_bytes)
        finally:
            warm.lent = False
            if not warm.session.open:  # it timed out or crashed: the worker was replaced, the session is gone
                self._forget(model)
            elif model not in self.wanted[:self.limit]:  # evicted while it ran
                self._drop(model, "evicted")
            self._notify()

    def yield_worker(self) -> None:
        """``KernelRuntime.on_starved``: give back the worker of the least wanted idle session, if any."""
        idle = [m for m, w in self._warm.items() if not w.lent]
        if not idle:
            return
        order = {m: i for i, m in enumerate(self.wanted)}
        model = max(idle, key=lambda m: order.get(m, len(order)))
        self.yielded += 1
        self._drop(model, "yielded")

    # -- the filler ------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the wanted models loaded, from spare workers, until cancelled; closes the sessions at the end."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                while True:
                    await self.fill_once()
                    with trio.move_on_after(self.poll_seconds):
                        await self._wake.wait()
            finally:
                self._nursery = None
                with trio.CancelScope(shield=True):
                    for model in list(self._warm):
                        session = self._forget(model)
                        if session is not None:
                            await _close_quietly(session)

    async def fill_once(self) -> int:
        """Open sessions for wanted models that have none while a worker is spare; returns how many it opened."""
        opened = 0
        runtime = self._runtime()
        if runtime is not None:
            runtime.on_starved = self.yield_worker
        for model in list(self.wanted[:self.limit]):
            runtime = self._runtime()
            if runtime is None or len(self._warm) >= self.limit:
                break
            if model in self._warm or model not in self.wanted[:self.limit]:
                continue
            if runtime.idle_workers() < 2:
                break  # the last idle worker stays free for batch jobs and cold loads
            if await self._open(model):
                opened += 1
        return opened

    async def _open(self, model: bytes) -> bool:
        from kernels.runtime import NoIdleWorker

        self._opening = model
        try:
            bundle = await self._bundle_of(model)
            spec, inputs = expand_model_spec(make_model_spec(model, {}, None, kernel="stream_infer"), bundle, {})
            runtime = self._runtime()
            # Read again after the await, and nothing awaited from here to the worker's checkout (wait=False takes
            # an idle worker synchronously): the pool never takes the last idle worker.
            if runtime is None or runtime.idle_workers() < 2:
                return False
            session = await runtime.open_stream(spec, inputs, check_hashes=False, wait=False)
        except NoIdleWorker:
            return False
        except (KernelError, ModelUnavailable) as exc:
            log(logger, logging.WARNING, "warm_load_failed", model=model.hex()[:16], error=f"{type(exc).__name__}: {exc}")
            return False
        finally:
            self._opening = None
        if model not in self.wanted[:self.limit] or model in self._warm or len(self._warm) >= self.limit:
            await _close_quietly(session)  # no longer wanted (evicted while it loaded)
            return False
        self._warm[model] = _Warm(model, session)
        self._keys[model_key(spec)] = model
        self.loads += 1
        log(logger, logging.INFO, "model_loaded_warm", model=model.hex()[:16], worker_sessions=len(self._warm))
        return True

    # -- internals -------------------------------------------------------------------

    def _returned(self, model: bytes) -> None:
        """A handed-over session closed: its worker is free again, so the filler may load a replacement."""
        self.handed[model] -= 1
        if self.handed[model] <= 0:
            del self.handed[model]
        self._notify()

    def _forget(self, model: bytes) -> StreamSession | None:
        warm = self._warm.pop(model, None)
        for key in [k for k, m in self._keys.items() if m == model]:
            del self._keys[key]
        return warm.session if warm is not None else None

    def _drop(self, model: bytes, why: str) -> None:
        """Take ``model``'s idle session out of the pool now and close it in the background."""
        session = self._forget(model)
        if session is None:
            return
        log(logger, logging.INFO, "warm_session_closed", model=model.hex()[:16], why=why)
        if self._nursery is not None:
            self._nursery.start_soon(_close_quietly, session)
        else:  # not running (yet, or any more): still give the worker back
            trio.lowlevel.spawn_system_task(_close_quietly, session)

    def _notify(self) -> None:
        self._wake.set()
        self._wake = trio.Event()


async def _close_quietly(session: StreamSession) -> None:
    try:
        await session.aclose()
    except KernelError as exc:  # the runtime replaces the worker; nothing else to undo
        log(logger, logging.WARNING, "warm_session_close_failed", error=repr(exc))
