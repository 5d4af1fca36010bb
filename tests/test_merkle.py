"""Merkle trees: RFC 6962 roots and audit paths, checked against an independent
implementation of the RFC written here (PROTOCOL.md §1)."""

import hashlib

import pytest

from consensus.errors import ConsensusError
from consensus.merkle import (
    EMPTY_ROOT,
    check_proof,
    compute_leaf_hash,
    compute_node_hash,
    compute_proof,
    compute_root,
    compute_root_from_proof,
)

# ---------------------------------------------------------------------------------------
# The reference: RFC 6962 §2.1 (Merkle Tree Hash, PATH) and RFC 9162 §2.1.3.2
# (verifying an inclusion proof), transcribed literally.
# ---------------------------------------------------------------------------------------


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _k(n: int) -> int:
    """The largest power of two smaller than n."""
    k = 1
    while 2 * k < n:
        k *= 2
    return k


def ref_root(d: list[bytes]) -> bytes:
    if not d:
        return _sha(b"")
    if len(d) == 1:
        return _sha(b"\x00" + d[0])
    k = _k(len(d))
    return _sha(b"\x01" + ref_root(d[:k]) + ref_root(d[k:]))


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return ref_path(m, d[:k]) + [ref_root(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_root(d[:k])]


def ref_verify(root: bytes, leaf: bytes, index: int, size: int, path: list[bytes]) -> bool:
    if not 0 <= index < size:
        return False
    fn, sn = index, size - 1
    r = _sha(b"\x00" + leaf)
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _sha(b"\x01" + p + r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _sha(b"\x01" + r + p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def leaves_of(n: int) -> list[bytes]:
    # Distinct leaves of varied length, the empty leaf among them.
    return [bytes([i]) * (i % 5) + i.to_bytes(2, "big") if i else b"" for i in range(n)]


SIZES = range(34)

# ---------------------------------------------------------------------------------------
# Vectors
# ---------------------------------------------------------------------------------------

# Certificate Transparency's reference test data (the leaves of its merkle tree tests).
CT_LEAVES = [bytes.fromhex(h) for h in [
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_PATH_8_0 = [
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
]


def test_empty_root() -> None:
    expected = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert compute_root([]).hex() == expected
    assert EMPTY_ROOT.hex() == expected


def test_leaf_and_node_hash() -> None:
    assert compute_leaf_hash(b"").hex() == CT_ROOTS[0]
    assert compute_leaf_hash(b"abc") == _sha(b"\x00abc")
    left, right = _sha(b"l"), _sha(b"r")
    assert compute_node_hash(left, right) == _sha(b"\x01" + left + right)
    assert compute_node_hash(left, right) != compute_node_hash(right, left)


@pytest.mark.parametrize(("n", "expected"), list(enumerate(CT_ROOTS, start=1)))
def test_ct_root_vectors(n: int, expected: str) -> None:
    assert compute_root(CT_LEAVES[:n]).hex() == expected


def test_ct_path_vector() -> None:
    proof = compute_proof(CT_LEAVES, 0)
    assert [h.hex() for h in proof] == CT_PATH_8_0
    assert check_proof(bytes.fromhex(CT_ROOTS[7]), CT_LEAVES[0], 0, 8, proof)


# ---------------------------------------------------------------------------------------
# Against the reference, sizes 0..33
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_root_matches_reference(n: int) -> None:
    assert compute_root(leaves_of(n)) == ref_root(leaves_of(n))


@pytest.mark.parametrize("n", SIZES[1:])
def test_every_leaf_proves(n: int) -> None:
    leaves = leaves_of(n)
    root = compute_root(leaves)
    for i, leaf in enumerate(leaves):
        proof = compute_proof(leaves, i)
        assert list(proof) == ref_path(i, leaves)
        assert compute_root_from_proof(leaf, i, n, proof) == root
        assert check_proof(root, leaf, i, n, proof)
        assert ref_verify(root, leaf, i, n, list(proof))


@pytest.mark.parametrize("n", SIZES[1:])
def test_wrong_index_leaf_or_path_rejected(n: int) -> None:
    leaves = leaves_of(n)
    root = compute_root(leaves)
    for i, leaf in enumerate(leaves):
        proof = compute_proof(leaves, i)
        for j in range(n):
            if j != i:
                assert not check_proof(root, leaf, j, n, proof)
                assert not check_proof(root, leaves[j], i, n, proof)
        assert not check_proof(root, leaf + b"\x00", i, n, proof)
        assert not check_proof(_sha(root), leaf, i, n, proof)
        for k in range(len(proof)):
            tampered = proof[:k] + (_sha(proof[k]),) + proof[k + 1:]
            assert not check_proof(root, leaf, i, n, tampered)
        # one sibling too few, one too many
        assert not check_proof(root, leaf, i, n, proof[:-1]) or not proof
        assert not check_proof(root, leaf, i, n, proof + (root,))
        assert not check_proof(root, leaf, i, n, (root,) + proof)


@pytest.mark.parametrize("n", SIZES[1:])
def test_wrong_size_as_the_rfc_verifier(n: int) -> None:
    # A size the root was not built for fails whenever the tree's shape above the leaf
    # differs; where it does not (leaf 0 of 3 or of 4), RFC 9162's verifier accepts too,
    # because the size is authenticated elsewhere (here: by the block or proof holding it).
    leaves = leaves_of(n)
    root = compute_root(leaves)
    for i, leaf in enumerate(leaves):
        proof = compute_proof(leaves, i)
        for size in range(1, 2 * n + 2):
            if size == n:
                continue
            got = check_proof(root, leaf, i, size, proof)
            assert got == ref_verify(root, leaf, i, size, list(proof))
            if i >= size or len(ref_path(i, leaves_of(size))) != len(proof):
                assert not got


@pytest.mark.parametrize(("index", "size", "proof_len"), [
    (0, 0, 0), (1, 1, 0), (-1, 5, 3), (5, 5, 3), (0, 2, 0), (0, 2, 2), (4, 5, 3), (0, 5, 2),
])
def test_bad_proof_shape_raises(index: int, size: int, proof_len: int) -> None:
    with pytest.raises(ConsensusError) as exc:
        compute_root_from_proof(b"leaf", index, size, (bytes(32),) * proof_len)
    assert exc.value.reason == "bad-merkle-proof"
    assert not check_proof(bytes(32), b"leaf", index, size, (bytes(32),) * proof_len)


@pytest.mark.parametrize(("n", "index"), [(0, 0), (1, 1), (3, -1), (3, 3)])
def test_compute_proof_index_out_of_range(n: int, index: int) -> None:
    with pytest.raises(IndexError):
        compute_proof(leaves_of(n), index)


def test_no_odd_node_duplication() -> None:
    # CVE-2012-2459: Bitcoin's tree gives [a, b, c] and [a, b, c, c] the same root.
    a, b, c = b"a", b"b", b"c"
    assert compute_root([a, b, c]) != compute_root([a, b, c, c])
    assert compute_root([a, b, c]) == compute_node_hash(
        compute_node_hash(compute_leaf_hash(a), compute_leaf_hash(b)), compute_leaf_hash(c))


def test_interior_node_is_not_a_leaf() -> None:
    # Second preimage: two leaf hashes concatenated, offered as one leaf, do not give
    # the two-leaf root, because leaves and nodes hash under different prefixes.
    a, b = b"a", b"b"
    fake_leaf = compute_leaf_hash(a) + compute_leaf_hash(b)
    assert compute_root([fake_leaf]) != compute_root([a, b])
    assert not check_proof(compute_root([a, b, b"c", b"d"]), fake_leaf, 0, 2,
                           (compute_node_hash(compute_leaf_hash(b"c"), compute_leaf_hash(b"d")),))
