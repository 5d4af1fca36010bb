"""Property tests of the canonical encoding: every object round-trips, and no input makes
the decoder fail with anything but DecodeError (PROTOCOL.md §1)."""

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consensus.blocks import Block, BlockHeader
from consensus.checkpoints import Checkpoint, CheckpointLeaf, FraudProof
from consensus.encoding import decode, encode
from consensus.errors import DecodeError
from consensus.proofs import Proof
from consensus.state import Account, BlockRecord, ModelRecord, Schedule
from consensus.tasks import ArchSpace, Dataset, HppSpace, Task
from consensus.transactions import ModelTx, TaskTx, Transaction, Transfer

EXAMPLES = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def uint(bits: int) -> st.SearchStrategy[int]:
    return st.integers(min_value=0, max_value=(1 << bits) - 1)


def blob(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


u8, u16, u32, u64, u256 = uint(8), uint(16), uint(32), uint(64), uint(256)
hash32, address, pubkey, sig = blob(32), blob(20), blob(32), blob(64)
opt_hash = st.one_of(st.just(b""), hash32)

datasets = st.builds(
    Dataset, name=st.binary(max_size=32), channels=u8, height=u16, width=u16, classes=u16,
    train_hash=hash32, val_hash=hash32, test_hash=hash32,
    train_size=u32, val_size=u32, test_size=u32)
arch_spaces = st.builds(ArchSpace, family=u8, depth_min=u8, depth_max=u8,
                        width_min=u16, width_max=u16)
hpp_spaces = st.builds(
    HppSpace, lr_min_ppm=u32, lr_max_ppm=u32, momentum_min_ppm=u32, momentum_max_ppm=u32,
    batch_sizes=st.lists(u16, max_size=8).map(tuple))
tasks = st.builds(
    Task, dataset=datasets, arch=arch_spaces, hpp=hpp_spaces, t_acc=u32, t_min=u32,
    wm_ppm=u32, k=u32, s_min=u32, s_max=u32, l_ref=u32, delta_ppm=u32, eps_correct=u32,
    duration=u32, publisher=address, bounty=u64)
proofs = st.builds(Proof, task_id=hash32, ref_model=opt_hash, miner=pubkey, nonce=u64,
                   steps=u32, n_correct=u32, model_id=hash32, ckpt_root=hash32)
transfers = st.builds(Transfer, pubkey=pubkey, to=address, amount=u64, fee=u64, nonce=u64,
                      signature=sig)
task_txs = st.builds(TaskTx, pubkey=pubkey, task=tasks, fee=u64, nonce=u64, signature=sig)
model_txs = st.builds(ModelTx, prev_id=hash32, proof=proofs, fee=u64, signature=sig)
transactions = st.one_of(transfers, task_txs, model_txs)
headers = st.builds(BlockHeader, version=u32, height=u64, prev_id=hash32, timestamp=u64,
                    target=u256, tx_root=hash32, proof=proofs, signature=sig)
blocks = st.builds(Block, header=headers, txs=st.lists(transactions, max_size=4).map(tuple))
leaves = st.builds(CheckpointLeaf, index=u32, steps=u32, params_hash=hash32,
                   momentum_hash=hash32, update_norm=u64)
checkpoints = st.builds(Checkpoint, leaf=leaves,
                        path=st.lists(hash32, max_size=32).map(tuple),
                        params=st.binary(max_size=64), momentum=st.binary(max_size=64))
fraud_proofs = st.builds(FraudProof, owner_id=hash32, start=checkpoints, end=checkpoints)
accounts = st.builds(Account, balance=u64, nonce=u64)
model_records = st.builds(ModelRecord, height=u64, task_id=hash32, total_steps=u64)
block_records = st.builds(BlockRecord, height=u64)
schedules = st.builds(Schedule, active=hash32, start=u64, end=u64,
                      queue=st.lists(hash32, max_size=64).map(tuple))

# (type to decode as, strategy): a union is decoded as the union, i.e. tagged.
OBJECTS: list[tuple[Any, st.SearchStrategy[Any]]] = [
    (Dataset, datasets), (ArchSpace, arch_spaces), (HppSpace, hpp_spaces), (Task, tasks),
    (Proof, proofs), (Transfer, transfers), (TaskTx, task_txs), (ModelTx, model_txs),
    (Transaction, transactions), (BlockHeader, headers), (Block, blocks),
    (CheckpointLeaf, leaves), (Checkpoint, checkpoints), (FraudProof, fraud_proofs),
    (Account, accounts), (ModelRecord, model_records), (BlockRecord, block_records),
    (Schedule, schedules),
]
IDS = [getattr(tp, "__name__", "Transaction") for tp, _ in OBJECTS]
typed_objects = st.one_of([st.tuples(st.just(tp), strategy) for tp, strategy in OBJECTS])


@pytest.mark.parametrize(("tp", "strategy"), OBJECTS, ids=IDS)
def test_roundtrip(tp: Any, strategy: st.SearchStrategy[Any]) -> None:
    @EXAMPLES
    @given(strategy)
    def check(obj: Any) -> None:
        data = encode(obj, tp)
        assert decode(tp, data) == obj
        assert encode(decode(tp, data), tp) == data

    check()


@EXAMPLES
@given(transactions)
def test_tagged_tx_is_kind_and_body(tx: Transaction) -> None:
    tagged = encode(tx, Transaction)
    body = encode(tx)
    assert tagged == bytes([0x92, tx.KIND]) + body
    assert decode(type(tx), body) == tx


def _decodes_canonically_or_refuses(tp: Any, data: bytes) -> None:
    """The one property of a strict decoder: it returns an object whose encoding is
    exactly the input, or it raises DecodeError; nothing else escapes."""
    try:
        obj = decode(tp, data)
    except DecodeError as exc:
        assert exc.reason == "bad-encoding"
        return
    assert encode(obj, tp) == data


DECODE_TYPES = [tp for tp, _ in OBJECTS]


@EXAMPLES
@given(st.sampled_from(DECODE_TYPES), st.binary(max_size=300))
def test_random_bytes(tp: Any, data: bytes) -> None:
    _decodes_canonically_or_refuses(tp, data)


# Random bytes rarely look like msgpack arrays; these start from valid encodings.
@st.composite
def mutated(draw: st.DrawFn, objects: st.SearchStrategy[tuple[Any, Any]] = typed_objects
            ) -> tuple[Any, bytes]:
    tp, obj = draw(objects)
    data = bytearray(encode(obj, tp))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(u8)
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[pos:]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=4))
    return tp, bytes(data)


@pytest.mark.parametrize(("tp", "strategy"), OBJECTS, ids=IDS)
def test_mutated_encodings(tp: Any, strategy: st.SearchStrategy[Any]) -> None:
    @EXAMPLES
    @given(mutated(st.tuples(st.just(tp), strategy)))
    def check(item: tuple[Any, bytes]) -> None:
        _decodes_canonically_or_refuses(tp, item[1])

    check()


# Mutants decoded as a different type than they were encoded as: same shapes, new paths.
@EXAMPLES
@given(mutated(), st.sampled_from(DECODE_TYPES))
def test_mutated_encodings_as_other_types(item: tuple[Any, bytes], tp: Any) -> None:
    _decodes_canonically_or_refuses(tp, item[1])
