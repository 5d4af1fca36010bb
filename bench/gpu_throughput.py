"""Mining throughput: training steps per second inside the real miner (mining.miner.mine,
with every checkpoint's capture, validation count, hashing, update norm and PostHash)
against a bare PyTorch loop on the same model, batch size and resident data.

The bare loop: nn.Sequential from mining.trainer.build_model, torch.optim.SGD(lr,
momentum), F.cross_entropy, batches indexed from the same resident tensors with random
indices drawn beforehand on the device; no watermark, no checkpoints. The miner runs one
whole PreHash draw (s_max steps, or --steps) on a job whose targets no checkpoint can
meet, so it never stops early. Between the two, a ladder of partial contenders shows
where the miner's extra time goes. Contenders are interleaved within each repetition;
GPU time is taken with CUDA events after a warm-up, and the median over repetitions is
reported, as a ratio to the bare loop.
"""

import argparse
import dataclasses
import hashlib
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import add_data_args, start
from consensus.params import DEV, TESTNET
from consensus.tasks import CNN_K_MAX, FAMILY_CNN, FAMILY_MLP, Task, compute_task_id
from mining import miner
from mining.htoa import Draw, compute_htoa
from mining.miner import PREHASH_BATCH, Job, mine, search_prehash
from mining.trainer import (
    DataCache,
    DeviceData,
    Trainer,
    build_model,
    compute_update_norm,
    to_bytes,
)
from mining.watermark import Signature

GOAL = 0.90  # miner steps/s over bare-loop steps/s, from the issue
PREV_ID = hashlib.sha256(b"bench/gpu_throughput").digest()
MINER_KEY = bytes(32)


def space(task: Task, family: int, depth: tuple[int, int], width: tuple[int, int]) -> Task:
    arch = dataclasses.replace(task.arch, family=family, depth_min=depth[0],
                               depth_max=depth[1], width_min=width[0], width_max=width[1])
    k = min(task.k, CNN_K_MAX) if family == FAMILY_CNN else task.k
    return dataclasses.replace(task, arch=arch, k=k)


CASES: dict[str, Task] = {
    "mnist-mlp": TESTNET.genesis_task,  # whatever mine() draws first on this job
    "mnist-mlp-256": space(TESTNET.genesis_task, FAMILY_MLP, (2, 2), (256, 256)),  # largest
    "mnist-cnn": space(TESTNET.genesis_task, FAMILY_CNN, (1, 2), (8, 32)),
    "mnist-cnn-32": space(TESTNET.genesis_task, FAMILY_CNN, (2, 2), (32, 32)),  # largest
    "digits-mlp": DEV.genesis_task,
}


def first_prehash(task: Task) -> tuple[int, bytes]:
    """The (nonce, h1) mine() finds first on the bench job: the same search, same order."""
    task_id = compute_task_id(task)
    for nonce in itertools.count(0, PREHASH_BATCH):
        found = search_prehash(PREV_ID, task_id, b"", MINER_KEY, TESTNET.t1, nonce,
                               PREHASH_BATCH)
        if found is not None:
            return found
    raise AssertionError("unreachable")


class Timer:
    """Elapsed seconds of fn(): CUDA events on a GPU (recorded on the current stream and
    synchronised after), the host clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


# ---- contenders: each runs `steps` training steps of the draw ----------------------------


def bare_loop(draw: Draw, data: DeviceData, device: torch.device, steps: int
              ) -> Callable[[], None]:
    """Plain PyTorch: the same network, optimizer update, batch size and resident data."""
    model = build_model(draw.arch).to(device)
    with torch.no_grad():  # the draw's init, so both sides train from the same weights
        flat = torch.from_numpy(draw.init)
        offset = 0
        for p in model.parameters():
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    opt = torch.optim.SGD(model.parameters(), lr=draw.hpp.lr, momentum=draw.hpp.momentum)
    gen = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(0, len(data.train_y), (steps, draw.hpp.batch), device=device,
                        generator=gen)
    x_all, y_all = data.train_x, data.train_y

    def run() -> None:
        for s in range(steps):
            rows = idx[s]
            loss = F.cross_entropy(model(x_all[rows]), y_all[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def trainer_loop(draw: Draw, data: DeviceData, device: torch.device, steps: int, k: int,
                 *, capture_from: int | None = None) -> Callable[[], None]:
    """Trainer.train in k-step intervals (the miner's schedule, data order and watermark);
    with capture_from, also Trainer.capture after every interval (validation count from
    that step on) waited for one interval later, as mine() pipelines it, but not hashed."""
    trainer = Trainer(draw, data, device)

    def run() -> None:
        trainer.load(draw.init, np.zeros_like(draw.init))
        pending = None
        for j in range(1, steps // k + 1):
            trainer.train((j - 1) * k, k)
            if capture_from is not None:
                snapshot = trainer.capture(evaluate=j * k >= capture_from)
                if pending is not None:
                    pending.wait()
                pending = snapshot
        if pending is not None:
            pending.wait()

    return run


def mine_loop(task: Task, data: DeviceData, device: torch.device, given: Draw | None,
              nonce_h1: tuple[int, bytes]) -> Callable[[], None]:
    """The real mine() for one whole draw. With `given`, its PreHash search and HtoA are
    replaced by their precomputed results, leaving training plus checkpoint overhead."""
    job = Job(TESTNET, PREV_ID, task, t2=0, t2_mtx=0, miner=MINER_KEY)  # t2 = 0: never met
    last = task.s_max // task.k

    class Counting(Trainer):
        intervals = 0

        def train(self, start_step: int, n_steps: int) -> None:
            Counting.intervals += 1
            super().train(start_step, n_steps)

    def run() -> None:
        Counting.intervals = 0
        asked_after_last = False

        def stop() -> bool:
            # Asked between PreHash batches, after each interval, and once more when the
            # draw is done: stop then, after every checkpoint has been committed.
            nonlocal asked_after_last
            if Counting.intervals < last:
                return False
            if not asked_after_last:  # the look right after the last interval
                asked_after_last = True
                return False
            return True

        saved = miner.search_prehash, miner.compute_htoa, miner.Trainer
        miner.Trainer = Counting
        if given is not None:
            miner.search_prehash = lambda *_: nonce_h1
            miner.compute_htoa = lambda *_: given
        try:
            found = list(mine(job, data, stop, device=device))
        finally:
            miner.search_prehash, miner.compute_htoa, miner.Trainer = saved
        assert not found, "an unreachable target was met"
        assert Counting.intervals == last and asked_after_last, "not one whole draw"

    return run


# ---- host-side costs, for the profile ------------------------------------------------------


def host_costs(task: Task, draw: Draw, data: DeviceData, device: torch.device,
               steps: int) -> dict[str, tuple[float, int]]:
    """Median host milliseconds of each per-draw and per-checkpoint piece, with how many
    times one draw of `steps` steps incurs it."""
    k, n_train = task.k, len(data.train_y)
    epochs = -(-steps * draw.hpp.batch // n_train)
    params = draw.init.copy()
    momentum = np.zeros_like(params)

    def seal() -> None:  # mine()'s _seal after the copy: bytes, two hashes, update norm
        from consensus.checkpoints import compute_tensor_hash
        pb, mb = to_bytes(params), to_bytes(momentum)
        compute_tensor_hash(pb), compute_tensor_hash(mb)
        compute_update_norm(draw.init, params)

    def shuffle() -> None:
        from mining.drbg import Drbg
        Drbg(hashlib.sha256(b"epoch").digest()).shuffle(n_train)

    trainer = Trainer(draw, data, device)

    stamp = draw.signature.flat_stamp(trainer.flat)

    def sign() -> None:  # the watermark stamp after every step, 100 times, then a sync
        for _ in range(100):
            with torch.no_grad():
                trainer.flat.put_(*stamp)
        if device.type == "cuda":
            torch.cuda.synchronize()

    pieces = {
        "watermark stamp, x100 + sync (per 100 steps)": (sign, steps // 100),
        "PreHash search (per draw)": (lambda: first_prehash(task), 1),
        "HtoA compute_htoa (per draw)": (lambda: compute_htoa(task, draw.h1), 1),
        "Trainer() construction (per draw)": (lambda: Trainer(draw, data, device), 1),
        "epoch shuffle, Drbg (per epoch)": (shuffle, epochs),
        "seal: to_bytes + 2 hashes + norm (per ckpt)": (seal, steps // k),
    }
    out = {}
    for name, (fn, count) in pieces.items():
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = (statistics.median(ts) * 1e3, count)
    if device.type == "cuda":  # the stamp's device time alone, with CUDA events
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ms = []
        for _ in range(5):
            torch.cuda.synchronize()
            start.record()
            sign()
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
        out["  same, CUDA-event time"] = (statistics.median(ms), steps // 100)
    return out



def bench_case(name: str, task: Task, cache: DataCache, device: torch.device, steps: int,
               reps: int) -> dict:
    if steps:
        if steps % task.k:
            raise SystemExit(f"--steps must be a multiple of k={task.k}")
        task = dataclasses.replace(task, s_max=steps, s_min=min(task.s_min, steps))
    steps = task.s_max
    nonce_h1 = first_prehash(task)
    draw = compute_htoa(task, nonce_h1[1])
    data = cache.resident(task.dataset, device)
    bare = draw.hpp
    print(f"\n{name}: widths {draw.arch.widths}, {len(draw.init)} params, batch {bare.batch}, "
          f"lr {bare.lr:g}, momentum {bare.momentum:g}; {steps} steps = {steps // task.k} "
          f"checkpoints of k={task.k}, validation count from step {task.s_min} "
          f"({task.dataset.val_size} rows)", flush=True)
    no_wm = dataclasses.replace(draw, signature=Signature(draw.h1, 0))
    contenders = {
        "bare PyTorch loop": bare_loop(draw, data, device, steps),
        "bare PyTorch loop (A/A)": bare_loop(draw, data, device, steps),
        "Trainer.train, no watermark": trainer_loop(no_wm, data, device, steps, task.k),
        "Trainer.train": trainer_loop(draw, data, device, steps, task.k),
        "Trainer.train + capture/eval": trainer_loop(draw, data, device, steps, task.k,
                                                     capture_from=task.s_min),
        "mine(), PreHash+HtoA given": mine_loop(task, data, device, draw, nonce_h1),
        "mine(), end to end": mine_loop(task, data, device, None, nonce_h1),
    }
    timer = Timer(device)
    for fn in contenders.values():  # warm-up: kernels, handles, allocators, pinned pool
        fn()
    times: dict[str, list[float]] = {n: [] for n in contenders}
    for _ in range(reps):  # interleaved, so machine noise hits every contender alike
        for n, fn in contenders.items():
            times[n].append(timer(fn))
    rate = {n: steps / statistics.median(ts) for n, ts in times.items()}
    base = rate["bare PyTorch loop"]
    print(f"{'contender':<32}{'steps/s':>9}{'ms/step':>9}{'min s':>8}{'max s':>8}"
          f"{'/bare':>7}")
    for n, ts in times.items():
        print(f"{n:<32}{rate[n]:>9.0f}{1e3 / rate[n]:>9.4f}{min(ts):>8.3f}{max(ts):>8.3f}"
              f"{rate[n] / base:>7.3f}")
    costs = host_costs(task, draw, data, device, steps)
    per_draw = statistics.median(times["mine(), end to end"]) * 1e3
    print(f"host-side pieces (median ms; x count per draw; share of one end-to-end draw of "
          f"{per_draw:.0f} ms if serial)")
    for n, (ms, count) in costs.items():
        print(f"  {n:<50}{ms:>8.3f} x {count:<4}= {ms * count:>7.1f} ms "
              f"({100 * ms * count / per_draw:4.1f}%)")
    return {"case": name, "device": str(device), "widths": draw.arch.widths,
            "params": len(draw.init), "batch": bare.batch, "steps": steps, "k": task.k,
            "times": times, "steps_per_s": rate,
            "host_ms": {n: list(v) for n, v in costs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="mnist-mlp,mnist-mlp-256,mnist-cnn-32",
                    help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=0,
                    help="steps per draw (a multiple of k; 0: the task's s_max)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    add_data_args(ap, threads=0)
    ap.add_argument("--json", help="also write every timing here")
    args = ap.parse_args()
    start("bench.gpu_throughput", args)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name(device)}; every contender in full float32 "
             "(the Trainer turns TF32 off, globally)" if device.type == "cuda" else ""))
    cache = DataCache(args.data_dir)
    results = [bench_case(c, CASES[c], cache, device, args.steps, args.reps)
               for c in args.cases.split(",")]

    print(f"\nsummary on {device}: median steps/s, miner / bare (goal >= {GOAL:.2f})")
    print(f"{'case':<15}{'widths':<12}{'batch':>6}{'bare':>8}{'mine':>8}{'mine e2e':>9}"
          f"{'mine/bare':>10}{'e2e/bare':>9}{'A/A':>7}  goal")
    for r in results:
        s = r["steps_per_s"]
        bare, core, e2e = (s["bare PyTorch loop"], s["mine(), PreHash+HtoA given"],
                           s["mine(), end to end"])
        widths = "x".join(map(str, r["widths"]))
        print(f"{r['case']:<15}{widths:<12}{r['batch']:>6}{bare:>8.0f}{core:>8.0f}{e2e:>9.0f}"
              f"{core / bare:>10.3f}{e2e / bare:>9.3f}"
              f"{s['bare PyTorch loop (A/A)'] / bare:>7.3f}  "
              f"{'met' if e2e / bare >= GOAL else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
