"""Difficulty, fork choice, header and block validation, and task parameters
(PROTOCOL.md §2, §8, §9, §10)."""

import hashlib
import itertools
from dataclasses import replace
from typing import Any

import pytest

from consensus.blocks import (
    BLOCK_VERSION,
    Block,
    BlockHeader,
    block_size,
    compute_block_id,
    compute_tx_root,
    sign_header,
)
from consensus.difficulty import compute_mtx_target, compute_next_target
from consensus.encoding import ZERO_HASH, Hash
from consensus.errors import ConsensusError
from consensus.fork_choice import (
    WEIGHT_AT_MIN,
    WEIGHT_BONUS,
    WEIGHT_FULL,
    ChainTip,
    check_better_tip,
    compute_block_weight,
    select_best_tip,
)
from consensus.keys import PrivateKey
from consensus.params import DEV, MAX_TARGET, TESTNET, ChainParams, genesis_block
from consensus.proofs import Proof
from consensus.seal import NoProofEngine
from consensus.tasks import FAMILY_CNN, Task, compute_task_id, validate_task
from consensus.transactions import ModelTx, Transaction, Transfer, sign_tx
from consensus.validation import (
    HeaderContext,
    compute_median_time_past,
    validate_block,
    validate_block_body,
    validate_header,
)

MINER = PrivateKey(seed=b"\x07" * 32)
KEY = PrivateKey(seed=bytes(range(32)))
TASK = DEV.genesis_task
TASK_ID = compute_task_id(TASK)
ACCURACY = replace(DEV, fork_rule="accuracy")


def raises(reason: str, fn: Any, *args: Any) -> None:
    with pytest.raises(ConsensusError) as exc:
        fn(*args)
    assert exc.value.reason == reason, exc.value


# ---------------------------------------------------------------------------------------
# Difficulty
# ---------------------------------------------------------------------------------------

INTERVAL = DEV.retarget_interval
# The span compute_next_target treats as "on schedule" (its `expected`); every scaling
# vector below is a multiple of it.
EXPECTED = (DEV.retarget_interval - 1) * DEV.target_block_time  # block gaps in a window
T = 1 << 200


@pytest.mark.parametrize("height", [0, 1, INTERVAL - 1, INTERVAL + 1, 2 * INTERVAL - 1, 12345])
@pytest.mark.parametrize(("start", "end"), [(0, 1), (0, 10**9), (500, 100)])
def test_no_retarget_between_boundaries(height: int, start: int, end: int) -> None:
    assert compute_next_target(DEV, height, T, start, end) == T


@pytest.mark.parametrize(("took", "expected"), [
    (EXPECTED, T),
    (EXPECTED // 2, T * (EXPECTED // 2) // EXPECTED),
    (EXPECTED * 3 // 2, T * (EXPECTED * 3 // 2) // EXPECTED),
    (EXPECTED * 2, T * 2),
    (EXPECTED * 4, T * 4),
    (EXPECTED * 4 + 1, T * 4),  # clamped
    (EXPECTED * 1000, T * 4),
    (EXPECTED // 4, T // 4),
    (EXPECTED // 4 - 1, T // 4),  # clamped
    (1, T // 4),
    (0, T // 4),
    (-EXPECTED, T // 4),  # timestamps going backwards
])
@pytest.mark.parametrize("height", [INTERVAL, 7 * INTERVAL])
def test_retarget_scales_and_clamps(took: int, expected: int, height: int) -> None:
    start = DEV.genesis_time + 1_000
    assert compute_next_target(DEV, height, T, start, start + took) == expected


@pytest.mark.parametrize(("limit", "parent", "took", "expected"), [
    (T, T // 2, EXPECTED * 4, T),
    (T, T, EXPECTED * 2, T),
    (T, T, EXPECTED, T),
    (T, T, EXPECTED // 2, T * (EXPECTED // 2) // EXPECTED),
    (MAX_TARGET, MAX_TARGET, EXPECTED * 4, MAX_TARGET),
    (MAX_TARGET, MAX_TARGET // 2, EXPECTED * 4, MAX_TARGET),
])
def test_retarget_capped_at_t2_limit(limit: int, parent: int, took: int, expected: int) -> None:
    params = replace(DEV, t2_limit=limit)
    assert compute_next_target(params, INTERVAL, parent, 0, took) == expected


@pytest.mark.parametrize(("parent", "expected"), [(1, 1), (3, 1), (4, 1), (8, 2)])
def test_retarget_never_below_one(parent: int, expected: int) -> None:
    assert compute_next_target(DEV, INTERVAL, parent, 0, 0) == expected


@pytest.mark.parametrize("params", [DEV, TESTNET], ids=["dev", "testnet"])
def test_retarget_on_schedule_keeps_target(params: ChainParams) -> None:
    # A chain whose blocks come exactly every target_block_time must keep its target.
    # The arguments are the ones the docstring names: the timestamp of the block
    # `retarget_interval` below the new height, and the parent's.
    def time_of(height: int) -> int:
        return params.genesis_time + height * params.target_block_time

    height = params.retarget_interval
    start, parent_time = time_of(height - params.retarget_interval), time_of(height - 1)
    assert compute_next_target(params, height, T, start, parent_time) == T


@pytest.mark.parametrize(("interval", "block_time"), [
    (DEV.retarget_interval, DEV.target_block_time),
    (TESTNET.retarget_interval, TESTNET.target_block_time),
    (7, 5),  # a window of 35 s: 35 // 4 = 8, and 8 / 35 is below a quarter
    (3, 1),  # a window of 3 s: 3 // 4 = 0, and a burst of equal timestamps zeroes t2
], ids=["dev", "testnet", "35s-window", "3s-window"])
def test_retarget_clamp_is_exact_for_any_window(interval: int, block_time: int) -> None:
    # The docstring's rule is a step of at most x4 and at least x1/4, whatever the params.
    params = replace(DEV, retarget_interval=interval, target_block_time=block_time)
    assert compute_next_target(params, interval, T, 0, 0) == T // 4
    assert compute_next_target(params, interval, T, 0, 10**9) == T * 4


@pytest.mark.parametrize(("t2", "expected"), [
    (1, DEV.mtx_factor), (T, T * DEV.mtx_factor), (MAX_TARGET // 16, MAX_TARGET // 16 * 16),
    (MAX_TARGET // 16 + 1, MAX_TARGET), (MAX_TARGET, MAX_TARGET),
])
def test_mtx_target(t2: int, expected: int) -> None:
    assert compute_mtx_target(DEV, t2) == expected


# ---------------------------------------------------------------------------------------
# Block weight and fork choice
# ---------------------------------------------------------------------------------------

VAL = TASK.dataset.val_size  # 250; t_min 200, t_acc 225


@pytest.mark.parametrize(("n_correct", "weight"), [
    (0, None), (TASK.t_min, None), (TASK.t_acc - 1, None),
    (TASK.t_acc, 1), (TASK.t_acc + 1, 1), (VAL, 1),
    (VAL + 1, None), (2**32 - 1, None),
])
def test_weight_longest_chain(n_correct: int, weight: int | None) -> None:
    if weight is None:
        raises("bad-accuracy", compute_block_weight, DEV, TASK, n_correct)
    else:
        assert compute_block_weight(DEV, TASK, n_correct) == weight


@pytest.mark.parametrize(("n_correct", "weight"), [
    (0, None), (TASK.t_min - 1, None),
    (TASK.t_min, WEIGHT_AT_MIN),
    (212, 532_000),  # 100_000 + 900_000 * 12 // 25
    (TASK.t_acc - 1, 964_000),
    (TASK.t_acc, WEIGHT_FULL),
    (237, 1_120_000),  # 1_000_000 + 250_000 * 12 // 25
    (VAL, WEIGHT_FULL + WEIGHT_BONUS),
    (VAL + 1, None),
])
def test_weight_accuracy_rule(n_correct: int, weight: int | None) -> None:
    if weight is None:
        raises("bad-accuracy", compute_block_weight, ACCURACY, TASK, n_correct)
    else:
        assert compute_block_weight(ACCURACY, TASK, n_correct) == weight


@pytest.mark.parametrize("task", [
    TASK,
    TESTNET.genesis_task,
    replace(TASK, t_min=1, t_acc=2, dataset=replace(TASK.dataset, val_size=3)),
    replace(TASK, t_min=TASK.t_acc),
], ids=["dev", "testnet", "tiny", "t_min=t_acc"])
def test_weight_accuracy_rule_monotonic(task: Task) -> None:
    weights = [compute_block_weight(ACCURACY, task, n)
               for n in range(task.t_min, task.dataset.val_size + 1)]
    assert all(a < b for a, b in itertools.pairwise(weights))
    assert weights[0] >= WEIGHT_AT_MIN and weights[-1] == WEIGHT_FULL + WEIGHT_BONUS
    assert compute_block_weight(ACCURACY, task, task.t_acc) == WEIGHT_FULL


def test_weight_when_t_acc_is_all_of_validation() -> None:
    task = replace(TASK, t_acc=VAL)
    assert compute_block_weight(ACCURACY, task, VAL) == WEIGHT_FULL + WEIGHT_BONUS
    assert compute_block_weight(ACCURACY, task, VAL - 1) < WEIGHT_FULL
    assert compute_block_weight(DEV, task, VAL) == 1


@pytest.mark.parametrize(("candidate", "current", "better"), [
    (ChainTip(10, 5), ChainTip(9, 1), True),  # heavier wins, even seen later
    (ChainTip(9, 1), ChainTip(10, 5), False),
    (ChainTip(10, 1), ChainTip(10, 5), True),  # equal weight: first seen wins
    (ChainTip(10, 5), ChainTip(10, 1), False),
    (ChainTip(10, 5), ChainTip(10, 5), False),
    (ChainTip(2**300, 9), ChainTip(2**300 - 1, 0), True),
])
def test_check_better_tip(candidate: ChainTip, current: ChainTip, better: bool) -> None:
    assert check_better_tip(candidate, current) is better


def test_select_best_tip() -> None:
    tips = [ChainTip(5, 3), ChainTip(7, 4), ChainTip(7, 2), ChainTip(1, 0), ChainTip(7, 6)]
    for order in itertools.permutations(tips):
        best = select_best_tip(list(order))
        assert best == ChainTip(7, 2)
        assert not any(check_better_tip(t, best) for t in tips)
    assert select_best_tip([ChainTip(0, 0)]) == ChainTip(0, 0)


# ---------------------------------------------------------------------------------------
# Header validation
# ---------------------------------------------------------------------------------------

PARENT = genesis_block(DEV).header
MTP = DEV.genesis_time + 40
NOW = DEV.genesis_time + 100
CTX = HeaderContext(parent=PARENT, median_time_past=MTP, expected_target=DEV.t2_genesis, now=NOW)


def make_proof(**fields: Any) -> Proof:
    proof = Proof(task_id=TASK_ID, ref_model=b"", miner=MINER.pubkey, nonce=0, steps=40,
                  n_correct=TASK.t_acc, model_id=Hash(hashlib.sha256(b"m").digest()),
                  ckpt_root=ZERO_HASH)
    return replace(proof, **fields)


def make_header(txs: tuple[Transaction, ...] = (), **fields: Any) -> BlockHeader:
    header = BlockHeader(version=BLOCK_VERSION, height=1, prev_id=compute_block_id(PARENT),
                         timestamp=MTP + 1, target=DEV.t2_genesis, tx_root=compute_tx_root(txs),
                         proof=make_proof())
    return sign_header(replace(header, **fields), MINER)


@pytest.mark.parametrize("fields", [
    {}, {"timestamp": MTP + 1}, {"timestamp": NOW}, {"timestamp": NOW + DEV.max_future_time},
], ids=["base", "mtp+1", "now", "now+max_future"])
def test_valid_header(fields: dict[str, Any]) -> None:
    validate_header(DEV, make_header(**fields), CTX)


@pytest.mark.parametrize(("fields", "reason"), [
    ({"version": 0}, "bad-version"),
    ({"version": BLOCK_VERSION + 1}, "bad-version"),
    ({"prev_id": ZERO_HASH}, "bad-prevblk"),
    ({"prev_id": compute_block_id(genesis_block(TESTNET).header)}, "bad-prevblk"),
    ({"height": 0}, "bad-height"),
    ({"height": 2}, "bad-height"),
    ({"timestamp": MTP}, "time-too-old"),
    ({"timestamp": MTP - 1}, "time-too-old"),
    ({"timestamp": 0}, "time-too-old"),
    ({"timestamp": NOW + DEV.max_future_time + 1}, "time-too-new"),
    ({"timestamp": 2**64 - 1}, "time-too-new"),
    ({"target": DEV.t2_genesis - 1}, "bad-diffbits"),
    ({"target": DEV.t2_genesis + 1}, "bad-diffbits"),
    ({"target": MAX_TARGET}, "bad-diffbits"),
], ids=lambda v: str(v) if isinstance(v, str) else ",".join(map(str, v)))
def test_header_rejected(fields: dict[str, Any], reason: str) -> None:
    raises(reason, validate_header, DEV, make_header(**fields), CTX)


@pytest.mark.parametrize("case", ["unsigned", "changed-after-signing", "zero-sig"])
def test_header_bad_signature(case: str) -> None:
    header = make_header()
    if case == "unsigned":
        header = replace(header, signature=bytes(64))
    elif case == "changed-after-signing":
        header = replace(header, proof=replace(header.proof, n_correct=VAL))
    elif case == "zero-sig":
        header = replace(header, signature=b"\x00" * 32 + header.signature[32:])
    raises("bad-blk-sig", validate_header, DEV, header, CTX)


def test_header_time_uses_the_params_future_limit() -> None:
    header = make_header(timestamp=NOW + DEV.max_future_time + 1)
    validate_header(TESTNET, header, CTX)  # TESTNET allows two hours


@pytest.mark.parametrize(("timestamps", "median"), [
    ([5], 5),
    ([1, 2, 3], 2),
    ([3, 1, 2], 2),
    ([1, 2, 3, 4], 3),
    ([4, 4, 1, 1], 4),
    ([10, 1, 9, 2, 8, 3, 7, 4, 6, 5, 11], 6),
    ([100] * 11, 100),
    ([1, 1, 1, 1, 1, 1, 50, 50, 50, 50, 50], 1),
])
def test_median_time_past(timestamps: list[int], median: int) -> None:
    assert compute_median_time_past(timestamps) == median
    assert compute_median_time_past(tuple(reversed(timestamps))) == median


# ---------------------------------------------------------------------------------------
# Block body and context-free block validation
# ---------------------------------------------------------------------------------------


def transfer(nonce: int, amount: int = 1, key: PrivateKey = KEY) -> Transfer:
    return sign_tx(Transfer(pubkey=key.pubkey, to=MINER.address, amount=amount, fee=1,
                            nonce=nonce), key)


def mtx(**fields: Any) -> ModelTx:
    proof = make_proof(miner=KEY.pubkey, model_id=Hash(hashlib.sha256(b"mtx").digest()))
    return sign_tx(ModelTx(prev_id=compute_block_id(PARENT), proof=replace(proof, **fields),
                           fee=0), KEY)


def make_block(txs: tuple[Transaction, ...], root_txs: tuple[Transaction, ...] | None = None,
               **fields: Any) -> Block:
    header = make_header(root_txs if root_txs is not None else txs, **fields)
    return Block(header, txs)


TXS = (transfer(0), transfer(1), mtx())


def test_valid_body() -> None:
    validate_block_body(DEV, make_block(TXS))
    validate_block_body(DEV, make_block(()))


@pytest.mark.parametrize(("txs", "root_txs"), [
    (TXS, ()),
    ((), TXS),
    (TXS, TXS[::-1]),
    (TXS, TXS[:-1]),
    (TXS[:-1], TXS),
    (TXS, (transfer(0), transfer(1), mtx(nonce=1))),
], ids=["root-of-none", "no-txs", "reordered", "extra-tx", "missing-tx", "other-tx"])
def test_body_bad_merkle_root(txs: tuple[Transaction, ...],
                              root_txs: tuple[Transaction, ...]) -> None:
    raises("bad-txnmrklroot", validate_block_body, DEV, make_block(txs, root_txs))


def test_body_duplicate_tx() -> None:
    raises("bad-txns-duplicate", validate_block_body, DEV, make_block(TXS + TXS[:1]))
    # the id leaves the signature out: a second signature does not make a second tx
    resigned = replace(TXS[0], signature=bytes(64))
    raises("bad-txns-duplicate", validate_block_body, DEV, make_block(TXS + (resigned,)))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_body_bad_tx_signature(index: int) -> None:
    txs = list(TXS)
    txs[index] = replace(txs[index], signature=bytes(64))
    raises("bad-txn-sig", validate_block_body, DEV, make_block(tuple(txs)))


def test_body_size_limit() -> None:
    block = make_block(TXS)
    size = block_size(block)
    validate_block_body(replace(DEV, max_block_bytes=size), block)
    raises("bad-blk-length", validate_block_body, replace(DEV, max_block_bytes=size - 1), block)


def task_of(task_id: Hash) -> Task | None:
    return TASK if task_id == TASK_ID else None


class RecordingEngine(NoProofEngine):
    """Accepts every proof and remembers what it was asked."""

    def __init__(self) -> None:
        self.blocks: list[BlockHeader] = []
        self.mtxs: list[tuple[ModelTx, int]] = []

    def validate_block_seal(self, params: ChainParams, header: BlockHeader, task: Task) -> None:
        assert task == TASK
        self.blocks.append(header)

    def validate_mtx_seal(self, params: ChainParams, tx: ModelTx, task: Task,
                          target: int) -> None:
        self.mtxs.append((tx, target))


class RefusingEngine(NoProofEngine):
    def validate_block_seal(self, params: ChainParams, header: BlockHeader, task: Task) -> None:
        raise ConsensusError("bad-prehash")


@pytest.mark.parametrize(("params", "n_correct", "weight"), [
    (DEV, TASK.t_acc, 1), (DEV, VAL, 1),
    (ACCURACY, TASK.t_min, WEIGHT_AT_MIN), (ACCURACY, TASK.t_acc, WEIGHT_FULL),
])
def test_validate_block_returns_weight(params: ChainParams, n_correct: int, weight: int) -> None:
    block = make_block(TXS, proof=make_proof(n_correct=n_correct))
    assert validate_block(params, NoProofEngine(), block, CTX, task_of) == weight


def test_validate_block_consults_the_engine() -> None:
    engine = RecordingEngine()
    block = make_block(TXS)
    validate_block(DEV, engine, block, CTX, task_of)
    assert engine.blocks == [block.header]
    assert engine.mtxs == [(TXS[2], compute_mtx_target(DEV, block.header.target))]
    raises("bad-prehash", validate_block, DEV, RefusingEngine(), block, CTX, task_of)


@pytest.mark.parametrize(("block", "reason"), [
    (make_block((), proof=make_proof(task_id=Hash(bytes(32)))), "bad-task"),
    (make_block((), proof=make_proof(n_correct=TASK.t_acc - 1)), "bad-accuracy"),
    (make_block((), proof=make_proof(n_correct=VAL + 1)), "bad-accuracy"),
    (make_block((mtx(task_id=Hash(bytes(32))),)), "bad-mtx-task"),
    (make_block((), height=2), "bad-height"),
    (make_block(TXS, root_txs=()), "bad-txnmrklroot"),
], ids=["unknown-task", "low-accuracy", "over-val-size", "mtx-task", "header", "body"])
def test_validate_block_rejects(block: Block, reason: str) -> None:
    raises(reason, validate_block, DEV, NoProofEngine(), block, CTX, task_of)


def test_validate_block_accuracy_rule_floor() -> None:
    block = make_block((), proof=make_proof(n_correct=TASK.t_min))
    raises("bad-accuracy", validate_block, DEV, NoProofEngine(), block, CTX, task_of)
    assert validate_block(ACCURACY, NoProofEngine(), block, CTX, task_of) == WEIGHT_AT_MIN
    block = make_block((), proof=make_proof(n_correct=TASK.t_min - 1))
    raises("bad-accuracy", validate_block, ACCURACY, NoProofEngine(), block, CTX, task_of)


# ---------------------------------------------------------------------------------------
# Task parameters
# ---------------------------------------------------------------------------------------


def _task(**fields: Any) -> Task:
    sub = {name: fields.pop(name) for name in ("dataset", "arch", "hpp") if name in fields}
    task = replace(TASK, **fields)
    for name, changes in sub.items():
        task = replace(task, **{name: replace(getattr(task, name), **changes)})
    return task


VALID_TASKS = [
    ("dev", TASK),
    ("testnet", TESTNET.genesis_task),
    ("t_min=t_acc=val", _task(t_min=VAL, t_acc=VAL)),
    ("k=s_max", _task(k=400, s_max=400, s_min=400)),
    ("s_min-at-limit", _task(s_min=400 * 11)),
    ("s_min=0", _task(s_min=0)),
    ("ppm-max", _task(wm_ppm=999_999, delta_ppm=999_999)),
    ("ppm-zero", _task(wm_ppm=0, delta_ppm=0)),
    ("duration=1", _task(duration=1)),
    ("cnn", _task(k=10, arch={"family": FAMILY_CNN})),
    ("one-arch", _task(arch={"depth_min": 2, "depth_max": 2, "width_min": 1, "width_max": 1})),
    ("one-hpp", _task(hpp={"lr_min_ppm": 1, "lr_max_ppm": 1, "momentum_min_ppm": 0,
                           "momentum_max_ppm": 999_999, "batch_sizes": (1,)})),
]

INVALID_TASKS = [
    ("t_min=0", _task(t_min=0)),
    ("t_min>t_acc", _task(t_min=226)),
    ("t_acc>val", _task(t_acc=VAL + 1)),
    ("k=0", _task(k=0)),
    ("k>s_max", _task(k=420, s_min=0)),
    ("k-not-dividing", _task(k=30)),
    ("s_max=0", _task(s_max=0, s_min=0)),
    ("s_min-unreachable", _task(s_min=400 * 11 + 1)),
    ("wm_ppm=10^6", _task(wm_ppm=1_000_000)),
    ("delta_ppm=10^6", _task(delta_ppm=1_000_000)),
    ("duration=0", _task(duration=0)),
    ("depth_min>depth_max", _task(arch={"depth_min": 3, "depth_max": 2})),
    ("width_min=0", _task(arch={"width_min": 0})),
    ("width_min>width_max", _task(arch={"width_min": 65, "width_max": 64})),
    ("family=2", _task(arch={"family": 2})),
    ("cnn-k-above-cap", _task(k=20, arch={"family": FAMILY_CNN})),
    ("lr_min=0", _task(hpp={"lr_min_ppm": 0})),
    ("lr_min>lr_max", _task(hpp={"lr_min_ppm": 200_001})),
    ("momentum_min>max", _task(hpp={"momentum_min_ppm": 950_001})),
    ("momentum_max=10^6", _task(hpp={"momentum_max_ppm": 1_000_000})),
    ("no-batch-sizes", _task(hpp={"batch_sizes": ()})),
    ("batch-size-0", _task(hpp={"batch_sizes": (32, 0)})),
]


@pytest.mark.parametrize("task", [t for _, t in VALID_TASKS], ids=[n for n, _ in VALID_TASKS])
def test_valid_task(task: Task) -> None:
    validate_task(task)


@pytest.mark.parametrize("task", [t for _, t in INVALID_TASKS], ids=[n for n, _ in INVALID_TASKS])
def test_invalid_task(task: Task) -> None:
    raises("bad-task-params", validate_task, task)
