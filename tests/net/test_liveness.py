"""Failover probes (``/p2pgpu/job/1``) over real libp2p hosts: answers, bad requests, many probes at once."""

from __future__ import annotations

import trio

from ledger.codec import encode
from p2pgpu.dataplane import account_address_of_peer
from p2pgpu.liveness import JOB_PROTOCOL, MAX_PROBED_TASKS, JobProbe, group_by_provider, probe_provider, serve_job_status
from p2pgpu.market.events import ProviderProbed
from p2pgpu.net import RemoteError

from .conftest import FAST, nodes

TASKS = [bytes([i]) * 32 for i in range(1, 4)]


def test_probes_are_grouped_one_request_per_provider_and_bounded() -> None:
    pairs = [(bytes([i % 256, i // 256]) * 16, b"p" * 20) for i in range(MAX_PROBED_TASKS + 5)] + [(TASKS[0], b"q" * 20)]
    groups = group_by_provider(pairs)
    assert len(groups[b"p" * 20]) == MAX_PROBED_TASKS and groups[b"q" * 20] == [TASKS[0]]


async def test_a_provider_answers_its_clients_only_and_a_garbage_probe_is_refused_and_charged() -> None:
    async with nodes([FAST, FAST], boot={1: [0]}) as (provider, client):
        client_address = account_address_of_peer(client.peer_id)
        asked: list[tuple[bytes, list[bytes]]] = []

        def job_status(requester: bytes, task_ids: list[bytes]) -> list[str]:
            asked.append((requester, task_ids))
            return ["running" if requester == client_address and t == TASKS[0] else "unknown" for t in task_ids]

        provider.set_handler(JOB_PROTOCOL, serve_job_status(job_status), penalize_bad_requests=True)
        got: list[ProviderProbed] = []
        provider_address = account_address_of_peer(provider.peer_id)
        await probe_provider(client, provider.peer_id, provider_address, TASKS, lambda _t, e: got.append(e))
        assert [(e.phase, e.error) for e in got] == [("running", ""), ("unknown", ""), ("unknown", "")]
        assert asked == [(client_address, TASKS)]  # the requester is who the authenticated peer id says

        # many probes at once: each answered with its own tasks, none lost
        answers: list[ProviderProbed] = []
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(probe_provider, client, provider.peer_id, provider_address, TASKS[:1],
                                   lambda _t, e: answers.append(e))
        assert len(answers) == 40 and all(e.phase == "running" and not e.error for e in answers)

        # a request that is not a JobProbe: refused with the reason, charged, the provider keeps answering
        try:
            await client.request(provider.peer_id, JOB_PROTOCOL, b"\xc1 not msgpack")
            raise AssertionError("a garbage probe was answered")
        except RemoteError as exc:
            assert "bad /p2pgpu/job/1 request" in str(exc)
        assert provider.scores.score(client.peer_id, trio.current_time()) < 0
        assert await client.request(provider.peer_id, JOB_PROTOCOL, encode(JobProbe((TASKS[0],))))

        # no answer at all: one ProviderProbed per task, with the error, for the client's state machine
        failed: list[ProviderProbed] = []
        await probe_provider(client, None, provider_address, TASKS, lambda _t, e: failed.append(e))
        assert [e.error for e in failed] == ["no known peer id for the provider"] * 3
