"""The JSON the API takes and gives, as pydantic models, and its path and query parameters as validated types.

Every field of a request is checked here, before a handler runs: a path
part, a query parameter or a JSON body that does not fit answers 400 with
the project's ``{"error": code, "message": text}`` (see
:func:`validation_error`), never a 500 from a handler that trusted it. The
parameters reuse the parsers of :mod:`p2pgpu.api.types`, so their error
codes and messages are the ones the API always gave. Response models list
every field of every answer (``extra="forbid"``): an answer that does not
match its model is a bug and fails loudly, and ``/openapi.json`` describes
exactly what is sent.

Bodies in msgpack (``POST /tasks``, ``/tasks/batch``, a task's result) are
described by their :mod:`ledger.codec` records, which check them as
strictly; the schema only names their media type.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Final, Literal, TypeVar, get_args, get_type_hints

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, create_model, PlainValidator, StrictInt, StrictStr, ValidationError, WithJsonSchema
from pydantic_core import PydanticCustomError

from p2pgpu.api.types import (
    ADDRESS_SIZE,
    MAX_RESULT_WAIT_S,
    OUTCOMES,
    STAGES,
    ApiError,
    BadRequest,
    DisputeRequest,
    SupplyView,
    parse_address,
    parse_height,
    parse_model_id,
    parse_task_id,
    parse_wait,
)

__all__ = [
    "AccountOut",
    "AddressParam",
    "BalanceOut",
    "BatchOut",
    "BlockOut",
    "DeletedOut",
    "DisputeAcceptedOut",
    "DisputeIn",
    "ErrorOut",
    "GatewayModelOut",
    "GatewayStatusOut",
    "HeadOut",
    "HealthOut",
    "HeightParam",
    "ModelIdParam",
    "ModelOut",
    "ModelProvidersOut",
    "ModelPushOut",
    "ModelsOut",
    "ProvidersOut",
    "StatusOut",
    "SubmittedOut",
    "SupplyOut",
    "TaskIdParam",
    "TaskViewOut",
    "ValidatorsOut",
    "WaitParam",
    "parse_dispute_body",
    "validation_error",
]

T = TypeVar("T")

# ----------------------------------------------------------------- parameters


def _from_parser(parse: Callable[[str], T]) -> Callable[[Any], T]:
    """A pydantic validator running one of the API's parsers; its :class:`ApiError` becomes a validation error.

    The error's code travels as the pydantic error type and its message as
    the message, so :func:`validation_error` gives back exactly the error
    the parser raised.
    """

    def validate(value: Any) -> T:
        if not isinstance(value, str):  # FastAPI hands path and query values over as text
            raise PydanticCustomError("bad_request", "{message}", {"message": f"expected text, got {value!r}"})
        try:
            return parse(value)
        except ApiError as exc:
            raise PydanticCustomError(exc.code, "{message}", {"message": exc.message}) from None

    return validate


def _hex_schema(size: int, what: str) -> dict[str, Any]:
    return {"type": "string", "pattern": f"^(0x)?[0-9a-fA-F]{{{2 * size}}}$", "description": f"{what}, hex"}


TaskIdParam = Annotated[bytes, PlainValidator(_from_parser(parse_task_id)), WithJsonSchema(_hex_schema(32, "task id"))]
AddressParam = Annotated[bytes, PlainValidator(_from_parser(parse_address)),
                         WithJsonSchema(_hex_schema(ADDRESS_SIZE, "account address"))]
HeightParam = Annotated[int, PlainValidator(_from_parser(parse_height)),
                        WithJsonSchema({"type": "string", "pattern": "^[0-9]{1,20}$", "description": "block height"})]
ModelIdParam = Annotated[bytes, PlainValidator(_from_parser(parse_model_id)),
                         WithJsonSchema(_hex_schema(32, "model id"))]
WaitParam = Annotated[float, PlainValidator(_from_parser(lambda raw: parse_wait({"wait": raw}))),
                      WithJsonSchema({"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$",
                                      "description": f"seconds to wait for the result, at most {MAX_RESULT_WAIT_S:g}"})]


def validation_error(exc: RequestValidationError | ValidationError) -> BadRequest:
    """FastAPI's 422 for a bad path part, query or body, as the API's 400 (its first error, as the parsers gave it).

    A parser's own error keeps its code and message; anything else pydantic
    found (a missing or mistyped field) is ``bad_request`` naming where.
    """
    errors: Sequence[Any] = exc.errors()
    if not errors:
        return BadRequest("the request does not fit this endpoint")
    first = errors[0]
    kind, message = str(first.get("type", "bad_request")), str(first.get("msg", ""))
    if isinstance(first.get("ctx"), dict) and "message" in first["ctx"]:  # one of our parsers
        return BadRequest(message, kind)
    where = ".".join(str(part) for part in first.get("loc", ()))
    return BadRequest(f"{where}: {message}" if where else message)


# ----------------------------------------------------------------- request bodies


class DisputeIn(BaseModel):
    """Body of ``POST /tasks/{id}/disputes``: the item to dispute and why (strict: ``"3"`` is not 3)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    item: Annotated[StrictInt, Field(ge=0, lt=2**64, description="the item's index in the stream")]
    reason: Annotated[StrictStr, Field(max_length=DisputeRequest.MAX_REASON)] = ""


_DISPUTE_SHAPE: Final = 'dispute body must be a JSON object {"item": N, "reason": "..."}'


def parse_dispute_body(body: bytes) -> DisputeRequest:
    """``{"item": N, "reason": "..."}`` -> :class:`DisputeRequest`; ``bad_dispute`` naming the bad field.

    The words are the ones the API always answered with, so scripts that
    read them keep working.
    """
    try:
        obj = json.loads(body.decode("utf-8"))  # the json module's words for a body that is not JSON
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"dispute body is not JSON: {exc}", "bad_dispute") from None
    try:
        dispute = DisputeIn.model_validate(obj)
    except ValidationError as exc:
        errors = exc.errors()
        unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and e["loc"])
        first = errors[0]
        if not first["loc"]:
            raise BadRequest(_DISPUTE_SHAPE, "bad_dispute") from None
        if unknown:
            raise BadRequest(f"dispute: unknown field(s) {', '.join(unknown)} (known: item, reason)",
                             "bad_dispute") from None
        field = str(first["loc"][0])
        if field == "item":
            got = None if first["type"] == "missing" else first.get("input")
            raise BadRequest(f"dispute.item: expected the item's index (an integer >= 0), got {got!r}",
                             "bad_dispute") from None
        if field == "reason":
            raise BadRequest(f"dispute.reason: expected text of at most {DisputeRequest.MAX_REASON} characters",
                             "bad_dispute") from None
        raise BadRequest(f"dispute.{field}: {first['msg']}", "bad_dispute") from None
    return DisputeRequest(dispute.item, dispute.reason)


# ----------------------------------------------------------------- answers

Hex = Annotated[str, Field(pattern="^[0-9a-f]*$", description="bytes, lowercase hex")]
Stage = Literal["posted", "bids", "assigned", "running", "delivered", "settled"]
Outcome = Literal["paid", "fraud", "missed", "expired", "cancelled", "inputs_unavailable", "refused", "unknown"]
assert STAGES == get_args(Stage) and OUTCOMES == get_args(Outcome)  # noqa: S101 - one list of each, checked on import


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorOut(_Answer):
    """Every refusal: ``error`` is a stable code for scripts, ``message`` is for people."""

    error: str
    message: str


class HealthOut(_Answer):
    state: Literal["ready", "syncing", "down"]
    head_height: int
    peers: int
    detail: str = ""


class GatewayModelOut(_Answer):
    """A model the inference gateway serves now (it has a lane)."""

    model: str = Field(description="name@version")
    model_id: Hex
    state: Literal["AVAILABLE", "LOADING", "UNAVAILABLE"]
    queued_rows: int = Field(ge=0, description="rows waiting for a slot on a session")
    in_flight: int = Field(ge=0, description="items sent to a provider and not yet answered")
    session_open: bool


class GatewayStatusOut(_Answer):
    """The inference gateway on this node (``[gateway] enabled`` on a client node)."""

    enabled: bool = Field(description="the gateway is running and takes requests")
    models: list[GatewayModelOut]


class StatusOut(_Answer):
    peer_id: str
    address: Hex
    chain_id: Hex
    roles: list[str]
    head_height: int
    head_hash: Hex
    peers: int
    listen_addrs: list[str]
    syncing: bool
    version: str
    gateway: GatewayStatusOut | None = Field(default=None, description="null when the node runs no gateway")


class SubmittedOut(_Answer):
    task_id: Hex


class BatchAccepted(_Answer):
    index: int
    task_id: Hex


class BatchRefused(_Answer):
    """The answer ``POST /tasks`` would have given this task."""

    index: int
    status: int
    error: str
    message: str


class BatchOut(_Answer):
    results: list[BatchAccepted | BatchRefused]


class BidOut(_Answer):
    provider: Hex
    unit_price: int
    est_seconds: int
    expiry_height: int


class StageTimeOut(_Answer):
    height: int
    time_ms: int


class TaskViewOut(_Answer):
    task_id: Hex
    stage: Stage
    bids: list[BidOut]
    provider: Hex | None
    unit_price: int | None
    outcome: Outcome | None
    timings: dict[Stage, StageTimeOut]
    detail: str
    model_id: Hex | None = None
    royalty_per_unit: int = 0
    model_name: str | None = None
    model_version: str | None = None
    start_warm: bool | None = None
    startup_seconds: float | None = None
    royalty_paid: int = 0


class DeletedOut(_Answer):
    task_id: Hex
    deleted: Literal[True]


class DisputeAcceptedOut(_Answer):
    task_id: Hex
    item: int
    status: Literal["submitted"]


class BalanceOut(_Answer):
    address: Hex
    balance: int


class AccountOut(_Answer):
    address: Hex
    balance: int
    nonce: int


class ValidatorOut(_Answer):
    address: Hex
    bls_pubkey: Hex
    stake: int
    status: str
    jailed_until: int
    in_committee: bool


class ValidatorsOut(_Answer):
    validators: list[ValidatorOut]


class ProviderOut(_Answer):
    address: Hex
    bond: int
    completed: int
    failed: int
    missed: int
    capabilities: Hex
    unavailable: int


class ProvidersOut(_Answer):
    providers: list[ProviderOut]


class BlockOut(_Answer):
    """A finalized block; header and transactions as the ledger's records (bytes in hex, tagged by ``type``)."""

    height: int
    hash: Hex
    header: dict[str, Any]
    transactions: list[dict[str, Any]]


class HeadOut(_Answer):
    height: int
    block_hash: Hex
    state_root: Hex
    timestamp_ms: int


def _answer_of(view: type, doc: str) -> type[_Answer]:
    """A response model with exactly the fields and types of one of ``api/types.py``'s view records, so the
    record and its schema are one list of fields, not two to keep in step."""
    hints = get_type_hints(view)
    fields: dict[str, Any] = {f.name: (hints[f.name], ...) for f in dataclasses.fields(view)}
    return create_model(view.__name__.removesuffix("View") + "Out", __base__=_Answer, __doc__=doc, **fields)


SupplyOut = _answer_of(SupplyView, "The books at ``height``: every bucket, their ``total``, and whether it equals "
                                   "genesis plus minted.")


class SignatureOut(_Answer):
    dtype: str
    shape: list[int | None]


class ModelOut(_Answer):
    """A registered model; ``latest``: it is its name's latest version (the last one registered)."""

    model_id: Hex
    owner: Hex
    name: str
    version: str
    royalty_per_unit: int
    input: SignatureOut
    output: SignatureOut
    bundle_size: int
    registered_height: int
    latest: bool


class ModelsOut(_Answer):
    models: list[ModelOut]


class WarmProviderOut(_Answer):
    """A provider whose signed advert says it holds the model warm, as this node heard it."""

    provider: Hex
    peer: str
    free_slots: int
    unit_price: int
    advert_age_s: float
    sequence: int
    expiry_height: int


class ModelProvidersOut(_Answer):
    """The providers that say a model is warm, best first: a free slot, then the lower price, then the fresher
    advert."""

    model_id: Hex
    height: int
    providers: list[WarmProviderOut]


class ModelPushOut(_Answer):
    """A model this node pushed: its ``RegisterModel`` pending, registered (final) at ``height``, or failed."""

    model_id: Hex
    name: str
    version: str
    royalty_per_unit: int
    status: Literal["pending", "registered", "failed"]
    height: int | None
    detail: str
