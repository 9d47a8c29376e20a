"""The pusher's side of the model registry: take a bundle, keep it where providers can fetch it, register it.

``POST /models`` lands here (:meth:`ModelPublisher.push`). Everything that
can be checked is checked before anything is signed: the bundle decodes
and re-validates (:func:`kernels.bundle.decode_bundle`, the same checks as
a freshly loaded file), the name and version are well-formed and free (or
the name is ours), the id is not registered, the royalty is within the
chain's bound, and our balance covers the fee and the registration fee.
Then the bundle goes into the blob store under its hash (which *is* the
model id), pinned and granted to any peer, so every provider may fetch it
from this node over ``/p2pgpu/data/1``; and ``RegisterModel`` goes out
through the roles' :class:`~p2pgpu.txoutbox.TxOutbox` (one nonce allocator).

A push's status is read off the ledger when asked (:meth:`status`): the
model registered to us is final (a finalized block holds it); our
transaction's nonce executed without registering it means it failed; a
refusal the outbox reports later (``TxFailed``) gives the reason.

At start (:meth:`serve_registered`) every registered model whose bundle is
in our store is served again to any peer (the access list lives in memory),
and the ones we own are pinned.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from kernels.bundle import ModelBundle, decode_bundle
from kernels.errors import ModelError
from ledger.mempool import MempoolRejected, RejectReason
from ledger.modelnames import is_valid_model_name
from ledger.state import ModelEntry, State
from ledger.transactions import RegisterModel, TensorSignature
from p2pgpu.api.types import (
    BadRequest,
    ModelPushView,
    NotFound,
    NotReady,
    PaymentRequired,
    PushModelRequest,
    Unavailable,
    Unprocessable,
)
from p2pgpu.blobaccess import ANY_PEER, BlobAccess
from p2pgpu.blobstore import BlobStore
from p2pgpu.market import TxFailed
from p2pgpu.net.log import log
from p2pgpu.txoutbox import TxOutbox

__all__ = ["MODELS_ORIGIN", "ModelPublisher", "registration_cost"]

logger = logging.getLogger(__name__)

MODELS_ORIGIN = "models"
"""The origin our ``RegisterModel`` transactions are sent under: the outbox reports their failures to it."""


def registration_cost(state: State) -> int:
    """What registering a model takes from the sender's balance: the burned registration fee and the fee."""
    return state.params.model_registration_fee + state.params.min_fee


@dataclass(slots=True)
class _Push:
    body: RegisterModel
    nonce: int
    failed: str = ""


def _signature(sig: object) -> TensorSignature:
    # kernels.bundle.TensorSignature and ledger.transactions.TensorSignature have the same fields and encoding
    return TensorSignature(dtype=sig.dtype, shape=tuple(sig.shape))  # type: ignore[attr-defined]


class ModelPublisher:
    """Pushes of this node's models. See the module docstring."""

    def __init__(self, *, store: BlobStore, access: BlobAccess, outbox: TxOutbox, me: bytes,
                 state: Callable[[], State], available: Callable[[State], int]) -> None:
        """``state``: the committed ledger state; ``available(state)``: our balance less what our unexecuted
        transactions may still take (:meth:`TxSender.available`)."""
        self.store = store
        self.access = access
        self.outbox = outbox
        self.me = me
        self._state = state
        self._available = available
        self._pushes: dict[bytes, _Push] = {}

    # ------------------------------------------------------------ pushing

    def _check(self, state: State, request: PushModelRequest, model_id: bytes) -> None:
        """Every refusal the ledger would make, made here first, so nothing is signed or paid for it."""
        for what, text in (("name", request.name), ("version", request.version)):
            if not is_valid_model_name(text):
                raise BadRequest(f"model {what} {text!r}: use lowercase letters, digits and . _ - (first a letter or "
                                 f"digit), at most 64 characters, not a 64-digit hex id", "bad_model_name")
        held = state.models.get(model_id)
        if held is not None:
            raise NotReady(f"this model is registered already as {held.name}@{held.version} "
                           f"(id {model_id.hex()})", "model_registered")
        holder = state.model_names.get(request.name)
        if holder is not None and holder.owner != self.me:
            raise NotReady(f"model name {request.name!r} belongs to {holder.owner.hex()}; choose another name",
                           "name_taken")
        if (request.name, request.version) in state.model_versions:
            raise NotReady(f"{request.name}@{request.version} is registered already; push a new --version",
                           "version_taken")
        for mid, push in self._pushes.items():
            if self._in_flight(state, push) and (push.body.name, push.body.version) == (
                    request.name, request.version):
                raise NotReady(f"{request.name}@{request.version} is being registered by this node already "
                               f"(model {mid.hex()[:16]})", "version_taken")
        mine = self._pushes.get(model_id)
        if mine is not None and self._in_flight(state, mine):
            # The ledger registers an id once: a second RegisterModel of it could only fail (and burn its fee),
            # and its record would replace the first push's, whose status would then read "failed".
            raise NotReady(f"this model is being registered by this node already as {mine.body.name}@"
                           f"{mine.body.version} (id {model_id.hex()}); wait for GET /models/{model_id.hex()}",
                           "model_pending")
        limit = state.params.max_royalty_per_unit
        if request.royalty_per_unit > limit:
            raise Unprocessable(f"royalty {request.royalty_per_unit} per unit is over the chain's maximum {limit}",
                                "royalty_too_high")
        cost = registration_cost(state)
        available = self._available(state)
        if available < cost:
            raise PaymentRequired(f"registering a model costs {cost} (fee {state.params.min_fee} + registration "
                                  f"fee {state.params.model_registration_fee}); this node has {available} "
                                  f"available")

    def _in_flight(self, state: State, push: _Push) -> bool:
        """Whether ``push``'s RegisterModel may still register its model: not reported failed, not executed."""
        return (not push.failed and push.body.model_id not in state.models
                and state.get_account(self.me).nonce <= push.nonce)

    async def push(self, request: PushModelRequest) -> ModelPushView:
        """Check, store and serve the bundle, send ``RegisterModel``; the push's status (``pending``)."""
        try:
            bundle: ModelBundle = await trio.to_thread.run_sync(decode_bundle, request.bundle)
        except ModelError as exc:
            raise Unprocessable(f"not an acceptable model bundle: {exc}", "bad_bundle") from None
        model_id = hashlib.sha256(request.bundle).digest()  # decode_bundle accepts only canonical bytes
        state = self._state()
        self._check(state, request, model_id)
        body = RegisterModel(sender=self.me, nonce=0, fee=state.params.min_fee, model_id=model_id,
                             name=request.name, version=request.version,
                             royalty_per_unit=request.royalty_per_unit, input=_signature(bundle.input),
                             output=_signature(bundle.output), bundle_size=len(request.bundle))
        stored = await trio.to_thread.run_sync(self.store.put, request.bundle)
        if stored != model_id:  # the store names blobs by SHA-256 too; a mismatch is a bug, not bad input
            raise RuntimeError(f"blob store named the bundle {stored.hex()}, expected {model_id.hex()}")
        # Checked again after the last await: a concurrent push of this name@version may have been sent
        # meanwhile (the first check refuses early, before the store write; this one is what holds).
        self._check(self._state(), request, model_id)
        self.store.pin(model_id)
        self.access.grant((ANY_PEER,), model_id)
        try:
            stx = self.outbox.send(MODELS_ORIGIN, body)
        except MempoolRejected as exc:
            self.store.unpin(model_id)
            if exc.reason is RejectReason.INSUFFICIENT_BALANCE:
                raise PaymentRequired(f"registration refused: {exc}") from None
            raise Unavailable(f"registration refused by the mempool: {exc}", "tx_refused") from None
        self._pushes[model_id] = _Push(body=body, nonce=stx.body.nonce)
        log(logger, logging.INFO, "model_pushed", model=model_id.hex()[:16], name=request.name,
            version=request.version, size=len(request.bundle))
        return self.status(model_id)

    def tx_failed(self, event: TxFailed) -> None:
        """The outbox says one of our ``RegisterModel`` transactions cannot execute: remember why."""
        body = event.body
        if isinstance(body, RegisterModel) and body.model_id in self._pushes:
            self._pushes[body.model_id].failed = event.reason

    # ------------------------------------------------------------ status

    def status(self, model_id: bytes) -> ModelPushView:
        state = self._state()
        entry = state.models.get(model_id)
        push = self._pushes.get(model_id)
        if push is None:
            if entry is None:
                raise NotFound(f"this node pushed no model {model_id.hex()} and none is registered", "unknown_model")
            return _view(entry.name, entry.version, entry.royalty_per_unit, model_id, entry, "")
        body = push.body
        if entry is not None and entry.owner == self.me and (entry.name, entry.version) == (body.name, body.version):
            return _view(body.name, body.version, body.royalty_per_unit, model_id, entry, "")
        if entry is not None:
            return _failed(body, f"registered by {entry.owner.hex()} as {entry.name}@{entry.version} first")
        if push.failed:
            return _failed(body, push.failed)
        if state.get_account(self.me).nonce > push.nonce:
            return _failed(body, "its RegisterModel did not execute (replaced: the ledger refused it)")
        return ModelPushView(model_id=model_id, name=body.name, version=body.version,
                             royalty_per_unit=body.royalty_per_unit, status="pending",
                             detail=f"RegisterModel sent at nonce {push.nonce}; waiting for a final block")

    # ------------------------------------------------------------ at start

    def serve_registered(self, state: State) -> int:
        """Serve every registered model we hold to any peer; pin ours. Returns how many are served."""
        served = 0
        for model_id, entry in state.models.items():
            if self.store.has(model_id):
                self.access.grant((ANY_PEER,), model_id)
                if entry.owner == self.me:
                    self.store.pin(model_id)
                served += 1
        return served


def _view(name: str, version: str, royalty: int, model_id: bytes, entry: ModelEntry, detail: str) -> ModelPushView:
    return ModelPushView(model_id=model_id, name=name, version=version, royalty_per_unit=royalty,
                         status="registered", height=entry.registered_height, detail=detail)


def _failed(body: RegisterModel, why: str) -> ModelPushView:
    return ModelPushView(model_id=body.model_id, name=body.name, version=body.version,
                         royalty_per_unit=body.royalty_per_unit, status="failed", detail=why)
