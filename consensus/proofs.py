"""The proof of useful work a block header or model transaction carries (PROTOCOL.md §3, §6).

PreHash binds the work to the tip, the task, the reference model and the miner before
training starts; PostHash draws the lottery from the trained model's validation count.
"""

from dataclasses import dataclass

from consensus.encoding import U32, U64, Hash, Hash32, OptHash32, PubKey32, tagged_hash


@dataclass(frozen=True, slots=True)
class Proof:
    """What the miner claims: the PreHash inputs and the trained model's commitments."""

    task_id: Hash32
    ref_model: OptHash32  # b"" when training started from HtoA's init
    miner: PubKey32
    nonce: U64
    steps: U32  # own optimizer steps, a multiple of the task's k
    n_correct: U32  # correct validation predictions of the final model
    model_id: Hash32
    ckpt_root: Hash32


def compute_prehash(prev_id: Hash, proof: Proof) -> Hash:
    """h1 = H("dpodl/prehash", prev_id, task_id, ref_model, miner, nonce)."""
    return tagged_hash("dpodl/prehash", prev_id, proof.task_id, proof.ref_model,
                       proof.miner, proof.nonce)


def compute_posthash(h1: Hash, steps: int, n_correct: int) -> Hash:
    """h2 = H("dpodl/posthash", h1, steps, n_correct)."""
    return tagged_hash("dpodl/posthash", h1, steps, n_correct)


def check_target(digest: Hash, target: int) -> bool:
    """True when the digest, read as a big-endian integer, is at most `target`."""
    return int.from_bytes(digest, "big") <= target
