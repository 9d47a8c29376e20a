"""The local devnet: plan it, write it to a directory, run its node processes, stop them.

A devnet directory holds everything needed to run and inspect it::

    DIR/devnet.json             manifest: nodes, roles, pids, addresses, API URLs (anvil's --config-out)
    DIR/passphrase              the keystores' passphrase (mode 0600; a devnet secret, not a wallet's)
    DIR/genesis.json
    DIR/nodes/<name>/config.toml, key.json, key.validator.json, data/ (chain, node.json)
    DIR/logs/<name>.log

Planning is pure (:func:`plan_devnet`: keys, genesis and one
:class:`~p2pgpu.config.NodeConfig` per node from a :class:`DevnetSpec`), so
tests check it without processes. Running is a thin shell over
``subprocess``: each node is ``python -m p2pgpu.cli node run --config ...``
in its own session (a Ctrl-C in the terminal reaches only the launcher,
which then stops the nodes in order), and a node says it is up by writing
``node.json``. The launcher is synchronous on purpose: it waits on
processes and polls HTTP, and has no protocol logic for Trio to drive.

Ports: by default every node asks the OS for free ports. Once all nodes are
up, each config is rewritten with the ports it got and every other node as a
bootstrap peer, so ``restart`` brings a node back where its peers expect it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ledger.genesis import Genesis, GenesisAccount, GenesisProvider, GenesisValidator, save_genesis
from ledger.keys import AccountKey, ValidatorKey
from ledger.keystore import save_keystore
from ledger.params import Params
from p2pgpu.config import (
    ApiConfig,
    ClientConfig,
    ConsensusConfig,
    GatewayConfig,
    LoggingConfig,
    NetworkSettings,
    NodeConfig,
    ProviderConfig,
    load_config,
    render_config,
)

__all__ = [
    "DEFAULT_DIR",
    "MANIFEST",
    "Devnet",
    "DevnetError",
    "DevnetPlan",
    "DevnetRunning",
    "DevnetSpec",
    "Manifest",
    "NodePlan",
    "NodeRecord",
    "NodeStartFailed",
    "NotADevnet",
    "UnknownNode",
    "consensus_for",
    "serving_provider_config",
    "log_tail",
    "pid_alive",
    "plan_devnet",
    "write_devnet",
]

DEFAULT_DIR: Final = Path("devnet-data")
MANIFEST: Final = "devnet.json"
MANIFEST_VERSION: Final = 1
RUN_INFO: Final = "node.json"  # what p2pgpu.node_cli writes once a node is up
STOP_GRACE_SECONDS: Final = 10.0
START_TIMEOUT_SECONDS: Final = 90.0


# ----------------------------------------------------------------- errors


class DevnetError(Exception):
    """A devnet problem the user can fix; the message says what and how."""


class NotADevnet(DevnetError):
    """The directory holds no devnet manifest (or something other than a devnet)."""


class DevnetRunning(DevnetError):
    """``up`` on a directory whose devnet still has live processes."""


class UnknownNode(DevnetError):
    """A node name that is not in the manifest; the message lists the names that are."""


class NodeStartFailed(DevnetError):
    """A node exited or did not come up in time; carries the tail of its log."""

    def __init__(self, name: str, problem: str, log_path: Path | None, tail: str) -> None:
        self.name = name
        self.problem = problem
        self.log_path = log_path
        self.tail = tail
        super().__init__(f"node {name}: {problem}" + (f" (log: {log_path})" if log_path else ""))


# ----------------------------------------------------------------- the plan (pure)


@dataclass(frozen=True, slots=True)
class DevnetSpec:
    """What to run. Amounts are in the chain's smallest unit."""

    validators: int = 4
    providers: int = 2
    clients: int = 1
    block_interval: float = 0.5
    base_port: int = 0
    """0: every port is chosen by the OS. Otherwise node i listens on base+2i (p2p) and base+2i+1 (API)."""
    chain_name: str = "devnet"
    validator_stake: int = 100_000
    provider_bond: int = 10_000
    validator_balance: int = 1_000_000
    provider_balance: int = 1_000_000
    client_balance: int = 100_000_000
    log_level: str = "info"
    params: Params = field(default_factory=Params)
    provider_configs: Mapping[str, ProviderConfig] = field(default_factory=dict)
    """``[provider]`` sections by node name (``p0``, ``p1``, ...): prices that steer auctions, fault drills.
    Providers not named here get :class:`ProviderConfig`'s defaults."""
    provider_default: ProviderConfig = field(default_factory=ProviderConfig)
    """``[provider]`` of every provider not named in ``provider_configs`` (``devnet up`` passes
    :func:`serving_provider_config`: models kept warm)."""
    client_config: ClientConfig = field(default_factory=ClientConfig)
    """The ``[client]`` section of every client node (e.g. ``enough_bids=1`` to assign on the first bid)."""
    gateway_config: GatewayConfig = field(default_factory=GatewayConfig)
    """``[gateway]`` of every client node (the inference gateway on its API)."""

    def __post_init__(self) -> None:
        if self.validators < 1:
            raise DevnetError("a devnet needs at least one validator (--validators >= 1)")
        if self.providers < 0 or self.clients < 0:
            raise DevnetError("--providers and --clients cannot be negative")
        if self.validators + self.providers + self.clients > 64:
            raise DevnetError(f"{self.validators + self.providers + self.clients} nodes is more than one machine "
                              "should run (at most 64)")
        if not 0.0 <= self.block_interval <= 3600.0:
            raise DevnetError(f"--block-interval {self.block_interval} is not in [0, 3600] seconds")
        last = self.base_port + 2 * (self.validators + self.providers + self.clients) - 1
        if self.base_port and not (1024 <= self.base_port and last <= 65535):
            raise DevnetError(f"--base-port {self.base_port}: ports {self.base_port}..{last} must lie in 1024..65535")
        if self.validator_stake < self.params.min_validator_stake:
            raise DevnetError(f"validator stake {self.validator_stake} is below min_validator_stake "
                              f"{self.params.min_validator_stake}")
        if self.providers and self.provider_bond < self.params.min_provider_bond:
            raise DevnetError(f"provider bond {self.provider_bond} is below min_provider_bond "
                              f"{self.params.min_provider_bond}")
        providers = {f"p{i}" for i in range(self.providers)}
        unknown = sorted(set(self.provider_configs) - providers)
        if unknown:
            raise DevnetError(f"provider settings for {', '.join(unknown)}, but the providers are "
                              f"{', '.join(sorted(providers)) or 'none'}")

    def node_roles(self) -> list[tuple[str, frozenset[str]]]:
        """Names and roles in start order: validators first (the first is everyone's bootstrap peer)."""
        return ([(f"v{i}", frozenset({"validator"})) for i in range(self.validators)]
                + [(f"p{i}", frozenset({"provider"})) for i in range(self.providers)]
                + [(f"c{i}", frozenset({"client"})) for i in range(self.clients)])


@dataclass(frozen=True, slots=True)
class NodePlan:
    name: str
    roles: frozenset[str]
    account: AccountKey
    validator: ValidatorKey | None
    config: NodeConfig


@dataclass(frozen=True, slots=True)
class DevnetPlan:
    spec: DevnetSpec
    genesis: Genesis
    nodes: tuple[NodePlan, ...]

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise UnknownNode(f"no node {name!r}; nodes: {', '.join(n.name for n in self.nodes)}")


SERVING_SLOTS: Final = 2
"""Kernel workers a ``devnet up`` provider runs at least: one may hold a warm model, one stays free for jobs."""
WARM_WORKER_BYTES: Final = 1 << 30
"""Memory one devnet kernel worker is allowed for: TensorFlow (about 0.5 GiB) and a small model or job."""


def serving_provider_config(*, providers: int, device_slots: int, memory_bytes: int,
                            slots: int | None = None) -> ProviderConfig:
    """The ``[provider]`` section ``p2pgpu devnet up`` gives its providers: every pushed model served warm.

    ``models = ["*"]`` makes each provider fetch, load and advertise every
    registered model, so a model pushed to the devnet answers the client
    node's inference gateway without a cold start. A warm model holds one
    kernel worker and the provider keeps one free (``warmpool``), so that
    needs ``slots >= 2``, while ``kernels.probe.default_slots`` gives a
    2-core machine one slot (a second busy worker would compete with the
    node's event loop). A devnet's jobs are small and a warm worker is idle
    between requests, so the devnet asks for ``max(2, device_slots)`` --
    unless the machine's memory cannot hold that many TensorFlow workers for
    every provider (``WARM_WORKER_BYTES`` each), when it keeps the device's
    default (models then stay on disk and bid cold). ``slots`` (the
    ``--provider-slots`` option) overrides the choice; ``memory_bytes`` 0
    means unknown, taken as enough.
    """
    if slots is not None and not 1 <= slots <= 1024:
        raise DevnetError(f"--provider-slots {slots}: must be between 1 and 1024 (2 or more keeps models warm)")
    if slots is None:
        want = max(SERVING_SLOTS, device_slots)
        fits = memory_bytes == 0 or providers * want * WARM_WORKER_BYTES <= memory_bytes
        slots = want if fits else None
    return ProviderConfig(slots=slots, models=("*",))


def consensus_for(block_interval: float) -> ConsensusConfig:
    """Timeouts scaled to the block interval: a short interval is a fast loopback devnet, so rounds are short too."""
    base = min(1.0, max(0.3, block_interval))
    return ConsensusConfig(timeout_propose=2 * base, timeout_propose_delta=base, timeout_prevote=base,
                           timeout_prevote_delta=base / 2, timeout_precommit=base,
                           timeout_precommit_delta=base / 2, block_interval=block_interval)


def node_config(spec: DevnetSpec, index: int, roles: frozenset[str], *, bootstrap: Sequence[str] = (),
                name: str = "") -> NodeConfig:
    """One node's config; paths are relative to ``DIR/nodes/<name>/`` where the file lives."""
    p2p_port = spec.base_port + 2 * index if spec.base_port else 0
    api_port = spec.base_port + 2 * index + 1 if spec.base_port else 0
    return NodeConfig(
        provider=spec.provider_configs.get(name, spec.provider_default),
        client=spec.client_config,
        gateway=spec.gateway_config,
        data_dir=Path("data"),
        keystore=Path("key.json"),
        validator_keystore=Path("key.validator.json") if "validator" in roles else None,
        passphrase_file=Path("../../passphrase"),
        genesis=Path("../../genesis.json"),
        roles=roles,
        network=NetworkSettings(listen_addrs=(f"/ip4/127.0.0.1/tcp/{p2p_port}",), bootstrap=tuple(bootstrap)),
        api=ApiConfig(host="127.0.0.1", port=api_port),
        consensus=consensus_for(spec.block_interval),
        logging=LoggingConfig(level=spec.log_level),
    )


def _derive(master: bytes, label: str, name: str) -> bytes:
    return hashlib.sha256(b"p2pgpu-devnet/" + master + b"/" + label.encode() + b"/" + name.encode()).digest()


def plan_devnet(spec: DevnetSpec, *, master_seed: bytes, genesis_time_ms: int) -> DevnetPlan:
    """Keys, genesis and configs for ``spec``; the same seed and time give the same devnet.

    The CLI passes a random seed (and forgets it: the keystores hold the
    keys); tests pass a fixed one.
    """
    nodes: list[NodePlan] = []
    accounts, validators, providers = [], [], []
    for index, (name, roles) in enumerate(spec.node_roles()):
        account = AccountKey.from_seed(_derive(master_seed, "account", name))
        validator = ValidatorKey.from_ikm(_derive(master_seed, "bls", name)) if "validator" in roles else None
        if validator is not None:
            validators.append(GenesisValidator(address=account.address, bls_pubkey=validator.public_key,
                                               proof_of_possession=validator.proof_of_possession(),
                                               stake=spec.validator_stake))
            balance = spec.validator_balance
        elif "provider" in roles:
            # Capabilities are measured by the provider at run time and advertised in bids; genesis only bonds.
            providers.append(GenesisProvider(address=account.address, capabilities=b"", bond=spec.provider_bond))
            balance = spec.provider_balance
        else:
            balance = spec.client_balance
        accounts.append(GenesisAccount(address=account.address, balance=balance))
        nodes.append(NodePlan(name, roles, account, validator, node_config(spec, index, roles, name=name)))
    genesis = Genesis(chain_name=spec.chain_name, genesis_time_ms=genesis_time_ms, params=spec.params,
                      accounts=tuple(accounts), validators=tuple(validators), providers=tuple(providers))
    return DevnetPlan(spec=spec, genesis=genesis, nodes=tuple(nodes))


# ----------------------------------------------------------------- the manifest


@dataclass(slots=True)
class NodeRecord:
    """One node in ``devnet.json``. Paths are absolute; runtime fields are filled once the node is up."""

    name: str
    roles: tuple[str, ...]
    address: str
    config: Path
    data_dir: Path
    log: Path
    peer_id: str = ""
    addrs: tuple[str, ...] = ()
    api_url: str = ""
    pid: int | None = None
    state: str = "created"  # created | running | paused | killed | stopped | exited

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "roles": list(self.roles), "address": self.address, "config": str(self.config),
                "data_dir": str(self.data_dir), "log": str(self.log), "peer_id": self.peer_id,
                "addrs": list(self.addrs), "api_url": self.api_url, "pid": self.pid, "state": self.state}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> NodeRecord:
        return cls(name=str(obj["name"]), roles=tuple(obj["roles"]), address=str(obj["address"]),
                   config=Path(obj["config"]), data_dir=Path(obj["data_dir"]), log=Path(obj["log"]),
                   peer_id=str(obj.get("peer_id", "")), addrs=tuple(obj.get("addrs", ())),
                   api_url=str(obj.get("api_url", "")), pid=obj.get("pid"), state=str(obj.get("state", "created")))


@dataclass(slots=True)
class Manifest:
    """``DIR/devnet.json``: what scripts read to find the nodes (like anvil's ``--config-out``)."""

    root: Path
    chain_id: str
    chain_name: str
    genesis: Path
    passphrase_file: Path
    block_interval: float
    nodes: list[NodeRecord]
    launcher_pid: int | None = None
    """The foreground ``devnet up`` process, if one is running (``down`` asks it to stop too)."""
    created_ms: int = 0

    def node(self, name: str) -> NodeRecord:
        for n in self.nodes:
            if n.name == name:
                return n
        raise UnknownNode(f"no node named {name!r} in {self.root}; nodes: {', '.join(n.name for n in self.nodes)}")

    def to_json(self) -> dict[str, Any]:
        return {"version": MANIFEST_VERSION, "root": str(self.root), "chain_id": self.chain_id,
                "chain_name": self.chain_name, "genesis": str(self.genesis),
                "passphrase_file": str(self.passphrase_file), "block_interval": self.block_interval,
                "launcher_pid": self.launcher_pid, "created_ms": self.created_ms,
                "nodes": [n.to_json() for n in self.nodes]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Manifest:
        if obj.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {obj.get('version')!r}, expected {MANIFEST_VERSION}")
        return cls(root=Path(obj["root"]), chain_id=str(obj["chain_id"]), chain_name=str(obj["chain_name"]),
                   genesis=Path(obj["genesis"]), passphrase_file=Path(obj["passphrase_file"]),
                   block_interval=float(obj["block_interval"]), launcher_pid=obj.get("launcher_pid"),
                   created_ms=int(obj.get("created_ms", 0)), nodes=[NodeRecord.from_json(n) for n in obj["nodes"]])

    def save(self) -> Path:
        path = self.root / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, root: Path) -> Manifest:
        path = Path(root) / MANIFEST
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            hint = "start one with 'p2pgpu devnet up'" if not Path(root).exists() else "is it a devnet directory?"
            raise NotADevnet(f"no devnet in {root}: {path} does not exist ({hint}; or pass --dir)") from None
        try:
            return cls.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise NotADevnet(f"{path} is not a devnet manifest: {exc}") from None


def write_devnet(plan: DevnetPlan, root: Path, *, passphrase: str | None = None, scrypt_n: int = 2**15) -> Manifest:
    """Write keys (encrypted), genesis, configs and the manifest under ``root`` (which must be empty or absent)."""
    root = Path(root).absolute()
    if root.exists() and any(root.iterdir()):
        raise DevnetError(f"{root} is not empty; choose another --dir")
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir()
    passphrase = passphrase if passphrase is not None else secrets.token_urlsafe(24)
    pass_path = root / "passphrase"
    fd = os.open(pass_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(passphrase + "\n")
    save_genesis(root / "genesis.json", plan.genesis)
    records = []
    for n in plan.nodes:
        node_dir = root / "nodes" / n.name
        node_dir.mkdir(parents=True)
        save_keystore(node_dir / "key.json", n.account.seed, "account", n.account.public_key, passphrase,
                      scrypt_n=scrypt_n)
        if n.validator is not None:
            save_keystore(node_dir / "key.validator.json", n.validator.secret, "validator", n.validator.public_key,
                          passphrase, scrypt_n=scrypt_n)
        config_path = node_dir / "config.toml"
        config_path.write_text(render_config(n.config), encoding="utf-8")
        records.append(NodeRecord(name=n.name, roles=tuple(sorted(n.roles)), address=n.account.address.hex(),
                                  config=config_path, data_dir=node_dir / "data", log=root / "logs" / f"{n.name}.log"))
    manifest = Manifest(root=root, chain_id=plan.genesis.chain_id().hex(), chain_name=plan.genesis.chain_name,
                        genesis=root / "genesis.json", passphrase_file=pass_path,
                        block_interval=plan.spec.block_interval, nodes=records,
                        created_ms=plan.genesis.genesis_time_ms)
    manifest.save()
    return manifest


def remove_devnet(root: Path) -> None:
    """Delete a stopped devnet's directory; refuses anything that is not one (never a random folder)."""
    manifest = Manifest.load(root)
    live = [n.name for n in manifest.nodes if n.pid is not None and pid_alive(n.pid, n.config)]
    if live:
        raise DevnetRunning(f"devnet in {root} is running ({', '.join(live)}); stop it with 'p2pgpu devnet down'")
    shutil.rmtree(root)


# ----------------------------------------------------------------- processes


def _proc_stat_state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()[0]


def pid_alive(pid: int, config: Path | None = None) -> bool:
    """Whether ``pid`` is a live process (and, with ``config``, a node running that config file).

    The config check guards against a recorded pid that the OS has since
    given to an unrelated process. A zombie child of ours is reaped and
    counts as dead.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return config is None  # someone else's process: not one of our nodes
    if _proc_stat_state(pid) == "Z":
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return False
    if config is not None and Path("/proc").is_dir():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return str(config).encode() in cmdline
    return True


def is_paused(pid: int) -> bool:
    return _proc_stat_state(pid) in ("T", "t")


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ('' if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def node_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "p2pgpu.cli", "node", "run", "--config", str(config)]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _stop_signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def stop_pids(pids: Mapping[str, int], *, grace: float = STOP_GRACE_SECONDS,
              procs: Mapping[str, subprocess.Popen[bytes]] | None = None) -> dict[str, str]:
    """SIGTERM every pid, SIGKILL what is left after ``grace`` seconds; returns how each one ended."""
    procs = procs or {}
    for pid in pids.values():
        _stop_signal(pid, signal.SIGTERM)
        _stop_signal(pid, signal.SIGCONT)  # a paused node would never see the SIGTERM
    how: dict[str, str] = {}
    deadline = time.monotonic() + grace
    pending = dict(pids)
    while pending and time.monotonic() < deadline:
        for name, pid in list(pending.items()):
            proc = procs.get(name)
            gone = proc.poll() is not None if proc is not None and proc.pid == pid else not pid_alive(pid)
            if gone:
                how[name] = "stopped"
                del pending[name]
        if pending:
            time.sleep(0.05)
    for name, pid in pending.items():
        _stop_signal(pid, signal.SIGKILL)
        proc = procs.get(name)
        if proc is not None and proc.pid == pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        how[name] = f"killed (no exit within {grace:g} s of SIGTERM)"
    return how


def _local_tcp_addr(addrs: Iterable[str]) -> str | None:
    """The loopback TCP multiaddr (with /p2p/) from a node's listen addresses."""
    for a in addrs:
        if a.startswith("/ip4/127.0.0.1/tcp/"):
            return a
    return next(iter(addrs), None)


ProgressFn = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


class Devnet:
    """A devnet directory and the node processes this launcher started in it."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._client: Any = None  # httpx.Client, made on first use (see _http)

    def _http(self) -> Any:
        """The one HTTP client every API poll goes through, kept between polls.

        A new ``httpx`` client per request costs ~65 ms of CPU (it loads the CA
        bundle), and the launcher polls seven nodes five times a second while a
        devnet starts: that alone took most of a core from the nodes it waits for.
        """
        if self._client is None:
            import httpx

            self._client = httpx.Client()
        return self._client

    def close_http(self) -> None:
        """Close the polling client's connections (a later poll opens a new one)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def root(self) -> Path:
        return self.manifest.root

    @classmethod
    def open(cls, root: Path) -> Devnet:
        return cls(Manifest.load(Path(root).absolute()))

    def reload(self) -> None:
        self.manifest = Manifest.load(self.root)

    def live_nodes(self) -> list[NodeRecord]:
        return [n for n in self.manifest.nodes if n.pid is not None and pid_alive(n.pid, n.config)]

    def check_not_running(self) -> None:
        live = self.live_nodes()
        if live:
            raise DevnetRunning(
                f"a devnet is already running in {self.root} ({', '.join(f'{n.name} pid {n.pid}' for n in live)}); "
                f"stop it with 'p2pgpu devnet down --dir {self.root}' or choose another --dir")

    # ------------------------------------------------------------- one node

    def _failure(self, rec: NodeRecord, problem: str) -> NodeStartFailed:
        return NodeStartFailed(rec.name, problem, rec.log, log_tail(rec.log))

    def spawn(self, rec: NodeRecord) -> subprocess.Popen[bytes]:
        """Start ``rec``'s process (appending to its log); ``node.json`` says when it is up."""
        (rec.data_dir / RUN_INFO).unlink(missing_ok=True)  # a killed node leaves a stale one behind
        rec.log.parent.mkdir(parents=True, exist_ok=True)
        with open(rec.log, "ab") as log:
            log.write(f"--- p2pgpu devnet: starting {rec.name} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            log.flush()
            proc = subprocess.Popen(node_command(rec.config), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=self.root, env=_child_env(),
                                    start_new_session=True)
        self.procs[rec.name] = proc
        rec.pid = proc.pid
        rec.state = "starting"
        return proc

    def _read_run_info(self, rec: NodeRecord) -> dict[str, Any] | None:
        try:
            info = json.loads((rec.data_dir / RUN_INFO).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # not written yet (or mid-write)
        return info if isinstance(info, dict) and info.get("pid") == rec.pid else None

    def _exited(self, rec: NodeRecord) -> int | None:
        proc = self.procs.get(rec.name)
        if proc is not None and proc.pid == rec.pid:
            return proc.poll()
        return None if rec.pid is not None and pid_alive(rec.pid, rec.config) else -1

    def wait_up(self, recs: Sequence[NodeRecord], timeout: float, progress: ProgressFn = _quiet) -> None:
        """Wait until each node has written its run info; raises :class:`NodeStartFailed` naming the first failure."""
        deadline = time.monotonic() + timeout
        waiting = {r.name: r for r in recs}
        while waiting:
            for name, rec in list(waiting.items()):
                code = self._exited(rec)
                if code is not None:
                    rec.state = "exited"
                    raise self._failure(rec, f"exited with code {code} while starting")
                info = self._read_run_info(rec)
                if info is not None:
                    rec.peer_id = str(info.get("peer_id", ""))
                    rec.addrs = tuple(info.get("addrs", ()))
                    rec.api_url = str(info.get("api_url", ""))
                    rec.state = "running"
                    del waiting[name]
            if not waiting:
                break
            if time.monotonic() > deadline:
                rec = next(iter(waiting.values()))
                raise self._failure(rec, f"not up after {timeout:g} s")
            progress(f"starting nodes: {len(recs) - len(waiting)}/{len(recs)} up (waiting for {', '.join(waiting)})")
            time.sleep(0.1)

    # ------------------------------------------------------------- the whole devnet

    def start_all(self, *, timeout: float = START_TIMEOUT_SECONDS, progress: ProgressFn = _quiet) -> None:
        """Start every node: the first alone, the rest bootstrapped to it; then pin ports and bootstrap lists.

        On any failure (or Ctrl-C) every process started so far is stopped
        before the exception propagates.
        """
        self.check_not_running()
        nodes = self.manifest.nodes
        try:
            first, rest = nodes[0], nodes[1:]
            self.spawn(first)
            self.manifest.save()
            self.wait_up([first], timeout, progress)
            boot = _local_tcp_addr(first.addrs)
            for rec in rest:
                cfg = self._read_config(rec)
                if not cfg.network.bootstrap and boot is not None:
                    self._write_config(rec, dataclasses.replace(cfg, network=dataclasses.replace(
                        cfg.network, bootstrap=(boot,))))
                self.spawn(rec)
            self.manifest.save()
            self.wait_up(rest, timeout, progress)
            self.pin_configs()
            self.manifest.save()
        except BaseException:
            self.stop_all(grace=3.0)
            raise

    def _read_config(self, rec: NodeRecord) -> NodeConfig:
        return _relative_paths(load_config(rec.config, check_files=False), rec.config.parent)

    def _write_config(self, rec: NodeRecord, cfg: NodeConfig) -> None:
        tmp = rec.config.with_name(rec.config.name + ".tmp")
        tmp.write_text(render_config(cfg), encoding="utf-8")
        os.replace(tmp, rec.config)

    def pin_configs(self) -> None:
        """Rewrite each config with the ports its node got and every other node as a bootstrap peer.

        Paths stay relative to the config's folder, so the devnet directory can still be moved.
        """
        full = {n.name: _local_tcp_addr(n.addrs) for n in self.manifest.nodes}
        for rec in self.manifest.nodes:
            cfg = self._read_config(rec)
            own = full[rec.name]
            listen = cfg.network.listen_addrs
            if own is not None:
                listen = (own.split("/p2p/", 1)[0],)
            api_port = cfg.api.port
            if rec.api_url:
                api_port = int(rec.api_url.rsplit(":", 1)[1])
            boot = tuple(a for name, a in full.items() if name != rec.name and a is not None)
            self._write_config(rec, dataclasses.replace(
                cfg, network=dataclasses.replace(cfg.network, listen_addrs=listen, bootstrap=boot),
                api=dataclasses.replace(cfg.api, port=api_port)))

    def heights(self, timeout: float = 1.0) -> dict[str, int | None]:
        """Each node's finalized height from its API (None if it does not answer)."""
        import httpx

        out: dict[str, int | None] = {}
        for rec in self.manifest.nodes:
            out[rec.name] = None
            if not rec.api_url:
                continue
            try:
                resp = self._http().get(rec.api_url + "/ledger/head", timeout=timeout)
                if resp.status_code == 200:
                    out[rec.name] = int(resp.json()["height"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                pass
        return out

    def block_hash(self, rec: NodeRecord, height: int, timeout: float = 2.0) -> str | None:
        import httpx

        try:
            resp = self._http().get(f"{rec.api_url}/ledger/blocks/{height}", timeout=timeout)
            return str(resp.json()["hash"]) if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    def wait_finalized(self, target: int, *, timeout: float = START_TIMEOUT_SECONDS,
                       names: Sequence[str] | None = None, progress: ProgressFn = _quiet) -> dict[str, int]:
        """Wait until every node (or ``names``) has finalized ``target`` and all agree on that block's hash."""
        recs = [self.manifest.node(n) for n in names] if names is not None else list(self.manifest.nodes)
        deadline = time.monotonic() + timeout
        while True:
            for rec in recs:
                if self._exited(rec) is not None:
                    rec.state = "exited"
                    raise self._failure(rec, "exited while the devnet was starting")
            heights = self.heights()
            behind = [r for r in recs if (heights.get(r.name) or 0) < target]
            if not behind:
                break
            if time.monotonic() > deadline:
                worst = min(behind, key=lambda r: heights.get(r.name) or 0)
                raise self._failure(worst, f"did not finalize block {target} within {timeout:g} s "
                                           f"(height {heights.get(worst.name)})")
            progress("waiting for blocks to finalize: " + "  ".join(
                f"{r.name} {'-' if heights.get(r.name) is None else heights[r.name]}/{target}" for r in recs))
            time.sleep(0.2)
        hashes = {r.name: self.block_hash(r, target) for r in recs}
        if len(set(hashes.values())) != 1:
            detail = ", ".join(f"{k}={(v or '-')[:12]}" for k, v in hashes.items())
            raise DevnetError(f"nodes disagree on block {target}: {detail}")
        return {r.name: heights[r.name] or 0 for r in recs}

    def stop_all(self, *, grace: float = STOP_GRACE_SECONDS) -> dict[str, str]:
        """Stop every live node recorded in the manifest or started here; idempotent."""
        pids: dict[str, int] = {}
        for rec in self.manifest.nodes:
            proc = self.procs.get(rec.name)
            if proc is not None and proc.poll() is None:
                pids[rec.name] = proc.pid
            elif rec.pid is not None and pid_alive(rec.pid, rec.config):
                pids[rec.name] = rec.pid
        self.close_http()
        how = stop_pids(pids, grace=grace, procs=self.procs)
        for rec in self.manifest.nodes:
            if rec.name in how:
                rec.state = "stopped"
            elif rec.state in ("running", "starting", "paused"):
                rec.state = "exited"
            rec.pid = None
        with contextlib.suppress(OSError):
            self.manifest.save()
        return how

    # ------------------------------------------------------------- fault drills

    def _live(self, name: str) -> NodeRecord:
        rec = self.manifest.node(name)
        if rec.pid is None or not pid_alive(rec.pid, rec.config):
            raise DevnetError(f"node {name} is not running (state {rec.state}); "
                              f"'p2pgpu devnet restart {name}' starts it again")
        return rec

    def kill(self, name: str) -> NodeRecord:
        """SIGKILL: the node gets no chance to clean up (a crash drill)."""
        rec = self._live(name)
        pid = rec.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        rec.pid, rec.state = None, "killed"
        self.manifest.save()
        return rec

    def pause(self, name: str) -> NodeRecord:
        rec = self._live(name)
        os.kill(rec.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        rec.state = "paused"
        self.manifest.save()
        return rec

    def resume(self, name: str) -> NodeRecord:
        rec = self._live(name)
        os.kill(rec.pid, signal.SIGCONT)  # type: ignore[arg-type]
        rec.state = "running"
        self.manifest.save()
        return rec

    def restart(self, name: str, *, timeout: float = START_TIMEOUT_SECONDS,
                progress: ProgressFn = _quiet) -> NodeRecord:
        """Stop the node if it runs, start it again with the same config, and wait until it is up."""
        rec = self.manifest.node(name)
        if rec.pid is not None and pid_alive(rec.pid, rec.config):
            stop_pids({name: rec.pid}, procs=self.procs)
        self.spawn(rec)
        self.manifest.save()
        try:
            self.wait_up([rec], timeout, progress)
        except BaseException:
            stop_pids({name: rec.pid}, grace=3.0, procs=self.procs)  # type: ignore[dict-item]
            rec.pid, rec.state = None, "exited"
            self.manifest.save()
            raise
        self.manifest.save()
        return rec


    # ------------------------------------------------------------- late joiners

    def join(self, name: str, roles: Iterable[str] = ("observer",), *, bootstrap: Sequence[str] | None = None,
             log_level: str = "info", scrypt_n: int = 2**15, timeout: float = START_TIMEOUT_SECONDS,
             progress: ProgressFn = _quiet) -> NodeRecord:
        """Add a node that is not in the genesis (a fresh key, no funds) to a running devnet and start it.

        ``bootstrap`` defaults to every running node; a test passes one
        node's address to check that a newcomer finds the rest through it
        and syncs the chain it missed. Validators cannot join this way: a
        validator needs stake, which only the genesis (or a Bond) gives.
        """
        roles = frozenset(roles)
        if "validator" in roles:
            raise DevnetError(f"node {name}: a joining node cannot be a validator (it has no stake); "
                              "use observer, client or provider")
        bad = sorted(roles - {"observer", "client", "provider"})
        if bad or not roles:
            raise DevnetError(f"node {name}: roles {', '.join(bad) or '(none)'} are not observer, client or provider")
        if any(n.name == name for n in self.manifest.nodes):
            raise DevnetError(f"node {name} already exists in {self.root}; choose another name")
        if bootstrap is None:
            bootstrap = [a for a in (_local_tcp_addr(n.addrs) for n in self.live_nodes()) if a is not None]
        if not bootstrap:
            raise DevnetError("no running node to bootstrap from; start the devnet first")
        passphrase = self.manifest.passphrase_file.read_text(encoding="utf-8").splitlines()[0]
        account = AccountKey.generate()
        node_dir = self.root / "nodes" / name
        node_dir.mkdir(parents=True)
        save_keystore(node_dir / "key.json", account.seed, "account", account.public_key, passphrase,
                      scrypt_n=scrypt_n)
        cfg = NodeConfig(
            data_dir=Path("data"), keystore=Path("key.json"), validator_keystore=None,
            passphrase_file=Path("../../passphrase"), genesis=Path("../../genesis.json"), roles=roles,
            network=NetworkSettings(listen_addrs=("/ip4/127.0.0.1/tcp/0",), bootstrap=tuple(bootstrap)),
            api=ApiConfig(host="127.0.0.1", port=0), consensus=consensus_for(self.manifest.block_interval),
            logging=LoggingConfig(level=log_level),
        )
        config_path = node_dir / "config.toml"
        config_path.write_text(render_config(cfg), encoding="utf-8")
        rec = NodeRecord(name=name, roles=tuple(sorted(roles)), address=account.address.hex(), config=config_path,
                         data_dir=node_dir / "data", log=self.root / "logs" / f"{name}.log")
        self.manifest.nodes.append(rec)
        self.spawn(rec)
        self.manifest.save()
        try:
            self.wait_up([rec], timeout, progress)
        except BaseException:
            stop_pids({name: rec.pid}, grace=3.0, procs=self.procs)  # type: ignore[dict-item]
            rec.pid, rec.state = None, "exited"
            self.manifest.save()
            raise
        self.pin_configs()
        self.manifest.save()
        return rec


def _relative_paths(cfg: NodeConfig, base: Path) -> NodeConfig:
    """Paths relative to ``base`` (the config's folder) again, so a rewritten config keeps the devnet movable."""
    def rel(p: Path) -> Path:
        return Path(os.path.relpath(p, base))

    def rel_or_none(p: Path | None) -> Path | None:
        return None if p is None else rel(p)

    return dataclasses.replace(cfg, data_dir=rel(cfg.data_dir), keystore=rel(cfg.keystore),
                               validator_keystore=rel_or_none(cfg.validator_keystore),
                               passphrase_file=rel_or_none(cfg.passphrase_file), genesis=rel(cfg.genesis))
