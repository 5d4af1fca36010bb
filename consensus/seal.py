"""The seal-engine interface: how a block's proof of work is checked.

The D-PoDL verifier (PreHash, HtoA, watermark, replay audits) implements it; the
no-proof engine accepts any proof so that chain tests can build blocks quickly where
the proof is not the subject. Weight and the accuracy rule are not the engine's: they
apply under every engine (`fork_choice.compute_block_weight`).
"""

from dataclasses import dataclass
from typing import Protocol

from consensus.blocks import BlockHeader
from consensus.encoding import Hash
from consensus.params import ChainParams
from consensus.tasks import Task
from consensus.transactions import ModelTx


@dataclass(frozen=True, slots=True)
class Need:
    """One artifact to fetch: a "model" by model_id, a "history" by ckpt_root, or a
    "checkpoint" by ckpt_root and index."""

    kind: str
    key: Hash
    index: int | None = None

    def __str__(self) -> str:
        where = self.key.hex() if self.index is None else f"{self.key.hex()} #{self.index}"
        return f"{self.kind} {where}"


class MissingArtifact(Exception):
    """Artifacts a verification needs are not available here (yet), or the copies here
    are not the committed ones; `needs` lists all of them that this round could name."""

    def __init__(self, *needs: Need) -> None:
        if not needs:
            raise ValueError("MissingArtifact needs at least one Need")
        super().__init__(*needs)  # args are the needs, so it pickles (process executors)
        self.needs: tuple[Need, ...] = needs

    def __str__(self) -> str:
        return ", ".join(f"missing {need}" for need in self.needs)


class SealEngine(Protocol):
    def validate_block_seal(self, params: ChainParams, header: BlockHeader, task: Task) -> None:
        """Raise ConsensusError unless the header's proof is valid work for `task`."""

    def validate_mtx_seal(self, params: ChainParams, tx: ModelTx, task: Task,
                          target: int) -> None:
        """Raise ConsensusError unless the model transaction's proof meets `target`."""


class NoProofEngine:
    """Accepts every proof. For chain tests and benchmarks only; never for a real chain."""

    def validate_block_seal(self, params: ChainParams, header: BlockHeader, task: Task) -> None:
        return None

    def validate_mtx_seal(self, params: ChainParams, tx: ModelTx, task: Task,
                          target: int) -> None:
        return None
