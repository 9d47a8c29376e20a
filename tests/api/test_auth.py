"""API tokens over real HTTP: who may call what, how much each token may commit per hour, and nothing leaks to logs.

The server runs on 127.0.0.1 with tokens configured, which enforces them
exactly as on a remote bind (tokens, once configured, are required on
every bind), so no test needs to listen beyond loopback.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import trio

from p2pgpu.api.app import ApiApp
from p2pgpu.api.auth import SPEND_WINDOW_S, Access, Authenticator, SpendAllowance, hash_token, new_token
from p2pgpu.api.server import RemoteBindRefused, serve_api
from p2pgpu.api.types import MSGPACK, TooManyRequests, Unauthorized, encode_submit_batch
from p2pgpu.config import TOKEN_PREFIX, ApiToken
from tests.api.fake_node import ALICE, AUDIT_FEE, DISPUTE_BOND, FEE, FakeNode, stream_job
from tests.api.test_api import submission

READER = TOKEN_PREFIX + "reader-secret-0123456789abcdefghijklmnopqrstu"
SUBMITTER = TOKEN_PREFIX + "submitter-secret-0123456789abcdefghijklmnop"
DISPUTER = TOKEN_PREFIX + "disputer-secret-0123456789abcdefghijklmnopq"
WRITER = TOKEN_PREFIX + "writer-secret-0123456789abcdefghijklmnopqrst"
STRANGER = TOKEN_PREFIX + "stranger-secret-0123456789abcdefghijklmnopq"
SPEND_LIMIT = 100
TASK_ID = "11" * 32


def cost_of(price: int) -> int:
    return price + AUDIT_FEE + FEE


def token(name: str, secret: str, scopes: set[str], spend: int | None = None) -> ApiToken:
    return ApiToken(name, hashlib.sha256(secret.encode()).hexdigest(), frozenset(scopes), spend)


TOKENS = (
    token("reader", READER, {"read"}),
    token("submitter", SUBMITTER, {"read", "submit"}, SPEND_LIMIT),
    token("disputer", DISPUTER, {"read", "dispute"}, DISPUTE_BOND + FEE + 10),
    token("writer", WRITER, {"submit"}, SPEND_LIMIT),
)


class FakeClock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Guarded:
    node: FakeNode
    client: httpx.AsyncClient
    clock: FakeClock

    async def post_task(self, secret: str | None, **terms: object) -> httpx.Response:
        headers = {"content-type": MSGPACK, **bearer(secret)}
        return await self.client.post("/tasks", content=submission(**terms), headers=headers)


def bearer(secret: str | None) -> dict[str, str]:
    return {} if secret is None else {"authorization": f"Bearer {secret}"}


@pytest.fixture
async def guarded(nursery: trio.Nursery) -> AsyncIterator[Guarded]:
    node = FakeNode(balances={ALICE: 10**9})
    clock = FakeClock()
    port = await nursery.start(lambda task_status: serve_api(node, "127.0.0.1", 0, tokens=TOKENS, clock=clock,
                                                             task_status=task_status))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as client:
        yield Guarded(node, client, clock)


def assert_refused(resp: httpx.Response, status: int, code: str, mentions: str = "") -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code, body
    assert mentions.lower() in body["message"].lower(), body["message"]


# ----------------------------------------------------------------- the route table

EXPECTED_ACCESS = {
    ("GET", "/health"): Access.PUBLIC,
    ("GET", "/status"): Access.READ,
    ("POST", "/tasks"): Access.SUBMIT,
    ("POST", "/tasks/batch"): Access.SUBMIT,
    ("GET", "/tasks/{task_id}"): Access.READ,
    ("GET", "/tasks/{task_id}/result"): Access.READ,
    ("DELETE", "/tasks/{task_id}/result"): Access.SUBMIT,  # deletes what the node keeps: not for read tokens
    ("POST", "/tasks/{task_id}/disputes"): Access.DISPUTE,
    ("GET", "/ledger/balance/{address}"): Access.READ,
    ("GET", "/ledger/accounts/{address}"): Access.READ,
    ("GET", "/ledger/validators"): Access.READ,
    ("GET", "/ledger/providers"): Access.READ,
    ("GET", "/ledger/blocks/{height}"): Access.READ,
    ("GET", "/ledger/head"): Access.READ,
    ("GET", "/ledger/supply"): Access.READ,
    ("GET", "/ledger/models"): Access.READ,
    ("GET", "/ledger/models/{ref}"): Access.READ,
    ("GET", "/ledger/models/{ref}/providers"): Access.READ,
    ("POST", "/models"): Access.SUBMIT,  # signs a RegisterModel and burns its registration fee
    ("GET", "/models/{model_id}"): Access.READ,
    ("GET", "/metrics"): Access.READ,
    ("GET", "/openapi.json"): Access.READ,  # FastAPI's own was public whatever the tokens said
}
"""The access policy, written out: a route added to the app without a line here fails the test below."""

ROUTES = [route for route in ApiApp(FakeNode()).routes]


def concrete(pattern: str) -> str:
    return pattern.format(task_id=TASK_ID, address=ALICE.hex(), height=1, ref="mnist@1", model_id=TASK_ID)


def test_every_route_has_the_reviewed_access() -> None:
    declared = {(r.method, r.pattern): r.access for r in ROUTES}
    assert len(declared) == len(ROUTES)
    assert declared == EXPECTED_ACCESS
    assert all(isinstance(r.access, Access) for r in ROUTES)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.pattern}")
async def test_without_a_token_every_route_but_health_is_401(guarded: Guarded, route) -> None:
    resp = await guarded.client.request(route.method, concrete(route.pattern), content=b"x" * 100,
                                        headers={"content-type": MSGPACK})
    if route.access is Access.PUBLIC:
        assert resp.status_code == 200
        return
    assert_refused(resp, 401, "missing_token", "Authorization: Bearer")
    assert resp.headers["www-authenticate"] == 'Bearer realm="p2pgpu"'
    assert guarded.node.submitted == [] and guarded.node.disputes == []


@pytest.mark.parametrize("route", [r for r in ROUTES if r.access is not Access.PUBLIC],
                         ids=lambda r: f"{r.method} {r.pattern}")
async def test_each_route_needs_exactly_its_scope(guarded: Guarded, route) -> None:
    holders = {"read": READER, "submit": SUBMITTER, "dispute": DISPUTER}
    lacking = {"read": WRITER, "submit": READER, "dispute": SUBMITTER}[route.access.value]
    path = concrete(route.pattern)
    resp = await guarded.client.request(route.method, path, headers=bearer(lacking))
    assert_refused(resp, 403, "insufficient_scope", f"needs the {route.access.value} scope")
    assert resp.headers["www-authenticate"] == (f'Bearer realm="p2pgpu", error="insufficient_scope", '
                                                f'scope="{route.access.value}"')
    resp = await guarded.client.request(route.method, path, headers=bearer(holders[route.access.value]))
    assert resp.status_code not in (401, 403), resp.text  # past auth: whatever the handler makes of no body


async def test_health_stays_open_and_ignores_a_bad_token(guarded: Guarded) -> None:
    assert (await guarded.client.get("/health")).status_code == 200
    assert (await guarded.client.get("/health", headers=bearer(STRANGER))).status_code == 200


@pytest.mark.parametrize("authorization", [
    f"Bearer {STRANGER}",
    f"Bearer {READER}x",
    f"Bearer {READER[:-1]}",
    f"bearer {hash_token(READER)}",  # the hash from the config is not the token
    f"Basic {READER}",
    "Bearer",
    f"Bearer {READER} extra",
    READER,
])
async def test_a_wrong_or_malformed_token_is_401(guarded: Guarded, authorization: str) -> None:
    resp = await guarded.client.get("/status", headers={"authorization": authorization})
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"] == "invalid_token"
    assert resp.headers["www-authenticate"].startswith('Bearer realm="p2pgpu", error="invalid_')


async def test_the_scheme_is_case_insensitive_and_the_right_token_reads(guarded: Guarded) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        resp = await guarded.client.get("/status", headers={"authorization": f"{scheme} {READER}"})
        assert resp.status_code == 200 and resp.json()["peer_id"] == "12D3KooWfake"


async def test_a_read_token_cannot_submit_and_nothing_reaches_the_node(guarded: Guarded) -> None:
    resp = await guarded.post_task(READER)
    assert_refused(resp, 403, "insufficient_scope", "token 'reader' may not do this: it needs the submit scope")
    assert resp.headers["connection"] == "close"  # the body was never read
    batch = await guarded.client.post("/tasks/batch", content=encode_submit_batch([submission()]),
                                      headers={"content-type": MSGPACK, **bearer(READER)})
    assert_refused(batch, 403, "insufficient_scope")
    assert guarded.node.submitted == []
    assert (await guarded.post_task(SUBMITTER)).status_code == 201


async def test_disputes_need_the_dispute_scope_and_count_their_bond(guarded: Guarded) -> None:
    spec, inputs, items = stream_job(3)
    from p2pgpu.api.types import SubmitRequest, encode_submit

    body = encode_submit(SubmitRequest(spec=spec, inputs={**inputs, "items": items}, max_unit_price=2, units=3,
                                       kind="stream"))
    created = await guarded.client.post("/tasks", content=body, headers={"content-type": MSGPACK,
                                                                         **bearer(SUBMITTER)})
    task_id = created.json()["task_id"]
    path = f"/tasks/{task_id}/disputes"
    assert_refused(await guarded.client.post(path, json={"item": 0}, headers=bearer(SUBMITTER)), 403,
                   "insufficient_scope", "dispute scope")
    assert (await guarded.client.post(path, json={"item": 0}, headers=bearer(DISPUTER))).status_code == 202
    # the disputer's allowance holds one bond and fee (51) and 10 more; a second dispute does not fit
    again = await guarded.client.post(path, json={"item": 1}, headers=bearer(DISPUTER))
    assert_refused(again, 429, "spend_limit", "has 10 left; this dispute (its bond and fee) would commit 51")
    assert [d[1] for d in guarded.node.disputes] == [0]
    # a dispute the node refuses commits nothing, so it costs no allowance
    guarded.clock.now += SPEND_WINDOW_S
    bad = await guarded.client.post(path, json={"item": 99}, headers=bearer(DISPUTER))
    assert_refused(bad, 422, "unknown_item")
    assert (await guarded.client.post(path, json={"item": 1}, headers=bearer(DISPUTER))).status_code == 202


# ----------------------------------------------------------------- spending


async def test_spend_limit_holds_under_20_concurrent_submits(guarded: Guarded) -> None:
    """The sum accepted never exceeds the limit, though all 20 are in flight before the node answers any.

    The node holds every submission it gets until each of the 20 requests
    has either reached it or been refused: an allowance checked before the
    node call but counted only after it would let all 20 through.
    """
    prices = [7, 13, 22, 5, 9, 31, 4, 17, 11, 6, 25, 8, 3, 19, 12, 10, 15, 2, 28, 14]
    gate = trio.Event()
    reached = 0
    submit = guarded.node.submit_task

    async def held_submit(request):
        nonlocal reached
        reached += 1
        await gate.wait()
        return await submit(request)

    guarded.node.submit_task = held_submit  # type: ignore[method-assign]
    answers: dict[int, httpx.Response] = {}

    async def post(price: int) -> None:
        answers[price] = await guarded.post_task(SUBMITTER, max_unit_price=price)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for price in prices:
                nursery.start_soon(post, price)
            while reached + len(answers) < len(prices):
                await trio.sleep(0.01)
            gate.set()
    accepted = [p for p, r in answers.items() if r.status_code == 201]
    refused = [p for p, r in answers.items() if r.status_code != 201]
    assert accepted and refused
    spent = sum(cost_of(p) for p in accepted)
    assert spent <= SPEND_LIMIT
    assert sorted(r.max_unit_price for r in guarded.node.submitted) == sorted(accepted)
    left = SPEND_LIMIT - spent
    for price in refused:
        resp = answers[price]
        assert_refused(resp, 429, "spend_limit", "token 'submitter' may commit 100 of the node's funds per hour")
        assert f"this task would commit {cost_of(price)}" in resp.json()["message"]
        assert cost_of(price) > left  # refused only what did not fit: the allowance is not under-used
        assert int(resp.headers["retry-after"]) == int(SPEND_WINDOW_S)  # the first holds free up in an hour
    final = await guarded.post_task(SUBMITTER, max_unit_price=1000)
    assert_refused(final, 429, "spend_limit", f"has {left} left")


async def test_the_allowance_is_a_sliding_hour(guarded: Guarded) -> None:
    assert (await guarded.post_task(SUBMITTER, max_unit_price=47)).status_code == 201  # 50
    guarded.clock.now += 1200
    assert (await guarded.post_task(SUBMITTER, max_unit_price=37)).status_code == 201  # 40, 10 left
    guarded.clock.now += 1200
    over = await guarded.post_task(SUBMITTER, max_unit_price=27)  # 30 does not fit until the first 50 expire
    assert_refused(over, 429, "spend_limit", "has 10 left; this task would commit 30; enough is free again in 20 min")
    assert over.headers["retry-after"] == "1200"
    guarded.clock.now += 1199
    assert (await guarded.post_task(SUBMITTER, max_unit_price=27)).status_code == 429
    guarded.clock.now += 1
    assert (await guarded.post_task(SUBMITTER, max_unit_price=27)).status_code == 201


async def test_more_than_the_whole_limit_says_so_without_retry_after(guarded: Guarded) -> None:
    resp = await guarded.post_task(SUBMITTER, max_unit_price=SPEND_LIMIT)
    assert_refused(resp, 429, "spend_limit", "more than the token's whole hourly limit (raise its spend_per_hour")
    assert "retry-after" not in resp.headers


async def test_a_task_the_node_refuses_costs_no_allowance(guarded: Guarded) -> None:
    guarded.node.balances[ALICE] = 50
    refused = await guarded.post_task(SUBMITTER, max_unit_price=60)  # 402 from the node: nothing escrowed
    assert_refused(refused, 402, "insufficient_funds")
    guarded.node.fail = "submit_task"
    assert (await guarded.post_task(SUBMITTER, max_unit_price=40)).status_code == 500
    guarded.node.fail = None
    guarded.node.balances[ALICE] = 10**9
    assert (await guarded.post_task(SUBMITTER, max_unit_price=SPEND_LIMIT - AUDIT_FEE - FEE)).status_code == 201


async def test_a_batch_takes_what_fits_and_refuses_the_rest_per_task(guarded: Guarded) -> None:
    prices = [30, 30, 30, 30, 5]  # costs 33 x 4 and 8: in whatever order they are decoded, 3 fit and 2 do not
    resp = await guarded.client.post("/tasks/batch", content=encode_submit_batch(
        [submission(max_unit_price=p) for p in prices]), headers={"content-type": MSGPACK, **bearer(SUBMITTER)})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    accepted = [prices[r["index"]] for r in results if "task_id" in r]
    assert sum(cost_of(p) for p in accepted) <= SPEND_LIMIT and len(accepted) == 3
    spent = [r for r in results if "task_id" not in r]
    assert {(r["status"], r["error"]) for r in spent} == {(429, "spend_limit")}
    assert all("of this batch would commit" in r["message"] for r in spent)


def test_allowance_unit() -> None:
    clock = FakeClock()
    allowance = SpendAllowance("t", 10, clock)
    first = allowance.reserve(6, "a")
    with pytest.raises(TooManyRequests) as info:
        allowance.reserve(5, "b")
    assert info.value.retry_after == int(SPEND_WINDOW_S) and "has 4 left" in info.value.message
    allowance.release(first)  # refused by the node: given back
    allowance.reserve(10, "c")
    assert allowance.remaining() == 0
    clock.now += SPEND_WINDOW_S
    assert allowance.remaining() == 10
    late = allowance.reserve(4, "d")
    clock.now += SPEND_WINDOW_S
    allowance.release(late)  # already expired: giving it back must not credit it twice
    with pytest.raises(TooManyRequests, match="more than the token's whole hourly limit"):
        allowance.reserve(11, "e")
    assert allowance.remaining() == 10


async def test_a_cancelled_request_gives_its_hold_back() -> None:
    clock = FakeClock()
    auth = Authenticator(TOKENS, clock=clock)
    caller = auth.authenticate(f"Bearer {SUBMITTER}")
    assert caller is not None and caller.allowance is not None
    with trio.move_on_after(0.01):
        with auth.spending(caller, 60, "this task"):
            assert caller.allowance.remaining() == SPEND_LIMIT - 60
            await trio.sleep_forever()
    assert caller.allowance.remaining() == SPEND_LIMIT
    with auth.spending(caller, 60, "this task"):
        pass
    assert caller.allowance.remaining() == SPEND_LIMIT - 60


def test_authenticator_without_tokens_lets_everything_through() -> None:
    auth = Authenticator(())
    assert not auth.enabled and auth.authenticate(None) is None
    with pytest.raises(Unauthorized):
        Authenticator(TOKENS).authenticate(None)


def test_new_tokens_are_prefixed_random_and_hash_as_the_config_expects() -> None:
    a, b = new_token(), new_token()
    assert a != b and a.startswith(TOKEN_PREFIX) and len(a) == len(TOKEN_PREFIX) + 43
    assert hash_token(a) == hashlib.sha256(a.encode()).hexdigest()


# ----------------------------------------------------------------- binding and logs


async def test_a_remote_bind_without_tokens_is_refused_before_binding() -> None:
    with pytest.raises(RemoteBindRefused, match="p2pgpu api token new"):
        await serve_api(FakeNode(), "0.0.0.0", 0, allow_remote=True)
    with pytest.raises(RemoteBindRefused, match="api.allow_remote = true"):
        await serve_api(FakeNode(), "0.0.0.0", 0, tokens=TOKENS)


async def test_tokens_never_reach_the_logs(guarded: Guarded, caplog: pytest.LogCaptureFixture) -> None:
    secrets = [READER, SUBMITTER, DISPUTER, WRITER, STRANGER]
    with caplog.at_level(logging.DEBUG):
        await guarded.client.get("/status", headers=bearer(READER))
        await guarded.client.get("/status", headers=bearer(STRANGER))
        await guarded.post_task(READER)  # 403
        await guarded.post_task(SUBMITTER)  # accepted
        await guarded.post_task(SUBMITTER, max_unit_price=SPEND_LIMIT * 2)  # 429
        guarded.node.fail = "submit_task"
        await guarded.post_task(SUBMITTER)  # 500, logged with its traceback
        guarded.node.fail = "status"
        await guarded.client.get("/status", headers={"authorization": f"Bearer {DISPUTER}"})
    # every logger, the HTTP client's (httpx, httpcore at DEBUG) included, as formatted when logged (a record's
    # arguments may be mutated afterwards, so getMessage() now could miss what a real handler wrote then)
    text = caplog.text
    # the capture saw what the server logs (so the check below can fail) ...
    assert "event=api_forbidden token=reader scope=submit" in text
    assert "event=api_spend_limit token=submitter" in text
    assert "event=api_unauthorized reason=invalid_token" in text
    assert "simulated bug in submit_task" in text
    # ... and no token, nor a hash of one, is in it
    for secret in secrets:
        assert secret not in text and hash_token(secret) not in text
