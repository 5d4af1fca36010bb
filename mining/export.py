"""A chain model as a file plain PyTorch runs: `torch.jit.load(path)(images)`.

The file is TorchScript: the network (mining.trainer.build_model) with the model's
weights, behind the input scaling the chain trains with (pixels / the format's maximum),
so it takes images as the dataset stores them, (N, C, H, W) pixel values in any dtype,
and returns (N, classes) logits. Nothing of this project is needed to load it.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from consensus.models import ModelBlob, check_params_fit
from mining.trainer import build_model


class _Scaled(nn.Module):
    def __init__(self, net: nn.Module, pixel_max: int) -> None:
        super().__init__()
        self.net = net
        self.pixel_max = float(pixel_max)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(torch.float32) / self.pixel_max)


def export_model(blob: ModelBlob, pixel_max: int, path: Path) -> None:
    """Write `blob` to `path` as TorchScript taking raw pixels of maximum `pixel_max`."""
    if not check_params_fit(blob):
        raise ValueError("the model's parameters do not fit its architecture")
    net = build_model(blob.arch)
    flat = torch.from_numpy(np.frombuffer(blob.params, dtype="<f4").copy())
    offset = 0
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    try:
        torch.jit.script(_Scaled(net.eval(), pixel_max)).save(str(path))
    except RuntimeError as e:  # torch's word for a path it cannot write
        raise OSError(f"cannot write {path}: {e}") from None
