"""Forgers for the verifier tests: train honestly where a cheater would, then commit
whatever history the cheater wants, signed as the cheater must sign it.

Everything here uses the same Trainer as the miner and the verifier, so the honest
parts of a forged history replay exactly and a rejection is always due to the forgery.
"""

from dataclasses import replace

import numpy as np
import torch

from consensus.blocks import Block, BlockHeader, assemble_block
from consensus.checkpoints import CheckpointLeaf, History, compute_ckpt_root, compute_tensor_hash
from consensus.encoding import Hash
from consensus.keys import PrivateKey
from consensus.models import Arch, ModelBlob, compute_model_id
from consensus.params import DEV, MAX_TARGET
from consensus.proofs import Proof
from consensus.tasks import Task, compute_task_id
from mining.htoa import Draw
from mining.miner import Solution, search_prehash
from mining.trainer import DeviceData, Trainer, build_model, compute_correct, compute_update_norm
from mining.trainer import to_bytes as tensor_bytes

# Every PostHash draw meets t2 on this chain, so a forger needs no luck after PreHash.
EASY = replace(DEV, t2_genesis=MAX_TARGET)
TASK = DEV.genesis_task

State = tuple[np.ndarray, np.ndarray]  # (params, momentum), flat float32


def find_nonce(prev_id: Hash, miner: bytes, *, task: Task = TASK, ref: bytes = b"",
               t1: int = DEV.t1, start: int = 0) -> tuple[int, Hash]:
    """The first nonce from `start` whose PreHash meets t1, with its h1."""
    found = search_prehash(prev_id, compute_task_id(task), ref, miner, t1, start, 1 << 24)
    assert found is not None, "no PreHash solution in 2^24 nonces"
    return found


def train(draw: Draw, data: DeviceData, start: State, start_step: int, intervals: int,
          k: int = TASK.k) -> list[State]:
    """The checkpoints after each of `intervals` honest intervals of `draw` from `start`."""
    trainer = Trainer(draw, data)
    trainer.load(*start)
    out = []
    for i in range(intervals):
        trainer.train(start_step + i * k, k)
        out.append(trainer.snapshot())
    return out


def count_correct(arch: Arch, params: np.ndarray, data: DeviceData) -> int:
    """The validation count of a model, computed without the verifier's code path."""
    model = build_model(arch)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(params.copy()), model.parameters())
    return int(compute_correct(model, data.val_x, data.val_y))


def commit(prev_id: Hash, miner: bytes, nonce: int, arch: Arch, states: list[State],
           data: DeviceData, *, task: Task = TASK, ref: bytes = b"",
           norms: dict[int, int] | None = None, n_correct: int | None = None,
           steps: int | None = None) -> Solution:
    """A solution committing to `states` as checkpoints 0..j and to the last one as an
    `arch` model, exactly as a miner would, except for what the keyword arguments
    override: some leaves' committed update norms, the claimed count, the claimed steps.
    """
    tensors = tuple((tensor_bytes(p), tensor_bytes(m)) for p, m in states)
    leaves = []
    for i, ((p, _), (pb, mb)) in enumerate(zip(states, tensors, strict=True)):
        if norms and i in norms:
            norm = norms[i]
        else:
            norm = 0 if i == 0 else compute_update_norm(states[i - 1][0], p)
        leaves.append(CheckpointLeaf(i, i * task.k, compute_tensor_hash(pb),
                                     compute_tensor_hash(mb), norm))
    if n_correct is None:
        n_correct = count_correct(arch, states[-1][0], data)
    return commit_leaves(prev_id, miner, nonce, ModelBlob(arch, tensors[-1][0]), leaves, tensors,
                         task=task, ref=ref, n_correct=n_correct,
                         steps=(len(states) - 1) * task.k if steps is None else steps)


def commit_leaves(prev_id: Hash, miner: bytes, nonce: int, model: ModelBlob,
                  leaves: list[CheckpointLeaf], tensors: tuple[tuple[bytes, bytes], ...], *,
                  n_correct: int, steps: int, task: Task = TASK, ref: bytes = b"") -> Solution:
    """A solution over an arbitrary model file and leaf list (tensors served as given)."""
    proof = Proof(compute_task_id(task), ref, miner, nonce, steps, n_correct,
                  compute_model_id(model.arch, model.params), compute_ckpt_root(leaves))
    return Solution("block", prev_id, proof, model, History(tuple(leaves)), tensors)


def sign_block(parent: BlockHeader, solution: Solution, key: PrivateKey, *,
               target: int | None = None, timestamp: int | None = None,
               txs: tuple = ()) -> Block:
    """The block a forger broadcasts: its header signed with its own key."""
    return assemble_block(parent, parent.timestamp + 5 if timestamp is None else timestamp,
                          parent.target if target is None else target, solution.proof, txs,
                          key)


def stamp(draw: Draw, params: np.ndarray) -> np.ndarray:
    """`params` carrying `draw`'s watermark, as a forger re-stamps a foreign model."""
    return draw.signature.sign_array(params)
