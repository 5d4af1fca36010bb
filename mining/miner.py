"""The D-PoDL miner: PreHash search, HtoA, training, PostHash at every checkpoint (§3–§7).

`mine` is a generator: it yields a model transaction when a checkpoint meets the easier
target, and a block when one meets t2, then returns. It checks `stop` between PreHash
batches and between checkpoint intervals, so a caller told of a new tip stops it within
one interval and starts a new job on the new tip.
"""

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol

import msgpack
import numpy as np
import torch

from consensus.checkpoints import (
    Checkpoint,
    CheckpointLeaf,
    History,
    compute_ckpt_root,
    compute_tensor_hash,
    leaf_bytes,
)
from consensus.encoding import Hash
from consensus.merkle import compute_proof
from consensus.models import ModelBlob, compute_model_id
from consensus.params import ChainParams
from consensus.proofs import Proof, check_target, compute_posthash
from consensus.tasks import Task, compute_task_id
from mining.htoa import compute_htoa
from mining.trainer import DeviceData, Snapshot, Trainer, compute_update_norm, to_bytes

PREHASH_BATCH = 4096  # nonces between two looks at `stop`: about 5 ms
U64_LIMIT = 1 << 64


@dataclass(frozen=True, slots=True)
class Reference:
    """A model of the chain to start from: its id, file and total training steps."""

    model_id: Hash
    blob: ModelBlob
    total_steps: int


@dataclass(frozen=True, slots=True)
class Job:
    """What to mine on: the tip, the active task, the targets and the miner's key."""

    params: ChainParams
    prev_id: Hash
    task: Task
    t2: int
    t2_mtx: int
    miner: bytes  # public key
    reference: Reference | None = None

    @property
    def block_floor(self) -> int:
        """The least validation count of a block under the chain's fork rule (§9)."""
        return self.task.t_acc if self.params.fork_rule == "longest" else self.task.t_min


class ArtifactSink(Protocol):
    def add_model(self, model_id: Hash, blob: ModelBlob) -> None: ...

    def add_history(self, ckpt_root: Hash, history: History) -> None: ...

    def add_checkpoint(self, ckpt_root: Hash, checkpoint: Checkpoint) -> None: ...


@dataclass(frozen=True, slots=True, eq=False)
class Solution:
    """A proof that met a target, with the model and history it commits to."""

    kind: Literal["block", "mtx"]
    prev_id: Hash
    proof: Proof
    model: ModelBlob
    history: History
    tensors: tuple[tuple[bytes, bytes], ...]  # (params, momentum) of checkpoints 0..j

    def checkpoint(self, index: int) -> Checkpoint:
        """Checkpoint `index` with its Merkle path, as served to an auditor."""
        leaves = [leaf_bytes(leaf) for leaf in self.history.leaves]
        params, momentum = self.tensors[index]
        return Checkpoint(self.history.leaves[index], compute_proof(leaves, index),
                          params, momentum)

    def publish(self, sink: ArtifactSink) -> None:
        """Hand the model, the leaf list and every checkpoint to `sink`."""
        root = self.proof.ckpt_root
        sink.add_model(self.proof.model_id, self.model)
        sink.add_history(root, self.history)
        for index in range(len(self.tensors)):
            sink.add_checkpoint(root, self.checkpoint(index))


def search_prehash(prev_id: Hash, task_id: Hash, ref_model: bytes, miner: bytes, t1: int,
                   nonce: int, count: int) -> tuple[int, Hash] | None:
    """The first nonce in [nonce, nonce + count) whose h1 meets t1, with h1.

    Computes exactly `proofs.compute_prehash`: the nonce is the last item of the hashed
    list, so the encoding of everything before it is hashed once and each try only
    appends the nonce's msgpack bytes to a copy of that SHA-256 state.
    """
    head = msgpack.packb(("dpodl/prehash", prev_id, task_id, ref_model, miner, 0))[:-1]
    base = hashlib.sha256(head)
    limit = t1.to_bytes(32, "big")
    pack = msgpack.packb
    for n in range(nonce, min(nonce + count, U64_LIMIT)):
        h = base.copy()
        h.update(pack(n))
        digest = h.digest()
        if digest <= limit:  # big-endian bytes of equal length compare as integers
            return n, Hash(digest)
    return None


def _seal(snapshot: Snapshot, previous: np.ndarray, index: int, steps: int
          ) -> tuple[CheckpointLeaf, bytes, bytes, np.ndarray, int | None]:
    """Wait for a captured checkpoint and commit to it: its leaf, tensor bytes and count."""
    params, momentum, n_correct = snapshot.wait()
    params_b, momentum_b = to_bytes(params), to_bytes(momentum)
    leaf = CheckpointLeaf(index, steps, compute_tensor_hash(params_b),
                          compute_tensor_hash(momentum_b), compute_update_norm(previous, params))
    return leaf, params_b, momentum_b, params, n_correct


def mine(job: Job, data: DeviceData, stop: Callable[[], bool], *, nonce: int = 0,
         device: torch.device | str = "cpu",
         progress: Callable[[Hash, int, int | None], None] | None = None
         ) -> Iterator[Solution]:
    """Mine on `job` until a block is found (yielded last) or `stop()` is true.

    Model transactions found on the way are yielded as they come: at most one per
    PreHash draw (our choice: a draw's later checkpoints refine the same run, and one
    reference point per run is enough), and only for models at least t_min accurate,
    since a worse model is no use to reference.

    Checkpoint j is committed (copied out, hashed, its PostHash drawn) while interval
    j + 1 trains, so the device never waits for the host; when j turns out to be a
    block, the one interval trained past it is discarded. `progress(h1, steps,
    n_correct)` hears of every committed checkpoint (n_correct None before s_min).
    """
    task, ref = job.task, job.reference
    task_id = compute_task_id(task)
    ref_id = ref.model_id if ref else b""
    ref_steps = ref.total_steps if ref else 0
    with ThreadPoolExecutor(1, thread_name_prefix="checkpoint") as pool:
        while not stop():
            found = search_prehash(job.prev_id, task_id, ref_id, job.miner, job.params.t1,
                                   nonce, PREHASH_BATCH)
            if found is None:
                nonce += PREHASH_BATCH
                continue
            nonce, h1 = found
            draw = compute_htoa(task, h1, ref.blob if ref else None)
            trainer = Trainer(draw, data, device)
            zeros = to_bytes(np.zeros_like(draw.init))
            init = to_bytes(draw.init)
            leaves = [CheckpointLeaf(0, 0, compute_tensor_hash(init),
                                     compute_tensor_hash(zeros), 0)]
            tensors = [(init, zeros)]
            previous = draw.init
            pending: Future | None = None
            mtx_sent = False
            last = task.s_max // task.k
            for j in range(1, last + 2):
                if j <= last:
                    trainer.train((j - 1) * task.k, task.k)
                    snapshot = trainer.capture(evaluate=j * task.k + ref_steps >= task.s_min)
                if pending is not None:  # commit checkpoint j - 1 while interval j trains
                    leaf, params_b, momentum_b, previous, n_correct = pending.result()
                    leaves.append(leaf)
                    tensors.append((params_b, momentum_b))
                    pending = None
                    if progress is not None:
                        progress(h1, leaf.steps, n_correct)
                    if n_correct is not None:
                        h2 = compute_posthash(h1, leaf.steps, n_correct)
                        is_block = n_correct >= job.block_floor and check_target(h2, job.t2)
                        is_mtx = (not mtx_sent and n_correct >= task.t_min
                                  and check_target(h2, job.t2_mtx))
                        if is_block or is_mtx:
                            proof = Proof(task_id, ref_id, job.miner, nonce, leaf.steps,
                                          n_correct, compute_model_id(draw.arch, params_b),
                                          compute_ckpt_root(leaves))
                            yield Solution("block" if is_block else "mtx", job.prev_id, proof,
                                           ModelBlob(draw.arch, params_b),
                                           History(tuple(leaves)), tuple(tensors))
                            if is_block:
                                return
                            mtx_sent = True
                if j <= last:
                    if stop():
                        return
                    pending = pool.submit(_seal, snapshot, previous, j, j * task.k)
            nonce += 1
