"""The version/verack handshake over real TCP on 127.0.0.1, against honest and scripted peers."""

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest

from consensus.params import DEV, TESTNET, ChainParams
from p2p.framing import ConnectionClosed, FrameError, read_frame, write_frame
from p2p.handshake import compute_genesis_id, handshake
from p2p.messages import (
    MAX_USER_AGENT,
    PROTOCOL_VERSION,
    Kind,
    Ping,
    Pong,
    ProtocolError,
    Verack,
    Version,
    decode_payload,
    encode_payload,
)

MAX = 1 << 16
SLOW = 2.0  # the timeout when a test expects none; errors must come well before it
FAST = 0.3

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def version(params: ChainParams = DEV, **changes: Any) -> Version:
    v = Version(protocol=PROTOCOL_VERSION, genesis_id=compute_genesis_id(params),
                best_height=7, listen_port=params.p2p_port, nonce=1, user_agent=b"/dpodl:test/")
    return dataclasses.replace(v, **changes)


@pytest.fixture
async def tcp() -> AsyncIterator[tuple[Streams, Streams]]:
    """A connected (dialer, listener) pair of real TCP stream ends."""
    accepted: asyncio.Future[Streams] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(
        lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dialer = await asyncio.open_connection("127.0.0.1", port)
    listener = await asyncio.wait_for(accepted, SLOW)
    yield dialer, listener
    for _, w in (dialer, listener):
        w.close()
    server.close()
    await server.wait_closed()


async def shake(
    ends: Streams, params: ChainParams = DEV, *, timeout: float = SLOW, **kw: Any
) -> Version:
    reader, writer = ends
    return await handshake(reader, writer, params, timeout=timeout, max_payload=MAX, **kw)


async def send(ends: Streams, msg: Any, params: ChainParams = DEV) -> None:
    kind, payload = encode_payload(msg)
    await write_frame(ends[1], params.magic, kind, payload, timeout=SLOW)


async def send_raw(ends: Streams, kind: int, payload: bytes) -> None:
    await write_frame(ends[1], DEV.magic, kind, payload, timeout=SLOW)


async def expect_reason(coro: Any, reason: str) -> None:
    start = time.monotonic()
    with pytest.raises(FrameError) as info:
        await coro
    assert info.value.reason == reason, info.value
    if reason != "timeout":
        assert time.monotonic() - start < SLOW / 4, "error waited for the timeout"


# --- messages ---------------------------------------------------------------------

def test_kind_codes_are_distinct_bytes() -> None:
    assert len(Kind) == 18
    assert sorted(Kind) == list(range(18))


@pytest.mark.parametrize("msg", [version(), Verack(), Ping(2**64 - 1), Pong(0)])
def test_payload_round_trip(msg: Any) -> None:
    kind, payload = encode_payload(msg)
    assert decode_payload(kind, payload) == msg


@pytest.mark.parametrize(
    ("kind", "payload", "reason"),
    [
        (Kind.VERACK, b"\x90", "malformed"),  # verack is an empty payload, nothing else
        (Kind.PING, b"\xc1", "malformed"),
        (Kind.PING, msgpack.packb((1,)) + b"\x00", "malformed"),  # trailing byte
        (Kind.PONG, msgpack.packb((-1,)), "malformed"),
        (Kind.BLOCK, b"", "malformed"),
        (200, b"", "unknown-message"),
    ],
)
def test_decode_payload_refuses(kind: int, payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_payload(kind, payload)
    assert info.value.reason == reason


# --- handshake --------------------------------------------------------------------

async def test_handshake_both_ways(tcp: tuple[Streams, Streams]) -> None:
    dialer, listener = tcp
    a, b = version(nonce=11, best_height=3), version(nonce=22, listen_port=0)
    got_b, got_a = await asyncio.gather(shake(dialer, ours=a), shake(listener, ours=b))
    assert (got_a, got_b) == (a, b)
    # Both streams are left at a frame boundary, ready for the message loop.
    await send(dialer, Ping(5))
    assert await read_frame(listener[0], DEV.magic, max_payload=MAX, timeout=SLOW) == (
        Kind.PING, encode_payload(Ping(5))[1])


async def test_genesis_mismatch(tcp: tuple[Streams, Streams]) -> None:
    # Same magic, another genesis: the framing layer lets it through, the version does not.
    fork = dataclasses.replace(DEV, genesis_time=DEV.genesis_time + 1)
    assert compute_genesis_id(fork) != compute_genesis_id(DEV)
    dialer, listener = tcp
    await asyncio.gather(
        expect_reason(shake(dialer, DEV, ours=version(DEV, nonce=1)), "genesis-mismatch"),
        expect_reason(shake(listener, fork, ours=version(fork, nonce=2)), "genesis-mismatch"),
    )


async def test_other_network_fails_on_magic(tcp: tuple[Streams, Streams]) -> None:
    assert DEV.magic != TESTNET.magic
    dialer, listener = tcp
    await asyncio.gather(
        expect_reason(shake(dialer, DEV, ours=version(DEV, nonce=1)), "bad-magic"),
        expect_reason(shake(listener, TESTNET, ours=version(TESTNET, nonce=2)), "bad-magic"),
    )


async def test_self_connection_same_nonce(tcp: tuple[Streams, Streams]) -> None:
    dialer, listener = tcp
    await asyncio.gather(
        expect_reason(shake(dialer, ours=version(nonce=42)), "self-connection"),
        expect_reason(shake(listener, ours=version(nonce=42)), "self-connection"),
    )


@pytest.mark.parametrize("first", [Verack(), Ping(1), Pong(1)])
async def test_nothing_before_version(tcp: tuple[Streams, Streams], first: Any) -> None:
    dialer, listener = tcp
    await send(dialer, first)
    await expect_reason(shake(listener, ours=version(nonce=2)), "unexpected-message")


@pytest.mark.parametrize("second", [Ping(1), version(nonce=1)])
async def test_nothing_between_version_and_verack(
    tcp: tuple[Streams, Streams], second: Any
) -> None:
    dialer, listener = tcp
    await send(dialer, version(nonce=1))
    await send(dialer, second)
    await expect_reason(shake(listener, ours=version(nonce=2)), "unexpected-message")


async def test_unknown_kind_before_version(tcp: tuple[Streams, Streams]) -> None:
    dialer, listener = tcp
    await send_raw(dialer, 250, b"")
    await expect_reason(shake(listener, ours=version(nonce=2)), "unexpected-message")


@pytest.mark.parametrize("after_version", [False, True])
async def test_silent_peer_times_out(tcp: tuple[Streams, Streams], after_version: bool) -> None:
    dialer, listener = tcp
    if after_version:  # sends its version, then never its verack
        await send(dialer, version(nonce=1))
    start = time.monotonic()
    await expect_reason(shake(listener, ours=version(nonce=2), timeout=FAST), "timeout")
    assert FAST * 0.9 <= time.monotonic() - start < FAST + 0.5


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgpack.packb((PROTOCOL_VERSION, bytes(32), 0, 0, 1)),  # a field short
        msgpack.packb((PROTOCOL_VERSION, bytes(31), 0, 0, 1, b"")),  # short genesis id
        msgpack.packb((PROTOCOL_VERSION, bytes(32), 0, 1 << 16, 1, b"")),  # port > u16
        msgpack.packb((PROTOCOL_VERSION, bytes(32), 0, 0, 1, b"x" * (MAX_USER_AGENT + 1))),
    ],
)
async def test_malformed_version(tcp: tuple[Streams, Streams], payload: bytes) -> None:
    dialer, listener = tcp
    await send_raw(dialer, Kind.VERSION, payload)
    await expect_reason(shake(listener, ours=version(nonce=2)), "malformed")


async def test_longest_user_agent_accepted(tcp: tuple[Streams, Streams]) -> None:
    dialer, listener = tcp
    a = version(nonce=1, user_agent=b"x" * MAX_USER_AGENT)
    got, _ = await asyncio.gather(shake(listener, ours=version(nonce=2)), shake(dialer, ours=a))
    assert got == a


async def test_bad_protocol_version(tcp: tuple[Streams, Streams]) -> None:
    dialer, listener = tcp
    await send(dialer, version(nonce=1, protocol=0))
    await expect_reason(shake(listener, ours=version(nonce=2)), "bad-version")


async def test_oversize_version_refused_by_framing(tcp: tuple[Streams, Streams]) -> None:
    dialer, listener = tcp
    await send_raw(dialer, Kind.VERSION, bytes(200))
    reader, writer = listener
    with pytest.raises(FrameError) as info:
        await handshake(reader, writer, DEV, ours=version(nonce=2), timeout=SLOW,
                        max_payload=100)
    assert info.value.reason == "oversize"


async def test_peer_hangs_up(tcp: tuple[Streams, Streams]) -> None:
    dialer, listener = tcp
    dialer[1].write_eof()  # a half-close: a full close with our version unread would RST
    with pytest.raises(ConnectionClosed):
        await shake(listener, ours=version(nonce=2))
