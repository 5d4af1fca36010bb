"""The portable DRBG (PROTOCOL.md §4): frozen vectors, and each method checked against
a literal transcription of the algorithm its docstring states."""

import hashlib
from collections import Counter

import numpy as np
import pytest

from consensus.encoding import tagged_hash
from mining.drbg import Drbg

SEED = bytes(range(32))


def fresh() -> Drbg:
    return Drbg(SEED)


# ---------------------------------------------------------------------------------------
# Frozen vectors: any change here is a consensus change.
# ---------------------------------------------------------------------------------------


def test_read_vector():
    assert fresh().read(48).hex() == (
        "a9d6e500293a88bd38cbe213d07ab71f8cb2258552072a01bdf1c40be527f4d0"
        "6061c4386d7a1788ba52e2e8b2ee6fe6"
    )


def test_read_is_sha256_counter_mode():
    expected = b"".join(hashlib.sha256(SEED + i.to_bytes(8, "big")).digest() for i in range(4))
    assert fresh().read(128) == expected


def test_for_label_vector():
    rng = Drbg.for_label("wm", b"\x01" * 32)
    assert rng.read(16).hex() == "5d61ad2da18065de8a208cbb12665835"
    assert Drbg.for_label("wm", b"\x01" * 32).read(64) == Drbg(
        tagged_hash("wm", b"\x01" * 32)).read(64)


def test_below_vector():
    rng = fresh()
    got = [rng.below(n) for n in (1, 2, 3, 10, 1000, 2**32, 2**64)]
    assert got == [0, 1, 2, 2, 120, 3001970662, 1402384116349340663]


def test_uniform_floats_vector():
    assert fresh().uniform_floats(4, -1, 1).tobytes().hex() == "945ba73e8cad7fbf80d38b3d26c4173f"
    assert fresh().uniform_floats(3, 0, 10).tobytes().hex() == "9e4cd4400022ce3b86ecaa40"


def test_shuffle_vector():
    assert fresh().shuffle(10).tolist() == [7, 2, 0, 6, 3, 8, 5, 9, 4, 1]


def test_sample_vector():
    got = fresh().sample_without_replacement(10**6, 6)
    assert got == [364221, 540527, 971417, 9963, 455396, 424388]


# ---------------------------------------------------------------------------------------
# The algorithms, transcribed from the docstrings.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(5, 40), (32, 32, 1), (0, 7, 100, 3)])
def test_reads_continue_the_stream(sizes):
    rng = fresh()
    assert b"".join(rng.read(n) for n in sizes) == fresh().read(sum(sizes))


def test_below_is_the_rejection_draw():
    n = 2**63 + 1  # r = 2^63 - 1: about half the words are rejected
    limit = 2**64 - 2**64 % n
    raw, rng = fresh(), fresh()
    for _ in range(50):
        while True:
            x = int.from_bytes(raw.read(8), "big")
            if x < limit:
                break
        assert rng.below(n) == x % n
    assert raw.read(8) == rng.read(8)


@pytest.mark.parametrize("n", [0, -1, 2**64 + 1])
def test_below_rejects_bad_bounds(n):
    with pytest.raises(ValueError):
        fresh().below(n)


def test_below_range_and_rough_uniformity():
    rng = fresh()
    counts = Counter(rng.below(6) for _ in range(6000))
    assert set(counts) == set(range(6))
    assert all(850 <= c <= 1150 for c in counts.values()), counts


def test_uniform_floats_are_exact_and_in_range():
    raw = fresh().read(3 * 1000)
    got = fresh().uniform_floats(1000, -1, 1)
    assert got.dtype == np.float32
    ks = [int.from_bytes(raw[i:i + 3], "big") for i in range(0, len(raw), 3)]
    # In [-1, 1) every value -1 + 2k/2^24 is exact in float32.
    assert got.tolist() == [-1 + 2 * k / 2**24 for k in ks]
    assert got.min() >= -1 and got.max() < 1
    assert np.array_equal(got, fresh().uniform_floats(1000, -1, 1))


def _ref_sample(rng: Drbg, population: int, k: int) -> list[int]:
    a: dict[int, int] = {}
    out = []
    for i in range(k):
        j = i + rng.below(population - i)
        a[i], a[j] = a.get(j, j), a.get(i, i)
        out.append(a[i])
    return out


@pytest.mark.parametrize("population,k", [(10, 10), (10**6, 300), (2**63 + 1, 40)])
def test_sample_matches_partial_fisher_yates(population, k):
    rng, ref = fresh(), fresh()
    got = rng.sample_without_replacement(population, k)
    assert got == _ref_sample(ref, population, k)
    assert rng.read(8) == ref.read(8)  # the bulk path consumed exactly the same bytes


def test_sample_is_distinct_and_in_range():
    got = fresh().sample_without_replacement(10**6, 10**4)
    assert len(set(got)) == 10**4
    assert min(got) >= 0 and max(got) < 10**6
    assert sorted(fresh().sample_without_replacement(50, 50)) == list(range(50))
    assert fresh().sample_without_replacement(5, 0) == []
    with pytest.raises(ValueError):
        fresh().sample_without_replacement(5, 6)


def test_shuffle_matches_fisher_yates():
    rng, ref = fresh(), fresh()
    a = list(range(500))
    for i in range(499, 0, -1):
        j = ref.below(i + 1)
        a[i], a[j] = a[j], a[i]
    assert rng.shuffle(500).tolist() == a
    assert rng.read(8) == ref.read(8)


def test_shuffle_is_a_deterministic_permutation():
    perm = fresh().shuffle(60_000)
    assert perm.dtype == np.int64
    assert np.array_equal(np.sort(perm), np.arange(60_000))
    assert np.array_equal(perm, fresh().shuffle(60_000))
    assert not np.array_equal(perm, Drbg(bytes(32)).shuffle(60_000))
    assert fresh().shuffle(0).tolist() == [] and fresh().shuffle(1).tolist() == [0]


def test_seed_must_be_32_bytes():
    with pytest.raises(ValueError):
        Drbg(bytes(31))
