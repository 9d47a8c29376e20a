"""Why the ledger refused something.

Every rejection is a specific exception so a node can count it by reason, a
mempool can tell "try again later" (nonce too high) from "never" (bad
signature), and a user sees what to fix. Raising one never leaves state
half-changed: ``process_*`` functions check everything before they mutate,
and ``apply_block`` works on a copy.

    LedgerError
    ├── InvalidTransaction
    │   ├── InvalidSignature
    │   ├── NonceMismatch
    │   ├── InsufficientBalance
    │   ├── FeeTooLow
    │   ├── UnknownAccount / UnknownTask / UnknownValidator / UnknownProvider
    │   ├── NotAuthorized          (wrong sender for this task step)
    │   ├── InvalidTaskState       (task is not in a state that allows this)
    │   ├── DeadlinePassed
    │   ├── InvalidBid
    │   ├── InvalidReceipt
    │   ├── InvalidEvidence
    │   ├── InvalidAmount
    │   │   └── RoyaltyTooHigh
    │   ├── AlreadyRegistered
    │   │   ├── ModelAlreadyRegistered   (this model id is registered)
    │   │   └── ModelVersionTaken        (this name@version is registered)
    │   ├── ModelNameTaken               (another account owns the name)
    │   ├── InvalidModelName             (name or version outside [a-z0-9][a-z0-9._-]{0,63})
    │   └── UnknownModel                 (a task names a model id nobody registered)
    ├── InvalidBlock
    │   └── InvalidCertificate
    └── InvalidGenesis
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of everything the ledger refuses."""


class InvalidTransaction(LedgerError):
    """A transaction that cannot be applied to this state."""


class InvalidSignature(InvalidTransaction):
    pass


class NonceMismatch(InvalidTransaction):
    def __init__(self, message: str, *, expected: int, got: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.got = got


class InsufficientBalance(InvalidTransaction):
    pass


class FeeTooLow(InvalidTransaction):
    pass


class UnknownAccount(InvalidTransaction):
    pass


class UnknownTask(InvalidTransaction):
    pass


class UnknownValidator(InvalidTransaction):
    pass


class UnknownProvider(InvalidTransaction):
    pass


class NotAuthorized(InvalidTransaction):
    pass


class InvalidTaskState(InvalidTransaction):
    pass


class DeadlinePassed(InvalidTransaction):
    pass


class InvalidBid(InvalidTransaction):
    pass


class InvalidReceipt(InvalidTransaction):
    pass


class InvalidEvidence(InvalidTransaction):
    pass


class InvalidAmount(InvalidTransaction):
    pass


class AlreadyRegistered(InvalidTransaction):
    pass


class RoyaltyTooHigh(InvalidAmount):
    """A model's royalty per unit over ``Params.max_royalty_per_unit``."""


class ModelAlreadyRegistered(AlreadyRegistered):
    """The model id (its bundle's hash) is registered already: use it, under its name."""


class ModelVersionTaken(AlreadyRegistered):
    """``name@version`` is registered already; a version never changes, register a new one."""


class ModelNameTaken(InvalidTransaction):
    """The name belongs to another account: the first to register a name owns all its versions."""


class InvalidModelName(InvalidTransaction):
    """A model name or version the registry does not accept (see :mod:`ledger.modelnames`)."""


class UnknownModel(InvalidTransaction):
    """A task names a model id that is not registered."""


class InvalidBlock(LedgerError):
    """A block that must not be finalized on top of this state."""


class InvalidCertificate(InvalidBlock):
    """A commit certificate that does not prove > 2/3 of committee stake signed."""


class InvalidGenesis(LedgerError):
    """A genesis file or record that cannot start a chain; names the bad field."""
