"""The D-PoDL seal engine against forgers (PROTOCOL.md §3–§8), with real training replay
on the dev `digits` task.

Each forgery is built the way a cheater would build it (tests/forge.py): honest training
wherever the cheater has to train, a tampered history where it saves work or gains
accuracy, every commitment recomputed and every signature redone. The real engine
rejects each with its stable reason; honest blocks and model transactions pass, every
time, and connect in a chain store on LevelDB.

Most forgeries are mined on a chain whose t2 is the largest target (tests/forge.EASY),
so that a forger needs no PostHash luck: what is under test is everything else.
"""

import itertools
import random
from dataclasses import dataclass, replace

import numpy as np
import pytest

from consensus.blocks import Block, BlockHeader, assemble_block, compute_block_id
from consensus.checkpoints import Checkpoint, CheckpointLeaf, FraudProof, compute_tensor_hash
from consensus.difficulty import compute_mtx_target
from consensus.encoding import ZERO_HASH, Hash
from consensus.errors import ConsensusError
from consensus.keys import PrivateKey
from consensus.models import ModelBlob, compute_model_id, compute_param_count
from consensus.params import DEV, MAX_TARGET, ChainParams, genesis_block
from consensus.proofs import Proof, check_target, compute_posthash, compute_prehash
from consensus.seal import MissingArtifact, Need
from consensus.tasks import compute_task_id
from consensus.transactions import ModelTx, sign_tx
from mining.artifacts import MemoryArtifacts
from mining.htoa import Draw, compute_htoa, draw_init
from mining.miner import Job, Reference, Solution, mine
from mining.trainer import (
    DataCache,
    DeviceData,
    Trainer,
    compute_update_norm,
    from_bytes,
    to_bytes,
)
from mining.verifier import DPoDLEngine, FraudFound, Verdict, compute_replay_distance
from mining.watermark import Signature
from storage import schema
from storage.artifacts import ArtifactStore
from storage.chain import ChainStore
from storage.db import Database
from tests.forge import (
    EASY,
    TASK,
    State,
    commit,
    commit_leaves,
    count_correct,
    find_nonce,
    sign_block,
    stamp,
    train,
)

K = TASK.k
J = 8  # intervals of the forger's base run
ALL = TASK.s_max // K  # a q_local that audits every interval of any history
FORGER = PrivateKey(bytes([13]) * 32)
HONEST = PrivateKey(bytes([7]) * 32)
GENESIS = genesis_block(EASY).header
GENESIS_ID = compute_block_id(GENESIS)


# ---------------------------------------------------------------------------------------
# Fixtures and helpers


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True, slots=True, eq=False)
class Run:
    """The forger's honest training for its first PreHash solution on EASY's genesis."""

    nonce: int
    draw: Draw
    states: list[State]  # checkpoints 0..J


@dataclass(frozen=True, slots=True, eq=False)
class Mined:
    """A block found by the real miner, and the model transactions found on the way."""

    block: Block
    solution: Solution
    mtxs: tuple[Solution, ...]

    @property
    def block_id(self) -> Hash:
        return compute_block_id(self.block.header)


class RecordingArtifacts(MemoryArtifacts):
    """MemoryArtifacts that remembers which checkpoints an engine fetched."""

    def __init__(self) -> None:
        super().__init__()
        self.fetched: set[tuple[Hash, int]] = set()

    def get_checkpoint(self, ckpt_root: Hash, index: int) -> Checkpoint | None:
        self.fetched.add((ckpt_root, index))
        return super().get_checkpoint(ckpt_root, index)


@pytest.fixture(scope="module")
def run(data: DeviceData) -> Run:
    nonce, h1 = find_nonce(GENESIS_ID, FORGER.pubkey)
    draw = compute_htoa(TASK, h1)
    init = (draw.init, np.zeros_like(draw.init))
    return Run(nonce, draw, [init, *train(draw, data, init, 0, J)])


@pytest.fixture(scope="module")
def honest(run: Run, data: DeviceData) -> Solution:
    """The forger's base run committed honestly: the control every forgery departs from."""
    return forge(run, run.states, data)


@pytest.fixture(scope="module")
def other(run: Run) -> Draw:
    """HtoA of another PreHash solution of the forger's, one with another architecture."""
    nonce = run.nonce
    while True:
        nonce, h1 = find_nonce(GENESIS_ID, FORGER.pubkey, start=nonce + 1)
        draw = compute_htoa(TASK, h1)
        if draw.arch != run.draw.arch:
            return draw


def forge(run: Run, states: list[State], data: DeviceData, **overrides: object) -> Solution:
    return commit(GENESIS_ID, FORGER.pubkey, run.nonce, run.draw.arch, states, data,
                  **overrides)  # type: ignore[arg-type]


def publish(*solutions: Solution, artifacts: MemoryArtifacts | None = None
            ) -> MemoryArtifacts:
    artifacts = MemoryArtifacts() if artifacts is None else artifacts
    for solution in solutions:
        solution.publish(artifacts)
    return artifacts


def engine(cache: DataCache, *solutions: Solution, q_local: int = 0,
           rng: random.Random | None = None) -> DPoDLEngine:
    return DPoDLEngine(publish(*solutions), cache, q_local=q_local,
                       rng=rng or random.Random(0))


def header_of(solution: Solution, target: int = MAX_TARGET) -> BlockHeader:
    """The forger's block on EASY's genesis, signed with its own key."""
    return sign_block(GENESIS, solution, FORGER, target=target).header


def verify(cache: DataCache, solution: Solution, *, q_local: int = 0,
           rng: random.Random | None = None, target: int = MAX_TARGET,
           params: ChainParams = EASY, artifacts: MemoryArtifacts | None = None) -> None:
    artifacts = publish(solution) if artifacts is None else artifacts
    DPoDLEngine(artifacts, cache, q_local=q_local, rng=rng or random.Random(0)
                ).validate_block_seal(params, header_of(solution, target), TASK)


# Where a rejection happened: in the cheap checks, before any checkpoint is fetched (so a
# cheater cannot make a verifier fetch and replay for nothing); at the recount, which
# waits for the audited checkpoints (so that a verifier fetching them recounts once) and
# is judged before any replay; or in the replay audits.
BEFORE_AUDITS, AT_RECOUNT, IN_AUDITS = "before-audits", "at-recount", "in-audits"


def rejection(cache: DataCache, solution: Solution, **kwargs: object
              ) -> tuple[ConsensusError, str]:
    artifacts = publish(solution, artifacts=RecordingArtifacts())
    audited = []
    audit = DPoDLEngine._finish_audit

    def recording_audit(self: DPoDLEngine, *args: object) -> float:
        audited.append(args)
        return audit(self, *args)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch, pytest.raises(ConsensusError) as exc:
        patch.setattr(DPoDLEngine, "_finish_audit", recording_audit)
        verify(cache, solution, artifacts=artifacts, **kwargs)  # type: ignore[arg-type]
    where = IN_AUDITS if audited else AT_RECOUNT if artifacts.fetched else BEFORE_AUDITS
    return exc.value, where


def public_rejection(cache: DataCache, solution: Solution, **kwargs: object
                     ) -> tuple[str, str]:
    """(reason, where) of a rejection that needs no private audit, so no fraud proof."""
    err, where = rejection(cache, solution, **kwargs)
    assert not isinstance(err, FraudFound), err
    return err.reason, where


def audit_targets(solution: Solution) -> tuple[int, int]:
    """The intervals every verifier audits: (the last, the largest committed update)."""
    leaves = solution.history.leaves
    j = len(leaves) - 1
    return j - 1, max(range(j), key=lambda i: (leaves[i + 1].update_norm, -i))


def mine_on(params: ChainParams, parent: BlockHeader, key: PrivateKey, data: DeviceData, *,
            reference: Reference | None = None, include_mtxs: bool = False) -> Mined:
    """The real miner on `parent` until it finds a block; its model transactions go into
    the block when asked."""
    assert parent.height + 1 < params.retarget_interval  # so t2 is the parent's
    task, t2 = params.genesis_task, parent.target
    job = Job(params, compute_block_id(parent), task, t2, compute_mtx_target(params, t2),
              key.pubkey, reference)
    *mtxs, found = mine(job, data, lambda: False)
    assert found.kind == "block" and all(m.kind == "mtx" for m in mtxs)
    txs = tuple(sign_tx(ModelTx(m.prev_id, m.proof, 0), key) for m in mtxs) if include_mtxs \
        else ()
    block = assemble_block(parent, parent.timestamp + 5, t2, found.proof, txs, key)
    return Mined(block, found, tuple(mtxs))


def add(store: ChainStore, block: Block) -> str:
    return store.add_block(block, now=block.header.timestamp).status


@pytest.fixture(scope="module")
def dev_chain(data: DeviceData) -> list[Mined]:
    """Three blocks honestly mined on the dev chain at its real targets, each carrying the
    model transactions found while it was mined."""
    parent, out = genesis_block(DEV).header, []
    for _ in range(3):
        out.append(mine_on(DEV, parent, HONEST, data, include_mtxs=True))
        parent = out[-1].block.header
    return out


@pytest.fixture(scope="module")
def easy_chain(data: DeviceData) -> list[Mined]:
    """l_ref + 1 blocks honestly mined on EASY: deep enough to push block 1's model out of
    the reference window."""
    parent, out = GENESIS, []
    for _ in range(TASK.l_ref + 1):
        out.append(mine_on(EASY, parent, HONEST, data))
        parent = out[-1].block.header
    return out


# ---------------------------------------------------------------------------------------
# Honest blocks and model transactions pass, every time


def test_forger_tools_commit_an_honest_history_that_passes(cache, data, run, honest):
    """Control for every forgery below: the forger's tools, left honest, make a block that
    passes audits of every interval, so each rejection is the forgery's doing."""
    for seed in range(3):
        artifacts = publish(honest, artifacts=RecordingArtifacts())
        eng = DPoDLEngine(artifacts, cache, q_local=ALL, rng=random.Random(seed))
        assert eng.validate_block_seal(EASY, header_of(honest), TASK) is None
        assert artifacts.fetched == {(honest.proof.ckpt_root, i) for i in range(J + 1)}
    for j in (1, 2, 5):
        assert verify(cache, forge(run, run.states[:j + 1], data), q_local=ALL) is None


def test_honest_blocks_and_mtxs_pass_every_audit_every_time(cache, dev_chain):
    mtxs = [tx for mined in dev_chain for tx in mined.block.txs]
    assert mtxs, "the dev chain's miner found no model transaction to check"
    artifacts = RecordingArtifacts()
    for mined in dev_chain:
        publish(mined.solution, *mined.mtxs, artifacts=artifacts)
    engines = [DPoDLEngine(artifacts, cache, q_local=ALL, rng=random.Random(s))
               for s in range(3)]
    engines += [DPoDLEngine(artifacts, cache) for _ in range(3)]  # secret rng, q_local=2
    for eng in engines:
        for mined in dev_chain:
            header = mined.block.header
            artifacts.fetched.clear()
            assert eng.validate_block_seal(DEV, header, TASK) is None
            if eng.q_local == ALL:  # private audits covered every interval
                j = header.proof.steps // K
                assert artifacts.fetched == {(header.proof.ckpt_root, i) for i in range(j + 1)}
            mtx_target = compute_mtx_target(DEV, header.target)
            for tx in mined.block.txs:
                assert eng.validate_mtx_seal(DEV, tx, TASK, mtx_target) is None


def test_honest_chain_connects_on_leveldb_with_the_real_engine(tmp_path, cache, dev_chain):
    db = Database(tmp_path)
    artifacts = ArtifactStore(db)
    for mined in dev_chain:
        publish(mined.solution, *mined.mtxs, artifacts=artifacts)  # type: ignore[arg-type]
    store = ChainStore(db, DEV, DPoDLEngine(artifacts, cache, rng=random.Random(1)))
    for mined in dev_chain:
        assert add(store, mined.block) == "connected"
        assert store.tip_id == mined.block_id
    for mined in dev_chain:
        for solution in (mined.solution, *mined.mtxs):
            assert store.get_state(("model", solution.proof.model_id)) is not None
    store.close()
    db = Database(tmp_path)  # reopened: the chain and every artifact are on disk
    artifacts = ArtifactStore(db)
    store = ChainStore(db, DEV, DPoDLEngine(artifacts, cache, q_local=ALL))
    assert store.tip_id == dev_chain[-1].block_id and store.height == len(dev_chain)
    for mined in dev_chain:
        assert store.engine.validate_block_seal(DEV, mined.block.header, TASK) is None
    store.close()


# ---------------------------------------------------------------------------------------
# PreHash (§3) and the step count


def test_training_on_a_prehash_above_t1_is_rejected(cache, data):
    """A miner that skips the PreHash search and trains honestly on its first nonce."""
    for nonce in range(100):
        h1 = compute_prehash(GENESIS_ID, Proof(compute_task_id(TASK), b"", FORGER.pubkey,
                                               nonce, 0, 0, ZERO_HASH, ZERO_HASH))
        if not check_target(h1, DEV.t1):
            break
    assert not check_target(h1, DEV.t1)
    draw = compute_htoa(TASK, h1)
    init = (draw.init, np.zeros_like(draw.init))
    states = [init, *train(draw, data, init, 0, 3)]
    solution = commit(GENESIS_ID, FORGER.pubkey, nonce, draw.arch, states, data)
    assert public_rejection(cache, solution, q_local=ALL) == ("bad-prehash", BEFORE_AUDITS)


@pytest.mark.parametrize("how", ["lifted-to-another-tip", "stolen-by-another-miner"])
def test_honest_proof_reused_elsewhere_fails_prehash(cache, dev_chain, how):
    """h1 binds the work to its tip and its miner: an honest proof moved to another tip,
    or re-signed by a thief under its own key, no longer meets t1."""
    mined = dev_chain[1]
    proof = mined.block.header.proof
    if how == "lifted-to-another-tip":
        parent, key = genesis_block(DEV).header, HONEST
    else:
        parent, key = dev_chain[0].block.header, FORGER
        proof = replace(proof, miner=FORGER.pubkey)
    block = assemble_block(parent, parent.timestamp + 5, parent.target, proof, (), key)
    assert not check_target(compute_prehash(block.header.prev_id, proof), DEV.t1)
    eng = engine(cache, mined.solution, q_local=ALL)
    with pytest.raises(ConsensusError) as exc:
        eng.validate_block_seal(DEV, block.header, TASK)
    assert exc.value.reason == "bad-prehash"


@pytest.mark.parametrize("steps", [J * K + 1, J * K - 1, 0, TASK.s_max + K])
def test_claimed_steps_off_the_checkpoint_grid_are_rejected(cache, data, run, steps):
    solution = forge(run, run.states, data, steps=steps)
    assert public_rejection(cache, solution) == ("bad-steps", BEFORE_AUDITS)


# ---------------------------------------------------------------------------------------
# HtoA (§4): architecture and initial weights


@pytest.mark.parametrize("start", ["init-of-another-h1", "another-architecture",
                                   "warm-momentum"])
def test_history_not_starting_from_htoa_init_is_rejected(cache, data, run, other, start):
    """Honest training from a starting point of the forger's choosing: another h1's
    initial weights (watermarked for this h1), another architecture's whole honest run,
    or HtoA's weights with momentum carried over from elsewhere."""
    draw = run.draw
    if start == "init-of-another-h1":
        init = stamp(draw, draw_init(draw.arch, other.h1))
        draw = replace(draw, init=init)
        begin = (init, np.zeros_like(init))
    elif start == "another-architecture":
        draw = other
        begin = (draw.init, np.zeros_like(draw.init))
    else:
        begin = (draw.init, run.states[3][1])
    states = [begin, *train(draw, data, begin, 0, 3)]
    solution = commit(GENESIS_ID, FORGER.pubkey, run.nonce, draw.arch, states, data)
    assert public_rejection(cache, solution, q_local=ALL) == ("bad-init", BEFORE_AUDITS)


@pytest.fixture(scope="module")
def foreign_states(data, other) -> list[State]:
    """An honest run of the other architecture: what a forger passes off as this h1's."""
    draw = other
    begin = (draw.init, np.zeros_like(draw.init))
    return [begin, *train(draw, data, begin, 0, 4)]


def test_model_of_another_architecture_is_rejected(cache, data, run, other, foreign_states):
    """Leaf 0 is HtoA's init; the rest is an honest run of another architecture, and the
    model file says so."""
    states = [run.states[0], *foreign_states[1:]]
    norms = {1: compute_update_norm(foreign_states[0][0], foreign_states[1][0])}
    solution = commit(GENESIS_ID, FORGER.pubkey, run.nonce, other.arch, states, data,
                      norms=norms)
    assert public_rejection(cache, solution, q_local=ALL) == ("bad-arch", BEFORE_AUDITS)


def test_model_file_that_is_not_the_last_checkpoint_is_rejected(cache, data, run, honest):
    """An honest history, and a model file trained two intervals further (more accurate)
    than the last checkpoint the history commits to."""
    better = train(run.draw, data, run.states[-1], J * K, 2)[-1][0]
    model = ModelBlob(run.draw.arch, to_bytes(better))
    solution = commit_leaves(GENESIS_ID, FORGER.pubkey, run.nonce, model,
                             list(honest.history.leaves), honest.tensors,
                             n_correct=count_correct(run.draw.arch, better, data), steps=J * K)
    assert public_rejection(cache, solution, q_local=ALL) == ("bad-model-ckpt", BEFORE_AUDITS)


@pytest.mark.parametrize(("ref", "reason"), [("outside-the-space", "bad-ref-arch"),
                                             ("parameters-do-not-fit", "bad-ref-model")])
def test_reference_model_that_htoa_could_not_start_from_is_rejected(
        cache, data, run, foreign_states, ref, reason):
    """Training from a reference model whose architecture HtoA could never draw here, or
    whose file names an architecture of the space but carries another's parameters (the
    engine fetches references before the state says whether they are on the chain)."""
    if ref == "outside-the-space":
        space = TASK.arch
        arch = replace(run.draw.arch, widths=(space.width_max + 1,) * space.depth_min)
        params = np.random.default_rng(0).uniform(-0.1, 0.1, compute_param_count(arch))
        blob = ModelBlob(arch, to_bytes(params.astype(np.float32)))
    else:
        blob = ModelBlob(run.draw.arch, to_bytes(foreign_states[-1][0]))
    ref_id = compute_model_id(blob.arch, blob.params)
    nonce, _ = find_nonce(GENESIS_ID, FORGER.pubkey, ref=ref_id)
    solution = commit(GENESIS_ID, FORGER.pubkey, nonce, run.draw.arch, run.states[:3], data,
                      ref=ref_id)
    artifacts = publish(solution)
    artifacts.add_model(ref_id, blob)
    with pytest.raises(ConsensusError) as exc:
        DPoDLEngine(artifacts, cache, q_local=ALL).validate_block_seal(
            EASY, header_of(solution), TASK)
    assert exc.value.reason == reason
    bare = MemoryArtifacts()  # a bad reference at hand condemns before the rest is fetched
    bare.add_model(ref_id, blob)
    with pytest.raises(ConsensusError) as exc:
        DPoDLEngine(bare, cache, q_local=ALL).validate_block_seal(
            EASY, header_of(solution), TASK)
    assert exc.value.reason == reason


@pytest.mark.parametrize("params", ["another-architectures-parameters", "ragged-bytes"])
def test_model_file_whose_parameters_do_not_fit_its_architecture_is_rejected(
        cache, data, run, foreign_states, params):
    """The model file names HtoA's architecture but carries parameters that do not fit it
    (watermarked for their own length, so the watermark check passes); the last leaf
    commits to exactly those bytes. A peer can send this: it must be a ConsensusError."""
    leaves = list(forge(run, run.states[:3], data).history.leaves)
    tensors = [(to_bytes(p), to_bytes(m)) for p, m in run.states[:3]]
    if params == "another-architectures-parameters":
        final_p, final_m = stamp(run.draw, foreign_states[-1][0]), foreign_states[-1][1]
        final, momentum = to_bytes(final_p), to_bytes(final_m)
    else:
        final, momentum = to_bytes(run.states[3][0]) + b"\x00\x00", to_bytes(run.states[3][1])
    leaves.append(CheckpointLeaf(3, 3 * K, compute_tensor_hash(final),
                                 compute_tensor_hash(momentum), leaves[-1].update_norm))
    tensors.append((final, momentum))
    solution = commit_leaves(GENESIS_ID, FORGER.pubkey, run.nonce,
                             ModelBlob(run.draw.arch, final), leaves, tuple(tensors),
                             n_correct=TASK.t_acc, steps=3 * K)
    err, _ = rejection(cache, solution, q_local=ALL)
    assert err.reason == "bad-model-size"


# ---------------------------------------------------------------------------------------
# The watermark (§5)


def foreign_signature(run: Run, other: Draw, kind: str) -> Signature:
    """No watermark at all (size 0 stamps nothing), or another h1's of the same size."""
    if kind == "missing":
        return Signature(run.draw.h1, 0)
    return Signature(other.h1, run.draw.signature.size)


@pytest.mark.parametrize("kind", ["missing", "foreign"])
def test_final_model_without_its_watermark_is_rejected(cache, data, run, other, kind):
    """HtoA's init, then honest training that never stamps this h1's watermark."""
    unmarked = replace(run.draw, signature=foreign_signature(run, other, kind))
    states = [run.states[0], *train(unmarked, data, run.states[0], 0, 4)]
    assert not run.draw.signature.verify_array(states[-1][0])
    solution = forge(run, states, data)
    assert public_rejection(cache, solution) == ("bad-watermark", BEFORE_AUDITS)


@pytest.mark.parametrize("kind", ["missing", "foreign"])
def test_audited_checkpoint_without_its_watermark_is_rejected(cache, data, run, other, kind):
    """Trained without this h1's watermark, and stamped only by the last interval, which
    is trained honestly: the final model carries the watermark and the last interval
    replays exactly, but its starting checkpoint does not."""
    unmarked = replace(run.draw, signature=foreign_signature(run, other, kind))
    states = [run.states[0], *train(unmarked, data, run.states[0], 0, 3)]
    states += train(run.draw, data, states[-1], 3 * K, 1)
    assert run.draw.signature.verify_array(states[-1][0])
    assert not run.draw.signature.verify_array(states[-2][0])
    solution = forge(run, states, data)
    assert public_rejection(cache, solution) == ("bad-watermark", IN_AUDITS)


# ---------------------------------------------------------------------------------------
# The claimed accuracy (§6, §8 step 5)


@pytest.mark.parametrize(("offset", "reason", "where"), [
    (TASK.eps_correct, None, None), (-TASK.eps_correct, None, None),
    (TASK.eps_correct + 1, "bad-n-correct", AT_RECOUNT),
    (-TASK.eps_correct - 1, "bad-n-correct", AT_RECOUNT),
    (TASK.dataset.val_size, "bad-n-correct", BEFORE_AUDITS),  # more than the split holds
])
def test_claimed_count_must_be_within_eps_of_the_recount(cache, data, run, offset, reason,
                                                         where):
    """The claim is what h2 hashes, so an inflated claim must still meet t2 (it does on
    EASY, for any claim): only the recount can catch it."""
    true = count_correct(run.draw.arch, run.states[-1][0], data)
    claim = min(true + offset, TASK.dataset.val_size + 1)
    assert check_target(compute_posthash(run.draw.h1, J * K, claim), EASY.t2_genesis)
    solution = forge(run, run.states, data, n_correct=claim)
    if reason is None:
        assert verify(cache, solution, q_local=ALL) is None
    else:
        assert public_rejection(cache, solution, q_local=ALL) == (reason, where)


def test_claim_above_the_validation_split_is_rejected_whatever_eps(cache, data):
    """A task whose eps_correct is so loose that the recount tolerates anything: a claim
    larger than the validation split is still refused, before any replay."""
    task = replace(TASK, eps_correct=TASK.dataset.val_size)
    nonce, h1 = find_nonce(GENESIS_ID, FORGER.pubkey, task=task)
    draw = compute_htoa(task, h1)
    begin = (draw.init, np.zeros_like(draw.init))
    states = [begin, *train(draw, data, begin, 0, 2)]
    claim = TASK.dataset.val_size + 1
    solution = commit(GENESIS_ID, FORGER.pubkey, nonce, draw.arch, states, data, task=task,
                      n_correct=claim)
    eng = engine(cache, solution, q_local=ALL)
    header = header_of(solution)
    with pytest.raises(ConsensusError) as exc:
        eng.validate_block_seal(EASY, header, task)
    assert exc.value.reason == "bad-n-correct"
    within = replace(solution, proof=replace(solution.proof, n_correct=claim - 1))
    assert eng.validate_block_seal(EASY, header_of(within), task) is None  # eps tolerates it


# ---------------------------------------------------------------------------------------
# The checkpoint history (§6, §8 step 7)


def _skipped_history(run: Run, honest: Solution, data: DeviceData, how: str
                     ) -> tuple[list[CheckpointLeaf], list[tuple[bytes, bytes]], int]:
    """Honest leaves and tensors of the base run, rearranged; and the claimed steps."""
    leaves, tensors = list(honest.history.leaves), list(honest.tensors)
    if how == "every-other-checkpoint":  # count: 5 leaves for 160 steps
        return leaves[::2], tensors[::2], J * K
    if how == "last-checkpoint-missing":  # count: 8 leaves for 160 steps
        return leaves[:-1], tensors[:-1], J * K
    if how == "checkpoints-2k-apart":  # 5 leaves for 80 steps, but 40 steps apart
        kept = [replace(leaf, index=i) for i, leaf in enumerate(leaves[::2])]
        return kept, tensors[::2], (J // 2) * K
    if how == "interval-skipped-count-padded":  # checkpoint 3 dropped, one more appended
        extra = train(run.draw, data, run.states[-1], J * K, 1)[0]
        extra_b = (to_bytes(extra[0]), to_bytes(extra[1]))
        leaves.append(CheckpointLeaf(J + 1, (J + 1) * K, compute_tensor_hash(extra_b[0]),
                                     compute_tensor_hash(extra_b[1]),
                                     compute_update_norm(run.states[-1][0], extra[0])))
        tensors.append(extra_b)
        del leaves[3], tensors[3]
        return leaves, tensors, J * K
    assert how == "two-checkpoints-swapped"
    leaves[3], leaves[4] = leaves[4], leaves[3]
    tensors[3], tensors[4] = tensors[4], tensors[3]
    return leaves, tensors, J * K


@pytest.mark.parametrize(("how", "reason"), [
    ("every-other-checkpoint", "bad-ckpt-count"),
    ("last-checkpoint-missing", "bad-ckpt-count"),
    ("checkpoints-2k-apart", "bad-ckpt-leaf"),
    ("interval-skipped-count-padded", "bad-ckpt-leaf"),
    ("two-checkpoints-swapped", "bad-ckpt-leaf"),
])
def test_history_with_skipped_intervals_is_rejected(cache, data, run, honest, how, reason):
    leaves, tensors, steps = _skipped_history(run, honest, data, how)
    final = tensors[-1][0]
    solution = commit_leaves(GENESIS_ID, FORGER.pubkey, run.nonce,
                             ModelBlob(run.draw.arch, final), leaves, tuple(tensors),
                             n_correct=honest.proof.n_correct, steps=steps)
    assert public_rejection(cache, solution) == (reason, BEFORE_AUDITS)


def fabricate(run: Run, i: int, how: str, data: DeviceData) -> State:
    """A checkpoint i + 1 not trained from checkpoint i: the parameters extrapolated along
    the last update (three times as far, or half as far), or trained three intervals
    instead of one; watermarked, so only the replay can tell."""
    p_prev, (p, m) = run.states[i - 1][0], run.states[i]
    if how == "extrapolated":
        return stamp(run.draw, p + 3 * (p - p_prev)), m
    if how == "nudged":
        return stamp(run.draw, p + 0.5 * (p - p_prev)), m
    if how == "near-delta":  # off its replay by 3/4 of delta: it passes, but barely
        replay = train(run.draw, data, run.states[i], i * K, 1)[-1]

        def off(scale: float) -> State:
            return stamp(run.draw, replay[0] + scale * (p - p_prev)), replay[1]

        distance = max(compute_replay_distance(run.draw.hpp, replay, off(1.0)))
        return off(0.75 * TASK.delta_ppm / 1e6 / distance)
    assert how == "overtrained"
    return train(run.draw, data, run.states[i], i * K, 3)[-1]


@pytest.mark.parametrize("how", ["extrapolated", "overtrained"])
@pytest.mark.parametrize(("norm", "reason"), [("truthful", "bad-replay"),
                                              ("understated", "bad-update-norm")])
def test_fabricated_last_interval_is_caught_without_private_audits(
        cache, data, run, honest, how, norm, reason):
    states = [*run.states[:J], fabricate(run, J - 1, how, data)]
    norms = {J: honest.history.leaves[J].update_norm} if norm == "understated" else None
    solution = forge(run, states, data, norms=norms)
    assert public_rejection(cache, solution, q_local=0) == (reason, IN_AUDITS)


def test_fabricated_momentum_is_caught_by_the_replay(cache, data, run):
    """Checkpoint J-1 keeps its honest parameters but commits a momentum five times the
    real one, and the last interval is trained honestly from it: that interval replays
    exactly, and so do the parameters of the one before; only its momentum does not."""
    p, m = run.states[J - 1]
    boosted = (p, 5 * m)
    states = [*run.states[:J - 1], boosted, *train(run.draw, data, boosted, (J - 1) * K, 1)]
    solution = forge(run, states, data)
    assert J - 2 not in audit_targets(solution)
    replayed = train(run.draw, data, run.states[J - 2], (J - 2) * K, 1)[0]
    assert np.array_equal(replayed[0], p) and not np.array_equal(replayed[1], 5 * m)
    assert verify(cache, solution, q_local=0) is None
    with pytest.raises(FraudFound) as exc:
        verify(cache, solution, q_local=ALL)
    assert exc.value.proof.start.leaf.index == J - 2
    assert exc.value.__cause__.reason == "bad-replay"


@pytest.mark.parametrize("tensor", ["params", "momentum"])
@pytest.mark.parametrize(("ppm", "reason"), [(TASK.delta_ppm // 10, None),
                                              (3 * TASK.delta_ppm, "bad-replay")])
def test_replay_tolerates_delta_ppm_and_no_more(cache, data, run, tensor, ppm, reason):
    """The last checkpoint's parameters moved off the honest ones by `ppm` (relative L2),
    as another device's rounding would move them, or further (watermark re-stamped); or
    its momentum moved so that the displacement it causes, lr/(1 − μ) times its error, is
    `ppm` of the parameters' norm. Count and norm committed truthfully, so only the
    replay distance decides."""
    p, m = run.states[J]
    noise = np.random.default_rng(1).standard_normal(len(p))
    noise *= ppm * 1e-6 * np.linalg.norm(p) / np.linalg.norm(noise)
    if tensor == "params":
        last = (stamp(run.draw, (p + noise).astype(np.float32)), m)
    else:
        hpp = run.draw.hpp
        last = (p, (m + noise * (1 - hpp.momentum) / hpp.lr).astype(np.float32))
    solution = forge(run, [*run.states[:J], last], data)
    if reason is None:
        assert verify(cache, solution, q_local=ALL) is None
    else:
        assert public_rejection(cache, solution, q_local=0) == (reason, IN_AUDITS)


@pytest.mark.parametrize(("ppm", "reason"), [(TASK.delta_ppm // 2, None),
                                              (10 * TASK.delta_ppm, "bad-update-norm")])
def test_committed_update_norm_tolerates_delta_ppm_and_no_more(cache, data, run, honest,
                                                               ppm, reason):
    """The last leaf's update norm understated by `ppm` of itself."""
    norm = honest.history.leaves[J].update_norm * (10**6 - ppm) // 10**6
    solution = forge(run, run.states, data, norms={J: norm})
    if reason is None:
        assert verify(cache, solution, q_local=ALL) is None
    else:
        assert public_rejection(cache, solution, q_local=0) == (reason, IN_AUDITS)


def test_checkpoint_that_does_not_fit_the_architecture_is_rejected(cache, data, run, honest):
    """Checkpoint J-1, which the last audit replays from, committed with ten parameters
    cut off: the leaf commits to those bytes, so the data is the miner's, and bad."""
    leaves, tensors = list(honest.history.leaves), list(honest.tensors)
    params, momentum = tensors[J - 1]
    params = params[:-40]
    leaves[J - 1] = replace(leaves[J - 1], params_hash=compute_tensor_hash(params))
    tensors[J - 1] = (params, momentum)
    solution = commit_leaves(GENESIS_ID, FORGER.pubkey, run.nonce, honest.model, leaves,
                             tuple(tensors), n_correct=honest.proof.n_correct, steps=J * K)
    assert public_rejection(cache, solution) == ("bad-ckpt-data", IN_AUDITS)


def forge_middle(run: Run, m: int, how: str, data: DeviceData, *, understate: bool,
                 prev_id: Hash = GENESIS_ID) -> Solution:
    """Interval m fabricated (see `fabricate`), then honest training from the fabricated
    checkpoint until the model is accurate enough for a block (and at least three more
    intervals); its update norm committed truthfully, or as the honest interval's."""
    states = [*run.states[:m + 1], fabricate(run, m, how, data)]
    while len(states) - 1 < m + 4 or count_correct(run.draw.arch, states[-1][0],
                                                      data) < TASK.t_acc:
        assert len(states) <= TASK.s_max // K
        states += train(run.draw, data, states[-1], (len(states) - 1) * K, 1)
    honest_norm = compute_update_norm(run.states[m][0], run.states[m + 1][0])
    norms = {m + 1: honest_norm} if understate else None
    return commit(prev_id, FORGER.pubkey, run.nonce, run.draw.arch, states, data, norms=norms)


def test_fabricated_interval_with_the_largest_update_is_caught_without_private_audits(
        cache, data, run):
    solution = forge_middle(run, 4, "extrapolated", data, understate=False)
    last, largest = audit_targets(solution)
    assert largest == 4 != last
    assert public_rejection(cache, solution, q_local=0) == ("bad-replay", IN_AUDITS)


@dataclass(frozen=True, slots=True, eq=False)
class Hidden:
    """A forgery only a private audit can catch: interval m fabricated, neither the last
    interval nor the largest committed update."""

    solution: Solution
    m: int
    prev_id: Hash
    caught_by: str  # the reason the private audit of interval m fails with

    @property
    def header(self) -> BlockHeader:
        return header_of(self.solution)


@pytest.fixture(scope="module", params=["extrapolated", "nudged"])
def hidden(request, run, data) -> Hidden:
    """Extrapolated with its norm understated (the private audit's norm check catches it),
    or nudged with its small norm committed truthfully (the private replay catches it)."""
    understate = request.param == "extrapolated"  # a big jump must understate to hide
    solution = forge_middle(run, 4, request.param, data, understate=understate)
    assert 4 not in audit_targets(solution)
    return Hidden(solution, 4, GENESIS_ID, "bad-update-norm" if understate else "bad-replay")


@pytest.fixture(scope="module")
def found(cache, hidden) -> FraudFound:
    """What a verifier whose private audits cover every interval finds."""
    with pytest.raises(FraudFound) as exc:
        engine(cache, hidden.solution, q_local=ALL).validate_block_seal(
            EASY, hidden.header, TASK)
    return exc.value


@pytest.fixture(scope="module")
def fraud(found) -> FraudProof:
    return found.proof


def test_hidden_fabricated_interval_passes_public_audits(cache, hidden):
    """Why private audits exist: with q_local=0 this forgery is a valid block."""
    eng = engine(cache, hidden.solution, q_local=0)
    assert eng.validate_block_seal(EASY, hidden.header, TASK) is None


def test_hidden_fabricated_interval_is_caught_by_a_private_audit(cache, hidden, found):
    block_id = compute_block_id(hidden.header)
    assert found.reason == "bad-replay" and found.__cause__.reason == hidden.caught_by
    fraud = found.proof
    assert fraud.owner_id == block_id
    assert (fraud.start.leaf.index, fraud.end.leaf.index) == (hidden.m, hidden.m + 1)
    assert fraud.start == hidden.solution.checkpoint(hidden.m)
    assert fraud.end == hidden.solution.checkpoint(hidden.m + 1)
    # The secret choice catches it some of the time, and always names the forged interval.
    caught = []
    for seed in range(30):
        eng = engine(cache, hidden.solution, q_local=2, rng=random.Random(seed))
        try:
            eng.validate_block_seal(EASY, hidden.header, TASK)
        except FraudFound as err:
            assert err.reason == "bad-replay"
            assert err.proof.start.leaf.index == hidden.m and err.proof.owner_id == block_id
            caught.append(seed)
    assert 0 < len(caught) < 30, caught


def test_fraud_proof_convinces_an_independent_engine(hidden, fraud):
    """Another node, with neither the block's artifacts nor the accuser's engine, checks
    the fraud proof by replaying that one interval."""
    stranger = DPoDLEngine(MemoryArtifacts(), DataCache(), q_local=0)
    assert stranger.check_fraud_proof(EASY, hidden.prev_id, hidden.solution.proof, TASK,
                                      fraud) is Verdict.HOLDS


@pytest.mark.parametrize("interval", ["first", "after-the-forgery"])
def test_fraud_proof_about_an_honest_interval_is_refused(cache, hidden, interval):
    i = 0 if interval == "first" else hidden.m + 1
    solution = hidden.solution
    accusation = FraudProof(compute_block_id(hidden.header), solution.checkpoint(i),
                            solution.checkpoint(i + 1))
    stranger = DPoDLEngine(MemoryArtifacts(), cache, q_local=0)
    assert stranger.check_fraud_proof(EASY, hidden.prev_id, solution.proof, TASK,
                                      accusation) is Verdict.REFUTED


@pytest.mark.parametrize("tamper", ["sibling-zeroed", "another-leafs-path", "path-truncated",
                                    "path-extended"])
def test_fraud_proof_with_a_bad_merkle_path_is_refused(cache, hidden, fraud, tamper):
    path = fraud.start.path
    if tamper == "sibling-zeroed":
        path = (bytes(32), *path[1:])
    elif tamper == "another-leafs-path":
        path = fraud.end.path
    elif tamper == "path-truncated":
        path = path[:-1]
    else:
        path = (*path, bytes(32))
    assert path != fraud.start.path
    accusation = replace(fraud, start=replace(fraud.start, path=path))
    stranger = DPoDLEngine(MemoryArtifacts(), cache, q_local=0)
    assert stranger.check_fraud_proof(EASY, hidden.prev_id, hidden.solution.proof, TASK,
                                      accusation) is Verdict.REFUTED


def test_fraud_proof_with_tensors_the_miner_did_not_commit_is_refused(cache, hidden):
    """An accuser framing an honest interval with a checkpoint it altered: the leaf and
    path are the miner's, the tensors are not, so it proves nothing."""
    solution = hidden.solution
    start, end = solution.checkpoint(0), solution.checkpoint(1)
    altered = solution.tensors[2][0]  # watermarked, and not what 20 steps from start give
    accusation = FraudProof(compute_block_id(hidden.header), start,
                            replace(end, params=altered))
    stranger = DPoDLEngine(MemoryArtifacts(), cache, q_local=0)
    assert stranger.check_fraud_proof(EASY, hidden.prev_id, solution.proof, TASK,
                                      accusation) is Verdict.REFUTED


@pytest.mark.parametrize("wrong", ["not-consecutive", "another-block"])
def test_fraud_proof_that_does_not_fit_the_accused_block_is_refused(
        cache, hidden, fraud, honest, wrong):
    proof = hidden.solution.proof
    if wrong == "not-consecutive":
        accusation = replace(fraud, end=hidden.solution.checkpoint(hidden.m + 2))
    else:  # the forged block's interval held against an honest block's commitments
        accusation, proof = fraud, honest.proof
    stranger = DPoDLEngine(MemoryArtifacts(), cache, q_local=0)
    assert stranger.check_fraud_proof(EASY, hidden.prev_id, proof, TASK,
                                      accusation) is Verdict.REFUTED


def test_fraud_proof_about_an_interval_replaying_near_delta_is_inconclusive(cache, data, run):
    """Interval 4 replays 3/4 of delta away: valid here, yet another device's rounding
    could take it past delta, so a fraud proof of it neither convicts nor is a lie."""
    solution = forge_middle(run, 4, "near-delta", data, understate=False)
    replayed = train(run.draw, data, run.states[4], 4 * K, 1)[-1]
    committed = tuple(from_bytes(t) for t in solution.tensors[5])
    distance = max(compute_replay_distance(run.draw.hpp, replayed, committed))
    assert 0.5 < distance * 1e6 / TASK.delta_ppm < 1.0
    verify(cache, solution, q_local=ALL)  # every interval replays within delta
    accusation = FraudProof(compute_block_id(header_of(solution)), solution.checkpoint(4),
                            solution.checkpoint(5))
    stranger = DPoDLEngine(MemoryArtifacts(), cache, q_local=0)
    assert stranger.check_fraud_proof(EASY, GENESIS_ID, solution.proof, TASK,
                                      accusation) is Verdict.INCONCLUSIVE


def test_fraud_proof_invalidates_block_and_descendants_in_the_chain_store(
        tmp_path, cache, data, run, easy_chain):
    """A node whose own engine (q_local=0) accepted the hidden forgery on its main chain,
    with two honest blocks on top; an honest side branch exists. The fraud proof from
    another verifier's private audit convicts the forgery: the node drops it and its
    descendants and moves to the best valid chain."""
    a, b, c = easy_chain[:3]  # b is a's honest child, c is b's
    a_id = a.block_id
    nonce, h1 = find_nonce(a_id, FORGER.pubkey)
    draw = compute_htoa(TASK, h1)
    init = (draw.init, np.zeros_like(draw.init))
    forger_run = Run(nonce, draw, [init, *train(draw, data, init, 0, 5)])
    forged = forge_middle(forger_run, 4, "extrapolated", data, understate=True,
                          prev_id=a_id)
    assert 4 not in audit_targets(forged)
    f_block = sign_block(a.block.header, forged, FORGER)
    f_id = compute_block_id(f_block.header)

    artifacts = publish(a.solution, b.solution, c.solution, forged)
    db = Database(tmp_path)
    store = ChainStore(db, EASY, DPoDLEngine(artifacts, cache, q_local=0))
    assert add(store, a.block) == "connected"
    assert add(store, f_block) == "connected"
    d = mine_on(EASY, f_block.header, HONEST, data)
    e = mine_on(EASY, d.block.header, HONEST, data)
    publish(d.solution, e.solution, artifacts=artifacts)
    assert add(store, d.block) == "connected"
    assert add(store, e.block) == "connected"
    assert add(store, b.block) == "stored"  # lighter than the forgery's branch
    assert store.tip_id == e.block_id and store.is_main_chain(f_id)

    auditor = DPoDLEngine(artifacts, cache, q_local=ALL, rng=random.Random(5))
    with pytest.raises(FraudFound) as exc:
        auditor.validate_block_seal(EASY, f_block.header, TASK)
    fraud = exc.value.proof
    assert fraud.owner_id == f_id
    header = store.get_header(fraud.owner_id)
    stranger = DPoDLEngine(MemoryArtifacts(), DataCache(), q_local=0)
    assert stranger.check_fraud_proof(EASY, header.prev_id, header.proof, TASK,
                                      fraud) is Verdict.HOLDS

    result = store.invalidate_block(fraud.owner_id)
    assert result.status == "connected"
    assert result.disconnected == (e.block_id, d.block_id, f_id)
    assert result.connected == (b.block_id,)
    assert store.tip_id == b.block_id and not store.is_main_chain(f_id)
    assert store.get_entry(f_id).status == schema.STATUS_INVALID
    assert store.get_entry(d.block_id).status == schema.STATUS_INVALID_PARENT
    assert store.get_entry(e.block_id).status == schema.STATUS_INVALID_PARENT
    assert store.get_state(("model", forged.proof.model_id)) is None
    assert store.get_state(("model", d.solution.proof.model_id)) is None
    assert store.get_state(("model", b.solution.proof.model_id)) is not None
    child = assemble_block(f_block.header, f_block.header.timestamp + 7,
                           f_block.header.target, d.solution.proof, (), HONEST)
    with pytest.raises(ConsensusError) as err:  # nothing builds on the convicted block
        add(store, child)
    assert err.value.reason == "bad-prevblk"
    assert add(store, c.block) == "connected"  # the honest chain goes on
    store.close()
    store = ChainStore(Database(tmp_path), EASY, DPoDLEngine(artifacts, cache, q_local=0))
    assert store.tip_id == c.block_id  # the verdict is on disk
    assert store.get_entry(f_id).status == schema.STATUS_INVALID
    store.close()


# ---------------------------------------------------------------------------------------
# A pretrained model passed off as trained from the block's init


@pytest.fixture(scope="module")
def pretrained_states(data, run, other) -> list[State]:
    """HtoA's init; then a model trained elsewhere (another init and data order, no
    watermark, ten intervals) re-stamped with this h1's watermark; then three honest
    intervals from it."""
    elsewhere = replace(run.draw, init=draw_init(run.draw.arch, other.h1),
                        data_seed=other.data_seed, signature=Signature(b"elsewhere", 0))
    begin = (elsewhere.init, np.zeros_like(elsewhere.init))
    p, m = train(elsewhere, data, begin, 0, 10)[-1]
    jump = (stamp(run.draw, p), m)
    return [run.states[0], jump, *train(run.draw, data, jump, K, 3)]


def test_pretrained_model_with_truthful_norm_is_caught_by_the_largest_update_audit(
        cache, data, run, pretrained_states):
    solution = forge(run, pretrained_states, data)
    assert audit_targets(solution)[1] == 0
    for q_local in (0, ALL):
        assert public_rejection(cache, solution, q_local=q_local) == ("bad-replay", IN_AUDITS)


def test_pretrained_model_with_understated_norm_is_caught_by_a_private_audit(
        cache, data, run, pretrained_states):
    smallest = min(compute_update_norm(pretrained_states[i - 1][0], pretrained_states[i][0])
                   for i in range(2, len(pretrained_states)))
    solution = forge(run, pretrained_states, data, norms={1: smallest})
    assert 0 not in audit_targets(solution)
    assert verify(cache, solution, q_local=0) is None  # public audits alone miss it
    with pytest.raises(FraudFound) as exc:
        verify(cache, solution, q_local=ALL)
    assert exc.value.reason == "bad-replay"
    assert exc.value.__cause__.reason == "bad-update-norm"
    fraud = exc.value.proof
    assert (fraud.start.leaf.index, fraud.end.leaf.index) == (0, 1)
    stranger = DPoDLEngine(MemoryArtifacts(), DataCache(), q_local=0)
    assert stranger.check_fraud_proof(EASY, GENESIS_ID, solution.proof, TASK,
                                      fraud) is Verdict.HOLDS


# ---------------------------------------------------------------------------------------
# PostHash (§6, §8 step 6)


def test_posthash_above_target_is_rejected(cache, data, run):
    """An honest history whose h2 misses the dev chain's t2, submitted as a block anyway;
    the same proof passes where its h2 meets the target."""
    t2 = DEV.t2_genesis
    j = next(j for j in range(1, J + 1) if not check_target(compute_posthash(
        run.draw.h1, j * K, count_correct(run.draw.arch, run.states[j][0], data)), t2))
    solution = forge(run, run.states[:j + 1], data)
    assert public_rejection(cache, solution, q_local=ALL, target=t2, params=DEV) \
        == ("bad-posthash", BEFORE_AUDITS)
    assert verify(cache, solution, q_local=ALL, target=MAX_TARGET, params=DEV) is None


# ---------------------------------------------------------------------------------------
# State rules at connect time (§7): reference window and total steps


def test_reference_outside_the_window_is_rejected_at_connect(tmp_path, cache, data,
                                                             easy_chain):
    db = Database(tmp_path)
    artifacts = ArtifactStore(db)
    for mined in easy_chain:
        publish(mined.solution, artifacts=artifacts)  # type: ignore[arg-type]
    store = ChainStore(db, EASY, DPoDLEngine(artifacts, cache, rng=random.Random(3)))
    for mined in easy_chain:
        assert add(store, mined.block) == "connected"
    first = easy_chain[0].solution
    record = store.get_state(("model", first.proof.model_id))
    assert record.height == 1 and store.height == 1 + TASK.l_ref
    ref = Reference(first.proof.model_id, first.model, record.total_steps)

    edge = mine_on(EASY, store.tip.header, HONEST, data, reference=ref)  # l_ref back: ok
    publish(edge.solution, artifacts=artifacts)  # type: ignore[arg-type]
    assert add(store, edge.block) == "connected"
    late = mine_on(EASY, edge.block.header, HONEST, data, reference=ref)  # l_ref + 1 back
    publish(late.solution, artifacts=artifacts)  # type: ignore[arg-type]
    assert store.engine.validate_block_seal(EASY, late.block.header, TASK) is None
    with pytest.raises(ConsensusError) as exc:
        add(store, late.block)
    assert exc.value.reason == "bad-ref-window"
    assert store.tip_id == edge.block_id
    assert store.get_entry(late.block_id).status == schema.STATUS_INVALID
    assert store.get_state(("model", late.solution.proof.model_id)) is None
    store.close()


def test_too_few_total_steps_are_rejected_at_connect(tmp_path, cache, data):
    """On a chain whose task asks for 200 steps, a forger claims a block at the first
    checkpoint accurate enough, before s_min: the seal is sound, the state refuses it."""
    task = replace(TASK, s_min=10 * K)
    params = replace(EASY, genesis_task=task)
    genesis = genesis_block(params).header
    genesis_id = compute_block_id(genesis)
    nonce, h1 = find_nonce(genesis_id, FORGER.pubkey, task=task)
    draw = compute_htoa(task, h1)
    states = [(draw.init, np.zeros_like(draw.init))]
    while count_correct(draw.arch, states[-1][0], data) < task.t_acc:
        states += train(draw, data, states[-1], (len(states) - 1) * K, 1)
    assert (len(states) - 1) * K < task.s_min
    solution = commit(genesis_id, FORGER.pubkey, nonce, draw.arch, states, data, task=task)
    artifacts = publish(solution)
    eng = DPoDLEngine(artifacts, cache, q_local=ALL)
    block = sign_block(genesis, solution, FORGER)
    assert eng.validate_block_seal(params, block.header, task) is None
    store = ChainStore(Database(tmp_path), params, eng)
    with pytest.raises(ConsensusError) as exc:
        add(store, block)
    assert exc.value.reason == "bad-steps-total"
    assert store.height == 0
    assert store.get_entry(compute_block_id(block.header)).status == schema.STATUS_INVALID
    honest_block = mine_on(params, genesis, HONEST, data)  # trains to s_min, then connects
    publish(honest_block.solution, artifacts=artifacts)
    assert honest_block.solution.proof.steps >= task.s_min
    assert add(store, honest_block.block) == "connected"
    store.close()


# ---------------------------------------------------------------------------------------
# Missing artifacts are not a verdict (§8; mining/artifacts.py)


@pytest.fixture(scope="module")
def referenced(data, honest) -> Solution:
    """An honest block of four intervals trained from a reference: the base run's model."""
    ref_id = honest.proof.model_id
    nonce, h1 = find_nonce(GENESIS_ID, FORGER.pubkey, ref=ref_id)
    draw = compute_htoa(TASK, h1, honest.model)
    begin = (draw.init, np.zeros_like(draw.init))
    states = [begin, *train(draw, data, begin, 0, 4)]
    return commit(GENESIS_ID, FORGER.pubkey, nonce, draw.arch, states, data, ref=ref_id)


class Fickle(random.Random):
    """An rng that never picks the same private intervals twice in a row."""

    def __init__(self) -> None:
        super().__init__(0)
        self.draws = 0

    def sample(self, population, k, *, counts=None):  # type: ignore[no-untyped-def, override]
        self.draws += 1
        shift = self.draws * k % len(population) if population else 0
        return (population[shift:] + population[:shift])[:k]


class CountingRecount:
    """Trainer.count_correct, patched to count the validation passes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        count = Trainer.count_correct

        def counting(trainer: Trainer) -> int:
            self.calls += 1
            return count(trainer)

        monkeypatch.setattr(Trainer, "count_correct", counting)


def ends(intervals: object) -> set[int]:
    """The checkpoints an audit of these intervals reads."""
    return {i + d for i in intervals for d in (0, 1)}  # type: ignore[attr-defined]


def _drop(artifacts: MemoryArtifacts, solution: Solution, what: str) -> Need:
    """Remove or corrupt one artifact; returns the Need that names it."""
    root, model_id = solution.proof.ckpt_root, solution.proof.model_id
    if what == "model":
        del artifacts.models[model_id]
        return Need("model", model_id)
    if what == "model-corrupt":
        blob = artifacts.models[model_id]
        artifacts.models[model_id] = replace(blob, params=blob.params[4:] + blob.params[:4])
        return Need("model", model_id)
    if what == "history":
        del artifacts.histories[root]
        return Need("history", root)
    if what == "history-corrupt":
        leaves = artifacts.histories[root].leaves
        changed = replace(leaves[2], update_norm=leaves[2].update_norm + 1)
        artifacts.histories[root] = replace(artifacts.histories[root],
                                            leaves=(*leaves[:2], changed, *leaves[3:]))
        return Need("history", root)
    if what == "checkpoint-tensors-corrupt":
        artifacts.checkpoints[root, 2] = replace(artifacts.checkpoints[root, 2],
                                                 params=artifacts.checkpoints[root, 3].params)
        return Need("checkpoint", root, 2)
    if what == "checkpoint-path-corrupt":
        artifacts.checkpoints[root, 2] = replace(artifacts.checkpoints[root, 2],
                                                 path=artifacts.checkpoints[root, 3].path)
        return Need("checkpoint", root, 2)
    if what == "checkpoint-of-another-index":
        artifacts.checkpoints[root, 2] = artifacts.checkpoints[root, 3]
        return Need("checkpoint", root, 2)
    index = int(what.removeprefix("checkpoint-"))
    del artifacts.checkpoints[root, index]
    return Need("checkpoint", root, index)


@pytest.mark.parametrize("what", [
    "model", "model-corrupt", "history", "history-corrupt",
    *(f"checkpoint-{i}" for i in range(J + 1)),
    "checkpoint-tensors-corrupt", "checkpoint-path-corrupt", "checkpoint-of-another-index",
])
def test_missing_or_corrupt_artifact_raises_missing_artifact(cache, honest, what):
    artifacts = publish(honest)
    need = _drop(artifacts, honest, what)
    eng = DPoDLEngine(artifacts, cache, q_local=ALL)
    with pytest.raises(MissingArtifact) as exc:
        eng.validate_block_seal(EASY, header_of(honest), TASK)
    assert not isinstance(exc.value, ConsensusError)
    assert exc.value.needs == (need,)
    artifacts = publish(honest)  # once fetched, the same block passes
    assert DPoDLEngine(artifacts, cache, q_local=ALL).validate_block_seal(
        EASY, header_of(honest), TASK) is None


@pytest.mark.parametrize("copy", ["missing", "corrupt"])
def test_missing_reference_model_raises_missing_artifact(cache, honest, referenced, copy):
    """A block trained from a reference model the verifier does not have (yet)."""
    solution, ref_id = referenced, honest.proof.model_id
    artifacts = publish(solution)
    if copy == "corrupt":
        artifacts.add_model(ref_id, replace(honest.model, params=bytes(len(honest.model.params))))
    eng = DPoDLEngine(artifacts, cache, q_local=ALL)
    with pytest.raises(MissingArtifact) as exc:
        eng.validate_block_seal(EASY, header_of(solution), TASK)
    assert not isinstance(exc.value, ConsensusError)
    assert exc.value.needs == (Need("model", ref_id),)
    artifacts.add_model(ref_id, honest.model)
    assert eng.validate_block_seal(EASY, header_of(solution), TASK) is None


def test_block_with_missing_artifacts_stores_nothing(tmp_path, cache, easy_chain):
    mined = easy_chain[0]
    solution, root = mined.solution, mined.solution.proof.ckpt_root
    last = len(solution.tensors) - 1
    db = Database(tmp_path)
    artifacts = ArtifactStore(db)
    artifacts.add_model(solution.proof.model_id, solution.model)
    artifacts.add_history(root, solution.history)
    for i in range(last):
        artifacts.add_checkpoint(root, solution.checkpoint(i))
    store = ChainStore(db, EASY, DPoDLEngine(artifacts, cache, q_local=ALL))
    with pytest.raises(MissingArtifact) as exc:
        add(store, mined.block)
    assert not isinstance(exc.value, ConsensusError)
    assert exc.value.needs == (Need("checkpoint", root, last),)
    assert store.get_entry(mined.block_id) is None
    assert db.get(schema.block_key(mined.block_id)) is None
    assert db.get(schema.index_key(mined.block_id)) is None
    assert store.tip_id == GENESIS_ID
    assert store.get_state(("model", solution.proof.model_id)) is None
    artifacts.add_checkpoint(root, solution.checkpoint(last))  # fetched; try again
    assert add(store, mined.block) == "connected"
    store.close()


@pytest.mark.parametrize("q_local", [0, 2, ALL])
@pytest.mark.parametrize("with_ref", [False, True], ids=["no-ref", "ref"])
def test_missing_artifacts_are_asked_for_in_two_rounds(monkeypatch, cache, honest, referenced,
                                                       with_ref, q_local):
    """Nothing but some checkpoints here: the first MissingArtifact names the models and
    the history, the second every audited checkpoint still missing and nothing else, no
    validation pass runs before both are fetched, and then the block passes."""
    solution = referenced if with_ref else honest
    root, j = solution.proof.ckpt_root, solution.proof.steps // K
    deleted = {*range(1, j + 1, 2), j}  # the last interval's end is always audited
    artifacts = RecordingArtifacts()
    for i in set(range(j + 1)) - deleted:
        artifacts.add_checkpoint(root, solution.checkpoint(i))
    recount = CountingRecount(monkeypatch)
    eng = DPoDLEngine(artifacts, cache, q_local=q_local, rng=Fickle())
    header = header_of(solution)

    with pytest.raises(MissingArtifact) as exc:
        eng.validate_block_seal(EASY, header, TASK)
    first = {Need("model", solution.proof.model_id), Need("history", root)}
    if with_ref:
        first.add(Need("model", honest.proof.model_id))
    assert set(exc.value.needs) == first and len(exc.value.needs) == len(first)
    assert not artifacts.fetched  # no checkpoint is named before the history is checked
    artifacts.add_model(solution.proof.model_id, solution.model)
    artifacts.add_history(root, solution.history)
    if with_ref:
        artifacts.add_model(honest.proof.model_id, honest.model)

    with pytest.raises(MissingArtifact) as exc:
        eng.validate_block_seal(EASY, header, TASK)
    audited = {i for _, i in artifacts.fetched}
    public = set(audit_targets(solution))
    rest = set(range(j)) - public
    assert ends(public) <= audited
    assert any(audited == ends(public | set(private))  # q_local private intervals, no more
               for private in itertools.combinations(sorted(rest), min(q_local, len(rest))))
    if q_local == ALL:
        assert audited == set(range(j + 1))
    second = {Need("checkpoint", root, i) for i in audited & deleted}
    assert set(exc.value.needs) == second and len(exc.value.needs) == len(second)
    assert recount.calls == 0

    for need in exc.value.needs:
        artifacts.add_checkpoint(root, solution.checkpoint(need.index))
    artifacts.fetched.clear()
    assert eng.validate_block_seal(EASY, header, TASK) is None
    assert {i for _, i in artifacts.fetched} == audited  # the intervals of the first try
    assert recount.calls == 1
    assert all(artifacts.get_checkpoint(root, i) is None for i in deleted - audited)


def test_a_retry_audits_the_private_intervals_of_the_first_attempt(monkeypatch, cache, honest):
    """The rng would pick other intervals on every call; the retries of one block still
    ask for the same checkpoints, and a verdict frees the choice."""
    monkeypatch.setattr("mining.verifier.MAX_PASSED", 0)  # so that a pass is verified again
    artifacts = publish(honest)
    root = honest.proof.ckpt_root
    for i in range(J + 1):
        del artifacts.checkpoints[root, i]
    rng = Fickle()
    eng = DPoDLEngine(artifacts, cache, q_local=2, rng=rng)
    header = header_of(honest)
    asked = []
    for _ in range(3):
        with pytest.raises(MissingArtifact) as exc:
            eng.validate_block_seal(EASY, header, TASK)
        asked.append(set(exc.value.needs))
    assert asked[0] == asked[1] == asked[2] and rng.draws == 1
    with pytest.raises(MissingArtifact) as exc:  # what the engine's memory is for
        DPoDLEngine(artifacts, cache, q_local=2, rng=rng).validate_block_seal(EASY, header, TASK)
    assert set(exc.value.needs) != asked[0] and rng.draws == 2
    for need in asked[0]:
        artifacts.add_checkpoint(root, honest.checkpoint(need.index))
    assert eng.validate_block_seal(EASY, header, TASK) is None
    assert rng.draws == 2
    publish(honest, artifacts=artifacts)
    assert eng.validate_block_seal(EASY, header, TASK) is None  # passed: drawn afresh
    assert rng.draws == 3


def test_a_rejection_frees_the_private_choice(cache, hidden):
    rng = Fickle()
    eng = engine(cache, hidden.solution, q_local=ALL, rng=rng)
    for draws in (1, 2):
        with pytest.raises(FraudFound):
            eng.validate_block_seal(EASY, hidden.header, TASK)
        assert rng.draws == draws


def test_private_choices_kept_are_bounded(monkeypatch, cache, honest, referenced):
    """Past MAX_PLANS subjects awaiting checkpoints, the least recently tried is dropped."""
    monkeypatch.setattr("mining.verifier.MAX_PLANS", 1)
    artifacts = MemoryArtifacts()
    for solution in (honest, referenced):
        artifacts.add_model(solution.proof.model_id, solution.model)
        artifacts.add_history(solution.proof.ckpt_root, solution.history)
    rng = Fickle()
    eng = DPoDLEngine(artifacts, cache, q_local=2, rng=rng)
    for solution, draws in ((honest, 1), (referenced, 2), (referenced, 2), (honest, 3)):
        with pytest.raises(MissingArtifact):
            eng.validate_block_seal(EASY, header_of(solution), TASK)
        assert rng.draws == draws


def test_no_validation_pass_while_audited_checkpoints_are_missing(monkeypatch, cache, honest):
    artifacts = publish(honest)
    root = honest.proof.ckpt_root
    for i in (0, J):
        del artifacts.checkpoints[root, i]
    recount = CountingRecount(monkeypatch)
    eng = DPoDLEngine(artifacts, cache, q_local=ALL)
    for _ in range(2):
        with pytest.raises(MissingArtifact) as exc:
            eng.validate_block_seal(EASY, header_of(honest), TASK)
        assert exc.value.needs == (Need("checkpoint", root, 0), Need("checkpoint", root, J))
    assert recount.calls == 0
    publish(honest, artifacts=artifacts)
    assert eng.validate_block_seal(EASY, header_of(honest), TASK) is None
    assert recount.calls == 1


# ---------------------------------------------------------------------------------------
# A proof that passed is remembered; nothing else is


def as_mtx(solution: Solution) -> ModelTx:
    """The forger's solution published as a model transaction on EASY's genesis."""
    return sign_tx(ModelTx(GENESIS_ID, solution.proof, 0), FORGER)  # type: ignore[return-value]


def test_a_block_that_passed_passes_again_without_fetching_or_replaying(monkeypatch, cache,
                                                                         honest):
    """Every artifact deleted after the first pass: the second answer is the remembered
    one (no MissingArtifact, no validation pass, no replay); another engine, which has
    remembered nothing, asks for the artifacts."""
    artifacts = publish(honest, artifacts=RecordingArtifacts())
    recount = CountingRecount(monkeypatch)
    eng = DPoDLEngine(artifacts, cache, q_local=ALL, rng=random.Random(0))
    header = header_of(honest)
    assert eng.validate_block_seal(EASY, header, TASK) is None
    assert recount.calls == 1 and artifacts.fetched
    artifacts.models.clear()
    artifacts.histories.clear()
    artifacts.checkpoints.clear()
    artifacts.fetched.clear()
    monkeypatch.setattr(Trainer, "train", lambda *args: pytest.fail("replayed"))
    for _ in range(2):
        assert eng.validate_block_seal(EASY, header, TASK) is None
    assert recount.calls == 1 and not artifacts.fetched
    with pytest.raises(MissingArtifact):
        DPoDLEngine(artifacts, cache, q_local=ALL).validate_block_seal(EASY, header, TASK)


def test_a_pass_is_remembered_for_its_target_only(monkeypatch, cache, honest):
    """An mtx is checked against the target of the block that includes it: a pass at one
    target says nothing about another, which gets the engine's own verdict."""
    tx = as_mtx(honest)
    h2 = compute_posthash(compute_prehash(GENESIS_ID, honest.proof), honest.proof.steps,
                          honest.proof.n_correct)
    met = int.from_bytes(h2, "big")  # the hardest target the proof meets
    recount = CountingRecount(monkeypatch)
    eng = engine(cache, honest)
    for target, calls in ((MAX_TARGET, 1), (MAX_TARGET, 1), (met, 2), (MAX_TARGET, 2),
                          (met, 2)):
        assert eng.validate_mtx_seal(EASY, tx, TASK, target) is None
        assert recount.calls == calls, target
    with pytest.raises(ConsensusError) as exc:  # the same tx, below what its proof meets
        eng.validate_mtx_seal(EASY, tx, TASK, met - 1)
    assert exc.value.reason == "bad-posthash"
    assert eng.validate_block_seal(EASY, header_of(honest), TASK) is None  # another subject
    assert recount.calls == 3


def test_a_rejection_is_not_remembered(monkeypatch, cache, data, run):
    """A forgery rejected in the last of its checks, the public replay of its last
    interval, is rejected again in full the second time."""
    solution = forge(run, [*run.states[:J], fabricate(run, J - 1, "extrapolated", data)],
                     data)
    recount = CountingRecount(monkeypatch)
    eng = engine(cache, solution)
    for calls in (1, 2):
        with pytest.raises(ConsensusError) as exc:
            eng.validate_block_seal(EASY, header_of(solution), TASK)
        assert exc.value.reason == "bad-replay" and not isinstance(exc.value, FraudFound)
        assert recount.calls == calls


@pytest.mark.parametrize("what", ["history", f"checkpoint-{J}"])
def test_missing_artifacts_are_not_remembered(monkeypatch, cache, honest, what):
    artifacts = publish(honest)
    need = _drop(artifacts, honest, what)
    recount = CountingRecount(monkeypatch)
    eng = DPoDLEngine(artifacts, cache, q_local=0)
    for _ in range(2):
        with pytest.raises(MissingArtifact) as exc:
            eng.validate_block_seal(EASY, header_of(honest), TASK)
        assert exc.value.needs == (need,)
    assert recount.calls == 0
    publish(honest, artifacts=artifacts)
    assert eng.validate_block_seal(EASY, header_of(honest), TASK) is None
    assert recount.calls == 1


def test_passes_remembered_are_bounded(monkeypatch, cache, honest):
    """Past MAX_PASSED, the least recently asked about is dropped, not the oldest."""
    monkeypatch.setattr("mining.verifier.MAX_PASSED", 2)
    tx = as_mtx(honest)
    a, b, c = MAX_TARGET, MAX_TARGET - 1, MAX_TARGET - 2  # three keys, one subject
    recount = CountingRecount(monkeypatch)
    eng = engine(cache, honest)
    for target, calls in ((a, 1), (b, 2), (a, 2), (c, 3), (a, 3), (b, 4), (c, 5)):
        assert eng.validate_mtx_seal(EASY, tx, TASK, target) is None
        assert recount.calls == calls, (target, calls)


def test_a_fraud_proof_that_holds_forgets_the_passes_of_the_proof(cache, hidden, fraud):
    """A verifier whose private audits missed the hidden forgery remembers it passing, as
    a block and as a model transaction with the same proof; a fraud proof that does not
    hold changes nothing, one that holds is checked on its merits (not answered from the
    memory) and makes both be verified again."""
    eng = engine(cache, hidden.solution, q_local=0)
    tx = as_mtx(hidden.solution)
    assert eng.validate_block_seal(EASY, hidden.header, TASK) is None
    assert eng.validate_mtx_seal(EASY, tx, TASK, MAX_TARGET) is None
    eng.q_local = ALL  # from now on a verification that runs catches the forgery
    assert eng.validate_block_seal(EASY, hidden.header, TASK) is None  # remembered
    solution, prev_id = hidden.solution, hidden.prev_id
    honest_interval = FraudProof(fraud.owner_id, solution.checkpoint(0), solution.checkpoint(1))
    assert eng.check_fraud_proof(EASY, prev_id, solution.proof, TASK,
                                 honest_interval) is Verdict.REFUTED
    assert eng.validate_block_seal(EASY, hidden.header, TASK) is None  # still remembered
    assert eng.check_fraud_proof(EASY, prev_id, solution.proof, TASK, fraud) is Verdict.HOLDS
    with pytest.raises(FraudFound):
        eng.validate_block_seal(EASY, hidden.header, TASK)
    with pytest.raises(FraudFound):
        eng.validate_mtx_seal(EASY, tx, TASK, MAX_TARGET)


@pytest.mark.parametrize("q_local", [0, 2])
def test_audit_needs_names_the_checkpoints_the_validation_then_asks_for(cache, honest, q_local):
    """A node prefetches what the engine's audits will read: with the history here, the
    private draw is made at once and kept, so the validation asks for exactly those."""
    root = honest.proof.ckpt_root
    artifacts = MemoryArtifacts()
    eng = DPoDLEngine(artifacts, cache, q_local=q_local, rng=Fickle())
    block_id = compute_block_id(header_of(honest))
    assert eng.audit_needs(block_id, root) == []  # no history yet: nothing to name
    artifacts.add_model(honest.proof.model_id, honest.model)
    artifacts.add_history(root, honest.history)
    named = eng.audit_needs(block_id, root)
    assert named and all(n.kind == "checkpoint" and n.key == root for n in named)
    with pytest.raises(MissingArtifact) as exc:
        eng.validate_block_seal(EASY, header_of(honest), TASK)
    assert set(exc.value.needs) == set(named)
    for need in named:
        artifacts.add_checkpoint(root, honest.checkpoint(need.index))
    assert eng.audit_needs(block_id, root) == []  # all here
    assert eng.validate_block_seal(EASY, header_of(honest), TASK) is None
