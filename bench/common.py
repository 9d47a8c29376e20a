"""Helpers every bench script shares: progress lines, polling a devnet, reading a node's /metrics.

Each bench used to carry its own copy of these (two ``_wait`` loops that
differed only in which errors they forgave, three ``_say`` lines); one copy
keeps their behaviour the same across benches.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import httpx

T = TypeVar("T")


def say(bench: str, text: str) -> None:
    """A progress line on stderr (stdout's last line is the bench's JSON)."""
    print(f"[{bench} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def wait_for(what: str, probe: Callable[[], T], timeout: float, interval: float = 0.25) -> T:
    """Poll ``probe`` until it returns something truthy; a node busy or restarting (an HTTP error) is polled again.

    Raises TimeoutError naming ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            value = probe()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)


def metric_value(url: str, name: str, labels: str = "") -> float:
    """The sum of one metric family's samples on a node's /metrics (those whose labels contain ``labels``); 0 if absent."""
    text = httpx.get(url + "/metrics", timeout=10.0).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name) or (labels and labels not in line):
            continue
        head = line.split()[0]
        if head == name or head.startswith(name + "{"):
            total += float(line.split()[-1])
    return total


def serving_provider(api_urls: Iterable[tuple[str, str]]) -> str | None:
    """The first of ``(name, api_url)`` whose provider holds an open stream session (a gateway lane's), if any."""
    for name, url in api_urls:
        with contextlib.suppress(httpx.HTTPError):
            if metric_value(url, "p2pgpu_stream_sessions_active", 'role="provider"') > 0:
                return name
    return None
