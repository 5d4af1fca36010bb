"""The version/verack handshake that opens every connection (PROTOCOL.md §11).

Both sides run the same steps, so neither waits on the other to speak first:
send our version; read the peer's, which must be the first thing it sends; check it;
send verack; read the peer's verack, which must come next. Anything else in between
(a ping included) is refused: nothing is served to a peer that has not finished
saying who it is.
"""

import asyncio

from consensus.blocks import compute_block_id
from consensus.encoding import Hash
from consensus.params import ChainParams, genesis_block
from p2p.framing import read_frame, write_frame
from p2p.messages import (
    MIN_PROTOCOL_VERSION,
    Kind,
    Message,
    ProtocolError,
    Verack,
    Version,
    decode_payload,
    encode_payload,
)


def compute_genesis_id(params: ChainParams) -> Hash:
    """The id of the chain's genesis block, which a peer's version must name."""
    return compute_block_id(genesis_block(params).header)


def validate_version(peer: Version, genesis_id: Hash, *, ours: Version) -> None:
    """Raise ProtocolError if we must not talk to the peer that sent `peer`."""
    if peer.protocol < MIN_PROTOCOL_VERSION:
        raise ProtocolError("bad-version", f"{peer.protocol} < {MIN_PROTOCOL_VERSION}")
    if peer.genesis_id != genesis_id:
        raise ProtocolError("genesis-mismatch", peer.genesis_id.hex())
    if peer.nonce == ours.nonce:
        raise ProtocolError("self-connection", f"nonce {peer.nonce}")


async def handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    params: ChainParams,
    *,
    ours: Version,
    timeout: float,
    max_payload: int,
) -> Version:
    """Exchange version and verack with the peer and return its Version.

    Raises ProtocolError (a FrameError) with a stable reason, FrameError from the
    framing layer, or ConnectionClosed if the peer hangs up; `timeout` bounds it all.
    `ours.nonce` is the node's own, on every connection, so dialling ourselves is
    caught whichever side of the loop we are on.
    """
    genesis_id = compute_genesis_id(params)

    async def send(msg: Message) -> None:
        kind, payload = encode_payload(msg)
        await write_frame(writer, params.magic, kind, payload, timeout=timeout)

    async def expect(want: Kind) -> Message:
        kind, payload = await read_frame(
            reader, params.magic, max_payload=max_payload, timeout=timeout
        )
        if kind != want:
            name = Kind(kind).name if kind in Kind._value2member_map_ else str(kind)
            raise ProtocolError("unexpected-message", f"{name} while waiting for {want.name}")
        return decode_payload(kind, payload)

    try:
        async with asyncio.timeout(timeout):
            await send(ours)
            peer = await expect(Kind.VERSION)
            assert isinstance(peer, Version)
            validate_version(peer, genesis_id, ours=ours)
            await send(Verack())
            await expect(Kind.VERACK)
    except TimeoutError:
        raise ProtocolError("timeout", f"handshake not done within {timeout}s") from None
    return peer
