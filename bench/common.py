"""What the benchmark scripts share: where the datasets are, the command line that
reproduces a run, and a task's resident data (or why it is skipped)."""

import argparse
import os
import sys
from pathlib import Path

import torch

from consensus.tasks import Task
from mining.datasets import DatasetError
from mining.trainer import DataCache, DeviceData


def default_data_dir() -> str:
    """$DPODL_DATASETS, else the shared folder beside the checkout."""
    default = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    return os.environ.get("DPODL_DATASETS", str(default))


def add_data_args(ap: argparse.ArgumentParser, threads: int) -> None:
    """--data-dir and --threads (torch intra-op threads; 0: PyTorch's default)."""
    ap.add_argument("--data-dir", default=default_data_dir(), help="where MNIST/raw/ lives")
    ap.add_argument("--threads", type=int, default=threads,
                    help="torch intra-op threads (0: PyTorch's default)")


def start(module: str, args: argparse.Namespace) -> None:
    """Print the command that reproduces this run, and apply --threads."""
    print(f"cd {os.getcwd()} && {sys.executable} -m {module} "
          + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                     if v is not None), flush=True)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)


def resident(cache: DataCache, task: Task, label: str,
             device: torch.device | str = "cpu") -> DeviceData | None:
    """The task's splits on `device`, or None (said why) when the files are not there."""
    try:
        return cache.resident(task.dataset, device)
    except DatasetError as e:
        print(f"{label}: skipped, dataset not found under {cache.data_dir}: {e}")
        return None
