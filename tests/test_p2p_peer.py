"""p2p.peer over in-memory stream pairs: sending, receiving, the send queue's bound,
closing, and the bounded sets and rate limits a peer carries."""

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from consensus.blocks import compute_block_id
from consensus.encoding import Hash, tagged_hash
from consensus.params import DEV, ChainParams
from p2p.framing import HEADER, ConnectionClosed, FrameError, encode_frame
from p2p.messages import (
    CHUNK_SIZE,
    INV_BLOCK,
    INV_TX,
    MAX_CONTROL,
    MAX_INV,
    Block,
    Headers,
    Inv,
    InvItem,
    Kind,
    ModelChunk,
    Ping,
    Pong,
    ProtocolError,
    encode_payload,
    max_payload,
)
from p2p.peer import KnownSet, Peer, RateLimit
from tests.builder import ChainBuilder
from tests.test_p2p_handshake import version

SLOW = 2.0  # a deadline no passing test comes near
SEND_QUEUE = 16 << 20

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Wires:
    """Connected stream pairs and peers over socketpairs, all closed at teardown."""

    def __init__(self) -> None:
        self._peers: list[Peer] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def streams(self) -> tuple[Streams, Streams]:
        left, right = socket.socketpair()
        ends = (await asyncio.open_connection(sock=left),
                await asyncio.open_connection(sock=right))
        self._writers += [ends[0][1], ends[1][1]]
        return ends

    def peer(self, ends: Streams, *, params: ChainParams = DEV, inbound: bool = False,
             send_queue_bytes: int = SEND_QUEUE, **version_changes: Any) -> Peer:
        reader, writer = ends
        peer = Peer(reader, writer, params=params, addr=("127.0.0.1", 9000 + len(self._peers)),
                    inbound=inbound, version=version(params, **version_changes),
                    send_queue_bytes=send_queue_bytes)
        self._peers.append(peer)
        return peer

    async def peers(self, *, params: ChainParams = DEV,
                    send_queue_bytes: int = SEND_QUEUE) -> tuple[Peer, Peer]:
        """Two peers, each the other's end of one connection."""
        left, right = await self.streams()
        return (self.peer(left, params=params, send_queue_bytes=send_queue_bytes),
                self.peer(right, params=params, inbound=True, send_queue_bytes=send_queue_bytes))

    async def close(self) -> None:
        for peer in self._peers:
            peer.close("test over")
        for writer in self._writers:
            writer.transport.abort()
        for peer in self._peers:
            await asyncio.wait_for(peer.wait_closed(), SLOW)


@pytest.fixture
async def wires() -> AsyncIterator[Wires]:
    w = Wires()
    yield w
    await w.close()


def block_ids(n: int) -> list[Hash]:
    return [tagged_hash("test-block", i) for i in range(n)]


# --- sending and receiving ----------------------------------------------------------

def _messages() -> list[Any]:
    builder = ChainBuilder()
    blocks = builder.chain(builder.genesis_id, 3)
    return [
        Ping(2**64 - 1),
        Pong(0),
        Inv(tuple(InvItem(INV_BLOCK if i % 2 else INV_TX, h)
                  for i, h in enumerate(block_ids(MAX_INV)))),
        Headers(tuple(b.header for b in blocks)),
        blocks[-1],
        ModelChunk(tagged_hash("model", 1), 0, 5, b"hello"),
        # A full chunk: over MAX_CONTROL, under the cap of its own kind.
        ModelChunk(tagged_hash("model", 2), CHUNK_SIZE, 3 * CHUNK_SIZE, b"\x07" * CHUNK_SIZE),
    ]


async def test_messages_round_trip_in_order(wires: Wires) -> None:
    a, b = await wires.peers()
    sent = _messages()
    assert len(encode_payload(sent[-1])[1]) > MAX_CONTROL
    for msg in sent:
        a.send(msg)
    got = [await b.receive(SLOW) for _ in sent]
    assert got == sent
    frames = sum(len(encode_payload(m)[1]) + HEADER.size for m in sent)
    assert a.bytes_sent == b.bytes_recv == frames
    assert b.last_recv > 0 and a.last_send > 0
    # And back the other way on the same connection.
    b.send(Pong(7))
    assert await a.receive(SLOW) == Pong(7)


async def test_send_raw_passes_stored_bytes_through(wires: Wires) -> None:
    a, b = await wires.peers()
    builder = ChainBuilder()
    block = builder.extend(builder.genesis_id)
    kind, payload = encode_payload(block)
    assert kind == Kind.BLOCK
    a.send_raw(Kind.BLOCK, payload)
    got = await b.receive(SLOW)
    assert isinstance(got, Block) and got == block
    assert compute_block_id(got.header) == compute_block_id(block.header)


# --- the send queue's bound ---------------------------------------------------------

async def test_peer_that_never_reads_is_dropped_for_send_queue_full(wires: Wires) -> None:
    bound = 64 << 10
    a, _b = await wires.peers(send_queue_bytes=bound)  # _b never reads
    msg = Inv(tuple(InvItem(INV_TX, h) for h in block_ids(MAX_INV)))
    frame = len(encode_payload(msg)[1]) + HEADER.size
    assert frame < bound
    sent = 0
    for _ in range(2000):  # ~70 MB: far beyond what the socket and the transport buffer
        a.send(msg)
        sent += frame
        await asyncio.sleep(0)  # let the writer task move what it can
        if not a.alive:
            break
    assert a.close_reason == "send-queue-full"
    await asyncio.wait_for(a.wait_closed(), SLOW)
    assert a.bytes_sent < sent  # it was closed with bytes still owed
    a.send(Ping(1))  # sending to a closed peer is a no-op, not an error
    assert a.close_reason == "send-queue-full"


async def test_peer_that_reads_is_not_dropped_however_much_is_sent(wires: Wires) -> None:
    bound = 64 << 10
    a, b = await wires.peers(send_queue_bytes=bound)
    msg = Inv(tuple(InvItem(INV_TX, h) for h in block_ids(MAX_INV)))
    for i in range(50):  # 50 frames of ~37 KB: 30 times the bound in all
        a.send(msg)
        assert await b.receive(SLOW) == msg, i
    assert a.alive and a.bytes_sent > 20 * bound


async def test_room_paces_a_sender_to_its_reader(wires: Wires) -> None:
    """A sender that waits for room (as getdata's blocks do) is held back while its
    reader does not read, is not dropped, and gets everything through once it does."""
    bound = 256 << 10
    a, b = await wires.peers(send_queue_bytes=bound)
    msg = Inv(tuple(InvItem(INV_TX, h) for h in block_ids(MAX_INV)))
    frame = len(encode_payload(msg)[1]) + HEADER.size
    count = 200  # ~7 MB: far beyond the bound and what a socketpair buffers

    async def sender() -> None:
        for _ in range(count):
            await a.room(frame)
            a.send(msg)

    task = asyncio.ensure_future(sender())
    await asyncio.sleep(0.2)
    assert not task.done() and a.alive  # held back, not dropped
    for i in range(count):
        assert await b.receive(SLOW) == msg, i
    await asyncio.wait_for(task, SLOW)
    assert a.alive and a.bytes_sent == count * frame


async def test_one_frame_larger_than_the_bound_closes_at_once(wires: Wires) -> None:
    a, _b = await wires.peers(send_queue_bytes=1000)
    a.send(ModelChunk(tagged_hash("m", 0), 0, 2000, bytes(2000)))
    assert a.close_reason == "send-queue-full"
    await asyncio.wait_for(a.wait_closed(), SLOW)


# --- closing ------------------------------------------------------------------------

async def test_close_is_idempotent_and_keeps_the_first_reason(wires: Wires) -> None:
    a, b = await wires.peers()
    a.send(Ping(1))
    assert await b.receive(SLOW) == Ping(1)
    assert a.alive
    a.close("first")
    a.close("second")
    assert not a.alive and a.close_reason == "first"
    await asyncio.wait_for(a.wait_closed(), SLOW)
    a.close("third")
    assert a.close_reason == "first"
    with pytest.raises(ConnectionClosed):  # the other end sees the connection go
        await b.receive(SLOW)


async def test_close_right_after_construction_still_sets_closed(wires: Wires) -> None:
    # The writer task never ran: it is cancelled before its first step.
    left, _right = await wires.streams()
    peer = wires.peer(left)
    peer.close("at once")
    await asyncio.wait_for(peer.wait_closed(), SLOW)
    assert peer.closed.is_set() and peer.close_reason == "at once"


async def test_queued_frames_are_not_sent_after_close(wires: Wires) -> None:
    a, b = await wires.peers()
    a.send(Ping(1))
    a.close("now")  # before the writer task had its turn
    with pytest.raises(ConnectionClosed):
        await b.receive(SLOW)
    assert a.bytes_sent == 0


async def test_lost_connection_closes_the_peer(wires: Wires) -> None:
    (ra, wa), (rb, wb) = await wires.streams()
    a = wires.peer((ra, wa))
    wb.transport.abort()  # the other side vanishes
    for _ in range(100):
        a.send(Ping(1))
        await asyncio.sleep(0.01)
        if not a.alive:
            break
    assert a.close_reason == "connection-lost"
    await asyncio.wait_for(a.wait_closed(), SLOW)


# --- receiving garbage --------------------------------------------------------------

async def _receive_after(wires: Wires, raw: bytes, *, eof: bool = False,
                         timeout: float = SLOW) -> Any:
    """What our peer's receive() makes of `raw` written by the other end."""
    ours, (_, theirs) = await wires.streams()
    peer = wires.peer(ours)
    theirs.write(raw)
    await theirs.drain()
    if eof:
        theirs.write_eof()
    return await peer.receive(timeout)


async def test_clean_eof_between_frames_is_connection_closed(wires: Wires) -> None:
    with pytest.raises(ConnectionClosed):
        await _receive_after(wires, b"", eof=True)
    ping = encode_frame(DEV.magic, *encode_payload(Ping(3)))
    ours, (_, theirs) = await wires.streams()
    peer = wires.peer(ours)
    theirs.write(ping)
    theirs.write_eof()
    assert await peer.receive(SLOW) == Ping(3)
    with pytest.raises(ConnectionClosed):
        await peer.receive(SLOW)


@pytest.mark.parametrize(
    ("raw", "eof", "reason", "protocol"),
    [
        (encode_frame(b"xxxx", Kind.PING, encode_payload(Ping(1))[1]), False, "bad-magic",
         False),
        # Only the header: the cap is checked before any payload is awaited.
        (HEADER.pack(DEV.magic, Kind.PING, MAX_CONTROL + 1), False, "oversize", False),
        (HEADER.pack(DEV.magic, Kind.INV, MAX_CONTROL + 1), False, "oversize", False),
        (HEADER.pack(DEV.magic, Kind.MODEL, max_payload(DEV, Kind.MODEL) + 1), False,
         "oversize", False),
        (HEADER.pack(DEV.magic, Kind.BLOCK, DEV.max_block_bytes + 1), False, "oversize",
         False),
        (HEADER.pack(DEV.magic, 200, 0), False, "unknown-message", True),
        (HEADER.pack(DEV.magic, 200, 10), False, "unknown-message", True),
        (encode_frame(DEV.magic, Kind.PING, b"\xc1"), False, "malformed", True),
        (encode_frame(DEV.magic, Kind.VERACK, b"\x90"), False, "malformed", True),
        (HEADER.pack(DEV.magic, Kind.PING, 10) + b"\x00" * 3, True, "truncated", False),
        (DEV.magic + b"\x02", True, "truncated", False),
    ],
    ids=["magic", "ping-cap", "inv-cap", "model-cap", "block-cap", "unknown-kind",
         "unknown-kind-with-payload", "bad-payload", "verack-with-payload", "truncated-payload",
         "truncated-header"],
)
async def test_garbage_is_refused_with_a_reason(
    wires: Wires, raw: bytes, eof: bool, reason: str, protocol: bool
) -> None:
    start = time.monotonic()
    with pytest.raises(FrameError) as info:
        await _receive_after(wires, raw, eof=eof)
    assert info.value.reason == reason, info.value
    assert isinstance(info.value, ProtocolError) == protocol
    assert time.monotonic() - start < SLOW / 2, "the error waited for the timeout"


async def test_caps_are_per_kind() -> None:
    assert max_payload(DEV, Kind.PING) == MAX_CONTROL
    assert max_payload(DEV, Kind.MODEL) > CHUNK_SIZE >= MAX_CONTROL
    assert max_payload(DEV, Kind.BLOCK) == DEV.max_block_bytes
    with pytest.raises(ProtocolError) as info:
        max_payload(DEV, len(Kind))
    assert info.value.reason == "unknown-message"


async def test_silence_is_a_timeout(wires: Wires) -> None:
    start = time.monotonic()
    with pytest.raises(FrameError) as info:
        await _receive_after(wires, b"", timeout=0.1)
    assert info.value.reason == "timeout"
    assert 0.09 <= time.monotonic() - start < SLOW / 2


# --- KnownSet and RateLimit ---------------------------------------------------------

def test_known_set_forgets_the_oldest_beyond_capacity() -> None:
    known = KnownSet(3)
    for item in "abc":
        known.add(item)
    assert len(known) == 3 and all(i in known for i in "abc")
    known.add("d")
    assert "a" not in known and all(i in known for i in "bcd") and len(known) == 3
    known.add("b")  # seen again: now the newest
    known.add("e")
    assert "c" not in known and all(i in known for i in "bde") and len(known) == 3
    known.add("e")  # a repeat takes no room
    assert len(known) == 3 and all(i in known for i in "bde")


def test_rate_limit_spends_and_refills() -> None:
    limit = RateLimit(rate=2.0, burst=5.0)
    # The bucket is full when made and refills from then on its own clock (monotonic),
    # so the explicit times start there; whole numbers keep the arithmetic exact.
    t = float(math.ceil(time.monotonic()))
    assert all(limit.take(now=t) for _ in range(5))
    assert not limit.take(now=t)
    assert not limit.take(2.0, now=t + 0.5)  # one token back: not two
    assert limit.take(now=t + 0.5)
    assert not limit.take(now=t + 0.5)
    assert limit.take(3.0, now=t + 2.0)  # three back
    assert not limit.take(0.5, now=t + 2.0)
    # Refilling stops at the burst, however long the wait.
    assert limit.take(5.0, now=t + 1000.0)
    assert not limit.take(now=t + 1000.0)


def test_rate_limit_refusal_spends_nothing() -> None:
    limit = RateLimit(rate=1.0, burst=10.0)
    t = time.monotonic()
    assert not limit.take(11.0, now=t)
    assert limit.take(10.0, now=t)
