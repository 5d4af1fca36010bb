"""Where a verifier finds what a proof commits to: models, histories and checkpoints.

A header carries only hashes; the model, the leaf list and the audited checkpoints are
fetched by content (model_id, ckpt_root), from the local store or, once the P2P layer
asks for them, from the peers that announced the block. Not having them yet is not a
verdict on the block: the engine raises consensus.seal.MissingArtifact, which lists
every Need it found, and the caller fetches them all and retries. Two rounds at most:
the models and the history first, then the audited checkpoints, which only the history
can name.
"""

from typing import Protocol

from consensus.checkpoints import Checkpoint, History
from consensus.encoding import Hash
from consensus.models import ModelBlob


class ArtifactSource(Protocol):
    def get_model(self, model_id: Hash) -> ModelBlob | None: ...

    def get_history(self, ckpt_root: Hash) -> History | None: ...

    def get_checkpoint(self, ckpt_root: Hash, index: int) -> Checkpoint | None: ...


class MemoryArtifacts:
    """Artifacts held in dicts: what a miner just produced, and tests."""

    def __init__(self) -> None:
        self.models: dict[Hash, ModelBlob] = {}
        self.histories: dict[Hash, History] = {}
        self.checkpoints: dict[tuple[Hash, int], Checkpoint] = {}

    def get_model(self, model_id: Hash) -> ModelBlob | None:
        return self.models.get(model_id)

    def get_history(self, ckpt_root: Hash) -> History | None:
        return self.histories.get(ckpt_root)

    def get_checkpoint(self, ckpt_root: Hash, index: int) -> Checkpoint | None:
        return self.checkpoints.get((ckpt_root, index))

    def add_model(self, model_id: Hash, blob: ModelBlob) -> None:
        self.models[model_id] = blob

    def add_history(self, ckpt_root: Hash, history: History) -> None:
        self.histories[ckpt_root] = history

    def add_checkpoint(self, ckpt_root: Hash, checkpoint: Checkpoint) -> None:
        self.checkpoints[(ckpt_root, checkpoint.leaf.index)] = checkpoint
