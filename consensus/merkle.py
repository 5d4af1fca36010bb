"""Merkle trees over transactions and checkpoints, hashed as in RFC 6962 (PROTOCOL.md §1).

Leaves hash as H(0x00 ‖ leaf) and nodes as H(0x01 ‖ left ‖ right), so a leaf can
never pass for a node. An odd node is carried up unchanged rather than paired with
itself (Bitcoin's duplication allowed two different leaf lists to share a root,
CVE-2012-2459). The tree splits at the largest power of two below n, as RFC 6962 does,
which fixes exactly one audit path per leaf.
"""

import hashlib

from consensus.encoding import Hash
from consensus.errors import ConsensusError

EMPTY_ROOT = Hash(hashlib.sha256(b"").digest())


def compute_leaf_hash(leaf: bytes) -> Hash:
    """RFC 6962 leaf hash."""
    return Hash(hashlib.sha256(b"\x00" + leaf).digest())


def compute_node_hash(left: Hash, right: Hash) -> Hash:
    """RFC 6962 interior node hash."""
    return Hash(hashlib.sha256(b"\x01" + left + right).digest())


def _split(n: int) -> int:
    """The largest power of two strictly below n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _root(hashes: list[Hash]) -> Hash:
    # Bottom-up pairing that carries the odd node up gives the same tree as RFC 6962's
    # recursive split, without recursion.
    level = hashes
    while len(level) > 1:
        nxt = [compute_node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def compute_root(leaves: list[bytes]) -> Hash:
    """Merkle Tree Hash of the leaves (the hash of the empty string for none)."""
    if not leaves:
        return EMPTY_ROOT
    return _root([compute_leaf_hash(leaf) for leaf in leaves])


def compute_proof(leaves: list[bytes], index: int) -> tuple[Hash, ...]:
    """The audit path of leaf `index`, nearest sibling first."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} of {len(leaves)}")
    path: list[Hash] = []
    hashes = [compute_leaf_hash(leaf) for leaf in leaves]
    lo, hi = 0, len(hashes)
    while hi - lo > 1:
        mid = lo + _split(hi - lo)
        if index < mid:
            path.append(_root(hashes[mid:hi]))
            hi = mid
        else:
            path.append(_root(hashes[lo:mid]))
            lo = mid
    return tuple(reversed(path))


def compute_root_from_proof(leaf: bytes, index: int, size: int, proof: tuple[Hash, ...]) -> Hash:
    """The root implied by `leaf` at `index` of a `size`-leaf tree with audit path `proof`.

    Raises ConsensusError('bad-merkle-proof') if the path has the wrong length.
    """
    if not 0 <= index < size:
        raise ConsensusError("bad-merkle-proof", f"leaf {index} of {size}")
    # Walk down from the root to learn, for each level, which side the leaf is on.
    sides: list[bool] = []  # True: the sibling is on the left
    lo, hi = 0, size
    while hi - lo > 1:
        mid = lo + _split(hi - lo)
        sides.append(index >= mid)
        lo, hi = (mid, hi) if index >= mid else (lo, mid)
    if len(sides) != len(proof):
        raise ConsensusError("bad-merkle-proof", f"path of {len(proof)}, expected {len(sides)}")
    node = compute_leaf_hash(leaf)
    for sibling, left in zip(proof, reversed(sides), strict=True):
        node = compute_node_hash(sibling, node) if left else compute_node_hash(node, sibling)
    return node


def check_proof(root: Hash, leaf: bytes, index: int, size: int, proof: tuple[Hash, ...]) -> bool:
    """True when `proof` shows `leaf` at `index` in the `size`-leaf tree with `root`."""
    try:
        return compute_root_from_proof(leaf, index, size, proof) == root
    except ConsensusError:
        return False
