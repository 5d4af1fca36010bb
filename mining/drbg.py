"""The portable deterministic random bit generator of PROTOCOL.md §4.

Every random choice a verifier must reproduce (architecture, hyper-parameters, initial
weights, data order, watermark) comes from here, never from numpy's or torch's
generators, whose streams may change between releases. Each method below states its
algorithm exactly; the numpy code is only a faster way of computing the same thing.

The byte stream: block i (i = 0, 1, ...) is SHA-256(seed ‖ i as 8-byte big-endian), and
the stream is block 0 ‖ block 1 ‖ ...; every method consumes bytes from the front of
the stream, continuing where the previous call stopped.

The integer draw, shared by `below`, `sample_without_replacement` and `shuffle`: a draw
for bound n (1 ≤ n ≤ 2^64) reads 8 bytes as a big-endian integer x; with
r = 2^64 mod n, x is rejected when x ≥ 2^64 − r (then 8 more bytes are read, and so
on), otherwise the draw is x mod n. Accepted x span a whole number of copies of
[0, n), so there is no modulo bias; rejection has probability r / 2^64 < n / 2^64.
"""

import hashlib

import numpy as np

from consensus.encoding import tagged_hash

_WORD = 8  # bytes per integer draw
_TWO64 = 1 << 64
_U64_MAX = np.uint64(_TWO64 - 1)
_FLOAT_BITS = 24  # float32 has a 24-bit significand, so k / 2^24 is exact in it


class Drbg:
    """SHA-256 in counter mode over a 32-byte seed."""

    __slots__ = ("_seed", "_counter", "_buf", "_pos")

    def __init__(self, seed: bytes) -> None:
        if type(seed) is not bytes or len(seed) != 32:
            raise ValueError("Drbg seed must be 32 bytes")
        self._seed = seed
        self._counter = 0  # index of the next block to generate
        self._buf = b""  # generated but not yet consumed bytes start at _pos
        self._pos = 0

    @classmethod
    def for_label(cls, label: str, h1: bytes) -> "Drbg":
        """The stream for `label` ("arch", "hpp", "init", "data", "wm") of block data h1."""
        return cls(tagged_hash(label, h1))

    def _peek(self, n: int) -> bytes:
        """The next n bytes of the stream, without consuming them."""
        missing = n - (len(self._buf) - self._pos)
        if missing > 0:
            blocks = -(-missing // 32)
            seed, start = self._seed, self._counter
            fresh = b"".join(
                hashlib.sha256(seed + i.to_bytes(8, "big")).digest()
                for i in range(start, start + blocks)
            )
            self._buf = self._buf[self._pos:] + fresh
            self._pos = 0
            self._counter = start + blocks
        return self._buf[self._pos:self._pos + n]

    def read(self, n: int) -> bytes:
        """The next n bytes of the stream."""
        if n < 0:
            raise ValueError("cannot read a negative number of bytes")
        out = self._peek(n)
        self._pos += n
        return out

    def below(self, n: int) -> int:
        """A uniform integer in [0, n), 1 ≤ n ≤ 2^64: one integer draw (module docstring)."""
        if not 1 <= n <= _TWO64:
            raise ValueError(f"below({n}): bound must be in [1, 2^64]")
        limit = _TWO64 - _TWO64 % n
        while True:
            x = int.from_bytes(self.read(_WORD), "big")
            if x < limit:
                return x % n

    def _below_many(self, bounds: np.ndarray) -> np.ndarray:
        """[self.below(b) for b in bounds] as uint64, for bounds in [1, 2^64), in bulk.

        Reads one word per remaining bound and accepts the longest prefix without a
        rejection; at a rejection it consumes the rejected word only and goes on from
        there, so the stream is consumed exactly as by the scalar loop.
        """
        bounds = np.asarray(bounds, dtype=np.uint64)
        out = np.empty(len(bounds), dtype=np.uint64)
        done = 0
        while done < len(bounds):
            b = bounds[done:]
            x = np.frombuffer(self._peek(_WORD * len(b)), dtype=">u8").astype(np.uint64)
            r = (_U64_MAX - b + np.uint64(1)) % b  # 2^64 mod b, without overflow
            rejected = np.flatnonzero(x > _U64_MAX - r)  # x >= 2^64 - r
            ok = len(b) if len(rejected) == 0 else int(rejected[0])
            out[done:done + ok] = x[:ok] % b[:ok]
            self._pos += _WORD * min(ok + 1, len(b))  # the accepted words and one rejected
            done += ok
        return out

    def uniform_floats(self, count: int, low: float, high: float) -> np.ndarray:
        """`count` float32 values low + (high − low) · k / 2^24, k uniform in [0, 2^24).

        Each k is the next 3 bytes, big-endian. The value is computed in IEEE-754
        float64 as ((high − low) * (k / 2^24)) + low, one correctly rounded operation
        at a time (separate numpy calls, so no fused multiply-add), then rounded to
        the nearest float32: bit-identical on every IEEE-754 platform. For [−1, 1)
        every value is exact: a multiple of 2^−23 in [−1, 1 − 2^−23]. For other
        ranges the final rounding may reach `high` itself.
        """
        if count < 0:
            raise ValueError("count must be non-negative")
        raw = np.frombuffer(self.read(3 * count), dtype=np.uint8).reshape(count, 3)
        k = (raw[:, 0].astype(np.uint32) << 16) | (raw[:, 1].astype(np.uint32) << 8) | raw[:, 2]
        unit = k.astype(np.float64) / float(1 << _FLOAT_BITS)  # exact
        scaled = np.multiply(unit, float(high) - float(low))
        return np.add(scaled, float(low)).astype(np.float32)

    def sample_without_replacement(self, population: int, k: int) -> list[int]:
        """k distinct indices of range(population), 1 ≤ population < 2^64, in draw order.

        A partial Fisher–Yates shuffle of the virtual list a = [0, 1, ..., population−1]:
        for i = 0, ..., k−1: j = i + below(population − i); swap a[i] and a[j]; emit
        a[i]. Only the swapped entries are stored (a dict), so the cost is O(k) time
        and memory whatever the population, and no rejection loop over collisions
        is needed.
        """
        if not 0 <= k <= population < _TWO64:
            raise ValueError(f"cannot sample {k} of {population} without replacement")
        if k == 0:
            return []
        bounds = np.arange(population, population - k, -1, dtype=np.uint64)
        offsets = self._below_many(bounds).tolist()
        swapped: dict[int, int] = {}
        out = []
        for i, off in enumerate(offsets):
            j = i + off
            a_j = swapped.get(j, j)
            swapped[j] = swapped.get(i, i)
            out.append(a_j)
        return out

    def shuffle(self, n: int) -> np.ndarray:
        """A permutation of range(n) as int64, by Fisher–Yates (Knuth's Algorithm P).

        a = [0, 1, ..., n−1]; for i = n−1 down to 1: j = below(i + 1); swap a[i] and
        a[j]. The draws are made in bulk; the swaps run in order over a Python list.
        """
        if n < 0:
            raise ValueError("cannot shuffle a negative length")
        a = list(range(n))
        if n > 1:
            js = self._below_many(np.arange(n, 1, -1, dtype=np.uint64)).tolist()
            for i, j in zip(range(n - 1, 0, -1), js, strict=True):
                a[i], a[j] = a[j], a[i]
        return np.array(a, dtype=np.int64)
