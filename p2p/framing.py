"""P2P wire framing: one length-prefixed frame per message (PROTOCOL.md §11).

A frame is a 9-byte header, then the payload:

    magic    4 bytes   ChainParams.magic of the network
    kind     1 byte    message type code (0..255)
    length   4 bytes   payload length, unsigned big-endian
    payload  `length` bytes, the canonical encoding of the message

Choices where §11 is silent:

- No checksum. §11 lists the header fields and a checksum is not one of them. TCP
  already guards against line noise, and every payload is strictly decoded and then
  validated and hashed by the layers above, so a corrupted frame fails there with a
  reason; what Bitcoin's 4-byte sha256 prefix adds is a second hash of every byte
  on the hot path (model chunks are large), and BIP324's v2 transport dropped it too.
- One deadline per frame: `timeout` bounds the whole of `read_frame`, waiting for the
  first byte included, so a peer trickling one byte at a time cannot hold a frame
  open for longer. The caller picks a timeout longer than its ping interval.
- A clean EOF before the first byte of a frame raises `ConnectionClosed`, distinct
  from `FrameError`: the peer hung up between messages, which is not misbehaviour.
  EOF after the first byte is `FrameError("truncated")`.
- `max_payload` is checked as soon as the header is in, before any payload byte is
  awaited, so an oversize claim costs us 9 bytes and no buffering. It may be a
  function of the kind, so a block may be larger than a ping (and an unknown kind can
  be refused at the header).
"""

import asyncio
import struct
from collections.abc import Callable

MAGIC_LEN = 4
HEADER = struct.Struct(">4sBI")
HEADER_LEN = HEADER.size  # 9
MAX_LENGTH = 0xFFFF_FFFF


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame. `reason` is stable; `detail` is not."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ConnectionClosed(Exception):
    """The peer closed the connection cleanly between two frames."""


def encode_frame(magic: bytes, kind: int, payload: bytes) -> bytes:
    """Return the header and payload of one frame as bytes."""
    if len(magic) != MAGIC_LEN:
        raise ValueError(f"magic must be {MAGIC_LEN} bytes, got {len(magic)}")
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"kind {kind} does not fit in one byte")
    if len(payload) > MAX_LENGTH:
        raise ValueError(f"payload of {len(payload)} bytes does not fit a 4-byte length")
    return HEADER.pack(magic, kind, len(payload)) + payload


async def read_frame(
    reader: asyncio.StreamReader, magic: bytes, *, max_payload: int | Callable[[int], int],
    timeout: float,
) -> tuple[int, bytes]:
    """Read one frame and return (kind, payload); raise FrameError or ConnectionClosed."""
    try:
        async with asyncio.timeout(timeout):
            header = await _read_exactly(reader, HEADER_LEN, at_frame_start=True)
            got_magic, kind, length = HEADER.unpack(header)
            if got_magic != magic:
                raise FrameError("bad-magic", f"{got_magic.hex()} != {magic.hex()}")
            cap = max_payload(kind) if callable(max_payload) else max_payload
            if length > cap:
                raise FrameError("oversize", f"{length} > {cap}")
            payload = await _read_exactly(reader, length, at_frame_start=False)
    except TimeoutError:
        raise FrameError("timeout", f"no complete frame within {timeout}s") from None
    return kind, payload


async def _read_exactly(reader: asyncio.StreamReader, n: int, *, at_frame_start: bool) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        if at_frame_start and not e.partial:
            raise ConnectionClosed() from None
        raise FrameError("truncated", f"EOF after {len(e.partial)} of {n} bytes") from None


async def write_frame(
    writer: asyncio.StreamWriter, magic: bytes, kind: int, payload: bytes, *, timeout: float
) -> None:
    """Write one frame and drain it; TimeoutError if the peer does not read within `timeout`."""
    writer.write(encode_frame(magic, kind, payload))
    async with asyncio.timeout(timeout):
        await writer.drain()
