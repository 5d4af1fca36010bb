"""Checkpoint retention (PROTOCOL.md §8): a node keeps the checkpoints of its last N
blocks, prunes the rest, and names what it lacks; on a real LevelDB, under the no-proof
seal (the checkpoints are the subject here, not the proof)."""

import argparse
import re
from pathlib import Path

import pytest

from consensus.blocks import assemble_block, compute_block_id
from consensus.encoding import Hash
from consensus.params import DEV
from consensus.proofs import Proof
from consensus.seal import Need, NoProofEngine
from consensus.state import compute_schedule
from consensus.tasks import compute_task_id
from consensus.transactions import ModelTx, sign_tx
from mining.miner import Solution
from node.config import (
    DEFAULT_KEEP_CHECKPOINTS,
    ConfigError,
    add_node_arguments,
    load_config,
)
from storage import schema
from storage.artifacts import ArtifactStore
from storage.chain import ChainStore, TipState
from storage.db import Database
from storage.retention import missing, prune, retained_roots
from storage.schema import STATUS_INVALID
from tests.builder import MINER
from tests.test_artifacts import solution


class Chain:
    """A chain store and an artifact store on one database, mining blocks whose proofs
    (the header's and any model transactions') commit to given solutions' histories."""

    def __init__(self, path: Path) -> None:
        self.db = Database(path)
        self.store = ChainStore(self.db, DEV, NoProofEngine())
        self.artifacts = ArtifactStore(self.db)
        self.nonce = 0

    def mine(self, sol: Solution, mtxs: tuple[Solution, ...] = (),
             parent_id: Hash | None = None) -> Hash:
        """A block on `parent_id` (default the tip) carrying `sol` and `mtxs`; its id."""
        parent = self.store.get_header(parent_id or self.store.tip_id)
        assert parent is not None
        # Below the first retarget, so the parent's target is the child's on any branch.
        assert parent.height + 1 < DEV.retarget_interval
        prev_id = compute_block_id(parent)
        txs = tuple(sign_tx(ModelTx(prev_id, self.proof(m), 0), MINER) for m in mtxs)
        timestamp = parent.timestamp + DEV.target_block_time
        block = assemble_block(parent, timestamp, parent.target, self.proof(sol), txs, MINER)
        self.store.add_block(block, now=timestamp)
        return compute_block_id(block.header)

    def proof(self, sol: Solution) -> Proof:
        _, task = compute_schedule(DEV, TipState(self.store), self.store.height + 1)
        self.nonce += 1
        return Proof(compute_task_id(task), b"", MINER.pubkey, self.nonce,
                     -(-task.s_min // task.k) * task.k, task.t_acc, sol.proof.model_id,
                     sol.proof.ckpt_root)

    def stored(self, sol: Solution) -> list[int]:
        return self.artifacts.checkpoint_indexes(root(sol))

    def kept_whole(self, sol: Solution) -> bool:
        """All of its checkpoints, its history and its model are here, intact."""
        a = self.artifacts
        return (all(a.get_checkpoint(root(sol), i) == sol.checkpoint(i)
                    for i in range(len(sol.tensors)))
                and self.lost_checkpoints_only(sol))

    def lost_checkpoints_only(self, sol: Solution) -> bool:
        return (self.artifacts.get_history(root(sol)) == sol.history
                and self.artifacts.get_model(sol.proof.model_id) == sol.model)


def root(sol: Solution) -> Hash:
    return sol.proof.ckpt_root


# Solutions 10.. are this module's own; a few checkpoints each keeps the tests quick.
S = [solution(10 + i, count=3 + i % 3) for i in range(12)]


@pytest.fixture
def chain(tmp_path):
    chain = Chain(tmp_path / "data")
    yield chain
    chain.db.close()


# ---- prune ----------------------------------------------------------------------------

def test_prune_keeps_the_last_blocks_checkpoints_and_drops_the_rest(chain):
    # heights 1..5: blocks S0..S4; an mtx S5 rides in block 2 (old), S6 in block 5 (recent)
    chain.mine(S[0])
    chain.mine(S[1], mtxs=(S[5],))
    chain.mine(S[2])
    chain.mine(S[3])
    chain.mine(S[4], mtxs=(S[6],))
    unreferenced, protected = S[7], S[8]
    for sol in S[:9]:
        sol.publish(chain.artifacts)
    assert retained_roots(chain.store, 2) == {root(S[3]), root(S[4]), root(S[6])}

    dropped = prune(chain.store, chain.artifacts, 2, protect=[root(protected)])

    kept = [S[3], S[4], S[6], protected]
    gone = [S[0], S[1], S[2], S[5], unreferenced]
    assert dropped == sum(len(sol.tensors) for sol in gone)
    assert all(chain.kept_whole(sol) for sol in kept)
    assert all(chain.stored(sol) == [] and chain.lost_checkpoints_only(sol) for sol in gone)
    assert sorted(chain.artifacts.checkpoint_roots()) == sorted(root(s) for s in kept)
    assert prune(chain.store, chain.artifacts, 2, protect=[root(protected)]) == 0  # again: no-op

    chain.mine(S[9])  # the window moves on: block 4's proof falls out of it
    assert prune(chain.store, chain.artifacts, 2) == len(S[3].tensors) + len(protected.tensors)
    assert chain.stored(S[3]) == [] and chain.stored(protected) == []
    assert chain.kept_whole(S[4]) and chain.kept_whole(S[6])


def test_prune_never_drops_this_nodes_own_work(chain):
    """A miner keeps its own checkpoints for good: after a partition deeper than the
    window, the others can verify its side of the fork only from it."""
    for sol in S[:3]:
        chain.mine(sol)
        sol.publish(chain.artifacts)
    chain.artifacts.keep_own(root(S[0]))  # block 1, out of a one-block window
    chain.artifacts.keep_own(root(S[7]))  # a side block of ours, say: on no chain here
    S[7].publish(chain.artifacts)
    assert prune(chain.store, chain.artifacts, 1) == len(S[1].tensors)
    assert chain.kept_whole(S[0]) and chain.kept_whole(S[7]) and chain.kept_whole(S[2])
    assert chain.stored(S[1]) == []
    assert sorted(chain.artifacts.own_roots()) == sorted([root(S[0]), root(S[7])])


def test_prune_counts_blocks_not_proofs_and_never_reaches_genesis(chain):
    chain.mine(S[0], mtxs=(S[1], S[2]))
    chain.mine(S[3])
    for sol in S[:4]:
        sol.publish(chain.artifacts)
    assert prune(chain.store, chain.artifacts, 1) == sum(len(s.tensors) for s in S[:3])
    assert chain.kept_whole(S[3])
    # a window longer than the chain keeps all of it (and asks nothing of genesis)
    S[0].publish(chain.artifacts)
    assert prune(chain.store, chain.artifacts, 100) == 0 and chain.kept_whole(S[0])


def test_prune_keeps_valid_side_blocks_in_the_window_only(chain):
    one = chain.mine(S[0])
    main_two = chain.mine(S[1])
    side_two = chain.mine(S[2], parent_id=one)  # seen second: stays off the main chain
    chain.mine(S[3])
    assert chain.store.is_main_chain(main_two) and not chain.store.is_main_chain(side_two)
    for sol in S[:4]:
        sol.publish(chain.artifacts)

    assert prune(chain.store, chain.artifacts, 2) == len(S[0].tensors)  # heights 2..3
    assert chain.kept_whole(S[2])  # so a reorganisation onto it finds them here
    assert prune(chain.store, chain.artifacts, 1) == len(S[1].tensors) + len(S[2].tensors)
    assert chain.kept_whole(S[3])

    S[2].publish(chain.artifacts)
    chain.store.invalidate_block(side_two)
    assert chain.store.get_entry(side_two).status == STATUS_INVALID
    assert root(S[2]) not in retained_roots(chain.store, 3)
    assert prune(chain.store, chain.artifacts, 3) == len(S[2].tensors)


@pytest.mark.parametrize("keep", [0, -1])
def test_a_window_of_no_blocks_is_refused_and_drops_nothing(chain, keep):
    chain.mine(S[0])
    S[0].publish(chain.artifacts)
    with pytest.raises(ValueError, match="keep must be at least 1"):
        prune(chain.store, chain.artifacts, keep)
    with pytest.raises(ValueError, match="keep must be at least 1"):
        missing(chain.store, chain.artifacts, keep)
    assert chain.kept_whole(S[0])


# ---- missing --------------------------------------------------------------------------

def test_missing_names_histories_first_then_absent_checkpoints_newest_block_first(chain):
    old, partial, headless, complete, older_partial = S[0], S[5], S[1], S[2], S[3]
    chain.mine(old)  # out of a 3-block window: nothing asked for it
    chain.mine(older_partial)
    chain.mine(partial)  # 5 checkpoints; 0 and 2 here
    chain.mine(headless, mtxs=(complete,))  # no history here; all of complete's
    a = chain.artifacts
    for sol, indexes in ((partial, (0, 2)), (older_partial, (1,))):
        a.add_history(root(sol), sol.history)
        for i in indexes:
            a.add_checkpoint(root(sol), sol.checkpoint(i))
    complete.publish(a)

    assert len(partial.tensors) == 5 and len(older_partial.tensors) == 3
    expected = [Need("history", root(headless)),
                Need("checkpoint", root(partial), 1), Need("checkpoint", root(partial), 3),
                Need("checkpoint", root(partial), 4),
                Need("checkpoint", root(older_partial), 0),
                Need("checkpoint", root(older_partial), 2)]
    assert missing(chain.store, a, 3) == expected
    for limit in (1, 2, 4, 6, 7):
        assert missing(chain.store, a, 3, limit=limit) == expected[:limit]
    assert missing(chain.store, a, 1) == [Need("history", root(headless))]

    a.add_history(root(headless), headless.history)  # the next round names its checkpoints
    assert missing(chain.store, a, 1) == [Need("checkpoint", root(headless), i)
                                          for i in range(len(headless.tensors))]
    for sol in (headless, partial, older_partial):
        sol.publish(a)
    assert missing(chain.store, a, 3) == []
    assert missing(chain.store, a, 4) == [Need("history", root(old))]


def test_missing_refuses_an_empty_slice(chain):
    chain.mine(S[0])
    with pytest.raises(ValueError, match="limit"):
        missing(chain.store, chain.artifacts, 1, limit=0)


# ---- the artifact store's key-only listings -------------------------------------------

def test_roots_and_indexes_are_read_from_the_keys(chain):
    low, next_to_low, high = Hash(bytes(32)), Hash(bytes(31) + b"\x01"), Hash(b"\xff" * 32)
    db = chain.db.db
    for key_root, index in ((low, 0), (low, 7), (next_to_low, 3), (high, 0),
                            (high, 0xFFFF_FFFF)):
        db.put(schema.checkpoint_key(key_root, index), b"not decoded")
    db.put(schema.history_key(low), b"")  # other tables are not checkpoints
    db.put(schema.model_key(high), b"")
    a = chain.artifacts
    assert a.checkpoint_roots() == [low, next_to_low, high]
    assert a.checkpoint_indexes(low) == [0, 7]
    assert a.checkpoint_indexes(high) == [0, 0xFFFF_FFFF]
    assert a.checkpoint_indexes(Hash(b"\x01" * 32)) == []
    assert a.drop_checkpoints([low, high]) == 4
    assert a.checkpoint_roots() == [next_to_low]
    assert a.drop_checkpoints([]) == 0


# ---- configuration --------------------------------------------------------------------

def load(tmp_path: Path, *argv: str, env: dict[str, str] | None = None,
         file: str | None = None):
    datadir = tmp_path / "data"
    datadir.mkdir(exist_ok=True)
    if file is not None:
        (datadir / "dpodl.toml").write_text(file)
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    return load_config(parser.parse_args(["--datadir", str(datadir), *argv]), env or {})


def test_keep_checkpoints_defaults_and_sources(tmp_path):
    assert load(tmp_path).keep_checkpoints == DEFAULT_KEEP_CHECKPOINTS == 32
    assert load(tmp_path, file="keep_checkpoints = 8\n").keep_checkpoints == 8
    assert load(tmp_path, env={"DPODL_KEEP_CHECKPOINTS": "9"}).keep_checkpoints == 9
    assert load(tmp_path, "--keep-checkpoints", "10", env={"DPODL_KEEP_CHECKPOINTS": "9"},
                file="keep_checkpoints = 8\n").keep_checkpoints == 10
    assert load(tmp_path, "--keep-checkpoints", "1").keep_checkpoints == 1


@pytest.mark.parametrize(("argv", "env", "file", "error"), [
    ((), {}, "keep_checkpoints = 0\n", "keep_checkpoints: 0 blocks is too few, the least is 1"),
    ((), {}, "keep_checkpoints = -3\n", "keep_checkpoints: -3 blocks is too few"),
    ((), {}, 'keep_checkpoints = "8"\n', "expected a number of blocks, got '8'"),
    ((), {}, "keep_checkpoints = true\n", "expected a number of blocks, got True"),
    ((), {}, "keep_checkpoints = 1.5\n", "expected a number of blocks, got 1.5"),
    ((), {"DPODL_KEEP_CHECKPOINTS": "0"}, None,
     "DPODL_KEEP_CHECKPOINTS: 0 blocks is too few"),
    ((), {"DPODL_KEEP_CHECKPOINTS": "-1"}, None,
     "DPODL_KEEP_CHECKPOINTS: '-1' is not a number of blocks"),
    ((), {"DPODL_KEEP_CHECKPOINTS": "lots"}, None, "'lots' is not a number of blocks"),
    (("--keep-checkpoints", "0"), {}, None, "--keep-checkpoints: 0 blocks is too few"),
    (("--keep-checkpoints", "32k"), {}, None,
     "--keep-checkpoints: '32k' is not a number of blocks"),
])
def test_bad_keep_checkpoints_is_a_clear_error(tmp_path, argv, env, file, error):
    with pytest.raises(ConfigError, match=re.escape(error)):
        load(tmp_path, *argv, env=env, file=file)
