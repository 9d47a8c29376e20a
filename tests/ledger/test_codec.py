"""The canonical record layer: round trips, and every way bytes can be wrong."""

from __future__ import annotations

from typing import Annotated

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.codec import (
    U8,
    U64,
    Address,
    Bytes,
    DecodeError,
    EncodeError,
    Float,
    Hash32,
    ListOf,
    MapOf,
    Maybe,
    Nested,
    OneOf,
    Record,
    RecordUnion,
    Scalar,
    Text,
    decode,
    encode,
    encode_with_encoded_list,
    record,
)


@record
class Inner(Record):
    tag: Annotated[str, Text(16)]
    weight: U8


@record
class Ping(Record):
    TYPE_ID = 1
    MAX_BYTES = 4096
    sender: Address
    nonce: U64
    payload: Annotated[bytes, Bytes(64)]
    items: Annotated[tuple[Inner, ...], ListOf(Nested(Inner), max_items=4)]
    params: Annotated[tuple, MapOf(Scalar(), max_items=8)]
    note: Annotated[str | None, Maybe(Text(10))]
    ratio: Annotated[float, Float(0.0, 1.0)]


@record
class Pong(Record):
    TYPE_ID = 2
    digest: Hash32


MESSAGES = RecordUnion("Message", [Ping, Pong], max_bytes=4096)


@record
class Envelope(Record):
    body: Annotated[Record, OneOf(MESSAGES)]
    flag: bool


def make_ping(**overrides) -> Ping:
    fields = dict(
        sender=b"\x01" * 20,
        nonce=7,
        payload=b"hi",
        items=(Inner("a", 1), Inner("b", 2)),
        params=(("lr", 0.5), ("steps", 10)),
        note=None,
        ratio=0.25,
    )
    fields.update(overrides)
    return Ping(**fields)


def test_round_trip_untagged_and_tagged():
    ping = make_ping()
    assert decode(Ping, encode(ping)) == ping
    assert MESSAGES.decode(MESSAGES.encode(ping)) == ping
    env = Envelope(body=Pong(b"\x02" * 32), flag=True)
    assert decode(Envelope, encode(env)) == env


def test_map_accepts_dict_and_encodes_sorted():
    a = make_ping(params={"z": 1, "a": "x"})
    assert encode(a) == encode(make_ping(params=(("a", "x"), ("z", 1))))


@pytest.mark.parametrize(
    ("wire", "fragment"),
    [
        ([b"\x01" * 19, 7, b"", [], {}, None, 0.1], "Ping.sender: expected exactly 20 bytes, got 19"),
        ([b"\x01" * 20, "7", b"", [], {}, None, 0.1], "Ping.nonce: expected an integer"),
        ([b"\x01" * 20, -1, b"", [], {}, None, 0.1], "Ping.nonce: integer -1 out of range"),
        ([b"\x01" * 20, 7, b"x" * 65, [], {}, None, 0.1], "Ping.payload: expected 0..64 bytes, got 65"),
        ([b"\x01" * 20, 7, b"", [["a", 300]], {}, None, 0.1], "Ping.items[0].weight: integer 300 out of range"),
        ([b"\x01" * 20, 7, b"", [["a", 1]] * 5, {}, None, 0.1], "Ping.items: expected 0..4 items, got 5"),
        ([b"\x01" * 20, 7, b"", [], {"k": [1]}, None, 0.1], "Ping.params.k: expected int, float, bool or string"),
        ([b"\x01" * 20, 7, b"", [], {}, "x" * 11, 0.1], "Ping.note: expected 0..10 characters"),
        ([b"\x01" * 20, 7, b"", [], {}, None, 1.5], "Ping.ratio: float 1.5 out of range"),
        ([b"\x01" * 20, 7, b"", [], {}, None], "Ping: missing field 'ratio'"),
        ([b"\x01" * 20, 7, b"", [], {}, None, 0.1, 0], "Ping: 1 extra field(s)"),
        ({"sender": 1}, "Ping: expected an array"),
    ],
)
def test_decode_names_the_bad_field(wire, fragment):
    data = msgpack.packb(wire, use_bin_type=True)
    with pytest.raises(DecodeError) as info:
        decode(Ping, data)
    assert fragment in str(info.value)


def test_rejects_unknown_union_type_and_bad_tag():
    with pytest.raises(DecodeError, match="unknown Message type 9"):
        MESSAGES.decode(msgpack.packb([9, b"x"]))
    with pytest.raises(DecodeError, match="type tag must be an integer"):
        MESSAGES.decode(msgpack.packb(["1", b"x"]))


def test_rejects_non_canonical_encodings():
    ping = make_ping()
    wire = ping._to_wire()
    # nonce 7 as a uint64 instead of a positive fixint
    body = msgpack.packb(wire, use_bin_type=True)
    fixint = msgpack.packb(7)
    wide = b"\xcf" + (7).to_bytes(8, "big")
    data = body.replace(b"\xc4\x14" + b"\x01" * 20 + fixint, b"\xc4\x14" + b"\x01" * 20 + wide, 1)
    assert data != body
    with pytest.raises(DecodeError, match="non-canonical"):
        decode(Ping, data)
    # unsorted map keys
    unsorted = msgpack.packb([b"\x01" * 20, 7, b"", [], {"z": 1, "a": 2}, None, 0.1], use_bin_type=True)
    with pytest.raises(DecodeError, match="sorted order"):
        decode(Ping, unsorted)


def test_rejects_oversized_trailing_and_garbage():
    with pytest.raises(DecodeError, match="exceeds the limit of 4096"):
        decode(Ping, b"\x90" * 5000)
    good = encode(make_ping())
    with pytest.raises(DecodeError, match="trailing bytes"):
        decode(Ping, good + b"\x00")
    with pytest.raises(DecodeError, match="malformed MessagePack"):
        decode(Ping, good[:-3])
    with pytest.raises(DecodeError, match="expected bytes"):
        decode(Ping, "text")  # type: ignore[arg-type]


def test_rejects_nan_and_encode_checks_types():
    with pytest.raises(DecodeError, match="not finite"):
        decode(Ping, msgpack.packb([b"\x01" * 20, 7, b"", [], {"x": float("nan")}, None, 0.1], use_bin_type=True))
    with pytest.raises(EncodeError, match="Ping.nonce"):
        encode(make_ping(nonce=2**64))
    with pytest.raises(EncodeError, match="not a member of Message"):
        MESSAGES.encode(Inner("a", 1))


def test_union_members_need_distinct_ids():
    with pytest.raises(TypeError, match="TYPE_ID 1 used by"):
        RecordUnion("Bad", [Ping, _Dup])


@record
class _Dup(Record):
    TYPE_ID = 1
    x: U8


@given(
    nonce=st.integers(0, 2**64 - 1),
    payload=st.binary(max_size=64),
    items=st.lists(st.tuples(st.text(max_size=16), st.integers(0, 255)), max_size=4),
    params=st.dictionaries(
        st.text(min_size=1, max_size=64),
        st.one_of(st.integers(-(2**63), 2**63 - 1), st.booleans(), st.text(max_size=20),
                  st.floats(allow_nan=False, allow_infinity=False)),
        max_size=8,
    ),
    note=st.one_of(st.none(), st.text(max_size=10)),
    ratio=st.floats(0.0, 1.0),
)
def test_property_round_trip(nonce, payload, items, params, note, ratio):
    ping = make_ping(nonce=nonce, payload=payload, items=tuple(Inner(t, w) for t, w in items),
                     params=params, note=note, ratio=ratio)
    data = MESSAGES.encode(ping)
    back = MESSAGES.decode(data)
    assert MESSAGES.encode(back) == data
    assert back.params == tuple(sorted(params.items()))


@given(st.binary(max_size=200))
def test_property_random_bytes_never_crash(data):
    try:
        MESSAGES.decode(data)
    except DecodeError:
        pass



@record
class _Item(Record):
    n: U64


@record
class _Holder(Record):
    before: U64
    items: Annotated[tuple[_Item, ...], ListOf(Nested(_Item), 100_000)]
    after: Annotated[str, Text(20)]


def test_encode_with_encoded_list_is_the_canonical_encoding_for_any_length():
    # Lengths across MessagePack's array headers (fixarray up to 15, array16 up to 65,535, array32) and none.
    for count in (0, 1, 15, 16, 300, 65_536):
        items = tuple(_Item(i * 7919) for i in range(count))
        whole = _Holder(before=3, items=items, after="end")
        spliced = encode_with_encoded_list(_Holder(before=3, items=(), after="end"), "items",
                                           [encode(i) for i in items])
        assert spliced == encode(whole)
        assert decode(_Holder, spliced) == whole


def test_encode_with_encoded_list_refuses_a_non_list_field_a_full_list_and_too_many_items():
    with pytest.raises(EncodeError, match="not a list field"):
        encode_with_encoded_list(_Holder(1, (), "x"), "before", [])
    with pytest.raises(EncodeError, match="must be empty"):
        encode_with_encoded_list(_Holder(1, (_Item(1),), "x"), "items", [])
    with pytest.raises(EncodeError, match=r"expected 0..100000 items, got 100001"):
        encode_with_encoded_list(_Holder(1, (), "x"), "items", [b"\x01"] * 100_001)



def test_a_signed_transactions_remembered_hash_is_not_part_of_its_value_or_its_wire_form():
    from ledger.devtools import dev_account_key
    from ledger.transactions import SignedTransaction, Transfer
    from ledger.transition import sign_transaction

    key = dev_account_key("c0")
    stx = sign_transaction(key, b"\x07" * 32, Transfer(sender=key.address, nonce=1, fee=1, to=b"\x01" * 20, amount=5))
    before = encode(stx)
    first = stx.tx_hash()
    assert encode(stx) == before and stx.tx_hash() == first
    again = decode(SignedTransaction, before)
    assert again == stx and hash(again) == hash(stx) and again.tx_hash() == first
    assert "_tx_hash" not in [name for name, _ in SignedTransaction._fields_]
    assert "_tx_hash" not in repr(stx)
