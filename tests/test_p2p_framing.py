"""P2P framing over in-memory streams, plus one real TCP round trip."""

import asyncio
import time

import pytest

from consensus.params import DEV, TESTNET
from p2p.framing import (
    HEADER_LEN,
    ConnectionClosed,
    FrameError,
    encode_frame,
    read_frame,
    write_frame,
)

MAGIC = DEV.magic
MAX = 1000
FAST = 0.05  # the timeout when a test expects one
SLOW = 2.0  # the timeout when a test expects none; an error must come well before it


def reader_with(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def read(reader: asyncio.StreamReader, timeout: float = SLOW) -> tuple[int, bytes]:
    return await read_frame(reader, MAGIC, max_payload=MAX, timeout=timeout)


async def expect_reason(reader: asyncio.StreamReader, reason: str, timeout: float = SLOW) -> None:
    start = time.monotonic()
    with pytest.raises(FrameError) as info:
        await read(reader, timeout)
    assert info.value.reason == reason
    if reason != "timeout":
        assert time.monotonic() - start < SLOW / 4, "error waited for the timeout"


def test_header_layout() -> None:
    frame = encode_frame(b"abcd", 7, b"xyz")
    assert frame == b"abcd" + b"\x07" + b"\x00\x00\x00\x03" + b"xyz"
    assert HEADER_LEN == 9


@pytest.mark.parametrize(
    ("magic", "kind", "payload"),
    [(b"abc", 0, b""), (b"abcde", 0, b""), (MAGIC, -1, b""), (MAGIC, 256, b"")],
)
def test_encode_rejects_bad_arguments(magic: bytes, kind: int, payload: bytes) -> None:
    with pytest.raises(ValueError):
        encode_frame(magic, kind, payload)


async def test_frames_back_to_back() -> None:
    frames = [(0, b"hello"), (255, b""), (3, bytes(range(256)) * 3), (1, b"x" * MAX)]
    reader = reader_with(b"".join(encode_frame(MAGIC, k, p) for k, p in frames))
    assert [await read(reader) for _ in frames] == frames
    with pytest.raises(ConnectionClosed):
        await read(reader)


async def test_zero_length_payload() -> None:
    assert await read(reader_with(encode_frame(MAGIC, 9, b""))) == (9, b"")


async def test_split_delivery_byte_by_byte() -> None:
    data = encode_frame(MAGIC, 4, b"split") + encode_frame(MAGIC, 5, b"")
    reader = asyncio.StreamReader()

    async def trickle() -> None:
        for i in range(len(data)):
            reader.feed_data(data[i : i + 1])
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(trickle())
    assert await read(reader) == (4, b"split")
    assert await read(reader) == (5, b"")
    await feeder


async def test_clean_eof_is_connection_closed_not_frame_error() -> None:
    with pytest.raises(ConnectionClosed):
        await read(reader_with(b""))


async def test_bad_magic() -> None:
    await expect_reason(reader_with(encode_frame(TESTNET.magic, 0, b"hi")), "bad-magic")


async def test_bad_magic_is_refused_without_waiting_for_the_payload() -> None:
    header = encode_frame(TESTNET.magic, 0, b"hi")[:HEADER_LEN]
    await expect_reason(reader_with(header, eof=False), "bad-magic")


async def test_oversize_is_refused_without_waiting_for_the_payload() -> None:
    header = encode_frame(MAGIC, 0, b"x" * (MAX + 1))[:HEADER_LEN]
    await expect_reason(reader_with(header, eof=False), "oversize")


async def test_oversize_claim_of_4_gib() -> None:
    header = MAGIC + b"\x00" + b"\xff\xff\xff\xff"
    await expect_reason(reader_with(header, eof=False), "oversize")


async def test_payload_of_exactly_max_is_accepted() -> None:
    assert await read(reader_with(encode_frame(MAGIC, 2, b"m" * MAX))) == (2, b"m" * MAX)


@pytest.mark.parametrize("cut", [1, 4, HEADER_LEN - 1, HEADER_LEN, HEADER_LEN + 2])
async def test_eof_mid_frame_is_truncated(cut: int) -> None:
    frame = encode_frame(MAGIC, 0, b"abc")
    await expect_reason(reader_with(frame[:cut]), "truncated")


@pytest.mark.parametrize("cut", [0, 5, HEADER_LEN, HEADER_LEN + 2])
async def test_stalled_read_times_out(cut: int) -> None:
    frame = encode_frame(MAGIC, 0, b"abc")
    start = time.monotonic()
    await expect_reason(reader_with(frame[:cut], eof=False), "timeout", timeout=FAST)
    assert FAST <= time.monotonic() - start < SLOW / 4


async def test_timeout_bounds_the_whole_frame_not_each_read() -> None:
    # Header and payload each arrive within FAST of the last, but the frame takes longer.
    frame = encode_frame(MAGIC, 0, b"abcdef")
    reader = asyncio.StreamReader()

    async def trickle() -> None:
        await asyncio.sleep(FAST * 0.6)
        reader.feed_data(frame[:HEADER_LEN])
        await asyncio.sleep(FAST * 0.6)
        reader.feed_data(frame[HEADER_LEN:])

    feeder = asyncio.create_task(trickle())
    await expect_reason(reader, "timeout", timeout=FAST)
    await feeder


async def test_tcp_round_trip() -> None:
    frames = [(1, b"version"), (2, b""), (6, b"\x00" * 600)]
    received: list[tuple[int, bytes]] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                kind, payload = await read(reader)
                await write_frame(writer, MAGIC, kind + 100, payload, timeout=SLOW)
        except ConnectionClosed:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for kind, payload in frames:
            await write_frame(writer, MAGIC, kind, payload, timeout=SLOW)
        for _ in frames:
            received.append(await read(reader))
        writer.write_eof()
        with pytest.raises(ConnectionClosed):
            await read(reader)
        writer.close()
        await writer.wait_closed()
    assert received == [(k + 100, p) for k, p in frames]
