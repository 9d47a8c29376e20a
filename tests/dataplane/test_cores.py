"""The ``/p2pgpu/data/1`` protocol cores without a network: request and reply bytes in, verdicts out.

Every way a peer can break the exchange -- an undecodable or truncated frame,
a status we do not know, a reply that does not fit the request, a body
longer or shorter than announced -- is refused with a typed error naming it.
"""

from __future__ import annotations

import msgpack
import pytest

from ledger.codec import decode, encode
from ledger.keys import AccountKey
from p2pgpu.dataplane import (
    BadRequest,
    DataPlaneError,
    DataProtocolError,
    DataReply,
    DataRequest,
    IntegrityError,
    NotEntitled,
    NotFound,
    Oversized,
    SealedAsk,
    SizeOverrun,
    Status,
)
from p2pgpu.dataplane.client_core import BodyReceiver, read_reply
from p2pgpu.dataplane.server_core import Admission, admit, decode_request, denial_reply, ok_reply
from p2pgpu.net import PeerUnreachable, ProtocolError
from p2pgpu.sealed import SealedHeader
from p2pgpu.sealedstore import SealedRef

CLIENT = AccountKey.from_seed(b"\x41" * 32)
BLOB, BODY, CONTEXT = b"\x0b" * 32, b"\x0c" * 32, b"\x0d" * 32
HEADER = SealedHeader(version=1, content_hash=BODY, recipients=())
PUBLIC = DataRequest(BLOB, 0, 1000, CLIENT.address)
SEALED = DataRequest(BLOB, 0, 1000, CLIENT.address, SealedAsk(CONTEXT, b"\x0e" * 32))


# -- server: the request ------------------------------------------------------------------------


@pytest.mark.parametrize("raw, words", [
    (b"\xc1", "malformed MessagePack"),
    (encode(PUBLIC)[:-2], "incomplete input"),
    (msgpack.packb([BLOB, 0]), "missing field"),
    (msgpack.packb([BLOB[:31], 0, 1, CLIENT.address, None]), "DataRequest.blob_hash"),
])
def test_an_undecodable_request_is_a_bad_request_naming_the_peer_and_the_problem(raw: bytes, words: str) -> None:
    with pytest.raises(BadRequest, match=words) as info:
        decode_request(raw, "peer-x")
    assert "/p2pgpu/data/1 request from peer-x" in str(info.value)
    assert isinstance(info.value, ProtocolError)  # the network layer answers it with an ERROR frame


def test_a_request_round_trips() -> None:
    assert decode_request(encode(SEALED), "p") == SEALED


def no_lookup(*args: object) -> None:
    raise AssertionError("the store was consulted before the peer was found entitled")


def decide(request: DataRequest, *, address: bytes | None = CLIENT.address, entitled: bool = True,
           ref: SealedRef | None = None, size: int | None = 500, max_serve: int = 10_000) -> Admission:
    return admit(request, address, entitled=lambda a: entitled, lookup_sealed=lambda name, cid: ref,
                 size_of=lambda h: size, max_serve_bytes=max_serve)


def test_identity_and_entitlement_are_checked_before_the_store_is_consulted() -> None:
    for address in (None, b"\x00" * 20):
        verdict = admit(PUBLIC, address, entitled=no_lookup, lookup_sealed=no_lookup, size_of=no_lookup,
                        max_serve_bytes=1)
        assert verdict.status is Status.IDENTITY_MISMATCH
    verdict = admit(SEALED, CLIENT.address, entitled=lambda a: False, lookup_sealed=no_lookup, size_of=no_lookup,
                    max_serve_bytes=1)
    assert verdict.status is Status.NOT_ENTITLED


def test_each_refusal_status_and_an_admission() -> None:
    ref = SealedRef(BLOB, CONTEXT, HEADER)
    assert decide(PUBLIC, size=None).status is Status.NOT_FOUND
    assert decide(SEALED, ref=None).status is Status.NOT_FOUND
    assert decide(PUBLIC, size=1001) == Admission(Status.TOO_LARGE, 1001)
    assert decide(PUBLIC, size=600, max_serve=599) == Admission(Status.TOO_LARGE, 600)
    assert decide(DataRequest(BLOB, 501, 1000, CLIENT.address), size=500) == Admission(Status.BAD_RANGE, 500)
    assert decide(DataRequest(BLOB, 20, 1000, CLIENT.address)) == Admission(Status.OK, 500, 20, BLOB)
    assert decide(SEALED, ref=ref) == Admission(Status.OK, 500, 0, BODY, ref)


def test_a_denial_tells_the_size_only_when_the_blob_is_too_large() -> None:
    request = DataRequest(BLOB, 7, 1000, CLIENT.address)
    assert read_status(denial_reply(request, Status.TOO_LARGE, 2000)) == (Status.TOO_LARGE, 2000, 7)
    assert read_status(denial_reply(request, Status.NOT_ENTITLED, 2000)) == (Status.NOT_ENTITLED, 0, 7)
    with pytest.raises(ValueError):
        denial_reply(request, Status.OK)


def read_status(raw: bytes) -> tuple[Status, int, int]:
    reply = decode(DataReply, raw)
    return Status(reply.status), reply.size, reply.offset


# -- client: the reply ----------------------------------------------------------------------------


def reply(status: Status = Status.OK, size: int = 500, offset: int = 0, header: SealedHeader | None = None) -> bytes:
    return encode(DataReply(status, size, offset, header))


def test_a_good_reply_is_taken() -> None:
    assert read_reply(PUBLIC, reply(), "p") == DataReply(Status.OK, 500, 0)
    assert read_reply(SEALED, ok_reply(SEALED, Admission(Status.OK, 500, 0, BODY), HEADER), "p").header == HEADER


@pytest.mark.parametrize("request_, raw, error, words", [
    (PUBLIC, None, DataProtocolError, "ended /p2pgpu/data/1 without a reply"),
    (PUBLIC, b"\xc1", DataProtocolError, "bad /p2pgpu/data/1 reply: malformed MessagePack"),
    (PUBLIC, reply()[:-1], DataProtocolError, "incomplete input"),
    (PUBLIC, msgpack.packb([99, 0, 0, None]), DataProtocolError, "99 is not a valid Status"),
    (PUBLIC, reply(Status.NOT_ENTITLED), NotEntitled, "not entitled"),
    (PUBLIC, reply(Status.IDENTITY_MISMATCH), NotEntitled, "does not match our account address"),
    (PUBLIC, reply(Status.NOT_FOUND), NotFound, r"\(not_found\)"),
    (PUBLIC, reply(Status.UNAVAILABLE), NotFound, r"\(unavailable\)"),
    (PUBLIC, reply(Status.TOO_LARGE, 5000), Oversized, "of 5000 bytes: over our max_bytes 1000"),
    (PUBLIC, reply(Status.BAD_KEY), DataPlaneError, "cannot wrap blob"),
    (PUBLIC, reply(Status.BAD_RANGE), DataProtocolError, "offset 0 is outside blob"),
    (PUBLIC, reply(offset=5), DataProtocolError, "answered offset 5 / size 500 to a request from 0"),
    (DataRequest(BLOB, 600, 1000, CLIENT.address), reply(offset=600), DataProtocolError, "size 500"),
    (PUBLIC, reply(size=1001), DataProtocolError, "announced 1001 bytes"),
    (SEALED, reply(), DataProtocolError, "without a key wrap"),
    (PUBLIC, reply(header=HEADER), DataProtocolError, "sent a key wrap with public blob"),
])
def test_a_bad_reply_is_refused_with_the_error_naming_it(request_: DataRequest, raw: bytes | None,
                                                        error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words) as info:
        read_reply(request_, raw, "peer-y")
    assert "peer-y" in str(info.value)


# -- client: the body -----------------------------------------------------------------------------


def test_the_body_is_counted_against_the_announced_size_and_flushed_every_so_often() -> None:
    body = BodyReceiver(peer="p", blob_hash=BLOB, size=100, received=10, flush_every=40)
    assert [body.receive_chunk(n) for n in (30, 5, 5, 30, 20)] == [False, False, True, False, True]
    assert body.received == 100
    body.receive_end()


def test_a_body_longer_than_announced_is_an_integrity_failure() -> None:
    body = BodyReceiver(peer="p", blob_hash=BLOB, size=100, received=90, flush_every=1000)
    with pytest.raises(SizeOverrun, match="sent more than the 100 bytes it announced") as info:
        body.receive_chunk(11)
    assert isinstance(info.value, IntegrityError) and body.received == 90


def test_a_body_shorter_than_announced_is_a_truncated_transfer() -> None:
    body = BodyReceiver(peer="p", blob_hash=BLOB, size=100, received=0, flush_every=1000)
    body.receive_chunk(60)
    with pytest.raises(PeerUnreachable, match="ended the transfer at 60 of 100 bytes"):
        body.receive_end()
