"""P2P message type codes and payloads (PROTOCOL.md §11).

Each frame's `kind` byte is a `Kind`; its payload is the canonical encoding
(consensus.encoding) of that kind's dataclass. Only the handshake and keep-alive
payloads are declared so far; the other kinds have codes but no payload type yet, and
`decode_payload` refuses them as unknown.

A message without fields (`verack`) travels as an empty payload, not as the msgpack
empty array: there is nothing to encode, and consensus.encoding cannot generate a
codec for a dataclass without fields.
"""

from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any

from consensus.encoding import U16, U32, U64, Bytes, Hash32, decode, encode
from consensus.errors import DecodeError
from p2p.framing import FrameError

PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1  # the oldest peer protocol we still speak
MAX_USER_AGENT = 64

UserAgent = Annotated[bytes, Bytes(MAX_USER_AGENT)]


class Kind(IntEnum):
    """The frame's message type byte. Codes are wire format: never renumber."""

    VERSION = 0
    VERACK = 1
    PING = 2
    PONG = 3
    GETADDR = 4
    ADDR = 5
    INV = 6
    GETDATA = 7
    NOTFOUND = 8
    GETHEADERS = 9
    HEADERS = 10
    BLOCK = 11
    TX = 12
    GETMODEL = 13
    MODEL = 14
    GETCKPT = 15
    CKPT = 16
    FRAUDPROOF = 17


class ProtocolError(FrameError):
    """The peer broke the message protocol; `reason` is stable.

    A subclass of FrameError so that one `except FrameError` covers every way a peer
    can misbehave on the wire, framing included.
    """


@dataclass(frozen=True, slots=True)
class Version:
    """The first message each side sends: who we are and which chain we follow."""

    protocol: U32
    genesis_id: Hash32
    best_height: U64
    listen_port: U16  # 0: not listening
    nonce: U64  # random per connection; seeing our own back means we dialled ourselves
    user_agent: UserAgent


@dataclass(frozen=True, slots=True)
class Verack:
    """Acknowledges the peer's version; the connection is up once both are exchanged."""


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: U64


@dataclass(frozen=True, slots=True)
class Pong:
    nonce: U64  # the nonce of the ping it answers


Message = Version | Verack | Ping | Pong

PAYLOAD_TYPES: dict[Kind, type] = {
    Kind.VERSION: Version,
    Kind.VERACK: Verack,
    Kind.PING: Ping,
    Kind.PONG: Pong,
}
KIND_OF: dict[type, Kind] = {tp: kind for kind, tp in PAYLOAD_TYPES.items()}
_EMPTY = frozenset({Verack})


def encode_payload(msg: Message) -> tuple[Kind, bytes]:
    """The frame kind and payload bytes of `msg`."""
    tp = type(msg)
    return KIND_OF[tp], b"" if tp in _EMPTY else encode(msg)


def decode_payload(kind: int, payload: bytes) -> Any:
    """Decode a payload of frame type `kind`; raise ProtocolError on anything invalid."""
    tp = PAYLOAD_TYPES.get(kind)  # type: ignore[call-overload]
    if tp is None:
        raise ProtocolError("unknown-message", f"kind {kind}")
    if tp in _EMPTY:
        if payload:
            raise ProtocolError("malformed", f"{tp.__name__} carries {len(payload)} bytes")
        return tp()
    try:
        return decode(tp, payload)
    except DecodeError as e:
        raise ProtocolError("malformed", e.detail) from None
