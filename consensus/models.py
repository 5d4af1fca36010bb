"""Model architectures and model identities (PROTOCOL.md §1, §4).

An architecture is data: a family, the input shape and class count of its dataset, and
the widths of its hidden layers. `arch_id` is its canonical encoding, and a model is
identified by its architecture and its float32 parameter bytes, so a model file is
self-describing and any node can check that the bytes it was given are the model a
block names.
"""

from dataclasses import dataclass
from typing import Annotated

from consensus.checkpoints import TensorBytes
from consensus.encoding import U8, U16, Hash, MaxItems, encode, tagged_hash
from consensus.tasks import FAMILY_CNN, FAMILY_MLP, Task

MAX_LAYERS = 16
CNN_KERNEL = 3  # every convolution is 3×3, padding 1, followed by ReLU and 2×2 max-pooling


@dataclass(frozen=True, slots=True)
class Arch:
    """A network: MLP (hidden Linear+ReLU layers) or small CNN (conv blocks, then Linear).

    `widths` are the hidden layers' sizes (MLP) or channel counts (CNN), input to output.
    """

    family: U8
    channels: U8
    height: U16
    width: U16
    classes: U16
    widths: Annotated[tuple[U16, ...], MaxItems(MAX_LAYERS)]


@dataclass(frozen=True, slots=True)
class ModelBlob:
    """A model as stored and served: its architecture and float32 little-endian parameters."""

    arch: Arch
    params: TensorBytes


def compute_arch_id(arch: Arch) -> bytes:
    """arch_id: the architecture's canonical encoding."""
    return encode(arch)


def compute_model_id(arch: Arch, params: bytes) -> Hash:
    """model_id = H("model", arch_id, tensor bytes)."""
    return tagged_hash("model", compute_arch_id(arch), params)


def compute_param_shapes(arch: Arch) -> tuple[tuple[int, ...], ...]:
    """The shape of every parameter tensor, in the fixed (declared) order.

    MLP: for each layer in → out, weight (out, in) then bias (out,); the input is the
    flattened image. CNN: for each block, weight (out, in, 3, 3) then bias (out,), each
    block halving height and width (floor), then one Linear layer to the classes.
    """
    shapes: list[tuple[int, ...]] = []
    if arch.family == FAMILY_MLP:
        fan_in = arch.channels * arch.height * arch.width
        for out in (*arch.widths, arch.classes):
            shapes += [(out, fan_in), (out,)]
            fan_in = out
    elif arch.family == FAMILY_CNN:
        c, h, w = arch.channels, arch.height, arch.width
        for out in arch.widths:
            shapes += [(out, c, CNN_KERNEL, CNN_KERNEL), (out,)]
            c, h, w = out, h // 2, w // 2
        shapes += [(arch.classes, c * h * w), (arch.classes,)]
    else:
        raise ValueError(f"unknown architecture family {arch.family}")
    return tuple(shapes)


def compute_param_count(arch: Arch) -> int:
    total = 0
    for shape in compute_param_shapes(arch):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def check_params_fit(blob: ModelBlob) -> bool:
    """True when a model file's parameter bytes are exactly its architecture's float32s."""
    return len(blob.params) == compute_param_count(blob.arch) * 4


def check_arch_in_space(arch: Arch, task: Task) -> bool:
    """True when `arch` is one HtoA could draw for `task` (a reference model must be)."""
    space, ds = task.arch, task.dataset
    if (arch.family, arch.channels, arch.height, arch.width, arch.classes) != (
            space.family, ds.channels, ds.height, ds.width, ds.classes):
        return False
    return (space.depth_min <= len(arch.widths) <= space.depth_max
            and all(space.width_min <= w <= space.width_max for w in arch.widths))
