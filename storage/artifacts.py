"""Models, training histories and checkpoints on disk, by content (PROTOCOL.md §8).

Everything here is content-addressed (a model by model_id, a history and its
checkpoints by ckpt_root), so a record is checked against its key when it is stored
and cannot be overwritten with something else. The seal engine reads from here
(mining.artifacts.ArtifactSource); the miner and, later, the P2P layer write.
"""

from collections.abc import Iterable
from typing import Any

from consensus.checkpoints import (
    Checkpoint,
    History,
    compute_ckpt_root,
    compute_tensor_hash,
    leaf_bytes,
)
from consensus.encoding import Hash, encode
from consensus.merkle import check_proof
from consensus.models import ModelBlob, compute_model_id
from storage import schema
from storage.db import Database, decode_record


class ArtifactStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add_model(self, model_id: Hash, blob: ModelBlob) -> None:
        if compute_model_id(blob.arch, blob.params) != model_id:
            raise ValueError(f"model {model_id.hex()}: the bytes hash to another id")
        # Not synced on its own (an fsync per model cost the sync ~10%): the block that
        # names it commits in a synced batch, and LevelDB's log is one sequence, so that
        # sync makes this write durable too.
        self.db.db.put(schema.model_key(model_id), encode(blob))

    def get_model(self, model_id: Hash) -> ModelBlob | None:
        return self._get(ModelBlob, schema.model_key(model_id))

    def add_history(self, ckpt_root: Hash, history: History) -> None:
        if compute_ckpt_root(history.leaves) != ckpt_root:
            raise ValueError(f"history {ckpt_root.hex()}: the leaves hash to another root")
        self.db.db.put(schema.history_key(ckpt_root), encode(history))

    def get_history(self, ckpt_root: Hash) -> History | None:
        return self._get(History, schema.history_key(ckpt_root))

    def add_checkpoint(self, ckpt_root: Hash, checkpoint: Checkpoint) -> None:
        """Store a checkpoint whose Merkle path leads to `ckpt_root` and whose tensors are
        the ones its leaf commits to."""
        history = self.get_history(ckpt_root)
        size = len(history.leaves) if history else None
        leaf, index = checkpoint.leaf, checkpoint.leaf.index
        if (size is None
                or not check_proof(ckpt_root, leaf_bytes(leaf), index, size, checkpoint.path)
                or compute_tensor_hash(checkpoint.params) != leaf.params_hash
                or compute_tensor_hash(checkpoint.momentum) != leaf.momentum_hash):
            raise ValueError(f"checkpoint {index} is not committed by {ckpt_root.hex()}")
        self.db.db.put(schema.checkpoint_key(ckpt_root, index), encode(checkpoint))

    def get_checkpoint(self, ckpt_root: Hash, index: int) -> Checkpoint | None:
        return self._get(Checkpoint, schema.checkpoint_key(ckpt_root, index))

    def prune_checkpoints(self, ckpt_root: Hash) -> None:
        """Drop a history's checkpoints (the leaves stay: they are small)."""
        self.drop_checkpoints([ckpt_root])

    # Keys only from here on: a checkpoint is megabytes of tensors, its key 37 bytes.
    # (LevelDB still pages in the block a key sits in; a seek past a root spares the rest.)

    def checkpoint_roots(self) -> list[Hash]:
        """Every ckpt_root with a checkpoint stored, in key order: one seek per root, so
        the checkpoints under a root are not walked."""
        roots = []
        with self.db.db.iterator(prefix=schema.CHECKPOINT, include_value=False) as keys:
            while (key := next(keys, None)) is not None:
                root, _ = schema.split_checkpoint_key(key)
                roots.append(root)
                keys.seek(schema.checkpoint_prefix_end(root))
        return roots

    def keep_own(self, ckpt_root: Hash) -> None:
        """Mark a history as this node's own work: checkpoints are the miner's to store
        and serve (PROTOCOL.md §8), so retention never drops its own."""
        self.db.db.put(schema.own_key(ckpt_root), b"")

    def own_roots(self) -> list[Hash]:
        with self.db.db.iterator(prefix=schema.OWN, include_value=False) as keys:
            return [Hash(key[len(schema.OWN):]) for key in keys]

    def checkpoint_indexes(self, ckpt_root: Hash) -> list[int]:
        """The indexes of a history's stored checkpoints, ascending, read from their keys."""
        with self.db.db.iterator(prefix=schema.checkpoint_prefix(ckpt_root),
                                 include_value=False) as keys:
            return [schema.split_checkpoint_key(key)[1] for key in keys]

    def drop_checkpoints(self, ckpt_roots: Iterable[Hash]) -> int:
        """Drop these histories' checkpoints in one batch (their leaves stay); returns how
        many were dropped."""
        dropped = [schema.checkpoint_key(root, index)
                   for root in ckpt_roots for index in self.checkpoint_indexes(root)]
        if dropped:  # an empty batch would still cost a synced write, on every new tip
            with self.db.write_batch() as batch:
                for key in dropped:
                    batch.delete(key)
        return len(dropped)

    def _get(self, tp: type, key: bytes) -> Any:
        raw = self.db.get(key)
        return None if raw is None else decode_record(tp, raw, f"{tp.__name__} {key.hex()}")
