"""The node as the market shell sees it: exactly the ports ``roles``, ``clientservice`` and ``marketgossip`` use.

The market shell (:class:`~p2pgpu.roles.MarketRoles`, :class:`~p2pgpu.clientservice.ClientService`) used to take
the node as ``Any`` and reach into about twenty of its attributes. :class:`RolesNode` names the ones it really
uses, with the types it relies on: a running node's chain, mempool, transaction sender, network and consensus
driver (never ``None`` there; ``Node`` sets them in ``run()`` before it starts the roles, and hands itself over
with a cast at that one seam), its identity and settings, and the two gossip helpers the market validators share
with the node's own (:class:`~p2pgpu.marketgossip.GossipHead`). A test can build a small fake of just these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ledger.chain import Chain
from ledger.keys import AccountKey
from ledger.mempool import Mempool
from p2pgpu.config import NodeConfig
from p2pgpu.marketgossip import GossipHead
from p2pgpu.net import Network
from p2pgpu.topics import Topics
from p2pgpu.txsender import TxSender

if TYPE_CHECKING:  # kernels.runtime pulls in the kernel registry; only its type is needed here (as in node.py)
    from kernels.runtime import KernelRuntime

__all__ = ["BehindFlag", "NodeIdentity", "RolesNode"]


class NodeIdentity(Protocol):
    """The node's keys as the roles use them: the account that signs bids, tasks and transactions."""

    @property
    def account(self) -> AccountKey: ...


class BehindFlag(Protocol):
    """The consensus driver as the roles see it: whether our ledger view may be stale."""

    @property
    def behind(self) -> bool: ...


class RolesNode(GossipHead, Protocol):
    """What of a running node the market shell uses. See the module docstring."""

    @property
    def chain_id(self) -> bytes: ...
    @property
    def keys(self) -> NodeIdentity: ...
    @property
    def config(self) -> NodeConfig: ...
    @property
    def roles(self) -> frozenset[str]: ...
    @property
    def topics(self) -> Topics: ...
    @property
    def chain(self) -> Chain: ...
    @property
    def mempool(self) -> Mempool: ...
    @property
    def tx_sender(self) -> TxSender: ...
    @property
    def network(self) -> Network: ...
    @property
    def driver(self) -> BehindFlag: ...
    @property
    def kernel_runtime(self) -> KernelRuntime | None:
        """A provider's runtime, started before the node joined (``Node.kernel_runtime``); None otherwise."""
    def publish(self, topic: str, data: bytes) -> None:
        """Gossip ``data`` on one of our topics (queued)."""
