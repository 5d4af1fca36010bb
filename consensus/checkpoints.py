"""Checkpoint leaves and fraud proofs (PROTOCOL.md §6, §8).

A miner commits to its training history as a Merkle tree of checkpoint leaves; a
verifier that replays one interval and finds it forged proves so with both
checkpoints and their Merkle paths, which any node can check by replaying that one
interval.
"""

from dataclasses import dataclass
from typing import Annotated

from consensus.encoding import U32, U64, Bytes, Hash, Hash32, MaxItems, encode, tagged_hash
from consensus.merkle import compute_root

# Fixed point for update norms: value * 10^6, so no float enters a leaf.
NORM_SCALE = 1_000_000
# Largest parameter or momentum blob a message may carry (float32 bytes).
MAX_TENSOR_BYTES = 64 << 20
MAX_MERKLE_DEPTH = 32
# Most leaves one history may have: s_max / k + 1 must stay below this.
MAX_CHECKPOINTS = 4096

MerklePath = Annotated[tuple[Hash32, ...], MaxItems(MAX_MERKLE_DEPTH)]
TensorBytes = Annotated[bytes, Bytes(MAX_TENSOR_BYTES)]


@dataclass(frozen=True, slots=True)
class CheckpointLeaf:
    """leaf_i = [i, steps_i, H(params_i), H(momentum_i), update_norm_i]."""

    index: U32
    steps: U32
    params_hash: Hash32
    momentum_hash: Hash32
    update_norm: U64  # ||params_i - params_{i-1}||_2 * NORM_SCALE, 0 for i = 0


@dataclass(frozen=True, slots=True)
class History:
    """Every leaf of a training history, as a verifier fetches it before its audits.

    Choice (PROTOCOL.md §8 is silent on how the leaves travel): the largest-update
    audit needs every committed update norm, so the leaves move as one small object
    (about 90 bytes each) that the verifier checks against `ckpt_root`.
    """

    leaves: Annotated[tuple[CheckpointLeaf, ...], MaxItems(MAX_CHECKPOINTS)]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One checkpoint as served to an auditor: its leaf, Merkle path and tensors."""

    leaf: CheckpointLeaf
    path: MerklePath
    params: TensorBytes
    momentum: TensorBytes


@dataclass(frozen=True, slots=True)
class FraudProof:
    """Interval `start.leaf.index` → `end.leaf.index` of `owner_id`'s history does not replay."""

    owner_id: Hash32  # the block or model transaction whose ckpt_root commits the history
    start: Checkpoint
    end: Checkpoint


def leaf_bytes(leaf: CheckpointLeaf) -> bytes:
    """The bytes a checkpoint leaf contributes to the Merkle tree."""
    return encode(leaf)


def compute_tensor_hash(data: bytes) -> Hash:
    """H(params_i) and H(momentum_i) of a leaf: H("tensor", float32 little-endian bytes)."""
    return tagged_hash("tensor", data)


def compute_ckpt_root(leaves: tuple[CheckpointLeaf, ...] | list[CheckpointLeaf]) -> Hash:
    """ckpt_root: the Merkle root over leaves 0..j."""
    return compute_root([leaf_bytes(leaf) for leaf in leaves])
