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

import itertools
import mmap
import multiprocessing
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from types import TracebackType
from typing import Any

import numpy as np
import trio

from kernels._worker import ALIGN, EXIT_OOM
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
from kernels.probe import Capabilities
from kernels.spec import JobSpec, encode_spec, validate_inputs, validate_spec
from kernels.tensors import array_from_bytes, canonical_array
from ledger.codec import decode

__all__ = ["JobResult", "JobStats", "KernelRuntime", "RuntimeConfig", "StreamSession"]

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    workers: int = 1
    device: str = "auto"  # "auto": a GPU when TensorFlow sees one; "cpu": hide GPUs
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


def _worker_survives(exc: KernelError) -> bool:
    """Whether the worker that reported ``exc`` may serve the next job."""
    return not isinstance(exc, (JobTimeout, WorkerCrashed, OutOfMemory)) and not getattr(exc, "fatal", False)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class _Worker:
    """Caller-side handle of one worker process: its socket, arena and readiness."""

    def __init__(self, ctx: Any, device: str) -> None:
        parent, child = ctx.Pipe(duplex=True)
        from kernels import _worker

        self.process = ctx.Process(target=_worker.main, args=(child, device), name="p2pgpu-kernel-worker", daemon=True)
        self.process.start()
        child.close()
        self.conn: Connection = parent
        self.info: dict[str, Any] | None = None
        self.arena: mmap.mmap | None = None
        self.killed = False

    @property
    def pid(self) -> int:
        return self.process.pid or -1

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        if self.info is None:
            with trio.move_on_after(timeout) as scope:
                reply = await self.receive()
            if scope.cancelled_caught:
                raise WorkerCrashed(f"worker {self.pid} did not become ready within {timeout} s")
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
            return self.conn.recv()
        except (EOFError, OSError) as exc:
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
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._slots: trio.Semaphore | None = None
        self._closed = False
        self._started = False
        self._session_ids = itertools.count(1)
        self.replacements = 0  # workers started to replace killed ones

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        """Spawn the workers (returns at once; TensorFlow loads in the background)."""
        if self._closed:
            raise RuntimeClosed("runtime is closed")
        if not self._started:
            self._started = True
            self._idle = [_Worker(self._ctx, self.config.device) for _ in range(self.config.workers)]

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
        """Stop every worker (busy ones are killed)."""
        self._closed = True
        for w in list(self._busy):
            w.kill()
        for w in self._idle:
            w.stop(5.0)
        self._idle.clear()
        self._busy.clear()

    def busy_pids(self) -> list[int]:
        """Pids of workers running a job or holding a stream session right now."""
        return sorted(w.pid for w in self._busy)

    # -- worker checkout -------------------------------------------------------
    async def _checkout(self) -> _Worker:
        if self._closed:
            raise RuntimeClosed("runtime is closed")
        self.start()
        if self._slots is None:
            self._slots = trio.Semaphore(self.config.workers)
        await self._slots.acquire()
        worker = self._idle.pop()
        self._busy.add(worker)
        try:
            await worker.wait_ready(self.config.start_timeout)
        except BaseException:
            self._checkin(worker, healthy=False)
            raise
        return worker

    def _checkin(self, worker: _Worker, healthy: bool) -> None:
        self._busy.discard(worker)
        if self._closed:
            worker.kill()
        elif not healthy:
            worker.kill()
            self._idle.append(_Worker(self._ctx, self.config.device))
            self.replacements += 1
        else:
            self._idle.append(worker)
        assert self._slots is not None
        self._slots.release()

    def _check_requirements(self, spec: JobSpec, info: Mapping[str, Any]) -> None:
        want = spec.requirements.device
        if want != "any" and want != info["device_kind"]:
            raise UnsatisfiableRequirements(f"job needs a {want} but this runtime runs on {info['device_kind']}")
        if spec.requirements.memory_bytes > info["memory_bytes"]:
            raise UnsatisfiableRequirements(
                f"job needs {spec.requirements.memory_bytes} bytes of memory, the device has {info['memory_bytes']}"
            )

    def _mem_limit(self, worker: _Worker, spec: JobSpec) -> int:
        assert worker.info is not None
        return worker.info["baseline_rss"] + spec.requirements.memory_bytes + self.config.memory_headroom_bytes

    @staticmethod
    def _write(arena: mmap.mmap, arrays: Mapping[str, np.ndarray], offset: int) -> tuple[list[Any], int]:
        layout = []
        for name, arr in arrays.items():
            if arr.nbytes:
                arena[offset:offset + arr.nbytes] = memoryview(arr).cast("B")
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
        worker = await self._checkout()
        healthy = False
        handed_over = False  # on success in "run" mode the caller copies outputs out, then checks in
        try:
            assert worker.info is not None
            self._check_requirements(spec, worker.info)
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
            outputs = {}
            for name, dtype, shape, offset, data in reply[1]:
                if offset is None:
                    outputs[name] = array_from_bytes(dtype, shape, data).copy()
                else:
                    assert worker.arena is not None
                    count = int(np.prod(shape, dtype=np.int64))
                    outputs[name] = np.frombuffer(worker.arena, dtype=np.dtype(dtype).newbyteorder("<"),
                                                  count=count, offset=offset).reshape(shape).copy()
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
                          check_hashes: bool | None = None) -> StreamSession:
        """Load a ``stream_infer`` model into a worker reserved for the session."""
        validate_spec(spec)
        if spec.kernel != "stream_infer":
            raise UnsatisfiableRequirements(f"streaming needs a stream_infer spec, got {spec.kernel}")
        check = self.config.check_hashes if check_hashes is None else check_hashes
        arrays = validate_inputs(spec, inputs, check_hashes=check)
        worker = await self._checkout()
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
                 self._runtime._mem_limit(worker, self.spec)),
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
