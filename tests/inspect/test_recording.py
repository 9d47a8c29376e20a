"""Recordings: events -> JSON lines -> events gives the same summary; bad lines are named by number."""

from __future__ import annotations

import json

import pytest

from p2pgpu.cli import main
from p2pgpu.inspect import EventType, InspectorState, RecordingError, RecordWriter, parse_event, read_recording
from p2pgpu.inspect.render import summary_json

from .test_state import TASK, deliver, ev, task_life

E = EventType


def session() -> list:
    return [
        ev(0, E.JOIN, "tx"), ev(0, E.ADD_PEER, peer="A"), ev(0.1, E.JOIN, "tx", peer="A"),
        ev(0.2, E.GRAFT, "tx", peer="A"),
        *task_life(),
        ev(4.2, E.DUPLICATE, "block", peer="A", msg_id="09", size=100),
        ev(4.3, E.REJECT, "tx", peer="A", msg_id="ff", size=4, reason="malformed",
           fields={"detail": "Transaction: bad", "blame": True}),
        deliver(4.4, "consensus", "VoteMessage", "0a", height=6, round=0, step="prevote", verified=False,
                note="committee of epoch 1 not known yet"),
    ]


def write(path, events) -> None:
    with path.open("w", encoding="utf-8") as f:
        writer = RecordWriter(f)
        for e in events:
            writer.write(e)
    assert writer.written == len(events)


def test_every_event_survives_the_json_line_round_trip():
    for e in session():
        assert parse_event(e.to_json()) == e


def test_record_then_replay_gives_the_same_summary(tmp_path):
    path = tmp_path / "rec.jsonl"
    live = InspectorState(follow_task=TASK)
    events = session()
    live.apply_all(events)
    write(path, events)
    replayed = InspectorState(follow_task=TASK)
    replayed.apply_all(read_recording(path))
    assert replayed.summary() == live.summary()
    assert replayed.summary().topic("tx").rejected == {"malformed": 1}


def test_each_line_is_one_json_object_with_the_tracer_fields(tmp_path):
    path = tmp_path / "rec.jsonl"
    write(path, session())
    lines = path.read_text().splitlines()
    reject = json.loads(next(line for line in lines if '"REJECT"' in line))
    assert reject["event"] == "REJECT" and reject["reason"] == "malformed" and reject["msg_id"] == "ff"
    assert reject["fields"]["blame"] is True
    vote = json.loads(lines[-1])
    assert vote["kind"] == "VoteMessage" and vote["fields"]["height"] == 6


@pytest.mark.parametrize("bad, problem", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"ts": 1, "event": "EXPLODE"}', "'event' must be one of"),
    ('{"ts": -1, "event": "DELIVER", "topic": "tx"}', "'ts' must be"),
    ('{"ts": 1, "event": "DELIVER"}', "needs a 'topic'"),
    ('{"ts": 1, "event": "REJECT", "topic": "tx"}', "needs a 'reason'"),
    ('{"ts": 1, "event": "DELIVER", "topic": "tx", "msg_id": "zz"}', "'msg_id' is not hex"),
    ('{"ts": 1, "event": "DELIVER", "topic": "tx", "size": "big"}', "'size' must be"),
    ('{"ts": 1, "event": "DELIVER", "topic": "tx", "extra": 1}', "unknown key(s): extra"),
    ('{"ts": 1, "event": "DELIVER", "topic": "tx", "fields": {"a": {"b": 1}}}', "fields.a"),
])
def test_a_malformed_line_is_an_error_naming_its_number(tmp_path, bad, problem):
    path = tmp_path / "rec.jsonl"
    good = [e.to_json() for e in session()[:3]]
    path.write_text("\n".join([good[0], good[1], bad, good[2]]) + "\n")
    with pytest.raises(RecordingError) as info:
        list(read_recording(path))
    assert info.value.line == 3
    assert problem in str(info.value)
    assert f"{path}: line 3: " in str(info.value)


def test_skip_bad_reports_each_bad_line_and_keeps_the_rest(tmp_path):
    path = tmp_path / "rec.jsonl"
    good = [e.to_json() for e in session()[:3]]
    path.write_text("\n".join([good[0], "oops", good[1], "", "{}", good[2]]) + "\n")
    bad: list[RecordingError] = []
    events = list(read_recording(path, skip_bad=True, on_bad=bad.append))
    assert len(events) == 3
    assert [b.line for b in bad] == [2, 5]


def test_missing_recording_is_a_clear_error(tmp_path):
    with pytest.raises(RecordingError, match="no such file"):
        list(read_recording(tmp_path / "nope.jsonl"))


# ------------------------------------------------------------------ CLI


def test_cli_replay_json_summary_matches_the_live_one(tmp_path, capsys):
    path = tmp_path / "rec.jsonl"
    events = session()
    write(path, events)
    live = InspectorState(follow_task=TASK[:10])
    live.apply_all(events)
    assert main(["inspect", "replay", str(path), "--json", "--follow-task", TASK[:10]]) == 0
    out = capsys.readouterr().out.strip()
    assert out == summary_json(live.summary())


def test_cli_replay_prints_events_then_the_summary(tmp_path, capsys):
    path = tmp_path / "rec.jsonl"
    write(path, session())
    assert main(["inspect", "replay", str(path), "--follow-task", TASK]) == 0
    out = capsys.readouterr().out
    assert "REJECT" in out and "reason=malformed" in out
    assert "Assign in block 6" in out
    assert main(["inspect", "replay", str(path), "--summary"]) == 0
    assert "REJECT " not in capsys.readouterr().out


def test_cli_replay_stops_at_a_bad_line_unless_told_to_skip(tmp_path, capsys):
    path = tmp_path / "rec.jsonl"
    good = [e.to_json() for e in session()[:3]]
    path.write_text("\n".join([good[0], good[1], "garbage", good[2]]) + "\n")
    assert main(["inspect", "replay", str(path), "--summary"]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "--skip-bad" in err
    assert main(["inspect", "replay", str(path), "--summary", "--skip-bad", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["events"] == 3
    assert "line 3" in captured.err and "1 malformed line(s) skipped" in captured.err


def test_cli_live_refuses_missing_genesis_and_bootstrap(tmp_path, capsys):
    assert main(["inspect", "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/x"]) == 2
    assert "--genesis" in capsys.readouterr().err
    assert main(["inspect", "--genesis", str(tmp_path / "g.json"), "--bootstrap", str(tmp_path / "none")]) == 2
    assert "genesis file not found" in capsys.readouterr().err


def test_bootstrap_may_be_a_node_json_or_its_data_directory(tmp_path):
    from p2pgpu.cli import CLIError
    from p2pgpu.inspect_cli import resolve_bootstrap

    addr = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWExample"
    (tmp_path / "node.json").write_text(json.dumps({"addrs": [addr, "/ip4/127.0.0.1/tcp/4001"]}))
    assert resolve_bootstrap([str(tmp_path)]) == (addr,)
    assert resolve_bootstrap([str(tmp_path / "node.json"), addr]) == (addr,)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CLIError, match="cannot read node addresses"):
        resolve_bootstrap([str(tmp_path / "bad.json")])
    with pytest.raises(CLIError, match="neither a multiaddr"):
        resolve_bootstrap(["nonsense"])
