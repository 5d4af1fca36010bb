"""Honest replay distance: how far a verifier's replay of an honest interval lands from
the miner's committed checkpoint when the two run on different configurations (thread
counts, CPU against GPU, TF32), against the task's delta_ppm (PROTOCOL.md §8.7).

For each case (task) and each training configuration, several HtoA draws are trained as
the miner trains them: checkpoint after every k steps, from checkpoint 0 to the last
interval asked for (by default the whole s_max). An evenly spread set of intervals is
then replayed from its start checkpoint on every replay configuration through the
verifier's own check (DPoDLEngine._start_audit and _finish_audit: watermarks, committed
update norm, replay of k steps, relative L2 distance of parameters and of momentum,
reject above delta_ppm), and the replayed tensors' distances to the committed end
checkpoint are recorded.
"""

import argparse
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import default_data_dir, start
from consensus.checkpoints import Checkpoint, CheckpointLeaf, compute_tensor_hash
from consensus.errors import ConsensusError
from consensus.params import DEV, TESTNET
from consensus.tasks import CNN_K_MAX, FAMILY_CNN, Task
from mining.htoa import compute_htoa
from mining.trainer import DataCache, Trainer, compute_update_norm, to_bytes
from mining.verifier import DPoDLEngine, compute_relative_distance, compute_replay_distance


def cnn_task(task: Task, depth_max: int) -> Task:
    """`task` with its architecture space swapped for small CNNs (3×3 conv, ReLU, pool),
    and k capped as validate_task caps it for CNNs."""
    arch = dataclasses.replace(task.arch, family=FAMILY_CNN, depth_min=1, depth_max=depth_max,
                               width_min=8, width_max=32)
    return dataclasses.replace(task, arch=arch, k=min(task.k, CNN_K_MAX))


CASES: dict[str, Task] = {
    "digits-mlp": DEV.genesis_task,
    "digits-cnn": cnn_task(DEV.genesis_task, 3),
    "mnist-mlp": TESTNET.genesis_task,
    "mnist-cnn": cnn_task(TESTNET.genesis_task, 2),
}


@dataclass(frozen=True, slots=True)
class Config:
    """Where and how a history is trained or replayed."""

    name: str
    device: str
    threads: int  # CPU intra-op threads (torch.set_num_threads)
    matmul_tf32: bool  # torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32: bool  # torch.backends.cudnn.allow_tf32
    deterministic: bool = False  # torch.backends.cudnn.deterministic

    def apply(self) -> None:
        torch.set_num_threads(self.threads)
        torch.backends.cuda.matmul.allow_tf32 = self.matmul_tf32
        torch.backends.cudnn.allow_tf32 = self.cudnn_tf32
        torch.backends.cudnn.deterministic = self.deterministic


def parse_config(text: str, all_threads: int) -> Config:
    """cpu:N (N threads; plain `cpu`: all cores), cuda (the Trainer's own setting: full
    float32), cuda-torch (PyTorch's defaults: cuDNN convolutions in TF32), cuda+tf32 (TF32
    in matmuls too, as a miner chasing speed might set), cuda-det (full float32 and cuDNN's
    deterministic algorithms)."""
    if text == "cpu" or text.startswith("cpu:"):
        threads = int(text[4:]) if text.startswith("cpu:") else all_threads
        return Config(f"cpu:{threads}", "cpu", threads, False, True)
    flags = {"cuda": (False, False), "cuda-torch": (False, True), "cuda+tf32": (True, True),
             "cuda-det": (False, False, True)}
    if text not in flags:
        raise ValueError(f"unknown configuration {text!r}")
    return Config(text, "cuda", all_threads, *flags[text])


@dataclass(slots=True)
class Record:
    """One replayed interval."""

    draw: int
    interval: int
    params_ppm: float
    momentum_ppm: float  # the momentum's error in parameter units (compute_replay_distance)
    update_ppm: float  # ||p_{i+1} - p_i|| / ||p_{i+1}||: how far the interval itself moved
    count_diff: int  # |validation count of p_{i+1} here − the count where it was trained|
    reject: str  # the verifier's reason, or "" when the interval passed


def make_checkpoint(index: int, k: int, params: np.ndarray, momentum: np.ndarray,
                    previous: np.ndarray | None) -> Checkpoint:
    """Checkpoint `index` as a miner would serve it (the Merkle path is not replay's
    business, so it is left empty)."""
    params_b, momentum_b = to_bytes(params), to_bytes(momentum)
    norm = 0 if previous is None else compute_update_norm(previous, params)
    leaf = CheckpointLeaf(index, index * k, compute_tensor_hash(params_b),
                          compute_tensor_hash(momentum_b), norm)
    return Checkpoint(leaf, (), params_b, momentum_b)


def train_history(task: Task, h1: bytes, cache: DataCache, config: Config, n_intervals: int,
                  audited: set[int]) -> tuple[dict[int, Checkpoint], dict[int, int]]:
    """Train draw h1 for n_intervals intervals of k steps on `config`, keeping the
    checkpoints that start or end an audited interval, and the validation count of
    each interval's end (what a miner would claim there)."""
    draw = compute_htoa(task, h1)
    trainer = Trainer(draw, cache.resident(task.dataset, config.device), config.device)
    config.apply()  # after the Trainer, which turns TF32 off: cuda+tf32 turns it back on
    keep = audited | {i + 1 for i in audited}
    previous = draw.init
    kept = {0: make_checkpoint(0, task.k, draw.init, np.zeros_like(draw.init), None)}
    counts = {}
    for i in range(1, n_intervals + 1):
        trainer.train((i - 1) * task.k, task.k)
        if i in keep or i + 1 in keep:  # the update norm needs the one before too
            params, momentum = trainer.snapshot()
            if i in keep:
                kept[i] = make_checkpoint(i, task.k, params, momentum, previous)
                counts[i] = trainer.count_correct()
            previous = params
    return kept, counts


def replay(task: Task, h1: bytes, cache: DataCache, config: Config,
           kept: dict[int, Checkpoint], counts: dict[int, int], audited: list[int],
           draw_no: int) -> list[Record]:
    """Audit each interval through the verifier's check, then measure its distances, and
    recount the committed end checkpoint as the verifier's recount would (§8 step 5)."""
    engine = DPoDLEngine(None, cache, device=config.device)  # type: ignore[arg-type]
    draw = compute_htoa(task, h1)
    config.apply()
    records = []
    for i in audited:
        start, end = kept[i], kept[i + 1]
        p0 = np.frombuffer(start.params, dtype="<f4")
        p1 = np.frombuffer(end.params, dtype="<f4")
        m1 = np.frombuffer(end.momentum, dtype="<f4")
        reason = ""
        audit = engine._start_audit(task, draw, start, end)
        try:
            engine._finish_audit(task, draw, end, audit)
        except ConsensusError as e:
            reason = e.reason
        if audit.exception() is not None:  # refused before the replay: measure it anyway
            audit = engine.replayer.replay(task, draw, start.leaf.steps, p0,
                                           np.frombuffer(start.momentum, dtype="<f4"))
        params, momentum = audit.result()
        count_diff = abs(engine.replayer.count_correct(task, draw, p1).result() - counts[i + 1])
        dp, dm = compute_replay_distance(draw.hpp, (params, momentum), (p1, m1))
        records.append(Record(draw_no, i, dp * 1e6, dm * 1e6,
                              compute_relative_distance(p0, p1) * 1e6, count_diff, reason))
    return records


def forged_rejected(task: Task, h1: bytes, cache: DataCache, config: Config,
                    start: Checkpoint, end: Checkpoint) -> bool:
    """The harness's negative control: the same interval with the end checkpoint's momentum
    pushed 2·delta off in parameter units (compute_replay_distance; re-hashed, so only the
    replay can catch it) must be rejected as bad-replay."""
    engine = DPoDLEngine(None, cache, device=config.device)  # type: ignore[arg-type]
    draw = compute_htoa(task, h1)
    config.apply()
    params = np.frombuffer(end.params, dtype="<f4")
    hpp = draw.hpp
    noise = np.random.default_rng(0).standard_normal(len(params))
    scale = 2 * task.delta_ppm / 1e6 * np.linalg.norm(params) * (1 - hpp.momentum) / hpp.lr
    momentum = (np.frombuffer(end.momentum, dtype="<f4")
                + noise * (scale / np.linalg.norm(noise))).astype(np.float32)
    forged = make_checkpoint(end.leaf.index, task.k, params, momentum, None)
    forged = dataclasses.replace(forged, leaf=dataclasses.replace(
        forged.leaf, update_norm=end.leaf.update_norm))
    try:
        engine._finish_audit(task, draw, forged, engine._start_audit(task, draw, start, forged))
    except ConsensusError as e:
        return e.reason == "bad-replay"
    return False


def summarise(records: list[Record], delta_ppm: int) -> dict:
    p = np.array([r.params_ppm for r in records])
    m = np.array([r.momentum_ppm for r in records])
    u = np.array([r.params_ppm / r.update_ppm for r in records])
    worst = max(records, key=lambda r: max(r.params_ppm, r.momentum_ppm))
    top = float(max(p.max(), m.max()))
    return {
        "intervals": len(records),
        "params_max": float(p.max()), "params_p50": float(np.percentile(p, 50)),
        "params_p99": float(np.percentile(p, 99)),
        "momentum_max": float(m.max()), "momentum_p50": float(np.percentile(m, 50)),
        "momentum_p99": float(np.percentile(m, 99)),
        "err_over_update_max": float(u.max()), "err_over_update_p50": float(np.median(u)),
        "max": top, "margin_ppm": delta_ppm - top,
        "headroom": (delta_ppm / top) if top > 0 else float("inf"),
        "worst": f"d{worst.draw} i{worst.interval}" if top > 0 else "-",
        "count_diff_max": max(r.count_diff for r in records),
        "rejects": sum(1 for r in records if r.reject),
        "reasons": sorted({r.reject for r in records if r.reject}),
    }



def fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.3g}" if x < 10 else f"{x:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="digits-mlp,mnist-mlp,digits-cnn",
                    help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--train", default="cpu:1",
                    help="training configurations: cpu[:N], cuda, cuda-torch, cuda+tf32, cuda-det")
    ap.add_argument("--replay", default="cpu:2,cpu:1",
                    help="replay configurations (same syntax); every train x replay pair runs")
    ap.add_argument("--draws", type=int, default=3, help="HtoA draws (h1) per case")
    ap.add_argument("--intervals", type=int, default=0,
                    help="intervals trained per draw (0: the whole s_max / k)")
    ap.add_argument("--k", type=int, default=0,
                    help="override the tasks' checkpoint interval k (0: the task's own)")
    ap.add_argument("--audits", type=int, default=20,
                    help="intervals replayed per draw, evenly spread over the trained ones")
    ap.add_argument("--data-dir", default=default_data_dir(), help="where MNIST/raw/ lives")
    ap.add_argument("--json", help="also write every record and summary here")
    args = ap.parse_args()
    start("bench.replay_distance", args)

    all_threads = torch.get_num_threads()
    trains = [parse_config(t, all_threads) for t in args.train.split(",")]
    replays = [parse_config(t, all_threads) for t in args.replay.split(",")]
    print(f"torch {torch.__version__}, {all_threads} CPU threads by default"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    cache = DataCache(args.data_dir)
    rows, dump = [], []
    forgery_misses: list[str] = []
    for case in args.cases.split(","):
        task = CASES[case]
        if args.k:
            task = dataclasses.replace(task, k=args.k)
        n = args.intervals or task.s_max // task.k
        audited = sorted({int(x) for x in np.linspace(0, n - 1, min(args.audits, n)).round()})
        h1s = [hashlib.sha256(f"bench/replay_distance/{case}/{d}".encode()).digest()
               for d in range(args.draws)]
        for d, h1 in enumerate(h1s):
            draw = compute_htoa(task, h1)
            print(f"{case} draw {d}: widths {draw.arch.widths}, {len(draw.init)} params, "
                  f"lr {draw.hpp.lr:g}, momentum {draw.hpp.momentum:g}, batch {draw.hpp.batch}")
        records: dict[tuple[str, str], list[Record]] = {}
        for train in trains:
            for d, h1 in enumerate(h1s):
                t0 = time.perf_counter()
                kept, counts = train_history(task, h1, cache, train, n, set(audited))
                t_train = time.perf_counter() - t0
                for rep in replays:
                    t0 = time.perf_counter()
                    got = replay(task, h1, cache, rep, kept, counts, audited, d)
                    records.setdefault((train.name, rep.name), []).extend(got)
                    print(f"  {case} d{d} {train.name} -> {rep.name}: trained {n * task.k} "
                          f"steps in {t_train:.1f} s, replayed {len(got)} intervals in "
                          f"{time.perf_counter() - t0:.1f} s, max "
                          f"{max(max(r.params_ppm, r.momentum_ppm) for r in got):.3g} ppm",
                          flush=True)
                    last = audited[-1]
                    if not forged_rejected(task, h1, cache, rep, kept[last], kept[last + 1]):
                        forgery_misses.append(f"{case} d{d} {train.name} -> {rep.name}")
        for (t, r), recs in records.items():
            s = summarise(recs, task.delta_ppm)
            rows.append((case, f"{t} -> {r}", task.k, task.delta_ppm, task.eps_correct, s))
            dump.append({"case": case, "train": t, "replay": r, "k": task.k,
                         "delta_ppm": task.delta_ppm, "summary": s,
                         "records": [dataclasses.asdict(x) for x in recs]})

    print()
    print("relative L2 distance of the replayed interval to the committed checkpoint, ppm "
          "(verifier rejects when max(params, momentum) > delta_ppm)")
    head = (f"{'case':<11}{'train -> replay':<21}{'k':>3}{'n':>5}{'params max':>11}{'p50':>8}"
            f"{'p99':>8}{'mom max':>9}{'p50':>8}{'p99':>8}{'delta':>6}{'headroom':>9}"
            f"{'worst':>9}{'rejects':>8}{'err/upd':>8}{'count':>6}{'eps':>4}")
    print(head)
    for case, setting, k, delta, eps, s in rows:
        headroom = "inf" if s["headroom"] == float("inf") else f"{s['headroom']:.1f}x"
        print(f"{case:<11}{setting:<21}{k:>3}{s['intervals']:>5}{fmt(s['params_max']):>11}"
              f"{fmt(s['params_p50']):>8}{fmt(s['params_p99']):>8}{fmt(s['momentum_max']):>9}"
              f"{fmt(s['momentum_p50']):>8}{fmt(s['momentum_p99']):>8}{delta:>6}"
              f"{headroom:>9}{s['worst']:>9}{s['rejects']:>8}"
              f"{s['err_over_update_max']:>8.2g}{s['count_diff_max']:>6}{eps:>4}")
    print("headroom: delta / max; worst: draw and interval of the max; err/upd: largest "
          "||replayed - p1|| / ||p1 - p0||, the replay error over the interval's own update; "
          "count: largest difference between the validation count of a committed checkpoint "
          "here and where it was trained, against the task's eps_correct")
    total = sum(s["rejects"] for *_, s in rows)
    miscounts = sum(s["count_diff_max"] > eps for *_, eps, s in rows)
    print(f"negative control: the last audited interval of every draw and setting, its momentum "
          f"pushed 2*delta off, rejected as bad-replay: "
          f"{'all' if not forgery_misses else 'MISSED ' + ', '.join(forgery_misses)}")
    print(f"goal: zero false rejects over >= 50 honest intervals per setting -> "
          f"{'met' if total == 0 and all(s['intervals'] >= 50 for *_, s in rows) else 'NOT met'}"
          f" ({total} rejects); recounts within eps_correct in "
          f"{len(rows) - miscounts} of {len(rows)} settings")
    if args.json:
        Path(args.json).write_text(json.dumps(dump))


if __name__ == "__main__":
    main()
