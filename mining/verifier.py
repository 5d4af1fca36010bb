"""The D-PoDL seal engine: the reference verifier of PROTOCOL.md §8, steps 3–8.

Cheap checks run first (PreHash, PostHash, step count, the committed history's shape,
the initial weights, the final model and its watermark), then one validation pass, then
the replay audits: the last interval, the interval with the largest committed update
norm, and `q_local` intervals drawn from the verifier's own secret randomness. A forged
interval found by a private audit raises `FraudFound`, which carries the fraud proof
(§8.8) that convinces any other node by the replay of that one interval.

What the checks need but this node lacks is asked for in two rounds, each one
`MissingArtifact` listing everything missing or corrupt at that point, so that a caller
that fetches and retries needs at most two round trips:
1. after the hash checks: the reference model (if any), the history and the final model;
2. after the history and final model checks: both ends of every audited interval, which
   only the history names. The validation pass, the one expensive check before the
   replays, runs only once they are all here, so a retry never redoes it.
The private intervals are drawn once per subject (block or transaction id) and kept
until that subject's validation reaches a verdict: redrawn on every retry, they would
let a cheater that withholds the checkpoints of its forged intervals wait for a draw
that misses them. Seeing which checkpoints a verifier asks for tells a cheater which
intervals it audits, but only after its ckpt_root has committed every one of them.

A proof that passed is remembered (Bitcoin Core's signature cache): a block retried after
each round of fetching does not verify again the proofs that passed on an earlier try, and
a model transaction the mempool verified is not verified again in a block (at the same
target). Only complete passes are: a MissingArtifact is no verdict, and a rejection is
the caller's to act on.
So a subject's private audits are drawn once per verifier and not again when the subject
comes back (a retry, a relay from another peer), which is the point: the draw is one
sample a cheater cannot predict, the plans above already hold it across retries, and a
redraw on resubmission would count on somebody resubmitting, which a cheater need not do.
A fraud proof that holds makes the engine forget every pass of the proof it convicts.

Choices where PROTOCOL.md is silent, made here:
- A replay compares the momentum buffers as well as the parameters, each within
  `delta_ppm` of the committed parameters' norm (the momentum's error weighted by
  lr/(1 − μ), the displacement it causes: compute_replay_distance). Momentum is state
  the next interval starts from: unchecked, a forger could commit honest parameters
  with a fabricated momentum that carries the next, honestly replayable, interval to any
  weights it likes; bounded so, it buys no more than a parameter error of delta_ppm.
- An audited interval's committed update norm must match the norm of its two
  committed checkpoints (within the same relative tolerance, plus one fixed-point
  unit), so a forger cannot hide a jump from the largest-update audit by understating
  it, except in intervals nobody audits: those are the private audits' job.
"""

import math
import random
import secrets
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from consensus.blocks import BlockHeader, compute_block_id
from consensus.checkpoints import (
    NORM_SCALE,
    Checkpoint,
    CheckpointLeaf,
    FraudProof,
    History,
    compute_ckpt_root,
    compute_tensor_hash,
    leaf_bytes,
)
from consensus.encoding import Hash
from consensus.errors import ConsensusError
from consensus.merkle import check_proof
from consensus.models import ModelBlob, check_arch_in_space, check_params_fit, compute_model_id
from consensus.params import ChainParams
from consensus.proofs import Proof, check_target, compute_posthash, compute_prehash
from consensus.seal import MissingArtifact, Need
from consensus.tasks import Task, compute_task_id
from consensus.transactions import ModelTx, compute_tx_id
from mining.artifacts import ArtifactSource
from mining.htoa import Draw, Hpp, compute_htoa
from mining.replay import InlineReplayer, Replayer, Snapshot
from mining.trainer import DataCache, compute_update_norm, from_bytes, to_bytes

DEFAULT_Q_LOCAL = 2
# Subjects whose private audit choice is kept while their checkpoints are being fetched;
# past this, the least recently retried subject's choice is dropped (and redrawn if it
# comes back). A subject gets here only after its PreHash and its history and final
# model checks passed, so filling this takes real work.
MAX_PLANS = 1024
# Proofs that passed, remembered by (subject id, task id, target); past this, the least
# recently asked about is dropped and, if it comes back, verified again.
MAX_PASSED = 4096


class Verdict(Enum):
    """What replaying a fraud proof's interval shows."""

    HOLDS = "holds"  # the interval does not replay: the accused is convicted
    REFUTED = "refuted"  # bad paths or data, or it replays well within delta: the accuser erred
    # It replays, but in the outer half of delta: another device's rounding could have
    # pushed the accuser's replay past delta, so neither side is to blame.
    INCONCLUSIVE = "inconclusive"


class FraudFound(ConsensusError):
    """A private audit caught a forged interval; `proof` shows it to everyone else, and
    `ckpt_root` is the root of the history it is about."""

    def __init__(self, detail: str, proof: FraudProof, ckpt_root: Hash) -> None:
        super().__init__("bad-replay", detail)
        self.proof, self.ckpt_root = proof, ckpt_root


@dataclass(frozen=True, slots=True)
class _Subject:
    """What is being verified: a block's or a model transaction's proof, and its id."""

    owner_id: Hash
    prev_id: Hash
    proof: Proof


def _check_tensors(ckpt: Checkpoint) -> bool:
    """True when a served checkpoint's tensors are the ones its leaf commits to. A
    mismatch says the copy is bad, not the miner: the tensors' hashes are in the leaf."""
    return (compute_tensor_hash(ckpt.params) == ckpt.leaf.params_hash
            and compute_tensor_hash(ckpt.momentum) == ckpt.leaf.momentum_hash)


def _check_committed(ckpt: Checkpoint, root: Hash, leaves: tuple[CheckpointLeaf, ...],
                     index: int) -> bool:
    """True when a served checkpoint is the one `root` commits to at `index`: its leaf is
    the history's, its path leads to the root, and its tensors are the leaf's."""
    return (ckpt.leaf == leaves[index] and _check_tensors(ckpt)
            and check_proof(root, leaf_bytes(ckpt.leaf), index, len(leaves), ckpt.path))


def compute_relative_distance(replayed: np.ndarray, committed: np.ndarray,
                              reference: np.ndarray | None = None) -> float:
    """||replayed − committed||₂ / ||reference||₂ (reference: committed) in float64,
    0 when both norms are zero."""
    diff = replayed.astype(np.float64) - committed.astype(np.float64)
    ref = committed if reference is None else reference
    norm = float(np.sqrt(np.dot(ref.astype(np.float64), ref.astype(np.float64))))
    dist = float(np.sqrt(np.dot(diff, diff)))
    if norm == 0.0:
        return 0.0 if dist == 0.0 else math.inf
    return dist / norm


def compute_replay_distance(hpp: Hpp, replayed: tuple[np.ndarray, np.ndarray],
                            committed: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """How far a replayed (params, momentum) lands from the committed pair, both as
    fractions of the committed parameters' norm.

    The momentum's error counts by the parameter displacement it causes: a buffer off by
    e moves the parameters by lr·e/(1 − μ) over the steps that follow. Measured against
    the buffer's own norm instead, honest replays across devices of late, noisy
    intervals differ by percents (docs/benchmarks.md) while the parameters agree to ppm.
    """
    (rp, rm), (p1, m1) = replayed, committed
    carry = hpp.lr / (1.0 - hpp.momentum)
    return (compute_relative_distance(rp, p1),
            carry * compute_relative_distance(rm, m1, reference=p1))


class DPoDLEngine:
    """Verifies D-PoDL proofs; implements consensus.seal.SealEngine.

    `rng` picks the private audits; by default it is the operating system's secret
    randomness, which is the point: a cheater cannot predict which intervals it hits.
    """

    def __init__(self, artifacts: ArtifactSource, data: DataCache, *,
                 q_local: int = DEFAULT_Q_LOCAL, device: torch.device | str = "cpu",
                 rng: random.Random | None = None, replayer: Replayer | None = None) -> None:
        if q_local < 0:
            raise ValueError("q_local must be non-negative")
        self.artifacts, self.q_local = artifacts, q_local
        # Where the training runs (mining/replay.py); by default on the calling thread.
        self.replayer = replayer or InlineReplayer(data, device)
        self.rng = rng or secrets.SystemRandom()
        # owner_id -> its private intervals, least recently used first; a lock because
        # a node may verify blocks and transactions on several executor threads.
        self._plans: OrderedDict[Hash, tuple[int, ...]] = OrderedDict()
        self._plans_lock = threading.Lock()
        # (subject id, task id, target) -> the subject's (prev_id, proof), for every proof
        # that passed, least recently used first; the value finds them for a fraud proof.
        self._passed: OrderedDict[tuple[Hash, Hash, int], tuple[Hash, Proof]] = OrderedDict()
        self._passed_lock = threading.Lock()

    # -- the SealEngine interface --------------------------------------------------------

    def validate_block_seal(self, params: ChainParams, header: BlockHeader, task: Task) -> None:
        subject = _Subject(compute_block_id(header), header.prev_id, header.proof)
        self._validate(params, subject, task, header.target)

    def validate_mtx_seal(self, params: ChainParams, tx: ModelTx, task: Task,
                          target: int) -> None:
        self._validate(params, _Subject(compute_tx_id(tx), tx.prev_id, tx.proof), task, target)

    # -- fraud proofs ----------------------------------------------------------------------

    def check_fraud_proof(self, params: ChainParams, prev_id: Hash, proof: Proof, task: Task,
                          fraud: FraudProof) -> Verdict:
        """Whether `fraud` proves that `proof`'s history has a forged interval.

        Both checkpoints must be committed by the proof's ckpt_root (Merkle paths) and
        consecutive; the interval is then replayed. A fraud proof with bad paths, or whose
        interval replays within half of delta (ten times the worst honest cross-device
        distance measured at k ≤ CNN_K_MAX), is REFUTED: the accuser, not the accused, is
        wrong. One that replays in delta's outer half is INCONCLUSIVE.
        """
        start, end = fraud.start, fraud.end
        j = proof.steps // task.k
        if proof.steps % task.k or j < 1 or end.leaf.index != start.leaf.index + 1:
            return Verdict.REFUTED
        for ckpt in (start, end):
            if not (ckpt.leaf.index <= j
                    and check_proof(proof.ckpt_root, leaf_bytes(ckpt.leaf), ckpt.leaf.index,
                                    j + 1, ckpt.path)
                    and _check_tensors(ckpt)):
                return Verdict.REFUTED  # the accuser's data is not what the miner committed
        needs: list[Need] = []
        try:
            ref = self._reference(proof, task, needs)
            if needs:
                raise MissingArtifact(*needs)
            h1 = compute_prehash(prev_id, proof)
            draw = compute_htoa(task, h1, ref)
            distance_ppm = self._finish_audit(task, draw, end,
                                              self._start_audit(task, draw, start, end))
        except ConsensusError:
            self._forget_passes(prev_id, proof)
            return Verdict.HOLDS
        return Verdict.INCONCLUSIVE if 2 * distance_ppm > task.delta_ppm else Verdict.REFUTED

    # -- the checks ------------------------------------------------------------------------

    def _validate(self, params: ChainParams, subject: _Subject, task: Task, target: int) -> None:
        # The subject id commits to prev_id and every proof field, the task id among them;
        # the task id is in the key as well because the verdict is on `task`, the argument,
        # so a caller asking about another task gets an answer, not a remembered pass. The
        # target is not committed: an mtx is checked against the target of each block that
        # includes it. The chain's params are not either: an engine serves one chain.
        key = (subject.owner_id, compute_task_id(task), target)
        if self._check_passed(key):
            return
        proof = subject.proof
        h1 = compute_prehash(subject.prev_id, proof)
        if not check_target(h1, params.t1):
            raise ConsensusError("bad-prehash", f"h1 {h1.hex()} above t1")
        if not check_target(compute_posthash(h1, proof.steps, proof.n_correct), target):
            raise ConsensusError("bad-posthash", "h2 above the target")
        if proof.steps % task.k or not task.k <= proof.steps <= task.s_max:
            raise ConsensusError("bad-steps", f"{proof.steps} steps, k={task.k}")
        if proof.n_correct > task.dataset.val_size:
            raise ConsensusError("bad-n-correct", f"{proof.n_correct} > validation size")
        needs: list[Need] = []  # round 1: everything the checks before the replays read
        ref = self._reference(proof, task, needs)
        leaves = self._get_history(proof.ckpt_root, needs)
        model = self._get_model(proof.model_id, needs)
        if leaves is None or model is None or needs:
            raise MissingArtifact(*dict.fromkeys(needs))  # once, were ref and model one
        draw = compute_htoa(task, h1, ref)
        self._validate_history(proof, task, draw, leaves)
        self._validate_final_model(draw, leaves[-1], model)
        public, private = self._plan(subject.owner_id, leaves)
        # Round 2; a MissingArtifact here keeps the plan, so the retry asks for no more.
        ckpts = self._get_checkpoints(subject, leaves, public + private)
        try:
            self._run_audits(subject, task, draw, model, public, private, ckpts)
        except ConsensusError:
            self._forget(subject.owner_id)
            raise
        self._forget(subject.owner_id)
        self._record_pass(key, subject)

    def _get_model(self, model_id: Hash, needs: list[Need]) -> ModelBlob | None:
        """The model file with this id, or None, noted in `needs`, if absent or corrupt."""
        blob = self.artifacts.get_model(model_id)
        if blob is None or compute_model_id(blob.arch, blob.params) != model_id:
            needs.append(Need("model", model_id))  # absent, or a corrupt copy: refetch
            return None
        return blob

    def _get_history(self, ckpt_root: Hash, needs: list[Need]
                     ) -> tuple[CheckpointLeaf, ...] | None:
        """The leaf list ckpt_root commits to, or None, noted in `needs`, if absent or
        corrupt."""
        history: History | None = self.artifacts.get_history(ckpt_root)
        if history is None or compute_ckpt_root(history.leaves) != ckpt_root:
            needs.append(Need("history", ckpt_root))  # absent, or a corrupt copy: refetch
            return None
        return history.leaves

    def _reference(self, proof: Proof, task: Task, needs: list[Need]) -> ModelBlob | None:
        """The reference model's file, checked against its id and the task's space; None
        when the proof has none, or when it is missing (noted in `needs`).

        Whether the reference is on this chain and within the window is the state's
        rule (state.validate_proof_rules); this only needs its weights. A reference at
        hand is judged at once: a bad one condemns the block without fetching the rest.
        """
        if not proof.ref_model:
            return None
        blob = self._get_model(Hash(proof.ref_model), needs)
        if blob is None:
            return None
        if not check_arch_in_space(blob.arch, task):
            raise ConsensusError("bad-ref-arch", "the reference is not an architecture "
                                                 "of this task")
        if not check_params_fit(blob):
            raise ConsensusError("bad-ref-model", "the reference's parameters do not fit "
                                                  "its architecture")
        return blob

    def _validate_history(self, proof: Proof, task: Task, draw: Draw,
                          leaves: tuple[CheckpointLeaf, ...]) -> None:
        """The committed leaf list is complete, in order, and starts at HtoA's init."""
        j = proof.steps // task.k
        if len(leaves) != j + 1:
            raise ConsensusError("bad-ckpt-count", f"{len(leaves)} leaves for {proof.steps} "
                                                   f"steps at k={task.k}")
        for i, leaf in enumerate(leaves):
            if leaf.index != i or leaf.steps != i * task.k:
                raise ConsensusError("bad-ckpt-leaf", f"leaf {i} claims index {leaf.index}, "
                                                      f"steps {leaf.steps}")
        zeros = to_bytes(np.zeros_like(draw.init))
        first = leaves[0]
        if (first.params_hash != compute_tensor_hash(to_bytes(draw.init))
                or first.momentum_hash != compute_tensor_hash(zeros) or first.update_norm):
            raise ConsensusError("bad-init", "checkpoint 0 is not HtoA's watermarked init")

    def _validate_final_model(self, draw: Draw, last: CheckpointLeaf, model: ModelBlob) -> None:
        """The model file is HtoA's architecture, the last checkpoint, and watermarked."""
        if model.arch != draw.arch:
            raise ConsensusError("bad-arch", "the model is not HtoA's architecture")
        if not check_params_fit(model):
            raise ConsensusError("bad-model-size", "the model's parameters do not fit "
                                                   "its architecture")
        if compute_tensor_hash(model.params) != last.params_hash:
            raise ConsensusError("bad-model-ckpt", "the model is not the last checkpoint")
        if not draw.signature.verify_array(from_bytes(model.params)):
            raise ConsensusError("bad-watermark", "the model does not carry its watermark")

    def _check_recount(self, proof: Proof, task: Task, recount: int) -> None:
        if abs(recount - proof.n_correct) > task.eps_correct:
            raise ConsensusError("bad-n-correct", f"claimed {proof.n_correct}, recounted "
                                                  f"{recount}, eps {task.eps_correct}")

    def audit_needs(self, owner_id: Hash, ckpt_root: Hash) -> list[Need]:
        """The checkpoints this engine's audits of `owner_id` will read and that are not
        here yet, known as soon as its history is (the private draw is made now and kept
        for the validation), so a node can fetch them while it checks something else.
        Empty without the history, or for one too short to audit."""
        history: History | None = self.artifacts.get_history(ckpt_root)
        if history is None or len(history.leaves) < 2:
            return []
        public, private = self._plan(owner_id, history.leaves)
        indices = sorted({i for interval in (*public, *private) for i in (interval, interval + 1)})
        return [Need("checkpoint", ckpt_root, i) for i in indices
                if self.artifacts.get_checkpoint(ckpt_root, i) is None]

    def _plan(self, owner_id: Hash, leaves: tuple[CheckpointLeaf, ...]
              ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The intervals to replay: (public, private). Public: the last and the largest
        committed update. Private: q_local others, drawn secretly on this subject's first
        attempt and reused by its retries.

        Interval i runs from checkpoint i to i + 1; leaf i + 1 carries its update norm.
        """
        j = len(leaves) - 1
        last = j - 1
        largest = max(range(j), key=lambda i: (leaves[i + 1].update_norm, -i))
        public = tuple(sorted({last, largest}))
        with self._plans_lock:
            private = self._plans.get(owner_id)
            if private is None:
                rest = [i for i in range(j) if i not in public]
                private = tuple(self.rng.sample(rest, min(self.q_local, len(rest))))
                self._plans[owner_id] = private
                if len(self._plans) > MAX_PLANS:
                    self._plans.popitem(last=False)
            else:
                self._plans.move_to_end(owner_id)
        return public, private

    def _forget(self, owner_id: Hash) -> None:
        """Drop a subject's plan: its validation reached a verdict."""
        with self._plans_lock:
            self._plans.pop(owner_id, None)

    def _check_passed(self, key: tuple[Hash, Hash, int]) -> bool:
        """True when this subject passed under this task and target before."""
        with self._passed_lock:
            if key not in self._passed:
                return False
            self._passed.move_to_end(key)
            return True

    def _record_pass(self, key: tuple[Hash, Hash, int], subject: _Subject) -> None:
        """Remember that this subject passed, dropping the least recently used past the
        bound."""
        with self._passed_lock:
            self._passed[key] = (subject.prev_id, subject.proof)
            self._passed.move_to_end(key)
            if len(self._passed) > MAX_PASSED:
                self._passed.popitem(last=False)

    def _forget_passes(self, prev_id: Hash, proof: Proof) -> None:
        """Drop every remembered pass of this proof on this tip, whatever subject carried
        it: a fraud proof showed its history forged. (The fraud proof's owner_id is the
        accuser's word; what was checked is this prev_id and proof.)"""
        with self._passed_lock:
            for key in [k for k, v in self._passed.items() if v == (prev_id, proof)]:
                del self._passed[key]

    def _get_checkpoints(self, subject: _Subject, leaves: tuple[CheckpointLeaf, ...],
                         intervals: tuple[int, ...]) -> dict[int, Checkpoint]:
        """Both ends of every interval in `intervals`, by index, each the committed one;
        MissingArtifact names every one that is absent or not the committed one."""
        root = subject.proof.ckpt_root
        ckpts: dict[int, Checkpoint] = {}
        needs: list[Need] = []
        for index in sorted({i for interval in intervals for i in (interval, interval + 1)}):
            ckpt = self.artifacts.get_checkpoint(root, index)
            if ckpt is None or not _check_committed(ckpt, root, leaves, index):
                needs.append(Need("checkpoint", root, index))  # absent, or a bad copy: refetch
            else:
                ckpts[index] = ckpt
        if needs:
            raise MissingArtifact(*needs)
        return ckpts

    def _run_audits(self, subject: _Subject, task: Task, draw: Draw, model: ModelBlob,
                    public: tuple[int, ...], private: tuple[int, ...],
                    ckpts: dict[int, Checkpoint]) -> None:
        """Start the recount and every replay at once (a replay pool runs them side by
        side), then judge them in order: the recount, the public intervals, the private
        ones. A private audit that fails raises FraudFound with the interval's two
        checkpoints as the proof. Once a verdict is in, replays not yet begun are dropped."""
        recount = self.replayer.count_correct(task, draw, from_bytes(model.params))
        audits = {i: self._start_audit(task, draw, ckpts[i], ckpts[i + 1])
                  for i in public + private}
        try:
            self._check_recount(subject.proof, task, recount.result())
            for i in public:
                self._finish_audit(task, draw, ckpts[i + 1], audits[i])
            for i in private:
                try:
                    self._finish_audit(task, draw, ckpts[i + 1], audits[i])
                except ConsensusError as e:
                    raise FraudFound(f"private audit of interval {i}: {e.reason}: {e.detail}",
                                     FraudProof(subject.owner_id, ckpts[i], ckpts[i + 1]),
                                     subject.proof.ckpt_root) from e
        finally:
            for future in audits.values():
                future.cancel()

    def _start_audit(self, task: Task, draw: Draw, start: Checkpoint, end: Checkpoint
                     ) -> "Future[Snapshot]":
        """Check an interval's ends (their size, their watermarks, the committed update
        norm between them) and start the replay from `start` (PROTOCOL.md §8.7); a check
        that fails is the future's ConsensusError, met when the audit is judged."""
        try:
            p0 = self._interval_start(task, draw, start, end)
        except ConsensusError as e:
            failed: Future[Snapshot] = Future()
            failed.set_exception(e)
            return failed
        return self.replayer.replay(task, draw, start.leaf.steps, p0, from_bytes(start.momentum))

    def _interval_start(self, task: Task, draw: Draw, start: Checkpoint, end: Checkpoint
                        ) -> np.ndarray:
        """The parameters an interval starts from, once its checkpoints pass the checks
        that need no replay."""
        n = len(draw.init) * 4
        for ckpt in (start, end):
            if len(ckpt.params) != n or len(ckpt.momentum) != n:
                raise ConsensusError("bad-ckpt-data", f"checkpoint {ckpt.leaf.index} does not "
                                                      f"fit the architecture")
        p0, p1 = from_bytes(start.params), from_bytes(end.params)
        for index, params in ((start.leaf.index, p0), (end.leaf.index, p1)):
            if not draw.signature.verify_array(params):
                raise ConsensusError("bad-watermark", f"checkpoint {index} lacks the watermark")
        tolerance = task.delta_ppm / 1e6
        committed = end.leaf.update_norm
        if abs(compute_update_norm(p0, p1) - committed) > tolerance * committed + 1:
            raise ConsensusError("bad-update-norm", f"interval {start.leaf.index}: committed "
                                                    f"{committed / NORM_SCALE}")
        return p0

    def _finish_audit(self, task: Task, draw: Draw, end: Checkpoint,
                      replay: "Future[Snapshot]") -> float:
        """How far a replay landed from the interval's committed end, in ppm, within
        delta; raises the audit's ConsensusError."""
        committed = (from_bytes(end.params), from_bytes(end.momentum))
        distance = max(compute_replay_distance(draw.hpp, replay.result(), committed))
        if distance * 1e6 > task.delta_ppm:
            raise ConsensusError("bad-replay", f"interval {end.leaf.index - 1} replays "
                                               f"{distance * 1e6:.1f} ppm away, "
                                               f"delta {task.delta_ppm}")
        return distance * 1e6

    def prepare(self, task: Task) -> None:
        """Load `task`'s dataset where the replays run now rather than at the first replay,
        so that a caller can overlap the loading with the fetching of artifacts."""
        self.replayer.prepare(task)

    def close(self) -> None:
        """Stop the replayer's workers, if any."""
        self.replayer.close()
