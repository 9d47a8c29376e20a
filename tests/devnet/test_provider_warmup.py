"""A provider's kernel workers start with the node process; other nodes never load the kernel runtime."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import trio

from devnet.launcher import DevnetSpec, node_config
from p2pgpu.config import ProviderConfig
from p2pgpu.provider_warmup import provider_runtime_config, start_provider_runtime

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from devnet.launcher import DevnetSpec, node_config
from p2pgpu.provider_warmup import start_provider_runtime

for roles in ({"validator"}, {"client"}, {"observer"}):
    assert start_provider_runtime(node_config(DevnetSpec(), 0, frozenset(roles))) is None, roles
loaded = sorted(m for m in sys.modules if m == "kernels.runtime" or m.split(".")[0] in ("tensorflow", "keras"))
print("LOADED", loaded)
"""


def test_nodes_without_the_provider_role_start_no_runtime_and_import_none() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout


def test_runtime_config_follows_the_provider_section() -> None:
    assert provider_runtime_config(ProviderConfig(max_concurrent_jobs=3, device="cpu")).workers == 3
    assert provider_runtime_config(ProviderConfig(device="cpu")).device == "cpu"
    assert provider_runtime_config(ProviderConfig(device="gpu")).device == "auto"
    assert provider_runtime_config(ProviderConfig(device="any")).device == "auto"


def test_provider_workers_start_at_once_warm_up_and_exit_cleanly_on_close() -> None:
    cfg = node_config(DevnetSpec(), 4, frozenset({"provider"}))
    cfg = dataclasses.replace(cfg, provider=dataclasses.replace(cfg.provider, device="cpu"))
    runtime = start_provider_runtime(cfg)
    assert runtime is not None
    try:
        workers = [w.process for w in runtime._idle]  # spawned by start_provider_runtime, before any await
        assert len(workers) == 1 and workers[0].is_alive()

        async def ready() -> int:
            with trio.fail_after(180):
                info = await runtime.wait_ready()
                caps = await runtime.probe(n=64, repeats=1)
            assert caps.device_kind == "cpu"
            return int(info["pid"])

        assert trio.run(ready) == workers[0].pid
    finally:
        runtime.close()
        runtime.close()  # the provider role and the CLI both close it: the second call does nothing
    # The worker left on the stop request (exit 0), not by the SIGKILL close() falls back on after 5 s.
    assert workers[0].exitcode == 0


def test_slots_default_from_the_device_and_the_old_name_still_works() -> None:
    from kernels.probe import default_slots
    from p2pgpu.provider_warmup import provider_slots

    assert provider_slots(ProviderConfig(slots=3)) == 3
    assert provider_slots(ProviderConfig(max_concurrent_jobs=2)) == 2
    assert provider_slots(ProviderConfig(slots=4, max_concurrent_jobs=2)) == 4
    import os

    cores = len(os.sched_getaffinity(0))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert provider_slots(ProviderConfig(device="cpu")) == default_slots("cpu", 0, cores, memory)
