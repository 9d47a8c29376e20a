"""The market: gossip records and validators, client and provider roles, streaming accounting.

Everything here is sans-I/O (as h11 and ddht are): roles take **events** and
return **actions**; the node (Trio + libp2p) performs the actions and feeds
back what happened. Nothing blocks, reads a clock or touches a socket, so
the same code runs in the node, in the deterministic simulator and in unit
tests driven by ``ledger.devtools.DevChain``.

Driving contract for the node
=============================

Gossip (``/p2pgpu/<chain>/task`` and ``/bid``, see :func:`topic_name`)
    Install :func:`validate_task_message` / :func:`validate_bid_message` as
    topic validators with one :class:`SeenCache` per topic and the latest
    finalized height. They return the record or raise a
    :class:`MarketMessageError` subclass; map ``exc.penalize`` to
    ``p2pgpu.net.reject(exc.reason)`` (True) or ``ignore(exc.reason)``
    (False). Deliver accepted records as events: ``SignedAnnounce`` →
    ``AnnounceReceived`` to the provider role; ``BidMessage`` →
    ``BidReceived(msg.signed)`` and ``SignedDecline`` →
    ``DeclineReceived(msg.notice)`` to the client task with that task id.

Adverts (``/p2pgpu/<chain>/advert``, :mod:`p2pgpu.market.advertise`)
    A provider feeds an :class:`~p2pgpu.market.advertise.AdvertPublisher`
    what it holds warm and its free slots, and signs and publishes the
    :class:`ModelAdvert` it says is due (debounced, a heartbeat, a rate
    bound). A market follower validates the topic through an
    :class:`~p2pgpu.market.advertise.AdvertDirectory` (``admit``: a
    registered provider, a newer sequence, not too frequent, a good
    signature) and asks it ``warm_providers(model_id)``, best first.

Ledger
    After every finalized block: ``BlockFinalized(height, state)`` to every
    role (``ledger.state.State`` is a valid :class:`LedgerView`; roles only
    read it). A ``SubmitTx`` the node could not get included (mempool or
    block-builder rejection) comes back as ``TxFailed(body, reason)``.

Client (:class:`ClientTask`, one per submitted task)
    The node reserves the account nonce for the PostTask and creates
    ``ClientTask(key=, chain_id=, spec=, post_nonce=, max_unit_price=,
    data_peer=, kind=, units=, config=, height=, providers=)``; ``task_id``
    is known at once. ``start()`` → ``[SubmitTx(PostTask, assign_nonce=False),
    PublishAnnounce, ServeSpec (if the spec is too big to inline)]``: the
    announce does not wait for the PostTask to be final.

    ==========================  ===============================================
    event in                    actions out
    ==========================  ===============================================
    BlockFinalized (task seen)  ReportProgress(POSTED)
    BidReceived                 ReportProgress(BIDS); SubmitTx(Assign) when
                                ``enough_bids`` are in (even before the
                                PostTask is final)
    BlockFinalized (window      Report + SubmitTx(Assign) for the best bid by
    closing)                    :func:`score_bid`; retries the next bid when an
                                Assign fails (TxFailed) or does not land
    BlockFinalized (ASSIGNED)   ReportProgress(ASSIGNED), ServeInputs(provider);
                                stream tasks: OpenStream(session=ClientStream)
    InputsServed                ReportProgress(RUNNING)
    InputsPushed                ReportProgress(RUNNING) once ASSIGNED to
                                that provider (at once if it is)
    ProviderProbed (stopped:    Report + SubmitTx(ReopenTask); once the ledger
    ``probe_misses`` failures   shows the task POSTED again: ReportProgress(
    or ``unknown``/``dropped``) POSTED) + PublishAnnounce (a fresh auction)
    CommitmentPending (the      FetchResult early (RUNNING, nothing fetched yet);
    provider's CommitResult in  the bytes wait for the final commitment
    our mempool)
    BlockFinalized (COMMITTED)  FetchResult (if nothing was pushed yet)
    ResultDelivered             hash vs commitment → RunSpotCheck (optional) or
                                ReportProgress(DELIVERED) + ResultReady;
                                mismatch → SubmitTx(Dispute)
    VerificationOutcome         ResultReady, or SubmitTx(Dispute)
    BlockFinalized (challenge   SubmitTx(Dispute) when no acceptable result
    window about to close)      arrived (``dispute_undelivered``)
    BlockFinalized (AUDITING)   ServeInputs(verifiers); for a disputed stream
                                item also ServeStreamItem(its hashes, verifiers)
    BlockFinalized (SETTLED)    ReportProgress(SETTLED), TaskClosed(outcome,
                                detail): PAID, FRAUD, MISSED ("provider missed
                                its deadline"), EXPIRED ("no bids ..."),
                                CANCELLED
    ==========================  ===============================================

    ``cancel()`` → ``SubmitTx(CancelTask)``; ``dispute_stream_item(evidence,
    reason)`` → ``SubmitTx(Dispute(item=...))``.

Provider (:class:`ProviderRole`, one per node)
    ``ProviderRole(key=, chain_id=, capabilities=, pricing=, config=)``.

    ==========================  ===============================================
    event in                    actions out
    ==========================  ===============================================
    AnnounceReceived            FetchSpec (spec not inline); once the task is
                                final on the ledger and matches the announce:
                                PublishBid, or PublishDecline + Report (reason)
    SpecFetched                 as above
    BlockFinalized (ASSIGNED    Report + FetchInputs (batch, only if the job can
    to us)                      finish before the deadline); stream tasks:
                                FetchInputs then ServeStream
    InputsReceived (its client  FetchInputs (the pushed copy), then RunJob in a
    pushed the inputs with its  free slot; JobDone holds the result until a
    Assign; batch only)         block shows the task ASSIGNED to us, then
                                DeliverResult + SubmitTx(CommitResult) at once
    InputsFetched               RunJob(spec, inputs) | ServeStream(session=
                                ProviderStream) | (verifier) RunVerify
    JobDone                     DeliverResult + SubmitTx(CommitResult)
    JobFailed                   Report (the ledger will record MISSED)
    BlockFinalized (AUDITING,   ServeResult(verifiers) for our own task;
    ...)                        as a verifier: FetchSpec?, FetchInputs,
                                FetchResult | FetchStreamItem
    ResultFetched /             RunVerify; SubmitTx(Attest(FAIL)) when the
    StreamItemFetched           committed bytes do not decode; bytes that are
                                not the committed result count as not served
    VerifyDone                  SubmitTx(Attest(PASS | FAIL, detail))
    FetchFailed                 Report; a verifier retries the result with
                                backoff through the audit window, then attests
                                UNAVAILABLE (never FAIL); abstains on inputs
    BlockFinalized (SETTLED)    TaskClosed(outcome)
    ==========================  ===============================================

``SubmitTx``: the node sets the nonce when ``assign_nonce`` is true, signs
with ``Domain.TX`` and submits. Addresses in actions are ledger addresses;
the node maps them to peer ids (the account key is the libp2p identity).

Streaming (:class:`ClientStream`, :class:`ProviderStream`)
    The stream transport calls ``ClientStream.next_item`` / ``on_output``
    (→ ``SendReceipt`` every K items; ``StreamFault`` on a bad signature or
    hash) and ``ProviderStream.accept_item`` (``StreamBackpressure`` while K
    items are unreceipted) / ``sign_output`` / ``on_receipt`` (→
    ``SubmitTx(StreamClaim)``). The provider role closes its stream and
    makes the final claim near the deadline.

Results
    :func:`result_hash` = SHA-256 of :func:`encode_result` (the canonical
    codec map of output name → kernels tensor ext); see
    :mod:`p2pgpu.market.results`.
"""

from .client import BidPolicy, ClientConfig, ClientState, ClientTask, is_eligible_provider, reputation, score_bid
from .errors import (
    AnnounceMismatch,
    BadSignature,
    Expired,
    InvalidContent,
    MalformedMessage,
    MarketError,
    MarketMessageError,
    MarketUsageError,
    OversizedMessage,
    Replayed,
    SignerMismatch,
    SpecMismatch,
    StreamBackpressure,
    StreamError,
    StreamFault,
    TooFarAhead,
    TooFrequent,
    UnknownProvider,
    WrongChain,
    WrongTopic,
)
from .events import *  # noqa: F403 - the event/action vocabulary is the package's API
from .events import __all__ as _events_all
from .messages import (
    BID_TOPIC,
    MARKET_MESSAGES,
    TASK_TOPIC,
    BidMessage,
    DeclineNotice,
    DeclineReason,
    SeenCache,
    SignedAnnounce,
    SignedDecline,
    TaskAnnounce,
    check_announce_matches_task,
    decode_market_message,
    encode_market_message,
    encode_requirements,
    make_announce,
    message_id,
    sign_announce,
    sign_decline,
    topic_name,
    VerifiedBid,
    ADVERT_TOPIC,
    AdvertBook,
    BidOffer,
    BidStart,
    ModelAdvert,
    SignedAdvert,
    SignedBidStart,
    WarmModel,
    bid_hash,
    sign_advert,
    sign_bid_start,
    validate_advert_message,
    validate_bid_offer,
    validate_bid_message,
    validate_bid_record,
    validate_market_message,
    validate_task_message,
    verify_bid,
)
from .pricing import Decline, PricingPolicy, Quote, assess_task, estimate_flops
from .provider import JobPhase, ProviderConfig, ProviderRole, sign_bid
from .results import decode_result, encode_result, item_hash, result_hash, result_hash_of_bytes
from .transitions import IllegalTransition, TransitionTable
from .streaming import (AbandonSession, ClaimRefused, ClientStream, CloseSession, ProviderStream, RetryClaim,
                        SessionCommand, StreamItem, sign_receipt, sign_stream_output)

__all__ = [
    *_events_all,
    "AbandonSession", "ClaimRefused", "CloseSession", "RetryClaim", "SessionCommand",
    "BID_TOPIC", "MARKET_MESSAGES", "TASK_TOPIC", "AnnounceMismatch", "BadSignature", "BidMessage", "BidPolicy",
    "ClientConfig", "ClientState", "ClientStream", "ClientTask", "Decline", "DeclineNotice", "DeclineReason",
    "Expired", "IllegalTransition", "InvalidContent", "JobPhase", "MalformedMessage", "MarketError", "MarketMessageError",
    "MarketUsageError", "OversizedMessage", "PricingPolicy", "ProviderConfig", "ProviderRole", "ProviderStream",
    "Quote", "Replayed", "SeenCache", "SignedAnnounce", "SignedDecline", "SignerMismatch", "SpecMismatch",
    "StreamBackpressure", "StreamError", "StreamFault", "StreamItem", "TaskAnnounce", "TooFarAhead", "TransitionTable", "WrongChain",
    "WrongTopic", "assess_task", "check_announce_matches_task", "decode_market_message", "decode_result",
    "encode_market_message", "encode_requirements", "encode_result", "estimate_flops", "is_eligible_provider",
    "item_hash", "make_announce", "message_id", "reputation", "result_hash", "result_hash_of_bytes", "score_bid",
    "sign_announce", "sign_bid", "sign_decline", "sign_receipt", "sign_stream_output", "topic_name",
    "validate_bid_message", "validate_market_message", "validate_task_message",
    "VerifiedBid", "validate_bid_record", "verify_bid",
    "ADVERT_TOPIC", "AdvertBook", "BidOffer", "BidStart", "ModelAdvert", "SignedAdvert", "SignedBidStart", "WarmModel",
    "bid_hash", "sign_advert", "sign_bid_start", "validate_advert_message", "validate_bid_offer",
    "TooFrequent", "UnknownProvider",
]
