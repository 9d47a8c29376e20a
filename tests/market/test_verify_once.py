"""Decode and verify once: a bid's signature is checked by its validator only, on its way from gossip to ClientTask."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import trio

from ledger import keys as ledger_keys
from ledger.transactions import Bid, sign_bid
from p2pgpu.market import BidMessage, BidReceived, ClientConfig, ClientTask, SeenCache, encode_market_message
from p2pgpu.marketgossip import pump_bids, validate_bid
from p2pgpu.net import GossipMessage

from .sim import MarketSim, matmul_job


def _count_ed25519_checks(monkeypatch) -> list[int]:
    """Every module of ours that can verify an Ed25519 signature, counted (the call still happens)."""
    calls = [0]
    real = ledger_keys.verify_ed25519

    def counting(pubkey: bytes, msg: bytes, sig: bytes) -> bool:
        calls[0] += 1
        return real(pubkey, msg, sig)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("ledger", "p2pgpu") and getattr(module, "verify_ed25519", None) is real:
            monkeypatch.setattr(module, "verify_ed25519", counting)
    return calls


def test_a_bid_is_verified_exactly_once_from_gossip_to_its_client_task(monkeypatch) -> None:
    sim = MarketSim(providers=("p0",))
    sim.step()
    spec, _ = matmul_job()
    state = sim.chain.state
    task = ClientTask(key=sim.network.key("c0"), chain_id=sim.chain_id, spec=spec, post_nonce=0, max_unit_price=1_000,
                      data_peer=b"peer-c0", config=ClientConfig(bid_window=4, exec_blocks=10, audit_rate_bps=0),
                      height=state.height, providers=state.providers)
    task.start()
    provider = sim.network.key("p0")
    bid = Bid(task_id=task.task_id, provider=provider.address, unit_price=500, est_seconds=1,
              expiry_height=state.height + 3, terms_hash=task.terms_hash)
    data = encode_market_message(BidMessage(chain_id=sim.chain_id, signed=sign_bid(provider, sim.chain_id, bid)))
    head = SimpleNamespace(chain=SimpleNamespace(height=state.height, state=state), _from_self=lambda peer: False)
    calls = _count_ed25519_checks(monkeypatch)
    handled: list[object] = []

    async def gossip_to_client() -> None:
        verdict = validate_bid(head, sim.chain_id, SeenCache(), "peer", data)  # the /bid topic validator
        assert verdict.accepted
        send, receive = trio.open_memory_channel[GossipMessage](1)
        async with send:  # what the gossip router delivers: the bytes and the validator's record
            send.send_nowait(GossipMessage(topic="bid", data=data, origin="peer", msg_id=b"m", local=False,
                                           record=verdict.record))
        await pump_bids(receive, lambda verified, start: handled.extend(task.handle(BidReceived(verified, start))),
                        lambda notice: None)

    trio.run(gossip_to_client)
    assert calls[0] == 1
    assert provider.address in task.bids and handled
