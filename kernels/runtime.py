"""The provider's job runtime: warm TensorFlow workers behind an async (Trio) API.

Each worker is a ``spawn``-ed process that imports TensorFlow once and serves
jobs one at a time, so a job that hangs, crashes or eats memory takes down a
worker, never the caller. The caller's side:

* validates the spec and inputs first (no TensorFlow in this process);
* copies inputs into the worker's shared-memory arena (a memfd, handed over
  once with SCM_RIGHTS and grown on demand), sends a small control tuple,
  and waits on the socket with ``trio.lowlevel.wait_readable``;
* on timeout (``limits.seconds``), cancellation, crash or memory blow-up,
  SIGKILLs the worker and spawns a replacement at once (without waiting for
  it: its TensorFlow import overlaps whatever the caller does next), then
  raises ``JobTimeout`` / ``WorkerCrashed`` / ``OutOfMemory``, or re-raises
  the cancellation.

GPUs: on a machine with GPUs (found without TensorFlow, see
:func:`kernels.probe.detect_gpus`) each worker is pinned to one GPU, round
robin (``workers`` = GPU count gives one worker per GPU), so concurrent jobs
never share a device. A job that asks for several devices at once
(``keras_train``'s ``replicas``) needs a process that sees them all, and a
pinned worker cannot: the runtime waits until that many GPUs have no busy
worker, stops the idle workers pinned to them (freeing their GPU memory,
which TensorFlow never hands back), starts one worker that sees exactly
those GPUs for the job, and afterwards restarts the pinned workers. The
gang worker's TensorFlow start-up (``start_timeout``) is the price; it is
small next to a training job worth several GPUs, and the simpler static
alternative (workers pinned to fixed groups of GPUs) would leave GPUs idle
under single-device jobs. Checkouts are served in arrival order, so a job
waiting for several GPUs is not overtaken by single-device jobs forever.
Without GPUs, workers are unpinned CPU workers as before; a multi-replica
job then needs a worker that sees enough devices (``logical_cpus``, tests).

The runtime holds no Trio objects between calls, so one runtime may serve
several ``trio.run`` calls in turn (as a session-scoped test fixture does);
it is not safe to use from two threads at once.

Usage::

    async with KernelRuntime(RuntimeConfig(workers=1)) as rt:
        result = await rt.run(spec, inputs)          # JobResult(outputs, stats)
        verdict = await rt.verify(spec, inputs, result.outputs)
        async with await rt.open_stream(spec, model_inputs) as session:
            y = await session.infer(item)
        caps = await rt.probe()
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from types import TracebackType
from typing import Any

import numpy as np
import trio

from kernels import _worker
from kernels._worker import ALIGN, EXIT_OOM, WorkerSetup
from kernels.errors import (
    KernelError,
    OutOfMemory,
    RuntimeClosed,
    UnsatisfiableRequirements,
    WorkerCrashed,
    JobTimeout,
    error_from_wire,
)
from kernels.kernel import Verdict
from kernels.probe import Capabilities, detect_gpus
from kernels.registry import lookup
from kernels.spec import JobSpec, encode_spec, validate_inputs, validate_spec
from kernels.tensors import array_from_bytes, canonical_array
from ledger.codec import decode

__all__ = ["JobResult", "JobStats", "KernelRuntime", "NoIdleWorker", "RuntimeConfig", "StreamSession", "free_gpus",
           "worker_pins"]

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    workers: int = 1  # jobs at once (kernels.probe.default_slots suggests a number)
    device: str = "auto"  # "auto": a GPU when TensorFlow sees one; "cpu": hide GPUs
    # GPUs to pin workers to, as CUDA_VISIBLE_DEVICES indices or UUIDs, worker i to gpus[i % len]; only the
    # first `workers` are used. None: detect them (device "auto"); (): no pinning.
    gpus: tuple[int | str, ...] | None = None
    logical_cpus: int = 1  # for tests: split a GPU-less worker's CPU into N devices (MirroredStrategy replicas)
    memory_headroom_bytes: int = 256 * MiB  # allowance over a job's memory_bytes for TF's own caches
    start_timeout: float = 180.0  # seconds for a worker to import TensorFlow and report ready
    arena_bytes: int = 64 * MiB  # initial shared-memory arena per worker (grown on demand)
    check_hashes: bool = True  # hash inputs against the spec's blob refs on every run


@dataclass(frozen=True, slots=True)
class JobStats:
    kernel_seconds: float  # time inside the kernel, measured in the worker
    total_seconds: float  # from the call to the result, measured in the caller
    worker_pid: int
    device_kind: str


@dataclass(frozen=True, slots=True)
class JobResult:
    outputs: dict[str, np.ndarray]
    stats: JobStats


class NoIdleWorker(KernelError):
    """``open_stream(..., wait=False)`` found no idle worker (or another checkout waiting first): nothing was taken."""


def _worker_survives(exc: KernelError) -> bool:
    """Whether the worker that reported ``exc`` may serve the next job."""
    return not isinstance(exc, (JobTimeout, WorkerCrashed, OutOfMemory)) and not getattr(exc, "fatal", False)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def worker_pins(gpus: Sequence[str], workers: int) -> list[tuple[str, ...]]:
    """The GPUs each of ``workers`` workers is pinned to: one each, round robin; none without GPUs."""
    if not gpus:
        return [() for _ in range(workers)]
    return [(gpus[i % len(gpus)],) for i in range(workers)]


def free_gpus(gpus: Sequence[str], held: Iterable[tuple[str, ...]], count: int) -> tuple[str, ...] | None:
    """The first ``count`` of ``gpus`` that no busy worker holds (``held``: each busy worker's pins), or None.

    First in the runtime's order, so which GPUs a multi-device job gets is
    predictable, and a GPU is free only when every worker pinned to it is
    idle: a busy worker pins its GPU whatever else shares it.
    """
    taken = {g for pins in held for g in pins}
    free = [g for g in gpus if g not in taken]
    return tuple(free[:count]) if len(free) >= count else None


def _gpu_tokens(gpus: Iterable[int | str]) -> tuple[str, ...]:
    """Config GPUs as CUDA_VISIBLE_DEVICES tokens; ValueError names a token CUDA would misread."""
    tokens: list[str] = []
    for g in gpus:
        if type(g) is int and g >= 0:
            token = str(g)
        elif isinstance(g, str) and g.strip() and "," not in g and not g.strip().startswith("-"):
            token = g.strip()
        else:
            raise ValueError(f"RuntimeConfig.gpus: {g!r} is not a GPU index or UUID")
        if token in tokens:
            raise ValueError(f"RuntimeConfig.gpus: GPU {token} is listed twice")
        tokens.append(token)
    return tuple(tokens)


def _read_outputs(worker: _Worker, packed: Sequence[Any]) -> dict[str, np.ndarray]:
    """A worker's packed outputs as arrays of our own (copied out of its arena, which the next job reuses)."""
    outputs = {}
    for name, dtype, shape, offset, data in packed:
        if offset is None:
            outputs[name] = array_from_bytes(dtype, shape, data).copy()
        else:
            assert worker.arena is not None
            count = int(np.prod(shape, dtype=np.int64))
            outputs[name] = np.frombuffer(worker.arena, dtype=np.dtype(dtype).newbyteorder("<"),
                                          count=count, offset=offset).reshape(shape).copy()
    return outputs


def _devices_needed(spec: JobSpec) -> int:
    """How many devices one run of ``spec`` uses at once (its kernel decides; most use one)."""
    kernel = lookup(spec.kernel, spec.version)
    return kernel.devices(spec) if kernel.devices is not None else 1


class _Worker:
    """Caller-side handle of one worker process: its socket, arena and readiness."""

    def __init__(self, ctx: Any, setup: WorkerSetup, displaced: tuple[tuple[str, ...], ...] = ()) -> None:
        parent, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker.main, args=(child, setup), name="p2pgpu-kernel-worker", daemon=True)
        self.process.start()
        child.close()
        self.setup = setup
        # A multi-GPU worker lives for one job; these are the pins of the pooled workers it displaced.
        self.displaced = displaced
        self.conn: Connection = parent
        self.info: dict[str, Any] | None = None
        self.arena: mmap.mmap | None = None
        self.killed = False

    @property
    def pid(self) -> int:
        return self.process.pid or -1

    @property
    def gpus(self) -> tuple[str, ...]:
        return self.setup.gpus

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        if self.info is None:
            with trio.move_on_after(timeout) as scope:
                reply = await self.receive()
            if scope.cancelled_caught:
                raise WorkerCrashed(f"worker {self.pid} did not become ready within {timeout} s")
            if reply[0] == "failed":
                raise WorkerCrashed(f"worker {self.pid} could not start: {reply[1]}")
            if reply[0] != "ready":
                raise WorkerCrashed(f"worker {self.pid} sent {reply[0]!r} instead of ready")
            self.info = reply[1]
        return self.info

    def ensure_arena(self, needed: int, initial: int) -> mmap.mmap:
        if self.arena is not None and len(self.arena) >= needed:
            return self.arena
        size = max(needed, initial, 2 * len(self.arena) if self.arena is not None else 0)
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        fd = os.memfd_create("p2pgpu-arena", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            arena = mmap.mmap(fd, size)
            self.send(("arena", size))
            send_handle(self.conn, fd, self.pid)
        finally:
            os.close(fd)
        if self.arena is not None:
            self.arena.close()
        self.arena = arena
        return arena

    def send(self, msg: tuple[Any, ...]) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError) as exc:
            raise self.crash_error(f"could not send to worker: {exc}") from exc

    async def receive(self) -> tuple[Any, ...]:
        try:
            await trio.lowlevel.wait_readable(self.conn.fileno())
            reply: tuple[Any, ...] = self.conn.recv()
            return reply
        except (EOFError, OSError, trio.ClosedResourceError) as exc:
            raise self.crash_error("worker connection closed") from exc

    def crash_error(self, what: str) -> KernelError:
        self.process.join(5.0)
        code = self.process.exitcode
        if code == EXIT_OOM:
            return OutOfMemory(f"worker {self.pid} exceeded the job's memory budget and was stopped")
        if code is not None and code < 0:
            return WorkerCrashed(f"{what}: worker {self.pid} killed by signal {signal.Signals(-code).name}")
        return WorkerCrashed(f"{what}: worker {self.pid} exited with code {code}")

    def kill(self) -> None:
        self.killed = True
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)
        if not self.conn.closed:
            # Wake a task waiting on this socket (a job killed by close()): once the fd is closed
            # without notice, epoll forgets it and that task would sleep until its job's time limit.
            with contextlib.suppress(RuntimeError):  # outside a Trio run nobody can be waiting
                trio.lowlevel.notify_closing(self.conn.fileno())
            self.conn.close()
        if self.arena is not None:
            self.arena.close()
            self.arena = None

    def stop(self, timeout: float) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.process.join(timeout)
        self.kill()


class KernelRuntime:
    """A pool of warm kernel workers. See the module docstring."""

    def __init__(self, config: RuntimeConfig | None = None) -> None:
        self.config = config or RuntimeConfig()
        if self.config.workers < 1:
            raise ValueError("RuntimeConfig.workers must be at least 1")
        if self.config.device not in ("auto", "cpu"):
            raise ValueError(f"RuntimeConfig.device must be 'auto' or 'cpu', got {self.config.device!r}")
        if self.config.logical_cpus < 1:
            raise ValueError("RuntimeConfig.logical_cpus must be at least 1")
        self._gpu_tokens = None if self.config.gpus is None else _gpu_tokens(self.config.gpus)
        if self.config.device == "cpu" and self._gpu_tokens:
            raise ValueError("RuntimeConfig: device 'cpu' hides GPUs, so gpus cannot name any")
        self._gpus: tuple[str, ...] | None = None
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._turn: trio.Lock | None = None  # checkouts in arrival order
        self._returned: trio.lowlevel.ParkingLot | None = None  # checkouts waiting for a worker or GPUs
        self._closed = False
        self._started = False
        self._session_ids = itertools.count(1)
        self.replacements = 0  # workers started to replace killed ones
        self.on_starved: Callable[[], None] | None = None
        """Called (synchronously) when a checkout finds no idle worker and is about to wait for one.

        A provider's warm pool (``p2pgpu.warmpool``) sets it to give back a
        worker it holds for a model nobody is using, so a batch job never waits
        behind an idle warm session."""

    # -- lifecycle ---------------------------------------------------------
    @property
    def gpus(self) -> tuple[str, ...]:
        """The GPUs this runtime's workers are pinned to (CUDA_VISIBLE_DEVICES tokens); () for CPU workers.

        Resolved on first use rather than at construction, so building a
        runtime stays free of side effects (detection may run nvidia-smi).
        """
        if self._gpus is None:
            if self.config.device == "cpu":
                found: tuple[str, ...] = ()
            elif self._gpu_tokens is None:
                found = detect_gpus()
            else:
                found = self._gpu_tokens
            self._gpus = found[:self.config.workers]
        return self._gpus

    def _spawn(self, gpus: tuple[str, ...], displaced: tuple[tuple[str, ...], ...] = ()) -> _Worker:
        return _Worker(self._ctx, WorkerSetup(self.config.device, gpus, self.config.logical_cpus), displaced)

    def start(self) -> None:
        """Spawn the workers (returns at once; TensorFlow loads in the background)."""
        if self._closed:
            raise RuntimeClosed("runtime is closed")
        if not self._started:
            self._started = True
            self._idle = [self._spawn(pins) for pins in worker_pins(self.gpus, self.config.workers)]

    async def wait_ready(self) -> dict[str, Any]:
        """Wait until every idle worker has TensorFlow loaded; return the first one's device info."""
        self.start()
        infos = [await w.wait_ready(self.config.start_timeout) for w in list(self._idle)]
        return infos[0]

    async def __aenter__(self) -> KernelRuntime:
        await self.wait_ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Stop every worker (busy ones are killed); checkouts still waiting raise ``RuntimeClosed``."""
        self._closed = True
        for w in list(self._busy):
            w.kill()
        for w in self._idle:
            w.stop(5.0)
        self._idle.clear()
        self._busy.clear()
        if self._returned is not None:
            self._returned.unpark_all()

    def idle_workers(self) -> int:
        """Workers free to take a job right now (none is free while a checkout waits in line)."""
        if self._turn is not None and self._turn.locked():
            return 0
        return len(self._idle)

    def busy_pids(self) -> list[int]:
        """Pids of workers running a job or holding a stream session right now."""
        return sorted(w.pid for w in self._busy)

    def worker_gpus(self) -> dict[int, tuple[str, ...]]:
        """Each live worker's pid and the GPUs it is pinned to (empty: not pinned)."""
        return {w.pid: w.gpus for w in (*self._idle, *self._busy)}

    def worker_infos(self) -> dict[int, dict[str, Any]]:
        """What each ready worker reported about itself: device kind, name and count, its pin, ...

        Read from the workers rather than from the config, so a provider (or
        a test) sees the pinning that actually took effect.
        """
        return {w.pid: dict(w.info) for w in (*self._idle, *self._busy) if w.info is not None}

    # -- worker checkout -------------------------------------------------------
    async def _checkout(self, devices: int = 1, *, wait: bool = True) -> _Worker:
        """A ready worker for a job on ``devices`` devices at once, marked busy until ``_checkin``.

        ``wait=False``: take an idle worker only if one is free now and nobody
        is waiting in line before us, else raise :class:`NoIdleWorker`; taken
        without an ``await`` in between, so no concurrent checkout can slip in.
        """
        if self._closed:
            raise RuntimeClosed("runtime is closed")
        gang = devices > 1 and bool(self.gpus)
        if gang and devices > len(self.gpus):
            raise UnsatisfiableRequirements(f"job needs {devices} GPUs at once; this runtime has {len(self.gpus)}")
        self.start()
        if self._turn is None or self._returned is None:
            self._turn, self._returned = trio.Lock(), trio.lowlevel.ParkingLot()
        if not wait:
            if gang or self._turn.locked() or not self._idle:
                raise NoIdleWorker("no idle kernel worker right now")
            worker = self._idle.pop()
            self._busy.add(worker)
            try:
                await worker.wait_ready(self.config.start_timeout)
            except BaseException:
                self._checkin(worker, healthy=False)
                raise
            return worker
        async with self._turn:
            while True:
                if self._closed:
                    raise RuntimeClosed("runtime is closed")
                if gang:
                    chosen = free_gpus(self.gpus, (w.gpus for w in self._busy), devices)
                    if chosen is not None:
                        worker = self._take_gpus(chosen)
                        break
                elif self._idle:
                    worker = self._idle.pop()
                    break
                if self.on_starved is not None:
                    self.on_starved()
                await self._returned.park()
            self._busy.add(worker)
        try:
            await worker.wait_ready(self.config.start_timeout)
        except BaseException:
            self._checkin(worker, healthy=False)
            raise
        return worker

    def _take_gpus(self, gpus: tuple[str, ...]) -> _Worker:
        """Stop the idle workers pinned to ``gpus`` and start one worker that sees them all.

        Stopped, not just set aside: an idle TensorFlow process keeps the GPU
        memory its earlier jobs grew into, which the multi-GPU job may need.
        """
        displaced = [w for w in self._idle if set(w.gpus) & set(gpus)]
        for w in displaced:
            self._idle.remove(w)
            w.kill()
        return self._spawn(gpus, tuple(w.gpus for w in displaced))

    def _checkin(self, worker: _Worker, healthy: bool) -> None:
        self._busy.discard(worker)
        if self._closed:
            worker.kill()
        elif worker.displaced:  # a multi-GPU worker served its one job; its GPUs go back to pinned workers
            worker.kill()
            self._idle.extend(self._spawn(pins) for pins in worker.displaced)
            self.replacements += 0 if healthy else 1
        elif not healthy:
            worker.kill()
            self._idle.append(self._spawn(worker.gpus))
            self.replacements += 1
        else:
            self._idle.append(worker)
        if self._returned is not None:
            self._returned.unpark_all()

    def _check_requirements(self, spec: JobSpec, info: Mapping[str, Any], devices: int = 1) -> None:
        want = spec.requirements.device
        if want != "any" and want != info["device_kind"]:
            raise UnsatisfiableRequirements(f"job needs a {want} but this runtime runs on {info['device_kind']}")
        if devices > info["device_count"]:
            raise UnsatisfiableRequirements(
                f"job runs on {devices} devices at once; this runtime's workers see {info['device_count']} "
                f"{info['device_kind']} device(s)"
            )
        if spec.requirements.memory_bytes > info["memory_bytes"]:
            raise UnsatisfiableRequirements(
                f"job needs {spec.requirements.memory_bytes} bytes of memory, the device has {info['memory_bytes']}"
            )

    def _mem_limit(self, worker: _Worker, spec: JobSpec) -> int:
        assert worker.info is not None
        baseline: int = worker.info["baseline_rss"]
        return baseline + spec.requirements.memory_bytes + self.config.memory_headroom_bytes

    @staticmethod
    def _write(arena: mmap.mmap, arrays: Mapping[str, np.ndarray], offset: int) -> tuple[list[Any], int]:
        layout = []
        for name, arr in arrays.items():
            if arr.nbytes:
                arena[offset:offset + arr.nbytes] = arr.data.cast("B")
            layout.append((name, arr.dtype.name, tuple(arr.shape), offset))
            offset = _align(offset + arr.nbytes)
        return layout, offset

    async def _request(self, worker: _Worker, msg: tuple[Any, ...], seconds: float) -> tuple[Any, ...]:
        """Send one request and wait for its reply; any failure leaves the worker unhealthy."""
        worker.send(msg)
        with trio.move_on_after(seconds) as scope:
            reply = await worker.receive()
        if scope.cancelled_caught:
            raise JobTimeout(f"job ran past its limit of {seconds} s; worker {worker.pid} was killed")
        if reply[0] == "err":
            _, name, message, fatal = reply
            error = error_from_wire(name, message)
            if fatal:
                error.fatal = True  # type: ignore[attr-defined]
            raise error
        return reply

    async def _job(self, mode: str, spec: JobSpec, inputs: Mapping[str, np.ndarray],
                   claimed: Mapping[str, np.ndarray] | None, check_hashes: bool | None) -> tuple[tuple[Any, ...], _Worker, float]:
        t0 = time.perf_counter()
        validate_spec(spec)
        check = self.config.check_hashes if check_hashes is None else check_hashes
        arrays = validate_inputs(spec, inputs, check_hashes=check)
        claimed_arrays = {}
        if claimed is not None:
            claimed_arrays = {n: canonical_array(a) for n, a in claimed.items()}
        spec_bytes = encode_spec(spec)
        # A kernel's verify re-runs on one device: a verifier need not own as many as the provider used.
        devices = _devices_needed(spec) if mode == "run" else 1
        worker = await self._checkout(devices)
        healthy = False
        handed_over = False  # on success in "run" mode the caller copies outputs out, then checks in
        try:
            assert worker.info is not None
            self._check_requirements(spec, worker.info, devices)
            in_bytes = sum(_align(a.nbytes) for a in (*arrays.values(), *claimed_arrays.values()))
            out_guess = min(spec.limits.output_bytes, max(in_bytes, MiB)) if mode == "run" else 0
            arena = worker.ensure_arena(in_bytes + out_guess + ALIGN, self.config.arena_bytes)
            layout, offset = self._write(arena, arrays, 0)
            claimed_layout, offset = self._write(arena, claimed_arrays, offset)
            reply = await self._request(
                worker,
                ("job", mode, spec_bytes, layout, claimed_layout, offset, self._mem_limit(worker, spec)),
                spec.limits.seconds,
            )
            healthy = True
            handed_over = mode == "run"
            return reply, worker, t0
        except KernelError as exc:
            healthy = _worker_survives(exc)
            raise
        finally:
            if not handed_over:
                self._checkin(worker, healthy)

    async def run(self, spec: JobSpec, inputs: Mapping[str, np.ndarray], *, check_hashes: bool | None = None) -> JobResult:
        """Run one job in a warm worker and return its outputs.

        ``check_hashes=False`` skips re-hashing inputs whose blobs were
        already checked on arrival (``decode_blob``); the default follows
        ``RuntimeConfig.check_hashes``.
        """
        reply, worker, t0 = await self._job("run", spec, inputs, None, check_hashes)
        try:
            outputs = _read_outputs(worker, reply[1])
            assert worker.info is not None
            stats = JobStats(reply[2]["kernel_seconds"], time.perf_counter() - t0, worker.pid, worker.info["device_kind"])
        finally:
            self._checkin(worker, True)
        return JobResult(outputs, stats)

    async def verify(self, spec: JobSpec, inputs: Mapping[str, np.ndarray], claimed: Mapping[str, np.ndarray], *,
                     check_hashes: bool | None = None) -> Verdict:
        """Re-execute a job in a worker and judge ``claimed`` with the kernel's ``verify``."""
        if not isinstance(claimed, Mapping) or not all(isinstance(a, np.ndarray) for a in claimed.values()):
            return Verdict(ok=False, max_error=None, tolerance=0.0, reason="claimed outputs are not named arrays")
        reply, _, _ = await self._job("verify", spec, inputs, claimed, check_hashes)
        return decode(Verdict, reply[1])

    async def probe(self, n: int = 1024, repeats: int = 3) -> Capabilities:
        """Measure this runtime's device (kind, name, memory, TF version, matmul GFLOP/s)."""
        worker = await self._checkout()
        healthy = False
        try:
            reply = await self._request(worker, ("probe", n, repeats), self.config.start_timeout)
            healthy = True
        finally:
            self._checkin(worker, healthy)
        return decode(Capabilities, reply[1])

    async def open_stream(self, spec: JobSpec, inputs: Mapping[str, np.ndarray], *,
                          check_hashes: bool | None = None, wait: bool = True) -> StreamSession:
        """Load a ``stream_infer`` model into a worker reserved for the session.

        ``wait=False`` raises :class:`NoIdleWorker` rather than queue for a
        worker (how a warm pool fills itself only from spare workers).
        """
        validate_spec(spec)
        if spec.kernel != "stream_infer":
            raise UnsatisfiableRequirements(f"streaming needs a stream_infer spec, got {spec.kernel}")
        check = self.config.check_hashes if check_hashes is None else check_hashes
        arrays = validate_inputs(spec, inputs, check_hashes=check)
        worker = await self._checkout(wait=wait)
        healthy = False
        try:
            assert worker.info is not None
            self._check_requirements(spec, worker.info)
            arena = worker.ensure_arena(sum(_align(a.nbytes) for a in arrays.values()) + ALIGN, self.config.arena_bytes)
            layout, _ = self._write(arena, arrays, 0)
            sid = next(self._session_ids)
            reply = await self._request(worker, ("stream_open", sid, encode_spec(spec), layout,
                                                 self._mem_limit(worker, spec)), spec.limits.seconds)
            healthy = True
        finally:
            if not healthy:
                self._checkin(worker, False)
        return StreamSession(self, worker, spec, sid, reply[2]["loads"])


class StreamSession:
    """A model kept warm in one reserved worker; items go in one at a time.

    A bad item (wrong dtype or shape) raises its SpecError and the session
    stays usable; a timeout, crash or memory blow-up ends the session (the
    worker is replaced) and later calls raise ``RuntimeClosed``.
    """

    def __init__(self, runtime: KernelRuntime, worker: _Worker, spec: JobSpec, sid: int, loads: int) -> None:
        self._runtime = runtime
        self._worker: _Worker | None = worker
        self.spec = spec
        self.session_id = sid
        self.model_loads = loads  # as counted by the worker; stays 1 for a healthy session
        self.items = 0
        self.batches = 0  # batch jobs run through this session's model (run_batch)

    @property
    def _item_rows(self) -> int:
        """``stream_infer``'s ``rows`` under the spec served now: a warm session may be rebound to a batching one."""
        rows = self.spec.param_dict().get("rows", 0)
        return rows if isinstance(rows, int) else 0

    async def infer(self, item: np.ndarray) -> np.ndarray:
        worker = self._worker
        if worker is None:
            raise RuntimeClosed(f"stream session {self.session_id} is closed")
        item = canonical_array(item)
        healthy = False
        try:
            reply = await self._runtime._request(
                worker,
                ("stream_item", self.session_id, item.dtype.name, tuple(item.shape), item.tobytes(),
                 self._runtime._mem_limit(worker, self.spec), self._item_rows),
                self.spec.limits.seconds,
            )
            healthy = True
        except KernelError as exc:
            healthy = _worker_survives(exc)
            raise
        finally:
            if not healthy:
                self._worker = None
                self._runtime._checkin(worker, False)
        _, dtype, shape, data, stats = reply
        self.model_loads = stats["loads"]
        self.items = stats["items"]
        return array_from_bytes(dtype, shape, data).copy()

    @property
    def open(self) -> bool:
        """Whether the session still holds its worker (not closed, not ended by a crash or timeout)."""
        return self._worker is not None

    def rebind(self, spec: JobSpec) -> None:
        """Hand this loaded session to a task whose spec is ``spec``: its limits apply to the items from now on.

        ``spec`` must load the very model this session holds (the same
        ``stream_infer`` inputs: the model config and weights by hash) and its
        requirements must suit the worker; raises ``UnsatisfiableRequirements``
        otherwise, and the session is unchanged.
        """
        worker = self._worker
        if worker is None:
            raise RuntimeClosed(f"stream session {self.session_id} is closed")
        validate_spec(spec)
        if spec.kernel != "stream_infer" or spec.kernel != self.spec.kernel or spec.version != self.spec.version:
            raise UnsatisfiableRequirements(f"a stream session of {self.spec.kernel} cannot serve {spec.kernel}")
        if dict(spec.inputs) != dict(self.spec.inputs):
            raise UnsatisfiableRequirements("the spec loads another model than this session holds")
        self.check_requirements(spec)
        self.spec = spec

    def check_requirements(self, spec: JobSpec) -> None:
        """Raise ``UnsatisfiableRequirements`` if ``spec``'s device or memory needs do not suit this worker."""
        worker = self._worker
        if worker is None:
            raise RuntimeClosed(f"stream session {self.session_id} is closed")
        assert worker.info is not None
        self._runtime._check_requirements(spec, worker.info)

    async def run_batch(self, x: np.ndarray, *, batch_size: int, seconds: float, memory_bytes: int,
                        output_bytes: int) -> dict[str, np.ndarray]:
        """``keras_infer``'s batch forward pass (``predict`` in ``batch_size`` chunks) on this session's model.

        The same function ``keras_infer.run`` calls, on the same model built
        from the same config and weights, so the outputs are what a cold run
        gives (hence within ``keras_infer``'s verification tolerance); only the
        model load is skipped. Limits are the batch job's own; a timeout,
        crash or memory blow-up ends the session as :meth:`infer` does.
        """
        worker = self._worker
        if worker is None:
            raise RuntimeClosed(f"stream session {self.session_id} is closed")
        x = canonical_array(x)
        runtime = self._runtime
        healthy = False
        try:
            in_bytes = _align(x.nbytes)
            arena = worker.ensure_arena(in_bytes + min(output_bytes, max(in_bytes, MiB)) + ALIGN,
                                        runtime.config.arena_bytes)
            layout, offset = runtime._write(arena, {"x": x}, 0)
            assert worker.info is not None
            mem_limit = worker.info["baseline_rss"] + memory_bytes + runtime.config.memory_headroom_bytes
            reply = await runtime._request(
                worker, ("stream_batch", self.session_id, layout, offset, output_bytes, batch_size, mem_limit), seconds)
            outputs = _read_outputs(worker, reply[1])
            healthy = True
        except KernelError as exc:
            healthy = _worker_survives(exc)
            raise
        finally:
            if not healthy:
                self._worker = None
                runtime._checkin(worker, False)
        self.batches += 1
        return outputs

    async def aclose(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        healthy = False
        try:
            with trio.CancelScope(shield=True):
                await self._runtime._request(worker, ("stream_close", self.session_id), 10.0)
            healthy = True
        finally:
            self._runtime._checkin(worker, healthy)

    async def __aenter__(self) -> StreamSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
