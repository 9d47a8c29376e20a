"""The node's answers to the local HTTP API (:class:`p2pgpu.api.types.NodeAPI`).

Ledger queries read the committed state (never a half-applied one: the
engine task swaps ``chain.state`` whole). Task submission and task views
belong to the client role; a node without it answers 503 with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ledger.blocks import Block
from ledger.books import get_books
from ledger.committee import compute_epoch
from ledger.modelnames import ModelRef
from ledger.state import ModelEntry, State, ValidatorStatus
from p2pgpu.api.types import (
    AccountView,
    Health,
    HeadView,
    ModelProvidersView,
    ModelPushView,
    ModelView,
    NotFound,
    PushModelRequest,
    SignatureView,
    ProviderView,
    Status,
    SubmitRequest,
    SupplyView,
    TaskView,
    Unavailable,
    ValidatorView,
    WarmProviderView,
)
from p2pgpu.clientservice import registered_model_of
from p2pgpu.metrics_text import MetricFamily, counter, gauge
from p2pgpu.modelpublish import registration_cost
from p2pgpu.node import Node

# A node that has peers but has not committed for this long is not "ready".
STALL_SECONDS = 30.0


class NodeService:
    """Adapts a running :class:`Node` to the API's interface."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def _require_running(self) -> None:
        if self.node.chain is None or not self.node.ready.is_set():
            raise Unavailable("the node is starting; try again shortly", "starting")

    # ------------------------------------------------------------ health and status

    async def health(self) -> Health:
        node = self.node
        if node.chain is None or not node.ready.is_set() or node.network is None:
            return Health(state="down", head_height=node.chain.height if node.chain else 0, peers=0,
                          detail="starting")
        peers = len(node.network.connected_peers())
        isolated = node.chain_guard.isolated_detail if node.chain_guard is not None else None
        if isolated is not None:  # never "ready" to a network whose genesis differs from ours
            return Health(state="down", head_height=node.chain.height, peers=0, detail=isolated)
        if node.chain_guard is not None and node.config.network.bootstrap and not node.chain_guard.has_confirmed_peer:
            # Told where the network is, but no peer has yet named our chain: being connected proves nothing
            # (a wrong genesis.json connects fine). A node with no bootstrap peers (a solo devnet, a network's
            # first node) has nobody to wait for and keeps the rules below.
            return Health(state="syncing", head_height=node.chain.height, peers=peers,
                          detail=f"waiting for a peer of this chain ({peers} connected, none confirmed yet)")
        driver = node.driver
        height = node.chain.height
        if driver is not None and driver.syncing:  # behind by proof, or fetching the rest after a full batch
            target = driver.stats.highest_seen_height
            detail = f"catching up to height {target}" if target > height else "catching up"
            return Health(state="syncing", head_height=height, peers=peers, detail=detail)
        last = driver.stats.last_commit_monotonic if driver else 0.0
        reference = last or node.started_monotonic
        if peers and time.monotonic() - reference > STALL_SECONDS:
            return Health(state="syncing", head_height=height, peers=peers,
                          detail=f"no block committed for {time.monotonic() - reference:.0f} s")
        return Health(state="ready", head_height=height, peers=peers)

    async def status(self) -> Status:
        self._require_running()
        node = self.node
        state = node.state
        return Status(
            peer_id=node.network.peer_id,  # type: ignore[union-attr]
            address=node.keys.account.address,
            chain_id=node.chain_id,
            roles=tuple(sorted(node.roles)),
            head_height=state.height,
            head_hash=state.last_block_hash,
            peers=len(node.network.connected_peers()),  # type: ignore[union-attr]
            listen_addrs=tuple(node.network.addrs),  # type: ignore[union-attr]
            syncing=bool(node.driver and node.driver.syncing),
            version="0.1.0",
        )

    # ------------------------------------------------------------ tasks (client role)

    def _client(self):
        client = getattr(self.node, "client_role", None)
        if client is None:
            raise Unavailable("this node does not run the client role; add 'client' to roles", "no_client_role")
        return client

    async def submit_task(self, request: SubmitRequest) -> bytes:
        self._require_running()
        return await self._client().submit(request)

    async def task_cost(self, request: SubmitRequest) -> int:
        """What ``MarketRoles.submit`` checks the balance against: escrow (with the audit fee) plus the fee."""
        self._require_running()
        state = self.node.state
        p = state.params
        model = registered_model_of(request.spec, request.inputs, state)
        royalty = model.royalty_per_unit if model is not None else 0
        return (request.max_unit_price + royalty) * request.units + p.audit_fee + p.min_fee

    async def dispute_cost(self) -> int:
        self._require_running()
        p = self.node.state.params
        return p.dispute_bond + p.min_fee

    async def task(self, task_id: bytes) -> TaskView:
        self._require_running()
        return self._client().view(task_id)

    async def task_result(self, task_id: bytes, wait: float = 0.0) -> Mapping[str, np.ndarray]:
        self._require_running()
        if wait > 0:
            await self._client().wait_result(task_id, wait)
        return self._client().result(task_id)

    async def dispute_stream_item(self, task_id: bytes, item: int, reason: str) -> None:
        self._require_running()
        await self._client().dispute_stream_item(task_id, item, reason)

    async def delete_result(self, task_id: bytes) -> None:
        self._require_running()
        await self._client().delete_result(task_id)

    # ------------------------------------------------------------ ledger queries

    async def balance(self, address: bytes) -> int:
        self._require_running()
        return self.node.state.get_balance(address)

    async def account(self, address: bytes) -> AccountView:
        self._require_running()
        state = self.node.state
        if address not in state.accounts:
            raise NotFound(f"no account {address.hex()} on chain", "unknown_account")
        acct = state.accounts[address]
        return AccountView(address=address, balance=acct.balance, nonce=acct.nonce)

    async def validators(self) -> Sequence[ValidatorView]:
        self._require_running()
        state = self.node.state
        members = {m.address for m in state.committee.members}
        return [
            ValidatorView(address=a, bls_pubkey=v.bls_pubkey, stake=v.stake,
                          status=ValidatorStatus(v.status).name.lower(), jailed_until=v.jailed_until,
                          in_committee=a in members)
            for a, v in sorted(state.validators.items())
        ]

    async def providers(self) -> Sequence[ProviderView]:
        self._require_running()
        return [
            ProviderView(address=a, bond=p.bond, completed=p.completed, failed=p.failed, missed=p.missed,
                         capabilities=p.capabilities, unavailable=p.unavailable)
            for a, p in sorted(self.node.state.providers.items())
        ]

    async def block(self, height: int) -> Block:
        self._require_running()
        chain = self.node.chain
        if not 1 <= height <= chain.height:  # type: ignore[union-attr]
            raise NotFound(f"no block at height {height}; the head is {chain.height}", "unknown_block")  # type: ignore[union-attr]
        return chain.get_finalized(height).block  # type: ignore[union-attr]

    async def head(self) -> HeadView:
        self._require_running()
        chain = self.node.chain
        if chain.height == 0:  # type: ignore[union-attr]
            return HeadView(height=0, block_hash=chain.chain_id, state_root=b"\x00" * 32, timestamp_ms=0)  # type: ignore[union-attr]
        header = chain.get_finalized(chain.height).block.header  # type: ignore[union-attr]
        return HeadView(height=header.height, block_hash=header.block_hash(), state_root=header.state_root,
                        timestamp_ms=header.timestamp_ms)

    async def supply(self) -> SupplyView:
        self._require_running()
        books = get_books(self.node.state)  # one committed state: the engine swaps it whole, never in place
        return SupplyView(
            height=books.height, balances=books.balances, escrow=books.escrow, collateral=books.collateral,
            dispute_bonds=books.dispute_bonds, stake=books.stake, unbonding=books.unbonding,
            provider_bonds=books.provider_bonds, fee_pool=books.fee_pool, burned=books.burned, minted=books.minted,
            genesis_supply=books.genesis_supply, total=books.total, conserved=books.conserved,
        )

    # ------------------------------------------------------------ models

    async def models(self) -> Sequence[ModelView]:
        self._require_running()
        state = self.node.state
        entries = sorted(state.models.values(), key=lambda m: (m.name, m.registered_height, m.version))
        return [model_view(state, m) for m in entries]

    async def model(self, ref: ModelRef) -> ModelView:
        self._require_running()
        state = self.node.state
        return model_view(state, _registered_model(state, ref))

    async def model_providers(self, ref: ModelRef) -> ModelProvidersView:
        self._require_running()
        roles = self.node.roles_driver
        if roles is None or not self.node.follows_market:
            raise Unavailable("this node does not follow the market's gossip, so it hears no adverts; run it with "
                              "the client, provider or observer role", "no_market")
        state = self.node.state
        entry = _registered_model(state, ref)
        found = tuple(WarmProviderView(provider=w.provider, peer=peer, free_slots=w.free_slots,
                                       unit_price=w.unit_price, advert_age_s=round(w.age_s, 3), sequence=w.sequence,
                                       expiry_height=w.expiry_height)
                      for w, peer in roles.warm_providers(entry.model_id))
        return ModelProvidersView(model_id=entry.model_id, height=state.height, providers=found)

    def resolve_model(self, ref: ModelRef) -> bytes:
        state = self.node.state  # replaced whole at each block: safe to read from the decoding thread
        entry = state.find_model(ref)
        if entry is None:
            raise NotFound(f"no registered model {_ref_text(ref)} on this node's ledger: push it first "
                           "(p2pgpu model push), or check the name with GET /ledger/models", "unknown_model")
        return entry.model_id

    async def push_model(self, request: PushModelRequest) -> ModelPushView:
        self._require_running()
        return await self._client().models.push(request)

    async def model_push(self, model_id: bytes) -> ModelPushView:
        self._require_running()
        return self._client().models.status(model_id)

    async def model_registration_cost(self) -> int:
        self._require_running()
        return registration_cost(self.node.state)

    # ------------------------------------------------------------ metrics

    async def metrics(self) -> Sequence[MetricFamily]:
        node = self.node
        families: list[MetricFamily] = []
        height = node.chain.height if node.chain else 0
        families.append(gauge("p2pgpu_chain_height", "Height of the last committed block.", height))
        if node.chain is not None:
            state = node.state
            families.append(gauge("p2pgpu_epoch", "Current epoch.", compute_epoch(height + 1, state.params.epoch_length)))
            families.append(gauge("p2pgpu_total_supply", "Total supply (balances, escrow, stake, bonds, pools, burned).",
                                  state.total_supply()))
        if node.mempool is not None:
            families.append(gauge("p2pgpu_mempool_transactions", "Pending transactions.", len(node.mempool)))
        families.append(counter("p2pgpu_transactions_admitted_total", "Transactions admitted to the mempool.",
                                node.counters.tx_admitted))
        families.append(counter("p2pgpu_transactions_resent_total", "This node's own transactions gossiped again "
                                "because they stayed pending for several blocks.", node.counters.tx_resent))
        families.append(counter("p2pgpu_transactions_sent_without_followers_total",
                                "Sends of this node's own transactions while no connected peer followed /tx "
                                "(they reach no validator; see [consensus] relay_txs).",
                                node.counters.published_without_followers["tx"]))
        families.append(counter("p2pgpu_announces_sent_without_followers_total",
                                "Task announces this node published while no connected peer followed /task "
                                "(they reach no provider; see [client] relay_announces).",
                                node.counters.published_without_followers["task"]))
        if node.counters.tx_rejected:
            families.append(counter("p2pgpu_transactions_rejected_total", "Transactions refused, by reason.",
                                    {(("reason", r),): n for r, n in node.counters.tx_rejected.items()}))
        if node.chain_guard is not None:
            families.append(counter("p2pgpu_peers_of_another_chain_total",
                                    "Peers refused at the handshake because their status names another chain.",
                                    node.chain_guard.refused))
        driver = node.driver
        if driver is not None:
            s = driver.stats
            families.append(counter("p2pgpu_blocks_committed_total", "Blocks committed by this node.", s.commits))
            families.append(counter("p2pgpu_sync_requests_total", "Block sync requests made.", s.sync_requests))
            families.append(counter("p2pgpu_stall_syncs_total",
                                    "Sync requests made because no block was committed for a while.", s.stall_syncs))
            families.append(counter("p2pgpu_sync_claims_dropped_total",
                                    "Unproven claims of a far height given up after a few fruitless sync requests.",
                                    s.sync_claims_dropped))
            families.append(counter("p2pgpu_consensus_rejected_total", "Consensus messages rejected by the engine.",
                                    s.rejected_messages))
        if node.network is not None:
            families.extend(_net_families(node))
        extra = getattr(node, "extra_metrics", None)
        if extra is not None:
            families.extend(extra())
        return families


def _net_families(node: Node) -> list[MetricFamily]:
    m = node.network.metrics  # type: ignore[union-attr]
    name = node.topics.name_of

    def by_topic(counts: Mapping[str, int]) -> dict[Any, float]:
        return {(("topic", name(t)),): v for t, v in counts.items()}

    out = [
        gauge("p2pgpu_peers", "Connected peers.", len(node.network.connected_peers())),  # type: ignore[union-attr]
        counter("p2pgpu_gossip_published_total", "Gossip messages published, by topic.", by_topic(m.published)),
        counter("p2pgpu_gossip_delivered_total", "Validated gossip messages delivered, by topic.", by_topic(m.delivered)),
        counter("p2pgpu_gossip_dropped_total", "Validated gossip messages dropped (queue full), by topic.",
                by_topic(m.dropped)),
        counter("p2pgpu_gossip_duplicates_total", "Gossip messages seen again, by topic.",
                by_topic(m.duplicates_by_topic)),
        counter("p2pgpu_gossip_rpcs_queued_total", "Pubsub RPCs queued for peers (messages, control, announces).",
                node.network.gossip.pubsub.rpcs_queued),  # type: ignore[union-attr]
        counter("p2pgpu_gossip_rpc_writes_total", "Pubsub RPC writes to peers (queued RPCs coalesced per write).",
                node.network.gossip.pubsub.rpcs_written),  # type: ignore[union-attr]
    ]
    if m.rejected:
        out.append(counter("p2pgpu_gossip_rejected_total", "Gossip messages rejected, by topic and reason.",
                           {(("topic", name(t)), ("reason", r)): v for (t, r), v in m.rejected.items()}))
    topics = set(node.topics.all())

    def where(w: str) -> str:  # our topics by short name (chain-scoped ids are long), protocols as they are
        return name(w) if w in topics else w

    out += [
        counter("p2pgpu_inbound_streams_refused_total",
                "Inbound request/response streams refused (banned, peer_quota, protocol_budget, node_limit) or "
                "reset for sending no request in time (idle), by protocol and reason.",
                {(("protocol", p), ("reason", r)): v for (p, r), v in m.inbound_refused.items()}),
        gauge("p2pgpu_inbound_streams", "Inbound request/response streams being served now, by protocol.",
              {(("protocol", p),): v for p, v in m.inbound_active.items()}),
        counter("p2pgpu_peer_charges_total", "Score charges against peers, by topic or protocol and reason.",
                {(("where", where(w)), ("reason", r)): v for (w, r), v in m.charges.items()}),
        counter("p2pgpu_peer_bans_total", "Peers banned for a low score.", m.bans),
    ]
    # Scores as counts and one minimum, never a label per peer: peer ids grow without bound.
    scores = node.network.score_summary()  # type: ignore[union-attr]
    out += [
        gauge("p2pgpu_peers_banned", "Peers kept out now: banned for a low score, or refused (another chain).",
              scores.banned),
        gauge("p2pgpu_peers_scored_below_zero", "Peers charged and not yet recovered to a zero score, banned ones "
              "included.", scores.below_zero),
        gauge("p2pgpu_peer_score_min", "Lowest score among connected peers (0: none charged; a ban at "
              f"{node.network.scores.config.ban_threshold:g}).", scores.lowest),  # type: ignore[union-attr]
    ]
    return out


def _registered_model(state: State, ref: ModelRef) -> ModelEntry:
    """The registry entry ``ref`` names; NotFound ``unknown_model`` when none."""
    entry = state.find_model(ref)
    if entry is None:
        raise NotFound(f"no registered model {_ref_text(ref)}", "unknown_model")
    return entry


def _ref_text(ref: ModelRef) -> str:
    """A model reference as a user wrote it: the id, ``NAME`` or ``NAME@VERSION``."""
    if ref.model_id is not None:
        return ref.model_id.hex()
    return f"{ref.name}@{ref.version}" if ref.version is not None else str(ref.name)


def model_view(state: State, entry: ModelEntry) -> ModelView:
    """A registry entry as the API shows it."""
    name = state.model_names.get(entry.name)
    return ModelView(
        model_id=entry.model_id, owner=entry.owner, name=entry.name, version=entry.version,
        royalty_per_unit=entry.royalty_per_unit,
        input=SignatureView(entry.input.dtype, entry.input.shape),
        output=SignatureView(entry.output.dtype, entry.output.shape),
        bundle_size=entry.bundle_size, registered_height=entry.registered_height,
        latest=name is not None and name.latest_version == entry.version,
    )
