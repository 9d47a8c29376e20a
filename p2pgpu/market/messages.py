"""Market gossip records and their topic validators.

Three records travel on two topics (``/p2pgpu/<chain>/task`` and
``/p2pgpu/<chain>/bid``), all members of one union, :data:`MARKET_MESSAGES`:

* :class:`SignedAnnounce` (task topic): the client's off-ledger
  :class:`TaskAnnounce` -- what a provider needs to decide and price a bid --
  signed under ``Domain.ANNOUNCE``.
* :class:`BidMessage` (bid topic): a chain id and the ledger's own
  :class:`~ledger.transactions.SignedBid`, byte for byte what ``Assign``
  later carries, so the client can forward the provider's signature
  unchanged.
* :class:`SignedDecline` (bid topic): a provider's :class:`DeclineNotice`
  saying why it will not bid, signed under its own ``Domain.DECLINE`` so
  no signature over one can ever verify as the other.

* :class:`SignedAdvert` (advert topic, ``/p2pgpu/<chain>/advert``): a
  provider's :class:`ModelAdvert` -- the models it holds warm, its free
  slots, its price per unit for each -- replacing its earlier ones (a higher
  ``sequence``); clients keep the latest per provider in an :class:`AdvertBook`.

A bid may carry a :class:`SignedBidStart` beside the ledger's bid: warm or
cold, and the seconds before the task's model is ready. It is signed by the
bid's own key over the bid's hash, so no relay can flip it. Adverts and
bid starts are signed under ``Domain.STATUS`` (a node's signed statement of
its own state), tagged by the :data:`PROVIDER_STATEMENTS` union so a
signature over one kind never verifies as the other.

Every record names its ``chain_id`` in the clear so a message for another
chain is refused as ``WrongChain`` before any signature work; the signature
covers the chain id again through its domain, so the field cannot be
forged into ours.

Validators (:func:`validate_task_message`, :func:`validate_bid_message`)
are pure: ``(chain_id, now_height, data, seen) -> record`` or a
:class:`~p2pgpu.market.errors.MarketMessageError` subclass naming the
reason. Checks run cheapest first -- size, decode (strict, canonical),
topic, chain, content, expiry, signature -- and only a message that passed
all of them is recorded in the :class:`SeenCache`, so nobody can block a
real message by first sending a forged one with the same key.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import math
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Annotated, NewType

from kernels.errors import KernelError
from kernels.spec import DEVICE_KINDS, JobSpec, Requirements, decode_spec, encode_spec, spec_hash
from kernels.tensors import check_dtype
from ledger.codec import (
    U8,
    U16,
    U32,
    U64,
    Address,
    Bytes,
    DecodeError,
    Float,
    Hash32,
    ListOf,
    Maybe,
    Nested,
    Record,
    RecordUnion,
    Text,
    encode,
    record,
)
from ledger.keys import AccountKey, address_of, verify_ed25519
from ledger.signing import Domain, signing_bytes
from ledger.state import Task
from ledger.transactions import Bid, PublicKey, Signature, SignedBid, TaskKind

from .errors import (
    AnnounceMismatch,
    BadSignature,
    Expired,
    InvalidContent,
    MalformedMessage,
    OversizedMessage,
    Replayed,
    SignerMismatch,
    SpecMismatch,
    TooFarAhead,
    WrongChain,
    WrongTopic,
)

__all__ = [
    "ADVERT_TOPIC",
    "MAX_ADVERT_MESSAGE_BYTES",
    "MAX_ADVERT_MODELS",
    "PROVIDER_STATEMENTS",
    "AdvertBook",
    "BidOffer",
    "BidStart",
    "ModelAdvert",
    "SignedAdvert",
    "SignedBidStart",
    "WarmModel",
    "bid_hash",
    "sign_advert",
    "sign_bid_start",
    "validate_advert_message",
    "validate_bid_offer",
    "BID_TOPIC",
    "DEFAULT_HORIZON_BLOCKS",
    "MARKET_MESSAGES",
    "MAX_BID_MESSAGE_BYTES",
    "MAX_INLINE_SPEC_BYTES",
    "MAX_TASK_MESSAGE_BYTES",
    "TASK_TOPIC",
    "BidMessage",
    "DeclineNotice",
    "DeclineReason",
    "SeenCache",
    "SignedAnnounce",
    "SignedDecline",
    "TaskAnnounce",
    "check_announce_matches_task",
    "compute_input_bytes",
    "decode_market_message",
    "encode_market_message",
    "encode_requirements",
    "make_announce",
    "message_id",
    "sign_announce",
    "sign_decline",
    "topic_name",
    "validate_bid_message",
    "validate_bid_record",
    "verify_bid",
    "VerifiedBid",
    "validate_market_message",
    "validate_task_message",
]

TASK_TOPIC = "task"
BID_TOPIC = "bid"
ADVERT_TOPIC = "advert"
MAX_ADVERT_MODELS = 256
MAX_ADVERT_MESSAGE_BYTES = 16 * 1024
MAX_STARTUP_SECONDS = 7 * 86400.0
MAX_INLINE_SPEC_BYTES = 12 * 1024
MAX_TASK_MESSAGE_BYTES = 16 * 1024
MAX_BID_MESSAGE_BYTES = 1024
DEFAULT_HORIZON_BLOCKS = 1_000  # = Params.max_bid_window: no honest expiry lies further ahead
MAX_PEER_ID_BYTES = 64


def topic_name(chain_id: bytes, topic: str) -> str:
    """``/p2pgpu/<chain id hex>/<topic>``: topics are scoped by chain (DESIGN section 4)."""
    return f"/p2pgpu/{chain_id.hex()}/{topic}"


class DeclineReason(enum.IntEnum):
    """Why a provider will not bid. Wire constants: never renumber."""

    UNSUPPORTED_KERNEL = 1
    REQUIRES_GPU = 2
    INSUFFICIENT_MEMORY = 3
    EXCEEDS_TIME_LIMIT = 4
    PRICE_BELOW_COST = 5
    BUSY = 6
    DEADLINE_TOO_SHORT = 7
    INVALID_SPEC = 8
    OUTPUT_TOO_LARGE = 9


# ---------------------------------------------------------------- records


@record
class TaskAnnounce(Record):
    """The spec summary a provider bids from, tied to the on-ledger task by ``task_id``.

    ``spec`` is the full canonical JobSpec encoding when it fits
    (``MAX_INLINE_SPEC_BYTES``); otherwise None and the provider fetches it by
    ``spec_hash`` from ``data_peer`` (the client's libp2p peer id). The
    summary fields duplicate the spec so an observer can filter without
    decoding it; the validator refuses an announce where they disagree.
    """

    chain_id: Hash32
    task_id: Hash32
    client: Address
    kind: U8
    spec_hash: Hash32
    kernel: Annotated[str, Text(64, min_len=1)]
    kernel_version: U16
    device: Annotated[str, Text(8, min_len=1)]
    memory_bytes: U64
    limit_seconds: Annotated[float, Float(0.001, 7 * 86400.0)]
    output_bytes: U64
    input_bytes: U64
    max_unit_price: U64
    units: U32
    exec_blocks: U32
    bid_deadline_height: U64
    data_peer: Annotated[bytes, Bytes(MAX_PEER_ID_BYTES, min_len=1)]
    spec: Annotated[bytes | None, Maybe(Bytes(MAX_INLINE_SPEC_BYTES))]


@record
class SignedAnnounce(Record):
    TYPE_ID = 1
    announce: TaskAnnounce
    public_key: PublicKey
    signature: Signature


@record
class BidStart(Record):
    """What a provider says about starting the bid's task: its model warm (loaded) or cold, and seconds to ready."""

    TYPE_ID = 2  # in PROVIDER_STATEMENTS
    bid_hash: Hash32
    """SHA-256 of the canonical :class:`~ledger.transactions.Bid` this start belongs to (:func:`bid_hash`)."""
    warm: bool
    startup_seconds: Annotated[float, Float(0.0, MAX_STARTUP_SECONDS)]


@record
class SignedBidStart(Record):
    """A :class:`BidStart` signed by the bid's own key (the ``SignedBid``'s ``public_key``)."""

    start: BidStart
    signature: Signature


@record
class BidMessage(Record):
    TYPE_ID = 2
    chain_id: Hash32
    signed: SignedBid
    start: Annotated[SignedBidStart | None, Maybe(Nested(SignedBidStart))] = None
    """Warm or cold (bids for tasks that name a model); None when the provider says nothing about it."""


@record
class DeclineNotice(Record):
    chain_id: Hash32
    task_id: Hash32
    provider: Address
    reason: U8
    detail: Annotated[str, Text(200)]
    expiry_height: U64


@record
class SignedDecline(Record):
    TYPE_ID = 3
    notice: DeclineNotice
    public_key: PublicKey
    signature: Signature


@record
class WarmModel(Record):
    """One model an advert says is loaded, and the provider's price per unit of work with it."""

    model_id: Hash32
    unit_price: U64


@record
class ModelAdvert(Record):
    """A provider's warm models, free slots and prices; a higher ``sequence`` replaces its earlier adverts."""

    TYPE_ID = 1  # in PROVIDER_STATEMENTS
    chain_id: Hash32
    provider: Address
    sequence: U64
    expiry_height: U64
    """Clients forget the advert after this height; a provider re-publishes before it."""
    free_slots: U16
    models: Annotated[tuple[WarmModel, ...], ListOf(Nested(WarmModel), MAX_ADVERT_MODELS)]
    """Sorted by model id, each once."""


@record
class SignedAdvert(Record):
    TYPE_ID = 4
    advert: ModelAdvert
    public_key: PublicKey
    signature: Signature


PROVIDER_STATEMENTS: RecordUnion[Record] = RecordUnion("ProviderStatement", [ModelAdvert, BidStart])
"""What a provider signs under ``Domain.STATUS``; the union's type tag keeps the kinds apart."""

MARKET_MESSAGES: RecordUnion[Record] = RecordUnion(
    "MarketMessage", [SignedAnnounce, BidMessage, SignedDecline, SignedAdvert], max_bytes=MAX_TASK_MESSAGE_BYTES
)

_TOPIC_LIMITS: dict[str, tuple[int, tuple[type[Record], ...]]] = {
    TASK_TOPIC: (MAX_TASK_MESSAGE_BYTES, (SignedAnnounce,)),
    BID_TOPIC: (MAX_BID_MESSAGE_BYTES, (BidMessage, SignedDecline)),
    ADVERT_TOPIC: (MAX_ADVERT_MESSAGE_BYTES, (SignedAdvert,)),
}


def encode_market_message(message: Record) -> bytes:
    return MARKET_MESSAGES.encode(message)


def decode_market_message(data: bytes) -> Record:
    """Decode any market record (no checks beyond the schema); raises MalformedMessage."""
    try:
        record: Record = MARKET_MESSAGES.decode(data)
        return record
    except DecodeError as exc:
        raise MalformedMessage(str(exc)) from exc


def message_id(data: bytes) -> bytes:
    """Content id, as the gossip layer computes it (SHA-256 of the payload)."""
    return hashlib.sha256(data).digest()


# ---------------------------------------------------------------- building and signing


def encode_requirements(req: Requirements) -> bytes:
    """What a client puts in ``PostTask.requirements``: the spec's Requirements record."""
    return encode(req)


def compute_input_bytes(spec: JobSpec) -> int:
    """Bytes of all input blobs the spec references (what the provider will download)."""
    total = 0
    for _, ref in spec.inputs:
        total += math.prod(ref.shape) * check_dtype(ref.dtype).itemsize
    return total


def make_announce(
    *,
    chain_id: bytes,
    task_id: bytes,
    client: bytes,
    kind: int,
    spec: JobSpec,
    max_unit_price: int,
    units: int,
    exec_blocks: int,
    bid_deadline_height: int,
    data_peer: bytes,
) -> TaskAnnounce:
    """An announce for ``spec``, inlining the spec when it fits."""
    spec_bytes = encode_spec(spec)
    return TaskAnnounce(
        chain_id=chain_id,
        task_id=task_id,
        client=client,
        kind=int(kind),
        spec_hash=spec_hash(spec),
        kernel=spec.kernel,
        kernel_version=spec.version,
        device=spec.requirements.device,
        memory_bytes=spec.requirements.memory_bytes,
        limit_seconds=spec.limits.seconds,
        output_bytes=spec.limits.output_bytes,
        input_bytes=compute_input_bytes(spec),
        max_unit_price=max_unit_price,
        units=units,
        exec_blocks=exec_blocks,
        bid_deadline_height=bid_deadline_height,
        data_peer=data_peer,
        spec=spec_bytes if len(spec_bytes) <= MAX_INLINE_SPEC_BYTES else None,
    )


def sign_announce(key: AccountKey, announce: TaskAnnounce) -> SignedAnnounce:
    sig = key.sign(signing_bytes(Domain.ANNOUNCE, announce.chain_id, encode(announce)))
    return SignedAnnounce(announce=announce, public_key=key.public_key, signature=sig)


def sign_decline(key: AccountKey, notice: DeclineNotice) -> SignedDecline:
    sig = key.sign(signing_bytes(Domain.DECLINE, notice.chain_id, encode(notice)))
    return SignedDecline(notice=notice, public_key=key.public_key, signature=sig)


def bid_hash(bid: Bid) -> bytes:
    """The hash a :class:`BidStart` names its bid by."""
    return hashlib.sha256(encode(bid)).digest()


def _statement_bytes(chain_id: bytes, statement: Record) -> bytes:
    return signing_bytes(Domain.STATUS, chain_id, PROVIDER_STATEMENTS.encode(statement))


def sign_bid_start(key: AccountKey, chain_id: bytes, bid: Bid, *, warm: bool, startup_seconds: float) -> SignedBidStart:
    """The warm/cold side of a bid, signed by the key that signs the bid."""
    start = BidStart(bid_hash=bid_hash(bid), warm=warm, startup_seconds=float(startup_seconds))
    return SignedBidStart(start=start, signature=key.sign(_statement_bytes(chain_id, start)))


def sign_advert(key: AccountKey, advert: ModelAdvert) -> SignedAdvert:
    return SignedAdvert(advert=advert, public_key=key.public_key,
                        signature=key.sign(_statement_bytes(advert.chain_id, advert)))


# ---------------------------------------------------------------- replay cache


class SeenCache:
    """Bounded memory of accepted messages, forgotten once their expiry height passes.

    Keys are message ids and semantic keys such as ``("bid", provider,
    task_id)``. Each entry lives until its message's expiry height: after
    that the expiry check refuses the message anyway, so remembering it
    would only cost memory. When full, the entry expiring soonest is
    dropped first; a replay of it would be accepted again, which roles
    tolerate because they dedupe by (task, provider) themselves.
    """

    def __init__(self, capacity: int = 65_536) -> None:
        if capacity < 1:
            raise ValueError("SeenCache capacity must be at least 1")
        self.capacity = capacity
        self._expiry: dict[Hashable, int] = {}
        self._heap: list[tuple[int, int, Hashable]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._expiry

    def add(self, key: Hashable, expiry_height: int) -> None:
        self._expiry[key] = expiry_height
        self._seq += 1
        heapq.heappush(self._heap, (expiry_height, self._seq, key))
        while len(self._expiry) > self.capacity:
            self._pop()

    def evict(self, now_height: int) -> None:
        """Forget every entry whose expiry height is below ``now_height``."""
        while self._heap and self._heap[0][0] < now_height:
            self._pop()

    def _pop(self) -> None:
        expiry, _, key = heapq.heappop(self._heap)
        if self._expiry.get(key) == expiry:
            del self._expiry[key]
        # else: a stale heap entry for a key re-added later; the dict holds the live one


# ---------------------------------------------------------------- validation


def _check_signature(chain_id: bytes, domain: Domain, payload: Record, signer: bytes, public_key: bytes,
                     signature: bytes, what: str) -> None:
    if address_of(public_key) != signer:
        raise SignerMismatch(f"{what}: public key does not belong to {signer.hex()}")
    if not verify_ed25519(public_key, signing_bytes(domain, chain_id, encode(payload)), signature):
        raise BadSignature(f"{what}: signature by {signer.hex()} does not verify on this chain")


def _check_window(now_height: int, expiry_height: int, horizon: int, what: str) -> None:
    if expiry_height < now_height:
        raise Expired(f"{what} expired at height {expiry_height} (now {now_height})")
    if expiry_height > now_height + horizon:
        raise TooFarAhead(f"{what} expiry {expiry_height} is more than {horizon} blocks after {now_height}")


def _check_announce_content(a: TaskAnnounce) -> None:
    if a.kind not in (TaskKind.BATCH, TaskKind.STREAM):
        raise InvalidContent(f"announce: unknown task kind {a.kind}")
    if a.units < 1 or (a.kind == TaskKind.BATCH and a.units != 1):
        raise InvalidContent(f"announce: {a.units} units for a {TaskKind(a.kind).name} task")
    if a.max_unit_price == 0:
        raise InvalidContent("announce: max_unit_price must be positive")
    if a.exec_blocks == 0:
        raise InvalidContent("announce: exec_blocks must be positive")
    if a.device not in DEVICE_KINDS:
        raise InvalidContent(f"announce: device {a.device!r} is not one of {DEVICE_KINDS}")
    if a.spec is None:
        return
    if hashlib.sha256(a.spec).digest() != a.spec_hash:
        raise SpecMismatch("announce: inline spec does not hash to spec_hash")
    try:
        spec = decode_spec(a.spec)
        input_bytes = compute_input_bytes(spec)
    except KernelError as exc:
        raise SpecMismatch(f"announce: inline spec is not a valid JobSpec: {exc}") from exc
    summary = {
        "kernel": (a.kernel, spec.kernel),
        "kernel_version": (a.kernel_version, spec.version),
        "device": (a.device, spec.requirements.device),
        "memory_bytes": (a.memory_bytes, spec.requirements.memory_bytes),
        "limit_seconds": (a.limit_seconds, spec.limits.seconds),
        "output_bytes": (a.output_bytes, spec.limits.output_bytes),
        "input_bytes": (a.input_bytes, input_bytes),
    }
    for name, (said, actual) in summary.items():
        if said != actual:
            raise SpecMismatch(f"announce: {name} is {said!r} but the inline spec says {actual!r}")


def _decode_for_topic(topic: str, data: bytes) -> Record:
    if topic not in _TOPIC_LIMITS:
        raise ValueError(f"unknown market topic {topic!r} (expected {TASK_TOPIC!r} or {BID_TOPIC!r})")
    limit, allowed = _TOPIC_LIMITS[topic]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"expected bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise OversizedMessage(f"{len(data)} bytes exceed the {topic} topic limit of {limit}")
    message = decode_market_message(bytes(data))
    if not isinstance(message, allowed):
        raise WrongTopic(f"{type(message).__name__} does not belong on the {topic} topic")
    return message


def validate_market_message(
    topic: str,
    chain_id: bytes,
    now_height: int,
    data: bytes,
    seen: SeenCache | None = None,
    *,
    horizon: int = DEFAULT_HORIZON_BLOCKS,
) -> Record:
    """Validate one gossip payload for ``topic`` (``"task"`` or ``"bid"``); return the record.

    Raises a :class:`~p2pgpu.market.errors.MarketMessageError` subclass
    naming the reason. ``seen`` (optional) makes replays fail and records
    accepted messages; it is updated only when everything passed.
    """
    if topic == ADVERT_TOPIC:
        raise ValueError("adverts replace each other by sequence: validate them with validate_advert_message")
    message = _decode_for_topic(topic, data)
    if isinstance(message, SignedAnnounce):
        a = message.announce
        chain, signer, expiry, what = a.chain_id, a.client, a.bid_deadline_height, "announce"
        task_id = a.task_id
        key: Hashable = ("announce", a.task_id, a.bid_deadline_height)  # a reopened task is announced again
    elif isinstance(message, BidMessage):
        b = message.signed.bid
        chain, signer, expiry, what = message.chain_id, b.provider, b.expiry_height, "bid"
        task_id = b.task_id
        key = ("bid", b.provider, b.task_id, b.expiry_height)
    else:
        assert isinstance(message, SignedDecline)
        n = message.notice
        chain, signer, expiry, what = n.chain_id, n.provider, n.expiry_height, "decline"
        task_id = n.task_id
        key = ("decline", n.provider, n.task_id, n.expiry_height)
    if chain != chain_id:
        raise WrongChain(f"{what} is for chain {chain.hex()[:16]}..., this is {chain_id.hex()[:16]}...")
    if isinstance(message, SignedAnnounce):
        _check_announce_content(message.announce)
    elif isinstance(message, BidMessage):
        if message.signed.bid.unit_price == 0:
            raise InvalidContent("bid: unit_price must be positive")
    else:
        if message.notice.reason not in DeclineReason._value2member_map_:
            raise InvalidContent(f"decline: unknown reason code {message.notice.reason}")
    _check_window(now_height, expiry, horizon, what)
    if isinstance(message, SignedAnnounce):
        _check_signature(chain_id, Domain.ANNOUNCE, message.announce, signer, message.public_key,
                         message.signature, what)
    elif isinstance(message, BidMessage):
        verify_bid(chain_id, message.signed)
        if message.start is not None:
            _check_bid_start(chain_id, message.signed, message.start)
    else:
        _check_signature(chain_id, Domain.DECLINE, message.notice, signer, message.public_key, message.signature, what)
    if seen is not None:
        seen.evict(now_height)
        mid = ("id", message_id(bytes(data)))
        if mid in seen:
            raise Replayed(f"{what} {mid[1].hex()[:16]}... was already delivered")
        if key in seen:
            raise Replayed(f"a {what} from {signer.hex()} for task {task_id.hex()[:16]}... (expiring at height "
                           f"{expiry}) was already accepted")
        seen.add(mid, expiry)
        seen.add(key, expiry)
    return message


VerifiedBid = NewType("VerifiedBid", SignedBid)
"""A bid whose provider's signature over it checked out on this chain (:func:`verify_bid`).

The bid topic's validator verifies each bid once and hands it on as this
type (:func:`validate_bid_record`); :class:`~p2pgpu.market.client.ClientTask`
takes only this type and never checks the signature again. (A type-checker
proof, not a runtime wrapper: at run time it is the ``SignedBid`` itself.)
"""


def verify_bid(chain_id: bytes, signed: SignedBid) -> VerifiedBid:
    """``signed``, once its key belongs to its provider and its signature verifies on ``chain_id``.

    Raises :class:`SignerMismatch` or :class:`BadSignature`. For bids that did
    not come through the bid topic's validator (a client's journal, read back
    after a restart).
    """
    _check_signature(chain_id, Domain.BID, signed.bid, signed.bid.provider, signed.public_key, signed.signature, "bid")
    return VerifiedBid(signed)


def _check_bid_start(chain_id: bytes, signed: SignedBid, start: SignedBidStart) -> None:
    if start.start.bid_hash != bid_hash(signed.bid):
        raise InvalidContent("bid start: names another bid")
    if not verify_ed25519(signed.public_key, _statement_bytes(chain_id, start.start), start.signature):
        raise BadSignature(f"bid start: signature by {signed.bid.provider.hex()} does not verify on this chain")


@dataclass(frozen=True, slots=True)
class BidOffer:
    """A verified bid and, when the provider said so, its verified warm/cold start."""

    signed: VerifiedBid
    start: BidStart | None


def validate_bid_offer(chain_id: bytes, now_height: int, data: bytes, seen: SeenCache | None = None,
                       *, horizon: int = DEFAULT_HORIZON_BLOCKS) -> BidOffer | SignedDecline:
    """:func:`validate_bid_record`, keeping the bid's verified start (warm or cold) beside it."""
    message = validate_bid_message(chain_id, now_height, data, seen, horizon=horizon)
    if isinstance(message, SignedDecline):
        return message
    return BidOffer(VerifiedBid(message.signed), None if message.start is None else message.start.start)


def validate_task_message(chain_id: bytes, now_height: int, data: bytes, seen: SeenCache | None = None,
                          *, horizon: int = DEFAULT_HORIZON_BLOCKS) -> SignedAnnounce:
    """Topic validator for ``/p2pgpu/<chain>/task``."""
    return validate_market_message(TASK_TOPIC, chain_id, now_height, data, seen, horizon=horizon)  # type: ignore[return-value]


def validate_bid_message(chain_id: bytes, now_height: int, data: bytes, seen: SeenCache | None = None,
                         *, horizon: int = DEFAULT_HORIZON_BLOCKS) -> BidMessage | SignedDecline:
    """Topic validator for ``/p2pgpu/<chain>/bid``."""
    return validate_market_message(BID_TOPIC, chain_id, now_height, data, seen, horizon=horizon)  # type: ignore[return-value]


def validate_bid_record(chain_id: bytes, now_height: int, data: bytes, seen: SeenCache | None = None,
                        *, horizon: int = DEFAULT_HORIZON_BLOCKS) -> VerifiedBid | SignedDecline:
    """:func:`validate_bid_message`, answering with what the client roles take: the verified bid, or the decline.

    The validator checked the bid's signature (as :func:`verify_bid` does);
    its verdict carries the result, so nothing downstream checks it again.
    """
    message = validate_bid_message(chain_id, now_height, data, seen, horizon=horizon)
    return VerifiedBid(message.signed) if isinstance(message, BidMessage) else message


# ---------------------------------------------------------------- adverts


class AdvertBook:
    """The latest advert of each provider, as a client keeps them; also the advert topic's replay guard.

    An advert replaces its provider's earlier one only with a higher
    ``sequence``, so a replayed or reordered old advert is refused as
    :class:`Replayed`. Expired adverts are forgotten on :meth:`evict`.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError("AdvertBook capacity must be at least 1")
        self.capacity = capacity
        self._latest: dict[bytes, ModelAdvert] = {}

    def __len__(self) -> int:
        return len(self._latest)

    def latest(self, provider: bytes) -> ModelAdvert | None:
        return self._latest.get(provider)

    def check_newer(self, advert: ModelAdvert) -> None:
        known = self._latest.get(advert.provider)
        if known is not None and advert.sequence <= known.sequence:
            raise Replayed(f"advert {advert.sequence} from {advert.provider.hex()} is not newer than "
                           f"{known.sequence}")

    def accept(self, advert: ModelAdvert) -> None:
        self.check_newer(advert)
        self._latest[advert.provider] = advert
        while len(self._latest) > self.capacity:  # the one expiring soonest goes first
            oldest = min(self._latest.values(), key=lambda a: (a.expiry_height, a.provider))
            del self._latest[oldest.provider]

    def evict(self, now_height: int) -> None:
        for provider in [p for p, a in self._latest.items() if a.expiry_height < now_height]:
            del self._latest[provider]

    def warm_providers(self, model_id: bytes, now_height: int) -> Iterator[tuple[bytes, WarmModel, int]]:
        """(provider, its entry, its free slots) for each live advert that holds ``model_id`` warm."""
        for provider, advert in self._latest.items():
            if advert.expiry_height < now_height:
                continue
            for entry in advert.models:
                if entry.model_id == model_id:
                    yield provider, entry, advert.free_slots


def _check_advert_content(advert: ModelAdvert) -> None:
    ids = [m.model_id for m in advert.models]
    if ids != sorted(set(ids)):
        raise InvalidContent("advert: models must be sorted by id, each once")
    if any(m.unit_price == 0 for m in advert.models):
        raise InvalidContent("advert: unit_price must be positive")


def validate_advert_message(chain_id: bytes, now_height: int, data: bytes, book: AdvertBook | None = None,
                            *, horizon: int = DEFAULT_HORIZON_BLOCKS,
                            precheck: Callable[[ModelAdvert], None] | None = None) -> SignedAdvert:
    """Topic validator for ``/p2pgpu/<chain>/advert``; on success the advert becomes ``book``'s latest.

    Cheapest checks first, as for the other topics: size, decode, topic,
    chain, content, window, newer than the provider's last, ``precheck``
    (the caller's own cheap checks, e.g. "a registered provider", "not too
    soon after its last"; it raises a :class:`MarketMessageError`), signature.
    """
    message = _decode_for_topic(ADVERT_TOPIC, data)
    assert isinstance(message, SignedAdvert)
    advert = message.advert
    if advert.chain_id != chain_id:
        raise WrongChain(f"advert is for chain {advert.chain_id.hex()[:16]}..., this is {chain_id.hex()[:16]}...")
    _check_advert_content(advert)
    _check_window(now_height, advert.expiry_height, horizon, "advert")
    if book is not None:
        book.evict(now_height)
        book.check_newer(advert)
    if precheck is not None:
        precheck(advert)
    if address_of(message.public_key) != advert.provider:
        raise SignerMismatch(f"advert: public key does not belong to {advert.provider.hex()}")
    if not verify_ed25519(message.public_key, _statement_bytes(chain_id, advert), message.signature):
        raise BadSignature(f"advert: signature by {advert.provider.hex()} does not verify on this chain")
    if book is not None:
        book.accept(advert)
    return message


# ---------------------------------------------------------------- announce vs ledger


def check_announce_matches_task(announce: TaskAnnounce, task: Task) -> None:
    """Raise :class:`AnnounceMismatch` unless the announce says what the on-ledger PostTask says.

    A provider bids only after this passes: the ledger, not the gossip, is
    what an ``Assign`` will be checked against.
    """
    pairs: list[tuple[str, object, object]] = [
        ("task_id", announce.task_id, task.task_id),
        ("client", announce.client, task.client),
        ("kind", announce.kind, task.kind),
        ("spec_hash", announce.spec_hash, task.spec_hash),
        ("max_unit_price", announce.max_unit_price, task.max_unit_price),
        ("units", announce.units, task.units),
        ("exec_blocks", announce.exec_blocks, task.exec_blocks),
        (
            "requirements",
            encode_requirements(Requirements(device=announce.device, memory_bytes=announce.memory_bytes)),
            task.requirements,
        ),
    ]
    if announce.bid_deadline_height > task.bid_deadline:
        # An announce made at submission names the earliest deadline the PostTask can get; later is fine.
        raise AnnounceMismatch("bid_deadline_height", f"announce says {announce.bid_deadline_height}, "
                                                      f"the ledger says {task.bid_deadline}")
    for name, said, actual in pairs:
        if said != actual:
            shown = (said.hex(), actual.hex()) if isinstance(said, bytes) and isinstance(actual, bytes) else (said, actual)
            raise AnnounceMismatch(name, f"announce says {shown[0]!r}, the ledger says {shown[1]!r}")
