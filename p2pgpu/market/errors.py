"""Market exceptions, split by who is at fault (as h11 splits Local/Remote errors).

``MarketMessageError`` and its subclasses: a gossip message that a topic
validator refuses. Each carries

* ``reason`` -- a short stable label (a metric key and a gossip-inspector
  REJECT reason), e.g. ``"bad-signature"``;
* ``penalize`` -- whether the forwarding peer is to blame. Malformed,
  forged, wrong-chain or oversized messages are the sender's fault (the node
  maps them to ``p2pgpu.net.reject``); expired, replayed or far-future
  messages may be honest but late or early (``p2pgpu.net.ignore``).

``MarketUsageError``: the local node drove a role wrongly (our bug, never a
peer's).

Exception tree::

    MarketError
    ├── MarketMessageError            (remote: a gossip message refused)
    │   ├── MalformedMessage          penalize  bytes do not decode as a market record
    │   ├── OversizedMessage          penalize  over the topic's size limit
    │   ├── WrongTopic                penalize  a record that belongs on another topic
    │   ├── WrongChain                penalize  names another chain
    │   ├── BadSignature              penalize  signature does not verify
    │   │   └── SignerMismatch        penalize  public key is not the named signer's
    │   ├── InvalidContent            penalize  decodes and verifies, but says something impossible
    │   │   └── SpecMismatch          penalize  inline spec vs spec_hash / summary disagree
    │   ├── Expired                   ignore    its expiry height has passed
    │   ├── TooFarAhead               ignore    expiry beyond the acceptance horizon
    │   ├── Replayed                  ignore    already seen (same id or same signer+task)
    │   ├── UnknownProvider           ignore    an advert from an address our head has no provider for
    │   └── TooFrequent               ignore    an advert sooner after its provider's last than any honest one
    ├── AnnounceMismatch              an announce disagrees with the on-ledger task
    ├── StreamError                   a streaming session cannot go on
    │   ├── StreamBackpressure        the peer must receipt/answer before more items flow
    │   └── StreamFault               the peer broke the protocol (bad signature, hash, order)
    └── MarketUsageError              local misuse of a role (our bug)
"""

from __future__ import annotations

__all__ = [
    "AnnounceMismatch",
    "BadSignature",
    "Expired",
    "InvalidContent",
    "MalformedMessage",
    "MarketError",
    "MarketMessageError",
    "MarketUsageError",
    "OversizedMessage",
    "Replayed",
    "SignerMismatch",
    "SpecMismatch",
    "StreamBackpressure",
    "StreamError",
    "StreamFault",
    "TooFarAhead",
    "TooFrequent",
    "UnknownProvider",
    "WrongChain",
    "WrongTopic",
]


class MarketError(Exception):
    """Base of every market error."""


class MarketMessageError(MarketError, ValueError):
    """A gossip message a topic validator refuses; see the module docstring for ``reason``/``penalize``."""

    reason = "invalid"
    penalize = True


class MalformedMessage(MarketMessageError):
    reason = "malformed"


class OversizedMessage(MarketMessageError):
    reason = "oversized"


class WrongTopic(MarketMessageError):
    reason = "wrong-topic"


class WrongChain(MarketMessageError):
    reason = "wrong-chain"


class BadSignature(MarketMessageError):
    reason = "bad-signature"


class SignerMismatch(BadSignature):
    reason = "signer-mismatch"


class InvalidContent(MarketMessageError):
    reason = "invalid-content"


class SpecMismatch(InvalidContent):
    reason = "spec-mismatch"


class Expired(MarketMessageError):
    reason = "expired"
    penalize = False


class TooFarAhead(MarketMessageError):
    reason = "too-far-ahead"
    penalize = False


class Replayed(MarketMessageError):
    reason = "replayed"
    penalize = False


class UnknownProvider(MarketMessageError):
    """An advert whose provider is not registered on our head: the relay's head may differ (the node charges the
    peer that published it, as it does an announce its client cannot fund)."""

    reason = "unknown-provider"
    penalize = False


class TooFrequent(MarketMessageError):
    """An advert arriving sooner after its provider's last accepted one than an honest publisher sends them: not
    relayed, so a registered provider cannot flood the advert topic with ever-newer sequences."""

    reason = "too-frequent"
    penalize = False


class AnnounceMismatch(MarketError, ValueError):
    """A task announce that disagrees with its on-ledger PostTask; ``field`` names the first difference."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class StreamError(MarketError):
    """A streaming session cannot proceed as asked."""


class StreamBackpressure(StreamError):
    """Not now: the other side must catch up (receipts, answers) before more items flow."""


class StreamFault(StreamError):
    """The other side broke the streaming protocol; the session is over."""


class MarketUsageError(MarketError, RuntimeError):
    """The local node drove a market role in a way its contract forbids (a bug on our side)."""
