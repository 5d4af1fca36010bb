"""What this node found when it scored a finished task's models (PROTOCOL.md §2).

The test split never enters consensus, so these records are this node's own, like
Core's wallet data: no peer sees them, nothing is checked against them, and a machine
with other rounding may count a test prediction or two differently. A result names the
main-chain block at its span's end; once a reorganisation replaces that block the
result is stale and the span is scored again.
"""

import struct
from dataclasses import dataclass

from consensus.encoding import U32, U64, Address20, Hash, Hash32, encode
from storage import schema
from storage.db import Database, decode_record


@dataclass(frozen=True, slots=True)
class TaskResult:
    """The best block model of one span of a task: M*, what the publisher collects."""

    task_id: Hash32
    start: U64  # the span's first and last heights
    end: U64
    end_block: Hash32  # the main-chain block at `end` when this was scored
    model_id: Hash32
    block_id: Hash32  # the block whose model it is
    height: U64
    miner: Address20
    n_correct: U32  # validation predictions right, as the block's proof states
    test_correct: U32  # test predictions right, as this node counted
    total_steps: U64  # its training history's length: own steps plus the references'
    scored: U32  # block models scored (the span's blocks)
    time: U64  # when it was scored, unix seconds


class ResultStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, start: int) -> TaskResult | None:
        raw = self.db.get(schema.result_key(start))
        return None if raw is None else decode_record(TaskResult, raw, f"result {start}")

    def put(self, result: TaskResult, scores: dict[Hash, int]) -> None:
        """Record a span's result and every block model's test score, in one batch."""
        with self.db.write_batch() as batch:
            for model_id, correct in scores.items():
                batch.put(schema.score_key(model_id), struct.pack(">I", correct))
            batch.put(schema.result_key(result.start), encode(result))

    def score(self, model_id: Hash) -> int | None:
        """A block model's test score, if this node has counted it."""
        raw = self.db.get(schema.score_key(model_id))
        return None if raw is None else struct.unpack(">I", raw)[0]
