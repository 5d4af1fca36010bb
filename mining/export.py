"""A chain model as a file plain PyTorch runs: `torch.jit.load(path)(images)`.

The file is TorchScript: the network (mining.trainer.build_model) with the model's
weights, behind the input scaling the chain trains with (pixels / the format's maximum),
so it takes images as the dataset stores them, (N, C, H, W) pixel values in any dtype,
and returns (N, classes) logits. Nothing of this project is needed to load it.
"""

from pathlib import Path

import torch
from torch import nn

from consensus.models import ModelBlob
from mining.trainer import load_model


class _Scaled(nn.Module):
    def __init__(self, net: nn.Module, pixel_max: int) -> None:
        super().__init__()
        self.net = net
        self.pixel_max = float(pixel_max)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(torch.float32) / self.pixel_max)


def export_model(blob: ModelBlob, pixel_max: int, path: Path) -> None:
    """Write `blob` to `path` as TorchScript taking raw pixels of maximum `pixel_max`."""
    net = load_model(blob)
    try:
        torch.jit.script(_Scaled(net, pixel_max)).save(str(path))
    except RuntimeError as e:  # torch's word for a path it cannot write
        raise OSError(f"cannot write {path}: {e}") from None
