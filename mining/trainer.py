"""Training one HtoA draw: deterministic SGD with momentum under the watermark (PROTOCOL.md §6).

The miner and the verifier's replay run this same code, so a replay on the miner's
device reproduces its checkpoints bit for bit, and on another device within the
protocol's tolerance. The model's parameters and momentum buffers are views of two
flat float32 buffers: a checkpoint is one device-to-host copy, the watermark one
scatter, and the update three multi-tensor operations. The dataset is resident on the
device; a whole interval's batch indices go over in one copy, so the step loop never
waits for the host.
"""

import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from consensus.checkpoints import NORM_SCALE
from consensus.models import (
    CNN_KERNEL,
    Arch,
    ModelBlob,
    check_params_fit,
    compute_param_count,
    compute_param_shapes,
)
from consensus.tasks import FAMILY_MLP, Dataset
from mining.datasets import Splits, load_dataset
from mining.htoa import DataOrder, Draw

EVAL_CHUNK = 2048  # validation rows per forward pass: bounds the CNNs' activation memory


def build_model(arch: Arch) -> nn.Module:
    """The network of `arch`; its parameters are declared in compute_param_shapes' order."""
    layers: list[nn.Module] = []
    if arch.family == FAMILY_MLP:
        layers.append(nn.Flatten())
        fan_in = arch.channels * arch.height * arch.width
        for out in arch.widths:
            layers += [nn.Linear(fan_in, out), nn.ReLU()]
            fan_in = out
        layers.append(nn.Linear(fan_in, arch.classes))
    else:
        c, h, w = arch.channels, arch.height, arch.width
        for out in arch.widths:
            layers += [nn.Conv2d(c, out, CNN_KERNEL, padding=CNN_KERNEL // 2), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, arch.classes)]
    return nn.Sequential(*layers)


def load_model(blob: ModelBlob) -> nn.Module:
    """The network of a chain model, with its parameters (float32, declared order)."""
    if not check_params_fit(blob):
        raise ValueError("the model's parameters do not fit its architecture")
    net = build_model(blob.arch)
    flat = torch.from_numpy(from_bytes(blob.params))
    offset = 0
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    return net.eval()


def to_bytes(flat: np.ndarray) -> bytes:
    """Tensor bytes as committed: float32 little-endian."""
    return flat.astype("<f4", copy=False).tobytes()


def from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def compute_update_norm(before: np.ndarray, after: np.ndarray) -> int:
    """update_norm = ||after − before||₂ in float64, in fixed point (NORM_SCALE)."""
    diff = after.astype(np.float64) - before.astype(np.float64)
    return round(float(np.sqrt(np.dot(diff, diff))) * NORM_SCALE)


@dataclass(frozen=True, slots=True, eq=False)
class DeviceData:
    """A task's training and validation splits, resident on one device."""

    spec: Dataset
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor

    @classmethod
    def from_splits(cls, splits: Splits, device: torch.device | str) -> "DeviceData":
        train_x, train_y = splits.normalised("train", device)
        val_x, val_y = splits.normalised("val", device)
        return cls(splits.spec, train_x, train_y, val_x, val_y)


class DataCache:
    """Loads each task's dataset once (hash-checked) and keeps it on each device used."""

    def __init__(self, data_dir: str | None = None) -> None:
        self.data_dir = data_dir
        self._splits: dict[Dataset, Splits] = {}
        self._resident: dict[tuple[Dataset, str], DeviceData] = {}
        self._lock = threading.Lock()  # a node's warm-up and its chain thread may both ask

    def splits(self, spec: Dataset) -> Splits:
        found = self._splits.get(spec)
        if found is None:
            found = self._splits[spec] = load_dataset(spec, self.data_dir)
        return found

    def resident(self, spec: Dataset, device: torch.device | str) -> DeviceData:
        key = (spec, str(torch.device(device)))
        with self._lock:
            found = self._resident.get(key)
            if found is None:
                found = self._resident[key] = DeviceData.from_splits(self.splits(spec), device)
        return found


class Trainer:
    """SGD with momentum on one draw, from any checkpoint, on one device.

    A step: loss = mean cross-entropy of the batch; g = its gradient;
    buf ← momentum·buf + g; params ← params − lr·buf; then the watermark is stamped.
    This is torch.optim.SGD's update (dampening 0, no Nesterov, no weight decay).
    """

    def __init__(self, draw: Draw, data: DeviceData, device: torch.device | str = "cpu") -> None:
        self.draw, self.data = draw, data
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # PROTOCOL.md §6 trains in float32. PyTorch runs cuDNN convolutions in TF32
            # by default (10-bit mantissa), which lands a replay on another device
            # thousands of ppm away; full float32 on CUDA stays within delta_ppm
            # (docs/benchmarks.md, honest replay distance). These switches are global.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.model = build_model(draw.arch).to(self.device)
        self.flat = torch.empty(len(draw.init), dtype=torch.float32, device=self.device)
        self.momentum = torch.zeros_like(self.flat)
        if len(draw.init) != compute_param_count(draw.arch):
            raise ValueError("initial parameters do not fit the architecture")
        self.params: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        offset = 0
        modules = [m for m in self.model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        shapes = iter(compute_param_shapes(draw.arch))
        for module in modules:
            for name in ("weight", "bias"):
                shape = next(shapes)
                n = int(np.prod(shape))
                view = self.flat[offset:offset + n].view(shape)
                setattr(module, name, nn.Parameter(view))
                self.params.append(getattr(module, name))
                self.buffers.append(self.momentum[offset:offset + n].view(shape))
                offset += n
        self.order = DataOrder(draw.data_seed, len(data.train_y), draw.hpp.batch)
        self.load(draw.init, np.zeros_like(draw.init))

    def load(self, params: np.ndarray, momentum: np.ndarray) -> None:
        """Start from a checkpoint's parameters and momentum buffers."""
        with torch.no_grad():  # np.require: a read-only view of bytes is copied first
            self.flat.copy_(torch.from_numpy(np.require(params, requirements="W")))
            self.momentum.copy_(torch.from_numpy(np.require(momentum, requirements="W")))

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """The current parameters and momentum, on the host."""
        return (self.flat.detach().cpu().numpy().copy(),
                self.momentum.detach().cpu().numpy().copy())

    def train(self, start_step: int, n_steps: int) -> None:
        """Steps start_step .. start_step + n_steps − 1 of the draw's schedule."""
        lr, momentum = self.draw.hpp.lr, self.draw.hpp.momentum
        idx = torch.from_numpy(self.order.indices(start_step, n_steps)).to(
            self.device, non_blocking=True)
        x_all, y_all = self.data.train_x, self.data.train_y
        stamp = self.draw.signature.flat_stamp(self.flat)
        for s in range(n_steps):
            rows = idx[s]
            loss = F.cross_entropy(self.model(x_all[rows]), y_all[rows])
            grads = torch.autograd.grad(loss, self.params)
            with torch.no_grad():
                torch._foreach_mul_(self.buffers, momentum)
                torch._foreach_add_(self.buffers, grads)
                torch._foreach_add_(self.params, self.buffers, alpha=-lr)
                if stamp is not None:
                    self.flat.put_(*stamp)

    def count_correct(self) -> int:
        """Correct predictions on the validation split: one host sync."""
        return int(compute_correct(self.model, self.data.val_x, self.data.val_y))

    def capture(self, evaluate: bool) -> "Snapshot":
        """The current parameters, momentum and (if asked) validation count, copied out
        without waiting: on CUDA the copies land in pinned memory behind an event, so
        training goes on while a worker thread hashes the previous checkpoint."""
        with torch.no_grad():
            correct = (compute_correct(self.model, self.data.val_x, self.data.val_y)
                       if evaluate else None)
            if self.device.type != "cuda":
                return Snapshot(self.flat.clone(), self.momentum.clone(), correct, None)
            params = torch.empty(self.flat.shape, dtype=torch.float32, pin_memory=True)
            momentum = torch.empty_like(params, pin_memory=True)
            params.copy_(self.flat, non_blocking=True)
            momentum.copy_(self.momentum, non_blocking=True)
            if correct is not None:
                correct = torch.empty((), dtype=torch.int64, pin_memory=True).copy_(
                    correct, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return Snapshot(params, momentum, correct, event)


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """A checkpoint on its way to the host (see Trainer.capture)."""

    params: torch.Tensor
    momentum: torch.Tensor
    correct: torch.Tensor | None
    event: "torch.cuda.Event | None"

    def wait(self) -> tuple[np.ndarray, np.ndarray, int | None]:
        if self.event is not None:
            self.event.synchronize()
        correct = None if self.correct is None else int(self.correct)
        return self.params.numpy(), self.momentum.numpy(), correct


def compute_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                    ) -> torch.Tensor:
    """How many of `images` the model classifies as `labels` (argmax, first on ties), as
    a tensor on their device: reading it is the caller's host sync."""
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    with torch.no_grad():
        for lo in range(0, len(labels), EVAL_CHUNK):
            logits = model(images[lo:lo + EVAL_CHUNK])
            correct += (logits.argmax(dim=1) == labels[lo:lo + EVAL_CHUNK]).sum()
    return correct
