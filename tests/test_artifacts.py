"""Artifact stores (PROTOCOL.md §8): models, histories and checkpoints by content, in
memory and on a real LevelDB."""

import contextlib
import pickle
from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest

from consensus.checkpoints import (
    Checkpoint,
    CheckpointLeaf,
    History,
    compute_ckpt_root,
    compute_tensor_hash,
    leaf_bytes,
)
from consensus.encoding import Hash, decode, tagged_hash
from consensus.merkle import compute_proof
from consensus.models import Arch, ModelBlob, compute_model_id, compute_param_count
from consensus.proofs import Proof
from consensus.seal import MissingArtifact, Need
from consensus.tasks import FAMILY_MLP
from mining.artifacts import MemoryArtifacts
from mining.miner import Solution
from mining.trainer import to_bytes
from storage import schema
from storage.artifacts import ArtifactStore
from storage.db import Database, StorageError

ARCH = Arch(FAMILY_MLP, 1, 2, 2, 3, (4,))
N = compute_param_count(ARCH)  # 35


def tensors(seed: int, count: int) -> tuple[tuple[bytes, bytes], ...]:
    rng = np.random.default_rng(seed)
    return tuple((to_bytes(rng.standard_normal(N).astype(np.float32)),
                  to_bytes(rng.standard_normal(N).astype(np.float32))) for _ in range(count))


def solution(seed: int, count: int = 5) -> Solution:
    """A self-consistent solution with `count` checkpoints (no training needed to store)."""
    ts = tensors(seed, count)
    leaves = tuple(CheckpointLeaf(i, 20 * i, compute_tensor_hash(p), compute_tensor_hash(m),
                                  1000 * i) for i, (p, m) in enumerate(ts))
    model = ModelBlob(ARCH, ts[-1][0])
    proof = Proof(tagged_hash("task", seed), b"", bytes(32), seed, 20 * (count - 1), 200,
                  compute_model_id(ARCH, model.params), compute_ckpt_root(leaves))
    return Solution("block", bytes(32), proof, model, History(leaves), ts)


A, B = solution(1), solution(2, count=6)


@pytest.fixture
def store(tmp_path):
    db = Database(tmp_path / "data")
    yield ArtifactStore(db)
    db.close()


def root(sol: Solution) -> Hash:
    return sol.proof.ckpt_root


# ---- in memory ------------------------------------------------------------------------

def test_memory_artifacts_round_trip():
    mem = MemoryArtifacts()
    assert mem.get_model(A.proof.model_id) is None and mem.get_history(root(A)) is None
    assert mem.get_checkpoint(root(A), 0) is None
    A.publish(mem)
    assert mem.get_model(A.proof.model_id) == A.model
    assert mem.get_history(root(A)) == A.history
    assert [mem.get_checkpoint(root(A), i) for i in range(5)] == [A.checkpoint(i)
                                                                 for i in range(5)]
    assert mem.get_checkpoint(root(A), 5) is None and mem.get_checkpoint(root(B), 0) is None


def test_missing_artifact_names_what_is_missing():
    key, other = Hash(bytes(range(32))), Hash(bytes(32))
    err = MissingArtifact(Need("checkpoint", key, 3))
    assert err.needs == (Need("checkpoint", key, 3),)
    assert (err.needs[0].kind, err.needs[0].key, err.needs[0].index) == ("checkpoint", key, 3)
    assert str(err) == f"missing checkpoint {key.hex()} #3"
    assert str(MissingArtifact(Need("model", key))) == f"missing model {key.hex()}"
    both = MissingArtifact(Need("model", key), Need("history", other))
    assert both.needs == (Need("model", key), Need("history", other))
    assert str(both) == f"missing model {key.hex()}, missing history {other.hex()}"
    copy = pickle.loads(pickle.dumps(both))  # as it comes back from a process executor
    assert copy.needs == both.needs and str(copy) == str(both)
    with pytest.raises(ValueError):
        MissingArtifact()
    with pytest.raises(FrozenInstanceError):
        both.needs[0].index = 1  # type: ignore[misc]


# ---- on LevelDB -----------------------------------------------------------------------

def test_store_round_trips_a_published_solution(store):
    A.publish(store)
    B.publish(store)
    for sol in (A, B):
        assert store.get_model(sol.proof.model_id) == sol.model
        assert store.get_history(root(sol)) == sol.history
        for i in range(len(sol.tensors)):
            assert store.get_checkpoint(root(sol), i) == sol.checkpoint(i)
        assert store.get_checkpoint(root(sol), len(sol.tensors)) is None


def test_unknown_keys_are_none(store):
    key = Hash(bytes(32))
    assert store.get_model(key) is None
    assert store.get_history(key) is None
    assert store.get_checkpoint(key, 0) is None


def test_model_whose_bytes_hash_to_another_id_is_refused(store):
    with pytest.raises(ValueError, match="another id"):
        store.add_model(B.proof.model_id, A.model)  # B's id, A's bytes
    tampered = replace(A.model, params=A.model.params[:-1] + b"\x00")
    with pytest.raises(ValueError, match="another id"):
        store.add_model(A.proof.model_id, tampered)
    other_arch = replace(A.model, arch=replace(ARCH, classes=2))  # same bytes, other arch
    with pytest.raises(ValueError, match="another id"):
        store.add_model(A.proof.model_id, other_arch)
    assert store.get_model(A.proof.model_id) is None and store.get_model(B.proof.model_id) is None
    store.add_model(A.proof.model_id, A.model)
    store.add_model(A.proof.model_id, A.model)  # the same content again is fine
    assert store.get_model(A.proof.model_id) == A.model


def test_history_not_matching_the_root_is_refused(store):
    with pytest.raises(ValueError, match="another root"):
        store.add_history(root(A), B.history)
    leaves = A.history.leaves
    for tampered in (
        History(leaves[:-1]),  # a prefix
        History((*leaves[:2], replace(leaves[2], update_norm=leaves[2].update_norm + 1),
                 *leaves[3:])),
        History((leaves[1], leaves[0], *leaves[2:])),  # reordered
    ):
        with pytest.raises(ValueError, match="another root"):
            store.add_history(root(A), tampered)
    assert store.get_history(root(A)) is None


def test_checkpoint_of_an_unknown_history_is_refused(store):
    with pytest.raises(ValueError, match="not committed"):
        store.add_checkpoint(root(A), A.checkpoint(0))
    assert store.get_checkpoint(root(A), 0) is None


def _bad_checkpoints():
    good = A.checkpoint(2)
    leaves = [leaf_bytes(leaf) for leaf in A.history.leaves]
    path_of_3 = compute_proof(leaves, 3)
    return {
        "path-of-another-leaf": replace(good, path=path_of_3),
        "sibling-flipped": replace(good, path=(bytes([good.path[0][0] ^ 1]) + good.path[0][1:],
                                               *good.path[1:])),
        "path-too-short": replace(good, path=good.path[:-1]),
        "path-too-long": replace(good, path=(*good.path, good.path[-1])),
        "leaf-norm-changed": replace(good, leaf=replace(good.leaf, update_norm=7)),
        "leaf-moved": replace(good, leaf=replace(good.leaf, index=3)),
        "leaf-out-of-range": replace(good, leaf=replace(good.leaf, index=5)),
        "leaf-of-B": B.checkpoint(2),
    }


@pytest.mark.parametrize("name", sorted(_bad_checkpoints()))
def test_checkpoint_whose_path_does_not_lead_to_the_root_is_refused(store, name):
    store.add_history(root(A), A.history)
    store.add_history(root(B), B.history)
    bad = _bad_checkpoints()[name]
    with pytest.raises(ValueError, match="not committed"):
        store.add_checkpoint(root(A), bad)
    for i in range(6):
        assert store.get_checkpoint(root(A), i) is None


def test_a_stored_checkpoint_cannot_be_replaced_by_other_tensors(store):
    A.publish(store)
    good = A.checkpoint(2)
    forged = replace(good, params=B.tensors[2][0])  # same leaf and path, other tensors
    # refusing it is one right answer; keeping the good copy is the other
    with contextlib.suppress(ValueError):
        store.add_checkpoint(root(A), forged)
    assert store.get_checkpoint(root(A), 2) == good


def test_prune_removes_that_historys_checkpoints_only(store):
    A.publish(store)
    B.publish(store)
    store.prune_checkpoints(root(A))
    assert all(store.get_checkpoint(root(A), i) is None for i in range(5))
    assert store.get_history(root(A)) == A.history  # the leaves stay
    assert store.get_model(A.proof.model_id) == A.model
    assert all(store.get_checkpoint(root(B), i) == B.checkpoint(i) for i in range(6))
    assert list(store.db.iterate(schema.checkpoint_prefix(root(A)))) == []
    store.prune_checkpoints(root(A))  # pruning twice is harmless
    store.add_checkpoint(root(A), A.checkpoint(1))  # and the history takes them back
    assert store.get_checkpoint(root(A), 1) == A.checkpoint(1)


def test_store_survives_reopening(tmp_path):
    with Database(tmp_path / "data") as db:
        A.publish(ArtifactStore(db))
    with Database(tmp_path / "data") as db:
        store = ArtifactStore(db)
        assert store.get_model(A.proof.model_id) == A.model
        assert store.get_history(root(A)) == A.history
        assert [store.get_checkpoint(root(A), i) for i in range(5)] == [
            A.checkpoint(i) for i in range(5)]


def test_a_corrupt_record_is_a_storage_error(store):
    store.db.db.put(schema.model_key(A.proof.model_id), b"\x93\x01\x02")
    with pytest.raises(StorageError, match="corrupt"):
        store.get_model(A.proof.model_id)


def test_a_historys_checkpoints_iterate_in_index_order(store):
    """Keys pack the index big-endian, so a prefix scan meets checkpoint 255 before 256."""
    many = solution(3, count=300)
    many.publish(store)
    scanned = [decode(Checkpoint, raw).leaf.index
               for _, raw in store.db.iterate(schema.checkpoint_prefix(root(many)))]
    assert scanned == list(range(300))
