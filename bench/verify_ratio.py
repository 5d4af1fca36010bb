"""Verification compute over mining compute for the same block: DPoDLEngine's
validate_block_seal against the whole mine() call that found the block (digits, MNIST)."""

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import mining.miner
from bench.common import add_data_args, resident, start
from consensus.blocks import assemble_block, compute_block_id
from consensus.difficulty import compute_mtx_target
from consensus.encoding import Hash, tagged_hash
from consensus.keys import PrivateKey
from consensus.params import DEV, MAX_TARGET, TESTNET, ChainParams, genesis_block
from consensus.proofs import compute_posthash
from mining.artifacts import MemoryArtifacts
from mining.htoa import draw_hpp
from mining.miner import Job, Solution, mine
from mining.trainer import DataCache, DeviceData
from mining.verifier import DEFAULT_Q_LOCAL, DPoDLEngine

GOAL = 0.05  # verification / mining compute, from the issue
Q_LOCALS = (0, DEFAULT_Q_LOCAL)
VERIFY_REPS = 3  # verifications per block and q_local (median): fresh engine each time


class PostHashLog:
    """Stands in for compute_posthash inside mining.miner and records every PostHash draw
    (h1, steps, n_correct, process CPU time): the miner itself is untouched."""

    def __init__(self) -> None:
        self.draws: list[tuple[Hash, int, int, float]] = []

    def __call__(self, h1: Hash, steps: int, n_correct: int) -> Hash:
        self.draws.append((h1, steps, n_correct, time.process_time()))
        return compute_posthash(h1, steps, n_correct)

    def h1s(self) -> list[Hash]:
        return list(dict.fromkeys(h1 for h1, _, _, _ in self.draws))


def run_mine(job: Job, data: DeviceData, stop: Callable[[PostHashLog], bool]
             ) -> tuple[Solution | None, float, PostHashLog]:
    """mine() to its end: the block (None if stopped), its process CPU time, its log."""
    log = PostHashLog()
    block = None
    with mock.patch.object(mining.miner, "compute_posthash", log):
        t0 = time.process_time()
        for sol in mine(job, data, lambda: stop(log)):
            if sol.kind == "block":
                block = sol
        elapsed = time.process_time() - t0
    return block, elapsed, log


def make_job(params: ChainParams, t2: int, key: PrivateKey) -> Job:
    genesis = genesis_block(params).header
    return Job(params, compute_block_id(genesis), params.genesis_task, t2,
               compute_mtx_target(params, t2), key.pubkey)


def calibrate(params: ChainParams, data: DeviceData, draws: int) -> tuple[float, float, float]:
    """A miner's steady rate with no block to find: eligible PostHash draws (checkpoints
    at or above the block floor) per CPU second, over `draws` whole PreHash draws (s_max
    steps each), timed from the first PostHash of draw 1 to the first of draw draws + 1,
    so PreHash search, HtoA and the steps before s_min are in. Also the eligible share."""
    key = PrivateKey(tagged_hash("bench-verify-calibrate", params.name))
    job = make_job(params, 0, key)  # t2 = t2_mtx = 0: never a block nor an mtx
    _, _, log = run_mine(job, data, lambda log: len(log.h1s()) > draws)
    h1s = log.h1s()
    first = {h1: next(d for d in log.draws if d[0] == h1) for h1 in h1s}
    span = first[h1s[draws]][3] - first[h1s[0]][3]
    counted = [d for d in log.draws if d[0] in h1s[:draws]]
    eligible = sum(n >= job.block_floor for _, _, n, _ in counted)
    return eligible / span, span / draws, eligible / len(counted)


def compute_t2_for(rate: float, block_time: float) -> int:
    """The t2 at which `rate` eligible PostHash draws per second find a block every
    `block_time` seconds on average: each draw succeeds with p = (t2 + 1) / 2^256, so the
    expected time is 1 / (rate · p)."""
    return max(1, min(MAX_TARGET, int(2**256 / (rate * block_time)) - 1))


def audited_intervals(sol: Solution, q_local: int) -> int:
    """How many intervals DPoDLEngine replays for this block (PROTOCOL.md §8.7)."""
    leaves = sol.history.leaves
    j = len(leaves) - 1
    public = {j - 1, max(range(j), key=lambda i: (leaves[i + 1].update_norm, -i))}
    return len(public) + min(q_local, j - len(public))


@dataclass(frozen=True, slots=True)
class BlockRun:
    draws: int
    trained: int  # optimizer steps trained by the whole mine() call
    steps: int  # the block's steps
    n_correct: int
    mine_s: float
    verify_s: dict[int, float]  # q_local -> median process CPU seconds
    structural: dict[int, float]  # q_local -> (audited steps + val pass) / trained


def mine_and_verify(params: ChainParams, cache: DataCache, data: DeviceData, t2: int,
                    index: int, tag: str) -> BlockRun:
    task = params.genesis_task
    key = PrivateKey(tagged_hash("bench-verify", params.name, tag, index))
    job = make_job(params, t2, key)
    sol, mine_s, log = run_mine(job, data, lambda log: False)
    assert sol is not None
    draws = len(log.h1s())
    # Every draw but the last trains to s_max; the last trains one interval past its
    # block checkpoint (committed while the next interval trains), capped at s_max.
    trained = (draws - 1) * task.s_max + min(sol.proof.steps + task.k, task.s_max)
    genesis = genesis_block(params).header
    block = assemble_block(genesis, genesis.timestamp + params.target_block_time, t2,
                           sol.proof, (), key)
    artifacts = MemoryArtifacts()
    sol.publish(artifacts)
    times: dict[int, list[float]] = {q: [] for q in Q_LOCALS}
    for rep in range(VERIFY_REPS):  # interleaved across q_local
        for q in Q_LOCALS:
            engine = DPoDLEngine(artifacts, cache, q_local=q, rng=random.Random(rep))
            t0 = time.process_time()
            engine.validate_block_seal(params, block.header, task)
            times[q].append(time.process_time() - t0)
    # A validation pass counted as forward passes over val_size images, one forward being
    # about a third of a training step's forward + backward on `batch` images.
    val_pass = task.dataset.val_size / (3 * draw_hpp(task, log.h1s()[-1]).batch)
    structural = {q: (task.k * audited_intervals(sol, q) + val_pass) / trained
                  for q in Q_LOCALS}
    return BlockRun(draws, trained, sol.proof.steps, sol.proof.n_correct, mine_s,
                    {q: statistics.median(ts) for q, ts in times.items()}, structural)


def report(label: str, regime: str, t2: int, runs: list[BlockRun],
           expected_mine: float | None) -> dict[int, tuple[float, ...]]:
    """Print the per-block table; per q_local, the median per-block ratio, the aggregate
    ratio (all verification over all mining: block times are exponential, so the median
    block is cheaper than the mean one) and, where the expected mining time is known by
    construction, mean verification over it (steadier than a few exponential draws)."""
    print(f"{label} {regime}: t2 = 2^256/{2**256 / (t2 + 1):.1f}, {len(runs)} blocks")
    print(f"{'block':>6}{'draws':>6}{'trained':>9}{'steps':>7}{'correct':>8}{'mine s':>9}"
          + "".join(f"{f'verify q{q} s':>13}{f'ratio q{q}':>10}{f'struct q{q}':>11}"
                    for q in Q_LOCALS))
    for i, r in enumerate(runs):
        print(f"{i:>6}{r.draws:>6}{r.trained:>9}{r.steps:>7}{r.n_correct:>8}{r.mine_s:>9.2f}"
              + "".join(f"{r.verify_s[q]:>13.3f}{r.verify_s[q] / r.mine_s:>10.4f}"
                        f"{r.structural[q]:>11.4f}" for q in Q_LOCALS))
    out = {}
    for q in Q_LOCALS:
        out[q] = (statistics.median(r.verify_s[q] / r.mine_s for r in runs),
                  sum(r.verify_s[q] for r in runs) / sum(r.mine_s for r in runs))
        if expected_mine is not None:
            out[q] += (statistics.mean(r.verify_s[q] for r in runs) / expected_mine,)
    for name, stat in (("median", statistics.median), ("mean", statistics.mean)):
        print(f"{name:>6}{stat(r.draws for r in runs):>6.1f}{stat(r.trained for r in runs):>9.0f}"
              f"{'':>15}{stat(r.mine_s for r in runs):>9.2f}"
              + "".join(f"{stat(r.verify_s[q] for r in runs):>13.3f}"
                        f"{out[q][name == 'mean']:>10.4f}"
                        f"{stat(r.structural[q] for r in runs):>11.4f}" for q in Q_LOCALS))
    return out



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", default="digits,mnist",
                    help="digits (DEV's genesis task) and/or mnist (TESTNET's)")
    ap.add_argument("--digits-blocks", type=int, default=8, help="blocks per t2 on digits")
    ap.add_argument("--mnist-blocks", type=int, default=3, help="blocks per t2 on MNIST")
    ap.add_argument("--calibrate-draws", type=int, default=None,
                    help="whole PreHash draws timed to measure the miner's PostHash rate "
                         "(default: 10 on digits, 2 on MNIST, about 2 and 15 CPU s)")
    add_data_args(ap, threads=1)
    args = ap.parse_args()
    start("bench.verify_ratio", args)

    cache = DataCache(args.data_dir)
    chains = {"digits": (DEV, args.digits_blocks, 10), "mnist": (TESTNET, args.mnist_blocks, 2)}
    print(f"CPU, {args.threads} torch thread(s), process CPU time (all threads). ratio: "
          f"verify / mine per block; struct: (k x audited intervals + one validation pass "
          f"as val_size / (3 batch) step-equivalents) / steps trained; verify is the median "
          f"of {VERIFY_REPS} fresh engines per q_local; the median row's ratio is the median "
          f"per-block ratio, the mean row's is mean verify / mean mine (aggregate)")
    results = []
    for label in args.tasks.split(","):
        params, n_blocks, calibrate_draws = chains[label]
        calibrate_draws = args.calibrate_draws or calibrate_draws
        task = params.genesis_task
        data = resident(cache, task, label)
        if data is None:
            continue
        rate, per_draw, share = calibrate(params, data, calibrate_draws)
        t2_target = compute_t2_for(rate, params.target_block_time)
        floor = make_job(params, 0, PrivateKey(bytes(32))).block_floor
        print(f"{label}: task k={task.k} s_min={task.s_min} s_max={task.s_max}, block floor "
              f"{floor}/{task.dataset.val_size}; "
              f"calibration over {calibrate_draws} whole draws: {per_draw:.2f} CPU s per "
              f"draw, {100 * share:.0f}% of PostHash draws eligible, {rate:.2f} eligible per "
              f"CPU s -> t2 for one block per {params.target_block_time} s = 2^256/"
              f"{2**256 / (t2_target + 1):.1f}")
        for regime, t2, expected in (
                ("genesis t2", params.t2_genesis, None),
                (f"t2 for {params.target_block_time} s blocks", t2_target,
                 params.target_block_time)):
            runs = [mine_and_verify(params, cache, data, t2, i, regime) for i in range(n_blocks)]
            results.append((label, regime, report(label, regime, t2, runs, expected)))
    print(f"goal: verification / mining <= {GOAL:.2f}")
    print("result: per q_local, the median per-block ratio (the verdict), the aggregate "
          "ratio and, at the calibrated t2, mean verify / target_block_time")
    for label, regime, ratios in results:
        print(f"result {label} at {regime}: "
              + "; ".join(f"q_local={q} {' / '.join(f'{x:.4f}' for x in r)} -> "
                          f"{'met' if r[0] <= GOAL else 'NOT met'}"
                          for q, r in ratios.items()))


if __name__ == "__main__":
    main()
