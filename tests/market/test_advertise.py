"""The advert cadence (debounce, heartbeat, rate bound) and the client's directory of adverts, over plain numbers."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from kernels.probe import Capabilities
from ledger.devtools import dev_account_key
from p2pgpu.market import (BadSignature, Expired, MalformedMessage, ModelAdvert, PricingPolicy, Replayed, TooFrequent,
                           UnknownProvider, WarmModel, WrongChain, decode_market_message, encode_market_message,
                           sign_advert)
from p2pgpu.market.advertise import AdvertConfig, AdvertContent, AdvertDirectory, AdvertPublisher
from p2pgpu.market.pricing import advert_unit_price

CHAIN = bytes(range(32))
KEY = dev_account_key("provider")
OTHER = dev_account_key("other")
MODEL_A, MODEL_B = bytes([1]) * 32, bytes([2]) * 32
CONFIG = AdvertConfig(debounce_s=1.0, min_interval_s=2.0, heartbeat_s=30.0, lifetime_s=120.0)


def publisher(first_sequence: int = 1, block_seconds: float = 1.0) -> AdvertPublisher:
    return AdvertPublisher(CONFIG, chain_id=CHAIN, provider=KEY.address, block_seconds=block_seconds,
                           first_sequence=first_sequence)


def content(slots: int = 1, **prices: int) -> AdvertContent:
    ids = {"a": MODEL_A, "b": MODEL_B}
    return AdvertContent.of(slots, {ids[k]: v for k, v in (prices or {"a": 10}).items()})


# ---------------------------------------------------------------- publisher cadence


def test_a_change_goes_out_after_the_debounce_with_the_changes_made_meanwhile() -> None:
    pub = publisher(first_sequence=500)
    pub.observe(0.0, content(1, a=10))
    assert pub.poll(0.5, height=10) is None
    pub.observe(0.6, content(0, a=10, b=20))  # a second change inside the window rides along
    advert = pub.poll(1.0, height=10)
    assert advert is not None and advert.sequence == 500 and advert.free_slots == 0
    assert [m.model_id for m in advert.models] == [MODEL_A, MODEL_B]
    assert advert.expiry_height == 10 + 120 and advert.provider == KEY.address
    assert pub.poll(1.1, height=10) is None  # nothing new


def test_without_a_change_the_advert_is_republished_each_heartbeat_with_a_rising_sequence() -> None:
    pub = publisher()
    times = []
    sequences = []
    for tick in range(0, 200):  # 100 s at two polls a second
        now = tick * 0.5
        pub.observe(now, content())
        advert = pub.poll(now, height=tick)
        if advert is not None:
            times.append(now)
            sequences.append(advert.sequence)
    assert times == [1.0, 31.0, 61.0, 91.0]
    assert sequences == [1, 2, 3, 4]
    assert CONFIG.heartbeat_s * 3 < CONFIG.lifetime_s  # a lost advert or two does not expire the provider


def test_the_lifetime_is_counted_in_blocks_and_stays_within_the_validators_horizon() -> None:
    assert publisher(block_seconds=0.3).lifetime_blocks == 400
    assert publisher(block_seconds=0.01).lifetime_blocks == 1_000
    assert publisher(block_seconds=500.0).lifetime_blocks == 2


def test_under_load_adverts_never_come_closer_than_the_rate_bound() -> None:
    """Free slots change with every bid: 20 changes a second for ten minutes still make at most one advert per
    ``min_interval_s``."""
    rng = random.Random(5)
    pub = publisher()
    sent: list[float] = []
    for tick in range(12_000):
        now = tick * 0.05
        pub.observe(now, content(rng.randrange(4), a=10))
        if pub.poll(now, height=tick // 20) is not None:
            sent.append(now)
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert min(gaps) >= CONFIG.min_interval_s - 1e-9
    assert len(sent) <= 600 / CONFIG.min_interval_s + 1
    assert len(sent) > 100  # and the changes do go out


def test_nothing_warm_is_said_once_to_replace_the_old_advert_then_nothing() -> None:
    pub = publisher()
    pub.observe(0.0, content(2, a=10))
    assert pub.poll(1.0, height=1) is not None
    empty = AdvertContent.of(2, {})
    pub.observe(5.0, empty)
    withdrawn = pub.poll(6.0, height=2)
    assert withdrawn is not None and withdrawn.models == ()
    for tick in range(7, 200):
        pub.observe(float(tick), empty)
        assert pub.poll(float(tick), height=tick) is None


def test_a_provider_with_nothing_warm_or_not_ready_publishes_nothing() -> None:
    pub = publisher()
    for tick in range(100):
        pub.observe(float(tick), AdvertContent.of(3, {}) if tick % 2 else None)
        assert pub.poll(float(tick), height=tick) is None
    assert pub.published == 0


def test_advert_content_is_sorted_clamped_and_priced_positive() -> None:
    c = AdvertContent.of(-3, {MODEL_B: 5, MODEL_A: 0})
    assert c.free_slots == 0 and [m.model_id for m in c.models] == [MODEL_A, MODEL_B]
    assert all(m.unit_price >= 1 for m in c.models)
    assert AdvertContent.of(1 << 20, {}).free_slots == 0xFFFF


@pytest.mark.parametrize("changes", [{"debounce_s": -1.0}, {"min_interval_s": 0.0}, {"lifetime_s": 59.0},
                                     {"min_interval_s": 31.0}])
def test_a_bad_cadence_is_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        replace(CONFIG, **changes)  # type: ignore[arg-type]


def test_the_advert_price_is_the_per_item_price_of_the_bid_formula() -> None:
    caps = Capabilities(device_kind="cpu", device_name="cpu", memory_bytes=1 << 30, tf_version="2", matmul_gflops=1.0)
    policy = PricingPolicy(cost_per_second=1e6, margin_bps=2_000)
    # 4 MB bundle = 1 M weights = 2 MFLOP an item = 2 ms at 1 GFLOP/s = 2,000 x 1.2 = 2,400
    assert advert_unit_price(policy, caps, 4_000_000) == 2_400
    assert advert_unit_price(PricingPolicy(floor=7), caps, 4) == 7
    with pytest.raises(ValueError):
        advert_unit_price(policy, caps, -1)


# ---------------------------------------------------------------- the directory


REGISTERED = {KEY.address, OTHER.address}


def signed(key=KEY, *, sequence: int = 1, expiry: int = 150, slots: int = 1, models=None,
           chain: bytes = CHAIN) -> bytes:
    pub_models = (WarmModel(MODEL_A, 10),) if models is None else models
    advert = ModelAdvert(chain_id=chain, provider=key.address, sequence=sequence, expiry_height=expiry,
                         free_slots=slots, models=pub_models)
    return encode_market_message(sign_advert(key, advert))


def admit(d: AdvertDirectory, data: bytes, now: float = 0.0, height: int = 100) -> None:
    d.admit(data, now=now, height=height, is_provider=REGISTERED.__contains__)


def test_the_directory_lists_warm_providers_best_first_with_their_advert_age() -> None:
    d = AdvertDirectory(CHAIN)
    admit(d, signed(KEY, slots=0, models=(WarmModel(MODEL_A, 5),)), now=0.0)
    admit(d, signed(OTHER, slots=2, models=(WarmModel(MODEL_A, 9), WarmModel(MODEL_B, 1))), now=4.0)
    found = d.warm_providers(MODEL_A, now=10.0, height=100)
    assert [(w.provider, w.free_slots, w.unit_price, w.age_s) for w in found] == [
        (OTHER.address, 2, 9, 6.0),  # a free slot first, though dearer
        (KEY.address, 0, 5, 10.0),
    ]
    assert found[0].public_key == OTHER.public_key
    assert [w.provider for w in d.warm_providers(MODEL_B, now=10.0, height=100)] == [OTHER.address]
    assert d.warm_providers(bytes(32), now=10.0, height=100) == []


def test_a_newer_advert_replaces_the_old_and_expired_ones_are_dropped() -> None:
    d = AdvertDirectory(CHAIN, min_gap_s=1.0)
    admit(d, signed(sequence=1, expiry=120), now=0.0)
    admit(d, signed(sequence=2, expiry=110, models=(WarmModel(MODEL_B, 3),)), now=2.0)
    assert d.warm_providers(MODEL_A, now=3.0, height=100) == []
    assert [w.sequence for w in d.warm_providers(MODEL_B, now=3.0, height=100)] == [2]
    assert d.warm_providers(MODEL_B, now=3.0, height=111) == []  # past its expiry, even before eviction
    d.evict(111)
    assert len(d) == 0 and d._arrived == {}


def test_the_directory_is_bounded() -> None:
    d = AdvertDirectory(CHAIN, capacity=3)
    keys = [dev_account_key(f"p{i}") for i in range(6)]
    for i, key in enumerate(keys):
        d.admit(signed(key, expiry=150 + i), now=float(i), height=100, is_provider=lambda _a: True)
    assert len(d) == 3 and len(d._arrived) == 3
    assert {w.provider for w in d.warm_providers(MODEL_A, now=9.0, height=100)} == {k.address for k in keys[3:]}


@pytest.mark.parametrize(("data", "error"), [
    (b"\x00garbage", MalformedMessage),
    (signed(chain=bytes(32)), WrongChain),
    (signed(expiry=99), Expired),
    (signed(dev_account_key("stranger")), UnknownProvider),
])
def test_refused_adverts_change_nothing(data: bytes, error: type[Exception]) -> None:
    d = AdvertDirectory(CHAIN)
    with pytest.raises(error):
        admit(d, data)
    assert len(d) == 0 and d._arrived == {}


def test_an_old_sequence_a_too_frequent_or_a_forged_advert_is_refused_and_the_kept_one_stays() -> None:
    d = AdvertDirectory(CHAIN, min_gap_s=1.0)
    admit(d, signed(sequence=5), now=0.0)
    with pytest.raises(Replayed):
        admit(d, signed(sequence=5), now=3.0)
    with pytest.raises(Replayed):
        admit(d, signed(sequence=4), now=3.0)
    with pytest.raises(TooFrequent):
        admit(d, signed(sequence=6), now=0.5)
    rec = decode_market_message(signed(sequence=7, slots=1))
    forged = replace(rec, advert=replace(rec.advert, free_slots=9))  # type: ignore[type-var]
    with pytest.raises(BadSignature):
        admit(d, encode_market_message(forged), now=3.0)
    (kept,) = d.warm_providers(MODEL_A, now=3.0, height=100)
    assert kept.sequence == 5 and kept.age_s == 3.0
    admit(d, signed(sequence=6), now=1.5)  # after the gap an honest newer one is taken
    assert [w.sequence for w in d.warm_providers(MODEL_A, now=3.0, height=100)] == [6]
