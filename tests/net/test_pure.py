"""Pure parts of the network layer: framing, scoring, verdicts, config, peer-exchange decisions."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.codec import DecodeError, decode, encode
from p2pgpu.net import ConfigError, GossipConfig, NetConfig, accept, ignore, key_pair_from_seed, peer_id_from_seed, reject
from p2pgpu.net.discovery import PeerEntry, PeersReply, build_reply, choose_dials, dialable_addrs
from p2pgpu.net.errors import FrameTooLarge, ProtocolError
from p2pgpu.net.framing import Frame, FrameDecoder, Kind, encode_error, encode_frame
from p2pgpu.net.host import StatusReply
from p2pgpu.net.log import kv
from p2pgpu.net.scoring import PeerScores, ScoreConfig, ScoreSummary
from p2pgpu.net.verdict import Outcome

PEER_A = "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5"


# -- framing -------------------------------------------------------------------


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(1, 50))
def test_frames_survive_any_chunking(payloads: list[bytes], chunk: int) -> None:
    wire = b"".join(encode_frame(Kind.DATA, p) for p in payloads) + encode_frame(Kind.END)
    decoder = FrameDecoder(max_frame_size=300, where="test")
    frames: list[Frame] = []
    for i in range(0, len(wire), chunk):
        frames.extend(decoder.feed(wire[i : i + chunk]))
    assert frames == [Frame(Kind.DATA, p) for p in payloads] + [Frame(Kind.END)]
    assert decoder.pending == 0


def test_oversized_frame_refused_from_header_alone() -> None:
    decoder = FrameDecoder(max_frame_size=10, where="peer X on /p")
    with pytest.raises(FrameTooLarge, match="peer X on /p"):
        decoder.feed(encode_frame(Kind.DATA, b"x" * 11)[:4])


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x00\x00\x00\x00", "empty frame"),
        (b"\x00\x00\x00\x01\x07", "unknown frame kind 7"),
        (b"\x00\x00\x00\x02\x01x", "END frame with a payload"),
    ],
)
def test_malformed_frames(wire: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        FrameDecoder(100, "peer Y").feed(wire)


def test_error_frame_text_is_bounded() -> None:
    frame = FrameDecoder(10_000).feed(encode_error("é" * 5000))[0]
    assert frame.kind is Kind.ERROR and len(frame.payload) <= 512


# -- scoring -------------------------------------------------------------------


def test_rejections_lower_score_and_ban_at_threshold() -> None:
    scores = PeerScores(ScoreConfig(rejection_penalty=10, recovery_per_second=0, ban_threshold=-30, ban_seconds=60))
    assert [scores.on_rejection("p", now=0.0) for _ in range(3)] == [False, False, True]
    assert scores.score("p", 0.0) == -30
    assert scores.is_banned("p", 59.9) and not scores.is_banned("p", 60.0)
    assert scores.banned(1.0) == ["p"]
    assert not scores.on_rejection("p", 1.0), "an already banned peer is not banned twice"
    assert scores.expire(60.0) == ["p"]
    assert scores.score("p", 60.0) == 0.0 and not scores.banned(60.0)


def test_score_recovers_towards_zero_and_never_above() -> None:
    scores = PeerScores(ScoreConfig(rejection_penalty=10, recovery_per_second=1, ban_threshold=-100))
    scores.on_rejection("p", now=0.0)
    assert scores.score("p", 4.0) == -6
    assert scores.score("p", 100.0) == 0.0
    assert scores.expire(100.0) == [] and scores.snapshot(100.0) == {}
    assert scores.score("other", 0.0) == 0.0


def test_recovery_slows_bans_of_occasional_offenders() -> None:
    scores = PeerScores(ScoreConfig(rejection_penalty=10, recovery_per_second=1, ban_threshold=-25))
    banned = [scores.on_rejection("p", now=t * 10.0) for t in range(10)]
    assert not any(banned)


def test_the_summary_counts_bans_and_charged_peers_and_the_lowest_connected_score() -> None:
    """What /metrics shows without a label per peer: counts, and one minimum over the connected peers."""
    scores = PeerScores(ScoreConfig(rejection_penalty=10, recovery_per_second=1, ban_threshold=-30, ban_seconds=60))
    assert scores.summary(0.0, ["a", "b"]) == ScoreSummary(banned=0, below_zero=0, lowest=0.0)
    scores.on_rejection("a", now=0.0)
    for _ in range(3):
        scores.on_rejection("x", now=0.0)  # banned, and no longer connected
    scores.ban("other-chain", 0.0, 10.0)  # refused without a score
    assert scores.summary(0.0, ["a", "b"]) == ScoreSummary(banned=2, below_zero=2, lowest=-10.0)
    assert scores.summary(0.0, ["b"]).lowest == 0.0 and scores.summary(0.0, []).lowest == 0.0
    # "a" recovers (no expire() needed), the refusal runs out, the ban stays
    assert scores.summary(20.0, ["a", "b"]) == ScoreSummary(banned=1, below_zero=1, lowest=0.0)
    assert scores.summary(61.0, ["a", "b"]) == ScoreSummary(banned=0, below_zero=0, lowest=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"rejection_penalty": 0}, {"recovery_per_second": -1}, {"ban_threshold": 0}, {"ban_seconds": 0}],
)
def test_score_config_checked(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ScoreConfig(**kwargs)


# -- verdicts, config, identity, logs -----------------------------------------


def test_verdicts() -> None:
    assert accept().accepted
    assert reject("bad_sig").outcome is Outcome.REJECT and reject("bad_sig").reason == "bad_sig"
    assert ignore("expired").outcome is Outcome.IGNORE and not ignore("expired").accepted
    with pytest.raises(ValueError):
        reject("")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"listen_addrs": ()}, "listen_addrs is empty"),
        ({"listen_addrs": ("nonsense",)}, "not a valid multiaddr"),
        ({"listen_addrs": ("/ip4/127.0.0.1/udp/1",)}, "not a TCP address"),
        ({"bootstrap_peers": ("/ip4/127.0.0.1/tcp/1",)}, "no /p2p/"),
        ({"target_peers": 0}, "target_peers"),
        ({"discovery_interval": 5.0, "discovery_interval_max": 1.0}, "discovery_interval_max must be >="),
    ],
)
def test_net_config_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NetConfig(**kwargs)  # type: ignore[arg-type]


def test_gossip_config_checked() -> None:
    with pytest.raises(ConfigError, match="degrees"):
        GossipConfig(degree=2, degree_low=3)
    with pytest.raises(ConfigError, match="exceeds"):
        GossipConfig(max_message_size=2 << 20)
    with pytest.raises(ConfigError, match="publish_high_water"):
        GossipConfig(outbound_queue_size=10, publish_high_water=20)


def test_identity_is_the_seed() -> None:
    seed = bytes(range(32))
    pair = key_pair_from_seed(seed)
    assert pair.private_key.to_bytes()[:32] == seed
    assert peer_id_from_seed(seed) == peer_id_from_seed(seed) != peer_id_from_seed(bytes(32))
    with pytest.raises(ConfigError, match="exactly 32 bytes, got 31 bytes"):
        key_pair_from_seed(seed[:31])


def test_log_lines_are_key_value() -> None:
    assert kv("x", peer="p", reason="a b", n=3) == 'event=x peer=p reason="a b" n=3'


# -- peer exchange decisions ---------------------------------------------------


def test_dialable_addrs_strip_p2p_and_drop_junk() -> None:
    addrs = [f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER_A}", "/ip4/127.0.0.1/tcp/4001", "junk", "/ip4/1.2.3.4/udp/9"]
    assert dialable_addrs(addrs) == ("/ip4/127.0.0.1/tcp/4001",)


def test_build_reply_excludes_requester_and_unknown_addresses() -> None:
    table = {"a": ["/ip4/127.0.0.1/tcp/1"], "b": [], "req": ["/ip4/127.0.0.1/tcp/3"]}
    reply = build_reply(["a", "b", "req"], lambda p: table[p], "req", 10, random.Random(1))
    assert reply == PeersReply((PeerEntry("a", ("/ip4/127.0.0.1/tcp/1",)),))
    assert decode(PeersReply, encode(reply)) == reply


def test_choose_dials_skips_self_connected_excluded_and_duplicates() -> None:
    offered = [PeerEntry(p, ("/ip4/127.0.0.1/tcp/1",)) for p in ["me", "c", "x", "n1", "n1", "n2", "n3"]]
    chosen = choose_dials(offered, self_id="me", connected={"c"}, excluded={"x"}, want=2)
    assert [e.peer_id for e in chosen] == ["n1", "n2"]


def test_status_reply_round_trip_and_strictness() -> None:
    reply = StatusReply((("height", 5), ("ready", True)))
    assert decode(StatusReply, encode(reply)) == reply
    with pytest.raises(DecodeError):
        decode(StatusReply, b"\x91\x81\xa1x\xc0")  # a nil value is not a scalar


# -- metrics -------------------------------------------------------------------


def test_every_net_metric_is_documented_by_its_own_docstring() -> None:
    """Each counter's docstring sits right under it (what /metrics readers and the operator guide rely on).

    The attribute docstrings exist only in the source, so read them there: one string per field, none
    standing alone (two in a row meant a field documented by its neighbour's text).
    """
    import ast
    import inspect

    from p2pgpu.net import metrics

    cls = next(n for n in ast.parse(inspect.getsource(metrics)).body
               if isinstance(n, ast.ClassDef) and n.name == "NetMetrics")
    docs: dict[str, str] = {}
    field = None
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            field = node.target.id
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            assert field is not None and field not in docs, f"a docstring after {field!r} documents no field"
            docs[field] = node.value.value
    assert "waited" in docs["publish_waits"] and "went ahead" in docs["publish_wait_timeouts"]
