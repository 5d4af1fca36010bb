"""A task publisher's task file (TOML), as `dpodl task submit` reads it.

Every field is optional but `dataset`; what is left out comes from the genesis task of
the network that trains on that dataset (dev: digits, testnet: MNIST), so a file can be
as short as `dataset = "mnist"` and `bounty = 1000`. Fields:

    dataset = "mnist"                # a dataset known by its split hashes: digits, mnist
    family = "mlp"                   # or "cnn"
    depth = [1, 2]                   # hidden layers (MLP) or conv blocks (CNN), min and max
    width = [64, 256]                # layer widths or channel counts, min and max
    lr_ppm = [10000, 100000]         # SGD learning rate range, in millionths
    momentum_ppm = [850000, 950000]  # momentum range, in millionths
    batch_sizes = [64, 128]
    t_acc = 4750; t_min = 4500; wm_ppm = 10000; k = 50; s_min = 500; s_max = 5000
    l_ref = 10; delta_ppm = 1000; eps_correct = 5; duration = 100; bounty = 0

(PROTOCOL.md §2 explains each.) The task is checked with the consensus rule
(validate_task) before anything is signed.
"""

import tomllib
from dataclasses import replace
from pathlib import Path

from consensus.encoding import Address
from consensus.errors import ConsensusError
from consensus.params import NETWORKS
from consensus.tasks import FAMILY_CNN, FAMILY_MLP, Task, validate_task

FAMILIES = {"mlp": FAMILY_MLP, "cnn": FAMILY_CNN}
SCALARS = ("t_acc", "t_min", "wm_ppm", "k", "s_min", "s_max", "l_ref", "delta_ppm",
           "eps_correct", "duration", "bounty")
RANGES = {"depth": ("arch", "depth_min", "depth_max"), "width": ("arch", "width_min", "width_max"),
          "lr_ppm": ("hpp", "lr_min_ppm", "lr_max_ppm"),
          "momentum_ppm": ("hpp", "momentum_min_ppm", "momentum_max_ppm")}
KNOWN = {"dataset", "family", "batch_sizes", *SCALARS, *RANGES}


class TaskFileError(Exception):
    """The file is not a task: the message names the file, the field and why."""


def _int(path: Path, name: str, value: object) -> int:
    limit = (1 << 64) - 1 if name == "bounty" else (1 << 32) - 1
    if type(value) is not int or not 0 <= value <= limit:
        raise TaskFileError(f"{path}: {name} must be an integer from 0 to {limit}")
    return value


def load_task_file(path: Path, publisher: Address) -> Task:
    try:
        fields = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise TaskFileError(f"{path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise TaskFileError(f"{path}: not TOML: {e}") from None
    unknown = sorted(set(fields) - KNOWN)
    if unknown:
        raise TaskFileError(f"{path}: unknown field(s) {', '.join(unknown)}")
    bases = {p.genesis_task.dataset.name.decode(): p.genesis_task for p in NETWORKS.values()}
    name = fields.get("dataset")
    if not isinstance(name, str) or name not in bases:
        raise TaskFileError(f"{path}: dataset must be one of {', '.join(sorted(bases))}")
    task = replace(bases[name], publisher=publisher)
    if "family" in fields:
        if not isinstance(fields["family"], str) or fields["family"] not in FAMILIES:
            raise TaskFileError(f"{path}: family must be mlp or cnn")
        task = replace(task, arch=replace(task.arch, family=FAMILIES[fields["family"]]))
    for key, (part, low, high) in RANGES.items():
        if key in fields:
            pair = fields[key]
            if not isinstance(pair, list) or len(pair) != 2:
                raise TaskFileError(f"{path}: {key} must be [min, max]")
            lo, hi = (_int(path, key, v) for v in pair)
            task = replace(task, **{part: replace(getattr(task, part), **{low: lo, high: hi})})
    if "batch_sizes" in fields:
        sizes = fields["batch_sizes"]
        if not isinstance(sizes, list) or not sizes:
            raise TaskFileError(f"{path}: batch_sizes must be a list of sizes")
        task = replace(task, hpp=replace(task.hpp, batch_sizes=tuple(
            _int(path, "batch_sizes", v) for v in sizes)))
    task = replace(task, **{k: _int(path, k, fields[k]) for k in SCALARS if k in fields})
    try:
        validate_task(task)
    except ConsensusError as e:
        raise TaskFileError(f"{path}: {e}") from None
    return task
