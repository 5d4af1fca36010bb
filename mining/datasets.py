"""Load a task's dataset by name from local files and check it against the task's hashes.

Datasets are data, not code (PROTOCOL.md §2): each split is decoded to its canonical
uint8 images (N, C, H, W) and labels, hashed with `compute_split_hash`, and refused
unless every hash and size matches the `Dataset` the task names. Training and
validation come from the dataset's training file(s): the last `spec.val_size` rows
validate, the rows before them train; the test split is the dataset's test file.
Reading needs only numpy (and scikit-learn for `digits`); torchvision, where it
imports, is used to download files and only when the caller asks.
"""

import gzip
import importlib.util
import logging
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from consensus.tasks import Dataset, compute_split_hash

log = logging.getLogger(__name__)

SplitName = Literal["train", "val", "test"]


class DatasetError(Exception):
    """The local dataset files are missing, malformed or not the dataset a task names.

    Deliberately not a ConsensusError: our files being wrong says nothing about a peer.
    """


@dataclass(frozen=True, slots=True, eq=False)
class Split:
    """One split: uint8 images (N, C, H, W) and int64 labels (N,), both on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True, slots=True, eq=False)
class Splits:
    """A dataset whose splits matched the spec's hashes and sizes."""

    spec: Dataset
    train: Split
    val: Split
    test: Split
    pixel_max: int  # the largest pixel value the format allows: 16 for digits, else 255

    def normalised(
        self, split: SplitName, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One split as resident tensors on `device`: float32 images / pixel_max, labels.

        Pixels map to [0, 1] by dividing by the format's maximum (16 for digits, 255
        otherwise); no mean/std shift, so a verifier recomputes exactly the same input.
        The uint8 tensor is moved first and converted on the device (4x less copying).
        """
        part: Split = getattr(self, split)
        images = part.images.to(device).to(torch.float32).div_(self.pixel_max)
        return images, part.labels.to(device)


class _Raw(NamedTuple):
    """What a reader decodes: the training pool (train + val) and the test split."""

    pool_images: np.ndarray  # uint8 (N, C, H, W), C-contiguous
    pool_labels: np.ndarray  # uint8 (N,)
    pool_files: str
    test_images: np.ndarray
    test_labels: np.ndarray
    test_files: str


# ---- digits ------------------------------------------------------------------------

_DIGITS_TEST = 250  # rows 1547..1796 of sklearn's order (consensus/params.py DIGITS)


def _read_digits(_: Path | None) -> _Raw:
    # The file sklearn.datasets.load_digits reads (a row: 64 pixels 0..16, the label),
    # read directly: importing scikit-learn takes 0.8 s, reading the file 9 ms, and a
    # node's first block check waited for that import. Same arrays, same split hashes.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("digits: scikit-learn, which ships the data, is not installed")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    try:
        with gzip.open(path) as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read scikit-learn's digits: {exc}") from exc
    images = np.ascontiguousarray(table[:, :64].astype(np.uint8).reshape(-1, 1, 8, 8))
    labels = table[:, 64].astype(np.uint8)
    where = "scikit-learn's bundled digits"
    cut = len(images) - _DIGITS_TEST
    return _Raw(images[:cut], labels[:cut], where, images[cut:], labels[cut:], where)


# ---- MNIST and Fashion-MNIST: IDX files -------------------------------------------

_IDX_UBYTE = 0x08  # the only IDX element type these datasets use


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Decode one IDX file (optionally gzip-compressed) of uint8 elements with `ndim` dims."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read or decompress: {exc}") from exc
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE or data[3] != ndim:
        raise DatasetError(
            f"{path}: bad IDX magic {data[:4].hex()}, expected 0000{_IDX_UBYTE:02x}{ndim:02x}"
            f" (uint8, {ndim} dimensions)"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims))
    if len(data) != header + size:
        what = "truncated" if len(data) < header + size else "has trailing bytes"
        raise DatasetError(
            f"{path}: {what}: dims {dims} need {header + size} bytes, file holds {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(dirs: tuple[Path, ...], name: str, how_to: str) -> Path:
    for folder in dirs:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    looked = ", ".join(str(d / name) + "[.gz]" for d in dirs)
    raise DatasetError(f"missing {name}: looked for {looked}; {how_to}")


def _idx_reader(folder: str, title: str) -> Callable[[Path | None], _Raw]:
    def read(data_dir: Path | None) -> _Raw:
        data_dir = _need_dir(data_dir, title)
        dirs = (data_dir / folder / "raw", data_dir)
        how_to = (
            f"put the {title} IDX files in {dirs[0]} (or pass download=True where"
            " torchvision is installed)"
        )

        def pair(prefix: str) -> tuple[np.ndarray, np.ndarray, str]:
            img_path = _find(dirs, f"{prefix}-images-idx3-ubyte", how_to)
            lab_path = _find(dirs, f"{prefix}-labels-idx1-ubyte", how_to)
            images, labels = read_idx(img_path, 3), read_idx(lab_path, 1)
            files = f"{img_path}, {lab_path}"
            if len(images) != len(labels):
                raise DatasetError(
                    f"{files}: {len(images)} images but {len(labels)} labels"
                )
            return images[:, None], labels, files  # add the channel axis (a view)

        return _Raw(*pair("train"), *pair("t10k"))

    return read


# ---- CIFAR-10: python pickle batches ------------------------------------------------

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _numpy_reconstruct() -> object:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _BatchUnpickler(pickle.Unpickler):
    """Unpickle a CIFAR batch, refusing every global but numpy's array rebuilders.

    A plain pickle.load would run whatever code a tampered file names.
    """

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),  # how the published files name it
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3
    })

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"])
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: not a CIFAR-10 batch: {exc!r}") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DatasetError(
            f"{path}: expected data (N, 3072) and N labels, found {data.shape} and"
            f" {labels.shape}"
        )
    if labels.size and not (labels.min() >= 0 and labels.max() <= 255):
        raise DatasetError(f"{path}: labels outside 0..255")
    # Rows are 1024 red, 1024 green, 1024 blue pixels: already channel-first.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.uint8)


def _read_cifar10(data_dir: Path | None) -> _Raw:
    folder = _need_dir(data_dir, "CIFAR-10") / "cifar-10-batches-py"

    def load(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, str]:
        paths = [folder / n for n in names]
        for p in paths:
            if not p.is_file():
                raise DatasetError(
                    f"missing {p}; put the CIFAR-10 python batches (data_batch_1..5,"
                    f" test_batch) in {folder} (or pass download=True where torchvision"
                    " is installed)"
                )
        batches = [_read_cifar_batch(p) for p in paths]
        images = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        return images, labels, ", ".join(str(p) for p in paths)

    return _Raw(*load(_CIFAR_TRAIN), *load(("test_batch",)))


# ---- dispatch, download, hashing ----------------------------------------------------


def _need_dir(data_dir: Path | None, title: str) -> Path:
    if data_dir is None:
        raise DatasetError(f"{title} is read from files: give a data directory")
    return data_dir


_READERS: dict[str, Callable[[Path | None], _Raw]] = {
    "digits": _read_digits,
    "mnist": _idx_reader("MNIST", "MNIST"),
    "fashion-mnist": _idx_reader("FashionMNIST", "Fashion-MNIST"),
    "cifar10": _read_cifar10,
}
_PIXEL_MAX = {"digits": 16}  # every other dataset is 8-bit: 255


def compute_pixel_max(name: str) -> int:
    """The largest pixel value of a dataset's format: inputs are pixels / this."""
    return _PIXEL_MAX.get(name, 255)
_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}

KNOWN_DATASETS = tuple(_READERS)


def _download(name: str, data_dir: Path) -> None:
    """Fetch the files through torchvision into its usual layout; warn and go on if it fails."""
    try:
        from torchvision import datasets  # optional extra; some CPU builds raise on import

        cls = getattr(datasets, _TORCHVISION[name])
        for train in (True, False):
            cls(root=str(data_dir), train=train, download=True)
    except (ImportError, RuntimeError, OSError) as exc:
        log.warning("download of %s through torchvision failed (%r); reading %s as it is",
                    name, exc, data_dir)


def _check_split(
    spec: Dataset, split: str, images: np.ndarray, labels: np.ndarray, files: str,
    want_size: int, want_hash: bytes,
) -> Split:
    name = spec.name.decode("ascii", "replace")
    want_shape = (want_size, spec.channels, spec.height, spec.width)
    if images.shape != want_shape:
        raise DatasetError(
            f"{name} {split} split: expected images of shape {want_shape}, found"
            f" {images.shape} (from {files})"
        )
    if labels.size and int(labels.max()) >= spec.classes:
        raise DatasetError(
            f"{name} {split} split: label {int(labels.max())} outside 0..{spec.classes - 1}"
            f" (from {files})"
        )
    images = np.ascontiguousarray(images)
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    # memoryview: hash the arrays' own buffers, no copy.
    found = compute_split_hash(memoryview(images).cast("B"), memoryview(labels).cast("B"),
                               images.shape)
    if found != want_hash:
        raise DatasetError(
            f"{name} {split} split does not match the task: expected hash {want_hash.hex()},"
            f" found {found.hex()}; the file(s) {files} are corrupt or another dataset"
        )
    # Copy out of the read-only file buffer so torch owns writable memory.
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def load_dataset(
    spec: Dataset, data_dir: str | Path | None = None, *, download: bool = False
) -> Splits:
    """Read `spec`'s dataset from `data_dir`, refusing it unless every split's hash matches."""
    name = spec.name.decode("ascii", "replace")
    reader = _READERS.get(name)
    if reader is None:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")
    path = None if data_dir is None else Path(data_dir)
    if download and name in _TORCHVISION:
        _download(name, _need_dir(path, name))
    raw = reader(path)

    n_train = len(raw.pool_images) - spec.val_size
    if n_train != spec.train_size or len(raw.test_images) != spec.test_size:
        raise DatasetError(
            f"{name}: the task wants {spec.train_size} train + {spec.val_size} validation"
            f" rows from {raw.pool_files} and {spec.test_size} test rows from"
            f" {raw.test_files}; found {len(raw.pool_images)} and {len(raw.test_images)}"
        )
    return Splits(
        spec=spec,
        train=_check_split(spec, "train", raw.pool_images[:n_train], raw.pool_labels[:n_train],
                           raw.pool_files, spec.train_size, spec.train_hash),
        val=_check_split(spec, "validation", raw.pool_images[n_train:],
                         raw.pool_labels[n_train:], raw.pool_files, spec.val_size,
                         spec.val_hash),
        test=_check_split(spec, "test", raw.test_images, raw.test_labels, raw.test_files,
                          spec.test_size, spec.test_hash),
        pixel_max=compute_pixel_max(name),
    )
