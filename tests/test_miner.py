"""The miner (PROTOCOL.md §3–§7) on the dev chain's `digits` task: PreHash search, and
that every solution `mine` yields is what its proof claims."""

import math
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from consensus.blocks import compute_block_id
from consensus.checkpoints import compute_ckpt_root, compute_tensor_hash, leaf_bytes
from consensus.difficulty import compute_mtx_target
from consensus.encoding import Hash, tagged_hash
from consensus.keys import PrivateKey
from consensus.merkle import check_proof
from consensus.models import Arch, compute_model_id, compute_param_shapes
from consensus.params import DEV, MAX_TARGET, TESTNET, genesis_block
from consensus.proofs import Proof, check_target, compute_posthash, compute_prehash
from consensus.tasks import compute_task_id
from mining import miner as miner_module
from mining.artifacts import MemoryArtifacts
from mining.htoa import compute_htoa
from mining.miner import Job, Reference, Solution, mine, search_prehash
from mining.trainer import Trainer, compute_update_norm, from_bytes, to_bytes

TASK = DEV.genesis_task
TASK_ID = compute_task_id(TASK)
K = TASK.k
GENESIS_ID = compute_block_id(genesis_block(DEV).header)
MINER = PrivateKey(bytes([2]) * 32).pubkey
T2 = DEV.t2_genesis
T2_MTX = compute_mtx_target(DEV, T2)
JOB = Job(DEV, GENESIS_ID, TASK, T2, T2_MTX, MINER)
NEVER = replace(JOB, t2=0, t2_mtx=0)  # no PostHash meets 0: mines until stopped


pytestmark = pytest.mark.usefixtures("one_thread")


def never_stop() -> bool:
    return False


@pytest.fixture(scope="module")
def solutions(data) -> list[Solution]:
    return list(mine(JOB, data, never_stop))


@pytest.fixture(scope="module")
def block(solutions) -> Solution:
    return solutions[-1]


def recount(arch: Arch, params: bytes, data) -> int:
    """The validation count of an MLP, by F.linear on the bytes (no trainer code)."""
    flat = torch.from_numpy(from_bytes(params))
    shapes = compute_param_shapes(arch)
    tensors, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        tensors.append(flat[offset:offset + n].view(shape))
        offset += n
    assert offset == len(flat)
    x = data.val_x.flatten(1)
    with torch.no_grad():
        for layer in range(len(shapes) // 2):
            x = F.linear(x, tensors[2 * layer], tensors[2 * layer + 1])
            if layer < len(shapes) // 2 - 1:
                x = F.relu(x)
        return int((x.argmax(dim=1) == data.val_y).sum())


def prehash(sol: Solution) -> Hash:
    return compute_prehash(sol.prev_id, sol.proof)


# ---- PreHash search -------------------------------------------------------------------

def brute_force(prev_id, ref, miner, t1, start, count):
    hits = []
    for n in range(start, start + count):
        proof = Proof(TASK_ID, ref, miner, n, 0, 0, bytes(32), bytes(32))
        h1 = compute_prehash(prev_id, proof)
        if check_target(h1, t1):
            hits.append((n, h1))
    return hits


@pytest.mark.parametrize("ref", [b"", bytes(range(32))], ids=["no-ref", "ref"])
@pytest.mark.parametrize("start", [0, 100, 65_500, 2**32 - 300])  # msgpack int widths change
def test_search_prehash_finds_exactly_the_brute_force_hits(ref, start):
    t1, count = MAX_TARGET >> 3, 600
    expected = brute_force(GENESIS_ID, ref, MINER, t1, start, count)
    assert len(expected) > 20  # one in eight
    found, n = [], start
    while (hit := search_prehash(GENESIS_ID, TASK_ID, ref, MINER, t1, n,
                                 start + count - n)) is not None:
        found.append(hit)
        n = hit[0] + 1
    assert found == expected


@pytest.mark.parametrize("nonce", [0, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32,
                                   2**64 - 1])
def test_search_prehash_encodes_every_nonce_width(nonce):
    proof = Proof(TASK_ID, b"", MINER, nonce, 0, 0, bytes(32), bytes(32))
    expected = compute_prehash(GENESIS_ID, proof)
    found = search_prehash(GENESIS_ID, TASK_ID, b"", MINER, int.from_bytes(expected, "big"),
                           nonce, 1)
    assert found == (nonce, expected)
    assert search_prehash(GENESIS_ID, TASK_ID, b"", MINER, int.from_bytes(expected, "big") - 1,
                          nonce, 1) is None  # the target is inclusive, and tight


def test_search_prehash_returns_none_without_a_hit():
    assert search_prehash(GENESIS_ID, TASK_ID, b"", MINER, 0, 0, 5_000) is None
    assert search_prehash(GENESIS_ID, TASK_ID, b"", MINER, MAX_TARGET, 7, 0) is None
    # the search stops at the last 64-bit nonce instead of hashing past it
    assert search_prehash(GENESIS_ID, TASK_ID, b"", MINER, MAX_TARGET, 2**64 - 1, 10)[0] == (
        2**64 - 1)
    assert search_prehash(GENESIS_ID, TASK_ID, b"", MINER, MAX_TARGET, 2**64, 10) is None


def test_search_prehash_binds_tip_miner_and_reference():
    a = search_prehash(GENESIS_ID, TASK_ID, b"", MINER, MAX_TARGET, 0, 1)
    others = [
        search_prehash(bytes(32), TASK_ID, b"", MINER, MAX_TARGET, 0, 1),
        search_prehash(GENESIS_ID, bytes(32), b"", MINER, MAX_TARGET, 0, 1),
        search_prehash(GENESIS_ID, TASK_ID, bytes(32), MINER, MAX_TARGET, 0, 1),
        search_prehash(GENESIS_ID, TASK_ID, b"", bytes(32), MAX_TARGET, 0, 1),
    ]
    assert len({a[1], *(o[1] for o in others)}) == 5


# ---- a mined block --------------------------------------------------------------------

def test_mine_yields_mtxs_then_one_block(solutions):
    kinds = [s.kind for s in solutions]
    assert kinds[-1] == "block" and set(kinds[:-1]) <= {"mtx"}
    nonces = [s.proof.nonce for s in solutions if s.kind == "mtx"]
    assert len(nonces) == len(set(nonces))  # at most one mtx per PreHash draw


def test_block_proof_meets_its_targets(block, data):
    proof = block.proof
    assert block.prev_id == GENESIS_ID
    assert (proof.task_id, proof.ref_model, proof.miner) == (TASK_ID, b"", MINER)
    h1 = prehash(block)
    assert check_target(h1, DEV.t1)
    assert check_target(compute_posthash(h1, proof.steps, proof.n_correct), T2)
    assert proof.n_correct >= TASK.t_acc
    assert proof.n_correct == recount(block.model.arch, block.model.params, data)
    assert proof.model_id == compute_model_id(block.model.arch, block.model.params)
    assert K <= proof.steps <= TASK.s_max and TASK.s_min <= proof.steps


def test_block_history_commits_to_its_checkpoints(block):
    proof, leaves = block.proof, block.history.leaves
    assert proof.ckpt_root == compute_ckpt_root(leaves)
    assert proof.steps == K * (len(leaves) - 1)
    assert len(block.tensors) == len(leaves)
    assert block.tensors[-1][0] == block.model.params
    previous = None
    for i, (leaf, (params, momentum)) in enumerate(zip(leaves, block.tensors, strict=True)):
        assert (leaf.index, leaf.steps) == (i, i * K)
        assert leaf.params_hash == compute_tensor_hash(params)
        assert leaf.momentum_hash == compute_tensor_hash(momentum)
        current = from_bytes(params)
        assert leaf.update_norm == (0 if previous is None
                                    else compute_update_norm(previous, current))
        previous = current


def test_checkpoint_zero_is_htoa_with_zero_momentum(block):
    draw = compute_htoa(TASK, prehash(block))
    assert block.model.arch == draw.arch
    params, momentum = block.tensors[0]
    assert params == to_bytes(draw.init)
    assert momentum == bytes(len(params))


def test_every_checkpoint_is_watermarked(block):
    signature = compute_htoa(TASK, prehash(block)).signature
    for params, _ in block.tensors:
        assert signature.verify_array(from_bytes(params))


def test_every_interval_replays_bit_for_bit(block, data):
    """The verifier's audit, on every interval: the pipelined commit (checkpoint j hashed
    while j + 1 trains) committed exactly what training produced."""
    trainer = Trainer(compute_htoa(TASK, prehash(block)), data)
    for i in range(len(block.tensors) - 1):
        trainer.load(*(from_bytes(b) for b in block.tensors[i]))
        trainer.train(i * K, K)
        params, momentum = trainer.snapshot()
        assert (to_bytes(params), to_bytes(momentum)) == block.tensors[i + 1], i


def test_checkpoints_carry_valid_merkle_paths(block):
    root, size = block.proof.ckpt_root, len(block.history.leaves)
    for i in range(size):
        ckpt = block.checkpoint(i)
        assert ckpt.leaf == block.history.leaves[i]
        assert (ckpt.params, ckpt.momentum) == block.tensors[i]
        assert check_proof(root, leaf_bytes(ckpt.leaf), i, size, ckpt.path)
        assert not check_proof(root, leaf_bytes(ckpt.leaf), (i + 1) % size, size, ckpt.path)


def test_block_is_the_first_checkpoint_that_qualifies(block, data):
    """No earlier checkpoint of the block's draw met t_acc and t2 (the miner skips none)."""
    h1 = prehash(block)
    for leaf, (params, _) in zip(block.history.leaves[1:-1], block.tensors[1:-1],
                                 strict=True):
        if leaf.steps < TASK.s_min:
            continue
        n = recount(block.model.arch, params, data)
        assert not (n >= TASK.t_acc and check_target(compute_posthash(h1, leaf.steps, n), T2))


def test_publish_hands_over_everything(block):
    sink = MemoryArtifacts()
    block.publish(sink)
    root = block.proof.ckpt_root
    assert sink.get_model(block.proof.model_id) == block.model
    assert sink.get_history(root) == block.history
    assert len(sink.checkpoints) == len(block.tensors)
    for i in range(len(block.tensors)):
        assert sink.get_checkpoint(root, i) == block.checkpoint(i)


def test_mining_is_deterministic_from_a_nonce(solutions, data):
    nonce = solutions[-1].proof.nonce
    again = list(mine(JOB, data, never_stop, nonce=nonce))
    assert [s.proof for s in again] == [s.proof for s in solutions if s.proof.nonce == nonce]
    assert again[-1].tensors == solutions[-1].tensors
    later = list(mine(JOB, data, never_stop, nonce=nonce + 1))
    assert all(s.proof.nonce > nonce for s in later)


# ---- model transactions ---------------------------------------------------------------

@pytest.fixture(scope="module")
def mtx(data) -> Solution:
    """The first mtx on a chain where no checkpoint can be a block."""
    job = replace(JOB, t2=0, t2_mtx=T2_MTX)
    gen = mine(job, data, never_stop)
    sol = next(gen)
    gen.close()
    return sol


def test_mtx_meets_its_easier_target(mtx, data):
    proof = mtx.proof
    assert mtx.kind == "mtx"
    h1 = prehash(mtx)
    assert check_target(h1, DEV.t1)
    assert proof.n_correct >= TASK.t_min
    assert proof.n_correct == recount(mtx.model.arch, mtx.model.params, data)
    assert check_target(compute_posthash(h1, proof.steps, proof.n_correct), T2_MTX)
    assert proof.model_id == compute_model_id(mtx.model.arch, mtx.model.params)
    assert proof.ckpt_root == compute_ckpt_root(mtx.history.leaves)
    assert proof.steps == K * (len(mtx.history.leaves) - 1) >= TASK.s_min
    for i in range(len(mtx.history.leaves)):
        ckpt = mtx.checkpoint(i)
        assert check_proof(proof.ckpt_root, leaf_bytes(ckpt.leaf), i,
                           len(mtx.history.leaves), ckpt.path)
    for leaf, (params, _) in zip(mtx.history.leaves[1:-1], mtx.tensors[1:-1], strict=True):
        if leaf.steps >= TASK.s_min:  # and it is the first checkpoint that qualified
            n = recount(mtx.model.arch, params, data)
            assert not (n >= TASK.t_min
                        and check_target(compute_posthash(h1, leaf.steps, n), T2_MTX))


def test_mtxs_in_the_real_run_are_not_blocks(solutions, data):
    for sol in solutions[:-1]:
        proof = sol.proof
        h2 = compute_posthash(prehash(sol), proof.steps, proof.n_correct)
        assert proof.n_correct >= TASK.t_min and check_target(h2, T2_MTX)
        assert not (proof.n_correct >= TASK.t_acc and check_target(h2, T2))


# ---- when checkpoints are evaluated ----------------------------------------------------

# Every evaluated checkpoint is a block here, so the block shows which checkpoint was the
# first one evaluated: the first whose own plus referenced steps reach s_min.
ANY = replace(JOB, task=replace(TASK, t_acc=0, t_min=0), t2=MAX_TARGET, t2_mtx=MAX_TARGET)


@pytest.mark.parametrize("ref_steps,steps", [
    (None, 40),  # no reference: s_min = 40 own steps
    (0, 40),
    (19, 40),  # 20 + 19 < 40
    (20, 20),  # 20 + 20 reaches s_min at the first checkpoint
    (5_000, 20),
])
def test_first_evaluated_checkpoint_counts_referenced_steps(block, data, ref_steps, steps):
    assert TASK.s_min == 40 and K == 20
    job = ANY
    if ref_steps is not None:
        ref = Reference(block.proof.model_id, block.model, ref_steps)
        job = replace(ANY, reference=ref)
    (sol,) = mine(job, data, never_stop)
    assert sol.kind == "block" and sol.proof.steps == steps


def test_block_floor_follows_the_fork_rule():
    assert JOB.block_floor == TASK.t_acc
    testnet = Job(TESTNET, GENESIS_ID, TESTNET.genesis_task, 1, 1, MINER)
    assert TESTNET.fork_rule == "accuracy"
    assert testnet.block_floor == TESTNET.genesis_task.t_min < TESTNET.genesis_task.t_acc


# ---- stopping and giving up -------------------------------------------------------------

class CountingTrainer(Trainer):
    """A Trainer that records the intervals it trains, for the tests below."""

    calls: list[tuple[bytes, int, int]] = []

    def train(self, start_step: int, n_steps: int) -> None:
        CountingTrainer.calls.append((self.draw.h1, start_step, n_steps))
        super().train(start_step, n_steps)


@pytest.fixture
def counting(monkeypatch):
    CountingTrainer.calls = []
    monkeypatch.setattr(miner_module, "Trainer", CountingTrainer)
    return CountingTrainer.calls


def test_stop_before_anything_yields_nothing(data, counting):
    assert list(mine(JOB, data, lambda: True)) == []
    assert counting == []


def test_a_draw_that_reaches_s_max_goes_back_to_prehash(data, counting):
    """Without a solution a draw trains s_max steps, then PreHash goes on from nonce + 1."""
    first = search_prehash(GENESIS_ID, TASK_ID, b"", MINER, DEV.t1, 0, 1 << 24)
    second = search_prehash(GENESIS_ID, TASK_ID, b"", MINER, DEV.t1, first[0] + 1, 1 << 24)
    assert list(mine(NEVER, data, lambda: len({c[0] for c in counting}) == 2)) == []
    intervals = TASK.s_max // K
    assert counting == ([(first[1], i * K, K) for i in range(intervals)]
                        + [(second[1], 0, K)])  # stopped after one interval of draw 2


def test_stop_is_checked_after_every_interval(data, counting):
    assert list(mine(NEVER, data, lambda: len(counting) >= 3)) == []
    assert len(counting) == 3  # not the rest of the draw's s_max / k intervals


def test_stop_from_another_thread_ends_mining_promptly(data, counting):
    event = threading.Event()
    at_set: list[tuple[float, int]] = []

    def set_stop():
        at_set.append((time.monotonic(), len(counting)))
        event.set()

    timer = threading.Timer(0.5, set_stop)
    timer.start()
    try:
        assert list(mine(NEVER, data, event.is_set)) == []
        ended = time.monotonic()
    finally:
        timer.cancel()
    (set_time, trained_before), = at_set
    assert trained_before > 0  # it was training when told to stop
    assert len(counting) - trained_before <= 1  # and finished at most the interval under way
    assert ended - set_time < 2.0


# ---- mining from a reference ------------------------------------------------------------

@pytest.fixture(scope="module")
def referenced(block, data) -> tuple[Reference, list[Solution]]:
    ref = Reference(block.proof.model_id, block.model, block.proof.steps)
    return ref, list(mine(replace(JOB, reference=ref), data, never_stop))


def test_mining_from_a_reference_starts_from_the_restamped_model(referenced, block, data):
    ref, sols = referenced
    sol = sols[-1]
    assert sol.kind == "block"
    proof = sol.proof
    assert proof.ref_model == ref.model_id
    h1 = prehash(sol)
    assert check_target(h1, DEV.t1)
    assert h1 != compute_prehash(GENESIS_ID, replace(proof, ref_model=b""))
    assert sol.model.arch == ref.blob.arch
    draw = compute_htoa(TASK, h1, ref.blob)
    old = compute_htoa(TASK, prehash(block))  # the reference's own draw
    params0 = from_bytes(sol.tensors[0][0])
    assert np.array_equal(params0, draw.signature.sign_array(from_bytes(ref.blob.params)))
    assert sol.history.leaves[0].params_hash == compute_tensor_hash(to_bytes(draw.init))
    assert not np.array_equal(params0, from_bytes(ref.blob.params))  # it was re-stamped
    assert old.signature.verify_array(from_bytes(ref.blob.params))
    assert draw.signature.verify_array(from_bytes(sol.model.params))
    assert proof.n_correct >= TASK.t_acc
    assert proof.n_correct == recount(sol.model.arch, sol.model.params, data)
    assert proof.steps + ref.total_steps >= TASK.s_min and proof.steps >= K


def test_reference_binds_the_prehash(referenced):
    ref, sols = referenced
    for sol in sols:
        assert sol.proof.ref_model == ref.model_id
        assert prehash(sol) == tagged_hash("dpodl/prehash", GENESIS_ID, TASK_ID, ref.model_id,
                                           MINER, sol.proof.nonce)
