"""``/p2pgpu/sync/1``: finalized blocks by height, for late and restarted nodes.

Request: one :class:`~ledger.consensus.SyncRequest` frame. Response: one
frame per :class:`~ledger.blocks.FinalizedBlock`, then the end marker. One
block per frame keeps every frame under the transport's frame limit however
many blocks are asked for.

The client checks nothing but the framing and the order of heights; the
consensus engine checks every certificate when it applies the blocks
(:class:`~ledger.consensus.BlocksSynced`), and ``Chain.commit`` checks them
again before anything is stored. A peer that answers with an undecodable
block or the wrong height is charged through ``Network.penalize`` (scored,
banned past the threshold), as a malformed request is on the server side.
"""

from __future__ import annotations

import logging

import trio

from ledger.blocks import FinalizedBlock
from ledger.chain import Chain
from ledger.codec import DecodeError, decode, encode
from ledger.consensus import MAX_SYNC_BLOCKS, SyncRequest
from p2pgpu.net import FramedStream, Network, NetError, ProtocolError
from p2pgpu.net.log import log
from p2pgpu.topics import SYNC_PROTOCOL

logger = logging.getLogger(__name__)


class SyncFailed(Exception):
    """No usable blocks came back from the peer (unreachable, timed out, or sent garbage)."""


def make_sync_handler(chain: Chain, *, timeout: float):
    """A stream handler serving blocks from ``chain``'s store.

    Reading the request, and sending each block, must each finish within
    ``timeout`` seconds: a client that goes silent (or stops reading) would
    otherwise hold one of the host's few inbound stream slots for ever.
    Overrunning raises ``trio.TooSlowError``, which the request/response layer
    counts as a timeout before resetting the stream.
    """

    async def serve(stream: FramedStream) -> None:
        with trio.fail_after(timeout):
            raw = await stream.receive_exactly_one()
        try:
            request = decode(SyncRequest, raw)
        except DecodeError as exc:
            raise ProtocolError(f"bad sync request from {stream.context.peer}: {exc}") from exc
        first = max(request.from_height, 1)
        last = min(chain.height, first + min(request.max_blocks, MAX_SYNC_BLOCKS) - 1)
        sent = 0
        for height in range(first, last + 1):
            with trio.fail_after(timeout):
                await stream.send(chain.store.get_block(height))
            sent += 1
        with trio.fail_after(timeout):
            await stream.send_end()
        log(logger, logging.DEBUG, "sync_served", peer=stream.context.peer, first=first, blocks=sent)

    return serve


async def fetch_blocks(
    network: Network, peer: str, from_height: int, *, max_blocks: int = 64, timeout: float = 10.0
) -> tuple[FinalizedBlock, ...]:
    """Ask ``peer`` for finalized blocks from ``from_height``; empty if it has none."""
    request = encode(SyncRequest(from_height=from_height, max_blocks=min(max_blocks, MAX_SYNC_BLOCKS)))
    blocks: list[FinalizedBlock] = []
    try:
        with trio.fail_after(timeout):
            async with network.open_stream(peer, SYNC_PROTOCOL) as stream:
                await stream.send(request)
                await stream.send_end()
                async for frame in stream:
                    block = decode(FinalizedBlock, frame)
                    expected = from_height + len(blocks)
                    if block.block.height != expected:
                        detail = f"peer {peer} sent block {block.block.height}, expected {expected}"
                        network.penalize(peer, SYNC_PROTOCOL, "wrong_height", detail)
                        raise SyncFailed(detail)
                    blocks.append(block)
                    if len(blocks) >= max_blocks:
                        break
    except trio.TooSlowError:
        if not blocks:
            raise SyncFailed(f"peer {peer} sent no blocks within {timeout} s") from None
    except DecodeError as exc:
        network.penalize(peer, SYNC_PROTOCOL, "malformed_block", str(exc))
        raise SyncFailed(f"peer {peer} sent a malformed block: {exc}") from exc
    except NetError as exc:
        if not blocks:
            raise SyncFailed(f"sync from {peer} failed: {exc}") from exc
    return tuple(blocks)
