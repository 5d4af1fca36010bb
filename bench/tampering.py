"""FreezeNet's weak-tampering experiment: a model trained under watermark A, re-stamped
with watermark B, against a model trained under B from the start (digits and MNIST)."""

import argparse
import statistics
import time

import numpy as np

from bench.common import add_data_args, resident, start
from consensus.encoding import tagged_hash
from consensus.params import DEV, TESTNET
from consensus.tasks import Task
from mining.htoa import Draw, compute_htoa, draw_init
from mining.trainer import DataCache, DeviceData, Trainer
from mining.watermark import Signature, compute_watermark_size

SIZES_PPM = (1_000, 3_000, 10_000, 30_000, 100_000)  # 0.1% … 10%, FreezeNet's range



def train(base: Draw, raw_init: np.ndarray, signature: Signature, data: DeviceData,
          steps: int) -> tuple[np.ndarray, int]:
    """Train `base`'s architecture, hyper-parameters, initial weights and data order under
    `signature` (stamped on the initial weights and after every step, as the miner does);
    the final parameters and their validation count."""
    draw = Draw(base.h1, base.arch, base.hpp, signature.sign_array(raw_init), base.data_seed,
                signature)
    trainer = Trainer(draw, data)
    trainer.train(0, steps)
    params = trainer.snapshot()[0]
    assert signature.verify_array(params)
    return params, trainer.count_correct()


def count_restamped(base: Draw, params: np.ndarray, signature: Signature,
                    data: DeviceData) -> int:
    """The validation count of `params` after stamping `signature` over them, untrained."""
    trainer = Trainer(base, data)
    stamped = signature.sign_array(params)
    trainer.load(stamped, np.zeros_like(stamped))
    return trainer.count_correct()


def run_seed(task: Task, label: str, seed: int, data: DeviceData, steps: int,
             sizes: tuple[int, ...]) -> tuple[Draw, float, dict[int, tuple[float, float, float]]]:
    """One HtoA draw: the unwatermarked accuracy and, per watermark size, the accuracy of
    A trained, A re-stamped with B, and B trained from scratch (validation, %)."""
    h1_a = tagged_hash("bench-tampering-a", label, seed)
    h1_b = tagged_hash("bench-tampering-b", label, seed)
    base = compute_htoa(task, h1_a)  # arch, hpp and data order of A; B differs only in its mark
    raw_init = draw_init(base.arch, h1_a)
    n, val = len(raw_init), task.dataset.val_size
    _, plain = train(base, raw_init, Signature(h1_a, 0), data, steps)
    results = {}
    for ppm in sizes:
        size = compute_watermark_size(ppm, n)
        sig_a, sig_b = Signature(h1_a, size), Signature(h1_b, size)
        params_a, correct_a = train(base, raw_init, sig_a, data, steps)
        restamped = count_restamped(base, params_a, sig_b, data)
        _, correct_b = train(base, raw_init, sig_b, data, steps)
        results[ppm] = (100 * correct_a / val, 100 * restamped / val, 100 * correct_b / val)
    return base, 100 * plain / val, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=3, help="HtoA draws averaged per dataset")
    ap.add_argument("--digits-steps", type=int, default=400,
                    help="training steps per digits model (DEV's s_max)")
    ap.add_argument("--mnist-steps", type=int, default=1500,
                    help="training steps per MNIST model")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES_PPM)),
                    help="watermark sizes in ppm of the parameters, comma-separated")
    add_data_args(ap, threads=1)
    args = ap.parse_args()
    start("bench.tampering", args)
    sizes = tuple(int(s) for s in args.sizes.split(","))

    cache = DataCache(args.data_dir)
    print("validation accuracy %, mean over seeds [min..max]; A: trained under watermark A; "
          "A->B: A's model re-stamped with B, no further training; B: trained under B from "
          "the same init, hyper-parameters and data order")
    for label, params, steps in (("digits", DEV, args.digits_steps),
                                 ("mnist", TESTNET, args.mnist_steps)):
        task = params.genesis_task
        data = resident(cache, task, label)
        if data is None:
            continue
        t0 = time.perf_counter()
        plain, rows = [], {ppm: [] for ppm in sizes}
        for seed in range(args.seeds):
            base, acc, results = run_seed(task, label, seed, data, steps, sizes)
            plain.append(acc)
            print(f"  {label} seed {seed}: hidden {base.arch.widths}, {len(base.init)} params, "
                  f"lr {base.hpp.lr:.3f}, momentum {base.hpp.momentum:.3f}, batch "
                  f"{base.hpp.batch}; no watermark {acc:.1f}%; "
                  + ", ".join(f"{ppm}: {a:.1f}/{r:.1f}/{b:.1f}"
                              for ppm, (a, r, b) in results.items()))
            for ppm, accs in results.items():
                rows[ppm].append(accs)
        elapsed = time.perf_counter() - t0

        def cell(values: list[float]) -> str:
            return f"{statistics.mean(values):5.1f} [{min(values):.1f}..{max(values):.1f}]"

        print(f"{label}: {steps} steps per model, {args.seeds} seeds, "
              f"{task.dataset.val_size} validation images, {elapsed:.0f} s; "
              f"no watermark: {cell(plain)}")
        print(f"{'wm ppm':>8}{'wm %':>7}  {'A':<20}{'A->B':<20}{'B':<20}{'drop A-(A->B)':>14}")
        for ppm in sizes:
            a, r, b = (list(col) for col in zip(*rows[ppm], strict=True))
            drop = statistics.mean(a) - statistics.mean(r)
            print(f"{ppm:>8}{ppm / 1e4:>7.1f}  {cell(a):<20}{cell(r):<20}{cell(b):<20}"
                  f"{drop:>14.1f}")


if __name__ == "__main__":
    main()
