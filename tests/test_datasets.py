"""Dataset loading: every split hashed and checked against the task's Dataset."""

import dataclasses
import gzip
import os
import pickle
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from consensus.tasks import DIGITS, MNIST, Dataset, compute_split_hash
from mining.datasets import DatasetError, load_dataset

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _datasets_dir() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    return Path(os.environ.get("DPODL_DATASETS", default))


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    root = _datasets_dir()
    raw = root / "MNIST" / "raw"
    if not all((raw / f).is_file() for f in MNIST_FILES):
        pytest.skip(f"MNIST IDX files not found in {raw} (set DPODL_DATASETS to the folder"
                    " holding MNIST/raw)")
    return root


@pytest.fixture(scope="module")
def mnist(mnist_dir: Path):
    return load_dataset(MNIST, mnist_dir)


def _spec_for(name: bytes, shape: tuple[int, int, int], classes: int, train, val, test) -> Dataset:
    """A Dataset whose hashes are computed from the given (images, labels) splits."""

    def h(split):
        images, labels = split
        return compute_split_hash(images.tobytes(), labels.astype(np.uint8).tobytes(),
                                  images.shape)

    return Dataset(name=name, channels=shape[0], height=shape[1], width=shape[2],
                   classes=classes, train_hash=h(train), val_hash=h(val), test_hash=h(test),
                   train_size=len(train[0]), val_size=len(val[0]), test_size=len(test[0]))


def test_digits_loads_without_data_dir_and_matches_dev_hashes():
    splits = load_dataset(DIGITS)
    for part, n in ((splits.train, 1297), (splits.val, 250), (splits.test, 250)):
        assert part.images.shape == (n, 1, 8, 8) and part.images.dtype == torch.uint8
        assert part.labels.shape == (n,) and part.labels.dtype == torch.int64
        assert int(part.labels.min()) == 0 and int(part.labels.max()) == 9
    assert int(splits.train.images.max()) == 16
    images, labels = splits.normalised("val")
    assert images.dtype == torch.float32 and float(images.max()) == 1.0
    assert torch.equal(images * 16, splits.val.images.float())
    assert torch.equal(labels, splits.val.labels)


def test_mnist_matches_testnet_hashes(mnist):
    assert mnist.train.images.shape == (55_000, 1, 28, 28)
    assert mnist.val.images.shape == (5_000, 1, 28, 28)
    assert mnist.test.images.shape == (10_000, 1, 28, 28)
    assert mnist.pixel_max == 255
    images, _ = mnist.normalised("test")
    assert float(images.max()) == 1.0 and float(images.min()) == 0.0


def test_mnist_flipped_pixel_is_refused_naming_split_and_file(mnist_dir, tmp_path):
    # Files placed directly in the data dir, not under MNIST/raw: that layout is accepted.
    for f in MNIST_FILES[1:]:
        shutil.copy(mnist_dir / "MNIST" / "raw" / f, tmp_path / f)
    data = bytearray(gzip.decompress((mnist_dir / "MNIST/raw" / MNIST_FILES[0]).read_bytes()))
    data[16 + 57_000 * 784 + 400] ^= 0xFF  # one pixel of a validation image
    # Written back uncompressed (also accepted): re-gzipping 47 MB would double the time.
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data)
    with pytest.raises(DatasetError, match="validation split") as info:
        load_dataset(MNIST, tmp_path)
    assert f"{tmp_path / 'train-images-idx3-ubyte'}," in str(info.value)
    assert MNIST.val_hash.hex() in str(info.value)


def test_mnist_truncated_file_is_refused_naming_it(mnist_dir, tmp_path):
    for f in MNIST_FILES:
        shutil.copy(mnist_dir / "MNIST" / "raw" / f, tmp_path / f)
    victim = tmp_path / "t10k-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:100_000])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset(MNIST, tmp_path)
    # Uncompressed and truncated: the IDX reader's own size check names it.
    labels = gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(labels[:-1])
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    shutil.copy(mnist_dir / "MNIST/raw/t10k-images-idx3-ubyte.gz", tmp_path)
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte: truncated"):
        load_dataset(MNIST, tmp_path)


@pytest.mark.parametrize(("field", "split"), [("train_hash", "train"),
                                              ("val_hash", "validation"),
                                              ("test_hash", "test")])
def test_wrong_hash_in_spec_is_refused_naming_split(field, split):
    spec = dataclasses.replace(DIGITS, **{field: bytes(32)})
    with pytest.raises(DatasetError, match=f"digits {split} split does not match") as info:
        load_dataset(spec)
    assert "0" * 64 in str(info.value)


def test_wrong_sizes_and_unknown_name_are_refused():
    with pytest.raises(DatasetError, match="1297 train"):
        load_dataset(dataclasses.replace(DIGITS, train_size=1297, val_size=200))
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'; known: digits, mnist"):
        load_dataset(dataclasses.replace(DIGITS, name=b"svhn"))


def test_missing_files_say_where_to_put_them(tmp_path):
    where = re.escape(f"put the MNIST IDX files in {tmp_path / 'MNIST' / 'raw'}")
    with pytest.raises(DatasetError, match=where):
        load_dataset(MNIST, tmp_path)
    with pytest.raises(DatasetError, match="give a data directory"):
        load_dataset(MNIST, None)


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_fashion_mnist_reader_on_tiny_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 12, dtype=np.uint8)
    t_images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    t_labels = rng.integers(0, 10, 5, dtype=np.uint8)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    (raw / "train-labels-idx1-ubyte").write_bytes(_idx(labels))
    (raw / "t10k-images-idx3-ubyte").write_bytes(_idx(t_images))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(t_labels)))
    spec = _spec_for(b"fashion-mnist", (1, 28, 28), 10,
                     (images[:9, None], labels[:9]), (images[9:, None], labels[9:]),
                     (t_images[:, None], t_labels))
    splits = load_dataset(spec, tmp_path)
    assert torch.equal(splits.val.images[:, 0], torch.from_numpy(images[9:]))
    assert splits.test.labels.tolist() == t_labels.tolist()

    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + _idx(labels)[4:])
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte: bad IDX magic"):
        load_dataset(spec, tmp_path)


def _cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    # Protocol 2 and bytes keys, like the published files (written by Python 2).
    batch = {b"data": images.reshape(len(images), -1), b"labels": labels.tolist()}
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_reader_on_tiny_pickles(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 10)
    for i in range(5):
        _cifar_batch(folder / f"data_batch_{i + 1}", images[2 * i : 2 * i + 2],
                     labels[2 * i : 2 * i + 2])
    t_images = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    t_labels = rng.integers(0, 10, 3)
    _cifar_batch(folder / "test_batch", t_images, t_labels)
    spec = _spec_for(b"cifar10", (3, 32, 32), 10, (images[:7], labels[:7]),
                     (images[7:], labels[7:]), (t_images, t_labels))
    splits = load_dataset(spec, tmp_path)
    assert torch.equal(splits.train.images, torch.from_numpy(images[:7]))
    assert splits.val.labels.tolist() == labels[7:].tolist()
    x, _ = splits.normalised("test")
    assert torch.equal(x * 255, torch.from_numpy(t_images).float())

    bad = dataclasses.replace(spec, test_hash=bytes(32))
    with pytest.raises(DatasetError, match="cifar10 test split .*/test_batch"):
        load_dataset(bad, tmp_path)

    # A pickle naming any other global is refused, not executed.
    (folder / "data_batch_3").write_bytes(pickle.dumps(os.getcwd, protocol=2))
    with pytest.raises(DatasetError, match="data_batch_3: not a CIFAR-10 batch.*refusing"):
        load_dataset(spec, tmp_path)


class _BrokenTorchvision(types.ModuleType):
    def __getattr__(self, name):
        raise RuntimeError("operator torchvision::nms does not exist")


@pytest.mark.parametrize("module", [None, _BrokenTorchvision("torchvision")])
def test_download_without_working_torchvision_falls_back_to_reading(module, tmp_path,
                                                                    monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torchvision", module)  # None makes the import fail
    with pytest.raises(DatasetError, match="missing train-images-idx3-ubyte"):
        load_dataset(MNIST, tmp_path, download=True)
    assert "through torchvision failed" in caplog.text
