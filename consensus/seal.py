"""The seal-engine interface: how a block's proof of work is checked.

The D-PoDL verifier (PreHash, HtoA, watermark, replay audits) implements it; the
no-proof engine accepts any proof so that chain tests can build blocks quickly where
the proof is not the subject. Weight and the accuracy rule are not the engine's: they
apply under every engine (`fork_choice.compute_block_weight`).
"""

from typing import Protocol

from consensus.blocks import BlockHeader
from consensus.params import ChainParams
from consensus.tasks import Task
from consensus.transactions import ModelTx


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
