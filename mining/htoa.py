"""HtoA: from a PreHash h1 to everything training needs (PROTOCOL.md §4).

Every draw comes from the portable DRBG (mining.drbg), one stream per label, so a
verifier on any machine derives the same architecture, hyper-parameters, initial
weights, data order and watermark from the same h1.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from consensus.encoding import Hash, tagged_hash
from consensus.models import (
    Arch,
    ModelBlob,
    compute_param_count,
    compute_param_shapes,
)
from consensus.tasks import Task
from mining.drbg import Drbg
from mining.watermark import Signature, compute_watermark_size

PPM = 1_000_000


@dataclass(frozen=True, slots=True)
class Hpp:
    """SGD-with-momentum hyper-parameters; rates in ppm, as drawn."""

    lr_ppm: int
    momentum_ppm: int
    batch: int

    @property
    def lr(self) -> float:
        return self.lr_ppm / PPM

    @property
    def momentum(self) -> float:
        return self.momentum_ppm / PPM


@dataclass(frozen=True, slots=True, eq=False)
class Draw:
    """HtoA(h1): what the miner trains and the verifier re-derives.

    `init` is checkpoint 0's parameters: HtoA's initial weights (or the reference
    model's), already stamped with `signature`.
    """

    h1: Hash
    arch: Arch
    hpp: Hpp
    init: np.ndarray  # float32, flat, in declared parameter order
    data_seed: bytes  # r
    signature: Signature


def _range(rng: Drbg, low: int, high: int) -> int:
    """A uniform integer in [low, high]."""
    return low + rng.below(high - low + 1)


def draw_arch(task: Task, h1: Hash) -> Arch:
    """The depth, then each hidden width in order, from the "arch" stream."""
    rng = Drbg.for_label("arch", h1)
    space, ds = task.arch, task.dataset
    depth = _range(rng, space.depth_min, space.depth_max)
    widths = tuple(_range(rng, space.width_min, space.width_max) for _ in range(depth))
    return Arch(space.family, ds.channels, ds.height, ds.width, ds.classes, widths)


def draw_hpp(task: Task, h1: Hash) -> Hpp:
    """Learning rate, momentum (both ppm, uniform in their ranges), then the batch size
    (uniform over the listed sizes), from the "hpp" stream."""
    rng = Drbg.for_label("hpp", h1)
    space = task.hpp
    lr = _range(rng, space.lr_min_ppm, space.lr_max_ppm)
    momentum = _range(rng, space.momentum_min_ppm, space.momentum_max_ppm)
    batch = space.batch_sizes[rng.below(len(space.batch_sizes))]
    return Hpp(lr, momentum, batch)


def draw_init(arch: Arch, h1: Hash) -> np.ndarray:
    """Initial parameters from the "init" stream, tensor by tensor in declared order.

    Each tensor is uniform in ±1/sqrt(fan_in), fan_in being the product of every
    dimension of its layer's weight but the first. That is the Kaiming-uniform bound
    PyTorch's Linear and Conv2d use by default (a = sqrt(5)), for weights and biases
    alike, so a plain PyTorch model and an HtoA model start from the same distribution.
    The bound is computed in float64 (math.sqrt is correctly rounded), so it is the
    same everywhere.
    """
    rng = Drbg.for_label("init", h1)
    parts = []
    fan_in = 1
    for shape in compute_param_shapes(arch):
        if len(shape) > 1:  # a weight; the bias after it shares its fan_in
            fan_in = math.prod(shape[1:])
        bound = 1.0 / math.sqrt(fan_in)
        parts.append(rng.uniform_floats(math.prod(shape), -bound, bound))
    return np.concatenate(parts)


def draw_data_seed(h1: Hash) -> bytes:
    """r, the data-order seed: the first 32 bytes of the "data" stream."""
    return Drbg.for_label("data", h1).read(32)


def compute_htoa(task: Task, h1: Hash, reference: ModelBlob | None = None) -> Draw:
    """HtoA(h1) for `task`; with a reference model, its architecture and weights are
    the starting point instead of HtoA's (re-stamped with this h1's watermark)."""
    if reference is None:
        arch = draw_arch(task, h1)
        init = draw_init(arch, h1)
    else:
        arch = reference.arch
        init = np.frombuffer(reference.params, dtype="<f4").astype(np.float32)
        if len(init) != compute_param_count(arch):
            raise ValueError("reference parameters do not fit their architecture")
    signature = Signature(h1, compute_watermark_size(task.wm_ppm, len(init)))
    init = signature.sign_array(init)
    return Draw(h1, arch, draw_hpp(task, h1), init, draw_data_seed(h1), signature)


class DataOrder:
    """The training batches of a data-order seed r (PROTOCOL.md §4).

    Epoch e visits the n training rows in the order Drbg(H("epoch", r, e)).shuffle(n);
    the epochs' orders are concatenated into one stream and step t (from 0) takes
    positions t·batch .. (t+1)·batch − 1 of it, so a batch may span two epochs and no
    row is dropped.
    """

    _CACHED_EPOCHS = 4  # an audit interval touches at most a few consecutive epochs

    def __init__(self, seed: bytes, n: int, batch: int) -> None:
        if n < 1 or batch < 1:
            raise ValueError("need at least one training row and a positive batch size")
        self.seed, self.n, self.batch = seed, n, batch
        self._epochs: OrderedDict[int, np.ndarray] = OrderedDict()

    def epoch(self, e: int) -> np.ndarray:
        order = self._epochs.get(e)
        if order is None:
            order = Drbg(tagged_hash("epoch", self.seed, e)).shuffle(self.n)
            self._epochs[e] = order
            if len(self._epochs) > self._CACHED_EPOCHS:
                self._epochs.popitem(last=False)
        return order

    def indices(self, start_step: int, n_steps: int) -> np.ndarray:
        """The row indices of steps start_step .. start_step + n_steps − 1, (n_steps, batch)."""
        if n_steps == 0:
            return np.empty((0, self.batch), dtype=np.int64)
        first = start_step * self.batch
        last = (start_step + n_steps) * self.batch  # exclusive
        e0, e1 = first // self.n, (last - 1) // self.n
        stream = np.concatenate([self.epoch(e) for e in range(e0, e1 + 1)])
        offset = first - e0 * self.n
        return stream[offset:offset + last - first].reshape(n_steps, self.batch)
