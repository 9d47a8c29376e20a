"""The worker process: imports TensorFlow once, then serves jobs until told to stop.

Runs only in a child started by :mod:`kernels.runtime` (multiprocessing
``spawn``). Control messages are small tuples over a socket pair; tensors
travel through a shared-memory arena (a memfd the parent hands over with
SCM_RIGHTS), so a 16 MiB matrix is one memcpy each way rather than a pickle
through a pipe.

Memory budget: a watchdog thread samples this process's anonymous RSS while
a job runs and exits with :data:`EXIT_OOM` the moment it passes the job's
limit (the parent maps that exit code to ``OutOfMemory``); the same check
runs once more when the kernel returns, while its outputs are still alive.

GPU pinning: the parent names the GPUs a worker may use (:class:`WorkerSetup`)
and the worker writes them to ``CUDA_VISIBLE_DEVICES`` as its first act,
before TensorFlow is imported. CUDA reads that variable once, when it
initialises, and enforces it in the driver: the worker cannot touch another
GPU, and its own GPU is always ``/GPU:0`` to TensorFlow, so kernels need not
know which physical device they run on. The value travels as an argument of
this process rather than through the parent's environment, because changing
``os.environ`` around ``Process.start()`` would leak the pin to anything the
parent spawns meanwhile from another thread.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from typing import Any, NoReturn

import numpy as np

from kernels.errors import KernelError, OutputTooLarge, RuntimeClosed
from kernels.jobspec import decode_spec
from kernels.kernel import seed_everything
from kernels.ops.stream_infer import StreamModel, item_rows
from kernels.probe import describe_device, measure_capabilities
from kernels.registry import lookup
from kernels.tensors import array_from_bytes, canonical_array

EXIT_OOM = 86
ALIGN = 64
WATCH_INTERVAL_S = 0.02


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """How the parent wants one worker started.

    ``device``: "auto" (a GPU when TensorFlow sees one) or "cpu" (hide GPUs).
    ``gpus``: ``CUDA_VISIBLE_DEVICES`` tokens this worker is pinned to; empty
    means not pinned (the environment is left as the parent had it).
    ``logical_cpus``: split the CPU into this many logical devices when no
    GPU is visible. It makes no job faster (they share one thread pool); it
    exists so tests can run ``MirroredStrategy`` with several replicas on a
    machine without GPUs.
    """

    device: str = "auto"
    gpus: tuple[str, ...] = ()
    logical_cpus: int = 1


class SetupFailed(Exception):
    """The worker could not honour its setup (reported to the parent instead of "ready")."""


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def rss_anon_bytes() -> int | None:
    """Anonymous resident memory of this process (Linux), excluding the shared arena."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class MemoryWatchdog:
    """Kills the process (exit code EXIT_OOM) when a job's memory passes its limit."""

    def __init__(self) -> None:
        self._limit: int | None = None
        self._wake = threading.Event()
        threading.Thread(target=self._loop, name="memory-watchdog", daemon=True).start()

    def arm(self, limit: int) -> None:
        self._limit = limit
        self._wake.set()

    def disarm(self) -> None:
        self._limit = None
        self._wake.clear()

    def check(self) -> None:
        limit = self._limit
        rss = rss_anon_bytes()
        if limit is not None and rss is not None and rss > limit:
            os._exit(EXIT_OOM)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self.check()
            time.sleep(WATCH_INTERVAL_S)


def _setup_tensorflow(setup: WorkerSetup) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if setup.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    elif setup.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(setup.gpus)
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if setup.gpus and len(gpus) > len(setup.gpus):
        # CUDA was initialised before the pin was written (TensorFlow imported by the parent's __main__?)
        raise SetupFailed(f"worker pinned to GPU(s) {','.join(setup.gpus)} sees {len(gpus)} GPUs")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if not gpus and setup.logical_cpus > 1:
        (cpu,) = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * setup.logical_cpus)
    tf.config.experimental.enable_op_determinism()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    seed_everything(0)
    info = describe_device()
    info["device_count"] = len(tf.config.list_logical_devices(info["device_kind"].upper()))
    info["gpus"] = setup.gpus
    info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    info["pid"] = os.getpid()
    info["baseline_rss"] = rss_anon_bytes() or 0
    return info


class Worker:
    """Worker-side state: the arena, the watchdog and any open stream sessions."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.arena: mmap.mmap | None = None
        self.watchdog = MemoryWatchdog()
        self.streams: dict[int, Any] = {}

    # -- arena -------------------------------------------------------------
    def set_arena(self, size: int) -> None:
        fd = recv_handle(self.conn)
        try:
            arena = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if self.arena is not None:
            self.arena.close()
        self.arena = arena

    def views(self, layout: list[tuple[str, str, tuple[int, ...], int]]) -> dict[str, np.ndarray]:
        assert self.arena is not None
        out = {}
        for name, dtype, shape, offset in layout:
            count = int(np.prod(shape, dtype=np.int64))
            out[name] = np.frombuffer(self.arena, dtype=np.dtype(dtype).newbyteorder("<"), count=count,
                                      offset=offset).reshape(shape)
        return out

    def pack_outputs(self, outputs: Mapping[str, np.ndarray], out_offset: int, limit: int) -> list[Any]:
        arrays = {name: canonical_array(np.asarray(arr)) for name, arr in outputs.items()}
        total = sum(a.nbytes for a in arrays.values())
        if total > limit:
            raise OutputTooLarge(f"outputs total {total} bytes, the job's limit is {limit}")
        size = len(self.arena) if self.arena is not None else 0
        fits = out_offset + sum(align(a.nbytes) for a in arrays.values()) <= size
        packed: list[Any] = []
        offset = out_offset
        for name, arr in arrays.items():
            if fits and self.arena is not None:
                self.arena[offset:offset + arr.nbytes] = arr.data.cast("B") if arr.nbytes else b""
                packed.append((name, arr.dtype.name, arr.shape, offset, None))
                offset = align(offset + arr.nbytes)
            else:
                packed.append((name, arr.dtype.name, arr.shape, None, arr.tobytes()))
        return packed

    # -- requests ----------------------------------------------------------
    def handle(self, msg: tuple[Any, ...]) -> tuple[Any, ...] | None:
        kind = msg[0]
        if kind == "job":
            return self.job(*msg[1:])
        if kind == "stream_item":
            return self.stream_item(*msg[1:])
        if kind == "stream_open":
            return self.stream_open(*msg[1:])
        if kind == "stream_batch":
            return self.stream_batch(*msg[1:])
        if kind == "stream_close":
            self.streams.pop(msg[1], None)
            return ("ok", [], {})
        if kind == "probe":
            return ("probe", measure_capabilities(*msg[1:]).encode())
        if kind == "ping":
            return ("pong",)
        if kind == "arena":
            self.set_arena(msg[1])
            return None
        raise ValueError(f"unknown request {kind!r}")

    def job(self, mode: str, spec_bytes: bytes, layout: list[Any], claimed_layout: list[Any], out_offset: int,
            mem_limit: int) -> tuple[Any, ...]:
        spec = decode_spec(spec_bytes)
        kernel = lookup(spec.kernel, spec.version)
        inputs = self.views(layout)
        self.watchdog.arm(mem_limit)
        try:
            t0 = time.perf_counter()
            if mode == "verify":
                claimed = self.views(claimed_layout)
                verdict = kernel.verify(spec, inputs, claimed)
                return ("verdict", verdict.encode(), {"kernel_seconds": time.perf_counter() - t0})
            outputs = kernel.run(spec, inputs)
            seconds = time.perf_counter() - t0
            self.watchdog.check()
            packed = self.pack_outputs(outputs, out_offset, spec.limits.output_bytes)
            return ("ok", packed, {"kernel_seconds": seconds})
        finally:
            self.watchdog.disarm()

    def stream_open(self, sid: int, spec_bytes: bytes, layout: list[Any], mem_limit: int) -> tuple[Any, ...]:
        spec = decode_spec(spec_bytes)
        inputs = {name: arr.copy() for name, arr in self.views(layout).items()}
        self.watchdog.arm(mem_limit)
        try:
            self.streams[sid] = StreamModel(inputs, item_rows(spec))
            self.watchdog.check()
        finally:
            self.watchdog.disarm()
        return ("ok", [], {"loads": self.streams[sid].loads})

    def stream_item(self, sid: int, dtype: str, shape: tuple[int, ...], data: bytes, mem_limit: int,
                    rows: int | None = None) -> tuple[Any, ...]:
        """One item through session ``sid``; ``rows``: what an item is under the spec the session serves now.

        A warm session opened ahead of any task (one-sample items) and handed
        to a task whose spec batches items (``rows > 0``) serves that task's
        items from its first: the spec, not the opening, says what an item is.
        """
        session = self.streams.get(sid)
        if session is None:
            raise RuntimeClosed(f"stream session {sid} is not open in this worker")
        if rows is not None:
            session.rows = rows
        item = array_from_bytes(dtype, shape, data)
        self.watchdog.arm(mem_limit)
        try:
            out = canonical_array(session.infer(item))
            self.watchdog.check()
        finally:
            self.watchdog.disarm()
        return ("item", out.dtype.name, out.shape, out.tobytes(), {"loads": session.loads, "items": session.items})


    def stream_batch(self, sid: int, layout: list[Any], out_offset: int, out_limit: int, batch_size: int,
                     mem_limit: int) -> tuple[Any, ...]:
        """A ``keras_infer`` batch through an open session's model: ``keras_infer.run`` less the model load."""
        session = self.streams.get(sid)
        if session is None:
            raise RuntimeClosed(f"stream session {sid} is not open in this worker")
        x = self.views(layout)["x"]
        self.watchdog.arm(mem_limit)
        try:
            t0 = time.perf_counter()
            outputs = session.run_batch(x, batch_size)
            seconds = time.perf_counter() - t0
            self.watchdog.check()
            packed = self.pack_outputs(outputs, out_offset, out_limit)
        finally:
            self.watchdog.disarm()
        return ("ok", packed, {"kernel_seconds": seconds})


def _error_reply(exc: BaseException) -> tuple[Any, ...]:
    if isinstance(exc, KernelError):
        return ("err", type(exc).__name__, str(exc), False)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "ResourceExhaustedError":
        return ("err", "OutOfMemory", f"{type(exc).__name__}: {exc}", True)
    return ("err", "KernelFailed", f"{type(exc).__name__}: {exc}", False)


def _exit_now() -> NoReturn:
    """End the worker without the interpreter's teardown.

    Tearing down a process with TensorFlow loaded takes seconds (and has
    been seen to outlast the parent's 5 s join, ending in a SIGKILL anyway),
    which a provider's shutdown waited for. The worker holds nothing to
    save: results went back over the socket, the arena belongs to the
    parent. Only stdio is flushed, so a last log line is not lost.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def main(conn: Connection, setup: WorkerSetup) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    try:
        info = _setup_tensorflow(setup)
    except SetupFailed as exc:
        conn.send(("failed", str(exc)))
        _exit_now()
    worker = Worker(conn)
    conn.send(("ready", info))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            _exit_now()  # the parent is gone: nothing left to serve
        if msg[0] == "stop":
            _exit_now()
        try:
            reply = worker.handle(msg)
        except Exception as exc:  # report, never die of a job's exception
            reply = _error_reply(exc)
            if reply[3]:
                conn.send(reply)
                os._exit(EXIT_OOM)  # a worker that ran out of memory is not trusted with the next job
        if reply is not None:
            conn.send(reply)
