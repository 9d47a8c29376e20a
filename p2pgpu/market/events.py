"""Events the node feeds to market roles, and actions the roles hand back.

All are frozen dataclasses. A role never performs I/O: the node turns each
action into sends, ledger submissions, blob transfers and kernel runs, and
reports what happened as events (see the package docstring for who emits
and consumes what).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from kernels.spec import JobSpec
from ledger.codec import Record
from ledger.state import Account, ModelEntry, Provider, Task, TaskOutcome
from ledger.transactions import SignedBid, SignedReceipt

from .messages import BidStart, DeclineNotice, SignedAnnounce, VerifiedBid

if TYPE_CHECKING:  # streaming builds on these actions: its types are named here for the checker only
    from .streaming import ClientStream, ProviderStream, SessionCommand

__all__ = [
    "Action",
    "AnnounceReceived",
    "BidReceived",
    "BlockFinalized",
    "CommandStream",
    "CommitmentPending",
    "DeclineReceived",
    "DeliverResult",
    "PrepareResult",
    "Event",
    "FetchFailed",
    "FetchInputs",
    "FetchResult",
    "FetchSpec",
    "FetchStreamItem",
    "InputsFetched",
    "InputsPushed",
    "InputsReceived",
    "InputsServed",
    "JobDone",
    "JobFailed",
    "LedgerView",
    "OpenStream",
    "PublishAnnounce",
    "PublishBid",
    "ProviderProbed",
    "PublishDecline",
    "Report",
    "ReportProgress",
    "ResultDelivered",
    "ResultFetched",
    "ResultReady",
    "RunJob",
    "RunSpotCheck",
    "RunVerify",
    "SendReceipt",
    "ServeInputs",
    "ServeResult",
    "ServeSpec",
    "ServeStream",
    "ServeStreamItem",
    "SpecFetched",
    "Stage",
    "StreamItemFetched",
    "SubmitTx",
    "TaskClosed",
    "TxFailed",
    "VerificationOutcome",
    "VerifyDone",
]


class LedgerView(Protocol):
    """The read-only part of a finalized ledger state a role looks at (``ledger.state.State`` fits).

    Roles only read it and never keep it past the next ``BlockFinalized``.
    """

    @property
    def height(self) -> int: ...

    @property
    def tasks(self) -> Mapping[bytes, Task]: ...

    @property
    def providers(self) -> Mapping[bytes, Provider]: ...

    @property
    def models(self) -> Mapping[bytes, ModelEntry]: ...

    def get_balance(self, address: bytes) -> int: ...

    def get_account(self, address: bytes) -> Account: ...


class Stage(enum.Enum):
    """``p2pgpu submit`` progress (DESIGN section 7)."""

    POSTED = "posted"
    BIDS = "bids"
    ASSIGNED = "assigned"
    RUNNING = "running"
    DELIVERED = "delivered"
    SETTLED = "settled"


# ====================================================================== events


class Event:
    """Base of everything a role's ``handle`` accepts."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class BlockFinalized(Event):
    """A block got its commit certificate; ``ledger`` is the state after it."""

    height: int
    ledger: LedgerView


@dataclass(frozen=True, slots=True)
class TxFailed(Event):
    """A ``SubmitTx`` body was refused (mempool or block building); ``reason`` says why."""

    body: Record
    reason: str


@dataclass(frozen=True, slots=True)
class BidReceived(Event):
    """A bid whose signature was verified on its way in (the bid topic's validator, or ``verify_bid``)."""

    signed: VerifiedBid
    start: BidStart | None = None
    """Warm or cold and the seconds to ready, as the provider signed them beside the bid (None: not said)."""


@dataclass(frozen=True, slots=True)
class DeclineReceived(Event):
    notice: DeclineNotice


@dataclass(frozen=True, slots=True)
class CommitmentPending(Event):
    """The provider's ``CommitResult`` for a task is in our mempool, not yet final.

    Fetching the result then, rather than once the block holding the
    commitment is final, takes the fetch off the path to the result: under
    load it was a third of the time from "running" to "delivered". The
    fetched bytes are only accepted once the ledger holds a commitment to
    the same hash.
    """

    task_id: bytes
    provider: bytes
    result_hash: bytes


@dataclass(frozen=True, slots=True)
class InputsServed(Event):
    """The data plane finished serving a task's inputs to ``peer`` (an address)."""

    task_id: bytes
    peer: bytes


@dataclass(frozen=True, slots=True)
class InputsPushed(Event):
    """Our task's sealed inputs went to ``peer`` (an address), the provider of our ``Assign``, over its bid link
    (:mod:`p2pgpu.bidlink`): it has them once the assignment is final, without fetching."""

    task_id: bytes
    peer: bytes


@dataclass(frozen=True, slots=True)
class InputsReceived(Event):
    """Provider: ``client`` pushed the sealed inputs of ``task_id`` over its bid link and they checked out and
    are kept (:mod:`p2pgpu.linkdata`). A client pushes only to the provider whose bid its ``Assign`` carries,
    so the job may run before that ``Assign`` is final (the result is held until it is)."""

    task_id: bytes
    client: bytes


@dataclass(frozen=True, slots=True)
class ProviderProbed(Event):
    """The answer to a liveness probe of a task's provider: its job's phase, or why there was no answer.

    ``phase`` is the provider's own word (``"running"``, ``"queued"``, ...;
    ``"unknown"`` when it holds no job for the task, e.g. after a restart);
    ``error`` is non-empty when the probe failed (dial refused, timeout).
    """

    task_id: bytes
    provider: bytes
    phase: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class ResultDelivered(Event):
    """Result bytes reached the client (pushed by the provider or fetched)."""

    task_id: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class VerificationOutcome(Event):
    """Answer to ``RunSpotCheck``."""

    task_id: bytes
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class AnnounceReceived(Event):
    signed: SignedAnnounce


@dataclass(frozen=True, slots=True)
class SpecFetched(Event):
    """Answer to ``FetchSpec``: the bytes claimed to be the spec (the role checks the hash)."""

    spec_hash: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class InputsFetched(Event):
    """Answer to ``FetchInputs``: arrays already checked against the spec's blob hashes (``decode_blob``)."""

    task_id: bytes
    inputs: Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class ResultFetched(Event):
    """Answer to a verifier's ``FetchResult``: the raw result bytes (the role checks the hash)."""

    task_id: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamItemFetched(Event):
    """Answer to ``FetchStreamItem``: the disputed item's input and claimed output tensors."""

    task_id: bytes
    input: np.ndarray
    output: np.ndarray


@dataclass(frozen=True, slots=True)
class FetchFailed(Event):
    """A fetch gave up; ``what`` is ``"spec"``, ``"inputs"``, ``"result"`` or ``"stream-item"``."""

    task_id: bytes
    what: str
    reason: str


@dataclass(frozen=True, slots=True)
class JobDone(Event):
    task_id: bytes
    outputs: Mapping[str, np.ndarray]
    exec_ms: int


@dataclass(frozen=True, slots=True)
class JobFailed(Event):
    task_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class VerifyDone(Event):
    """Answer to ``RunVerify``: the kernel's verdict."""

    task_id: bytes
    ok: bool
    detail: str


# ====================================================================== actions


class Action:
    """Base of everything a role returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class SubmitTx(Action):
    """Sign ``body`` with the role's account key (Domain.TX) and submit it.

    When ``assign_nonce`` is true the node replaces ``body.nonce`` with the
    account's next nonce (roles share one account, so only the node can
    number its transactions). A PostTask comes with ``assign_nonce=False``:
    its nonce fixes the task id and was reserved by the node beforehand.
    """

    body: Record
    assign_nonce: bool = True


@dataclass(frozen=True, slots=True)
class PublishAnnounce(Action):
    """Publish ``data`` on the task topic."""

    data: bytes
    signed: SignedAnnounce


@dataclass(frozen=True, slots=True)
class PublishBid(Action):
    """Send ``data`` (a ``BidMessage``) to the task's client: over its bid link, or on the bid topic."""

    data: bytes
    signed: SignedBid
    client: bytes
    """The task's client (its address), whose node is the one reader of the bid (:mod:`p2pgpu.bidlink`)."""


@dataclass(frozen=True, slots=True)
class PublishDecline(Action):
    """Send ``data`` (a ``SignedDecline``) to the task's client, as :class:`PublishBid` does."""

    data: bytes
    notice: DeclineNotice
    client: bytes
    """The task's client (its address), as for :class:`PublishBid`."""


@dataclass(frozen=True, slots=True)
class ServeSpec(Action):
    """Serve the spec bytes by hash to anyone (specs are public; inputs are not)."""

    spec_hash: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class ServeInputs(Action):
    """Allow ``peers`` (addresses) to fetch the spec's input blobs (sealed to them)."""

    task_id: bytes
    spec: JobSpec
    peers: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ServeResult(Action):
    """Allow ``peers`` (addresses) to fetch the result blob ``data`` by its hash."""

    task_id: bytes
    result_hash: bytes
    data: bytes
    peers: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ServeStreamItem(Action):
    """Client: allow ``peers`` (the drawn verifiers) to fetch a disputed stream item by its two item hashes.

    The node holds the item's input and the provider's output as blobs whose
    content address is their :func:`~p2pgpu.market.results.item_hash` (the
    SHA-256 of the tensor's ext payload), the hashes the ledger's
    ``disputed_item`` names, so a verifier checks what it fetched against
    what the provider signed.
    """

    task_id: bytes
    input_hash: bytes
    output_hash: bytes
    peers: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class DeliverResult(Action):
    """Push the result to the client (and keep serving it to the client by hash)."""

    task_id: bytes
    client: bytes
    result_hash: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class PrepareResult(Action):
    """Get a result ready for a task not yet final for us (an early run): seal it to ourselves and make its
    push for ``client``, granting nobody anything, so the :class:`DeliverResult` that follows the assignment
    has nothing left to do but send. Dropped without harm if it does not happen in time."""

    task_id: bytes
    client: bytes
    result_hash: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class FetchSpec(Action):
    """Fetch the spec by hash from the client (``data_peer`` when an announce named it)."""

    task_id: bytes
    spec_hash: bytes
    client: bytes
    data_peer: bytes | None


@dataclass(frozen=True, slots=True)
class FetchInputs(Action):
    """Fetch the spec's input blobs from the client; answer with ``InputsFetched`` or ``FetchFailed``."""

    task_id: bytes
    client: bytes
    spec: JobSpec


@dataclass(frozen=True, slots=True)
class FetchResult(Action):
    """Fetch result bytes by hash from the provider; answer ``ResultDelivered`` (client) or ``ResultFetched`` (verifier)."""

    task_id: bytes
    provider: bytes
    result_hash: bytes
    timeout_s: float | None = None
    """Give up (``FetchFailed``) after this long (None: the node's default). A verifier bounds each attempt
    by the audit window it has left: a provider that accepts the fetch and then stalls must not run the
    clock out so that nobody attests."""


@dataclass(frozen=True, slots=True)
class FetchStreamItem(Action):
    """Verifier: fetch a disputed stream item's input and output tensors from the client by hash."""

    task_id: bytes
    client: bytes
    input_hash: bytes
    output_hash: bytes


@dataclass(frozen=True, slots=True)
class RunJob(Action):
    """Run the kernel (``KernelRuntime.run``); answer ``JobDone`` or ``JobFailed``."""

    task_id: bytes
    spec: JobSpec
    inputs: Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class RunVerify(Action):
    """Run the kernel's verification (``KernelRuntime.verify``); answer ``VerifyDone``."""

    task_id: bytes
    spec: JobSpec
    inputs: Mapping[str, np.ndarray]
    claimed: Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class RunSpotCheck(Action):
    """Client's optional local check of a delivered result; answer ``VerificationOutcome``."""

    task_id: bytes
    spec: JobSpec
    outputs: Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class OpenStream(Action):
    """Open (client) or accept (provider) ``/p2pgpu/stream/1`` with ``peer``; drive it with ``session``."""

    task_id: bytes
    peer: bytes
    session: ClientStream = field(compare=False)


@dataclass(frozen=True, slots=True)
class ServeStream(Action):
    """Provider: open a kernel stream session for ``spec`` with ``inputs`` (the model) and accept the
    client's ``/p2pgpu/stream/1``; gate and sign every item through ``session`` (a ``ProviderStream``)."""

    task_id: bytes
    client: bytes
    spec: JobSpec
    inputs: Mapping[str, np.ndarray] = field(compare=False)
    session: ProviderStream = field(compare=False)


@dataclass(frozen=True, slots=True)
class CommandStream(Action):
    """Provider: have the session of ``task_id`` (handed over in ``ServeStream``) carry out ``command``.

    The role never changes its ``ProviderStream`` once it is served: the
    session's owner applies the command (``ProviderStream.apply``) and hands
    the actions that result (a ``StreamClaim``, a ``Report``) back to the node.
    """

    task_id: bytes
    command: SessionCommand


@dataclass(frozen=True, slots=True)
class SendReceipt(Action):
    """Client: send this cumulative receipt to the provider on the stream."""

    task_id: bytes
    receipt: SignedReceipt


@dataclass(frozen=True, slots=True)
class ReportProgress(Action):
    task_id: bytes
    stage: Stage
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ResultReady(Action):
    """Client: a delivered result matched the commitment (and passed the spot check, if any)."""

    task_id: bytes
    data: bytes
    outputs: Mapping[str, np.ndarray] = field(compare=False)


@dataclass(frozen=True, slots=True)
class TaskClosed(Action):
    """A task reached its end for this role; ``outcome`` is the ledger's.

    ``None`` only for a client task recovered after the ledger pruned it unseen: the client knows it settled
    (the ledger prunes nothing else) but not how."""

    task_id: bytes
    outcome: TaskOutcome | None
    detail: str


@dataclass(frozen=True, slots=True)
class Report(Action):
    """Something an operator should see (a decline, an abandoned job, a refused message)."""

    task_id: bytes
    message: str
