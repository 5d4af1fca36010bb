"""Block headers and blocks (PROTOCOL.md §1, §8).

There is no coinbase transaction: the state transition credits the miner named in the
proof. The miner signs the header, so the proof cannot be lifted into another block.
"""

from dataclasses import dataclass, replace
from typing import Annotated

from consensus.encoding import (
    U32,
    U64,
    U256,
    Hash,
    Hash32,
    MaxItems,
    Sig64,
    encode,
    tagged_hash,
    to_plain,
)
from consensus.errors import ConsensusError
from consensus.keys import PrivateKey, check_signature
from consensus.merkle import compute_root
from consensus.proofs import Proof
from consensus.transactions import NO_SIG, ModelTx, Transaction, compute_tx_id

BLOCK_VERSION = 1
MAX_BLOCK_TXS = 20_000


@dataclass(frozen=True, slots=True)
class BlockHeader:
    version: U32
    height: U64
    prev_id: Hash32
    timestamp: U64  # seconds since the Unix epoch
    target: U256  # t2 for this block (PROTOCOL.md §10)
    tx_root: Hash32
    proof: Proof
    signature: Sig64 = NO_SIG


@dataclass(frozen=True, slots=True)
class Block:
    header: BlockHeader
    txs: Annotated[tuple[Transaction, ...], MaxItems(MAX_BLOCK_TXS)] = ()


def compute_block_id(header: BlockHeader) -> Hash:
    """block_id = H("block", header without its signature)."""
    return tagged_hash("block", to_plain(header)[:-1])


def block_proofs(block: Block) -> list[Proof]:
    """The proofs a block carries: its own and its model transactions', in that order."""
    return [block.header.proof, *(tx.proof for tx in block.txs if isinstance(tx, ModelTx))]


def compute_tx_root(txs: tuple[Transaction, ...]) -> Hash:
    """Merkle root over the transactions' ids, in block order."""
    return compute_root([compute_tx_id(tx) for tx in txs])


def sign_header(header: BlockHeader, key: PrivateKey) -> BlockHeader:
    """`header` signed by its miner's key."""
    if key.pubkey != header.proof.miner:
        raise ValueError("key is not the block's miner")
    return replace(header, signature=key.sign(compute_block_id(header)))


def validate_header_signature(header: BlockHeader) -> None:
    """The miner's signature over block_id must verify (reason `bad-blk-sig`)."""
    if not check_signature(header.proof.miner, compute_block_id(header), header.signature):
        raise ConsensusError("bad-blk-sig", compute_block_id(header).hex())


def block_size(block: Block) -> int:
    """Serialized size in bytes."""
    return len(encode(block))


def assemble_block(parent: BlockHeader, timestamp: int, target: int, proof: Proof,
                   txs: tuple[Transaction, ...], key: PrivateKey) -> Block:
    """The signed block that carries `proof` on top of `parent`."""
    header = BlockHeader(version=BLOCK_VERSION, height=parent.height + 1,
                         prev_id=compute_block_id(parent), timestamp=timestamp, target=target,
                         tx_root=compute_tx_root(txs), proof=proof)
    return Block(sign_header(header, key), txs)
