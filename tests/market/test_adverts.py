"""Model adverts and bid starts: signed by the provider's account key, validated once, refused for each reason."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ledger.devtools import dev_account_key
from ledger.transactions import Bid
from p2pgpu.market import (
    AdvertBook,
    BadSignature,
    BidMessage,
    BidOffer,
    Expired,
    InvalidContent,
    ModelAdvert,
    Replayed,
    SignerMismatch,
    TooFarAhead,
    WarmModel,
    WrongChain,
    WrongTopic,
    encode_market_message,
    sign_advert,
    sign_bid,
    sign_bid_start,
    validate_advert_message,
    validate_bid_offer,
    validate_market_message,
)

CHAIN = bytes(range(32))
OTHER_CHAIN = bytes(32)
PROVIDER = dev_account_key("provider")
OTHER = dev_account_key("other")
NOW = 100
MODEL_A, MODEL_B = bytes([1]) * 32, bytes([2]) * 32


def advert(**changes: object) -> ModelAdvert:
    a = ModelAdvert(chain_id=CHAIN, provider=PROVIDER.address, sequence=1, expiry_height=NOW + 50, free_slots=2,
                    models=(WarmModel(MODEL_A, 120), WarmModel(MODEL_B, 80)))
    return replace(a, **changes)  # type: ignore[arg-type]


def advert_bytes(key=PROVIDER, **changes: object) -> bytes:
    return encode_market_message(sign_advert(key, advert(**changes)))


def test_a_signed_advert_is_accepted_and_becomes_the_providers_latest() -> None:
    book = AdvertBook()
    rec = validate_advert_message(CHAIN, NOW, advert_bytes(), book)
    assert rec.advert == advert()
    assert book.latest(PROVIDER.address) == advert()
    assert [(p, e.unit_price, slots) for p, e, slots in book.warm_providers(MODEL_B, NOW)] == [(PROVIDER.address, 80, 2)]
    assert list(book.warm_providers(bytes(32), NOW)) == []


def test_a_newer_advert_replaces_and_an_old_or_replayed_one_is_refused() -> None:
    book = AdvertBook()
    validate_advert_message(CHAIN, NOW, advert_bytes(sequence=5), book)
    with pytest.raises(Replayed):
        validate_advert_message(CHAIN, NOW, advert_bytes(sequence=5), book)
    with pytest.raises(Replayed):
        validate_advert_message(CHAIN, NOW, advert_bytes(sequence=4), book)
    validate_advert_message(CHAIN, NOW, advert_bytes(sequence=6, models=()), book)
    assert book.latest(PROVIDER.address).models == ()  # type: ignore[union-attr]


def test_expired_adverts_are_forgotten() -> None:
    book = AdvertBook()
    validate_advert_message(CHAIN, NOW, advert_bytes(expiry_height=NOW + 1), book)
    book.evict(NOW + 2)
    assert book.latest(PROVIDER.address) is None


@pytest.mark.parametrize(("data", "error"), [
    (advert_bytes(chain_id=OTHER_CHAIN), WrongChain),
    (advert_bytes(expiry_height=NOW - 1), Expired),
    (advert_bytes(expiry_height=NOW + 5_000), TooFarAhead),
    (advert_bytes(models=(WarmModel(MODEL_B, 1), WarmModel(MODEL_A, 1))), InvalidContent),
    (advert_bytes(models=(WarmModel(MODEL_A, 1), WarmModel(MODEL_A, 2))), InvalidContent),
    (advert_bytes(models=(WarmModel(MODEL_A, 0),)), InvalidContent),
    (advert_bytes(key=OTHER), SignerMismatch),
])
def test_bad_adverts_are_refused_for_their_reason(data: bytes, error: type[Exception]) -> None:
    book = AdvertBook()
    with pytest.raises(error):
        validate_advert_message(CHAIN, NOW, data, book)
    assert len(book) == 0


def test_an_advert_signed_for_another_chain_or_tampered_does_not_verify() -> None:
    signed = sign_advert(PROVIDER, replace(advert(), chain_id=OTHER_CHAIN))
    forged = replace(signed, advert=replace(signed.advert, chain_id=CHAIN))
    with pytest.raises(BadSignature):
        validate_advert_message(CHAIN, NOW, encode_market_message(forged))
    signed = sign_advert(PROVIDER, advert())
    cheaper = replace(signed, advert=replace(signed.advert, free_slots=9))
    with pytest.raises(BadSignature):
        validate_advert_message(CHAIN, NOW, encode_market_message(cheaper))


def test_adverts_belong_on_their_own_topic() -> None:
    with pytest.raises(ValueError):
        validate_market_message("advert", CHAIN, NOW, advert_bytes())
    with pytest.raises(WrongTopic):
        validate_market_message("bid", CHAIN, NOW, advert_bytes())


# ---------------------------------------------------------------- bid starts


def _bid(**changes: object) -> Bid:
    bid = Bid(task_id=bytes([7]) * 32, provider=PROVIDER.address, unit_price=100, est_seconds=3,
              expiry_height=NOW + 5, terms_hash=bytes(32))
    return replace(bid, **changes)  # type: ignore[arg-type]


def test_a_bid_says_warm_or_cold_signed_by_the_bids_key() -> None:
    bid = _bid()
    for warm, seconds in ((True, 0.0), (False, 7.5)):
        start = sign_bid_start(PROVIDER, CHAIN, bid, warm=warm, startup_seconds=seconds)
        data = encode_market_message(BidMessage(chain_id=CHAIN, signed=sign_bid(PROVIDER, CHAIN, bid), start=start))
        offer = validate_bid_offer(CHAIN, NOW, data)
        assert isinstance(offer, BidOffer) and offer.signed.bid == bid
        assert offer.start is not None and (offer.start.warm, offer.start.startup_seconds) == (warm, seconds)
    plain = encode_market_message(BidMessage(chain_id=CHAIN, signed=sign_bid(PROVIDER, CHAIN, bid)))
    assert validate_bid_offer(CHAIN, NOW, plain).start is None  # type: ignore[union-attr]


def test_a_flipped_or_borrowed_bid_start_is_refused() -> None:
    bid = _bid()
    signed = sign_bid(PROVIDER, CHAIN, bid)
    cold = sign_bid_start(PROVIDER, CHAIN, bid, warm=False, startup_seconds=9.0)
    flipped = replace(cold, start=replace(cold.start, warm=True))
    with pytest.raises(BadSignature):
        validate_bid_offer(CHAIN, NOW, encode_market_message(BidMessage(chain_id=CHAIN, signed=signed, start=flipped)))
    other_bid = sign_bid_start(PROVIDER, CHAIN, _bid(unit_price=99), warm=True, startup_seconds=0.0)
    with pytest.raises(InvalidContent):
        validate_bid_offer(CHAIN, NOW, encode_market_message(BidMessage(chain_id=CHAIN, signed=signed, start=other_bid)))
    by_other = sign_bid_start(OTHER, CHAIN, bid, warm=True, startup_seconds=0.0)
    with pytest.raises(BadSignature):
        validate_bid_offer(CHAIN, NOW, encode_market_message(BidMessage(chain_id=CHAIN, signed=signed, start=by_other)))
    wrong_chain = sign_bid_start(PROVIDER, OTHER_CHAIN, bid, warm=True, startup_seconds=0.0)
    with pytest.raises(BadSignature):
        validate_bid_offer(CHAIN, NOW, encode_market_message(BidMessage(chain_id=CHAIN, signed=signed,
                                                                        start=wrong_chain)))
