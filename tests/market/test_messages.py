"""Every market gossip record through its topic validator: accepted, and refused for each reason."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kernels.spec import encode_spec, spec_hash
from ledger.codec import encode
from ledger.devtools import dev_account_key
from ledger.keys import verify_ed25519
from ledger.signing import Domain, signing_bytes
from ledger.state import Task, TaskOutcome, TaskStatus
from ledger.transactions import Bid, TaskKind
from p2pgpu.market import (
    AnnounceMismatch,
    BadSignature,
    BidMessage,
    DeclineNotice,
    DeclineReason,
    Expired,
    InvalidContent,
    MalformedMessage,
    OversizedMessage,
    Replayed,
    SeenCache,
    SignedAnnounce,
    SignedDecline,
    SignerMismatch,
    SpecMismatch,
    TooFarAhead,
    WrongChain,
    WrongTopic,
    check_announce_matches_task,
    encode_market_message,
    encode_requirements,
    make_announce,
    sign_announce,
    sign_bid,
    sign_decline,
    topic_name,
    validate_bid_message,
    validate_task_message,
)
from p2pgpu.market.messages import MAX_BID_MESSAGE_BYTES, MAX_TASK_MESSAGE_BYTES

from .sim import matmul_job

CHAIN = bytes(range(32))
OTHER_CHAIN = bytes(32)
CLIENT = dev_account_key("client")
PROVIDER = dev_account_key("provider")
NOW = 100
TASK_ID = bytes([7]) * 32


def announce(**changes):
    spec, _ = matmul_job()
    a = make_announce(chain_id=CHAIN, task_id=TASK_ID, client=CLIENT.address, kind=TaskKind.BATCH, spec=spec,
                      max_unit_price=500, units=1, exec_blocks=20, bid_deadline_height=NOW + 5, data_peer=b"peer")
    return replace(a, **changes)


def announce_bytes(key=CLIENT, **changes) -> bytes:
    return encode_market_message(sign_announce(key, announce(**changes)))


def bid_bytes(chain=CHAIN, key=PROVIDER, sign_chain=None, **changes) -> bytes:
    bid = Bid(task_id=TASK_ID, provider=PROVIDER.address, unit_price=100, est_seconds=3, expiry_height=NOW + 5,
              terms_hash=bytes(32))
    bid = replace(bid, **changes)
    return encode_market_message(BidMessage(chain_id=chain, signed=sign_bid(key, sign_chain or chain, bid)))


def decline_bytes(chain=CHAIN, **changes) -> bytes:
    notice = DeclineNotice(chain_id=chain, task_id=TASK_ID, provider=PROVIDER.address,
                           reason=int(DeclineReason.BUSY), detail="busy", expiry_height=NOW + 5)
    return encode_market_message(sign_decline(PROVIDER, replace(notice, **changes)))


# ------------------------------------------------------------------ accepted


def test_valid_records_are_accepted() -> None:
    rec = validate_task_message(CHAIN, NOW, announce_bytes())
    assert isinstance(rec, SignedAnnounce) and rec.announce.task_id == TASK_ID
    assert isinstance(validate_bid_message(CHAIN, NOW, bid_bytes()), BidMessage)
    assert isinstance(validate_bid_message(CHAIN, NOW, decline_bytes()), SignedDecline)
    assert topic_name(CHAIN, "bid") == f"/p2pgpu/{CHAIN.hex()}/bid"


def test_announce_inlines_the_spec_and_its_hash_matches() -> None:
    spec, _ = matmul_job()
    a = validate_task_message(CHAIN, NOW, announce_bytes()).announce
    assert a.spec == encode_spec(spec) and a.spec_hash == spec_hash(spec)
    assert a.input_bytes == 2 * 8 * 8 * 4


# ------------------------------------------------------------------ refused, one reason each


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01", b"not msgpack at all", encode_market_message(
    sign_announce(CLIENT, announce())) + b"\x00"])
def test_malformed_bytes(data: bytes) -> None:
    with pytest.raises(MalformedMessage) as info:
        validate_task_message(CHAIN, NOW, data)
    assert info.value.reason == "malformed" and info.value.penalize


def test_unknown_type_tag_and_non_canonical_encodings_are_malformed() -> None:
    import msgpack

    with pytest.raises(MalformedMessage, match="unknown MarketMessage type 9"):
        validate_bid_message(CHAIN, NOW, msgpack.packb([9, b"x"]))
    # same values, non-canonical integer width: re-encoding differs
    obj = msgpack.unpackb(bid_bytes())
    loose = msgpack.packb(obj)
    assert loose == bid_bytes()
    wide = loose.replace(b"\x02", b"\xcc\x02", 1)  # tag 2 as a uint8 instead of a fixint
    with pytest.raises(MalformedMessage, match="non-canonical"):
        validate_bid_message(CHAIN, NOW, wide)


def test_oversized_messages() -> None:
    with pytest.raises(OversizedMessage) as info:
        validate_task_message(CHAIN, NOW, b"\x00" * (MAX_TASK_MESSAGE_BYTES + 1))
    assert info.value.reason == "oversized"
    padded = bid_bytes()[:-1] + b"\x00" * (MAX_BID_MESSAGE_BYTES + 1 - len(bid_bytes()) + 1)
    with pytest.raises(OversizedMessage, match="bid topic limit"):
        validate_bid_message(CHAIN, NOW, padded)  # refused on size before any parsing
    assert len(bid_bytes()) < MAX_BID_MESSAGE_BYTES


def test_records_on_the_wrong_topic() -> None:
    with pytest.raises(WrongTopic):
        validate_task_message(CHAIN, NOW, bid_bytes())
    with pytest.raises(WrongTopic):
        validate_task_message(CHAIN, NOW, decline_bytes())


def test_wrong_chain() -> None:
    with pytest.raises(WrongChain):
        validate_task_message(CHAIN, NOW, announce_bytes(chain_id=OTHER_CHAIN))
    with pytest.raises(WrongChain):
        validate_bid_message(CHAIN, NOW, bid_bytes(chain=OTHER_CHAIN))
    with pytest.raises(WrongChain) as info:
        validate_bid_message(CHAIN, NOW, decline_bytes(chain=OTHER_CHAIN))
    assert info.value.penalize


def test_signature_made_for_another_chain_does_not_verify_here() -> None:
    # The wrapper claims our chain, but the provider signed the bid for another one.
    with pytest.raises(BadSignature, match="does not verify"):
        validate_bid_message(CHAIN, NOW, bid_bytes(sign_chain=OTHER_CHAIN))


def test_bad_signatures() -> None:
    signed = sign_announce(CLIENT, announce())
    forged = replace(signed, signature=bytes(64))
    with pytest.raises(BadSignature) as info:
        validate_task_message(CHAIN, NOW, encode_market_message(forged))
    assert info.value.reason == "bad-signature"
    tampered = replace(signed, announce=replace(signed.announce, max_unit_price=10_000))
    with pytest.raises(BadSignature):
        validate_task_message(CHAIN, NOW, encode_market_message(tampered))
    notice = validate_bid_message(CHAIN, NOW, decline_bytes())
    with pytest.raises(BadSignature):
        validate_bid_message(CHAIN, NOW, encode_market_message(replace(notice, signature=bytes(64))))


def test_key_that_is_not_the_signers() -> None:
    with pytest.raises(SignerMismatch) as info:
        validate_task_message(CHAIN, NOW, announce_bytes(key=PROVIDER))  # client field names CLIENT
    assert info.value.reason == "signer-mismatch"
    with pytest.raises(SignerMismatch):
        validate_bid_message(CHAIN, NOW, bid_bytes(key=CLIENT))


def test_expired_and_far_future() -> None:
    with pytest.raises(Expired) as info:
        validate_task_message(CHAIN, NOW, announce_bytes(bid_deadline_height=NOW - 1))
    assert not info.value.penalize
    with pytest.raises(Expired):
        validate_bid_message(CHAIN, NOW, bid_bytes(expiry_height=NOW - 1))
    with pytest.raises(Expired):
        validate_bid_message(CHAIN, NOW, decline_bytes(expiry_height=NOW - 1))
    with pytest.raises(TooFarAhead):
        validate_bid_message(CHAIN, NOW, bid_bytes(expiry_height=NOW + 5_000))
    validate_bid_message(CHAIN, NOW, bid_bytes(expiry_height=NOW))  # the last valid height


def test_replays() -> None:
    seen = SeenCache()
    data = bid_bytes()
    validate_bid_message(CHAIN, NOW, data, seen)
    with pytest.raises(Replayed, match="already delivered") as info:
        validate_bid_message(CHAIN, NOW, data, seen)
    assert not info.value.penalize
    # a second, different bid by the same provider for the same task is a replay of the pair
    with pytest.raises(Replayed, match="already accepted"):
        validate_bid_message(CHAIN, NOW, bid_bytes(unit_price=90), seen)
    ann = announce_bytes()
    validate_task_message(CHAIN, NOW, ann, seen)
    with pytest.raises(Replayed):
        validate_task_message(CHAIN, NOW, ann, seen)


def test_a_forged_message_does_not_poison_the_replay_cache() -> None:
    seen = SeenCache()
    signed = sign_announce(CLIENT, announce())
    with pytest.raises(BadSignature):
        validate_task_message(CHAIN, NOW, encode_market_message(replace(signed, signature=bytes(64))), seen)
    assert len(seen) == 0
    validate_task_message(CHAIN, NOW, encode_market_message(signed), seen)


def test_invalid_content() -> None:
    with pytest.raises(InvalidContent, match="unit_price"):
        validate_bid_message(CHAIN, NOW, bid_bytes(unit_price=0))
    with pytest.raises(InvalidContent, match="units"):
        validate_task_message(CHAIN, NOW, announce_bytes(units=3))
    with pytest.raises(InvalidContent, match="max_unit_price"):
        validate_task_message(CHAIN, NOW, announce_bytes(max_unit_price=0))
    with pytest.raises(InvalidContent, match="reason code"):
        validate_bid_message(CHAIN, NOW, decline_bytes(reason=200))


def test_inline_spec_must_match_hash_and_summary() -> None:
    with pytest.raises(SpecMismatch, match="does not hash"):
        validate_task_message(CHAIN, NOW, announce_bytes(spec_hash=bytes(32)))
    with pytest.raises(SpecMismatch, match="memory_bytes"):
        validate_task_message(CHAIN, NOW, announce_bytes(memory_bytes=1))
    with pytest.raises(SpecMismatch, match="kernel"):
        validate_task_message(CHAIN, NOW, announce_bytes(kernel="conv2d"))
    garbage = b"\x91\x01"
    import hashlib

    with pytest.raises(SpecMismatch, match="not a valid JobSpec"):
        validate_task_message(CHAIN, NOW, announce_bytes(spec=garbage, spec_hash=hashlib.sha256(garbage).digest()))


def test_seen_cache_forgets_by_height_and_by_capacity() -> None:
    cache = SeenCache(capacity=3)
    cache.add("a", 10)
    cache.add("b", 12)
    cache.add("c", 11)
    cache.add("d", 20)  # over capacity: the soonest-expiring ("a") goes
    assert "a" not in cache and {"b", "c", "d"} <= {k for k in "bcd" if k in cache}
    cache.evict(12)  # expiry below 12 is useless: such messages are refused as expired anyway
    assert "c" not in cache and "b" in cache and "d" in cache
    cache.add("b", 30)  # re-adding refreshes; the stale heap entry must not delete it
    cache.evict(13)
    assert "b" in cache and len(cache) == 2


def _task(**changes) -> Task:
    spec, _ = matmul_job()
    task = Task(task_id=TASK_ID, client=CLIENT.address, kind=TaskKind.BATCH, spec_hash=spec_hash(spec),
                requirements=encode_requirements(spec.requirements), max_unit_price=500, units=1, audit_rate_bps=0,
                exec_blocks=20, status=TaskStatus.POSTED, outcome=TaskOutcome.NONE, escrow=510, audit_fee=10,
                post_height=NOW + 1, bid_deadline=NOW + 5)
    return replace(task, **changes)


def test_announce_is_checked_against_the_ledger_task() -> None:
    a = announce()
    check_announce_matches_task(a, _task())
    for field, value in [("max_unit_price", 499), ("spec_hash", bytes(32)), ("units", 2), ("kind", 2),
                         ("exec_blocks", 5), ("bid_deadline", NOW + 4), ("requirements", b"\x92\xa3gpu\x00")]:
        with pytest.raises(AnnounceMismatch) as info:
            check_announce_matches_task(a, _task(**{field: value}))
        assert info.value.field == {"bid_deadline": "bid_deadline_height"}.get(field, field)
    # an announce made at submission names the earliest deadline; the ledger's may be later
    check_announce_matches_task(a, _task(bid_deadline=NOW + 7))


def test_decline_and_bid_signatures_cannot_stand_in_for_each_other() -> None:
    bid = validate_bid_message(CHAIN, NOW, bid_bytes())
    decline = validate_bid_message(CHAIN, NOW, decline_bytes())
    # a decline is signed under its own domain: its signature does not verify as a bid's over the same bytes
    body = encode(decline.notice)
    assert verify_ed25519(decline.public_key, signing_bytes(Domain.DECLINE, CHAIN, body), decline.signature)
    assert not verify_ed25519(decline.public_key, signing_bytes(Domain.BID, CHAIN, body), decline.signature)
    assert not verify_ed25519(bid.signed.public_key, signing_bytes(Domain.DECLINE, CHAIN, encode(bid.signed.bid)),
                              bid.signed.signature)
