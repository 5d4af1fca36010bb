"""Tasks: the useful work miners train (PROTOCOL.md §2).

A task is data: which dataset (by content hash), which architecture and optimizer
space HtoA draws from, and the thresholds that make a checkpoint a block. Accuracies
are integer counts of validation predictions and fractions are parts per million, so
no float ever enters consensus.
"""

import hashlib
from dataclasses import dataclass, fields
from typing import Annotated

from consensus.encoding import (
    U8,
    U16,
    U32,
    U64,
    Address20,
    Hash,
    Hash32,
    MaxItems,
    Name,
    tagged_hash,
    to_plain,
)
from consensus.errors import ConsensusError

FAMILY_MLP = 0
FAMILY_CNN = 1


@dataclass(frozen=True, slots=True)
class Dataset:
    """A dataset by name and by the content hash and size of each split."""

    name: Name
    channels: U8
    height: U16
    width: U16
    classes: U16
    train_hash: Hash32
    val_hash: Hash32
    test_hash: Hash32
    train_size: U32
    val_size: U32
    test_size: U32


@dataclass(frozen=True, slots=True)
class ArchSpace:
    """The architectures HtoA may draw: a family and ranges of depth and width."""

    family: U8
    depth_min: U8
    depth_max: U8
    width_min: U16
    width_max: U16


@dataclass(frozen=True, slots=True)
class HppSpace:
    """SGD-with-momentum hyper-parameter ranges; rates in ppm."""

    lr_min_ppm: U32
    lr_max_ppm: U32
    momentum_min_ppm: U32
    momentum_max_ppm: U32
    batch_sizes: Annotated[tuple[U16, ...], MaxItems(8)]


@dataclass(frozen=True, slots=True)
class Task:
    """A task descriptor; the table in PROTOCOL.md §2 explains every field."""

    dataset: Dataset
    arch: ArchSpace
    hpp: HppSpace
    t_acc: U32
    t_min: U32
    wm_ppm: U32
    k: U32
    s_min: U32
    s_max: U32
    l_ref: U32
    delta_ppm: U32
    eps_correct: U32
    duration: U32
    publisher: Address20
    bounty: U64


# scikit-learn's bundled 8×8 digits, pixel values 0..16 kept as uint8; rows 0..1296
# train, 1297..1546 validation, 1547..1796 test, in the order sklearn ships them.
DIGITS = Dataset(
    name=b"digits", channels=1, height=8, width=8, classes=10,
    train_hash=Hash(bytes.fromhex("66ea0d597936791a19d09adb5e37eb040375ab2801773d6b784d9c728c8c729a")),
    val_hash=Hash(bytes.fromhex("744aa66c8ac0a220819ff107acec7f8d10a5ccbdfebb80b79b94e7d3a2ec7718")),
    test_hash=Hash(bytes.fromhex("7fbb21c43dd251edde34054ea2d6fec2edda4b3495ead44ad8d23406d951d64b")),
    train_size=1297, val_size=250, test_size=250,
)

# MNIST from its IDX files: the first 55,000 training images train, the last 5,000
# validate, the 10,000 t10k images test.
MNIST = Dataset(
    name=b"mnist", channels=1, height=28, width=28, classes=10,
    train_hash=Hash(bytes.fromhex("065de302ce9c03b20c3a3e178b1d9c486e2f64aacb2fdb82e5c90a78234d508f")),
    val_hash=Hash(bytes.fromhex("95a65e2d0c3086467810a5c3349f44932160916781a171cc92cf9446361d28e2")),
    test_hash=Hash(bytes.fromhex("41b146750691eca9418b3cfe50a5f968e3a2ad10ebffe7bc64aca8006feb9a9b")),
    train_size=55_000, val_size=5_000, test_size=10_000,
)

# The datasets a task may name (PROTOCOL.md §2): a task naming any other, or these by
# name with other hashes or sizes, could never be mined or checked by anyone, and would
# stall the chain once active. A new dataset joins this list by a protocol change.
DATASETS = {spec.name: spec for spec in (DIGITS, MNIST)}


def compute_task_id(task: Task) -> Hash:
    """task_id = H("task", task)."""
    return tagged_hash("task", to_plain(task))


def compute_split_hash(images: bytes, labels: bytes, shape: tuple[int, ...]) -> Hash:
    """The content hash of one split: its canonical uint8 images, labels and shape.

    `images` is the C-order uint8 tensor of shape `shape` (N, C, H, W); `labels`
    holds one uint8 class per image. Hashing the decoded tensor, not a file, makes the
    hash independent of how the dataset was packaged.
    """
    digest = hashlib.sha256(images).digest()
    return tagged_hash("dataset-split", tuple(shape), digest, hashlib.sha256(labels).digest())


# Max-pooling makes a CNN's training chaotic enough that rounding differences between
# devices grow past delta_ppm = 1000 within tens of steps: a CUDA-trained MNIST CNN
# interval of 50 steps replayed on a CPU landed up to 2,465 ppm away, one of 1 vs 2 CPU
# threads at 20 steps 818 ppm; at 10 steps the worst of 60 intervals was 24 ppm (CUDA
# to CPU) and 52 ppm (CPU threads). docs/benchmarks.md, honest replay distance.
# PROTOCOL.md leaves k to the task.
CNN_K_MAX = 10


def validate_dataset(spec: Dataset) -> None:
    """A task's dataset must be one of DATASETS, hashes and sizes included."""
    known = DATASETS.get(spec.name)
    if known is None:
        raise ConsensusError("bad-task-dataset", f"unknown dataset {spec.name!r}; known: "
                             + ", ".join(name.decode() for name in DATASETS))
    if spec != known:
        wrong = [f.name for f in fields(Dataset) if getattr(spec, f.name) != getattr(known, f.name)]
        raise ConsensusError("bad-task-dataset-hash",
                             f"{spec.name.decode()}: {', '.join(wrong)} differ from the "
                             "dataset's own")


def validate_task(task: Task) -> None:
    """Reject a task on an unknown dataset (`bad-task-dataset`), on a known one's name
    with other split hashes or sizes (`bad-task-dataset-hash`), or whose parameters
    contradict each other (`bad-task-params`)."""
    validate_dataset(task.dataset)
    problems = []
    ds = task.dataset
    if not 0 < task.t_min <= task.t_acc <= ds.val_size:
        problems.append("need 0 < t_min <= t_acc <= val_size")
    if not 0 < task.k <= task.s_max or task.s_max % task.k:
        problems.append("need 0 < k <= s_max and k dividing s_max")
    if task.s_min > task.s_max * (1 + task.l_ref):
        problems.append("s_min unreachable")
    if task.wm_ppm >= 1_000_000 or task.delta_ppm >= 1_000_000:
        problems.append("ppm fields must be below 10^6")
    if task.duration == 0:
        problems.append("duration must be positive")
    arch = task.arch
    if not arch.depth_min <= arch.depth_max or not 0 < arch.width_min <= arch.width_max:
        problems.append("empty architecture space")
    if arch.family == FAMILY_CNN and min(ds.height, ds.width) >> arch.depth_max == 0:
        problems.append("a CNN's pooling would shrink the image below 1 pixel")
    if arch.family == FAMILY_CNN and task.k > CNN_K_MAX:
        problems.append(f"a CNN task's checkpoint interval k must be at most {CNN_K_MAX}")
    if arch.family not in (FAMILY_MLP, FAMILY_CNN):
        problems.append(f"unknown family {task.arch.family}")
    hpp = task.hpp
    if (not 0 < hpp.lr_min_ppm <= hpp.lr_max_ppm
            or not hpp.momentum_min_ppm <= hpp.momentum_max_ppm < 1_000_000):
        problems.append("empty hyper-parameter space")
    if not hpp.batch_sizes or 0 in hpp.batch_sizes:
        problems.append("batch sizes must be positive")
    if problems:
        raise ConsensusError("bad-task-params", "; ".join(problems))
