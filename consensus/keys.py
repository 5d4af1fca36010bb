"""Ed25519 keys, addresses, and signatures over object ids (PROTOCOL.md §1)."""

import functools
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from consensus.encoding import Address, tagged_hash

_RAW = serialization.Encoding.Raw

# Encodings of Ed25519's eight small-order points (the 8-torsion: identity, (0, -1),
# (±sqrt(-1), 0) and the four points of order 8), including their non-canonical forms
# (y + p where it fits in 255 bits, and a sign bit set on x = 0). OpenSSL accepts
# signatures under these keys that verify for any message — (identity, S = 0) among
# them — so an address derived from one could be spent by anyone, and a node built on
# libsodium (which refuses them) would disagree about validity. Consensus refuses them.
# Derived by solving the curve equation for the torsion points; the same set as
# libsodium's blocklist.
SMALL_ORDER_KEYS = frozenset(bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
))


@functools.lru_cache(maxsize=1 << 16)
def compute_address(pubkey: bytes) -> Address:
    """An address is the first 20 bytes of H("addr", pubkey)."""
    return Address(tagged_hash("addr", pubkey)[:20])


@dataclass(frozen=True, slots=True)
class PrivateKey:
    """An Ed25519 signing key held as its 32-byte seed."""

    seed: bytes

    @classmethod
    def generate(cls) -> "PrivateKey":
        key = Ed25519PrivateKey.generate()
        return cls(key.private_bytes(_RAW, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption()))

    @property
    def pubkey(self) -> bytes:
        return self._key().public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)

    @property
    def address(self) -> Address:
        return compute_address(self.pubkey)

    def sign(self, message: bytes) -> bytes:
        return self._key().sign(message)

    def _key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def __repr__(self) -> str:  # never print the seed
        return f"PrivateKey(address={self.address.hex()})"


@functools.lru_cache(maxsize=1 << 16)
def _public_key(pubkey: bytes) -> Ed25519PublicKey:
    """Parsed keys are cached: the same accounts sign again and again."""
    return Ed25519PublicKey.from_public_bytes(pubkey)


def check_signature(pubkey: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is `pubkey`'s Ed25519 signature of `message`.

    Small-order public keys never verify (see SMALL_ORDER_KEYS)."""
    if pubkey in SMALL_ORDER_KEYS:
        return False
    try:
        _public_key(pubkey).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
