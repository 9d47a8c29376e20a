"""Failover probes: a client asks its providers, about once a second, whether they are still on its tasks.

Why a probe and not the connection: a provider killed with ``kill -9``
drops its TCP connections, but one that hangs (``SIGSTOP``, a wedged
process) keeps them open for minutes, and one that restarted is reachable
yet has forgotten the job. A request that must be answered by the
provider's market role covers all three: no answer (dial refused, timeout)
or the answer ``unknown``/``dropped`` is the client state machine's cue to
take the task back (:class:`~p2pgpu.market.client.ClientTask`,
``ReopenTask`` on the ledger).

One request per provider per round, naming all of this client's tasks it
runs (at most :data:`MAX_PROBED_TASKS`), so the cost grows with the
providers a client uses, not with its tasks in flight. The answer is a hint
only: the ledger decides (a provider that lies "running" misses its
deadline as before), and a provider answers only about tasks whose client
is the requesting peer.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

import trio

from ledger.codec import Bytes, DecodeError, ListOf, Record, Text, decode, encode, record
from p2pgpu.dataplane import account_address_of_peer
from p2pgpu.market.events import ProviderProbed
from p2pgpu.net import NetError, ProtocolError, RequestContext
from p2pgpu.net.log import log

__all__ = ["JOB_PROTOCOL", "MAX_PROBED_TASKS", "JobProbe", "JobProbeReply", "probe_providers", "serve_job_status"]

logger = logging.getLogger(__name__)

JOB_PROTOCOL = "/p2pgpu/job/1"
MAX_PROBED_TASKS = 64
PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0


@record
class JobProbe(Record):
    MAX_BYTES = 4 << 10
    task_ids: Annotated[tuple[bytes, ...], ListOf(Bytes(32, 32), MAX_PROBED_TASKS)]


@record
class JobProbeReply(Record):
    MAX_BYTES = 4 << 10
    phases: Annotated[tuple[str, ...], ListOf(Text(32), MAX_PROBED_TASKS)]


def serve_job_status(job_status: Callable[[bytes, list[bytes]], list[str]] | None) -> Callable[..., Any]:
    """The ``/p2pgpu/job/1`` handler: ``job_status(requester, task_ids)`` (None: no provider role, all unknown)."""

    async def handle(ctx: RequestContext, request: bytes) -> bytes:
        try:
            probe = decode(JobProbe, request)
        except DecodeError as exc:
            raise ProtocolError(f"bad {JOB_PROTOCOL} request: {exc}") from None
        requester = account_address_of_peer(ctx.peer)
        ids = list(probe.task_ids)
        if requester is None or job_status is None:
            phases = ["unknown"] * len(ids)
        else:
            phases = job_status(requester, ids)
        await trio.lowlevel.checkpoint()
        return encode(JobProbeReply(tuple(phases)))

    return handle


def group_by_provider(targets: Iterable[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """``(task_id, provider)`` pairs -> provider -> its task ids, at most :data:`MAX_PROBED_TASKS` each."""
    out: dict[bytes, list[bytes]] = defaultdict(list)
    for task_id, provider in targets:
        if len(out[provider]) < MAX_PROBED_TASKS:
            out[provider].append(task_id)
    return dict(out)


async def probe_provider(network: Any, peer: str | None, provider: bytes, task_ids: list[bytes],
                         post: Callable[[bytes, ProviderProbed], None], *, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Ask one provider about ``task_ids``; post one :class:`ProviderProbed` per task, answered or not."""
    if peer is None:
        error = "no known peer id for the provider"
        replies: Mapping[bytes, str] = {}
    else:
        error = ""
        try:
            raw = await network.request(peer, JOB_PROTOCOL, encode(JobProbe(tuple(task_ids))), timeout=timeout)
            reply = decode(JobProbeReply, raw)
            if len(reply.phases) != len(task_ids):
                raise NetError(f"answered {len(reply.phases)} phases for {len(task_ids)} tasks")
            replies = dict(zip(task_ids, reply.phases, strict=True))
        except Exception as exc:  # ours (NetError, DecodeError) and py-libp2p's own for refused dials and resets
            error = f"{type(exc).__name__}: {exc}"[:200]
            replies = {}
    if error:
        log(logger, logging.DEBUG, "provider_probe_failed", provider=provider.hex()[:16], error=error)
    for task_id in task_ids:
        post(task_id, ProviderProbed(task_id, provider, phase=replies.get(task_id, ""), error=error))


async def probe_providers(network: Any, targets: Callable[[], Iterable[tuple[bytes, bytes]]],
                          peer_of: Callable[[bytes], str | None], post: Callable[[bytes, ProviderProbed], None],
                          *, interval: float = PROBE_INTERVAL_S) -> None:
    """Forever: every ``interval`` seconds, probe each provider that ``targets()`` names, concurrently."""
    while True:
        await trio.sleep(interval)
        groups = group_by_provider(targets())
        if not groups:
            continue
        async with trio.open_nursery() as nursery:
            for provider, task_ids in groups.items():
                nursery.start_soon(functools.partial(probe_provider, network, peer_of(provider), provider, task_ids, post))
