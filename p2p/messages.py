"""P2P message type codes and payloads (PROTOCOL.md §11).

Each frame's `kind` byte is a `Kind`; its payload is the canonical encoding
(consensus.encoding) of that kind's dataclass, so decoding is strict and every list
has a declared bound. `max_payload` caps each kind's frame before it is read.

Choices where PROTOCOL.md §11 is silent:
- A message without fields (`verack`, `getaddr`) travels as an empty payload, not as
  the msgpack empty array: there is nothing to encode, and consensus.encoding cannot
  generate a codec for a dataclass without fields.
- Model transactions are transactions: `inv` names them with their own item kind (a
  node may fetch them or not), `getdata` fetches them, and a `tx` message carries them.
- Artifacts move as the canonical encoding of a ModelBlob, a History (the leaf list a
  verifier needs before its audits: checkpoint index `HISTORY`) or a Checkpoint (leaf,
  Merkle path, tensors), cut into chunks of at most CHUNK_SIZE bytes and asked for by
  offset. The receiver decodes the whole and checks it against the id it asked for; a
  chunk with `total` 0 says the peer does not have it (no encoding is empty).
"""

from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any

from consensus.blocks import Block, BlockHeader
from consensus.encoding import U8, U16, U32, U64, Bytes, Hash32, MaxItems, decode, encode
from consensus.errors import DecodeError
from consensus.params import ChainParams
from consensus.transactions import Transaction
from p2p.framing import FrameError

PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1  # the oldest peer protocol we still speak
MAX_USER_AGENT = 64
MAX_ADDR = 1000  # addresses in one addr message
MAX_HOST = 45  # the longest textual IPv6 address
MAX_INV = 1000  # items in one inv, getdata or notfound
MAX_LOCATOR = 101  # block locator entries (Bitcoin Core's bound)
MAX_HEADERS = 2000  # headers in one headers message
CHUNK_SIZE = 1 << 20  # artifact bytes in one model or ckpt message
MAX_CONTROL = 1 << 20  # every kind without its own cap below
HISTORY = 0xFFFF_FFFF  # the checkpoint index that asks for the leaf list

# inv item kinds
INV_BLOCK = 1
INV_TX = 2
INV_MTX = 3
INV_KINDS = frozenset({INV_BLOCK, INV_TX, INV_MTX})

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
    nonce: U64  # random per node run: our own back means we dialled ourselves
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


@dataclass(frozen=True, slots=True)
class GetAddr:
    """Asks for addresses of other nodes (answered once per connection)."""


@dataclass(frozen=True, slots=True)
class NetAddress:
    host: Annotated[bytes, Bytes(MAX_HOST)]  # an IP literal as ASCII text
    port: U16
    seen: U64  # when the address was last known to be up, seconds since the epoch


@dataclass(frozen=True, slots=True)
class Addr:
    addrs: Annotated[tuple[NetAddress, ...], MaxItems(MAX_ADDR)]


@dataclass(frozen=True, slots=True)
class InvItem:
    kind: U8  # INV_BLOCK, INV_TX or INV_MTX
    id: Hash32  # block id or transaction id


Items = Annotated[tuple[InvItem, ...], MaxItems(MAX_INV)]


@dataclass(frozen=True, slots=True)
class Inv:
    """Announces blocks and transactions the sender has (and has checked)."""

    items: Items


@dataclass(frozen=True, slots=True)
class GetData:
    items: Items


@dataclass(frozen=True, slots=True)
class NotFound:
    items: Items


@dataclass(frozen=True, slots=True)
class GetHeaders:
    """The headers after the first locator entry on the sender's main chain, up to
    MAX_HEADERS or `stop` (ZERO_HASH: no stop)."""

    locator: Annotated[tuple[Hash32, ...], MaxItems(MAX_LOCATOR)]
    stop: Hash32


@dataclass(frozen=True, slots=True)
class Headers:
    headers: Annotated[tuple[BlockHeader, ...], MaxItems(MAX_HEADERS)]


@dataclass(frozen=True, slots=True)
class Tx:
    tx: Transaction


@dataclass(frozen=True, slots=True)
class GetModel:
    model_id: Hash32
    offset: U64


@dataclass(frozen=True, slots=True)
class ModelChunk:
    model_id: Hash32
    offset: U64
    total: U64  # bytes of the whole encoding; 0: not available
    data: Annotated[bytes, Bytes(CHUNK_SIZE)]


@dataclass(frozen=True, slots=True)
class GetCkpt:
    ckpt_root: Hash32
    index: U32  # a checkpoint index, or HISTORY for the leaf list
    offset: U64


@dataclass(frozen=True, slots=True)
class CkptChunk:
    ckpt_root: Hash32
    index: U32
    offset: U64
    total: U64  # 0: not available
    data: Annotated[bytes, Bytes(CHUNK_SIZE)]


@dataclass(frozen=True, slots=True)
class FraudNotice:
    """Interval `index` → `index + 1` of `owner_id`'s history does not replay. The two
    checkpoints (up to 2 × 128 MiB for the largest models) are not pushed: the receiver
    fetches them with `getckpt` from the sender, which holds them since it audited them,
    and each arrives checked against the accused's ckpt_root."""

    owner_id: Hash32  # the block or model transaction whose history is accused
    index: U32  # the interval's first checkpoint


Message = (Version | Verack | Ping | Pong | GetAddr | Addr | Inv | GetData | NotFound
           | GetHeaders | Headers | Block | Tx | GetModel | ModelChunk | GetCkpt | CkptChunk
           | FraudNotice)

PAYLOAD_TYPES: dict[Kind, type] = {
    Kind.VERSION: Version,
    Kind.VERACK: Verack,
    Kind.PING: Ping,
    Kind.PONG: Pong,
    Kind.GETADDR: GetAddr,
    Kind.ADDR: Addr,
    Kind.INV: Inv,
    Kind.GETDATA: GetData,
    Kind.NOTFOUND: NotFound,
    Kind.GETHEADERS: GetHeaders,
    Kind.HEADERS: Headers,
    Kind.BLOCK: Block,
    Kind.TX: Tx,
    Kind.GETMODEL: GetModel,
    Kind.MODEL: ModelChunk,
    Kind.GETCKPT: GetCkpt,
    Kind.CKPT: CkptChunk,
    Kind.FRAUDPROOF: FraudNotice,
}
KIND_OF: dict[type, Kind] = {tp: kind for kind, tp in PAYLOAD_TYPES.items()}
_EMPTY = frozenset({Verack, GetAddr})
_CHUNK_FRAME = CHUNK_SIZE + 256  # the chunk and its few small fields


def max_payload(params: ChainParams, kind: int) -> int:
    """The largest payload a frame of `kind` may declare; ProtocolError for an unknown
    kind, before any of its payload is read."""
    if kind not in Kind._value2member_map_:
        raise ProtocolError("unknown-message", f"kind {kind}")
    if kind == Kind.BLOCK:
        return params.max_block_bytes
    if kind in (Kind.MODEL, Kind.CKPT):
        return _CHUNK_FRAME
    return MAX_CONTROL


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
