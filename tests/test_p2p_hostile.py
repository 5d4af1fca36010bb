"""A scripted hostile peer against a real `dpodl node` process over TCP on 127.0.0.1.

Each attack comes from its own loopback address (127.0.0.2, .3, …): the node bans the
address of a peer that misbehaves, so one attack's ban must not stop the next. After
each one the node has closed the connection, banned the address, kept its honest peer
and its RPC, and its tip has not moved.
"""

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from consensus.blocks import Block, assemble_block, compute_block_id
from consensus.encoding import ZERO_HASH, Hash
from consensus.keys import PrivateKey
from consensus.params import DEV, genesis_block
from consensus.proofs import Proof, check_target, compute_posthash
from consensus.tasks import compute_task_id
from p2p.framing import HEADER, ConnectionClosed, FrameError, encode_frame, read_frame
from p2p.handshake import compute_genesis_id, handshake
from p2p.messages import (
    INV_BLOCK,
    INV_TX,
    MAX_CONTROL,
    PROTOCOL_VERSION,
    GetHeaders,
    Headers,
    Inv,
    InvItem,
    Kind,
    Message,
    Ping,
    Version,
    decode_payload,
    encode_payload,
)
from tests.forge import find_nonce
from tests.test_node import NodeProcess

TIMEOUT = 20.0
MAGIC = DEV.magic
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A node with one honest peer (a second node) connected to it."""
    home = tmp_path_factory.mktemp("target")
    node = NodeProcess(home)
    honest = NodeProcess(tmp_path_factory.mktemp("honest"), "--peer",
                         f"127.0.0.1:{node.p2p_port}")
    try:
        node.wait_for(lambda: node.call("getconnectioncount") == 1, "the honest peer")
        yield node
    finally:
        honest.kill()
        node.kill()


async def connect(node: NodeProcess, source: str) -> Streams:
    return await asyncio.open_connection("127.0.0.1", node.p2p_port, local_addr=(source, 0))


async def shake(streams: Streams, best_height: int = 0) -> None:
    ours = Version(PROTOCOL_VERSION, compute_genesis_id(DEV), best_height, 0,
                   int.from_bytes(os.urandom(8), "big"), b"/hostile/")
    await handshake(*streams, DEV, ours=ours, timeout=TIMEOUT, max_payload=MAX_CONTROL)


def send(streams: Streams, msg: Message) -> None:
    streams[1].write(encode_frame(MAGIC, *encode_payload(msg)))


async def expect(streams: Streams, kind: Kind) -> Message:
    """Read until a message of `kind` comes (pings and the like are skipped)."""
    while True:
        got, payload = await read_frame(streams[0], MAGIC, max_payload=1 << 26, timeout=TIMEOUT)
        if got == kind:
            return decode_payload(got, payload)


async def closed_by_node(streams: Streams) -> bool:
    """True once the node has closed the connection (whatever it still had to say)."""
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:
                await read_frame(streams[0], MAGIC, max_payload=1 << 26, timeout=TIMEOUT)
    except (ConnectionClosed, FrameError, ConnectionError):
        return True
    except TimeoutError:
        return False


def forged_block() -> Block:
    """A block on genesis whose header passes every cheap check (signature, both lottery
    hashes, target, time) but whose proof claims a step count that is not a multiple of k."""
    key = PrivateKey.generate()
    parent = genesis_block(DEV).header
    prev_id = compute_block_id(parent)
    nonce, h1 = find_nonce(prev_id, key.pubkey)
    target = DEV.t2_genesis
    steps, n_correct = next((s, n) for s in range(1, 1000, 2)
                            for n in range(DEV.genesis_task.t_acc, 251)
                            if check_target(compute_posthash(h1, s, n), target))
    proof = Proof(compute_task_id(DEV.genesis_task), b"", key.pubkey, nonce, steps, n_correct,
                  Hash(os.urandom(32)), Hash(os.urandom(32)))
    return assemble_block(parent, int(time.time()), target, proof, (), key)


async def bad_magic(node: NodeProcess, s: Streams) -> None:
    s[1].write(encode_frame(b"xxxx", *encode_payload(Ping(1))))


async def before_version(node: NodeProcess, s: Streams) -> None:
    send(s, Ping(1))


async def oversize(node: NodeProcess, s: Streams) -> None:
    await shake(s)
    s[1].write(HEADER.pack(MAGIC, Kind.PING, MAX_CONTROL + 1))


async def truncated(node: NodeProcess, s: Streams) -> None:
    await shake(s)
    s[1].write(HEADER.pack(MAGIC, Kind.INV, 100) + b"\x91" * 10)
    await s[1].drain()
    s[1].write_eof()


async def garbage(node: NodeProcess, s: Streams) -> None:
    await shake(s)
    s[1].write(encode_frame(MAGIC, Kind.INV, b"\xc1\xff\x00garbage"))


async def unknown_type(node: NodeProcess, s: Streams) -> None:
    await shake(s)
    s[1].write(encode_frame(MAGIC, 200, b""))


async def forged_proof(node: NodeProcess, s: Streams) -> None:
    block = forged_block()
    await shake(s, best_height=1)
    await expect(s, Kind.GETHEADERS)
    send(s, Headers((block.header,)))
    request = await expect(s, Kind.GETDATA)
    assert request.items == (InvItem(INV_BLOCK, compute_block_id(block.header)),)
    send(s, block)


async def unknown_parent(node: NodeProcess, s: Streams) -> None:
    orphan = Block(replace(forged_block().header, prev_id=Hash(os.urandom(32))))
    await shake(s, best_height=5)
    await expect(s, Kind.GETHEADERS)
    send(s, Inv((InvItem(INV_BLOCK, compute_block_id(orphan.header)),)))
    send(s, Headers((orphan.header,)))


async def unrequested_block(node: NodeProcess, s: Streams) -> None:
    await shake(s)
    send(s, forged_block())


async def inv_flood(node: NodeProcess, s: Streams) -> None:
    await shake(s)
    for _ in range(20):
        send(s, Inv(tuple(InvItem(INV_TX, Hash(os.urandom(32))) for _ in range(1000))))


async def repeated_version(node: NodeProcess, s: Streams) -> None:
    await shake(s)
    send(s, Version(PROTOCOL_VERSION, compute_genesis_id(DEV), 0, 0, 5, b"/again/"))


async def unanswered_getheaders(node: NodeProcess, s: Streams) -> None:
    """Not misbehaviour by itself: answering getheaders with an empty list is fine, and
    the connection stays up (the control case for the attacks above)."""
    await shake(s)
    await expect(s, Kind.GETHEADERS)
    send(s, Headers(()))
    send(s, GetHeaders((ZERO_HASH,), ZERO_HASH))
    await expect(s, Kind.HEADERS)


Attack = Callable[[NodeProcess, Streams], Awaitable[None]]
ATTACKS: list[tuple[str, Attack]] = [
    ("bad-magic", bad_magic), ("before-version", before_version), ("oversize", oversize),
    ("truncated", truncated), ("garbage", garbage), ("unknown-type", unknown_type),
    ("forged-proof", forged_proof), ("unknown-parent", unknown_parent),
    ("unrequested-block", unrequested_block), ("inv-flood", inv_flood),
    ("repeated-version", repeated_version),
]


@pytest.mark.parametrize(("index", "attack"), [(i, a) for i, (_, a) in enumerate(ATTACKS)],
                         ids=[name for name, _ in ATTACKS])
def test_hostile_peer_is_disconnected_and_banned_and_changes_nothing(target, index, attack):
    source = f"127.0.0.{index + 2}"
    tip, height = target.call("getbestblockhash"), target.call("getblockcount")
    tips = target.call("getchaintips")

    async def run() -> None:
        streams = await connect(target, source)
        with contextlib.suppress(ConnectionError):  # the node may hang up mid-attack
            await attack(target, streams)
            await streams[1].drain()
        assert await closed_by_node(streams), "the node kept the connection"
        streams[1].close()
        # Banned: a new connection from that address is dropped before any handshake.
        again = await connect(target, source)
        assert await closed_by_node(again)
        again[1].close()

    asyncio.run(run())
    assert source in [b["address"] for b in target.call("listbanned")]
    assert (target.call("getbestblockhash"), target.call("getblockcount")) == (tip, height)
    peers = target.call("getpeerinfo")
    assert [p["addr"].split(":")[0] for p in peers] == ["127.0.0.1"]  # the honest one stays
    assert target.call("getchaintips") == tips


def test_an_honest_exchange_keeps_the_connection(target):
    async def run() -> None:
        streams = await connect(target, "127.0.0.100")
        await unanswered_getheaders(target, streams)
        assert not await asyncio.wait_for(closed_by_node_soon(streams), TIMEOUT)
        streams[1].close()

    asyncio.run(run())
    assert "127.0.0.100" not in [b["address"] for b in target.call("listbanned")]


async def closed_by_node_soon(streams: Streams, wait: float = 1.0) -> bool:
    try:
        await read_frame(streams[0], MAGIC, max_payload=1 << 26, timeout=wait)
    except FrameError as e:
        return e.reason != "timeout"
    except ConnectionClosed:
        return True
    return False
