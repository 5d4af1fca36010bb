"""Transactions: transfers, task publications and model transactions (PROTOCOL.md §7, §10).

Every transaction is signed over its id, `tx_id = H("tx", kind, fields without the
signature)`. Transfers and task transactions carry an account nonce; a model
transaction needs none, because its model id can be registered only once per chain.
"""

from dataclasses import dataclass, replace
from typing import ClassVar

from consensus.encoding import (
    U64,
    Address,
    Address20,
    Hash,
    Hash32,
    PubKey32,
    Sig64,
    tagged_hash,
    to_plain,
)
from consensus.errors import ConsensusError
from consensus.keys import PrivateKey, check_signature, compute_address
from consensus.proofs import Proof
from consensus.tasks import Task

NO_SIG = bytes(64)


@dataclass(frozen=True, slots=True)
class Transfer:
    """Move `amount` from the signer's account to `to`, paying `fee` to the miner."""

    KIND: ClassVar[int] = 0
    pubkey: PubKey32
    to: Address20
    amount: U64
    fee: U64
    nonce: U64
    signature: Sig64 = NO_SIG


@dataclass(frozen=True, slots=True)
class TaskTx:
    """Publish a task; its bounty is escrowed from the publisher's balance."""

    KIND: ClassVar[int] = 1
    pubkey: PubKey32
    task: Task
    fee: U64
    nonce: U64
    signature: Sig64 = NO_SIG


@dataclass(frozen=True, slots=True)
class ModelTx:
    """Publish a trained model that later miners may reference (an mtx)."""

    KIND: ClassVar[int] = 2
    prev_id: Hash32  # the tip the model was mined on
    proof: Proof
    fee: U64
    signature: Sig64 = NO_SIG


Transaction = Transfer | TaskTx | ModelTx


def compute_tx_id(tx: Transaction) -> Hash:
    """tx_id = H("tx", kind, every field but the signature, which every kind declares last)."""
    plain = to_plain(tx)
    return tagged_hash("tx", tx.KIND, plain[:-1])


def signer_pubkey(tx: Transaction) -> bytes:
    """The key that must have signed `tx`."""
    return tx.proof.miner if isinstance(tx, ModelTx) else tx.pubkey


def signer_address(tx: Transaction) -> Address:
    """The account that pays for `tx`."""
    return compute_address(signer_pubkey(tx))


def sign_tx(tx: Transaction, key: PrivateKey) -> Transaction:
    """`tx` signed by `key` (which must be its signer)."""
    if key.pubkey != signer_pubkey(tx):
        raise ValueError("key is not the transaction's signer")
    return replace(tx, signature=key.sign(compute_tx_id(tx)))


def check_tx_signature(tx: Transaction, tx_id: Hash) -> bool:
    """True when the signer's Ed25519 signature over `tx_id` (tx's own id) verifies."""
    return check_signature(signer_pubkey(tx), tx_id, tx.signature)


def validate_tx_signature(tx: Transaction) -> None:
    """The signer's Ed25519 signature over tx_id must verify (reason `bad-txn-sig`)."""
    tx_id = compute_tx_id(tx)
    if not check_tx_signature(tx, tx_id):
        raise ConsensusError("bad-txn-sig", tx_id.hex())

