"""Canonical encoding: frozen consensus vectors, and strict decoding (PROTOCOL.md §1).

The hex constants below were computed once and frozen: they are consensus. If one of
these tests fails, the encoding (and with it every id on every chain) has changed.
"""

import hashlib
import struct
from dataclasses import fields, is_dataclass, replace
from typing import Any

import msgpack
import pytest

from consensus.blocks import Block, BlockHeader, compute_block_id
from consensus.checkpoints import CheckpointLeaf
from consensus.encoding import decode, encode, tagged_hash, to_plain
from consensus.errors import DecodeError
from consensus.keys import PrivateKey
from consensus.params import COIN, DEV, TESTNET, genesis_block
from consensus.proofs import Proof
from consensus.state import Account, Schedule
from consensus.tasks import Task, compute_task_id
from consensus.transactions import (
    ModelTx,
    TaskTx,
    Transaction,
    Transfer,
    compute_tx_id,
    sign_tx,
)

KEY = PrivateKey(seed=bytes(range(32)))
GENESIS = genesis_block(DEV)
GENESIS_TASK_ID = compute_task_id(DEV.genesis_task)
TRANSFER = sign_tx(Transfer(pubkey=KEY.pubkey, to=bytes(range(20)), amount=123_456_789,
                            fee=1_000, nonce=7), KEY)
TASK_TX = sign_tx(TaskTx(pubkey=KEY.pubkey,
                         task=replace(DEV.genesis_task, publisher=KEY.address,
                                      bounty=5 * COIN, duration=3),
                         fee=2_000, nonce=8), KEY)
MODEL_TX = sign_tx(ModelTx(
    prev_id=compute_block_id(GENESIS.header),
    proof=Proof(task_id=GENESIS_TASK_ID, ref_model=b"", miner=KEY.pubkey, nonce=2**64 - 1,
                steps=40, n_correct=230, model_id=hashlib.sha256(b"model").digest(),
                ckpt_root=hashlib.sha256(b"ckpt").digest()),
    fee=300), KEY)

# ---------------------------------------------------------------------------------------
# Frozen vectors
# ---------------------------------------------------------------------------------------

DEV_GENESIS_HEX = (
    "92980100c4200000000000000000000000000000000000000000000000000000000000000000ce6a"
    "b13b80c4201fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffc420e3"
    "b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85598c420ed7e54188939"
    "6f020a5bac5a8b75acf8827f043a6ea482d91765ccaffe2794f3c400c42000000000000000000000"
    "00000000000000000000000000000000000000000000000000c42000000000000000000000000000"
    "00000000000000000000000000000000000000c42000000000000000000000000000000000000000"
    "00000000000000000000000000c44000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000000000000000000000000090"
)
DEV_GENESIS_ID = "c4db0a7b1feb51555b5b0962d2e6dad9e603e10c6a92c272aa0a57f3985d3a72"
TESTNET_GENESIS_ID = "8a92f2e4e7afa6fe1ecf73e7d14f8908ee9dd360cac279a55e07e395cc33f091"

DEV_TASK_HEX = (
    "9f9bc4066469676974730108080ac42066ea0d597936791a19d09adb5e37eb040375ab2801773d6b"
    "784d9c728c8c729ac420744aa66c8ac0a220819ff107acec7f8d10a5ccbdfebb80b79b94e7d3a2ec"
    "7718c4207fbb21c43dd251edde34054ea2d6fec2edda4b3495ead44ad8d23406d951d64bcd0511cc"
    "faccfa95000102204095cdc350ce00030d40ce000c3500ce000e7ef0922040cce1ccc8cd27101428"
    "cd01900acd03e80214c414000000000000000000000000000000000000000000"
)
DEV_TASK_ID = "ed7e541889396f020a5bac5a8b75acf8827f043a6ea482d91765ccaffe2794f3"
TESTNET_TASK_ID = "812bb5adc600bf58792c7c89d3c6965c25db88358e22eb67ee2113b070229fac"

KEY_PUBKEY = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
KEY_ADDRESS = "851e114b1bd2dc0258aadc6a6cc741f35869bc38"

# Transactions as they appear in a block: [kind, body].
TRANSFER_HEX = (
    "920096c42003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8c41400"
    "0102030405060708090a0b0c0d0e0f10111213ce075bcd15cd03e807c440d8b29efe87b1160aa26f"
    "881ad144fdcf94d0b05d2ef473598ee703056f48bc706de15ba0a41e22d2dba9987f5ba08fa61141"
    "4914212748de14e9ad211dd63d0a"
)
TRANSFER_ID = "77169a4b71ff07dfc7b975600b9db19ccd21a43215f5a69b743aae3790312d4b"
TASK_TX_HEX = (
    "920195c42003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b89f9bc4"
    "066469676974730108080ac42066ea0d597936791a19d09adb5e37eb040375ab2801773d6b784d9c"
    "728c8c729ac420744aa66c8ac0a220819ff107acec7f8d10a5ccbdfebb80b79b94e7d3a2ec7718c4"
    "207fbb21c43dd251edde34054ea2d6fec2edda4b3495ead44ad8d23406d951d64bcd0511ccfaccfa"
    "95000102204095cdc350ce00030d40ce000c3500ce000e7ef0922040cce1ccc8cd27101428cd0190"
    "0acd03e80203c414851e114b1bd2dc0258aadc6a6cc741f35869bc38ce1dcd6500cd07d008c44072"
    "735b3e0f80b3f72b6f5569cb39f5bf796db224fa3b37af171498f30423d78feec038aad5a12d3edc"
    "0677d2d3b3261479919de1f0d497d44a8882757ef94209"
)
TASK_TX_ID = "88c996b0ace58449b5529165450e017872b303b1739b736b14a961d28b3f1475"
MODEL_TX_HEX = (
    "920294c420c4db0a7b1feb51555b5b0962d2e6dad9e603e10c6a92c272aa0a57f3985d3a7298c420"
    "ed7e541889396f020a5bac5a8b75acf8827f043a6ea482d91765ccaffe2794f3c400c42003a107bf"
    "f3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8cfffffffffffffffff28cce6"
    "c4209372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4c420be4e4dc1"
    "f1e4907ebc4040e2a6c2ebcba6bf79cc8211367a3aceedb760503840cd012cc440bf01db92ea8a11"
    "31e08cdcefc1d538003c20300b3e66e6bdf4051b62a98cfd76765a577c24772245d0f75cf3f597d8"
    "9a3a33402bc5e842eae330a400974e3402"
)
MODEL_TX_ID = "ec55286c541548db930b6dd79a5a3f4ce7fe58b4879c2deba9fc01c3b610d143"

LEAF = CheckpointLeaf(index=3, steps=60, params_hash=bytes(32), momentum_hash=b"\xff" * 32,
                      update_norm=1_500_000)
LEAF_HEX = (
    "95033cc4200000000000000000000000000000000000000000000000000000000000000000c420ff"
    "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffce0016e360"
)
SCHEDULE = Schedule(active=bytes.fromhex(DEV_TASK_ID), start=1, end=100, queue=(bytes(32),))
SCHEDULE_HEX = (
    "94c420ed7e541889396f020a5bac5a8b75acf8827f043a6ea482d91765ccaffe2794f3016491c420"
    "0000000000000000000000000000000000000000000000000000000000000000"
)


@pytest.mark.parametrize(("obj", "tp", "expected"), [
    (Account(0, 0), Account, "920000"),
    (Account(5, 1), Account, "920501"),
    (Account(200, 2**64 - 1), Account, "92ccc8cfffffffffffffffff"),
    (LEAF, CheckpointLeaf, LEAF_HEX),
    (SCHEDULE, Schedule, SCHEDULE_HEX),
    (DEV.genesis_task, Task, DEV_TASK_HEX),
    (GENESIS, Block, DEV_GENESIS_HEX),
    (TRANSFER, Transaction, TRANSFER_HEX),
    (TASK_TX, Transaction, TASK_TX_HEX),
    (MODEL_TX, Transaction, MODEL_TX_HEX),
], ids=["account-zero", "account", "account-wide", "leaf", "schedule", "dev-task",
        "dev-genesis", "transfer", "task-tx", "model-tx"])
def test_encoding_vector(obj: Any, tp: Any, expected: str) -> None:
    assert encode(obj, tp).hex() == expected
    assert decode(tp, bytes.fromhex(expected)) == obj


@pytest.mark.parametrize(("tx", "tx_hex"), [
    (TRANSFER, TRANSFER_HEX), (TASK_TX, TASK_TX_HEX), (MODEL_TX, MODEL_TX_HEX),
], ids=["transfer", "task-tx", "model-tx"])
def test_bare_tx_encoding_is_the_tagged_body(tx: Transaction, tx_hex: str) -> None:
    # In a block a transaction is [kind, body]; the body alone is its own encoding.
    tagged = bytes.fromhex(tx_hex)
    assert tagged[0] == 0x92 and tagged[1] == tx.KIND
    assert encode(tx) == tagged[2:]


@pytest.mark.parametrize(("tx", "expected"), [
    (TRANSFER, TRANSFER_ID), (TASK_TX, TASK_TX_ID), (MODEL_TX, MODEL_TX_ID),
], ids=["transfer", "task-tx", "model-tx"])
def test_tx_id_vector(tx: Transaction, expected: str) -> None:
    assert compute_tx_id(tx).hex() == expected


def test_id_vectors() -> None:
    assert compute_block_id(GENESIS.header).hex() == DEV_GENESIS_ID
    assert compute_block_id(genesis_block(TESTNET).header).hex() == TESTNET_GENESIS_ID
    assert compute_task_id(DEV.genesis_task).hex() == DEV_TASK_ID
    assert compute_task_id(TESTNET.genesis_task).hex() == TESTNET_TASK_ID
    assert GENESIS.header.proof.task_id.hex() == DEV_TASK_ID
    assert KEY.pubkey.hex() == KEY_PUBKEY
    assert KEY.address.hex() == KEY_ADDRESS


# The id rules, recomputed by hand from msgpack bytes written out literally:
# 0x92/0x93 fixarray, 0xa2.. fixstr tag, then the object's encoding with the signature
# (the last field, `c4 40` + 64 bytes = 66 bytes) cut off and the array header shrunk.
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_address_rule_by_hand() -> None:
    pubkey = bytes.fromhex(KEY_PUBKEY)
    assert _sha(bytes.fromhex("92a461646472c420") + pubkey)[:40] == KEY_ADDRESS


def test_task_id_rule_by_hand() -> None:
    assert _sha(b"\x92\xa4task" + bytes.fromhex(DEV_TASK_HEX)) == DEV_TASK_ID


def test_block_id_rule_by_hand() -> None:
    block = bytes.fromhex(DEV_GENESIS_HEX)
    assert block[:2] == b"\x92\x98" and block[-1:] == b"\x90"
    header = block[1:-1]
    assert _sha(b"\x92\xa5block\x97" + header[1:-66]) == DEV_GENESIS_ID


def test_transfer_id_rule_by_hand() -> None:
    body = bytes.fromhex(TRANSFER_HEX)[2:]
    assert body[0] == 0x96
    assert _sha(b"\x93\xa2tx\x00\x95" + body[1:-66]) == TRANSFER_ID


def test_tagged_hash_domain_separation() -> None:
    assert tagged_hash("a", b"x") != tagged_hash("b", b"x")
    assert tagged_hash("a", b"x", b"y") != tagged_hash("a", b"xy")
    assert tagged_hash("a", 1) != tagged_hash("a", b"\x01")


# ---------------------------------------------------------------------------------------
# Strict decoding
# ---------------------------------------------------------------------------------------

def _index(obj: Any, name: str) -> int:
    return [f.name for f in fields(obj)].index(name)


def _patch(obj: Any, plain: Any, dotted: str, value: Any) -> Any:
    """`plain` (the msgpack tree of `obj`) with the field at `dotted` replaced."""
    name, _, rest = dotted.partition(".")
    i = _index(obj, name)
    child = getattr(obj, name)
    new = value if not rest else _patch(child, plain[i], rest, value)
    return plain[:i] + (new,) + plain[i + 1:]


def patched(obj: Any, dotted: str, value: Any) -> bytes:
    """The encoding of `obj` with one field (a dotted path) swapped for a raw msgpack value."""
    assert is_dataclass(obj)
    return msgpack.packb(_patch(obj, to_plain(obj), dotted, value))


def dropped(obj: Any, dotted: str) -> bytes:
    """The encoding of `obj` with the last item of the array at `dotted` removed."""
    plain = to_plain(obj)
    if not dotted:
        return msgpack.packb(plain[:-1])
    inner = getattr(obj, dotted)
    return msgpack.packb(_patch(obj, plain, dotted, to_plain(inner)[:-1]))


TRANSFER_BODY = to_plain(TRANSFER)
TRANSFER_BYTES = encode(TRANSFER)
GENESIS_BYTES = encode(GENESIS)
TASK = DEV.genesis_task

BAD_ENCODINGS: list[tuple[str, Any, bytes]] = [
    # framing
    ("empty", Block, b""),
    ("trailing-zero", Block, GENESIS_BYTES + b"\x00"),
    ("trailing-array", Block, GENESIS_BYTES + b"\x90"),
    ("trailing-object", Account, encode(Account(1, 2)) + encode(Account(1, 2))),
    ("truncated-by-one", Block, GENESIS_BYTES[:-1]),
    ("truncated-mid-hash", Block, GENESIS_BYTES[:20]),
    ("reserved-0xc1", Account, b"\xc1"),
    ("nil-top", Account, b"\xc0"),
    ("deep-nesting", Account, b"\x91" * 5000 + b"\x00"),
    ("array-claims-2^32-items", Account, b"\xdd\xff\xff\xff\xff"),
    ("bin-claims-2^32-bytes", Transfer, b"\x96\xc6\xff\xff\xff\xff"),
    # arity
    ("arity-0", Account, b"\x90"),
    ("arity-1", Account, msgpack.packb((1,))),
    ("arity-3", Account, msgpack.packb((1, 2, 3))),
    ("not-an-array", Account, msgpack.packb(5)),
    ("transfer-missing-sig", Transfer, dropped(TRANSFER, "")),
    ("transfer-extra-field", Transfer, msgpack.packb(TRANSFER_BODY + (0,))),
    ("block-extra-field", Block, msgpack.packb(to_plain(GENESIS) + ((),))),
    ("proof-short", Block, patched(GENESIS, "header.proof", to_plain(GENESIS.header.proof)[:-1])),
    ("dataset-short", Task, patched(TASK, "dataset", to_plain(TASK.dataset)[:-1])),
    ("account-for-transfer", Transfer, encode(Account(1, 2))),
    # wrong types
    ("str-for-bytes", Transfer, patched(TRANSFER, "pubkey", "a" * 32)),
    ("str-for-name", Task, patched(TASK, "dataset.name", "digits")),
    ("str-for-int", Account, msgpack.packb(("5", 0))),
    ("bytes-for-int", Account, msgpack.packb((b"\x05", 0))),
    ("int-for-bytes", Transfer, patched(TRANSFER, "to", 0)),
    ("float64-for-int", Account, msgpack.packb((5.0, 0))),
    ("float32-for-int", Account, b"\x92\xca" + struct.pack(">f", 5.0) + b"\x00"),
    ("float-for-target", Block, patched(GENESIS, "header.target", 1.0)),
    ("true-for-int", Account, msgpack.packb((True, 0))),
    ("false-for-int", Account, msgpack.packb((0, False))),
    ("bool-for-bytes", Transfer, patched(TRANSFER, "signature", False)),
    ("none-for-int", Account, msgpack.packb((None, 0))),
    ("none-for-bytes", Transfer, patched(TRANSFER, "pubkey", None)),
    ("none-for-object", Block, patched(GENESIS, "header", None)),
    ("none-for-opt-hash", Block, patched(GENESIS, "header.proof.ref_model", None)),
    ("map-object", Account, msgpack.packb({b"balance": 1, b"nonce": 0})),
    ("map-empty", Account, b"\x80"),
    ("map-str-keys", Account, msgpack.packb({"balance": 1, "nonce": 0})),
    ("map-for-bytes", Transfer, patched(TRANSFER, "to", {})),
    ("map-for-object", Block, patched(GENESIS, "header.proof", {})),
    ("array-for-bytes", Transfer, patched(TRANSFER, "pubkey", tuple(KEY.pubkey))),
    ("array-for-int", Account, msgpack.packb(((5,), 0))),
    ("int-for-object", Block, patched(GENESIS, "header", 0)),
    ("bytes-for-array", Task, patched(TASK, "hpp.batch_sizes", b"\x20\x40")),
    ("int-for-target", Block, patched(GENESIS, "header.target", 5)),
    ("ext-for-int", Account, b"\x92\xd4\x01\x05\x00"),
    ("timestamp-ext-for-int", Account, b"\x92\xd6\xff\x00\x00\x00\x00\x00"),
    # out of range
    ("negative-fixint", Account, b"\x92\xff\x00"),
    ("negative-int64", Account, msgpack.packb((-(2**63), 0))),
    ("u8-overflow", Task, patched(TASK, "dataset.channels", 256)),
    ("u16-overflow", Task, patched(TASK, "dataset.height", 65536)),
    ("u16-overflow-in-array", Task, patched(TASK, "hpp.batch_sizes", (32, 65536))),
    ("u32-overflow", Block, patched(GENESIS, "header.version", 2**32)),
    ("u32-overflow-proof", Block, patched(GENESIS, "header.proof.steps", 2**32)),
    # over-long and wrong-length bytes
    ("name-33", Task, patched(TASK, "dataset.name", b"x" * 33)),
    ("hash-31", Block, patched(GENESIS, "header.prev_id", bytes(31))),
    ("hash-33", Block, patched(GENESIS, "header.prev_id", bytes(33))),
    ("hash-empty", Block, patched(GENESIS, "header.tx_root", b"")),
    ("task-id-31", Block, patched(GENESIS, "header.proof.task_id", bytes(31))),
    ("opt-hash-1", Block, patched(GENESIS, "header.proof.ref_model", b"\x00")),
    ("opt-hash-31", Block, patched(GENESIS, "header.proof.ref_model", bytes(31))),
    ("opt-hash-33", Block, patched(GENESIS, "header.proof.ref_model", bytes(33))),
    ("address-19", Transfer, patched(TRANSFER, "to", bytes(19))),
    ("address-21", Transfer, patched(TRANSFER, "to", bytes(21))),
    ("pubkey-33", Transfer, patched(TRANSFER, "pubkey", bytes(33))),
    ("sig-63", Transfer, patched(TRANSFER, "signature", bytes(63))),
    ("sig-65", Transfer, patched(TRANSFER, "signature", bytes(65))),
    ("sig-empty", Transfer, patched(TRANSFER, "signature", b"")),
    ("target-31-bytes", Block, patched(GENESIS, "header.target", bytes(31))),
    ("target-33-bytes", Block, patched(GENESIS, "header.target", bytes(33))),
    ("batch-sizes-9", Task, patched(TASK, "hpp.batch_sizes", (32,) * 9)),
    ("block-txs-over-limit", Block, patched(GENESIS, "txs", (0,) * 20_001)),
    ("schedule-queue-65", Schedule, msgpack.packb((bytes(32), 1, 2, (bytes(32),) * 65))),
    # non-minimal msgpack forms of valid values
    ("uint8-form-of-5", Account, b"\x92\xcc\x05\x00"),
    ("uint16-form-of-5", Account, b"\x92\xcd\x00\x05\x00"),
    ("uint32-form-of-5", Account, b"\x92\xce\x00\x00\x00\x05\x00"),
    ("uint64-form-of-5", Account, b"\x92\xcf" + (5).to_bytes(8, "big") + b"\x00"),
    ("int8-form-of-5", Account, b"\x92\xd0\x05\x00"),
    ("int16-form-of-5", Account, b"\x92\xd1\x00\x05\x00"),
    ("int64-form-of-0", Account, b"\x92\x00\xd3" + bytes(8)),
    ("uint16-form-of-200", Account, b"\x92\xcd\x00\xc8\x00"),
    ("uint64-form-of-2^32-1", Account, b"\x92\xcf" + (2**32 - 1).to_bytes(8, "big") + b"\x00"),
    ("array16-header", Account, b"\xdc\x00\x02\x05\x00"),
    ("array32-header", Account, b"\xdd\x00\x00\x00\x02\x05\x00"),
    ("bin16-header", Transfer, b"\x96\xc5\x00\x20" + TRANSFER_BYTES[3:]),
    ("bin32-header", Transfer, b"\x96\xc6\x00\x00\x00\x20" + TRANSFER_BYTES[3:]),
    # unions
    ("kind-3", Transaction, msgpack.packb((3, TRANSFER_BODY))),
    ("kind-255", Transaction, msgpack.packb((255, TRANSFER_BODY))),
    ("kind-negative", Transaction, msgpack.packb((-1, TRANSFER_BODY))),
    ("kind-bytes", Transaction, msgpack.packb((b"\x00", TRANSFER_BODY))),
    ("kind-false", Transaction, msgpack.packb((False, TRANSFER_BODY))),
    ("kind-none", Transaction, msgpack.packb((None, TRANSFER_BODY))),
    ("kind-float", Transaction, msgpack.packb((0.0, TRANSFER_BODY))),
    ("kind-uint8-form", Transaction, b"\x92\xcc\x00" + TRANSFER_BYTES),
    ("union-arity-1", Transaction, msgpack.packb((0,))),
    ("union-arity-3", Transaction, msgpack.packb((0, TRANSFER_BODY, 0))),
    ("union-untagged", Transaction, TRANSFER_BYTES),
    ("union-map", Transaction, msgpack.packb({0: TRANSFER_BODY}, use_bin_type=True)),
    ("kind-body-mismatch-1", Transaction, msgpack.packb((1, TRANSFER_BODY))),
    ("kind-body-mismatch-2", Transaction, msgpack.packb((2, TRANSFER_BODY))),
    ("block-unknown-tx-kind", Block, patched(GENESIS, "txs", ((7, TRANSFER_BODY),))),
    ("block-untagged-tx", Block, patched(GENESIS, "txs", (TRANSFER_BODY,))),
]


@pytest.mark.parametrize(("tp", "data"), [(tp, data) for _, tp, data in BAD_ENCODINGS],
                         ids=[name for name, _, _ in BAD_ENCODINGS])
def test_decode_rejects(tp: Any, data: bytes) -> None:
    with pytest.raises(DecodeError) as exc:
        decode(tp, data)
    assert exc.value.reason == "bad-encoding"


@pytest.mark.parametrize("data", [
    bytearray(GENESIS_BYTES), memoryview(GENESIS_BYTES), GENESIS_BYTES.hex(), None,
    list(GENESIS_BYTES), 0,
], ids=["bytearray", "memoryview", "str", "none", "list", "int"])
def test_decode_rejects_non_bytes_input(data: Any) -> None:
    with pytest.raises(DecodeError) as exc:
        decode(Block, data)
    assert exc.value.reason == "bad-encoding"


# Controls for the table above: the same shapes, at the edge of what is allowed, decode.
GOOD_EDGES: list[tuple[str, Any, bytes, Any]] = [
    ("fixint-5", Account, b"\x92\x05\x00", Account(5, 0)),
    ("fixint-127", Account, b"\x92\x7f\x00", Account(127, 0)),
    ("uint8-200", Account, b"\x92\xcc\xc8\x00", Account(200, 0)),
    ("uint16-256", Account, b"\x92\xcd\x01\x00\x00", Account(256, 0)),
    ("uint64-2^32", Account, b"\x92\xcf" + (2**32).to_bytes(8, "big") + b"\x00", Account(2**32, 0)),
    ("uint64-max", Account, b"\x92\xcf" + b"\xff" * 8 + b"\x00", Account(2**64 - 1, 0)),
    ("u8-max", Task, patched(TASK, "dataset.channels", 255),
     replace(TASK, dataset=replace(TASK.dataset, channels=255))),
    ("u32-max", Block, patched(GENESIS, "header.proof.steps", 2**32 - 1),
     replace(GENESIS, header=replace(GENESIS.header,
                                     proof=replace(GENESIS.header.proof, steps=2**32 - 1)))),
    ("name-32", Task, patched(TASK, "dataset.name", b"x" * 32),
     replace(TASK, dataset=replace(TASK.dataset, name=b"x" * 32))),
    ("name-empty", Task, patched(TASK, "dataset.name", b""),
     replace(TASK, dataset=replace(TASK.dataset, name=b""))),
    ("opt-hash-32", Block, patched(GENESIS, "header.proof.ref_model", b"\x01" * 32),
     replace(GENESIS, header=replace(GENESIS.header,
                                     proof=replace(GENESIS.header.proof, ref_model=b"\x01" * 32)))),
    ("target-max", Block, patched(GENESIS, "header.target", b"\xff" * 32),
     replace(GENESIS, header=replace(GENESIS.header, target=2**256 - 1))),
    ("target-zero", Block, patched(GENESIS, "header.target", bytes(32)),
     replace(GENESIS, header=replace(GENESIS.header, target=0))),
    ("batch-sizes-8", Task, patched(TASK, "hpp.batch_sizes", (65535,) * 8),
     replace(TASK, hpp=replace(TASK.hpp, batch_sizes=(65535,) * 8))),
    ("batch-sizes-empty", Task, patched(TASK, "hpp.batch_sizes", ()),
     replace(TASK, hpp=replace(TASK.hpp, batch_sizes=()))),
    ("schedule-queue-64", Schedule, msgpack.packb((bytes(32), 1, 2, (bytes(32),) * 64)),
     Schedule(bytes(32), 1, 2, (bytes(32),) * 64)),
    ("block-with-txs", Block, patched(GENESIS, "txs", (to_plain(TRANSFER, Transaction),)),
     replace(GENESIS, txs=(TRANSFER,))),
]


@pytest.mark.parametrize(("tp", "data", "expected"),
                         [(tp, data, obj) for _, tp, data, obj in GOOD_EDGES],
                         ids=[name for name, _, _, _ in GOOD_EDGES])
def test_decode_accepts_edges(tp: Any, data: bytes, expected: Any) -> None:
    assert decode(tp, data) == expected
    assert encode(expected, tp) == data


def test_decoded_types_are_exact() -> None:
    header = decode(BlockHeader, encode(GENESIS.header))
    assert type(header.target) is int and type(header.height) is int
    assert type(header.prev_id) is bytes
    assert type(decode(Block, GENESIS_BYTES).txs) is tuple
    assert type(decode(Task, bytes.fromhex(DEV_TASK_HEX)).hpp.batch_sizes) is tuple
