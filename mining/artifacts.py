"""Where a verifier finds what a proof commits to: models, histories and checkpoints.

A header carries only hashes; the model, the leaf list and the audited checkpoints are
fetched by content (model_id, ckpt_root), from the local store or, once the P2P layer
asks for them, from the peers that announced the block. Not having them yet is not a
verdict on the block: the engine raises MissingArtifact, which lists every Need it
found, and the caller fetches them all and retries. Two rounds at most: the models and
the history first, then the audited checkpoints, which only the history can name.
"""

from dataclasses import dataclass
from typing import Protocol

from consensus.checkpoints import Checkpoint, History
from consensus.encoding import Hash
from consensus.models import ModelBlob


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
