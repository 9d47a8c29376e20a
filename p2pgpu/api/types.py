"""What the local API speaks: the node interface, its records, its errors and its wire forms.

This module has no I/O and imports neither the ASGI server nor httpx, so
the node (which implements :class:`NodeAPI`) and the CLI (which decodes the
answers) can import it cheaply.

Error tree (the node raises these; the server maps each to a status and a
JSON body ``{"error": code, "message": text}``; the client re-raises them)::

    ApiError                       base; ``status`` and ``code``
    ├── BadRequest          400    malformed body, bad hex address / id / height
    ├── Unauthorized        401    tokens are configured and none, or a wrong one, was sent
    ├── PaymentRequired     402    the balance cannot lock the task's escrow (code ``insufficient_funds``)
    ├── Forbidden           403    the token lacks the route's scope (code ``insufficient_scope``)
    ├── NotFound            404    unknown task, block, account or route
    ├── MethodNotAllowed    405
    ├── NotReady            409    task result asked for before delivery; a model name or id already registered
    ├── PayloadTooLarge     413    body over the API's limit (checked while reading)
    ├── UnsupportedMediaType 415   POST /tasks without application/msgpack
    ├── Unprocessable       422    well-formed but refused: invalid job spec or terms
    ├── TooManyRequests     429    over the token's spend_per_hour (code ``spend_limit``; Retry-After)
    ├── InternalError       500    a handler failed; logged, the server keeps serving
    └── Unavailable         503    the node cannot answer now (syncing, shutting down)
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

import msgpack
import numpy as np

from kernels.errors import SpecError
from kernels.spec import JobSpec, validate_inputs, validate_spec, validate_stream_items
from kernels.tensors import Tensor
from ledger.blocks import Block
from ledger.codec import U8, U16, U32, U64, DecodeError, EncodeError, Hash32, MapOf, Record, decode, encode, record
from ledger.modelnames import ModelRef, is_model_id_text, parse_model_ref
from ledger.transactions import TaskKind
from p2pgpu.intparse import U64_MAX, IntOutOfRange, parse_int

__all__ = [
    "ADDRESS_SIZE",
    "MAX_BATCH_TASKS",
    "AccountView",
    "ApiError",
    "BadRequest",
    "Forbidden",
    "BidView",
    "DisputeRequest",
    "HeadView",
    "Health",
    "HealthState",
    "InternalError",
    "MethodNotAllowed",
    "ModelProvidersView",
    "ModelPushView",
    "ModelView",
    "WarmProviderView",
    "NodeAPI",
    "NotFound",
    "NotReady",
    "PayloadTooLarge",
    "PaymentRequired",
    "ProviderView",
    "PushModelRequest",
    "SignatureView",
    "MAX_STREAM_ITEM_ELEMENTS",
    "STAGES",
    "STREAM_ITEMS_INPUT",
    "StageTime",
    "Status",
    "SubmitRequest",
    "SupplyView",
    "TaskResultWire",
    "TaskView",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
    "UnsupportedMediaType",
    "ValidatorView",
    "decode_result",
    "decode_submit",
    "decode_submit_batch",
    "encode_result",
    "encode_submit",
    "encode_submit_batch",
    "error_from_status",
    "parse_address",
    "parse_height",
    "parse_model_id",
    "parse_model_reference",
    "parse_task_id",
    "task_view_json",
    "to_jsonable",
]

MSGPACK: str = "application/msgpack"
ADDRESS_SIZE = 20
MAX_TENSORS = 64
STREAM_ITEMS_INPUT = "items"
"""A stream task's submit-time input holding its items, one per row; never part of the spec."""
MAX_STREAM_ITEM_ELEMENTS = 1 << 22
"""Largest item a ``/p2pgpu/stream/1`` frame carries (``p2pgpu.streams.MAX_ITEM_ELEMENTS``)."""
MAX_BATCH_TASKS = 1000
"""Most tasks one ``POST /tasks/batch`` carries. The body limit bounds the bytes; this bounds the answer,
the submissions one request keeps in flight, and the work a dropped connection can leave half done."""

HealthState = Literal["ready", "syncing", "down"]
TaskStage = Literal["posted", "bids", "assigned", "running", "delivered", "settled"]
STAGES: tuple[TaskStage, ...] = ("posted", "bids", "assigned", "running", "delivered", "settled")
TaskOutcomeName = Literal["paid", "fraud", "missed", "expired", "cancelled", "inputs_unavailable", "refused",
                          "unknown"]
OUTCOMES: tuple[TaskOutcomeName, ...] = ("paid", "fraud", "missed", "expired", "cancelled", "inputs_unavailable",
                                         "refused", "unknown")
"""``unknown``: a task the client recovered after a crash only once the ledger had pruned it (settled, but
the client never saw how)."""
"""``refused``: the PostTask never reached the ledger (nothing was escrowed); the detail says why."""


# ----------------------------------------------------------------- errors


class ApiError(Exception):
    """An answer other than success; ``code`` is stable for scripts, the message is for people."""

    status: ClassVar[int] = 400
    default_code: ClassVar[str] = "bad_request"

    def __init__(self, message: str, code: str | None = None) -> None:
        self.code = code or self.default_code
        self.message = message
        self.headers: tuple[tuple[str, str], ...] = ()
        """Extra response headers the status calls for (WWW-Authenticate, Retry-After)."""
        super().__init__(message)


class BadRequest(ApiError):
    status, default_code = 400, "bad_request"


class Unauthorized(ApiError):
    """No token, or one the node does not accept; ``challenge`` is the ``WWW-Authenticate`` value (RFC 6750)."""

    status, default_code = 401, "unauthorized"

    def __init__(self, message: str, code: str | None = None, *, challenge: str = 'Bearer realm="p2pgpu"') -> None:
        super().__init__(message, code)
        self.headers = (("www-authenticate", challenge),)


class Forbidden(ApiError):
    """A valid token without the scope the route needs."""

    status, default_code = 403, "forbidden"

    def __init__(self, message: str, code: str | None = None, *, challenge: str | None = None) -> None:
        super().__init__(message, code)
        self.headers = (("www-authenticate", challenge),) if challenge else ()


class PaymentRequired(ApiError):
    """The task is well-formed but the client's balance cannot escrow it: fixed by funding, not by editing it."""

    status, default_code = 402, "insufficient_funds"


class NotFound(ApiError):
    status, default_code = 404, "not_found"


class MethodNotAllowed(ApiError):
    status, default_code = 405, "method_not_allowed"


class NotReady(ApiError):
    status, default_code = 409, "not_ready"


class PayloadTooLarge(ApiError):
    status, default_code = 413, "body_too_large"


class UnsupportedMediaType(ApiError):
    status, default_code = 415, "wrong_content_type"


class Unprocessable(ApiError):
    status, default_code = 422, "unprocessable"


class TooManyRequests(ApiError):
    """Over a limit that frees up with time (a token's spending per hour); ``retry_after`` in seconds if it will."""

    status, default_code = 429, "too_many_requests"

    def __init__(self, message: str, code: str | None = None, *, retry_after: int | None = None) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after
        self.headers = (("retry-after", str(retry_after)),) if retry_after is not None else ()


class InternalError(ApiError):
    status, default_code = 500, "internal_error"


class Unavailable(ApiError):
    status, default_code = 503, "unavailable"


_BY_STATUS: dict[int, type[ApiError]] = {
    cls.status: cls
    for cls in (BadRequest, Unauthorized, PaymentRequired, Forbidden, NotFound, MethodNotAllowed, NotReady,
                PayloadTooLarge, UnsupportedMediaType, Unprocessable, TooManyRequests, InternalError, Unavailable)
}


def error_from_status(status: int, code: str, message: str) -> ApiError:
    """Rebuild the error a server answered with (client side)."""
    cls = _BY_STATUS.get(status, InternalError if status >= 500 else BadRequest)
    return cls(message, code)


# ----------------------------------------------------------------- records the node returns


@dataclass(frozen=True, slots=True)
class Health:
    state: HealthState
    head_height: int
    peers: int
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Status:
    peer_id: str
    address: bytes
    chain_id: bytes
    roles: tuple[str, ...]
    head_height: int
    head_hash: bytes
    peers: int
    listen_addrs: tuple[str, ...] = ()
    syncing: bool = False
    version: str = ""


@dataclass(frozen=True, slots=True)
class StageTime:
    """When a task reached a stage: the block height (ledger stages) and the node's wall clock."""

    height: int
    time_ms: int


@dataclass(frozen=True, slots=True)
class BidView:
    provider: bytes
    unit_price: int
    est_seconds: int
    expiry_height: int


@dataclass(frozen=True, slots=True)
class TaskView:
    task_id: bytes
    stage: TaskStage
    bids: tuple[BidView, ...] = ()
    provider: bytes | None = None
    unit_price: int | None = None
    outcome: TaskOutcomeName | None = None
    """Set once ``stage`` is ``settled``."""
    timings: tuple[tuple[TaskStage, StageTime], ...] = ()
    detail: str = ""
    model_id: bytes | None = None
    """The registered model the task runs (a task by model), else None."""
    royalty_per_unit: int = 0
    """The model's royalty the task escrowed per unit, paid to the model's owner when the work settles."""
    model_name: str | None = None
    """The registered model's name (with ``model_version``), when the registry holds it."""
    model_version: str | None = None
    start_warm: bool | None = None
    """The chosen provider's signed claim in its winning bid: True warm (model loaded), False cold; None unsaid."""
    startup_seconds: float | None = None
    """The chosen provider's estimate of the seconds before the model runs (0 when warm)."""
    royalty_paid: int = 0
    """Royalty the ledger paid the model's owner for this task: a batch's once settled PAID, a stream's per claim."""

    @classmethod
    def from_json(cls, obj: Any) -> TaskView:
        """Parse the JSON the API serves; raises :class:`BadRequest` naming a bad field (client side)."""
        try:
            if obj["stage"] not in STAGES:
                raise ValueError(f"stage {obj['stage']!r}")
            if obj.get("outcome") is not None and obj["outcome"] not in OUTCOMES:
                raise ValueError(f"outcome {obj['outcome']!r}")
            return cls(
                task_id=bytes.fromhex(obj["task_id"]),
                stage=obj["stage"],
                bids=tuple(
                    BidView(bytes.fromhex(b["provider"]), int(b["unit_price"]), int(b["est_seconds"]),
                            int(b["expiry_height"]))
                    for b in obj.get("bids", ())
                ),
                provider=bytes.fromhex(obj["provider"]) if obj.get("provider") else None,
                unit_price=obj.get("unit_price"),
                outcome=obj.get("outcome"),
                timings=tuple(
                    (stage, StageTime(int(t["height"]), int(t["time_ms"])))
                    for stage, t in (obj.get("timings") or {}).items()
                ),
                detail=str(obj.get("detail", "")),
                model_id=bytes.fromhex(obj["model_id"]) if obj.get("model_id") else None,
                royalty_per_unit=int(obj.get("royalty_per_unit", 0)),
                model_name=str(obj["model_name"]) if obj.get("model_name") is not None else None,
                model_version=str(obj["model_version"]) if obj.get("model_version") is not None else None,
                start_warm=bool(obj["start_warm"]) if obj.get("start_warm") is not None else None,
                startup_seconds=float(obj["startup_seconds"]) if obj.get("startup_seconds") is not None else None,
                royalty_paid=int(obj.get("royalty_paid", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadRequest(f"not a task view: {exc!r}", "bad_response") from None


@dataclass(frozen=True, slots=True)
class AccountView:
    address: bytes
    balance: int
    nonce: int


@dataclass(frozen=True, slots=True)
class ValidatorView:
    address: bytes
    bls_pubkey: bytes
    stake: int
    status: str
    jailed_until: int = 0
    in_committee: bool = False


@dataclass(frozen=True, slots=True)
class ProviderView:
    address: bytes
    bond: int
    completed: int
    failed: int
    missed: int
    capabilities: bytes = b""
    unavailable: int = 0


@dataclass(frozen=True, slots=True)
class HeadView:
    height: int
    block_hash: bytes
    state_root: bytes
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class SupplyView:
    """The ledger's books at ``height`` (see :mod:`ledger.books`), served at ``GET /ledger/supply``.

    Every bucket is given, not only the total, so a reader outside the node can
    add them up, compare ``genesis_supply`` with the genesis file and ``minted``
    with ``height`` x ``block_reward``, rather than take ``conserved`` on trust.
    """

    height: int
    balances: int
    escrow: int
    collateral: int
    dispute_bonds: int
    stake: int
    unbonding: int
    provider_bonds: int
    fee_pool: int
    burned: int
    minted: int
    genesis_supply: int
    total: int
    conserved: bool
    """``total == genesis_supply + minted``."""


@dataclass(frozen=True, slots=True)
class SignatureView:
    """A model's input or output: dtype and per-item shape (None: any size)."""

    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True, slots=True)
class ModelView:
    """A registered model (``GET /ledger/models``): the ledger's entry, and whether it is its name's latest."""

    model_id: bytes
    owner: bytes
    name: str
    version: str
    royalty_per_unit: int
    input: SignatureView
    output: SignatureView
    bundle_size: int
    registered_height: int
    latest: bool


@dataclass(frozen=True, slots=True)
class WarmProviderView:
    """A provider whose signed advert (``/advert`` gossip) says it holds a model warm, as this node heard it."""

    provider: bytes
    peer: str
    """Its libp2p peer id (its account key is its node's identity)."""
    free_slots: int
    unit_price: int
    """Its price per unit of work with this model (one item through it; a short task's bid adds overhead)."""
    advert_age_s: float
    """Seconds since its advert arrived here (providers re-publish every ~30 s)."""
    sequence: int
    expiry_height: int


@dataclass(frozen=True, slots=True)
class ModelProvidersView:
    """``GET /ledger/models/{ref}/providers``: the providers that say the model is warm, best first (a free slot,
    then the lower price, then the fresher advert)."""

    model_id: bytes
    height: int
    providers: tuple[WarmProviderView, ...]


ModelPushStatus = Literal["pending", "registered", "failed"]


@dataclass(frozen=True, slots=True)
class ModelPushView:
    """Where a model this node pushed stands: its ``RegisterModel`` pending, registered (final) at ``height``, or
    failed (``detail`` says why; nothing was registered, the fee was not paid)."""

    model_id: bytes
    name: str
    version: str
    royalty_per_unit: int
    status: ModelPushStatus
    height: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class PushModelRequest:
    """``POST /models``: a canonical model bundle (``kernels.bundle.encode_bundle``) and how to register it."""

    bundle: bytes
    name: str
    version: str = "1"
    royalty_per_unit: int = 0


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """A task to post: the spec, its input tensors, and the market terms.

    ``max_unit_price`` x ``units`` is what escrow locks (plus the audit fee);
    a batch task has ``units == 1``. A stream task's items travel in
    ``inputs[STREAM_ITEMS_INPUT]`` (one item per row, at most ``units``),
    beside the spec's inputs: they are streamed, not part of the job spec.
    """

    spec: JobSpec
    inputs: Mapping[str, np.ndarray]
    max_unit_price: int
    units: int = 1
    bid_window: int = 10
    audit_rate_bps: int = 1000
    kind: Literal["batch", "stream"] = "batch"


@dataclass(frozen=True, slots=True)
class DisputeRequest:
    """Body of ``POST /tasks/{id}/disputes`` (JSON): dispute one provider-signed output of a stream task.

    Parsed and checked by :func:`p2pgpu.api.models.parse_dispute_body` (pydantic, with the API's server)."""

    item: int
    reason: str = ""

    MAX_REASON: ClassVar[int] = 200


@runtime_checkable
class NodeAPI(Protocol):
    """What the HTTP API needs from a node. Each method may raise an :class:`ApiError`.

    Addresses are 20 raw bytes, task ids 32; the API parses hex before calling.
    """

    async def health(self) -> Health: ...

    async def status(self) -> Status: ...

    async def submit_task(self, request: SubmitRequest) -> bytes:
        """Post the task (escrow, announce) and return its id; raises Unprocessable if refused."""
        ...

    async def task(self, task_id: bytes) -> TaskView: ...

    async def task_result(self, task_id: bytes, wait: float = 0.0) -> Mapping[str, np.ndarray]:
        """The delivered output tensors; NotReady before delivery, NotFound for an unknown id.

        ``wait`` > 0: wait up to that many seconds for the result (a long poll) before answering NotReady;
        answers at once when the task ended without one."""
        ...

    async def dispute_stream_item(self, task_id: bytes, item: int, reason: str) -> None:
        """Dispute one provider-signed output of our stream task; NotFound / Unprocessable say why not."""
        ...

    async def task_cost(self, request: SubmitRequest) -> int:
        """The most posting ``request`` takes from the node's balance: its escrow (max unit price x units plus
        the chain's audit fee) and the transaction fee. What a token's ``spend_per_hour`` counts."""
        ...

    async def dispute_cost(self) -> int:
        """The most a dispute takes from the node's balance: the chain's dispute bond and the fee."""
        ...

    async def delete_result(self, task_id: bytes) -> None:
        """Forget a settled task and delete its kept result from the node's disk; NotReady while it is open."""
        ...

    async def balance(self, address: bytes) -> int: ...

    async def account(self, address: bytes) -> AccountView: ...

    async def validators(self) -> Sequence[ValidatorView]: ...

    async def providers(self) -> Sequence[ProviderView]: ...

    async def block(self, height: int) -> Block: ...

    async def head(self) -> HeadView: ...

    async def supply(self) -> SupplyView:
        """The books of the committed state: every bucket, the total, and whether it is conserved."""
        ...

    async def metrics(self) -> Sequence[Any]:
        """:class:`p2pgpu.metrics_text.MetricFamily` values, rendered at /metrics by ``prometheus_client``."""
        ...

    async def models(self) -> Sequence[ModelView]:
        """Every registered model, by name then version (registration order within a name)."""
        ...

    async def model(self, ref: ModelRef) -> ModelView:
        """One registered model, by id, name (its latest version) or name and version; NotFound ``unknown_model``."""
        ...

    async def model_providers(self, ref: ModelRef) -> ModelProvidersView:
        """The providers whose live advert says the model ``ref`` names is warm, best first; NotFound
        ``unknown_model``, Unavailable ``no_market`` on a node that does not follow the market's gossip."""

    def resolve_model(self, ref: ModelRef) -> bytes:
        """The id of the model ``ref`` names on this node's ledger (NotFound ``unknown_model``).

        Synchronous and read-only: ``POST /tasks`` calls it from the worker
        thread that decodes the submission (the ledger state it reads is
        replaced whole at each block, never changed in place).
        """
        ...

    async def push_model(self, request: PushModelRequest) -> ModelPushView:
        """Check the bundle and the registration, keep the bundle as a public pinned blob, send ``RegisterModel``.

        Refused before anything is signed: a bundle that does not decode
        (Unprocessable ``bad_bundle``), a bad name (BadRequest ``bad_model_name``),
        a name, version or id already registered (NotReady ``name_taken``,
        ``version_taken``, ``model_registered``), a royalty over the chain's
        maximum (Unprocessable ``royalty_too_high``), too little balance for the
        fees (PaymentRequired)."""
        ...

    async def model_push(self, model_id: bytes) -> ModelPushView:
        """Where this node's push of ``model_id`` stands; NotFound if it pushed none and none is registered."""
        ...

    async def model_registration_cost(self) -> int:
        """The most a push takes from the node's balance: the registration fee and the transaction fee."""
        ...


# ----------------------------------------------------------------- wire forms


@record
class SubmitTaskWire(Record):
    """Body of ``POST /tasks`` (application/msgpack): tensors travel as the kernels' ext type."""

    MAX_BYTES = 1 << 40  # the API's own body limit is the real bound, checked while reading
    spec: JobSpec
    inputs: Annotated[tuple[tuple[str, np.ndarray], ...], MapOf(Tensor(), MAX_TENSORS)]
    max_unit_price: U64
    units: U32
    bid_window: U32
    audit_rate_bps: U16
    kind: U8


@record
class TaskResultWire(Record):
    """Body of ``GET /tasks/{id}/result``."""

    MAX_BYTES = 1 << 40
    task_id: Hash32
    outputs: Annotated[tuple[tuple[str, np.ndarray], ...], MapOf(Tensor(), MAX_TENSORS)]


_KIND_CODE = {"batch": TaskKind.BATCH, "stream": TaskKind.STREAM}
_KIND_NAME = {int(v): k for k, v in _KIND_CODE.items()}


def encode_submit(req: SubmitRequest) -> bytes:
    """The msgpack body for a submission; raises :class:`Unprocessable` for a value that cannot go on the wire."""
    try:
        return encode(SubmitTaskWire(
            spec=req.spec,
            inputs=tuple(sorted(req.inputs.items())),
            max_unit_price=req.max_unit_price,
            units=req.units,
            bid_window=req.bid_window,
            audit_rate_bps=req.audit_rate_bps,
            kind=int(_KIND_CODE[req.kind]),
        ))
    except (EncodeError, KeyError) as exc:
        raise Unprocessable(f"cannot encode the submission: {exc}", "bad_submission") from None


BY_NAME_KERNELS = frozenset({"keras_infer", "stream_infer"})
"""Kernels whose ``model_id`` param may name a registered model (``kernels.bymodel.BY_MODEL_KERNELS``)."""


def resolve_model_name(spec: JobSpec, resolve: Callable[[ModelRef], bytes] | None) -> JobSpec:
    """``spec`` with a ``model_id`` param of ``NAME`` or ``NAME@VERSION`` replaced by the model's id.

    A raw ``POST /tasks`` may name its model as the CLI does: the client's
    node resolves the name on its ledger (``resolve``) before anything is
    hashed, reserved or posted, so the task (and every bid) commits to the
    id. A spec that names an id, or no model, is returned as it is.
    ``Unprocessable`` (``bad_model_ref``) for a reference that is neither an
    id nor a valid name; ``NotFound`` (``unknown_model``) from ``resolve``.
    """
    value = dict(spec.params).get("model_id") if spec.kernel in BY_NAME_KERNELS else None
    if not isinstance(value, str) or not value or is_model_id_text(value):
        return spec
    try:
        ref = parse_model_ref(value)
    except ValueError as exc:
        raise Unprocessable(f"param 'model_id': {exc}", "bad_model_ref") from None
    if resolve is None:
        raise Unprocessable(f"param 'model_id': {value!r} names a model; this endpoint takes its id", "bad_model_ref")
    model = resolve(ref)
    params = tuple(sorted((k, model.hex() if k == "model_id" else v) for k, v in spec.params))
    return dataclasses.replace(spec, params=params)


def decode_submit(body: bytes, resolve_model: Callable[[ModelRef], bytes] | None = None) -> SubmitRequest:
    """Parse and check a submission; malformed bytes are BadRequest, a bad job Unprocessable.

    ``resolve_model`` turns a model named by ``NAME[@VERSION]`` in the spec's
    ``model_id`` param into its id (:func:`resolve_model_name`); without it
    only ids are taken.
    """
    try:
        wire = decode(SubmitTaskWire, body)
    except DecodeError as exc:
        raise BadRequest(f"malformed submission: {exc}", "malformed_body") from None
    spec = resolve_model_name(wire.spec, resolve_model)
    if spec is not wire.spec:
        wire = dataclasses.replace(wire, spec=spec)
    if wire.kind not in _KIND_NAME:
        raise BadRequest(f"SubmitTaskWire.kind: {wire.kind} is not 1 (batch) or 2 (stream)", "malformed_body")
    if wire.units < 1:
        raise Unprocessable("units must be at least 1", "invalid_terms")
    if wire.kind == int(TaskKind.BATCH) and wire.units != 1:
        raise Unprocessable(f"units {wire.units}: a batch task has exactly 1 unit (units count a stream's items)",
                            "invalid_terms")
    if wire.bid_window < 1:
        raise Unprocessable("bid_window must be at least 1 block", "invalid_terms")
    if wire.audit_rate_bps > 10_000:
        raise Unprocessable(f"audit_rate_bps {wire.audit_rate_bps} exceeds 10000 (100%)", "invalid_terms")
    if wire.max_unit_price < 1:
        raise Unprocessable("max_unit_price must be at least 1", "invalid_terms")
    inputs = dict(wire.inputs)
    # A stream task's items are not inputs of its spec (the model is): they go to the provider one by one.
    items = inputs.pop(STREAM_ITEMS_INPUT, None) if wire.kind == TaskKind.STREAM else None
    try:
        validate_spec(wire.spec)
        inputs = validate_inputs(wire.spec, inputs)
    except SpecError as exc:
        raise Unprocessable(f"invalid job spec: {type(exc).__name__}: {exc}", "invalid_spec") from None
    if wire.kind == TaskKind.STREAM:
        if items is None:
            raise Unprocessable(f"a stream task needs its items: an input named {STREAM_ITEMS_INPUT!r} holding one "
                                "item per row", "invalid_items")
        try:
            inputs[STREAM_ITEMS_INPUT] = validate_stream_items(wire.spec, inputs, items, max_items=wire.units,
                                                               max_item_elements=MAX_STREAM_ITEM_ELEMENTS)
        except SpecError as exc:
            raise Unprocessable(f"invalid stream items: {type(exc).__name__}: {exc}", "invalid_items") from None
    return SubmitRequest(
        spec=wire.spec,
        inputs=inputs,
        max_unit_price=wire.max_unit_price,
        units=wire.units,
        bid_window=wire.bid_window,
        audit_rate_bps=wire.audit_rate_bps,
        kind=_KIND_NAME[wire.kind],  # type: ignore[arg-type]
    )


def encode_submit_batch(bodies: Sequence[bytes]) -> bytes:
    """The body of ``POST /tasks/batch``: ``{"tasks": [body, ...]}``, each body exactly what ``POST /tasks`` takes.

    Each task travels as a msgpack ``bin`` holding its own encoded
    :class:`SubmitTaskWire` rather than as an inline array: the node then
    decodes every task on its own with :func:`decode_submit` (same strict,
    canonical checks and the same error words as a single submission), so
    bytes garbled inside one task spoil that task only. It costs a few bytes
    of framing per task.
    """
    return msgpack.packb({"tasks": [bytes(b) for b in bodies]}, use_bin_type=True)


def decode_submit_batch(body: bytes) -> list[bytes | ApiError]:
    """The envelope of a batch: one submission body per task, or the error that task's slot already has.

    Only the envelope can fail the whole request (:class:`BadRequest`:
    ``malformed_body``, ``empty_batch``, ``too_many_tasks``). The count is
    read from the array header and refused before any task is unpacked. A
    slot that is not a ``bin`` becomes a ``malformed_body`` error for that
    index alone; the tasks themselves are decoded later, one by one.
    """
    shape = 'a batch is a msgpack map {"tasks": [bin, ...]}, each bin the body of one POST /tasks'
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(len(body), 1))
    unpacker.feed(body)
    try:
        if unpacker.read_map_header() != 1 or unpacker.unpack() != "tasks":
            raise ValueError("not that shape")
        count = unpacker.read_array_header()
    except (ValueError, msgpack.UnpackException, TypeError):  # OutOfData included: an empty or cut body
        raise BadRequest(f"malformed batch: {shape}", "malformed_body") from None
    if count == 0:
        raise BadRequest("empty batch: no tasks to submit", "empty_batch")
    if count > MAX_BATCH_TASKS:
        raise BadRequest(f"{count} tasks in one batch; at most {MAX_BATCH_TASKS} (split the rest into "
                         "further requests)", "too_many_tasks")
    try:
        slots = [unpacker.unpack() for _ in range(count)]
    except msgpack.OutOfData:
        raise BadRequest(f"malformed batch: the body ends inside the tasks list; {shape}", "malformed_body") from None
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise BadRequest(f"malformed batch: malformed MessagePack in the tasks list ({exc or type(exc).__name__})",
                         "malformed_body") from None
    if unpacker.tell() != len(body):
        raise BadRequest("malformed batch: trailing bytes after the envelope", "malformed_body")
    return [
        slot if isinstance(slot, bytes) else
        BadRequest(f"tasks[{i}]: expected the bytes of one POST /tasks body (msgpack bin), got "
                   f"{type(slot).__name__}", "malformed_body")
        for i, slot in enumerate(slots)
    ]


def encode_result(task_id: bytes, outputs: Mapping[str, np.ndarray]) -> bytes:
    return encode(TaskResultWire(task_id=task_id, outputs=tuple(sorted(outputs.items()))))


def decode_result(body: bytes) -> TaskResultWire:
    try:
        return decode(TaskResultWire, body)
    except DecodeError as exc:
        raise BadRequest(f"malformed result: {exc}", "bad_response") from None


# ----------------------------------------------------------------- parsing path parts

_HEX = re.compile(r"(?:0x)?([0-9a-fA-F]*)")


def _parse_hex(text: str, size: int, what: str, code: str) -> bytes:
    m = _HEX.fullmatch(text)
    if m is None or len(m.group(1)) % 2:
        raise BadRequest(f"{what} {text!r} is not hex", code)
    raw = bytes.fromhex(m.group(1))
    if len(raw) != size:
        raise BadRequest(f"{what} {text!r} is {len(raw)} bytes; expected {size} ({2 * size} hex digits)", code)
    return raw


def parse_address(text: str) -> bytes:
    return _parse_hex(text, ADDRESS_SIZE, "address", "bad_address")


MAX_RESULT_WAIT_S = 60.0


def parse_wait(query: Mapping[str, str]) -> float:
    """The ``wait`` query parameter of a long poll: seconds in 0..MAX_RESULT_WAIT_S (ASCII digits, one dot)."""
    raw = query.get("wait")
    if raw is None:
        return 0.0
    if not raw or not raw.isascii() or not re.fullmatch(r"[0-9]+(\.[0-9]+)?", raw):
        raise BadRequest(f"wait={raw!r}: expected seconds as a number, e.g. wait=30", "bad_wait")
    value = float(raw)
    if value > MAX_RESULT_WAIT_S:
        raise BadRequest(f"wait={raw}: at most {MAX_RESULT_WAIT_S:g} seconds", "bad_wait")
    return value


def parse_task_id(text: str) -> bytes:
    return _parse_hex(text, 32, "task id", "bad_task_id")


def parse_model_id(text: str) -> bytes:
    return _parse_hex(text, 32, "model id", "bad_model_id")


def parse_model_reference(text: str) -> ModelRef:
    """``ID``, ``NAME`` or ``NAME@VERSION`` (:func:`ledger.modelnames.parse_model_ref`); BadRequest ``bad_model_ref``."""
    try:
        return parse_model_ref(text)
    except ValueError as exc:
        raise BadRequest(str(exc), "bad_model_ref") from None


def parse_height(text: str) -> int:
    try:
        return parse_int(text, 0, U64_MAX, "height")
    except IntOutOfRange as exc:
        raise BadRequest(str(exc), "bad_height") from None


# ----------------------------------------------------------------- JSON


def to_jsonable(value: Any) -> Any:
    """Records and views as JSON values: bytes as hex, enums by name, tagged records with their type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, enum.Enum):
            return value.name.lower()
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        if isinstance(value, Record) and value.TYPE_ID >= 0:
            out["type"] = type(value).__name__
        for f in dataclasses.fields(value):
            if f.init:  # not a record's memo of itself (SignedTransaction's hash)
                out[f.name] = to_jsonable(getattr(value, f.name))
        return out
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        raise TypeError("tensors do not go into JSON; use the msgpack endpoints")
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot render {type(value).__name__} as JSON")


def task_view_json(view: TaskView) -> dict[str, Any]:
    """A task view for the wire: timings keyed by stage, so scripts can read ``timings.delivered``."""
    out = to_jsonable(dataclasses.replace(view, timings=()))
    out["timings"] = {stage: to_jsonable(t) for stage, t in view.timings}
    return out
