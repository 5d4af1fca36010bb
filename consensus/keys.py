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
    """True when `signature` is `pubkey`'s Ed25519 signature of `message`."""
    try:
        _public_key(pubkey).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
