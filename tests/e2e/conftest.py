"""Real devnets for the end-to-end tests: node processes on 127.0.0.1, stopped whatever the test did.

:func:`devnet_processes` plans a devnet from a :class:`~devnet.launcher.DevnetSpec`,
writes it, starts every node and yields the :class:`~devnet.launcher.Devnet`.
On the way out (pass, failure or Ctrl-C) it stops the nodes with SIGTERM and
then SIGKILLs the process group of every pid it ever saw: a provider's
TensorFlow workers live in their node's group, and a node killed by a drill
must not leave them behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from devnet.launcher import Devnet, DevnetSpec, plan_devnet, write_devnet

# Loaded CI machines: seven node processes, two or three of them loading TensorFlow, on two shared cores.
START_TIMEOUT_S = 150.0


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


class TrackedDevnet(Devnet):
    """A :class:`Devnet` that remembers every pid it starts, for the fixture's last-resort cleanup."""

    def __init__(self, manifest) -> None:  # type: ignore[no-untyped-def]
        super().__init__(manifest)
        self.seen_pids: set[int] = set()

    def spawn(self, rec):  # type: ignore[no-untyped-def]
        proc = super().spawn(rec)
        self.seen_pids.add(proc.pid)
        return proc

    def kill(self, name: str):  # type: ignore[no-untyped-def]
        """SIGKILL the node and its process group (its kernel workers die with it)."""
        pid = self.manifest.node(name).pid
        rec = super().kill(name)
        if pid is not None:
            _kill_group(pid)
        return rec


@contextlib.contextmanager
def devnet_processes(root: Path, spec: DevnetSpec, *, seed: bytes = b"p2pgpu-e2e") -> Iterator[TrackedDevnet]:
    plan = plan_devnet(spec, master_seed=seed, genesis_time_ms=int(time.time() * 1000))
    manifest = write_devnet(plan, root, scrypt_n=2**14)
    devnet = TrackedDevnet(manifest)
    try:
        devnet.start_all(timeout=START_TIMEOUT_S)
        yield devnet
    finally:
        with contextlib.suppress(Exception):
            devnet.stop_all(grace=8.0)
        for pid in devnet.seen_pids:
            _kill_group(pid)
