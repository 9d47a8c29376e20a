"""Node configuration: one TOML file, read into frozen dataclasses.

The schema *is* the dataclasses below: every key a file may hold is a field,
its type hint is the type the file must use, and ``field(metadata=...)``
carries bounds and allowed values. The loader walks that schema, so a typo
or a wrong type is reported with the file, the dotted key path and a
did-you-mean suggestion instead of surfacing later as a strange runtime
failure (or worse, a silently ignored setting)::

    node.toml: api.prot: unknown key (did you mean 'port'?)
    node.toml: network.bootstrap[1]: not a valid multiaddr: ...

Paths in the file are relative to the file's directory, so a devnet folder
can be moved as a whole. The passphrase is never in the file: only where to
get it (an environment variable's name or a file).

Besides tables of scalars and string lists the schema has one list of
tables, ``[[api.tokens]]`` (a field typed ``tuple[SomeDataclass, ...]``): its
entries are checked like any table and named by index in errors
(``api.tokens[1].scopes[0]``). A field without a default is a required key.

``render_config`` writes the same schema back as TOML (a small emitter for
this schema only: tables of scalars and string lists, and lists of such
tables; no dependency needed for that).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import multiaddr

from ledger.modelnames import parse_model_ref

__all__ = [
    "API_SCOPES",
    "MODEL_WILDCARD",
    "ROLES",
    "SPENDING_SCOPES",
    "TOKEN_NAME_PATTERN",
    "TOKEN_PREFIX",
    "ApiConfig",
    "ApiToken",
    "ClientConfig",
    "ConfigError",
    "ConsensusConfig",
    "GatewayConfig",
    "GossipSettings",
    "LoggingConfig",
    "NetworkSettings",
    "NodeConfig",
    "PassphraseUnavailable",
    "ProviderConfig",
    "RateLimitSettings",
    "default_validator_keystore",
    "is_loopback_host",
    "load_config",
    "open_api_problem",
    "parse_config",
    "read_passphrase",
    "render_api_token",
    "render_config",
]

ROLES: Final = ("validator", "provider", "client", "observer")
DEFAULT_API_PORT: Final = 8645
API_SCOPES: Final = ("read", "submit", "dispute", "infer")
"""What an API token may do: ``read`` the node's views (status, tasks, results, ledger, metrics), ``submit``
tasks (escrows the node's funds), ``dispute`` stream outputs (signs a Dispute and locks its bond), ``infer``
through the gateway (``/v2/...``, ``/v1/models/...``: each request pays providers per item)."""
SPENDING_SCOPES: Final = frozenset({"submit", "dispute", "infer"})
"""Scopes that commit the node's funds; a token with one of them needs ``spend_per_hour``."""
TOKEN_PREFIX: Final = "p2pgpu_"
"""Every token ``p2pgpu api token new`` makes starts with this, so one pasted where its hash belongs is caught
(and secret scanners can find leaked ones)."""
TOKEN_NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._-]*"
MODEL_WILDCARD: Final = "*"
"""``[provider] models = ["*"]``: every registered model that fits the cache budget."""


class ConfigError(ValueError):
    """A configuration file that cannot be used; names the file, the key path and the problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


def _meta(**kwargs: Any) -> dict[str, Any]:
    return kwargs


# ----------------------------------------------------------------- schema


@dataclass(frozen=True, slots=True)
class GossipSettings:
    """Gossipsub tuning; the defaults are :class:`p2pgpu.net.config.GossipConfig`'s, measured for our traffic."""

    degree: int = field(default=4, metadata=_meta(min=1, max=64))
    degree_low: int = field(default=3, metadata=_meta(min=1, max=64))
    degree_high: int = field(default=6, metadata=_meta(min=1, max=128))
    fanout_degree: int = field(default=2, metadata=_meta(min=1, max=128))
    """Peers a message published to a topic this node does not follow goes to (each relays it on)."""
    heartbeat_interval: float = field(default=1.0, metadata=_meta(min=0.01, max=600.0))
    max_messages_per_topic_per_second: float = field(default=5000.0, metadata=_meta(min=0.1, max=1e7))
    peer_rate: float = field(default=5000.0, metadata=_meta(min=0.1, max=1e7))
    """Messages per second one peer may have accepted on one topic (beyond ``peer_burst``); over it, its messages
    are dropped and the peer is charged. A relay forwards everyone's messages: keep it far above the traffic."""
    peer_burst: int = field(default=50_000, metadata=_meta(min=1, max=10_000_000))
    seen_ttl: int = field(default=120, metadata=_meta(min=1, max=86400))
    max_message_size: int = field(default=512 << 10, metadata=_meta(min=1024, max=(1 << 20) - (16 << 10)))


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """How many validly signed messages one sender may make every node handle (``[network.rate_limits]``).

    A message over its sender's limit is not forwarded, and the peer that
    published it is charged (a relay is not). The defaults are far above an
    honest busy client: a batch of hundreds of tasks makes a PostTask, an
    Assign and a settlement each (~3 transactions per task) and one announce
    per task, within a few seconds.
    """

    tx_per_sender_burst: int = field(default=4096, metadata=_meta(min=1, max=10_000_000))
    """``/tx`` messages one sender address may send at once after a quiet spell (4x the mempool's 1,024
    pending transactions per sender)."""
    tx_per_sender_rate: float = field(default=2048.0, metadata=_meta(min=0.01, max=1e7))
    """... and then per second on average: what the chain can include (1,000 transactions a block, two blocks a
    second). An honest sender cannot go faster for long, since every mempool holds at most 1,024 of its
    pending transactions; a client sending a batch of thousands of tasks goes about that fast, and must
    never be charged for it."""
    announces_per_client_burst: int = field(default=4096, metadata=_meta(min=1, max=10_000_000))
    """``/task`` announces one client may make at once after a quiet spell (a batch request holds up to 1,000
    tasks, and ``p2pgpu submit`` sends several back to back)."""
    announces_per_client_rate: float = field(default=1024.0, metadata=_meta(min=0.01, max=1e7))
    """... and then per second on average: an announce goes with a PostTask, so an honest client announces no
    faster than its transactions are included."""
    tracked_keys: int = field(default=65_536, metadata=_meta(min=16, max=10_000_000))
    """Senders (and clients) tracked at once per limiter; the least recently seen are forgotten beyond it."""


@dataclass(frozen=True, slots=True)
class NetworkSettings:
    listen_addrs: tuple[str, ...] = field(
        default=("/ip4/127.0.0.1/tcp/0",), metadata=_meta(kind="multiaddr", tcp=True, min_items=1)
    )
    bootstrap: tuple[str, ...] = field(default=(), metadata=_meta(kind="multiaddr", peer_id=True))
    """Multiaddrs ending in ``/p2p/<peer id>``."""
    target_peers: int = field(default=8, metadata=_meta(min=1, max=1000))
    dial_timeout: float = field(default=5.0, metadata=_meta(min=0.1, max=600.0))
    request_timeout: float = field(default=10.0, metadata=_meta(min=0.1, max=3600.0))
    tx_linger: float = field(default=0.1, metadata=_meta(min=0.0, max=10.0))
    """Seconds this node's own transactions may wait to share one ``/tx`` gossip message (``p2pgpu.txgossip``):
    a transaction with nothing sent in the last ``tx_linger`` goes at once, later ones together, so a busy
    node sends at most ``1 / tx_linger`` messages a second. 0 sends at once (transactions signed in the same
    instant still share a message)."""
    gossip: GossipSettings = field(default_factory=GossipSettings)
    rate_limits: RateLimitSettings = field(default_factory=RateLimitSettings)

    def to_net_config(self) -> Any:
        """The network layer's own config (imported here: loading a config must not pull in libp2p, 0.7 s measured)."""
        from p2pgpu.net.config import GossipConfig, NetConfig

        g = self.gossip
        return NetConfig(
            listen_addrs=self.listen_addrs,
            bootstrap_peers=self.bootstrap,
            target_peers=self.target_peers,
            dial_timeout=self.dial_timeout,
            request_timeout=self.request_timeout,
            gossip=GossipConfig(
                degree=g.degree,
                degree_low=g.degree_low,
                degree_high=g.degree_high,
                fanout_degree=g.fanout_degree,
                heartbeat_interval=g.heartbeat_interval,
                max_messages_per_topic_per_second=g.max_messages_per_topic_per_second,
                peer_rate=g.peer_rate,
                peer_burst=g.peer_burst,
                seen_ttl=g.seen_ttl,
                max_message_size=g.max_message_size,
            ),
        )


@dataclass(frozen=True, slots=True)
class ApiToken:
    """One bearer token the API accepts (``[[api.tokens]]``).

    The file holds the token's SHA-256, never the token: a config file gets
    copied, backed up and pasted into bug reports, and the hash lets the
    node check a presented token without being able to hand it out. The
    token is printed once by ``p2pgpu api token new`` and lives only with
    its client.
    """

    name: str = field(metadata=_meta(min_len=1, max_len=64, pattern=TOKEN_NAME_PATTERN,
                                     pattern_hint="letters, digits, '.', '_' and '-', starting with a letter or digit"))
    """Who holds the token; appears in the node's log lines (the token never does)."""
    token_sha256: str = field(metadata=_meta(kind="sha256"))
    """Hex SHA-256 of the token's UTF-8 text."""
    scopes: frozenset[str] = field(metadata=_meta(choices=API_SCOPES, min_items=1))
    spend_per_hour: int | None = field(default=None, metadata=_meta(min=0, max=2**63 - 1))
    """Most this token may commit of the node's funds in any 60 minutes, in ledger tokens: every task's escrow
    (max unit price x units + audit fee) and fee, every dispute's bond and fee, counted when the node accepts
    it and not given back by refunds. Required with the ``submit`` or ``dispute`` scope."""


@dataclass(frozen=True, slots=True)
class ApiConfig:
    enabled: bool = True
    host: str = field(default="127.0.0.1", metadata=_meta(min_len=1, max_len=253))
    """Loopback unless ``allow_remote``: the API submits tasks that spend the node's funds."""
    port: int = field(default=DEFAULT_API_PORT, metadata=_meta(min=0, max=65535))
    """0 asks the OS for a free port (tests, several nodes on one machine)."""
    allow_remote: bool = False
    """A non-loopback ``host`` is refused without it, and with it only when ``tokens`` are configured."""
    max_body_bytes: int = field(default=256 << 20, metadata=_meta(min=1024, max=4 << 30))
    tokens: tuple[ApiToken, ...] = ()
    """Bearer tokens. With none, the API (loopback only) answers every local process, as a devnet wants;
    with any, every route but ``GET /health`` needs one of them, on loopback too."""


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    slots: int | None = field(default=None, metadata=_meta(min=1, max=1024))
    """Jobs run at once, one warm kernel worker each (a stream session holds one). Unset: from the device
    (one per GPU; on a CPU, few enough to keep the machine responsive: see ``kernels.probe.default_slots``)."""
    queue: int = field(default=32, metadata=_meta(min=0, max=100_000))
    """Won jobs that may wait for a free slot beyond those running. Bids price in the wait, and a provider
    whose slots and queue are full declines with ``busy`` and its load."""
    max_concurrent_jobs: int | None = field(default=None, metadata=_meta(min=1, max=1024))
    """Deprecated name of ``slots`` (used when ``slots`` is not set)."""
    device: str = field(default="any", metadata=_meta(choices=("any", "cpu", "gpu")))
    """Device preference for running kernels."""
    unit_cost: int = field(default=10, metadata=_meta(min=0, max=2**63 - 1))
    """What one unit of work costs this provider, in ledger tokens."""
    margin: float = field(default=0.2, metadata=_meta(min=0.0, max=100.0))
    """Bid = max(floor, unit_cost * (1 + margin)), capped by the task's max price."""
    floor: int = field(default=1, metadata=_meta(min=0, max=2**63 - 1))
    """Never bid below this unit price."""
    receipt_every: int = field(default=8, metadata=_meta(min=1, max=1024))
    """Stream tasks: serve at most this many items (K) beyond the client's last signed receipt.

    What a client that stops paying can get for free, and how many items
    the provider holds in memory per session. Announced to the client when
    its session opens; a client that receipts less often receipts every K."""
    fault: str = field(default="none", metadata=_meta(choices=("none", "wrong_result", "no_delivery")))
    """Fault drill (devnet and tests only): return a wrong result, or never deliver. Gets this node slashed."""
    models: tuple[str, ...] = field(default=(), metadata=_meta(kind="model_id"))
    """Registered models to keep warm, by model id (64 hex digits: the SHA-256 of the model's bundle), or
    ``["*"]`` for every registered model that fits ``model_cache_bytes``. Fetched from a holder at start,
    pinned in the blob store, loaded into a warm kernel worker, and advertised to clients. At most ``slots - 1``
    of them are loaded at once (one worker stays free for other jobs), so a one-slot provider keeps them on disk
    only and bids cold, with the load time."""
    model_cache_bytes: int = field(default=4 << 30, metadata=_meta(min=0, max=2**63 - 1))
    """Most bytes of model bundles kept (on disk, and loaded in warm workers); models beyond it stay cold."""
    run_before_final: bool = True
    """Run a batch job as soon as its client pushes the inputs with its ``Assign`` (the client chose our bid),
    holding the result -- neither served nor committed -- until a finalized block shows the task assigned to
    us. False: start only then. The cost of true: a job's compute when a client's ``Assign`` fails after its push."""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    max_wait_blocks: int = field(default=5, metadata=_meta(min=1, max=100_000))
    """Blocks to collect bids before picking one (at most the task's bid window)."""
    enough_bids: int = field(default=3, metadata=_meta(min=1, max=1000))
    """Pick as soon as this many bids arrived."""
    result_retention_hours: float = field(default=168.0, metadata=_meta(min=0.0, max=1_000_000.0))
    """Keep a settled task and its fetched result (in the node's data directory) this long after it settled
    or the result arrived, unless deleted sooner (``DELETE /tasks/{id}/result``); 0 keeps them until deleted."""
    relay_announces: bool = False
    """A client publishes its own task announces on ``/task`` and does not receive everyone else's: only
    providers act on them. Turn this on for a client that must relay them (one that links other clients to
    the providers, with no direct path between them). Providers and observers always take part."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The inference gateway on a client node's API (KServe v2 and TF Serving REST): how requests become stream units."""

    enabled: bool = True
    """Serve ``/v2/...`` and ``/v1/models/...`` on the API (a node with the client role only)."""
    warm_models: tuple[str, ...] = field(default=(), metadata=_meta(kind="model_ref"))
    """Models (``NAME``, ``NAME@VERSION`` or a model id) whose session opens at start and is kept open, so
    the first request does not wait for an auction."""
    max_batch_rows: int = field(default=32, metadata=_meta(min=1, max=4096))
    """Rows (samples) joined into one stream item at most: one unit of work, priced per item."""
    max_batch_delay_ms: float = field(default=0.0, metadata=_meta(min=0.0, max=10_000.0))
    """Hold a non-full item this long for more requests even when the session has room (0: batch only
    while every slot of the session's window is busy)."""
    max_queued_rows: int = field(default=8192, metadata=_meta(min=1, max=10_000_000))
    """Rows waiting for one model beyond which requests get 429."""
    window: int = field(default=4, metadata=_meta(min=1, max=1024))
    """Items in flight on one session."""
    session_units: int = field(default=2000, metadata=_meta(min=1, max=10_000_000))
    """Items one session may carry (its task's unit cap); the next opens before it runs out."""
    max_unit_price: int = field(default=20, metadata=_meta(min=1, max=2**63 - 1))
    """Most this node pays a provider per item; escrow locks ``session_units`` of it per session."""
    session_seconds: int = field(default=900, metadata=_meta(min=10, max=86_400))
    """Lifetime of one session's task (its deadline); renewed before it ends."""
    stall_seconds: float = field(default=5.0, metadata=_meta(min=0.1, max=3600.0))
    """An item unanswered this long means the provider stalled: its requests go to another provider."""
    idle_seconds: float = field(default=60.0, metadata=_meta(min=0.1, max=86_400.0))
    """Close a model's session after this long without requests (not for ``warm_models``)."""
    start_timeout: float = field(default=30.0, metadata=_meta(min=1.0, max=3600.0))
    """Most a request waits for a session to open (auction, assignment, model start) before 503."""
    bid_window: int = field(default=3, metadata=_meta(min=1, max=1000))
    """Blocks a session's auction collects bids: short, since warm providers bid at once."""
    audit_rate_bps: int = field(default=0, metadata=_meta(min=0, max=10_000))
    """Share of a session's items (basis points) the drawn verifiers re-run, paid from escrow; outputs are
    provider-signed and kept either way, so any one can be disputed (``POST /tasks/{id}/disputes``)."""
    max_rows_per_request: int = field(default=4096, metadata=_meta(min=1, max=1_000_000))
    """Rows one request may carry; a request of more rows than ``max_batch_rows`` is split over items."""


@dataclass(frozen=True, slots=True)
class ConsensusConfig:
    """Tendermint timeouts in seconds; round r waits ``base + r * delta``."""

    timeout_propose: float = field(default=1.0, metadata=_meta(min=0.01, max=600.0))
    timeout_propose_delta: float = field(default=0.5, metadata=_meta(min=0.0, max=600.0))
    timeout_prevote: float = field(default=0.5, metadata=_meta(min=0.01, max=600.0))
    timeout_prevote_delta: float = field(default=0.25, metadata=_meta(min=0.0, max=600.0))
    timeout_precommit: float = field(default=0.5, metadata=_meta(min=0.01, max=600.0))
    timeout_precommit_delta: float = field(default=0.25, metadata=_meta(min=0.0, max=600.0))
    block_interval: float = field(default=1.0, metadata=_meta(min=0.0, max=3600.0))
    """Pause after a commit before proposing the next height: the pace of blocks, which deadlines count."""
    min_block_pause: float = field(default=0.1, metadata=_meta(min=0.0, max=3600.0))
    """With transactions waiting, the pause may end this soon after a commit, as long as the last
    8 blocks stay ``block_interval`` apart on average (set it to ``block_interval`` to turn this off)."""
    tx_batch: float = field(default=0.25, metadata=_meta(min=0.0, max=3600.0))
    """... and no sooner than this after the first transaction arrived, so related transactions (a task's
    PostTask and, once bids are in, its Assign) share a block."""
    relay_votes: bool = False
    """A node without the validator role follows finalized blocks (``/block``) and leaves proposals and
    votes (``/consensus``) to the validators. Turn this on for a node that must relay them: one that
    connects validators which cannot reach each other directly. Validators always take part."""
    relay_txs: bool = False
    """A node without the validator (or observer) role publishes its own transactions on ``/tx`` and does not
    receive everyone else's: only proposers use a mempool of the whole network's transactions. Turn this on
    for a node that must relay them (one that connects clients or providers to the validators). Validators
    and observers always take part."""


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = field(default="info", metadata=_meta(choices=("debug", "info", "warning", "error")))
    format: str = field(default="text", metadata=_meta(choices=("text", "json")))


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a node process needs to start. Paths are absolute once loaded."""

    data_dir: Path = field(default=Path("data"), metadata=_meta(kind="path"))
    keystore: Path = field(default=Path("node.key.json"), metadata=_meta(kind="path", must_exist=True))
    """The account (Ed25519) keystore: the node's identity and libp2p key."""
    validator_keystore: Path | None = field(default=None, metadata=_meta(kind="path"))
    """The BLS keystore; needed with the validator role (default: ``<keystore stem>.validator.json``)."""
    passphrase_env: str | None = field(default=None, metadata=_meta(min_len=1, max_len=255))
    """Name of the environment variable holding the keystore passphrase."""
    passphrase_file: Path | None = field(default=None, metadata=_meta(kind="path", must_exist=True))
    """A file whose first line is the passphrase (mode 0600 advised)."""
    genesis: Path = field(default=Path("genesis.json"), metadata=_meta(kind="path", must_exist=True))
    roles: frozenset[str] = field(
        default=frozenset({"validator", "provider", "client"}), metadata=_meta(choices=ROLES, min_items=1)
    )
    network: NetworkSettings = field(default_factory=NetworkSettings)
    api: ApiConfig = field(default_factory=ApiConfig)
    provider: ProviderConfig = field(default_factory=ProviderConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def validator_keystore_path(self) -> Path:
        return self.validator_keystore or default_validator_keystore(self.keystore)


def default_validator_keystore(account_keystore: Path) -> Path:
    """``keys/node.json`` -> ``keys/node.validator.json``: where ``p2pgpu keys new --kind both`` puts the BLS key."""
    suffix = account_keystore.suffix or ".json"
    return account_keystore.with_name(f"{account_keystore.stem}.validator{suffix}")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_api_problem(host: str, allow_remote: bool, token_count: int) -> str | None:
    """Why an API on ``host`` must not start as configured, or None; one rule for the config file and the server.

    Off loopback, the API answers whoever can reach the port, and it posts
    tasks with the node's funds: it needs ``allow_remote`` (said on purpose)
    *and* tokens (so answering is not the same as obeying).
    """
    if is_loopback_host(host):
        return None
    if not allow_remote:
        return (f"{host!r} is not a loopback address; the API can spend this node's funds, "
                "so set api.allow_remote = true to expose it on purpose")
    if token_count == 0:
        return (f"the API on {host!r} would answer anyone who can reach it, and it spends this node's funds: "
                "create a token with 'p2pgpu api token new --name NAME --scopes read,submit --spend-per-hour N' "
                "and add the [[api.tokens]] table it prints to this file (or set api.host = \"127.0.0.1\")")
    return None


# ----------------------------------------------------------------- loading


class _Loader:
    def __init__(self, source: str, base_dir: Path, check_files: bool) -> None:
        self.source = source
        self.base_dir = base_dir
        self.check_files = check_files

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)

    def build(self, cls: type[Any], table: Any, where: str) -> Any:
        if not isinstance(table, dict):
            raise self.error(where.rstrip("."), f"expected a table, got {_toml_type(table)}")
        fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
        for key in table:
            if key not in fields_by_name:
                close = difflib.get_close_matches(key, list(fields_by_name), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(fields_by_name)})"
                raise self.error(f"{where}{key}", f"unknown key{hint}")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for name, f in fields_by_name.items():
            if name in table:
                values[name] = self.convert(table[name], hints[name], f"{where}{name}", f.metadata)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.error(f"{where}{name}", "missing (required)")
            elif f.metadata.get("kind") == "path" and isinstance(f.default, Path):
                # A default path is as relative to the config file as a written one, and as required.
                values[name] = self.convert(str(f.default), Path, f"{where}{name}", f.metadata)
        return cls(**values)

    def convert(self, raw: Any, hint: Any, key: str, meta: Any) -> Any:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Union, types.UnionType) and type(None) in args:
            (inner,) = [a for a in args if a is not type(None)]
            return self.convert(raw, inner, key, meta)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return self.build(hint, raw, f"{key}.")
        if hint is bool:
            if type(raw) is not bool:
                raise self.error(key, f"expected a boolean (true/false), got {_toml_type(raw)}")
            return raw
        if hint is int:
            if type(raw) is not int:
                raise self.error(key, f"expected an integer, got {_toml_type(raw)}")
            self.check_range(raw, key, meta)
            return raw
        if hint is float:
            if type(raw) not in (int, float):
                raise self.error(key, f"expected a number, got {_toml_type(raw)}")
            value = float(raw)
            if not math.isfinite(value):
                raise self.error(key, f"expected a finite number, got {raw}")
            self.check_range(value, key, meta)
            return value
        if hint is str:
            return self.string(raw, key, meta)
        if hint is Path:
            text = self.string(raw, key, meta)
            path = Path(os.path.expanduser(text))
            if not path.is_absolute():
                path = self.base_dir / path
            path = Path(os.path.normpath(path))
            if meta.get("must_exist") and self.check_files and not path.is_file():
                what = "no such file" if not path.exists() else "not a regular file"
                raise self.error(key, f"{what}: {path} (relative paths are resolved from {self.base_dir})")
            return path
        if origin is tuple and args and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
            return self.tables(raw, args[0], key)
        if origin is tuple or origin is frozenset:
            if not isinstance(raw, list):
                raise self.error(key, f"expected an array of strings, got {_toml_type(raw)}")
            if len(raw) < meta.get("min_items", 0):
                raise self.error(key, f"needs at least {meta['min_items']} entr{'y' if meta['min_items'] == 1 else 'ies'}")
            items = [self.string(item, f"{key}[{i}]", meta) for i, item in enumerate(raw)]
            if meta.get("kind") == "multiaddr":
                for i, item in enumerate(items):
                    self.check_multiaddr(item, f"{key}[{i}]", meta)
            if origin is frozenset:
                dupes = sorted({x for x in items if items.count(x) > 1})
                if dupes:
                    raise self.error(key, f"lists {', '.join(dupes)} more than once")
                return frozenset(items)
            return tuple(items)
        raise TypeError(f"config schema field {key} has unsupported type {hint!r}")  # our bug, not the file's

    def tables(self, raw: Any, cls: type[Any], key: str) -> tuple[Any, ...]:
        """A list of tables (``[[key]]`` once per entry), each built and checked like any table."""
        if not isinstance(raw, list):
            raise self.error(key, f"expected a list of tables (a [[{key}]] header per entry), got {_toml_type(raw)}")
        for i, item in enumerate(raw):
            if not isinstance(item, dict):  # not echoed: a string here may well be a pasted token
                raise self.error(f"{key}[{i}]", f"expected a table (a [[{key}]] header per entry), "
                                               f"got {_toml_type(item).split(' (')[0]}")
        return tuple(self.build(cls, item, f"{key}[{i}].") for i, item in enumerate(raw))

    def string(self, raw: Any, key: str, meta: Any) -> str:
        if type(raw) is not str:
            raise self.error(key, f"expected a string, got {_toml_type(raw)}")
        if meta.get("kind") == "sha256":
            return self.sha256_hex(raw, key)
        if meta.get("kind") == "model_id":
            return self.model_id_hex(raw, key)
        if meta.get("kind") == "model_ref":
            try:
                parse_model_ref(raw)
            except ValueError as exc:
                raise self.error(key, str(exc)) from None
            return raw
        choices = meta.get("choices")
        if choices is not None and raw not in choices:
            close = difflib.get_close_matches(raw, choices, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise self.error(key, f"{raw!r} is not one of {', '.join(choices)}{hint}")
        if not meta.get("min_len", 0) <= len(raw) <= meta.get("max_len", 4096):
            raise self.error(key, f"expected {meta.get('min_len', 0)}..{meta.get('max_len', 4096)} characters, got {len(raw)}")
        pattern = meta.get("pattern")
        if pattern is not None and not re.fullmatch(pattern, raw):
            raise self.error(key, f"{raw!r}: use {meta['pattern_hint']}")
        return raw

    def sha256_hex(self, raw: str, key: str) -> str:
        """64 hex digits, lowercased; a token pasted where its hash belongs is named as such (not echoed)."""
        if raw.startswith(TOKEN_PREFIX):
            raise self.error(key, "this is a token, not its SHA-256: the config holds only the hash (as printed "
                                  "by 'p2pgpu api token new'); keep the token with the client, and make a new "
                                  "one, since this one has been written to a file")
        if len(raw) != 64 or re.fullmatch(r"[0-9a-fA-F]*", raw) is None:
            raise self.error(key, f"expected 64 hex digits (a SHA-256), got {len(raw)} characters")
        return raw.lower()

    def model_id_hex(self, raw: str, key: str) -> str:
        """A model id (64 hex digits, lowercased) or ``*``; a model's name is named as such."""
        if raw == MODEL_WILDCARD:
            return raw
        if raw.lower() in ("all", "any", "every", "**"):
            raise self.error(key, f"{raw!r} is not a model id (did you mean '{MODEL_WILDCARD}'?)")
        if len(raw) != 64 or re.fullmatch(r"[0-9a-fA-F]*", raw) is None:
            raise self.error(key, f"{raw!r} is not a model id: expected 64 hex digits (as 'p2pgpu model ls' "
                                  f"prints them) or '{MODEL_WILDCARD}' for every model that fits model_cache_bytes")
        return raw.lower()

    def check_range(self, value: float, key: str, meta: Any) -> None:
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.error(key, f"{value} is out of range [{lo}, {hi}]")

    def check_multiaddr(self, text: str, key: str, meta: Any) -> None:
        try:
            addr = multiaddr.Multiaddr(text)
        except Exception as exc:  # the multiaddr package raises several unrelated types
            raise self.error(key, f"{text!r} is not a valid multiaddr: {exc}") from None
        names = [p.name for p in addr.protocols()]
        if meta.get("tcp") and "tcp" not in names:
            raise self.error(key, f"{text!r} is not a TCP address (e.g. /ip4/127.0.0.1/tcp/4001)")
        if meta.get("peer_id") and addr.get_peer_id() is None:
            raise self.error(key, f"{text!r} has no /p2p/<peer id> part")


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _check_tokens(tokens: tuple[ApiToken, ...], ld: _Loader) -> None:
    names: dict[str, int] = {}
    hashes: dict[str, int] = {}
    for i, token in enumerate(tokens):
        where = f"api.tokens[{i}]"
        if token.name in names:
            raise ld.error(f"{where}.name", f"{token.name!r} is also the name of api.tokens[{names[token.name]}]; "
                                            "names tell tokens apart in the log")
        if token.token_sha256 in hashes:
            raise ld.error(f"{where}.token_sha256", f"the same token as api.tokens[{hashes[token.token_sha256]}]")
        names[token.name] = hashes[token.token_sha256] = i
        spending = sorted(token.scopes & SPENDING_SCOPES)
        if spending and token.spend_per_hour is None:
            raise ld.error(f"{where}.spend_per_hour", f"required with the {' and '.join(spending)} scope: the most "
                                                      "this token may commit of the node's funds per hour, in ledger "
                                                      "tokens")


def _check_models(models: tuple[str, ...], ld: _Loader) -> None:
    seen: dict[str, int] = {}
    for i, model in enumerate(models):
        if model == MODEL_WILDCARD and len(models) > 1:
            raise ld.error(f"provider.models[{i}]", f"'{MODEL_WILDCARD}' already means every model that fits "
                                                    "model_cache_bytes: list it alone, or list model ids")
        if model in seen:
            raise ld.error(f"provider.models[{i}]", f"the same model as provider.models[{seen[model]}]")
        seen[model] = i


def _check_whole(cfg: NodeConfig, ld: _Loader) -> None:
    """Rules that span several keys."""
    _check_models(cfg.provider.models, ld)
    if cfg.passphrase_env is not None and cfg.passphrase_file is not None:
        raise ld.error("passphrase_file", "set passphrase_env or passphrase_file, not both")
    _check_tokens(cfg.api.tokens, ld)
    if cfg.api.enabled:
        problem = open_api_problem(cfg.api.host, cfg.api.allow_remote, len(cfg.api.tokens))
        if problem is not None:
            raise ld.error("api.host" if not cfg.api.allow_remote else "api.tokens", problem)
    g = cfg.network.gossip
    if not g.degree_low <= g.degree <= g.degree_high:
        raise ld.error(
            "network.gossip.degree",
            f"must satisfy degree_low <= degree <= degree_high, got {g.degree_low}, {g.degree}, {g.degree_high}",
        )
    if g.fanout_degree > g.degree_high:
        raise ld.error("network.gossip.fanout_degree",
                       f"must be at most degree_high ({g.degree_high}), got {g.fanout_degree}")
    if "validator" in cfg.roles and ld.check_files:
        path = cfg.validator_keystore_path
        if not path.is_file():
            key = "validator_keystore" if cfg.validator_keystore is not None else "roles"
            raise ld.error(key, f"the validator role needs a BLS keystore; no such file: {path}")


def parse_config(text: str, *, source: str = "<config>", base_dir: Path | None = None,
                 check_files: bool = True) -> NodeConfig:
    """Parse and check TOML text. ``base_dir`` anchors relative paths (default: the working directory)."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"not valid TOML: {exc}") from None
    ld = _Loader(source, (base_dir or Path.cwd()).absolute(), check_files)
    cfg = ld.build(NodeConfig, table, "")
    _check_whole(cfg, ld)
    return cfg


def load_config(path: str | os.PathLike[str], *, check_files: bool = True) -> NodeConfig:
    """Read and check a node config file; every problem raises :class:`ConfigError`.

    ``check_files=False`` skips the existence checks of keystores and
    genesis, for tools that write those files after the config.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), "", "config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), "", f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(str(p), "", f"cannot read: {exc.strerror or exc}") from None
    return parse_config(text, source=str(p), base_dir=p.absolute().parent, check_files=check_files)


class PassphraseUnavailable(ConfigError):
    """The configured passphrase source is empty or missing at start-up."""


def read_passphrase(cfg: NodeConfig, environ: typing.Mapping[str, str] | None = None) -> str | None:
    """The keystore passphrase from the configured source, or None when none is configured (prompt)."""
    env = os.environ if environ is None else environ
    if cfg.passphrase_env is not None:
        value = env.get(cfg.passphrase_env)
        if value is None:
            raise PassphraseUnavailable("<environment>", "passphrase_env", f"variable {cfg.passphrase_env} is not set")
        return value
    if cfg.passphrase_file is not None:
        try:
            lines = cfg.passphrase_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise PassphraseUnavailable(str(cfg.passphrase_file), "passphrase_file", f"cannot read: {exc}") from None
        return lines[0] if lines else ""
    return None


# ----------------------------------------------------------------- rendering


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # finite by validation; repr round-trips exactly
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (tuple, frozenset, list)):
        items = sorted(value) if isinstance(value, frozenset) else list(value)
        return "[" + ", ".join(_toml_value(v) for v in items) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


def _render_table(obj: Any, name: str, lines: list[str], *, header: str = "[{}]") -> None:
    scalars = []
    arrays: list[tuple[str, tuple[Any, ...]]] = []
    tables = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue  # absent key means "not set"
        if dataclasses.is_dataclass(value):
            tables.append((f.name, value))
        elif isinstance(value, tuple) and value and all(dataclasses.is_dataclass(v) for v in value):
            arrays.append((f.name, value))
        else:
            scalars.append(f"{f.name} = {_toml_value(value)}")
    if name:
        lines.append("")
        lines.append(header.format(name))
    lines.extend(scalars)
    for sub, entries in arrays:  # before sub-tables: a [[x.y]] entry ends where the next header starts
        for entry in entries:
            _render_table(entry, f"{name}.{sub}" if name else sub, lines, header="[[{}]]")
    for sub, value in tables:
        _render_table(value, f"{name}.{sub}" if name else sub, lines)


def render_api_token(token: ApiToken) -> str:
    """The ``[[api.tokens]]`` table for one token, as ``p2pgpu api token new`` prints it for the config file."""
    lines: list[str] = []
    _render_table(token, "api.tokens", lines, header="[[{}]]")
    return "\n".join(lines).lstrip("\n") + "\n"


def render_config(cfg: NodeConfig) -> str:
    """TOML text that :func:`load_config` reads back to an equal :class:`NodeConfig`."""
    lines: list[str] = ["# p2pgpu node configuration"]
    _render_table(cfg, "", lines)
    return "\n".join(lines) + "\n"

