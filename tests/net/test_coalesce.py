"""Coalescing of a peer's queued pubsub RPCs into one write (``p2pgpu.net.gossip.coalesce_queued``)."""

from __future__ import annotations

from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.rpc_queue import RpcQueue

from p2pgpu.net.gossip import coalesce_queued


def _publish(data: bytes, topic: str = "t") -> rpc_pb2.RPC:
    return rpc_pb2.RPC(publish=[rpc_pb2.Message(data=data, topicIDs=[topic])])


def _graft(topic: str) -> rpc_pb2.RPC:
    return rpc_pb2.RPC(control=rpc_pb2.ControlMessage(graft=[rpc_pb2.ControlGraft(topicID=topic)]))


def _queue(*rpcs: rpc_pb2.RPC, priority: tuple[int, ...] = ()) -> RpcQueue:
    queue = RpcQueue(max_size=100)
    for i, rpc in enumerate(rpcs):
        assert queue.push(rpc, priority=i in priority)
    return queue


def test_a_lone_rpc_goes_out_as_it_is() -> None:
    first = _publish(b"a")
    assert coalesce_queued(first, _queue(), 1 << 16) is first


def test_queued_messages_are_merged_in_queue_order_and_the_queue_is_emptied() -> None:
    queue = _queue(_publish(b"b"), _publish(b"c", "u"), _publish(b"d"))
    merged = coalesce_queued(_publish(b"a"), queue, 1 << 16)
    assert [m.data for m in merged.publish] == [b"a", b"b", b"c", b"d"]
    assert [list(m.topicIDs) for m in merged.publish] == [["t"], ["t"], ["u"], ["t"]]
    assert len(queue) == 0


def test_control_entries_merge_beside_messages() -> None:
    queue = _queue(_publish(b"b"), _graft("x"), priority=(1,))
    merged = coalesce_queued(_publish(b"a"), queue, 1 << 16)
    assert [m.data for m in merged.publish] == [b"a", b"b"]
    assert [g.topicID for g in merged.control.graft] == ["x"]


def test_the_merged_rpc_stays_within_the_limit_and_the_rest_stays_queued_in_order() -> None:
    payload = bytes(1000)
    queue = _queue(*(_publish(payload + bytes([i])) for i in range(10)))
    limit = 3500
    merged = coalesce_queued(_publish(payload + b"\xff"), queue, limit)
    assert merged.ByteSize() <= limit
    assert len(merged.publish) == 3
    assert len(queue) == 8
    rest = queue._queue.pop()
    assert rest is not None and rest.publish[0].data == payload + bytes([2])


def test_an_rpc_over_the_limit_on_its_own_is_still_sent_alone() -> None:
    big = _publish(bytes(10_000))
    queue = _queue(_publish(b"small"))
    assert coalesce_queued(big, queue, 4096) is big
    assert len(queue) == 1


def test_merged_bytes_parse_back_to_every_message() -> None:
    queue = _queue(*(_publish(bytes([i]) * 50) for i in range(20)))
    merged = coalesce_queued(_publish(b"first"), queue, 1 << 16)
    parsed = rpc_pb2.RPC.FromString(merged.SerializeToString())
    assert [m.data for m in parsed.publish] == [b"first"] + [bytes([i]) * 50 for i in range(20)]
